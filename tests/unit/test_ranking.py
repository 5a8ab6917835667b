"""The streaming ranking model's maths (modeler.core.ranking): no Spark, no services."""

from __future__ import annotations

import numpy as np
import pytest

from common.feedback import Weighting
from common.schema import RatingScale
from modeler.core.als_math import ALSParams, FactorTable, LocalStreamingALS
from modeler.core.ranking import (
    LocalRankingALS,
    SeenPairs,
    event_weights,
    gramian,
    implicit_half_step,
    learn_ranking_batch,
    probe_hits,
    reference_implicit_solve,
    sub_table,
)


def _table(vecs: np.ndarray, ids: list[str] | None = None) -> FactorTable:
    n, rank = vecs.shape
    ids = ids or [f"k{j}" for j in range(n)]
    t = FactorTable(rank)
    t.add_rows(ids, np.zeros(n, np.float32), vecs.astype(np.float32))
    return t


@pytest.mark.parametrize("scaling", ["constant", "count"])
def test_the_implicit_solve_equals_a_dense_solve_with_every_unobserved_cell(scaling):
    rng = np.random.default_rng(4)
    n_users, n_items, rank, alpha, lam = 5, 9, 3, 4.0, 0.3
    observed = rng.random((n_users, n_items)) < 0.35
    observed[:, 0] = True  # every user has a positive
    w = np.where(observed, rng.uniform(0.5, 3.0, (n_users, n_items)), 0.0)
    y = rng.normal(size=(n_items, rank)).astype(np.float32)
    # The dense textbook system: p = 1 on observed cells, confidence 1 + α·w there, 1 elsewhere.
    p = observed.astype(float)
    c = 1.0 + alpha * w
    reg = lam * observed.sum(axis=1) if scaling == "count" else np.full(n_users, lam)
    want = reference_implicit_solve(p, c, y.astype(np.float64), reg)

    users = _table(np.zeros((n_users, rank)))
    items = _table(y)
    u_rows, i_rows = np.nonzero(observed)
    conf = 1.0 + alpha * w[u_rows, i_rows]
    refused = implicit_half_step(u_rows, users, i_rows, items, conf, gramian(items.vec), lam, scaling)
    assert refused == 0
    np.testing.assert_allclose(users.vec, want, rtol=1e-4, atol=1e-5)
    assert users.touched.all()


def test_folded_statistics_make_two_batches_solve_like_one_batch_of_both():
    rng = np.random.default_rng(8)
    rank = 3
    params = ALSParams(ranking_rank=rank, ranking_iterations=1, ranking_reg_param=0.2,
                       ranking_reg_scaling="constant", maturity=0.0)
    y = rng.normal(size=(6, rank))
    items_all = _table(y)
    conf = 1.0 + rng.uniform(0.5, 2.0, 6)
    # One user, positives 0-2 in batch 1 and 3-5 in batch 2, items held fixed (solve users only).
    user = _table(np.zeros((1, rank)))
    for part in (slice(0, 3), slice(3, 6)):
        i_rows = np.arange(6)[part]
        implicit_half_step(np.zeros(3, dtype=np.int64), user, i_rows, items_all, conf[part],
                           gramian(items_all.vec), 0.2, "constant")
        from modeler.core.ranking import fold_implicit

        fold_implicit(np.zeros(3, dtype=np.int64), user, i_rows, items_all, conf[part])
    p = np.ones((1, 6))
    want = reference_implicit_solve(p, conf[None, :], items_all.vec.astype(np.float64), np.array([0.2]))
    np.testing.assert_allclose(user.vec[0], want[0], rtol=1e-4, atol=1e-5)
    _ = params


def _implicit_stream(n_users=90, n_items=120, groups=3, per_user=24, seed=0):
    """Users in ``groups`` clusters, each liking its own third of the items (planted)."""
    rng = np.random.default_rng(seed)
    rows = []
    t = 0
    for u in range(n_users):
        g = u % groups
        liked = np.arange(n_items)[np.arange(n_items) % groups == g]
        for i in rng.choice(liked, per_user, replace=False):
            rows.append((f"u{u}", f"i{i}", None, t, float(rng.integers(1, 20))))
            t += 1
    order = rng.permutation(len(rows))
    return [rows[j] for j in order], groups


