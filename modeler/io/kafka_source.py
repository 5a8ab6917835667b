"""Kafka -> RDD, the way Spark's direct Kafka stream does it, with kafka-python.

The driver plans each micro-batch as one *range* per topic partition (start offset and a
record cap). Executors read their range with raw Fetch requests decoded by
:mod:`modeler.io.kafka_fetch` (the kafka-python consumer, ``assign`` + ``seek``, is the
fallback for record formats and codecs that module leaves alone); there is no consumer
group and no committed offset: the offsets live with the model version in Redis. They
parse and validate each message where it was read, send bad ones to the dead-letter topic,
and report the offset they actually reached and the high-water mark they saw. Ratings
never pass through the driver: only one small summary per partition does.

A range ends at the high-water mark seen while fetching, or at its cap. ``end_offsets()``
alone is not trusted for that (the local broker under-reports it).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from common.errors import InfraUnavailable

log = logging.getLogger(__name__)

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


# --------------------------------------------------------------------------- parsing


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
    rating: Any = d.get("rating")
    ts = d.get("timestamp")
    ids = _fast_ids(user, item)
    if ids is None:
        return None
    user, item = ids
    tr = type(rating)
    if tr is float or tr is int:
        rating = float(rating)
    else:
        return None
    if not (math.isfinite(rating) and rating_min <= rating <= rating_max):
        return None
    if type(ts) is not int or ts < 0:
        return None
    return user, item, rating, ts


def _fast_ids(user: Any, item: Any) -> tuple[str, str] | None:
    """Both ids as :func:`common.schema.parse_event` would give them (stripped strings, int
    ids as strings), or None when the message needs the full validator."""
    tu, ti = type(user), type(item)
    if tu is str:
        user = user.strip()
    elif tu is int:
        user = str(user)
    else:
        return None
    if ti is str:
        item = item.strip()
    elif ti is int:
        item = str(item)
    else:
        return None
    if not (0 < len(user) <= MAX_ID_LENGTH and 0 < len(item) <= MAX_ID_LENGTH):
        return None
    return user, item


def _fast_implicit(d: dict, user: Any, item: Any, kind: Any, max_weight: float) -> tuple | None:
    """The implicit-event half of :func:`fast_parse`."""
    if type(kind) is not str or not 0 < len(kind) <= 32 or not ("a" <= kind[0] <= "z") \
            or not _TYPE_CHARS.issuperset(kind):
        return None
    if d.get("rating") is not None:
        return None
    weight = d.get("weight", 1.0)
    ts = d.get("timestamp")
    ids = _fast_ids(user, item)
    if ids is None:
        return None
    user, item = ids
    tw = type(weight)
    if tw is float or tw is int:
        weight = float(weight)
    else:
        return None
    if not (math.isfinite(weight) and 0.0 <= weight <= max_weight):
        return None
    if type(ts) is not int or ts < 0:
        return None
    return user, item, None, ts, weight


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


# --------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class OffsetRange:
    """What one executor task reads: ``[start, start + cap)`` of one partition, or less."""

    topic: str
    partition: int
    start: int
    cap: int


def allocate_caps(backlog: Mapping[int, int | None], max_records: int) -> dict[int, int]:
    """Split the batch's record cap over partitions.

    Known backlog (high-water minus next offset, from the previous batch) is served first
    by water-filling, so a single busy partition can use most of the batch; whatever is
    left is shared equally, because new records may have arrived anywhere. Unknown backlog
    counts as unlimited. Every partition gets at least 1, and the caps sum to
    ``max(max_records, number of partitions)``.
    """
    parts = sorted(backlog)
    if not parts:
        return {}
    total = max(max_records, len(parts))
    demand = {p: (total if backlog[p] is None else max(0, int(backlog[p] or 0))) for p in parts}
    caps = dict.fromkeys(parts, 0)
    left = total
    open_parts = [p for p in parts if demand[p] > 0]
    # Water-filling: repeatedly give every unsatisfied partition an equal share.
    while left > 0 and open_parts:
        share = max(1, left // len(open_parts))
        still_open = []
        for p in open_parts:
            give = min(share, demand[p] - caps[p], left)
            caps[p] += give
            left -= give
            if caps[p] < demand[p]:
                still_open.append(p)
            if left == 0:
                break
        open_parts = still_open
    # The rest (and the minimum of 1) goes to everyone equally, remainder to the first.
    if left > 0:
        share, rem = divmod(left, len(parts))
        for i, p in enumerate(parts):
            caps[p] += share + (1 if i < rem else 0)
    for p in parts:
        if caps[p] == 0:
            # Only possible when total == len(parts) went entirely to backlog: borrow 1.
            donor = max(parts, key=lambda q: caps[q])
            caps[donor] -= 1
            caps[p] = 1
    return caps


def plan_batch(
    topic: str,
    next_offsets: Mapping[int, int],
    backlog: Mapping[int, int | None],
    max_records: int,
) -> list[OffsetRange]:
    caps = allocate_caps({p: backlog.get(p) for p in next_offsets}, max_records)
    return [OffsetRange(topic, p, next_offsets[p], caps[p]) for p in sorted(next_offsets)]


def offsets_key(topic: str, partition: int) -> str:
    """Key of a partition in a version's ``offsets`` JSON: ``"topic:partition"``."""
    return f"{topic}:{partition}"


