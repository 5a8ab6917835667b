"""The online hyper-parameter search as the modeler service runs it (``MODEL_CANDIDATES``).

:class:`SearchModel` stands where the service would hold a ``StreamingALS``: ``train(rdd)``
runs one micro-batch through every candidate in one Spark task
(:class:`modeler.spark.side_by_side.SideBySideALS`: each scored prequentially, then it learns
the batch), then feeds the losses to :class:`modeler.core.search.SearchState` (fading score,
halving, respawn, leader switch). Every driver-side attribute the service reads of a model
(``rank``, ``mu``, ``reg_param``, ``params``, ``positives_seen``...) is the LEADER's, so a
version serves the leader's factor sets and nothing else.

Publishing (:meth:`SearchModel.publish_records`): one write job over the models' RDD emits
the leader's rows as the served factor sets (changed rows, or all of them for a full
segment) and every live candidate's rows into the segment's search hashes (``common.keys``:
``{p}:seg:{s}:search:{kind}``); the search state (candidates, scores, schedule, leader, each
live candidate's scalars) goes into the version's ``search_state`` field in the same
MULTI/EXEC as the pointer flip. A leader switch makes the segment full, so a version never
mixes two candidates' rows. Restore (:func:`restore_search_model`) reads them back: after
``kill -9`` the same candidates resume with their scores and factors.

Memory: K times one model, on one executor (see ``side_by_side``); the restore builds the
K models on the driver before handing them to that executor.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from common.codec import decode_matrix
from common.feedback import Weighting
from common.keys import ITEMS, RANKING_ITEMS, RANKING_USERS, USERS
from modeler.config import ModelerSettings
from modeler.core.als_math import ALSParams, LocalStreamingALS, ParamsAttributes
from modeler.core.search import (
    WARM_USER_POSITIVES,
    Decision,
    HalvingSchedule,
    Params,
    SearchConfigError,
    SearchSettings,
    SearchState,
    parse_candidates,
)
from modeler.io import publish as pub
from modeler.spark.side_by_side import (
    EXPLICIT,
    RANKING,
    CandidateOutcome,
    CandidateStats,
    Rows,
    SideBySideALS,
    candidate_params,
    rebuild_candidate,
)

log = logging.getLogger(__name__)

#: Version of the ``search_state`` JSON layout.
STATE_FORMAT = 1


class SearchStats(NamedTuple):
    """One batch of the search, as the service reads a ``TrainStats``: the leader's counters
    (``new_users``/``new_items`` move the service's counts to the leader's table sizes),
    and what the search decided."""

    n_ratings: int
    n_rejected: int
    prequential_sse: float
    new_users: int
    new_items: int
    n_implicit: int
    ranking_positives: int
    ranking_new_users: int
    ranking_new_items: int
    ranking_hits: int
    ranking_probes: int
    decision: Decision | None


def search_kind(metric: str) -> str:
    return RANKING if metric in ("ndcg@10", "recall@10") else EXPLICIT


def base_params(settings: ModelerSettings) -> ALSParams:
    """The candidates' common parameters: the model settings (``MODEL_*``, defaults of
    ``ALSParams``) in the one-partition layout side-by-side training needs."""
    from modeler.service import model_params
    from modeler.spark.streaming_als import StreamingALS

    kw = model_params(settings)
    kw["num_partitions"] = 1
    return StreamingALS(**kw).params  # the constructor maps the settings onto ALSParams


def search_settings(settings: ModelerSettings, candidates: Sequence[Params]) -> SearchSettings:
    """:class:`SearchSettings` from ``MODEL_SEARCH_*`` (unset ones keep its defaults)."""
    s = settings
    metric = s.model_search_metric or (
        "ndcg@10" if all(k.startswith("ranking_") for c in candidates for k in c) else "rmse")
    d = SearchSettings()
    sched = d.schedule
    try:
        schedule = HalvingSchedule(
            budget=s.model_search_budget or sched.budget,
            eta=s.model_search_eta or sched.eta,
            min_live=sched.min_live,
            max_gap=sched.max_gap if s.model_search_max_gap is None else s.model_search_max_gap)
        return SearchSettings(
            metric=metric,
            fading=s.model_search_fading or d.fading,
            schedule=schedule,
            switch_margin=d.switch_margin if s.model_search_switch_margin is None else s.model_search_switch_margin,
            patience=s.model_search_patience or d.patience,
            min_events=d.min_events if s.model_search_min_events is None else s.model_search_min_events,
            respawn=d.respawn if s.model_search_respawn is None else s.model_search_respawn,
            population=d.population if s.model_search_population is None else s.model_search_population,
            perturb=s.model_search_perturb or d.perturb,
            seed=d.seed if s.model_seed is None else s.model_seed)
    except SearchConfigError as exc:
        raise SearchConfigError(f"MODEL_SEARCH_*: {exc}") from exc


def _check_candidates(base: ALSParams, candidates: Sequence[Params], kind: str) -> None:
    for j, c in enumerate(candidates):
        try:
            candidate_params(base, c)
        except (TypeError, ValueError) as exc:
            raise SearchConfigError(f"MODEL_CANDIDATES[{j}]: {exc}") from exc
    if kind == RANKING and not base.ranking:
        raise SearchConfigError("MODEL_SEARCH_METRIC: a ranking search needs MODEL_RANKING on")


class SearchModel(ParamsAttributes):
    """K candidates and the search over them; the leader's attributes (module docstring)."""

    num_partitions = 1

    def __init__(self, state: SearchState, sbs: SideBySideALS, scalars: Mapping[str, dict[str, Any]] | None = None,
                 ratings_seen: int = 0, events_seen: int = 0, served: tuple[int, int, int, int] = (0, 0, 0, 0)) -> None:
        self.search = state
        self.sbs = sbs
        self.base = sbs.base
        # Each live candidate's scalars after its last batch (resume_scalars), from the task.
        self.scalars: dict[str, dict[str, Any]] = {k: dict(v) for k, v in (scalars or {}).items()}
        self.ratings_seen = ratings_seen  # the stream's valid ratings the search has consumed
        self.stream_events = events_seen
        self._served = served  # (users, items, ranking users, ranking items) last reported
        self._pending_drop: list[str] = []
        self._pending_spawn: dict[str, Params] = {}
        self.last_decision: Decision | None = None
        self.last_outcomes: dict[str, CandidateOutcome] = {}
        self.switched = False
        self.last_sink_results: list[Any] = []

    # -- the leader's attributes ----------------------------------------------------------

    @property
    def leader(self) -> str:
        return self.search.leader

    @property
    def params(self) -> ALSParams:
        return candidate_params(self.base, self.search.leader_candidate().params)

    @property
    def mu(self) -> float:
        return float(self.scalars.get(self.leader, {}).get("mu", 0.0))

    @property
    def has_ranking(self) -> bool:
        return self.base.ranking

    @property
    def positives_seen(self) -> int:
        return int(self.scalars.get(self.leader, {}).get("positives_seen", 0))

    @property
    def events_seen(self) -> int:
        return self.stream_events

    @property
    def _state(self) -> Any:  # what the service unpersists on a reset
        return self.sbs._state

    def state_extra(self) -> dict[str, Any]:
        """The leader's scalars as ``StreamingALS.state_extra()`` (the version's
        ``model_state``: a service restarted without a search resumes from the leader)."""
        extra = dict(self.scalars.get(self.leader, {}))
        extra.pop("mu", None)
        extra.pop("ratings_seen", None)
        return extra

    # -- one batch ------------------------------------------------------------------------

    def train(self, rdd: Any, sink: Any = None) -> SearchStats:
        """Every candidate scores, then learns, the batch (one Spark task; ``sink`` writes
        the segment in that task); then the search folds the losses in and decides (prune,
        respawn, switch), effective from the next batch."""
        self.switched = False
        outcomes = self.sbs.train(rdd, spawn=self._pending_spawn, drop=self._pending_drop, sink=sink)
        self.last_sink_results = list(self.sbs.last_sink_results)
        self._pending_spawn, self._pending_drop = {}, []
        self.last_outcomes = outcomes
        for cid, o in outcomes.items():
            if o.stats.resume is not None:
                self.scalars[cid] = dict(o.stats.resume)
        lead = outcomes.get(self.leader)
        st = lead.stats if lead is not None else CandidateStats()
        n_events = st.n_ratings + st.n_implicit
        decision = None
        if n_events:
            self.ratings_seen += st.n_ratings
            self.stream_events += n_events
            losses = {cid: o.loss for cid, o in outcomes.items()}
            decision = self.search.observe(n_events, losses)
            self._pending_drop = list(decision.pruned)
            self._pending_spawn = {cid: dict(self.search.get(cid).params) for cid in decision.spawned}
            for cid in decision.pruned:
                self.scalars.pop(cid, None)
            if decision.switch is not None:
                sw = decision.switch
                log.info("search: leader %s -> %s (%s)", sw.old, sw.new, sw.reason)
        self.last_decision = decision
        self.switched = decision is not None and decision.switch is not None
        # The stats are the (new) leader's: its counts after this batch.
        new_lead = outcomes.get(self.leader)
        nst = new_lead.stats if new_lead is not None else CandidateStats()
        sizes = (nst.n_users, nst.n_items, nst.n_ranking_users, nst.n_ranking_items)
        deltas = [a - b for a, b in zip(sizes, self._served, strict=True)]
        self._served = sizes
        return SearchStats(
            n_ratings=st.n_ratings, n_rejected=0, prequential_sse=st.prequential_sse,
            new_users=deltas[0], new_items=deltas[1], n_implicit=st.n_implicit,
            ranking_positives=st.ranking_positives, ranking_new_users=deltas[2], ranking_new_items=deltas[3],
            ranking_hits=st.ranking_hits, ranking_probes=st.ranking_probes, decision=decision)

    # -- publishing -----------------------------------------------------------------------

    def sink(self, redis_url: str, prefix: str, segment: int, full: bool, top_n: int,
             rated_cap: int = 0) -> SearchSink:
        """The writer of segment ``segment`` inside the training task, for the leader as it
        is before the batch (a switch on this batch voids it: the publish rewrites it full)."""
        return SearchSink(redis_url, prefix, segment, full, top_n, self.leader,
                          tuple(c.cid for c in self.search.live()), self.base.weighting, rated_cap)

    def publish_records(self, full: bool) -> Any:
        """RDD of :func:`modeler.io.publish.write_partition` chunks: the leader's rows as the
        served factor sets, every live candidate's rows for the restore (all rows when
        ``full``, else the rows the last batch changed)."""
        leader = self.leader
        live = [c.cid for c in self.search.live()]
        return self.sbs.models().flatMap(_chunks(leader, live, full))

    def entry(self) -> dict[str, Any]:
        """The search's part of the version's metrics entry: leader, switch and its reason."""
        d = self.last_decision
        sw = d.switch if d is not None else None
        return {"search": {
            "leader": self.leader, "metric": self.search.metric.name,
            "live": len(self.search.live()),
            "pruned": list(d.pruned) if d is not None else [],
            "spawned": list(d.spawned) if d is not None else [],
            "switch": None if sw is None else {"from": sw.old, "to": sw.new, "events": sw.events,
                                               "reason": sw.reason},
        }}

    def summary(self) -> list[dict[str, Any]]:
        return self.search.summary()

    def to_json(self) -> dict[str, Any]:
        """The version's ``search_state`` (the rows are in the segments' search hashes)."""
        live = {c.cid for c in self.search.live()}
        return {
            "format": STATE_FORMAT, "kind": self.sbs.kind, "search": self.search.to_json(),
            "ratings_seen": self.ratings_seen, "events_seen": self.stream_events,
            "served": list(self._served),
            "models": {cid: v for cid, v in sorted(self.scalars.items()) if cid in live},
        }


