"""What the page shows of what the predictor serves, in a real headless Chromium, with the
real predictor (real Redis) behind the real frontend: a predicted rating is labelled as one
and never shown above the scale (the planted explicit factors push raw predictions far past
5), a ranking score is labelled "match" and never shown as a rating (implicit-only version).
"""

from __future__ import annotations

import re

import pytest

from common.keys import RANKING
from tests.support.served import stack


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
