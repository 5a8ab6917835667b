"""K candidate models trained side by side on Spark: one task reads a micro-batch once and
every candidate is scored on it (prequentially) and then learns it.

Layout: the K models live in ONE cached RDD of one partition whose single record is
``{candidate id: model}``, each model a whole :class:`modeler.core.als_math.LocalStreamingALS`
(the explicit model, and the ranking one beside it when ``ALSParams.ranking``: the numpy
reference the partitioned :class:`modeler.spark.streaming_als.StreamingALS` is tested
against), so the leader can be served as it is. ``kind`` says which of its two models the
candidates are judged on (``"explicit"``: RMSE, ``"ranking"``: NDCG@10). ``train()`` brings
the batch and the models into one task with a narrow ``union(...).coalesce(1)`` (no
shuffle), validates the batch's records once, and runs each candidate's ``train`` on the
same list: one pass over the batch, K updates. The task returns
the new models (kept on the executor, cached; lineage cut by ``localCheckpoint`` each batch)
and, to the driver, only K :class:`modeler.core.search.BatchLoss` values.

Memory: K times one model (each ``(n_users + n_items) × (rank_k + 2) × 4`` bytes of factors,
``(rank_k² + rank_k + 1) × 4`` bytes of RLS statistics per key, its replay sample of at most
``reservoir_size`` ratings), all on ONE executor, whose memory must hold them: the price of
"the same task". The models are never collected to the driver.

This is the one-partition layout (the default on a local master). The multi-partition
:class:`~modeler.spark.streaming_als.StreamingALS` is not side-by-side yet.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from modeler.core.als_math import ALSParams, LocalStreamingALS, split_events, validate_arrays, validate_implicit
from modeler.core.ranking import event_weights
from modeler.core.search import (
    WARM_USER_POSITIVES,
    BatchLoss,
    Params,
    SearchConfigError,
    probe_target_ranks,
    ranking_gains,
)
from modeler.workerheap import settle

_MODELS = "models"
_BATCH = "batch"


class CandidateStats(NamedTuple):
    """One candidate's counters after a batch (what the service reports of the leader)."""

    n_ratings: int = 0
    prequential_sse: float = 0.0
    n_implicit: int = 0
    ranking_positives: int = 0
    ranking_hits: int = 0
    ranking_probes: int = 0
    n_users: int = 0
    n_items: int = 0
    n_ranking_users: int = 0
    n_ranking_items: int = 0
    ratings_seen: int = 0
    positives_seen: int = 0
    # Its scalars (resume_scalars), for the version's search state.
    resume: dict[str, Any] | None = None


class CandidateOutcome(NamedTuple):
    """What one candidate did with one batch: its prequential loss (scored before learning),
    how many ratings (explicit kind) or positives (ranking kind) it learned, how many rows it
    refused (non-finite updates), and its counters."""

    loss: BatchLoss
    learned: int
    refused: int
    stats: CandidateStats = CandidateStats()


EXPLICIT = "explicit"
RANKING = "ranking"


def candidate_params(base: ALSParams, params: Params) -> ALSParams:
    """A candidate's parameters: the base with the candidate's own values."""
    kw: dict[str, Any] = dict(params)
    return dataclasses.replace(base, **kw)


def _build(kind: str, base: ALSParams, params: Params) -> LocalStreamingALS:
    return LocalStreamingALS(candidate_params(base, params))


class _Batch(NamedTuple):
    """A batch's valid ratings and implicit events as columns, validated once for every
    candidate."""

    users: list[str]
    items: list[str]
    ratings: np.ndarray
    stamps: np.ndarray
    i_users: list[str]
    i_items: list[str]
    i_weights: np.ndarray
    i_stamps: np.ndarray

    def records(self) -> list[tuple]:
        """The model's input records: ratings, then implicit events ``(u, i, None, t, w)``."""
        out: list[tuple] = list(zip(self.users, self.items, self.ratings.tolist(), self.stamps.tolist()))
        out += zip(self.i_users, self.i_items, [None] * len(self.i_users), self.i_stamps.tolist(),
                   self.i_weights.tolist())
        return out

    def ranking_columns(self) -> tuple[list[str], list[str], np.ndarray, np.ndarray, np.ndarray]:
        """(users, items, ratings (NaN: implicit), implicit weights (NaN: rating), stamps) of
        every event, as :meth:`LocalStreamingALS.train` hands them to its ranking model."""
        n, m = len(self.ratings), len(self.i_weights)
        return (self.users + self.i_users, self.items + self.i_items,
                np.concatenate([self.ratings, np.full(m, np.nan)]),
                np.concatenate([np.full(n, np.nan), self.i_weights]),
                np.concatenate([self.stamps, self.i_stamps]))


