"""Streaming implicit-feedback ALS (the ranking model): the maths, in numpy only.
Long because the solver, its statistics, the replay and probe helpers and the single-process
reference (:class:`LocalRankingALS`) share one row layout and are tested against each other;
the Spark stages only call into it.

Model (Hu, Koren & Volinsky, ICDM 2008): every observed (user, item) pair with weight w > 0
(:mod:`common.feedback`: a liked rating, a play count) is a positive, p_ui = 1, with
confidence c_ui = 1 + α·w; every other cell is p_ui = 0 with confidence 1. The score of an
item for a user is x_u · y_i (a ranking score, not a rating). Minimising
Σ_{u,i} c_ui (p_ui − x_u·y_i)² + λ-terms over ALL cells gives, for a user, the closed form::

    x_u = (YᵀY + Σ_{i∈I_u} (c_ui − 1) y_i y_iᵀ + λ_u I)⁻¹ Σ_{i∈I_u} c_ui y_i

where YᵀY (rank × rank, the item Gramian) stands for the unobserved cells, which are never
materialised; items are solved symmetrically against XᵀX. λ_u = λ·n_u (n_u: the key's
positives, the ALS-WR / Spark ML scaling) with ``reg_scaling="count"``, λ_u = λ with
``"constant"``.

Streaming (one pass over micro-batches, the explicit model's structure, see
:mod:`modeler.core.als_math`):

* Each key keeps least-squares statistics of the positives it has learned:
  A_k = Σ m (c − 1) q qᵀ, b_k = Σ m c q, N_k = Σ m (q: the partner's vector as it was when
  the positive was folded in, m a maturity weight, below). A pass solves every key with
  positives in the batch or in its replay::

      x_k = (G_other + A_k + Σ_pass (c − 1) q qᵀ + λ_k I)⁻¹ (b_k + Σ_pass c q)

  users first (against the item Gramian), then items (against the user Gramian updated
  with the users' new rows); ``iterations`` passes. The batch's own positives are folded
  into (A, b, N) once the batch is learned; replayed ones are not (they were folded when
  first seen).
* The Gramians G_X = XᵀX, G_Y = YᵀY over every row of the model are kept incrementally:
  after a batch, G += Σ_rows (x_new x_newᵀ − x_old x_oldᵀ) over the rows the batch changed
  (a newcomer's old row is 0): O(changed rows · rank²), never O(model). In Spark they are
  carried by the driver (rank² floats each) and handed to the one task that learns a batch.
* Per-key history (the default, ``ranking_history`` N > 0): each key keeps its newest N
  positives (:class:`KeyHistory`) and only the positives evicted from it are in (A, b, N),
  folded in as they leave. A pass solves the batch's keys and a hashed sweep of other keys
  (:func:`sweep_mask`) exactly against their histories with today's partner vectors
  (:func:`learn_history_batch`): ALS restricted to those keys. No replay then. The
  stale-statistics scheme below is what ``ranking_history=0`` runs.
* Stale statistics: A_k, b_k hold partner vectors as they were when folded in, and early
  vectors are mostly their random start. Two things bound the damage: a user's statistics
  weigh each positive by the item's maturity m = N_i / (N_i + c) (N_i: the item's positives
  learned before the batch), and a bounded uniform replay sample of past positives
  re-enters every pass with today's vectors (it is what keeps re-solving a key against
  current partners). Measured choices: docs/ranking_model.md.

Memory: per key (rank² + rank + 2) × 4 bytes (vector, statistics, count), with the history
at most N × (4 L + 4) bytes more (L: the partner ids' length in characters), two rank × rank
float64 Gramians, the replay sample (≤ ``reservoir_size`` expected positives) and, in the
one-partition layout only, the seen (user, item) pairs for the prequential probe
(8 bytes per distinct pair, see :class:`SeenPairs`).

The module holds the maths, the prequential probe and the single-process reference
(:class:`LocalRankingALS`) together: the Spark stages call exactly these functions, and the
reference is what their tests compare against.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from common.feedback import Weighting
from modeler.core.als_math import (
    FactorTable,
    Groups,
    Reservoir,
    hash_ids,
    init_factors,
    keep_fraction,
    rating_priority,
    replay_mask,
    solve_rows,
    splitmix64,
)
from modeler.core.tables import each_run, fold_runs, group_mass

REG_SCALINGS = ("count", "constant")
INIT_SALT = 0x5A17  # ranking vectors start from other draws than the explicit ones


# ---------------------------------------------------------------------------------------------
# Events -> weights
# ---------------------------------------------------------------------------------------------


def event_weights(ratings: np.ndarray, implicit: np.ndarray, weighting: Weighting, lo: float,
                  hi: float) -> np.ndarray:
    """w per event, vectorised :class:`common.feedback.Weighting`: a rating r (not NaN) maps
    through t = (r − lo)/(hi − lo), w = 1 + slope·(t − liked) if t ≥ liked else low_weight;
    an implicit event (rating NaN) of weight v has w = log1p(v) ("log") or v ("linear")."""
    r = np.asarray(ratings, dtype=np.float64)
    v = np.asarray(implicit, dtype=np.float64)
    is_rating = ~np.isnan(r)
    span = hi - lo
    with np.errstate(invalid="ignore"):
        t = (r - lo) / span if span > 0 else np.ones_like(r)
        rated = np.where(t + 1e-9 >= weighting.liked, 1.0 + weighting.slope * (t - weighting.liked),
                         weighting.low_weight)
        imp = np.log1p(np.maximum(v, 0.0)) if weighting.implicit == "log" else v
    return np.where(is_rating, rated, np.nan_to_num(imp, nan=0.0))


def ranking_init(ids: Sequence[str], rank: int, seed: int, init_scale: float) -> np.ndarray:
    """Initial ranking vectors (n, rank) float32: :func:`als_math.init_factors` of a salted seed."""
    return init_factors(ids, rank, seed ^ INIT_SALT, init_scale)[1]


# ---------------------------------------------------------------------------------------------
# Sums, solves, statistics, Gramians
# ---------------------------------------------------------------------------------------------


def gramian(vec: np.ndarray) -> np.ndarray:
    """VᵀV (rank × rank, float64) of some rows."""
    v = np.asarray(vec, dtype=np.float64)
    return v.T @ v


def gramian_delta(old: np.ndarray, old_known: np.ndarray, new: np.ndarray) -> np.ndarray:
    """Σ new newᵀ − Σ_known old oldᵀ over the same rows: what replacing them does to VᵀV."""
    return gramian(new) - gramian(np.asarray(old)[np.asarray(old_known, dtype=bool)])


def implicit_half_step(rows: np.ndarray, table: FactorTable, other_rows: np.ndarray,
                       other: FactorTable, conf: np.ndarray, gram_other: np.ndarray,
                       reg_param: float, reg_scaling: str, groups: Groups | None = None,
                       forgetting: float = 1.0) -> int:
    """Solve every row of ``table`` with events in the pass (module docstring):
    x_k = (G_other + A_k + Σ (c−1) q qᵀ + λ_k I)⁻¹ (b_k + Σ c q), with c = ``conf`` per event.
    Rows whose solution is not finite keep their vectors; returns how many."""
    g = groups or Groups.of(rows)
    if not len(g.keys):
        return 0
    q = other.vec[other_rows]
    conf = np.asarray(conf, dtype=np.float64)
    gram_w = conf - 1.0
    gram_other = np.asarray(gram_other, dtype=np.float64)
    diagonal = np.arange(table.rank)
    # β (``forgetting``) < 1 discounts the statistics: β A_k, β b_k, β N_k.
    beta = forgetting

    def solve_run(_: slice, run: Groups) -> int:
        keys, n_k = run.keys, run.n
        gram, h = run.moments(q, gram_w, conf)
        # lhs = G_pass + β A_k + G_other, rhs = β b_k + h. With per-key histories most keys
        # hold no statistics (nothing evicted yet): only rows with some are added, in place
        # (adding zeros would change no bit of the sums).
        st = np.flatnonzero(table.stats_held(keys))
        lhs = gram
        rhs = h
        if len(st):
            lhs[st] += beta * table.gram[keys[st]].astype(np.float64)
            rhs[st] = beta * table.moment[keys[st]].astype(np.float64) + rhs[st]
        lhs += gram_other[None]
        if reg_scaling == "count":
            diag = reg_param * (beta * table.mass[keys].astype(np.float64) + n_k)
        else:
            diag = np.full(len(keys), float(reg_param))
        lhs[:, diagonal, diagonal] += (diag + 1e-9)[:, None]
        with np.errstate(over="ignore", invalid="ignore"):
            new_v = solve_rows(lhs, rhs).astype(np.float32)
        ok = np.isfinite(new_v).all(axis=1)
        table.vec[keys[ok]] = new_v[ok]
        table.touched[keys] = True
        return int((~ok).sum())

    # One run of keys at a time (tables.each_run): the same bits, a fraction of the memory
    # traffic, both cores.
    return sum(each_run(g, table.rank, solve_run))


def fold_implicit(rows: np.ndarray, table: FactorTable, other_rows: np.ndarray,
                  other: FactorTable, conf: np.ndarray, maturity: float = 0.0,
                  partner_count: np.ndarray | None = None, forgetting: float = 1.0) -> None:
    """Add a learned batch's own positives to its rows' statistics, with the vectors as the
    batch left them: A += Σ m (c−1) q qᵀ, b += Σ m c q, N += Σ m; m = N_p / (N_p + c_mat)
    with N_p the partner's positives before the batch (``partner_count``) when
    ``maturity`` c_mat > 0, else 1."""
    conf = np.asarray(conf, dtype=np.float64)
    m = np.ones(len(rows))
    if maturity > 0 and partner_count is not None:
        pn = np.asarray(partner_count, dtype=np.float64)
        m = pn / (pn + maturity)
    g = Groups.of(rows)
    # A ← β A + ΔA (likewise b, N): old, staler terms fade with each touch.
    fold_runs(table, g, other.vec[other_rows], m * (conf - 1.0), m * conf, group_mass(g, m), forgetting)


@dataclass
class RankingOutcome:
    """What :func:`learn_ranking_batch` did: the Gramian changes (to add to the carried
    ones), rows refused as non-finite, and the batch's positives."""

    d_gram_users: np.ndarray
    d_gram_items: np.ndarray
    refused: int
    positives: int


