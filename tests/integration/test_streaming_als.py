"""StreamingALS on a real local Spark session, against the numpy reference (LocalStreamingALS)."""

from __future__ import annotations

import re

import numpy as np
import pytest

from common.synthetic import generate
from modeler.core.als_math import LocalStreamingALS
from modeler.spark.streaming_als import StreamingALS

pytestmark = pytest.mark.spark

BAD = [("u1", "i1", float("nan"), 1), ("u1", "i1", 9.0, 1), ("", "i1", 3.0, 1), ("short",)]


def _stream(n: int, seed: int = 11) -> list[tuple]:
    rows, _ = generate(n_users=120, n_items=160, n_ratings=n, rank=3, seed=seed)
    return [tuple(r) for r in rows]


def _table(rdd) -> dict[str, tuple[float, np.ndarray]]:
    return {k: (b, np.asarray(v)) for k, (b, v) in rdd.collect()}


def _assert_tables_equal(got: dict, table, atol: float = 2e-5) -> None:
    assert sorted(got) == sorted(table.ids)
    for key, (bias, vec) in got.items():
        j = table.index[key]
        assert vec.dtype == np.float32 and vec.shape == (table.rank,)
        assert bias == pytest.approx(float(table.bias[j]), abs=atol), key
        np.testing.assert_allclose(vec, table.vec[j], atol=atol, err_msg=key)


# 1 partition: the fused one-task plan
@pytest.mark.parametrize(("partitions", "vector_step"), [(3, "rls"), (1, "rls"), (1, "sgd")])
def test_rdd_training_matches_the_numpy_reference_batch_by_batch(spark, partitions, vector_step):
    sc = spark.sparkContext
    kwargs = dict(rank=4, iterations=2, reg_param=0.08, learning_rate=0.06, seed=5,
                  num_partitions=partitions, reservoir_size=400, history_weight=2.0,
                  vector_step=vector_step)
    model = StreamingALS(**kwargs)
    ref = LocalStreamingALS(model.params)
    rows = _stream(1200)
    for start in range(0, len(rows), 300):
        batch = rows[start:start + 300] + BAD
        got = model.train(sc.parallelize(batch, 2))
        want = ref.train(batch)
        assert (got.n_ratings, got.n_rejected, got.new_users, got.new_items, got.n_replayed) == (
            want.n_ratings, want.n_rejected, want.new_users, want.new_items, want.n_replayed)
        assert got.prequential_sse == pytest.approx(want.prequential_sse, rel=1e-6)
    assert ref.batches == 4 and got.n_replayed > 0  # the replay sample was exercised
    assert model.mu == pytest.approx(ref.mu) and model.ratings_seen == ref.ratings_seen == 1200

    _assert_tables_equal(_table(model.user_factors), ref.users)
    _assert_tables_equal(_table(model.item_factors), ref.items)
    assert dict(model.item_counts.collect()) == dict(zip(ref.items.ids, ref.items.count.tolist()))
    touched_users = {k for k, t in zip(ref.users.ids, ref.users.touched) if t}
    assert {k for k, _ in model.changed_users.collect()} == touched_users
    touched_items = {k for k, t in zip(ref.items.ids, ref.items.touched) if t}
    assert {k for k, _ in model.changed_items.collect()} == touched_items
    assert len(touched_items) < len(ref.items)

    pairs = [(r[0], r[1]) for r in rows[:40]] + [("nobody", rows[0][1]), ("nobody", "nothing")]
    predicted = {(u, i): p for u, i, p in model.predict(sc.parallelize(pairs, 2)).collect()}
    expected = ref.predict([u for u, _ in pairs], [i for _, i in pairs])
    for (u, i), want_p in zip(pairs, expected):
        assert predicted[(u, i)] == pytest.approx(want_p, abs=1e-4)
    assert predicted[("nobody", "nothing")] == pytest.approx(model.mu)


def test_same_batches_give_the_same_model_whatever_the_input_slicing(spark):
    sc = spark.sparkContext
    rows = _stream(400, seed=3)
    models = []
    for slices in (1, 4):
        model = StreamingALS(rank=3, iterations=2, seed=9, num_partitions=4, reservoir_size=150)
        for start in range(0, 400, 200):
            model.train(sc.parallelize(rows[start:start + 200], slices))
        models.append(_table(model.user_factors))
    assert sorted(models[0]) == sorted(models[1])
    for key, (bias, vec) in models[0].items():
        assert bias == models[1][key][0]
        np.testing.assert_array_equal(vec, models[1][key][1])


