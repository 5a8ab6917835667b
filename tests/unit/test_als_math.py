"""The streaming ALS maths (modeler.core.als_math): no Spark, no services."""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest

from common.synthetic import generate
from modeler.core.als_math import (
    ALSParams,
    FactorTable,
    LocalStreamingALS,
    Reservoir,
    apply_update,
    fold_statistics,
    init_factors,
    keep_fraction,
    learn_batch,
    partition_of,
    rating_priority,
    reference_batch_pass,
    reference_sgd_step,
    rls_half_step,
    rmse,
    second_moment,
    seed_statistics,
    step_sizes,
    validate_arrays,
)


def test_one_step_equals_the_seeds_formulas_on_hand_made_numbers():
    # r̂ = 3 + 0.1 − 0.2 + (0.5·0.2 − 0.1·0.4) = 2.96, ε = 4 − 2.96 = 1.04; γ = 0.1, λ = 0.05, λ_b = 0.02
    user, item, eps = reference_sgd_step(3.0, 4.0, (0.1, [0.5, -0.1]), (-0.2, [0.2, 0.4]),
                                         learning_rate=0.1, reg_param=0.05, reg_bias=0.02)
    assert eps == pytest.approx(1.04)
    assert user[0] == pytest.approx(0.1 + 0.1 * (1.04 - 0.02 * 0.1))       # 0.2038
    assert item[0] == pytest.approx(-0.2 + 0.1 * (1.04 + 0.02 * 0.2))      # -0.0956
    assert user[1] == pytest.approx([0.5183, -0.0579])
    assert item[1] == pytest.approx([0.251, 0.3876])

    # The vectorised path (one rating, seeds' summed aggregation, one pass) agrees.
    params = ALSParams(rank=2, iterations=1, learning_rate=0.1, reg_param=0.05, reg_bias=0.02,
                       aggregation="sum", vector_step="sgd")
    ub, uv = np.array([0.1], np.float32), np.array([[0.5, -0.1]], np.float32)
    ib, iv = np.array([-0.2], np.float32), np.array([[0.2, 0.4]], np.float32)
    sse, refused = learn_batch(params, 3.0, 3.0, 1, np.array([4.0]), np.array([0]), np.array([0]),
                               ub, uv, ib, iv)
    assert refused == 0
    assert sse == pytest.approx(1.04 ** 2, rel=1e-6)
    np.testing.assert_allclose([ub[0], *uv[0]], [0.2038, 0.5183, -0.0579], atol=1e-6)
    np.testing.assert_allclose([ib[0], *iv[0]], [-0.0956, 0.251, 0.3876], atol=1e-6)


@pytest.mark.parametrize("aggregation", ["sum", "mean", "damped"])
def test_vectorised_pass_matches_the_per_rating_reference(aggregation):
    rng = np.random.default_rng(3)
    rank, n_users, n_items, n = 4, 7, 9, 60
    users = {f"u{k}": (float(rng.normal(0, .3)), rng.normal(0, .3, rank).tolist()) for k in range(n_users)}
    items = {f"i{k}": (float(rng.normal(0, .3)), rng.normal(0, .3, rank).tolist()) for k in range(n_items)}
    ratings = [(f"u{rng.integers(n_users)}", f"i{rng.integers(n_items)}", float(rng.integers(1, 11) / 2))
               for _ in range(n)]
    params = ALSParams(rank=rank, iterations=1, learning_rate=0.05, reg_param=0.1, reg_bias=0.03,
                       vector_step="sgd",
                       aggregation=aggregation)
    u_ids, i_ids = sorted(users), sorted(items)
    ub = np.array([users[k][0] for k in u_ids], np.float32)
    uv = np.array([users[k][1] for k in u_ids], np.float32)
    ib = np.array([items[k][0] for k in i_ids], np.float32)
    iv = np.array([items[k][1] for k in i_ids], np.float32)
    # The reference starts from the same float32-rounded values.
    users = {k: (float(ub[j]), uv[j].astype(float).tolist()) for j, k in enumerate(u_ids)}
    items = {k: (float(ib[j]), iv[j].astype(float).tolist()) for j, k in enumerate(i_ids)}
    ref_u, ref_i, _ = reference_batch_pass(3.5, ratings, users, items, 0.05, 0.1, 0.03, aggregation)
    ur = np.array([u_ids.index(u) for u, _, _ in ratings])
    ir = np.array([i_ids.index(i) for _, i, _ in ratings])
    learn_batch(params, 3.5, 3.5, n, np.array([r for _, _, r in ratings]), ur, ir, ub, uv, ib, iv)
    for j, k in enumerate(u_ids):
        assert ub[j] == pytest.approx(ref_u[k][0], abs=1e-5)
        np.testing.assert_allclose(uv[j], ref_u[k][1], atol=1e-5)
    for j, k in enumerate(i_ids):
        assert ib[j] == pytest.approx(ref_i[k][0], abs=1e-5)
        np.testing.assert_allclose(iv[j], ref_i[k][1], atol=1e-5)


