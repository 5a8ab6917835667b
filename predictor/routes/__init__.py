"""The predictor's routes, one ``APIRouter`` per area (assembled by :func:`predictor.app.create_app`)."""

from __future__ import annotations

from typing import Any

from predictor.schemas import ErrorBody, JiminyErrors


def errors(*statuses: int, jiminy: bool = False) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for the error statuses a route may answer, in its API's shape."""
    model = JiminyErrors if jiminy else ErrorBody
    return {s: {"model": model} for s in statuses}