def replay_solves_all(params: Any, positives_seen_before: int, fraction: float) -> bool:
    """Whether replayed positives re-solve every key they touch (see
    :func:`learn_ranking_batch`): always with ``ranking_replay_scope="all"``, never with
    ``"batch"``, and with ``"auto"`` while the batch replays EVERY positive learned so far
    (the sample still holds them all and ``fraction`` is 1): a re-solve then sees each
    key's whole history with today's vectors. Measured: re-solving with only part of the
    history replayed collapses on long streams (docs/ranking_model.md)."""
    scope = params.ranking_replay_scope
    if scope == "all":
        return True
    if scope == "batch":
        return False
    return positives_seen_before <= params.reservoir_size and fraction >= 1.0


def learn_ranking_batch(params: Any, n_new: int, conf: np.ndarray, u_rows: np.ndarray,
                        i_rows: np.ndarray, users: FactorTable, items: FactorTable,
                        user_known: np.ndarray, item_known: np.ndarray,
                        gram_users: np.ndarray, gram_items: np.ndarray,
                        replay_all: bool = True) -> RankingOutcome:
    """``params.ranking_iterations`` passes over one batch's working set of positives, in place.

    ``users``/``items`` hold the working set's rows (vectors, counts = positives learned
    before the batch, statistics); ``*_known`` marks rows already in the model (their vectors
    are in the carried Gramians ``gram_users`` = XᵀX and ``gram_items`` = YᵀY; a newcomer's
    row enters with its initial vector). Event k is a positive of user row ``u_rows[k]``
    for item row ``i_rows[k]`` with confidence ``conf[k]``; the first ``n_new`` are the
    batch's own, the rest replayed. Returns the Gramians' deltas (model before -> after).
    """
    old_u, old_i = users.vec.copy(), items.vec.copy()
    refused = 0
    if len(conf):
        # ``replay_all``: every key with positives in the batch or its replay is solved.
        # Otherwise only keys with positives in the batch are, and a replayed positive takes
        # part in the solve of its user if that user is in the batch, of its item if that
        # item is. (Re-solving every replayed key was measured to collapse once the replay
        # sample holds a small share of a long history: keys without new data are then
        # re-solved against their stale statistics every batch. See replay_solves_all.)
        if replay_all:
            su = si = np.ones(len(conf), dtype=bool)
        else:
            in_u = np.zeros(len(users), dtype=bool)
            in_i = np.zeros(len(items), dtype=bool)
            in_u[u_rows[:n_new]] = True
            in_i[i_rows[:n_new]] = True
            su, si = in_u[u_rows], in_i[i_rows]
        uu, ui, uc = u_rows[su], i_rows[su], conf[su]
        iu, ii, ic = u_rows[si], i_rows[si], conf[si]
        u_groups, i_groups = Groups.of(uu), Groups.of(ii)
        g_items = gram_items + gramian_delta(old_i, item_known, items.vec)
        for _ in range(params.ranking_iterations):
            refused += implicit_half_step(uu, users, ui, items, uc, g_items,
                                          params.ranking_reg_param, params.ranking_reg_scaling,
                                          u_groups, params.ranking_forgetting)
            g_users = gram_users + gramian_delta(old_u, user_known, users.vec)
            refused += implicit_half_step(ii, items, iu, users, ic, g_users,
                                          params.ranking_reg_param, params.ranking_reg_scaling,
                                          i_groups, params.ranking_forgetting)
            g_items = gram_items + gramian_delta(old_i, item_known, items.vec)
        new_c, new_u, new_i = conf[:n_new], u_rows[:n_new], i_rows[:n_new]
        # As the explicit model: users weigh items by maturity, items take users at full
        # weight (a user's vector has just been solved from this very batch).
        fold_implicit(new_u, users, new_i, items, new_c, params.maturity, items.count[new_i],
                      params.ranking_forgetting)
        fold_implicit(new_i, items, new_u, users, new_c, forgetting=params.ranking_forgetting)
    return RankingOutcome(gramian_delta(old_u, user_known, users.vec),
                          gramian_delta(old_i, item_known, items.vec), refused, int(n_new))