#: ALSParams fields the ranking model reads, and those the explicit model reads (both: the
#: shared ones); a search whose candidates agree on one model's fields trains it once.
_SHARED_FIELDS = ("seed", "init_scale", "maturity", "reservoir_size", "rating_min", "rating_max")
RANKING_FIELDS = tuple(f.name for f in dataclasses.fields(ALSParams)
                       if f.name.startswith("ranking") or f.name == "weighting") + _SHARED_FIELDS
EXPLICIT_FIELDS = tuple(f.name for f in dataclasses.fields(ALSParams)
                        if not f.name.startswith("ranking") and f.name != "weighting")
#: The explicit model's state on a LocalStreamingALS (what candidates sharing it share).
_EXPLICIT_STATE = ("users", "items", "reservoir", "mu", "rating_sum", "ratings_seen", "batches",
                   "last_batch_size")


def shared_model(kind: str, params: Sequence[ALSParams]) -> str | None:
    """Which of its two models every candidate of a ``kind`` search has in common: the
    ranking model of an explicit search whose candidates agree on every field it reads
    (``"ranking"``), the explicit model of a ranking search whose candidates agree on the
    explicit model's fields (``"explicit"``), else ``None``. A shared model is trained once
    per batch and referenced by every candidate: K candidates then cost K of the searched
    model and ONE of the other, in time, in the cached state and in the leader served
    (its other factor set is the same whoever leads)."""
    if len(params) < 2:
        return None
    first = params[0]
    if kind == EXPLICIT and first.ranking:
        same = all(getattr(p, f) == getattr(first, f) for p in params[1:] for f in RANKING_FIELDS)
        return RANKING if same else None
    if kind == RANKING:
        same = all(getattr(p, f) == getattr(first, f) for p in params[1:] for f in EXPLICIT_FIELDS)
        return EXPLICIT if same else None
    return None


def _link(model: LocalStreamingALS, carrier: LocalStreamingALS, share: str) -> None:
    """``model`` takes ``carrier``'s copy of the shared model (the same objects)."""
    if share == RANKING:
        model.ranking = carrier.ranking
    else:
        for name in _EXPLICIT_STATE:
            setattr(model, name, getattr(carrier, name))


def _with_shared(res: Any, shared: Any, share: str) -> Any:
    """A candidate's batch result with the shared model's counters (learned once, by the
    carrier) in place of the zeros its own ``train`` left there."""
    if share == RANKING:
        return dataclasses.replace(res, ranking_positives=shared.ranking_positives,
                                   ranking_hits=shared.ranking_hits, ranking_probes=shared.ranking_probes)
    return dataclasses.replace(res, n_ratings=shared.n_ratings, prequential_sse=shared.prequential_sse,
                               new_users=shared.new_users, new_items=shared.new_items,
                               n_replayed=shared.n_replayed, n_diverged=shared.n_diverged)


def _step(kind: str, model: LocalStreamingALS, batch: _Batch, records: list[tuple], probe: int, warm: int,
          share: str | None = None, shared: Any = None) -> CandidateOutcome:
    """Score one candidate on the batch (before it learns it), then let it learn the batch.

    Explicit: Σ squared errors of the batch's ratings. Ranking: Σ NDCG@10 over a probe sample
    of the batch's positives (:func:`modeler.core.search.probe_target_ranks`). With ``share``
    the candidate learns only its own model; ``shared`` is the shared one's batch result.
    ``records``: ``batch.records()``, built once for every candidate."""
    ranks: list[int] = []
    if kind == RANKING:
        p = model.params
        users, items, ratings, implicit, stamps = batch.ranking_columns()
        w = event_weights(ratings, implicit, p.weighting, p.rating_min, p.rating_max)
        ranks = probe_target_ranks(model.ranking, users, items, w > 0, stamps, probe, min_user_positives=warm)
    first = model.batches == 0
    res = model.train(records, explicit=share != EXPLICIT, ranking=share != RANKING)
    if share is not None:
        res = _with_shared(res, shared, share)
    stats = CandidateStats(
        n_ratings=int(res.n_ratings), prequential_sse=float(res.prequential_sse), n_implicit=int(res.n_implicit),
        ranking_positives=int(res.ranking_positives), ranking_hits=int(res.ranking_hits),
        ranking_probes=int(res.ranking_probes), n_users=len(model.users), n_items=len(model.items),
        n_ranking_users=len(model.ranking.users) if model.ranking is not None else 0,
        n_ranking_items=len(model.ranking.items) if model.ranking is not None else 0,
        ratings_seen=int(model.ratings_seen),
        positives_seen=int(model.ranking.positives_seen) if model.ranking is not None else 0,
        resume=resume_scalars(model))
    if kind == EXPLICIT:
        # A candidate's first batch is learned, not scored: it had no model to be judged.
        loss = BatchLoss(0.0, 0) if first else BatchLoss(float(res.prequential_sse), int(res.n_ratings))
        return CandidateOutcome(loss, int(res.n_ratings), int(res.n_diverged), stats)
    ndcg, _ = ranking_gains(ranks)
    return CandidateOutcome(BatchLoss(ndcg, len(ranks)), int(res.ranking_positives), int(res.n_diverged), stats)


