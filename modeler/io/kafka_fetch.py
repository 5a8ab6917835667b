"""A lean reader of one Kafka partition range: raw Fetch requests, our own record decoder.

kafka-python's consumer spends ~36 us per record turning fetched bytes into
``ConsumerRecord`` objects (generic batch and record classes, a varint call per field,
key/header decoding we never use). The modeler only needs the offset and the value bytes
of each record, so this module sends ``Fetch`` requests through kafka-python's low-level
network client (:class:`kafka.net.compat.KafkaNetClient`: connections, API version
negotiation, cluster metadata) and decodes the returned record-batch bytes with
:mod:`modeler.io.kafka_records` (whose names this module re-exports). Anything that
decoder does not handle raises :class:`UnsupportedRecords`; the caller then reads the rest
of the range with the kafka-python consumer.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from common.errors import InfraUnavailable
from modeler.io.kafka_records import (
    HEADER_SIZE,
    CorruptRecords,
    Decoded,
    UnsupportedRecords,
    decode_batches,
)

log = logging.getLogger(__name__)

__all__ = ["HEADER_SIZE", "CorruptRecords", "Decoded", "FetchFailed", "PartitionFetcher", "RangeEnd",
           "UnsupportedRecords", "decode_batches", "drop_fetcher", "fetcher"]

# Kafka error codes this reader reacts to (kafka.errors names them; numbers keep the hot
# path free of imports).
NONE = 0
OFFSET_OUT_OF_RANGE = 1
# Leadership moved, the partition is not (yet) known there, or the connection went away:
# refresh metadata and try again.
_RETRIABLE = {
    3,  # UNKNOWN_TOPIC_OR_PARTITION
    5,  # LEADER_NOT_AVAILABLE
    6,  # NOT_LEADER_OR_FOLLOWER
    7,  # REQUEST_TIMED_OUT
    9,  # REPLICA_NOT_AVAILABLE
    13,  # NETWORK_EXCEPTION
    56,  # KAFKA_STORAGE_ERROR
    74,  # FENCED_LEADER_EPOCH
    75,  # UNKNOWN_LEADER_EPOCH
}


class FetchFailed(InfraUnavailable, RuntimeError):
    """The partition could not be fetched within the retry budget (leader, connection)."""


# --------------------------------------------------------------------------- fetching


@dataclass
class RangeEnd:
    """How a range read ended: where the next read starts, the high-water mark seen
    (``None`` if no fetch succeeded) and, for an offset outside the log, where it begins."""

    next_offset: int
    highwater: int | None
    reset_to: int | None = None


class PartitionFetcher:
    """Fetch requests to partition leaders over one kafka-python network client.

    No consumer group, no fetch session, no background thread: the event loop runs on the
    calling thread while a request is in flight. One per Python worker process and
    bootstrap string (see :func:`fetcher`).
    """

    # The largest fetch we ask for; a range needing more takes several round trips.
    MAX_FETCH_BYTES = 16 << 20
    MIN_FETCH_BYTES = 64 << 10

    def __init__(self, bootstrap: str, request_timeout_ms: int = 15000, max_wait_ms: int = 50) -> None:
        from kafka.net.compat import KafkaNetClient

        self.bootstrap = bootstrap
        self.request_timeout_ms = request_timeout_ms
        # An idle partition answers after this long; keeps an empty batch cheap.
        self.max_wait_ms = max_wait_ms
        self._client = KafkaNetClient(
            bootstrap_servers=bootstrap.split(","),
            client_id="streamrec-modeler-fetch",
            request_timeout_ms=request_timeout_ms,
            receive_message_max_bytes=self.MAX_FETCH_BYTES + (1 << 20),
        )
        self._manager = self._client._manager
        self._net = self._client._net
        # Bytes per record seen so far: sizes the next fetch to its range's cap, so a small
        # cap over a long backlog does not transfer megabytes it then throws away.
        self._bytes_per_record = 128.0

    # -- plumbing

    def _await(self, future: Any, timeout_s: float) -> Any:
        """Drive the network loop until ``future`` resolves; its value or its exception."""
        return self._net.run(self._manager.wait_for, future, max(1, int(timeout_s * 1000)))

    def _send(self, request: Any, node_id: Any, timeout_s: float) -> Any:
        async def go() -> Any:
            return await self._manager.wait_for(
                self._manager.send(request, node_id=node_id), max(1, int(timeout_s * 1000))
            )

        return self._net.run(go)

    def _leader(self, topic: str, partition: int, timeout_s: float) -> int:
        from kafka.structs import TopicPartition

        tp = TopicPartition(topic, partition)
        cluster = self._manager.cluster
        leader = cluster.leader_for_partition(tp)
        if leader is None or leader == -1:
            if not self._manager.bootstrapped:
                self._manager.bootstrap(int(timeout_s * 1000))
            future = cluster.add_topic(topic)
            if future.is_done:  # topic already tracked: its metadata is stale
                future = cluster.request_update()
            self._await(future, timeout_s)
            leader = cluster.leader_for_partition(tp)
        if leader is None or leader == -1:
            raise FetchFailed(f"no leader known for {topic}:{partition}")
        return leader

    def refresh(self, timeout_s: float) -> None:
        self._await(self._manager.cluster.request_update(), timeout_s)

    def fetch(self, topic: str, partition: int, offset: int, max_bytes: int, timeout_s: float) -> Any:
        """One Fetch of ``topic:partition`` from ``offset``: the response's partition data
        (``error_code``, ``high_watermark``, ``records``)."""
        from kafka.protocol.consumer import FetchRequest

        leader = self._leader(topic, partition, timeout_s)
        request = FetchRequest(
            max_wait_ms=self.max_wait_ms,
            min_bytes=1,
            max_bytes=max_bytes,
            isolation_level=0,  # read_uncommitted, as the consumer path
            session_id=0,
            session_epoch=-1,  # no incremental fetch session
            topics=[
                FetchRequest.FetchTopic(
                    topic=topic,
                    partitions=[
                        FetchRequest.FetchTopic.FetchPartition(
                            partition=partition,
                            current_leader_epoch=-1,
                            fetch_offset=offset,
                            last_fetched_epoch=-1,
                            log_start_offset=-1,
                            partition_max_bytes=max_bytes,
                        )
                    ],
                )
            ],
            forgotten_topics_data=[],
            rack_id="",
            # v12 is what kafka-python's own fetcher speaks; topic ids (v13+) are not needed.
            max_version=12,
        )
        response = self._send(request, leader, min(timeout_s, self.request_timeout_ms / 1000))
        for topic_data in response.responses:
            for data in topic_data.partitions:
                if data.partition_index == partition:
                    return data
        raise FetchFailed(f"fetch response without {topic}:{partition}")

    def earliest_offset(self, topic: str, partition: int, timeout_s: float) -> int:
        """Where the partition's log begins now (ListOffsets, timestamp -2)."""
        import kafka.errors as errors
        from kafka.protocol.consumer import ListOffsetsRequest

        leader = self._leader(topic, partition, timeout_s)
        request = ListOffsetsRequest(
            replica_id=-1,
            isolation_level=0,
            topics=[
                ListOffsetsRequest.ListOffsetsTopic(
                    name=topic,
                    partitions=[
                        ListOffsetsRequest.ListOffsetsTopic.ListOffsetsPartition(
                            partition_index=partition, current_leader_epoch=-1, timestamp=-2
                        )
                    ],
                )
            ],
        )
        response = self._send(request, leader, timeout_s)
        for topic_data in response.topics:
            for data in topic_data.partitions:
                if data.partition_index == partition:
                    if data.error_code != NONE:
                        raise errors.for_code(data.error_code)(f"earliest offset of {topic}:{partition}")
                    if data.old_style_offsets:  # ListOffsets v0
                        return int(data.old_style_offsets[0])
                    return int(data.offset)
        raise FetchFailed(f"list-offsets response without {topic}:{partition}")

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._client.close()

    # -- the range

    def fetch_bytes(self, n_records: int) -> int:
        want = int(n_records * self._bytes_per_record * 1.25) + HEADER_SIZE
        return max(self.MIN_FETCH_BYTES, min(self.MAX_FETCH_BYTES, want))

    def read_range(
        self,
        topic: str,
        partition: int,
        start: int,
        cap: int,
        sink: Callable[[list[int], list[bytes | None]], None],
        idle_timeout_s: float = 2.0,
        retries: int = 4,
    ) -> RangeEnd:
        """Hand every record of ``[start, start + cap)`` up to the high-water mark to
        ``sink(offsets, values)``, one call per fetch, in offset order.

        Ends at the cap, at the high-water mark of the last fetch, or when fetches bring
        nothing for ``idle_timeout_s``. Leader changes, unknown partitions and lost
        connections are retried (metadata refreshed, backoff doubling from 50 ms) within
        that same budget, then raised as :class:`FetchFailed`; the driver retries the batch.
        """
        import kafka.errors as errors

        end = start + cap
        pos = start
        highwater: int | None = None
        deadline = time.monotonic() + idle_timeout_s
        failures = 0
        max_bytes = self.fetch_bytes(cap)
        while pos < end:
            try:
                data = self.fetch(topic, partition, pos, max_bytes, max(0.5, deadline - time.monotonic()))
                code = data.error_code
                if code in _RETRIABLE:
                    raise errors.for_code(code)(f"{topic}:{partition}")
            except (errors.KafkaError, FetchFailed, OSError) as exc:
                # KafkaConnectionError, NodeNotReady, timeouts and the partition errors above.
                failures += 1
                left = deadline - time.monotonic()
                if failures > retries or left <= 0:
                    raise FetchFailed(
                        f"cannot fetch {topic}:{partition} at offset {pos} after {failures} tries: {exc}"
                    ) from exc
                log.info("fetch %s:%d at %d failed (%s); retrying", topic, partition, pos, exc)
                time.sleep(min(left, 0.05 * 2 ** (failures - 1)))
                with contextlib.suppress(Exception):
                    self.refresh(max(0.1, deadline - time.monotonic()))
                continue
            if code == OFFSET_OUT_OF_RANGE:
                reset = self.earliest_offset(topic, partition, max(1.0, deadline - time.monotonic()))
                return RangeEnd(start, highwater, reset)
            if code != NONE:
                raise errors.for_code(code)(f"fetch {topic}:{partition} at offset {pos}")
            failures = 0
            if data.high_watermark >= 0:
                highwater = int(data.high_watermark)
            if highwater is not None and start > highwater:
                # Some brokers answer an offset past the end with an empty fetch, not an error.
                reset = self.earliest_offset(topic, partition, max(1.0, deadline - time.monotonic()))
                return RangeEnd(start, highwater, reset)
            records = data.records or b""
            if records:
                try:
                    got = decode_batches(records, pos, end)
                except UnsupportedRecords as exc:
                    exc.offset = pos  # nothing of this response was handed over
                    raise
                if got.offsets:
                    sink(got.offsets, got.values)
                if got.batch_records:
                    # Moving average of the wire size per record, for sizing the next fetch.
                    per_record = got.batch_bytes / got.batch_records
                    self._bytes_per_record += 0.5 * (per_record - self._bytes_per_record)
                nxt = got.next_offset
                if nxt > pos:
                    pos = nxt
                    deadline = time.monotonic() + idle_timeout_s
                    max_bytes = self.fetch_bytes(end - pos)
                elif max_bytes < self.MAX_FETCH_BYTES:
                    # Only part of one batch came back (an old broker ignoring KIP-74):
                    # ask for more. Modern brokers always return the first whole batch.
                    max_bytes = min(self.MAX_FETCH_BYTES, 2 * max_bytes)
                else:
                    raise FetchFailed(f"{topic}:{partition} at {pos}: a batch larger than {max_bytes} bytes")
            if highwater is not None and pos >= highwater:
                break
            if time.monotonic() > deadline:
                break  # nothing for a while: the broker is slow or away; end the range here
        return RangeEnd(min(pos, end), highwater)


_FETCHERS: dict[str, PartitionFetcher] = {}


def fetcher(bootstrap: str) -> PartitionFetcher:
    """This process's fetcher for ``bootstrap`` (Spark reuses Python workers across tasks)."""
    f = _FETCHERS.get(bootstrap)
    if f is None:
        if not _FETCHERS:
            # Closed before interpreter teardown, which otherwise finds the client's
            # metadata loop holding a reference to an already collected manager.
            atexit.register(_close_all)
        f = _FETCHERS[bootstrap] = PartitionFetcher(bootstrap)
    return f


def _close_all() -> None:
    for bootstrap in list(_FETCHERS):
        drop_fetcher(bootstrap)


def drop_fetcher(bootstrap: str) -> None:
    f = _FETCHERS.pop(bootstrap, None)
    if f is not None:
        f.close()