_TAGS = ((USERS, pub.USER), (ITEMS, pub.ITEM), (RANKING_USERS, pub.RANKING_USER), (RANKING_ITEMS, pub.RANKING_ITEM))


def _tables(m: LocalStreamingALS) -> dict[str, Any]:
    out: dict[str, Any] = {USERS: m.users, ITEMS: m.items}
    if m.ranking is not None:
        out[RANKING_USERS], out[RANKING_ITEMS] = m.ranking.users, m.ranking.items
    return out


def _chunks(leader: str, live: Sequence[str], full: bool):
    """Executor side of :meth:`SearchModel.publish_records` (items before users, as
    ``factor_chunks`` orders them)."""

    def chunks(models: Mapping[str, LocalStreamingALS]) -> Iterator[tuple]:
        lead = models[leader]
        rk = lead.ranking
        yield from pub.factor_chunks(lead.users, lead.items, not full, rk.users if rk is not None else None,
                                     rk.items if rk is not None else None)
        for cid in live:
            m = models.get(cid)
            if m is None:  # spawned by the last decision: learns from the next batch on
                continue
            for kind, t in _tables(m).items():
                rows = np.arange(len(t.ids)) if full else np.flatnonzero(t.touched)
                if len(rows):
                    yield pub.SearchChunk(pub.SEARCH, cid, kind, [t.ids[j] for j in rows], t.bias[rows],
                                          t.vec[rows], t.count[rows])

    return chunks


