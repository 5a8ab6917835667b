"""Predictor endpoints against a real redis-server holding a planted model written through
``common.snapshot`` (the modeler's own writer), served by the real app (lifespan, watcher
thread, async Redis client)."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Iterator

import numpy as np
import pytest
from fastapi.testclient import TestClient

from predictor.app import create_app
from tests.support import planted as pl


@pytest.fixture
def planted(redis_client, keys) -> pl.Planted:
    p = pl.plant()
    pl.publish(redis_client, keys, p, 1)
    return p


@pytest.fixture
def api(redis_url, keys, planted) -> Iterator[TestClient]:
    with TestClient(create_app(pl.settings_for(redis_url, keys))) as client:
        pl.wait_version(client, 1)
        yield client


# ---------------------------------------------------------------------- ops


def test_health_ready_and_metrics(api: TestClient) -> None:
    assert api.get("/healthz").json() == {"status": "ok"}
    ready = api.get("/readyz")
    assert ready.status_code == 200 and ready.json()["version"] == 1
    assert ready.json()["worker"] == os.getpid()  # in-process here: this test's own process
    api.get("/v1/users/u1/recommendations")
    text = api.get("/metrics").text
    assert "predictor_model_version 1.0" in text
    assert 'predictor_model_swaps_total{kind="full"} 1.0' in text
    assert 'route="/v1/users/{user}/recommendations"' in text
    assert "predictor_request_seconds_bucket" in text
    assert api.get("/docs").status_code == 200
    paths = api.get("/openapi.json").json()["paths"]
    assert {"/v1/users/{user}/recommendations", "/v1/fold-in", "/predictions/ranks"} <= set(paths)


def test_readyz_503_before_anything_is_loaded(redis_url, keys) -> None:
    with TestClient(create_app(pl.settings_for(redis_url, keys))) as api:
        time.sleep(0.3)
        r = api.get("/readyz")
        assert r.status_code == 503
        assert "no model" in json.dumps(r.json())
        assert api.get("/v1/model").json()["error"] == "no_model"
        assert api.get("/v1/model").status_code == 503


def test_popular_fallback_before_any_model(redis_url, redis_client, keys) -> None:
    redis_client.set(keys.popular, json.dumps([["a", 9], ["b", 5], ["c", 2]]))
    redis_client.hset(keys.rated("visitor"), mapping={"a": "4.0"})
    with TestClient(create_app(pl.settings_for(redis_url, keys))) as api:
        pl.wait_for(lambda: api.get("/readyz").status_code == 200)
        body = api.get("/v1/users/visitor/recommendations?n=2").json()
        assert body["strategy"] == "popular" and body["version"] is None
        assert [x["item"] for x in body["items"]] == ["b", "c"]  # "a" already rated
        pop = api.get("/v1/popular?n=2").json()
        assert [x["item"] for x in pop["items"]] == ["a", "b"]
        assert pop["strategy"] == "popular"
        assert api.get("/v1/predict?user=visitor&item=a").status_code == 503
        fold = api.post("/v1/fold-in", json={"ratings": [{"item": "a", "rating": 5}]}).json()
        assert fold["strategy"] == "popular"


# ---------------------------------------------------------------------- predictions


def test_predict_one_matches_formula_and_clips(api: TestClient, planted: pl.Planted) -> None:
    for u, i in [(0, 0), (3, 17), (39, 199)]:
        body = api.get(f"/v1/predict?user=u{u}&item=m{i}").json()
        expected = float(np.clip(planted.raw(u)[i], 0.5, 5.0))
        assert body["rating"] == pytest.approx(expected, abs=1e-4)
        assert body["strategy"] == "model" and body["version"] == 1
        assert (body["user"], body["item"]) == (f"u{u}", f"m{i}")


def test_predict_clips_to_scale(redis_url, redis_client, keys) -> None:
    p = pl.plant(seed=3, scale=6.0)  # huge factors: raw predictions far outside [0.5, 5]
    pl.publish(redis_client, keys, p, 1)
    with TestClient(create_app(pl.settings_for(redis_url, keys))) as api:
        pl.wait_version(api, 1)
        pairs = [{"user": "u1", "item": f"m{i}"} for i in range(pl.N_ITEMS)]
        ratings = [x["rating"] for x in api.post("/v1/predict", json={"pairs": pairs}).json()["predictions"]]
        raw = p.raw(1)
        assert raw.max() > 5.0 and raw.min() < 0.5
        assert min(ratings) == 0.5 and max(ratings) == 5.0


def test_predict_batch_unknown_user_and_item(api: TestClient, planted: pl.Planted) -> None:
    pairs = [{"user": "u2", "item": "m5"}, {"user": "nobody", "item": "m5"}, {"user": 7, "item": "m9"}]
    body = api.post("/v1/predict", json={"pairs": pairs}).json()
    first, second, third = body["predictions"]
    assert first["rating"] == pytest.approx(float(np.clip(planted.raw(2)[5], 0.5, 5)), abs=1e-4)
    assert first["strategy"] == "model"
    # Unknown user: the non-personalised baseline mu + b_i.
    assert second["strategy"] == "popular"
    assert second["rating"] == pytest.approx(pl.MU + float(planted.item_bias[5]), abs=1e-4)
    assert third["user"] == "7"
    assert body["strategy"] == "popular" and body["version"] == 1
    r = api.get("/v1/predict?user=u1&item=nope")
    assert r.status_code == 404 and r.json()["error"] == "unknown_item" and r.json()["field"] == "item"
    r = api.post("/v1/predict", json={"pairs": [{"user": "u1", "item": "zzz"}]})
    assert r.status_code == 404 and "zzz" in r.json()["detail"]


# ---------------------------------------------------------------------- top-N


def test_recommendations_exclude_rated_items(api: TestClient, planted: pl.Planted) -> None:
    for u in (0, 5, 11):
        body = api.get(f"/v1/users/u{u}/recommendations?n=15").json()
        got = [x["item"] for x in body["items"]]
        assert body["strategy"] == "model" and body["version"] == 1 and body["user"] == f"u{u}"
        assert got == planted.top(u, 15)
        assert not set(got) & set(planted.rated[f"u{u}"])
        scores = [x["score"] for x in body["items"]]
        assert scores == sorted(scores, reverse=True)
        with_rated = api.get(f"/v1/users/u{u}/recommendations?n=15&include_rated=true").json()
        assert [x["item"] for x in with_rated["items"]] == planted.top(u, 15, include_rated=True)


def test_recommendations_n_bounds_and_candidates(api: TestClient, planted: pl.Planted) -> None:
    body = api.get("/v1/users/u0/recommendations?n=1000").json()
    assert len(body["items"]) == pl.N_ITEMS - len(planted.rated["u0"])
    cands = ["m1", "m2", "m3", "m4", "m150", "unknown-item"]
    body = api.post("/v1/users/u0/recommendations",
                    json={"n": 3, "include_rated": True, "candidates": cands}).json()
    got = [x["item"] for x in body["items"]]
    raw = planted.raw(0)
    expected = sorted(cands[:5], key=lambda i: -raw[planted.items.index(i)])[:3]
    assert got == expected and body["strategy"] == "model"


def test_plain_top_n_requests_take_the_direct_path_with_the_routes_answers(api: TestClient) -> None:
    """A plainly formed GET top-N request skips FastAPI's routing (``hot_args``); the same
    request with an extra parameter only the declared route accepts must answer identically."""
    from predictor.app import hot_args

    for user, query in [("u0", "n=15"), ("u5", "include_rated=true&n=7"), ("u3", ""),
                        ("stranger", "n=4"), ("u1", "n=1000&include_rated=0")]:
        path = f"/v1/users/{user}/recommendations"
        routed = f"{query}&via=route" if query else "via=route"
        assert hot_args(path, query.encode()) is not None
        assert hot_args(path, routed.encode()) is None
        direct, declared = api.get(f"{path}?{query}"), api.get(f"{path}?{routed}")
        assert direct.status_code == declared.status_code == 200
        assert direct.content == declared.content
        assert direct.headers["content-type"] == declared.headers["content-type"]
    for odd in (b"n=010", b"n=5&n=6", b"n=", b"include_rated=yes", b"n=10000"):
        assert hot_args("/v1/users/u0/recommendations", odd) is None
    assert hot_args("/v1/users//recommendations", b"") is None
    assert hot_args("/v1/users/a/b/recommendations", b"") is None


def test_concurrent_top_n_requests_are_batched_and_each_exact(api: TestClient, planted: pl.Planted) -> None:
    import httpx

    paths = [f"/v1/users/u{u}/recommendations?n=12" for u in range(pl.N_USERS)]
    for path in paths:  # warm the per-version user cache: every request below submits at once
        api.get(path)

    async def burst() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=api.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return list(await asyncio.gather(*(client.get(p) for p in paths)))

    responses = api.portal.call(burst)
    for u, r in enumerate(responses):
        assert [x["item"] for x in r.json()["items"]] == planted.top(u, 12)
    sizes = api.app.state.svc.metrics.batch_size.collect()[0].samples
    count_le_1 = next(s.value for s in sizes if s.name.endswith("_bucket") and s.labels["le"] == "1.0")
    total = next(s.value for s in sizes if s.name.endswith("_count"))
    assert total > count_le_1  # some matrix products answered several requests


def test_unknown_user_gets_popular(api: TestClient) -> None:
    body = api.get("/v1/users/stranger/recommendations?n=5").json()
    assert body["strategy"] == "popular" and body["version"] == 1 and len(body["items"]) == 5
    counts = [x["count"] for x in body["items"]]
    assert counts == sorted(counts, reverse=True)


def test_user_ratings(api: TestClient, planted: pl.Planted) -> None:
    body = api.get("/v1/users/u4/ratings?limit=100").json()
    assert {r["item"]: r["rating"] for r in body["ratings"]} == planted.rated["u4"]
    assert api.get("/v1/users/nobody/ratings").json()["ratings"] == []


def test_similar_items_is_cosine(api: TestClient, planted: pl.Planted) -> None:
    body = api.get("/v1/items/m10/similar?n=5").json()
    f = planted.item_factors.astype(np.float64)
    unit = f / np.linalg.norm(f, axis=1, keepdims=True)
    cos = unit @ unit[10]
    cos[10] = -np.inf
    expected = [planted.items[i] for i in np.argsort(-cos)[:5]]
    assert [x["item"] for x in body["items"]] == expected
    assert body["items"][0]["score"] == pytest.approx(float(cos.max()), abs=1e-5)
    r = api.get("/v1/items/nothing/similar")
    assert r.status_code == 404 and r.json()["error"] == "unknown_item"


# ---------------------------------------------------------------------- fold-in


def test_fold_in_visitor_like_existing_user_gets_their_list(api: TestClient, planted: pl.Planted) -> None:
    u = 6
    rated_items = list(planted.rated[f"u{u}"])
    raw = planted.raw(u)
    # The visitor rates the same items as u6 would (the model's own predictions, on the scale).
    ratings = [{"item": i, "rating": float(np.clip(raw[planted.items.index(i)], 0.5, 5.0))}
               for i in rated_items]
    body = api.post("/v1/fold-in", json={"ratings": ratings, "n": 10}).json()
    assert body["strategy"] == "fold_in" and body["version"] == 1
    got = [x["item"] for x in body["items"]]
    assert not set(got) & set(rated_items)
    overlap = len(set(got) & set(planted.top(u, 10)))
    assert overlap >= 8, (got, planted.top(u, 10))


def test_fold_in_unknown_items_and_bad_rating(api: TestClient) -> None:
    body = api.post("/v1/fold-in", json={"ratings": [{"item": "nope", "rating": 4}], "n": 3}).json()
    assert body["strategy"] == "popular" and body["unknown_items"] == ["nope"]
    r = api.post("/v1/fold-in", json={"ratings": [{"item": "m1", "rating": 9}]})
    assert r.status_code == 422 and r.json()["field"] == "ratings.0.rating" and r.json()["error"] == "invalid_request"


# ---------------------------------------------------------------------- model & catalogue


def test_model_info(api: TestClient, redis_client, keys) -> None:
    redis_client.lpush(keys.metrics, json.dumps({"version": 1, "prequential_rmse": 0.91}))
    body = api.get("/v1/model").json()
    assert body["version"] == 1 and body["rank"] == pl.RANK
    assert body["n_users"] == pl.N_USERS and body["n_items"] == pl.N_ITEMS
    assert body["ratings_seen"] == 801 and body["reg_param"] == pytest.approx(0.05)
    assert body["metrics"] == {"rmse": 0.9}
    assert body["history"] == [{"version": 1, "prequential_rmse": 0.91}]
    assert body["created"] > 0


def test_catalogue_loader_search_and_join(api: TestClient, planted: pl.Planted, redis_url, redis_client,
                                           keys, tmp_path, monkeypatch) -> None:
    from predictor import load_catalog

    movies = tmp_path / "movies.csv"
    movies.write_text("movieId,title,genres\r\n" + "".join(
        f'm{i},"Film {i}, The (19{i % 100:02d})",{"Comedy|Drama" if i % 2 else "Horror"}\r\n'
        for i in range(pl.N_ITEMS)))
    ratings = tmp_path / "ratings.csv"
    ratings.write_text("userId,movieId,rating,timestamp\r\n1,m3,4.0,1\r\n2,m3,5.0,1\r\n2,m8,3.0,1\r\n")
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("REDIS_PREFIX", keys.prefix)
    assert load_catalog.main(["--movies", str(movies), "--ratings", str(ratings)]) == 0
    api.app.state.svc.watcher.poke()
    pl.wait_for(lambda: len(api.app.state.svc.watcher.catalog) == pl.N_ITEMS)
    found = api.get("/v1/items?q=film 1&limit=5").json()
    assert found["total"] == 111  # Film 1, Film 10-19, Film 100-199
    assert [x["item"] for x in found["items"]] == ["m1", "m10", "m100", "m101", "m102"]  # non-numeric ids: text order
    horror = api.get("/v1/items?q=FILM&genre=horror&limit=1000").json()
    assert horror["total"] == pl.N_ITEMS // 2
    assert api.get("/v1/genres").json()["genres"] == [
        {"genre": "Comedy", "items": 100}, {"genre": "Drama", "items": 100},
        {"genre": "Horror", "items": 100}]
    item = api.get("/v1/items/m3").json()
    assert item["title"].startswith("Film 3,") and item["genres"] == ["Comedy", "Drama"] and item["in_model"]
    assert api.get("/v1/items/zzz").status_code == 404
    rec = api.get("/v1/users/u0/recommendations?n=3").json()["items"]
    assert all(x["title"] and x["title"].startswith("Film ") for x in rec)
    assert json.loads(redis_client.get(keys.popular)) == [["m3", 2], ["m8", 1]]


# ---------------------------------------------------------------------- jiminy


def test_jiminy_ratings_and_ranks(api: TestClient, planted: pl.Planted) -> None:
    r = api.post("/predictions/ratings", json={"user": "u3", "products": ["m1", "m2"]})
    assert r.status_code == 201
    pred = r.json()["prediction"]
    assert pred["user"] == "u3" and [p["id"] for p in pred["products"]] == ["m1", "m2"]
    assert pred["products"][0]["rating"] == pytest.approx(float(np.clip(planted.raw(3)[1], 0.5, 5)), abs=1e-4)
    assert r.headers["location"] == f"/predictions/ratings/{pred['id']}"
    again = api.get(f"/predictions/ratings/{pred['id']}")
    assert again.status_code == 200 and again.json() == {"prediction": pred}

    r = api.post("/predictions/ranks", json={"user": "u3", "topk": 5})
    assert r.status_code == 201
    pred = r.json()["prediction"]
    assert pred["topk"] == 5 and [p["id"] for p in pred["products"]] == planted.top(3, 5)
    assert api.get(f"/predictions/ranks/{pred['id']}").json() == {"prediction": pred}
    assert api.get("/predictions/ranks/does-not-exist").status_code == 404
    assert api.post("/predictions/ranks", json={"user": "u3"}).status_code == 422


def test_jiminy_prediction_expires(redis_url, keys, planted, redis_client) -> None:
    with TestClient(create_app(pl.settings_for(redis_url, keys, PREDICTOR_PREDICTION_TTL_S=1))) as api:
        pl.wait_version(api, 1)
        pred = api.post("/predictions/ranks", json={"user": "u1", "topk": 2}).json()["prediction"]
        assert api.get(f"/predictions/ranks/{pred['id']}").status_code == 200
        ttl = redis_client.ttl(f"{keys.prefix}:prediction:ranks:{pred['id']}")
        assert 0 < ttl <= 1


# ---------------------------------------------------------------------- errors


@pytest.mark.parametrize(("url", "field"), [
    ("/v1/users/u1/recommendations?n=0", "n"),
    ("/v1/users/u1/recommendations?n=1001", "n"),
    ("/v1/users/u1/recommendations?n=ten", "n"),
    ("/v1/predict?user=u1", "item"),
    ("/v1/items/m1/similar?n=-3", "n"),
    ("/v1/items?limit=0", "limit"),
])
def test_bad_parameters_are_422_naming_the_field(api: TestClient, url: str, field: str) -> None:
    r = api.get(url)
    assert r.status_code == 422
    body = r.json()
    assert body["error"] == "invalid_request" and body["field"] == field
    assert set(body) == {"error", "detail", "field"} and field in body["detail"]


def test_bad_bodies_are_422(api: TestClient) -> None:
    r = api.post("/v1/predict", json={"pairs": []})
    assert r.status_code == 422 and r.json()["field"] == "pairs"
    r = api.post("/v1/predict", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422
    r = api.post("/v1/fold-in", json={"ratings": [{"item": "m1", "rating": "NaN"}]})
    assert r.status_code == 422
    r = api.post("/v1/users/u1/recommendations", json={"n": 5000})
    assert r.status_code == 422 and r.json()["field"] == "n"
    r = api.post("/predictions/ranks", json={"user": 2**70, "topk": 3})
    assert r.status_code == 422 and "user" in r.json()["errors"][0]["details"]  # jiminy's shape
    r = api.get("/no/such/route")
    assert r.status_code == 404 and r.json()["error"] == "not_found"