def test_incremental_gramians_equal_recomputed_ones_after_many_batches():
    rows, _ = _implicit_stream()
    params = ALSParams(ranking_rank=6, reservoir_size=300, ranking_probe_size=32, ranking_history=0)
    model = LocalRankingALS(params)
    for start in range(0, len(rows), 90):  # 24 batches, with replay
        b = rows[start:start + 90]
        model.train([r[0] for r in b], [r[1] for r in b], np.full(len(b), np.nan),
                    np.array([r[4] for r in b]), np.array([r[3] for r in b]))
    assert model.batches == 24 and len(model.reservoir) > 0
    np.testing.assert_allclose(model.gram_users, gramian(model.users.vec), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(model.gram_items, gramian(model.items.vec), rtol=1e-9, atol=1e-9)


def test_a_planted_implicit_structure_is_recovered():
    rows, groups = _implicit_stream(seed=2)
    params = ALSParams(ranking_rank=8, ranking_alpha=2.0, reservoir_size=2000, ranking_probe_size=64)
    model = LocalStreamingALS(params)
    hits = probes = 0
    for start in range(0, len(rows), 200):
        res = model.train(rows[start:start + 200])
        hits, probes = hits + res.ranking_hits, probes + res.ranking_probes
    assert model.ratings_seen == 0  # implicit events never reach the rating model
    ranking = model.ranking
    precision = []
    for u in range(90):
        top = ranking.recommend(f"u{u}", 10)
        assert len(top) == 10
        precision.append(np.mean([int(i[1:]) % groups == u % groups for i in top]))
    # Random lists would be 1/3 right.
    assert np.mean(precision) > 0.95
    assert probes > 100 and hits / probes > 0.15  # 10 of ~40 unseen liked items: ~0.25 at best


def test_the_vectorised_weights_follow_common_feedback():
    scale = RatingScale(min=0.5, max=5.0)
    for weighting in (Weighting(), Weighting(liked=0.6, slope=2.0, low_weight=0.25),
                      Weighting(implicit="linear")):
        ratings = np.arange(0.5, 5.01, 0.5)
        got = event_weights(ratings, np.full(len(ratings), np.nan), weighting, scale.min, scale.max)
        want = [weighting.rating_weight(r, scale) for r in ratings]
        np.testing.assert_allclose(got, want)
        plays = np.array([0.0, 1.0, 7.0, 300.0])
        got = event_weights(np.full(4, np.nan), plays, weighting, scale.min, scale.max)
        np.testing.assert_allclose(got, [weighting.implicit_weight(v) for v in plays])


def test_ratings_feed_both_models_and_low_ratings_are_not_positives():
    params = ALSParams(rank=2, ranking_rank=3, reservoir_size=0)
    model = LocalStreamingALS(params)
    res = model.train([("a", "x", 5.0, 1), ("a", "y", 1.0, 2), ("b", "x", 4.0, 3),
                       ("b", "z", None, 4, 3.0), ("c", "z", None, 5, -1.0)])
    assert (res.n_ratings, res.n_implicit, res.n_rejected, res.ranking_positives) == (3, 1, 1, 3)
    assert model.ratings_seen == 3 and sorted(model.items.ids) == ["x", "y"]
    # "y" was rated 1: seen, not a positive; "z" came from a play.
    assert sorted(model.ranking_items.ids) == ["x", "z"]
    assert sorted(model.ranking_users.ids) == ["a", "b"]
    assert model.ranking.seen.contains(["a"], ["y"]).all()


def test_the_probe_excludes_seen_items_and_counts_ties_against_the_target():
    items = np.array([[1.0], [2.0], [3.0]])
    h = np.array([10, 11, 12], dtype=np.uint64)
    user = np.array([[1.0]])
    # Target row 0 scores lowest; with k=1 it hits only when both better items are seen.
    assert probe_hits(user, items, h, np.array([0]), [np.array([11, 12], np.uint64)], k=1) == 1
    assert probe_hits(user, items, h, np.array([0]), [np.array([12], np.uint64)], k=1) == 0
    assert probe_hits(user, items, h, np.array([0]), [np.array([10], np.uint64)], k=3) == 0  # seen
    assert probe_hits(user, np.array([[1.0], [1.0]]), h[:2], np.array([0]), [np.zeros(0, np.uint64)], k=1) == 0
    seen = SeenPairs().added(["u", "u", "v"], ["a", "b", "a"])
    assert len(seen) == 3 and seen.contains(["u", "v", "v"], ["b", "a", "b"]).tolist() == [True, True, False]


def test_a_non_finite_solve_keeps_the_row_and_the_gramian_stays_exact():
    params = ALSParams(ranking_rank=2, ranking_iterations=1, ranking_reg_param=0.0,
                       ranking_reg_scaling="constant")
    users = _table(np.array([[0.1, 0.2]]))
    items = _table(np.array([[np.inf, 0.0]]))
    before = users.vec.copy()
    out = learn_ranking_batch(params, 1, np.array([2.0]), np.array([0]), np.array([0]),
                              sub_table(users, np.array([0])), sub_table(items, np.array([0])),
                              np.array([True]), np.array([True]), gramian(before),
                              np.zeros((2, 2)))
    assert out.refused >= 1
    np.testing.assert_array_equal(users.vec, before)


# ---------------------------------------------------------------------------------------------
# The bounded per-key history (ranking_history > 0)
# ---------------------------------------------------------------------------------------------


def test_histories_keep_the_newest_entries_and_evict_the_oldest_in_any_input_order():
    from modeler.core.ranking import KeyHistory, canonical_order, extend_histories

    users = np.array(["u1", "u2", "u1", "u1", "u2", "u1"])
    items = np.array(["a", "b", "c", "d", "e", "f"])
    stamps = np.array([1, 2, 3, 4, 5, 6])
    conf = np.array([2, 3, 4, 5, 6, 7], dtype=np.float32)
    old = KeyHistory({"u1": np.array(["z"])}, {"u1": np.array([9.0], dtype=np.float32)})
    results = []
    for perm in (np.arange(6), np.array([5, 3, 1, 0, 4, 2])):
        u, i, t, c = users[perm], items[perm], stamps[perm], conf[perm]
        o = canonical_order(u, i, t, c)
        results.append(extend_histories(old, u[o], i[o], c[o], cap=3))
    for ext in results:
        got = dict(zip(ext.keys, (p.tolist() for p in ext.partners), strict=True))
        assert got == {"u1": ["c", "d", "f"], "u2": ["b", "e"]}
        assert ext.ev_keys.tolist() == ["u1", "u1"] and ext.ev_partners.tolist() == ["z", "a"]
        assert ext.ev_conf.tolist() == [9.0, 2.0]
    assert old.of("u1")[0].tolist() == ["z"]  # the input history is not mutated


def test_histories_survive_pickling_flat_with_the_same_entries():
    import pickle

    from modeler.core.ranking import KeyHistory

    hist = KeyHistory({"u1": np.array(["a", "bbbb"]), "u22": np.array(["c"]), "u3": np.zeros(0, dtype=str)},
                      {"u1": np.array([2.0, 3.5], dtype=np.float32), "u22": np.array([4.0], dtype=np.float32),
                       "u3": np.zeros(0, dtype=np.float32)})
    for h in (hist, KeyHistory()):
        back = pickle.loads(pickle.dumps(h))
        assert list(back.partners) == list(h.partners) and list(back.conf) == list(h.conf)
        for k in h.partners:
            assert back.partners[k].tolist() == h.partners[k].tolist()
            assert back.conf[k].tolist() == h.conf[k].tolist() and back.conf[k].dtype == np.float32
        assert back.entries() == h.entries()


def test_a_key_with_its_whole_history_is_solved_exactly_against_todays_partners():
    # One pass per batch: the second batch's users see both batches' positives, solved
    # against the item vectors as the first batch left them (newcomers at their start).
    rank, alpha, lam = 3, 2.0, 0.1
    params = ALSParams(ranking_rank=rank, ranking_iterations=1, ranking_alpha=alpha,
                       ranking_reg_param=lam, ranking_history=50, ranking_sweep=0.0,
                       ranking_probe_size=0)
    model = LocalRankingALS(params)
    rng = np.random.default_rng(3)
    b1 = [(f"u{rng.integers(6)}", f"i{rng.integers(10)}") for _ in range(40)]
    b2 = [(f"u{rng.integers(6)}", f"i{rng.integers(14)}") for _ in range(40)]

    def train(batch, t0):
        n = len(batch)
        model.train([u for u, _ in batch], [i for _, i in batch], np.full(n, np.nan),
                    np.full(n, 3.0), np.arange(t0, t0 + n))

    train(b1, 0)
    from modeler.core.ranking import ensure_ranking_rows

    before = LocalRankingALS(params)
    before.items = sub_table(model.items, np.arange(len(model.items)))
    before.items.ids, before.items.index = list(model.items.ids), dict(model.items.index)
    ensure_ranking_rows(before.items, [i for _, i in b2], params)
    train(b2, 100)
    w = np.log1p(3.0)
    y = before.items.vec.astype(np.float64)
    pairs = b1 + b2
    for u in sorted({u for u, _ in b2}):
        cells = [before.items.index[i] for uu, i in pairs if uu == u]
        p = np.zeros((1, len(y)))
        c = np.ones((1, len(y)))
        for j in cells:  # a repeated pair is two entries: c − 1 and c add up
            p[0, j] = 1.0
            c[0, j] += alpha * w
        conf_sum = np.zeros(len(y))
        np.add.at(conf_sum, cells, 1.0 + alpha * w)
        lhs = y.T @ y + (y.T * (c[0] - 1.0)) @ y + lam * len(cells) * np.eye(rank)
        want = np.linalg.solve(lhs, y.T @ conf_sum)
        np.testing.assert_allclose(model.users.vec[model.users.index[u]], want, rtol=1e-4, atol=1e-5)
    assert model.users.mass.sum() == 0  # nothing evicted: no statistics


def test_the_history_model_keeps_its_gramians_exact_and_its_histories_capped():
    params = ALSParams(ranking_rank=4, ranking_history=5, ranking_sweep=3.0, ranking_probe_size=0)
    model = LocalRankingALS(params)
    rng = np.random.default_rng(11)
    for b in range(12):
        n = 120
        model.train([f"u{x}" for x in rng.integers(0, 15, n)], [f"i{x}" for x in rng.integers(0, 40, n)],
                    np.full(n, np.nan), np.full(n, 1.0), np.arange(b * n, (b + 1) * n))
    np.testing.assert_allclose(model.gram_users, gramian(model.users.vec), atol=1e-9)
    np.testing.assert_allclose(model.gram_items, gramian(model.items.vec), atol=1e-9)
    assert max(len(v) for v in model.user_history.partners.values()) == 5
    # Every positive is in a history or folded into the statistics, exactly once (items take
    # users at full weight, so their statistics' mass counts the evicted entries).
    assert model.item_entries + model.items.mass.sum() == model.positives_seen
    assert model.user_entries == model.user_history.entries() < model.positives_seen
    assert (model.users.mass > 0).sum() == sum(n > 5 for n in model.users.count.tolist())


def test_bad_history_parameters_are_refused_by_name():
    with pytest.raises(ValueError, match="ranking_history"):
        ALSParams(ranking_history=-1)
    with pytest.raises(ValueError, match="ranking_sweep"):
        ALSParams(ranking_sweep=float("nan"))
