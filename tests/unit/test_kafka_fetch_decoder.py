"""The record-batch decoder of modeler.io.kafka_records, on batches built by kafka-python's own
builders (no services). kafka-python's reader (MemoryRecords) is the reference."""

from __future__ import annotations

import random
import struct

import pytest
from crc32c import crc32c
from kafka.record.default_records import DefaultRecordBatchBuilder
from kafka.record.memory_records import MemoryRecords, MemoryRecordsBuilder

from modeler.io.kafka_records import (
    CorruptRecords,
    UnsupportedRecords,
    _varint,
    decode_batches,
)

GZIP = 1


def batch(base: int, records: list[tuple], codec: int = 0, deltas: list[int] | None = None) -> bytes:
    """One magic-2 batch at ``base``: records are ``(key, value, headers)``."""
    builder = DefaultRecordBatchBuilder(
        magic=2, compression_type=codec, is_transactional=False,
        producer_id=-1, producer_epoch=-1, base_sequence=-1, batch_size=1 << 30,
    )
    for i, (key, value, headers) in enumerate(records):
        delta = deltas[i] if deltas else i
        assert builder.append(delta, 1_700_000_000_000 + 37 * i, key, value, headers) is not None
    buf = bytearray(builder.build())
    struct.pack_into(">q", buf, 0, base)  # the broker assigns the base offset (not under the CRC)
    return bytes(buf)


def reference(data: bytes, start: int, end: int) -> tuple[list[int], list]:
    """What kafka-python's own reader finds in ``[start, end)`` (control batches skipped)."""
    offsets, values = [], []
    records = MemoryRecords(data)
    while records.has_next():
        b = records.next_batch()
        if b is None:
            break
        if getattr(b, "is_control_batch", False):
            continue
        for rec in b:
            if start <= rec.offset < end:
                offsets.append(rec.offset)
                values.append(rec.value)
    return offsets, values


