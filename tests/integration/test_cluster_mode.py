"""Cluster mode proven locally: a Spark standalone master and two workers on 127.0.0.1,
the modeler's streaming ALS driven against them, and the same factors as in local mode.

The master and workers are the classes pyspark ships (``bin/spark-class`` with
``org.apache.spark.deploy.master.Master`` / ``...worker.Worker``), exactly what the
``spark-master`` / ``spark-worker`` services in docker-compose.yml and the
``spark-standalone`` overlay run.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.support.standalone import WORKERS, Standalone

pytestmark = pytest.mark.spark
log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
DRIVER = Path(__file__).with_name("cluster_driver.py")
TOLERANCE = 1e-5


def _load_driver():
    spec = importlib.util.spec_from_file_location("streamrec_cluster_driver", DRIVER)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_standalone_cluster_trains_same_model_as_local_mode(
    standalone: Standalone, spark, ml_small: Path, tmp_path: Path
) -> None:
    driver = _load_driver()
    out = tmp_path / "cluster.npz"
    env = dict(os.environ, PYSPARK_PYTHON=sys.executable, SPARK_DRIVER_MEMORY="768m",
               PYTHONPATH=str(ROOT))
    log_path = tmp_path / "driver.log"
    with open(log_path, "wb") as log_file:
        driver_proc = subprocess.Popen(
            [sys.executable, str(DRIVER), "--master", standalone.url, "--ratings",
             str(ml_small / "ratings.csv"), "--out", str(out), "--executors", str(WORKERS)],
            cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        try:
            # Local mode in this process while the cluster driver runs in its own.
            local = driver.train_batches(spark, driver.load_batches(ml_small / "ratings.csv"))
            returncode = driver_proc.wait(timeout=360)
        finally:
            if driver_proc.poll() is None:
                driver_proc.kill()
                driver_proc.wait(10)
    driver_log = log_path.read_text(errors="replace")
    assert returncode == 0, f"driver failed:\n{driver_log[-4000:]}\n{standalone.tail()}"
    assert str(local["master"]).startswith("local")
    cluster = dict(np.load(out))
    assert str(cluster["master"]) == standalone.url
    # The work really ran on the two workers' executors, not in the driver.
    assert int(cluster["executors"]) == WORKERS
    # Batch 2 ended with a reliable checkpoint, written by the executors and read back by batch 3.
    assert any((tmp_path / "checkpoints").rglob("part-*")), "no reliable checkpoint was written"

    for side in ("user", "item"):
        log.info("%s factors: %d ids, max |cluster - local| bias %.3g, vector %.3g", side,
                 len(local[f"{side}_ids"]),
                 np.abs(cluster[f"{side}_bias"] - local[f"{side}_bias"]).max(),
                 np.abs(cluster[f"{side}_vec"] - local[f"{side}_vec"]).max())
        np.testing.assert_array_equal(cluster[f"{side}_ids"], local[f"{side}_ids"])
        assert len(local[f"{side}_ids"]) > 10
        np.testing.assert_allclose(cluster[f"{side}_bias"], local[f"{side}_bias"], atol=TOLERANCE)
        np.testing.assert_allclose(cluster[f"{side}_vec"], local[f"{side}_vec"], atol=TOLERANCE)
        # Training moved the factors: equality of two untouched initialisations proves nothing.
        assert np.abs(local[f"{side}_bias"]).max() > 1e-3
