"""The online search run by the modeler service (``MODEL_CANDIDATES``) on the real broker,
Redis and the shared SparkSession: the served version is the leader's, a leader switch is one
atomic version (to a plain reader and to the predictor), and every live candidate's factors
and score survive a restore."""

from __future__ import annotations

import json
import os
import threading
import time

import numpy as np
import pytest
import redis

from modeler.replay import make_producer, send_rows
from modeler.search_service import SearchModel
from modeler.service import ModelerService
from tests.support.modeler import (
    kill_9,
    ml_rows,
    plain_predict,
    plain_snapshot,
    published,
    reaped,
    settings_for,
    start_modeler,
    wait_for,
)
from tests.support.versions import serve

pytestmark = pytest.mark.spark

# c0 (rank 2, biases crushed by λ_b 50: prequential RMSE ~2.4 on these ratings) leads at
# first and is beaten by c1 (rank 5, ~1.0).
CANDIDATES = [{"rank": 2, "reg_bias": 50.0}, {"rank": 5, "reg_param": 0.1}]
RANKS = {"c0": 2, "c1": 5}


def _settings(bootstrap, topic, redis_url, prefix, **extra):
    env = {"MODEL_CANDIDATES": json.dumps(CANDIDATES), "MODELER_BATCH_MAX_RECORDS": 300, "MODEL_SEARCH_MIN_EVENTS": 300,
           "MODEL_SEARCH_PATIENCE": 1, "MODEL_SEARCH_SWITCH_MARGIN": 0.0, "MODEL_SEARCH_BUDGET": 10**9,
           "MODEL_SEARCH_RESPAWN": False, "MODELER_KEEP_VERSIONS": 100}
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


def _stored_predict(client: redis.Redis, prefix: str, version: int, cid: str, rank: int, pairs) -> list[float]:
    """Candidate ``cid``'s predictions from its rows in the version's search hashes
    (``common.keys``), with nothing but redis and numpy: μ + b_u + b_i + p_u·q_i, clipped."""
    meta = {k.decode(): v.decode() for k, v in client.hgetall(f"{prefix}:ver:{version}").items()}
    mu = json.loads(meta["search_state"])["models"][cid]["mu"]
    rows: dict[str, dict[str, np.ndarray]] = {"users": {}, "items": {}}
    for seg in json.loads(meta["segments"]):
        for kind in rows:
            for f, v in client.hgetall(f"{prefix}:seg:{seg}:search:{kind}").items():
                owner, _, key = f.decode().partition(":")
                if owner == cid:
                    rows[kind][key] = np.frombuffer(v, "<f4").astype(np.float64)
    zero = np.zeros(rank + 1)
    out = []
    for u, i in pairs:
        a, b = rows["users"].get(u, zero), rows["items"].get(i, zero)
        assert len(a) == rank + 1 and len(b) == rank + 1
        out.append(float(np.clip(mu + a[0] + b[0] + float(a[1:] @ b[1:]), 0.5, 5.0)))
    return out


