"""Spark driver for the cluster-mode test: streaming ALS over a few fixed mini-batches.

Run as its own process (a process can hold only one SparkContext, and the test process
already holds the local one)::

    python tests/integration/cluster_driver.py --master spark://127.0.0.1:7077 \
        --ratings ratings.csv --out factors.npz

The test imports :func:`train_batches` from this file too, so local and cluster mode run
exactly the same code: same rows, same batch boundaries, same slicing, same seed.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

log = logging.getLogger(__name__)

# Small on purpose: the point is equality across deploy modes, not model quality.
PARAMS: dict[str, Any] = {
    "rank": 4,
    "iterations": 2,
    "reg_param": 0.05,
    "learning_rate": 0.02,
    "seed": 7,
    "num_partitions": 4,
    # A reliable checkpoint after batch 2: executors write it, the next batch reads it back.
    "checkpoint_interval": 2,
}
BATCHES = 3
BATCH_SIZE = 800
SLICES = 4


def load_batches(ratings: Path, batches: int = BATCHES, batch_size: int = BATCH_SIZE) -> list[list]:
    """The first ``batches * batch_size`` ratings in stream (timestamp) order, cut into batches."""
    from common.datasets import read_ratings

    rows = sorted(read_ratings(ratings), key=lambda r: (r.timestamp, r.user, r.item))
    rows = rows[: batches * batch_size]
    return [
        [(r.user, r.item, float(r.rating), int(r.timestamp)) for r in rows[i : i + batch_size]]
        for i in range(0, len(rows), batch_size)
    ]


def _collect(rdd) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(ids sorted, biases, vectors) from an RDD[(id, (bias, vector))]."""
    pairs = sorted(rdd.collect(), key=lambda kv: kv[0])
    ids = [str(k) for k, _ in pairs]
    biases = np.array([float(v[0]) for _, v in pairs], dtype=np.float64)
    vectors = np.array([np.asarray(v[1], dtype=np.float64) for _, v in pairs], dtype=np.float64)
    return ids, biases, vectors


def train_batches(spark, batches: list[list], params: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train a fresh StreamingALS on ``batches`` in order; return its factors as numpy arrays."""
    from modeler.spark.streaming_als import StreamingALS

    model = StreamingALS(**(params or PARAMS))
    sc = spark.sparkContext
    for batch in batches:
        model.train(sc.parallelize(batch, SLICES))
    user_ids, user_bias, user_vec = _collect(model.user_factors)
    item_ids, item_bias, item_vec = _collect(model.item_factors)
    return {
        "user_ids": np.array(user_ids),
        "user_bias": user_bias,
        "user_vec": user_vec,
        "item_ids": np.array(item_ids),
        "item_bias": item_bias,
        "item_vec": item_vec,
        "master": np.array(sc.master),
        "executors": np.array(_executor_count(sc)),
    }


def _executor_count(sc) -> int:
    """Executors registered with this driver (the driver itself is not counted)."""
    status = sc._jsc.sc().getExecutorMemoryStatus()  # includes the driver's block manager
    return max(int(status.size()) - 1, 0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--master", required=True)
    parser.add_argument("--ratings", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--executors", type=int, default=0,
                        help="wait until this many executors have registered before training")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    from modeler.spark import get_spark

    spark = get_spark(
        args.master,
        app_name="streamrec-cluster-test",
        conf={
            # Two 1-core workers with 1 GiB each: one small executor per worker.
            "spark.executor.memory": "512m",
            "spark.executor.cores": "1",
            "spark.cores.max": "2",
        },
        checkpoint_dir=str(args.out.parent / "checkpoints"),
    )
    try:
        if args.executors:
            _wait_executors(spark.sparkContext, args.executors)
        result = train_batches(spark, load_batches(args.ratings))
        np.savez(args.out, **result)
        log.info("trained on %s with %s executors -> %s",
                 spark.sparkContext.master, int(result["executors"]), args.out)
    finally:
        spark.stop()
    return 0


def _wait_executors(sc, wanted: int, timeout: float = 150.0) -> None:
    """Block until ``wanted`` executors registered, so the tasks really spread over workers."""
    import time

    deadline = time.monotonic() + timeout
    while _executor_count(sc) < wanted:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {_executor_count(sc)} of {wanted} executors after {timeout}s")
        time.sleep(0.2)


if __name__ == "__main__":
    sys.exit(main())
