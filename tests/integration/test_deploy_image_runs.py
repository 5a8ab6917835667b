"""Each image's file set runs: for every Dockerfile, a virtualenv is built from exactly the
files the Dockerfile copies and the requirements it installs, by the Dockerfile's own ``RUN``
steps, and the image's command is started from an empty working directory (so only what was
installed can be imported; no ``--system-site-packages``, no repository on the path).

* the modeler runs through its entrypoint up to where it reports that Kafka is unreachable
  (a closed port as bootstrap address, a real Redis for its lease);
* the predictor and the frontend answer ``/healthz``.

This is what caught ``python -m modeler`` importing ``devstack`` (absent from the image).

The venv after the requirements step is kept under ``build/image-venvs/`` keyed by what
went into that step, as Docker keeps the layer (pip may use its local cache and the
machine's wheel index); the code step runs every time.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from devstack.services import free_port, stop_process_group

_spec = importlib.util.spec_from_file_location("deploy_support", Path(__file__).with_name("deploy_support.py"))
assert _spec and _spec.loader
ds = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ds)

CACHE = ds.ROOT / "build" / "image-venvs"
IMAGE_VENV = "/opt/venv"  # where the Dockerfiles build their venv
BUILD_TIMEOUT_S = 900


def _base_python() -> str:
    """The interpreter the venvs are made with: the real one behind any venv we run in."""
    return getattr(sys, "_base_executable", None) or sys.executable


class Layers:
    """Replays one Dockerfile's build stage (COPY / RUN / WORKDIR) into a directory."""

    def __init__(self, service: str, root: Path) -> None:
        self.service = service
        self.root = root
        self.src = root / "src"
        self.venv = root / "venv"

    def _shell(self, command: str, cwd: Path) -> None:
        # The image's /opt/venv is our venv; `python` is the base image's interpreter.
        command = command.replace(IMAGE_VENV, str(self.venv))
        command = re.sub(r"(^|&&\s*)python ", rf"\g<1>{shlex.quote(_base_python())} ", command)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHON"))}
        env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
        done = subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True,
                              text=True, timeout=BUILD_TIMEOUT_S, check=False)
        assert done.returncode == 0, f"{self.service}: RUN {command}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"

    def build(self) -> Path:
        """Run the build stage; the venv path. Reuses the dependency layer when unchanged."""
        instructions = ds.dockerfile_instructions(self.service)
        froms = [i for i, (word, _) in enumerate(instructions) if word == "FROM"]
        stage = instructions[froms[0] + 1 : froms[1]]
        # The dependency layer: everything up to the first COPY of our code, keyed by those
        # instructions and the files they copy (pyproject.toml), as Docker's cache is.
        first_code = next(i for i, (w, a) in enumerate(stage) if w == "COPY" and not a.startswith("pyproject"))
        key = hashlib.sha256(json.dumps([stage[:first_code], _base_python(),
                                         (ds.ROOT / "pyproject.toml").read_text()]).encode()).hexdigest()[:16]
        cached = CACHE / f"{self.service}-{key}"
        layer_done = cached / "venv" / ".layer-complete"
        if cached.exists() and not layer_done.exists():
            shutil.rmtree(cached)  # an interrupted build
        self.root = cached
        self.src = cached / "src"
        self.venv = cached / "venv"
        if self.src.exists():
            shutil.rmtree(self.src)
        self.src.mkdir(parents=True)
        for k, (word, args) in enumerate(stage):
            if word == "COPY":
                assert "--from" not in args
                *sources, _dest = args.split()
                for source in sources:
                    path = ds.ROOT / source
                    target = self.src / source
                    if path.is_dir():
                        shutil.copytree(path, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
                    else:
                        target.parent.mkdir(parents=True, exist_ok=True)
                        shutil.copy2(path, target)
            elif word == "RUN":
                if k < first_code and layer_done.exists():
                    continue
                self._shell(args, self.src)
                if k < first_code and not any(w == "RUN" for w, _ in stage[k + 1 : first_code]):
                    layer_done.touch()
            elif word in ("WORKDIR", "ENV", "ARG"):
                continue  # WORKDIR /src is self.src; ENV only turns pip's cache off
            else:
                raise AssertionError(f"{self.service}: build-stage {word} not replayed by this test")
        return self.venv

    def final(self) -> tuple[dict[str, str], list[str], list[str]]:
        """(environment, entrypoint, command) of the final stage, paths mapped to the venv."""
        env: dict[str, str] = {}
        entrypoint: list[str] = []
        command: list[str] = []
        for word, args in ds.final_stage(self.service):
            if word == "ENV":
                for name, value in re.findall(r"(\w+)=(\S+)", args):
                    value = value.replace(IMAGE_VENV, str(self.venv))
                    env[name] = re.sub(r"\$\{(\w+)\}",
                                       lambda m: env.get(m.group(1), os.environ.get(m.group(1), "")), value)
            elif word == "ENTRYPOINT":
                entrypoint = json.loads(args)
            elif word == "CMD":
                command = json.loads(args)
        return env, entrypoint, command


def _entrypoint_path(path: str) -> str:
    """The file the image copied to ``path`` (COPY <repo file> <path>)."""
    return next(str(ds.ROOT / a.split()[0]) for w, a in ds.final_stage("modeler")
                if w == "COPY" and a.split()[-1] == path)


@contextlib.contextmanager
def _started(service: str, tmp_path: Path, extra_env: dict[str, str]) -> Iterator[tuple[subprocess.Popen, Path]]:
    layers = Layers(service, tmp_path)
    venv = layers.build()
    env, entrypoint, command = layers.final()
    if service == "modeler":
        java = shutil.which("java")
        assert java, "the modeler needs Java"
        env["JAVA_HOME"] = str(Path(os.path.realpath(java)).parent.parent)  # not the image's /opt/java
    env["PATH"] = f"{venv / 'bin'}:{env.get('JAVA_HOME', '/nonexistent')}/bin:/usr/bin:/bin"
    env["HOME"] = str(tmp_path)
    env.update(extra_env)
    entry = [_entrypoint_path(entrypoint[0])] if entrypoint else []
    workdir = tmp_path / "app"  # the image's empty WORKDIR: nothing importable from the repo
    workdir.mkdir()
    log_path = tmp_path / f"{service}.log"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(["sh", *entry, *command] if entry else command, cwd=workdir, env=env,
                                stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            yield proc, log_path
        finally:
            stop_process_group(proc)


def _wait(predicate, proc: subprocess.Popen, log_path: Path, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            break
        time.sleep(0.3)
    pytest.fail(f"{what} (exit code {proc.poll()}); log:\n{log_path.read_text(errors='replace')[-4000:]}")


@pytest.mark.timeout(BUILD_TIMEOUT_S + 120)
def test_modeler_image_runs_up_to_waiting_for_kafka(tmp_path: Path, redis_url: str, redis_prefix: str) -> None:
    dead_port = free_port()  # nothing listens there
    env = {"REDIS_URL": redis_url, "REDIS_PREFIX": redis_prefix,
           "KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{dead_port}", "MODELER_METRICS_PORT": str(free_port()),
           # One model partition: the service does not start Spark to count the executors'
           # cores before it reaches Kafka.
           "MODEL_NUM_PARTITIONS": "1", "SPARK_MASTER": "local[1]", "LOG_FORMAT": "json",
           "MODELER_RETRY_MAX_BACKOFF_S": "1"}
    with _started("modeler", tmp_path, env) as (proc, log_path):

        def waiting_for_kafka() -> bool:
            for line in log_path.read_text(errors="replace").splitlines():
                with contextlib.suppress(ValueError):
                    record = json.loads(line)
                    message = str(record.get("message", "")).lower()
                    if record.get("level") == "WARNING" and "retrying" in message and (
                            "kafka" in message or "topic" in message or str(dead_port) in message):
                        return True
            return False

        _wait(waiting_for_kafka, proc, log_path, 120, "the modeler never reported waiting for Kafka")
        assert proc.poll() is None  # still alive, retrying
        assert "Traceback" not in log_path.read_text(errors="replace")


@pytest.mark.timeout(BUILD_TIMEOUT_S + 120)
@pytest.mark.parametrize("service", ["predictor", "frontend"])
def test_web_image_runs_up_to_healthz(service: str, tmp_path: Path, redis_url: str, redis_prefix: str) -> None:
    port = free_port()
    env = {"REDIS_URL": redis_url, "REDIS_PREFIX": redis_prefix, "LOG_LEVEL": "INFO",
           f"{service.upper()}_HOST": "127.0.0.1", f"{service.upper()}_PORT": str(port),
           "KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}",
           "PREDICTOR_URL": f"http://127.0.0.1:{free_port()}"}
    with _started(service, tmp_path, env) as (proc, log_path):

        def healthy() -> bool:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1)
            except httpx.HTTPError:
                return False
            return r.status_code == 200 and r.json() == {"status": "ok"}

        _wait(healthy, proc, log_path, 60, f"{service} never answered /healthz")