def test_kill_9_then_every_candidate_resumes_with_its_score_and_factors(
        spark, bootstrap, topic, redis_url, redis_prefix, ml_small, tmp_path):
    rows = ml_rows(ml_small, 1500)
    # The ranking model on (small), so its rows are restored too.
    cands = [*CANDIDATES, {"rank": 3, "reg_param": 0.5}]
    settings = _settings(bootstrap, topic, redis_url, redis_prefix, MODEL_RANKING_RANK=4,
                         MODEL_CANDIDATES=json.dumps(cands))
    producer = make_producer(bootstrap)
    send_rows(producer, topic, rows)
    producer.close()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MODEL_", "KAFKA_", "REDIS_"))}
    env.update({alias: str(getattr(settings, name)) for name, alias in (
        ("kafka_bootstrap_servers", "KAFKA_BOOTSTRAP_SERVERS"), ("ratings_topic", "RATINGS_TOPIC"),
        ("dlq_topic", "DLQ_TOPIC"), ("redis_url", "REDIS_URL"), ("redis_prefix", "REDIS_PREFIX"),
        ("model_rank", "MODEL_RANK"), ("model_num_partitions", "MODEL_NUM_PARTITIONS"),
        ("model_ranking_rank", "MODEL_RANKING_RANK"), ("batch_max_records", "MODELER_BATCH_MAX_RECORDS"),
        ("model_search_min_events", "MODEL_SEARCH_MIN_EVENTS"), ("model_search_patience", "MODEL_SEARCH_PATIENCE"),
        ("model_search_switch_margin", "MODEL_SEARCH_SWITCH_MARGIN"), ("model_search_budget", "MODEL_SEARCH_BUDGET"),
        ("keep_versions", "MODELER_KEEP_VERSIONS"))})
    env.update({"MODEL_CANDIDATES": settings.model_candidates or "", "MODEL_SEARCH_RESPAWN": "false",
                "SPARK_MASTER": "local[2]", "MODELER_BATCH_MAX_INTERVAL_S": "0.2", "MODELER_LEASE_TTL_S": "2",
                "MODELER_RETRY_MAX_BACKOFF_S": "1", "MODELER_METRICS_PORT": "0", "LOG_FORMAT": "text",
                "SPARK_DRIVER_MEMORY": "1g"})
    client = redis.Redis.from_url(redis_url)
    log_path = tmp_path / "modeler.log"
    with reaped(start_modeler(env, log_path)) as proc:
        wait_for(lambda: published(client, redis_prefix)[0] >= 2, 240, proc, log_path, "two versions")
        kill_9(proc)
    version, seen = published(client, redis_prefix)
    assert 0 < seen < len(rows), f"the kill was not mid-stream: {seen}"
    meta = {k.decode(): v.decode() for k, v in client.hgetall(f"{redis_prefix}:ver:{version}").items()}
    summary = json.loads(meta["candidates"])
    assert [c["id"] for c in summary] == ["c0", "c1", "c2"] and all(c["events"] > 0 for c in summary[1:])

    service = ModelerService(settings, spark=spark)
    service._start()
    m = service.model
    assert isinstance(m, SearchModel) and service.version == version
    # The same candidates, scores, histories and leader as the version the kill left...
    assert json.loads(json.dumps(m.summary())) == summary
    # ...with the factors stored for each of them.
    pairs = [(r[0], r[1]) for r in rows[:seen:20]]
    for cid, rank in (("c0", 2), ("c1", 5), ("c2", 3)):
        np.testing.assert_allclose(m.sbs.predict(cid, pairs),
                                   _stored_predict(client, redis_prefix, version, cid, rank, pairs), atol=1e-5)
    liked = next(r[0] for r in rows[:seen] if r[2] >= 4.0)
    assert all(m.sbs.recommend(cid, liked, 5) for cid in ("c0", "c1", "c2"))  # ranking rows too

    # ...and it goes on: the rest of the stream, every rating once, the same candidates.
    service.run(until=lambda svc: svc.model.ratings_seen >= len(rows))
    snap = plain_snapshot(client, redis_prefix)
    assert int(snap["meta"]["ratings_seen"]) == len(rows)
    assert sum(json.loads(snap["meta"]["offsets"]).values()) == len(rows)
    after = {c["id"]: c for c in json.loads(snap["meta"]["candidates"])}
    for c in summary:
        assert after[c["id"]]["events"] > c["events"]
        assert after[c["id"]]["history"][: len(c["history"])] == c["history"]


