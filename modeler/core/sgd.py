"""The explicit model's bias-SGD step, vectorised over a batch, and the plain per-rating
loops it is tested against (the seeds' B-SGD update; see :mod:`modeler.core.als_math` for the
model). numpy only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

AGGREGATIONS = ("sum", "mean", "damped")


def predict_raw(mu: float, bu: np.ndarray, bi: np.ndarray, uv: np.ndarray, iv: np.ndarray) -> np.ndarray:
    """r̂ = μ + b_u + b_i + U_u · P_i for aligned rows (float64)."""
    return mu + bu.astype(np.float64) + bi + np.einsum("ij,ij->i", uv.astype(np.float64), iv)


def step_sizes(n: np.ndarray, learning_rate: float, aggregation: str) -> np.ndarray:
    """Per-key step η_k for a key with n_k ratings in the pass (see the module docstring)."""
    n = np.asarray(n, dtype=np.float64)
    safe = np.maximum(n, 1.0)
    if aggregation == "sum":
        return np.full(n.shape, learning_rate)
    if aggregation == "mean":
        return learning_rate / safe
    if aggregation == "damped":
        return -np.expm1(safe * math.log1p(-min(learning_rate, 0.999999))) / safe
    raise ValueError(f"aggregation must be one of {AGGREGATIONS}, not {aggregation!r}")


def aggregate(
    rows: np.ndarray, n_rows: int, err: np.ndarray, other: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-row sums over the pass: (n_k, S_b = Σ ε, S_v = Σ ε Q); float64."""
    n = np.bincount(rows, minlength=n_rows).astype(np.float64)
    s_b = np.bincount(rows, weights=err, minlength=n_rows)
    # One bincount per column: several times faster than np.add.at on (n, rank) rows.
    weighted = err[:, None] * other
    s_v = np.empty((n_rows, other.shape[1]), dtype=np.float64)
    for c in range(other.shape[1]):
        s_v[:, c] = np.bincount(rows, weights=weighted[:, c], minlength=n_rows)
    return n, s_b, s_v


def bias_step(
    bias: np.ndarray,
    n: np.ndarray,
    s_b: np.ndarray,
    learning_rate: float,
    reg_bias: float,
    aggregation: str,
    history: np.ndarray | None = None,
    history_weight: float = 0.0,
) -> np.ndarray:
    """b ← b + η_b (S_b − n λ_b b) for rows with n > 0 (float64 out).

    With ``history_weight`` κ > 0 the step of a key that has already learned N_k ratings is
    the damped step of n_k + κ N_k ratings, η_k = (1 − (1 − γ)^(n_k + κN_k)) / (n_k + κN_k)
    (for ``"damped"``): a per-parameter learning rate that falls like 1/N_k, so a bias with a
    long history moves like an incremental average instead of forgetting it every batch.
    """
    n_eff = n if history is None or history_weight <= 0 else n + history_weight * history
    eta_b = np.where(n > 0, step_sizes(n_eff, learning_rate, aggregation), 0.0)
    b64 = bias.astype(np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        return b64 + eta_b * (s_b - n * reg_bias * b64)


def apply_update(
    bias: np.ndarray,
    vec: np.ndarray,
    n: np.ndarray,
    s_b: np.ndarray,
    s_v: np.ndarray,
    learning_rate: float,
    reg_param: float,
    reg_bias: float,
    aggregation: str,
    history: np.ndarray | None = None,
    history_weight: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """b ← b + η_b (S_b − n λ_b b),  V ← V + η (S_v − n λ V)  for rows with n > 0; float32 out.

    The bias step is :func:`bias_step` (counts-aware with κ = ``history_weight``); vectors
    take the plain damped step η of their n_k ratings in the pass (``vector_step="sgd"``).
    """
    new_b = bias_step(bias, n, s_b, learning_rate, reg_bias, aggregation, history, history_weight)
    eta = np.where(n > 0, step_sizes(n, learning_rate, aggregation), 0.0)
    v64 = vec.astype(np.float64)
    # Overflow is possible with a diverging configuration; callers refuse non-finite rows.
    with np.errstate(over="ignore", invalid="ignore"):
        new_v = v64 + eta[:, None] * (s_v - (n * reg_param)[:, None] * v64)
        return new_b.astype(np.float32), new_v.astype(np.float32)


def finite_rows(bias: np.ndarray, vec: np.ndarray) -> np.ndarray:
    """True where a row's bias and vector are all finite."""
    return np.isfinite(bias) & np.isfinite(vec).all(axis=1)


def reference_sgd_step(
    mu: float,
    rating: float,
    user: tuple[float, list[float]],
    item: tuple[float, list[float]],
    learning_rate: float,
    reg_param: float,
    reg_bias: float,
) -> tuple[tuple[float, list[float]], tuple[float, list[float]], float]:
    """The seeds' four update equations for ONE rating, in plain Python; returns (user, item, ε)."""
    bu, uvec = user
    bi, ivec = item
    pred = mu + bu + bi + sum(a * b for a, b in zip(uvec, ivec, strict=True))
    eps = rating - pred
    g = learning_rate
    new_user = (bu + g * (eps - reg_bias * bu), [u + g * (eps * p - reg_param * u) for u, p in zip(uvec, ivec)])
    new_item = (bi + g * (eps - reg_bias * bi), [p + g * (eps * u - reg_param * p) for u, p in zip(uvec, ivec)])
    return new_user, new_item, eps


def reference_batch_pass(
    mu: float,
    ratings: Sequence[tuple[str, str, float]],
    users: dict[str, tuple[float, list[float]]],
    items: dict[str, tuple[float, list[float]]],
    learning_rate: float,
    reg_param: float,
    reg_bias: float,
    aggregation: str,
) -> tuple[dict[str, tuple[float, list[float]]], dict[str, tuple[float, list[float]]], list[float]]:
    """One parallel pass over a mini-batch, one rating at a time in plain Python loops.

    Every ε uses the parameters from before the pass; each key's gradients are summed and
    the step η_k applied once (module docstring). Returns new users, new items and the errors.
    """
    sums_u: dict[str, list[Any]] = {}
    sums_i: dict[str, list[Any]] = {}
    errors = []
    for u, i, r in ratings:
        bu, uvec = users[u]
        bi, ivec = items[i]
        pred = mu + bu + bi + sum(a * b for a, b in zip(uvec, ivec, strict=True))
        eps = r - pred
        errors.append(eps)
        su = sums_u.setdefault(u, [0, 0.0, [0.0] * len(uvec)])
        su[0] += 1
        su[1] += eps
        su[2] = [s + eps * p for s, p in zip(su[2], ivec)]
        si = sums_i.setdefault(i, [0, 0.0, [0.0] * len(ivec)])
        si[0] += 1
        si[1] += eps
        si[2] = [s + eps * q for s, q in zip(si[2], uvec)]

    def step(n: int) -> float:
        if aggregation == "sum":
            return learning_rate
        if aggregation == "mean":
            return learning_rate / n
        return (1.0 - (1.0 - learning_rate) ** n) / n

    def updated(table, sums):
        out = dict(table)
        for key, (n, s_b, s_v) in sums.items():
            b, v = table[key]
            eta = step(n)
            out[key] = (
                b + eta * (s_b - n * reg_bias * b),
                [x + eta * (s - n * reg_param * x) for x, s in zip(v, s_v)],
            )
        return out

    return updated(users, sums_u), updated(items, sums_i), errors