def mixed_records(rng: random.Random, n: int) -> list[tuple]:
    out = []
    for i in range(n):
        kind = i % 6
        key = None if kind == 0 else str(rng.randrange(10**6)).encode()
        if kind == 1:
            value = None  # tombstone
        elif kind == 2:
            # Lengths whose zig-zag varints take 2, 3 and 4 bytes (> 127 bytes, > 16 KB).
            value = bytes([65 + i % 26]) * [63, 64, 127, 300, 8_192, 16_384, 70_000][(i // 6) % 7]
        else:
            value = f'{{"user":"{i}","item":"{rng.randrange(999)}","rating":4.5,"timestamp":{i}}}'.encode()
        headers = [("h1", b"v" * rng.randrange(200)), ("empty", None)] if kind in (3, 4) else []
        out.append((key, value, headers))
    return out


def test_varints_round_trip_zigzag():
    from kafka.record.util import encode_varint

    for n in [0, 1, -1, 63, -64, 64, 127, 128, 300, 16_384, -16_385, 2**31 - 1, -(2**31), 2**62]:
        buf = bytearray()
        encode_varint(n, buf.append)
        assert _varint(bytes(buf) + b"\xff", 0) == (n, len(buf))


def test_decoder_agrees_with_kafka_python_on_keys_tombstones_headers_and_long_values():
    rng = random.Random(1)
    data = batch(1000, mixed_records(rng, 40)) + batch(1040, mixed_records(rng, 25))
    offsets, values, nxt, reached, n_bytes, n_recs = decode_batches(data, 1000, 10_000)
    assert (offsets, values) == reference(data, 1000, 10_000)
    assert offsets == list(range(1000, 1065))
    assert values[1] is None
    assert {len(values[i]) for i in range(2, 40, 6)} == {63, 64, 127, 300, 8_192, 16_384, 70_000}
    assert nxt == 1065 and not reached
    assert n_bytes == len(data) and n_recs == 65


def test_compressed_batches_are_decoded():
    rng = random.Random(2)
    recs = mixed_records(rng, 30)
    data = batch(0, recs[:10]) + batch(10, recs[10:], codec=GZIP) + batch(30, recs[:5])
    got = decode_batches(data, 0, 100)
    assert (got.offsets, got.values) == reference(data, 0, 100)
    assert got.offsets == list(range(35))
    # The gzip batch really is compressed (its attributes say so).
    second = data[len(batch(0, recs[:10])):]
    assert struct.unpack_from(">h", second, 21)[0] & 7 == GZIP


def test_a_fetch_from_mid_batch_skips_earlier_offsets_and_the_cap_is_exact():
    recs = mixed_records(random.Random(3), 20)
    data = batch(100, recs[:10]) + batch(110, recs[10:], codec=GZIP)
    got = decode_batches(data, 104, 113)
    assert got.offsets == list(range(104, 113))
    assert (got.offsets, got.values) == reference(data, 104, 113)
    assert got.next_offset == 113 and got.reached_end  # offset 113 is not consumed
    # A cap ending exactly at a batch boundary.
    got = decode_batches(data, 100, 110)
    assert got.offsets == list(range(100, 110)) and got.next_offset == 110 and got.reached_end


def test_a_truncated_trailing_batch_is_left_for_the_next_fetch():
    recs = mixed_records(random.Random(4), 12)
    first, second = batch(0, recs[:7]), batch(7, recs[7:])
    for cut in (1, 20, 61, 62, len(second) - 1):
        got = decode_batches(first + second[:cut], 0, 100)
        assert got.offsets == list(range(7)) and got.next_offset == 7 and not got.reached_end
    # Only part of the first batch: nothing decoded, the position does not move.
    got = decode_batches(first[:-3], 0, 100)
    assert got.offsets == [] and got.next_offset == 0


def test_control_batches_are_skipped_but_advance_the_position():
    data = bytearray(batch(50, [(b"\x00\x00\x00\x00", b"\x00\x00\x00\x00\x00\x00", [])]))
    attrs = struct.unpack_from(">h", data, 21)[0] | 0x20 | 0x10  # control, transactional
    struct.pack_into(">h", data, 21, attrs)
    struct.pack_into(">I", data, 17, crc32c(bytes(data[21:])))
    recs = mixed_records(random.Random(5), 3)
    data = batch(47, recs) + bytes(data) + batch(51, recs)
    got = decode_batches(data, 47, 100)
    assert got.offsets == [47, 48, 49, 51, 52, 53]
    # A range ending on the marker: consumed through it, no value.
    got = decode_batches(data, 50, 100)
    assert got.offsets == [51, 52, 53]
    only_marker = decode_batches(data[len(batch(47, recs)) :][: len(data) - 2 * len(batch(47, recs))], 50, 100)
    assert only_marker.offsets == [] and only_marker.next_offset == 51


def test_offset_gaps_left_by_compaction_pass():
    recs = mixed_records(random.Random(6), 4)
    data = batch(10, recs, deltas=[0, 2, 3, 7])
    got = decode_batches(data, 10, 100)
    assert got.offsets == [10, 12, 13, 17] and got.next_offset == 18
    assert decode_batches(data, 11, 100).offsets == [12, 13, 17]
    assert decode_batches(data, 10, 15).next_offset == 15
    # A range wholly inside a gap before the next batch is passed, not fetched forever.
    later = batch(30, recs)
    got = decode_batches(later, 20, 25)
    assert got.offsets == [] and got.next_offset == 25 and got.reached_end


def test_a_bad_crc_is_an_error():
    data = bytearray(batch(0, mixed_records(random.Random(7), 5)))
    data[-2] ^= 0x01
    with pytest.raises(CorruptRecords, match="CRC"):
        decode_batches(bytes(data), 0, 100)


def test_a_record_overrunning_its_batch_is_an_error_even_with_a_valid_crc():
    data = bytearray(batch(0, [(None, b"abc", [])]))
    # Claim a longer record than the batch holds, and re-sign it.
    assert data[61] == 2 * 9  # zig-zag record length
    data[61] = 2 * 40
    struct.pack_into(">I", data, 17, crc32c(bytes(data[21:])))
    with pytest.raises(CorruptRecords):
        decode_batches(bytes(data), 0, 100)


@pytest.mark.parametrize("magic", [0, 1])
def test_legacy_message_sets_are_left_to_the_consumer(magic):
    builder = MemoryRecordsBuilder(magic=magic, compression_type=0, batch_size=1 << 20, offset=5)
    builder.append(timestamp=None if magic == 0 else 1, key=None, value=b"{}")
    builder.close()
    with pytest.raises(UnsupportedRecords) as info:
        decode_batches(bytes(builder.buffer()), 5, 100)
    assert info.value.offset == 5


def test_unavailable_codecs_are_left_to_the_consumer():
    from kafka import codec

    if codec.has_zstd():
        pytest.skip("zstd is installed here; nothing to fall back from")
    data = bytearray(batch(0, mixed_records(random.Random(8), 3)))
    struct.pack_into(">h", data, 21, 4)  # claims zstd
    struct.pack_into(">I", data, 17, crc32c(bytes(data[21:])))
    with pytest.raises(UnsupportedRecords, match="codec 4"):
        decode_batches(bytes(data), 0, 100)