def test_a_long_run_of_small_batches_keeps_lineage_bounded(spark):
    sc = spark.sparkContext
    rows = _stream(12 * 15, seed=4)
    model = StreamingALS(rank=2, iterations=1, num_partitions=2, reservoir_size=50,
                         checkpoint_interval=5)
    depth = []
    for b in range(12):
        stats = model.train(sc.parallelize(rows[b * 15:(b + 1) * 15], 1))
        assert stats.n_ratings == 15
        depth.append(len(re.findall(r"RDD\[", model.user_factors.toDebugString().decode())))
    # The DAG behind the factors does not grow with the number of batches.
    assert max(depth[3:]) <= depth[2], depth
    assert model.reservoir_held <= 50 + 4 * 50 ** 0.5


@pytest.mark.parametrize("vector_step", ["sgd", "rls"])
def test_state_round_trip_restores_the_model_and_training_continues(spark, vector_step):
    sc = spark.sparkContext
    rows = _stream(900, seed=8)
    kwargs = dict(rank=3, iterations=2, seed=2, num_partitions=3, reservoir_size=0,
                  vector_step=vector_step)
    model = StreamingALS(**kwargs)
    for start in range(0, 600, 300):
        model.train(sc.parallelize(rows[start:start + 300], 2))
    state = model.state()
    users = [(k, (b, np.asarray(v, dtype=np.float32), c)) for k, (b, v, c) in state.users.collect()]
    items = [(k, (b, np.asarray(v, dtype=np.float32), c)) for k, (b, v, c) in state.items.collect()]
    restored = StreamingALS.restore(sc, sc.parallelize(users, 2), sc.parallelize(items, 2),
                                    state.mu, state.ratings_seen, state.extra)
    assert restored.params == model.params
    assert restored.mu == model.mu and restored.ratings_seen == 600
    assert _equal(_table(restored.user_factors), _table(model.user_factors))
    assert dict(restored.item_counts.collect()) == dict(model.item_counts.collect())

    nxt = sc.parallelize(rows[600:900], 2)
    a, b = model.train(nxt), restored.train(nxt)
    assert a.prequential_sse == pytest.approx(b.prequential_sse)
    if vector_step == "sgd":  # no state beyond factors and counts: training continues exactly
        assert _equal(_table(restored.item_factors), _table(model.item_factors))
    else:
        # rls statistics are not persisted; the restore seeds them from the counts, so the
        # restored model learns the next batch about as well, not identically.
        later = sc.parallelize(rows[:900], 2)
        assert restored.rmse(later) < 1.05 * model.rmse(later)
        assert not _equal(_table(restored.item_factors), _table(model.item_factors))


def _equal(a: dict, b: dict) -> bool:
    return sorted(a) == sorted(b) and all(
        a[k][0] == pytest.approx(b[k][0], abs=1e-6) and np.allclose(a[k][1], b[k][1], atol=1e-6)
        for k in a)


def test_restore_rejects_factors_of_the_wrong_rank(spark):
    sc = spark.sparkContext
    bad = sc.parallelize([("u", (0.0, np.zeros(5, np.float32)))], 1)
    with pytest.raises(Exception, match="rank"):
        StreamingALS.restore(sc, bad, sc.parallelize([], 1), 3.0, 1, rank=3, num_partitions=2)


def test_a_batch_without_valid_ratings_changes_nothing(spark):
    sc = spark.sparkContext
    model = StreamingALS(rank=2, iterations=1, num_partitions=2, reservoir_size=100)
    model.train(sc.parallelize(_stream(200, seed=6), 2))
    before = _table(model.user_factors)
    stats = model.train(sc.parallelize(BAD, 1))
    assert (stats.n_ratings, stats.n_rejected) == (0, len(BAD))
    assert model.ratings_seen == 200 and model.batches == 1
    assert model.changed_users.count() == 0 and model.changed_items.count() == 0
    assert _equal(_table(model.user_factors), before)


