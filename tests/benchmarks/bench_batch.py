"""Benchmark of the batch job (``modeler.batch``): quality on ml-latest-small, recommend-for-all at ML-25M scale.

Two stages, each in its own process (a process holds one SparkContext, and the master decides
the cores), results in ``build/bench/batch.json``:

* ``ml-small``: the whole job on ml-latest-small as implicit data ("rated" = played): grid over
  rank {10, 50} × regParam {0.01, 0.1} × α {1, 10} on a validation split, the chosen point's
  NDCG@10 on the test split against most-popular (goal: ≥ 1.5×).
* ``rfa``: recommend-for-all, the top 10 of every user with the user's own items excluded, by the
  job's blocked product (:func:`modeler.batch.blocked_top_k`), written as Parquet with string ids.
  Users' items are ML-25M-shaped (:func:`common.synthetic.marginals`: log-normal activity, Zipf
  popularity), sampled on the executors per partition; factors are random (training is not
  what is timed here: the product's cost does not depend on the values). Run at a reduced size
  on ``local[1]`` and ``local[2]`` for the scaling, then at full size (162,541 × 59,047, rank 50)
  unless ``--skip-full``.

``python -m tests.benchmarks.bench_batch [--skip-full] [--skip-small]``. Figures on a shared
machine are lower than on an idle one; the load average is recorded next to each.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "build" / "bench" / "batch.json"
ML_SMALL = Path(os.environ.get("SHARED_DATA", ROOT.parent / "shared" / "data")) / "ml-latest-small" / "ratings.csv"
FULL = {"users": 162_541, "items": 59_047, "events": 25_000_095, "rank": 50}
REDUCED = {"users": 20_000, "items": 59_047, "events": 3_000_000, "rank": 50}


class PeakRss:
    """Samples the summed RSS of this process and all its descendants (JVM, Python workers), and
    their CPU seconds: on a shared machine wall time says little, CPU time is the work done."""

    def __init__(self, interval: float = 0.5) -> None:
        self.peak = 0
        self.cpu: dict[int, float] = {}
        self.cpu_start: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.interval = interval

    def _run(self) -> None:
        import psutil

        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for proc in [me, *me.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):  # a worker may exit while we look
                    total += proc.memory_info().rss
                    times = proc.cpu_times()
                    spent = times.user + times.system
                    self.cpu_start.setdefault(proc.pid, spent)
                    self.cpu[proc.pid] = spent
            self.peak = max(self.peak, total)
            self._stop.wait(self.interval)

    @property
    def cpu_s(self) -> float:
        """CPU seconds the process tree spent while sampled (a process's first sample is its start)."""
        return sum(self.cpu[p] - self.cpu_start[p] for p in self.cpu)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def stage_ml_small(master: str) -> dict:
    from modeler.batch import JobConfig, grid_table, run_job
    from modeler.spark import get_spark

    spark = get_spark(master, app_name="bench-batch-small")
    try:
        with tempfile.TemporaryDirectory() as tmp, PeakRss() as rss:
            cfg = JobConfig(input=str(ML_SMALL), out=str(Path(tmp) / "out"), implicit=True, ranks=(10, 50),
                            regs=(0.01, 0.1), alphas=(1.0, 10.0), iterations=10, similar=10)
            started = time.perf_counter()
            report = run_job(spark, cfg)
            seconds = time.perf_counter() - started
        test = report.test
        return {"master": master, "seconds": round(seconds, 1), "peak_rss_mb": rss.peak // 2**20,
                "chosen": report.chosen, "test": test, "grid_table": grid_table(report),
                "goal_ratio_to_popular": 1.5, "met": bool(test["ratio_to_popular"] >= 1.5),
                "durations": report.durations, "pairs": report.pairs}
    finally:
        spark.stop()


def stage_rfa(master: str, users: int, items: int, events: int, rank: int, seed: int = 7) -> dict:
    """Recommend-for-all over sampled ML-25M-shaped seen sets and random factors."""
    from common.synthetic import make_ids, marginals, sample_user_items
    from modeler.batch import Indexed, blocked_top_k, recommendation_frame
    from modeler.spark import get_spark

    spark = get_spark(master, app_name="bench-batch-rfa",
                      conf={"spark.driver.memory": os.environ.get("SPARK_DRIVER_MEMORY", "6g")})
    sc = spark.sparkContext
    try:
        rng = np.random.default_rng(seed)
        per_user, weight = marginals(rng, users, items, events)
        b_per_user, b_weight = sc.broadcast(per_user), sc.broadcast(weight)
        parts = max(4, 2 * sc.defaultParallelism)

        def user_rows(index: int, ids_iter):
            ids = np.fromiter(ids_iter, dtype=np.int64)
            if not len(ids):
                return
            part_rng = np.random.default_rng([seed, index])
            u, i = sample_user_items(part_rng, b_per_user.value[ids], b_weight.value)
            vecs = part_rng.normal(0.0, rank ** -0.5, (len(ids), rank)).astype(np.float32)
            bounds = np.searchsorted(u, np.arange(len(ids) + 1))
            for j, uid in enumerate(ids.tolist()):
                yield uid, vecs[j], i[bounds[j]:bounds[j + 1]].astype(np.int32)

        def item_rows(index: int, ids_iter):
            ids = np.fromiter(ids_iter, dtype=np.int64)
            vecs = np.random.default_rng([seed, 10_000 + index]).normal(0.0, rank ** -0.5, (len(ids), rank))
            for j, iid in enumerate(ids.tolist()):
                yield iid, vecs[j].astype(np.float32)

        urows = sc.range(users, numSlices=parts).mapPartitionsWithIndex(user_rows).cache()
        irows = sc.range(items, numSlices=max(1, items // 16_384 + 1)).mapPartitionsWithIndex(item_rows).cache()
        t0 = time.perf_counter()
        seen = urows.map(lambda r: len(r[2])).sum()
        irows.count()
        prepare_s = time.perf_counter() - t0
        labels = Indexed(None, make_ids(users, "uuid", rng), make_ids(items, "padded", rng))
        with tempfile.TemporaryDirectory() as tmp, PeakRss() as rss:
            t0 = time.perf_counter()
            recs = blocked_top_k(urows, irows, 10, items)
            frame = recommendation_frame(spark, recs, labels)
            frame.write.parquet(str(Path(tmp) / "recs"))
            seconds = time.perf_counter() - t0
            written = spark.read.parquet(str(Path(tmp) / "recs")).count()
        return {"master": master, "default_parallelism": sc.defaultParallelism, "users": users, "items": items,
                "rank": rank,
                "seen_pairs": int(seen), "rows_written": int(written), "prepare_s": round(prepare_s, 1),
                "recommend_write_s": round(seconds, 1),
                "users_per_s": round(users / seconds, 1),
                "gflop": round(2.0 * users * items * rank / 1e9, 1), "peak_rss_mb": rss.peak // 2**20,
                "cpu_s": round(rss.cpu_s, 1),
                "load_avg": os.getloadavg()}
    finally:
        spark.stop()


def kernel_breakdown(rank: int = 50, repeats: int = 5, seed: int = 3) -> dict:
    """Where one block pair's time goes (1,024 users × 8,192 items, ~150 excluded items per user)."""
    rng = np.random.default_rng(seed)
    u = rng.normal(size=(1024, rank)).astype(np.float32)
    v = rng.normal(size=(8192, rank)).astype(np.float32)
    excluded = rng.integers(0, 59_047, 1024 * 150)
    rows = np.repeat(np.arange(1024), 150)
    pos = np.full(59_047, -1, dtype=np.int64)
    pos[:8192] = np.arange(8192)
    parts = {"gemm": 0.0, "negate": 0.0, "mask": 0.0, "select": 0.0, "gather": 0.0}
    for _ in range(repeats):
        t = time.perf_counter()
        neg = u @ v.T
        parts["gemm"] += time.perf_counter() - t
        t = time.perf_counter()
        np.negative(neg, out=neg)
        parts["negate"] += time.perf_counter() - t
        t = time.perf_counter()
        cols = pos[excluded]
        hit = cols >= 0
        neg[rows[hit], cols[hit]] = np.inf
        parts["mask"] += time.perf_counter() - t
        t = time.perf_counter()
        top = np.argpartition(neg, 9, axis=1)[:, :10]  # as modeler.batch.block_top_k selects
        parts["select"] += time.perf_counter() - t
        t = time.perf_counter()
        np.take_along_axis(neg, top, axis=1)
        parts["gather"] += time.perf_counter() - t
    total = sum(parts.values())
    return {"block": [1024, 8192, rank], "ms": {k: round(1000 * x / repeats, 2) for k, x in parts.items()},
            "share": {k: round(x / total, 3) for k, x in parts.items()},
            "load_avg": os.getloadavg()}


def _child(stage: str, master: str, extra: list[str]) -> dict:
    """Run one stage in a fresh process (its own SparkContext and master)."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as fh:
        out = fh.name
    cmd = [sys.executable, "-m", "tests.benchmarks.bench_batch", "--stage", stage, "--master", master,
           "--result", out, *extra]
    print("running", " ".join(cmd[3:]), flush=True)
    load = os.getloadavg()
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    if proc.returncode != 0:
        return {"error": f"exit {proc.returncode}", "master": master}
    result = json.loads(Path(out).read_text())
    result["load_avg_before"] = load
    Path(out).unlink()
    print(json.dumps({k: v for k, v in result.items() if k != "grid_table"}), flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", choices=("ml-small", "rfa"))
    parser.add_argument("--master", default="local[2]")
    parser.add_argument("--result")
    parser.add_argument("--users", type=int, default=FULL["users"])
    parser.add_argument("--items", type=int, default=FULL["items"])
    parser.add_argument("--events", type=int, default=FULL["events"])
    parser.add_argument("--rank", type=int, default=FULL["rank"])
    parser.add_argument("--skip-full", action="store_true", help="only the reduced-size scaling runs")
    parser.add_argument("--skip-small", action="store_true", help="skip the ml-latest-small quality run")
    args = parser.parse_args(argv)
    if args.stage:
        result = (stage_ml_small(args.master) if args.stage == "ml-small"
                  else stage_rfa(args.master, args.users, args.items, args.events, args.rank))
        Path(args.result).write_text(json.dumps(result))
        return 0

    results: dict = {"machine": {"cpus": os.cpu_count()}, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}

    def save() -> None:  # after every stage: a long run stopped half-way keeps what it measured
        OUT.parent.mkdir(parents=True, exist_ok=True)
        OUT.write_text(json.dumps(results, indent=2))

    results["kernel"] = kernel_breakdown()
    print(json.dumps(results["kernel"]), flush=True)
    if not args.skip_small:
        results["ml_small_implicit"] = _child("ml-small", "local[2]", [])
        save()
    size = [f"--{k}={v}" for k, v in REDUCED.items()]
    results["rfa_reduced"] = {}
    for master in ("local[1]", "local[2]"):
        results["rfa_reduced"][master] = _child("rfa", master, size)
        save()
    one, two = (results["rfa_reduced"][m].get("recommend_write_s") for m in ("local[1]", "local[2]"))
    if one and two:
        results["rfa_reduced"]["speedup_2_over_1"] = round(one / two, 2)
    if not args.skip_full:
        results["rfa_full"] = _child("rfa", "local[2]", [f"--{k}={v}" for k, v in FULL.items()])
    save()
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
