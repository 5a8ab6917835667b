"""Prometheus metrics of the modeler (served on ``MODELER_METRICS_PORT``, driver only)."""

from __future__ import annotations

import logging
from collections.abc import Mapping

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

    def serve(self, port: int) -> None:
        if port:
            start_http_server(port, addr="0.0.0.0", registry=self.registry)
            log.info("metrics on :%d/metrics", port)

    def observe_lag(self, lag: Mapping[int, int]) -> None:
        for partition, value in lag.items():
            self.lag.labels(partition=str(partition)).set(value)
