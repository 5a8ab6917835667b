"""Streaming ALS on Spark RDDs, one ``train()`` per mini-batch: the explicit rating model and
the ranking model (implicit-feedback ALS) trained side by side in the same tasks.

Long (over 1,500 lines) because both models' four stages, in both layouts (one partition and
many), their restore and their per-key histories share one partition record and one task;
split by model, each half would repeat the routing and gathering that keep them in one pass.

The maths lives in :mod:`modeler.core.als_math` (numpy only); this module only moves blocks of
rows between partitions. Layout, chosen after the seeds' performance warnings:

* Every id has a fixed partition, ``crc32(id) % num_partitions``
  (:func:`modeler.core.als_math.partition_of`), the same on every machine and run.
* The model is ONE RDD of ``num_partitions`` records ``(pid, _Part)`` under one partitioner
  (identity on ``pid``). Partition p holds a :class:`~modeler.core.als_math.FactorTable` (ids,
  biases, vectors, counts, touched flags) of the users and one of the items living in p, and
  the replay sample's entries of those users (full) and items (ids + priorities).
* ``train()`` is one Spark job of four stages whatever ``iterations`` is: (1) validate the
  batch and cut it into one numpy block per model partition - the only shuffle of raw
  ratings; (2) a partitioner-aware ``union`` with the model (no join, the model is never
  reshuffled) and each partition emits the rows the batch and its replay touch; (3) one task
  learns that working set (bounded by the batch size, never the model) with
  :func:`modeler.core.als_math.learn_batch`; (4) a second co-partitioned union writes the learned
  rows back. Messages are numpy blocks, one per pair of partitions - no Python object per
  rating crosses a shuffle. A model of ONE partition (the default on a local master) runs
  (1)-(4) in one task - the same functions chained, the input and the model brought together
  by a narrow ``coalesce(1)``, no shuffle at all - so a batch is one stage of one task: with
  PySpark's tens of ms per stage and task, that is most of a small batch's cost saved.
* After each batch the new model RDD is materialised and its lineage cut (``localCheckpoint``,
  a reliable ``checkpoint`` every ``checkpoint_interval`` batches when the SparkContext has a
  checkpoint directory), and the previous one is unpersisted: the DAG and the cached data
  stay bounded however long the stream runs. Nothing collects factor matrices to the
  driver; it gets one small dict per partition.
* That is the ``"rdd"`` state store, the default. ``"resident"`` keeps each partition in the
  state server of its host (:mod:`modeler.spark.resident`): the model RDD holds
  ``(pid, Token)``, the same stage functions run inside the server on the partition in place,
  and only messages and answers move. A snapshot every ``checkpoint_interval`` batches (on
  disk; the partitions as their servers pickled them, never unpickled in a worker) and the
  routed batches since rebuild a lost partition bit for bit (docs/scale.md §8).

Memory bound: factors ``(n_users + n_items) × (rank + 2) × 4`` bytes plus ids (and, with the
``"rls"`` vector step, ``(rank² + rank + 1) × 4`` bytes of statistics per key that holds
some: rows without are never written, so their pages stay unallocated), and at most
``reservoir_size`` (expected, ±√R) replay ratings (ids as fixed-width strings + rating +
priority, and an item-side copy of id + priority) - independent of the length of the stream. See docs/streaming_als.md.

The ranking model (implicit-feedback ALS, :mod:`modeler.core.ranking`, docs/ranking_model.md)
rides in the same partitions (``_Part.ranking``), messages and tasks: stage A also computes
each event's weight and routes every valid event (ratings and implicit events) by user, B
gathers the rows its positives and its own replay sample touch, C learns it beside the
explicit model against the Gramians XᵀX / YᵀY the driver carries (rank² floats each, summed
from the deltas C returns), D writes both back. Its memory: (rank² + rank + 2) × 4 bytes per
key, its replay sample (≤ ``reservoir_size`` positives; with ``ranking_history`` N > 0 none,
but each key's newest N positives instead, ≤ N × (4 L + 4) bytes a key for ids of L
characters, and one more round trip B0 in the multi-partition layout to fetch the
histories' partner rows) and, with one partition only, the prequential probe's seen pairs
(8 bytes per distinct pair).

This module is long because the four stages of both layouts, their named messages and the
model's persistence belong together: each stage function is the other side of a message.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import pickle
import time
import uuid
import weakref
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from common.schema import RatingScale
from modeler.core import tables
from modeler.core.als_math import (
    ALSParams,
    FactorTable,
    ParamsAttributes,
    Reservoir,
    RowStats,
    gather,
    init_factors,
    keep_fraction,
    keep_mask,
    learn_batch,
    partition_of,
    predict_raw,
    rating_priority,
    replay_fraction,
    second_moment,
    seed_statistics,
    split_events,
    validate_arrays,
    validate_implicit,
)
from modeler.core.ranking import (
    RESERVOIR_SALT,
    Extended,
    HistoryEvents,
    KeyHistory,
    SeenPairs,
    canonical_order,
    event_weights,
    evicted_events,
    gramian,
    history_events,
    learn_history_batch,
    learn_ranking_batch,
    plan_side,
    ranking_init,
    ranking_replay_fraction,
    replay_solves_all,
    run_probe,
    seed_ranking_statistics,
    sweep_fraction,
)
from modeler.spark import resident
from modeler.spark.resident import StateLost, Token
from modeler.workerheap import settle, trim

log = logging.getLogger(__name__)

#: Where the model partitions live between batches (docs/scale.md §8): "rdd", the default (a
#: cached RDD, the whole partition pickled through the JVM every batch: the cheaper one for
#: small models) or "resident" (each host's state server, only what a batch touches moves:
#: faster from ~175k keys, and smaller).
STATE_STORES = ("resident", "rdd")


def _identity(key: int) -> int:
    """Partition function of every model RDD: records are keyed by their partition number."""
    return key


@dataclass
class TrainStats:
    """What one ``train()`` did. ``prequential_sse`` sums (r − r̂)² over the batch's valid
    ratings with r̂ predicted (clipped) BEFORE the batch was learned: √(Σsse / Σn) over a
    stream is its prequential (test-then-train) RMSE."""

    n_ratings: int
    n_rejected: int
    prequential_sse: float
    new_users: int
    new_items: int
    seconds: float
    n_replayed: int = 0
    n_diverged: int = 0
    # The ranking model: implicit events learned (ratings feed it too), positives, newcomer
    # rows, and the prequential recall@10 counters (hits among probes, tested before the
    # batch was learned; one-partition layout only, 0 probes otherwise).
    n_implicit: int = 0
    ranking_positives: int = 0
    ranking_new_users: int = 0
    ranking_new_items: int = 0
    ranking_hits: int = 0
    ranking_probes: int = 0

    @property
    def prequential_rmse(self) -> float:
        return float(np.sqrt(self.prequential_sse / self.n_ratings)) if self.n_ratings else float("nan")

    @property
    def n_events(self) -> int:
        """Valid events learned: ratings and implicit events."""
        return self.n_ratings + self.n_implicit

    @property
    def prequential_recall(self) -> float:
        return self.ranking_hits / self.ranking_probes if self.ranking_probes else float("nan")


@dataclass
class ModelState:
    """Everything needed to persist the model without pickle and restore it with
    :meth:`StreamingALS.restore`: two RDDs of ``(id, (bias, vector float32 (rank,), count))``
    and plain scalars (``extra``). The replay reservoir is NOT part of it: after a restore the
    model replays nothing until the reservoir refills from the stream (accuracy recovers within
    ~reservoir_size ratings); factors, biases, μ and counts are kept exactly. Neither are the
    ``"rls"`` least-squares statistics: a restore seeds them from the counts
    (:func:`modeler.core.als_math.seed_statistics`), so each vector keeps a prior as strong as the
    ratings it learned, but the partners' vectors behind it are approximated. The ranking
    model's rows come as two more RDDs (``ranking_users``/``ranking_items``, bias 0.0, count
    = positives) and its counters in ``extra``."""

    users: Any
    items: Any
    mu: float
    ratings_seen: int
    extra: dict[str, Any] = field(default_factory=dict)
    # The ranking model's rows, ``(id, (0.0, vector float32 (ranking_rank,), positives))``;
    # None when it is off. Its Gramians are recomputed from them on restore.
    ranking_users: Any = None
    ranking_items: Any = None


# ---------------------------------------------------------------------------------------------
# Per-partition records (plain objects: pickled only between Spark's own processes)
# ---------------------------------------------------------------------------------------------


@dataclass
class _RankPart:
    """The ranking model's share of partition p: its user and item rows, its replay sample
    of positives (full, by user) and the sample's item ids (by item), and - in the
    one-partition layout only - the seen (user, item) pairs of the prequential probe."""

    users: FactorTable
    items: FactorTable
    replay: Reservoir
    mirror: Reservoir
    seen: SeenPairs | None = None
    # ranking_history > 0: the newest positives of this partition's users / items
    u_hist: KeyHistory = field(default_factory=KeyHistory)
    i_hist: KeyHistory = field(default_factory=KeyHistory)


@dataclass
class _Part:
    """Partition p of the model: users and items whose id hashes to p, and the replay
    sample's entries rated by those users (``replay``) / for those items (``mirror``);
    ``ranking`` the same for the ranking model (``None`` when it is off).
    ``batch`` holds the last batch's valid ratings by those users (for a sink; replaced by
    every batch, so it stays batch-sized)."""

    users: FactorTable
    items: FactorTable
    replay: Reservoir
    mirror: Reservoir
    stats: dict[str, Any] = field(default_factory=dict)
    batch: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
    learned: int = 0  # valid events the whole last batch learned (all partitions)
    ranking: _RankPart | None = None
    implicit_batch: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # (users, items, w), for a sink


@dataclass
class PartitionUpdate:
    """What a ``train(..., sink=...)`` callable sees of one model partition after the batch.

    ``users``/``items`` are the partition's tables (``touched`` marks the rows the batch
    changed), ``ranking_users``/``ranking_items`` the ranking model's (``None`` when it is
    off); ``batch_users``/``batch_items``/``batch_ratings`` are the batch's valid ratings
    by this partition's users, ``batch_implicit_users``/``_items``/``_weights`` its implicit
    events (w, the mapped confidence weight).
    Read-only: the tables belong to the cached model.
    """

    pid: int
    users: FactorTable
    items: FactorTable
    batch_users: np.ndarray
    batch_items: np.ndarray
    batch_ratings: np.ndarray
    ranking_users: FactorTable | None = None
    ranking_items: FactorTable | None = None
    batch_implicit_users: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=str))
    batch_implicit_items: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=str))
    batch_implicit_weights: np.ndarray = field(default_factory=lambda: np.zeros(0))


def _empty_part(params: ALSParams) -> _Part:
    ranking = None
    if params.ranking:
        r = params.ranking_rank
        seen = SeenPairs() if params.num_partitions == 1 and params.ranking_probe_size > 0 else None
        ranking = _RankPart(FactorTable(r), FactorTable(r), Reservoir(False), Reservoir(True), seen)
    return _Part(FactorTable(params.rank), FactorTable(params.rank), Reservoir(False), Reservoir(True),
                 ranking=ranking)


def _zero(_: Any) -> int:
    return 0


def _split(it: Iterable[tuple[int, Any]]) -> tuple[int, _Part, list[Any]]:
    """One partition of a co-partitioned union: (pid, its model record, the messages)."""
    pid = -1
    part = None
    msgs = []
    for key, value in it:
        pid = key
        if isinstance(value, _Part):
            part = value
        else:
            msgs.append(value)
    if part is None:
        raise RuntimeError("model partition missing from a co-partitioned union")
    # Shuffle fetch order is not deterministic: messages carry their source; sort by it.
    msgs.sort(key=lambda m: m[0])
    return pid, part, msgs


def _cat(arrays: list[np.ndarray], dtype: Any, width: int | None = None) -> np.ndarray:
    if arrays:
        return np.concatenate(arrays)
    return np.zeros((0, width) if width else 0, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# Messages between the stages (named; pickled only between Spark's own processes)
# ---------------------------------------------------------------------------------------------


class Routed(NamedTuple):
    """A -> B: one input partition's valid ratings by users of model partition p, the ids
    of its items living in p, and (ranking model) every valid event by p's users with its
    weight w (0: seen, not a positive) and the items of positives living in p."""

    src: int
    users: np.ndarray
    items: np.ndarray
    ratings: np.ndarray
    stamps: np.ndarray
    here_items: np.ndarray
    rejected: int
    ev_users: np.ndarray
    ev_items: np.ndarray
    ev_weights: np.ndarray
    ev_stamps: np.ndarray
    here_ritems: np.ndarray
    n_implicit: int
    ev_implicit: np.ndarray
    here_rusers: np.ndarray  # the users, weights and stamps of those positives (histories)
    here_rweights: np.ndarray
    here_rstamps: np.ndarray


class RankRequest(NamedTuple):
    """B0 -> B (ranking_history > 0, several partitions): ids living in partition p whose
    rows the histories of another partition's keys need."""

    src: int
    users: list[str]
    items: list[str]