def test_damped_step_is_gamma_for_one_rating_and_never_beyond_newton():
    eta = step_sizes(np.array([1, 2, 10, 1000]), 0.1, "damped")
    assert eta[0] == pytest.approx(0.1)
    assert eta[1] == pytest.approx((1 - 0.9 ** 2) / 2)
    assert np.all(eta * np.array([1, 2, 10, 1000]) <= 1.0)
    # The seeds' summed step on a key with many ratings overshoots: |b| grows, damped does not.
    n, s_b = np.array([400.0]), np.array([400.0 * 1.0])  # every rating says "+1"
    b_sum, _ = apply_update(np.zeros(1, np.float32), np.zeros((1, 2), np.float32), n, s_b,
                            np.zeros((1, 2)), 0.05, 0.0, 0.0, "sum")
    b_damped, _ = apply_update(np.zeros(1, np.float32), np.zeros((1, 2), np.float32), n, s_b,
                               np.zeros((1, 2)), 0.05, 0.0, 0.0, "damped")
    assert b_sum[0] == pytest.approx(20.0)  # 20× past the optimum of 1.0
    assert b_damped[0] == pytest.approx(1.0, abs=1e-6)


def test_history_weight_slows_biases_of_keys_with_a_long_history():
    n, s_b = np.array([2.0, 2.0]), np.array([2.0, 2.0])
    b, _ = apply_update(np.zeros(2, np.float32), np.zeros((2, 1), np.float32), n, s_b, np.zeros((2, 1)),
                        0.5, 0.0, 0.0, "damped", history=np.array([0, 100]), history_weight=1.0)
    assert b[1] < b[0] / 10
    assert b[1] == pytest.approx((1 - 0.5 ** 102) / 102 * 2, rel=1e-5)


def test_newcomers_get_initial_factors_from_seed_and_id_only():
    b1, v1 = init_factors(["a", "b", "c"], 5, seed=7, init_scale=0.1)
    _, v2 = init_factors(["c", "a"], 5, seed=7, init_scale=0.1)
    assert v1.dtype == np.float32 and v1.shape == (3, 5)
    np.testing.assert_array_equal(v1[2], v2[0])
    np.testing.assert_array_equal(v1[0], v2[1])
    assert not np.array_equal(v1[0], v1[1])
    assert np.all(b1 == 0)
    _, v3 = init_factors(["a"], 5, seed=8, init_scale=0.1)
    assert not np.array_equal(v1[0], v3[0])
    # Uniform with the requested standard deviation.
    _, many = init_factors([str(k) for k in range(4000)], 10, seed=1, init_scale=0.2)
    assert many.std() == pytest.approx(0.2, rel=0.05)
    assert np.abs(many).max() <= 0.2 * math.sqrt(3) + 1e-6


def test_partitions_use_a_stable_hash_not_pythons_salted_one():
    assert partition_of("1193", 8) == zlib.crc32(b"1193") % 8
    prio = rating_priority(["1"], ["2"], np.array([5]), seed=3)
    assert prio.dtype == np.uint64
    assert rating_priority(["1"], ["2"], np.array([5]), seed=3)[0] == prio[0]


