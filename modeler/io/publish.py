"""Model versions in Redis: executor-side segment writes, driver-side atomic publish, restore.

Layout: :mod:`common.keys`. A version ``v`` is published in three steps:

1. the driver deletes whatever a crashed earlier attempt may have left under segment ``v``
   (segment ids are version numbers, and an unpublished ``v`` is re-used after a restart);
2. executors write the factor records (the changed ones, or all of them for a *full*
   segment) and each user's rated items per partition, where the data lives
   (:func:`write_partition`): normally inside the training job itself, right after each
   model partition has learned the batch (:class:`SegmentSink`); when Redis was away or lost
   the model meanwhile, in a write job of its own, with retries;
3. the driver calls :func:`common.snapshot.publish_version`: metadata (with the Kafka
   offsets the version has consumed), pointer flip, metrics entry, ``popular`` and the
   pub/sub announcement in one MULTI/EXEC.

Readers only ever follow the pointer, so a version that never got its step 3 is invisible,
and the offsets stored with a version are exactly the ratings its factors have learned.

Over 450 lines because both sides of that protocol live here, executor (``write_partition``
and the chunks it takes) and driver (``Publisher``, the publish plan, restore, retries), so a
change to a record's layout is made in one file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from common.keys import KINDS

# Re-exported: the rated hash's implicit value is written by common.snapshot.write_rated.
from common.snapshot import IMPLICIT_MARK as IMPLICIT_MARK
from common.snapshot import implicit_value as implicit_value
from common.snapshot import write_rated

log = logging.getLogger(__name__)

# Tags of the records a publish job writes (see write_partition).
USER, ITEM, RATED = "u", "i", "r"
RANKING_USER, RANKING_ITEM = "ru", "ri"  # the ranking model's factor set
SEARCH = "s"  # a search candidate's rows (the restore state of MODEL_CANDIDATES, common.keys)
STATE_NAMES = ("user_counts", "item_counts", "ranking_user_counts", "ranking_item_counts")
_CLIENTS: dict[str, Any] = {}


def redis_client(url: str) -> Any:
    """A client per process and URL, reused across Spark tasks of one Python worker."""
    import redis

    client = _CLIENTS.get(url)
    if client is None:
        client = redis.Redis.from_url(
            url, socket_timeout=30, socket_connect_timeout=5, health_check_interval=30
        )
        _CLIENTS[url] = client
    return client


def _drop_client(url: str) -> None:
    client = _CLIENTS.pop(url, None)
    if client is not None:
        with contextlib.suppress(Exception):
            client.close()


# --------------------------------------------------------------------------- executor side


def write_partition(
    records: Iterable[tuple],
    redis_url: str,
    prefix: str,
    segment: int,
    top_n: int = 100,
    chunk: int = 5000,
    rated_cap: int = 0,
) -> Iterator[tuple[int, list[tuple[str, int]], list[tuple[str, int]]]]:
    """``mapPartitions`` body writing columnar chunks; yields ``(factor rows written (not the
    search rows nor the rated entries: what the full-or-delta rule weighs), top items, top
    items of the ranking model)``.

    Chunks (one per model or batch partition, so Spark moves a few numpy arrays, not a
    tuple per row):

    - ``("u"|"i"|"ru"|"ri", ids, biases (n,), vectors (n, rank), counts (n,))``: factor
      records of the explicit (``u``/``i``) or ranking (``ru``/``ri``, bias 0.0) model into
      segment ``segment``, counts into its state hash (``user_counts``, ``item_counts``,
      ``ranking_user_counts``, ``ranking_item_counts``);
    - ``("s", candidate id, kind, ids, biases, vectors, counts)``: a search candidate's rows
      of one factor kind (``users``/``items``/``ranking_users``/``ranking_items``) into the
      segment's search hashes (``{p}:seg:{s}:search:{kind}``, field ``{cid}:{id}``);
    - :class:`RatedChunk` ``("r", users, items, ratings[, implicit users, implicit items, weights[, order]])``:
      each user's rated items into ``{p}:rated:{user}``, and items met through implicit
      events (value :data:`IMPLICIT_MARK`, never overwriting a rating); idempotent. With
      ``rated_cap`` > 0 only the newest ``rated_cap`` items per user stay, recency being
      ``order`` (default: ``segment``, the batch's version), see
      :func:`common.snapshot.write_rated`.

    The top ``top_n`` items by count among the item rows written come back for the
    version's ``popular`` (explicit and ranking counts apart).
    """
    from common.codec import encode_matrix
    from common.keys import ITEMS, RANKING_ITEMS, RANKING_USERS, USERS, Keys
    from common.snapshot import write_segment

    keys = Keys(prefix)
    counts_name = {USER: "user_counts", ITEM: "item_counts", RANKING_USER: "ranking_user_counts",
                   RANKING_ITEM: "ranking_item_counts"}
    kind_of = {USER: USERS, ITEM: ITEMS, RANKING_USER: RANKING_USERS, RANKING_ITEM: RANKING_ITEMS}
    top: list[tuple[str, int]] = []
    rtop: list[tuple[str, int]] = []
    n = 0
    try:
        client = redis_client(redis_url)
        pipe = client.pipeline(transaction=False)
        pending = 0
        for rec in records:
            tag = rec[0]
            if tag in counts_name:
                _, ids, biases, vectors, counts = rec
                if not len(ids):
                    continue
                ids = [str(i) for i in ids]
                write_segment(pipe, keys, segment, kind_of[tag], ids,
                              np.asarray(biases, dtype=np.float32), np.asarray(vectors, dtype=np.float32),
                              chunk=chunk)
                counts = np.asarray(counts, dtype=np.int64)
                name = keys.state(segment, counts_name[tag])
                text = counts.astype(str).tolist()
                for start in range(0, len(ids), chunk):
                    pipe.hset(name, mapping=dict(zip(ids[start : start + chunk], text[start : start + chunk],
                                                     strict=True)))
                if tag in (ITEM, RANKING_ITEM) and top_n > 0:
                    best = np.argsort(-counts, kind="stable")[:top_n]
                    (top if tag == ITEM else rtop).extend((ids[j], int(counts[j])) for j in best)
                n += len(ids)
                pending += len(ids)
            elif tag == SEARCH:
                _, cid, kind, ids, biases, vectors, counts = rec
                if not len(ids):
                    continue
                fields = [f"{cid}:{i}" for i in ids]
                encoded = encode_matrix(np.asarray(biases, dtype=np.float32), np.asarray(vectors, dtype=np.float32))
                text = np.asarray(counts, dtype=np.int64).astype(str).tolist()
                for start in range(0, len(ids), chunk):
                    end = start + chunk
                    pipe.hset(keys.search(segment, kind), mapping=dict(zip(fields[start:end], encoded[start:end])))
                    pipe.hset(keys.search_counts(segment, kind), mapping=dict(zip(fields[start:end], text[start:end])))
                pending += len(ids)
            elif tag == RATED:
                pending += _write_rated_record(pipe, keys, rec, segment, rated_cap)
            else:
                raise ValueError(f"unknown record tag {tag!r}")
            if pending >= 4 * chunk:
                pipe.execute()
                pending = 0
        pipe.execute()
    except Exception:
        _drop_client(redis_url)
        raise
    top.sort(key=lambda kv: (-kv[1], kv[0]))
    rtop.sort(key=lambda kv: (-kv[1], kv[0]))
    yield n, top[:top_n], rtop[:top_n]


class RatedChunk(NamedTuple):
    """A batch's rated items for :func:`write_partition` (tag ``"r"``): ratings, and items met
    through implicit events with their confidence weights w; ``order`` is the entries'
    recency for a capped history (``None``: the version being written)."""

    tag: str
    users: Sequence[str]
    items: Sequence[str]
    ratings: Sequence[float]
    i_users: Sequence[str] = ()
    i_items: Sequence[str] = ()
    i_weights: Sequence[float] = ()  # w of each implicit event (1.0 each when empty)
    order: float | None = None


def rated_chunk(users: Sequence[str], items: Sequence[str], ratings: Sequence[float],
                i_users: Sequence[str] = (), i_items: Sequence[str] = (), i_weights: Sequence[float] = (),
                order: float | None = None) -> RatedChunk:
    return RatedChunk(RATED, users, items, ratings, i_users, i_items, i_weights, order)


def rated_from(events: Any, weighting: Any, order: float | None = None) -> RatedChunk:
    """The rated items of a batch's events: anything with the columns ``users``, ``items``,
    ``ratings`` and ``i_users``, ``i_items``, ``i_weights`` (a Kafka ``Block``, a side-by-side
    batch). An implicit event's value v is recorded as its confidence weight
    w = ``weighting.implicit_weight(v)`` (:class:`common.feedback.Weighting`), the mapping
    the models train with, so the predictor's refit weighs it as training did."""
    weights = [weighting.implicit_weight(float(v)) for v in events.i_weights]
    return rated_chunk(list(events.users), list(events.items), np.asarray(events.ratings, float).tolist(),
                       list(events.i_users), list(events.i_items), weights, order)


def _write_rated_record(pipe: Any, keys: Any, rec: tuple, segment: int, cap: int) -> int:
    """Queue one ``RATED`` record's writes (:func:`common.snapshot.write_rated`); entries."""
    r = rec if isinstance(rec, RatedChunk) else RatedChunk(*rec)
    weights = r.i_weights if len(r.i_weights) else [1.0] * len(r.i_users)
    implicit: Iterable[tuple[str, str, float]] = zip(r.i_users, r.i_items, weights, strict=True)
    order = r.order if r.order is not None else segment
    return write_rated(pipe, keys, zip(r.users, r.items, r.ratings, strict=True), implicit,
                       cap=cap, order=float(order))


class FactorChunk(NamedTuple):
    """Factor rows of one table for :func:`write_partition`: ``tag`` ``"u"``/``"i"``
    (explicit model) or ``"ru"``/``"ri"`` (ranking model, biases 0.0)."""

    tag: str
    ids: list[str]
    biases: np.ndarray  # (n,)
    vectors: np.ndarray  # (n, rank)
    counts: np.ndarray  # (n,) ratings (or positives) learned per row


class SearchChunk(NamedTuple):
    """A search candidate's rows of one factor kind (``common.keys`` kinds), tag ``"s"``:
    the restore state of ``MODEL_CANDIDATES``, written to the segment's search hashes."""

    tag: str
    cid: str
    kind: str
    ids: list[str]
    biases: np.ndarray
    vectors: np.ndarray
    counts: np.ndarray


def factor_chunks(users: Any, items: Any, only_touched: bool, ranking_users: Any = None,
                  ranking_items: Any = None) -> list[FactorChunk]:
    """The ``("i"|"u"|"ri"|"ru", ids, biases, vectors, counts)`` chunks of
    :func:`write_partition` for one model partition's tables (anything with ``ids``,
    ``bias``, ``vec``, ``count`` and ``touched``): the rows the last batch changed, or all
    of them. Items first: a reader never sees a user vector before the items it ranks."""
    out = []
    tables = [(ITEM, items), (USER, users)]
    if ranking_items is not None and ranking_users is not None:
        tables = [(RANKING_ITEM, ranking_items), *tables[:1], (RANKING_USER, ranking_users), *tables[1:]]
    for tag, t in tables:
        rows = np.flatnonzero(t.touched) if only_touched else np.arange(len(t.ids))
        bias = t.bias[rows] if tag in (ITEM, USER) else np.zeros(len(rows), dtype=np.float32)
        out.append(FactorChunk(tag, [t.ids[j] for j in rows], bias, t.vec[rows], t.count[rows]))
    return out


@dataclass(frozen=True)
class SegmentSink:
    """A ``StreamingALS.train(..., sink=...)`` callable: writes one model partition's factor
    rows (changed ones, or all for a ``full`` segment) and its users' newly rated items into
    segment ``segment``, on the executor, inside the training job - the publish needs no
    Spark job of its own. Redis trouble is reported, not raised (a raise would fail the
    training job): the driver then falls back to a separate write job with retries.
    """

    redis_url: str
    prefix: str
    segment: int
    full: bool
    top_n: int = 100
    rated_cap: int = 0  # MODELER_RATED_CAP: newest items kept per user (0: all)

    def __call__(self, update: Any) -> dict[str, Any]:
        chunks: list[Any] = factor_chunks(update.users, update.items, not self.full,
                               getattr(update, "ranking_users", None), getattr(update, "ranking_items", None))
        iu = getattr(update, "batch_implicit_users", ())
        if len(update.batch_users) or len(iu):
            chunks.append(rated_chunk(update.batch_users.tolist(), update.batch_items.tolist(),
                                      update.batch_ratings.tolist(), list(iu),
                                      list(getattr(update, "batch_implicit_items", ())),
                                      np.asarray(getattr(update, "batch_implicit_weights", ()), float).tolist()))
        try:
            written, top, rtop = next(write_partition(chunks, self.redis_url, self.prefix,
                                                      self.segment, self.top_n,
                                                      rated_cap=self.rated_cap))
        except Exception as exc:
            return {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:300]}
        return {"ok": True, "written": written, "top": top, "rtop": rtop}