def seed_ranking_statistics(table: FactorTable, partner_moment: np.ndarray, gram_other: np.ndarray,
                            mean_conf_minus_1: float, reg_param: float, reg_scaling: str,
                            start: int = 0) -> None:
    """Statistics for rows (from row ``start`` on) with positives but none stored (a restored
    model): A = N (c̄−1) C with C the count-weighted mean q qᵀ of the partner side, and
    b = (G_other + A + λ_k I) x, so a row's solution is its current vector until new
    positives arrive."""
    need = start + np.flatnonzero((table.mass[start:] == 0) & (table.count[start:] > 0))
    if not len(need):
        return
    count = table.count[need].astype(np.float64)
    a = (count * mean_conf_minus_1)[:, None, None] * np.asarray(partner_moment, dtype=np.float64)[None]
    lhs = a + np.asarray(gram_other, dtype=np.float64)[None]
    diag = reg_param * count if reg_scaling == "count" else np.full(len(need), float(reg_param))
    lhs[:, np.arange(table.rank), np.arange(table.rank)] += (diag + 1e-9)[:, None]
    table.gram[need] = a.astype(np.float32)
    table.moment[need] = (lhs @ table.vec[need].astype(np.float64)[:, :, None])[:, :, 0].astype(np.float32)
    table.mass[need] = count.astype(np.float32)


def reference_implicit_solve(p: np.ndarray, c: np.ndarray, other: np.ndarray, reg: np.ndarray) -> np.ndarray:
    """The dense textbook solve, every cell materialised (tests only): for each row u,
    x_u = (Yᵀ C_u Y + reg_u I)⁻¹ Yᵀ C_u p_u with C_u = diag(c_u) over ALL columns."""
    rank = other.shape[1]
    out = np.zeros((p.shape[0], rank))
    for u in range(p.shape[0]):
        cu = c[u]
        lhs = other.T @ (cu[:, None] * other) + reg[u] * np.eye(rank)
        out[u] = np.linalg.solve(lhs, other.T @ (cu * p[u]))
    return out


# ---------------------------------------------------------------------------------------------
# Bounded per-key history: exact re-solves against today's partner vectors
# ---------------------------------------------------------------------------------------------

SWEEP_SALT = 0x5E3E  # the sweep's key hashes differ from every other draw


