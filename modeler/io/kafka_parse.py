"""Kafka message bytes -> event row: a fast path for plainly valid JSON, the schema for the rest.

:func:`parse_message` is what every reader calls on each record: ``(user, item, rating,
timestamp)`` for a rating, ``(user, item, None, timestamp, weight)`` for an implicit event, or
the reason it goes to the dead-letter topic. :func:`fast_parse` accepts only a subset of what
:mod:`common.schema` accepts, with the same result, so the two never disagree.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

try:  # orjson parses ~5x faster; json is the fallback with identical results
    import orjson

    _loads: Callable[[bytes], Any] = orjson.loads
    _JSONError: tuple[type[Exception], ...] = (orjson.JSONDecodeError, ValueError)
except ImportError:  # pragma: no cover - orjson is in the modeler group
    import json

    _loads = json.loads
    _JSONError = (ValueError,)

MAX_ID_LENGTH = 128  # common.schema.MAX_ID_LENGTH; repeated here to keep the hot path flat
DEFAULT_MAX_WEIGHT = 1_000_000.0  # common.schema.DEFAULT_MAX_WEIGHT (EVENT_MAX_WEIGHT)
_TYPE_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_")


def fast_parse(value: bytes, rating_min: float, rating_max: float,
               max_weight: float = DEFAULT_MAX_WEIGHT) -> tuple | None:
    """``(user, item, rating, timestamp)`` for the common, plainly valid rating, ``(user,
    item, None, timestamp, weight)`` for a plainly valid implicit event; ``None`` when the
    message needs the full validator (:func:`common.schema.parse_rating` /
    :func:`common.schema.parse_event`).

    Accepts only a subset of what those accept, with the same result (ids stripped, int ids
    as strings, rating or weight as float); anything unusual defers to them, so the two can
    never disagree on what is valid.
    """
    try:
        d = _loads(value)
    except _JSONError:
        return None
    if type(d) is not dict:
        return None
    user: Any = d.get("user")
    item: Any = d.get("item")
    kind = d.get("type")
    if kind is not None and kind != "rating":
        return _fast_implicit(d, user, item, kind, max_weight)
    if "weight" in d:
        return None
    return _fast_fields(user, item, d.get("rating"), rating_min, rating_max, d.get("timestamp"))


def _fast_fields(user: Any, item: Any, value: Any, lo: float, hi: float,
                 ts: Any) -> tuple[str, str, float, int] | None:
    """``(user, item, value, timestamp)`` when the ids are plain, ``value`` (a rating or a
    weight) a finite number in [lo, hi] and the timestamp a non-negative int; else None."""
    ids = _fast_ids(user, item)
    if ids is None:
        return None
    tv = type(value)
    if tv is float or tv is int:
        value = float(value)
    else:
        return None
    if not (math.isfinite(value) and lo <= value <= hi):
        return None
    if type(ts) is not int or ts < 0:
        return None
    return ids[0], ids[1], value, ts


def _fast_id(value: Any) -> str | None:
    """An id as :func:`common.schema.parse_event` would give it (a stripped string, an int id
    as a string), or None when the message needs the full validator."""
    t = type(value)
    if t is str:
        value = value.strip()
    elif t is int:
        value = str(value)
    else:
        return None
    return value if 0 < len(value) <= MAX_ID_LENGTH else None


def _fast_ids(user: Any, item: Any) -> tuple[str, str] | None:
    """Both ids (:func:`_fast_id`), or None."""
    u, i = _fast_id(user), _fast_id(item)
    if u is None or i is None:
        return None
    return u, i


def _fast_implicit(d: dict, user: Any, item: Any, kind: Any, max_weight: float) -> tuple | None:
    """The implicit-event half of :func:`fast_parse`."""
    if type(kind) is not str or not 0 < len(kind) <= 32 or not ("a" <= kind[0] <= "z") \
            or not _TYPE_CHARS.issuperset(kind):
        return None
    if d.get("rating") is not None:
        return None
    got = _fast_fields(user, item, d.get("weight", 1.0), 0.0, max_weight, d.get("timestamp"))
    if got is None:
        return None
    return got[0], got[1], None, got[3], got[2]


def _is_implicit(value: bytes) -> bool:
    """Whether a message that failed the fast path should be validated as an implicit event
    (it names a non-rating ``type`` or carries a ``weight``); ratings keep parse_rating."""
    try:
        d = _loads(value)
    except _JSONError:
        return False
    return type(d) is dict and ((d.get("type") not in (None, "rating")) or "weight" in d)


def parse_message(value: bytes | None, rating_min: float, rating_max: float,
                  max_weight: float = DEFAULT_MAX_WEIGHT) -> tuple[tuple | None, str]:
    """``((user, item, rating, timestamp), "")``, ``((user, item, None, timestamp, weight),
    "")`` for an implicit event, or ``(None, reason)``; never raises."""
    if value is None:
        return None, "body: empty message (tombstone)"
    row = fast_parse(value, rating_min, rating_max, max_weight)
    if row is not None:
        return row, ""
    from common.schema import InvalidRating, RatingScale, parse_event, parse_rating

    scale = RatingScale(min=rating_min, max=rating_max)
    if _is_implicit(value):
        try:
            e = parse_event(value, scale, max_weight)
        except InvalidRating as exc:
            return None, exc.reason
        except Exception as exc:
            return None, f"body: cannot be parsed ({type(exc).__name__}: {exc})"[:500]
        if e.is_rating:  # "type": "rating" with a weight is refused above; kept for safety
            return (e.user, e.item, float(e.rating or 0.0), int(e.timestamp)), ""
        return (e.user, e.item, None, int(e.timestamp), float(e.weight or 0.0)), ""
    try:
        r = parse_rating(value, scale)
    except InvalidRating as exc:
        return None, exc.reason
    except Exception as exc:
        return None, f"body: cannot be parsed ({type(exc).__name__}: {exc})"[:500]
    return (r.user, r.item, float(r.rating), int(r.timestamp)), ""
