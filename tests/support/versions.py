"""Planted model versions for the predictor's tests: both factor sets (or either), written
through ``common.snapshot`` as the modeler writes them, with every answer recomputable here
in numpy (the ranking users are the dense iALS solutions of their own ratings)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
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

    def refit(self, k: int) -> np.ndarray:
        """User k folded in from their rated history against the current y (dense solve)."""
        hist = self.rated[self.users[k]]
        rows = [self.items.index(i) for i in hist]
        w = np.array([WEIGHTING.rating_weight(v, RatingScale()) for v in hist.values()])
        return ials_user(self.y, rows, w)

    def ranked(self, k: int, n: int, x: np.ndarray | None = None) -> list[str]:
        s = (self.y @ (self.x[k] if x is None else x)).astype(np.float64)
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
            segments: tuple[int, ...] | None = None, ranking_items: list[int] | None = None,
            candidates: list[dict] | None = None) -> None:
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
                ranking_weighting=WEIGHTING.to_dict(), candidates=candidates or [])
    publish_version(client, keys, meta)


def serve(redis_url: str, keys: Keys, refit_users: bool = True) -> TestClient:
    return TestClient(create_app(PredictorSettings(REDIS_URL=redis_url, REDIS_PREFIX=keys.prefix,
                                                   PREDICTOR_MODEL_POLL_INTERVAL_S=0.2,
                                                   PREDICTOR_REFIT_USERS=refit_users)))


def wait_version(api: TestClient, version: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        model = api.app.state.svc.watcher.model
        if model is not None and model.version == version:
            return
        time.sleep(0.05)
    raise AssertionError(f"version {version} never served")
