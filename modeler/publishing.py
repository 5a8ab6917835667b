"""How a trained batch becomes a visible version: plan full or delta once, write the segment
(inside the training job or by a write job), flip the pointer, retry while Redis is away.

:class:`PublishFlow` owns the modeler's published chain (:class:`Chain`: the last version, its
segments, its popular list, whether the next segment must be full) and is the only code
that changes it. :class:`modeler.service.ModelerService` calls it at two points of a batch:

* ``plan(model, version)`` before training: full or delta, and the sink that lets the
  training job write the segment itself (:class:`modeler.io.publish.SegmentSink`, or the
  search's writer). Redis away, or no longer holding our chain: no sink, the publish decides.
* ``publish(model, plan, batch, entry, counts)`` after training: uses the training
  job's writes if they are usable, else runs a write job of its own (and, when Redis lost
  the model, rebuilds the rated-item hashes from the topic); then one MULTI/EXEC makes the
  version and its offsets visible. Retried with backoff until it succeeds, the lease is
  lost (:class:`LeaseLost`), or the service stops (``None``: a restart redoes the batch).

The records written come from the model through :func:`publish_rdd`; the version's
metadata fields that describe the model from :func:`version_models` and
:func:`ranking_meta`. The exactly-once argument is in :mod:`modeler.service`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple, Union

from common.errors import StreamrecError
from common.feedback import Weighting
from modeler.config import ModelerSettings
from modeler.io import kafka_source as ks
from modeler.io import publish as pub
from modeler.metrics import ModelerMetrics
from modeler.search_service import SearchModel

if TYPE_CHECKING:
    from modeler.spark.streaming_als import StreamingALS

log = logging.getLogger(__name__)

#: What the service trains: one streaming model, or the online search over several
#: (``MODEL_CANDIDATES``), which offers the same driver-side attributes (its leader's).
Model = Union["StreamingALS", SearchModel]


class LeaseLost(StreamrecError, RuntimeError):
    """Another modeler took the single-writer lease."""


def short(exc: BaseException) -> str:
    """An exception as one log-sized line."""
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(exc).__name__}: {first[:300]}"


@dataclass
class Chain:
    """The published chain: the last version published (or restored, 0: none), its segments
    (oldest first), its most-rated list, and whether the next segment must be full."""

    version: int = 0
    segments: list[int] = field(default_factory=list)
    popular: list[tuple[str, int]] = field(default_factory=list)
    need_full: bool = True
    # Records of the chain's full segment and of its deltas since (0, 0 after a restore:
    # unknown, so the chain's cap decides alone until the next full segment).
    full_records: int = 0
    delta_records: int = 0


class ModelCounts(NamedTuple):
    """Rows of the model's two factor sets, for the version's ``n_users`` / ``n_items``."""

    n_users: int
    n_items: int
    n_ranking_users: int
    n_ranking_items: int


class PublishedBatch(NamedTuple):
    """The batch a version publishes: its cached blocks (``None`` when it held no valid
    event), the offsets the model was at before it, and the next offset per partition it
    reached."""

    blocks: Any
    before: dict[int, int]
    reached: dict[int, int]

    @property
    def offsets(self) -> dict[int, int]:
        """The version's offsets: the next to read per partition once the batch is learned."""
        return {**self.before, **self.reached}


