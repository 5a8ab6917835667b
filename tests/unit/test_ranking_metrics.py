"""Ranking metrics against hand computations and brute force."""

import math

import numpy as np
import pytest

from modeler.core.ranking_metrics import (
    ItemPairs,
    UserItems,
    cooccurrence_top_k,
    cosine_top_k,
    liked_pairs,
    pair_hit_rate,
    popular_top_k,
    ranking_scores,
    relevance_threshold,
    top_k,
)


def _ui(pairs, n_rows):
    rows = np.array([p[0] for p in pairs], dtype=np.int64)
    cols = np.array([p[1] for p in pairs], dtype=np.int64)
    return UserItems.from_pairs(rows, cols, n_rows)


def test_user_items_table_sorts_dedups_and_transposes():
    t = _ui([(1, 5), (0, 3), (1, 2), (1, 5), (3, 0)], 4)
    assert t.of(0).tolist() == [3] and t.of(1).tolist() == [2, 5] and t.of(2).tolist() == []
    assert t.counts().tolist() == [1, 2, 0, 1]
    owner, items = t.gather(np.array([1, 3, 2]))
    assert owner.tolist() == [0, 0, 1] and items.tolist() == [2, 5, 0]
    back = t.transpose(6)
    assert back.of(5).tolist() == [1] and back.of(0).tolist() == [3] and back.of(3).tolist() == [0]


def test_hand_computed_metrics():
    # user 0: relevant {1, 3}, list [1, 2, 3] -> hits 1 0 1
    # user 1: relevant {5},    list [0, 4, 5] -> hits 0 0 1
    # user 2: nothing relevant -> not evaluated
    relevant = _ui([(0, 1), (0, 3), (1, 5)], 3)
    recs = np.array([[1, 2, 3], [0, 4, 5], [7, 8, 9]])
    s = ranking_scores(recs, np.array([0, 1, 2]), relevant, n_catalogue=10)
    assert s.users == 2 and s.k == 3
    assert s.precision == pytest.approx((2 / 3 + 1 / 3) / 2)
    assert s.recall == pytest.approx((2 / 2 + 1 / 1) / 2)
    ndcg0 = (1 + 1 / math.log2(4)) / (1 + 1 / math.log2(3))
    ndcg1 = (1 / math.log2(4)) / 1.0
    assert s.ndcg == pytest.approx((ndcg0 + ndcg1) / 2)
    ap0 = (1 / 1 + 2 / 3) / 2
    ap1 = (1 / 3) / 1
    assert s.map == pytest.approx((ap0 + ap1) / 2)
    # Coverage over the evaluated users' lists: {0, 1, 2, 3, 4, 5} of 10 items.
    assert s.coverage == pytest.approx(0.6)


def test_perfect_and_empty_lists():
    relevant = _ui([(0, 4), (0, 2)], 1)
    perfect = ranking_scores(np.array([[2, 4, 0]]), np.array([0]), relevant, 5)
    assert (perfect.ndcg, perfect.map, perfect.recall) == (pytest.approx(1.0), pytest.approx(1.0), 1.0)
    # Padding (-1) never hits, even where -1 would collide with another user's key.
    none = ranking_scores(np.array([[-1, -1, -1]]), np.array([0]), relevant, 5)
    assert none.ndcg == 0.0 and none.precision == 0.0 and none.coverage == 0.0


def test_top_k_excludes_training_items_and_matches_brute_force():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(37, 4))
    y = rng.normal(size=(53, 4))
    bias = rng.normal(size=53)
    seen = _ui([(u, i) for u in range(37) for i in rng.choice(53, size=rng.integers(0, 20), replace=False)], 37)
    # A tiny block budget forces many blocks; the answer must not depend on it.
    got = top_k(x, y, 7, seen, bias, block_floats=100)
    assert np.array_equal(got, top_k(x, y, 7, seen, bias))
    scores = (x @ y.T + bias).astype(np.float32)
    for u in range(37):
        s = scores[u].copy()
        s[seen.of(u)] = -np.inf
        assert got[u].tolist() == np.argsort(-s, kind="stable")[:7].tolist()
        assert not set(got[u].tolist()) & set(seen.of(u).tolist())