@dataclass
class KeyHistory:
    """The newest ≤ N positives of some keys, oldest first: partner ids and confidences c
    (float32, as stored; every solve uses the stored value). Keys absent have none (a
    restored model starts with none: its older positives live in the seeded statistics).
    Memory: per entry a partner id (a numpy str, 4 bytes a character) and 4 bytes of c."""

    partners: dict[str, np.ndarray] = field(default_factory=dict)
    conf: dict[str, np.ndarray] = field(default_factory=dict)

    def entries(self) -> int:
        return sum(len(v) for v in self.partners.values())

    def of(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        return self.partners.get(key, _NO_IDS), self.conf.get(key, _NO_CONF)

    def copy(self) -> KeyHistory:
        return KeyHistory(dict(self.partners), dict(self.conf))  # arrays are never mutated

    def updated(self, keys: Sequence[str], partners: Sequence[np.ndarray],
                conf: Sequence[np.ndarray]) -> KeyHistory:
        out = self.copy()
        for k, p, c in zip(keys, partners, conf, strict=True):
            out.partners[k], out.conf[k] = p, c
        return out

    # Pickled flat: a Spark partition's histories are pickled and unpickled with the model
    # every batch, and thousands of small arrays cost ~10x the bytes they hold (one reduce
    # per array). Two flat arrays and the sizes instead; unpickled keys get views of them
    # (never mutated, see ``copy``). Partner ids may come back in a wider str dtype (the
    # widest of the concatenation): the same strings.
    def __getstate__(self) -> dict[str, Any]:
        keys = list(self.partners)
        if keys != list(self.conf):
            return {"partners": self.partners, "conf": self.conf}
        sizes = np.fromiter((len(self.partners[k]) for k in keys), dtype=np.int64, count=len(keys))
        flat_p = np.concatenate([self.partners[k] for k in keys]) if keys else _NO_IDS
        flat_c = np.concatenate([self.conf[k] for k in keys]) if keys else _NO_CONF
        return {"keys": keys, "sizes": sizes, "flat_partners": flat_p,
                "flat_conf": np.asarray(flat_c, dtype=np.float32)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        if "keys" not in state:
            self.partners, self.conf = state["partners"], state["conf"]
            return
        keys = state["keys"]
        self.partners, self.conf = {}, {}
        if keys:
            ends = np.cumsum(state["sizes"]).tolist()
            spans = list(zip([0, *ends[:-1]], ends, strict=True))
            flat_p, flat_c = state["flat_partners"], state["flat_conf"]  # (slices: np.split is 5x slower)
            self.partners = {k: flat_p[a:b] for k, (a, b) in zip(keys, spans, strict=True)}
            self.conf = {k: flat_c[a:b] for k, (a, b) in zip(keys, spans, strict=True)}


_NO_IDS = np.zeros(0, dtype=str)
_NO_CONF = np.zeros(0, dtype=np.float32)


def canonical_order(users: np.ndarray, items: np.ndarray, stamps: np.ndarray, conf: np.ndarray) -> np.ndarray:
    """An order of a batch's positives that is the same in every layout: by (timestamp,
    user, item, c). Histories are appended in it, so which entries a cap evicts and the
    order of every sum are layout-independent."""
    return np.lexsort((np.asarray(conf), np.asarray(items, dtype=str), np.asarray(users, dtype=str),
                       np.asarray(stamps)))


class Extended(NamedTuple):
    """:func:`extend_histories`: the keys' new histories, and the entries the cap evicted
    (key, partner, c), oldest first per key."""

    keys: list[str]
    partners: list[np.ndarray]
    conf: list[np.ndarray]
    ev_keys: np.ndarray
    ev_partners: np.ndarray
    ev_conf: np.ndarray


def extend_histories(history: KeyHistory, keys: np.ndarray, partners: np.ndarray,
                     conf: np.ndarray, cap: int) -> Extended:
    """Append positives (key, partner, c), in the given order, to their keys' histories and
    keep the newest ``cap`` of each; what falls out is returned to be folded into the
    key's statistics (A, b, N)."""
    keys = np.asarray(keys, dtype=str)
    out_k: list[str] = []
    out_p: list[np.ndarray] = []
    out_c: list[np.ndarray] = []
    ev_k: list[np.ndarray] = []
    ev_p: list[np.ndarray] = []
    ev_c: list[np.ndarray] = []
    if len(keys):
        uniq, inverse = np.unique(keys, return_inverse=True)
        g = Groups.of(inverse.reshape(-1))
        for k, s, n in zip(uniq.tolist(), g.starts.tolist(), g.n.astype(np.int64).tolist(), strict=True):
            sel = g.order[s:s + n]
            old_p, old_c = history.of(k)
            p = np.concatenate([old_p, partners[sel]])  # (never astype: a narrower str dtype truncates)
            c = np.concatenate([old_c, np.asarray(conf[sel], dtype=np.float32)])
            cut = len(p) - cap
            if cut > 0:
                ev_k.append(np.full(cut, k))
                ev_p.append(p[:cut])
                ev_c.append(c[:cut])
                p, c = p[cut:], c[cut:]
            out_k.append(k)
            out_p.append(p)
            out_c.append(c)
    return Extended(out_k, out_p, out_c, _cat_or(ev_k, str), _cat_or(ev_p, str),
                    _cat_or(ev_c, np.float32))


def _cat_or(parts: list[np.ndarray], dtype: Any) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


def sweep_fraction(params: Any, expected_new: int, entries: int) -> float:
    """Share of a side's keys swept with a batch of ~``expected_new`` positives: the keys
    holding ~``ranking_sweep`` × ``expected_new`` of that side's ``entries`` history entries."""
    if params.ranking_sweep <= 0 or expected_new <= 0 or entries <= 0:
        return 0.0
    return min(1.0, params.ranking_sweep * expected_new / entries)


def sweep_mask(ids: Sequence[str], batch_no: int, fraction: float, seed: int) -> np.ndarray:
    """Which keys batch ``batch_no`` sweeps: a fresh ~``fraction`` of them each batch, a pure
    function of (seed, id, batch), so every layout sweeps the same keys."""
    if not len(ids) or fraction <= 0:
        return np.zeros(len(ids), dtype=bool)
    return replay_mask(splitmix64(hash_ids(ids) ^ np.uint64((seed ^ SWEEP_SALT) & 0xFFFFFFFF)),
                       batch_no, fraction)


class HistoryEvents(NamedTuple):
    """Flat history entries on a working set's rows: key row, partner row, c."""

    rows: np.ndarray
    partners: np.ndarray
    conf: np.ndarray

    @classmethod
    def empty(cls) -> HistoryEvents:
        return cls(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), np.zeros(0))


def learn_history_batch(params: Any, users: FactorTable, items: FactorTable,
                        user_known: np.ndarray, item_known: np.ndarray,
                        u_hist: HistoryEvents, i_hist: HistoryEvents,
                        u_evicted: HistoryEvents, i_evicted: HistoryEvents,
                        gram_users: np.ndarray, gram_items: np.ndarray) -> RankingOutcome:
    """``ranking_iterations`` passes of ALS restricted to the keys with history entries in
    ``u_hist``/``i_hist`` (the batch's keys and the sweep), in place on a working set that
    holds them and every partner of their histories. Each key k, with statistics (A, b, N)
    of its evicted positives and its history H_k solved against today's partners::

        x_k = (G_other + A_k + Σ_{H_k} (c − 1) q qᵀ + λ (N_k + |H_k|) I)⁻¹ (b_k + Σ_{H_k} c q)

    users first, then items against the users' new rows. Entries evicted by this batch
    are folded into their keys' statistics afterwards, with the vectors as the batch left
    them (users weigh items by maturity, as :func:`fold_implicit`); ``*.count`` hold the
    positives learned before the batch. Returns the Gramians' deltas."""
    old_u, old_i = users.vec.copy(), items.vec.copy()
    refused = 0
    u_groups, i_groups = Groups.of(u_hist.rows), Groups.of(i_hist.rows)
    g_items = gram_items + gramian_delta(old_i, item_known, items.vec)
    for _ in range(params.ranking_iterations):
        refused += implicit_half_step(u_hist.rows, users, u_hist.partners, items, u_hist.conf,
                                      g_items, params.ranking_reg_param, params.ranking_reg_scaling,
                                      u_groups)
        g_users = gram_users + gramian_delta(old_u, user_known, users.vec)
        refused += implicit_half_step(i_hist.rows, items, i_hist.partners, users, i_hist.conf,
                                      g_users, params.ranking_reg_param, params.ranking_reg_scaling,
                                      i_groups)
        g_items = gram_items + gramian_delta(old_i, item_known, items.vec)
    fold_implicit(u_evicted.rows, users, u_evicted.partners, items, u_evicted.conf,
                  params.maturity, items.count[u_evicted.partners])
    fold_implicit(i_evicted.rows, items, i_evicted.partners, users, i_evicted.conf)
    return RankingOutcome(gramian_delta(old_u, user_known, users.vec),
                          gramian_delta(old_i, item_known, items.vec), refused, 0)


def history_events(keys: Sequence[str], history: KeyHistory, key_index: dict[str, int],
                   partner_index: dict[str, int]) -> HistoryEvents:
    """The history entries of ``keys`` as rows of a working set (``*_index``: id -> row)."""
    keys = [k for k in keys if k in history.partners]
    if not keys:
        return HistoryEvents.empty()
    parts = [history.partners[k] for k in keys]
    sizes = np.fromiter((len(x) for x in parts), dtype=np.int64, count=len(parts))
    rows = np.repeat(np.fromiter((key_index[k] for k in keys), dtype=np.int64, count=len(keys)), sizes)
    conf = np.concatenate([history.conf[k] for k in keys]).astype(np.float64)
    return HistoryEvents(rows, _rows_in(np.concatenate(parts), partner_index), conf)


def _rows_in(ids: np.ndarray, index: dict[str, int]) -> np.ndarray:
    """index[id] for many ids at once: a dict lookup per DISTINCT id, then a gather."""
    uniq, inv = np.unique(ids, return_inverse=True)
    rows = np.fromiter((index[k] for k in uniq.tolist()), dtype=np.int64, count=len(uniq))
    return rows[inv.reshape(-1)]


def evicted_events(ext: Extended, key_index: dict[str, int], partner_index: dict[str, int]) -> HistoryEvents:
    if not len(ext.ev_keys):
        return HistoryEvents.empty()
    return HistoryEvents(_rows_in(ext.ev_keys, key_index), _rows_in(ext.ev_partners, partner_index),
                         ext.ev_conf.astype(np.float64))


class HistoryPlan(NamedTuple):
    """One side's part of a history batch, as a pure function of its inputs (the same in
    the reference and in each Spark partition): the keys to solve (the batch's, the sweep's),
    the partner ids their histories need, the histories after the batch."""

    solve: list[str]
    requests: list[str]
    extended: Extended
    history: KeyHistory  # pre-batch histories of the keys, with the batch's keys replaced


def plan_side(history: KeyHistory, known_ids: Sequence[str], keys: np.ndarray, partners: np.ndarray,
              conf: np.ndarray, cap: int, batch_no: int, fraction: float, seed: int) -> HistoryPlan:
    """For the keys of one side living together (a partition, or the whole model): the
    batch's positives (in canonical order) of those keys, the sweep over ``known_ids``."""
    ext = extend_histories(history, keys, partners, conf, cap)
    swept = [k for k, s in zip(known_ids, sweep_mask(known_ids, batch_no, fraction, seed).tolist(),
                               strict=True) if s]
    batch_keys = set(ext.keys)
    solve = sorted(batch_keys.union(k for k in swept if k in history.partners))
    held = [history.partners[k] for k in solve if k in history.partners]
    need = np.unique(np.concatenate([*held, ext.ev_partners])) if held else np.unique(ext.ev_partners)
    return HistoryPlan(solve, need.tolist(), ext, history.updated(ext.keys, ext.partners, ext.conf))


# ---------------------------------------------------------------------------------------------
# Seen pairs and the prequential probe
# ---------------------------------------------------------------------------------------------


def pair_keys(users: Sequence[str], items: Sequence[str]) -> np.ndarray:
    """uint64 key of (user, item): crc32(user) in the high half, crc32(item) in the low.
    (Two users with the same crc32 would share their seen sets: harmless for a metric.)"""
    return (hash_ids(users) << np.uint64(32)) | hash_ids(items)


@dataclass
class SeenPairs:
    """The (user, item) pairs seen so far, as sorted unique uint64 keys (:func:`pair_keys`);
    8 bytes per distinct pair. Only kept where the prequential probe runs."""

    keys: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.uint64))

    def __len__(self) -> int:
        return len(self.keys)

    def added(self, users: Sequence[str], items: Sequence[str]) -> SeenPairs:
        if not len(users):
            return self
        # np.union1d would be the same set, but numpy's hashing unique is ~50x slower than a
        # sort on high-entropy uint64 keys (measured 50 ms against 3 ms for 100k + 20k):
        # sort the batch's keys, drop those already held, merge two sorted runs.
        new = np.sort(pair_keys(users, items))
        new = new[np.r_[True, new[1:] != new[:-1]]]
        new = new[~self._holds(new)]
        merged = np.concatenate([self.keys, new])
        merged.sort(kind="stable")  # two sorted runs: a merge
        return SeenPairs(merged)

    def _holds(self, k: np.ndarray) -> np.ndarray:
        if not len(self.keys):
            return np.zeros(len(k), dtype=bool)
        pos = np.minimum(np.searchsorted(self.keys, k), len(self.keys) - 1)
        return self.keys[pos] == k

    def contains(self, users: Sequence[str], items: Sequence[str]) -> np.ndarray:
        return self._holds(pair_keys(users, items))

    def items_of(self, user: str) -> np.ndarray:
        """crc32 of the items ``user`` has seen (uint64)."""
        hi = hash_ids([user])[0] << np.uint64(32)
        lo = np.searchsorted(self.keys, hi)
        up = np.searchsorted(self.keys, hi | np.uint64(0xFFFFFFFF), side="right")
        return self.keys[lo:up] & np.uint64(0xFFFFFFFF)


