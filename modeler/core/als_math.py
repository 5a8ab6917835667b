"""Streaming bias-SGD matrix factorisation: the maths, in numpy only (no Spark, no Redis).
Here: the least-squares (RLS) steps of a batch, ``ALSParams`` (the one source of defaults) and
the single-process reference :class:`LocalStreamingALS`. It builds on
:mod:`~modeler.core.hashing` (stable ids → partitions, initial factors, priorities),
:mod:`~modeler.core.tables` (factor tables, statistics, the reservoir),
:mod:`~modeler.core.sgd` (the bias-SGD step and its per-rating references) and
:mod:`~modeler.core.events` (a batch as validated columns), and re-exports their names,
which the Spark stages, the ranking model and the tests import from here. Longer than most
because ``ALSParams`` documents every hyper-parameter and the reference runs the whole
algorithm beside the steps it is made of.

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
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from common.feedback import Weighting

# The topics this module builds on, re-exported: the Spark stages, the ranking model, the
# commands and the tests import them from here.
from modeler.core.events import (  # noqa: F401
    Columns,
    split_events,
    split_records,
    validate_arrays,
    validate_implicit,
)
from modeler.core.hashing import (  # noqa: F401
    hash_ids,
    init_factors,
    partition_of,
    rating_priority,
    replay_mask,
    splitmix64,
    stable_hash,
)
from modeler.core.sgd import (  # noqa: F401
    AGGREGATIONS,
    aggregate,
    apply_update,
    bias_step,
    finite_rows,
    predict_raw,
    reference_batch_pass,
    reference_sgd_step,
    step_sizes,
)
from modeler.core.tables import (  # noqa: F401
    FactorTable,
    Groups,
    Reservoir,
    RowStats,
    each_run,
    fold_runs,
    group_mass,
    keep_fraction,
    keep_mask,
)

VECTOR_STEPS = ("rls", "sgd")

# ---------------------------------------------------------------------------------------------
# Least-squares statistics and the batch step
# ---------------------------------------------------------------------------------------------


def segment_sums(rows: np.ndarray, q: np.ndarray, target: np.ndarray, groups: Groups | None = None,
                 weights: np.ndarray | None = None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per row with ratings: (row numbers ascending, n = Σ w, G = Σ w q qᵀ, h = Σ w·target·q),
    float64; w = 1 without ``weights``.

    Grouped once (or ``groups`` of the same rows, reused), then summed by
    :meth:`Groups.moments` (padded batched products).
    """
    rank = q.shape[1]
    if not len(rows):
        return (np.zeros(0, dtype=np.int64), np.zeros(0), np.zeros((0, rank, rank)), np.zeros((0, rank)))
    g = groups or Groups.of(rows)
    target = np.asarray(target, dtype=np.float64)
    if weights is None:
        gram, h = g.moments(q, np.ones(len(rows)), target)
    else:
        w = np.asarray(weights, dtype=np.float64)
        gram, h = g.moments(q, w, w * target)
    return g.keys, group_mass(g, weights), gram, h


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
    target = rates - mu - q_bias - new_b[rows]
    ones = np.ones(len(rows))
    beta = params.forgetting
    diagonal = np.arange(table.rank)

    def solve_run(_: slice, run: Groups) -> int:
        keys, n_k = run.keys, run.n
        gram, h = run.moments(q_vec, ones, target)
        lhs = beta * table.gram[keys].astype(np.float64) + gram
        diag = params.reg_param * (beta * table.mass[keys].astype(np.float64) + n_k) + 1e-9
        lhs[:, diagonal, diagonal] += diag[:, None]
        with np.errstate(over="ignore", invalid="ignore"):
            new_v = solve_rows(lhs, beta * table.moment[keys].astype(np.float64) + h)
            nb, nv = new_b[keys].astype(np.float32), new_v.astype(np.float32)
        ok = finite_rows(nb, nv)
        table.bias[keys[ok]] = nb[ok]
        table.vec[keys[ok]] = nv[ok]
        table.touched[keys] = True
        return int((~ok).sum())

    # One run of keys at a time (tables.each_run): the same bits as segment_sums over all of
    # them, a fraction of the memory traffic, both cores.
    return sum(each_run(g, table.rank, solve_run))


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
    g = Groups.of(rows)
    gram_w, rhs_w = (np.ones(len(rows)), target) if w is None else (w, w * target)
    fold_runs(table, g, q_vec, gram_w, rhs_w, group_mass(g, w), forgetting)


def seed_statistics(table: FactorTable, partner_moment: np.ndarray, reg_param: float, start: int = 0) -> None:
    """Statistics for rows (from row ``start`` on) that have learned ratings but carry none
    (a model restored from factors and counts, or started from batch ALS): A = N·C with C
    the count-weighted mean of Q Qᵀ over the partner side, N the row's count, and
    m = (A + λN I) V, so the row's ridge solution is its current vector until new ratings
    arrive."""
    need = start + np.flatnonzero((table.mass[start:] == 0) & (table.count[start:] > 0))
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