def test_known_keys_keep_their_rows_and_absent_keys_are_never_dropped():
    model = LocalStreamingALS(rank=3, iterations=1, reservoir_size=0)
    model.train([("u1", "i1", 4.0, 1), ("u2", "i2", 2.0, 2)])
    u1 = model.users.vec[model.users.index["u1"]].copy()
    stats = model.train([("u1", "i3", 5.0, 3), ("u3", "i1", 3.0, 4)])
    assert stats.new_users == 1 and stats.new_items == 1
    assert set(model.users.ids) == {"u1", "u2", "u3"}
    assert set(model.items.ids) == {"i1", "i2", "i3"}
    # u1 continued from its learned row (not re-initialised); u2 (absent) is untouched.
    _, fresh = init_factors(["u1"], 3, 42, 0.1)
    assert not np.allclose(u1, fresh[0])
    assert model.users.touched.tolist() == [True, False, True]
    # μ tracks every valid rating seen, across batches.
    assert model.mu == pytest.approx((4 + 2 + 5 + 3) / 4)
    assert model.ratings_seen == 4
    assert model.users.count.tolist() == [2, 1, 1]


def test_predictions_are_clipped_to_the_rating_scale():
    model = LocalStreamingALS(rank=2, iterations=1, reservoir_size=0)
    model.train([("u", "i", 5.0, 1), ("v", "j", 0.5, 2)])
    model.users.bias[model.users.index["u"]] = 50.0
    model.users.bias[model.users.index["v"]] = -50.0
    pred = model.predict(["u", "v", "nobody"], ["i", "j", "nothing"])
    assert pred.tolist()[:2] == [5.0, 0.5]
    assert pred[2] == pytest.approx(model.mu)  # strangers get μ


def test_nan_and_out_of_scale_ratings_are_rejected_and_counted():
    model = LocalStreamingALS(rank=2, iterations=2, reservoir_size=100)
    batch = [("u", "i", float("nan"), 1), ("u", "i", float("inf"), 1), ("u", "i", 7.0, 1),
             ("u", "i", 0.0, 1), ("", "i", 3.0, 1), ("u", None, 3.0, 1), ("u", "i", "x", 1),
             ("u", "i", 3.5, 1)]
    stats = model.train(batch)
    assert stats.n_rejected == 7 and stats.n_ratings == 1
    assert model.ratings_seen == 1 and model.mu == 3.5
    assert np.isfinite(model.users.vec).all() and np.isfinite(model.items.bias).all()
    users, _, rates, _, rejected = validate_arrays(["a", "b"], ["x", "y"], [1.0, None], [0, 0], 0.5, 5)
    assert users == ["a"] and rejected == 1 and rates.tolist() == [1.0]


def test_plain_columns_are_validated_like_the_per_record_path():
    from modeler.core.als_math import split_events

    users = ["u1", "", "u3", "u4", "u5", "u6", "u7", "u8"]
    items = ["i1", "i2", "", "i4", "i5", "i6", "i7", "i8"]
    rates = [4.0, 3.0, 3.0, float("nan"), float("-inf"), 5.5, 0.5, 2]
    stamps = [10, 11, 12, 13, 14, 15, 16, -(2**40)]
    fast = validate_arrays(users, items, rates, stamps, 0.5, 5.0)
    # numpy scalars are not plain floats: the per-record path decides the same columns
    slow = validate_arrays(users, items, [np.float64(r) for r in rates], stamps, 0.5, 5.0)
    assert fast[0] == slow[0] == ["u1", "u7", "u8"] and fast[1] == slow[1] == ["i1", "i7", "i8"]
    assert fast[2].dtype == slow[2].dtype == np.float64 and fast[2].tolist() == slow[2].tolist() == [4.0, 0.5, 2.0]
    assert fast[3].dtype == slow[3].dtype == np.int64 and fast[3].tolist() == slow[3].tolist() == [10, 16, -(2**40)]
    assert fast[4] == slow[4] == 5
    batch = list(zip(users, items, rates, stamps, strict=True))
    mixed = split_events([*batch, ("u9", "i9", None, 1, 2.0)])  # a 5-field record: per record
    assert split_events(batch) == (mixed[0], [[], [], [], []], 0)
    assert mixed[1:] == ([["u9"], ["i9"], [2.0], [1]], 0)
    assert split_events(iter(batch))[0] == [users, items, rates, stamps]