class RankHistory(NamedTuple):
    """B -> C (ranking_history > 0): partition p's keys to solve with their histories
    after the batch, and what the batch appended to / evicted from its batch keys'."""

    u_solve: list[str]
    u_hist: KeyHistory
    u_ext: Extended
    i_solve: list[str]
    i_hist: KeyHistory
    i_ext: Extended


class RankGathered(NamedTuple):
    """B -> C, ranking model: partition p's rows the batch's positives and its replay touch
    (``known``: in the model, so in the carried Gramians), p's events, and the probe's
    counters (one-partition layout)."""

    u_ids: list[str]
    u_vec: np.ndarray
    u_known: np.ndarray
    u_count: np.ndarray
    u_stats: RowStats
    i_ids: list[str]
    i_vec: np.ndarray
    i_known: np.ndarray
    i_count: np.ndarray
    i_stats: RowStats
    ev_users: np.ndarray
    ev_items: np.ndarray
    ev_weights: np.ndarray
    ev_stamps: np.ndarray
    rep_u: np.ndarray
    rep_i: np.ndarray
    rep_c: np.ndarray
    n_implicit: int
    probes: int
    hits: int
    ev_implicit: np.ndarray
    history: RankHistory | None = None


class Gathered(NamedTuple):
    """B -> C: partition p's rows that the batch (and its replay) touch, newcomers
    initialised, with counts and statistics, and p's share of the batch."""

    src: int
    u_ids: list[str]
    ub: np.ndarray
    uv: np.ndarray
    u_fresh: int
    i_ids: list[str]
    ib: np.ndarray
    iv: np.ndarray
    i_fresh: int
    new_u: np.ndarray
    new_i: np.ndarray
    new_r: np.ndarray
    new_t: np.ndarray
    rep_u: np.ndarray
    rep_i: np.ndarray
    rep_r: np.ndarray
    rejected: int
    u_count: np.ndarray
    i_count: np.ndarray
    u_stats: RowStats
    i_stats: RowStats
    ranking: RankGathered | None


class RankSource(NamedTuple):
    """B -> C, ranking model only: what partition ``src`` gathered for it (the fields of a
    :class:`Gathered` that :func:`_learn_ranking` reads)."""

    src: int
    ranking: RankGathered | None


class RankLearned(NamedTuple):
    """C -> D, ranking model: partition p's learned rows, what its replay sample keeps, and
    the batch's events by p's users (for the seen pairs)."""

    u_ids: list[str]
    u_vec: np.ndarray
    u_inc: np.ndarray
    u_stats: RowStats
    i_ids: list[str]
    i_vec: np.ndarray
    i_inc: np.ndarray
    i_stats: RowStats
    replay_keep: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
    mirror_keep: tuple[np.ndarray, np.ndarray]
    keep_frac: float
    seen_users: np.ndarray
    seen_items: np.ndarray
    imp_users: np.ndarray
    imp_items: np.ndarray
    imp_weights: np.ndarray  # the events' confidence weights w (common.feedback), for {p}:rated
    u_ext: Extended | None = None  # ranking_history > 0: the batch keys' new histories
    i_ext: Extended | None = None


class Learned(NamedTuple):
    """C -> D: partition p's learned rows and count increments, what its replay sample
    keeps, the batch statistics (partition 0 only) and the batch's ratings by p's users."""

    src: int
    u_ids: list[str]
    ub: np.ndarray
    uv: np.ndarray
    u_inc: np.ndarray
    i_ids: list[str]
    ib: np.ndarray
    iv: np.ndarray
    i_inc: np.ndarray
    replay_keep: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
    mirror_keep: tuple[np.ndarray, np.ndarray]
    keep_frac: float
    stats: dict[str, Any]
    rated: tuple[np.ndarray, np.ndarray, np.ndarray]
    learned: int
    u_stats: RowStats
    i_stats: RowStats
    ranking: RankLearned | None


# ---------------------------------------------------------------------------------------------
# Stage functions (module level: closures capture plain values only)
# ---------------------------------------------------------------------------------------------


def _route_ratings(params: ALSParams):
    """A: validate a partition of event tuples; one block per model partition holding the
    ratings (and, for the ranking model, all events) whose USER lives there and the ids of
    the items that live there."""
    num_partitions, lo, hi = params.num_partitions, params.rating_min, params.rating_max
    ranking, weighting = params.ranking, params.weighting

    def route(index: int, it: Iterator[Any]) -> Iterator[tuple[int, Routed]]:
        settle()
        (us, its, rs, ts), (ius, iis, iws, its_), bad_shape = split_events(it)
        users, items, rates, stamps, rejected = validate_arrays(us, its, rs, ts, lo, hi)
        iu, ii, iw, it_, irej = validate_implicit(ius, iis, iws, its_)
        rejected += bad_shape + irej
        upid, ipid = _pids(users, num_partitions), _pids(items, num_partitions)
        u_arr = np.asarray(users, dtype=str)
        i_arr = np.asarray(items, dtype=str)
        if ranking:
            ev_u = np.asarray(users + iu, dtype=str)
            ev_i = np.asarray(items + ii, dtype=str)
            ev_w = event_weights(np.concatenate([rates, np.full(len(iw), np.nan)]),
                                 np.concatenate([np.full(len(rates), np.nan), iw]), weighting, lo, hi)
            ev_t = np.concatenate([stamps, it_])
            ev_up = np.concatenate([upid, _pids(iu, num_partitions)])
            ev_ip = np.concatenate([ipid, _pids(ii, num_partitions)])
            ev_imp = np.r_[np.zeros(len(rates), dtype=bool), np.ones(len(iw), dtype=bool)]
            n_imp = len(iw)
        else:  # implicit events are validated and counted, and go nowhere
            ev_u = ev_i = np.zeros(0, dtype=str)
            ev_w, ev_t = np.zeros(0), np.zeros(0, dtype=np.int64)
            ev_up = ev_ip = np.zeros(0, dtype=np.int64)
            ev_imp = np.zeros(0, dtype=bool)
            n_imp = 0
        positive = ev_w > 0
        for p in range(num_partitions):
            su = np.flatnonzero(upid == p)
            si = np.flatnonzero(ipid == p)
            se = np.flatnonzero(ev_up == p)
            sr = np.flatnonzero((ev_ip == p) & positive)
            extra = rejected if p == 0 else 0  # rejections ride on partition 0's block
            imp = n_imp if p == 0 else 0
            if len(su) or len(si) or len(se) or len(sr) or extra or imp:
                yield p, Routed(index, u_arr[su], i_arr[su], rates[su], stamps[su], i_arr[si], extra,
                                ev_u[se], ev_i[se], ev_w[se], ev_t[se], ev_i[sr], imp, ev_imp[se],
                                ev_u[sr], ev_w[sr], ev_t[sr])

    return route


def _rows_of(table: FactorTable, keys: np.ndarray):
    """Sorted unique ids of ``keys`` and their rows in ``table`` (−1: not there yet)."""
    ids = sorted(set(keys.tolist()))
    return ids, table.lookup(ids)


def _history_plans(params: ALSParams, part: _RankPart, blocks: list[Routed], batch_no: int,
                   sweep: tuple[float, float]):
    """This partition's :func:`modeler.core.ranking.plan_side` of both sides: its users'
    positives and its items' positives, each in the canonical order."""
    alpha = params.ranking_alpha

    def side(keys, partners, w, t, hist, ids, fraction, seed):
        conf = (1.0 + alpha * w).astype(np.float32)
        o = canonical_order(keys, partners, t, conf)  # keys: users, partners: items
        return plan_side(hist, ids, keys[o], partners[o], conf[o], params.ranking_history,
                         batch_no, fraction, seed)

    ev_u = _cat([b.ev_users for b in blocks], str)
    ev_i = _cat([b.ev_items for b in blocks], str)
    ev_w = _cat([b.ev_weights for b in blocks], np.float64)
    ev_t = _cat([b.ev_stamps for b in blocks], np.int64)
    pos = ev_w > 0
    r_u = _cat([b.here_rusers for b in blocks], str)
    r_i = _cat([b.here_ritems for b in blocks], str)
    r_w = _cat([b.here_rweights for b in blocks], np.float64)
    r_t = _cat([b.here_rstamps for b in blocks], np.int64)
    u_plan = side(ev_u[pos], ev_i[pos], ev_w[pos], ev_t[pos], part.u_hist, part.users.ids,
                  sweep[0], params.seed)
    # (canonical order is by (stamp, user, item, c): the item side sorts its own positives
    # the same way, so each item's new entries come in the reference's order)
    conf_i = (1.0 + alpha * r_w).astype(np.float32)
    o = canonical_order(r_u, r_i, r_t, conf_i)
    i_plan = plan_side(part.i_hist, part.items.ids, r_i[o], r_u[o], conf_i[o], params.ranking_history,
                       batch_no, sweep[1], params.seed ^ 1)
    return u_plan, i_plan


def _history_requests(params: ALSParams, batch_no: int, sweep: tuple[float, float]):
    """B0 (ranking_history > 0, several partitions): per partition, ask the partitions
    holding the partners of its keys' histories for their rows."""
    P = params.num_partitions

    def stage(it: Iterator[tuple[int, Any]]) -> Iterator[tuple[int, RankRequest]]:
        settle()
        pid, part, blocks = _split(it)
        if part.ranking is None:
            return
        u_plan, i_plan = _history_plans(params, part.ranking, blocks, batch_no, sweep)
        users_of = _pids(i_plan.requests, P)
        items_of = _pids(u_plan.requests, P)
        for q in range(P):
            us = [k for k, t in zip(i_plan.requests, users_of.tolist(), strict=True) if t == q]
            its = [k for k, t in zip(u_plan.requests, items_of.tolist(), strict=True) if t == q]
            if us or its:
                yield q, RankRequest(pid, us, its)

    return stage


def _gather_ranking(params: ALSParams, part: _RankPart, blocks: list[Routed], batch_no: int,
                    fraction: float, sweep: tuple[float, float] = (0.0, 0.0),
                    requests: list[RankRequest] | None = None) -> RankGathered:
    ev_u = _cat([b.ev_users for b in blocks], str)
    ev_i = _cat([b.ev_items for b in blocks], str)
    ev_w = _cat([b.ev_weights for b in blocks], np.float64)
    ev_t = _cat([b.ev_stamps for b in blocks], np.int64)
    here_i = _cat([b.here_ritems for b in blocks], str)
    sel = part.replay.selected(batch_no, fraction)
    rep_u, rep_i, rep_c = part.replay.users[sel], part.replay.items[sel], part.replay.ratings[sel]
    mirror_i = part.mirror.items[part.mirror.selected(batch_no, fraction)]
    probes = hits = 0
    if part.seen is not None and len(ev_u):
        # One partition holds every row: recall@10 of a sample, before the batch is learned.
        probes, hits = run_probe(part.users, part.items, part.seen, ev_u.tolist(), ev_i.tolist(),
                                 ev_t, ev_w > 0, params.ranking_probe_size, params.seed)

    def rows(table: FactorTable, keys: np.ndarray, solve: list[str] | None = None):
        """The working set's rows of ``keys``; statistics only for the keys in ``solve``
        (all when None): a partner of a solved key's history is read for its vector only,
        and copying (and scanning) its rank × rank statistics was a fifth of this pass."""
        ids, r = _rows_of(table, keys)
        known = r >= 0
        vec = np.zeros((len(ids), table.rank), dtype=np.float32)
        vec[known] = table.vec[r[known]]
        fresh = np.flatnonzero(~known)
        if len(fresh):
            vec[fresh] = ranking_init([ids[j] for j in fresh], table.rank, params.seed, params.init_scale)
        count = np.where(known, table.count[np.maximum(r, 0)] if len(table) else 0, 0)
        if solve is not None:
            r = np.where(np.isin(np.asarray(ids, dtype=str), np.asarray(solve, dtype=str)), r, -1)
        return ids, vec, known, count, table.stats(r)

    history = None
    if params.ranking_history > 0:
        u_plan, i_plan = _history_plans(params, part, blocks, batch_no, sweep)
        if requests is None:  # one partition: every partner lives here
            req_u, req_i = i_plan.requests, u_plan.requests
        else:
            req_u = [k for r in requests for k in r.users]
            req_i = [k for r in requests for k in r.items]
        user_keys = np.asarray(sorted(set(u_plan.solve).union(req_u)), dtype=str)
        item_keys = np.asarray(sorted(set(i_plan.solve).union(req_i)), dtype=str)

        def only(h: KeyHistory, keys: list[str]) -> KeyHistory:
            return KeyHistory({k: h.partners[k] for k in keys if k in h.partners},
                              {k: h.conf[k] for k in keys if k in h.conf})

        history = RankHistory(u_plan.solve, only(u_plan.history, u_plan.solve), u_plan.extended,
                              i_plan.solve, only(i_plan.history, i_plan.solve), i_plan.extended)
        u_solve, i_solve = u_plan.solve, i_plan.solve
    else:
        user_keys = np.concatenate([ev_u[ev_w > 0], rep_u])
        item_keys = np.concatenate([here_i, mirror_i])
        u_solve = i_solve = None
    u_ids, uv, uk, uc, ust = rows(part.users, user_keys, u_solve)
    i_ids, iv, ik, ic, ist = rows(part.items, item_keys, i_solve)
    return RankGathered(u_ids, uv, uk, uc, ust, i_ids, iv, ik, ic, ist, ev_u, ev_i, ev_w, ev_t,
                        rep_u, rep_i, rep_c, sum(b.n_implicit for b in blocks), probes, hits,
                        _cat([b.ev_implicit for b in blocks], bool), history)


