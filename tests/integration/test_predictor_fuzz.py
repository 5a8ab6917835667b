"""Schema-driven fuzzing: schemathesis generates requests (valid and invalid) from the app's
own OpenAPI document and sends them to a real ``python -m predictor``; every response must
be no 5xx and conform to what the document declares for it: a declared status code and
content type, and a body valid against the declared response schema (which forbids
undeclared fields and requires every field the models always carry). Run against a version
with the explicit set only (an older modeler), with both sets, and with the ranking set only
(an implicit-only stream)."""

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
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from common.keys import EXPLICIT, RANKING
from devstack.services import free_port, stop_process_group
from tests.support import versions as ranking
from tests.support.planted import plant, publish, wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLES = int(os.environ.get("PREDICTOR_FUZZ_EXAMPLES", "12"))
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(params=["explicit", "both", "implicit"])
def served(request, redis_url, redis_client, keys):
    if request.param == "explicit":
        publish(redis_client, keys, plant(seed=21), 1)
    else:
        models = (EXPLICIT, RANKING) if request.param == "both" else (RANKING,)
        ranking.publish(redis_client, keys, ranking.plant(seed=21), 1, models=models)
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


@pytest.mark.timeout(300)
def test_schema_driven_requests_get_declared_answers_and_no_server_errors(served: str) -> None:
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
                try:
                    case.validate_response(response, checks=CHECKS)
                except (Exception, BaseExceptionGroup) as exc:  # schemathesis' failure group
                    failures.append(f"{response.status_code} {case.as_curl_command()}\n"
                                    f"{str(exc)[:600]}\n{response.text[:300]}")

            try:
                run()
            except Unsatisfiable:
                # No invalid input exists for an operation without parameters (e.g. /healthz).
                assert mode is GenerationMode.NEGATIVE
    # Generated ids rarely name a known user or item: the model's own answers (not only the
    # popular fallback and the errors) are checked on these, the same way.
    known = [
        ("/v1/users/{user}/recommendations", "GET", {"path_parameters": {"user": "u1"}, "query": {"n": 7}}),
        ("/v1/users/{user}/recommendations", "GET",
         {"path_parameters": {"user": "u2"}, "query": {"rank_by": "rating"}}),
        ("/v1/users/{user}/recommendations", "POST",
         {"path_parameters": {"user": "u3"}, "body": {"n": 3, "candidates": ["m1", "m2", "m9"]}}),
        ("/v1/users/{user}/ratings", "GET", {"path_parameters": {"user": "u1"}}),
        ("/v1/items/{item}/similar", "GET", {"path_parameters": {"item": "m1"}}),
        ("/v1/items/{item}", "GET", {"path_parameters": {"item": "m1"}}),
        ("/v1/fold-in", "POST", {"body": {"ratings": [{"item": "m1", "rating": 5}, {"item": "m7", "rating": 4}]}}),
        ("/v1/predict", "GET", {"query": {"user": "u1", "item": "m3"}}),
        ("/v1/predict", "POST", {"body": {"pairs": [{"user": "u1", "item": "m3"}, {"user": "x", "item": "m4"}]}}),
        ("/predictions/ranks", "POST", {"body": {"user": "u4", "topk": 4}}),
        ("/predictions/ratings", "POST", {"body": {"user": "u4", "products": ["m1"]}}),
        ("/v1/model", "GET", {}), ("/v1/popular", "GET", {}), ("/readyz", "GET", {}),
    ]
    for path, method, parts in known:
        case = schema[path][method].Case(**parts)
        response = case.call(base_url=served, timeout=10)
        calls += 1
        try:
            case.validate_response(response, checks=CHECKS)
        except (Exception, BaseExceptionGroup) as exc:
            failures.append(f"{response.status_code} {method} {path}\n{str(exc)[:600]}\n{response.text[:300]}")
    assert calls > 100
    assert not failures, f"{len(failures)} failures:\n" + "\n".join(failures[:8])