def offsets_for_topic(offsets: Mapping[str, int], topic: str) -> dict[int, int]:
    """The ``{partition: next offset}`` of ``topic`` in a version's ``offsets``."""
    out = {}
    for key, value in offsets.items():
        t, _, p = key.rpartition(":")
        if t == topic and p.isdigit():
            out[int(p)] = int(value)
    return out


# --------------------------------------------------------------------------- executor side


@dataclass
class Block:
    """One partition's share of a micro-batch, as read on an executor (columnar)."""

    partition: int
    start: int
    next_offset: int
    highwater: int | None
    users: list[str] = field(default_factory=list)
    items: list[str] = field(default_factory=list)
    ratings: list[float] = field(default_factory=list)
    timestamps: list[int] = field(default_factory=list)
    # Implicit events (type != "rating"), apart: the rating columns above stay ratings only.
    i_users: list[str] = field(default_factory=list)
    i_items: list[str] = field(default_factory=list)
    i_weights: list[float] = field(default_factory=list)
    i_timestamps: list[int] = field(default_factory=list)
    n_dlq: int = 0
    dlq_reasons: list[str] = field(default_factory=list)  # a few examples for the log
    read_seconds: float = 0.0
    # Set when ``start`` lies outside the partition's log (topic recreated, or retention
    # deleted it): where the log begins now. Nothing was read.
    reset_to: int | None = None

    def rows(self) -> Iterator[tuple]:
        """The ratings as ``(user, item, rating, timestamp)``, then the implicit events as
        ``(user, item, None, timestamp, weight)`` (the model's input records)."""
        if not self.i_users:
            return zip(self.users, self.items, self.ratings, self.timestamps, strict=True)
        return itertools.chain(
            zip(self.users, self.items, self.ratings, self.timestamps, strict=True),
            zip(self.i_users, self.i_items, itertools.repeat(None), self.i_timestamps, self.i_weights,
                strict=False))

    def summary(self) -> dict[str, Any]:
        return {
            "partition": self.partition,
            "start": self.start,
            "next_offset": self.next_offset,
            "highwater": self.highwater,
            "n_valid": len(self.users) + len(self.i_users),
            "n_implicit": len(self.i_users),
            "n_dlq": self.n_dlq,
            "dlq_reasons": self.dlq_reasons,
            "read_seconds": self.read_seconds,
            "reset_to": self.reset_to,
        }


# Clients live per Python worker process and are reused across tasks (Spark reuses
# workers), keyed by plain configuration - never shipped inside a closure.
_CONSUMERS: dict[str, Any] = {}
_PRODUCERS: dict[str, Any] = {}