def _gather_stage(params: ALSParams, batch_no: int, fraction: float, r_batch_no: int = 0,
                  r_fraction: float = 0.0, r_sweep: tuple[float, float] = (0.0, 0.0),
                  with_ranking: bool = True):
    """B: per partition, the rows the batch (and its replay) needs, newcomers initialised
    (``with_ranking`` False: the explicit model's only, the ranking model gathered elsewhere)."""

    def stage(it: Iterator[tuple[int, Any]]) -> Iterator[tuple[int, Gathered]]:
        settle()
        pid, part, msgs = _split(it)
        blocks = [b for b in msgs if isinstance(b, Routed)]
        requests = [b for b in msgs if isinstance(b, RankRequest)] if params.num_partitions > 1 else None
        new_u = _cat([b.users for b in blocks], str)
        new_i = _cat([b.items for b in blocks], str)
        new_r = _cat([b.ratings for b in blocks], np.float64)
        new_t = _cat([b.stamps for b in blocks], np.int64)
        here_i = _cat([b.here_items for b in blocks], str)
        rejected = sum(b.rejected for b in blocks)

        sel = part.replay.selected(batch_no, fraction)
        rep_u, rep_i, rep_r = part.replay.users[sel], part.replay.items[sel], part.replay.ratings[sel]
        mirror_i = part.mirror.items[part.mirror.selected(batch_no, fraction)]

        def rows_of(table: FactorTable, keys: np.ndarray):
            ids, rows = _rows_of(table, keys)
            bias, vec = gather(table, rows)
            count = np.where(rows >= 0, table.count[np.maximum(rows, 0)] if len(table) else 0, 0)
            fresh = np.flatnonzero(rows < 0)
            if len(fresh):
                b0, v0 = init_factors([ids[j] for j in fresh], params.rank, params.seed,
                                      params.init_scale)
                bias[fresh], vec[fresh] = b0, v0
            return (ids, bias.astype(np.float32), vec.astype(np.float32), len(fresh), count,
                    table.stats(rows))

        u_ids, ub, uv, u_fresh, u_count, u_st = rows_of(part.users, np.concatenate([new_u, rep_u]))
        i_ids, ib, iv, i_fresh, i_count, i_st = rows_of(part.items, np.concatenate([here_i, mirror_i]))
        ranking = None
        if part.ranking is not None and with_ranking:
            ranking = _gather_ranking(params, part.ranking, blocks, r_batch_no, r_fraction, r_sweep,
                                      requests)
        yield 0, Gathered(pid, u_ids, ub, uv, u_fresh, i_ids, ib, iv, i_fresh,
                          new_u, new_i, new_r, new_t, rep_u, rep_i, rep_r, rejected, u_count, i_count,
                          u_st, i_st, ranking)

    return stage


@dataclass(frozen=True)
class RankingCarry:
    """What the driver hands the learning task about the ranking model: the carried
    Gramians XᵀX / YᵀY and the positives learned so far."""

    gram_users: np.ndarray
    gram_items: np.ndarray
    positives_seen: int
    replay_fraction: float = 0.0


def _learn_ranking(params: ALSParams, carry: RankingCarry, msgs: Sequence[Gathered | RankSource],
                   stats: dict[str, Any]) -> list[RankLearned]:
    """C, ranking model: the batch's positives (and replay) learned against the carried
    Gramians (:func:`modeler.core.ranking.learn_ranking_batch`); rows back per partition.
    ``msgs``: what each partition gathered (its ``src`` and ``ranking``)."""
    P = params.num_partitions
    rk = [m.ranking for m in msgs if m.ranking is not None]
    u_ids = [k for r in rk for k in r.u_ids]
    i_ids = [k for r in rk for k in r.i_ids]
    rank = params.ranking_rank
    ev_u = _cat([r.ev_users for r in rk], str)
    ev_i = _cat([r.ev_items for r in rk], str)
    ev_w = _cat([r.ev_weights for r in rk], np.float64)
    ev_t = _cat([r.ev_stamps for r in rk], np.int64)
    ev_imp = _cat([r.ev_implicit for r in rk], bool)
    rep_u = _cat([r.rep_u for r in rk], str)
    rep_i = _cat([r.rep_i for r in rk], str)
    rep_c = _cat([r.rep_c for r in rk], np.float32)
    pos = np.flatnonzero(ev_w > 0)
    pu, pi = ev_u[pos], ev_i[pos]
    conf = 1.0 + params.ranking_alpha * ev_w[pos]
    n_pos = len(pos)
    keep_frac = keep_fraction(params.reservoir_size, carry.positives_seen + n_pos)
    stats.update({
        "r_positives": n_pos, "r_implicit": sum(r.n_implicit for r in rk),
        "r_probes": sum(r.probes for r in rk), "r_hits": sum(r.hits for r in rk),
        "r_new_users": 0, "r_new_items": 0, "r_replayed": len(rep_c), "r_refused": 0,
        "r_conf_sum": float((conf - 1.0).sum()),
        "r_d_gram_users": np.zeros((rank, rank)), "r_d_gram_items": np.zeros((rank, rank)),
    })
    if n_pos:
        u_known = _cat([r.u_known for r in rk], bool)
        i_known = _cat([r.i_known for r in rk], bool)
        users = _work_table(rank, _cat([r.u_vec for r in rk], np.float32, rank),
                            _cat([r.u_count for r in rk], np.int64),
                            RowStats.concat([r.u_stats for r in rk], rank))
        items = _work_table(rank, _cat([r.i_vec for r in rk], np.float32, rank),
                            _cat([r.i_count for r in rk], np.int64),
                            RowStats.concat([r.i_stats for r in rk], rank))
        u_index = {k: j for j, k in enumerate(u_ids)}
        i_index = {k: j for j, k in enumerate(i_ids)}
        all_u = np.concatenate([pu, rep_u]).tolist()
        all_i = np.concatenate([pi, rep_i]).tolist()
        u_rows = np.fromiter((u_index[k] for k in all_u), dtype=np.int64, count=len(all_u))
        i_rows = np.fromiter((i_index[k] for k in all_i), dtype=np.int64, count=len(all_i))
        if params.ranking_history > 0:
            hs = [r.history for r in rk if r.history is not None]

            def flat(parts: list[HistoryEvents]) -> HistoryEvents:
                return HistoryEvents(*(np.concatenate([getattr(x, f) for x in parts])
                                       for f in HistoryEvents._fields)) if parts else HistoryEvents.empty()

            out = learn_history_batch(
                params, users, items, u_known, i_known,
                flat([history_events(h.u_solve, h.u_hist, u_index, i_index) for h in hs]),
                flat([history_events(h.i_solve, h.i_hist, i_index, u_index) for h in hs]),
                flat([evicted_events(h.u_ext, u_index, i_index) for h in hs]),
                flat([evicted_events(h.i_ext, i_index, u_index) for h in hs]),
                carry.gram_users, carry.gram_items)
            # Only the solved keys changed (the partners came to be read).
            solved_u = np.zeros(len(u_ids), dtype=bool)
            solved_i = np.zeros(len(i_ids), dtype=bool)
            solved_u[[u_index[k] for h in hs for k in h.u_solve]] = True
            solved_i[[i_index[k] for h in hs for k in h.i_solve]] = True
            stats["r_evicted_users"] = sum(len(h.u_ext.ev_keys) for h in hs)
            stats["r_evicted_items"] = sum(len(h.i_ext.ev_keys) for h in hs)
        else:
            out = learn_ranking_batch(params, n_pos, np.concatenate([conf, rep_c.astype(np.float64)]),
                                      u_rows, i_rows, users, items, u_known, i_known,
                                      carry.gram_users, carry.gram_items,
                                      replay_solves_all(params, carry.positives_seen, carry.replay_fraction))
            solved_u = np.ones(len(u_ids), dtype=bool)
            solved_i = np.ones(len(i_ids), dtype=bool)
        stats.update({"r_new_users": int((~u_known).sum()), "r_new_items": int((~i_known).sum()),
                      "r_refused": out.refused, "r_d_gram_users": out.d_gram_users,
                      "r_d_gram_items": out.d_gram_items})
        # Statistics of the solved rows only (the others were not changed, and hold none here).
        u_at, i_at = np.flatnonzero(solved_u), np.flatnonzero(solved_i)
        u_vec, i_vec, u_st, i_st = users.vec, items.vec, users.stats(u_at), items.stats(i_at)
        u_inc = np.bincount(u_rows[:n_pos], minlength=len(u_ids))
        i_inc = np.bincount(i_rows[:n_pos], minlength=len(i_ids))
        if params.ranking_history <= 0:
            prio = rating_priority(pu.tolist(), pi.tolist(), ev_t[pos], params.seed ^ RESERVOIR_SALT)
            keep = keep_mask(prio, keep_frac)
        else:  # per-key histories: no replay sample to feed
            prio, keep = np.zeros(n_pos, dtype=np.uint64), np.zeros(n_pos, dtype=bool)
    else:  # no positive: no ranking row changes
        u_ids, i_ids = [], []
        u_vec = i_vec = np.zeros((0, rank), dtype=np.float32)
        u_st = i_st = RowStats.zeros(0, rank)
        u_at = i_at = np.zeros(0, dtype=np.int64)
        u_inc = i_inc = np.zeros(0, dtype=np.int64)
        prio, keep = np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=bool)
        solved_u = solved_i = np.zeros(0, dtype=bool)
    ext_of = {m.src: m.ranking.history for m in msgs
              if m.ranking is not None and m.ranking.history is not None} if n_pos else {}
    u_pid = _pids(u_ids, P)
    i_pid = _pids(i_ids, P)
    ku, ki, kc, kp = pu[keep], pi[keep], conf[keep].astype(np.float32), prio[keep]
    ku_pid, ki_pid = _pids(ku.tolist(), P), _pids(ki.tolist(), P)
    ev_pid = _pids(ev_u.tolist(), P)
    u_arr, i_arr = np.asarray(u_ids, dtype=str), np.asarray(i_ids, dtype=str)
    out_msgs = []
    for p in range(P):
        su, si, ru, ri, se = u_pid == p, i_pid == p, ku_pid == p, ki_pid == p, ev_pid == p
        st_u, st_i = su[u_at], si[i_at]  # this partition's share of the solved rows' statistics
        su, si = su & solved_u, si & solved_i
        sim = se & ev_imp
        h = ext_of.get(p)
        out_msgs.append(RankLearned(u_arr[su].tolist(), u_vec[su], u_inc[su], _share(u_st, st_u),
                                    i_arr[si].tolist(), i_vec[si], i_inc[si], _share(i_st, st_i),
                                    (ku[ru], ki[ru], kc[ru], kp[ru]), (ki[ri], kp[ri]), keep_frac,
                                    ev_u[se], ev_i[se], ev_u[sim], ev_i[sim], ev_w[sim],
                                    h.u_ext if h is not None else None,
                                    h.i_ext if h is not None else None))
    return out_msgs


def _share(st: RowStats, mask: np.ndarray) -> RowStats:
    """The rows of ``st`` where ``mask`` holds; ``st`` itself when that is all of them (one
    partition: a fresh copy made for the message, not copied again)."""
    return st if mask.all() else st.select(mask)


def _work_table(rank: int, vec: np.ndarray, count: np.ndarray, st: RowStats) -> FactorTable:
    n = len(vec)
    return FactorTable(rank, [""] * n, {}, np.zeros(n, dtype=np.float32), vec, count,
                       np.zeros(n, dtype=bool), st.gram, st.moment, st.mass)


def _pids(keys: list[str], num_partitions: int) -> np.ndarray:
    """:func:`partition_of` of many ids (no hashing for a model of one partition)."""
    if num_partitions == 1:
        return np.zeros(len(keys), dtype=np.int64)
    return np.fromiter((partition_of(k, num_partitions) for k in keys), dtype=np.int64, count=len(keys))