def _recorder():
    """A sink that returns what it saw (a closure: cloudpickle ships it by value to the
    executors, which cannot import this test module)."""

    def record(update):
        return {
            "pid": update.pid,
            "users": sorted(update.users.ids[j] for j in np.flatnonzero(update.users.touched)),
            "items": sorted(update.items.ids[j] for j in np.flatnonzero(update.items.touched)),
            "ratings": sorted(zip(update.batch_users.tolist(), update.batch_items.tolist(),
                                  update.batch_ratings.tolist())),
        }

    return record


def test_a_sink_sees_each_partitions_changed_rows_and_the_batchs_valid_ratings(spark):
    sc = spark.sparkContext
    model = StreamingALS(rank=3, iterations=1, num_partitions=3, reservoir_size=300)
    rows = _stream(600, seed=8)
    model.train(sc.parallelize(rows[:300], 2))
    batch = rows[300:] + BAD
    stats = model.train(sc.parallelize(batch, 2), sink=_recorder())
    seen = model.last_sink_results
    assert sorted(r["pid"] for r in seen) == [0, 1, 2]
    assert stats.n_ratings == 300
    # Every valid rating of the batch, exactly once, in the partition of its user.
    got = sorted(t for r in seen for t in r["ratings"])
    assert got == sorted((str(u), str(i), float(x)) for u, i, x, _ in rows[300:])
    for r in seen:
        assert {u for u, _, _ in r["ratings"]} <= set(r["users"])
    # The changed rows are the ones the model reports as changed.
    assert sorted(u for r in seen for u in r["users"]) == sorted(k for k, _ in model.changed_users.collect())
    assert sorted(i for r in seen for i in r["items"]) == sorted(k for k, _ in model.changed_items.collect())
    # A batch with nothing valid does not call the sink.
    model.train(sc.parallelize(BAD, 1), sink=_recorder())
    assert model.last_sink_results == [None, None, None]


def _mixed_stream(n: int, seed: int = 21) -> list[tuple]:
    """Ratings and implicit events (plays) of the same users and items, in one stream."""
    rows = _stream(n, seed)
    rng = np.random.default_rng(seed)
    out: list[tuple] = []
    for j, r in enumerate(rows):
        if j % 3 == 0:  # a play instead of a rating
            out.append((r[0], r[1], None, r[3], float(rng.integers(0, 9))))
        else:
            out.append(tuple(r))
    return out


def _ranking_table(rdd) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in rdd.collect()}


# 3 partitions: the four-stage plan (with the per-key history: one more round trip); 1: the
# fused one-task plan (with the probe). History cap 4: entries are evicted into the statistics
# and the sweep re-solves keys outside the batch; 0: the stale statistics + replay instead.
@pytest.mark.parametrize(("partitions", "history"), [(3, 4), (1, 4), (1, 0)])
def test_the_ranking_model_matches_the_numpy_reference_in_both_layouts(spark, partitions, history):
    sc = spark.sparkContext
    model = StreamingALS(rank=3, iterations=2, seed=5, num_partitions=partitions,
                         reservoir_size=300, params=None)
    from dataclasses import replace

    model = StreamingALS(params=replace(model.params, ranking_rank=4, ranking_alpha=3.0,
                                        ranking_probe_size=40, ranking_history=history,
                                        ranking_sweep=2.0))
    ref = LocalStreamingALS(model.params)
    rows = _mixed_stream(1200)
    hits = probes = 0
    for start in range(0, len(rows), 300):
        batch = rows[start:start + 300] + BAD + [("u1", "i1", None, 1, -2.0)]
        got = model.train(sc.parallelize(batch, 2))
        want = ref.train(batch)
        assert (got.n_ratings, got.n_implicit, got.n_rejected, got.ranking_positives) == (
            want.n_ratings, want.n_implicit, want.n_rejected, want.ranking_positives)
        if partitions == 1:
            assert (got.ranking_hits, got.ranking_probes) == (want.ranking_hits, want.ranking_probes)
            hits, probes = hits + got.ranking_hits, probes + got.ranking_probes
        else:
            assert got.ranking_probes == 0  # no partition holds every item
    if partitions == 1:
        assert probes > 0
    ranking = ref.ranking
    assert model.positives_seen == ranking.positives_seen > 0
    for rdd, table in ((model.ranking_user_factors, ranking.users),
                       (model.ranking_item_factors, ranking.items)):
        got_t = _ranking_table(rdd)
        assert sorted(got_t) == sorted(table.ids)
        for key, vec in got_t.items():
            assert vec.dtype == np.float32 and vec.shape == (4,)
            np.testing.assert_allclose(vec, table.vec[table.index[key]], atol=2e-5, err_msg=key)
    np.testing.assert_allclose(model.gram_users, ranking.gram_users, atol=1e-6)
    np.testing.assert_allclose(model.gram_items, ranking.gram_items, atol=1e-6)
    touched = {k for k, t in zip(ranking.items.ids, ranking.items.touched) if t}
    assert {k for k, _ in model.changed_ranking_items.collect()} == touched
    if history:
        # Entries were evicted (statistics hold them) and the histories are capped.
        assert ranking.users.mass.sum() > 0 and ranking.items.mass.sum() > 0
        assert max(len(v) for v in ranking.item_history.partners.values()) == history
        assert model.ranking_item_entries == ranking.item_entries == ranking.item_history.entries()
        assert model.ranking_user_entries == ranking.user_entries == ranking.user_history.entries()
    # The explicit model never saw the plays.
    assert model.ratings_seen == ref.ratings_seen == sum(1 for r in rows if len(r) == 4)
    _assert_tables_equal(_table(model.item_factors), ref.items)


