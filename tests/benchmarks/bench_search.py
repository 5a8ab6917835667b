"""Benchmark of the online hyper-parameter search (numpy reference) -> build/bench/search.json.

``python -m tests.benchmarks.bench_search [--ratings FILE ...] [--batch-size 1000] [--skip-drift]``

* Per rating file (default: ml-latest-small, and ml-100k / ml-1m when present under
  /work/extra or given with ``--ratings``/``BENCH_EXTRA_RATINGS``): 8 candidates replayed in
  time order side by side, pruned by halving, the leader served
  (:func:`modeler.search_eval.dataset_experiment`); the served leader's final test score
  against the best single candidate in hindsight. Goal: within 2% (NDCG@10 of the ranking
  model; RMSE of the explicit one reported too).
* Drift: a synthetic stream whose planted model changes halfway; events from the change to
  the leader switch, and a no-drift control's switches (false alarms).
* ``--service``: end-to-end throughput of the modeler service (real broker, redis-server,
  Spark ``local[2]``, ``ModelerService`` in this process) on the first ratings of
  ml-latest-small, one model against 8 candidates (``MODEL_CANDIDATES``), both in the same
  run (:func:`service_throughput`). Goal: 8 candidates >= 1/3 of one model.

The machine's load average is written next to the figures: the timings are taken on a
shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

OUT = ROOT / "build" / "bench" / "search.json"
ML_SMALL = Path(os.environ.get("SHARED_DATA", ROOT.parent / "shared" / "data")) / "ml-latest-small" / "ratings.csv"
EXTRA_DIR = Path(os.environ.get("EXTRA_DATA", ROOT.parent / "extra"))


def default_files() -> list[Path]:
    files = [ML_SMALL, EXTRA_DIR / "ml-100k.tsv"]
    files += [Path(p) for p in os.environ.get("BENCH_EXTRA_RATINGS", "").split(":") if p]
    return [f for f in files if f.exists()]


def spark_throughput(path: Path, batch_size: int = 5000, batches: int = 10) -> dict[str, Any]:
    """Ratings/s of :class:`modeler.spark.side_by_side.SideBySideALS` in Spark ``local[2]``
    with 8 candidates against 1 (the same code path), explicit model, time-ordered batches of
    ``path``; the first two batches (worker start-up) are not counted."""
    from common.datasets import read_ratings
    from modeler.core.als_math import ALSParams
    from modeler.search_eval import EXPLICIT_GRID, batches_of, time_split
    from modeler.spark import get_spark
    from modeler.spark.side_by_side import SideBySideALS

    spark = get_spark("local[2]", app_name="bench-search")
    sc = spark.sparkContext
    train, _ = time_split(read_ratings(path), 0.2)
    bs = [[tuple(r) for r in b] for b in batches_of(train, batch_size)[:batches]]
    out: dict[str, Any] = {"batch_size": batch_size, "batches": len(bs), "loadavg_before": os.getloadavg()}
    for k in (1, 8):
        sbs = SideBySideALS({f"c{j}": p for j, p in enumerate(EXPLICIT_GRID[:k])}, ALSParams(num_partitions=1))
        seconds = []
        for b in bs:
            t0 = time.perf_counter()
            sbs.train(sc.parallelize(b, 2))
            seconds.append(time.perf_counter() - t0)
        counted = seconds[2:] or seconds
        out[f"ratings_per_second_{k}"] = len(counted) * batch_size / sum(counted)
    out["ratio_8_to_1"] = out["ratings_per_second_8"] / out["ratings_per_second_1"]
    out["loadavg_after"] = os.getloadavg()
    return out


def _service_rate(spark: Any, rows: list[tuple], bootstrap: str, redis_url: str, batch: int,
                  extra: dict[str, Any]) -> dict[str, Any]:
    """Ratings/s of one ``ModelerService`` draining ``rows`` from a fresh topic: ratings of
    the versions after the second over their wall time (the first ones include warm-up)."""
    import uuid

    from devstack.services import create_topics
    from modeler.config import ModelerSettings
    from modeler.replay import make_producer, send_rows
    from modeler.service import ModelerService

    topic = f"bench-search-{uuid.uuid4().hex[:8]}"
    create_topics(bootstrap, {topic: 4, f"{topic}.dlq": 1})
    producer = make_producer(bootstrap)
    send_rows(producer, topic, rows)
    producer.flush()
    producer.close()
    settings = ModelerSettings(**{
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap, "RATINGS_TOPIC": topic, "DLQ_TOPIC": f"{topic}.dlq",
        "REDIS_URL": redis_url, "REDIS_PREFIX": topic, "MODELER_BATCH_MAX_RECORDS": batch,
        "MODELER_BATCH_MAX_INTERVAL_S": 0.2, "MODELER_METRICS_PORT": 0, **extra})
    service = ModelerService(settings, spark=spark)
    stamps: list[tuple[float, int]] = []

    def until(svc: ModelerService) -> bool:
        stamps.append((time.perf_counter(), int(svc.model.ratings_seen)))
        return int(svc.model.ratings_seen) >= len(rows)

    t0 = time.perf_counter()
    service.run(until=until)
    counted = stamps[2:] if len(stamps) > 3 else stamps
    (ta, na), (tb, nb) = counted[0], counted[-1]
    return {"ratings": len(rows), "versions": len(stamps), "seconds": time.perf_counter() - t0,
            "ratings_per_second": (nb - na) / (tb - ta) if tb > ta else 0.0,
            "batch_seconds": [r.seconds for r in service.reports]}


#: 8 candidates at the single model's own rank (10, the ALSParams default), λ apart: the
#: grid whose cost per candidate is the single model's.
SAME_RANK_GRID = [{"reg_param": lam} for lam in (0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)]


def service_throughput(path: Path, n: int | None = None, batch: int = 5000, ranking: bool = True,
                       grid: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """End-to-end ratings/s of the service with one model and with 8 candidates (default
    :data:`modeler.search_eval.EXPLICIT_GRID`; every candidate a whole model: the ranking
    one too when ``ranking``), the first ``n`` ratings of ``path`` in time order (all of them
    by default: ml-latest-small's 100,836 are 21 batches, of which the first two are not
    timed), batches of ``batch``; both in the same run, on the same broker and Redis."""
    import tempfile

    from common.datasets import read_ratings
    from devstack.services import start_broker, start_redis
    from modeler.search_eval import EXPLICIT_GRID
    from modeler.spark import get_spark

    grid = grid or EXPLICIT_GRID
    rows = sorted(read_ratings(path), key=lambda r: (r.timestamp, r.user, r.item))[:n]
    data = [(r.user, r.item, float(r.rating), int(r.timestamp)) for r in rows]
    work = Path(tempfile.mkdtemp(prefix="bench-search-"))
    redis_proc = start_redis(workdir=work / "redis")
    broker = start_broker(workdir=work / "broker")
    spark = get_spark("local[2]", app_name="bench-search-service")
    out: dict[str, Any] = {"ratings": len(data), "batch": batch, "ranking_model": ranking,
                           "candidates": grid, "loadavg_before": os.getloadavg()}
    try:
        common = {"MODEL_RANKING": ranking}
        out["single"] = _service_rate(spark, data, broker.url, redis_proc.url, batch, common)
        out["search_8"] = _service_rate(spark, data, broker.url, redis_proc.url, batch,
                                        {**common, "MODEL_CANDIDATES": json.dumps(grid)})
    finally:
        broker.stop()
        redis_proc.stop()
    out["ratio_8_to_1"] = out["search_8"]["ratings_per_second"] / max(1e-9, out["single"]["ratings_per_second"])
    out["loadavg_after"] = os.getloadavg()
    return out


def main(argv: list[str] | None = None) -> int:
    from modeler.search_eval import dataset_experiment, drift_experiment

    parser = argparse.ArgumentParser(prog="bench_search", description=__doc__.splitlines()[0])
    parser.add_argument("--ratings", nargs="*", type=Path, default=None)
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--test-fraction", type=float, default=0.2)
    parser.add_argument("--splits", default="time,per_user",
                        help="test splits, comma-separated (modeler.search_eval.SPLITS)")
    parser.add_argument("--skip-drift", action="store_true")
    parser.add_argument("--spark", action="store_true", help="also the Spark side-by-side throughput")
    parser.add_argument("--service", action="store_true",
                        help="also the end-to-end service throughput, 8 candidates vs one model")
    parser.add_argument("--service-only", action="store_true",
                        help="only that (merged into an existing --out file)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    files = args.ratings if args.ratings is not None else default_files()
    figures: dict[str, Any] = {"host": platform.node(), "python": platform.python_version(),
                               "loadavg_before": os.getloadavg(), "started": time.time(), "datasets": []}
    if args.service_only:
        figures = json.loads(args.out.read_text()) if args.out.exists() else figures
        files, args.skip_drift, args.spark, args.service = [], True, False, True
    splits = [s for s in args.splits.split(",") if s]
    for f, split in [(f, split) for f in files for split in splits]:
        t0 = time.perf_counter()
        d = dataset_experiment(str(f), args.batch_size, args.test_fraction, split=split)
        d["seconds"] = time.perf_counter() - t0
        figures["datasets"].append(d)
        for model in ("explicit", "ranking"):
            m = d.get(model, {})
            if "leader_test" in m:
                ci = m.get("relative_gap_ci95")
                users = m["test_users_scored"]
                ci_s = f" (95% CI {100 * ci[0]:+.1f}%..{100 * ci[1]:+.1f}% over {users} users)" if ci else ""
                print(f"{f.name} {split} {model}: leader {m['leader']} {m['leader_params']} test {m['metric']} "
                      f"{m['leader_test']:.4f}, best single {m['best_single_test']:.4f} "
                      f"{m['best_single_params']}, gap {100 * m['relative_gap']:+.2f}%{ci_s}", flush=True)
            elif m:
                print(f"{f.name} {split} {model}: {m}", flush=True)
    if not args.skip_drift:
        figures["drift"] = drift_experiment()
        dr = figures["drift"]["drift"]
        print(f"drift: leader at change {dr['leader_at_change']} {dr['leader_at_change_params']}, "
              f"switch {dr['events_to_switch_after_change']} events after the change; "
              f"control: {figures['drift']['control_no_drift']['switches_after_change']} switches", flush=True)
    if args.spark and files:
        figures["spark_side_by_side"] = sp = spark_throughput(files[0])
        print(f"spark side by side: {sp['ratings_per_second_1']:.0f} ratings/s with 1 candidate, "
              f"{sp['ratings_per_second_8']:.0f} with 8 (ratio {sp['ratio_8_to_1']:.2f})", flush=True)
    if args.service:
        figures["service_throughput"] = {}
        from modeler.search_eval import EXPLICIT_GRID

        runs = (("explicit_only_rank_lambda_grid", False, EXPLICIT_GRID),
                ("explicit_only_same_rank_grid", False, SAME_RANK_GRID),
                ("with_ranking_model_rank_lambda_grid", True, EXPLICIT_GRID))
        for name, ranking, grid in runs:
            sv = service_throughput(ML_SMALL, ranking=ranking, grid=grid)
            figures["service_throughput"][name] = sv
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(figures, indent=2, default=str))  # each run kept as it ends
            print(f"service end to end ({name}): "
                  f"{sv['single']['ratings_per_second']:.0f} ratings/s with one model, "
                  f"{sv['search_8']['ratings_per_second']:.0f} with 8 candidates "
                  f"(ratio {sv['ratio_8_to_1']:.2f}), load average {sv['loadavg_before']}", flush=True)
    figures["loadavg_after"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=2, default=str))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