def probe_sample(users: Sequence[str], items: Sequence[str], stamps: np.ndarray, eligible: np.ndarray,
                 size: int, seed: int) -> np.ndarray:
    """Indices of at most ``size`` eligible events: the smallest priorities of a hash of
    (seed, user, item, timestamp), so the sample is the same in every layout."""
    idx = np.flatnonzero(eligible)
    if len(idx) <= size:
        return idx
    picked = idx.tolist()
    prio = rating_priority([users[j] for j in picked], [items[j] for j in picked], stamps[idx], seed ^ 0x9B0E)
    return np.sort(idx[np.argsort(prio, kind="stable")[:size]])


def probe_hits(user_vecs: np.ndarray, item_vec: np.ndarray, item_hash: np.ndarray,
               target_rows: np.ndarray, seen_hashes: list[np.ndarray], k: int = 10) -> int:
    """How many probes hit: target item (row ``target_rows[j]``, −1 if not in the model) is
    among the top ``k`` of x_u·Y over the items not in ``seen_hashes[j]`` (crc32 of the
    user's seen items). Ties count against the target."""
    if not len(target_rows) or not len(item_vec):
        return 0
    scores = np.asarray(user_vecs, dtype=np.float64) @ np.asarray(item_vec, dtype=np.float64).T
    order = np.argsort(item_hash, kind="stable")
    sorted_hash = item_hash[order]
    hits = 0
    for j, t in enumerate(target_rows.tolist()):
        if t < 0:
            continue
        s = scores[j]
        # Rows of the seen items: binary search in the sorted item hashes (should two items
        # share a crc32, only one of them is excluded: harmless for a metric).
        pos = np.minimum(np.searchsorted(sorted_hash, seen_hashes[j]), len(sorted_hash) - 1)
        found = sorted_hash[pos] == seen_hashes[j]
        excluded = np.zeros(len(s), dtype=bool)
        excluded[order[pos[found]]] = True
        if excluded[t]:
            continue
        better = (s >= s[t]) & ~excluded
        better[t] = False
        hits += int(better.sum() < k)
    return hits


