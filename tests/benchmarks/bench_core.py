"""Benchmark of the streaming ALS core -> build/bench/core.json.

``python -m tests.benchmarks.bench_core [--batches 20] [--batch-size 10000]
[--partitions 1,2,4] [--skip-accuracy] [--ratings FILE] [--extra FILE ...]``

* Throughput: ``StreamingALS.train`` in Spark ``local[2]`` on a synthetic stream
  (``common.synthetic``), mini-batches of 10,000, default model parameters, for several
  ``num_partitions``. The first two batches (Python workers starting, JIT of the JVM) are
  reported but not counted. The machine's load average is recorded next to the figures: on
  a shared 2-core machine it changes them a lot.
* Accuracy: the seeds' experiment (``modeler.evaluate``) on ml-latest-small and on a
  synthetic planted-model set: streaming RMSE / batch ALS RMSE (goal ≤ 1.03), and on the real
  files the top-10 lists (``ranking``: popular, batch implicit ALS, streaming ranking model,
  explicit order, prequential recall; goals streaming NDCG@10 ≥ 1.0× batch implicit ALS and
  ≥ 1.5× popular). Other files (e.g. ml-100k's ``u.data``, ml-1m's ``ratings.dat``, an
  implicit-events file; any format ``common.datasets`` reads) are measured too when given with
  ``--extra`` or in ``BENCH_EXTRA_RATINGS`` (colon-separated paths): the repository ships no
  copy of them. The synthetic set skips the ranking rows (its planted model is an explicit
  one; it keeps ``make bench`` shorter).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

OUT = ROOT / "build" / "bench" / "core.json"
ML_SMALL = Path(os.environ.get("SHARED_DATA", ROOT.parent / "shared" / "data")) / "ml-latest-small" / "ratings.csv"


def throughput(spark, batches: int, batch_size: int, partitions: int, seed: int = 7) -> dict[str, Any]:
    from common.synthetic import generate
    from modeler.spark.streaming_als import StreamingALS

    n = batches * batch_size
    rows, _ = generate(n_users=max(2000, n // 40), n_items=max(2000, n // 60), n_ratings=n, seed=seed)
    stream = [tuple(r) for r in rows]
    sc = spark.sparkContext
    model = StreamingALS(num_partitions=partitions, seed=seed)
    load_before = os.getloadavg()
    seconds = []
    for b in range(batches):
        rdd = sc.parallelize(stream[b * batch_size:(b + 1) * batch_size], 2)
        stats = model.train(rdd)
        seconds.append(stats.seconds)
    counted = seconds[2:] or seconds
    n_counted = len(counted) * batch_size
    return {
        "num_partitions": partitions,
        "batch_size": batch_size,
        "batches": batches,
        "ratings_per_second": n_counted / sum(counted),
        "median_batch_seconds": statistics.median(counted),
        "batch_seconds": [round(s, 3) for s in seconds],
        "params": model.params.to_dict(),
        "users": model.user_factors.count(),
        "items": model.item_factors.count(),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
    }


def accuracy(spark, path: Path | None, name: str, batch_size: int = 1000) -> dict[str, Any]:
    from common.datasets import read_events
    from common.settings import CommonSettings
    from common.synthetic import generate
    from modeler.evaluate import evaluate, summary

    scale = CommonSettings().scale  # type: ignore[call-arg]  # RATING_MIN / RATING_MAX from the env
    rows: list[Any]
    if path is None:
        rows = list(generate(n_users=2000, n_items=3000, n_ratings=150_000, seed=1)[0])
    else:
        rows = read_events(path, scale=scale)
    started = time.perf_counter()
    report = evaluate(spark, rows, name, batch_size=batch_size, show_progress=True, scale=scale,
                      ranking=path is not None)
    report["wall_seconds"] = time.perf_counter() - started
    report["loadavg_after"] = os.getloadavg()
    # The figures, not the curves (those are in build/eval).
    report.get("streaming", {}).pop("curve", None)
    for block in report.get("ranking", {}).values():
        if isinstance(block, dict):
            block.pop("curve", None)
    print(summary(report), flush=True)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=10_000)
    parser.add_argument("--partitions", default="1,2,4")
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--ratings", type=Path, default=ML_SMALL)
    extra_env = [Path(p) for p in os.environ.get("BENCH_EXTRA_RATINGS", "").split(":") if p]
    parser.add_argument("--extra", type=Path, nargs="*", default=extra_env,
                        help="more rating files for the accuracy experiment")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)

    from modeler.spark import get_spark

    spark = get_spark("local[2]", app_name="bench-core",
                      checkpoint_dir=tempfile.mkdtemp(prefix="bench-core-"))
    result: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "spark_master": spark.sparkContext.master},
        "goals": {"ratings_per_second": 20_000, "ratio": 1.03,
                  "streaming_to_batch_ndcg": 1.0, "streaming_to_popular_ndcg": 1.5},
        "throughput": [],
        "accuracy": {},
    }
    try:
        for p in [int(x) for x in args.partitions.split(",")]:
            figures = throughput(spark, args.batches, args.batch_size, p)
            result["throughput"].append(figures)
            print(f"throughput P={p}: {figures['ratings_per_second']:.0f} ratings/s "
                  f"(median batch {figures['median_batch_seconds']:.2f}s, "
                  f"load {figures['loadavg_before'][0]:.1f})", flush=True)
        if not args.skip_accuracy:
            if args.ratings.exists():
                small = accuracy(spark, args.ratings, "ml-latest-small")
                result["accuracy"]["ml-latest-small"] = small
            for path in args.extra:
                name = path.parent.name or path.stem
                if not path.exists():
                    print(f"{path}: not found, skipped", flush=True)
                    continue
                result["accuracy"][name] = accuracy(spark, path, name)
            result["accuracy"]["synthetic-150k"] = accuracy(spark, None, "synthetic-150k")
    finally:
        spark.stop()
    best = max(result["throughput"], key=lambda f: f["ratings_per_second"], default=None)
    if best:
        result["best_ratings_per_second"] = best["ratings_per_second"]
        result["best_num_partitions"] = best["num_partitions"]
    from tests.benchmarks.report import write_report

    write_report(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
