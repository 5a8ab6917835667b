"""CPU seconds per 10k ratings of the modeler's training task, in-process -> build/bench/task_cpu.json.

``python -m tests.benchmarks.bench_task_cpu [--batch-size 20000] [--loops 2] [--warm 5]``

The one-partition model (the modeler's layout on a local master) runs a micro-batch as ONE
Spark task: route the batch, unpickle the model partition, gather + learn + write back
(:func:`modeler.spark.streaming_als._fused_stage`), pickle the new partition. This drives
exactly those stage functions in this process, without Spark, on ml-latest-small in
timestamp order (looped, as ``bench_modeler`` does), with the driver's bookkeeping of
``StreamingALS.train`` between batches, and reports ``time.process_time`` per 10k ratings
after ``--warm`` batches. CPU time, single-threaded BLAS (``OMP_NUM_THREADS=1``, as Spark
sets it for its Python workers): repeatable on a loaded machine, unlike wall-clock figures.
What it leaves out: the JVM, the socket copies between it and the Python workers, the
second unpickle of the model by the end-of-batch ``map``, Kafka and Redis.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before numpy: Spark's Python workers get 1

import argparse
import pickle
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

OUT = ROOT / "build" / "bench" / "task_cpu.json"
ML_SMALL = Path(os.environ.get("SHARED_DATA", ROOT.parent / "shared" / "data")) / "ml-latest-small" / "ratings.csv"


class TaskDriver:
    """``StreamingALS.train`` for ONE partition with the Spark calls replaced by direct calls
    of the same stage functions; the partition is pickled between batches as Spark caches it."""

    def __init__(self, params: Any) -> None:
        import numpy as np

        from modeler.spark import streaming_als as sa

        self.sa, self.np, self.p = sa, np, params
        self.blob = pickle.dumps(sa._empty_part(params), protocol=pickle.HIGHEST_PROTOCOL)
        self.rating_sum, self.ratings_seen, self.batches, self.last = 0.0, 0, 0, 0
        r = params.ranking_rank
        self.gram_users, self.gram_items = np.zeros((r, r)), np.zeros((r, r))
        self.positives, self.r_batches, self.r_last, self.u_entries, self.i_entries = 0, 0, 0, 0, 0
        self.pickle_seconds = 0.0

    def train(self, batch: list[tuple[str, str, float, int]]) -> dict[str, Any]:
        from modeler.core.als_math import replay_fraction
        from modeler.core.ranking import ranking_replay_fraction, sweep_fraction

        sa, p = self.sa, self.p
        history = p.ranking and p.ranking_history > 0
        fraction = replay_fraction(p, self.last, self.ratings_seen)
        r_fraction = 0.0 if history else ranking_replay_fraction(p, self.r_last, self.positives)
        sweep = (sweep_fraction(p, self.r_last, self.u_entries), sweep_fraction(p, self.r_last, self.i_entries))
        carry = sa.RankingCarry(self.gram_users, self.gram_items, self.positives, r_fraction) if p.ranking else None
        half = len(batch) // 2  # two input slices, as the Kafka reader's
        routed = [kv for j, chunk in enumerate((batch[:half], batch[half:]))
                  for kv in sa._route_ratings(p)(j, iter(chunk))]
        t0 = time.process_time()
        part = pickle.loads(self.blob)
        self.pickle_seconds += time.process_time() - t0
        stage = sa._fused_stage(p, self.batches + 1, fraction, self.rating_sum, self.ratings_seen,
                                self.r_batches + 1, r_fraction, carry, sweep)
        (pid, new_part), = list(stage(iter([(0, part), *routed])))
        st, _ = sa._finish(None)((pid, new_part))
        t0 = time.process_time()
        self.blob = pickle.dumps(new_part, protocol=pickle.HIGHEST_PROTOCOL)
        self.pickle_seconds += time.process_time() - t0
        if st.get("n"):
            self.batches += 1
            self.ratings_seen += int(st["n"])
            self.rating_sum += float(st["sum"])
            self.last = int(st["n"])
        n_pos = int(st.get("r_positives", 0))
        if n_pos:
            self.r_batches += 1
            self.positives += n_pos
            self.r_last = n_pos
            self.gram_users = self.gram_users + st["r_d_gram_users"]
            self.gram_items = self.gram_items + st["r_d_gram_items"]
            self.u_entries += n_pos - int(st.get("r_evicted_users", 0))
            self.i_entries += n_pos - int(st.get("r_evicted_items", 0))
        return st


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=20_000)
    parser.add_argument("--loops", type=int, default=2, help="passes over the ratings file")
    parser.add_argument("--warm", type=int, default=5, help="batches not counted")
    parser.add_argument("--ratings", type=Path, default=ML_SMALL)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)

    from common.datasets import read_ratings
    from modeler.core.als_math import ALSParams

    rows = sorted(read_ratings(args.ratings), key=lambda r: r.timestamp)
    stream = [(r.user, r.item, float(r.rating), int(r.timestamp)) for r in rows] * args.loops
    driver = TaskDriver(ALSParams(num_partitions=1))
    load_before = os.getloadavg()
    per_batch = []
    sse = []
    for b in range(0, len(stream), args.batch_size):
        batch = stream[b:b + args.batch_size]
        t0 = time.process_time()
        st = driver.train(batch)
        per_batch.append((len(batch), time.process_time() - t0))
        sse.append(float(st.get("preq_sse", 0.0)))
    counted = per_batch[args.warm:] or per_batch
    result = {
        "cpu_seconds_per_10k_ratings": sum(c for _, c in counted) / sum(n for n, _ in counted) * 10_000,
        "pickle_seconds_total": driver.pickle_seconds,
        "model_record_bytes": len(driver.blob),
        "batch_size": args.batch_size,
        "batches": len(per_batch),
        "warm_batches": args.warm,
        "batch_cpu_seconds": [round(c, 3) for _, c in per_batch],
        "prequential_sse": sse,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
    }
    print(f"task CPU {result['cpu_seconds_per_10k_ratings']:.3f} s per 10k ratings "
          f"(batches of {args.batch_size}, load {load_before[0]:.1f}); model record "
          f"{len(driver.blob) / 1e6:.1f} MB", flush=True)
    from tests.benchmarks.report import write_report

    write_report(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
