"""Predicted ratings (the explicit model): one pair or many."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from common.schema import MAX_ID_LENGTH
from predictor import serving
from predictor.deps import Svc
from predictor.routes import errors
from predictor.schemas import PredictBatch, Prediction, Predictions

router = APIRouter(tags=["predict"], responses=errors(404, 409, 422, 503))


@router.get("/v1/predict", response_model=Prediction)
async def predict_one(
    svc: Svc,
    user: Annotated[str, Query(min_length=1, max_length=MAX_ID_LENGTH)],
    item: Annotated[str, Query(min_length=1, max_length=MAX_ID_LENGTH)],
) -> Prediction:
    """Predicted rating of ``item`` by ``user``, clipped to the rating scale (409 when the
    version has no rating model)."""
    model, out = await serving.predict_pairs(svc, [(user, item)])
    return Prediction.model_validate({**out[0], "version": model.version})


@router.post("/v1/predict", response_model=Predictions)
async def predict_many(svc: Svc, body: PredictBatch) -> Predictions:
    """Predicted ratings for many (user, item) pairs against one model version."""
    model, out = await serving.predict_pairs(svc, [(p.user, p.item) for p in body.pairs])
    strategy = "model" if all(p["strategy"] == "model" for p in out) else "popular"
    return Predictions.model_validate({"predictions": [{**p, "version": model.version} for p in out],
                                       "strategy": strategy, "version": model.version})
