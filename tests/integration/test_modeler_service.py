"""The modeler service in-process on the shared SparkSession, the real broker and Redis.

Readers in these tests use only the documented layout (``common.keys`` docstring) with a
plain redis client and numpy: no modeler code reads the results back.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections import Counter

import numpy as np
import pytest
import redis

from devstack.services import start_redis
from modeler.replay import encode, make_producer, send_rows
from modeler.service import ModelerService, new_model
from tests.support.modeler import (
    assert_complete_once,
    ml_rows,
    plain_predict,
    plain_snapshot,
    run_until_seen,
    settings_for,
)
from tests.support.topics import read_records

pytestmark = pytest.mark.spark


# ------------------------------------------------------------------ running and waiting


def run_in_background(service: ModelerService, n: int) -> tuple[threading.Thread, list[BaseException]]:
    """``run_until_seen`` in a thread; the errors it met are in the returned list."""
    errors: list[BaseException] = []

    def loop() -> None:
        try:
            run_until_seen(service, n, timeout=240)
        except BaseException as exc:  # reported by the test thread
            errors.append(exc)

    worker = threading.Thread(target=loop, daemon=True)
    worker.start()
    return worker, errors


def wait_published(client: redis.Redis, prefix: str, service: ModelerService, n: int) -> None:
    """Until a version with ``ratings_seen`` >= n is in Redis."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        raw = client.hget(f"{prefix}:ver:{service.version}", "ratings_seen") if service.version else None
        if raw is not None and int(raw) >= n:
            return
        time.sleep(0.2)
    pytest.fail(f"no version with {n} ratings was published")


# ------------------------------------------------------------------ tests


def test_replayed_ratings_become_consistent_versions(spark, bootstrap, topic, redis_url, redis_prefix, ml_small):
    rows = ml_rows(ml_small, 2400)
    producer = make_producer(bootstrap)
    send_rows(producer, topic, rows)
    producer.flush()
    producer.close()
    settings = settings_for(bootstrap, topic, redis_url, redis_prefix, MODELER_BATCH_MAX_RECORDS=500,
                            MODELER_MAX_SEGMENT_CHAIN=3, MODELER_FULL_SEGMENT_SHARE=0,
                            MODELER_KEEP_VERSIONS=2, MODELER_GC_MIN_AGE_S=0)
    client = redis.Redis.from_url(redis_url)
    sub = client.pubsub()
    sub.subscribe(f"{redis_prefix}:events")
    service = ModelerService(settings, spark=spark)
    run_until_seen(service, len(rows))

    snap = plain_snapshot(client, redis_prefix)
    meta = snap["meta"]
    assert int(meta["ratings_seen"]) == len(rows)
    assert int(meta["version"]) == snap["pointer"]["version"] >= 5
    # With Redis healthy every version was written by its training job (no write job).
    assert service.reports and all(r.inline for r in service.reports)
    # Offsets of the version = every message of the topic (nothing else was produced).
    offsets = json.loads(meta["offsets"])
    assert set(offsets) == {f"{topic}:{p}" for p in range(4)}
    assert sum(offsets.values()) == len(rows)
    # Every user and item is in the model, with finite factors.
    assert set(snap["users"]) == {r[0] for r in rows}
    assert set(snap["items"]) == {r[1] for r in rows}
    assert int(meta["n_users"]) == len(snap["users"]) and int(meta["n_items"]) == len(snap["items"])
    assert all(np.isfinite(v).all() and np.isfinite(b) for b, v in snap["items"].values())
    assert abs(float(meta["mu"]) - np.mean([r[2] for r in rows])) < 1e-6
    # The chain was cut: at most MODELER_MAX_SEGMENT_CHAIN segments, the first a full one.
    assert 1 <= len(snap["pointer"]["segments"]) <= 3
    # The model learned something: it predicts its training data better than the mean.
    sample = rows[::7]
    err_model = np.sqrt(np.mean([(plain_predict(snap, u, i) - r) ** 2 for u, i, r, _ in sample]))
    err_mean = np.sqrt(np.mean([(float(meta["mu"]) - r) ** 2 for _, _, r, _ in sample]))
    assert err_model < err_mean
    # Rated items per user, and the most rated items, match the stream.
    user = rows[0][0]
    rated = {k.decode(): float(v) for k, v in client.hgetall(f"{redis_prefix}:rated:{user}").items()}
    assert rated == {i: r for u, i, r, _ in rows if u == user}
    popular = json.loads(meta["popular"])
    counts = Counter(r[1] for r in rows)
    assert popular[0][1] == max(counts.values())
    assert all(counts[i] == c for i, c in popular)
    assert json.loads(client.get(f"{redis_prefix}:popular")) == popular
    # Per-batch metrics, newest first.
    metrics = [json.loads(m) for m in client.lrange(f"{redis_prefix}:metrics", 0, -1)]
    assert metrics[0]["version"] == int(meta["version"])
    assert sum(m["batch_ratings"] for m in metrics) == len(rows)
    assert all(m["prequential_rmse"] is None or m["prequential_rmse"] > 0 for m in metrics)
    # Announcements on the channel; old versions collected (keep 2 + those younger than 5 s).
    announced = []
    while (msg := sub.get_message(timeout=0.1)) is not None:
        if msg["type"] == "message":
            announced.append(int(msg["data"]))
    assert announced and announced[-1] == int(meta["version"])
    live = [int(v) for v in client.zrange(f"{redis_prefix}:versions", 0, -1)]
    for v in range(1, int(meta["version"]) + 1):
        assert (v in live) == bool(client.exists(f"{redis_prefix}:ver:{v}"))
    assert len(live) < int(meta["version"])
    referenced = {s for v in live for s in json.loads(client.hget(f"{redis_prefix}:ver:{v}", "segments"))}
    stored = {int(k.decode().split(":")[2]) for k in client.scan_iter(match=f"{redis_prefix}:seg:*", count=1000)}
    assert stored == referenced  # factor and state hashes of collected segments are gone
    sub.close()

    # A second modeler restores the same model and has nothing left to do.
    again = ModelerService(settings, spark=spark)
    again._start()
    assert again.model.ratings_seen == len(rows)
    assert again.offsets == {int(k.split(":")[-1]): v for k, v in offsets.items()}
    assert again.version == int(meta["version"])
    again.publisher.release_lease(again.token)