def _learn_stage(params: ALSParams, rating_sum: float, ratings_seen: int,
                 carry: RankingCarry | None = None):
    """C: the batch's working set (ratings + the rows they touch) learned in one task, the
    ranking model's beside it; updated rows go back to their partitions. The model itself
    never comes here."""
    P = params.num_partitions
    lo, hi = params.rating_min, params.rating_max

    def stage(it: Iterator[tuple[int, Gathered]]) -> Iterator[tuple[int, Learned]]:
        settle()
        msgs = sorted((m for _, m in it), key=lambda m: m.src)
        u_ids = [k for m in msgs for k in m.u_ids]
        i_ids = [k for m in msgs for k in m.i_ids]
        ub = _cat([m.ub for m in msgs], np.float32)
        uv = _cat([m.uv for m in msgs], np.float32, params.rank)
        ib = _cat([m.ib for m in msgs], np.float32)
        iv = _cat([m.iv for m in msgs], np.float32, params.rank)
        new_u = _cat([m.new_u for m in msgs], str)
        new_i = _cat([m.new_i for m in msgs], str)
        new_r = _cat([m.new_r for m in msgs], np.float64)
        new_t = _cat([m.new_t for m in msgs], np.int64)
        rep_u = _cat([m.rep_u for m in msgs], str)
        rep_i = _cat([m.rep_i for m in msgs], str)
        rep_r = _cat([m.rep_r for m in msgs], np.float32)
        u_st = RowStats.concat([m.u_stats for m in msgs], params.rank)
        i_st = RowStats.concat([m.i_stats for m in msgs], params.rank)
        n_new = len(new_r)
        stats: dict[str, Any] = {
            "n": n_new, "rejected": sum(m.rejected for m in msgs), "sum": float(new_r.sum()),
            "new_users": sum(m.u_fresh for m in msgs), "new_items": sum(m.i_fresh for m in msgs),
            "replayed": len(rep_r), "preq_sse": 0.0, "refused": 0,
        }
        keep_frac = keep_fraction(params.reservoir_size, ratings_seen + n_new)
        if n_new:
            mu_before = rating_sum / ratings_seen if ratings_seen else 0.5 * (lo + hi)
            mu = (rating_sum + stats["sum"]) / (ratings_seen + n_new)
            u_index = {k: j for j, k in enumerate(u_ids)}
            i_index = {k: j for j, k in enumerate(i_ids)}
            all_u = np.concatenate([new_u, rep_u]).tolist()
            all_i = np.concatenate([new_i, rep_i]).tolist()
            u_rows = np.fromiter((u_index[k] for k in all_u), dtype=np.int64, count=len(all_u))
            i_rows = np.fromiter((i_index[k] for k in all_i), dtype=np.int64, count=len(all_i))
            rates = np.concatenate([new_r, rep_r.astype(np.float64)])
            preq, refused = learn_batch(params, mu, mu_before, n_new, rates, u_rows, i_rows,
                                        ub, uv, ib, iv, _cat([m.u_count for m in msgs], np.int64),
                                        _cat([m.i_count for m in msgs], np.int64), u_st, i_st)
            stats["preq_sse"], stats["refused"] = preq, refused
            u_inc = np.bincount(u_rows[:n_new], minlength=len(u_ids))
            i_inc = np.bincount(i_rows[:n_new], minlength=len(i_ids))
            prio = rating_priority(new_u.tolist(), new_i.tolist(), new_t, params.seed)
            keep = keep_mask(prio, keep_frac)
        else:  # no valid rating: no explicit row is written back (or marked changed)
            u_ids, i_ids = [], []
            ub, uv, ib, iv = ub[:0], uv[:0], ib[:0], iv[:0]
            u_st, i_st = RowStats.zeros(0, params.rank), RowStats.zeros(0, params.rank)
            u_inc = np.zeros(0, dtype=np.int64)
            i_inc = np.zeros(0, dtype=np.int64)
            prio = np.zeros(0, dtype=np.uint64)
            keep = np.zeros(0, dtype=bool)
        ranked: list[RankLearned | None] = [None] * P
        learned = n_new
        if carry is not None:
            ranked = list(_learn_ranking(params, carry, msgs, stats))
            learned += sum(len(m.ranking.ev_weights) for m in msgs if m.ranking is not None)
        u_pid = _pids(u_ids, P)
        i_pid = _pids(i_ids, P)
        # The batch's ratings go back to their user's partition too (for a sink).
        r_pid = u_pid[u_rows[:n_new]] if n_new else np.zeros(0, dtype=np.int64)
        ku, ki, kr, kp = new_u[keep], new_i[keep], new_r[keep], prio[keep]
        ku_pid = _pids(ku.tolist(), P)
        ki_pid = _pids(ki.tolist(), P)
        u_arr, i_arr = np.asarray(u_ids, dtype=str), np.asarray(i_ids, dtype=str)
        for p in range(P):
            su, si = u_pid == p, i_pid == p
            ru, ri = ku_pid == p, ki_pid == p
            rb = r_pid == p
            yield p, Learned(-1, u_arr[su].tolist(), ub[su], uv[su], u_inc[su],
                             i_arr[si].tolist(), ib[si], iv[si], i_inc[si],
                             (ku[ru], ki[ru], kr[ru], kp[ru]), (ki[ri], kp[ri]),
                             keep_frac, stats if p == 0 else {},
                             (new_u[:n_new][rb], new_i[:n_new][rb], new_r[:n_new][rb]), learned,
                             u_st.select(su), i_st.select(si), ranked[p])

    return stage


def _apply_ranking(part: _RankPart, msg: RankLearned | None, copy: bool = True) -> _RankPart:
    users, items = (part.users.copy(), part.items.copy()) if copy else (part.users, part.items)
    users.touched[:] = False
    items.touched[:] = False
    if msg is None:
        return _RankPart(users, items, part.replay, part.mirror, part.seen, part.u_hist, part.i_hist)
    users.upsert(msg.u_ids, np.zeros(len(msg.u_ids), dtype=np.float32), msg.u_vec, msg.u_inc, msg.u_stats)
    items.upsert(msg.i_ids, np.zeros(len(msg.i_ids), dtype=np.float32), msg.i_vec, msg.i_inc, msg.i_stats)
    replay = part.replay.updated(msg.keep_frac, *msg.replay_keep)
    mirror = part.mirror.updated(msg.keep_frac, None, msg.mirror_keep[0], None, msg.mirror_keep[1])
    seen = part.seen.added(msg.seen_users.tolist(), msg.seen_items.tolist()) if part.seen is not None else None
    u_hist, i_hist = part.u_hist, part.i_hist
    if msg.u_ext is not None:
        u_hist = u_hist.updated(msg.u_ext.keys, msg.u_ext.partners, msg.u_ext.conf)
    if msg.i_ext is not None:
        i_hist = i_hist.updated(msg.i_ext.keys, msg.i_ext.partners, msg.i_ext.conf)
    return _RankPart(users, items, replay, mirror, seen, u_hist, i_hist)


def _apply_stage(it: Iterator[tuple[int, Any]]) -> Iterator[tuple[int, _Part]]:
    """D: write the learned rows back into partition p (a new record; inputs never mutated)."""
    pid, part, msgs = _split(it)
    yield pid, _applied(part, msgs, copy=True)


def _apply_in_place(it: Iterator[tuple[int, Any]]) -> Iterator[tuple[int, _Part]]:
    """D for a partition held by a state server (:mod:`modeler.spark.resident`): the same
    writes, into the partition's own tables (nobody else reads them)."""
    pid, part, msgs = _split(it)
    yield pid, _applied(part, msgs, copy=False)


def _applied(part: _Part, msgs: list[Any], copy: bool) -> _Part:
    # A persisted partition may be read again (retries, speculation): never mutate it in
    # place unless it is the state server's own (copy=False).
    users, items = (part.users.copy(), part.items.copy()) if copy else (part.users, part.items)
    users.touched[:] = False
    items.touched[:] = False
    replay, mirror, stats, batch, learned = part.replay, part.mirror, {}, None, 0
    ranking = part.ranking
    implicit = None
    for m in msgs:
        users.upsert(m.u_ids, m.ub, m.uv, m.u_inc, m.u_stats)
        items.upsert(m.i_ids, m.ib, m.iv, m.i_inc, m.i_stats)
        replay = replay.updated(m.keep_frac, *m.replay_keep)
        mirror = mirror.updated(m.keep_frac, None, m.mirror_keep[0], None, m.mirror_keep[1])
        stats, batch, learned = m.stats, m.rated, m.learned
        if ranking is not None:
            ranking = _apply_ranking(ranking, m.ranking, copy)
            if m.ranking is not None:
                implicit = (m.ranking.imp_users, m.ranking.imp_items, m.ranking.imp_weights)
    return _Part(users, items, replay, mirror, stats, batch, learned, ranking, implicit)


def _fused_stage(params: ALSParams, batch_no: int, fraction: float, rating_sum: float,
                 ratings_seen: int, r_batch_no: int = 0, r_fraction: float = 0.0,
                 carry: RankingCarry | None = None, r_sweep: tuple[float, float] = (0.0, 0.0),
                 copy: bool = True):
    """B+C+D in one task, for a model of ONE partition: gather, learn and write back without
    the two shuffles between them (each PySpark stage and task costs tens of ms, far more
    than the numpy work of a batch). The same functions as the four-stage plan, chained.

    With the ranking model on and two threads (:data:`modeler.core.tables.RUN_THREADS`),
    the ranking model's gather, learn and write-back run on a second thread beside the
    explicit model's (:func:`_ranking_pass`): the two read and write disjoint parts of the
    partition and neither reads the other's results, so the bits are those of one thread."""
    side = carry is not None and tables.RUN_THREADS > 1
    gather = _gather_stage(params, batch_no, fraction, r_batch_no, r_fraction, r_sweep,
                           with_ranking=not side)
    learn = _learn_stage(params, rating_sum, ratings_seen, None if side else carry)
    apply = _apply_stage if copy else _apply_in_place

    def stage(it: Iterator[tuple[int, Any]]) -> Iterator[tuple[int, _Part]]:
        settle()
        pid, part, blocks = _split(it)
        if not side or part.ranking is None:
            gathered = list(gather(itertools.chain([(pid, part)], ((pid, b) for b in blocks))))
            learned = list(learn(iter(gathered)))
            yield from apply(itertools.chain([(pid, part)], learned))
            return
        assert carry is not None
        ranking = _side_pool().submit(_ranking_pass, params, pid, part.ranking, blocks, r_batch_no,
                                      r_fraction, r_sweep, carry, copy)
        try:
            alone = dataclasses.replace(part, ranking=None)
            gathered = list(gather(itertools.chain([(pid, alone)], ((pid, b) for b in blocks))))
            learned = list(learn(iter(gathered)))
            (_, new), = apply(itertools.chain([(pid, alone)], learned))
        finally:
            done = ranking.result()  # waited for even when the explicit side failed
        yield pid, dataclasses.replace(new, ranking=done.part, implicit_batch=done.implicit,
                                       learned=new.learned + done.learned,
                                       stats={**new.stats, **done.stats})

    return stage


class RankingPass(NamedTuple):
    """The ranking model's share of a fused batch (:func:`_ranking_pass`): its new partition
    share, the statistics it adds to the batch's, the events it learned, and the batch's
    implicit events (for a sink)."""

    part: _RankPart
    stats: dict[str, Any]
    learned: int
    implicit: tuple[np.ndarray, np.ndarray, np.ndarray] | None


def _ranking_pass(params: ALSParams, pid: int, part: _RankPart, blocks: list[Any], r_batch_no: int,
                  r_fraction: float, r_sweep: tuple[float, float], carry: RankingCarry,
                  copy: bool) -> RankingPass:
    """B+C+D of the ranking model alone, in a model of one partition: what
    :func:`_gather_stage`, :func:`_learn_stage` and :func:`_applied` do for it."""
    routed = [b for b in blocks if isinstance(b, Routed)]
    gathered = _gather_ranking(params, part, routed, r_batch_no, r_fraction, r_sweep, None)
    stats: dict[str, Any] = {}
    msg, = _learn_ranking(params, carry, [RankSource(pid, gathered)], stats)
    return RankingPass(_apply_ranking(part, msg, copy), stats, len(gathered.ev_weights),
                       (msg.imp_users, msg.imp_items, msg.imp_weights))


_side: ThreadPoolExecutor | None = None


def _side_pool() -> ThreadPoolExecutor:
    """The thread of :func:`_ranking_pass` (one per process; not the runs' pool of
    :func:`modeler.core.tables.each_run`, which both models' passes submit to)."""
    global _side
    if _side is None:
        _side = ThreadPoolExecutor(1, thread_name_prefix="ranking")
    return _side


def _finish(sink: Any):
    """The per-partition end of ``train()``: the batch statistics, and the sink's answer."""

    def finish(kv: tuple[int, _Part]) -> tuple[dict[str, Any], Any]:
        settle()
        pid, part = kv
        if sink is None or not part.learned:  # nothing learned: nothing to write
            return part.stats, None
        empty = np.zeros(0, dtype=str)
        bu, bi, br = part.batch if part.batch is not None else (empty, empty, np.zeros(0))
        rk = part.ranking
        iu, ii, iw = part.implicit_batch if part.implicit_batch is not None else (empty, empty, np.zeros(0))
        return part.stats, sink(PartitionUpdate(pid, part.users, part.items, bu, bi, br,
                                                rk.users if rk is not None else None,
                                                rk.items if rk is not None else None, iu, ii, iw))

    return finish


# ---------------------------------------------------------------------------------------------
# The resident layout: partitions held by each executor's state server (modeler.spark.resident)
# ---------------------------------------------------------------------------------------------


class Stepped(NamedTuple):
    """A resident training step's record of partition p: the partition's new token and the
    step's answer (``_finish``'s stats and sink answer); ``token`` None: the state server
    lacked the partition (:data:`modeler.spark.resident.MISSING`), nothing was learned."""

    token: Token | None
    answer: tuple[dict[str, Any], Any] | None