@dataclass(frozen=True)
class SearchSink:
    """``SideBySideALS.train(..., sink=...)``: writes segment ``segment`` in the training task
    (the leader's rows as the served sets, every live candidate's rows, the batch's rated
    items), so the publish needs no Spark job of its own; Redis trouble is reported, not
    raised (the driver then falls back to a write job with retries)."""

    redis_url: str
    prefix: str
    segment: int
    full: bool
    top_n: int
    leader: str
    live: tuple[str, ...]
    weighting: Weighting
    rated_cap: int = 0  # MODELER_RATED_CAP: newest items kept per user (0: all)

    def __call__(self, models: Mapping[str, LocalStreamingALS], batch: Any) -> dict[str, Any]:
        chunks: list[Any] = list(_chunks(self.leader, self.live, self.full)(models))
        if len(batch.users) or len(batch.i_users):
            chunks.append(pub.rated_from(batch, self.weighting))
        try:
            written, top, rtop = next(pub.write_partition(chunks, self.redis_url, self.prefix, self.segment,
                                                          self.top_n, rated_cap=self.rated_cap))
        except Exception as exc:
            return {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:300]}
        return {"ok": True, "written": written, "top": top, "rtop": rtop}


# ---------------------------------------------------------------------------------------------
# Building and restoring
# ---------------------------------------------------------------------------------------------


