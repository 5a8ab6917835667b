"""A planted explicit model for the predictor's tests: one factor set written through
``common.snapshot`` (the modeler's own writer) and published like the modeler does, with every
answer recomputable here in numpy; the served app's settings and waits for its versions."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from fastapi.testclient import TestClient

from common.keys import Keys
from common.snapshot import Meta, publish_version, write_rated, write_segment
from predictor.config import PredictorSettings

RANK = 4
N_ITEMS = 200
N_USERS = 40
MU = 3.5


@dataclass
class Planted:
    """A model whose every answer can be recomputed here with numpy."""

    items: list[str]
    users: list[str]
    item_bias: np.ndarray
    item_factors: np.ndarray
    user_bias: np.ndarray
    user_factors: np.ndarray
    rated: dict[str, dict[str, float]]
    reg_param: float = 0.05
    mu: float = MU

    def raw(self, u: int) -> np.ndarray:
        """r̂ = mu + b_u + b_i + U_u·P_i, unclipped, for every item."""
        return (self.mu + self.user_bias[u] + self.item_bias
                + self.item_factors @ self.user_factors[u]).astype(np.float32)

    def top(self, u: int, n: int, include_rated: bool = False) -> list[str]:
        scores = self.raw(u).astype(np.float64)
        if not include_rated:
            for item in self.rated[self.users[u]]:
                scores[self.items.index(item)] = -np.inf
        order = np.argsort(-scores, kind="stable")[:n]
        return [self.items[i] for i in order]


def plant(seed: int = 7, scale: float = 1.0) -> Planted:
    rng = np.random.default_rng(seed)
    items = [f"m{i}" for i in range(N_ITEMS)]
    users = [f"u{i}" for i in range(N_USERS)]
    rated = {}
    for u in users:
        chosen = rng.choice(N_ITEMS, size=20, replace=False)
        rated[u] = {items[i]: float(rng.integers(1, 11) / 2) for i in chosen}
    return Planted(
        items=items,
        users=users,
        item_bias=rng.normal(0, 0.3, N_ITEMS).astype(np.float32),
        item_factors=(scale * rng.normal(0, 0.5, (N_ITEMS, RANK))).astype(np.float32),
        user_bias=rng.normal(0, 0.2, N_USERS).astype(np.float32),
        user_factors=rng.normal(0, 0.5, (N_USERS, RANK)).astype(np.float32),
        rated=rated,
    )


def publish(client, keys: Keys, p: Planted, version: int, segments: list[int] | None = None,
            items: list[int] | None = None, users: list[int] | None = None,
            rated: bool = True, metrics: dict | None = None) -> None:
    """Write segment ``version`` (all or the given rows) and publish it like the modeler does."""
    item_rows = list(range(len(p.items))) if items is None else items
    user_rows = list(range(len(p.users))) if users is None else users
    write_segment(client, keys, version, "items", [p.items[i] for i in item_rows],
                  p.item_bias[item_rows], p.item_factors[item_rows])
    write_segment(client, keys, version, "users", [p.users[u] for u in user_rows],
                  p.user_bias[user_rows], p.user_factors[user_rows])
    if rated:
        write_rated(client, keys, [(u, i, r) for u, d in p.rated.items() for i, r in d.items()])
    counts: dict[str, int] = {}
    for d in p.rated.values():
        for i in d:
            counts[i] = counts.get(i, 0) + 1
    popular = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:50]
    meta = Meta(version=version, rank=RANK, mu=p.mu, reg_param=p.reg_param, n_users=len(p.users),
                n_items=len(p.items), ratings_seen=800 + version, created=time.time(),
                segments=tuple(segments or [version]), metrics=metrics or {"rmse": 0.9},
                popular=popular)
    publish_version(client, keys, meta)


def settings_for(redis_url: str, keys: Keys, **extra) -> PredictorSettings:
    return PredictorSettings(REDIS_URL=redis_url, REDIS_PREFIX=keys.prefix,
                             PREDICTOR_MODEL_POLL_INTERVAL_S=0.2, **extra)


def wait_for(predicate, timeout: float = 10.0, step: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise AssertionError("condition not met in time")


def wait_version(api: TestClient, version: int) -> None:
    wait_for(lambda: api.app.state.svc.watcher.model is not None
             and api.app.state.svc.watcher.model.version == version)