def test_poison_messages_go_to_the_dlq_and_leave_the_model_unchanged(
    spark, bootstrap, topic, redis_url, redis_prefix, ml_small
):
    rows = ml_rows(ml_small, 1500)
    rng = random.Random(5)
    poison = [
        b"\x00\xff not json", b'{"user": "1", "item": "2"}', b'{"user": "1", "item": "2", "rating": 99}',
        b'{"user": "", "item": "2", "rating": 3}', b'{"user": "1", "item": "2", "rating": NaN}',
        b'{"user": "1", "item": "", "rating": 3, "timestamp": 5}', b"[]",
    ]
    producer = make_producer(bootstrap)
    n_poison = 0
    for k, row in enumerate(rows):
        producer.send(topic, key=row[0].encode(), value=encode(*row))
        if k % 50 == 0:
            producer.send(topic, key=row[0].encode(), value=rng.choice(poison))
            n_poison += 1
    producer.flush()
    producer.close()
    # One batch holds the whole topic, so the comparison model sees the same batch. A model of
    # one partition: the fused plan the modeler uses on a local master by default.
    settings = settings_for(bootstrap, topic, redis_url, redis_prefix, MODELER_BATCH_MAX_RECORDS=100_000,
                            MODEL_NUM_PARTITIONS=1)
    service = ModelerService(settings, spark=spark)
    run_until_seen(service, len(rows))
    client = redis.Redis.from_url(redis_url)
    snap = plain_snapshot(client, redis_prefix)
    assert int(snap["meta"]["ratings_seen"]) == len(rows)
    assert json.loads(snap["meta"]["metrics"])["dlq_total"] == n_poison
    assert sum(json.loads(snap["meta"]["offsets"]).values()) == len(rows) + n_poison

    # The reference is laid out differently (3 partitions, four-stage plan): same floats.
    reference = new_model(settings.model_copy(update={"model_num_partitions": 3}))
    reference.train(spark.sparkContext.parallelize(rows, 3))
    ref_users = dict(reference.user_factors.collect())
    ref_items = dict(reference.item_factors.collect())
    assert set(ref_users) == set(snap["users"]) and set(ref_items) == set(snap["items"])
    for table, ref in ((snap["users"], ref_users), (snap["items"], ref_items)):
        for key, (bias, vec) in table.items():
            assert bias == pytest.approx(ref[key][0], abs=1e-5)
            np.testing.assert_allclose(vec, ref[key][1], atol=1e-5)
    assert float(snap["meta"]["mu"]) == pytest.approx(reference.mu, abs=1e-9)

    # The dead letters: the original bytes, with a reason naming the field.
    letters = read_records(bootstrap, f"{topic}.dlq", n_poison)
    assert len(letters) == n_poison
    for rec in letters:
        reason = dict(rec.headers)["reason"].decode()
        assert rec.value in poison
        assert reason.split(":")[0] in {"rating", "user", "item", "body"} or reason.startswith("body")