def _sbs(settings: ModelerSettings, base: ALSParams, kind: str, pending: Mapping[str, Params]) -> SideBySideALS:
    s = settings
    probe = s.model_search_probe_size or 256
    warm = s.model_search_min_user_positives or WARM_USER_POSITIVES
    return SideBySideALS(pending, base, kind=kind, probe=probe, min_user_positives=warm)


def new_search_model(settings: ModelerSettings) -> SearchModel:
    """A cold search over ``MODEL_CANDIDATES`` (the first candidate leads until beaten)."""
    if not settings.model_candidates:
        raise SearchConfigError("MODEL_CANDIDATES: not set")
    candidates = parse_candidates(settings.model_candidates)
    st_settings = search_settings(settings, candidates)
    kind = search_kind(st_settings.metric)
    base = base_params(settings)
    _check_candidates(base, candidates, kind)
    state = SearchState(candidates, st_settings)
    pending = {c.cid: dict(c.params) for c in state.live()}
    log.info("search over %d candidates (%s, %s): %s", len(candidates), kind, st_settings.metric, candidates)
    return SearchModel(state, _sbs(settings, base, kind, pending))


def _rows(stored: Mapping[str, tuple[list[str], list[bytes], list[int]]], kind: str, rank: int) -> Rows | None:
    got = stored.get(kind)
    if not got or not got[0]:
        return None
    ids, records, counts = got
    biases, vectors = decode_matrix(records, rank)
    return Rows(list(ids), biases, vectors, np.asarray(counts, dtype=np.int64))


def restore_search_model(spark: Any, settings: ModelerSettings, restored: pub.Restored,
                         publisher: pub.Publisher) -> SearchModel:
    """The search of a published version: the same candidates, scores, schedule and leader,
    every live candidate's factors (module docstring). A version without a search state
    (the search was just turned on) starts a cold search from its offsets on."""
    from common.snapshot import Pointer

    meta = restored.meta
    stored = publisher.restore_search(Pointer(meta.version, tuple(meta.segments)))
    if stored is None:
        log.warning("version %d has no search state: the candidates of MODEL_CANDIDATES start cold from "
                    "its offsets on", meta.version)
        return new_search_model(settings)
    d = stored.state
    state = SearchState.from_json(d["search"])
    kind = str(d.get("kind", search_kind(state.settings.metric)))
    base = base_params(settings)
    if settings.model_candidates and parse_candidates(settings.model_candidates) != \
            [c.params for c in state.candidates[:state.capacity]]:
        log.warning("MODEL_CANDIDATES differs from the stored search's candidates: the stored search goes on")
    scalars: dict[str, dict[str, Any]] = {k: dict(v) for k, v in d.get("models", {}).items()}
    models: dict[str, LocalStreamingALS] = {}
    params: dict[str, Params] = {}
    pending: dict[str, Params] = {}
    for c in state.live():
        p = candidate_params(base, c.params)
        if c.cid not in scalars:
            pending[c.cid] = dict(c.params)  # decided at that version, learns from the next batch
            continue
        rows = stored.rows.get(c.cid, {})
        models[c.cid] = rebuild_candidate(
            p, scalars[c.cid], _rows(rows, USERS, p.rank), _rows(rows, ITEMS, p.rank),
            _rows(rows, RANKING_USERS, p.ranking_rank), _rows(rows, RANKING_ITEMS, p.ranking_rank))
        params[c.cid] = dict(c.params)
    sbs = _sbs(settings, base, kind, pending)
    if models:
        sbs.load(spark.sparkContext, models, params)
    served = tuple(int(x) for x in d.get("served", (0, 0, 0, 0)))
    model = SearchModel(state, sbs, scalars, int(d.get("ratings_seen", meta.ratings_seen)),
                        int(d.get("events_seen", meta.ratings_seen)),
                        served if len(served) == 4 else (0, 0, 0, 0))
    log.info("restored the search: %d live candidates (%d with factors), leader %s, %d events",
             len(state.live()), len(models), state.leader, state.events)
    return model
