"""``spark-submit modeler/batch.py`` on a real standalone Spark cluster gives the local result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from modeler.batch import run_job
from tests.support.batch_job import (
    PLANTED_RANK,
    read_back,
    small_config,
)
from tests.support.standalone import spark_home

pytestmark = pytest.mark.spark

ROOT = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------- cluster mode


def test_spark_submit_on_the_standalone_cluster_gives_the_local_result(
    spark, standalone, events_file: Path, tmp_path: Path
) -> None:
    local_out, cluster_out = tmp_path / "local", tmp_path / "cluster"
    cfg = small_config(events_file, local_out, fmt="csv", iterations=5, blocks=2)
    run_job(spark, cfg)
    env = dict(
        os.environ,
        PYSPARK_PYTHON=sys.executable,
        PYSPARK_DRIVER_PYTHON=sys.executable,
        SPARK_DRIVER_MEMORY="768m",
        SPARK_LOCAL_IP="127.0.0.1",
    )
    env.pop("PYTHONPATH", None)  # the script makes its packages importable and ships them itself
    proc = subprocess.run(
        [
            str(spark_home() / "bin" / "spark-submit"),
            "--master",
            standalone.url,
            "--conf",
            "spark.executor.memory=512m",
            "--conf",
            "spark.executor.cores=1",
            "--conf",
            "spark.cores.max=2",
            "--conf",
            "spark.driver.host=127.0.0.1",
            "--conf",
            "spark.driver.bindAddress=127.0.0.1",
            str(ROOT / "modeler" / "batch.py"),
            "--master",
            standalone.url,
            "--input",
            str(events_file),
            "--out",
            str(cluster_out),
            "--format",
            "csv",
            "--ranks",
            str(PLANTED_RANK),
            "--regs",
            "0.1",
            "--alphas",
            "1",
            "--iterations",
            "5",
            "--blocks",
            "2",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=480,
    )
    assert proc.returncode == 0, proc.stderr[-4000:] + standalone.tail()
    report = json.loads((cluster_out / "report.json").read_text())
    assert report["spark"]["master"] == standalone.url
    local = read_back(spark, local_out / "recommendations", "csv")
    cluster = read_back(spark, cluster_out / "recommendations", "csv")
    assert len(cluster) == len(local)
    # Same data, seed and blocks: the same model up to floating-point summation order.
    local_pairs = {(u, i): s for u, _, i, s in local}
    cluster_pairs = {(u, i): s for u, _, i, s in cluster}
    common = local_pairs.keys() & cluster_pairs.keys()
    assert len(common) >= 0.97 * len(local_pairs)
    np.testing.assert_allclose([cluster_pairs[p] for p in common], [local_pairs[p] for p in common], atol=1e-3)