class PublishFlow:
    """Plans, writes and flips the versions of one modeler (module docstring)."""

    def __init__(self, settings: ModelerSettings, publisher: pub.Publisher, admin: ks.TopicAdmin,
                 metrics: ModelerMetrics, spark: Callable[[], Any], stopping: Callable[[], bool],
                 token: str) -> None:
        self.settings = settings
        self.publisher = publisher
        self.admin = admin
        self.metrics = metrics
        self._spark = spark
        self._stopping = stopping
        self.token = token
        self.chain = Chain()
        self.write_job_s = 0.0  # the last publish's separate write job (0: none ran)
        self.written_inline = False  # the last version was written by its training job

    # ------------------------------------------------------------------ the decision

    def holds_pointer(self, pointer: Any) -> bool:
        """Redis still points at the version this modeler published last."""
        v = self.chain.version
        return pointer is not None and pointer.version == v and v > 0

    def next_is_full(self, model: Model | None, ours: bool, planning: bool = False) -> bool:
        """The next segment must hold the whole model: first version, Redis lost ours, the
        chain of deltas is at its cap, or a search's leader switched on this batch (a version
        never mixes two candidates' rows; unknown while ``planning``, before the batch)."""
        switched = not planning and isinstance(model, SearchModel) and model.switched
        c = self.chain
        return pub.segment_is_full(c.need_full, ours, len(c.segments), self.settings.max_segment_chain, switched,
                                   c.delta_records, c.full_records, self.settings.full_segment_share)

    def plan(self, model: Model, version: int) -> pub.PublishPlan:
        """Full or delta, decided once per attempt: before training for the single model,
        whose training job writes the segment (:class:`modeler.io.publish.SegmentSink`);
        left to the publish when Redis is away or lost the model (that path retries and
        rebuilds what Redis lost). A search plans the same way for its leader before the
        batch; a switch on the batch voids the plan (the publish rewrites the segment full)."""
        s = self.settings
        try:
            ours = self.holds_pointer(self.publisher.pointer())
            if self.chain.version > 0 and not ours:
                return pub.PublishPlan(version)
            full = self.next_is_full(model, ours, planning=True)
            self.publisher.clear_segment(version)
        except Exception as exc:  # Redis trouble: the publish step retries with backoff
            log.debug("no inline publish of version %d: %s", version, short(exc))
            self.publisher.reset_client()
            return pub.PublishPlan(version)
        if isinstance(model, SearchModel):
            return pub.PublishPlan(version, full, model.sink(s.redis_url, s.redis_prefix, version, full,
                                                             s.popular_size, rated_cap=s.rated_cap))
        return pub.PublishPlan(version, full, pub.SegmentSink(s.redis_url, s.redis_prefix, version, full,
                                                             s.popular_size, rated_cap=s.rated_cap))

    # ------------------------------------------------------------------ the flip

    def publish(self, model: Model, plan: pub.PublishPlan, batch: PublishedBatch,
                entry: dict[str, Any], counts: ModelCounts) -> str | None:
        """Write segment ``plan.version`` (unless the training job did) and flip to it;
        retried while Redis is away. Returns ``"full"``/``"delta"``, or ``None`` if stopped
        before it could publish."""
        version = plan.version
        attempt = 0
        while True:
            try:
                # A retry never trusts the inline writes: Redis may have lost them meanwhile.
                return self._publish_once(model, plan if attempt == 0 else plan.without_sink(), batch,
                                          entry, counts)
            except LeaseLost:
                raise
            except Exception as exc:
                self.metrics.retries.labels(component="redis").inc()
                self.publisher.reset_client()
                if self._stopping():
                    log.warning("stopping with version %d unpublished (%s); a restart redoes it",
                                version, short(exc))
                    return None
                delay = pub.backoff(attempt, self.settings.retry_max_backoff_s)
                attempt += 1
                log.warning("publishing version %d failed (%s); retrying in %.1f s",
                            version, short(exc), delay)
                if pub.sleep_unless(self._stopping, delay):
                    log.warning("stopping with version %d unpublished; a restart redoes it", version)
                    return None

    def _inline_results(self, model: Model, plan: pub.PublishPlan, redis_lost: bool) -> list[pub.WriteResult] | None:
        """The training job's per-partition answers, if its writes of the segment are usable."""
        if plan.sink is None:
            return None
        if isinstance(model, SearchModel) and model.switched and not plan.full:
            log.info("the leader switched on version %d: writing it as a full segment", plan.version)
            return None
        answers = list(model.last_sink_results)
        failed = [r.get("error") for r in answers if isinstance(r, dict) and not r.get("ok")]
        if redis_lost or failed:
            log.warning("the training job's writes of version %d are not usable (%s); writing it again",
                        plan.version, "Redis lost the model" if redis_lost else failed[0])
            return None
        if not answers or not all(isinstance(r, dict) for r in answers):
            return None  # nothing was learned (only dead letters): nothing was written
        return [pub.WriteResult(r["written"], r["top"], r.get("rtop", [])) for r in answers]

    def _write_job(self, model: Model, full: bool, batch: PublishedBatch, redis_lost: bool,
                   version: int) -> list[pub.WriteResult]:
        """The segment written by a Spark job of its own (the training job did not, or its
        writes are not usable); with ``redis_lost``, the rated-item hashes are rebuilt too."""
        s = self.settings
        self.publisher.clear_segment(version)
        url, prefix, cap, top_n = s.redis_url, s.redis_prefix, s.rated_cap, s.popular_size
        records = publish_rdd(model, full, batch.blocks)
        if redis_lost:
            records = records.union(self._rated_backfill_rdd(model, batch.before))
        t_job = time.perf_counter()
        results = [pub.WriteResult(*r) for r in
                   records.mapPartitions(lambda it: pub.write_partition(it, url, prefix, version, top_n,
                                                                         rated_cap=cap))
                   .collect()]
        self.write_job_s = time.perf_counter() - t_job
        return results

    def _publish_once(self, model: Model, plan: pub.PublishPlan, batch: PublishedBatch,
                      entry: dict[str, Any], counts: ModelCounts) -> str:
        from common.snapshot import Meta

        s = self.settings
        chain = self.chain
        version = plan.version
        publisher = self.publisher
        if not publisher.hold_lease(self.token):
            raise LeaseLost(f"{publisher.keys.lease} is held by another modeler")
        pointer = publisher.pointer()
        ours = self.holds_pointer(pointer)
        redis_lost = not ours and chain.version > 0
        if redis_lost:
            log.warning("Redis no longer holds version %d (pointer %s): republishing the whole model",
                        chain.version, pointer)
        results = self._inline_results(model, plan, redis_lost)
        if results is not None:
            full = bool(plan.full)
            self.write_job_s, self.written_inline = 0.0, True
        else:
            # The plan's decision stands while Redis holds our chain and no search leader
            # switched on this batch; otherwise the rule decides again (then: full).
            switched = isinstance(model, SearchModel) and model.switched
            full = plan.full if plan.full is not None and ours and not switched else self.next_is_full(model, ours)
            self.written_inline = False
            results = self._write_job(model, full, batch, redis_lost, version)
        written = sum(r.written for r in results)
        # Most rated items; a stream of implicit events only ranks by positives instead.
        explicit = int(model.ratings_seen) > 0
        changed = [kv for r in results for kv in (r.top if explicit else r.ranking_top)]
        popular = pub.merge_popular([] if full else chain.popular, changed, s.popular_size)
        models = version_models(model)
        segments = [version] if full else [*chain.segments, version]
        search = model if isinstance(model, SearchModel) else None
        meta = Meta(
            version=version,
            rank=int(model.rank),
            mu=float(model.mu),
            reg_param=float(model.reg_param),
            n_users=max(counts.n_users, counts.n_ranking_users),
            n_items=max(counts.n_items, counts.n_ranking_items),
            ratings_seen=int(model.ratings_seen),
            created=time.time(),
            segments=tuple(segments),
            offsets={ks.offsets_key(s.ratings_topic, p): int(o) for p, o in sorted(batch.offsets.items())},
            metrics=entry,
            popular=popular,
            rating_min=s.rating_min,
            rating_max=s.rating_max,
            **ranking_meta(model, models),
            candidates=search.summary() if search is not None else [],
        )
        if not publisher.segment_exists(version):
            # An empty segment would make the version unreadable as a chain base.
            if full:
                raise RuntimeError(f"full segment {version} came out empty ({written} records)")
            segments.remove(version)
            meta.segments = tuple(segments)
        publisher.publish(meta, entry, popular, model_state(model), search.to_json() if search is not None else None)
        self.chain = Chain(version, segments, popular, need_full=False,
                           full_records=written if full else chain.full_records,
                           delta_records=0 if full else chain.delta_records + written)
        try:
            publisher.collect_garbage(s.gc_min_age_s)
        except Exception as exc:  # a failed GC is retried after the next batch
            log.warning("garbage collection failed: %s", short(exc))
        return "full" if full else "delta"

    def _rated_backfill_rdd(self, model: Model, offsets: dict[int, int]) -> Any:
        """``RATED`` records of every rating and event before this batch: re-read from the
        topic (read-only, no DLQ) to rebuild the rated-item hashes Redis lost. A user's
        messages live in one partition, read in offset order: the k-th block's recency is
        −1/(k+1), increasing and below every batch's own (its version, ≥ 1), so a capped
        history (``MODELER_RATED_CAP``) keeps the same newest items it would have kept.
        ``offsets``: where the model was before this batch."""
        s = self.settings
        begin = self.admin.beginning_offsets(list(offsets))
        ranges = [
            ks.OffsetRange(s.ratings_topic, p, begin.get(p, 0), max(0, offsets[p] - begin.get(p, 0)))
            for p in sorted(offsets)
            if offsets[p] > begin.get(p, 0)
        ]
        bootstrap, lo, hi, cap = s.kafka_bootstrap_servers, s.rating_min, s.rating_max, s.event_max_weight
        log.info("rebuilding rated items from %d partitions of %s", len(ranges), s.ratings_topic)
        chunk = _RatedChunk(model.params.weighting)

        def read(it: Any) -> Any:
            for rng in it:
                for k, block in enumerate(ks.read_range_chunks(rng, bootstrap, lo, hi, max_weight=cap)):
                    yield chunk(block, order=-1.0 / (k + 1))

        return self._spark().sparkContext.parallelize(ranges, max(1, len(ranges))).mapPartitions(read)


