"""Streaming bias-SGD matrix factorisation: the maths, in numpy only (no Spark, no Redis).
Long because the tables, hashing, reservoir, SGD and least-squares steps, ``ALSParams`` and
the single-process reference :class:`LocalStreamingALS` are the one numeric core the Spark
stages, the ranking model and the tests all build on.

Model (the seeds' B-SGD)::

    r̂(u, i) = μ + b_u + b_i + U_u · P_i          ε(u, i) = r(u, i) − r̂(u, i)

One SGD step on a single rating, learning rate γ, regularisation λ_b (biases), λ (factors)::

    b_u ← b_u + γ (ε − λ_b b_u)            U_u ← U_u + γ (ε P_i − λ U_u)
    b_i ← b_i + γ (ε − λ_b b_i)            P_i ← P_i + γ (ε U_u − λ P_i)

On a mini-batch every rating's error is computed from the parameters as they were at the
start of the pass (all ratings in parallel, as the seeds' RDD joins do), and one key's
several gradients are then combined. For a key k with n_k ratings in the pass, summed
gradients ``S_b = Σ ε``, ``S_v = Σ ε Q`` (Q = the other side's vector)::

    b_k ← b_k + η_k (S_b − n_k λ_b b_k)       V_k ← V_k + η_k (S_v − n_k λ V_k)

with the per-key step ``η_k``:

* ``"sum"`` (the seeds): η_k = γ. Diverges for keys with n_k γ ≳ 2 (popular items in big batches).
* ``"mean"``: η_k = γ / n_k.
* ``"damped"`` (default): η_k = (1 − (1 − γ)^n_k) / n_k. This is the step n_k sequential SGD
  steps of size γ would take on a unit-curvature quadratic: γ for a single rating, and
  never more than a full Newton step (1/n_k) however many ratings a key has in the batch.

Vectors take that SGD step with ``vector_step="sgd"`` (the seeds). With ``vector_step="rls"``
(the default) a vector's learning rate is a matrix: the inverse of the curvature the key has
accumulated - an online Newton step, i.e. recursive least squares. Each key keeps
``A_k = Σ Q Qᵀ``, ``m_k = Σ (r − μ − b_k − c) Q`` and ``N_k`` over the ratings it has
learned (O(rank²) per key, independent of the stream's length; each term computed with the
partner's vector as it was then, and all three scaled by the forgetting factor β each time
the key is touched), and a pass sets::

    V_k ← (β A_k + G_k + λ (β N_k + n_k) I)⁻¹ (β m_k + h_k)

with G_k = Σ Q Qᵀ and h_k = Σ (r − μ − b_k − c) Q over the key's ratings in the pass (batch
and replay). That is the ridge (ALS-WR) solution of everything the key has learned, so a
user who rates 200 films in one session gets the vector batch ALS would give them against
today's items, and a popular item's vector moves less and less as its ratings accumulate.
Biases keep the damped, counts-aware SGD step. The batch's own ratings are folded into
(A, m, N) once the batch is learned; replays are not (they were folded when first seen).
A user's statistics weigh each rating by the item's maturity, N_i / (N_i + c)
(``maturity`` c; see :func:`fold_statistics`).

Everything the Spark code (``modeler.spark.streaming_als``) does per partition is a call into this
module, so :class:`LocalStreamingALS` (one process, the same algorithm end to end) is the
reference the Spark tests compare against, and ``reference_*`` functions are plain loops
over ratings that the vectorised functions are tested against.

Determinism: random initial factors, partitions and reservoir priorities come from
``zlib.crc32`` of the id strings mixed with the seed (never Python's salted ``hash``), so
the same seed and batches give the same model on any machine and any partition layout.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from common.feedback import Weighting

AGGREGATIONS = ("sum", "mean", "damped")
VECTOR_STEPS = ("rls", "sgd")
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MASK32 = np.uint64(0xFFFFFFFF)


# ---------------------------------------------------------------------------------------------
# Stable hashing: partitions, initial factors, reservoir priorities
# ---------------------------------------------------------------------------------------------


def stable_hash(key: str) -> int:
    """A 32-bit hash of an id that is the same in every process (unlike ``hash()``)."""
    return zlib.crc32(key.encode("utf-8"))


def partition_of(key: str, num_partitions: int) -> int:
    """The partition a user or item id lives in, for every RDD of the model."""
    return zlib.crc32(key.encode("utf-8")) % num_partitions


def hash_ids(keys: Sequence[str]) -> np.ndarray:
    """:func:`stable_hash` of many ids as a uint64 array."""
    return np.fromiter((zlib.crc32(k.encode("utf-8")) for k in keys), dtype=np.uint64, count=len(keys))


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser, vectorised: a well-mixed uint64 from any uint64 (wraps mod 2^64)."""
    with np.errstate(over="ignore"):
        z = x.astype(np.uint64) + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _seeded(h: np.ndarray, seed: int, salt: int) -> np.ndarray:
    with np.errstate(over="ignore"):
        base = splitmix64(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64) + np.uint64(salt))
        return splitmix64(h.astype(np.uint64) ^ base)


