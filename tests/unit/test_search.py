"""Unit tests of the online hyper-parameter search (modeler.core.search): no services."""

from __future__ import annotations

import math

import pytest

from modeler.core.search import (
    LIVE,
    PRUNED,
    BatchLoss,
    FadingScore,
    HalvingSchedule,
    SearchConfigError,
    SearchSettings,
    SearchState,
    parse_candidates,
    ranking_gains,
)

GRID = [{"rank": r, "reg_param": lam} for r in (5, 10) for lam in (0.01, 0.05, 0.1, 0.5)]


# --------------------------------------------------------------------------- MODEL_CANDIDATES


def test_candidates_from_a_json_list_are_normalised():
    got = parse_candidates('[{"reg_param": 0.05, "rank": 10}, {"rank": 20, "reg_param": 0.1}]')
    assert got == [{"rank": 10, "reg_param": 0.05}, {"rank": 20, "reg_param": 0.1}]
    assert isinstance(got[0]["rank"], int) and isinstance(got[0]["reg_param"], float)


def test_candidates_from_ranges_are_the_cross_product():
    got = parse_candidates({"ranges": {"rank": [5, 10], "reg_param": {"min": 0.01, "max": 1.0, "num": 3}},
                            "base": {"iterations": 2}})
    assert len(got) == 6
    lams = sorted({c["reg_param"] for c in got})
    # log spacing: 0.01, 0.1, 1.0
    assert lams == pytest.approx([0.01, 0.1, 1.0])
    assert all(c["iterations"] == 2 for c in got)


@pytest.mark.parametrize("raw, fragment", [
    ('[{"rank": 10}, {"rank": "ten"}]', "MODEL_CANDIDATES[1].rank: must be a number"),
    ('[{"rank": 10.5}]', "MODEL_CANDIDATES[0].rank: must be an integer"),
    ('[{"rank": 0}]', "MODEL_CANDIDATES[0].rank: must be in [1, 512]"),
    ('[{"rnak": 10}]', "MODEL_CANDIDATES[0].rnak: unknown parameter"),
    ('[{"rank": 10}, {"rank": 10}]', "MODEL_CANDIDATES[1]: duplicate of candidate 0"),
    ('[{"rank": 10}, 3]', "MODEL_CANDIDATES[1]: must be a JSON object"),
    ('[]', "MODEL_CANDIDATES: no candidates"),
    ('[{"rank": 10}', "MODEL_CANDIDATES: not valid JSON"),
    ('{"ranges": {"rank": {"min": 5, "max": 10}}}', "MODEL_CANDIDATES.ranges.rank.num: missing"),
    ('{"ranges": {"reg_param": {"min": 1, "max": 0.1, "num": 2}}}', "max 0.1 is below min 1.0"),
    ('{"grid": {}}', "MODEL_CANDIDATES.grid: unknown key"),
    ('[{"reg_param": NaN}]', "MODEL_CANDIDATES[0].reg_param: must be finite"),
])
def test_bad_candidates_name_the_field(raw, fragment):
    with pytest.raises(SearchConfigError) as err:
        parse_candidates(raw)
    assert fragment in str(err.value)


# --------------------------------------------------------------------------- prequential score


def test_fading_score_matches_a_hand_computation():
    s = FadingScore(0.5)
    s.add(BatchLoss(total=4.0, n=2))   # S = 4,                 N = 2
    s.add(BatchLoss(total=1.0, n=1))   # S = 0.5·4 + 1 = 3,     N = 0.5·2 + 1 = 2
    s.add(BatchLoss(total=0.0, n=0))   # an empty batch changes nothing
    s.add(BatchLoss(total=9.0, n=3))   # S = 0.125·3 + 9 = 9.375, N = 0.125·2 + 3 = 3.25
    assert s.s == pytest.approx(9.375) and s.n == pytest.approx(3.25) and s.events == 6
    from modeler.core.search import METRICS
    assert s.value(METRICS["ndcg@10"]) == pytest.approx(9.375 / 3.25)
    assert s.value(METRICS["rmse"]) == pytest.approx(math.sqrt(9.375 / 3.25))
    assert FadingScore(0.5).value(METRICS["rmse"]) is None


def test_no_fading_is_the_plain_prequential_mean():
    s = FadingScore(1.0)
    for total, n in ((3.0, 3), (1.0, 5), (8.0, 2)):
        s.add(BatchLoss(total, n))
    assert s.s / s.n == pytest.approx(12.0 / 10.0)


def test_ranking_gains_by_hand():
    ndcg, hits = ranking_gains([0, 1, 9, 10, 50, -1])
    assert hits == 3
    assert ndcg == pytest.approx(1.0 + 1.0 / math.log2(3) + 1.0 / math.log2(11))


