"""docker-compose.yml: valid against the Compose specification, internally consistent, and
wired to the services the way their settings expect. Offline: no Docker engine needed."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

_spec = importlib.util.spec_from_file_location("deploy_support", Path(__file__).with_name("deploy_support.py"))
assert _spec and _spec.loader
ds = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ds)

CHECK_JSONSCHEMA = Path(sys.executable).with_name("check-jsonschema")


def _validate_compose(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(CHECK_JSONSCHEMA), "--builtin-schema", "vendor.compose-spec", str(path)],
        capture_output=True, text=True, timeout=120, check=False,
    )


def test_compose_file_validates_against_the_compose_spec() -> None:
    run = _validate_compose(ds.COMPOSE_FILE)
    assert run.returncode == 0, run.stdout + run.stderr


def test_compose_validator_rejects_a_broken_file(tmp_path: Path) -> None:
    """The schema check has teeth: an unknown service key and a wrong type are caught."""
    broken = ds.compose()
    broken = yaml.safe_load(yaml.safe_dump(broken))
    broken["services"]["predictor"]["replicaz"] = 2
    broken["services"]["redis"]["ports"] = "6379:6379"
    path = tmp_path / "docker-compose.yml"
    path.write_text(yaml.safe_dump(broken))
    run = _validate_compose(path)
    assert run.returncode != 0
    assert "replicaz" in run.stdout + run.stderr


def test_depends_on_networks_and_volumes_exist() -> None:
    spec = ds.compose()
    services = spec["services"]
    networks = set(spec.get("networks") or {})
    volumes = set(spec.get("volumes") or {})
    for name, svc in services.items():
        deps = svc.get("depends_on") or {}
        for target, cond in (deps.items() if isinstance(deps, dict) else ((d, {}) for d in deps)):
            assert target in services, f"{name} depends on unknown service {target}"
            condition = cond.get("condition", "service_started")
            if condition == "service_healthy":
                assert "healthcheck" in services[target], f"{name} waits for {target}'s health check, which has none"
            if condition == "service_completed_successfully":
                assert services[target].get("restart", "no") == "no", f"{target} is one-shot but restarts"
        svc_networks = svc.get("networks") or []
        assert svc_networks, f"{name} is on no declared network"
        for net in svc_networks:
            assert net in networks, f"{name} uses undeclared network {net}"
        for mount in svc.get("volumes") or []:
            source = mount.split(":", 1)[0] if isinstance(mount, str) else mount.get("source", "")
            if source and not source.startswith((".", "/", "$", "~")):
                assert source in volumes, f"{name} mounts undeclared volume {source}"


def test_the_stack_has_every_part_the_issue_lists() -> None:
    services = ds.compose()["services"]

    kafka = services["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    kenv = ds.compose_env(kafka)
    assert set(kenv["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}  # KRaft, one node
    topics = set(re.findall(r"--topic\s+(\S+)", " ".join(services["kafka-init"]["command"])))
    assert topics == {"ratings", "ratings.dlq"}

    redis = services["redis"]
    assert "--appendonly" in redis["command"] and redis["command"][redis["command"].index("--appendonly") + 1] == "yes"
    assert any(str(v).endswith(":/data") for v in redis["volumes"])

    classes = {
        n: next((a for a in s.get("command") or [] if str(a).startswith("org.apache.spark.deploy.")), None)
        for n, s in services.items()
    }
    assert classes["spark-master"] == "org.apache.spark.deploy.master.Master"
    assert classes["spark-worker"] == "org.apache.spark.deploy.worker.Worker"
    master_cmd = services["spark-master"]["command"]
    master_url = f"spark://spark-master:{master_cmd[master_cmd.index('--port') + 1]}"
    assert master_url in services["spark-worker"]["command"]
    # The modeler is the driver in client mode against that master, reachable by name.
    menv = ds.compose_env(services["modeler"])
    assert menv["SPARK_MASTER"] == master_url
    assert menv["SPARK_DRIVER_HOST"] == "modeler"

    assert services["predictor"]["deploy"]["replicas"] == 2

    loader = " ".join(services["loader"]["command"])
    assert "predictor.load_catalog" in loader and "modeler.replay" in loader
    assert services["loader"].get("restart") == "no"
    # source:target[:mode]; the source may hold ${VAR:-default}, so match from the right.
    mounted = {re.search(r":(/[^:]*)(?::r[ow])?$", str(v)).group(1) for v in services["loader"]["volumes"]}
    for path in re.findall(r"--(?:movies|ratings)\s+(\S+)", loader):
        assert any(path.startswith(m + "/") for m in mounted), f"loader reads {path} outside its mounts"


def test_services_point_at_each_other_by_service_name() -> None:
    services = ds.compose()["services"]
    for name in ("modeler", "predictor", "frontend", "loader"):
        env = ds.compose_env(services[name])
        host, _, port = env["KAFKA_BOOTSTRAP_SERVERS"].partition(":")
        assert host in services and f"PLAINTEXT://{host}:{port}" in ds.compose_env(services["kafka"])[
            "KAFKA_ADVERTISED_LISTENERS"], f"{name}: {env['KAFKA_BOOTSTRAP_SERVERS']}"
        assert urlsplit(env["REDIS_URL"]).hostname == "redis"
    fenv = ds.compose_env(services["frontend"])
    penv = ds.compose_env(services["predictor"])
    url = urlsplit(fenv["PREDICTOR_URL"])
    assert url.hostname == "predictor" and url.port == int(penv["PREDICTOR_PORT"])
    published = {p.split(":")[-1] for p in services["predictor"]["ports"]}
    assert penv["PREDICTOR_PORT"] in published


def test_readme_documents_every_published_port() -> None:
    readme = (ds.DEPLOY / "README.md").read_text(encoding="utf-8")
    for name, svc in ds.compose()["services"].items():
        for mapping in svc.get("ports") or []:
            host = str(mapping).rsplit(":", 1)[0]
            assert host in readme, f"port {host} of {name} is not in deploy/README.md"


@pytest.mark.parametrize("service", ["kafka", "redis"])
def test_third_party_images_are_pinned(service: str) -> None:
    image = ds.compose()["services"][service]["image"]
    tag = image.rpartition(":")[2]
    assert ":" in image and tag not in ("", "latest"), image
