"""Read and write model versions in Redis, following the layout in :mod:`common.keys`.

Writers (the modeler) call :func:`write_segment` per partition, from wherever the data
lives, then :func:`publish_version` once, on the driver, to make the version visible
atomically. Readers (the predictor, tests, any plain Redis client) call
:func:`read_pointer`, :func:`read_meta`, :func:`read_factors` and :func:`read_all_factors`.
Vectors travel as float32 bytes; metadata as decimal strings and JSON. No pickle.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import redis

from common.codec import decode_matrix, decode_record, encode_matrix
from common.errors import StreamrecError
from common.keys import EXPLICIT, KINDS, RANKING, RANKING_KINDS, Keys


class SnapshotChanged(StreamrecError, RuntimeError):
    """A segment of the version being read was garbage-collected: re-read the pointer.
    (``RuntimeError`` too, for callers that predate the root exception.)"""


@dataclass(frozen=True)
class Pointer:
    version: int
    segments: tuple[int, ...]


@dataclass
class Meta:
    version: int
    rank: int
    mu: float
    reg_param: float
    n_users: int
    n_items: int
    ratings_seen: int
    created: float
    segments: tuple[int, ...]
    offsets: dict[str, int] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    popular: list[tuple[str, int]] = field(default_factory=list)
    rating_min: float = 0.5
    rating_max: float = 5.0
    # Factor sets present (see common.keys): the explicit rating model and/or the ranking model.
    models: tuple[str, ...] = (EXPLICIT,)
    ranking_rank: int = 0
    ranking_reg_param: float = 0.0
    ranking_alpha: float = 0.0
    ranking_weighting: dict[str, Any] = field(default_factory=dict)
    # The online hyper-parameter search (modeler.core.search.SearchState.summary): one entry
    # per candidate {"id", "params", "metric", "score", "events", "state", "served", "parent",
    # "history": [[events, score], ...]}; empty when no search runs.
    candidates: list[dict[str, Any]] = field(default_factory=list)

    @property
    def has_explicit(self) -> bool:
        return EXPLICIT in self.models

    @property
    def has_ranking(self) -> bool:
        return RANKING in self.models and self.ranking_rank > 0

    def rank_of(self, kind: str) -> int:
        """Rank of the factor set ``kind`` belongs to (``users``/``items`` or ``ranking_*``)."""
        return self.ranking_rank if kind in RANKING_KINDS else self.rank

    def to_redis(self) -> dict[str, str]:
        return {
            "version": str(self.version),
            "rank": str(self.rank),
            "mu": repr(float(self.mu)),
            "reg_param": repr(float(self.reg_param)),
            "n_users": str(self.n_users),
            "n_items": str(self.n_items),
            "ratings_seen": str(self.ratings_seen),
            "created": repr(float(self.created)),
            "segments": json.dumps(list(self.segments)),
            "offsets": json.dumps(self.offsets, sort_keys=True),
            "metrics": json.dumps(self.metrics, sort_keys=True),
            "popular": json.dumps([[i, int(c)] for i, c in self.popular]),
            "rating_min": repr(float(self.rating_min)),
            "rating_max": repr(float(self.rating_max)),
            "models": json.dumps(list(self.models)),
            "ranking_rank": str(self.ranking_rank),
            "ranking_reg_param": repr(float(self.ranking_reg_param)),
            "ranking_alpha": repr(float(self.ranking_alpha)),
            "ranking_weighting": json.dumps(self.ranking_weighting, sort_keys=True),
            "candidates": json.dumps(self.candidates, sort_keys=True),
        }

    @classmethod
    def from_redis(cls, raw: Mapping[bytes | str, bytes | str]) -> Meta:
        d = {_s(k): _s(v) for k, v in raw.items()}
        return cls(
            version=int(d["version"]),
            rank=int(d["rank"]),
            mu=float(d["mu"]),
            reg_param=float(d["reg_param"]),
            n_users=int(d["n_users"]),
            n_items=int(d["n_items"]),
            ratings_seen=int(d["ratings_seen"]),
            created=float(d["created"]),
            segments=tuple(int(s) for s in json.loads(d["segments"])),
            offsets={k: int(v) for k, v in json.loads(d.get("offsets", "{}")).items()},
            metrics=json.loads(d.get("metrics", "{}")),
            popular=[(str(i), int(c)) for i, c in json.loads(d.get("popular", "[]"))],
            rating_min=float(d.get("rating_min", 0.5)),
            rating_max=float(d.get("rating_max", 5.0)),
            models=tuple(json.loads(d.get("models", '["explicit"]'))),
            ranking_rank=int(d.get("ranking_rank", 0)),
            ranking_reg_param=float(d.get("ranking_reg_param", 0.0)),
            ranking_alpha=float(d.get("ranking_alpha", 0.0)),
            ranking_weighting=json.loads(d.get("ranking_weighting", "{}")),
            candidates=_candidates(d.get("candidates", "[]")),
        )


def _candidates(raw: str) -> list[dict[str, Any]]:
    """The ``candidates`` field: a JSON list of objects; anything else reads as [] (it is
    informational, a malformed one must not make the version unreadable)."""
    try:
        value = json.loads(raw)
    except ValueError:
        return []
    return [c for c in value if isinstance(c, dict)] if isinstance(value, list) else []


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


# --------------------------------------------------------------------------- writing


def write_segment(
    client: redis.Redis | redis.client.Pipeline,
    keys: Keys,
    segment: int,
    kind: str,
    ids: Sequence[str],
    biases: np.ndarray,
    vectors: np.ndarray,
    chunk: int = 2000,
) -> int:
    """HSET factor records of ``ids`` into segment ``segment``; returns records written.

    Safe to repeat (a retried partition writes the same bytes again).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}")
    if not len(ids):
        return 0
    records = encode_matrix(np.asarray(biases), np.asarray(vectors))
    key = keys.segment(segment, kind)
    pipe = client.pipeline(transaction=False) if isinstance(client, redis.Redis) else client
    for start in range(0, len(ids), chunk):
        mapping: dict[str | bytes, bytes] = dict(zip(ids[start : start + chunk], records[start : start + chunk]))
        pipe.hset(key, mapping=mapping)  # type: ignore[arg-type]
    if isinstance(client, redis.Redis):
        pipe.execute()
    return len(ids)