def _consumer(bootstrap: str) -> Any:
    c = _CONSUMERS.get(bootstrap)
    if c is None:
        from kafka import KafkaConsumer

        c = KafkaConsumer(
            bootstrap_servers=bootstrap.split(","),
            group_id=None,
            enable_auto_commit=False,
            # Never jump silently: an offset outside the log is reported to the driver.
            auto_offset_reset="none",
            max_partition_fetch_bytes=16 << 20,
            fetch_max_bytes=64 << 20,
            # An idle partition answers after this long; keeps an empty batch cheap.
            fetch_max_wait_ms=50,
            request_timeout_ms=15000,
            client_id="streamrec-modeler-reader",
        )
        _CONSUMERS[bootstrap] = c
    return c


def _producer(bootstrap: str) -> Any:
    p = _PRODUCERS.get(bootstrap)
    if p is None:
        from kafka import KafkaProducer

        p = KafkaProducer(
            bootstrap_servers=bootstrap.split(","),
            acks="all",
            linger_ms=5,
            client_id="streamrec-modeler-dlq",
        )
        _PRODUCERS[bootstrap] = p
    return p


def _drop_clients(bootstrap: str) -> None:
    from modeler.io.kafka_fetch import drop_fetcher

    drop_fetcher(bootstrap)
    for cache in (_CONSUMERS, _PRODUCERS):
        client = cache.pop(bootstrap, None)
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()


class _Ingest:
    """Validates records into a :class:`Block`; invalid ones go to the dead-letter topic.

    Called with the offsets and values of one fetch, in offset order, by either reader.
    """

    def __init__(
        self, block: Block, rng: OffsetRange, bootstrap: str, dlq_topic: str | None,
        rating_min: float, rating_max: float, max_weight: float = DEFAULT_MAX_WEIGHT,
    ) -> None:
        self.block = block
        self.rng = rng
        self.bootstrap = bootstrap
        self.dlq_topic = dlq_topic
        self.rating_min = rating_min
        self.rating_max = rating_max
        self.max_weight = max_weight
        self.dlq_futures: list[Any] = []

    def __call__(self, offsets: list[int], values: list[bytes | None]) -> None:
        block, lo, hi, cap = self.block, self.rating_min, self.rating_max, self.max_weight
        users, items = block.users.append, block.items.append
        ratings, timestamps = block.ratings.append, block.timestamps.append
        for offset, value in zip(offsets, values, strict=True):
            row, reason = parse_message(value, lo, hi, cap)
            if row is None:
                self._dead(offset, value, reason)
            elif len(row) == 4:
                users(row[0])
                items(row[1])
                ratings(row[2])
                timestamps(row[3])
            else:
                block.i_users.append(row[0])
                block.i_items.append(row[1])
                block.i_timestamps.append(row[3])
                block.i_weights.append(row[4])

    def _dead(self, offset: int, value: bytes | None, reason: str) -> None:
        block, rng = self.block, self.rng
        block.n_dlq += 1
        if len(block.dlq_reasons) < 3:
            block.dlq_reasons.append(f"offset {offset}: {reason}")
        if self.dlq_topic is None:  # a read-only pass (rebuilding rated items)
            return
        self.dlq_futures.append(
            _producer(self.bootstrap).send(
                self.dlq_topic,
                key=f"{rng.topic}:{rng.partition}:{offset}".encode(),
                value=bytes(value) if value is not None else b"",
                headers=[
                    ("reason", reason.encode()),
                    ("topic", rng.topic.encode()),
                    ("partition", str(rng.partition).encode()),
                    ("offset", str(offset).encode()),
                ],
            )
        )

    def flush(self) -> None:
        if self.dlq_futures:
            _producer(self.bootstrap).flush(timeout=30)
            for f in self.dlq_futures:
                f.get(timeout=30)  # raises if the dead letter was not stored: retry the batch