def _split_token(it: Iterable[tuple[int, Any]]) -> tuple[int, Token, list[Any]]:
    """Like :func:`_split`, for a union of the token RDD with messages."""
    pid, token, msgs = -1, None, []
    for key, value in it:
        pid = key
        if isinstance(value, Token):
            token = value
        elif isinstance(value, Stepped):
            token = value.token
        else:
            msgs.append(value)
    if token is None:
        raise StateLost(f"model partition {pid}: no token (its state was lost)")
    return pid, token, msgs


def _chain(pid: int, part: _Part, msgs: list[Any]) -> Iterator[tuple[int, Any]]:
    return itertools.chain([(pid, part)], ((pid, m) for m in msgs))


class _ReadStage:
    """A stage over (partition + messages) run inside the state server, read-only: it
    returns what the stage yields."""

    def __init__(self, stage: Any) -> None:
        self.stage = stage

    def __call__(self, pid: int, part: _Part, msgs: list[Any]) -> list[Any]:
        return list(self.stage(_chain(pid, part, msgs)))


class _StepStage:
    """A stage run inside the state server that yields the partition's new record."""

    def __init__(self, stage: Any) -> None:
        self.stage = stage

    def __call__(self, pid: int, part: _Part, msgs: list[Any]) -> _Part:
        ((_, new),) = list(self.stage(_chain(pid, part, msgs)))
        return new


class _FlatStage:
    """``flatMap(f)`` over (pid, part) as a read-only stage (no messages)."""

    def __init__(self, f: Any) -> None:
        self.f = f

    def __call__(self, it: Iterator[tuple[int, Any]]) -> Iterator[Any]:
        yield from self.f(next(it))


class _Finish:
    def __init__(self, finish: Any) -> None:
        self.finish = finish

    def __call__(self, pid: int, part: _Part) -> tuple[dict[str, Any], Any]:
        return self.finish((pid, part))


def _dumps(fn: Any) -> bytes:
    from pyspark import cloudpickle  # the executors have pyspark; the core does not need it

    return cloudpickle.dumps(fn)


def _remote_read(stage: Any):
    """mapPartitions function: run ``stage`` on the partition in its state server."""
    fn = _dumps(_ReadStage(stage))

    def run(it: Iterator[tuple[int, Any]]) -> Iterator[Any]:
        settle()
        pid, token, msgs = _split_token(it)
        out = resident.call(token.app, "read", token.key, pid, token.epoch, fn, msgs)
        if out is resident.MISSING:
            raise StateLost(f"model partition {pid} (epoch {token.epoch}) is not on this executor")
        return iter(out)

    return run


def _remote_flat(f: Any):
    return _remote_read(_FlatStage(f))


def _remote_step(stage: Any, finish: Any, epoch: int, drop: tuple[str, ...]):
    """mapPartitions function: apply ``stage`` to the partition in its state server (epoch
    token.epoch -> ``epoch``) and answer ``finish`` of the new partition."""
    fn, fin = _dumps(_StepStage(stage)), _dumps(_Finish(finish))

    def run(it: Iterator[tuple[int, Any]]) -> Iterator[tuple[int, Stepped]]:
        settle()
        pid, token, msgs = _split_token(it)
        out = resident.call(token.app, "step", token.key, pid, token.epoch, epoch, fn, msgs, fin, drop)
        if out is resident.MISSING:
            yield pid, Stepped(None, None)
        else:
            yield pid, Stepped(Token(token.app, token.key, epoch), out)

    return run


def _install(app: str, key: str, epoch: int, drop: tuple[str, ...]):
    """mapPartitions function: hand each (pid, _Part), each partition's snapshot chunks
    (pid, resident.PickleChunk) or a restore's pieces (pid, RowChunk) in order, to this
    host's state server."""

    def run(it: Iterator[tuple[int, Any]]) -> Iterator[tuple[int, Token]]:
        settle()
        for pid, part in it:
            if isinstance(part, resident.PickleChunk):
                if not resident.call(app, "install_chunk", key, pid, epoch, part, drop):
                    continue  # more of this partition to come
            elif isinstance(part, RowChunk):
                if not resident.call(app, "install_piece", key, pid, epoch, part, drop):
                    continue
            else:
                resident.call(app, "install", key, pid, epoch, part, drop)
            yield pid, Token(app, key, epoch)

    return run


def _held(it: Iterator[tuple[int, Any]]) -> Iterator[bool]:
    for pid, value in it:
        token = value.token if isinstance(value, Stepped) else value
        yield token is not None and bool(resident.call(token.app, "has", token.key, pid, token.epoch))


def _whole_calls(it: Iterator[tuple[int, Any]], op: str, *args: Any) -> Iterator[tuple[int, Any]]:
    """Per (pid, token): the answer of its state server to ``op`` on the whole partition."""
    for pid, value in it:
        token = value.token if isinstance(value, Stepped) else value
        if token is None:
            raise StateLost(f"model partition {pid}: no token (its state was lost)")
        out = resident.call(token.app, op, token.key, pid, token.epoch, *args)
        if out is resident.MISSING:
            raise StateLost(f"model partition {pid} (epoch {token.epoch}) is not on this executor")
        yield pid, out


def _fetch(it: Iterator[tuple[int, Any]]) -> Iterator[tuple[int, _Part]]:
    """The whole partition, out of its state server (whole-model reads)."""
    return _whole_calls(it, "read", _FETCH, [])


def _dump(chunk_bytes: int):
    """mapPartitions function: each whole partition pickled by its state server, for a
    snapshot, as records of ``chunk_bytes`` (not unpickled here: :func:`_install` hands them
    back to a server as they are), so no process on the way holds the whole pickle."""

    def run(it: Iterator[tuple[int, Any]]) -> Iterator[tuple[int, resident.PickleChunk]]:
        for pid, value in it:
            token = value.token if isinstance(value, Stepped) else value
            chunks = (resident.MISSING if token is None
                      else resident.dump(token.app, token.key, pid, token.epoch, chunk_bytes))
            if chunks is resident.MISSING:
                raise StateLost(f"model partition {pid} is not on this executor (its state was lost)")
            for chunk in chunks:
                yield pid, chunk

    return run


def _whole(pid: int, part: _Part, msgs: list[Any]) -> _Part:
    return part


_FETCH = pickle.dumps(_whole)

#: Keys of collected resident models, dropped from the state servers by the next call.
_DEAD: list[str] = []


# ---------------------------------------------------------------------------------------------
# Prediction
# ---------------------------------------------------------------------------------------------


def _route_pairs(num_partitions: int):
    def route(index: int, it: Iterator[Any]) -> Iterator[tuple[int, tuple]]:
        settle()
        recs = list(it)
        users = [str(r[0]) for r in recs]
        items = [str(r[1]) for r in recs]
        pids = np.fromiter((partition_of(u, num_partitions) for u in users), dtype=np.int64,
                           count=len(users))
        u_arr, i_arr = np.asarray(users, dtype=str), np.asarray(items, dtype=str)
        p_arr = np.empty(len(recs), dtype=object)
        p_arr[:] = [r[2] if len(r) > 2 else None for r in recs]
        for p in range(num_partitions):
            sel = np.flatnonzero(pids == p)
            if len(sel):
                yield p, (index, u_arr[sel], i_arr[sel], p_arr[sel])

    return route


def _predict_user_side(num_partitions: int):
    def stage(it: Iterator[tuple[int, Any]]) -> Iterator[tuple[int, tuple]]:
        settle()
        pid, part, msgs = _split(it)
        for src, users, items, payload in msgs:
            bu, uv = gather(part.users, part.users.lookup(users.tolist()))
            ipids = np.fromiter((partition_of(i, num_partitions) for i in items), dtype=np.int64,
                                count=len(items))
            for j in np.unique(ipids).tolist():
                sel = ipids == j
                yield j, ((src, pid), users[sel], items[sel], payload[sel], bu[sel], uv[sel])

    return stage


def _predict_item_side(mu: float, lo: float, hi: float):
    def stage(it: Iterator[tuple[int, Any]]) -> Iterator[tuple]:
        settle()
        _, part, msgs = _split(it)
        for _, users, items, payload, bu, uv in msgs:
            bi, iv = gather(part.items, part.items.lookup(items.tolist()))
            pred = np.clip(predict_raw(mu, bu, bi, uv, iv), lo, hi)
            yield from zip(users.tolist(), items.tolist(), pred.tolist(), payload.tolist())

    return stage


def _records(table_of, only_touched: bool = False):
    def explode(kv: tuple[int, _Part]) -> list[tuple[str, tuple[float, np.ndarray]]]:
        return table_of(kv[1]).records(only_touched)

    return explode


def _rank_vectors(users: bool, only_touched: bool):
    def explode(kv: tuple[int, _Part]) -> list[tuple[str, np.ndarray]]:
        rk = kv[1].ranking
        if rk is None:
            return []
        t = rk.users if users else rk.items
        sel = np.flatnonzero(t.touched) if only_touched else range(len(t.ids))
        return [(t.ids[j], t.vec[j].copy()) for j in sel]

    return explode


def _ranking_users_of(part: _Part) -> FactorTable:
    return part.ranking.users if part.ranking is not None else FactorTable(1)


def _ranking_items_of(part: _Part) -> FactorTable:
    return part.ranking.items if part.ranking is not None else FactorTable(1)


def _users_of(part: _Part) -> FactorTable:
    return part.users


def _items_of(part: _Part) -> FactorTable:
    return part.items


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


