"""A new visitor in a real headless Chromium: search, rate with mouse and keyboard, get
fold-in recommendations at once, then model-based ones once the streaming model has learned
the visitor's ratings. Screenshots go to build/e2e/ (and docs/screenshot.png when
UPDATE_SCREENSHOT=1)."""

from __future__ import annotations

import json
import os
import shutil

import httpx
import pytest
from kafka import KafkaConsumer, TopicPartition

from tests.e2e.conftest import BUILD, ROOT, SEED_RATINGS, Stack, rate
from tests.support import planted

FIRST_MODEL_TIMEOUT_S = 150  # Spark start-up (~25-40 s) + the first micro-batches, 2 busy cores
LEARN_TIMEOUT_S = float(os.environ.get("E2E_LEARN_TIMEOUT_S", "90"))


def wait_for(check, timeout: float, what: str, stack: Stack, interval: float = 0.5):
    try:
        return planted.wait_for(check, timeout, interval)
    except AssertionError:
        pytest.fail(f"timed out after {timeout}s waiting for {what}\n{stack.diagnostics()}")


def model_version(stack: Stack, ratings_seen: int = 0) -> int | None:
    """The predictor's model version once it has learned at least ``ratings_seen`` ratings."""
    try:
        resp = httpx.get(f"{stack.predictor_url}/v1/model", params={"history": 0}, timeout=2)
    except httpx.HTTPError:
        return None
    if resp.status_code != 200 or int(resp.json()["ratings_seen"]) < ratings_seen:
        return None
    return int(resp.json()["version"])


def test_visitor_rates_and_sees_fold_in_then_model_recommendations(stack: Stack, browser_page):
    page = browser_page
    # The whole seeded history learned: no version is published until the visitor rates.
    v0 = wait_for(lambda: model_version(stack, SEED_RATINGS), FIRST_MODEL_TIMEOUT_S,
                  "the model of the seeded ratings", stack)

    page.goto(stack.frontend_url + "/")
    visitor = next(c["value"] for c in page.context.cookies() if c["name"] == "visitor_id")
    # A newcomer sees popular items before rating anything.
    page.locator('#recs[data-strategy="popular"] li.movie').first.wait_for(timeout=15_000)
    page.locator("#popular li.movie").first.wait_for(timeout=10_000)
    page.locator("#m-version", has_text=str(v0)).wait_for(timeout=10_000)

    # The modeler learns a rating within about a second, faster than a person (or this test)
    # rates four movies: freeze it, as if it had fallen behind, so the fold-in stage is seen.
    modeler = stack.services["modeler"]
    modeler.pause()
    # Mouse: whole and half stars.
    rate(page, "Matrix, The (1999)", "matrix", 5)
    rate(page, "Star Wars: Episode IV", "star wars", 4.5)
    rate(page, "Forrest Gump (1994)", "forrest", 1.5)
    # Keyboard: focus the 3-star radio of a row, then arrow right -> 3.5 stars.
    page.fill("#q", "pulp fiction")
    page.press("#q", "Enter")
    row = page.locator("#results li.movie", has_text="Pulp Fiction (1994)").first
    row.wait_for(timeout=10_000)
    row.locator('input[value="3"]').focus()
    page.keyboard.press("Space")
    page.keyboard.press("ArrowRight")
    assert row.locator('input[value="3.5"]').is_checked()
    row.locator(".rate-status.saved").wait_for(timeout=15_000)
    assert page.locator("#my-count").inner_text() == "4"

    # At once: fold-in recommendations for the visitor's ratings, none of the rated movies.
    recs = page.locator('#recs[data-strategy="fold_in"]')
    recs.locator("li.movie").first.wait_for(timeout=15_000)
    fold_titles = recs.locator("li.movie .title").all_inner_texts()
    assert len(fold_titles) >= 5
    assert not {"Matrix, The (1999)", "Pulp Fiction (1994)", "Forrest Gump (1994)"} & set(fold_titles)
    assert "instant (fold-in)" in page.locator("#recs-badge").inner_text()
    page.screenshot(path=str(BUILD / "fold_in.png"), full_page=True)

    # What the page sent is on the topic, keyed by the visitor, in the schema's format.
    mine = _visitor_messages(stack, visitor)
    assert {(m["item"], m["rating"]) for m in mine} >= {("2571", 5.0), ("260", 4.5), ("356", 1.5),
                                                         ("296", 3.5)}

    # Later: the modeler learns them, the version advances, the page switches to the model.
    modeler.resume()
    page.locator('#recs[data-strategy="model"] li.movie').first.wait_for(
        timeout=LEARN_TIMEOUT_S * 1000)
    version = int(page.locator("#recs").get_attribute("data-version") or -1)
    assert version > v0
    assert int(page.locator("#m-version").inner_text()) >= version
    assert "model" in page.locator("#recs-badge").inner_text()
    model_titles = page.locator("#recs li.movie .title").all_inner_texts()
    assert model_titles and not {"Matrix, The (1999)", "Pulp Fiction (1994)"} & set(model_titles)
    # The model panel charts the streaming RMSE.
    assert page.locator("#rmse-chart polyline").count() == 1

    page.mouse.move(0, 0)  # no hover preview on whatever star sits under the pointer
    page.evaluate("window.scrollTo(0, 0)")
    shot = BUILD / "frontend.png"
    page.screenshot(path=str(shot), full_page=True)
    if os.environ.get("UPDATE_SCREENSHOT") == "1":
        (ROOT / "docs").mkdir(exist_ok=True)
        shutil.copy(shot, ROOT / "docs" / "screenshot.png")

    # An existing MovieLens user (user 1 is among the streamed ratings).
    page.fill("#user-id", "1")
    page.press("#user-id", "Enter")
    page.locator("#user-ratings li.movie").first.wait_for(timeout=10_000)
    page.locator("#user-recs li.movie").first.wait_for(timeout=10_000)

    # Accessible names: every form control has a label.
    unlabeled = page.evaluate("""() => [...document.querySelectorAll('input, select')]
        .filter((e) => !(e.labels && e.labels.length) && !e.getAttribute('aria-label'))
        .map((e) => e.outerHTML)""")
    assert unlabeled == []
    assert page.locator("#recs fieldset.stars legend").first.inner_text().startswith(
        "Your rating for")

    page.screenshot(path=str(BUILD / "explore_user.png"), full_page=True)

    # A narrow (phone) screen: one column, nothing wider than the viewport.
    page.set_viewport_size({"width": 375, "height": 800})
    page.wait_for_timeout(300)
    overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0
    page.screenshot(path=str(BUILD / "frontend_narrow.png"), full_page=False)
    assert page.js_errors == []


def _visitor_messages(stack: Stack, visitor: str) -> list[dict]:
    consumer = KafkaConsumer(bootstrap_servers=stack.bootstrap, enable_auto_commit=False,
                             consumer_timeout_ms=1500)
    try:
        parts = consumer.partitions_for_topic(stack.topic) or set()
        consumer.assign([TopicPartition(stack.topic, p) for p in parts])
        consumer.seek_to_beginning()
        return [json.loads(m.value) for m in consumer if m.key == visitor.encode()]
    finally:
        consumer.close()