def init_factors(ids: Sequence[str], rank: int, seed: int, init_scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Initial ``(bias (n,), vectors (n, rank))`` float32 for newcomers.

    Bias 0 (a newcomer is average until its ratings say otherwise). Vector entries uniform on
    [−a, a] with a = init_scale·√3 (standard deviation ``init_scale``), drawn from
    splitmix64(hash(seed, id), j): a pure function of (seed, id), whatever the partition or order.
    """
    n = len(ids)
    bias = np.zeros(n, dtype=np.float32)
    if n == 0:
        return bias, np.zeros((0, rank), dtype=np.float32)
    h = _seeded(hash_ids(ids), seed, 1)
    with np.errstate(over="ignore"):
        z = splitmix64(h[:, None] + np.arange(1, rank + 1, dtype=np.uint64)[None, :] * _GOLDEN)
    unit = (z >> np.uint64(11)).astype(np.float64) * (1.0 / 9007199254740992.0)  # [0, 1)
    vec = ((2.0 * unit - 1.0) * (init_scale * math.sqrt(3.0))).astype(np.float32)
    return bias, vec


def rating_priority(users: Sequence[str], items: Sequence[str], timestamps: np.ndarray, seed: int) -> np.ndarray:
    """A uniform-looking uint64 per rating, a pure function of (seed, user, item, timestamp).

    The reservoir keeps the ratings of smallest priority ("bottom-k"), which is a uniform
    sample of everything seen, independent of arrival order and partitioning.
    """
    hu = _seeded(hash_ids(users), seed, 2)
    hi = _seeded(hash_ids(items), seed, 3)
    with np.errstate(over="ignore"):
        return splitmix64(hu ^ splitmix64(hi ^ np.asarray(timestamps, dtype=np.int64).astype(np.uint64)))


def replay_mask(priority: np.ndarray, batch_no: int, fraction: float) -> np.ndarray:
    """Which reservoir entries are replayed in batch ``batch_no``: a fresh ~``fraction`` each batch."""
    if fraction >= 1.0:
        return np.ones(priority.shape, dtype=bool)
    if fraction <= 0.0:
        return np.zeros(priority.shape, dtype=bool)
    # A second hash of (priority, batch): independent of the bottom-k selection itself.
    with np.errstate(over="ignore"):
        z = splitmix64(priority ^ (np.uint64(batch_no) * _GOLDEN)) & _MASK32
    return z < np.uint64(int(fraction * 4294967296.0))


# ---------------------------------------------------------------------------------------------
# The update maths (vectorised) and the plain per-rating references
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# State: factor tables and the reservoir (one per partition in Spark; plain objects, picklable)
# ---------------------------------------------------------------------------------------------


@dataclass
class RowStats:
    """Least-squares statistics of some rows (see :class:`FactorTable`), float32."""

    gram: np.ndarray
    moment: np.ndarray
    mass: np.ndarray

    @classmethod
    def zeros(cls, n: int, rank: int) -> RowStats:
        return cls(np.zeros((n, rank, rank), dtype=np.float32), np.zeros((n, rank), dtype=np.float32),
                   np.zeros(n, dtype=np.float32))

    @classmethod
    def concat(cls, parts: Sequence[RowStats], rank: int) -> RowStats:
        if not parts:
            return cls.zeros(0, rank)
        return cls(np.concatenate([p.gram for p in parts]), np.concatenate([p.moment for p in parts]),
                   np.concatenate([p.mass for p in parts]))

    def select(self, mask: np.ndarray) -> RowStats:
        return RowStats(self.gram[mask], self.moment[mask], self.mass[mask])


@dataclass
class FactorTable:
    """Rows of one side (users or items) of one partition: ids, biases, vectors, counts.

    Rows are never removed: a key absent from a batch keeps its row (the seeds' code lost them).
    ``touched`` marks rows changed by the last batch (the service publishes those as a delta).
    ``gram`` (n, rank, rank), ``moment`` (n, rank) and ``mass`` (n,) are the least-squares
    statistics of the ``"rls"`` vector step (A_k, m_k, N_k in the module docstring).
    """

    rank: int
    ids: list[str] = field(default_factory=list)
    index: dict[str, int] = field(default_factory=dict)
    bias: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float32))
    vec: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), dtype=np.float32))
    count: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    touched: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    gram: np.ndarray = field(default_factory=lambda: np.zeros((0, 0, 0), dtype=np.float32))
    moment: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), dtype=np.float32))
    mass: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float32))

    def __post_init__(self) -> None:
        n, r = len(self.bias), self.rank
        if self.vec.shape[1:] != (r,):
            self.vec = np.zeros((len(self.ids), r), dtype=np.float32)
        if self.gram.shape != (n, r, r):
            self.gram = np.zeros((n, r, r), dtype=np.float32)
            self.moment = np.zeros((n, r), dtype=np.float32)
            self.mass = np.zeros(n, dtype=np.float32)

    # Pickled with the statistics of the rows that hold some only: a Spark partition is
    # pickled and unpickled with every batch, and most rows of the ranking model (per-key
    # histories) have none - (rank² + rank + 1) × 4 zero bytes each otherwise.
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        n = len(self.mass)
        if self.gram.shape == (n, self.rank, self.rank) and n:
            held = ((self.mass != 0) | (self.moment != 0).any(axis=1)
                    | (self.gram.reshape(n, -1) != 0).any(axis=1))
            rows = np.flatnonzero(held)
            state.update(gram=self.gram[rows], moment=self.moment[rows], mass=self.mass[rows],
                         stats_rows=rows, stats_n=n)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        rows = state.pop("stats_rows", None)
        n = state.pop("stats_n", 0)
        if rows is not None:
            full = RowStats.zeros(n, state["rank"])
            full.gram[rows], full.moment[rows], full.mass[rows] = state["gram"], state["moment"], state["mass"]
            state.update(gram=full.gram, moment=full.moment, mass=full.mass)
        self.__dict__.update(state)

    def copy(self) -> FactorTable:
        """A deep copy (a persisted partition may be read again: never mutate it in place)."""
        return FactorTable(self.rank, list(self.ids), dict(self.index), self.bias.copy(),
                           self.vec.copy(), self.count.copy(), self.touched.copy(),
                           self.gram.copy(), self.moment.copy(), self.mass.copy())

    def stats(self, rows: np.ndarray) -> RowStats:
        """Copies of the least-squares statistics of ``rows`` (zeros where row == −1)."""
        known = rows >= 0
        out = RowStats.zeros(len(rows), self.rank)
        out.gram[known] = self.gram[rows[known]]
        out.moment[known] = self.moment[rows[known]]
        out.mass[known] = self.mass[rows[known]]
        return out

    def __len__(self) -> int:
        return len(self.ids)

    def rows(self, keys: Sequence[str]) -> np.ndarray:
        """Row numbers of existing keys (KeyError for an unknown key)."""
        index = self.index
        return np.fromiter((index[k] for k in keys), dtype=np.int64, count=len(keys))

    def lookup(self, keys: Sequence[str]) -> np.ndarray:
        """Row numbers, −1 for unknown keys."""
        get = self.index.get
        return np.fromiter((get(k, -1) for k in keys), dtype=np.int64, count=len(keys))

    def ensure(self, keys: Iterable[str], seed: int, init_scale: float) -> int:
        """Add rows for keys never seen (in first-seen order), initialised from (seed, id)."""
        new: list[str] = []
        index = self.index
        for k in keys:
            if k not in index:
                index[k] = len(self.ids) + len(new)
                new.append(k)
        if new:
            self.add_rows(new, *init_factors(new, self.rank, seed, init_scale))
        return len(new)

    def add_rows(self, keys: list[str], bias: np.ndarray, vec: np.ndarray,
                 count: np.ndarray | None = None) -> None:
        start = len(self.ids)
        self.ids.extend(keys)
        for j, k in enumerate(keys):
            self.index[k] = start + j
        self.bias = np.concatenate([self.bias, np.asarray(bias, dtype=np.float32)])
        self.vec = np.concatenate([self.vec, np.asarray(vec, dtype=np.float32).reshape(-1, self.rank)])
        extra = np.zeros(len(keys), dtype=np.int64) if count is None else np.asarray(count, dtype=np.int64)
        self.count = np.concatenate([self.count, extra])
        self.touched = np.concatenate([self.touched, np.zeros(len(keys), dtype=bool)])
        fresh = RowStats.zeros(len(keys), self.rank)
        self.gram = np.concatenate([self.gram, fresh.gram])
        self.moment = np.concatenate([self.moment, fresh.moment])
        self.mass = np.concatenate([self.mass, fresh.mass])

    def update(self, rows: np.ndarray, err: np.ndarray, other: np.ndarray, params: ALSParams) -> int:
        """Apply one pass's gradients of the ratings at ``rows``; return rows refused as non-finite."""
        n, s_b, s_v = aggregate(rows, len(self.ids), err, other)
        hit = np.flatnonzero(n)
        new_b, new_v = apply_update(
            self.bias[hit], self.vec[hit], n[hit], s_b[hit], s_v[hit],
            params.learning_rate, params.reg_param, params.reg_bias, params.aggregation,
            self.count[hit], params.history_weight,
        )
        ok = finite_rows(new_b, new_v)
        self.bias[hit[ok]] = new_b[ok]
        self.vec[hit[ok]] = new_v[ok]
        self.touched[hit] = True
        return int((~ok).sum())

    def upsert(self, keys: Sequence[str], bias: np.ndarray, vec: np.ndarray,
               count_inc: np.ndarray, stats: RowStats | None = None) -> None:
        """Overwrite the rows of known keys, append unknown keys (in the given order); add
        ``count_inc`` to the counts, overwrite their statistics (when given) and mark exactly
        these rows as touched."""
        self.touched[:] = False
        if not len(keys):
            return
        rows = self.lookup(keys)
        fresh = np.flatnonzero(rows < 0)
        if len(fresh):
            self.add_rows([keys[int(j)] for j in fresh], bias[fresh], vec[fresh])
            rows = self.lookup(keys)
        self.bias[rows] = bias
        self.vec[rows] = vec
        self.count[rows] += np.asarray(count_inc, dtype=np.int64)
        self.touched[rows] = True
        if stats is not None:
            self.gram[rows], self.moment[rows], self.mass[rows] = stats.gram, stats.moment, stats.mass

    def records(self, only_touched: bool = False) -> list[tuple[str, tuple[float, np.ndarray]]]:
        """``[(id, (bias, vector float32 (rank,)))]``."""
        sel = np.flatnonzero(self.touched) if only_touched else range(len(self.ids))
        return [(self.ids[j], (float(self.bias[j]), self.vec[j].copy())) for j in sel]


def keep_fraction(reservoir_size: int, ratings_seen: int) -> float:
    """Share of all ratings seen that the replay sample keeps: min(1, R / seen)."""
    if reservoir_size <= 0:
        return 0.0
    return 1.0 if ratings_seen <= reservoir_size else reservoir_size / ratings_seen


def keep_mask(priority: np.ndarray, fraction: float) -> np.ndarray:
    """Ratings in the replay sample: priority / 2^64 < fraction (a pure function of the rating).

    Because membership depends only on (rating, fraction), every partition holding a copy of
    an entry (by user and by item) agrees on it without talking to the others, and the sample
    is uniform over the whole history: its expected size is min(seen, R), its spread ±√R.
    """
    if fraction >= 1.0:
        return np.ones(priority.shape, dtype=bool)
    return (np.asarray(priority, dtype=np.uint64) >> np.uint64(11)) < np.uint64(int(fraction * 2.0**53))


@dataclass
class Reservoir:
    """The replay sample's entries held by one partition (see :func:`keep_mask`).

    A ``mirror`` (the item side's copy) keeps item ids and priorities only: enough to know
    which of its items' rows a replay needs.
    """

    mirror: bool = False
    users: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=str))
    items: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=str))
    ratings: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float32))
    priority: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.uint64))

    def __len__(self) -> int:
        return len(self.priority)

    def selected(self, batch_no: int, fraction: float) -> np.ndarray:
        return replay_mask(self.priority, batch_no, fraction)

    def updated(self, keep_frac: float, users: Any, items: Any, ratings: Any, priority: Any) -> Reservoir:
        """A new reservoir: old entries still under the threshold plus the new ones under it."""
        pr = np.concatenate([self.priority, np.asarray(priority, dtype=np.uint64)])
        keep = keep_mask(pr, keep_frac)
        it = np.concatenate([self.items, np.asarray(items, dtype=str)])[keep]
        if self.mirror:
            return Reservoir(True, items=it, priority=pr[keep])
        us = np.concatenate([self.users, np.asarray(users, dtype=str)])[keep]
        rs = np.concatenate([self.ratings, np.asarray(ratings, dtype=np.float32)])[keep]
        return Reservoir(False, us, it, rs, pr[keep])


