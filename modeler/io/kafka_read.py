"""Reading offset ranges on the executors into columnar blocks, and the RDD of those blocks.

Executors read their range with raw Fetch requests decoded by :mod:`modeler.io.kafka_fetch`
(the kafka-python consumer, ``assign`` + ``seek``, is the fallback for record formats and
codecs that module leaves alone); there is no consumer group and no committed offset: the
offsets live with the model version in Redis. They parse and validate each message where it
was read (:mod:`modeler.io.kafka_parse`), send bad ones to the dead-letter topic, and report
the offset they actually reached and the high-water mark they saw as a
:class:`BlockSummary`. Ratings never pass through the driver: only one small summary per
partition does.

A range ends at the high-water mark seen while fetching, or at its cap. ``end_offsets()``
alone is not trusted for that (the local broker under-reports it).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from modeler.io.kafka_parse import DEFAULT_MAX_WEIGHT, parse_message
from modeler.io.kafka_plan import OffsetRange
from modeler.workerheap import settle

log = logging.getLogger(__name__)


class BlockSummary(NamedTuple):
    """What the driver learns of one partition's read (through an accumulator or a collect)."""

    partition: int
    start: int
    next_offset: int  # where the next batch starts (``start`` when the log moved: reset_to)
    highwater: int | None  # the partition's high-water mark seen while reading
    n_valid: int  # ratings and implicit events
    n_implicit: int
    n_dlq: int
    dlq_reasons: tuple[str, ...]  # a few examples for the log
    read_seconds: float
    # Where the partition's log begins now, when ``start`` lay outside it (nothing was read).
    reset_to: int | None


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

    def summary(self) -> BlockSummary:
        return BlockSummary(
            partition=self.partition,
            start=self.start,
            next_offset=self.next_offset,
            highwater=self.highwater,
            n_valid=len(self.users) + len(self.i_users),
            n_implicit=len(self.i_users),
            n_dlq=self.n_dlq,
            dlq_reasons=tuple(self.dlq_reasons),
            read_seconds=self.read_seconds,
            reset_to=self.reset_to,
        )


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


def close_clients(bootstrap: str) -> None:
    """Close this process's cached reader, fetcher and dead-letter producer of ``bootstrap``
    (after an error, so the next read starts clean; and when the modeler stops)."""
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
        close_clients(bootstrap)
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

    def zero(self, value: dict[int, BlockSummary]) -> dict[int, BlockSummary]:
        return {}

    def addInPlace(self, a: dict[int, BlockSummary],  # Spark's AccumulatorParam API
                   b: dict[int, BlockSummary]) -> dict[int, BlockSummary]:
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
    (one Spark job less per batch than collecting the summaries first); the summaries
    (offsets reached) are then in ``acc.value``. The cache makes a fallback write job (or a
    retry) see exactly the records whose offsets were reported, even though a re-read could
    now reach further.
    """
    from pyspark import AccumulatorParam, StorageLevel

    param = type("SummaryParam", (_SummaryParam, AccumulatorParam), {})()
    acc = sc.accumulator({}, param)

    def read(it: Iterable[OffsetRange]) -> Iterator[Block]:
        settle()
        for block in read_ranges(it, bootstrap, dlq_topic, rating_min, rating_max, max_weight):
            acc.add({block.partition: block.summary()})
            yield block

    n = max(1, min(len(ranges), slices or len(ranges)))
    blocks = sc.parallelize(ranges, n).mapPartitions(read)
    return blocks.persist(StorageLevel.MEMORY_AND_DISK), acc