# The value recorded in {p}:rated:{user} for an item the user only met through an implicit
# event: "implicit:<w>" with w its confidence weight (common.feedback), never read as a
# rating; a rating of the item wins over it (common.keys).
IMPLICIT_MARK = "implicit"


def implicit_value(weight: float) -> str:
    return f"{IMPLICIT_MARK}:{float(weight)!r}"


# A capped history, per user and in one server-side step (so a reader never sees the hash
# without its order index or the other way round):
#   KEYS: the rated hash, its order zset. ARGV: cap, order, n ratings, then n (item, value)
#   pairs that are set, then (item, value) pairs of implicit events, set only when absent.
# Every item written gets score max(old, order) in the zset (ZADD GT: a retried or older
# write never makes an item look older than it is); entries the hash holds without a score
# (written before the cap was on) count as the oldest (score 0); then the oldest beyond
# ``cap`` leave both keys. Ties (one batch) go by item id, the zset's own order.
_RATED_CAPPED_LUA = """
local cap = tonumber(ARGV[1])
local order = ARGV[2]
local n = tonumber(ARGV[3])
local h, z = KEYS[1], KEYS[2]
if redis.call('EXISTS', h) == 1 and redis.call('HLEN', h) > redis.call('ZCARD', z) then
  local fields = redis.call('HKEYS', h)
  for j = 1, #fields do redis.call('ZADD', z, 'NX', 0, fields[j]) end
end
local i = 4
for j = 1, n do
  redis.call('HSET', h, ARGV[i], ARGV[i + 1])
  redis.call('ZADD', z, 'GT', order, ARGV[i])
  redis.call('ZADD', z, 'NX', order, ARGV[i])
  i = i + 2
end
while i < #ARGV do
  redis.call('HSETNX', h, ARGV[i], ARGV[i + 1])
  redis.call('ZADD', z, 'GT', order, ARGV[i])
  redis.call('ZADD', z, 'NX', order, ARGV[i])
  i = i + 2
end
local extra = redis.call('ZCARD', z) - cap
local dropped = 0
while extra > 0 do
  local take = math.min(extra, 1000)
  local old = redis.call('ZRANGE', z, 0, take - 1)
  redis.call('HDEL', h, unpack(old))
  redis.call('ZREMRANGEBYRANK', z, 0, take - 1)
  extra = extra - take
  dropped = dropped + take
end
return dropped
"""


