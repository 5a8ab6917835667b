"""The one place a SparkSession is made."""

from __future__ import annotations

import os
import sys
import tempfile

from pyspark.sql import SparkSession


def get_spark(
    master: str = "local[*]",
    app_name: str = "streamrec-modeler",
    conf: dict[str, str] | None = None,
    checkpoint_dir: str | None = None,
) -> SparkSession:
    """Return the process's SparkSession, creating it on first call.

    Executors run the same interpreter as the driver (``PYSPARK_PYTHON``), so numpy and
    kafka-python are importable there. Java >= 17 is checked by the caller (devstack or
    ``python -m modeler``) so the failure message can say what to install.
    """
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    builder = (
        SparkSession.builder.master(master)
        .appName(app_name)
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.sql.shuffle.partitions", "8")
        .config("spark.default.parallelism", "8")
        .config("spark.driver.memory", os.environ.get("SPARK_DRIVER_MEMORY", "2g"))
        .config("spark.python.worker.reuse", "true")
        .config("spark.driver.bindAddress", os.environ.get("SPARK_DRIVER_BIND_ADDRESS", "127.0.0.1"))
        .config("spark.driver.host", os.environ.get("SPARK_DRIVER_HOST", "127.0.0.1"))
    )
    for key, value in (conf or {}).items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel(os.environ.get("SPARK_LOG_LEVEL", "WARN"))
    spark.sparkContext.setCheckpointDir(
        checkpoint_dir or tempfile.mkdtemp(prefix="streamrec-checkpoints-")
    )
    return spark


def total_cores(sc) -> int:
    """Cores the session computes with: N for ``local[N]`` (all CPUs for ``local[*]``),
    otherwise Spark's default parallelism (the executors' cores, unless configured)."""
    import re

    master = sc.master
    if master == "local":
        return 1
    m = re.fullmatch(r"local\[(\d+|\*)(?:,\s*\d+)?\]", master)
    if m:
        return os.cpu_count() or 1 if m.group(1) == "*" else max(1, int(m.group(1)))
    return max(1, int(sc.defaultParallelism))
