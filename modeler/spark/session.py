"""The one place a SparkSession is made."""

from __future__ import annotations

import os
import sys
import tempfile

from pyspark.sql import SparkSession

#: G1 gives committed heap back: a concurrent cycle whenever 5 s pass without a collection,
#: and the heap shrunk at its end to at most 30% free. Without them the driver's committed
#: heap grew with the snapshots of a long stream and was never returned (docs/scale.md: at
#: 3M ratings the JVM's peak PSS 890 -> 631 MiB, ratings/s unchanged within the noise).
JVM_OPTIONS = "-XX:G1PeriodicGCInterval=5000 -XX:MaxHeapFreeRatio=30 -XX:MinHeapFreeRatio=10"


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
        .config("spark.driver.extraJavaOptions", os.environ.get("SPARK_DRIVER_JAVA_OPTIONS", JVM_OPTIONS))
        .config("spark.executor.extraJavaOptions", os.environ.get("SPARK_EXECUTOR_JAVA_OPTIONS", JVM_OPTIONS))
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


def default_model_partitions(sc) -> int:
    """Partitions of the streaming model when none are configured: 1 on a ``local`` master
    (the whole batch is gathered, learned and written back in one task, with no shuffle of
    factor rows between stages: on a 2-core machine each PySpark stage and task costs far
    more than a batch's numpy work), otherwise Spark's default parallelism (the executors'
    cores), so the model's rows are spread over the cluster."""
    if sc.master == "local" or sc.master.startswith("local["):
        return 1
    return max(1, int(sc.defaultParallelism))