def write_rated(
    client: redis.Redis | redis.client.Pipeline,
    keys: Keys,
    rated: Iterable[tuple[str, str, float]],
    implicit: Iterable[tuple[str, str, float]] = (),
    *,
    cap: int = 0,
    order: float = 0.0,
) -> int:
    """Record what users rated in ``{p}:rated:{user}``; returns the entries written.

    ``rated``: ``(user, item, rating)``; ``implicit``: ``(user, item, w)`` of implicit events,
    recorded as :func:`implicit_value` only where the hash has no entry for the item (a
    rating wins, and so does a rating of the same pair in ``rated``). Idempotent.

    ``cap > 0`` keeps only the newest ``cap`` items per user: ``order`` (the writer's batch
    number, increasing) is each written item's recency in the companion sorted set
    ``{p}:rated_order:{user}`` and the oldest beyond ``cap`` are dropped from both keys in
    the same server-side step. ``cap == 0``: unbounded, no order index (the original layout).
    Given a pipeline, the writes are queued on it; given a client, they are sent at once.
    """
    by_user: dict[str, dict[str, str]] = {}
    for user, item, rating in rated:
        by_user.setdefault(user, {})[item] = repr(float(rating))
    seen_only: dict[str, dict[str, str]] = {}
    for user, item, weight in implicit:
        if item not in by_user.get(user, ()):
            seen_only.setdefault(user, {})[item] = implicit_value(weight)
    pipe = client.pipeline(transaction=False) if isinstance(client, redis.Redis) else client
    n = 0
    if cap <= 0:
        for user, items in by_user.items():
            pipe.hset(keys.rated(user), mapping=items)  # type: ignore[arg-type]
            n += len(items)
        for user, items in seen_only.items():
            for item, value in items.items():
                pipe.hsetnx(keys.rated(user), item, value)
            n += len(items)
    else:
        script = pipe.register_script(_RATED_CAPPED_LUA)
        for user in by_user.keys() | seen_only.keys():
            ratings, events = by_user.get(user, {}), seen_only.get(user, {})
            args: list[Any] = [int(cap), repr(float(order)), len(ratings)]
            for item, value in itertools.chain(ratings.items(), events.items()):
                args += [item, value]
            script(keys=[keys.rated(user), keys.rated_order(user)], args=args)
            n += len(ratings) + len(events)
    if isinstance(client, redis.Redis):
        pipe.execute()
    return n


def publish_version(client: redis.Redis, keys: Keys, meta: Meta, extra: Any = None) -> None:
    """Make ``meta.version`` visible: metadata, pointer and announcement in one MULTI/EXEC.

    Its segments must already be written. ``extra`` may be a callable taking the
    transaction pipeline, to add writes that must land atomically with the flip.
    """
    pointer = json.dumps({"version": meta.version, "segments": list(meta.segments)})
    pipe = client.pipeline(transaction=True)
    pipe.hset(keys.meta(meta.version), mapping=meta.to_redis())  # type: ignore[arg-type]
    pipe.zadd(keys.versions, {str(meta.version): meta.created})
    pipe.set(keys.current, pointer)
    if callable(extra):
        extra(pipe)
    pipe.publish(keys.events, str(meta.version))
    pipe.execute()


