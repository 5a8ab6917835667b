"""Top-N for users, anonymous fold-in, popular items and what a user has rated."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from predictor import serving
from predictor.deps import Service, Svc
from predictor.jsonio import js
from predictor.routes import errors
from predictor.schemas import (
    MAX_N,
    FoldInBody,
    FoldInItems,
    ItemList,
    PathId,
    RankBy,
    RatedItem,
    RecommendBody,
    UserItems,
    UserRatings,
)

router = APIRouter(tags=["recommend"], responses=errors(422, 503))

RANK_BY_HELP = ("Order by the ranking model (default when the version has one) or by the "
                "predicted rating (the explicit model).")


@router.get("/v1/users/{user}/recommendations", response_model=UserItems, responses=errors(409))
async def recommendations(
    request: Request,
    user: PathId,
    n: Annotated[int, Query(ge=1, le=MAX_N)] = 10,
    include_rated: bool = False,
    rank_by: Annotated[RankBy | None, Query(description=RANK_BY_HELP)] = None,
) -> Response:
    """Top-``n`` items for a user; unknown users get the popular fallback."""
    # The service straight from app state, not through Depends: a sub-dependency costs a
    # second parameter-resolution pass (plain requests take the direct path anyway, see
    # predictor.hotpath, which answers these same bytes).
    svc: Service = request.app.state.svc
    return js(await serving.recommend_for(svc, user, n, include_rated, None, rank_by))


@router.post("/v1/users/{user}/recommendations", response_model=UserItems, responses=errors(409))
async def recommendations_post(svc: Svc, user: PathId, body: RecommendBody) -> Response:
    """Top-``n`` items for a user, optionally only among ``candidates``."""
    return js(await serving.recommend_for(svc, user, body.n, body.include_rated, body.candidates,
                                          body.rank_by))


@router.post("/v1/fold-in", response_model=FoldInItems, response_model_exclude_unset=True)
async def fold_in(svc: Svc, body: FoldInBody) -> FoldInItems:
    """Recommendations for an anonymous visitor from a few (item, rating) pairs."""
    for k, r in enumerate(body.ratings):
        serving.check_rating(svc, f"ratings.{k}.rating", r.rating)
    rated = {r.item: r.rating for r in body.ratings}  # the last rating of an item wins
    return FoldInItems.model_validate(serving.fold_in(svc, rated, body.n, body.exclude_rated))


@router.get("/v1/popular", response_model=ItemList, response_model_exclude_unset=True)
async def popular(svc: Svc, n: Annotated[int, Query(ge=1, le=MAX_N)] = 10) -> ItemList:
    """Most-rated items (non-personalised)."""
    model = svc.watcher.model
    return ItemList.model_validate({"strategy": "popular", "version": model.version if model else None,
                                    "items": serving.popular_items(svc, model, n)})


@router.get("/v1/users/{user}/ratings", response_model=UserRatings, tags=["users"])
async def user_ratings(
    svc: Svc, user: PathId, limit: Annotated[int, Query(ge=1, le=10_000)] = 100
) -> UserRatings:
    """Items the user has rated (as the modeler recorded them), with metadata."""
    raw = await svc.redis.hgetall(svc.keys.rated(user))
    pairs: list[tuple[str, float]] = []
    for k, v in raw.items():
        try:
            pairs.append((serving.text(k), float(v)))
        except ValueError:
            continue
    pairs.sort(key=lambda p: (-p[1], p[0]))  # best rated first
    ratings = []
    for item, value in pairs[:limit]:
        title, genres = svc.watcher.catalog.get(item)
        ratings.append(RatedItem(item=item, rating=value, title=title, genres=genres))
    return UserRatings(user=user, total=len(pairs), ratings=ratings)