class WriteResult(NamedTuple):
    """One partition's answer of :func:`write_partition`: factor rows written, and the top items by
    count among the item rows it wrote (explicit model, ranking model)."""

    written: int
    top: list[tuple[str, int]]
    ranking_top: list[tuple[str, int]]


class PublishPlan(NamedTuple):
    """How version ``version``'s segment is written, decided once per attempt: ``full`` (or
    ``None``: left to the publish, e.g. Redis was away when planning), and the sink that
    writes it inside the training job (``None``: a write job of its own)."""

    version: int
    full: bool | None = None
    # A SegmentSink, or the search's writer (modeler.search_service.SearchSink, a layer up).
    sink: Any = None

    def without_sink(self) -> PublishPlan:
        """A retry's plan: the training job's writes are not trusted again."""
        return self._replace(sink=None)


#: A chain of deltas never grows past this many times ``MODELER_MAX_SEGMENT_CHAIN``.
CHAIN_HARD_CAP = 8


def segment_is_full(need_full: bool, ours: bool, chain: int, max_chain: int, switched: bool = False,
                    delta_records: int = 0, full_records: int = 0, share: float = 0.0) -> bool:
    """A segment must hold the whole model when: nothing was published yet (or a restore
    asks for it), Redis no longer holds our chain, a search's leader switched (a version
    never mixes two candidates' rows), or the chain of deltas is at its cap and they hold
    ``share`` × the records of the last full segment (``delta_records`` against
    ``full_records``). Below that share the chain grows, to :data:`CHAIN_HARD_CAP` × the
    cap: a full segment costs the model, a delta what a batch touched, so on a large model
    full segments come about every ``share × full / delta`` versions instead of every cap."""
    if need_full or not ours or switched or chain >= CHAIN_HARD_CAP * max_chain:
        return True
    return chain >= max_chain and delta_records >= share * full_records


