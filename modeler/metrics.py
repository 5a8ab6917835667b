"""Prometheus metrics of the modeler (served on ``MODELER_METRICS_PORT``, driver only)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)


class ModelerMetrics:
    """One registry per service instance (tests run several in one process)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.batches = Counter(
            "modeler_batches", "Micro-batches by outcome", ["outcome"], registry=r
        )
        self.ratings = Counter("modeler_ratings", "Valid ratings trained on", registry=r)
        self.dlq = Counter(
            "modeler_dlq_messages", "Messages sent to the dead-letter topic", registry=r
        )
        self.ratings_per_s = Gauge(
            "modeler_ratings_per_second", "Ratings per second of the last batch", registry=r
        )
        self.batch_seconds = Histogram(
            "modeler_batch_duration_seconds",
            "Wall time of a micro-batch, read to publish",
            buckets=(0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0),
            registry=r,
        )
        self.prequential_rmse = Gauge(
            "modeler_prequential_rmse",
            "RMSE of the last batch's ratings predicted before training on them",
            registry=r,
        )
        self.lag = Gauge(
            "modeler_partition_lag", "Records behind the high-water mark", ["partition"], registry=r
        )
        self.version = Gauge("modeler_model_version", "Last published model version", registry=r)
        self.ratings_seen = Gauge(
            "modeler_ratings_seen", "Ratings the published model has learned from", registry=r
        )
        self.retries = Counter(
            "modeler_retries", "Retries after infrastructure errors", ["component"], registry=r
        )
        # The online hyper-parameter search (modeler.core.search): one series per candidate.
        self.candidate_score = Gauge(
            "modeler_search_candidate_score",
            "Fading-window prequential score of a search candidate (see the metric label)",
            ["candidate", "metric"], registry=r,
        )
        self.candidate_live = Gauge(
            "modeler_search_candidate_live", "1 while a search candidate is trained, 0 once pruned",
            ["candidate"], registry=r,
        )
        self.candidate_served = Gauge(
            "modeler_search_candidate_served", "1 for the candidate the published version serves",
            ["candidate"], registry=r,
        )
        self.leader_switches = Counter(
            "modeler_search_leader_switches", "Changes of the served search candidate", registry=r
        )

    def serve(self, port: int) -> None:
        if port:
            start_http_server(port, addr="0.0.0.0", registry=self.registry)
            log.info("metrics on :%d/metrics", port)

    def observe_candidates(self, candidates: Sequence[Mapping[str, Any]], switched: bool = False) -> None:
        """Gauges from :meth:`modeler.core.search.SearchState.summary`. A pruned candidate
        keeps its last score and reads live 0 (its series stays, so a dashboard shows when
        it went); a candidate not scored yet has no score series."""
        for c in candidates:
            cid = str(c["id"])
            if c.get("score") is not None:
                self.candidate_score.labels(candidate=cid, metric=str(c.get("metric", ""))).set(float(c["score"]))
            self.candidate_live.labels(candidate=cid).set(1.0 if c.get("state") == "live" else 0.0)
            self.candidate_served.labels(candidate=cid).set(1.0 if c.get("served") else 0.0)
        if switched:
            self.leader_switches.inc()

    def observe_lag(self, lag: Mapping[int, int]) -> None:
        for partition, value in lag.items():
            self.lag.labels(partition=str(partition)).set(value)
