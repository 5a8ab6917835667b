"""The fused one-partition task gives the same bits when the ranking model runs on its own thread."""

from __future__ import annotations

import numpy as np
import pytest

from modeler.core import tables
from modeler.core.als_math import ALSParams
from tests.benchmarks.bench_task_cpu import TaskDriver


def _stream(n: int, seed: int) -> list[tuple[str, str, float, int]]:
    rng = np.random.default_rng(seed)
    users = rng.zipf(1.6, n) % 300
    items = rng.zipf(1.4, n) % 120
    stars = rng.integers(1, 11, n) / 2.0
    return [(f"u{u}", f"i{i}", float(r), 1_000 + j) for j, (u, i, r) in enumerate(zip(users, items, stars))]


def _tables_bits(part) -> list[bytes]:
    out = []
    for t in (part.users, part.items, part.ranking.users, part.ranking.items):
        out += [("|".join(t.ids)).encode(), t.vec.tobytes(), t.bias.tobytes(), t.count.tobytes(),
                t.touched.tobytes(), t.gram.tobytes(), t.moment.tobytes(), t.mass.tobytes()]
    rk = part.ranking
    for h in (rk.u_hist, rk.i_hist):
        out += [repr(sorted((k, v.tolist(), h.conf[k].tobytes()) for k, v in h.partners.items())).encode()]
    out.append(rk.seen.keys.tobytes())
    out.append(repr((part.learned, part.implicit_batch and [a.tolist() for a in part.implicit_batch])).encode())
    return out


def _run(monkeypatch, threads: int, history: int):
    import pickle

    from modeler.spark import streaming_als as sa

    passes = []
    alone = sa._ranking_pass
    monkeypatch.setattr(sa, "_ranking_pass", lambda *a: passes.append(1) or alone(*a))
    monkeypatch.setattr(tables, "RUN_THREADS", threads)
    monkeypatch.setattr(tables, "_SUM_ENTRIES", 8 * 24 * 24)  # several runs per pass
    driver = TaskDriver(ALSParams(num_partitions=1, ranking_history=history, ranking_probe_size=64))
    stats = []
    stream = _stream(6_000, 5)
    for b in range(0, len(stream), 1_000):
        st = driver.train(stream[b:b + 1_000])
        stats.append({k: (v.tobytes() if isinstance(v, np.ndarray) else v) for k, v in sorted(st.items())})
    assert len(passes) == (6 if threads > 1 else 0)  # the ranking model's own thread, or none
    return stats, _tables_bits(pickle.loads(driver.blob)), driver


@pytest.mark.parametrize("history", [256, 0])
def test_the_ranking_models_thread_keeps_every_bit_of_both_models(monkeypatch, history):
    # With two threads the fused task runs the ranking model's gather, learn and write-back
    # beside the explicit model's; the two touch disjoint state, so nothing may change.
    want_stats, want_bits, _ = _run(monkeypatch, 1, history)
    got_stats, got_bits, driver = _run(monkeypatch, 2, history)
    assert driver.positives > 0 and driver.ratings_seen == 6_000  # both models learned
    assert got_stats == want_stats  # every batch statistic, r_* keys and Gramian deltas too
    assert got_bits == want_bits
