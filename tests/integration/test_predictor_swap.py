"""Model swaps, Redis outages and the real ``python -m predictor`` process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from common.keys import Keys
from common.snapshot import Meta, collect_garbage, write_segment
from devstack.services import free_port, start_redis, stop_process_group
from predictor.app import create_app
from tests.support.planted import (
    N_USERS,
    RANK,
    Planted,
    plant,
    publish,
    settings_for,
    wait_for,
    wait_version,
)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def scaled(p: Planted, k: float) -> Planted:
    """Version-k model: every factor times k, biases zero, so r̂ = mu + k²·U·P. Mixing the
    user of version j with items of version k gives mu + j·k·U·P: detectably different."""
    return Planted(items=p.items, users=p.users, item_bias=np.zeros_like(p.item_bias),
                   item_factors=(p.item_factors * k).astype(np.float32),
                   user_bias=np.zeros_like(p.user_bias),
                   user_factors=(p.user_factors * k).astype(np.float32), rated=p.rated)


def test_reader_during_swaps_sees_one_version(redis_url, redis_client, keys) -> None:
    base = plant(seed=11)
    publish(redis_client, keys, scaled(base, 1.0), 1)
    stop = threading.Event()
    published = []

    def writer() -> None:
        v = 1
        while not stop.is_set() and v < 40:
            v += 1
            publish(redis_client, keys, scaled(base, 1.0 + 0.25 * v), v, rated=False)
            published.append(v)
            # Aggressive GC: requests holding an old version must retry, never mix.
            collect_garbage(redis_client, keys, keep=2, min_age_s=0.0)
            time.sleep(0.03)

    settings = settings_for(redis_url, keys, PREDICTOR_USER_CACHE_SIZE=0)
    with TestClient(create_app(settings)) as api:
        wait_version(api, 1)
        t = threading.Thread(target=writer)
        t.start()
        seen: set[int] = set()
        checked = 0
        try:
            deadline = time.monotonic() + 15
            while (t.is_alive() or checked < 50) and time.monotonic() < deadline:
                u = checked % 40
                r = api.get(f"/v1/users/u{u}/recommendations?n=3&include_rated=true")
                assert r.status_code == 200, r.text
                body = r.json()
                v = body["version"]
                k = 1.0 if v == 1 else 1.0 + 0.25 * v
                model = scaled(base, k)
                raw = model.raw(u)
                for x in body["items"]:
                    assert x["score"] == pytest.approx(float(raw[base.items.index(x["item"])]), rel=1e-4, abs=1e-4)
                assert [x["item"] for x in body["items"]] == model.top(u, 3, include_rated=True)
                seen.add(v)
                checked += 1
        finally:
            stop.set()
            t.join()
        assert len(seen) >= 3, seen
        text = api.get("/metrics").text
        assert "predictor_model_swaps_total" in text


def test_delta_segment_applied_incrementally(redis_url, redis_client, keys) -> None:
    p = plant(seed=5)
    publish(redis_client, keys, p, 1)
    with TestClient(create_app(settings_for(redis_url, keys))) as api:
        wait_version(api, 1)
        # Version 2 = segment 1 + delta segment 2: ten items and two users change, one item is new.
        rng = np.random.default_rng(1)
        changed = list(range(10))
        p.item_factors[changed] = rng.normal(0, 1, (10, RANK)).astype(np.float32)
        p.item_bias[changed] += 0.5
        p.user_factors[[0, 1]] *= -1
        p.items.append("brand-new")
        p.item_factors = np.vstack([p.item_factors, np.full((1, RANK), 2.0, np.float32)])
        p.item_bias = np.append(p.item_bias, np.float32(1.0))
        publish(redis_client, keys, p, 2, segments=[1, 2], items=[*changed, len(p.items) - 1],
                users=[0, 1], rated=False)
        wait_version(api, 2)
        assert 'predictor_model_swaps_total{kind="delta"} 1.0' in api.get("/metrics").text
        for u in (0, 1, 7):
            got = [x["item"] for x in api.get(f"/v1/users/u{u}/recommendations?n=10").json()["items"]]
            assert got == p.top(u, 10)
        r = api.get("/v1/predict?user=u0&item=brand-new").json()
        assert r["rating"] == pytest.approx(float(np.clip(p.raw(0)[-1], 0.5, 5)), abs=1e-4)
        assert api.get("/v1/model").json()["n_items"] == len(p.items)


def test_delta_version_keeps_the_cached_users_it_leaves_alone(redis_url, redis_client, keys) -> None:
    p = plant(seed=9)
    publish(redis_client, keys, p, 1)
    with TestClient(create_app(settings_for(redis_url, keys))) as api:
        wait_version(api, 1)
        for u in range(N_USERS):  # every user cached under version 1
            api.get(f"/v1/users/u{u}/recommendations?n=10")
        # Version 2 = segment 1 + delta 2: users 0 and 1 change (u0 also rates its new best
        # item, which must disappear from its list), so do five items; no item is added.
        p.user_factors[[0, 1]] *= -1
        changed = [3, 4, 5, 6, 7]
        p.item_factors[changed] = np.random.default_rng(2).normal(0, 1, (5, RANK)).astype(np.float32)
        p.rated["u0"][p.top(0, 1)[0]] = 5.0
        publish(redis_client, keys, p, 2, segments=[1, 2], items=changed, users=[0, 1])
        wait_version(api, 2)
        assert set(api.app.state.svc.watcher.model.user_cache) == {f"u{u}" for u in range(2, N_USERS)}
        for u in range(N_USERS):
            got = [x["item"] for x in api.get(f"/v1/users/u{u}/recommendations?n=10").json()["items"]]
            assert got == p.top(u, 10), u
        # Version 3 adds an item: cached rated rows could miss it, so nothing is carried.
        p.items.append("late")
        p.item_factors = np.vstack([p.item_factors, np.full((1, RANK), 1.5, np.float32)])
        p.item_bias = np.append(p.item_bias, np.float32(0.5))
        publish(redis_client, keys, p, 3, segments=[1, 2, 3], items=[len(p.items) - 1], users=[])
        wait_version(api, 3)
        assert api.app.state.svc.watcher.model.user_cache == {}
        for u in range(N_USERS):
            got = [x["item"] for x in api.get(f"/v1/users/u{u}/recommendations?n=10").json()["items"]]
            assert got == p.top(u, 10), u


def test_polling_finds_a_version_without_announcement(redis_url, redis_client, keys) -> None:
    p = plant(seed=2)
    publish(redis_client, keys, p, 1)
    with TestClient(create_app(settings_for(redis_url, keys))) as api:
        wait_version(api, 1)
        # Flip the pointer the way publish_version does, minus the PUBLISH: a lost message.
        write_segment(redis_client, keys, 2, "items", p.items, p.item_bias, p.item_factors)
        meta = Meta(version=2, rank=RANK, mu=3.0, reg_param=0.1, n_users=40, n_items=len(p.items),
                    ratings_seen=5, created=time.time(), segments=(1, 2))
        pipe = redis_client.pipeline(transaction=True)
        pipe.hset(keys.meta(2), mapping=meta.to_redis())
        pipe.zadd(keys.versions, {"2": meta.created})
        pipe.set(keys.current, json.dumps({"version": 2, "segments": [1, 2]}))
        pipe.execute()
        wait_version(api, 2)
        assert api.get("/v1/model").json()["mu"] == 3.0


def test_redis_outage_503_then_recovers_without_restart(tmp_path) -> None:
    import redis as redis_lib

    port = free_port()
    server = start_redis(port=port, workdir=tmp_path / "r")
    keys = Keys("outage")
    p = plant(seed=9)
    client = redis_lib.Redis.from_url(server.url)
    try:
        publish(client, keys, p, 1)
        settings = settings_for(server.url, keys, PREDICTOR_REDIS_TIMEOUT_S=0.5)
        with TestClient(create_app(settings)) as api:
            wait_version(api, 1)
            assert api.get("/v1/users/u1/recommendations").status_code == 200
            server.stop()
            r = api.get("/v1/users/u2/recommendations")
            assert r.status_code == 503
            assert r.json()["error"] == "redis_unavailable"
            ready = api.get("/readyz")
            assert ready.status_code == 503 and "redis" in json.dumps(ready.json())
            server = start_redis(port=port, workdir=tmp_path / "r2")
            client = redis_lib.Redis.from_url(server.url)
            # The restarted server is empty; a restarted modeler counts versions from 1 again,
            # with other factors: same version number, new content, which must be picked up.
            fresh = plant(seed=10)
            publish(client, keys, fresh, 1)
            wait_for(lambda: api.get("/readyz").status_code == 200, timeout=15)

            def serves_fresh() -> bool:
                r = api.get("/v1/users/u2/recommendations?n=5")
                assert r.status_code == 200 and r.json()["strategy"] == "model"
                return [x["item"] for x in r.json()["items"]] == fresh.top(2, 5)

            assert fresh.top(2, 5) != p.top(2, 5)
            wait_for(serves_fresh, timeout=15)
    finally:
        client.close()
        server.stop()


@pytest.mark.timeout(90)
def test_python_m_predictor_with_two_workers(redis_url, redis_client, keys, tmp_path) -> None:
    p = plant(seed=4)
    publish(redis_client, keys, p, 1)
    port = free_port()
    env = {**os.environ, "REDIS_URL": redis_url, "REDIS_PREFIX": keys.prefix,
           "PREDICTOR_HOST": "127.0.0.1", "PREDICTOR_PORT": str(port), "PREDICTOR_WORKERS": "2",
           "PREDICTOR_MODEL_POLL_INTERVAL_S": "0.5", "LOG_LEVEL": "WARNING",
           "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-m", "predictor"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        def ready() -> bool:
            try:
                return httpx.get(f"{url}/readyz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ready, timeout=40, step=0.2)
        body = httpx.get(f"{url}/v1/users/u3/recommendations?n=5").json()
        assert body["version"] == 1 and [x["item"] for x in body["items"]] == p.top(3, 5)
        publish(redis_client, keys, scaled(p, 2.0), 2, rated=False)

        def all_on_v2() -> bool:
            # Many requests spread over both workers: every one must answer from version 2.
            # (a fresh connection each time, so the kernel spreads them over the workers)
            versions = {httpx.get(f"{url}/v1/popular?n=1", timeout=2).json()["version"]
                        for _ in range(20)}
            return versions == {2}

        wait_for(all_on_v2, timeout=20, step=0.2)
        # /metrics adds up every worker (PROMETHEUS_MULTIPROC_DIR): the request count is the
        # total whichever worker answered; which worker gets a connection is the kernel's call.
        for _ in range(30):
            assert httpx.get(f"{url}/v1/model", timeout=2).json()["version"] == 2
        metrics = httpx.get(f"{url}/metrics").text
        assert 'predictor_requests_total{method="GET",route="/v1/model",status="200"} 30.0' in metrics
        assert "predictor_model_version 2.0" in metrics
    finally:
        stop_process_group(proc)
