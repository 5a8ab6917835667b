"""The frontend's own API against the real broker and a small real HTTP server standing in
for the predictor (the predictor is an HTTP dependency; its own tests cover it)."""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from devstack.services import create_topics, free_port, start_broker
from frontend.app import create_app
from frontend.config import FrontendSettings
from tests.support.served import Served
from tests.support.stub_predictor import stub_predictor
from tests.support.topics import consume_all

STATIC = Path(__file__).resolve().parents[2] / "frontend" / "static"


@pytest.fixture(scope="module")
def predictor() -> Iterator[tuple[str, list]]:
    app, seen = stub_predictor()
    served = Served(app, free_port())
    yield served.url, seen
    served.stop()


def _settings(**env: object) -> FrontendSettings:
    return FrontendSettings.model_validate(env)


@pytest.fixture
def client(predictor: tuple[str, list], bootstrap: str, topic: str) -> Iterator[TestClient]:
    settings = _settings(KAFKA_BOOTSTRAP_SERVERS=bootstrap, RATINGS_TOPIC=topic,
                         PREDICTOR_URL=predictor[0], FRONTEND_PRODUCE_TIMEOUT_S=3)
    with TestClient(create_app(settings)) as c:
        yield c


# ---- the write path --------------------------------------------------------------------------


def test_one_rating_is_produced_keyed_by_user_in_the_schema_format(client, bootstrap, topic):
    resp = client.post("/api/ratings", json={"user": "42", "item": "1193", "rating": 4.5,
                                             "timestamp": 978300760})
    assert resp.status_code == 202, resp.text
    assert resp.json()["accepted"] == 1
    msgs = consume_all(bootstrap, topic)
    assert len(msgs) == 1
    assert msgs[0].key == b"42"
    assert json.loads(msgs[0].value) == {"user": "42", "item": "1193", "rating": 4.5,
                                         "timestamp": 978300760}
    assert msgs[0].partition == resp.json()["partition"]


def test_page_posts_without_user_and_the_cookie_visitor_is_the_user(client, bootstrap, topic):
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    visitor = client.cookies.get("visitor_id")
    assert visitor and uuid.UUID(visitor)
    # The id is stable: the next visit keeps it.
    assert client.get("/api/config").json()["visitor"] == visitor
    resp = client.post("/api/ratings", json=[{"item": "1", "rating": 3.5}, {"item": "2", "rating": 0.5}])
    assert resp.status_code == 202, resp.text
    msgs = consume_all(bootstrap, topic)
    assert sorted((m.key, json.loads(m.value)["item"]) for m in msgs) == [
        (visitor.encode(), "1"), (visitor.encode(), "2")]


def test_batch_lands_whole_in_one_partition_in_order(client, bootstrap, topic):
    batch = [{"user": "u7", "item": str(i), "rating": 1 + (i % 9) / 2} for i in range(50)]
    resp = client.post("/api/ratings", json=batch)
    assert resp.status_code == 202, resp.text
    assert resp.json()["accepted"] == 50
    msgs = consume_all(bootstrap, topic)
    assert len(msgs) == 50
    assert {m.partition for m in msgs} == {resp.json()["partition"]}
    assert [json.loads(m.value)["item"] for m in msgs] == [str(i) for i in range(50)]
    assert [json.loads(m.value)["rating"] for m in msgs] == [b["rating"] for b in batch]


BAD_BODIES = (
    ({"user": "1", "item": "2", "rating": 7}, "rating", "between 0.5 and 5.0"),
    ({"user": "1", "item": "2", "rating": "4"}, "rating", "not a string"),
    ({"user": "1", "item": "2", "rating": True}, "rating", "boolean"),
    ({"user": "1", "rating": 4}, "item", "required"),
    ({"item": "2", "rating": 4}, "user", "required"),  # no user and no visitor cookie
    ({"user": "1", "item": "", "rating": 4}, "item", "at least 1"),
    ({"user": "1", "item": "2", "rating": 4, "timestamp": -5}, "timestamp", "greater than"),
    ([], "body", "empty"),
    ("just a string", "body", "rating object"),
    ([{"user": "1", "item": "2", "rating": 4}, {"user": "1", "item": "3", "rating": 9}],
     "[1].rating", "between"),
    ([{"user": "1", "item": "2", "rating": 4}, 17], "[1]", "object"),
    ([{"user": "1", "item": "2", "rating": 4}, {"user": "2", "item": "3", "rating": 4}],
     "user", "same user"),
)


