"""Operations: liveness, readiness, Prometheus metrics and the served model's description."""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Query
from fastapi.responses import PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import ValidationError

from predictor.deps import Svc
from predictor.errors import NOT_READY, ApiError
from predictor.routes import errors
from predictor.schemas import Health, ModelInfo, Ready, SearchCandidate
from predictor.store import REDIS_ERRORS

log = logging.getLogger(__name__)
router = APIRouter(tags=["ops"])


@router.get("/healthz", response_model=Health)
async def healthz() -> Health:
    """Liveness: the process answers."""
    return Health(status="ok")


@router.get("/readyz", response_model=Ready, responses=errors(503))
async def readyz(svc: Svc) -> Ready:
    """Readiness: a model or the popular fallback is loaded and Redis answers."""
    problems = []
    try:
        await svc.redis.ping()
    except REDIS_ERRORS as exc:
        svc.watcher.poke()
        problems.append(f"redis unreachable: {exc}")
    model = svc.watcher.model
    if model is None and not svc.watcher.popular:
        problems.append("no model and no popular fallback loaded yet")
    if problems:
        raise ApiError(503, NOT_READY, "; ".join(problems))
    # "worker": which process answered (several uvicorn workers share the port, each with
    # its own model copy: a deployment check can tell when all of them are ready).
    return Ready(status="ready", version=model.version if model else None,
                 strategy="model" if model else "popular", worker=os.getpid())


@router.get("/metrics", response_class=PlainTextResponse,
            responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}})
async def prometheus(svc: Svc) -> Response:
    """Prometheus metrics: requests and latency per route, model version, swaps."""
    return Response(svc.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/model", response_model=ModelInfo, tags=["model"], responses=errors(422, 503))
async def model_info(svc: Svc, history: Annotated[int, Query(ge=0, le=1000)] = 20) -> ModelInfo:
    """The served version: its factor sets, ranks, sizes, ratings seen, recent metrics."""
    model = svc.require_model()
    entries = await svc.redis.lrange(svc.keys.metrics, 0, history - 1) if history else []
    recent = []
    for raw in entries:
        with contextlib.suppress(ValueError):
            value = orjson.loads(raw)
            if isinstance(value, dict):
                recent.append(value)
    models = (["explicit"] if model.has_explicit else []) + (["ranking"] if model.ranking is not None else [])
    return ModelInfo(
        version=model.version, models=models, rank=model.rank,
        ranking_rank=model.ranking.rank if model.ranking is not None else 0,
        n_users=model.n_users, n_items=model.n_items, ratings_seen=model.ratings_seen,
        created=model.created, reg_param=model.reg_param, mu=model.mu,
        rating_min=model.rating_min, rating_max=model.rating_max,
        segments=list(model.segments), metrics=model.metrics, history=recent,
        candidates=_candidates(model.candidates),
    )


def _candidates(raw: list[dict[str, Any]]) -> list[SearchCandidate]:
    """The version's search candidates; an entry the modeler wrote malformed is left out
    (and logged) rather than turning the whole description into a 500."""
    out = []
    for entry in raw:
        try:
            out.append(SearchCandidate.model_validate(entry))
        except ValidationError as exc:
            log.warning("ignoring malformed search candidate %r: %s", entry.get("id"), exc.errors()[:1])
    return out