def _consume_range(
    topic: str, partition: int, start: int, end: int, bootstrap: str,
    sink: _Ingest, idle_timeout_s: float,
) -> tuple[int, int | None, int | None]:
    """kafka-python consumer reader of ``[start, end)``: ``(next offset, high-water mark,
    reset_to)``. The general path: any record format and codec kafka-python reads."""
    from kafka import TopicPartition
    from kafka.errors import OffsetOutOfRangeError

    tp = TopicPartition(topic, partition)
    consumer = _consumer(bootstrap)
    consumer.assign([tp])
    consumer.seek(tp, start)
    highwater: int | None = None
    pos = start
    deadline = time.monotonic() + idle_timeout_s
    out_of_range = False
    while pos < end:
        try:
            polled = consumer.poll(timeout_ms=100, max_records=end - pos, update_offsets=True)
        except OffsetOutOfRangeError:
            out_of_range = True
            break
        records = polled.get(tp, [])
        # A stale buffered record from before the seek is dropped; so is anything past the
        # cap (offsets may have gaps after compaction).
        kept = [rec for rec in records if pos <= rec.offset < end]
        if kept:
            sink([rec.offset for rec in kept], [rec.value for rec in kept])
            pos = kept[-1].offset + 1
        if records:
            deadline = time.monotonic() + idle_timeout_s
        else:
            # Control records (transaction markers) advance the position silently.
            pos = max(pos, min(consumer.position(tp), end))
        hw = consumer.highwater(tp)
        if hw is not None:
            highwater = hw
            if pos >= hw:
                break
        if time.monotonic() > deadline:
            # Nothing fetched for a while: the broker is slow or away; end the range here.
            break
    if out_of_range or (highwater is not None and start > highwater):
        # Some brokers answer an offset past the end with an empty fetch, not an error.
        return start, highwater, int(consumer.beginning_offsets([tp])[tp])
    return min(pos, end), highwater, None


def read_range(
    rng: OffsetRange,
    bootstrap: str,
    dlq_topic: str | None,
    rating_min: float,
    rating_max: float,
    idle_timeout_s: float = 2.0,
    fast: bool = True,
    max_weight: float = DEFAULT_MAX_WEIGHT,
) -> Block:
    """Read one partition from ``rng.start`` until its high-water mark or ``rng.cap``.

    Invalid messages go to ``dlq_topic`` (value = the original bytes, headers = reason and
    origin, key = ``topic:partition:offset`` so a consumer can de-duplicate a replayed
    batch); they are flushed before returning so the offset never passes an unsent one.

    ``fast`` reads with :mod:`modeler.io.kafka_fetch` (raw fetches, our own record decoder);
    whatever it cannot decode (legacy record format, a codec not installed here) is read
    with the kafka-python consumer from that offset on. ``fast=False`` uses the consumer
    for the whole range; both give the same :class:`Block`.
    """
    from modeler.io.kafka_fetch import UnsupportedRecords, fetcher

    t0 = time.perf_counter()
    block = Block(rng.partition, rng.start, rng.start, None)
    sink = _Ingest(block, rng, bootstrap, dlq_topic, rating_min, rating_max, max_weight)
    end = rng.start + rng.cap
    try:
        if fast:
            try:
                got = fetcher(bootstrap).read_range(
                    rng.topic, rng.partition, rng.start, rng.cap, sink, idle_timeout_s
                )
                next_offset, block.highwater, reset_to = got.next_offset, got.highwater, got.reset_to
            except UnsupportedRecords as exc:
                log.info("partition %d of %s: %s; reading on with the kafka-python consumer",
                         rng.partition, rng.topic, exc)
                next_offset, block.highwater, reset_to = _consume_range(
                    rng.topic, rng.partition, exc.offset, end, bootstrap, sink, idle_timeout_s
                )
                if reset_to is not None:  # the log moved under us: report from the start
                    next_offset = rng.start
        else:
            next_offset, block.highwater, reset_to = _consume_range(
                rng.topic, rng.partition, rng.start, end, bootstrap, sink, idle_timeout_s
            )
        block.next_offset = next_offset
        if reset_to is not None:
            block.reset_to = reset_to
            block.next_offset = rng.start
            block.users, block.items, block.ratings, block.timestamps = [], [], [], []
            block.i_users, block.i_items, block.i_weights, block.i_timestamps = [], [], [], []
        sink.flush()
    except Exception:
        _drop_clients(bootstrap)
        raise
    block.read_seconds = time.perf_counter() - t0
    return block


