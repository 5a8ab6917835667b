"""Serving the ranking model (#13): versions carrying both factor sets, or the ranking set
only (an implicit-only stream), written through ``common.snapshot`` as the modeler writes
them (:mod:`tests.support.versions`), served by the real app against a real redis-server."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from fastapi.testclient import TestClient

from common.keys import RANKING
from tests.support.versions import N_ITEMS, N_USERS, R_RANK, Both, plant, publish, serve, wait_version


@pytest.fixture
def both(redis_client, keys) -> Both:
    b = plant()
    publish(redis_client, keys, b, 1)
    return b


@pytest.fixture
def api(redis_url, keys, both) -> Iterator[TestClient]:
    with serve(redis_url, keys) as client:
        wait_version(client, 1)
        yield client


def test_recommendations_rank_by_the_ranking_model_with_clipped_ratings(api: TestClient, both: Both) -> None:
    for k in (0, 7, 29):
        body = api.get(f"/v1/users/u{k}/recommendations?n=12").json()
        assert body["strategy"] == "model" and body["rank_by"] == "ranking"
        assert [x["item"] for x in body["items"]] == both.ranked(k, 12)
        for x in body["items"]:
            i = both.items.index(x["item"])
            assert x["score"] == pytest.approx(float(both.y[i] @ both.x[k]), abs=1e-5)
            assert x["rating"] == pytest.approx(float(np.clip(both.r_hat(k)[i], 0.5, 5.0)), abs=1e-4)
            assert 0.5 <= x["rating"] <= 5.0
    # The factors are large: some raw predictions are far outside the scale.
    assert max(both.r_hat(k).max() for k in range(N_USERS)) > 5.5


def test_rank_by_rating_keeps_the_old_order(api: TestClient, both: Both) -> None:
    body = api.get("/v1/users/u3/recommendations?n=10&rank_by=rating").json()
    s = both.r_hat(3).astype(np.float64)
    for item in both.rated["u3"]:
        s[both.items.index(item)] = -np.inf
    assert [x["item"] for x in body["items"]] == [both.items[i] for i in np.argsort(-s, kind="stable")[:10]]
    assert body["rank_by"] == "rating"
    assert all(x["rating"] <= 5.0 and x["rating"] == min(5.0, max(0.5, x["score"])) for x in body["items"])
    posted = api.post("/v1/users/u3/recommendations", json={"n": 10, "rank_by": "rating"}).json()
    assert posted["items"] == body["items"]
    assert api.get("/v1/users/u3/recommendations?rank_by=votes").json()["field"] == "rank_by"


def test_similar_items_use_the_ranking_vectors(api: TestClient, both: Both) -> None:
    unit = both.y.astype(np.float64) / np.linalg.norm(both.y, axis=1, keepdims=True)
    cos = unit @ unit[42]
    cos[42] = -np.inf
    body = api.get("/v1/items/m42/similar?n=6").json()
    assert [x["item"] for x in body["items"]] == [both.items[i] for i in np.argsort(-cos)[:6]]
    assert body["items"][0]["score"] == pytest.approx(float(cos.max()), abs=1e-5)
    assert all("rating" not in x for x in body["items"])


def test_fold_in_visitor_rating_like_a_user_gets_their_list(api: TestClient, both: Both) -> None:
    k = 12
    ratings = [{"item": i, "rating": r} for i, r in both.rated[f"u{k}"].items()]
    body = api.post("/v1/fold-in", json={"ratings": ratings, "n": 10}).json()
    assert body["strategy"] == "fold_in" and body["unknown_items"] == []
    assert [x["item"] for x in body["items"]] == both.ranked(k, 10)
    assert all(0.5 <= x["rating"] <= 5.0 for x in body["items"])
    # Only low ratings: no positive for the ranking model, the rating model's fold-in answers.
    low = api.post("/v1/fold-in", json={"ratings": [{"item": "m1", "rating": 1.0}], "n": 5}).json()
    assert low["strategy"] == "fold_in" and len(low["items"]) == 5


def test_jiminy_ranks_follow_the_ranking_model(api: TestClient, both: Both) -> None:
    r = api.post("/predictions/ranks", json={"user": "u5", "topk": 5})
    pred = r.json()["prediction"]
    assert [p["id"] for p in pred["products"]] == both.ranked(5, 5)
    assert all(0.5 <= p["rating"] <= 5.0 for p in pred["products"])


def test_model_info_names_both_sets(api: TestClient) -> None:
    info = api.get("/v1/model").json()
    assert info["models"] == ["explicit", "ranking"] and info["ranking_rank"] == R_RANK


def test_implicit_only_version_has_no_ratings_and_predict_says_why(redis_url, redis_client, keys) -> None:
    b = plant(seed=4)
    publish(redis_client, keys, b, 1, models=(RANKING,))
    with serve(redis_url, keys) as api:
        wait_version(api, 1)
        body = api.get("/v1/users/u2/recommendations?n=8").json()
        assert body["strategy"] == "model" and body["rank_by"] == "ranking"
        assert [x["item"] for x in body["items"]] == b.ranked(2, 8)
        assert all("rating" not in x for x in body["items"])
        for r in (api.get("/v1/predict?user=u2&item=m1"),
                  api.post("/v1/predict", json={"pairs": [{"user": "u2", "item": "m1"}]})):
            assert r.status_code == 409 and r.json()["error"] == "no_rating_model"
            assert "implicit" in r.json()["detail"]
        r = api.get("/v1/users/u2/recommendations?rank_by=rating")
        assert r.status_code == 409 and r.json()["field"] == "rank_by"
        j = api.post("/predictions/ratings", json={"user": "u2", "products": ["m1"]})
        assert j.status_code == 409 and j.json()["errors"][0]["status"] == 409
        ranks = api.post("/predictions/ranks", json={"user": "u2", "topk": 3}).json()["prediction"]
        assert [p["id"] for p in ranks["products"]] == b.ranked(2, 3)
        fold = api.post("/v1/fold-in", json={"ratings": [{"item": i, "rating": v} for i, v in b.rated["u9"].items()]})
        assert [x["item"] for x in fold.json()["items"]] == b.ranked(9, 10)
        assert api.get("/v1/model").json()["models"] == ["ranking"]
        pop = api.get("/v1/popular?n=3").json()["items"]
        assert all("rating" not in x for x in pop)


def test_a_ranking_delta_updates_lists_and_keeps_the_gramian_exact(api: TestClient, both: Both,
                                                                    redis_client, keys) -> None:
    rng = np.random.default_rng(8)
    changed = sorted(rng.choice(N_ITEMS, 40, replace=False).tolist())
    both.y[changed] = rng.normal(0, 0.6, (40, R_RANK)).astype(np.float32)
    publish(redis_client, keys, both, 2, segments=(1, 2), ranking_items=changed)
    wait_version(api, 2)
    model = api.app.state.svc.watcher.model
    y = both.y.astype(np.float64)
    assert np.allclose(model.ranking.gram, y.T @ y, atol=1e-5)
    body = api.get("/v1/users/u4/recommendations?n=10").json()
    # u4's vector is folded in again from their history against the new item vectors (the
    # exact iALS user step), not the stored x_4 solved against the old ones.
    refit = both.refit(4)
    assert not np.allclose(refit, both.x[4], atol=1e-3)
    assert body["version"] == 2 and [x["item"] for x in body["items"]] == both.ranked(4, 10, refit)
    assert body["items"][0]["score"] == pytest.approx(float(both.y.astype(np.float64)[
        both.items.index(body["items"][0]["item"])] @ refit), abs=1e-4)


def test_without_refit_the_streamed_user_vector_is_served(redis_url, redis_client, keys, both: Both) -> None:
    rng = np.random.default_rng(8)
    changed = sorted(rng.choice(N_ITEMS, 40, replace=False).tolist())
    both.y[changed] = rng.normal(0, 0.6, (40, R_RANK)).astype(np.float32)
    publish(redis_client, keys, both, 2, segments=(1, 2), ranking_items=changed)
    with serve(redis_url, keys, refit_users=False) as api:
        wait_version(api, 2)
        body = api.get("/v1/users/u4/recommendations?n=10").json()
    assert [x["item"] for x in body["items"]] == both.ranked(4, 10)
