"""What the page shows of what the predictor serves, in a real headless Chromium, with the
real predictor (real Redis) behind the real frontend: a predicted rating is labelled as one
and never shown above the scale (the planted explicit factors push raw predictions far past
5), a ranking score is labelled "match" and never shown as a rating (implicit-only version).
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn

from common.keys import RANKING
from devstack.services import free_port, wait_for_port
from frontend.app import create_app as create_frontend
from frontend.config import FrontendSettings
from predictor.app import create_app as create_predictor
from predictor.config import PredictorSettings
from tests.e2e.conftest import CHROMIUM_ARGS, chromium_path
from tests.support import versions as ranking


class Served:
    def __init__(self, app, port: int) -> None:
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        wait_for_port("127.0.0.1", port, 15)
        self.url = f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def stack(redis_url: str, redis_client, keys, models) -> tuple[Served, Served, ranking.Both]:
    b = ranking.plant(seed=17, scale=12.0)
    ranking.publish(redis_client, keys, b, 1, models=models)
    redis_client.hset(keys.catalog, mapping={i: json.dumps({"title": f"Film {i[1:]} (2001)", "genres": ["Drama"]})
                                             for i in b.items})
    predictor = Served(create_predictor(PredictorSettings(REDIS_URL=redis_url, REDIS_PREFIX=keys.prefix,
                                                          MODEL_POLL_INTERVAL_S=0.2)), free_port())
    front = Served(create_frontend(FrontendSettings.model_validate(
        {"PREDICTOR_URL": predictor.url, "KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}"})), free_port())
    return predictor, front, b


@pytest.fixture
def page(tmp_path: Path) -> Iterator:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium_path(), headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser.new_page(viewport={"width": 1100, "height": 1400})
        finally:
            browser.close()


def show_user(page, url: str, user: str) -> list[str]:
    page.goto(url + "/")
    page.fill("#user-id", user)
    page.click("#user-form button[type=submit]")
    page.wait_for_selector("#user-recs li", timeout=15_000)
    return page.locator("#user-recs li .readonly-stars").all_inner_texts()


@pytest.mark.timeout(120)
def test_the_page_labels_predicted_ratings_within_the_scale(page, redis_url, redis_client, keys, tmp_path) -> None:
    predictor, front, b = stack(redis_url, redis_client, keys, ("explicit", RANKING))
    try:
        served_raw = [b.r_hat(3)[b.items.index(i)] for i in b.ranked(3, 10)]
        assert max(served_raw) > 6.0  # raw predictions of the listed items far above the 0.5-5 scale
        labels = show_user(page, front.url, "u3")
        assert len(labels) == 10
        values = [float(m.group(1)) for t in labels if (m := re.search(r"predicted (\d+(?:\.\d+)?)★", t))]
        assert len(values) == 10, labels
        assert all(0.5 <= v <= 5.0 for v in values), labels
        titles = page.locator("#user-recs li .title").all_inner_texts()
        assert titles == [f"Film {i[1:]} (2001)" for i in b.ranked(3, 10)]  # the ranking model's order
        page.screenshot(path=str(tmp_path / "served.png"), full_page=True)
    finally:
        front.stop()
        predictor.stop()


@pytest.mark.timeout(120)
def test_the_page_shows_a_ranking_score_as_a_match_not_a_rating(page, redis_url, redis_client, keys) -> None:
    predictor, front, _ = stack(redis_url, redis_client, keys, (RANKING,))
    try:
        labels = show_user(page, front.url, "u5")
        assert len(labels) == 10 and all(t.startswith("match ") for t in labels), labels
        assert not any("predicted" in t or "★" in t for t in labels)
    finally:
        front.stop()
        predictor.stop()
