"""The whole stack as real processes: broker + Redis (session fixtures of tests/conftest.py),
the modeler (Spark local[2]), the predictor, the frontend; and a headless Chromium.

Playwright cannot download its own browser here, so it drives Debian's ``/usr/bin/chromium``
(override with ``CHROMIUM``)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from kafka import KafkaProducer

from devstack.services import free_port

ROOT = Path(__file__).resolve().parents[2]
BUILD = ROOT / "build" / "e2e"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]
# The first ratings of ml-latest-small (users 1.. in file order): enough for a model that
# knows the popular titles, small enough for Spark on 2 busy cores.
SEED_RATINGS = int(os.environ.get("E2E_SEED_RATINGS", "3000"))
# Several micro-batches, so the RMSE chart has a line (each costs a few seconds of Spark).
BATCH_MAX_RECORDS = int(os.environ.get("E2E_BATCH_MAX_RECORDS", "1500"))


def chromium_path() -> str:
    path = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(path).exists():
        pytest.fail("Chromium not found: apt-get install -y chromium (or set CHROMIUM=/path)")
    return path


@dataclass
class Service:
    name: str
    proc: subprocess.Popen
    log_path: Path

    def log_tail(self, n: int = 40) -> str:
        with contextlib.suppress(OSError):
            return "".join(self.log_path.read_text(errors="replace").splitlines(True)[-n:])
        return ""

    def pause(self) -> None:
        """Freeze the whole process group (the modeler's JVM and Python workers too): a
        service that has fallen behind, for as long as a test needs."""
        os.killpg(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.killpg(self.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.resume()  # a paused process cannot act on SIGTERM
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                # Its own session (start_new_session): the group holds Spark's JVM too.
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)


@dataclass
class Stack:
    frontend_url: str
    predictor_url: str
    redis_url: str
    bootstrap: str
    topic: str
    prefix: str
    services: dict[str, Service]

    def diagnostics(self) -> str:
        return "\n".join(f"--- {s.name} (rc={s.proc.poll()}):\n{s.log_tail()}"
                         for s in self.services.values())


def rate(page, title: str, query: str, value: float) -> None:
    """Search ``query`` on the page and click the half-star ``value`` of the row titled
    ``title``; returns once the page says the rating was saved."""
    page.fill("#q", query)
    page.press("#q", "Enter")
    row = page.locator("#results li.movie", has_text=title).first
    row.wait_for(timeout=10_000)
    row.locator(f'label[data-value="{value:g}"]').click()
    row.locator(".rate-status.saved").wait_for(timeout=15_000)


def _spawn(name: str, args: list[str], env: dict[str, str], logdir: Path) -> Service:
    log_path = logdir / f"{name}.log"
    log = open(log_path, "wb")  # noqa: SIM115 - the child owns it
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    return Service(name, proc, log_path)


def wait_http(url: str, service: Service, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if service.proc.poll() is not None:
            pytest.fail(f"{service.name} exited ({service.proc.returncode}):\n{service.log_tail()}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=1).status_code < 500:
                return
        time.sleep(0.2)
    pytest.fail(f"{service.name} not answering {url} after {timeout}s:\n{service.log_tail()}")


def seed_topic(bootstrap: str, topic: str, ratings_csv: Path, n: int) -> int:
    from common.datasets import read_ratings

    rows = read_ratings(ratings_csv)[:n]
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=20)
    try:
        for r in rows:
            value = (f'{{"user":"{r.user}","item":"{r.item}","rating":{r.rating},'
                     f'"timestamp":{r.timestamp}}}').encode()
            producer.send(topic, key=r.user.encode(), value=value)
        producer.flush(30)
    finally:
        producer.close(5)
    return len(rows)


@pytest.fixture(scope="module")
def stack(redis_url: str, bootstrap: str, ml_small: Path, tmp_path_factory) -> Iterator[Stack]:
    from devstack.services import create_topics

    logdir = tmp_path_factory.mktemp("e2e-logs")
    topic = f"e2e-ratings-{uuid.uuid4().hex[:8]}"
    prefix = f"e2e{uuid.uuid4().hex[:8]}"
    create_topics(bootstrap, {topic: 4, f"{topic}.dlq": 1})
    seeded = seed_topic(bootstrap, topic, ml_small / "ratings.csv", SEED_RATINGS)
    assert seeded == SEED_RATINGS

    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYSPARK", "SPARK_HOME"))}
    env.update({
        "REDIS_URL": redis_url, "KAFKA_BOOTSTRAP_SERVERS": bootstrap, "RATINGS_TOPIC": topic,
        "DLQ_TOPIC": f"{topic}.dlq", "REDIS_PREFIX": prefix, "SPARK_MASTER": "local[2]",
        "LOG_LEVEL": "INFO", "LOG_FORMAT": "text", "MODELER_METRICS_PORT": str(free_port()),
        "MODELER_BATCH_MAX_INTERVAL_S": "1", "MODELER_BATCH_MAX_RECORDS": str(BATCH_MAX_RECORDS),
        "PREDICTOR_MODEL_POLL_INTERVAL_S": "0.5",
        # The test pauses the modeler for a while; its lease must outlive the pause.
        "MODELER_LEASE_TTL_S": "300",
        "MODELER_CHECKPOINT_DIR": str(tmp_path_factory.mktemp("e2e-checkpoints")),
    })
    loader = subprocess.run(
        [sys.executable, "-m", "predictor.load_catalog", "--movies", str(ml_small / "movies.csv"),
         "--ratings", str(ml_small / "ratings.csv")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert loader.returncode == 0, loader.stdout + loader.stderr

    services: dict[str, Service] = {}
    try:
        services["modeler"] = _spawn("modeler", ["-m", "modeler"], env, logdir)
        predictor_port = free_port()
        predictor_url = f"http://127.0.0.1:{predictor_port}"
        services["predictor"] = _spawn(
            "predictor", ["-m", "predictor"],
            {**env, "PREDICTOR_HOST": "127.0.0.1", "PREDICTOR_PORT": str(predictor_port)}, logdir)
        frontend_port = free_port()
        frontend_url = f"http://127.0.0.1:{frontend_port}"
        services["frontend"] = _spawn(
            "frontend", ["-m", "frontend"],
            {**env, "FRONTEND_HOST": "127.0.0.1", "FRONTEND_PORT": str(frontend_port),
             "PREDICTOR_URL": predictor_url}, logdir)
        wait_http(f"{predictor_url}/healthz", services["predictor"])
        wait_http(f"{frontend_url}/healthz", services["frontend"])
        yield Stack(frontend_url, predictor_url, redis_url, bootstrap, topic, prefix, services)
    finally:
        for s in reversed(list(services.values())):
            s.stop()
        BUILD.mkdir(parents=True, exist_ok=True)
        for s in services.values():
            with contextlib.suppress(OSError):
                shutil.copy(s.log_path, BUILD / s.log_path.name)


@pytest.fixture
def browser_page(tmp_path: Path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=chromium_path(), headless=True,
            args=CHROMIUM_ARGS, viewport={"width": 1280, "height": 1000},
        )
        try:
            page = context.new_page()
            # Uncaught exceptions of the page's JS fail the test (see the test's last lines).
            page.js_errors = []  # type: ignore[attr-defined]
            page.on("pageerror", lambda exc: page.js_errors.append(str(exc)))
            yield page
        finally:
            context.close()
