"""The modeler's loop: plan offsets -> read on executors -> train -> publish -> repeat.
Long because the failure handling below (lease, retries, restore, rebuilding what a Redis
loss took) is written out step by step beside the loop it guards.

Exactly-once effect: a version's Redis metadata holds the Kafka offsets its model has
consumed, written in the same MULTI/EXEC that makes the version visible. On start the
model is restored from the current version and reading resumes at its offsets; whatever
a crashed process trained or wrote after that is invisible and simply redone. So after
``kill -9`` at any moment every rating counts exactly once in the published model.

Failure handling:
- Kafka or Spark trouble while reading: nothing was trained; retry the same offsets with
  backoff.
- Trouble while training: the in-memory model may be half-updated; restore it from the
  current version (and its offsets) and go on.
- Redis trouble while publishing: the in-memory model and offsets are consistent, so the
  same version is retried with backoff until Redis answers. If Redis came back empty (or
  the pointer is not ours), the retry writes a *full* segment: a complete model, its
  offsets and counts, never double counting. Rated-item hashes lost with Redis are rebuilt
  from the topic (a read-only pass over the offsets the model has consumed).
- SIGTERM: the current batch is finished and published (or, if Redis is away, abandoned:
  a restart redoes it), then the loop ends and the lease is released.

One batch is ``step``: the publish flow's ``plan`` (full or delta, once),
``_read_and_train``, ``_account``, the flow's ``publish`` (retried; it flips the version),
``_observe``. How a version is written and made visible, and the published chain, are
:mod:`modeler.publishing`'s; the online search's share is in :mod:`modeler.search_service`.
The module is longer than most because the lifecycle (start, restore, reset, lease), the
loop and the adapter to the model (settings -> parameters, restore of a published version)
each depend on the failure handling above.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

from common.errors import StreamrecError
from common.feedback import Weighting
from modeler.config import ModelerSettings
from modeler.io import kafka_read
from modeler.io import kafka_source as ks
from modeler.io import publish as pub
from modeler.metrics import ModelerMetrics
from modeler.publishing import (  # noqa: F401 - ranking_meta, version_models: re-exported
    Chain,
    LeaseLost,
    Model,
    ModelCounts,
    PublishedBatch,
    PublishFlow,
    ranking_meta,
    short,
    version_models,
)
from modeler.search_service import SearchModel, new_search_model, restore_search_model
from modeler.workerheap import trim

if TYPE_CHECKING:
    from modeler.search_service import SearchStats
    from modeler.spark.streaming_als import StreamingALS, TrainStats

log = logging.getLogger(__name__)

class BatchRead(NamedTuple):
    """What the executors read of one batch: their block summaries added up."""

    n_valid: int
    n_dlq: int
    reached: dict[int, int]  # partition -> next offset
    lag: dict[int, int]
    read_seconds: float


class Trained(NamedTuple):
    """One batch read and learned (not yet published)."""

    stats: TrainStats | SearchStats
    read: BatchRead
    blocks: Any  # the cached RDD of ks.Block
    seconds: float  # reading Kafka on the executors and training


@dataclass
class BatchReport:
    """What one loop iteration did (also the JSON metrics entry of a published version)."""

    version: int | None
    n_ratings: int
    n_dlq: int
    seconds: float
    read_seconds: float = 0.0
    train_seconds: float = 0.0
    publish_seconds: float = 0.0
    full: bool = False
    lag: dict[int, int] = field(default_factory=dict)
    # Written by the training job itself (no separate write job).
    inline: bool = False
    # Valid events learned: ratings and implicit events (the ranking model's input).
    n_events: int = 0


class ModelerService:
    """One modeler: owns a StreamingALS model, a Kafka offset plan and a Redis prefix."""

    def __init__(
        self,
        settings: ModelerSettings,
        spark: Any = None,
        metrics: ModelerMetrics | None = None,
    ) -> None:
        self.settings = settings
        self._spark = spark
        self.metrics = metrics or ModelerMetrics()
        self.token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.publisher = pub.Publisher(
            settings.redis_url,
            settings.redis_prefix,
            keep_versions=settings.keep_versions,
            metrics_history=settings.metrics_history,
            lease_ttl_s=settings.lease_ttl_s,
        )
        self.admin = ks.TopicAdmin(
            settings.kafka_bootstrap_servers,
            settings.ratings_topic,
            settings.dlq_topic,
            settings.ratings_topic_partitions,
        )
        self._stop = threading.Event()
        self.model: Model | None = None
        # The published chain (last version, its segments and popular list) and how a
        # batch joins it.
        self.flow = PublishFlow(settings, self.publisher, self.admin, self.metrics, lambda: self.spark,
                                lambda: self.stopping, self.token)
        self.offsets: dict[int, int] = {}  # next offset per partition, consistent with model
        self.backlog: dict[int, int | None] = {}
        self.dlq_total = 0
        self.n_users = 0
        self.n_items = 0
        self.n_ranking_users = 0  # rows of the ranking model (an implicit-only stream has no others)
        self.n_ranking_items = 0
        self.ratings_per_s = 0.0
        self.ranking_hits_total = 0
        self.ranking_probes_total = 0
        self._last_blocks: list[Any] = []
        self._ready = False
        self._train_failures = 0
        self._failures = 0
        self._inflight: Any = None
        self.reports: list[BatchReport] = []

    # ------------------------------------------------------------------ lifecycle

    @property
    def spark(self) -> Any:
        if self._spark is None:
            from modeler.spark import get_spark

            self._spark = get_spark(
                self.settings.spark_master, "streamrec-modeler",
                checkpoint_dir=self.settings.checkpoint_dir,
            )
        return self._spark

    def stop(self) -> None:
        """Ask the loop to end after the current batch (signal-handler safe)."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    @property
    def version(self) -> int:
        """The last version this modeler published (or restored); 0: none."""
        return self.flow.chain.version

    @property
    def segments(self) -> list[int]:
        return self.flow.chain.segments

    @property
    def popular(self) -> list[tuple[str, int]]:
        return self.flow.chain.popular

    def run(self, max_batches: int | None = None, until: Callable[[ModelerService], bool] | None = None) -> None:
        """Loop until stopped (or ``max_batches`` non-empty batches, or ``until(self)``)."""
        done = 0
        try:
            while not self.stopping:
                if not self._ready:
                    try:
                        self._start()
                    except Stopped:
                        raise
                    except Exception as exc:
                        self._failures += 1
                        delay = pub.backoff(self._failures, self.settings.retry_max_backoff_s)
                        log.exception("start-up failed (%s); retrying in %.1f s", short(exc), delay)
                        pub.sleep_unless(lambda: self.stopping, delay)
                    continue
                try:
                    report = self.step()
                except Stopped:
                    raise
                except LeaseLost as exc:
                    log.error("%s: dropping the in-memory model, waiting for the lease", exc)
                    self._reset()
                    continue
                except Exception as exc:
                    # Unexpected: start over from the published version rather than crash-loop.
                    self._failures += 1
                    delay = pub.backoff(self._failures, self.settings.retry_max_backoff_s)
                    log.exception("batch failed (%s); restoring from Redis in %.1f s", short(exc), delay)
                    self._reset()
                    pub.sleep_unless(lambda: self.stopping, delay)
                    continue
                self._failures = 0
                if report is not None and max(report.n_ratings, report.n_events) + report.n_dlq > 0:
                    done += 1
                if max_batches is not None and done >= max_batches:
                    break
                if until is not None and until(self):
                    break
        except Stopped as exc:
            log.info("stopped while %s", exc)
        finally:
            self.publisher.release_lease(self.token)
            self.admin.close()
            kafka_read.close_clients(self.settings.kafka_bootstrap_servers)
            log.info("modeler stopped at version %d", self.version)

    # ------------------------------------------------------------------ start / restore

    def _retrying(self, what: str, component: str, fn: Callable[[], Any]) -> Any:
        """Call ``fn`` until it succeeds or we are stopped (then ``None``)."""
        attempt = 0
        while True:
            try:
                return fn()
            except Stopped:
                raise
            except Exception as exc:
                if self.stopping:
                    raise Stopped(what) from exc
                delay = pub.backoff(attempt, self.settings.retry_max_backoff_s)
                attempt += 1
                self.metrics.retries.labels(component=component).inc()
                log.warning("%s failed (%s: %s); retrying in %.1f s", what, type(exc).__name__, exc, delay)
                if component == "redis":
                    self.publisher.reset_client()
                if pub.sleep_unless(lambda: self.stopping, delay):
                    raise Stopped(what) from exc

    def _start(self) -> None:
        """Lease, topics, model restore (or fresh model), offsets."""
        if self.settings.model_num_partitions is None:
            from modeler.spark import default_model_partitions

            n = default_model_partitions(self.spark.sparkContext)
            self.settings = self.settings.model_copy(update={"model_num_partitions": n})
        s = self.settings
        self._retrying("taking the modeler lease", "redis", self._wait_lease)
        self._retrying("creating topics", "kafka", self.admin.ensure_topics)
        restored = self._retrying("restoring the model from Redis", "redis", self.publisher.restore)
        partitions = self._retrying("reading topic metadata", "kafka", self.admin.partitions)
        if restored is not None:
            meta = restored.meta
            self.model = (restore_search_model(self.spark, s, restored, self.publisher) if s.model_candidates
                          else restore_model(self.spark, s, restored))
            self.flow.chain = Chain(meta.version, list(meta.segments), list(meta.popular), need_full=False)
            self.n_users, self.n_items = len(restored.user_ids), len(restored.item_ids)
            self.n_ranking_users = len(restored.ranking_user_ids)
            self.n_ranking_items = len(restored.ranking_item_ids)
            self.dlq_total = int(meta.metrics.get("dlq_total", 0))
            self.offsets = ks.offsets_for_topic(meta.offsets, s.ratings_topic)
            log.info(
                "restored version %d (%d ratings seen, %d users, %d items), resuming at %s",
                meta.version, meta.ratings_seen, meta.n_users, meta.n_items, self.offsets,
            )
            del restored
            trim()  # the version's rows as read from Redis: ~40% of the driver's memory at ~190k keys
        elif s.model_candidates:
            if s.bootstrap_ratings:
                log.warning("MODELER_BOOTSTRAP_RATINGS is ignored with MODEL_CANDIDATES (the candidates start cold)")
            self.model = new_search_model(s)
            self.flow.chain = Chain()
            self.n_users = self.n_items = self.n_ranking_users = self.n_ranking_items = 0
            self.dlq_total = 0
            self.offsets = {}
            log.info("no model in Redis under %r: searching from the beginning of %s",
                     s.redis_prefix, s.ratings_topic)
        else:
            fresh = self._bootstrap() if s.bootstrap_ratings else new_model(s)
            self.model = fresh
            self.flow.chain = Chain()
            self.n_users = self.n_items = 0
            if int(fresh.ratings_seen):
                self.n_users = int(fresh.user_factors.count())
                self.n_items = int(fresh.item_factors.count())
            self.n_ranking_users = self.n_ranking_items = 0
            self.dlq_total = 0
            self.offsets = {}
            log.info("no model in Redis under %r: training from the beginning of %s",
                     s.redis_prefix, s.ratings_topic)
        missing = [p for p in partitions if p not in self.offsets]
        if missing:
            begin = self._retrying("reading beginning offsets", "kafka",
                                   lambda: self.admin.beginning_offsets(missing))
            self.offsets.update(begin)
        self.backlog = dict.fromkeys(self.offsets)
        if not isinstance(self.model, SearchModel):
            self.model.snapshot_in_train = False  # taken after the publish (_snapshot_if_due)
        self._ready = True

    def _reset(self) -> None:
        """Forget the in-memory model and offsets; the next round restores from Redis."""
        for old in [*self._last_blocks, self._inflight]:
            if old is not None:
                with contextlib.suppress(Exception):
                    old.unpersist()
        self._last_blocks = []
        self._inflight = None
        release = getattr(self.model, "release", None)
        if release is not None:
            with contextlib.suppress(Exception):
                release()
        self._ready = False

    def _renew_lease(self) -> bool:
        """Keep the lease while idle or between batches; ``False`` if Redis is away."""
        try:
            held = self.publisher.hold_lease(self.token)
        except Exception as exc:
            self.metrics.retries.labels(component="redis").inc()
            self.publisher.reset_client()
            log.warning("Redis unavailable (%s); retrying", short(exc))
            pub.sleep_unless(lambda: self.stopping, min(self.settings.retry_max_backoff_s, 2.0))
            return False
        if not held:
            raise LeaseLost(f"{self.publisher.keys.lease} is held by another modeler")
        return True

    def _bootstrap(self) -> Any:
        """Batch ALS on ``MODELER_BOOTSTRAP_RATINGS`` (history kept outside Kafka), then stream on.

        The file's ratings count in ``ratings_seen``; the topic is still read from its
        beginning, so the file must not be a copy of what the topic holds.
        """
        from common.datasets import read_ratings
        from modeler.bootstrap import bootstrap_model

        s = self.settings
        assert s.bootstrap_ratings is not None  # _start bootstraps only when it is set
        rows = read_ratings(s.bootstrap_ratings, scale=s.scale)
        log.info("bootstrapping from %d ratings in %s", len(rows), s.bootstrap_ratings)
        model, report = bootstrap_model(
            self.spark, rows, scale=s.scale,
            **{k: v for k, v in model_params(s).items() if k not in ("rank", "iterations", "scale")},
        )
        log.info("bootstrap done: %s", report)
        return model

    def _wait_lease(self) -> None:
        warned = False
        while not self.publisher.hold_lease(self.token):
            if not warned:
                log.warning("another modeler holds %s; waiting for it to expire", self.publisher.keys.lease)
                warned = True
            if pub.sleep_unless(lambda: self.stopping, 0.5):
                raise Stopped("waiting for the lease")

    # ------------------------------------------------------------------ one batch

    def step(self) -> BatchReport | None:
        """One micro-batch: read, train, account, publish, observe. Returns ``None`` when it
        had to be retried or the stream is idle."""
        if not self._renew_lease():
            return None
        t0 = time.perf_counter()
        plan = self.flow.plan(self._model, self.version + 1)
        trained = self._read_and_train(plan)
        if trained is None:
            return None
        read = trained.read
        if read.n_valid == 0 and (read.n_dlq == 0 or int(self._model.events_seen) == 0):
            self._idle(t0, trained)
            return None
        entry = self._account(plan.version, t0, trained)
        t2 = time.perf_counter()
        published = self.flow.publish(
            self._model, plan, PublishedBatch(trained.blocks if read.n_valid else None, dict(self.offsets),
                                              read.reached),
            entry, ModelCounts(self.n_users, self.n_items, self.n_ranking_users, self.n_ranking_items))
        if published is None:
            # Stopped while Redis was away: abandon this batch; a restart redoes it.
            self.dlq_total -= read.n_dlq
            trained.blocks.unpersist()
            return None
        report = self._observe(plan.version, t0, time.perf_counter() - t2, trained, published)
        self._snapshot_if_due()
        return report

    def _snapshot_if_due(self) -> None:
        """After the flip: the resident model's snapshot, when one is due (see
        ``StreamingALS.snapshot_if_due``). A failure here loses nothing (the batch is
        published, the batches since the last snapshot are kept): it is logged and tried
        again after the next batch."""
        model = self._model
        if isinstance(model, SearchModel) or model.snapshot_in_train:
            return
        try:
            model.snapshot_if_due()
        except Exception as exc:
            log.warning("model snapshot failed (%s); trying again after the next batch", short(exc))

    @property
    def _model(self) -> Model:
        if self.model is None:
            raise RuntimeError("the modeler has not started (no model)")
        return self.model

    def _read_and_train(self, plan: pub.PublishPlan) -> Trained | None:
        """Kafka is read inside the training job (one Spark job less per batch): the blocks
        are cached, and each partition's summary (offsets reached) comes back through an
        accumulator. An empty batch costs that one job and changes nothing. ``None`` when
        reading or training failed (the model is then restored from Redis)."""
        s = self.settings
        model = self._model
        t0 = time.perf_counter()
        ranges = ks.plan_batch(s.ratings_topic, self.offsets, self.backlog, s.batch_max_records)
        sc = self.spark.sparkContext
        blocks, acc = ks.batch_blocks(sc, ranges, s.kafka_bootstrap_servers, s.dlq_topic, s.rating_min,
                                      s.rating_max, model.num_partitions, max_weight=s.event_max_weight)
        self._inflight = blocks
        try:
            rdd = blocks.flatMap(ks.Block.rows)
            stats = model.train(rdd, sink=plan.sink) if plan.sink is not None else model.train(rdd)
            summaries = list(acc.value.values())
            if len(summaries) < len(ranges):  # the model did not read every partition
                summaries = blocks.map(ks.Block.summary).collect()
        except Exception as exc:
            # Kafka away, or training failed: the in-memory model may be half-updated.
            self.metrics.batches.labels(outcome="failed").inc()
            self._train_failures += 1
            delay = pub.backoff(self._train_failures - 1, s.retry_max_backoff_s)
            log.error("batch failed (%s); restoring the model from Redis in %.1f s",
                      short(exc), delay, exc_info=self._train_failures == 1)
            self._reset()
            pub.sleep_unless(lambda: self.stopping, delay)
            return None
        self._train_failures = 0
        return Trained(stats, self._summarise(summaries), blocks, time.perf_counter() - t0)

    def _summarise(self, summaries: list[ks.BlockSummary]) -> BatchRead:
        """The executors' block summaries added up; lag metrics and dead-letter logs."""
        s = self.settings
        reached = {x.partition: x.next_offset for x in summaries}
        for x in summaries:
            if x.reset_to is not None:
                log.warning(
                    "partition %d of %s has no offset %d (its log now starts at %d and ends at %s):"
                    " the topic was recreated or truncated; continuing from its beginning",
                    x.partition, s.ratings_topic, x.start, x.reset_to, x.highwater,
                )
                reached[x.partition] = x.reset_to
        lag = {
            x.partition: max(0, (x.highwater or x.next_offset) - x.next_offset)
            for x in summaries
        }
        self.metrics.observe_lag(lag)
        for x in summaries:
            for reason in x.dlq_reasons:
                log.warning("dead-lettered partition %d %s", x.partition, reason)
        return BatchRead(
            n_valid=sum(x.n_valid for x in summaries), n_dlq=sum(x.n_dlq for x in summaries),
            reached=reached, lag=lag,
            read_seconds=sum(x.read_seconds for x in summaries) / max(1, len(summaries)))

    def _idle(self, t0: float, trained: Trained) -> None:
        """Nothing learned. Dead letters before the first rating cannot be recorded in a
        version (there is no model to publish yet): they are counted with the first one."""
        s = self.settings
        read = trained.read
        trained.blocks.unpersist()
        self._inflight = None
        self.dlq_total += read.n_dlq
        self.metrics.dlq.inc(read.n_dlq)
        self.backlog = {p: read.lag.get(p, 0) for p in self.offsets}
        if read.reached:
            # Only control records or dead letters passed: move on without a new version.
            self.offsets.update(read.reached)
        idle = s.batch_max_interval_s - (time.perf_counter() - t0)
        if idle > 0:
            pub.sleep_unless(lambda: self.stopping, idle)

    def _account(self, version: int, t0: float, trained: Trained) -> dict[str, Any]:
        """Counts moved by the batch (the model and the offsets are consistent from here
        on); returns the version's metrics entry."""
        model = self._model
        stats, read = trained.stats, trained.read
        n_trained = int(stats.n_ratings)
        self.dlq_total += read.n_dlq
        self.n_users += int(stats.new_users)
        self.n_items += int(stats.new_items)
        self.n_ranking_users += int(stats.ranking_new_users)
        self.n_ranking_items += int(stats.ranking_new_items)
        probes = int(stats.ranking_probes)
        self.ranking_hits_total += int(stats.ranking_hits)
        self.ranking_probes_total += probes
        batch_seconds_so_far = time.perf_counter() - t0
        rmse = (float(stats.prequential_sse) / n_trained) ** 0.5 if n_trained else None
        entry: dict[str, Any] = {
            "version": version,
            "ratings_seen": int(model.ratings_seen),
            "batch_ratings": n_trained,
            "batch_implicit": int(stats.n_implicit),
            # Prequential recall@10 of the ranking model: this batch, and the whole stream.
            "prequential_recall": int(stats.ranking_hits) / probes if probes else None,
            "ranking_hits_total": self.ranking_hits_total,
            "ranking_probes_total": self.ranking_probes_total,
            "prequential_rmse": rmse,
            "ratings_per_s": read.n_valid / batch_seconds_so_far if batch_seconds_so_far > 0 else 0.0,
            "batch_seconds": batch_seconds_so_far,
            "read_seconds": read.read_seconds,
            "train_seconds": trained.seconds,
            "dlq": read.n_dlq,
            "dlq_total": self.dlq_total,
            "lag": {str(p): v for p, v in read.lag.items()},
            "time": time.time(),
        }
        if isinstance(model, SearchModel):
            entry.update(model.entry())
        return entry

    def _observe(self, version: int, t0: float, t_pub: float, trained: Trained, published: str) -> BatchReport:
        """After the flip: offsets, caches, metrics, the report and its log line."""
        model = self._model
        stats, read = trained.stats, trained.read
        n_trained = int(stats.n_ratings)
        self.offsets.update(read.reached)
        self.backlog = {p: read.lag.get(p, 0) for p in self.offsets}
        # Keep the previous batch cached one more round: the model's RDDs may still
        # be lazily derived from it.
        for old in self._last_blocks:
            old.unpersist()
        self._last_blocks = [trained.blocks]
        seconds = time.perf_counter() - t0
        self.ratings_per_s = read.n_valid / seconds if seconds > 0 else 0.0
        rmse = (float(stats.prequential_sse) / n_trained) ** 0.5 if n_trained else None
        m = self.metrics
        m.batches.labels(outcome="published").inc()
        m.ratings.inc(n_trained)
        m.dlq.inc(read.n_dlq)
        m.ratings_per_s.set(self.ratings_per_s)
        m.batch_seconds.observe(seconds)
        if rmse is not None:
            m.prequential_rmse.set(rmse)
        m.version.set(version)
        m.ratings_seen.set(int(model.ratings_seen))
        if isinstance(model, SearchModel):
            m.observe_candidates(model.summary(), switched=model.switched)
        report = BatchReport(version, n_trained, read.n_dlq, seconds, read.read_seconds, trained.seconds, t_pub,
                             published == "full", read.lag, self.flow.written_inline,
                             n_trained + int(stats.n_implicit))
        self.reports.append(report)
        del self.reports[:-100]
        log.info(
            "version %d: %d ratings (%d dead-lettered) in %.2f s (read %.2f, read+train %.2f, publish %.2f"
            " %s) = %.0f ratings/s, prequential RMSE %s, ratings_seen %d%s",
            version, n_trained, read.n_dlq, seconds, read.read_seconds, trained.seconds, t_pub,
            "written by the training job" if self.flow.written_inline
            else f"of which write job {self.flow.write_job_s:.2f}", self.ratings_per_s,
            f"{rmse:.4f}" if rmse is not None else "-", int(model.ratings_seen),
            " (full segment)" if published == "full" else "",
        )
        return report