def test_the_ranking_model_survives_a_state_round_trip_and_trains_on(spark):
    sc = spark.sparkContext
    rows = _mixed_stream(900, seed=4)
    model = StreamingALS(rank=3, iterations=2, seed=2, num_partitions=2, reservoir_size=0)
    for start in range(0, 600, 300):
        model.train(sc.parallelize(rows[start:start + 300], 2))
    state = model.state()

    def collected(rdd):
        return [(k, (b, np.asarray(v, dtype=np.float32), c)) for k, (b, v, c) in rdd.collect()]

    restored = StreamingALS.restore(
        sc, sc.parallelize(collected(state.users), 2), sc.parallelize(collected(state.items), 2),
        state.mu, state.ratings_seen, state.extra,
        ranking_user_rdd=sc.parallelize(collected(state.ranking_users), 2),
        ranking_item_rdd=sc.parallelize(collected(state.ranking_items), 2))
    assert restored.positives_seen == model.positives_seen > 0
    assert _ranking_table(restored.ranking_item_factors).keys() == _ranking_table(model.ranking_item_factors).keys()
    for k, v in _ranking_table(restored.ranking_user_factors).items():
        np.testing.assert_allclose(v, _ranking_table(model.ranking_user_factors)[k], atol=1e-6)
    # Gramians are recomputed from the rows: equal to the carried ones.
    np.testing.assert_allclose(restored.gram_items, model.gram_items, atol=1e-6)
    np.testing.assert_allclose(restored.gram_users, model.gram_users, atol=1e-6)
    assert dict(restored.ranking_item_counts.collect()) == dict(model.ranking_item_counts.collect())

    nxt = sc.parallelize(rows[600:900], 2)
    a, b = model.train(nxt), restored.train(nxt)
    assert a.ranking_positives == b.ranking_positives > 0 and b.n_diverged == 0
    # Statistics are seeded, not persisted: close to the uninterrupted model, not identical.
    got, want = _ranking_table(restored.ranking_item_factors), _ranking_table(model.ranking_item_factors)
    cos = [float(got[k] @ want[k] / (np.linalg.norm(got[k]) * np.linalg.norm(want[k]) + 1e-12)) for k in want]
    assert np.median(cos) > 0.8


def test_an_implicit_only_stream_trains_the_ranking_model_alone(spark):
    sc = spark.sparkContext
    rows = [(r[0], r[1], None, r[3], 2.0) for r in _stream(300, seed=9)]
    model = StreamingALS(rank=3, num_partitions=1, reservoir_size=100)
    stats = model.train(sc.parallelize(rows, 2))
    assert (stats.n_ratings, stats.n_implicit, stats.ranking_positives) == (0, 300, 300)
    assert model.ratings_seen == 0 and model.user_factors.count() == 0
    assert model.ranking_user_factors.count() == len({r[0] for r in rows})
    assert model.events_seen == 300