@dataclass(frozen=True)
class Groups:
    """Ratings grouped by row: ``order`` sorts them by row, ``starts`` opens each group,
    ``keys`` are the rows (ascending) and ``n`` their numbers of ratings."""

    order: np.ndarray
    starts: np.ndarray
    keys: np.ndarray
    n: np.ndarray

    @classmethod
    def of(cls, rows: np.ndarray) -> Groups:
        order = np.argsort(rows, kind="stable")
        sorted_rows = rows[order]
        starts = np.flatnonzero(np.r_[True, sorted_rows[1:] != sorted_rows[:-1]]) if len(rows) \
            else np.zeros(0, dtype=np.int64)
        return cls(order, starts, sorted_rows[starts], np.diff(np.r_[starts, len(rows)]).astype(np.float64))


def segment_sums(rows: np.ndarray, q: np.ndarray, target: np.ndarray, groups: Groups | None = None,
                 weights: np.ndarray | None = None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per row with ratings: (row numbers ascending, n = Σ w, G = Σ w q qᵀ, h = Σ w·target·q),
    float64; w = 1 without ``weights``.

    Sorted once (or ``groups`` of the same rows, reused), then summed with ``reduceat``.
    """
    rank = q.shape[1]
    if not len(rows):
        return (np.zeros(0, dtype=np.int64), np.zeros(0), np.zeros((0, rank, rank)), np.zeros((0, rank)))
    g = groups or Groups.of(rows)
    qs = np.asarray(q, dtype=np.float64)[g.order]
    if weights is None:
        n, wq = g.n, qs
    else:
        w = np.asarray(weights, dtype=np.float64)[g.order]
        n, wq = np.add.reduceat(w, g.starts), qs * w[:, None]
    h = np.add.reduceat(np.asarray(target, dtype=np.float64)[g.order][:, None] * wq, g.starts, axis=0)
    gram = np.empty((len(g.keys), rank, rank))
    # One column of the upper triangle at a time: temporaries of (ratings × rank) at most.
    # (Measured: as fast as any layout of the full outer products, which need rank² per rating.)
    for c in range(rank):
        upper = np.add.reduceat(wq[:, c:c + 1] * qs[:, c:], g.starts, axis=0)
        gram[:, c, c:] = upper
        gram[:, c:, c] = upper
    return g.keys, n, gram, h


def solve_rows(gram: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """x_k = gram_k⁻¹ rhs_k for a stack of symmetric systems; NaN rows where one is singular."""
    try:
        return np.linalg.solve(gram, rhs[:, :, None])[:, :, 0]
    except np.linalg.LinAlgError:  # one singular system (λ = 0 and too few ratings): row by row
        out = np.full(rhs.shape, np.nan)
        for k in range(len(rhs)):
            with contextlib.suppress(np.linalg.LinAlgError):
                out[k] = np.linalg.solve(gram[k], rhs[k])
        return out


def rls_half_step(mu: float, rates: np.ndarray, rows: np.ndarray, table: FactorTable,
                  other_rows: np.ndarray, other: FactorTable, params: ALSParams,
                  groups: Groups | None = None) -> int:
    """One side's update in a pass with ``vector_step="rls"`` (module docstring): every row
    of ``table`` with ratings in the pass takes the damped, counts-aware bias step on the
    errors of the current parameters; then its vector becomes the ridge solution of its
    statistics plus the pass's ratings, against the residual after the new bias. Rows whose
    update is not finite keep their values; returns how many."""
    q_bias = other.bias[other_rows].astype(np.float64)
    q_vec = other.vec[other_rows].astype(np.float64)
    g = groups or Groups.of(rows)
    if not len(g.keys):
        return 0
    err = rates - predict_raw(mu, table.bias[rows], q_bias, table.vec[rows], q_vec)
    s_b = np.bincount(rows, weights=err, minlength=len(table))[g.keys]
    new_b = table.bias.astype(np.float64)
    new_b[g.keys] = bias_step(table.bias[g.keys], g.n, s_b, params.learning_rate,
                              params.reg_bias, params.aggregation, table.count[g.keys],
                              params.history_weight)
    keys, n_k, gram, h = segment_sums(rows, q_vec, rates - mu - q_bias - new_b[rows], g)
    beta = params.forgetting
    lhs = beta * table.gram[keys].astype(np.float64) + gram
    diag = params.reg_param * (beta * table.mass[keys].astype(np.float64) + n_k) + 1e-9
    lhs[:, np.arange(table.rank), np.arange(table.rank)] += diag[:, None]
    with np.errstate(over="ignore", invalid="ignore"):
        new_v = solve_rows(lhs, beta * table.moment[keys].astype(np.float64) + h)
        nb, nv = new_b[keys].astype(np.float32), new_v.astype(np.float32)
    ok = finite_rows(nb, nv)
    table.bias[keys[ok]] = nb[ok]
    table.vec[keys[ok]] = nv[ok]
    table.touched[keys] = True
    return int((~ok).sum())


def fold_statistics(mu: float, rates: np.ndarray, rows: np.ndarray, table: FactorTable,
                    other_rows: np.ndarray, other: FactorTable, forgetting: float,
                    maturity: float = 0.0) -> None:
    """Add a learned batch's own ratings to its rows' statistics (decayed by β first), with
    the parameters as the batch left them: A += Σ w QQᵀ, m += Σ w (r − μ − b − c) Q, N += Σ w.

    ``maturity`` c > 0 weighs each rating by how settled the partner's vector is,
    w = N_p / (N_p + c) with N_p the partner's ratings learned before the batch (w = 1 for
    c = 0). A vector learned from a handful of ratings is mostly its random start, and unlike
    a gradient step, what enters the statistics stays there.
    """
    q_vec = other.vec[other_rows].astype(np.float64)
    target = rates - mu - other.bias[other_rows].astype(np.float64) - table.bias[rows].astype(np.float64)
    w = None
    if maturity > 0:
        partner_n = other.count[other_rows].astype(np.float64)
        w = partner_n / (partner_n + maturity)
    keys, n, gram, h = segment_sums(rows, q_vec, target, weights=w)
    if not len(keys):
        return
    beta = forgetting
    table.gram[keys] = (beta * table.gram[keys].astype(np.float64) + gram).astype(np.float32)
    table.moment[keys] = (beta * table.moment[keys].astype(np.float64) + h).astype(np.float32)
    table.mass[keys] = (beta * table.mass[keys].astype(np.float64) + n).astype(np.float32)


def seed_statistics(table: FactorTable, partner_moment: np.ndarray, reg_param: float) -> None:
    """Statistics for rows that have learned ratings but carry none (a model restored from
    factors and counts, or started from batch ALS): A = N·C with C the count-weighted mean
    of Q Qᵀ over the partner side, N the row's count, and m = (A + λN I) V, so the row's
    ridge solution is its current vector until new ratings arrive."""
    need = np.flatnonzero((table.mass == 0) & (table.count > 0))
    if not len(need):
        return
    count = table.count[need].astype(np.float64)
    gram = count[:, None, None] * np.asarray(partner_moment, dtype=np.float64)[None]
    lhs = gram.copy()
    lhs[:, np.arange(table.rank), np.arange(table.rank)] += (reg_param * count)[:, None]
    table.gram[need] = gram.astype(np.float32)
    table.moment[need] = (lhs @ table.vec[need].astype(np.float64)[:, :, None])[:, :, 0].astype(np.float32)
    table.mass[need] = count.astype(np.float32)


def second_moment(vec: np.ndarray, count: np.ndarray) -> tuple[np.ndarray, float]:
    """(Σ count·v vᵀ, Σ count) of some rows: summed over partitions, their ratio is the C of
    :func:`seed_statistics`."""
    v = np.asarray(vec, dtype=np.float64)
    w = np.asarray(count, dtype=np.float64)
    return (v * w[:, None]).T @ v, float(w.sum())


def learn_batch(
    params: ALSParams,
    mu: float,
    mu_before: float,
    n_new: int,
    rates: np.ndarray,
    u_rows: np.ndarray,
    i_rows: np.ndarray,
    user_bias: np.ndarray,
    user_vec: np.ndarray,
    item_bias: np.ndarray,
    item_vec: np.ndarray,
    user_count: np.ndarray | None = None,
    item_count: np.ndarray | None = None,
    user_stats: RowStats | None = None,
    item_stats: RowStats | None = None,
) -> tuple[float, int]:
    """``params.iterations`` parallel passes over one mini-batch's working set, in place.

    ``rates[k]`` is rated by row ``u_rows[k]`` of (user_bias, user_vec) for row ``i_rows[k]`` of
    (item_bias, item_vec); the first ``n_new`` ratings are the batch's own, the rest replayed.
    Each pass: ε from the parameters at the start of the pass, then every touched user and item
    row takes its aggregated step (module docstring); with ``vector_step="rls"`` users and then
    items take :func:`rls_half_step`, and the batch's own ratings are folded into the rows'
    statistics (``user_stats``/``item_stats``, updated in place; zeros when not given) at the
    end. Rows whose update would be non-finite keep their old values. Returns (prequential
    SSE of the new ratings, rows refused).

    The prequential prediction is the one the model would have served before the batch: with
    μ before the batch (``mu_before``), clipped to the rating scale.
    """
    lo, hi = params.rating_min, params.rating_max

    def table(bias: np.ndarray, vec: np.ndarray, count: np.ndarray | None, stats: RowStats | None):
        n = len(bias)
        st = stats or RowStats.zeros(n, params.rank)
        return FactorTable(params.rank, [""] * n, {}, bias, vec,
                           np.zeros(n, dtype=np.int64) if count is None else np.asarray(count, dtype=np.int64),
                           np.zeros(n, dtype=bool), st.gram, st.moment, st.mass)

    users = table(user_bias, user_vec, user_count, user_stats)
    items = table(item_bias, item_vec, item_count, item_stats)
    rates = np.asarray(rates, dtype=np.float64)
    preq = 0.0
    refused = 0
    rls = params.vector_step == "rls"
    if rls:
        u_groups, i_groups = Groups.of(u_rows), Groups.of(i_rows)
    for it in range(params.iterations):
        if it == 0 or not rls:
            bu, uv = users.bias[u_rows], users.vec[u_rows].astype(np.float64)
            bi, iv = items.bias[i_rows], items.vec[i_rows].astype(np.float64)
            pred = predict_raw(mu, bu, bi, uv, iv)
        if it == 0:
            before = np.clip(pred[:n_new] - mu + mu_before, lo, hi)
            preq = float(((rates[:n_new] - before) ** 2).sum())
        if rls:
            refused += rls_half_step(mu, rates, u_rows, users, i_rows, items, params, u_groups)
            refused += rls_half_step(mu, rates, i_rows, items, u_rows, users, params, i_groups)
            continue
        err = rates - pred
        refused += users.update(u_rows, err, iv, params)
        refused += items.update(i_rows, err, uv, params)
    if rls:
        new_r, new_u, new_i = rates[:n_new], u_rows[:n_new], i_rows[:n_new]
        # Users weigh items by maturity; items take every user's rating at full weight
        # (measured: weighting both sides lost accuracy on sparse ml-latest-small).
        fold_statistics(mu, new_r, new_u, users, new_i, items, params.forgetting, params.maturity)
        fold_statistics(mu, new_r, new_i, items, new_u, users, params.forgetting)
    return preq, refused


# ---------------------------------------------------------------------------------------------
# Parameters and the single-process reference of the whole streaming algorithm
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ALSParams:
    """Hyper-parameters of streaming ALS (defaults chosen on synthetic data and a validation
    part of MovieLens training data, never on a test split).

    ``reservoir_size`` bounds the replay memory: a uniform sample of min(seen, R) past ratings
    (±√R) is kept; ``replay_ratio`` × (batch size) of them are replayed with each mini-batch.
    ``iterations`` parallel passes are made over (batch + replay). ``vector_step``: ``"rls"``
    (vectors solve their accumulated least squares, forgetting factor ``forgetting`` β per
    touch, items' ratings weighed into users' statistics by ``maturity``, see
    :func:`fold_statistics`) or ``"sgd"`` (the seeds' step, ``learning_rate``); biases always
    take the SGD step.

    The ranking model (:mod:`modeler.core.ranking`, trained beside it when ``ranking``):
    ``ranking_rank``, ``ranking_reg_param`` (λ, scaled by the key's positives with
    ``ranking_reg_scaling="count"``), ``ranking_alpha`` (c = 1 + α·w), ``ranking_iterations``
    passes per batch, ``weighting`` (event -> w, :class:`common.feedback.Weighting`), and
    ``ranking_probe_size`` positives per batch probed for prequential recall@10 (0: off).
    It shares ``seed``, ``init_scale``, ``maturity`` and ``reservoir_size`` (its own replay
    sample of positives, of the same size), replaying ``ranking_replay_ratio`` × (batch
    positives) of them per batch; ``ranking_replay_scope`` says which keys a replayed positive
    re-solves (:func:`modeler.core.ranking.replay_solves_all`).
    """

    rank: int = 10
    iterations: int = 2
    reg_param: float = 0.1
    reg_bias: float = 0.1
    learning_rate: float = 0.1
    seed: int = 42
    init_scale: float = 0.1
    aggregation: str = "damped"
    history_weight: float = 4.0
    reservoir_size: int = 50_000
    replay_ratio: float = 1.0
    num_partitions: int = 8
    rating_min: float = 0.5
    rating_max: float = 5.0
    vector_step: str = "rls"
    forgetting: float = 1.0
    maturity: float = 30.0
    ranking: bool = True
    # Ranking defaults chosen on validation parts of ml-latest-small and ml-100k training
    # data (docs/ranking_model.md): the best mean NDCG@10 of the grid, rank 24 being as
    # good as 32 for half the cost.
    ranking_rank: int = 24
    ranking_iterations: int = 2
    ranking_reg_param: float = 0.1
    ranking_alpha: float = 2.0
    ranking_reg_scaling: str = "count"
    ranking_probe_size: int = 256
    ranking_replay_ratio: float = 6.0
    ranking_replay_scope: str = "auto"
    ranking_forgetting: float = 1.0
    # Bounded per-key history (modeler.core.ranking, "History"): each key keeps its newest
    # ``ranking_history`` positives and is re-solved exactly against them with today's
    # partner vectors (0: off, the stale statistics + replay above); each batch also
    # re-solves a hashed sweep of keys holding ~``ranking_sweep`` × (batch positives)
    # history entries. Chosen on validation parts of three sets (docs/ranking_model.md).
    ranking_history: int = 256
    ranking_sweep: float = 6.0
    weighting: Weighting = field(default_factory=Weighting)

    def __post_init__(self) -> None:
        if isinstance(self.weighting, dict):  # as stored by to_dict()
            object.__setattr__(self, "weighting", Weighting.from_dict(self.weighting))
        if self.ranking_rank < 1 or self.ranking_iterations < 1:
            raise ValueError("ranking_rank and ranking_iterations must be >= 1")
        if (self.ranking_reg_param < 0 or self.ranking_alpha < 0 or self.ranking_probe_size < 0
                or self.ranking_replay_ratio < 0):
            raise ValueError("ranking_reg_param, ranking_alpha, ranking_probe_size and "
                             "ranking_replay_ratio must be >= 0")
        if not 0.0 < self.ranking_forgetting <= 1.0:
            raise ValueError("ranking_forgetting must be in (0, 1]")
        if self.ranking_history < 0 or not self.ranking_sweep >= 0:
            raise ValueError("ranking_history and ranking_sweep must be >= 0")
        if self.ranking_replay_scope not in ("auto", "all", "batch"):
            raise ValueError("ranking_replay_scope must be 'auto', 'all' or 'batch'")
        if self.ranking_reg_scaling not in ("count", "constant"):
            raise ValueError("ranking_reg_scaling must be 'count' or 'constant'")
        if self.rank < 1:
            raise ValueError("rank must be >= 1")
        if self.iterations < 1:
            raise ValueError("iterations must be >= 1")
        if self.num_partitions < 1:
            raise ValueError("num_partitions must be >= 1")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}")
        if self.vector_step not in VECTOR_STEPS:
            raise ValueError(f"vector_step must be one of {VECTOR_STEPS}")
        if not 0.0 < self.forgetting <= 1.0:
            raise ValueError("forgetting must be in (0, 1]")
        if self.maturity < 0:
            raise ValueError("maturity must be >= 0")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise ValueError("learning_rate must be a positive number")
        if self.reg_param < 0 or self.reg_bias < 0:
            raise ValueError("reg_param and reg_bias must be >= 0")
        if self.reservoir_size < 0 or self.replay_ratio < 0:
            raise ValueError("reservoir_size and replay_ratio must be >= 0")
        if not self.rating_min < self.rating_max:
            raise ValueError("rating_min must be below rating_max")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def replay_fraction(params: ALSParams, expected_new: int, ratings_seen_before: int) -> float:
    """Share of the replay sample to replay with a batch of about ``expected_new`` ratings."""
    held = min(params.reservoir_size, ratings_seen_before)
    if held <= 0 or params.replay_ratio <= 0 or expected_new <= 0:
        return 0.0
    return min(1.0, params.replay_ratio * expected_new / held)


def split_records(records: Iterable[Any]) -> tuple[list[Any], list[Any], list[Any], list[Any], int]:
    """Columns (users, items, ratings, timestamps) of ``(user, item, rating[, timestamp])``
    records, and the number of records that are not such tuples at all."""
    us: list[Any] = []
    its: list[Any] = []
    rs: list[Any] = []
    ts: list[Any] = []
    bad = 0
    for rec in records:
        try:
            u, i, r = rec[0], rec[1], rec[2]
            t = rec[3] if len(rec) > 3 else 0
        except (TypeError, IndexError, KeyError):
            bad += 1
            continue
        us.append(u)
        its.append(i)
        rs.append(r)
        ts.append(t)
    return us, its, rs, ts, bad


Columns = tuple[list[Any], list[Any], list[Any], list[Any]]


def split_events(records: Iterable[Any]) -> tuple[Columns, Columns, int]:
    """:func:`split_records` of the ratings among ``records``, and the implicit events apart:
    a record ``(user, item, None, timestamp, weight)`` (a 5th field not None) is an implicit
    event. Returns (rating columns, implicit columns, bad shapes): each columns a tuple
    (users, items, values, timestamps) with values the rating or the implicit weight."""
    recs = records if isinstance(records, list) else list(records)
    if all(type(rec) is tuple and len(rec) == 4 for rec in recs):
        # Every record a plain (user, item, rating, timestamp) tuple (the common batch):
        # columns in one transpose, nothing to check per record.
        cols = [[rec[0] for rec in recs], [rec[1] for rec in recs], [rec[2] for rec in recs],
                [rec[3] for rec in recs]]
        return cols, [[], [], [], []], 0  # type: ignore[return-value]
    ratings: list[Any] = []
    implicit: list[Any] = []
    bad = 0
    for rec in recs:
        try:
            weight = rec[4] if len(rec) > 4 else None
        except TypeError:
            bad += 1
            continue
        if weight is None:
            ratings.append(rec)
        else:
            implicit.append((rec[0], rec[1], weight, rec[3]))
    us, its, rs, ts, bad_r = split_records(ratings)
    ius, iis, iws, its_, bad_i = split_records(implicit)
    return [us, its, rs, ts], [ius, iis, iws, its_], bad + bad_r + bad_i  # type: ignore[return-value]


def validate_implicit(users: Sequence[Any], items: Sequence[Any], weights: Sequence[Any],
                      timestamps: Sequence[Any]) -> tuple[list[str], list[str], np.ndarray, np.ndarray, int]:
    """Keep implicit events with non-empty ids and a finite weight >= 0 (the Kafka reader
    also enforces the EVENT_MAX_WEIGHT cap); return them + #rejected."""
    return validate_arrays(users, items, weights, timestamps, 0.0, math.inf)


def validate_arrays(
    users: Sequence[Any], items: Sequence[Any], ratings: Sequence[Any], timestamps: Sequence[Any],
    rating_min: float, rating_max: float,
) -> tuple[list[str], list[str], np.ndarray, np.ndarray, int]:
    """Keep ratings with non-empty ids and a finite rating on the scale; return them + #rejected."""
    fast = _validate_plain(users, items, ratings, timestamps, rating_min, rating_max)
    if fast is not None:
        return fast
    ku: list[str] = []
    ki: list[str] = []
    kr: list[float] = []
    kt: list[int] = []
    rejected = 0
    for u, i, r, t in zip(users, items, ratings, timestamps, strict=True):
        try:
            rf = float(r)
            tf = int(t) if t is not None else 0
        except (TypeError, ValueError):
            rejected += 1
            continue
        if (u is None or i is None or not math.isfinite(rf) or not rating_min <= rf <= rating_max
                or str(u) == "" or str(i) == ""):
            rejected += 1
            continue
        ku.append(str(u))
        ki.append(str(i))
        kr.append(rf)
        kt.append(tf)
    return ku, ki, np.asarray(kr, dtype=np.float64), np.asarray(kt, dtype=np.int64), rejected


def _validate_plain(
    users: Sequence[Any], items: Sequence[Any], ratings: Sequence[Any], timestamps: Sequence[Any],
    rating_min: float, rating_max: float,
) -> tuple[list[str], list[str], np.ndarray, np.ndarray, int] | None:
    """:func:`validate_arrays` vectorised, for columns of plain types only (ids ``str``,
    ratings ``float``/``int``, timestamps ``int``): the same answer without a Python step per
    record. None for anything else (the per-record path decides those)."""
    n = len(users)
    if not (len(items) == len(ratings) == len(timestamps) == n):
        return None
    if not (all(type(u) is str for u in users) and all(type(i) is str for i in items)
            and all(type(r) is float or type(r) is int for r in ratings)
            and all(type(t) is int for t in timestamps)):
        return None
    try:
        rf = np.asarray(ratings, dtype=np.float64).reshape(n)
        tf = np.asarray(timestamps, dtype=np.int64).reshape(n)
    except (OverflowError, ValueError, TypeError):
        return None
    with np.errstate(invalid="ignore"):
        ok = np.isfinite(rf) & (rf >= rating_min) & (rf <= rating_max)
    ok &= np.fromiter((u != "" and i != "" for u, i in zip(users, items)), dtype=bool, count=n)
    keep = ok.tolist()
    return (list(itertools.compress(users, keep)), list(itertools.compress(items, keep)), rf[ok], tf[ok],
            int(n - ok.sum()))


class ParamsAttributes:
    """``rank`` and ``reg_param`` of a model whose ``params`` is an :class:`ALSParams`: what the
    service and the publish flow read of the single model and of the search's leader alike."""

    params: Any  # an ALSParams: an attribute, or a property of the class using this

    @property
    def rank(self) -> int:
        return int(self.params.rank)

    @property
    def reg_param(self) -> float:
        return float(self.params.reg_param)


@dataclass
class BatchResult:
    n_ratings: int
    n_rejected: int
    prequential_sse: float
    new_users: int
    new_items: int
    n_replayed: int
    n_diverged: int
    # The ranking model (modeler.core.ranking): implicit events learned, positives, and the
    # prequential recall@10 counters (hits among probes, before the batch was learned).
    n_implicit: int = 0
    ranking_positives: int = 0
    ranking_hits: int = 0
    ranking_probes: int = 0


class LocalStreamingALS:
    """The whole streaming algorithm in one process: the reference for the Spark version and a
    fast way to study accuracy. Same validation, newcomer initialisation, replay sample and
    :func:`learn_batch` as :class:`modeler.spark.streaming_als.StreamingALS`.

    The replay fraction of batch t uses the size of batch t−1 (the Spark driver does not know
    a batch's size before it is learned); the first batch replays nothing.
    """

    def __init__(self, params: ALSParams | None = None, **kwargs: Any) -> None:
        self.params = params or ALSParams(**kwargs)
        p = self.params
        self.users = FactorTable(p.rank)
        self.items = FactorTable(p.rank)
        self.reservoir = Reservoir()
        self.mu = 0.0
        self.rating_sum = 0.0
        self.ratings_seen = 0
        self.batches = 0
        self.last_batch_size = 0
        self.ranking: Any = None
        if p.ranking:
            from modeler.core.ranking import LocalRankingALS  # ranking builds on this module

            self.ranking = LocalRankingALS(p)

    def train(self, batch: Iterable[tuple[Any, ...]], explicit: bool = True, ranking: bool = True) -> BatchResult:
        """Learn one batch of ``(user, item, rating[, timestamp])`` ratings and
        ``(user, item, None, timestamp, weight)`` implicit events. Ratings train the explicit
        model; ratings (through ``weighting``) and implicit events train the ranking model.
        ``explicit=False`` / ``ranking=False`` leave that model untouched (its counters in
        the result are 0): the online search trains a model its candidates share once
        (:mod:`modeler.spark.side_by_side`)."""
        p = self.params
        (us, its, rs, ts), (ius, iis, iws, its_), bad = split_events(batch)
        users, items, rates, stamps, rejected = validate_arrays(us, its, rs, ts, p.rating_min,
                                                                p.rating_max)
        iu, ii, iw, it_, irej = validate_implicit(ius, iis, iws, its_)
        rejected += bad + irej
        result = (self._train_explicit(users, items, rates, stamps, rejected) if explicit
                  else BatchResult(0, rejected, 0.0, 0, 0, 0, 0))
        result.n_implicit = len(iw)
        if self.ranking is not None and ranking:
            rr = self.ranking.train(users + iu, items + ii,
                                    np.concatenate([rates, np.full(len(iw), np.nan)]),
                                    np.concatenate([np.full(len(rates), np.nan), iw]),
                                    np.concatenate([stamps, it_]))
            result.ranking_positives, result.ranking_hits, result.ranking_probes = (
                rr.positives, rr.probe_hits, rr.probes)
        return result

    @property
    def ranking_users(self) -> FactorTable:
        """The ranking model's user rows (``.ids``, ``.vec``; bias unused)."""
        return self._need_ranking().users

    @property
    def ranking_items(self) -> FactorTable:
        """The ranking model's item rows (``.ids``, ``.vec``)."""
        return self._need_ranking().items

    def _need_ranking(self) -> Any:
        if self.ranking is None:
            raise RuntimeError("this model has no ranking model (ALSParams.ranking is False)")
        return self.ranking

    def _train_explicit(self, users: list[str], items: list[str], rates: np.ndarray,
                        stamps: np.ndarray, rejected: int) -> BatchResult:
        p = self.params
        n_new = len(rates)
        if n_new == 0:
            return BatchResult(0, rejected, 0.0, 0, 0, 0, 0)
        self.batches += 1
        mu_before = self.mu if self.ratings_seen else 0.5 * (p.rating_min + p.rating_max)
        frac = replay_fraction(p, self.last_batch_size, self.ratings_seen)
        sel = self.reservoir.selected(self.batches, frac)
        rep_u, rep_i, rep_r = self.reservoir.users[sel], self.reservoir.items[sel], self.reservoir.ratings[sel]

        self.rating_sum += float(rates.sum())
        self.ratings_seen += n_new
        self.mu = self.rating_sum / self.ratings_seen
        self.last_batch_size = n_new

        self.users.touched[:] = False
        self.items.touched[:] = False
        new_users = self.users.ensure(users, p.seed, p.init_scale)
        new_items = self.items.ensure(items, p.seed, p.init_scale)
        all_u = users + rep_u.tolist()
        all_i = items + rep_i.tolist()
        all_r = np.concatenate([rates, rep_r.astype(np.float64)])
        ur = self.users.rows(all_u)
        ir = self.items.rows(all_i)
        uniq_u, u_local = np.unique(ur, return_inverse=True)
        uniq_i, i_local = np.unique(ir, return_inverse=True)
        ub, uv = self.users.bias[uniq_u].copy(), self.users.vec[uniq_u].copy()
        ib, iv = self.items.bias[uniq_i].copy(), self.items.vec[uniq_i].copy()
        us, is_ = self.users.stats(uniq_u), self.items.stats(uniq_i)
        preq, refused = learn_batch(p, self.mu, mu_before, n_new, all_r, u_local, i_local, ub, uv,
                                    ib, iv, self.users.count[uniq_u], self.items.count[uniq_i],
                                    us, is_)
        self.users.bias[uniq_u], self.users.vec[uniq_u] = ub, uv
        self.items.bias[uniq_i], self.items.vec[uniq_i] = ib, iv
        for t, rows, st in ((self.users, uniq_u, us), (self.items, uniq_i, is_)):
            t.gram[rows], t.moment[rows], t.mass[rows] = st.gram, st.moment, st.mass
        self.users.touched[uniq_u] = True
        self.items.touched[uniq_i] = True
        np.add.at(self.users.count, ur[:n_new], 1)
        np.add.at(self.items.count, ir[:n_new], 1)

        prio = rating_priority(users, items, stamps, p.seed)
        self.reservoir = self.reservoir.updated(
            keep_fraction(p.reservoir_size, self.ratings_seen), users, items, rates, prio)
        return BatchResult(n_new, rejected, preq, new_users, new_items, len(all_r) - n_new, refused)

    def predict(self, users: Sequence[str], items: Sequence[str]) -> np.ndarray:
        """Clipped predictions; unknown users/items contribute zero bias and vector."""
        p = self.params
        return predict_known(self.mu, self.users, self.items, users, items, p.rating_min, p.rating_max)


def predict_known(mu: float, users: FactorTable, items: FactorTable, user_ids: Sequence[str],
                  item_ids: Sequence[str], lo: float, hi: float) -> np.ndarray:
    ur = users.lookup(user_ids)
    ir = items.lookup(item_ids)
    bu, uv = gather(users, ur)
    bi, iv = gather(items, ir)
    return np.clip(predict_raw(mu, bu, bi, uv, iv), lo, hi)


def gather(table: FactorTable, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(bias, vector) float64 rows; zeros where row == −1 (unknown key)."""
    known = rows >= 0
    bias = np.zeros(len(rows), dtype=np.float64)
    vec = np.zeros((len(rows), table.rank), dtype=np.float64)
    bias[known] = table.bias[rows[known]]
    vec[known] = table.vec[rows[known]]
    return bias, vec


def rmse(actual: np.ndarray, predicted: np.ndarray) -> float:
    """√(mean((r − r̂)²))."""
    d = np.asarray(actual, dtype=np.float64) - np.asarray(predicted, dtype=np.float64)
    return float(np.sqrt(np.mean(d * d))) if len(d) else float("nan")
