"""``python -m modeler`` as a real process: ``kill -9`` twice mid-stream, restart, SIGTERM.

Each rating must count exactly once in the final published model, and the model must be
as accurate on a held-out split as one trained without interruptions.
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import redis

from modeler.replay import encode, make_producer
from tests.support.modeler import (
    kill_9,
    ml_rows,
    plain_predict,
    plain_ranking,
    plain_snapshot,
    published,
    reaped,
    settings_for,
    start_modeler,
    wait_for,
)

pytestmark = pytest.mark.spark

ROOT = Path(__file__).resolve().parents[2]


def held_out(row: tuple) -> bool:
    return zlib.crc32(f"{row[0]}/{row[1]}".encode()) % 10 == 0


def test_kill_9_twice_then_every_rating_counts_once(
    spark, bootstrap, topic, redis_url, redis_prefix, ml_small, tmp_path
):
    rows = ml_rows(ml_small, 2000)
    train = [r for r in rows if not held_out(r)]
    test = [r for r in rows if held_out(r)]
    producer = make_producer(bootstrap)
    for k, row in enumerate(train):
        producer.send(topic, key=row[0].encode(), value=encode(*row))
        if k % 400 == 0:  # a little poison too: it must not count, and not block restarts
            producer.send(topic, key=row[0].encode(), value=b'{"user": "x", "item": "y", "rating": -1}')
    producer.flush()
    producer.close()

    batch = 400
    settings = settings_for(bootstrap, topic, redis_url, redis_prefix, MODELER_BATCH_MAX_RECORDS=batch)
    env = dict(os.environ)
    env.update({
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap, "RATINGS_TOPIC": topic, "DLQ_TOPIC": f"{topic}.dlq",
        "REDIS_URL": redis_url, "REDIS_PREFIX": redis_prefix, "SPARK_MASTER": "local[2]",
        "MODEL_RANK": str(settings.model_rank), "MODEL_ITERATIONS": str(settings.model_iterations),
        "MODEL_NUM_PARTITIONS": str(settings.model_num_partitions), "MODELER_BATCH_MAX_RECORDS": str(batch),
        "MODELER_BATCH_MAX_INTERVAL_S": "0.2", "MODELER_LEASE_TTL_S": "3", "MODELER_RETRY_MAX_BACKOFF_S": "1",
        "MODELER_METRICS_PORT": "0", "LOG_FORMAT": "text", "SPARK_DRIVER_MEMORY": "1g",
    })
    client = redis.Redis.from_url(redis_url)
    log_path = tmp_path / "modeler.log"
    rng = random.Random(11)
    kills = []
    for _ in range(2):
        with reaped(start_modeler(env, log_path)) as proc:
            start_version = published(client, redis_prefix)[0]
            wait_for(lambda v=start_version: published(client, redis_prefix)[0] >= v + 1, 180, proc, log_path,
                     "a new version")
            # Somewhere inside a later batch: reading, training, writing or publishing.
            time.sleep(rng.uniform(0.0, 1.5))
            kills.append(published(client, redis_prefix))
            kill_9(proc)
    assert all(0 < seen < len(train) for _, seen in kills), f"kills were not mid-stream: {kills}"

    with reaped(start_modeler(env, log_path)) as proc:
        wait_for(lambda: published(client, redis_prefix)[1] >= len(train), 240, proc, log_path,
                 "every rating to be published")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, log_path.read_text()[-3000:]
    assert "restored version" in log_path.read_text()

    snap = plain_snapshot(client, redis_prefix)
    meta = snap["meta"]
    assert int(meta["ratings_seen"]) == len(train)
    n_poison = (len(train) - 1) // 400 + 1
    assert sum(json.loads(meta["offsets"]).values()) == len(train) + n_poison
    assert json.loads(meta["metrics"])["dlq_total"] == n_poison
    assert set(snap["users"]) == {r[0] for r in train}
    assert float(meta["mu"]) == pytest.approx(np.mean([r[2] for r in train]), abs=1e-6)

    # An uninterrupted run over the same ratings in batches of the same size.
    from modeler.service import new_model

    reference = new_model(settings)
    sc = spark.sparkContext
    for start in range(0, len(train), batch):
        reference.train(sc.parallelize(train[start : start + batch], 2))
    pairs = [(u, i, r) for u, i, r, _ in test]
    ref_pred = {(u, i): p for u, i, p in reference.predict(sc.parallelize([(u, i) for u, i, _ in pairs], 2)).collect()}
    rmse_ref = float(np.sqrt(np.mean([(ref_pred[(u, i)] - r) ** 2 for u, i, r in pairs])))
    rmse_crash = float(np.sqrt(np.mean([(plain_predict(snap, u, i) - r) ** 2 for u, i, r in pairs])))
    assert abs(rmse_crash - rmse_ref) < 0.05, (rmse_crash, rmse_ref)

    # The ranking model survived both kills too: every liked rating (>= 4 on 0.5-5, the
    # default weighting) learned exactly once, its factor set complete in the version.

    assert json.loads(meta["models"]) == ["explicit", "ranking"]
    liked = [r for r in train if r[2] >= 4.0]
    state = json.loads(client.hget(f"{redis_prefix}:ver:{meta['version']}", "model_state"))
    assert state["positives_seen"] == len(liked)
    ranking_users, ranking_items = plain_ranking(client, redis_prefix)
    assert set(ranking_users) == {r[0] for r in liked} and set(ranking_items) == {r[1] for r in liked}
