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
