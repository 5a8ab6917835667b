"""The fast Kafka reader (modeler.io.kafka_fetch) against the real broker: it must give the
same Block, and send the same dead letters, as the kafka-python consumer path."""

from __future__ import annotations

import itertools
import json
import random
import struct
import time
import uuid

import pytest

from devstack.services import create_topics, free_port
from modeler.io import kafka_fetch as kf
from modeler.io import kafka_source as ks
from modeler.replay import encode
from tests.support.topics import read_records

FIELDS = ("partition", "start", "next_offset", "highwater", "users", "items", "ratings",
          "timestamps", "n_dlq", "dlq_reasons", "reset_to")
PART = 1  # everything goes to one partition, so batch boundaries are known


def _state(block: ks.Block) -> dict:
    return {f: getattr(block, f) for f in FIELDS}


def _produce_mix(bootstrap: str, topic: str) -> int:
    """Plain and gzip producers interleaved: valid ratings, garbage, tombstones, keys and
    headers, values over 127 bytes. Returns the number of records written."""
    from kafka import KafkaProducer

    plain = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, batch_size=16 * 1024, acks=1)
    gz = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, batch_size=16 * 1024, acks=1,
                       compression_type="gzip")
    rng = random.Random(11)
    n = 0
    for burst in range(12):
        producer = gz if burst % 3 == 1 else plain
        for i in range(60 + 17 * (burst % 4)):
            key = str(rng.randrange(40)).encode()
            headers = [("src", b"test"), ("n", str(n).encode())] if i % 5 == 0 else None
            kind = i % 13
            if kind == 3:
                value = None  # tombstone
            elif kind == 7:
                value = b"{not json" + b"!" * rng.randrange(300)
            elif kind == 9:
                value = json.dumps({"user": "1", "item": "2", "rating": 9.5, "timestamp": 1}).encode()
            else:
                value = encode(str(rng.randrange(40)), "i" * rng.randrange(1, 120), rng.choice([0.5, 3.0, 5.0]), n)
            producer.send(topic, key=key, value=value, headers=headers, partition=PART)
            n += 1
        producer.flush()  # one burst = at least one batch of its own
    plain.close()
    gz.close()
    return n


def _batch_starts(bootstrap: str, topic: str) -> list[int]:
    """Base offsets of the partition's record batches, as the broker returns them."""
    f = kf.PartitionFetcher(bootstrap)
    try:
        starts, pos = [], 0
        while True:
            data = f.fetch(topic, PART, pos, 1 << 20, 5.0)
            raw = data.records or b""
            p = 0
            while p + 12 <= len(raw):
                base, length = struct.unpack_from(">qi", raw, p)
                if p + 12 + length > len(raw):
                    break
                if base >= pos:
                    starts.append(base)
                pos = base + struct.unpack_from(">i", raw, p + 23)[0] + 1
                p += 12 + length
            if pos >= data.high_watermark:
                return starts
    finally:
        f.close()


def _dead_letters(bootstrap: str, dlq: str, n: int) -> list[tuple]:
    got = read_records(bootstrap, dlq, n, timeout_s=15)
    return sorted((r.key, r.value, tuple(r.headers)) for r in got)


@pytest.fixture
def mixed(bootstrap, topic):
    n = _produce_mix(bootstrap, topic)
    return topic, n, _batch_starts(bootstrap, topic)


def test_whole_range_gives_the_same_block_and_the_same_dead_letters(bootstrap, mixed):
    topic, n, starts = mixed
    assert len(starts) >= 12
    dlq_fast, dlq_slow = f"{topic}.dlq-fast", f"{topic}.dlq-slow"
    create_topics(bootstrap, {dlq_fast: 1, dlq_slow: 1})
    rng = ks.OffsetRange(topic, PART, 0, n + 500)
    fast = ks.read_range(rng, bootstrap, dlq_fast, 0.5, 5.0, fast=True)
    slow = ks.read_range(rng, bootstrap, dlq_slow, 0.5, 5.0, fast=False)
    assert _state(fast) == _state(slow)
    assert fast.next_offset == fast.highwater == n
    assert fast.n_dlq > 0 and len(fast.users) > 0 and len(fast.users) + fast.n_dlq == n
    letters = _dead_letters(bootstrap, dlq_fast, fast.n_dlq)
    assert len(letters) == fast.n_dlq
    assert letters == _dead_letters(bootstrap, dlq_slow, slow.n_dlq)
    reasons = {dict(h)["reason"].split(b":")[0] for _, _, h in letters}
    assert {b"body", b"rating"} <= reasons