def test_redis_restart_republishes_the_whole_model_without_double_counting(
    spark, bootstrap, topic, redis_prefix, ml_small, tmp_path
):
    rows = ml_rows(ml_small, 2400)
    first, second = rows[:1200], rows[1200:]
    own = start_redis(workdir=tmp_path / "redis")  # this test restarts it
    port = own.extra["port"]
    try:
        producer = make_producer(bootstrap)
        send_rows(producer, topic, first)
        producer.flush()
        settings = settings_for(bootstrap, topic, own.url, redis_prefix, MODELER_BATCH_MAX_RECORDS=400)
        service = ModelerService(settings, spark=spark)
        worker, errors = run_in_background(service, len(rows))
        client = redis.Redis.from_url(own.url)
        wait_published(client, redis_prefix, service, len(first))
        before = service.version
        own.kill()  # Redis away, then back empty: the modeler must retry, then republish all
        time.sleep(2.0)
        own = start_redis(port=port, workdir=tmp_path / "redis2")
        client = redis.Redis.from_url(own.url)
        send_rows(producer, topic, second)
        producer.flush()
        producer.close()
        worker.join(240)
        assert not worker.is_alive() and not errors, errors
        # Complete (also the users and items only in the part before the restart), once.
        meta = assert_complete_once(client, redis_prefix, rows)["meta"]
        assert int(meta["version"]) > before
        # Rated items rebuilt for ratings from before the restart too.
        user = first[0][0]
        rated = {k.decode() for k in client.hkeys(f"{redis_prefix}:rated:{user}")}
        assert rated == {i for u, i, _, _ in rows if u == user}
        counts = Counter(r[1] for r in rows)
        assert all(counts[i] == c for i, c in json.loads(meta["popular"]))
    finally:
        own.stop()


def test_a_kafka_outage_is_retried_and_nothing_is_lost_or_counted_twice(
    spark, redis_url, redis_prefix, ml_small, tmp_path
):
    from devstack.services import create_topics, free_port, start_broker
    from tests.integration.tcp_proxy import TcpProxy

    # The broker advertises the proxy's port, so every client (the modeler's driver and its
    # executors) talks to it through the proxy: cutting the proxy is a Kafka outage while
    # the broker (and its in-memory log) stays up.
    proxy_port = free_port()
    broker = start_broker(workdir=tmp_path / "broker", advertised_port=proxy_port)
    proxy = TcpProxy(("127.0.0.1", proxy_port), ("127.0.0.1", broker.extra["port"]))
    proxy.start()
    bootstrap = f"127.0.0.1:{proxy_port}"
    topic = "ratings-outage"
    try:
        create_topics(bootstrap, {topic: 4, f"{topic}.dlq": 1})
        rows = ml_rows(ml_small, 2400)
        first, second = rows[:1200], rows[1200:]
        producer = make_producer(bootstrap)
        send_rows(producer, topic, first)
        producer.flush()
        producer.close()
        settings = settings_for(bootstrap, topic, redis_url, redis_prefix, MODELER_BATCH_MAX_RECORDS=400,
                                MODEL_NUM_PARTITIONS=1)
        service = ModelerService(settings, spark=spark)
        worker, errors = run_in_background(service, len(rows))
        client = redis.Redis.from_url(redis_url)
        wait_published(client, redis_prefix, service, len(first))
        failed_before = service.metrics.batches.labels(outcome="failed")._value.get()
        proxy.cut()
        deadline = time.monotonic() + 60
        while service.metrics.batches.labels(outcome="failed")._value.get() == failed_before:
            assert time.monotonic() < deadline, "the modeler never noticed the outage"
            time.sleep(0.2)
        time.sleep(2.0)  # a few retries with backoff, while Kafka stays away
        assert worker.is_alive() and not errors, errors  # no crash, it waits
        proxy.restore()
        producer = make_producer(bootstrap)
        send_rows(producer, topic, second)
        producer.flush()
        producer.close()
        worker.join(240)
        assert not worker.is_alive() and not errors, errors
        assert_complete_once(client, redis_prefix, rows)  # each rating counted exactly once
        service.publisher.release_lease(service.token)
    finally:
        proxy.cut()
        broker.stop()