def test_a_diverging_update_is_refused_and_nothing_non_finite_enters():
    # The seeds' summed step with a huge learning rate on a key with many ratings diverges;
    # the guard keeps such rows at their last finite values.
    params = ALSParams(rank=2, iterations=30, learning_rate=0.99, aggregation="sum",
                       reg_param=0.0, reg_bias=0.0, reservoir_size=0, vector_step="sgd")
    model = LocalStreamingALS(params)
    rng = np.random.default_rng(0)
    batch = [(f"u{k % 3}", "i", float(rng.choice([0.5, 5.0])), k) for k in range(300)]
    stats = model.train(batch)
    assert stats.n_diverged > 0
    for table in (model.users, model.items):
        assert np.isfinite(table.bias).all() and np.isfinite(table.vec).all()


def test_replay_sample_stays_bounded_as_the_stream_grows():
    assert keep_fraction(1000, 500) == 1.0
    assert keep_fraction(1000, 4000) == 0.25
    res = Reservoir()
    seen = 0
    rng = np.random.default_rng(1)
    for _ in range(40):
        n = 500
        users = [f"u{k}" for k in rng.integers(0, 300, n)]
        items = [f"i{k}" for k in rng.integers(0, 300, n)]
        stamps = np.arange(seen, seen + n)
        seen += n
        res = res.updated(keep_fraction(1000, seen), users, items, np.full(n, 3.0),
                          rating_priority(users, items, stamps, 0))
        assert len(res) <= 1000 + 4 * math.sqrt(1000)
    assert len(res) >= 1000 - 4 * math.sqrt(1000)
    # The item-side mirror keeps ids and priorities only.
    mirror = Reservoir(True).updated(1.0, None, ["a", "b"], None, np.array([1, 2], np.uint64))
    assert len(mirror) == 2 and len(mirror.ratings) == 0


def test_factor_table_upsert_overwrites_known_and_appends_new_rows():
    table = FactorTable(2)
    table.ensure(["a", "b"], 0, 0.1)
    table.upsert(["b", "c"], np.array([1.0, 2.0], np.float32), np.ones((2, 2), np.float32), np.array([3, 1]))
    assert table.ids == ["a", "b", "c"]
    assert table.bias.tolist() == [0.0, 1.0, 2.0]
    assert table.count.tolist() == [0, 3, 1]
    assert table.touched.tolist() == [False, True, True]


def test_factor_table_pickles_every_row_and_statistic_whatever_rows_hold_none():
    import pickle

    table = FactorTable(3)
    table.ensure(["a", "b", "c", "d"], 0, 0.1)
    table.gram[1] = np.arange(9, dtype=np.float32).reshape(3, 3)  # A without N or m
    table.moment[2] = [0.0, -1.5, 0.0]
    table.mass[3] = 2.0
    for t in (table, FactorTable(3)):
        back = pickle.loads(pickle.dumps(t))
        assert back.ids == t.ids and back.index == t.index
        for name in ("bias", "vec", "count", "touched", "gram", "moment", "mass"):
            got, want = getattr(back, name), getattr(t, name)
            assert got.dtype == want.dtype and got.shape == want.shape and (got == want).all(), name
    back = pickle.loads(pickle.dumps(table))
    back.gram[0, 0, 0] = 1.0  # writable, and its own memory
    assert table.gram[0, 0, 0] == 0.0


@pytest.mark.parametrize("vector_step", ["rls", "sgd"])
def test_a_planted_low_rank_matrix_is_recovered_near_the_noise_level(vector_step):
    rows, _, planted = generate(n_users=150, n_items=200, n_ratings=12_000, rank=3, seed=5,
                                noise=0.25, return_model=True)
    rng = np.random.default_rng(0)
    test_mask = rng.random(len(rows)) < 0.1
    train = [tuple(r) for r, t in zip(rows, test_mask) if not t]
    test = [r for r, t in zip(rows, test_mask) if t]
    model = LocalStreamingALS(rank=3, seed=1, vector_step=vector_step)
    for epoch in range(3):  # three passes over the stream, still one mini-batch at a time
        for s in range(0, len(train), 500):
            model.train(train[s:s + 500] if epoch == 0 else
                        [(u, i, r, t + epoch * 10**9) for u, i, r, t in train[s:s + 500]])
    truth = np.array([r.rating for r in test])
    got = rmse(truth, model.predict([r.user for r in test], [r.item for r in test]))
    # Noise floor: the planted noise plus rounding to half stars (uniform, std 0.5/√12).
    floor = math.sqrt(0.25 ** 2 + (0.5 / math.sqrt(12)) ** 2)
    biases_only = rmse(truth, np.clip(planted.mu + planted.user_bias[[int(r.user) - 1 for r in test]]
                                      + planted.item_bias[[int(r.item) - 1 for r in test]], 0.5, 5))
    assert got < 1.3 * floor, (got, floor)
    assert got < biases_only - 0.05, (got, biases_only)