class Stopped(StreamrecError):
    """The service was asked to stop while waiting or retrying."""


# ------------------------------------------------------------------------------------------
# Adapter to modeler.spark.streaming_als (the numeric core, owned by another module)
# ------------------------------------------------------------------------------------------


def model_params(settings: ModelerSettings) -> dict[str, Any]:
    """StreamingALS arguments from the settings; unset ones keep the model's defaults."""
    s = settings
    given = {
        "rank": s.model_rank,
        "iterations": s.model_iterations,
        "reg_param": s.model_reg_param,
        "learning_rate": s.model_learning_rate,
        "seed": s.model_seed,
        "num_partitions": s.model_num_partitions,
        "init_scale": s.model_init_scale,
        "reservoir_size": s.model_reservoir_size,
        "replay_ratio": s.model_replay_ratio,
        "vector_step": s.model_vector_step,
    }
    ranking = {
        "ranking": s.model_ranking,
        "ranking_rank": s.model_ranking_rank,
        "ranking_reg_param": s.model_ranking_reg_param,
        "ranking_alpha": s.model_ranking_alpha,
        "ranking_iterations": s.model_ranking_iterations,
        "ranking_replay_ratio": s.model_ranking_replay_ratio,
        "ranking_probe_size": s.model_ranking_probe_size,
        "ranking_history": s.model_ranking_history,
        "ranking_sweep": s.model_ranking_sweep,
    }
    given.update(ranking)
    params: dict[str, Any] = {k: v for k, v in given.items() if v is not None}
    weighting: dict[str, Any] = {k: v for k, v in {"liked": s.model_ranking_liked, "slope": s.model_ranking_slope,
                                   "low_weight": s.model_ranking_low_weight,
                                   "implicit": s.model_ranking_implicit}.items() if v is not None}
    if weighting:

        params["weighting"] = Weighting(**weighting)
    params["scale"] = s.scale
    params["state_store"] = s.state_store
    return params


