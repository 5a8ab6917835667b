"""A lean reader of one Kafka partition range: raw Fetch requests, our own record decoder.

kafka-python's consumer spends ~36 us per record turning fetched bytes into
``ConsumerRecord`` objects (generic batch and record classes, a varint call per field,
key/header decoding we never use). The modeler only needs the offset and the value bytes
of each record, so this module sends ``Fetch`` requests through kafka-python's low-level
network client (:class:`kafka.net.compat.KafkaNetClient`: connections, API version
negotiation, cluster metadata) and decodes the returned record-batch bytes itself.

Record batch, magic 2 (all integers big-endian)::

    baseOffset int64 | batchLength int32 | partitionLeaderEpoch int32 | magic int8 |
    crc uint32 (CRC-32C of attributes .. end) | attributes int16 | lastOffsetDelta int32 |
    baseTimestamp int64 | maxTimestamp int64 | producerId int64 | producerEpoch int16 |
    baseSequence int32 | recordCount int32 | records...           (61-byte header)

    record: length varint | attributes int8 | timestampDelta varlong | offsetDelta varint |
            keyLength varint | key | valueLength varint | value | headerCount varint | headers

Varints are zig-zag encoded (``(n >> 1) ^ -(n & 1)``), 7 bits per byte, low bits first.
attributes & 7 is the compression codec of the records section; attributes & 0x20 marks
a control batch (transaction markers), which is skipped but still advances the position.

Anything this reader does not handle (legacy magic 0/1 message sets, a codec whose library
is not installed) raises :class:`UnsupportedRecords`; the caller then reads the rest of the
range with the kafka-python consumer.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

from crc32c import crc32c

from common.errors import InfraUnavailable, StreamrecError

log = logging.getLogger(__name__)

_HEADER = struct.Struct(">qiibIhiqqqhii")
HEADER_SIZE = _HEADER.size  # 61
_LENGTH = struct.Struct(">qi")  # baseOffset, batchLength: enough to know a batch's extent
_MAGIC_AT = 16  # same place in legacy message sets, so the format can be told first
_CRC_FROM = 21  # the CRC covers attributes .. end of batch
_CONTROL = 0x20
_CODEC = 0x07

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


class CorruptRecords(StreamrecError, ValueError):
    """A record batch failed its CRC-32C or is malformed: retry the batch, never skip it."""


class UnsupportedRecords(StreamrecError):
    """Records this reader does not decode (legacy format, codec not installed).

    ``offset`` is where the caller should continue with a general-purpose consumer:
    everything before it has already been handed to the sink.
    """

    def __init__(self, offset: int, why: str) -> None:
        super().__init__(f"offset {offset}: {why}")
        self.offset = offset


class FetchFailed(InfraUnavailable, RuntimeError):
    """The partition could not be fetched within the retry budget (leader, connection)."""


# --------------------------------------------------------------------------- decoding


def _varint(buf: Any, pos: int) -> tuple[int, int]:
    """Zig-zag varint at ``buf[pos]``: ``(value, position after it)``."""
    raw = 0
    shift = 0
    while True:
        b = buf[pos]
        pos += 1
        raw |= (b & 0x7F) << shift
        if b < 0x80:
            return (raw >> 1) ^ -(raw & 1), pos
        shift += 7
        if shift > 63:
            raise CorruptRecords(f"varint longer than 10 bytes at {pos}")


def _decompress(codec: int, payload: bytes, offset: int) -> bytes:
    from kafka import codec as kc

    if codec == 1:
        return kc.gzip_decode(payload)
    if codec == 2 and kc.has_snappy():
        return kc.snappy_decode(payload)
    if codec == 3 and kc.has_lz4():
        return kc.lz4_decode(payload)
    if codec == 4 and kc.has_zstd():
        return kc.zstd_decode(payload)
    raise UnsupportedRecords(offset, f"compression codec {codec} is not available here")


def _records(
    buf: Any,
    rp: int,
    stop: int,
    count: int,
    base: int,
    pos: int,
    end: int,
    offsets: list[int],
    values: list[bytes | None],
) -> tuple[int, bool]:
    """Decode ``count`` records in ``buf[rp:stop]`` of the batch at ``base``; keep those in
    ``[pos, end)``. Returns the position after the last record kept (or ``pos``) and whether
    ``end`` was reached."""
    add_offset = offsets.append
    add_value = values.append
    for _ in range(count):
        # Varints of one or two bytes (|n| < 8192) are the common case for every field but
        # the timestamp delta: read those inline, call _varint only for longer ones.
        b = buf[rp]
        if b < 0x80:
            length = (b >> 1) ^ -(b & 1)
            rp += 1
        elif buf[rp + 1] < 0x80:
            b = (b & 0x7F) | (buf[rp + 1] << 7)
            length = (b >> 1) ^ -(b & 1)
            rp += 2
        else:
            length, rp = _varint(buf, rp)
        record_end = rp + length
        q = rp + 1  # attributes: unused
        while buf[q] >= 0x80:  # timestampDelta: unused, skipped byte by byte
            q += 1
        q += 1
        b = buf[q]
        if b < 0x80:
            delta = (b >> 1) ^ -(b & 1)
            q += 1
        elif buf[q + 1] < 0x80:
            b = (b & 0x7F) | (buf[q + 1] << 7)
            delta = (b >> 1) ^ -(b & 1)
            q += 2
        else:
            delta, q = _varint(buf, q)
        b = buf[q]
        if b < 0x80:
            klen = (b >> 1) ^ -(b & 1)
            q += 1
        else:
            klen, q = _varint(buf, q)
        if klen > 0:
            q += klen
        b = buf[q]
        if b < 0x80:
            vlen = (b >> 1) ^ -(b & 1)
            q += 1
        elif buf[q + 1] < 0x80:
            b = (b & 0x7F) | (buf[q + 1] << 7)
            vlen = (b >> 1) ^ -(b & 1)
            q += 2
        else:
            vlen, q = _varint(buf, q)
        if q + vlen > record_end or record_end > stop or length <= 0:
            raise CorruptRecords(f"record at offset {base + delta} overruns its batch")
        offset = base + delta
        if offset >= end:
            return pos, True
        if offset >= pos:
            add_offset(offset)
            add_value(buf[q : q + vlen] if vlen >= 0 else None)
            pos = offset + 1
        rp = record_end  # headers (after the value) are skipped with the record length
    if rp != stop:
        raise CorruptRecords(f"batch at offset {base} has {stop - rp} bytes after its last record")
    return pos, False


class Decoded(NamedTuple):
    offsets: list[int]
    values: list[bytes | None]
    next_offset: int  # where the next fetch starts; never beyond the range's end
    reached_end: bool  # the range's end (its cap) was reached
    batch_bytes: int  # wire size and record count of the complete batches seen,
    batch_records: int  # for sizing the next fetch


def decode_batches(data: bytes, start: int, end: int) -> Decoded:
    """Records with offsets in ``[start, end)`` from the complete batches of ``data``.

    ``next_offset`` is after the last record kept or the last batch passed. A trailing
    partial batch (a fetch truncated by its byte limit) is ignored: the next fetch starts
    there. A batch that begins before ``start`` (a fetch from mid-batch) contributes only
    the records from ``start`` on. Raises :class:`CorruptRecords` on a CRC mismatch or a
    malformed batch, and :class:`UnsupportedRecords` on what only the general consumer reads.
    """
    offsets: list[int] = []
    values: list[bytes | None] = []
    pos = start
    n = len(data)
    p = 0
    seen_bytes = seen_records = 0
    view = memoryview(data)
    unpack_header = _HEADER.unpack_from
    # Legacy message sets can be shorter than a v2 header: look at length and magic first.
    while p + _MAGIC_AT < n:
        base, blen = _LENGTH.unpack_from(data, p)
        size = blen + 12
        if p + size > n:
            break  # partial trailing batch
        if data[p + _MAGIC_AT] != 2:
            raise UnsupportedRecords(pos, f"record format magic {data[p + _MAGIC_AT]}")
        if size < HEADER_SIZE:
            raise CorruptRecords(f"batch at offset {base} is shorter than its header")
        (_, _, _, _, crc, attrs, last_delta, _, _, _, _, _, count) = unpack_header(data, p)
        if crc32c(view[p + _CRC_FROM : p + size]) != crc:
            raise CorruptRecords(f"CRC-32C mismatch in the batch at offset {base}")
        seen_bytes += size
        seen_records += count
        batch_next = base + last_delta + 1
        if base >= end:
            # Offsets from pos to end do not exist (compaction, markers): all passed.
            return Decoded(offsets, values, end, True, seen_bytes, seen_records)
        if batch_next <= pos:  # wholly before the range (fetch started mid-way)
            p += size
            continue
        if attrs & _CONTROL:
            pos = min(batch_next, end)  # transaction markers: no data, but they take offsets
            p += size
            continue
        codec = attrs & _CODEC
        try:
            if codec:
                body = _decompress(codec, data[p + HEADER_SIZE : p + size], pos)
                pos, done = _records(body, 0, len(body), count, base, pos, end, offsets, values)
            else:
                pos, done = _records(data, p + HEADER_SIZE, p + size, count, base, pos, end, offsets, values)
        except IndexError as exc:  # a record count or length pointing past the batch
            raise CorruptRecords(f"batch at offset {base} is malformed") from exc
        if done:
            return Decoded(offsets, values, end, True, seen_bytes, seen_records)
        # Compaction may have removed the batch's last records: its offsets still pass.
        pos = max(pos, min(batch_next, end))
        if pos >= end:
            return Decoded(offsets, values, pos, True, seen_bytes, seen_records)
        p += size
    return Decoded(offsets, values, pos, False, seen_bytes, seen_records)


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
