"""A micro-batch's records as validated columns: ratings and implicit events split apart,
ids as strings, anything malformed counted and dropped (the one validation every model and
the search share). numpy only.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np


def split_records(records: Iterable[Any]) -> tuple[list[Any], list[Any], list[Any], list[Any], int]:
    """Columns (users, items, ratings, timestamps) of ``(user, item, rating[, timestamp])``
    records, and the number of records that are not such tuples at all."""
    us: list[Any] = []
    its: list[Any] = []
    rs: list[Any] = []
    ts: list[Any] = []
    bad = 0
    for rec in records:
        try:
            u, i, r = rec[0], rec[1], rec[2]
            t = rec[3] if len(rec) > 3 else 0
        except (TypeError, IndexError, KeyError):
            bad += 1
            continue
        us.append(u)
        its.append(i)
        rs.append(r)
        ts.append(t)
    return us, its, rs, ts, bad


Columns = tuple[list[Any], list[Any], list[Any], list[Any]]


def split_events(records: Iterable[Any]) -> tuple[Columns, Columns, int]:
    """:func:`split_records` of the ratings among ``records``, and the implicit events apart:
    a record ``(user, item, None, timestamp, weight)`` (a 5th field not None) is an implicit
    event. Returns (rating columns, implicit columns, bad shapes): each columns a tuple
    (users, items, values, timestamps) with values the rating or the implicit weight."""
    recs = records if isinstance(records, list) else list(records)
    if all(type(rec) is tuple and len(rec) == 4 for rec in recs):
        # Every record a plain (user, item, rating, timestamp) tuple (the common batch):
        # columns in one transpose, nothing to check per record.
        cols = [[rec[0] for rec in recs], [rec[1] for rec in recs], [rec[2] for rec in recs],
                [rec[3] for rec in recs]]
        return cols, [[], [], [], []], 0  # type: ignore[return-value]
    ratings: list[Any] = []
    implicit: list[Any] = []
    bad = 0
    for rec in recs:
        try:
            weight = rec[4] if len(rec) > 4 else None
        except TypeError:
            bad += 1
            continue
        if weight is None:
            ratings.append(rec)
        else:
            implicit.append((rec[0], rec[1], weight, rec[3]))
    us, its, rs, ts, bad_r = split_records(ratings)
    ius, iis, iws, its_, bad_i = split_records(implicit)
    return [us, its, rs, ts], [ius, iis, iws, its_], bad + bad_r + bad_i  # type: ignore[return-value]


def validate_implicit(users: Sequence[Any], items: Sequence[Any], weights: Sequence[Any],
                      timestamps: Sequence[Any]) -> tuple[list[str], list[str], np.ndarray, np.ndarray, int]:
    """Keep implicit events with non-empty ids and a finite weight >= 0 (the Kafka reader
    also enforces the EVENT_MAX_WEIGHT cap); return them + #rejected."""
    return validate_arrays(users, items, weights, timestamps, 0.0, math.inf)


def validate_arrays(
    users: Sequence[Any], items: Sequence[Any], ratings: Sequence[Any], timestamps: Sequence[Any],
    rating_min: float, rating_max: float,
) -> tuple[list[str], list[str], np.ndarray, np.ndarray, int]:
    """Keep ratings with non-empty ids and a finite rating on the scale; return them + #rejected."""
    fast = _validate_plain(users, items, ratings, timestamps, rating_min, rating_max)
    if fast is not None:
        return fast
    ku: list[str] = []
    ki: list[str] = []
    kr: list[float] = []
    kt: list[int] = []
    rejected = 0
    for u, i, r, t in zip(users, items, ratings, timestamps, strict=True):
        try:
            rf = float(r)
            tf = int(t) if t is not None else 0
        except (TypeError, ValueError):
            rejected += 1
            continue
        if (u is None or i is None or not math.isfinite(rf) or not rating_min <= rf <= rating_max
                or str(u) == "" or str(i) == ""):
            rejected += 1
            continue
        ku.append(str(u))
        ki.append(str(i))
        kr.append(rf)
        kt.append(tf)
    return ku, ki, np.asarray(kr, dtype=np.float64), np.asarray(kt, dtype=np.int64), rejected


def _validate_plain(
    users: Sequence[Any], items: Sequence[Any], ratings: Sequence[Any], timestamps: Sequence[Any],
    rating_min: float, rating_max: float,
) -> tuple[list[str], list[str], np.ndarray, np.ndarray, int] | None:
    """:func:`validate_arrays` vectorised, for columns of plain types only (ids ``str``,
    ratings ``float``/``int``, timestamps ``int``): the same answer without a Python step per
    record. None for anything else (the per-record path decides those)."""
    n = len(users)
    if not (len(items) == len(ratings) == len(timestamps) == n):
        return None
    if not (all(type(u) is str for u in users) and all(type(i) is str for i in items)
            and all(type(r) is float or type(r) is int for r in ratings)
            and all(type(t) is int for t in timestamps)):
        return None
    try:
        rf = np.asarray(ratings, dtype=np.float64).reshape(n)
        tf = np.asarray(timestamps, dtype=np.int64).reshape(n)
    except (OverflowError, ValueError, TypeError):
        return None
    with np.errstate(invalid="ignore"):
        ok = np.isfinite(rf) & (rf >= rating_min) & (rf <= rating_max)
    ok &= np.fromiter((u != "" and i != "" for u, i in zip(users, items)), dtype=bool, count=n)
    keep = ok.tolist()
    return (list(itertools.compress(users, keep)), list(itertools.compress(items, keep)), rf[ok], tf[ok],
            int(n - ok.sum()))