def test_ranges_starting_and_ending_mid_batch(bootstrap, mixed):
    topic, n, starts = mixed
    # A start inside a batch (the broker returns the whole batch) and caps ending inside one.
    inside = [s + 5 for s, nxt in itertools.pairwise(starts) if nxt - s > 10]
    assert len(inside) >= 3
    cases = [(inside[0], 40), (inside[1], n), (0, inside[2] - starts[0]), (starts[3], starts[4] - starts[3]),
             (inside[-1], 1), (n - 3, 50), (n, 10)]
    for start, cap in cases:
        rng = ks.OffsetRange(topic, PART, start, cap)
        fast = ks.read_range(rng, bootstrap, None, 0.5, 5.0, fast=True)
        slow = ks.read_range(rng, bootstrap, None, 0.5, 5.0, fast=False)
        assert _state(fast) == _state(slow), (start, cap)
        assert fast.next_offset == min(start + cap, n)
        assert len(fast.users) + fast.n_dlq == fast.next_offset - start


def test_an_offset_past_the_end_reports_where_the_log_begins(bootstrap, mixed):
    topic, n, _ = mixed
    for start in (n + 1, 10_000):
        rng = ks.OffsetRange(topic, PART, start, 100)
        fast = ks.read_range(rng, bootstrap, None, 0.5, 5.0, fast=True)
        slow = ks.read_range(rng, bootstrap, None, 0.5, 5.0, fast=False)
        assert _state(fast) == _state(slow)
        assert fast.reset_to == 0 and fast.next_offset == start and not fast.users


def test_small_fetches_read_on_from_where_the_last_one_ended(bootstrap, mixed):
    """Tiny fetch sizes: each response holds a few whole batches (this broker does not cut
    one; the unit tests cover a partial trailing batch) and the reader continues from the
    next offset until the range is done, with the records the consumer sees."""
    topic, n, _ = mixed
    f = kf.PartitionFetcher(bootstrap)
    f.MIN_FETCH_BYTES = 1024
    f._bytes_per_record = 1.0
    got: list[tuple] = []
    calls = 0

    def sink(offsets, values):
        nonlocal calls
        calls += 1
        got.extend(zip(offsets, values, strict=True))

    try:
        end = f.read_range(topic, PART, 3, n, sink)
    finally:
        f.close()
    assert calls >= 2
    assert [o for o, _ in got] == list(range(3, n))
    assert end.next_offset == end.highwater == n

    ref = [(r.offset, r.value) for r in read_records(bootstrap, topic, n - 3, PART, start=3)]
    assert got == ref


def test_a_broker_that_is_away_fails_the_read_within_its_budget():
    bootstrap = f"127.0.0.1:{free_port()}"
    rng = ks.OffsetRange(f"t-{uuid.uuid4().hex[:6]}", 0, 0, 10)
    t0 = time.monotonic()
    with pytest.raises(Exception) as info:
        ks.read_range(rng, bootstrap, None, 0.5, 5.0, idle_timeout_s=1.0, fast=True)
    assert time.monotonic() - t0 < 10
    assert bootstrap not in kf._FETCHERS  # dropped: the retried batch starts afresh
    assert isinstance(info.value, kf.FetchFailed)


def test_records_the_decoder_leaves_are_read_by_the_consumer_from_that_offset(bootstrap, mixed, monkeypatch):
    """A legacy or zstd batch cannot be produced through this broker (it rewrites batches),
    so the decoder is made to refuse everything from a mid-range offset on: the rest of the
    range comes from the kafka-python consumer and the Block is the same as the consumer's."""
    topic, n, starts = mixed
    cut = starts[len(starts) // 2]
    decode = kf.decode_batches
    refused = []

    def refusing(data, start, end):
        if start >= cut:
            refused.append(start)
            raise kf.UnsupportedRecords(start, "pretend legacy format")
        return decode(data, start, min(end, cut))  # hand over what precedes the cut only

    monkeypatch.setattr(kf, "decode_batches", refusing)
    rng = ks.OffsetRange(topic, PART, 2, n)
    fast = ks.read_range(rng, bootstrap, None, 0.5, 5.0, fast=True)
    assert refused == [cut]
    slow = ks.read_range(rng, bootstrap, None, 0.5, 5.0, fast=False)
    assert _state(fast) == _state(slow)
    assert fast.next_offset == n