# ------------------------------------------------------------------------------------------
# What a version says of the model, and the records it writes
# ------------------------------------------------------------------------------------------


def version_models(model: Any) -> tuple[str, ...]:
    """The factor sets a version of ``model`` carries (``Meta.models``): the explicit model
    once it has learned a rating, the ranking model once it has learned a positive."""
    from common.keys import EXPLICIT, RANKING

    out = []
    if int(model.ratings_seen) > 0 or not getattr(model, "has_ranking", False):
        out.append(EXPLICIT)
    if getattr(model, "has_ranking", False) and int(model.positives_seen) > 0:
        out.append(RANKING)
    return tuple(out) or (EXPLICIT,)  # nothing learned yet: the metadata's default


def ranking_meta(model: Any, models: tuple[str, ...]) -> dict[str, Any]:
    """The ranking model's fields of :class:`common.snapshot.Meta`."""
    from common.keys import RANKING

    if RANKING not in models:
        return {"models": models}
    p = model.params
    return {"models": models, "ranking_rank": int(p.ranking_rank),
            "ranking_reg_param": float(p.ranking_reg_param),
            "ranking_alpha": float(p.ranking_alpha), "ranking_weighting": p.weighting.to_dict()}


def model_state(model: Any) -> dict[str, Any]:
    """Scalars a restore needs besides factors and counts (JSON, stored with the version)."""
    return dict(model.state_extra())


