"""What the routes compute against one model version: top-N lists, predicted ratings and
fold-in, as plain JSON-ready dicts shaped like :mod:`predictor.schemas`.

The top-N dicts are what both the direct path (:mod:`predictor.hotpath`) and the declared
route serialise, so the two answer byte-identical JSON.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

import numpy as np

from common.schema import RatingScale
from common.snapshot import SnapshotChanged
from predictor.deps import Service
from predictor.errors import INVALID_REQUEST, MODEL_CHANGING, NO_RATING_MODEL, UNKNOWN_ITEM, ApiError
from predictor.model import BY_RANKING, BY_RATING, FactorModel, UserEntry, recommend
from predictor.store import user_entry


def text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def scored_items(svc: Service, model: FactorModel, rows: np.ndarray, scores: np.ndarray,
                 ratings: np.ndarray | None) -> list[dict[str, Any]]:
    """Items of ``rows`` with their ranking ``scores`` and, if given, clipped ``ratings``."""
    ids = model.item_ids
    catalog = svc.watcher.catalog
    out = []
    rated = ratings.tolist() if ratings is not None else None
    for k, (row, score) in enumerate(zip(rows.tolist(), scores.tolist(), strict=True)):
        item = ids[row]
        title, genres = catalog.get(item)
        entry: dict[str, Any] = {"item": item, "score": score}
        if rated is not None:
            entry["rating"] = rated[k]
        entry["title"] = title
        entry["genres"] = genres
        out.append(entry)
    return out


def ratings_of(model: FactorModel, bias: float, vector: np.ndarray | None, rows: np.ndarray) -> np.ndarray | None:
    """Clipped predicted ratings of ``rows`` (None when the version has no rating model)."""
    if not model.has_explicit:
        return None
    return np.asarray(model.predict_rows(bias, vector, rows))


def popular_items(svc: Service, model: FactorModel | None, n: int,
                  exclude: frozenset[str] = frozenset()) -> list[dict[str, Any]]:
    """The popular list: ``score`` and ``count`` are the item's number of ratings; ``rating``,
    when the version has a rating model that knows the item, its baseline mu + b_i, clipped."""
    catalog = svc.watcher.catalog
    out = []
    explicit = model is not None and model.has_explicit
    for item, count in svc.watcher.popular_for(model):
        if item in exclude:
            continue
        title, genres = catalog.get(item)
        entry: dict[str, Any] = {"item": item, "score": float(count)}
        row = model.index.get(item) if explicit and model is not None else None
        if row is not None and model is not None:
            entry["rating"] = float(model.clip(float(model.item_aug[row, model.rank])))
        entry.update(count=count, title=title, genres=genres)
        out.append(entry)
        if len(out) >= n:
            break
    return out


async def entry_of(svc: Service, user: str) -> tuple[FactorModel | None, UserEntry | None]:
    """The current model and the user's entry for exactly that version.

    A version collected between taking the model and reading the user (rare: the modeler
    keeps the last few) is retried on the then-current model.
    """
    for attempt in range(4):
        model = svc.watcher.model
        if model is None:
            return None, None
        try:
            return model, await user_entry(
                svc.redis, svc.keys, model, user, svc.settings.user_cache_size, svc.settings.refit_users
            )
        except SnapshotChanged:
            svc.watcher.poke()
            await asyncio.sleep(0.05 * (attempt + 1))
    raise ApiError(503, MODEL_CHANGING, "the model is being replaced; retry shortly")


async def rated_ids(svc: Service, user: str) -> frozenset[str]:
    keys = await svc.redis.hkeys(svc.keys.rated(user))
    return frozenset(text(k) for k in keys)


async def recommend_for(
    svc: Service, user: str, n: int, include_rated: bool, candidates: list[str] | None,
    rank_by: str | None = None,
) -> dict[str, Any]:
    """Top-``n`` for a user (a :class:`predictor.schemas.UserItems` dict).

    Ordered by the ranking model when the version has one (``rank_by`` unset or
    ``"ranking"``), else by the predicted rating; a user the chosen model lacks (ranking:
    only low ratings, so no positive) falls back to the rating model when the order was not
    asked for, and to the popular list when no model knows them.
    """
    model, entry = await entry_of(svc, user)
    by = rank_by or (model.default_order if model is not None else None)
    if model is not None and by == BY_RATING and not model.has_explicit:
        raise ApiError(409, NO_RATING_MODEL,
                       f"version {model.version} has no rating model (implicit events only): "
                       "use rank_by=ranking", "rank_by")
    if model is not None and by == BY_RANKING and model.ranking is None:
        raise ApiError(409, "no_ranking_model",
                       f"version {model.version} has no ranking model: use rank_by=rating", "rank_by")
    vector = None
    if entry is not None:
        vector = entry.rank_vector if by == BY_RANKING else entry.vector
        if vector is None and rank_by is None and by == BY_RANKING and entry.vector is not None:
            by, vector = BY_RATING, entry.vector
    if model is None or entry is None or vector is None:
        if include_rated:
            seen: frozenset[str] = frozenset()
        elif entry is not None:
            seen = entry.rated_ids
        else:
            seen = await rated_ids(svc, user)
        limit = n if candidates is None else len(svc.watcher.popular_for(model))
        items = popular_items(svc, model, limit, seen)
        if candidates is not None:
            allowed = set(candidates)
            items = [x for x in items if x["item"] in allowed][:n]
        return {"user": user, "strategy": "popular", "version": model.version if model else None,
                "rank_by": None, "items": items}
    by = by or BY_RATING
    bias = entry.bias if by == BY_RATING else 0.0
    exclude = None if include_rated else entry.rated
    ratings: np.ndarray | None
    if candidates is None:
        rate = (entry.bias, entry.vector) if by == BY_RANKING and model.has_explicit else None
        rows, scores, ratings = await svc.batcher.submit(model, bias, vector, n, exclude, by, rate)
    else:
        index = model.index
        cand_rows = np.fromiter((index[c] for c in candidates if c in index), dtype=np.int64)
        rows, scores = recommend(model, bias, vector, n, exclude=exclude, candidates=cand_rows, by=by)
        # By rating the scores are r̂ itself, unclipped; by ranking the ratings are predicted apart.
        ratings = model.clip(scores) if by == BY_RATING else ratings_of(model, entry.bias, entry.vector, rows)
    return {"user": user, "strategy": "model", "version": model.version, "rank_by": by,
            "items": scored_items(svc, model, rows, scores, ratings)}


def check_rating(svc: Service, field: str, value: float) -> None:
    lo, hi = svc.settings.rating_min, svc.settings.rating_max
    if not (math.isfinite(value) and lo <= value <= hi):
        raise ApiError(422, INVALID_REQUEST, f"{field}: must be between {lo} and {hi}", field)


async def predict_pairs(svc: Service, pairs: list[tuple[str, str]]) -> tuple[FactorModel, list[dict[str, Any]]]:
    """Clipped predicted ratings of (user, item) pairs against one version."""
    model = svc.require_rating_model()
    unknown = sorted({item for _, item in pairs if item not in model.index})
    if unknown:
        raise ApiError(404, UNKNOWN_ITEM, f"the model does not know item(s) {', '.join(unknown[:50])}", "item")
    entries: dict[str, UserEntry] = {}
    for attempt in range(4):
        model = svc.require_rating_model()
        try:
            for user in dict.fromkeys(u for u, _ in pairs):
                entries[user] = await user_entry(
                    svc.redis, svc.keys, model, user, svc.settings.user_cache_size, svc.settings.refit_users
                )
            break
        except SnapshotChanged:
            entries.clear()
            svc.watcher.poke()
            await asyncio.sleep(0.05 * (attempt + 1))
    else:
        raise ApiError(503, MODEL_CHANGING, "the model is being replaced; retry shortly")
    out = []
    for user, item in pairs:
        row = model.index.get(item)
        if row is None:  # a new version dropped the item: unlikely, but answer properly
            raise ApiError(404, UNKNOWN_ITEM, f"the model does not know item {item}", "item")
        e = entries[user]
        rating = float(model.predict_rows(e.bias, e.vector, np.array([row]))[0])
        out.append({"user": user, "item": item, "rating": rating,
                    "strategy": "model" if e.vector is not None else "popular"})
    return model, out


def fold_in(svc: Service, ratings: dict[str, float], n: int, exclude_rated: bool) -> dict[str, Any]:
    """A :class:`predictor.schemas.FoldInItems` dict for an anonymous visitor's ratings.

    With a ranking model: the iALS solve of the visitor against the cached Gramian
    (:meth:`predictor.model.RankingSet.fold_in`), each rating weighted by the version's own
    :class:`common.feedback.Weighting`; the predicted ratings come from a fold-in into the
    rating model. Without one (older modeler) the rating model's fold-in orders the list.
    """
    model = svc.watcher.model
    exclude_ids = frozenset(ratings) if exclude_rated else frozenset()
    known: list[tuple[int, float]] = []
    if model is not None:
        known = [(model.index[i], v) for i, v in ratings.items() if i in model.index]
    unknown = [i for i in ratings if model is None or i not in model.index]

    def popular() -> dict[str, Any]:
        return {"strategy": "popular", "version": model.version if model else None,
                "unknown_items": unknown, "items": popular_items(svc, model, n, exclude_ids)}

    if model is None or not known:
        return popular()
    rows = np.array([r for r, _ in known], dtype=np.int64)
    values = np.array([v for _, v in known], dtype=np.float64)
    exclude = rows if exclude_rated else None
    bias = 0.0
    vector: np.ndarray | None = None
    if model.has_explicit:
        bias, vector = model.fold_in(rows, values)
    x = None
    if model.ranking is not None:
        scale = RatingScale(min=model.rating_min, max=model.rating_max)
        weighting = model.ranking.weighting
        x = model.ranking.fold_in(rows, np.array([weighting.rating_weight(v, scale) for v in values]))
    if x is not None:
        found, scores = recommend(model, 0.0, x, n, exclude=exclude, by=BY_RANKING)
        rated = ratings_of(model, bias, vector, found)
    elif vector is not None:
        found, scores = recommend(model, bias, vector, n, exclude=exclude)
        rated = model.clip(scores)
    else:
        return popular()  # implicit-only version and no positive among the ratings
    return {"strategy": "fold_in", "version": model.version, "unknown_items": unknown,
            "items": scored_items(svc, model, found, scores, rated)}