# ---------------------------------------------------------------------------------------------
# The single-process reference of the streaming ranking model
# ---------------------------------------------------------------------------------------------

RESERVOIR_SALT = 0x3C1A  # the ranking replay sample draws other priorities than the explicit one


@dataclass
class RankingResult:
    """What one batch did to the ranking model; ``probe_hits``/``probes`` are the prequential
    recall@10 counters (measured before the batch was learned)."""

    positives: int = 0
    new_users: int = 0
    new_items: int = 0
    replayed: int = 0
    refused: int = 0
    probe_hits: int = 0
    probes: int = 0


class LocalRankingALS:
    """The streaming ranking model in one process (module docstring): the reference for the
    Spark path, which calls the same functions on the same working sets.

    ``train(users, items, ratings, implicit, stamps)`` takes one batch's VALID events as
    columns (``ratings`` NaN marks an implicit event of weight ``implicit``). ``params`` is
    an :class:`modeler.core.als_math.ALSParams`.
    """

    def __init__(self, params: Any) -> None:
        self.params = params
        rank = params.ranking_rank
        self.users = FactorTable(rank)
        self.items = FactorTable(rank)
        self.reservoir = Reservoir()
        self.gram_users = np.zeros((rank, rank))
        self.gram_items = np.zeros((rank, rank))
        self.seen = SeenPairs()
        self.positives_seen = 0
        self.conf_minus_1_sum = 0.0
        self.batches = 0
        self.last_batch_size = 0
        # ranking_history > 0: each key's newest positives (KeyHistory), and how many
        # entries each side holds (the sweep's fraction).
        self.user_history = KeyHistory()
        self.item_history = KeyHistory()
        self.user_entries = 0
        self.item_entries = 0

    def train(self, users: list[str], items: list[str], ratings: np.ndarray, implicit: np.ndarray,
              stamps: np.ndarray) -> RankingResult:
        p = self.params
        out = RankingResult()
        if not len(users):
            return out
        w = event_weights(ratings, implicit, p.weighting, p.rating_min, p.rating_max)
        pos = np.flatnonzero(w > 0)
        out.probes, out.probe_hits = self._probe(users, items, stamps, w > 0)
        self.seen = self.seen.added(users, items) if p.ranking_probe_size > 0 else self.seen
        if not len(pos):
            return out
        if p.ranking_history > 0:
            return self._train_history(out, users, items, w, pos, stamps)
        pu = [users[j] for j in pos]
        pi = [items[j] for j in pos]
        conf = 1.0 + p.ranking_alpha * w[pos]
        self.batches += 1
        frac = ranking_replay_fraction(p, self.last_batch_size, self.positives_seen)
        sel = self.reservoir.selected(self.batches, frac)
        rep_u, rep_i, rep_c = self.reservoir.users[sel], self.reservoir.items[sel], self.reservoir.ratings[sel]
        self.positives_seen += len(pos)
        self.conf_minus_1_sum += float((conf - 1.0).sum())
        self.last_batch_size = len(pos)

        self.users.touched[:] = False
        self.items.touched[:] = False
        u_before, i_before = len(self.users), len(self.items)
        out.new_users = ensure_ranking_rows(self.users, pu, p)
        out.new_items = ensure_ranking_rows(self.items, pi, p)
        ur = self.users.rows(pu + rep_u.tolist())
        ir = self.items.rows(pi + rep_i.tolist())
        uniq_u, u_local = np.unique(ur, return_inverse=True)
        uniq_i, i_local = np.unique(ir, return_inverse=True)
        wu = sub_table(self.users, uniq_u)
        wi = sub_table(self.items, uniq_i)
        all_c = np.concatenate([conf, rep_c.astype(np.float64)])
        res = learn_ranking_batch(p, len(pos), all_c, u_local, i_local, wu, wi, uniq_u < u_before,
                                  uniq_i < i_before, self.gram_users, self.gram_items,
                                  replay_solves_all(p, self.positives_seen - len(pos), frac))
        for table, rows, sub in ((self.users, uniq_u, wu), (self.items, uniq_i, wi)):
            table.vec[rows] = sub.vec
            table.gram[rows], table.moment[rows], table.mass[rows] = sub.gram, sub.moment, sub.mass
            table.touched[rows] = True
        np.add.at(self.users.count, ur[:len(pos)], 1)
        np.add.at(self.items.count, ir[:len(pos)], 1)
        self.gram_users = self.gram_users + res.d_gram_users
        self.gram_items = self.gram_items + res.d_gram_items
        prio = rating_priority(pu, pi, stamps[pos], p.seed ^ RESERVOIR_SALT)
        self.reservoir = self.reservoir.updated(keep_fraction(p.reservoir_size, self.positives_seen),
                                                pu, pi, conf, prio)
        out.positives, out.replayed, out.refused = len(pos), len(rep_c), res.refused
        return out

    def _train_history(self, out: RankingResult, users: list[str], items: list[str], w: np.ndarray,
                       pos: np.ndarray, stamps: np.ndarray) -> RankingResult:
        """One batch with per-key histories (:func:`learn_history_batch`): the Spark stages
        make the same :func:`plan_side` calls, per partition."""
        p = self.params
        pu = np.asarray(users, dtype=str)[pos]
        pi = np.asarray(items, dtype=str)[pos]
        conf = (1.0 + p.ranking_alpha * w[pos]).astype(np.float32)
        order = canonical_order(pu, pi, stamps[pos], conf)
        pu, pi, conf = pu[order], pi[order], conf[order]
        self.batches += 1
        fu = sweep_fraction(p, self.last_batch_size, self.user_entries)
        fi = sweep_fraction(p, self.last_batch_size, self.item_entries)
        u_plan = plan_side(self.user_history, self.users.ids, pu, pi, conf, p.ranking_history,
                           self.batches, fu, p.seed)
        i_plan = plan_side(self.item_history, self.items.ids, pi, pu, conf, p.ranking_history,
                           self.batches, fi, p.seed ^ 1)
        self.users.touched[:] = False
        self.items.touched[:] = False
        u_before, i_before = len(self.users), len(self.items)
        out.new_users = ensure_ranking_rows(self.users, pu.tolist(), p)
        out.new_items = ensure_ranking_rows(self.items, pi.tolist(), p)
        uniq_u = np.unique(self.users.rows(sorted(set(u_plan.solve) | set(i_plan.requests))))
        uniq_i = np.unique(self.items.rows(sorted(set(i_plan.solve) | set(u_plan.requests))))
        wu, wi = sub_table(self.users, uniq_u), sub_table(self.items, uniq_i)
        u_index = {self.users.ids[r]: j for j, r in enumerate(uniq_u.tolist())}
        i_index = {self.items.ids[r]: j for j, r in enumerate(uniq_i.tolist())}
        res = learn_history_batch(
            p, wu, wi, uniq_u < u_before, uniq_i < i_before,
            history_events(u_plan.solve, u_plan.history, u_index, i_index),
            history_events(i_plan.solve, i_plan.history, i_index, u_index),
            evicted_events(u_plan.extended, u_index, i_index),
            evicted_events(i_plan.extended, i_index, u_index),
            self.gram_users, self.gram_items)
        for table, rows, sub, index, solve in ((self.users, uniq_u, wu, u_index, u_plan.solve),
                                               (self.items, uniq_i, wi, i_index, i_plan.solve)):
            local = np.array([index[k] for k in solve], dtype=np.int64)
            rows_s = rows[local]
            table.vec[rows_s] = sub.vec[local]
            table.gram[rows_s], table.moment[rows_s], table.mass[rows_s] = (
                sub.gram[local], sub.moment[local], sub.mass[local])
            table.touched[rows_s] = True
        np.add.at(self.users.count, self.users.rows(pu.tolist()), 1)
        np.add.at(self.items.count, self.items.rows(pi.tolist()), 1)
        self.gram_users = self.gram_users + res.d_gram_users
        self.gram_items = self.gram_items + res.d_gram_items
        self.user_history, self.item_history = u_plan.history, i_plan.history
        self.user_entries += len(pos) - len(u_plan.extended.ev_keys)
        self.item_entries += len(pos) - len(i_plan.extended.ev_keys)
        self.positives_seen += len(pos)
        self.conf_minus_1_sum += float((conf.astype(np.float64) - 1.0).sum())
        self.last_batch_size = len(pos)
        out.positives, out.refused = len(pos), res.refused
        return out

    def _probe(self, users: list[str], items: list[str], stamps: np.ndarray,
               positive: np.ndarray) -> tuple[int, int]:
        """Prequential recall@10 counters of a sample of the batch (before learning it)."""
        size = self.params.ranking_probe_size
        if size <= 0 or not len(self.users):
            return 0, 0
        return run_probe(self.users, self.items, self.seen, users, items, stamps, positive, size,
                         self.params.seed)

    def recommend(self, user: str, n: int = 10, exclude_seen: bool = True) -> list[str]:
        """Top ``n`` item ids by x_u·y_i (unseen ones only, by default); [] for an unknown user."""
        row = self.users.index.get(user)
        if row is None or not len(self.items):
            return []
        s = self.items.vec.astype(np.float64) @ self.users.vec[row].astype(np.float64)
        if exclude_seen:
            s[np.isin(hash_ids(self.items.ids), self.seen.items_of(user))] = -np.inf
        best = np.argsort(-s, kind="stable")[:n]
        return [self.items.ids[j] for j in best if np.isfinite(s[j])]


