"""The page in a real headless Chromium when things go wrong: broker down (the visitor is
told the rating was NOT accepted, and "Retry saving" works once it is back), predictor down,
write token required. The predictor is the small stand-in of tests/support/stub_predictor.py; the
broker is real."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from devstack.services import create_topics, free_port, start_broker
from frontend.app import create_app
from frontend.config import FrontendSettings
from tests.e2e.conftest import CHROMIUM_ARGS, chromium_path
from tests.support.served import Served
from tests.support.stub_predictor import stub_predictor
from tests.support.topics import consume_all


@pytest.fixture(scope="module")
def predictor_url() -> Iterator[str]:
    app, _ = stub_predictor()
    served = Served(app, free_port())
    yield served.url
    served.stop()


def serve_frontend(**env: object) -> Served:
    settings = FrontendSettings.model_validate(env)
    return Served(create_app(settings), free_port())


@pytest.fixture
def page(tmp_path: Path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=chromium_path(), headless=True,
            args=CHROMIUM_ARGS, viewport={"width": 1000, "height": 900})
        try:
            p = context.new_page()
            errors: list[str] = []
            p.on("pageerror", lambda exc: errors.append(str(exc)))
            yield p
            assert errors == []
        finally:
            context.close()


def _toy_story(page):
    row = page.locator("#results li.movie", has_text="Toy Story (1995)")
    row.wait_for(timeout=10_000)
    return row


def test_broker_down_the_page_says_not_accepted_and_retry_saves_it(page, predictor_url, tmp_path):
    port = free_port()  # the broker will live here, later
    bootstrap = f"127.0.0.1:{port}"
    front = serve_frontend(KAFKA_BOOTSTRAP_SERVERS=bootstrap, RATINGS_TOPIC="page-ratings",
                           PREDICTOR_URL=predictor_url, FRONTEND_PRODUCE_TIMEOUT_S=1.5)
    broker = None
    try:
        page.goto(front.url + "/")
        row = _toy_story(page)
        row.locator('label[data-value="4"]').click()
        row.locator(".rate-status.unsaved").wait_for(timeout=15_000)
        banner = page.locator("#banner")
        assert banner.is_visible()
        assert "NOT accepted" in banner.inner_text()
        assert page.locator("#retry").is_visible()

        broker = start_broker(port=port, workdir=tmp_path / "broker")
        create_topics(bootstrap, {"page-ratings": 2})
        page.click("#retry")
        row.locator(".rate-status.saved").wait_for(timeout=15_000)
        assert not banner.is_visible()
        visitor = next(c["value"] for c in page.context.cookies() if c["name"] == "visitor_id")
        msgs = consume_all(bootstrap, "page-ratings")
        assert [(m.key.decode(), json.loads(m.value)["item"], json.loads(m.value)["rating"])
                for m in msgs] == [(visitor, "1", 4.0)]

        # A reload keeps the visitor and their rating.
        page.reload()
        page.locator("#my-ratings li.movie", has_text="Toy Story").wait_for(timeout=10_000)
        assert page.locator("#my-count").inner_text() == "1"
        assert _toy_story(page).locator('input[value="4"]').is_checked()
    finally:
        front.stop()
        if broker is not None:
            broker.kill()  # in-memory storage: nothing to flush, and SIGTERM takes ~5 s


def test_predictor_down_the_page_says_so(page, bootstrap, topic):
    front = serve_frontend(KAFKA_BOOTSTRAP_SERVERS=bootstrap, RATINGS_TOPIC=topic,
                           PREDICTOR_URL=f"http://127.0.0.1:{free_port()}", FRONTEND_PREDICTOR_TIMEOUT_S=1)
    try:
        page.goto(front.url + "/")
        banner = page.locator("#banner")
        banner.wait_for(state="visible", timeout=10_000)
        assert "predictor" in banner.inner_text() and "not reachable" in banner.inner_text()
        page.locator("#search-status", has_text="not reachable").wait_for(timeout=10_000)
    finally:
        front.stop()


def test_write_token_is_asked_for_and_used(page, predictor_url, bootstrap, topic):
    front = serve_frontend(KAFKA_BOOTSTRAP_SERVERS=bootstrap, RATINGS_TOPIC=topic,
                           PREDICTOR_URL=predictor_url, FRONTEND_WRITE_TOKEN="let-me-in")
    try:
        page.goto(front.url + "/")
        assert page.locator("#token-box").is_visible()
        row = _toy_story(page)
        row.locator('label[data-value="2.5"]').click()
        row.locator(".rate-status.unsaved").wait_for(timeout=10_000)
        assert "write token" in page.locator("#banner").inner_text()
        page.fill("#token", "let-me-in")
        page.press("#token", "Enter")
        row.locator(".rate-status.saved").wait_for(timeout=10_000)
        assert [json.loads(m.value)["rating"] for m in consume_all(bootstrap, topic)] == [2.5]
    finally:
        front.stop()
