"""The rating event: what the frontend produces, what the modeler consumes.

Wire format on Kafka: one UTF-8 JSON object per message,
``{"user": "42", "item": "1193", "rating": 4.5, "timestamp": 978300760}``, keyed by user.
Ids are strings (MovieLens integer ids are strings of digits; UUIDs work too).
"""

from __future__ import annotations

import math
import time
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

MAX_ID_LENGTH = 128
DEFAULT_RATING_MIN = 0.5
DEFAULT_RATING_MAX = 5.0

Id = Annotated[str, Field(min_length=1, max_length=MAX_ID_LENGTH)]


class RatingScale(BaseModel):
    """The closed interval ratings live on; predictions are clipped to it."""

    model_config = ConfigDict(frozen=True)

    min: float = DEFAULT_RATING_MIN
    max: float = DEFAULT_RATING_MAX

    def clip(self, value: float) -> float:
        return min(self.max, max(self.min, value))


class Rating(BaseModel):
    """One explicit rating. Validate with :func:`parse_rating` to apply a non-default scale."""

    model_config = ConfigDict(frozen=True, extra="ignore", str_strip_whitespace=True)

    user: Id
    item: Id
    rating: float
    timestamp: int = Field(default_factory=lambda: int(time.time()), ge=0)

    @field_validator("user", "item", mode="before")
    @classmethod
    def _id_as_string(cls, value: Any) -> Any:
        # MovieLens ids arrive as JSON numbers from some producers; bools are not ids.
        if isinstance(value, bool):
            raise ValueError("must be a string id, not a boolean")
        if isinstance(value, int):
            return str(value)
        return value

    @field_validator("rating", mode="before")
    @classmethod
    def _finite_number(cls, value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError("must be a number, not a boolean")
        if isinstance(value, str):
            raise ValueError("must be a number, not a string")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value

    @field_validator("rating")
    @classmethod
    def _on_scale(cls, value: float, info: Any) -> float:
        if not math.isfinite(value):
            raise ValueError("must be a finite number")
        scale: RatingScale = (info.context or {}).get("scale") or RatingScale()
        if not scale.min <= value <= scale.max:
            raise ValueError(f"must be between {scale.min} and {scale.max}")
        return value

    def to_json_bytes(self) -> bytes:
        return self.model_dump_json().encode()


class InvalidRating(ValueError):
    """A message or request body that is not a valid rating; ``reason`` names the field."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def describe_errors(exc: ValidationError) -> str:
    """``rating: must be between 0.5 and 5.0; user: field required`` style summary."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "body"
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}")
    return "; ".join(parts)


def parse_rating(data: dict[str, Any] | bytes | str, scale: RatingScale | None = None) -> Rating:
    """Validate a dict or raw JSON into a :class:`Rating`; raise :class:`InvalidRating`."""
    context = {"scale": scale or RatingScale()}
    try:
        if isinstance(data, (bytes, str)):
            return Rating.model_validate_json(data, context=context)
        return Rating.model_validate(data, context=context)
    except ValidationError as exc:
        raise InvalidRating(describe_errors(exc)) from exc