def merge_popular(
    previous: Iterable[tuple[str, int]], changed: Iterable[tuple[str, int]], n: int
) -> list[tuple[str, int]]:
    """Top ``n`` items by count, most rated first (ties by id), from the previous version's
    top list and the counts of the items this batch changed.

    Exact, because counts only grow and only changed items' counts move: an unchanged item
    outside the previous top ``n`` cannot overtake the previous members.
    """
    merged = dict(previous)
    merged.update(changed)
    return sorted(merged.items(), key=lambda kv: (-kv[1], kv[0]))[:n]


# --------------------------------------------------------------------------- driver side


@dataclass
class Restored:
    """A published version as read back: enough to rebuild the model and resume."""

    meta: Any  # common.snapshot.Meta
    user_ids: list[str]
    user_biases: np.ndarray
    user_vectors: np.ndarray
    item_ids: list[str]
    item_biases: np.ndarray
    item_vectors: np.ndarray
    state: dict[str, dict[str, str]]
    model_state: dict[str, Any]
    # The ranking model's rows (empty when the version has none).
    ranking_user_ids: list[str] = dataclasses.field(default_factory=list)
    ranking_user_vectors: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((0, 0), np.float32))
    ranking_item_ids: list[str] = dataclasses.field(default_factory=list)
    ranking_item_vectors: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((0, 0), np.float32))