def test_search_rows_live_and_die_with_their_segment(redis_client, redis_url, keys) -> None:
    """The search hashes of a segment are written by ``write_partition``, read back by the
    restore (newest segment wins), cleared with an unpublished attempt and collected with
    their segment."""
    import time as _time

    from common.snapshot import Meta, Pointer
    from modeler.io import publish as pub

    publisher = pub.Publisher(redis_url, keys.prefix, keep_versions=2)
    vec = np.arange(6, dtype=np.float32).reshape(2, 3)
    for v in (1, 2, 3):
        chunks = [pub.FactorChunk(pub.ITEM, ["i1"], np.zeros(1), vec[:1, :2], np.ones(1)),
                  pub.SearchChunk(pub.SEARCH, "c0", "items", ["i1", "i:2"], np.full(2, float(v)), vec, [v, 2 * v])]
        assert next(pub.write_partition(chunks, redis_url, keys.prefix, v))[0] == 1
        meta = Meta(version=v, rank=2, mu=3.0, reg_param=0.1, n_users=0, n_items=1, ratings_seen=v,
                    created=_time.time() - 60, segments=tuple(range(1, v + 1)))
        publisher.publish(meta, {"version": v}, [], search_state={"format": 1, "v": v})
    got = publisher.restore_search(Pointer(3, (1, 2, 3)))
    assert got is not None and got.state == {"format": 1, "v": 3}
    ids, records, counts = got.rows["c0"]["items"]
    assert ids == ["i1", "i:2"] and counts == [3, 6]  # an id with ':' survives the field name
    assert np.frombuffer(records[1], "<f4").tolist() == [3.0, 3.0, 4.0, 5.0]  # newest wins
    # An unpublished attempt's leftovers are cleared...
    pub.write_partition([pub.SearchChunk(pub.SEARCH, "c9", "users", ["u"], np.zeros(1), vec[:1], [1])],
                        redis_url, keys.prefix, 4).__next__()
    assert publisher.segment_exists(4)
    publisher.clear_segment(4)
    assert not publisher.segment_exists(4) and not redis_client.exists(keys.search_counts(4, "users"))
    # ...and a segment no live version references goes with its search hashes.
    for v in (4, 5):
        pub.write_partition([pub.SearchChunk(pub.SEARCH, "c0", "items", ["i1"], np.zeros(1), vec[:1], [1])],
                            redis_url, keys.prefix, v).__next__()
        publisher.publish(Meta(version=v, rank=2, mu=3.0, reg_param=0.1, n_users=0, n_items=1, ratings_seen=v,
                               created=_time.time() - 60, segments=(v,)), {"version": v}, [])
    publisher.collect_garbage(min_age_s=0.0)
    assert not redis_client.exists(keys.search(1, "items"), keys.search_counts(3, "items"))
    assert redis_client.exists(keys.search(4, "items")) and redis_client.exists(keys.search(5, "items"))


def test_a_ranking_search_serves_its_leader_ranking_set(spark, bootstrap, topic, redis_url, redis_prefix, ml_small):
    """Candidates of the ranking model only: judged on prequential NDCG@10, the version
    carries the leader's ranking rank and α with both factor sets."""
    rows = ml_rows(ml_small, 900)
    cands = [{"ranking_rank": 3, "ranking_alpha": 1.0}, {"ranking_rank": 6, "ranking_alpha": 8.0}]
    settings = _settings(bootstrap, topic, redis_url, redis_prefix, MODEL_CANDIDATES=json.dumps(cands),
                         MODEL_SEARCH_MIN_USER_POSITIVES=1, MODEL_SEARCH_MIN_EVENTS=1)
    producer = make_producer(bootstrap)
    send_rows(producer, topic, rows)
    producer.close()
    service = ModelerService(settings, spark=spark)
    service.run(until=lambda svc: svc.model is not None and svc.model.ratings_seen >= len(rows))
    model = service.model
    assert isinstance(model, SearchModel) and model.search.metric.name == "ndcg@10"
    client = redis.Redis.from_url(redis_url)
    version = json.loads(client.get(f"{redis_prefix}:current"))["version"]
    meta = {k.decode(): v.decode() for k, v in client.hgetall(f"{redis_prefix}:ver:{version}").items()}
    cs = json.loads(meta["candidates"])
    assert {c["metric"] for c in cs} == {"ndcg@10"} and all(c["events"] > 0 for c in cs)
    leader = next(c for c in cs if c["served"])
    assert json.loads(meta["models"]) == ["explicit", "ranking"]
    assert int(meta["ranking_rank"]) == leader["params"]["ranking_rank"]
    assert float(meta["ranking_alpha"]) == leader["params"]["ranking_alpha"]
    # The served ranking vectors are the leader's rank.
    seg = json.loads(meta["segments"])[-1]
    rec = next(iter(client.hgetall(f"{redis_prefix}:seg:{seg}:ranking:items").values()))
    assert len(rec) == 4 * (int(meta["ranking_rank"]) + 1)
