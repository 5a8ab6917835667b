"""The modeler's Kafka source on the real broker and Spark: executor reads, caps, DLQ."""

from __future__ import annotations

import json
import random

import pytest

from modeler.io import kafka_source as ks
from modeler.replay import encode, make_producer
from tests.support.topics import read_records

pytestmark = pytest.mark.spark


def _garbage(rng: random.Random, n: int) -> list[tuple[bytes, bytes, str]]:
    """(key, value, expected reason prefix) of invalid messages."""
    kinds = [
        (b"{not json", "body"),
        (json.dumps({"user": "1", "item": "2", "timestamp": 1}).encode(), "rating"),
        (json.dumps({"user": "1", "item": "2", "rating": 9.5, "timestamp": 1}).encode(), "rating"),
        (b'{"user": "1", "item": "2", "rating": NaN, "timestamp": 1}', ""),
        (json.dumps({"user": "", "item": "2", "rating": 3.0, "timestamp": 1}).encode(), "user"),
    ]
    out = []
    for k in range(n):
        value, reason = kinds[k % len(kinds)]
        out.append((str(rng.randrange(50)).encode(), value, reason))
    return out


def read_as_the_service_does(sc, ranges, bootstrap: str, dlq: str) -> tuple[list, list]:
    """One batch read as ModelerService.step reads it: the blocks computed by the job that
    uses them, each partition's summary through the accumulator; (rows, summaries)."""
    blocks, acc = ks.batch_blocks(sc, ranges, bootstrap, dlq, 0.5, 5.0)
    rows = blocks.flatMap(ks.Block.rows).collect()
    blocks.unpersist()
    return rows, sorted(acc.value.values())


def test_executors_read_every_partition_to_its_high_water_mark(spark, bootstrap, topic):
    rng = random.Random(3)
    producer = make_producer(bootstrap)
    valid = []
    garbage = _garbage(rng, 25)
    for n in range(2000):
        row = (str(rng.randrange(50)), str(rng.randrange(300)), rng.choice([1.0, 2.5, 4.0, 5.0]), 1000 + n)
        valid.append(row)
        producer.send(topic, key=row[0].encode(), value=encode(*row))
        if n % 80 == 0 and garbage:
            key, value, _ = garbage.pop()
            producer.send(topic, key=key, value=value)
    producer.flush()
    producer.close()
    dlq = f"{topic}.dlq"
    sc = spark.sparkContext

    # Small caps: several batches, each reading at most its cap, continuing where it ended.
    offsets = dict.fromkeys(range(4), 0)
    seen: list[tuple] = []
    n_dlq = 0
    batches = 0
    while True:
        ranges = ks.plan_batch(topic, offsets, {}, 600)
        rows, summaries = read_as_the_service_does(sc, ranges, bootstrap, dlq)
        got = sum(s.n_valid + s.n_dlq for s in summaries)
        assert got <= 600
        for s, r in zip(sorted(summaries, key=lambda s: s.partition), ranges, strict=True):
            assert s.start == offsets[s.partition]
            assert s.next_offset - s.start == s.n_valid + s.n_dlq <= r.cap
        if got == 0:
            # Every partition ended at its high-water mark.
            assert all(s.highwater == s.next_offset for s in summaries)
            break
        batches += 1
        seen.extend(rows)
        n_dlq += sum(s.n_dlq for s in summaries)
        offsets = {s.partition: s.next_offset for s in summaries}
    assert batches >= 4
    assert sorted(seen) == sorted(valid)
    assert n_dlq == 25

    # The dead letters carry the original bytes, the reason and where they came from.
    letters = read_records(bootstrap, dlq, 25, timeout_s=10)
    assert len(letters) == 25
    originals = {v for _, v, _ in _garbage(random.Random(3), 25)}
    for rec in letters:
        headers = {k: v.decode() for k, v in rec.headers}
        assert rec.value in originals
        assert headers["topic"] == topic and headers["reason"]
        assert rec.key.decode() == f"{topic}:{headers['partition']}:{headers['offset']}"
    reasons = {dict(rec.headers)["reason"].decode().split(":")[0] for rec in letters}
    assert {"rating", "user"} <= reasons


def test_an_offset_past_the_end_is_reported_not_skipped(spark, bootstrap, topic):
    """A topic recreated under a stored offset (the broker restarted empty): the executor
    says where the log begins instead of waiting for offsets that may never come."""
    producer = make_producer(bootstrap)
    for n in range(20):
        producer.send(topic, key=b"7", value=encode("7", str(n), 3.0, n))
    producer.flush()
    producer.close()
    ranges = [ks.OffsetRange(topic, p, 10_000, 100) for p in range(4)]
    _, summaries = read_as_the_service_does(spark.sparkContext, ranges, bootstrap, f"{topic}.dlq")
    assert [s.reset_to for s in summaries] == [0, 0, 0, 0]
    assert all(s.n_valid == 0 and s.next_offset == 10_000 for s in summaries)
