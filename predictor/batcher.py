"""The top-N batcher: concurrent top-N requests share one matrix product per model version."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from predictor.model import FactorModel, recommend_batch

Ranked = tuple[np.ndarray, np.ndarray]


class TopNJob(NamedTuple):
    """One pending request: rank ``model``'s items for a user vector."""

    model: FactorModel
    by: str  # predictor.model.BY_RANKING or BY_RATING: which item matrix
    bias: float
    vector: np.ndarray
    n: int
    exclude: np.ndarray | None
    future: asyncio.Future[Ranked]


class TopNBatcher:
    """Coalesces concurrent top-N requests into one matrix-matrix product per model version
    and factor set (see :func:`predictor.model.recommend_batch`).

    The product reads the whole item matrix whatever the batch size, so a larger batch costs
    less per user (measured on 62k x 51: 0.35 ms for one user, about 0.1 ms per user at 16).
    A request submits and awaits. An idle server (the last batch held one request) answers
    at once: the flush runs with ``call_soon``, after the other ready requests submitted too.
    A busy one waits up to ``max_wait`` seconds after the first submission for more requests
    to join, or until ``max_batch`` are pending: the wait bounds the added latency, the size
    bounds the time the event loop is blocked in one flush.
    """

    def __init__(self, max_wait: float = 0.002, max_batch: int = 32,
                 on_batch: Callable[[int], None] | None = None) -> None:
        self.max_wait = max_wait
        self.max_batch = max_batch
        self.on_batch = on_batch
        self.pending: list[TopNJob] = []
        self.handle: asyncio.TimerHandle | asyncio.Handle | None = None
        self.last_size = 0

    def submit(self, model: FactorModel, bias: float, vector: np.ndarray, n: int,
               exclude: np.ndarray | None, by: str) -> asyncio.Future[Ranked]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Ranked] = loop.create_future()
        self.pending.append(TopNJob(model, by, bias, vector, n, exclude, fut))
        if len(self.pending) >= self.max_batch:
            if self.handle is not None:
                self.handle.cancel()
            self.handle = loop.call_soon(self._flush)
        elif self.handle is None:
            if self.last_size > 1 and self.max_wait > 0:
                self.handle = loop.call_later(self.max_wait, self._flush)
            else:
                self.handle = loop.call_soon(self._flush)
        return fut

    def _flush(self) -> None:
        self.handle = None
        batch, self.pending = self.pending, []
        self.last_size = len(batch)
        groups: dict[tuple[int, str], list[TopNJob]] = {}
        for job in batch:
            groups.setdefault((id(job.model), job.by), []).append(job)
        for jobs in groups.values():
            for start in range(0, len(jobs), self.max_batch):
                chunk = jobs[start : start + self.max_batch]
                if self.on_batch is not None:
                    self.on_batch(len(chunk))
                try:
                    results = recommend_batch(chunk[0].model, [(j.bias, j.vector, j.n, j.exclude) for j in chunk],
                                              by=chunk[0].by)
                except Exception as exc:  # hand the failure to every waiting request
                    for job in chunk:
                        if not job.future.done():
                            job.future.set_exception(exc)
                    continue
                for job, result in zip(chunk, results, strict=True):
                    if not job.future.done():
                        job.future.set_result(result)
