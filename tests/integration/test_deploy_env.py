"""One source of truth for configuration: every environment variable that docker-compose.yml
or a rendered manifest gives one of our containers is a field alias of that service's
Settings class (or a name our code / Spark demonstrably reads), the values parse with that
class, and what must point away from localhost in a container does.

The Settings classes are imported, not skipped: if a service's config.py is missing, this fails.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any

import pytest

_spec = importlib.util.spec_from_file_location("deploy_support", Path(__file__).with_name("deploy_support.py"))
assert _spec and _spec.loader
ds = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ds)

# Defaults point at localhost: inside a container these must be set.
MUST_SET = {
    "modeler": {"KAFKA_BOOTSTRAP_SERVERS", "REDIS_URL", "SPARK_MASTER"},
    "predictor": {"REDIS_URL"},
    "frontend": {"KAFKA_BOOTSTRAP_SERVERS", "PREDICTOR_URL"},
    "loader": {"KAFKA_BOOTSTRAP_SERVERS", "REDIS_URL"},
}
# The compose loader runs predictor.load_catalog (PredictorSettings) and modeler.replay
# (CommonSettings); Spark's master and worker read only Spark's own variables.
COMPOSE_ROLES = {"modeler": ["modeler"], "predictor": ["predictor"], "frontend": ["frontend"],
                 "loader": ["predictor", "common"], "spark-master": [], "spark-worker": []}
THIRD_PARTY = {"kafka", "kafka-init", "redis"}


def _allowed(roles: list[str]) -> set[str]:
    allowed = set(ds.RUNTIME_ENV)
    for role in roles:
        allowed |= ds.allowed_env(role)
    return allowed


def env_problems(where: str, roles: list[str], env: dict[str, str | None], must: set[str]) -> list[str]:
    # A deployment carries the current names: an old one is still read, but only for a release.
    renamed = {old: new for role in roles for old, new in ds.deprecated_aliases(role).items()}
    unknown = sorted(set(env) - _allowed(roles))
    problems = [f"{where}: {name} is deprecated: use {renamed[name]}" for name in unknown if name in renamed]
    problems += [f"{where}: {name} is read by nothing" for name in unknown if name not in renamed]
    for role in roles:
        problems += [f"{where}: required {n} missing" for n in sorted(ds.required_aliases(role) - set(env))]
    problems += [f"{where}: {n} must be set in a container" for n in sorted(must - set(env))]
    values = " ".join(v for v in env.values() if v)
    for name in ds.EXPANSION_ONLY_ENV & set(env):
        if f"$({name})" not in values:
            problems.append(f"{where}: {name} is set but never expanded")
    # The values parse with the Settings class (interpolated or referenced values are unknown here).
    literal = {k: v for k, v in env.items() if v is not None and "${" not in v}
    for role in roles:
        cls = ds.settings_class(role)
        mine = {k: v for k, v in literal.items() if k in ds.aliases(role)}
        try:
            cls(**mine)
        except Exception as exc:  # pydantic.ValidationError names the field
            problems.append(f"{where}: {exc}")
    return problems


def test_compose_env_names_are_settings_aliases() -> None:
    services = ds.compose()["services"]
    assert set(services) == set(COMPOSE_ROLES) | THIRD_PARTY, "a compose service without an env role"
    problems = []
    for name, roles in COMPOSE_ROLES.items():
        env: dict[str, str | None] = dict(ds.compose_env(services[name]))
        problems += env_problems(f"compose:{name}", roles, env, MUST_SET.get(name, set()))
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("overlay", ds.OVERLAYS)
def test_manifest_env_names_are_settings_aliases(overlay: str) -> None:
    docs = ds.render(overlay)
    problems = []
    seen = set()
    for dep in ds.by_kind(docs, "Deployment").values():
        for container in dep["spec"]["template"]["spec"]["containers"]:
            service = container["name"]
            assert service in ds.SERVICES, f"{overlay}: container {service} of unknown service"
            seen.add(service)
            env = ds.container_env(docs, container)
            problems += env_problems(f"{overlay}:{service}", [service], env, MUST_SET[service])
    assert seen == set(ds.SERVICES)
    assert not problems, "\n".join(problems)


def test_shared_settings_agree_between_compose_and_manifests() -> None:
    """Topic names and the rating scale are one contract: the same everywhere."""
    services = ds.compose()["services"]
    shared = ("RATINGS_TOPIC", "DLQ_TOPIC", "RATING_MIN", "RATING_MAX", "REDIS_PREFIX")
    compose_values = {ds.compose_env(services[s]).get(k) for s in ("modeler", "predictor", "frontend")
                      for k in shared}
    for overlay in ds.OVERLAYS:
        common = ds.by_kind(ds.render(overlay), "ConfigMap")["streamrec-common"]["data"]
        assert {common[k] for k in shared} <= compose_values | {None}
    for k in shared:
        values = {ds.compose_env(services[s]).get(k) for s in ("modeler", "predictor", "frontend")}
        assert len(values) == 1, f"{k} differs between compose services: {values}"


def test_the_checker_catches_misspelt_and_bad_values() -> None:
    env: dict[str, Any] = {"KAFKA_BOOTSTRAP_SERVERS": "k:9092", "REDIS_URI": "redis://r:6379/0",
                           "SPARK_MASTER": "spark://m:7077", "MODEL_RANK": "ten", "POD_NAME": None,
                           "BATCH_MAX_RECORDS": "100"}
    problems = "\n".join(env_problems("t", ["modeler"], env, MUST_SET["modeler"]))
    assert "REDIS_URI is read by nothing" in problems
    assert "BATCH_MAX_RECORDS is deprecated: use MODELER_BATCH_MAX_RECORDS" in problems
    assert "REDIS_URL must be set" in problems
    assert re.search(r"MODEL_RANK", problems)
    assert "POD_NAME is set but never expanded" in problems