def test_bad_input_is_422_naming_the_field_and_nothing_is_produced(client, bootstrap, topic):
    for body, field, words in BAD_BODIES:
        resp = client.post("/api/ratings", json=body)
        assert resp.status_code == 422, (body, resp.text)
        out = resp.json()
        assert (out["error"], out["field"]) == ("invalid_rating", field), body
        assert words in out["detail"], (body, out["detail"])
    # Not one rating of any rejected request (some had valid ratings first) reached the topic.
    assert consume_all(bootstrap, topic) == []


def test_not_json_and_too_many_are_422(client):
    resp = client.post("/api/ratings", content=b"{nope", headers={"content-type": "application/json"})
    assert resp.status_code == 422 and resp.json()["field"] == "body"
    too_many = [{"user": "1", "item": str(i), "rating": 3} for i in range(501)]
    resp = client.post("/api/ratings", json=too_many)
    assert resp.status_code == 422 and "at most 500" in resp.json()["detail"]


def test_write_token_is_required_when_configured(predictor, bootstrap, topic):
    settings = _settings(KAFKA_BOOTSTRAP_SERVERS=bootstrap, RATINGS_TOPIC=topic,
                         PREDICTOR_URL=predictor[0], FRONTEND_WRITE_TOKEN="s3cret")
    rating = {"user": "9", "item": "1", "rating": 2.5}
    with TestClient(create_app(settings)) as c:
        assert c.get("/api/config").json()["write_token_required"] is True
        missing = c.post("/api/ratings", json=rating)
        assert missing.status_code == 401 and missing.json()["error"] == "write_token_required"
        wrong = c.post("/api/ratings", json=rating, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 403
        assert consume_all(bootstrap, topic, idle_ms=800) == []
        ok = c.post("/api/ratings", json=rating, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 202, ok.text
        ok2 = c.post("/api/ratings", json=rating, headers={"X-Write-Token": "s3cret"})
        assert ok2.status_code == 202, ok2.text
    assert len(consume_all(bootstrap, topic)) == 2


def test_unreachable_broker_is_a_quick_503(predictor):
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there
    settings = _settings(KAFKA_BOOTSTRAP_SERVERS=dead, PREDICTOR_URL=predictor[0],
                         FRONTEND_PRODUCE_TIMEOUT_S=3)
    with TestClient(create_app(settings)) as c:
        start = time.monotonic()
        resp = c.post("/api/ratings", json={"user": "1", "item": "2", "rating": 4})
        elapsed = time.monotonic() - start
        assert resp.status_code == 503
        assert resp.json()["error"] == "broker_unavailable"
        assert "none of them were accepted" in resp.json()["detail"]
        # Bounded by the produce timeout, not kafka-python's 30-60 s defaults.
        assert elapsed < 10
        # Readiness stays quick (inside a k8s probe's 3 s) and says what is wrong.
        start = time.monotonic()
        ready = c.get("/readyz")
        assert time.monotonic() - start < 2.5
        assert ready.status_code == 200
        assert ready.json() == {"status": "ready", "predictor": "ok", "broker": "unreachable"}


def test_broker_down_mid_life_503_nothing_written_later_then_recovers(predictor, tmp_path):
    """The 503'd batch must not be delivered when the broker returns, and writes recover."""
    port = free_port()
    broker = start_broker(port=port, workdir=tmp_path / "b1")
    topic = "ratings-down"
    try:
        create_topics(broker.url, {topic: 2})
        settings = _settings(KAFKA_BOOTSTRAP_SERVERS=broker.url, RATINGS_TOPIC=topic,
                             PREDICTOR_URL=predictor[0], FRONTEND_PRODUCE_TIMEOUT_S=2)
        with TestClient(create_app(settings)) as c:
            first = c.post("/api/ratings", json={"user": "5", "item": "1", "rating": 4})
            assert first.status_code == 202
            broker.kill()  # a crash (Tansu takes ~5 s to leave on SIGTERM)
            batch = [{"user": "5", "item": str(i), "rating": 3} for i in range(10, 20)]
            down = c.post("/api/ratings", json=batch)
            assert down.status_code == 503, down.text
            # The broker comes back (empty: in-memory storage) on the same address.
            broker = start_broker(port=port, workdir=tmp_path / "b2")
            create_topics(broker.url, {topic: 2})
            time.sleep(2.5)  # longer than the producer's delivery timeout (2 s)
            assert consume_all(broker.url, topic, idle_ms=1000) == []
            again = c.post("/api/ratings", json=batch)
            assert again.status_code == 202, again.text
            assert c.get("/readyz").json()["broker"] == "ok"
        msgs = consume_all(broker.url, topic)
        assert sorted(json.loads(m.value)["item"] for m in msgs) == [str(i) for i in range(10, 20)]
    finally:
        broker.kill()  # in-memory storage: nothing to flush, and SIGTERM takes ~5 s


# ---- reads through the predictor -------------------------------------------------------------


def test_reads_are_forwarded_to_the_predictor(client, predictor):
    _, seen = predictor
    found = client.get("/api/items", params={"q": "toy", "limit": 5})
    assert found.status_code == 200
    assert [m["title"] for m in found.json()["items"]] == ["Toy Story (1995)"]
    assert ("GET", "/v1/items", {"q": "toy", "limit": "5", "offset": "0"}) in seen
    assert client.get("/api/items/404").status_code == 404
    assert client.get("/api/items/404").json() == {"error": "unknown_item", "detail": "no item 404",
                                                   "field": "item"}
    assert client.get("/api/genres").json()["genres"] == [
        "Action", "Adventure", "Animation", "Crime", "Fantasy"]
    assert ("GET", "/v1/genres", {}) in seen  # not paging through /v1/items
    assert not [s for s in seen if s[1] == "/v1/items" and s[2].get("limit") == "1000"]
    client.get("/")
    visitor = client.cookies.get("visitor_id")
    recs = client.get("/api/recommendations", params={"n": 3}).json()
    assert recs["user"] == visitor and recs["strategy"] == "model"
    assert client.get("/api/users/414/recommendations").json()["user"] == "414"
    model = client.get("/api/model")
    assert model.status_code == 503 and model.json() == {"error": "no_model", "detail": "no model yet"}
    fold = client.post("/api/fold-in", json={"ratings": [{"item": "1", "rating": 5}], "n": 3})
    assert fold.json()["echo"]["ratings"] == [{"item": "1", "rating": 5}]
    assert client.post("/api/fold-in", json={"n": 3}).status_code == 422


def test_frontend_errors_have_the_one_error_body(client, predictor):
    """The frontend's own validation, unknown routes and passed-on predictor errors all
    answer {"error", "detail", "field"?}, never FastAPI's default {"detail": [...]}."""
    from frontend.app import Predictor

    for path, status, field in [("/api/popular?n=0", 422, "n"), ("/api/items?limit=abc", 422, "limit"),
                                ("/api/nothing-here", 404, None)]:
        resp = client.get(path)
        body = resp.json()
        assert resp.status_code == status, path
        assert isinstance(body["error"], str) and isinstance(body["detail"], str), body
        assert set(body) <= {"error", "detail", "field"} and body.get("field") == field, body
    url, _ = predictor

    async def odd_error():  # a predictor error in another shape is passed on in ours
        p = Predictor(url, 2)
        try:
            return await p.call("GET", "/v1/odd-error")
        finally:
            await p.close()

    odd = asyncio.run(odd_error())
    body = json.loads(bytes(odd.body))
    assert odd.status_code == 404 and body["error"] == "predictor_error" and isinstance(body["detail"], str)


def test_predictor_down_is_a_clear_503(bootstrap, topic):
    dead = f"http://127.0.0.1:{free_port()}"
    settings = _settings(KAFKA_BOOTSTRAP_SERVERS=bootstrap, RATINGS_TOPIC=topic,
                         PREDICTOR_URL=dead, FRONTEND_PREDICTOR_TIMEOUT_S=1)
    with TestClient(create_app(settings)) as c:
        for path in ("/api/items?q=x", "/api/popular", "/api/model", "/api/users/1/ratings"):
            resp = c.get(path)
            assert resp.status_code == 503, path
            assert resp.json()["error"] == "predictor_unavailable"
            assert "not reachable" in resp.json()["detail"]
        # The page itself still loads, and writes do not depend on the predictor.
        assert c.get("/").status_code == 200
        assert c.post("/api/ratings", json={"user": "1", "item": "1", "rating": 1}).status_code == 202
        ready = c.get("/readyz")
        assert ready.status_code == 200 and ready.json()["predictor"] == "unreachable"


def test_static_page_needs_nothing_from_the_internet(client):
    for path in sorted(STATIC.iterdir()):
        text = path.read_text()
        urls = set(re.findall(r"https?://[^\s\"')]+", text))
        # The only absolute URL allowed is the SVG namespace name, which is never fetched.
        assert urls <= {"http://www.w3.org/2000/svg"}, (path.name, urls)
        assert client.get(f"/static/{path.name}").status_code == 200
    html = client.get("/").text
    for ref in re.findall(r'(?:src|href)="(/static/[^"]+)"', html):
        assert client.get(ref).status_code == 200, ref
    assert client.get("/healthz").json() == {"status": "ok"}
