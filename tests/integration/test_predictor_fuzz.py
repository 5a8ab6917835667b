"""Schema-driven fuzzing: schemathesis generates requests (valid and invalid) from the app's
own OpenAPI document and sends them to a real ``python -m predictor`` serving a planted
model; no answer may be a 5xx."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from devstack.services import free_port, stop_process_group
from tests.integration.test_predictor_api import plant, publish, wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLES = int(os.environ.get("PREDICTOR_FUZZ_EXAMPLES", "15"))


@pytest.fixture
def served(redis_url, redis_client, keys):
    publish(redis_client, keys, plant(seed=21), 1)
    redis_client.hset(keys.catalog, mapping={"m1": '{"title": "One (1999)", "genres": ["Drama"]}'})
    port = free_port()
    env = {**os.environ, "REDIS_URL": redis_url, "REDIS_PREFIX": keys.prefix,
           "PREDICTOR_HOST": "127.0.0.1", "PREDICTOR_PORT": str(port), "PREDICTOR_WORKERS": "1",
           "LOG_LEVEL": "WARNING"}
    proc = subprocess.Popen([sys.executable, "-m", "predictor"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        try:
            return httpx.get(f"{url}/readyz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(ready, timeout=40, step=0.2)
        yield url
    finally:
        stop_process_group(proc)


@pytest.mark.timeout(180)
def test_no_server_errors_from_schema_driven_requests(served: str) -> None:
    schema = schemathesis.openapi.from_url(f"{served}/openapi.json")
    failures: list[str] = []
    calls = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(max_examples=EXAMPLES, deadline=None, database=None,
                      phases=[Phase.generate], suppress_health_check=list(HealthCheck))
            def run(case) -> None:
                nonlocal calls
                response = case.call(base_url=served, timeout=10)
                calls += 1
                if response.status_code >= 500:
                    failures.append(f"{response.status_code} {case.as_curl_command()}\n{response.text[:300]}")

            try:
                run()
            except Unsatisfiable:
                # No invalid input exists for an operation without parameters (e.g. /healthz).
                assert mode is GenerationMode.NEGATIVE
    assert calls > 100
    assert not failures, "\n".join(failures[:10])
