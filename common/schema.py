"""The event: what the frontend produces, what the modeler consumes.

Wire format on Kafka: one UTF-8 JSON object per message, keyed by user. A rating (explicit
feedback) is ``{"user": "42", "item": "1193", "rating": 4.5, "timestamp": 978300760}``
(``"type": "rating"`` is implied). Any other ``type`` is an implicit event (seed 002: plays,
clicks, views) with a non-negative ``weight`` (default 1) and no rating:
``{"user": "u1", "item": "a9", "type": "play", "weight": 12, "timestamp": 978300760}``.
Ids are strings (MovieLens integer ids are strings of digits; UUIDs work too).
"""

from __future__ import annotations

import math
import re
import time
from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from common.errors import StreamrecError

MAX_ID_LENGTH = 128
DEFAULT_RATING_MIN = 0.5
DEFAULT_RATING_MAX = 5.0
RATING = "rating"  # the event type of explicit feedback
# Implicit weights above this are refused (the DLQ's "weight" reason); EVENT_MAX_WEIGHT.
DEFAULT_MAX_WEIGHT = 1_000_000.0
EVENT_TYPE_PATTERN = r"^[a-z][a-z0-9_]{0,31}$"

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


class Event(BaseModel):
    """One event: a rating (``type`` "rating", ``rating`` on the scale, no ``weight``) or an
    implicit event (any other ``type``, ``weight`` ≥ 0 and ≤ the cap, no ``rating``).
    Validate with :func:`parse_event` to apply a non-default scale and weight cap."""

    model_config = ConfigDict(frozen=True, extra="ignore", str_strip_whitespace=True)

    user: Id
    item: Id
    type: Annotated[str, Field(pattern=EVENT_TYPE_PATTERN)] = RATING
    rating: float | None = None
    weight: float | None = None
    timestamp: int = Field(default_factory=lambda: int(time.time()), ge=0)

    _ids = field_validator("user", "item", mode="before")(Rating._id_as_string.__func__)  # type: ignore[attr-defined]

    @field_validator("rating", "weight", mode="before")
    @classmethod
    def _finite_number(cls, value: Any) -> Any:
        if value is None:
            return value
        return Rating._finite_number.__func__(cls, value)  # type: ignore[attr-defined]

    @model_validator(mode="after")
    def _kind(self, info: Any) -> Event:
        ctx = info.context or {}
        if self.type == RATING:
            if self.rating is None:
                raise ValueError("rating: field required for an event of type 'rating'")
            if self.weight is not None:
                raise ValueError("weight: not allowed on a rating (its weight comes from the rating)")
            scale: RatingScale = ctx.get("scale") or RatingScale()
            if not scale.min <= self.rating <= scale.max:
                raise ValueError(f"rating: must be between {scale.min} and {scale.max}")
            return self
        if self.rating is not None:
            raise ValueError(f"rating: not allowed on an implicit event (type {self.type!r}); send weight")
        weight = 1.0 if self.weight is None else self.weight
        cap = float(ctx.get("max_weight") or DEFAULT_MAX_WEIGHT)
        if weight < 0:
            raise ValueError("weight: must be >= 0")
        if weight > cap:
            raise ValueError(f"weight: must be <= {cap:g} (EVENT_MAX_WEIGHT)")
        object.__setattr__(self, "weight", float(weight))
        return self

    @property
    def is_rating(self) -> bool:
        return self.type == RATING

    def to_json_bytes(self) -> bytes:
        return self.model_dump_json(exclude_none=True).encode()


class InvalidRating(StreamrecError, ValueError):
    """A message or request body that is not a valid rating; ``reason`` names the field.
    Also a ``ValueError``, as callers written before the root exception catch it."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def describe_errors(exc: ValidationError) -> str:
    """``rating: must be between 0.5 and 5.0; user: field required`` style summary."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        # Whole-event checks name their field themselves ("weight: must be >= 0"); anything
        # else without a location ("Invalid JSON: ...") is about the body.
        named = re.match(r"[a-z_]+: ", msg) is not None
        parts.append(f"{loc}: {msg}" if loc else msg if named else f"body: {msg}")
    return "; ".join(parts)


def parse_rating(data: dict[str, Any] | bytes | str, scale: RatingScale | None = None) -> Rating:
    """Validate a dict or raw JSON into a :class:`Rating`; raise :class:`InvalidRating`."""
    return _validated(Rating, data, {"scale": scale or RatingScale()})


def parse_event(
    data: dict[str, Any] | bytes | str, scale: RatingScale | None = None, max_weight: float | None = None
) -> Event:
    """Validate a dict or raw JSON into an :class:`Event` (rating or implicit); raise
    :class:`InvalidRating` naming the field."""
    return _validated(Event, data, {"scale": scale or RatingScale(),
                                    "max_weight": max_weight or DEFAULT_MAX_WEIGHT})


_M = TypeVar("_M", bound=BaseModel)


def _validated(model: type[_M], data: dict[str, Any] | bytes | str, context: dict[str, Any]) -> _M:
    """``model`` from a dict or raw JSON; a validation error becomes :class:`InvalidRating`."""
    try:
        if isinstance(data, (bytes, str)):
            return model.model_validate_json(data, context=context)
        return model.model_validate(data, context=context)
    except ValidationError as exc:
        raise InvalidRating(describe_errors(exc)) from exc