class StreamingALS(ParamsAttributes):
    """Streaming bias-SGD matrix factorisation, trained one mini-batch RDD at a time.

    ``model = StreamingALS(rank=10, iterations=2, reg_param=0.1, learning_rate=0.1, seed=42,
    num_partitions=8, scale=RatingScale())``; then ``stats = model.train(rdd)`` per
    mini-batch, where ``rdd`` holds ``(user, item, rating, timestamp)`` tuples (ids are
    turned into ``str``). Ratings that are NaN/inf, off the scale, or lack an id are rejected
    and counted (``stats.n_rejected``), never learned.

    Accuracy knobs (see :class:`modeler.core.als_math.ALSParams` and docs/streaming_als.md):
    ``reg_bias`` (λ_b, default = reg_param), ``init_scale`` (std of newcomers' vectors),
    ``aggregation`` (``"damped"``/``"mean"``/``"sum"``), ``history_weight`` (κ: bias steps
    shrink like 1/(n + κ·ratings already learned)), ``reservoir_size`` and ``replay_ratio``
    (bounded replay of past ratings), ``vector_step`` (``"rls"``: each vector is the ridge
    solution of the least-squares statistics of everything its key learned, an online Newton
    step; ``"sgd"``: the seeds' step), ``forgetting`` and ``maturity`` (of those statistics).
    Any other :class:`~modeler.core.als_math.ALSParams` field (``ranking``, ``ranking_rank``,
    ``ranking_alpha``, ``weighting``, ...) may be given as a keyword; its default lives there.
    ``checkpoint_interval``: batches between reliable checkpoints
    (when the SparkContext has a checkpoint directory; other batches cut lineage with
    ``localCheckpoint``). ``state_store="resident"`` keeps the partitions in the executors'
    state servers (:mod:`modeler.spark.resident`); its snapshots are records of
    ``snapshot_chunk_bytes`` of the partitions' pickles (default ``resident.CHUNK_BYTES``).

    Not thread-safe: call ``train``/``predict`` from one thread.
    """

    def __init__(
        self,
        rank: int = 10,
        iterations: int = 2,
        reg_param: float = 0.1,
        learning_rate: float = 0.1,
        seed: int = 42,
        num_partitions: int = 8,
        scale: RatingScale | None = None,
        reg_bias: float | None = None,
        init_scale: float = 0.1,
        aggregation: str = "damped",
        history_weight: float = 4.0,
        reservoir_size: int = 50_000,
        replay_ratio: float = 1.0,
        vector_step: str = "rls",
        forgetting: float = 1.0,
        maturity: float = 30.0,
        checkpoint_interval: int = 20,
        params: ALSParams | None = None,
        state_store: str = "rdd",
        snapshot_chunk_bytes: int | None = None,
        **more: Any,
    ) -> None:
        if state_store not in STATE_STORES:
            raise ValueError(f"state_store: must be one of {STATE_STORES}, got {state_store!r}")
        scale = scale or RatingScale()
        unknown = sorted(set(more) - {f.name for f in dataclasses.fields(ALSParams)})
        if unknown:
            raise TypeError(f"unknown StreamingALS arguments: {unknown}")
        if params is not None and more:
            params = dataclasses.replace(params, **more)
        if params is None:
            params = ALSParams(
                rank=rank, iterations=iterations, reg_param=reg_param,
                reg_bias=reg_param if reg_bias is None else reg_bias,
                learning_rate=learning_rate, seed=seed, init_scale=init_scale,
                aggregation=aggregation, history_weight=history_weight,
                reservoir_size=reservoir_size, replay_ratio=replay_ratio,
                num_partitions=num_partitions, rating_min=scale.min, rating_max=scale.max,
                vector_step=vector_step, forgetting=forgetting, maturity=maturity,
                **more,  # the ranking model's parameters (ALSParams holds their defaults)
            )
        self.params = params
        self.scale = RatingScale(min=params.rating_min, max=params.rating_max)
        self.checkpoint_interval = checkpoint_interval
        self.mu = 0.0
        self.rating_sum = 0.0
        self.ratings_seen = 0
        self.batches = 0
        self.last_batch_size = 0
        self.last_stats: TrainStats | None = None
        self.last_sink_results: list[Any] = []
        # The ranking model's driver state: carried Gramians XᵀX / YᵀY (rank² floats each,
        # summed from the learning task's deltas), positives learned, its replay counters.
        r = params.ranking_rank
        self.gram_users = np.zeros((r, r))
        self.gram_items = np.zeros((r, r))
        self.positives_seen = 0
        self.conf_minus_1_sum = 0.0
        self.ranking_batches = 0
        self.ranking_last_batch_size = 0
        # History entries held per side (ranking_history > 0): the sweep's fractions. Not
        # persisted: a restored model's histories start empty (docs/ranking_model.md).
        self.ranking_user_entries = 0
        self.ranking_item_entries = 0
        # "rdd": RDD[(pid, _Part)], num_partitions records. "resident": RDD[(pid, Token or
        # Stepped)], the partitions being in the executors' state servers, with a snapshot
        # RDD[(pid, _Part)] (every checkpoint_interval batches, on disk), the driver's scalars
        # at that point and the routed batches since: what a lost partition is rebuilt from.
        self.state_store = state_store
        self.snapshot_chunk_bytes = int(snapshot_chunk_bytes or resident.CHUNK_BYTES)
        self._state: Any = None
        self._key = uuid.uuid4().hex
        self._epoch = 0
        self._snapshot: Any = None
        self._snap_scalars: dict[str, Any] = {}
        self._since: list[Any] = []
        # When False, train() leaves a due snapshot to snapshot_if_due(): the service calls
        # it once the batch's version is published, so the snapshot (O(model), ~2.4 s at
        # ~210k keys) is not on the batch's way to being served.
        self.snapshot_in_train = True
        self.recoveries = 0
        if self.resident:
            weakref.finalize(self, _DEAD.append, self._key)

    # -- plain attributes ------------------------------------------------------------------

    @property
    def num_partitions(self) -> int:
        return self.params.num_partitions

    @property
    def resident(self) -> bool:
        """True when the partitions live in the executors' state servers."""
        return self.state_store == "resident"

    # -- reading the partitions ------------------------------------------------------------

    def _flat(self, f: Any):
        """``flatMap(f)`` over the model's ``(pid, _Part)`` records (inside the state
        servers when resident: only ``f``'s output moves)."""
        if not self.resident:
            return self._need().flatMap(f)
        self._ensure_held()  # may rebuild: read self._state after it
        return self._need().mapPartitions(_remote_flat(f))

    def _with_state(self, msgs: Any, stage: Any):
        """``stage`` over partition p of the model and p's messages (read-only)."""
        state = self._need()
        if not self.resident:
            return self._zip(state, msgs).mapPartitions(stage)
        return self._zip(state, msgs).mapPartitions(_remote_read(stage))

    def partitions(self):
        """RDD[(pid, _Part)]: the whole model partitions (copies, when resident)."""
        if not self.resident:
            return self._need()
        self._ensure_held()
        return self._need().mapPartitions(_fetch, preservesPartitioning=True)

    def read_partitions(self, f: Any):
        """``flatMap(f)`` over ``(pid, _Part)``; ``f`` runs where the partition is and must
        not modify it."""
        return self._flat(f)

    def release(self) -> None:
        """Forget the model's cached RDDs and its partitions in the state servers."""
        for rdd in [self._state, self._snapshot, *self._since]:
            if rdd is not None:
                with contextlib.suppress(Exception):
                    rdd.unpersist()
        self._state, self._snapshot, self._since = None, None, []
        if self.resident:
            _DEAD.append(self._key)
            self._key = uuid.uuid4().hex

    # -- factor RDDs -----------------------------------------------------------------------

    @property
    def user_factors(self):
        """RDD[(user id, (bias: float, vector: float32 ndarray (rank,)))] of every user seen."""
        return self._flat(_records(_users_of))

    @property
    def item_factors(self):
        """RDD[(item id, (bias: float, vector: float32 ndarray (rank,)))] of every item seen."""
        return self._flat(_records(_items_of))

    @property
    def changed_users(self):
        """Like :attr:`user_factors`, only users changed by the LAST ``train()`` (rated or replayed)."""
        return self._flat(_records(_users_of, True))

    @property
    def changed_items(self):
        """Like :attr:`item_factors`, only items changed by the LAST ``train()`` (rated or replayed)."""
        return self._flat(_records(_items_of, True))

    @property
    def has_ranking(self) -> bool:
        return self.params.ranking

    @property
    def events_seen(self) -> int:
        """Ratings learned by the explicit model plus positives learned by the ranking model."""
        return self.ratings_seen + self.positives_seen

    @property
    def ranking_user_factors(self):
        """RDD[(user id, float32 vector (ranking_rank,))] of the ranking model."""
        return self._flat_ranking(_rank_vectors(True, False))

    @property
    def ranking_item_factors(self):
        """RDD[(item id, float32 vector (ranking_rank,))] of the ranking model."""
        return self._flat_ranking(_rank_vectors(False, False))

    @property
    def changed_ranking_users(self):
        """Like :attr:`ranking_user_factors`, only rows changed by the LAST ``train()``."""
        return self._flat_ranking(_rank_vectors(True, True))

    @property
    def changed_ranking_items(self):
        """Like :attr:`ranking_item_factors`, only rows changed by the LAST ``train()``."""
        return self._flat_ranking(_rank_vectors(False, True))

    @property
    def ranking_item_counts(self):
        """RDD[(item id, positives learned for it)]."""
        return self._flat_ranking(
            lambda kv: list(zip(kv[1].ranking.items.ids, kv[1].ranking.items.count.tolist())))

    @property
    def mean_conf_minus_1(self) -> float:
        """Mean α·w over the positives learned (seeds restored statistics)."""
        return self.conf_minus_1_sum / self.positives_seen if self.positives_seen else self.params.ranking_alpha

    def _flat_ranking(self, f: Any):
        if not self.params.ranking:
            raise RuntimeError("this model has no ranking model (ALSParams.ranking is False)")
        return self._flat(f)

    @property
    def item_counts(self):
        """RDD[(item id, number of valid ratings learned for it)] (replays not counted)."""
        return self._flat(lambda kv: list(zip(kv[1].items.ids, kv[1].items.count.tolist())))

    @property
    def user_counts(self):
        """RDD[(user id, number of valid ratings learned from them)]."""
        return self._flat(lambda kv: list(zip(kv[1].users.ids, kv[1].users.count.tolist())))

    @property
    def reservoir_held(self) -> int:
        """Ratings currently held for replay (a Spark job; for monitoring and tests)."""
        return int(self._flat(lambda kv: [len(kv[1].replay)]).sum())

    def _need(self):
        if self._state is None:
            raise RuntimeError("the model has not been trained or restored yet")
        return self._state

    # -- training --------------------------------------------------------------------------

    def _zip(self, state, messages):
        """Co-partitioned union: partition p of the result = partition p of both inputs
        (a PartitionerAwareUnionRDD; no shuffle of the model). With ONE partition, a narrow
        ``coalesce(1)`` of the union does it for inputs of any partitioning, so messages
        need no shuffle at all (see :meth:`_keyed`)."""
        if self.num_partitions == 1:
            return state.union(messages).coalesce(1)
        merged = state.union(messages)
        if merged.getNumPartitions() != self.num_partitions:
            raise RuntimeError("model RDDs lost their partitioner; a union would misalign them")
        return merged

    def _keyed(self, rdd):
        """Messages keyed by model partition, placed there: a shuffle, unless the model has
        one partition (then :meth:`_zip` brings everything into one task without one)."""
        if self.num_partitions == 1:
            return rdd
        return rdd.partitionBy(self.num_partitions, _identity)

    def _empty_state(self, sc):
        """A model RDD of empty partitions under the model's partitioner."""
        P = self.num_partitions
        params = self.params
        return sc.parallelize(range(P), P).map(lambda k: (k, _empty_part(params))).partitionBy(P, _identity)

    def _ensure_state(self, sc) -> None:
        if self._state is None:
            if self.resident:
                self._install(self._empty_state(sc))
            else:
                self._state = self._empty_state(sc)

    # -- the resident layout's state handling ----------------------------------------------

    _SCALARS = ("mu", "rating_sum", "ratings_seen", "batches", "last_batch_size", "gram_users",
                "gram_items", "positives_seen", "conf_minus_1_sum", "ranking_batches",
                "ranking_last_batch_size", "ranking_user_entries", "ranking_item_entries")

    def _scalars(self) -> dict[str, Any]:
        return {k: np.array(v) if isinstance(v, np.ndarray) else v
                for k, v in ((k, getattr(self, k)) for k in self._SCALARS)}

    def _new_epoch(self) -> int:
        self._epoch += 1
        return self._epoch

    def _take_dead(self) -> tuple[str, ...]:
        drop = tuple(_DEAD)
        del _DEAD[:len(drop)]
        return drop

    def _cut(self, rdd: Any, level: Any, reliable: bool) -> None:
        """Persist ``rdd`` at ``level``, mark its lineage to be cut and compute it."""
        rdd.persist(level)
        if reliable and rdd.context.getCheckpointDir() is not None:
            rdd.checkpoint()
        else:
            rdd.localCheckpoint()
        # Counted in the JVM: a Python count would read every record back into a worker
        # (for a snapshot, the whole model's pickle once more).
        rdd._jrdd.count()

    def _install(self, parts: Any) -> None:
        """Make ``parts`` (RDD[(pid, _Part)] of an empty model, or RDD[(pid, RowChunk)] of a
        restore; not yet persisted, its lineage computable from the driver's data) the
        snapshot, and hand its partitions to the executors' state servers, in one job."""
        from pyspark import StorageLevel

        parts.persist(StorageLevel.DISK_ONLY)  # filled by the job below
        tokens = parts.mapPartitions(_install(parts.context.applicationId, self._key, self._new_epoch(),
                                              self._take_dead()),
                                     preservesPartitioning=True)
        self._cut(tokens, StorageLevel.MEMORY_ONLY, False)
        for old in [self._state, self._snapshot, *self._since]:
            if old is not None:
                old.unpersist()
        self._state, self._snapshot, self._since = tokens, parts, []
        self._snap_scalars = self._scalars()

    def _snapshot_now(self) -> None:
        """Copy the partitions out of the state servers into a new snapshot (on disk, a
        reliable checkpoint when the context has a directory): once every
        ``checkpoint_interval`` batches, the one O(model) transfer of the resident layout."""
        from pyspark import StorageLevel

        t0 = time.perf_counter()
        snap = self._state.mapPartitions(_dump(self.snapshot_chunk_bytes), preservesPartitioning=True)
        self._cut(snap, StorageLevel.DISK_ONLY, True)
        log.info("model snapshot at batch %d: %.1f s", self.batches, time.perf_counter() - t0)
        for old in [self._snapshot, *self._since]:
            if old is not None:
                old.unpersist()
        self._snapshot, self._since = snap, []
        self._snap_scalars = self._scalars()

    def _all_held(self) -> bool:
        try:
            return all(self._need().mapPartitions(_held).collect())
        except Exception:
            return False

    def _ensure_held(self) -> None:
        if not self._all_held():
            self._recover()

    def _recover(self) -> None:
        """Rebuild lost partitions: the snapshot into the state servers, then the batches
        learned since, in order (no sink: they were published). The result is the model an
        uninterrupted run has (the same functions on the same inputs)."""
        from pyspark import StorageLevel

        if self._snapshot is None:
            raise StateLost("the model's partitions were lost and it has no snapshot")
        self.recoveries += 1
        since = self._since
        log.warning("model partitions lost from the state servers: rebuilding from the snapshot "
                    "(batch %d) and %d batches since", self._snap_scalars["batches"], len(since))
        for k, v in self._snap_scalars.items():
            setattr(self, k, np.array(v) if isinstance(v, np.ndarray) else v)
        tokens = self._snapshot.mapPartitions(_install(self._snapshot.context.applicationId, self._key,
                                                       self._new_epoch(), ()),
                                              preservesPartitioning=True)
        self._cut(tokens, StorageLevel.MEMORY_ONLY, False)
        old, self._state = self._state, tokens
        if old is not None:
            old.unpersist()
        self._since = []
        for routed in since:
            self._train_routed(routed, None, time.perf_counter())
        self._since = since

    def train(self, rdd, sink: Any = None) -> TrainStats:
        """Learn one mini-batch RDD of ``(user, item, rating, timestamp)``; return its stats.

        Four stages, whatever ``iterations``: route the ratings to their users' partitions;
        gather the rows they (and the replayed ratings) touch; learn that working set in one
        task (:func:`modeler.core.als_math.learn_batch`); write the rows back. One Spark job. A
        model of one partition does all of it in one task: a narrow coalesce puts the input
        and the model together, with no shuffle at all.

        ``sink``: an optional picklable callable run on the executors, in the same job, with a
        :class:`PartitionUpdate` of every model partition once the batch is learned (e.g. to
        write the changed rows somewhere); it should return something small. Its answers,
        one per partition, are in :attr:`last_sink_results` (``None`` for every partition when
        the batch had no valid rating: the sink is not called then). It must not raise for trouble
        it can report (an exception fails the batch like any task failure).
        """
        started = time.perf_counter()
        p = self.params
        sc = rdd.context
        self._ensure_state(sc)
        routed = self._keyed(rdd.mapPartitionsWithIndex(_route_ratings(p)))
        if not self.resident:
            return self._train_routed(routed, sink, started)
        from pyspark import StorageLevel

        routed.persist(StorageLevel.MEMORY_AND_DISK)  # kept until the next snapshot
        try:
            stats = self._train_routed(routed, sink, started)
        except Exception as exc:
            if not isinstance(exc, StateLost) and self._all_held():
                routed.unpersist()
                raise
            self._recover()
            stats = self._train_routed(routed, sink, started)
        self._since.append(routed)
        if self.snapshot_in_train:
            self.snapshot_if_due()
        return stats

    def snapshot_if_due(self) -> bool:
        """Take the resident layout's snapshot when ``checkpoint_interval`` batches have
        been learned since the last one; whether it did. Called by :meth:`train`, or by its
        caller after the batch is published (``snapshot_in_train = False``). If it fails,
        nothing changes: the batches since the last snapshot stay what a lost partition is
        rebuilt from, and the next call tries again."""
        if not self.resident or self._state is None:
            return False
        if len(self._since) < max(1, self.checkpoint_interval or 20):
            return False
        self._snapshot_now()
        return True

    def _train_routed(self, routed: Any, sink: Any, started: float) -> TrainStats:
        """One batch, routed (stage A) already; the driver's counters move only if it was
        learned."""
        p = self.params
        P = p.num_partitions
        batch_no = self.batches + 1
        fraction = replay_fraction(p, self.last_batch_size, self.ratings_seen)
        r_batch_no = self.ranking_batches + 1
        history = p.ranking and p.ranking_history > 0
        r_fraction = 0.0 if history else ranking_replay_fraction(p, self.ranking_last_batch_size,
                                                                 self.positives_seen)
        r_sweep = (sweep_fraction(p, self.ranking_last_batch_size, self.ranking_user_entries),
                   sweep_fraction(p, self.ranking_last_batch_size, self.ranking_item_entries))
        carry = (RankingCarry(self.gram_users, self.gram_items, self.positives_seen, r_fraction)
                 if p.ranking else None)
        if self.resident:
            parts = self._resident_step(routed, sink, batch_no, fraction, r_batch_no, r_fraction,
                                        carry, r_sweep, history)
        elif P == 1:
            state = self._zip(self._state, routed).mapPartitions(
                _fused_stage(p, batch_no, fraction, self.rating_sum, self.ratings_seen,
                             r_batch_no, r_fraction, carry, r_sweep),
                preservesPartitioning=True)
        else:
            inputs = routed
            if history:
                # One more round trip: the histories' partners live in other partitions.
                requests = self._keyed(self._zip(self._state, routed).mapPartitions(
                    _history_requests(p, r_batch_no, r_sweep)))
                inputs = routed.union(requests)
            gathered = self._zip(self._state, inputs) \
                .mapPartitions(_gather_stage(p, batch_no, fraction, r_batch_no, r_fraction, r_sweep)) \
                .partitionBy(1, _zero)
            learned = gathered.mapPartitions(
                _learn_stage(p, self.rating_sum, self.ratings_seen, carry)) \
                .partitionBy(P, _identity)
            state = self._zip(self._state, learned).mapPartitions(_apply_stage, preservesPartitioning=True)
        if not self.resident:
            parts = self._cached_step(state, sink, batch_no)
        self.last_sink_results = [r for _, r in parts] if sink is not None else []
        st: dict[str, Any] = next((x for x, _ in parts if x), {})

        n_new = int(st.get("n", 0))
        if n_new:
            self.batches = batch_no
            self.ratings_seen += n_new
            self.rating_sum += float(st["sum"])
            self.mu = self.rating_sum / self.ratings_seen
            self.last_batch_size = n_new
        n_pos = int(st.get("r_positives", 0))
        if n_pos:
            self.ranking_batches = r_batch_no
            self.positives_seen += n_pos
            self.conf_minus_1_sum += float(st["r_conf_sum"])
            self.ranking_last_batch_size = n_pos
            self.gram_users = self.gram_users + st["r_d_gram_users"]
            self.gram_items = self.gram_items + st["r_d_gram_items"]
            self.ranking_user_entries += n_pos - int(st.get("r_evicted_users", 0))
            self.ranking_item_entries += n_pos - int(st.get("r_evicted_items", 0))
        stats = TrainStats(
            n_ratings=n_new,
            n_rejected=int(st.get("rejected", 0)),
            prequential_sse=float(st.get("preq_sse", 0.0)),
            new_users=int(st.get("new_users", 0)),
            new_items=int(st.get("new_items", 0)),
            seconds=time.perf_counter() - started,
            n_replayed=int(st.get("replayed", 0)),
            n_diverged=int(st.get("refused", 0)) + int(st.get("r_refused", 0)),
            n_implicit=int(st.get("r_implicit", 0)),
            ranking_positives=n_pos,
            ranking_new_users=int(st.get("r_new_users", 0)),
            ranking_new_items=int(st.get("r_new_items", 0)),
            ranking_hits=int(st.get("r_hits", 0)),
            ranking_probes=int(st.get("r_probes", 0)),
        )
        if stats.n_diverged:
            log.warning("batch %d: %d factor rows refused a non-finite update", batch_no,
                        stats.n_diverged)
        self.last_stats = stats
        return stats

    def _cached_step(self, state: Any, sink: Any, batch_no: int) -> list[tuple[dict[str, Any], Any]]:
        """The batch's job in the "rdd" layout: the new model RDD cached, its lineage cut,
        and each partition's ``_finish`` answer."""
        if (self.checkpoint_interval > 0 and batch_no % self.checkpoint_interval == 0
                and state.context.getCheckpointDir() is not None):
            state.persist()
            state.checkpoint()
        else:
            # persist() first: PySpark would otherwise fuse the next map into this RDD and the
            # marked RDD itself would never be computed (nor its lineage cut).
            state.persist()
            state.localCheckpoint()
        parts = state.map(_finish(sink)).collect()
        old, self._state = self._state, state
        old.unpersist()
        return parts

    def _resident_step(self, routed: Any, sink: Any, batch_no: int, fraction: float,
                       r_batch_no: int, r_fraction: float, carry: RankingCarry | None,
                       r_sweep: tuple[float, float], history: bool) -> list[tuple[dict[str, Any], Any]]:
        """The batch's job in the resident layout: the same stages, the partitions read and
        written inside the state servers. Returns each partition's ``_finish`` answer."""
        p = self.params
        epoch = self._new_epoch()  # never reused, even if this attempt fails
        finish = _finish(sink)
        if p.num_partitions == 1:
            fused = _fused_stage(p, batch_no, fraction, self.rating_sum, self.ratings_seen,
                                 r_batch_no, r_fraction, carry, r_sweep, copy=False)
            out = self._zip(self._state, routed).mapPartitions(
                _remote_step(fused, finish, epoch, self._take_dead()), preservesPartitioning=True)
        else:
            inputs = routed
            if history:
                inputs = routed.union(self._keyed(
                    self._with_state(routed, _history_requests(p, r_batch_no, r_sweep))))
            gathered = self._with_state(
                inputs, _gather_stage(p, batch_no, fraction, r_batch_no, r_fraction, r_sweep)) \
                .partitionBy(1, _zero)
            learned = gathered.mapPartitions(
                _learn_stage(p, self.rating_sum, self.ratings_seen, carry)) \
                .partitionBy(p.num_partitions, _identity)
            out = self._zip(self._state, learned).mapPartitions(
                _remote_step(_apply_in_place, finish, epoch, self._take_dead()),
                preservesPartitioning=True)
        out.persist()
        out.localCheckpoint()
        answers = out.map(lambda kv: kv[1].answer).collect()
        if any(a is None for a in answers):
            out.unpersist()
            raise StateLost(f"batch {batch_no}: a model partition was missing from its state server")
        old, self._state = self._state, out
        old.unpersist()
        return answers

    # -- prediction ------------------------------------------------------------------------

    def predict(self, pairs):
        """RDD of ``(user, item)`` -> RDD of ``(user, item, prediction)`` clipped to the scale.

        Unknown users or items count as average (zero bias, zero vector): a pair of
        strangers gets μ clipped to the scale."""
        return self.predict_with(pairs.map(lambda r: (r[0], r[1], None))).map(lambda t: t[:3])

    def predict_with(self, triples):
        """RDD of ``(user, item, payload)`` -> ``(user, item, prediction, payload)``; the payload
        (e.g. the true rating) rides along untouched."""
        p = self.params
        P = p.num_partitions
        if self.resident:
            self._ensure_held()
        routed = self._keyed(triples.mapPartitionsWithIndex(_route_pairs(P)))
        to_items = self._keyed(self._with_state(routed, _predict_user_side(P)))
        return self._with_state(to_items, _predict_item_side(self.mu, p.rating_min, p.rating_max))

    def rmse(self, ratings) -> float:
        """√(mean (r − r̂)²) over an RDD of ``(user, item, rating[, timestamp])``."""
        sq = (self.predict_with(ratings.map(lambda r: (str(r[0]), str(r[1]), float(r[2]))))
              .map(lambda t: ((t[3] - t[2]) ** 2, 1))
              .fold((0.0, 0), lambda a, b: (a[0] + b[0], a[1] + b[1])))
        return float(np.sqrt(sq[0] / sq[1])) if sq[1] else float("nan")

    # -- persistence -----------------------------------------------------------------------

    def state(self) -> ModelState:
        """The model as RDDs of ``(id, (bias, vector float32 (rank,), count))`` + scalars."""

        def rows(table_of):
            def explode(kv):
                t = table_of(kv[1])
                return [(t.ids[j], (float(t.bias[j]), t.vec[j].copy(), int(t.count[j])))
                        for j in range(len(t.ids))]
            return explode

        ranking = self.params.ranking
        flat = self._flat
        return ModelState(
            users=flat(rows(_users_of)),
            items=flat(rows(_items_of)),
            mu=self.mu,
            ratings_seen=self.ratings_seen,
            extra=self.state_extra(),
            ranking_users=flat(rows(_ranking_users_of)) if ranking else None,
            ranking_items=flat(rows(_ranking_items_of)) if ranking else None,
        )

    state_rdds = state

    def state_extra(self) -> dict[str, Any]:
        """``state().extra``, the scalars a restore needs besides the factors, without the
        state's RDDs (each of which, resident, first checks with a Spark job that every
        partition is held: four jobs a batch for a publish that reads none of them)."""
        return {"rating_sum": self.rating_sum, "batches": self.batches,
                "last_batch_size": self.last_batch_size, "params": self.params.to_dict(),
                "positives_seen": self.positives_seen,
                "conf_minus_1_sum": self.conf_minus_1_sum,
                "ranking_batches": self.ranking_batches,
                "ranking_last_batch_size": self.ranking_last_batch_size}

    @classmethod
    def restore(
        cls,
        sc,
        user_rdd,
        item_rdd,
        mu: float,
        ratings_seen: int,
        extra: dict[str, Any] | None = None,
        *,
        ranking_user_rdd: Any = None,
        ranking_item_rdd: Any = None,
        **kwargs: Any,
    ) -> StreamingALS:
        """Rebuild a model from RDDs of ``(id, (bias, vector[, count]))`` (or of
        :class:`RowBlock`, the same rows as arrays) and scalars.

        ``ranking_user_rdd``/``ranking_item_rdd`` (same shape, bias ignored, count = the
        key's positives) restore the ranking model; its Gramians are recomputed from them
        and its statistics seeded from the counts
        (:func:`modeler.core.ranking.seed_ranking_statistics`). Its replay sample and the
        probe's seen pairs start empty.

        ``kwargs`` are constructor arguments (rank, learning_rate, ...); without them
        ``extra["params"]`` (as written by :meth:`state`) is used (``state_store`` and
        ``snapshot_chunk_bytes``, the layout's, may be given either way; the latter also
        sizes the pieces each partition is built from). ``extra["rating_sum"]``
        restores μ's running sum exactly (default ``mu × ratings_seen``). Training continues
        from the restored factors, biases, counts and μ; the replay sample starts empty and
        refills from the stream (it is not persisted).
        """
        extra = dict(extra or {})
        layout = {"state_store": kwargs.pop("state_store", "rdd"),
                  "snapshot_chunk_bytes": kwargs.pop("snapshot_chunk_bytes", None)}
        use_saved = not kwargs and "params" in extra
        model = (cls(params=ALSParams(**extra["params"]), **layout) if use_saved
                 else cls(**layout, **kwargs))
        model.mu = float(mu)
        model.ratings_seen = int(ratings_seen)
        model.rating_sum = float(extra.get("rating_sum", mu * ratings_seen))
        model.batches = int(extra.get("batches", 0))
        model.last_batch_size = int(extra.get("last_batch_size", 0))
        model.positives_seen = int(extra.get("positives_seen", 0))
        model.conf_minus_1_sum = float(extra.get("conf_minus_1_sum", 0.0))
        model.ranking_batches = int(extra.get("ranking_batches", 0))
        model.ranking_last_batch_size = int(extra.get("ranking_last_batch_size", 0))
        p = model.params
        P = p.num_partitions
        sides = user_rdd.map(lambda rec: (0, rec)).union(item_rdd.map(lambda rec: (1, rec)))
        if p.ranking and ranking_user_rdd is not None:
            sides = sides.union(ranking_user_rdd.map(lambda rec: (2, rec)))
        if p.ranking and ranking_item_rdd is not None:
            sides = sides.union(ranking_item_rdd.map(lambda rec: (3, rec)))
        tagged = model._keyed(sides.flatMap(_split_block(P)))
        rows = model._zip(model._empty_state(sc), tagged)
        seeding = None
        if p.vector_step == "rls" or p.ranking:
            # Factors and counts carry no least-squares statistics: seed them from the counts
            # (als_math.seed_statistics) with each side's count-weighted second moment; the
            # ranking model's Gramians are the sums of v vᵀ over all rows. One pass over the
            # rows first (they are small: no statistics), then the partitions are built.
            moments = rows.mapPartitions(_row_moments(p)).reduce(_add_moments)
            if p.ranking:
                model.gram_users, model.gram_items = moments[4][0], moments[5][0]
            seeding = _Seeding(moments, p, model.mean_conf_minus_1)
        # Each partition as pieces of rows, built where it will live (in the resident layout,
        # its state server): no process holds a whole partition's pickle (at ~190k keys the
        # partition built in a worker and handed on whole took the tree to 2.8 GB).
        chunks = rows.mapPartitions(_row_chunks(p, seeding, model.snapshot_chunk_bytes),
                                    preservesPartitioning=True)
        if model.resident:
            model._install(chunks)  # the pieces are also the snapshot until the first one
        else:
            state = chunks.mapPartitions(_built, preservesPartitioning=True)
            state.persist()
            state.localCheckpoint()
            state.count()
            model._state = state
        return model

    @classmethod
    def from_factors(cls, sc, user_rdd, item_rdd, mu: float, ratings_seen: int,
                     **kwargs: Any) -> StreamingALS:
        """A model that starts from given factors (e.g. batch ALS): :meth:`restore` without extras."""
        return cls.restore(sc, user_rdd, item_rdd, mu, ratings_seen, None, **kwargs)


