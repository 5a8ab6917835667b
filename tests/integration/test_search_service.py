"""The online search run by the modeler service (``MODEL_CANDIDATES``) on the real broker,
Redis and the shared SparkSession: the served version is the leader's, a leader switch is one
atomic version (to a plain reader and to the predictor), and every live candidate's factors
and score survive a restore."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
import redis

from modeler.replay import make_producer, send_rows
from modeler.search_service import SearchModel
from modeler.service import ModelerService
from tests.integration.test_modeler_service import ml_rows, plain_predict, plain_snapshot, settings_for
from tests.support.versions import serve

pytestmark = pytest.mark.spark

# c0 (rank 2, biases crushed by λ_b 50: prequential RMSE ~2.4 on these ratings) leads at
# first and is beaten by c1 (rank 5, ~1.0).
CANDIDATES = [{"rank": 2, "reg_bias": 50.0}, {"rank": 5, "reg_param": 0.1}]
RANKS = {"c0": 2, "c1": 5}


def _settings(bootstrap, topic, redis_url, prefix, **extra):
    env = {"MODEL_CANDIDATES": json.dumps(CANDIDATES), "BATCH_MAX_RECORDS": 300, "MODEL_SEARCH_MIN_EVENTS": 300,
           "MODEL_SEARCH_PATIENCE": 1, "MODEL_SEARCH_SWITCH_MARGIN": 0.0, "MODEL_SEARCH_BUDGET": 10**9,
           "MODEL_SEARCH_RESPAWN": False, "KEEP_VERSIONS": 100}
    return settings_for(bootstrap, topic, redis_url, prefix, **{**env, **extra})


def _read_version(client: redis.Redis, prefix: str) -> dict | None:
    """One whole read of the visible version with the documented layout; ``None`` when it
    was garbage-collected meanwhile. Records whose length is not the meta's rank count as
    a mix."""
    raw = client.get(f"{prefix}:current")
    if raw is None:
        return None
    pointer = json.loads(raw)
    meta = {k.decode(): v.decode() for k, v in client.hgetall(f"{prefix}:ver:{pointer['version']}").items()}
    if not meta:
        return None
    rank = int(meta["rank"])
    bad = 0
    n = 0
    for kind in ("users", "items"):
        for seg in pointer["segments"]:
            for v in client.hgetall(f"{prefix}:seg:{seg}:{kind}").values():
                n += 1
                bad += len(v) != 4 * (rank + 1)
    if not client.exists(f"{prefix}:ver:{pointer['version']}"):
        return None
    served = [c["id"] for c in json.loads(meta["candidates"]) if c["served"]]
    return {"version": pointer["version"], "rank": rank, "served": served, "records": n, "mixed": bad}


def test_a_leader_switch_is_one_atomic_version(spark, bootstrap, topic, redis_url, redis_prefix, keys, ml_small):
    rows = ml_rows(ml_small, 1800)
    settings = _settings(bootstrap, topic, redis_url, redis_prefix, MODEL_RANKING=False)
    producer = make_producer(bootstrap)
    send_rows(producer, topic, rows)
    producer.close()

    client = redis.Redis.from_url(redis_url)
    reads: list[dict] = []
    answers: list[dict] = []
    done = threading.Event()

    def reader() -> None:
        with serve(redis_url, keys) as api:
            while not done.is_set():
                got = _read_version(client, redis_prefix)
                if got is not None:
                    reads.append(got)
                resp = api.get("/v1/model", params={"history": 0})
                if resp.status_code == 200:
                    answers.append(resp.json())
                time.sleep(0.05)

    worker = threading.Thread(target=reader, daemon=True)
    worker.start()
    service = ModelerService(settings, spark=spark)
    try:
        service.run(until=lambda svc: svc.model is not None and svc.model.ratings_seen >= len(rows))
    finally:
        done.set()
        worker.join(30)
    assert isinstance(service.model, SearchModel)

    # The switch: recorded in the metrics of its version, with its reason.
    entries = [json.loads(e) for e in client.lrange(f"{redis_prefix}:metrics", 0, -1)][::-1]
    switches = [e for e in entries if e["search"]["switch"] is not None]
    assert [e["search"]["switch"]["to"] for e in switches][:1] == ["c1"], entries[-1]["search"]
    first = switches[0]
    v = first["version"]
    assert "c1 rmse" in first["search"]["switch"]["reason"] and "vs leader c0" in first["search"]["switch"]["reason"]
    before = {k.decode(): x.decode() for k, x in client.hgetall(f"{redis_prefix}:ver:{v - 1}").items()}
    after = {k.decode(): x.decode() for k, x in client.hgetall(f"{redis_prefix}:ver:{v}").items()}
    assert int(before["rank"]) == 2 and int(after["rank"]) == 5
    # A full segment of the new leader: the chain starts again, nothing of c0 is in it.
    assert json.loads(after["segments"]) == [v]
    served_after = [c for c in json.loads(after["candidates"]) if c["served"]]
    assert [c["id"] for c in served_after] == ["c1"]
    assert json.loads(after["metrics"])["search"]["switch"]["to"] == "c1"

    # No reader ever saw a mix: every whole read had records of its meta's rank only, and
    # the served candidate's rank; both leaders were seen.
    assert len(reads) > 5
    assert all(r["mixed"] == 0 for r in reads), [r for r in reads if r["mixed"]][:3]
    assert all(RANKS[r["served"][0]] == r["rank"] for r in reads)
    assert {r["served"][0] for r in reads} == {"c0", "c1"}, {r["version"] for r in reads}
    # ...and the predictor answered one version at a time: its rank and its leader together.
    assert answers
    for a in answers:
        served = [c for c in a["candidates"] if c["served"]]
        assert len(served) == 1 and RANKS[served[0]["id"]] == a["rank"], a
        assert a["metrics"]["version"] == a["version"]
    assert {next(c["id"] for c in a["candidates"] if c["served"]) for a in answers} >= {"c1"}

    # The served factors are the leader's own, and every rating counted once.
    snap = plain_snapshot(client, redis_prefix)
    assert int(snap["meta"]["ratings_seen"]) == len(rows)
    assert sum(json.loads(snap["meta"]["offsets"]).values()) == len(rows)
    pairs = [(r[0], r[1]) for r in rows[-60:]]
    want = service.model.sbs.predict("c1", pairs)
    got = [plain_predict(snap, u, i) for u, i in pairs]
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_a_restore_keeps_every_candidate_its_score_and_factors(spark, bootstrap, topic, redis_url, redis_prefix,
                                                                ml_small):
    rows = ml_rows(ml_small, 1500)
    # Ranking model on (small), so its rows are restored too; c2 is respawn-free extra.
    cands = [*CANDIDATES, {"rank": 3, "reg_param": 0.5}]
    settings = _settings(bootstrap, topic, redis_url, redis_prefix, MODEL_RANKING_RANK=4,
                         MODEL_CANDIDATES=json.dumps(cands))
    producer = make_producer(bootstrap)
    send_rows(producer, topic, rows[:900])
    producer.flush()
    first = ModelerService(settings, spark=spark)
    first.run(until=lambda svc: svc.model is not None and svc.model.ratings_seen >= 900)
    assert isinstance(first.model, SearchModel)
    summary = first.model.summary()
    pairs = [(r[0], r[1]) for r in rows[:900:15]]
    before = {cid: first.model.sbs.predict(cid, pairs) for cid in ("c0", "c1", "c2")}

    second = ModelerService(settings, spark=spark)
    second._start()
    m = second.model
    assert isinstance(m, SearchModel)
    assert m.summary() == summary  # same candidates, scores, histories and leader
    assert m.ratings_seen == 900 and second.version == first.version
    for cid, want in before.items():
        np.testing.assert_allclose(m.sbs.predict(cid, pairs), want, atol=1e-5)
    # The ranking model's rows came back too (each candidate has its own).
    users = [r[0] for r in rows[:900] if r[2] >= 4.0][:5]
    for cid in ("c0", "c2"):
        assert first.model.sbs.recommend(cid, users[0], 5) and m.sbs.recommend(cid, users[0], 5)

    # ...and it goes on: the rest of the stream, every rating once, the same candidates.
    send_rows(producer, topic, rows[900:])
    producer.close()
    second.run(until=lambda svc: svc.model.ratings_seen >= len(rows))
    snap = plain_snapshot(redis.Redis.from_url(redis_url), redis_prefix)
    assert int(snap["meta"]["ratings_seen"]) == len(rows)
    after = {c["id"]: c for c in json.loads(snap["meta"]["candidates"])}
    for c in summary:
        assert after[c["id"]]["events"] > c["events"]
        assert after[c["id"]]["history"][: len(c["history"]) - 1] == c["history"][:-1]
