"""The catalogue: search, genres, one item, and items similar to one."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from predictor import serving
from predictor.deps import Svc
from predictor.errors import UNKNOWN_ITEM, ApiError
from predictor.routes import errors
from predictor.schemas import (
    MAX_N,
    CatalogItem,
    GenreCount,
    Genres,
    ItemInfo,
    ItemSearch,
    PathId,
    SimilarItems,
)

router = APIRouter(tags=["items"], responses=errors(422, 503))


@router.get("/v1/items", response_model=ItemSearch)
async def search_items(
    svc: Svc,
    q: Annotated[str, Query(max_length=200)] = "",
    genre: Annotated[str | None, Query(max_length=100)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 20,
    offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
) -> ItemSearch:
    """Catalogue search: case-insensitive title substring, optional genre."""
    catalog = svc.watcher.catalog
    hits, total = catalog.search(q, genre, limit, offset)
    items = [CatalogItem(item=catalog.ids[k], title=catalog.titles[k], genres=catalog.genres[k]) for k in hits]
    return ItemSearch(items=items, total=total)


@router.get("/v1/genres", response_model=Genres)
async def genres(svc: Svc) -> Genres:
    """Every genre of the loaded catalogue with its number of items, most common first."""
    counts: dict[str, int] = {}
    for item_genres in svc.watcher.catalog.genres:
        for g in item_genres:
            counts[g] = counts.get(g, 0) + 1
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return Genres(genres=[GenreCount(genre=g, items=c) for g, c in ranked])


@router.get("/v1/items/{item}", response_model=ItemInfo, response_model_exclude_unset=True,
            responses=errors(404))
async def item_info(svc: Svc, item: PathId) -> ItemInfo:
    """Metadata of one item, and whether the served model knows it."""
    title, item_genres = svc.watcher.catalog.get(item)
    model = svc.watcher.model
    in_model = model is not None and item in model.index
    if title is None and not in_model:
        raise ApiError(404, UNKNOWN_ITEM, f"no item {item} in the catalogue or the model", "item")
    out = ItemInfo(item=item, title=title, genres=item_genres, in_model=in_model,
                   version=model.version if model else None)
    if in_model and model is not None and model.has_explicit:
        out.bias = float(model.item_bias[model.index[item]])
    return out


@router.get("/v1/items/{item}/similar", response_model=SimilarItems, response_model_exclude_unset=True,
            responses=errors(404))
async def similar(svc: Svc, item: PathId, n: Annotated[int, Query(ge=1, le=MAX_N)] = 10) -> SimilarItems:
    """Items whose vectors are closest in cosine to ``item``'s (the ranking model's when the
    version has one, else the rating model's); ``score`` is the cosine."""
    model = svc.require_model()
    row = model.index.get(item)
    if row is None:
        raise ApiError(404, UNKNOWN_ITEM, f"the model does not know item {item}", "item")
    rows, cos = model.similar(row, n)
    return SimilarItems.model_validate({
        "item": item, "strategy": "model", "version": model.version,
        "items": serving.scored_items(svc, model, rows, cos, None)})
