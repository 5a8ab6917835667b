"""The real predictor and the real frontend served by uvicorn in threads, over a planted
two-set version in a real Redis, and a headless Chromium page: for the browser tests."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn

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
                                                          PREDICTOR_MODEL_POLL_INTERVAL_S=0.2)), free_port())
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
