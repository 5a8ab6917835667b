"""The model panel shows the online search's candidates and a chart of their scores, in a real
headless Chromium, with the real predictor (real Redis) behind the real frontend; a leader
switch published as a new version shows up on the page."""

from __future__ import annotations

import pytest

from common.keys import RANKING
from modeler.core.search import BatchLoss, HalvingSchedule, SearchSettings, SearchState
from tests.support import versions as ranking
from tests.support.served import stack

GRID = [{"ranking_rank": r, "ranking_alpha": a} for r in (8, 32) for a in (1.0, 8.0)]


def _summary() -> list[dict]:
    st = SearchState(GRID, SearchSettings(metric="ndcg@10", fading=0.999, min_events=200, patience=2,
                                          respawn=False, schedule=HalvingSchedule(budget=400)))
    quality = {"c0": 0.10, "c1": 0.30, "c2": 0.20, "c3": 0.05}
    for _ in range(6):
        st.observe(100, {c.cid: BatchLoss(quality[c.cid] * 100, 100) for c in st.live()})
    return st.summary()


@pytest.mark.timeout(120)
def test_the_model_panel_shows_candidates_and_their_scores(page, redis_url, redis_client, keys) -> None:
    predictor, front, b = stack(redis_url, redis_client, keys, ("explicit", RANKING))
    cands = _summary()
    try:
        ranking.publish(redis_client, keys, b, 2, candidates=cands)
        page.goto(front.url + "/")
        page.wait_for_selector("#hp-panel:not([hidden]) #cand-table tbody tr", timeout=15_000)
        page.wait_for_function("document.querySelector('#cand-table tr.served th')"
                               " && document.querySelector('#cand-table tr.served th').textContent.includes('c1')",
                               timeout=15_000)
        rows = page.locator("#cand-table tbody tr")
        assert rows.count() == 4
        assert page.locator("#cand-table tr.pruned").count() == 2
        assert "c1" in page.locator("#cand-table tr.served").inner_text()
        assert "ranking_rank=8" in page.locator("#cand-table tr[data-cid=c1]").inner_text()
        assert page.locator("#cand-metric").inner_text() == "ndcg@10"
        # One line per candidate with a history; the served one drawn as such.
        lines = page.locator("#cand-chart polyline.cline")
        assert lines.count() == sum(1 for c in cands if c["history"])
        served_line = page.locator("#cand-chart polyline.served")
        assert served_line.count() == 1 and served_line.get_attribute("data-cid") == "c1"
        points = served_line.get_attribute("points").split()
        assert len(points) == len(next(c for c in cands if c["id"] == "c1")["history"])
        assert "the served c1" in page.locator("#cand-desc").text_content()

        # A leader switch is a new version: the page follows it.
        switched = [dict(c, served=c["id"] == "c2") for c in cands]
        ranking.publish(redis_client, keys, b, 3, candidates=switched)
        page.wait_for_function("document.querySelector('#cand-chart polyline.served')"
                               " && document.querySelector('#cand-chart polyline.served').dataset.cid === 'c2'",
                               timeout=20_000)
        assert "c2" in page.locator("#cand-table tr.served").inner_text()
        assert "serving c2" in page.locator("#hp-status").inner_text()
        # The catalogue search's own status line is left alone.
        assert "candidates" not in page.locator("#search-status").inner_text()
    finally:
        front.stop()
        predictor.stop()


@pytest.mark.timeout(120)
def test_no_search_no_panel(page, redis_url, redis_client, keys) -> None:
    predictor, front, _ = stack(redis_url, redis_client, keys, ("explicit", RANKING))
    try:
        page.goto(front.url + "/")
        page.wait_for_function("document.getElementById('m-version').textContent === '1'", timeout=15_000)
        assert page.locator("#hp-panel").is_hidden()
    finally:
        front.stop()
        predictor.stop()