def _fixed_items(rng, n: int, rank: int) -> FactorTable:
    items = FactorTable(rank)
    items.ensure([f"i{k}" for k in range(n)], 0, 0.1)
    items.bias[:] = rng.normal(0, 0.3, n)
    items.vec[:] = rng.normal(0, 0.5, (n, rank))
    return items


def test_rls_vector_step_is_the_ridge_solution_for_a_newcomer():
    rng = np.random.default_rng(4)
    params = ALSParams(rank=3, reg_param=0.1, reg_bias=0.2, learning_rate=0.1)
    users, items = FactorTable(3), _fixed_items(rng, 6, 3)
    users.ensure(["u"], 0, 0.1)
    rates = rng.integers(1, 11, 6) / 2.0
    v0 = users.vec[0].astype(float).copy()
    refused = rls_half_step(3.5, rates, np.zeros(6, np.int64), users, np.arange(6), items, params)
    assert refused == 0
    q, c = items.vec.astype(float), items.bias.astype(float)
    # Bias: the damped SGD step of 6 ratings (no history yet); vector: ALS-WR ridge solution.
    b = float(step_sizes(np.array([6.0]), 0.1, "damped")[0]) * np.sum(rates - 3.5 - c - q @ v0)
    v = np.linalg.solve(q.T @ q + 0.1 * 6 * np.eye(3), q.T @ (rates - 3.5 - b - c))
    assert users.bias[0] == pytest.approx(b, abs=1e-5)
    np.testing.assert_allclose(users.vec[0], v, atol=1e-5)


def test_rls_statistics_make_two_batches_learn_what_one_batch_of_both_would():
    # Items fixed, the user's bias held at 0: the vector after two batches of 5 ratings
    # (folded into A, m, N in between) is the ridge solution of all 10 ratings.
    rng = np.random.default_rng(5)
    params = ALSParams(rank=3, reg_param=0.2, learning_rate=1e-12)
    items = _fixed_items(rng, 10, 3)
    rates = rng.integers(1, 11, 10) / 2.0
    split, whole = FactorTable(3), FactorTable(3)
    for t in (split, whole):
        t.ensure(["u"], 0, 0.1)
    for part in (slice(0, 5), slice(5, 10)):
        r, rows, other = rates[part], np.zeros(5, np.int64), np.arange(10)[part]
        rls_half_step(3.0, r, rows, split, other, items, params)
        fold_statistics(3.0, r, rows, split, other, items, 1.0)
    rls_half_step(3.0, rates, np.zeros(10, np.int64), whole, np.arange(10), items, params)
    np.testing.assert_allclose(split.vec[0], whole.vec[0], atol=1e-5)
    assert split.mass[0] == 10
    q, c = items.vec.astype(float), items.bias.astype(float)
    np.testing.assert_allclose(split.gram[0], q.T @ q, atol=1e-5)
    np.testing.assert_allclose(split.moment[0], q.T @ (rates - 3.0 - c), atol=1e-5)
    # With forgetting β the statistics decay each time the key is touched: N = β·5 + 5.
    decayed = FactorTable(3)
    decayed.ensure(["u"], 0, 0.1)
    for part in (slice(0, 5), slice(5, 10)):
        fold_statistics(3.0, rates[part], np.zeros(5, np.int64), decayed, np.arange(10)[part], items, 0.5)
    assert decayed.mass[0] == pytest.approx(7.5)


