"""radanalytics jiminy-predictor's REST API: server info, rating and ranking predictions.

Predictions complete when created (201 with the result); they stay retrievable by id for
``PREDICTOR_PREDICTION_TTL_S``. Errors here have jiminy's shape (:mod:`predictor.errors`).
"""

from __future__ import annotations

import importlib.metadata
import uuid
from typing import Any

import orjson
from fastapi import APIRouter
from fastapi.responses import Response

from predictor import serving
from predictor.deps import Service, Svc
from predictor.errors import PREDICTION_NOT_FOUND, ApiError
from predictor.jsonio import js
from predictor.routes import errors
from predictor.schemas import (
    JiminyRanksRequest,
    JiminyRanksResponse,
    JiminyRatingsRequest,
    JiminyRatingsResponse,
    PathId,
    ServerInfo,
)

router = APIRouter(tags=["jiminy"])

APP_NAME = "streamrec-predictor"


def package_version() -> str:
    try:
        return importlib.metadata.version("streamrec")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree, not installed
        return "0+unknown"


@router.get("/", response_model=ServerInfo, responses=errors(404, jiminy=True))
async def server_info() -> ServerInfo:
    """jiminy: the server application's name and version."""
    return ServerInfo.model_validate({"application": {"name": APP_NAME, "version": package_version()}})


async def _store(svc: Service, kind: str, record: dict[str, Any]) -> Response:
    await svc.redis.set(svc.keys.prediction(kind, record["id"]),
                        orjson.dumps(record), ex=svc.settings.prediction_ttl_s)
    return js({"prediction": record}, 201, headers={"Location": f"/predictions/{kind}/{record['id']}"})


async def _load(svc: Service, kind: str, pid: str) -> Response:
    raw = await svc.redis.get(svc.keys.prediction(kind, pid))
    if raw is None:
        raise ApiError(404, PREDICTION_NOT_FOUND, f"no {kind} prediction {pid} (unknown or expired)", "id")
    stored = raw if isinstance(raw, bytes) else raw.encode()
    return Response(b'{"prediction":' + stored + b"}", media_type="application/json")


@router.post("/predictions/ratings", status_code=201, response_model=JiminyRatingsResponse,
             responses=errors(404, 409, 422, 503, jiminy=True))
async def jiminy_ratings(svc: Svc, body: JiminyRatingsRequest) -> Response:
    """jiminy: predicted ratings of ``products`` by ``user``; complete when created."""
    pairs = [(str(body.user), str(p)) for p in body.products]
    _, out = await serving.predict_pairs(svc, pairs)
    record = {"id": uuid.uuid4().hex, "user": body.user,
              "products": [{"id": p, "rating": o["rating"]} for p, o in zip(body.products, out, strict=True)]}
    return await _store(svc, "ratings", record)


@router.get("/predictions/ratings/{pid}", response_model=JiminyRatingsResponse,
            responses=errors(404, 422, 503, jiminy=True))
async def jiminy_ratings_get(svc: Svc, pid: PathId) -> Response:
    """jiminy: a stored rating prediction."""
    return await _load(svc, "ratings", pid)


@router.post("/predictions/ranks", status_code=201, response_model=JiminyRanksResponse,
             responses=errors(409, 422, 503, jiminy=True))
async def jiminy_ranks(svc: Svc, body: JiminyRanksRequest) -> Response:
    """jiminy: the ``topk`` best products for ``user`` (ordered as ``/v1`` recommendations:
    by the ranking model when the version has one); complete when created. ``rating`` is the
    clipped predicted rating, or the ranking score when the version has no rating model."""
    svc.require_model()  # jiminy's products need a rating: none before the first version
    result = await serving.recommend_for(svc, str(body.user), body.topk, False, None)
    # A popular item the rating model does not know has no rating: it is left out.
    products: list[dict[str, Any]] = [
        {"id": x["item"], "rating": x["rating"] if "rating" in x else x["score"]}
        for x in result["items"] if "rating" in x or result["strategy"] != "popular"]
    if isinstance(body.user, int):
        # jiminy clients use MovieLens integer ids: answer in kind where possible.
        products = [{"id": int(p["id"]) if str(p["id"]).isdigit() and len(str(p["id"])) < 19 else p["id"],
                     "rating": p["rating"]} for p in products]
    record = {"id": uuid.uuid4().hex, "user": body.user, "topk": body.topk,
              "products": products, "strategy": result["strategy"], "version": result["version"]}
    return await _store(svc, "ranks", record)


@router.get("/predictions/ranks/{pid}", response_model=JiminyRanksResponse,
            responses=errors(404, 422, 503, jiminy=True))
async def jiminy_ranks_get(svc: Svc, pid: PathId) -> Response:
    """jiminy: a stored ranking."""
    return await _load(svc, "ranks", pid)