def read_ranges(
    ranges: Iterable[OffsetRange],
    bootstrap: str,
    dlq_topic: str,
    rating_min: float,
    rating_max: float,
    max_weight: float = DEFAULT_MAX_WEIGHT,
) -> Iterator[Block]:
    """``mapPartitions`` body: one Spark partition holds one (or a few) offset ranges."""
    for rng in ranges:
        yield read_range(rng, bootstrap, dlq_topic, rating_min, rating_max, max_weight=max_weight)


def read_range_chunks(
    rng: OffsetRange, bootstrap: str, rating_min: float, rating_max: float, chunk: int = 200_000,
    max_weight: float = DEFAULT_MAX_WEIGHT,
) -> Iterator[Block]:
    """The whole of ``rng`` as blocks of at most ``chunk`` records, read-only (no DLQ)."""
    pos, end = rng.start, rng.start + rng.cap
    while pos < end:
        block = read_range(OffsetRange(rng.topic, rng.partition, pos, min(end - pos, chunk)),
                           bootstrap, None, rating_min, rating_max, max_weight=max_weight)
        yield block
        if block.next_offset <= pos:
            break
        pos = block.next_offset


# --------------------------------------------------------------------------- driver side


class _SummaryParam:
    """Accumulator of ``{partition: summary}``: a re-run task overwrites, never adds twice."""

    def zero(self, value: dict) -> dict:
        return {}

    def addInPlace(self, a: dict, b: dict) -> dict:  # Spark's AccumulatorParam API
        a.update(b)
        return a


def batch_blocks(
    sc: Any,
    ranges: list[OffsetRange],
    bootstrap: str,
    dlq_topic: str,
    rating_min: float,
    rating_max: float,
    slices: int | None = None,
    max_weight: float = DEFAULT_MAX_WEIGHT,
) -> tuple[Any, Any]:
    """A lazy, persisted ``RDD[Block]`` over ``ranges`` and an accumulator that receives each
    partition's summary when its block is computed. ``slices`` caps the Spark partitions
    (tasks) the ranges are read in: a PySpark task costs tens of ms, so a few cores read
    many Kafka partitions best a few ranges per task.

    Training on ``blocks.flatMap(Block.rows)`` reads Kafka inside the training job itself
    (one Spark job less per batch than :func:`read_batch`); the summaries (offsets reached)
    are then in ``acc.value``. The cache makes a fallback write job (or a retry) see the
    same records.
    """
    from pyspark import AccumulatorParam, StorageLevel

    param = type("SummaryParam", (_SummaryParam, AccumulatorParam), {})()
    acc = sc.accumulator({}, param)

    def read(it: Iterable[OffsetRange]) -> Iterator[Block]:
        for block in read_ranges(it, bootstrap, dlq_topic, rating_min, rating_max, max_weight):
            acc.add({block.partition: block.summary()})
            yield block

    n = max(1, min(len(ranges), slices or len(ranges)))
    blocks = sc.parallelize(ranges, n).mapPartitions(read)
    return blocks.persist(StorageLevel.MEMORY_AND_DISK), acc