def test_a_non_finite_rls_solution_is_refused_and_the_row_kept():
    rng = np.random.default_rng(7)
    users, items = FactorTable(3), _fixed_items(rng, 4, 3)
    users.ensure(["ok", "bad"], 0, 0.1)
    users.gram[1] = np.inf  # e.g. statistics overflowed
    before = users.vec[1].copy()
    refused = rls_half_step(3.5, np.full(4, 4.0), np.array([0, 0, 1, 1]), users, np.arange(4),
                            items, ALSParams(rank=3))
    assert refused == 1
    np.testing.assert_array_equal(users.vec[1], before)
    assert np.isfinite(users.vec).all() and not np.allclose(users.vec[0], 0)


def test_seeded_statistics_keep_a_restored_vector_where_it_is():
    rng = np.random.default_rng(6)
    users = FactorTable(3)
    users.add_rows(["a", "b", "new"], np.zeros(3), rng.normal(0, 0.4, (3, 3)), np.array([40, 3, 0]))
    partner, n = second_moment(rng.normal(0, 0.5, (8, 3)), np.arange(1, 9))
    seed_statistics(users, partner / n, reg_param=0.1)
    assert users.mass.tolist() == [40, 3, 0]  # a row that learned nothing gets no statistics
    np.testing.assert_allclose(users.gram[0], 40 * partner / n, rtol=1e-5)
    for j in (0, 1):
        lhs = users.gram[j].astype(float) + 0.1 * users.mass[j] * np.eye(3)
        np.testing.assert_allclose(np.linalg.solve(lhs, users.moment[j]), users.vec[j], atol=1e-5)
    assert not users.gram[2].any() and not users.moment[2].any()


def test_rls_learns_a_session_user_better_than_the_seeds_step():
    # A newcomer who rates 40 films in one batch: the rls step reaches the user's ridge
    # solution, the damped SGD step only moves towards it.
    rng = np.random.default_rng(8)
    items = _fixed_items(rng, 40, 3)
    true_v = rng.normal(0, 0.8, 3)
    rates = np.clip(3.5 + items.bias + items.vec.astype(float) @ true_v, 0.5, 5.0)
    errs = {}
    for step in ("sgd", "rls"):
        params = ALSParams(rank=3, iterations=2, reg_param=0.05, vector_step=step)
        ub, uv = np.zeros(1, np.float32), np.zeros((1, 3), np.float32)
        ib, iv = items.bias.copy(), items.vec.copy()
        learn_batch(params, 3.5, 3.5, 40, rates, np.zeros(40, np.int64), np.arange(40), ub, uv, ib, iv)
        errs[step] = float(np.linalg.norm(uv[0] - true_v))
    assert errs["rls"] < 0.5 * errs["sgd"], errs


def test_segment_sums_match_a_plain_sum():
    # Rows with one rating, with a few, and one row with half of all ratings.
    from modeler.core.als_math import segment_sums

    rng = np.random.default_rng(9)
    rows = np.r_[rng.integers(0, 500, 20_000), np.full(25_000, 3), rng.integers(0, 500, 5_000)]
    q = rng.normal(0, 1, (len(rows), 10))
    target = rng.normal(0, 1, len(rows))
    keys, n, gram, h = segment_sums(rows, q, target)
    want_g = np.zeros((500, 10, 10))
    np.add.at(want_g, rows, np.einsum("ij,ik->ijk", q, q))
    want_h = np.zeros((500, 10))
    np.add.at(want_h, rows, target[:, None] * q)
    assert keys.tolist() == sorted(set(rows.tolist()))
    assert n.tolist() == np.bincount(rows)[keys].tolist()
    np.testing.assert_allclose(gram, want_g[keys], rtol=1e-9, atol=1e-8)
    np.testing.assert_allclose(h, want_h[keys], rtol=1e-9, atol=1e-8)
    # Weighted: Σ w, Σ w q qᵀ, Σ w·target·q.
    w = rng.random(len(rows))
    keys, n, gram, h = segment_sums(rows, q, target, weights=w)
    want_g[:] = 0
    np.add.at(want_g, rows, w[:, None, None] * np.einsum("ij,ik->ijk", q, q))
    want_h[:] = 0
    np.add.at(want_h, rows, (w * target)[:, None] * q)
    np.testing.assert_allclose(n, np.bincount(rows, weights=w)[keys], rtol=1e-9)
    np.testing.assert_allclose(gram, want_g[keys], rtol=1e-9, atol=1e-8)
    np.testing.assert_allclose(h, want_h[keys], rtol=1e-9, atol=1e-8)
