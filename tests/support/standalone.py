"""A Spark standalone master and two 1-core workers on 127.0.0.1, as a pytest fixture.

The master and workers are the classes pyspark ships (``bin/spark-class`` with
``org.apache.spark.deploy.master.Master`` / ``...worker.Worker``), exactly what the
``spark-master`` / ``spark-worker`` services in docker-compose.yml and the
``spark-standalone`` overlay run. Registered for the integration tests in their conftest.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from devstack.services import check_java, free_port, stop_process_group, wait_for_port

WORKERS = 2


def spark_home() -> Path:
    import pyspark

    return Path(pyspark.__file__).resolve().parent


@dataclass
class Standalone:
    url: str
    webui: str
    procs: list[subprocess.Popen]
    logs: list[Path]

    def alive_workers(self) -> int:
        with urllib.request.urlopen(f"{self.webui}/json/", timeout=2) as resp:
            state = json.load(resp)
        return sum(1 for w in state.get("workers", []) if w.get("state") == "ALIVE")

    def tail(self, lines: int = 15) -> str:
        out = []
        for path in self.logs:
            text = path.read_text(errors="replace").splitlines() if path.exists() else []
            out.append(f"--- {path.name}\n" + "\n".join(text[-lines:]))
        return "\n".join(out)


def _spawn(args: list[str], log_path: Path, env: dict[str, str]) -> subprocess.Popen:
    log_file = open(log_path, "ab")  # noqa: SIM115 - owned by the child for its lifetime
    # spark-class ends with `exec java ...`, so the pid is the JVM; its own session lets
    # us stop it and anything it forked (executors) by process group.
    return subprocess.Popen(
        [str(spark_home() / "bin" / "spark-class"), *args],
        stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        env=env, start_new_session=True,
    )


def _stop(proc: subprocess.Popen) -> None:
    stop_process_group(proc)


@pytest.fixture(scope="module")
def standalone(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Standalone]:
    """A Spark standalone master and two 1-core/1 GiB workers, all bound to 127.0.0.1."""
    check_java()
    work = tmp_path_factory.mktemp("spark-standalone")
    env = dict(os.environ)
    env.update({
        "SPARK_HOME": str(spark_home()),
        # Binds the web UIs and RPC to loopback (the UIs default to 0.0.0.0).
        "SPARK_LOCAL_IP": "127.0.0.1",
        "SPARK_LOCAL_DIRS": str(work / "local"),
        # The REST submission server has a fixed port (6066) that parallel runs would fight over.
        "SPARK_MASTER_OPTS": "-Dspark.master.rest.enabled=false",
        "SPARK_WORKER_OPTS": "-Dspark.worker.cleanup.enabled=false",
        "SPARK_DAEMON_MEMORY": "256m",
        "PYSPARK_PYTHON": sys.executable,
    })
    port, ui_port = free_port(), free_port()
    url, webui = f"spark://127.0.0.1:{port}", f"http://127.0.0.1:{ui_port}"
    procs: list[subprocess.Popen] = []
    logs: list[Path] = []
    try:
        logs.append(work / "master.log")
        procs.append(_spawn(
            ["org.apache.spark.deploy.master.Master", "--host", "127.0.0.1",
             "--port", str(port), "--webui-port", str(ui_port)],
            logs[-1], env,
        ))
        for n in range(WORKERS):
            logs.append(work / f"worker{n}.log")
            procs.append(_spawn(
                ["org.apache.spark.deploy.worker.Worker", "--host", "127.0.0.1",
                 "--cores", "1", "--memory", "1g", "--webui-port", str(free_port()),
                 "--work-dir", str(work / f"worker{n}"), url],
                logs[-1], env,
            ))
        # Workers start alongside the master (they retry registering); saves a JVM start-up.
        wait_for_port("127.0.0.1", port, 60, procs[0])
        cluster = Standalone(url, webui, procs, logs)
        deadline = time.monotonic() + 150
        while True:
            with contextlib.suppress(OSError, ValueError):
                if cluster.alive_workers() == WORKERS:
                    break
            dead = [p.args for p in procs if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                raise RuntimeError(f"standalone cluster did not come up (dead: {dead})\n{cluster.tail()}")
            time.sleep(0.3)
        yield cluster
    finally:
        for proc in reversed(procs):
            _stop(proc)