def run_probe(users_t: FactorTable, items_t: FactorTable, seen: SeenPairs, users: Sequence[str],
              items: Sequence[str], stamps: np.ndarray, positive: np.ndarray, size: int,
              seed: int) -> tuple[int, int]:
    """(probes, hits) over a sample of the positive events of users already in the model
    (with positives) for items they had not seen: is the item in the user's top 10 over all
    items of the model the user has not seen?"""
    rows = users_t.lookup(list(users))
    known = rows >= 0
    known[known] = users_t.count[rows[known]] > 0
    eligible = positive & known & ~seen.contains(users, items)
    pick = probe_sample(users, items, stamps, eligible, size, seed)
    if not len(pick):
        return 0, 0
    item_hash = hash_ids(items_t.ids)
    target = items_t.lookup([items[j] for j in pick])
    seen_h = [seen.items_of(users[j]) for j in pick]
    hits = probe_hits(users_t.vec[rows[pick]], items_t.vec, item_hash, target, seen_h)
    return len(pick), hits


def ranking_replay_fraction(params: Any, expected_new: int, seen_before: int) -> float:
    """Share of the ranking replay sample replayed with a batch of ~``expected_new`` positives."""
    held = min(params.reservoir_size, seen_before)
    if held <= 0 or params.ranking_replay_ratio <= 0 or expected_new <= 0:
        return 0.0
    return min(1.0, params.ranking_replay_ratio * expected_new / held)