# Extra field of {p}:ver:{v}: JSON scalars the model needs to resume exactly (running
# rating sum, batch number, hyper-parameters); written in the version's MULTI/EXEC.
MODEL_STATE_FIELD = "model_state"
# Extra field of {p}:ver:{v} with a search (MODEL_CANDIDATES): JSON of the search's state.
SEARCH_STATE_FIELD = "search_state"


@dataclass
class RestoredSearch:
    """The search state of a version as read back: its JSON, and every candidate's rows as
    ``rows[cid][kind] = (ids, records (float32 bytes), counts)`` merged over the segments
    (newest wins); records are decoded by the caller, who knows each candidate's rank."""

    state: dict[str, Any]
    rows: dict[str, dict[str, tuple[list[str], list[bytes], list[int]]]]


# Renew only our own lease; take it when free. Returns 1 when we hold it afterwards.
_LEASE_LUA = """
local cur = redis.call('GET', KEYS[1])
if cur == false or cur == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""


class Publisher:
    """Driver-side Redis access of the modeler."""

    def __init__(
        self,
        redis_url: str,
        prefix: str,
        keep_versions: int = 3,
        metrics_history: int = 1000,
        lease_ttl_s: float = 15.0,
        state_names: tuple[str, ...] = STATE_NAMES,
    ) -> None:
        from common.keys import Keys

        self.redis_url = redis_url
        self.keys = Keys(prefix)
        self.keep_versions = keep_versions
        self.metrics_history = metrics_history
        self.lease_ttl_ms = int(lease_ttl_s * 1000)
        self.state_names = state_names
        self._client: Any = None

    @property
    def client(self) -> Any:
        if self._client is None:
            import redis

            self._client = redis.Redis.from_url(
                self.redis_url, socket_timeout=30, socket_connect_timeout=5
            )
        return self._client

    def reset_client(self) -> None:
        if self._client is not None:
            with contextlib.suppress(Exception):
                self._client.close()
        self._client = None

    # ---------------------------------------------------------------- lease

    def hold_lease(self, token: str) -> bool:
        return bool(self.client.eval(_LEASE_LUA, 1, self.keys.lease, token, self.lease_ttl_ms))

    def release_lease(self, token: str) -> None:
        script = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"
        with contextlib.suppress(Exception):
            self.client.eval(script, 1, self.keys.lease, token)

    # ---------------------------------------------------------------- reading

    def pointer(self) -> Any:
        from common.snapshot import read_pointer

        return read_pointer(self.client, self.keys)

    def restore(self) -> Restored | None:
        """The current version's factors, metadata and state, or ``None`` if there is none."""
        from common.keys import ITEMS, RANKING_ITEMS, RANKING_USERS, USERS
        from common.snapshot import SnapshotChanged, read_all_factors, read_meta

        for _ in range(5):
            pointer = self.pointer()
            if pointer is None:
                return None
            meta = read_meta(self.client, self.keys, pointer.version)
            if meta is None:
                continue
            rr = max(1, meta.ranking_rank)
            try:
                u_ids, u_b, u_v = read_all_factors(self.client, self.keys, pointer, USERS, meta.rank)
                i_ids, i_b, i_v = read_all_factors(self.client, self.keys, pointer, ITEMS, meta.rank)
                ru_ids, _, ru_v = ([], None, np.zeros((0, rr), np.float32)) if not meta.has_ranking \
                    else read_all_factors(self.client, self.keys, pointer, RANKING_USERS, rr)
                ri_ids, _, ri_v = ([], None, np.zeros((0, rr), np.float32)) if not meta.has_ranking \
                    else read_all_factors(self.client, self.keys, pointer, RANKING_ITEMS, rr)
            except SnapshotChanged:
                continue
            state: dict[str, dict[str, str]] = {}
            for name in self.state_names:
                merged: dict[str, str] = {}
                for s in pointer.segments:
                    for k, v in self.client.hscan_iter(self.keys.state(s, name), count=5000):
                        merged[k.decode()] = v.decode()
                state[name] = merged
            raw = self.client.hget(self.keys.meta(pointer.version), MODEL_STATE_FIELD)
            model_state = json.loads(raw) if raw else {}
            return Restored(meta, u_ids, u_b, u_v, i_ids, i_b, i_v, state, model_state,
                            ru_ids, ru_v, ri_ids, ri_v)
        raise RuntimeError("the current version kept changing while being restored")

    # ---------------------------------------------------------------- writing

    def clear_segment(self, segment: int) -> None:
        """Drop leftovers of an attempt at ``segment`` that was never published."""
        names = [self.keys.segment(segment, k) for k in KINDS]
        names += [self.keys.state(segment, n) for n in self.state_names]
        names += self.keys.search_keys(segment)
        self.client.unlink(*names)  # freed in Redis's background thread (see collect_garbage)

    def segment_exists(self, segment: int) -> bool:
        names = [self.keys.segment(segment, k) for k in KINDS] + self.keys.search_keys(segment)
        return bool(self.client.exists(*names))

    def restore_search(self, pointer: Any) -> RestoredSearch | None:
        """The search state of the version ``pointer`` names, or ``None`` if it has none."""
        from common.keys import KINDS as kinds
        from common.snapshot import SnapshotChanged

        raw = self.client.hget(self.keys.meta(pointer.version), SEARCH_STATE_FIELD)
        if raw is None:
            return None
        state = json.loads(raw)
        merged: dict[str, dict[str, tuple[bytes, int]]] = {k: {} for k in kinds}
        for s in pointer.segments:  # oldest first: newer rows override
            for kind in kinds:
                recs = {k.decode(): v for k, v in self.client.hscan_iter(self.keys.search(s, kind), count=5000)}
                counts = {k.decode(): int(v) for k, v in
                          self.client.hscan_iter(self.keys.search_counts(s, kind), count=5000)}
                for f, rec in recs.items():
                    merged[kind][f] = (rec, counts.get(f, 0))
        if not self.client.exists(self.keys.meta(pointer.version)):
            raise SnapshotChanged(f"version {pointer.version} was garbage-collected while reading")
        rows: dict[str, dict[str, tuple[list[str], list[bytes], list[int]]]] = {}
        for kind, fields in merged.items():
            for f in sorted(fields):
                cid, _, key = f.partition(":")
                ids, recs_, counts_ = rows.setdefault(cid, {}).setdefault(kind, ([], [], []))
                ids.append(key)
                recs_.append(fields[f][0])
                counts_.append(fields[f][1])
        return RestoredSearch(state, rows)

    def publish(
        self,
        meta: Any,
        metrics_entry: dict[str, Any],
        popular: list[tuple[str, int]],
        model_state: dict[str, Any] | None = None,
        search_state: dict[str, Any] | None = None,
    ) -> None:
        """Flip to ``meta.version`` atomically, with its metrics entry, ``popular``, the
        model's resume state and (with a search) the search's."""
        from common.snapshot import publish_version

        def more(pipe: Any) -> None:
            if model_state is not None:
                pipe.hset(self.keys.meta(meta.version), MODEL_STATE_FIELD, json.dumps(model_state, sort_keys=True))
            if search_state is not None:
                pipe.hset(self.keys.meta(meta.version), SEARCH_STATE_FIELD, json.dumps(search_state, sort_keys=True))
            pipe.lpush(self.keys.metrics, json.dumps(metrics_entry, sort_keys=True))
            pipe.ltrim(self.keys.metrics, 0, self.metrics_history - 1)
            pipe.set(self.keys.popular, json.dumps([[i, int(c)] for i, c in popular]))

        publish_version(self.client, self.keys, meta, extra=more)

    def collect_garbage(self, min_age_s: float = 5.0) -> int:
        """Old versions, their segments and the segments' state hashes (common.snapshot)."""
        from common.snapshot import collect_garbage

        return collect_garbage(self.client, self.keys, keep=self.keep_versions,
                               min_age_s=min_age_s, state_names=self.state_names,
                               segment_keys=self.keys.search_keys)


def backoff(attempt: int, cap: float = 10.0, first: float = 0.5) -> float:
    """The service's one retry delay: first·2^attempt seconds, capped (attempt 0, 1, 2, ...
    waits 0.5, 1, 2, ... s)."""
    return min(cap, first * 2.0 ** min(max(0, attempt), 30))


def backoff_delays(first: float = 0.5, cap: float = 10.0) -> Iterator[float]:
    """0.5, 1, 2, 4, ... seconds, capped: :func:`backoff` of attempts 0, 1, 2, ..."""
    attempt = 0
    while True:
        yield backoff(attempt, cap, first)
        attempt += 1


def sleep_unless(stop: Callable[[], bool], seconds: float, step: float = 0.1) -> bool:
    """Sleep ``seconds`` unless ``stop()`` turns true first; returns whether it did."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if stop():
            return True
        time.sleep(min(step, max(0.0, end - time.monotonic())))
    return stop()
