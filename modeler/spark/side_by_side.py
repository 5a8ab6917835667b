"""K candidate models trained side by side on Spark: one task reads a micro-batch once and
every candidate is scored on it (prequentially) and then learns it.

Layout: the K models live in ONE cached RDD of one partition whose single record is
``{candidate id: model}`` (each model a :class:`modeler.core.als_math.LocalStreamingALS` for
the explicit model, or a :class:`modeler.core.ranking.LocalRankingALS` for the ranking one:
the numpy references the partitioned :class:`modeler.spark.streaming_als.StreamingALS` is
tested against). ``train()`` brings the batch and the models into one task with a narrow
``union(...).coalesce(1)`` (no shuffle), validates the batch's records once, and runs each
candidate's ``train`` on the same list: one pass over the batch, K updates. The task returns
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

import copy
import dataclasses
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from modeler.core.als_math import ALSParams, LocalStreamingALS, split_records, validate_arrays
from modeler.core.ranking import LocalRankingALS, event_weights
from modeler.core.search import (
    WARM_USER_POSITIVES,
    BatchLoss,
    Params,
    SearchConfigError,
    probe_target_ranks,
    ranking_gains,
)

_MODELS = "models"
_BATCH = "batch"


class CandidateOutcome(NamedTuple):
    """What one candidate did with one batch: its prequential loss (scored before learning),
    how many ratings it learned and how many rows it refused (non-finite updates)."""

    loss: BatchLoss
    learned: int
    refused: int


EXPLICIT = "explicit"
RANKING = "ranking"


def _build(kind: str, base: ALSParams, params: Params) -> Any:
    kw: dict[str, Any] = dict(params)
    p = dataclasses.replace(base, **kw)
    return LocalStreamingALS(p) if kind == EXPLICIT else LocalRankingALS(p)


class _Batch(NamedTuple):
    """A batch's valid ratings as columns, validated once for every candidate."""

    users: list[str]
    items: list[str]
    ratings: np.ndarray
    stamps: np.ndarray

    def records(self) -> list[tuple[str, str, float, int]]:
        return list(zip(self.users, self.items, self.ratings.tolist(), self.stamps.tolist()))


def _step(kind: str, model: Any, batch: _Batch, probe: int, warm: int) -> CandidateOutcome:
    """Score one candidate on the batch (before it learns it), then let it learn the batch.

    Explicit: Σ squared errors of the batch's ratings. Ranking: Σ NDCG@10 over a probe sample
    of the batch's positives (:func:`modeler.core.search.probe_target_ranks`)."""
    if kind == EXPLICIT:
        first = model.batches == 0
        res = model.train(batch.records())
        # A candidate's first batch is learned, not scored: it had no model to be judged.
        loss = BatchLoss(0.0, 0) if first else BatchLoss(float(res.prequential_sse), int(res.n_ratings))
        return CandidateOutcome(loss, int(res.n_ratings), int(res.n_diverged))
    p = model.params
    w = event_weights(batch.ratings, np.zeros_like(batch.ratings), p.weighting, p.rating_min, p.rating_max)
    ranks = probe_target_ranks(model, batch.users, batch.items, w > 0, batch.stamps, probe,
                               min_user_positives=warm)
    rres = model.train(batch.users, batch.items, batch.ratings, np.zeros_like(batch.ratings), batch.stamps)
    ndcg, _ = ranking_gains(ranks)
    return CandidateOutcome(BatchLoss(ndcg, len(ranks)), int(rres.positives), int(rres.refused))


def _tag(kind: str):
    def tag(it: Iterable[Any]) -> Iterator[tuple[str, Any]]:
        for x in it:
            yield (kind, x)
    return tag


def _side_by_side_stage(kind: str, base: ALSParams, spawn: Mapping[str, Params], drop: Sequence[str],
                        probe: int, warm: int):
    """The one task: the models' record and the batch's records meet here."""

    def stage(it: Iterator[tuple[str, Any]]) -> Iterator[tuple[str, Any]]:
        models: dict[str, Any] = {}
        records: list[Any] = []
        for tag, x in it:
            if tag == _MODELS:
                # A cached partition may be read again (task retry): never mutate it in place.
                models = dict(x)
            else:
                records.append(x)
        for cid in drop:
            models.pop(cid, None)
        for cid, params in spawn.items():
            models[cid] = _build(kind, base, params)
        # Validate once for all candidates (they share the scale): every model then sees the
        # same valid ratings in the same order.
        us, its, rs, ts, _bad = split_records(records)
        users, items, rates, stamps, _rej = validate_arrays(us, its, rs, ts, base.rating_min, base.rating_max)
        batch = _Batch(users, items, rates, stamps)
        outcomes: dict[str, CandidateOutcome] = {}
        new_models: dict[str, Any] = {}
        for cid in sorted(models):
            m = _copy(models[cid])
            outcomes[cid] = _step(kind, m, batch, probe, warm)
            new_models[cid] = m
        yield (_MODELS, new_models)
        yield (_BATCH, outcomes)

    return stage


def _copy(m: Any) -> Any:
    """A copy whose arrays can be updated without touching the cached original (the tables;
    the reservoir, Gramians and seen pairs are replaced, never updated, by ``train``)."""
    out = copy.copy(m)
    out.users = m.users.copy()
    out.items = m.items.copy()
    return out


class SideBySideALS:
    """K candidates of one model kind (``"explicit"`` or ``"ranking"``) in one Spark task per
    batch (module docstring).

    ``train(rdd, spawn=..., drop=...)`` adds the candidates of ``spawn`` (cold, from this
    batch on) and removes those of ``drop`` in the same task, then every model steps on the
    batch; it returns ``{candidate id: CandidateOutcome}``.
    """

    def __init__(self, candidates: Mapping[str, Params], base: ALSParams | None = None,
                 kind: str = EXPLICIT, probe: int = 256, min_user_positives: int = WARM_USER_POSITIVES) -> None:
        if kind not in (EXPLICIT, RANKING):
            raise SearchConfigError(f"kind: must be {EXPLICIT!r} or {RANKING!r}, got {kind!r}")
        self.kind = kind
        self.probe = probe
        self.warm = min_user_positives
        self.base = base or ALSParams(num_partitions=1)
        self._state = None
        self._pending: dict[str, Params] = dict(candidates)
        self.live: dict[str, Params] = {}
        self.batches = 0

    def train(self, rdd, spawn: Mapping[str, Params] | None = None,
              drop: Sequence[str] = ()) -> dict[str, CandidateOutcome]:
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
                                                         self.warm))
        state.persist()
        state.localCheckpoint()
        outcomes: dict[str, CandidateOutcome] = state.filter(lambda kv: kv[0] == _BATCH).map(lambda kv: kv[1]).first()
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
        got = self._state.filter(lambda kv: kv[0] == _MODELS) \
            .map(lambda kv: kv[1][cid].predict(users, items).tolist()).first()
        return [float(x) for x in got]

    def recommend(self, cid: str, user: str, n: int = 10) -> list[str]:
        """A ranking candidate's top ``n`` for ``user`` (a Spark job; for tests)."""
        if self._state is None:
            raise RuntimeError("nothing trained yet")
        return self._state.filter(lambda kv: kv[0] == _MODELS).map(lambda kv: kv[1][cid].recommend(user, n)).first()