def new_model(settings: ModelerSettings) -> StreamingALS:
    from modeler.spark.streaming_als import StreamingALS

    return StreamingALS(**model_params(settings))


def restore_model(spark: Any, settings: ModelerSettings, restored: pub.Restored) -> Any:
    """Rebuild the model of a published version: factors, counts, μ and its running sum."""
    from modeler.spark.streaming_als import StreamingALS, row_blocks

    sc = spark.sparkContext
    meta = restored.meta
    slices = max(1, settings.model_num_partitions or 1)

    def rdd(ids, biases, vectors, counts: dict[str, str]):
        # Blocks of rows as arrays: a restore at ~190k keys no longer builds (and pickles)
        # one tuple with its own numpy array per row.
        return sc.parallelize(row_blocks(ids, biases, vectors, [int(counts.get(k, 0)) for k in ids]), slices)

    users = rdd(restored.user_ids, restored.user_biases, restored.user_vectors,
                restored.state.get("user_counts", {}))
    items = rdd(restored.item_ids, restored.item_biases, restored.item_vectors,
                restored.state.get("item_counts", {}))
    ranking_kw: dict[str, Any] = {}
    if restored.ranking_user_ids:
        ranking_kw = {
            "ranking_user_rdd": rdd(restored.ranking_user_ids, None, restored.ranking_user_vectors,
                                    restored.state.get("ranking_user_counts", {})),
            "ranking_item_rdd": rdd(restored.ranking_item_ids, None, restored.ranking_item_vectors,
                                    restored.state.get("ranking_item_counts", {})),
        }
    extra = dict(restored.model_state)
    kwargs: dict[str, Any] = {}
    if "params" not in extra:
        kwargs = model_params(settings)
        kwargs["rank"] = meta.rank
    else:
        # Parameters stored by an older release may name fields this one no longer has.
        import dataclasses

        from modeler.core.als_math import ALSParams

        known = {f.name for f in dataclasses.fields(ALSParams)}
        dropped = sorted(set(extra["params"]) - known)
        if dropped:
            log.warning("ignoring stored model parameters unknown to this release: %s", dropped)
        extra["params"] = {k: v for k, v in extra["params"].items() if k in known}
    if settings.model_rank is not None and settings.model_rank != meta.rank:
        log.warning("MODEL_RANK=%d ignored: the stored model has rank %d (rebuild to change it)",
                    settings.model_rank, meta.rank)
    kwargs.setdefault("state_store", settings.state_store)
    return StreamingALS.restore(sc, users, items, meta.mu, meta.ratings_seen, extra, **ranking_kw, **kwargs)