# --------------------------------------------------------------------------- halving schedule


def test_halving_schedule_is_geometric_then_capped():
    sched = HalvingSchedule(budget=1000, eta=2.0, max_gap=4000)
    assert [sched.rung_events(k) for k in range(6)] == [1000, 2000, 4000, 8000, 12000, 16000]
    assert [sched.keep(m) for m in (8, 7, 4, 3, 2, 1)] == [4, 4, 2, 2, 1, 1]
    assert HalvingSchedule(budget=100, eta=3.0).gap_cap == 2700


def _feed(state: SearchState, events: int, quality: dict[str, float], batch: int = 500) -> list:
    """Feed ``events`` in batches; candidate c's per-event squared error is quality[c] (RMSE²)."""
    decisions = []
    for _ in range(events // batch):
        losses = {c.cid: BatchLoss(quality.get(c.cid, 1.0) * batch, batch) for c in state.live()}
        decisions.append(state.observe(batch, losses))
    return decisions


def test_halving_without_respawn_8_4_2_1():
    st = SearchState(GRID, SearchSettings(metric="rmse", fading=1.0, respawn=False, min_events=500,
                                          schedule=HalvingSchedule(budget=1000, eta=2.0)), leader=0)
    # c7 best, c0 worst; make the leader c7 already so that the plain halving is visible.
    quality = {f"c{j}": 1.0 + (7 - j) * 0.1 for j in range(8)}
    st.leader = "c7"
    _feed(st, 1000, quality)
    assert [c.cid for c in st.live()] == ["c4", "c5", "c6", "c7"]
    _feed(st, 1000, quality)
    assert [c.cid for c in st.live()] == ["c6", "c7"]
    _feed(st, 2000, quality)
    assert [c.cid for c in st.live()] == ["c7"]
    _feed(st, 20000, quality)
    assert [c.cid for c in st.live()] == ["c7"]
    assert sum(c.state == PRUNED for c in st.candidates) == 7


def test_the_served_candidate_is_never_pruned():
    st = SearchState(GRID, SearchSettings(metric="rmse", fading=1.0, respawn=False, patience=10_000,
                                          schedule=HalvingSchedule(budget=1000, eta=2.0)), leader=0)
    # c0 is served and is the WORST; the switch rule is held off (patience), pruning runs.
    quality = {f"c{j}": 1.0 + (7 - j) * 0.1 for j in range(8)}
    _feed(st, 8000, quality)
    live = [c.cid for c in st.live()]
    assert "c0" in live and st.leader == "c0"
    # Ranked by score the rungs keep ⌈m/2⌉ (8 -> 4 -> 3 -> 2); the leader survives on top.
    assert live == ["c0", "c6", "c7"]
    assert all(c.state == PRUNED for c in st.candidates if c.cid not in live)


def test_respawn_keeps_the_population_and_perturbs_the_best():
    st = SearchState(GRID, SearchSettings(metric="rmse", fading=1.0, respawn=True, perturb=2.0,
                                          min_events=1000, population=0,
                                          schedule=HalvingSchedule(budget=1000, eta=1.5)), leader=7)
    quality = {f"c{j}": 1.0 + (7 - j) * 0.1 for j in range(8)}
    d = _feed(st, 1000, quality)[-1]
    # ⌈8 / 1.5⌉ = 6 survive the first rung; the two freed slots respawn around c7 (the best).
    assert sorted(d.pruned) == ["c0", "c1"] and len(d.spawned) == 2
    assert len(st.live()) == 8 == st.capacity
    parent = st.get("c7").params
    for cid in d.spawned:
        c = st.get(cid)
        assert c.parent == "c7" and c.state == LIVE and c.born == 1000
        assert c.params != parent
        assert c.params["rank"] in (parent["rank"] // 2, parent["rank"] * 2)
        assert c.params["reg_param"] in (pytest.approx(0.25), pytest.approx(1.0))
    # The next rung (1500 events) judges only the candidates with >= min_events of their own:
    # the newborns (500 events, and here the worst) survive it.
    newborn_bad = {cid: 5.0 for cid in d.spawned}
    d2 = _feed(st, 500, {**quality, **newborn_bad})[-1]
    assert st.events == 1500 and d2.pruned
    assert not set(d2.pruned) & set(d.spawned)
    assert len(st.live()) == 8


def test_a_drift_flips_the_leader_and_says_why():
    st = SearchState(GRID[:2], SearchSettings(metric="ndcg@10", fading=0.999, respawn=False, patience=2,
                                              switch_margin=0.02, min_events=500,
                                              schedule=HalvingSchedule(budget=10**9)), leader=0)
    before = {"c0": 0.30, "c1": 0.20}
    after = {"c0": 0.10, "c1": 0.25}
    decisions = []
    for t in range(40):
        q = before if t < 20 else after
        decisions.append(st.observe(100, {c: BatchLoss(q[c] * 100, 100) for c in q}))
    assert st.leader == "c1"
    switches = [(t, d.switch) for t, d in enumerate(decisions) if d.switch]
    assert len(switches) == 1
    t, sw = switches[0]
    assert t >= 20 and sw.old == "c0" and sw.new == "c1"
    assert "c1 ndcg@10" in sw.reason and "leader c0" in sw.reason
    # No flapping: the first batches (c0 better) never switched.
    assert all(d.switch is None for d in decisions[:20])


def test_state_round_trips_through_json():
    st = SearchState(GRID, SearchSettings(schedule=HalvingSchedule(budget=1000)), leader=3)
    quality = {f"c{j}": 1.0 + (7 - j) * 0.1 for j in range(8)}
    _feed(st, 3000, quality)
    back = SearchState.from_json(st.to_json())
    assert back.summary() == st.summary()
    assert back.to_json() == st.to_json()
    # ...and both continue identically.
    more = {c.cid: BatchLoss(500.0, 500) for c in st.live()}
    assert back.observe(500, more) == st.observe(500, more)
    assert back.to_json() == st.to_json()


def test_unreadable_state_is_a_clear_error():
    with pytest.raises(SearchConfigError, match="search state: unreadable"):
        SearchState.from_json('{"settings": {}}')


def test_losses_for_a_pruned_candidate_are_refused():
    st = SearchState(GRID[:2], SearchSettings(respawn=False, schedule=HalvingSchedule(budget=10**9)))
    with pytest.raises(SearchConfigError, match="c9"):
        st.observe(10, {"c9": BatchLoss(1.0, 10)})


def test_history_is_bounded_and_spans_the_stream():
    st = SearchState(GRID[:1], SearchSettings(history_points=16, schedule=HalvingSchedule(budget=10**9)))
    for _ in range(500):
        st.observe(10, {"c0": BatchLoss(5.0, 10)})
    h = st.get("c0").history
    assert len(h) <= 16
    assert h[0][0] == 10.0 and h[-1][0] == 5000.0


# --------------------------------------------------------------------------- Prometheus gauges


def test_prometheus_gauges_per_candidate():
    from prometheus_client import generate_latest

    from modeler.metrics import ModelerMetrics

    st = SearchState(GRID[:4], SearchSettings(metric="rmse", fading=1.0, respawn=False, min_events=500,
                                              patience=1, schedule=HalvingSchedule(budget=1000)))
    quality = {"c0": 1.3, "c1": 1.0, "c2": 1.2, "c3": 1.5}
    switched = False
    for d in _feed(st, 1000, quality):
        switched = switched or d.switch is not None
    m = ModelerMetrics()
    m.observe_candidates(st.summary(), switched=switched)
    text = generate_latest(m.registry).decode()
    assert 'modeler_search_candidate_score{candidate="c1",metric="rmse"} 1.0' in text
    assert 'modeler_search_candidate_served{candidate="c1"} 1.0' in text
    assert 'modeler_search_candidate_served{candidate="c0"} 0.0' in text
    assert 'modeler_search_candidate_live{candidate="c3"} 0.0' in text  # pruned at the rung
    assert 'modeler_search_candidate_live{candidate="c2"} 1.0' in text
    assert "modeler_search_leader_switches_total 1.0" in text


def test_probe_ranks_are_the_brute_force_ranks():
    import numpy as np

    from modeler.core.als_math import ALSParams
    from modeler.core.ranking import LocalRankingALS
    from modeler.core.search import probe_target_ranks

    rng = np.random.default_rng(3)
    users = [f"u{j % 20}" for j in range(400)]
    items = [f"m{int(x)}" for x in rng.integers(0, 60, 400)]
    ratings = rng.choice([1.0, 4.0, 5.0], 400)
    stamps = np.arange(400, dtype=np.int64)
    model = LocalRankingALS(ALSParams(ranking_rank=4))  # keeps its seen pairs (probe size > 0)
    model.train(users[:300], items[:300], ratings[:300], np.zeros(300), stamps[:300])
    u2, i2, r2, t2 = users[300:], items[300:], ratings[300:], stamps[300:]
    positive = r2 >= 4.0
    ranks = probe_target_ranks(model, u2, i2, positive, t2, size=1000)
    # Brute force: every probed event is a known user, known item, unseen pair, positive.
    seen = {(u, i) for u, i in zip(users[:300], items[:300])}
    expected = []
    for u, i, pos in zip(u2, i2, positive):
        if not pos or u not in model.users.index or i not in model.items.index or (u, i) in seen:
            continue
        x = model.users.vec[model.users.index[u]].astype(np.float64)
        scores = {it: float(model.items.vec[r].astype(np.float64) @ x) for it, r in model.items.index.items()
                  if (u, it) not in seen}
        expected.append(sum(s > scores[i] for s in scores.values()))
    assert sorted(ranks) == sorted(expected) and len(ranks) > 10


def test_probe_skips_users_with_few_positives():
    import numpy as np

    from modeler.core.als_math import ALSParams
    from modeler.core.ranking import LocalRankingALS
    from modeler.core.search import probe_target_ranks

    users = ["heavy"] * 30 + ["light"] * 3 + ["heavy", "light"]
    items = [f"m{j}" for j in range(30)] + ["m0", "m1", "m2"] + ["m40", "m41"]
    ratings = np.full(len(users), 5.0)
    stamps = np.arange(len(users), dtype=np.int64)
    model = LocalRankingALS(ALSParams(ranking_rank=3))
    model.train(users[:33], items[:33], ratings[:33], np.zeros(33), stamps[:33])
    model.train(["x"] * 2, ["m40", "m41"], np.full(2, 5.0), np.zeros(2), stamps[:2])  # items known
    both = probe_target_ranks(model, users[33:], items[33:], np.ones(2, bool), stamps[33:], 10)
    warm = probe_target_ranks(model, users[33:], items[33:], np.ones(2, bool), stamps[33:], 10,
                              min_user_positives=20)
    assert len(both) == 2 and len(warm) == 1


def test_respawns_refill_only_up_to_the_population():
    """With the default population (2) the halving's savings are kept: 8 -> 4 -> 2 live
    without respawns, then each pruned challenger is replaced by one perturbation of the best,
    so two candidates stay live; population 3 keeps three; never more than K."""
    quality = {f"c{j}": 1.0 + (7 - j) * 0.1 for j in range(8)}
    st = SearchState(GRID, SearchSettings(metric="rmse", fading=1.0, respawn=True, min_events=1000,
                                          schedule=HalvingSchedule(budget=1000, eta=2.0)), leader=7)
    assert st.settings.population == 2
    live_counts = []
    spawned: list[str] = []
    for _ in range(12):
        for d in _feed(st, 1000, {**quality, **dict.fromkeys(spawned, 9.0)}):
            spawned += d.spawned
        live_counts.append(len(st.live()))
    assert live_counts[0] == 4 and live_counts[1] == 2 and max(live_counts[1:]) == 2
    assert spawned and all(st.get(c).parent == "c7" for c in spawned)  # around the best, c7
    assert st.leader == "c7" and "c7" in [c.cid for c in st.live()]

    st3 = SearchState(GRID, SearchSettings(metric="rmse", fading=1.0, respawn=True, min_events=1000, population=3,
                                           schedule=HalvingSchedule(budget=1000, eta=2.0)), leader=7)
    counts = []
    for _ in range(12):
        _feed(st3, 1000, quality)
        counts.append(len(st3.live()))
    assert max(counts[2:]) == 3 and max(counts) <= st3.capacity
    with pytest.raises(SearchConfigError, match="population"):
        SearchSettings(population=-1)


def test_per_user_time_split_holds_out_each_users_newest_ratings():
    """Every user with ≥ 5 ratings gives their newest 20% (by time) to the test set; the
    stream keeps the rest in time order; a light user stays whole in the stream; nothing is
    lost or duplicated. The global time split tests only the users who straddle its cut."""
    from common.datasets import RatingRow
    from modeler.search_eval import per_user_time_split, time_split

    rows = [RatingRow(f"u{u}", f"m{j}", 4.0, 1000 * u + j) for u in range(6) for j in range(10)]
    rows += [RatingRow("light", f"m{j}", 3.0, 5 + j) for j in range(3)]
    train, test = per_user_time_split(rows[::-1], 0.2)
    assert sorted(train + test) == sorted(rows)
    assert [r.timestamp for r in train] == sorted(r.timestamp for r in train)
    for u in range(6):
        held = sorted(r.item for r in test if r.user == f"u{u}")
        assert held == ["m8", "m9"]  # the two newest of ten
        assert max(r.timestamp for r in train if r.user == f"u{u}") < min(
            r.timestamp for r in test if r.user == f"u{u}")
    assert not [r for r in test if r.user == "light"]
    _, global_test = time_split(rows, 0.2)
    assert len({r.user for r in test}) == 6 > len({r.user for r in global_test})