def ensure_ranking_rows(table: FactorTable, keys: Sequence[str], params: Any) -> int:
    """Append rows for keys never seen (first-seen order), bias 0, initial ranking vectors."""
    new: list[str] = []
    seen: set[str] = set()
    for k in keys:
        if k not in table.index and k not in seen:
            seen.add(k)
            new.append(k)
    if new:
        table.add_rows(new, np.zeros(len(new), dtype=np.float32),
                       ranking_init(new, table.rank, params.seed, params.init_scale))
    return len(new)


def sub_table(table: FactorTable, rows: np.ndarray) -> FactorTable:
    """A working copy of some rows (vectors, counts, statistics) of ``table``."""
    st = table.stats(rows)
    n = len(rows)
    return FactorTable(table.rank, [""] * n, {}, np.zeros(n, dtype=np.float32), table.vec[rows].copy(),
                       table.count[rows].copy(), np.zeros(n, dtype=bool), st.gram, st.moment, st.mass)


__all__ = [
    "REG_SCALINGS",
    "LocalRankingALS",
    "RankingOutcome",
    "RankingResult",
    "SeenPairs",
    "event_weights",
    "fold_implicit",
    "gramian",
    "gramian_delta",
    "implicit_half_step",
    "learn_ranking_batch",
    "pair_keys",
    "probe_hits",
    "probe_sample",
    "ranking_init",
    "reference_implicit_solve",
    "seed_ranking_statistics",
]


def fold_in_users(indptr: np.ndarray, items: np.ndarray, weights: np.ndarray, rows: np.ndarray,
                  item_vecs: np.ndarray, alpha: float, reg_param: float,
                  reg_scaling: str = "count") -> np.ndarray:
    """What the predictor serves for the users ``rows``: each folded in from their whole
    history (CSR ``indptr``/``items``/``weights`` w, positives w > 0) against ``item_vecs``,
    the exact iALS user step (predictor.model.RankingSet.fold_in)::

        x_u = (YᵀY + Σ_i (c_ui − 1) y_i y_iᵀ + λ_u I)⁻¹ Σ_i c_ui y_i,   c = 1 + α·w

    A user without a positive gets a zero row. O(Σ n_u · rank² + |rows| · rank³)."""
    y = np.asarray(item_vecs, dtype=np.float64)
    rank = y.shape[1]
    gram = y.T @ y
    eye = np.eye(rank)
    out = np.zeros((len(rows), rank), dtype=np.float32)
    for k, u in enumerate(np.asarray(rows, dtype=np.int64)):
        lo, hi = indptr[u], indptr[u + 1]
        w = weights[lo:hi]
        pos = w > 0
        if not pos.any():
            continue
        q = y[items[lo:hi][pos]]
        c = 1.0 + alpha * w[pos]
        lam = reg_param * (int(pos.sum()) if reg_scaling == "count" else 1)
        lhs = gram + (q.T * (c - 1.0)) @ q + max(lam, 1e-9) * eye
        out[k] = np.linalg.solve(lhs, q.T @ c)
    return out


def batch_ials(u: np.ndarray, i: np.ndarray, w: np.ndarray, n_users: int, n_items: int, rank: int,
               alpha: float, reg_param: float, iterations: int, seed: int, init_scale: float = 0.1,
               reg_scaling: str = "count") -> tuple[np.ndarray, np.ndarray]:
    """Exact batch implicit ALS on positives (u, i, w > 0) in numpy (the bootstrap of the
    ranking model): ``iterations`` sweeps of the user step of :func:`fold_in_users` over
    every user, then the same step over every item against the users. Returns (X, Y)
    float32; a key without positives keeps a zero row. O(iterations · (positives · rank² +
    keys · rank³)), one solve per key (a Python loop: about a minute per sweep at ml-25m)."""
    keep = np.asarray(w) > 0
    u, i, w = np.asarray(u)[keep], np.asarray(i)[keep], np.asarray(w, dtype=np.float64)[keep]

    def csr(rows: np.ndarray, cols: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        order = np.lexsort((cols, rows))
        indptr = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(np.bincount(rows, minlength=n), out=indptr[1:])
        return indptr, cols[order], w[order]

    by_user, by_item = csr(u, i, n_users), csr(i, u, n_items)
    rng = np.random.default_rng(seed)
    y = (rng.standard_normal((n_items, rank)) * init_scale).astype(np.float32)
    x = np.zeros((n_users, rank), dtype=np.float32)
    for _ in range(iterations):
        x = fold_in_users(*by_user, np.arange(n_users), y, alpha, reg_param, reg_scaling)
        y = fold_in_users(*by_item, np.arange(n_items), x, alpha, reg_param, reg_scaling)
    return x, y