def _tag(kind: str):
    def tag(it: Iterable[Any]) -> Iterator[tuple[str, Any]]:
        for x in it:
            yield (kind, x)
    return tag


def _side_by_side_stage(kind: str, base: ALSParams, spawn: Mapping[str, Params], drop: Sequence[str],
                        probe: int, warm: int, sink: Any = None):
    """The one task: the models' record and the batch's records meet here."""

    def stage(it: Iterator[tuple[str, Any]]) -> Iterator[tuple[str, Any]]:
        settle()
        models: dict[str, Any] = {}
        records: list[Any] = []
        for tag, x in it:
            if tag == _MODELS:
                # Updated in place: these objects are this task's own. A Python RDD's cached
                # partition is kept as pickled bytes in the JVM, so a task retry (or the
                # next read of the cache) unpickles fresh copies; the cache never sees these.
                models = dict(x)
            else:
                records.append(x)
        for cid in drop:
            models.pop(cid, None)
        for cid, params in spawn.items():
            models[cid] = _build(kind, base, params)
        # Validate once for all candidates (they share the scale): every model then sees the
        # same valid events in the same order.
        (us, its, rs, ts), (ius, iis, iws, its_), _bad = split_events(records)
        users, items, rates, stamps, _rej = validate_arrays(us, its, rs, ts, base.rating_min, base.rating_max)
        iu, ii, iw, it_, _irej = validate_implicit(ius, iis, iws, its_)
        batch = _Batch(users, items, rates, stamps, iu, ii, iw, it_)
        records_in = batch.records()
        outcomes: dict[str, CandidateOutcome] = {}
        order = sorted(models)
        share = shared_model(kind, [models[c].params for c in order])
        shared = None
        if share is not None:
            # The carrier: the oldest candidate (its copy of the shared model has learned the
            # most; a newborn takes it over warm). It learns the shared model once.
            carrier = models[min(order, key=lambda c: (c in spawn, _cid_key(c)))]
            shared = carrier.train(records_in, explicit=share == EXPLICIT, ranking=share == RANKING)
        for cid in order:
            if share is not None:
                _link(models[cid], carrier, share)
            outcomes[cid] = _step(kind, models[cid], batch, records_in, probe, warm, share, shared)
        # The sink (e.g. the segment writer) sees the new models and the batch where they live.
        answer = sink(models, batch) if sink is not None else None
        yield (_MODELS, models)
        yield (_BATCH, (outcomes, answer))

    return stage


def _cid_key(cid: str) -> tuple[int, str]:
    digits = cid.lstrip("c")
    return (int(digits), cid) if digits.isdigit() else (1 << 30, cid)


