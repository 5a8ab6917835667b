"""The ranking model through the modeler service: implicit events on the stream, the
second factor set in the version, bad weights in the DLQ (real broker, Redis, Spark)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import redis

from modeler.replay import make_producer
from modeler.service import ModelerService, new_model
from tests.support.modeler import ml_rows, plain_ranking, plain_snapshot, run_until_seen, settings_for
from tests.support.topics import read_records

pytestmark = pytest.mark.spark


def _event(user: str, item: str, weight: object, ts: int, kind: str = "play") -> bytes:
    return json.dumps({"user": user, "item": item, "type": kind, "weight": weight, "timestamp": ts}).encode()


def test_an_implicit_stream_publishes_a_ranking_only_version_and_bad_weights_go_to_the_dlq(
    spark, bootstrap, topic, redis_url, redis_prefix, ml_small
):
    plays = [(u, i, float(1 + int(r * 2)), t) for u, i, r, t in ml_rows(ml_small, 1200)]
    poison = [_event("1", "2", -1, 5), _event("1", "2", 1e9, 5), _event("1", "2", "lots", 5),
              b'{"user": "1", "item": "2", "type": "play", "weight": 3, "rating": 4}']
    producer = make_producer(bootstrap)
    for k, (u, i, w, t) in enumerate(plays):
        producer.send(topic, key=u.encode(), value=_event(u, i, w, t))
        if k % 100 == 0:
            producer.send(topic, key=u.encode(), value=poison[(k // 100) % len(poison)])
    producer.flush()
    producer.close()
    n_poison = (len(plays) - 1) // 100 + 1
    settings = settings_for(bootstrap, topic, redis_url, redis_prefix, MODELER_BATCH_MAX_RECORDS=100_000,
                            MODEL_NUM_PARTITIONS=1, EVENT_MAX_WEIGHT=1000)
    service = ModelerService(settings, spark=spark)
    run_until_seen(service, len(plays), counter="events_seen")
    client = redis.Redis.from_url(redis_url)
    pointer = json.loads(client.get(f"{redis_prefix}:current"))
    meta = {k.decode(): v.decode() for k, v in client.hgetall(f"{redis_prefix}:ver:{pointer['version']}").items()}
    assert json.loads(meta["models"]) == ["ranking"]
    assert int(meta["ratings_seen"]) == 0 and int(meta["ranking_rank"]) == service.model.params.ranking_rank
    assert json.loads(meta["ranking_weighting"])["implicit"] == "log"
    assert float(meta["ranking_alpha"]) == service.model.params.ranking_alpha
    metrics = json.loads(meta["metrics"])
    assert metrics["dlq_total"] == n_poison and metrics["batch_implicit"] == len(plays)
    assert metrics["ranking_probes_total"] >= 0
    # No explicit factor set; the ranking set holds every user and item of the plays.
    assert all(not client.exists(f"{redis_prefix}:seg:{s}:users") for s in pointer["segments"])
    users, items = plain_ranking(client, redis_prefix)
    assert set(users) == {p[0] for p in plays} and set(items) == {p[1] for p in plays}
    # Top-N excludes what a user played; the value is not a number (it is not a rating) but
    # "implicit:<w>", w the event's confidence weight (log1p of the play count), for fold-in.
    u0 = plays[0][0]
    rated = {k.decode(): v.decode() for k, v in client.hgetall(f"{redis_prefix}:rated:{u0}").items()}
    assert set(rated) == {p[1] for p in plays if p[0] == u0}
    first_weight = {}
    for u, i, w, _ in plays:
        if u == u0:
            first_weight.setdefault(i, w)
    for item, value in rated.items():
        kind, _, w = value.partition(":")
        assert kind == "implicit" and float(w) == pytest.approx(math.log1p(first_weight[item]))
    # Popular comes from the ranking model's counts when there are no ratings.
    assert json.loads(meta["popular"])

    # The same floats as the model trained directly (three partitions: the four-stage plan).
    reference = new_model(settings.model_copy(update={"model_num_partitions": 3}))
    reference.train(spark.sparkContext.parallelize([(u, i, None, t, w) for u, i, w, t in plays], 3))
    ref_items = dict(reference.ranking_item_factors.collect())
    for key, vec in items.items():
        np.testing.assert_allclose(vec, ref_items[key], atol=1e-5)

    letters = read_records(bootstrap, f"{topic}.dlq", n_poison)
    reasons = {dict(rec.headers)["reason"].decode().split(":")[0] for rec in letters}
    assert len(letters) == n_poison and reasons == {"weight", "rating"}


def test_ratings_and_plays_publish_both_sets_and_a_restart_restores_the_ranking_model(
    spark, bootstrap, topic, redis_url, redis_prefix, ml_small
):
    rows = ml_rows(ml_small, 1600)
    producer = make_producer(bootstrap)
    for k, (u, i, r, t) in enumerate(rows):
        value = _event(u, i, 3, t) if k % 4 == 0 else json.dumps(
            {"user": u, "item": i, "rating": r, "timestamp": t}).encode()
        producer.send(topic, key=u.encode(), value=value)
    producer.flush()
    producer.close()
    n_ratings = sum(1 for k in range(len(rows)) if k % 4)
    settings = settings_for(bootstrap, topic, redis_url, redis_prefix, MODELER_BATCH_MAX_RECORDS=400)
    first = ModelerService(settings, spark=spark)
    run_until_seen(first, 800, counter="events_seen")
    first.publisher.release_lease(first.token)
    # A second modeler restores from Redis (the ranking set too) and finishes the topic.
    second = ModelerService(settings, spark=spark)
    run_until_seen(second, n_ratings)
    client = redis.Redis.from_url(redis_url)
    snap = plain_snapshot(client, redis_prefix)
    meta = snap["meta"]
    assert json.loads(meta["models"]) == ["explicit", "ranking"]
    assert int(meta["ratings_seen"]) == n_ratings
    liked_or_played = [r for k, r in enumerate(rows) if k % 4 == 0 or r[2] >= 4.0]
    state = json.loads(client.hget(f"{redis_prefix}:ver:{meta['version']}", "model_state"))
    assert state["positives_seen"] == len(liked_or_played)  # each once across the restart
    users, items = plain_ranking(client, redis_prefix)
    assert set(users) == {r[0] for r in liked_or_played}
    # What the restored modeler holds is what Redis holds.
    held = dict(second.model.ranking_item_factors.collect())
    assert set(held) == set(items)
    for key, vec in items.items():
        np.testing.assert_allclose(vec, held[key], atol=1e-6)
    second.publisher.release_lease(second.token)
