"""Kafka record batches (magic 2) -> offsets and value bytes: the modeler's own decoder.

The modeler only needs the offset and the value bytes of each record, so
:func:`decode_batches` reads them straight from the fetched bytes (kafka-python's consumer
spends ~36 us per record building objects we never use); :mod:`modeler.io.kafka_fetch`
sends the Fetch requests.

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

import struct
from typing import Any, NamedTuple

from crc32c import crc32c

from common.errors import StreamrecError

_HEADER = struct.Struct(">qiibIhiqqqhii")
HEADER_SIZE = _HEADER.size  # 61
_LENGTH = struct.Struct(">qi")  # baseOffset, batchLength: enough to know a batch's extent
_MAGIC_AT = 16  # same place in legacy message sets, so the format can be told first
_CRC_FROM = 21  # the CRC covers attributes .. end of batch
_CONTROL = 0x20
_CODEC = 0x07


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