class SideBySideALS:
    """K candidates of one model kind (``"explicit"`` or ``"ranking"``) in one Spark task per
    batch (module docstring).

    ``train(rdd, spawn=..., drop=..., sink=...)`` adds the candidates of ``spawn`` (cold,
    from this batch on) and removes those of ``drop`` in the same task, then every model
    steps on the batch, then ``sink(models, batch)`` (optional, picklable, run in that task:
    e.g. writing the models' rows somewhere; its answer is in ``last_sink_results``); it
    returns ``{candidate id: CandidateOutcome}``.
    """

    def __init__(self, candidates: Mapping[str, Params], base: ALSParams | None = None,
                 kind: str = EXPLICIT, probe: int = 256, min_user_positives: int = WARM_USER_POSITIVES) -> None:
        if kind not in (EXPLICIT, RANKING):
            raise SearchConfigError(f"kind: must be {EXPLICIT!r} or {RANKING!r}, got {kind!r}")
        self.kind = kind
        self.probe = probe
        self.warm = min_user_positives
        self.base = base or ALSParams(num_partitions=1)
        if kind == RANKING and not self.base.ranking:
            raise SearchConfigError("kind: a ranking search needs the ranking model (ALSParams.ranking)")
        self._state = None
        self._pending: dict[str, Params] = dict(candidates)
        self.last_sink_results: list[Any] = []  # the sink's answer of the last batch (one task)
        self.live: dict[str, Params] = {}
        self.batches = 0

    def train(self, rdd, spawn: Mapping[str, Params] | None = None,
              drop: Sequence[str] = (), sink: Any = None) -> dict[str, CandidateOutcome]:
        sc = rdd.context
        add = {**self._pending, **dict(spawn or {})}
        self._pending = {}
        if self._state is None:
            models = sc.parallelize([{}], 1).mapPartitions(_tag(_MODELS))
        else:
            models = self._state.filter(lambda kv: kv[0] == _MODELS)
        merged = models.union(rdd.mapPartitions(_tag("r"))).coalesce(1)
        # The state RDD holds the models' record and this batch's outcomes (small): cached,
        # its lineage cut, so the DAG stays bounded however long the stream runs.
        state = merged.mapPartitions(_side_by_side_stage(self.kind, self.base, add, list(drop), self.probe,
                                                         self.warm, sink))
        state.persist()
        state.localCheckpoint()
        # collect(), not first(): take() stops reading the cached partition at the record it
        # wants, and PySpark ends a Python worker whose input is left unread instead of
        # reusing it, so every batch forked a fresh worker that imported numpy and the
        # modeler again (~0.5 s of CPU a batch).
        (outcomes, answer), = state.filter(lambda kv: kv[0] == _BATCH).map(lambda kv: kv[1]).collect()
        self.last_sink_results = [answer] if sink is not None else []
        old, self._state = self._state, state
        if old is not None:
            old.unpersist()
        for cid in drop:
            self.live.pop(cid, None)
        self.live.update(add)
        self.batches += 1
        return outcomes

    def predict(self, cid: str, pairs: Sequence[tuple[str, str]]) -> list[float]:
        """Candidate ``cid``'s predictions for (user, item) pairs (a Spark job; for tests)."""
        if self._state is None:
            raise RuntimeError("nothing trained yet")
        users = [u for u, _ in pairs]
        items = [i for _, i in pairs]
        got, = self._state.filter(lambda kv: kv[0] == _MODELS) \
            .map(lambda kv: kv[1][cid].predict(users, items).tolist()).collect()
        return [float(x) for x in got]

    def recommend(self, cid: str, user: str, n: int = 10) -> list[str]:
        """A ranking candidate's top ``n`` for ``user`` (a Spark job; for tests)."""
        if self._state is None:
            raise RuntimeError("nothing trained yet")
        got, = self._state.filter(lambda kv: kv[0] == _MODELS) \
            .map(lambda kv: kv[1][cid].ranking.recommend(user, n)).collect()
        return got

    def models(self) -> Any:
        """The one-record RDD ``[{candidate id: LocalStreamingALS}]`` of the last batch (cached;
        for jobs that read the models where they live, e.g. the publish job)."""
        if self._state is None:
            raise RuntimeError("nothing trained yet")
        return self._state.filter(lambda kv: kv[0] == _MODELS).map(lambda kv: kv[1])

    def load(self, sc: Any, models: Mapping[str, LocalStreamingALS], params: Mapping[str, Params]) -> None:
        """Start from given models (a restore): they become the live candidates, trained on
        from the next batch. Pending candidates of the constructor are kept (cold ones)."""
        state = sc.parallelize([(_MODELS, dict(models))], 1)
        state.persist()
        state.count()
        old, self._state = self._state, state
        if old is not None:
            old.unpersist()
        for cid in models:
            self.live[cid] = dict(params[cid])
            self._pending.pop(cid, None)

    def unpersist(self) -> None:
        if self._state is not None:
            self._state.unpersist()


# ---------------------------------------------------------------------------------------------
# Persistence of a candidate: scalars as JSON, rows as (ids, biases, vectors, counts)
# ---------------------------------------------------------------------------------------------