class _Seeding(NamedTuple):
    """What a restored partition's statistics are seeded from (:func:`_row_moments` summed
    over partitions): the four tables' count-weighted second moments, the ranking model's
    Gramians and its mean confidence − 1."""

    moments: tuple[tuple[np.ndarray, float], ...]
    params: ALSParams
    mean_conf_minus_1: float

    def apply(self, part: _Part, start: dict[int, int]) -> None:
        """Seed, in place, the rows of ``part`` from ``start[side]`` on (the rows a piece
        appended) that have a count but no statistics yet."""
        def mean(m):
            return m[0] / m[1] if m[1] else m[0]

        p, m = self.params, self.moments
        if p.vector_step == "rls":
            seed_statistics(part.users, mean(m[1]), p.reg_param, start[0])
            seed_statistics(part.items, mean(m[0]), p.reg_param, start[1])
        rk = part.ranking
        if rk is not None:
            seed_ranking_statistics(rk.users, mean(m[3]), m[5][0], self.mean_conf_minus_1,
                                    p.ranking_reg_param, p.ranking_reg_scaling, start[2])
            seed_ranking_statistics(rk.items, mean(m[2]), m[4][0], self.mean_conf_minus_1,
                                    p.ranking_reg_param, p.ranking_reg_scaling, start[3])