def test_top_k_pads_when_everything_is_excluded_and_takes_a_user_subset():
    y = np.eye(3)
    x = np.array([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
    seen = _ui([(0, 2), (0, 1), (1, 0), (1, 1), (1, 2)], 2)
    got = top_k(x, y, 4, seen)
    assert got.tolist() == [[0, -1, -1, -1], [-1, -1, -1, -1]]
    assert top_k(x, y, 2, None, users=np.array([1])).tolist() == [[0, 1]]


def test_popular_list_is_the_same_for_all_minus_own_items():
    counts = np.array([5.0, 9.0, 1.0, 7.0])
    seen = _ui([(1, 1)], 2)
    got = popular_top_k(counts, np.array([0, 1]), 2, seen)
    assert got.tolist() == [[1, 3], [3, 0]]


@pytest.mark.parametrize(("lo", "hi", "want"),
                         [(0.5, 5.0, 4.0), (1, 10, 8.0), (0, 10, 70 / 9), (1, 5, 1 + 4 * 3.5 / 4.5)])
def test_relevance_threshold_keeps_the_relative_position(lo, hi, want):
    assert relevance_threshold(lo, hi) == pytest.approx(want)


def test_cosine_neighbours_by_hand():
    y = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [-1.0, 0.0], [10.0, 0.5]])
    got = cosine_top_k(y, np.array([0, 2]), k=2)
    # Item 0: item 4 (cos 0.9988) then 1 (0.9939); itself excluded. Item 2: item 1, then 4.
    assert got.tolist() == [[4, 1], [1, 4]]


def test_cooccurrence_neighbours_by_hand():
    # users: 0 {0,1,2}, 1 {0,1}, 2 {0,3}, 3 {3}
    train = _ui([(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (2, 0), (2, 3), (3, 3)], 4)
    got = cooccurrence_top_k(train, 5, np.array([0, 4]), k=3)
    # Item 0: item 1 twice, then 2 and 3 once each (3 is more popular: 2 users) .
    assert got[0].tolist() == [1, 3, 2]
    # Item 4 is co-held with nothing: the popularity order (0: 3 users, then 1 and 3: 2 each).
    assert got[1].tolist() == [0, 1, 3]


def test_liked_pairs_enumerate_every_ordered_pair_or_a_sample():
    liked = _ui([(0, 4), (0, 7), (0, 9), (1, 2), (2, 1), (2, 3)], 3)
    pairs = liked_pairs(liked, max_pairs=100)
    got = sorted(zip(pairs.a.tolist(), pairs.b.tolist(), strict=True))
    assert got == sorted([(4, 7), (4, 9), (7, 4), (7, 9), (9, 4), (9, 7), (1, 3), (3, 1)])
    sample = liked_pairs(liked, max_pairs=5, seed=1)
    assert len(sample.a) == 5 and len(set(zip(sample.a.tolist(), sample.b.tolist(), strict=True))) == 5
    assert set(zip(sample.a.tolist(), sample.b.tolist(), strict=True)) <= set(got)


def test_pair_hit_rate_by_hand():
    neighbours = np.array([[1, 2], [0, 3]])
    queries = np.array([5, 0])  # row 0 belongs to item 5, row 1 to item 0
    pairs = ItemPairs(np.array([5, 5, 0, 0, 9]), np.array([2, 7, 3, 4, 1]))
    # (5,2) hit, (5,7) miss, (0,3) hit, (0,4) miss; (9,1) has no neighbour list: not counted.
    assert pair_hit_rate(neighbours, queries, pairs) == pytest.approx(0.5)