def resume_scalars(m: LocalStreamingALS) -> dict[str, Any]:
    """A candidate's scalars, in the shape of ``StreamingALS.state().extra`` (so the leader's
    can be the version's ``model_state``, and a service without a search resumes from it)."""
    rk = m.ranking
    return {
        "mu": float(m.mu), "ratings_seen": int(m.ratings_seen), "rating_sum": float(m.rating_sum),
        "batches": int(m.batches), "last_batch_size": int(m.last_batch_size), "params": m.params.to_dict(),
        "positives_seen": int(rk.positives_seen) if rk is not None else 0,
        "conf_minus_1_sum": float(rk.conf_minus_1_sum) if rk is not None else 0.0,
        "ranking_batches": int(rk.batches) if rk is not None else 0,
        "ranking_last_batch_size": int(rk.last_batch_size) if rk is not None else 0,
    }


class Rows(NamedTuple):
    """One factor table as stored: ids, biases (n,), vectors (n, rank), counts (n,)."""

    ids: list[str]
    biases: np.ndarray
    vectors: np.ndarray
    counts: np.ndarray


def rebuild_candidate(params: ALSParams, scalars: Mapping[str, Any], users: Rows | None, items: Rows | None,
                      ranking_users: Rows | None = None, ranking_items: Rows | None = None) -> LocalStreamingALS:
    """A candidate model from its stored rows and scalars, as ``StreamingALS.restore`` does
    for the served model: factors, biases, counts, μ and counters exact; the least-squares
    statistics seeded from the counts (:func:`modeler.core.als_math.seed_statistics`,
    :func:`modeler.core.ranking.seed_ranking_statistics`); the ranking Gramians
    XᵀX = Σ_u x_u x_uᵀ, YᵀY = Σ_i y_i y_iᵀ recomputed; replay samples and the probe's seen
    pairs start empty (they refill from the stream)."""
    from modeler.core.als_math import second_moment, seed_statistics
    from modeler.core.ranking import seed_ranking_statistics

    m = LocalStreamingALS(params)
    for table, rows in ((m.users, users), (m.items, items)):
        if rows is not None and len(rows.ids):
            table.add_rows(list(rows.ids), rows.biases, rows.vectors, rows.counts)
    m.mu = float(scalars.get("mu", 0.0))
    m.ratings_seen = int(scalars.get("ratings_seen", 0))
    m.rating_sum = float(scalars.get("rating_sum", m.mu * m.ratings_seen))
    m.batches = int(scalars.get("batches", 0))
    m.last_batch_size = int(scalars.get("last_batch_size", 0))

    def mean_moment(vec: np.ndarray, count: np.ndarray) -> np.ndarray:
        # C = Σ count·v vᵀ / Σ count over the partner side (the seeding's prior)
        s, w = second_moment(vec, count)
        return s / w if w else s

    if params.vector_step == "rls":
        seed_statistics(m.users, mean_moment(m.items.vec, m.items.count), params.reg_param)
        seed_statistics(m.items, mean_moment(m.users.vec, m.users.count), params.reg_param)
    rk = m.ranking
    if rk is not None:
        for table, rows in ((rk.users, ranking_users), (rk.items, ranking_items)):
            if rows is not None and len(rows.ids):
                table.add_rows(list(rows.ids), np.zeros(len(rows.ids), np.float32), rows.vectors, rows.counts)
        rk.positives_seen = int(scalars.get("positives_seen", 0))
        rk.conf_minus_1_sum = float(scalars.get("conf_minus_1_sum", 0.0))
        rk.batches = int(scalars.get("ranking_batches", 0))
        rk.last_batch_size = int(scalars.get("ranking_last_batch_size", 0))
        v_u, v_i = rk.users.vec.astype(np.float64), rk.items.vec.astype(np.float64)
        rk.gram_users, rk.gram_items = v_u.T @ v_u, v_i.T @ v_i
        mean_c1 = rk.conf_minus_1_sum / rk.positives_seen if rk.positives_seen else params.ranking_alpha
        seed_ranking_statistics(rk.users, mean_moment(rk.items.vec, rk.items.count), rk.gram_items, mean_c1,
                                params.ranking_reg_param, params.ranking_reg_scaling)
        seed_ranking_statistics(rk.items, mean_moment(rk.users.vec, rk.users.count), rk.gram_users, mean_c1,
                                params.ranking_reg_param, params.ranking_reg_scaling)
    return m
