"""The predictor's contracts, checked on real responses of the real app (real Redis):

* jiminy: every response of jiminy's routes (``GET /`` and the four ``/predictions`` routes),
  success and error (404, 422, 503), validates against a transcription of radanalytics
  jiminy-predictor's published API (Swagger 2.0 definitions ServerInfo, ErrorResponse,
  PredictionResponse; the ranks variant with ``topk``), kept here as JSON Schema;
* our OpenAPI document: its response schemas reject an undeclared field and a missing one
  (what makes the schema-driven fuzz test of ``test_predictor_fuzz`` able to fail), and real
  responses of every ``/v1`` error are the one error body.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import jsonschema
import pytest
from fastapi.testclient import TestClient

from predictor.app import create_app
from predictor.config import PredictorSettings
from tests.support import versions as ranking

# ---------------------------------------------------------------------- jiminy, transcribed

_ID = {"type": ["string", "integer"]}  # jiminy's Swagger says string; its clients send ints
JIMINY_ERROR = {
    "type": "object",
    "required": ["errors"],
    "properties": {"errors": {"type": "array", "minItems": 1, "items": {
        "type": "object", "required": ["status", "title", "details"],
        "properties": {"status": {"type": "integer"}, "title": {"type": "string"},
                       "details": {"type": "string"}}}}},
}
SERVER_INFO = {
    "type": "object", "required": ["application"],
    "properties": {"application": {"type": "object", "required": ["name", "version"],
                                   "properties": {"name": {"type": "string"}, "version": {"type": "string"}}}},
}
_PRODUCTS = {"type": "array", "minItems": 0, "items": {
    "type": "object", "required": ["id", "rating"], "properties": {"id": _ID, "rating": {"type": "number"}}}}
RATINGS_RESPONSE = {
    "type": "object", "required": ["prediction"],
    "properties": {"prediction": {"type": "object", "required": ["user", "id", "products"],
                                  "properties": {"user": _ID, "id": {"type": "string"}, "products": _PRODUCTS}}},
}
RANKS_RESPONSE = {
    "type": "object", "required": ["prediction"],
    "properties": {"prediction": {"type": "object", "required": ["user", "id", "topk", "products"],
                                  "properties": {"user": _ID, "id": {"type": "string"},
                                                 "topk": {"type": "integer"}, "products": _PRODUCTS}}},
}
# route -> schema of its success answer (anything else: JIMINY_ERROR)
JIMINY_ROUTES = {
    ("GET", "/"): SERVER_INFO,
    ("POST", "/predictions/ratings"): RATINGS_RESPONSE,
    ("GET", "/predictions/ratings/{id}"): RATINGS_RESPONSE,
    ("POST", "/predictions/ranks"): RANKS_RESPONSE,
    ("GET", "/predictions/ranks/{id}"): RANKS_RESPONSE,
}


def jiminy_valid(route: tuple[str, str], response) -> None:
    schema = JIMINY_ROUTES[route] if response.status_code < 400 else JIMINY_ERROR
    jsonschema.validate(response.json(), schema)
    if response.status_code >= 400:
        assert response.json()["errors"][0]["status"] == response.status_code
        assert response.json()["errors"][0]["details"]


def _serve(redis_url: str, prefix: str) -> TestClient:
    return TestClient(create_app(PredictorSettings(REDIS_URL=redis_url, REDIS_PREFIX=prefix,
                                                   PREDICTOR_MODEL_POLL_INTERVAL_S=0.2)))


@pytest.fixture
def api(redis_url, redis_client, keys) -> Iterator[TestClient]:
    ranking.publish(redis_client, keys, ranking.plant(seed=3), 1)
    with _serve(redis_url, keys.prefix) as client:
        ranking.wait_version(client, 1)
        yield client


def test_every_jiminy_response_follows_jiminys_contract(api: TestClient) -> None:
    seen: set[tuple[str, int]] = set()

    def call(method: str, route: str, path: str, **kw):
        r = api.request(method, path, **kw)
        jiminy_valid((method, route), r)
        seen.add((route, r.status_code))
        return r

    info = call("GET", "/", "/").json()
    assert info["application"]["name"] == "streamrec-predictor"
    import importlib.metadata

    assert info["application"]["version"] == importlib.metadata.version("streamrec")
    ok = call("POST", "/predictions/ratings", "/predictions/ratings", json={"user": 7, "products": ["m1", "m2"]})
    assert ok.status_code == 201
    pid = ok.json()["prediction"]["id"]
    call("GET", "/predictions/ratings/{id}", f"/predictions/ratings/{pid}")
    assert call("POST", "/predictions/ratings", "/predictions/ratings",
                json={"user": "u1", "products": ["no-such-item"]}).status_code == 404
    for bad in ({"user": "u1"}, {"user": "u1", "products": []}, {"user": True, "products": ["m1"]}):
        assert call("POST", "/predictions/ratings", "/predictions/ratings", json=bad).status_code == 422
    assert call("POST", "/predictions/ratings", "/predictions/ratings", content=b"{nope",
                headers={"content-type": "application/json"}).status_code == 422
    assert call("GET", "/predictions/ratings/{id}", "/predictions/ratings/missing").status_code == 404
    assert call("GET", "/predictions/ratings/{id}", "/predictions/ratings/" + "x" * 300).status_code == 422
    ranks = call("POST", "/predictions/ranks", "/predictions/ranks", json={"user": "u4", "topk": 4})
    assert ranks.status_code == 201 and len(ranks.json()["prediction"]["products"]) == 4
    call("GET", "/predictions/ranks/{id}", f"/predictions/ranks/{ranks.json()['prediction']['id']}")
    assert call("POST", "/predictions/ranks", "/predictions/ranks", json={"user": "u4", "topk": 0}).status_code == 422
    assert call("POST", "/predictions/ranks", "/predictions/ranks", json={"user": 2**70, "topk": 3}).status_code == 422
    assert call("GET", "/predictions/ranks/{id}", "/predictions/ranks/missing").status_code == 404
    assert {s for _, s in seen} >= {200, 201, 404, 422}


def test_jiminy_503_before_any_model(redis_url, keys) -> None:
    with _serve(redis_url, keys.prefix) as client:
        time.sleep(0.3)
        for method, route, path, body in [
            ("POST", "/predictions/ratings", "/predictions/ratings", {"user": 1, "products": [1]}),
            ("POST", "/predictions/ranks", "/predictions/ranks", {"user": 1, "topk": 2}),
        ]:
            r = client.request(method, path, json=body)
            assert r.status_code == 503
            jiminy_valid((method, route), r)
        r = client.get("/v1/predict?user=1&item=1")  # and /v1 keeps its own shape
        assert r.status_code == 503 and r.json()["error"] == "no_model" and "errors" not in r.json()


# ---------------------------------------------------------------------- our own OpenAPI


def _validator(openapi: dict, name: str) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator({"$ref": f"#/components/schemas/{name}",
                                            "components": openapi["components"]})


def test_declared_response_schemas_reject_extra_and_missing_fields(api: TestClient) -> None:
    openapi = api.get("/openapi.json").json()
    body = api.get("/v1/users/u1/recommendations?n=3").json()
    v = _validator(openapi, "UserItems")
    assert not list(v.iter_errors(body))  # the real answer conforms
    assert list(v.iter_errors({**body, "extra": 1}))  # an undeclared field fails
    item = dict(body["items"][0])
    assert list(v.iter_errors({**body, "items": [{**item, "surprise": True}]}))
    del item["score"]
    assert list(v.iter_errors({**body, "items": [item]}))  # a missing field fails
    assert list(v.iter_errors({k: x for k, x in body.items() if k != "version"}))
    responses = openapi["paths"]["/v1/users/{user}/recommendations"]["get"]["responses"]
    assert responses["422"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorBody")
    assert openapi["paths"]["/predictions/ranks"]["post"]["responses"]["422"]["content"][
        "application/json"]["schema"]["$ref"].endswith("/JiminyErrors")
    score = openapi["components"]["schemas"]["ScoredItem"]["properties"]["score"]
    assert "ranking score" in score["description"].lower()


@pytest.mark.parametrize(("method", "path", "status", "code", "field"), [
    ("GET", "/v1/users/u1/recommendations?n=0", 422, "invalid_request", "n"),
    ("GET", "/v1/users/u1/recommendations?n=1000000", 422, "invalid_request", "n"),
    ("GET", "/v1/users/" + "x" * 300 + "/recommendations", 422, "invalid_request", "user"),
    ("GET", "/v1/predict?user=u1&item=nope", 404, "unknown_item", "item"),
    ("GET", "/v1/items/nope/similar", 404, "unknown_item", "item"),
    ("GET", "/v1/items/nope", 404, "unknown_item", "item"),
    ("POST", "/v1/fold-in", 422, "invalid_request", "body"),
    ("GET", "/nowhere", 404, "not_found", None),
    ("DELETE", "/v1/popular", 405, "method_not_allowed", None),
])
def test_v1_errors_are_the_one_error_body(api: TestClient, method: str, path: str, status: int,
                                          code: str, field: str | None) -> None:
    kw = {"content": b"\xff\xfe not json", "headers": {"content-type": "application/json"}} if method == "POST" else {}
    r = api.request(method, path, **kw)
    assert r.status_code == status
    body = r.json()
    assert body["error"] == code and isinstance(body["detail"], str) and body["detail"]
    assert body.get("field") == field and set(body) <= {"error", "detail", "field"}
    assert not list(_validator(api.get("/openapi.json").json(), "ErrorBody").iter_errors(body))