def read_batch(
    sc: Any,
    ranges: list[OffsetRange],
    bootstrap: str,
    dlq_topic: str,
    rating_min: float,
    rating_max: float,
) -> tuple[Any, list[dict[str, Any]]]:
    """Read ``ranges`` on the executors, one Spark partition per Kafka partition.

    Returns the persisted ``RDD[Block]`` and the per-partition summaries (offsets reached,
    high-water marks, counts): one Spark job, and only the summaries reach the driver.
    The blocks stay cached so that training and publishing see exactly the records whose
    offsets were reported, even though a re-read could now reach further.
    """
    blocks, _ = batch_blocks(sc, ranges, bootstrap, dlq_topic, rating_min, rating_max)
    try:
        summaries = blocks.map(Block.summary).collect()
    except Exception:
        blocks.unpersist()
        raise
    return blocks, summaries


class KafkaUnavailable(InfraUnavailable, RuntimeError):
    """The broker cannot be reached or the topic metadata is missing; retry later."""


class TopicAdmin:
    """Driver-side metadata only (partitions, beginning offsets); never reads records."""

    def __init__(self, bootstrap: str, topic: str, dlq_topic: str, partitions: int = 4) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.dlq_topic = dlq_topic
        self.n_partitions = partitions
        self._consumer: Any = None

    def _client(self) -> Any:
        if self._consumer is None:
            from kafka import KafkaConsumer
            from kafka.errors import KafkaError

            try:
                self._consumer = KafkaConsumer(
                    bootstrap_servers=self.bootstrap.split(","),
                    group_id=None,
                    enable_auto_commit=False,
                    request_timeout_ms=15000,
                    client_id="streamrec-modeler-planner",
                )
            except KafkaError as exc:
                raise KafkaUnavailable(f"broker {self.bootstrap} unreachable: {exc}") from exc
        return self._consumer

    def ensure_topics(self) -> None:
        """Create the ratings and dead-letter topics if they do not exist."""
        from kafka.admin import KafkaAdminClient, NewTopic
        from kafka.errors import KafkaError, TopicAlreadyExistsError

        wanted = {self.topic: self.n_partitions, self.dlq_topic: 1}
        try:
            admin = KafkaAdminClient(
                bootstrap_servers=self.bootstrap.split(","), request_timeout_ms=10000
            )
        except KafkaError as exc:
            raise KafkaUnavailable(f"broker {self.bootstrap} unreachable: {exc}") from exc
        try:
            existing = set(admin.list_topics())
            new = [NewTopic(t, n, 1) for t, n in wanted.items() if t not in existing]
            if new:
                with contextlib.suppress(TopicAlreadyExistsError):
                    admin.create_topics(new)
                log.info("created topics %s", [t.name for t in new])
        except KafkaError as exc:
            raise KafkaUnavailable(f"cannot create topics on {self.bootstrap}: {exc}") from exc
        finally:
            admin.close()

    def partitions(self) -> list[int]:
        from kafka.errors import KafkaError

        try:
            client = self._client()
            deadline = time.monotonic() + 10
            while True:
                parts = client.partitions_for_topic(self.topic)
                if parts:
                    return sorted(parts)
                if time.monotonic() > deadline:
                    raise KafkaUnavailable(f"topic {self.topic!r} has no partitions")
                with contextlib.suppress(Exception):
                    client.topics()  # forces a metadata refresh
                time.sleep(0.2)
        except KafkaError as exc:
            self.close()
            raise KafkaUnavailable(f"metadata of {self.topic!r} unavailable: {exc}") from exc

    def beginning_offsets(self, partitions: Iterable[int]) -> dict[int, int]:
        from kafka import TopicPartition
        from kafka.errors import KafkaError

        tps = [TopicPartition(self.topic, p) for p in partitions]
        if not tps:
            return {}
        try:
            got = self._client().beginning_offsets(tps)
        except KafkaError as exc:
            self.close()
            raise KafkaUnavailable(f"beginning offsets of {self.topic!r}: {exc}") from exc
        return {tp.partition: int(off) for tp, off in got.items()}

    def close(self) -> None:
        if self._consumer is not None:
            with contextlib.suppress(Exception):
                self._consumer.close()
            self._consumer = None