def _tables_of(part: _Part) -> dict[int, FactorTable]:
    """The tables of a partition by restore side: 0/1 users/items, 2/3 the ranking model's."""
    out = {0: part.users, 1: part.items}
    if part.ranking is not None:
        out.update({2: part.ranking.users, 3: part.ranking.items})
    return out


class RowBlock(NamedTuple):
    """Restored rows as arrays, an alternative to one ``(id, (bias, vector, count))`` record
    per row in the RDDs :meth:`StreamingALS.restore` takes: far fewer, smaller records to
    pickle (a restart at ~190k keys shipped ~380k tuples, each with its own numpy array)."""

    ids: list[str]
    bias: np.ndarray
    vec: np.ndarray  # (n, rank) float32
    counts: np.ndarray  # (n,) int


def row_blocks(ids: Sequence[str], bias: np.ndarray | None, vec: np.ndarray, counts: Sequence[int],
               size: int = 4096) -> list[RowBlock]:
    """``ids`` with their biases (zeros when None), vectors and counts as blocks of ``size`` rows."""
    if not len(ids):
        return []
    vec = np.asarray(vec, dtype=np.float32).reshape(len(ids), -1)
    b = np.zeros(len(ids), np.float32) if bias is None else np.asarray(bias, dtype=np.float32)
    c = np.asarray(counts, dtype=np.int64).reshape(-1)
    return [RowBlock([str(k) for k in ids[s:s + size]], b[s:s + size], vec[s:s + size], c[s:s + size])
            for s in range(0, len(ids), size)]


def _split_block(num_partitions: int):
    """flatMap function over ``(side, record)``: ``(pid, (side, record))``, a RowBlock cut
    into one block per partition of its ids."""

    def run(t: tuple[int, Any]) -> Iterator[tuple[int, tuple[int, Any]]]:
        side, rec = t
        if not isinstance(rec, RowBlock):
            yield (partition_of(str(rec[0]), num_partitions) if num_partitions > 1 else 0), t
            return
        if num_partitions == 1:
            yield 0, t
            return
        pids = np.fromiter((partition_of(k, num_partitions) for k in rec.ids), dtype=np.int64, count=len(rec.ids))
        for pid in np.unique(pids):
            at = np.flatnonzero(pids == pid)
            yield int(pid), (side, RowBlock([rec.ids[j] for j in at], rec.bias[at], rec.vec[at], rec.counts[at]))

    return run


class _Rows(NamedTuple):
    """Some restored rows of one table, sorted by id."""

    side: int
    ids: list[str]
    bias: np.ndarray
    vec: np.ndarray
    counts: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)

    def cut(self, start: int, end: int) -> _Rows:
        return _Rows(self.side, self.ids[start:end], self.bias[start:end], self.vec[start:end],
                     self.counts[start:end])


def _sorted_rows(part: _Part, recs: list[Any], ranks: dict[int, int]) -> list[_Rows]:
    """A partition's restore records ``(side, (id, (bias, vector[, count])))`` or ``(side,
    RowBlock)`` as one :class:`_Rows` per table of ``part`` (ids sorted, stably; a side
    without records: no rows)."""
    out = []
    for side in _tables_of(part):
        rank = ranks[side]
        mine = [r for s, r in recs if s == side]
        blocks = [r for r in mine if isinstance(r, RowBlock)]
        singles = [r for r in mine if not isinstance(r, RowBlock)]
        if singles:
            blocks.append(RowBlock(
                [str(r[0]) for r in singles], np.asarray([float(r[1][0]) for r in singles], dtype=np.float32),
                np.asarray([np.asarray(r[1][1], dtype=np.float32).reshape(-1) for r in singles]),
                np.asarray([int(r[1][2]) if len(r[1]) > 2 else 0 for r in singles], dtype=np.int64)))
        for b in blocks:
            if b.vec.ndim != 2 or b.vec.shape[1] != rank:
                raise ValueError(f"factors have rank {b.vec.shape[-1]}, the model rank {rank}")
        ids = [k for b in blocks for k in b.ids]
        order = np.asarray(sorted(range(len(ids)), key=ids.__getitem__), dtype=np.int64)
        if not blocks:
            out.append(_Rows(side, [], np.zeros(0, np.float32), np.zeros((0, rank), np.float32),
                             np.zeros(0, np.int64)))
            continue
        out.append(_Rows(side, [ids[j] for j in order],
                         np.concatenate([b.bias for b in blocks]).astype(np.float32)[order],
                         np.concatenate([b.vec for b in blocks]).astype(np.float32)[order],
                         np.concatenate([b.counts for b in blocks]).astype(np.int64)[order]))
    return out


def _row_moments(params: ALSParams):
    """mapPartitions function over the restore's union: per partition, the count-weighted
    second moments of the four tables' rows and the ranking model's plain Gramians, as the
    built tables would give them (summed over partitions by :func:`_add_moments`)."""
    ranks = {0: params.rank, 1: params.rank, 2: params.ranking_rank, 3: params.ranking_rank}

    def run(it: Iterator[tuple[int, Any]]) -> Iterator[tuple[tuple[np.ndarray, float], ...]]:
        _, part, recs = _split(it)
        rows = {r.side: r for r in _sorted_rows(part, recs, ranks)}
        empty = _Rows(-1, [], np.zeros(0, np.float32), np.zeros((0, 1), np.float32), np.zeros(0, np.int64))
        u, i, ru, ri = (rows.get(k, empty) for k in range(4))
        out = (second_moment(u.vec, u.counts), second_moment(i.vec, i.counts),
               second_moment(ru.vec, ru.counts), second_moment(ri.vec, ri.counts),
               (gramian(ru.vec), float(len(ru))), (gramian(ri.vec), float(len(ri))))
        del part, recs, rows, u, i, ru, ri
        trim()
        yield out

    return run


def _add_moments(a, b):
    return tuple((x[0] + y[0], x[1] + y[1]) for x, y in zip(a, b, strict=True))


@dataclass
class RowChunk:
    """Piece ``seq`` of a restored partition: some of its rows (the tables' rows in id
    order, each table's after the previous one's), ``last`` on the final piece. The first
    piece carries the empty partition and each table's row count (so the tables are sized
    once); every piece, the seeding. A state server builds the partition from them as they
    come (op ``install_piece``, :meth:`grow`), so no process holds more than a piece of it
    besides the partition itself; the cached-RDD layout folds them in one worker."""

    seq: int
    last: bool
    rows: tuple[_Rows, ...]
    seeding: _Seeding | None
    first: _Part | None = None
    sizes: tuple[tuple[int, int], ...] = ()

    def grow(self, part: _Part | None) -> _Part:
        """The partition with this piece's rows added (and seeded)."""
        if self.seq == 0:
            part = self.first
        if part is None:
            raise ValueError(f"restore piece {self.seq} came before the partition's first")
        if self.seq == 0:
            for side, n in self.sizes:
                _tables_of(part)[side].reserve(n)
        tables_ = _tables_of(part)
        start = {side: len(t) for side, t in tables_.items()}
        for r in self.rows:
            tables_[r.side].add_rows(r.ids, r.bias, r.vec, r.counts)
        if self.seeding is not None:
            self.seeding.apply(part, start)
        return part


def _row_chunks(params: ALSParams, seeding: _Seeding | None, chunk_bytes: int):
    """mapPartitions function over the restore's union: each partition as
    :class:`RowChunk` records of about ``chunk_bytes`` of rows."""
    ranks = {0: params.rank, 1: params.rank, 2: params.ranking_rank, 3: params.ranking_rank}

    def run(it: Iterator[tuple[int, Any]]) -> Iterator[tuple[int, RowChunk]]:
        pid, part, recs = _split(it)
        rows = _sorted_rows(part, recs, ranks)
        del recs
        sizes = tuple((r.side, len(r)) for r in rows)
        pieces: list[list[_Rows]] = [[]]
        room = chunk_bytes
        for r in rows:
            per_row = 4 * (ranks[r.side] + 4) + 2 * max((len(k) for k in r.ids), default=0) + 60
            at = 0
            while at < len(r):
                take = max(1, min(len(r) - at, room // per_row))
                pieces[-1].append(r.cut(at, at + take))
                at += take
                room -= take * per_row
                if room < per_row:
                    pieces.append([])
                    room = chunk_bytes
        if not pieces[-1] and len(pieces) > 1:
            pieces.pop()
        del rows
        for seq, piece in enumerate(pieces):
            yield pid, RowChunk(seq, seq == len(pieces) - 1, tuple(piece), seeding,
                                first=part if seq == 0 else None, sizes=sizes if seq == 0 else ())
        del pieces
        trim()

    return run


def _built(it: Iterator[tuple[int, RowChunk]]) -> Iterator[tuple[int, _Part]]:
    """mapPartitions function: the partitions a run of :class:`RowChunk` records build (the
    cached-RDD layout's restore; the resident one builds them in the state servers)."""
    part = None
    for pid, chunk in it:
        part = chunk.grow(None if chunk.seq == 0 else part)
        if chunk.last:
            yield pid, part
            part = None


__all__ = ["ModelState", "PartitionUpdate", "RowBlock", "StreamingALS", "TrainStats", "row_blocks"]