def _factor_records(only_touched: bool) -> Callable[[tuple[int, Any]], Any]:
    """Item and user factor chunks, with rating counts, of one partition of the model.

    The model's partitions hold a ``FactorTable`` per side (ids, bias, vec, count, touched);
    the public ``changed_users``/``changed_items`` carry no counts, which a restore needs,
    and a tuple per row would cost far more to move than a few arrays.
    """

    def records(kv: tuple[int, Any]) -> Any:
        rk = kv[1].ranking
        return pub.factor_chunks(kv[1].users, kv[1].items, only_touched,
                                 rk.users if rk is not None else None, rk.items if rk is not None else None)

    return records


def publish_rdd(model: Model, full: bool, blocks: Any) -> Any:
    """One RDD of columnar chunks for :func:`modeler.io.publish.write_partition`: the model's
    (changed or all) factor records and the batch's ratings, in as many partitions as the
    model has (one Spark job, few tasks)."""
    factors = (model.publish_records(full) if isinstance(model, SearchModel)
               else model.read_partitions(_factor_records(not full)))
    if blocks is None:
        return factors
    merged = factors.union(blocks.map(_RatedChunk(model.params.weighting)))
    return merged.coalesce(max(1, model.num_partitions))


@dataclass(frozen=True)
class _RatedChunk:
    """A block's ratings and implicit events as a ``RATED`` publish record; implicit events
    carry their confidence weight w (the same mapping the model trains with). ``order``:
    the entries' recency for a capped history (``None``: the version being written)."""

    weighting: Weighting

    def __call__(self, block: ks.Block, order: float | None = None) -> pub.RatedChunk:
        return pub.rated_from(block, self.weighting, order)
