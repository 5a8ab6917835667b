"""The online search's candidates, as the modeler publishes them in the version metadata,
through a real redis-server and the real predictor app to ``GET /v1/model``."""

from __future__ import annotations

import json

from common.snapshot import read_meta
from modeler.core.search import BatchLoss, HalvingSchedule, SearchSettings, SearchState
from tests.support.versions import plant, publish, serve, wait_version

GRID = [{"ranking_rank": r, "ranking_alpha": a} for r in (8, 32) for a in (1.0, 8.0)]


def _state() -> SearchState:
    st = SearchState(GRID, SearchSettings(metric="ndcg@10", fading=0.999, min_events=200, patience=2,
                                          respawn=False, schedule=HalvingSchedule(budget=400)))
    quality = {"c0": 0.10, "c1": 0.30, "c2": 0.20, "c3": 0.05}
    for _ in range(6):
        st.observe(100, {c.cid: BatchLoss(quality[c.cid] * 100, 100) for c in st.live()})
    return st


def test_model_info_lists_the_candidates(redis_client, keys, redis_url) -> None:
    st = _state()
    summary = st.summary()
    assert {c["state"] for c in summary} == {"live", "pruned"}  # the rung at 400 pruned some
    b = plant()
    publish(redis_client, keys, b, 1, candidates=summary)
    # The metadata round-trips (Meta.to_redis / from_redis) unchanged.
    assert read_meta(redis_client, keys, 1).candidates == json.loads(json.dumps(summary))
    with serve(redis_url, keys) as api:
        wait_version(api, 1)
        got = api.get("/v1/model").json()["candidates"]
    assert [c["id"] for c in got] == ["c0", "c1", "c2", "c3"]
    served = [c for c in got if c["served"]]
    assert len(served) == 1 and served[0]["id"] == st.leader == "c1"
    c1 = next(c for c in got if c["id"] == "c1")
    assert c1["params"] == {"ranking_alpha": 8.0, "ranking_rank": 8.0}
    assert c1["metric"] == "ndcg@10" and abs(c1["score"] - 0.30) < 1e-9 and c1["events"] == 600
    assert c1["history"][-1] == [600.0, c1["score"]]
    assert next(c for c in got if c["id"] == "c3")["state"] == "pruned"


def test_a_leader_switch_arrives_with_its_version(redis_client, keys, redis_url) -> None:
    b = plant()
    before = _state().summary()
    after = [dict(c, served=c["id"] == "c2") for c in before]
    publish(redis_client, keys, b, 1, candidates=before)
    with serve(redis_url, keys) as api:
        wait_version(api, 1)
        first = api.get("/v1/model").json()
        publish(redis_client, keys, b, 2, candidates=after)
        wait_version(api, 2)
        second = api.get("/v1/model").json()
    # Each answer is one version's: its number and its leader together.
    assert first["version"] == 1 and [c["id"] for c in first["candidates"] if c["served"]] == ["c1"]
    assert second["version"] == 2 and [c["id"] for c in second["candidates"] if c["served"]] == ["c2"]


def test_no_search_and_malformed_entries(redis_client, keys, redis_url) -> None:
    b = plant()
    publish(redis_client, keys, b, 1)
    with serve(redis_url, keys) as api:
        wait_version(api, 1)
        assert api.get("/v1/model").json()["candidates"] == []
        good = _state().summary()[0]
        bad = {"id": "c9", "params": {"rank": "ten"}, "state": "maybe"}
        publish(redis_client, keys, b, 2, candidates=[bad, good])
        wait_version(api, 2)
        resp = api.get("/v1/model")
    assert resp.status_code == 200
    assert [c["id"] for c in resp.json()["candidates"]] == ["c0"]
