"""Serving the ranking model (#13): versions carrying both factor sets, or the ranking set
only (an implicit-only stream), written through ``common.snapshot`` as the modeler writes
them, served by the real app against a real redis-server."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pytest
from fastapi.testclient import TestClient

from common.feedback import Weighting
from common.keys import EXPLICIT, RANKING, Keys
from common.schema import RatingScale
from common.snapshot import Meta, publish_version, write_rated, write_segment
from predictor.app import create_app
from predictor.config import PredictorSettings

RANK, R_RANK, N_ITEMS, N_USERS = 4, 6, 300, 30
MU, ALPHA, REG = 3.5, 3.0, 0.05
WEIGHTING = Weighting(slope=1.0)


@dataclass
class Both:
    items: list[str]
    users: list[str]
    item_bias: np.ndarray
    p: np.ndarray  # explicit item factors
    user_bias: np.ndarray
    u: np.ndarray  # explicit user factors
    y: np.ndarray  # ranking item factors
    x: np.ndarray  # ranking user factors
    rated: dict[str, dict[str, float]]

    def r_hat(self, k: int) -> np.ndarray:
        return (MU + self.user_bias[k] + self.item_bias + self.p @ self.u[k]).astype(np.float32)

    def ranked(self, k: int, n: int) -> list[str]:
        s = (self.y @ self.x[k]).astype(np.float64)
        for item in self.rated[self.users[k]]:
            s[self.items.index(item)] = -np.inf
        return [self.items[i] for i in np.argsort(-s, kind="stable")[:n]]


def ials_user(y: np.ndarray, rows: list[int], w: np.ndarray) -> np.ndarray:
    """Dense reference iALS solve (every cell materialised), λ·n_u as the modeler scales it."""
    c, p = np.ones(len(y)), np.zeros(len(y))
    pos = w > 0
    c[np.array(rows)[pos]] = 1 + ALPHA * w[pos]
    p[np.array(rows)[pos]] = 1
    y64 = y.astype(np.float64)
    lam = REG * pos.sum()
    return np.linalg.solve(y64.T @ (c[:, None] * y64) + lam * np.eye(y.shape[1]), y64.T @ (c * p))


def plant(seed: int = 11, scale: float = 3.0) -> Both:
    rng = np.random.default_rng(seed)
    items = [f"m{i}" for i in range(N_ITEMS)]
    users = [f"u{i}" for i in range(N_USERS)]
    y = rng.normal(0, 0.4, (N_ITEMS, R_RANK)).astype(np.float32)
    rated: dict[str, dict[str, float]] = {}
    xs = []
    for u in users:
        rows = sorted(rng.choice(N_ITEMS, 25, replace=False).tolist())
        values = rng.choice(np.arange(1, 11) / 2, 25)
        values[:3] = 5.0
        rated[u] = {items[i]: float(v) for i, v in zip(rows, values, strict=True)}
        w = np.array([WEIGHTING.rating_weight(v, RatingScale()) for v in values])
        xs.append(ials_user(y, rows, w))
    return Both(items, users, rng.normal(0, 0.3, N_ITEMS).astype(np.float32),
                (scale * rng.normal(0, 0.5, (N_ITEMS, RANK))).astype(np.float32),
                rng.normal(0, 0.2, N_USERS).astype(np.float32),
                rng.normal(0, 0.5, (N_USERS, RANK)).astype(np.float32), y,
                np.array(xs, dtype=np.float32), rated)


def publish(client, keys: Keys, b: Both, version: int, models=(EXPLICIT, RANKING),
            segments: tuple[int, ...] | None = None, ranking_items: list[int] | None = None) -> None:
    if EXPLICIT in models and ranking_items is None:
        write_segment(client, keys, version, "items", b.items, b.item_bias, b.p)
        write_segment(client, keys, version, "users", b.users, b.user_bias, b.u)
    rows = list(range(N_ITEMS)) if ranking_items is None else ranking_items
    if RANKING in models:
        write_segment(client, keys, version, "ranking_items", [b.items[i] for i in rows],
                      np.zeros(len(rows), np.float32), b.y[rows])
        if ranking_items is None:
            write_segment(client, keys, version, "ranking_users", b.users, np.zeros(N_USERS, np.float32), b.x)
    write_rated(client, keys, [(u, i, r) for u, d in b.rated.items() for i, r in d.items()])
    meta = Meta(version=version, rank=RANK if EXPLICIT in models else 0, mu=MU, reg_param=0.05,
                n_users=N_USERS, n_items=N_ITEMS, ratings_seen=750, created=time.time(),
                segments=segments or (version,), popular=[(b.items[i], 30 - i) for i in range(20)],
                models=tuple(models), ranking_rank=R_RANK, ranking_reg_param=REG, ranking_alpha=ALPHA,
                ranking_weighting=WEIGHTING.to_dict())
    publish_version(client, keys, meta)


def serve(redis_url: str, keys: Keys) -> TestClient:
    return TestClient(create_app(PredictorSettings(REDIS_URL=redis_url, REDIS_PREFIX=keys.prefix,
                                                   MODEL_POLL_INTERVAL_S=0.2)))


def wait_version(api: TestClient, version: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        model = api.app.state.svc.watcher.model
        if model is not None and model.version == version:
            return
        time.sleep(0.05)
    raise AssertionError(f"version {version} never served")


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
    assert body["version"] == 2 and [x["item"] for x in body["items"]] == both.ranked(4, 10)
