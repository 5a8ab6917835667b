"""What routes are handed: the per-app :class:`Service` (settings, Redis, model watcher)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from redis.asyncio import Redis as AsyncRedis

from common.keys import Keys
from predictor.batcher import TopNBatcher
from predictor.config import PredictorSettings
from predictor.errors import NO_MODEL, NO_RATING_MODEL, ApiError
from predictor.metrics import Metrics
from predictor.model import FactorModel
from predictor.store import ModelWatcher


@dataclass
class Service:
    settings: PredictorSettings
    keys: Keys
    watcher: ModelWatcher
    redis: AsyncRedis
    metrics: Metrics
    batcher: TopNBatcher

    def require_model(self) -> FactorModel:
        model = self.watcher.model
        if model is None:
            raise ApiError(503, NO_MODEL, "no model yet: the modeler has not published a version")
        return model

    def require_rating_model(self) -> FactorModel:
        """The served model, which must have an explicit rating model (409 otherwise)."""
        model = self.require_model()
        if not model.has_explicit:
            raise ApiError(409, NO_RATING_MODEL,
                           f"version {model.version} has no rating model: its stream carries implicit "
                           "events only, so there are no predicted ratings (recommendations still work)")
        return model


async def get_service(request: Request) -> Service:
    # async on purpose: FastAPI runs plain-def dependencies in a thread pool, a costly hop on
    # the hot path for a dictionary lookup.
    svc: Service = request.app.state.svc
    return svc


Svc = Annotated[Service, Depends(get_service)]