def collect_garbage(
    client: redis.Redis, keys: Keys, keep: int = 3, min_age_s: float = 5.0,
    state_names: Sequence[str] = (), segment_keys: Any = None,
) -> int:
    """Drop versions beyond the newest ``keep`` (older than ``min_age_s``) and every segment
    no surviving version references, with the segment's ``state_names`` hashes and the keys
    ``segment_keys(s)`` names (a callable, e.g. :meth:`Keys.search_keys`).
    Returns the number of keys deleted."""
    scored: list[tuple[bytes, float]] = client.zrange(keys.versions, 0, -1, withscores=True)  # type: ignore[assignment]
    live = sorted((int(v), float(created)) for v, created in scored)
    if len(live) <= keep:
        return 0
    now = time.time()
    doomed = [v for v, created in live[:-keep] if now - created >= min_age_s]
    if not doomed:
        return 0
    pipe = client.pipeline(transaction=False)
    for v, _ in live:
        pipe.hget(keys.meta(v), "segments")
    segments = {
        v: json.loads(_s(raw)) if raw is not None else []
        for (v, _), raw in zip(live, pipe.execute())
    }
    referenced = {s for v, segs in segments.items() if v not in doomed for s in segs}
    dead = {s for v in doomed for s in segments[v]} - referenced
    dead_keys = [keys.meta(v) for v in doomed]
    for s in dead:
        dead_keys.extend(keys.segment(s, k) for k in KINDS)
        dead_keys.extend(keys.state(s, n) for n in state_names)
        if segment_keys is not None:
            dead_keys.extend(segment_keys(s))
    pipe = client.pipeline(transaction=True)
    pipe.zrem(keys.versions, *[str(v) for v in doomed])
    # UNLINK, not DEL: the keys go at once, their memory is freed in Redis's background
    # thread. A dropped full segment at ~210k keys holds hashes of ~200k fields each: DEL of
    # three of them (users, ranking users, user counts) blocked Redis, so the publish and every
    # predictor read, for 0.46 s; UNLINK took 2 ms. Batches two after a full segment had
    # shown a 0.7-0.8 s publish.
    pipe.unlink(*dead_keys)
    return int(pipe.execute()[1])


# --------------------------------------------------------------------------- reading


def read_pointer(client: redis.Redis, keys: Keys) -> Pointer | None:
    raw = client.get(keys.current)
    if raw is None:
        return None
    d = json.loads(_s(raw))
    return Pointer(version=int(d["version"]), segments=tuple(int(s) for s in d["segments"]))


def read_meta(client: redis.Redis, keys: Keys, version: int) -> Meta | None:
    raw = client.hgetall(keys.meta(version))
    return Meta.from_redis(raw) if raw else None


def read_factors(
    client: redis.Redis, keys: Keys, pointer: Pointer, kind: str, ids: Sequence[str], rank: int
) -> dict[str, tuple[float, np.ndarray]]:
    """Records of ``ids`` as of ``pointer``'s version (newest segment wins); absent ids omitted."""
    if not ids:
        return {}
    pipe = client.pipeline(transaction=False)
    newest_first = list(reversed(pointer.segments))
    for s in newest_first:
        pipe.hmget(keys.segment(s, kind), list(ids))
    pipe.exists(keys.meta(pointer.version))
    replies = pipe.execute()
    out: dict[str, tuple[float, np.ndarray]] = {}
    for values in replies[: len(newest_first)]:
        for i, raw in zip(ids, values):
            if raw is not None and i not in out:
                out[i] = decode_record(raw, rank)
    if not replies[-1]:
        raise SnapshotChanged(f"version {pointer.version} was garbage-collected while reading")
    return out


def read_all_factors(
    client: redis.Redis, keys: Keys, pointer: Pointer, kind: str, rank: int
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """The complete ``kind`` matrix of a version: ``(ids, biases (n,), vectors (n, rank))``."""
    merged: dict[str, bytes] = {}
    for s in pointer.segments:
        for k, v in client.hscan_iter(keys.segment(s, kind), count=5000):
            merged[_s(k)] = v
    # Metadata and segments are deleted in one transaction: if the metadata is still there,
    # every segment was whole while we read it.
    if client.exists(keys.meta(pointer.version)) == 0:
        raise SnapshotChanged(f"version {pointer.version} was garbage-collected while reading")
    ids = list(merged)
    if not ids:
        return ids, np.zeros(0, np.float32), np.zeros((0, rank), np.float32)
    biases, vectors = decode_matrix([merged[i] for i in ids], rank)
    return ids, biases, vectors
