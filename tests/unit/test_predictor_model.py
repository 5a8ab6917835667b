"""The predictor's maths on small planted matrices whose answers numpy computes directly."""

from __future__ import annotations

import numpy as np
import pytest

from predictor.model import FactorModel, recommend, recommend_batch, top_k, top_k_columns


def brute_top(scores: np.ndarray, k: int) -> list[int]:
    finite = np.flatnonzero(np.isfinite(scores))
    return finite[np.argsort(-scores[finite], kind="stable")][:k].tolist()


@pytest.mark.parametrize("n", [1, 7, 255, 256, 1000, 5003, 20000])
@pytest.mark.parametrize("k", [1, 10, 100])
def test_top_k_matches_full_sort(n: int, k: int) -> None:
    rng = np.random.default_rng(n * 1000 + k)
    scores = rng.normal(size=n).astype(np.float32)
    scores[rng.choice(n, size=n // 3, replace=False)] = -np.inf  # excluded items
    rows, vals = top_k(scores, k)
    assert rows.tolist() == brute_top(scores, k)
    assert np.array_equal(vals, scores[rows])


def test_top_k_with_ties_and_all_excluded() -> None:
    scores = np.zeros(5000, np.float32)
    scores[[3, 4000]] = 1.0
    rows, _ = top_k(scores, 10)
    assert rows[:2].tolist() == [3, 4000] and len(rows) == 10
    assert len(top_k(np.full(5000, -np.inf, np.float32), 10)[0]) == 0


def test_top_k_columns_matches_per_column() -> None:
    rng = np.random.default_rng(1)
    scores = rng.normal(size=(9001, 7)).astype(np.float32)
    scores[rng.choice(9001, 500), 2] = -np.inf
    ks = [1, 10, 10, 50, 3, 10, 20]
    for j, (rows, vals) in enumerate(top_k_columns(scores, ks)):
        assert rows.tolist() == brute_top(scores[:, j], ks[j])
        assert np.array_equal(vals, scores[rows, j])


def planted(n_items: int = 3000, rank: int = 8, seed: int = 0) -> FactorModel:
    rng = np.random.default_rng(seed)
    return FactorModel.build(
        item_ids=[f"i{k}" for k in range(n_items)],
        item_bias=rng.normal(0, 0.3, n_items), item_factors=rng.normal(0, 0.5, (n_items, rank)),
        version=1, rank=rank, mu=3.5, reg_param=0.05,
    )


def test_recommend_is_the_formula_with_exclusions_and_candidates() -> None:
    m = planted()
    rng = np.random.default_rng(2)
    u, bu = rng.normal(0, 0.5, m.rank).astype(np.float32), 0.2
    raw = 3.5 + bu + m.item_bias.astype(np.float64) + m.item_factors.astype(np.float64) @ u
    exclude = rng.choice(m.n_items, 40, replace=False)
    rows, vals = recommend(m, bu, u, 10, exclude=exclude)
    masked = raw.copy()
    masked[exclude] = -np.inf
    assert rows.tolist() == brute_top(masked, 10)
    assert np.allclose(vals, raw[rows], atol=1e-4)
    cands = np.array([5, 6, 7, 8, 9, 10, 11])
    rows, _ = recommend(m, bu, u, 3, exclude=np.array([5]), candidates=cands)
    expected = sorted([6, 7, 8, 9, 10, 11], key=lambda r: -raw[r])[:3]
    assert rows.tolist() == expected


def test_predict_lists_is_the_clipped_formula_per_user() -> None:
    m = planted(n_items=500, rank=6, seed=7)
    rng = np.random.default_rng(8)
    users = [(0.4, rng.normal(0, 2.0, 6).astype(np.float32), rng.choice(500, 10, replace=False)),
             (-0.3, None, np.array([3, 1, 4])),
             (0.0, rng.normal(0, 0.5, 6).astype(np.float32), np.empty(0, np.int64)),
             (2.5, rng.normal(0, 0.5, 6).astype(np.float32), np.array([7]))]
    got = m.predict_lists(users)
    assert len(got) == len(users)
    for (bias, vec, rows), values in zip(users, got, strict=True):
        factors = m.item_factors[rows].astype(np.float64) @ vec if vec is not None else 0.0
        raw = 3.5 + bias + m.item_bias[rows].astype(np.float64) + factors
        assert np.allclose(values, np.clip(raw, 0.5, 5.0), atol=1e-5)
        assert np.allclose(values, m.predict_rows(bias, vec, rows), atol=1e-6)
    clipped = np.concatenate(got)
    assert clipped.min() >= 0.5 and clipped.max() <= 5.0 and (clipped == 5.0).any()


def test_recommend_batch_equals_one_by_one() -> None:
    m = planted(n_items=12000, rank=16, seed=3)
    rng = np.random.default_rng(4)
    users = [(float(rng.normal()), rng.normal(0, 0.5, 16).astype(np.float32), int(n),
              rng.choice(m.n_items, 30, replace=False) if j % 2 else None)
             for j, n in enumerate([10, 10, 1, 100, 10])]
    batch = recommend_batch(m, users)
    for (bias, vec, n, exclude), (rows, vals) in zip(users, batch, strict=True):
        one_rows, one_vals = recommend(m, bias, vec, n, exclude=exclude)
        assert rows.tolist() == one_rows.tolist()
        assert np.allclose(vals, one_vals, atol=1e-4)


def test_fold_in_recovers_a_planted_user() -> None:
    m = planted(n_items=500, rank=4, seed=5)
    rng = np.random.default_rng(6)
    u, bu = rng.normal(0, 0.7, 4), 0.3
    rows = rng.choice(m.n_items, 60, replace=False)
    r = 3.5 + bu + m.item_bias[rows] + m.item_factors[rows].astype(np.float64) @ u
    m.reg_param = 1e-4  # with almost no shrinkage the exact vector comes back
    bias, vec = m.fold_in(rows, r)
    assert bias == pytest.approx(bu, abs=1e-2)
    assert np.allclose(vec, u, atol=1e-2)
    m.reg_param = 0.5  # more λ: shorter vector, same direction
    _, shrunk = m.fold_in(rows, r)
    assert np.linalg.norm(shrunk) < np.linalg.norm(u)
    assert float(shrunk @ u) / (np.linalg.norm(shrunk) * np.linalg.norm(u)) > 0.95


def test_delta_equals_full_rebuild_and_leaves_the_old_model_alone() -> None:
    m = planted(n_items=100, rank=3, seed=7)
    before = m.item_aug.copy()
    ids = ["i5", "new"]
    biases = np.array([1.0, -1.0], np.float32)
    vecs = np.array([[1, 2, 3], [4, 5, 6]], np.float32)
    d = m.with_item_delta(ids, biases, vecs, version=2)
    assert np.array_equal(m.item_aug, before) and m.version == 1
    assert d.version == 2 and d.n_items == 101 and d.index["new"] == 100
    assert d.index == {item: row for row, item in enumerate(d.item_ids)}
    assert "new" not in m.index and len(m.item_ids) == 100
    assert np.array_equal(d.item_factors[5], vecs[0]) and d.item_bias[100] == -1.0
    assert d.item_aug[100, 3] == pytest.approx(3.5 - 1.0)
    assert np.array_equal(d.item_factors[:5], m.item_factors[:5])


def test_similar_is_cosine_without_the_item_itself() -> None:
    m = planted(n_items=300, rank=5, seed=8)
    f = m.item_factors.astype(np.float64)
    unit = f / np.linalg.norm(f, axis=1, keepdims=True)
    cos = unit @ unit[17]
    cos[17] = -np.inf
    rows, vals = m.similar(17, 5)
    assert rows.tolist() == brute_top(cos, 5)
    assert np.allclose(vals, cos[rows], atol=1e-5)


@pytest.mark.parametrize("n", [20000, 20001, 20063])  # with and without a tail block
def test_top_k_columns_ties_at_the_cut_tail_and_exclusions(n: int) -> None:
    rng = np.random.default_rng(n)
    # Few distinct values: many exact ties at every cut, decided by the lower row.
    scores = rng.integers(0, 40, size=(n, 6)).astype(np.float32)
    scores[-1, 0] = 100.0  # the best item of column 0 sits in the tail block (if any)
    scores[rng.choice(n, n - 5, replace=False), 3] = -np.inf  # only 5 finite in column 3
    scores[:, 4] = -np.inf  # nothing left to recommend
    ks = [10, 0, 50, 10, 10, 1]
    for j, (rows, vals) in enumerate(top_k_columns(scores, ks)):
        assert rows.tolist() == brute_top(scores[:, j], ks[j])
        assert np.array_equal(vals, scores[rows, j])
    assert top_k_columns(scores, ks)[0][0][0] == n - 1


def test_top_k_breaks_ties_by_row_on_every_path() -> None:
    scores = np.zeros(30000, np.float32)
    scores[[7, 20000]] = 2.0
    assert top_k(scores, 5)[0].tolist() == [7, 20000, 0, 1, 2]
    small = np.zeros(100, np.float32)  # the short-array path
    assert top_k(small, 3)[0].tolist() == [0, 1, 2]
    two = np.stack([scores, scores[::-1]], axis=1)
    assert [r.tolist() for r, _ in top_k_columns(two, [3, 3])] == [[7, 20000, 0], [9999, 29992, 0]]


def test_recommend_batch_mixing_short_and_long_lists_is_brute_force() -> None:
    m = planted(n_items=30011, rank=8, seed=9)  # 30011: a tail block after the full ones
    rng = np.random.default_rng(10)
    ns = [10, 1, 200, 10, 5, 1000]  # 200 and 1000 are too many for the block prefilter
    users = [(float(rng.normal()), rng.normal(0, 0.5, 8).astype(np.float32), n,
              rng.choice(m.n_items, 300, replace=False) if j % 2 == 0 else None)
             for j, n in enumerate(ns)]
    x = np.vstack([np.array([u[1] for u in users]).T, np.ones((1, len(users)), np.float32)])
    scores = m.item_aug @ x  # the very product recommend_batch ranks
    for j, (rows, vals) in enumerate(recommend_batch(m, users)):
        column = scores[:, j].copy()
        if users[j][3] is not None:
            column[users[j][3]] = -np.inf
        assert rows.tolist() == brute_top(column, ns[j])
        assert np.array_equal(vals, column[rows] + np.float32(users[j][0]))


# ---------------------------------------------------------------------- the ranking model


def dense_ials_user(y: np.ndarray, pos: np.ndarray, w: np.ndarray, alpha: float, lam: float) -> np.ndarray:
    """The textbook solve with every cell materialised (unobserved cells: p = 0, c = 1):
    x = (Yᵀ C Y + λ I)⁻¹ Yᵀ C p."""
    n, r = y.shape
    c = np.ones(n)
    p = np.zeros(n)
    c[pos] = 1.0 + alpha * w
    p[pos] = 1.0
    y64 = y.astype(np.float64)
    return np.linalg.solve(y64.T @ (c[:, None] * y64) + lam * np.eye(r), y64.T @ (c * p))


def ranked_model(n_items: int = 2000, rank: int = 12, seed: int = 5, reg: float = 0.05,
                 alpha: float = 2.0) -> FactorModel:
    from common.feedback import Weighting
    from predictor.model import RankingSet

    rng = np.random.default_rng(seed)
    y = rng.normal(0, 0.3, (n_items, rank)).astype(np.float32)
    ranking = RankingSet.build(y, reg_param=reg, alpha=alpha, weighting=Weighting(slope=2.0))
    return FactorModel.build(
        item_ids=[f"i{k}" for k in range(n_items)], item_bias=rng.normal(0, 0.3, n_items),
        item_factors=rng.normal(0, 0.5, (n_items, 8)), version=1, rank=8, mu=3.5, ranking=ranking)


def test_ranking_fold_in_equals_the_dense_solve_unobserved_cells_included() -> None:
    m = ranked_model()
    assert m.ranking is not None
    rng = np.random.default_rng(1)
    rows = rng.choice(m.n_items, 25, replace=False)
    w = rng.uniform(0, 3, 25)
    w[:5] = 0.0  # seen, not liked: no positive
    x = m.ranking.fold_in(rows, w)
    pos = w > 0
    lam = m.ranking.reg_param * pos.sum()  # λ·n_u, the modeler's default scaling
    expected = dense_ials_user(m.ranking.factors, rows[pos], w[pos], m.ranking.alpha, lam)
    assert x is not None and np.allclose(x, expected, rtol=1e-4, atol=1e-5)
    assert m.ranking.fold_in(rows[:5], w[:5]) is None  # no positive at all


def test_fold_in_visitor_who_behaves_like_an_existing_user_gets_their_list() -> None:
    """#13's Done-when: an existing user u was trained on their ratings (their vector is the
    iALS solution of them); a visitor who sends the same ratings gets u's list."""
    from common.schema import RatingScale
    from predictor.model import BY_RANKING

    m = ranked_model()
    assert m.ranking is not None
    rng = np.random.default_rng(9)
    scale = RatingScale(min=0.5, max=5.0)
    rated_rows = rng.choice(m.n_items, 30, replace=False)
    ratings = rng.choice(np.arange(1, 11) / 2, 30)
    ratings[:3] = [5.0, 4.5, 4.0]  # some positives whatever the draw
    w = np.array([m.ranking.weighting.rating_weight(r, scale) for r in ratings])
    pos = w > 0
    # The existing user, as the modeler would have solved them (dense reference solve).
    x_user = dense_ials_user(m.ranking.factors, rated_rows[pos], w[pos], m.ranking.alpha,
                             m.ranking.reg_param * pos.sum()).astype(np.float32)
    users_list, _ = recommend(m, 0.0, x_user, 10, exclude=rated_rows, by=BY_RANKING)
    x_visitor = m.ranking.fold_in(rated_rows, w)
    visitor_list, scores = recommend(m, 0.0, x_visitor, 10, exclude=rated_rows, by=BY_RANKING)
    assert visitor_list.tolist() == users_list.tolist()
    assert np.all(np.diff(scores) <= 0)
    # And it is a list of its own: another user with other ratings gets another one.
    other = m.ranking.fold_in(rng.choice(m.n_items, 30, replace=False), np.ones(30))
    assert recommend(m, 0.0, other, 10, exclude=rated_rows, by=BY_RANKING)[0].tolist() != users_list.tolist()


def test_ranking_batch_matches_one_by_one_and_brute_force() -> None:
    from predictor.model import BY_RANKING

    m = ranked_model()
    assert m.ranking is not None
    rng = np.random.default_rng(4)
    users = [(0.0, rng.normal(0, 1, m.ranking.rank).astype(np.float32), k, rng.choice(m.n_items, 20))
             for k in (1, 10, 10, 37)]
    batched = recommend_batch(m, users, by=BY_RANKING)
    for (_, x, k, ex), (rows, vals) in zip(users, batched, strict=True):
        assert np.allclose(vals, m.ranking.factors[rows] @ x, atol=1e-5)
        scores = m.ranking.factors.astype(np.float64) @ x.astype(np.float64)
        scores[ex] = -np.inf
        assert rows.tolist() == brute_top(scores, k)
        single = recommend(m, 0.0, x, k, exclude=ex, by=BY_RANKING)
        assert single[0].tolist() == rows.tolist()


def test_delta_items_keep_the_gramian_equal_to_a_recomputed_one() -> None:
    m = ranked_model(n_items=500)
    rng = np.random.default_rng(3)
    for step in range(30):
        ids = [f"i{k}" for k in rng.choice(500, 40, replace=False)] + [f"new{step}-{k}" for k in range(3)]
        ids.append(ids[0])  # a duplicate in one delta: the last record wins
        vectors = rng.normal(0, 0.3, (len(ids), m.ranking.rank)).astype(np.float32)  # type: ignore[union-attr]
        m = m.with_item_delta([], np.zeros(0), np.zeros((0, m.rank)), ids, vectors)
    assert m.ranking is not None and m.n_items == 500 + 90
    y = m.ranking.factors.astype(np.float64)
    assert np.allclose(m.ranking.gram, y.T @ y, rtol=1e-6, atol=1e-6)
    assert m.item_aug.shape == (m.n_items, m.rank + 1)  # explicit rows follow the union


def test_similar_uses_the_ranking_vectors_when_present() -> None:
    m = ranked_model(n_items=300)
    assert m.ranking is not None
    y = m.ranking.factors.astype(np.float64)
    unit = y / np.linalg.norm(y, axis=1, keepdims=True)
    cos = unit @ unit[7]
    cos[7] = -np.inf
    rows, _ = m.similar(7, 5)
    assert rows.tolist() == brute_top(cos, 5)
