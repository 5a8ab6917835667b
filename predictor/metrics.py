"""Prometheus metrics of the predictor and the ASGI middleware that counts and times requests."""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from predictor.model import FactorModel

Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Awaitable[None]]


class Metrics:
    """Prometheus metrics in a registry per app (several apps live in one test process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "predictor_requests_total", "HTTP requests", ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "predictor_request_seconds", "HTTP request latency", ["route"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=self.registry,
        )
        self.version = Gauge(
            "predictor_model_version", "model version being served (-1: none)",
            registry=self.registry, multiprocess_mode="max",
        )
        self.version.set(-1)
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}
        self.batch_size = Histogram(
            "predictor_topn_batch_size", "top-N requests answered by one matrix product",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=self.registry,
        )
        self.swaps = Counter(
            "predictor_model_swaps_total", "model versions swapped in", ["kind"],
            registry=self.registry,
        )
        self.items = Gauge(
            "predictor_model_items", "items in the served model", registry=self.registry,
            multiprocess_mode="max",
        )

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        key = (method, route, status)
        children = self._children.get(key)
        if children is None:
            # Label lookups hash and lock on every call: resolve each combination once.
            children = (self.requests.labels(method, route, str(status)), self.latency.labels(route))
            self._children[key] = children
        children[0].inc()
        children[1].observe(seconds)

    def on_swap(self, model: FactorModel, kind: str) -> None:
        self.version.set(model.version)
        self.items.set(model.n_items)
        self.swaps.labels(kind).inc()

    def exposition(self) -> bytes:
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            # Several uvicorn workers: aggregate every worker's files, not just this one's.
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Counts requests and times them per route template (plain ASGI: cheap on the hot path)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_status(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", "unmatched")
            self.metrics.observe(scope["method"], path, status, time.perf_counter() - start)
