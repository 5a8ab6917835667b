"""Batch ALS bootstrap and the evaluation CLI on small synthetic data (real local Spark)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from common.datasets import EventRow, RatingRow
from common.schema import RatingScale
from common.synthetic import generate, write_movielens
from modeler import bootstrap as boot
from modeler import evaluate as ev
from modeler.core.als_math import rmse

pytestmark = pytest.mark.spark


@pytest.fixture(scope="module")
def planted():
    rows, movies = generate(n_users=80, n_items=120, n_ratings=3000, rank=3, seed=21, noise=0.25)
    return rows, movies


def test_bootstrap_starts_the_stream_from_batch_als_and_keeps_learning(spark, planted):
    rows, _ = planted
    history, later = rows[:2400], rows[2400:]
    model, report = boot.bootstrap_model(spark, history, ranks=(3,), regs=(0.05, 0.3), iterations=4,
                                         validation_fraction=0.15, seed=1)
    assert [(g.rank, g.reg_param) for g in report.grid] == [(3, 0.05), (3, 0.3)]
    best = min(report.grid, key=lambda g: g.rmse)
    assert (report.rank, report.reg_param) == (best.rank, best.reg_param)
    # Factors on top of the baseline beat the baseline alone on the validation split.
    assert report.validation_rmse < report.baseline_rmse
    assert model.rank == 3 and model.ratings_seen == len(history)
    assert model.mu == pytest.approx(np.mean([r.rating for r in history]))
    counts = dict(model.item_counts.collect())
    assert sum(counts.values()) == len(history)

    sc = spark.sparkContext
    held_out = sc.parallelize([tuple(r) for r in later], 2)
    warm = model.rmse(held_out)
    # A cold streaming model that saw the same history once is worse than the bootstrap.
    from modeler.spark.streaming_als import StreamingALS

    cold = StreamingALS(rank=3, num_partitions=4)
    cold.train(sc.parallelize([tuple(r) for r in history], 2))
    assert warm < cold.rmse(held_out)
    # ...and the bootstrapped model keeps learning from the stream.
    stats = model.train(held_out)
    assert stats.n_ratings == len(later) and stats.new_users + stats.new_items < len(later)
    assert model.ratings_seen == len(rows)
    assert np.sqrt(stats.prequential_sse / stats.n_ratings) == pytest.approx(warm, rel=0.05)


def test_bootstrap_starts_the_ranking_model_from_batch_implicit_als(spark, planted):
    from modeler.core.ranking import event_weights

    rows, _ = planted
    history = rows[:2400]
    model, report = boot.bootstrap_model(spark, history, ranks=(3,), regs=(0.1,), iterations=2,
                                         seed=1, ranking_rank=4)
    p = model.params
    w = event_weights(np.array([r.rating for r in history]), np.full(len(history), np.nan),
                      p.weighting, p.rating_min, p.rating_max)
    liked = [r for r, x in zip(history, w, strict=True) if x > 0]
    assert model.positives_seen == report.ranking_positives == len(liked) > 0
    users = dict(model.ranking_user_factors.collect())
    items = dict(model.ranking_item_factors.collect())
    assert set(users) == {r.user for r in liked} and set(items) == {r.item for r in liked}
    assert dict(model.ranking_item_counts.collect()) == {
        i: sum(1 for r in liked if r.item == i) for i in items}
    # The start is a fitted model: a user's liked history items score above the rest.
    ids = sorted(items)
    y = np.array([items[k] for k in ids])
    gains = []
    for u in sorted(users)[:30]:
        mine = {r.item for r in liked if r.user == u}
        s = y @ users[u]
        gains.append(np.mean([s[j] for j, k in enumerate(ids) if k in mine])
                     - np.mean([s[j] for j, k in enumerate(ids) if k not in mine]))
    assert np.mean(gains) > 0.2
    np.testing.assert_allclose(model.gram_items, y.astype(np.float64).T @ y, atol=1e-6)
    # ...and it keeps learning from the stream.
    stats = model.train(spark.sparkContext.parallelize([tuple(r) for r in rows[2400:]], 2))
    assert stats.ranking_positives > 0 and model.positives_seen == len(liked) + stats.ranking_positives


SMALL_GRID = {"ranks": (3,), "regs": (0.1,), "alphas": (1.0, 10.0)}
BLOCKS = ("popular", "batch_implicit_als", "streaming", "explicit_order")


def _popular_ndcg_by_hand(train, test, threshold, k=10):
    """Most-popular lists and NDCG@k written out plainly (no shared code with the module)."""
    counts = {}
    for r in train:
        counts[r[1]] = counts.get(r[1], 0) + 1
    order = sorted(counts, key=lambda i: (-counts[i], list(counts).index(i)))
    seen = {}
    for r in train:
        seen.setdefault(r[0], set()).add(r[1])
    liked = {}
    for r in test:
        if r[0] in seen and r[2] >= threshold:
            liked.setdefault(r[0], set()).add(r[1])
    scores = []
    for user, rel in liked.items():
        top = [i for i in order if i not in seen[user]][:k]
        dcg = sum(1 / math.log2(j + 2) for j, i in enumerate(top) if i in rel)
        idcg = sum(1 / math.log2(j + 2) for j in range(min(k, len(rel))))
        scores.append(dcg / idcg)
    return float(np.mean(scores)), len(liked)


def test_evaluate_writes_report_and_plot(spark, planted, tmp_path):
    rows, _ = planted
    report = ev.evaluate(spark, rows, "planted", train_fraction=0.8, seed=3, batch_size=400,
                         curve_every=2, ranks=(3,), regs=(0.1,), show_progress=False,
                         params={"rank": 3, "num_partitions": 2}, implicit_grid=SMALL_GRID,
                         ranking_every=3)
    assert report["n_train"] + report["n_test"] == len(rows)
    train, test = ev.split_rows(rows, 0.8, 3)
    assert report["n_test"] == len(test)
    s, b = report["streaming"], report["batch_als"]
    assert report["ratio"] == pytest.approx(s["rmse"] / b["rmse"])
    assert (b["rank"], b["reg_param"], b["iterations"]) == (3, 0.1, 10)
    # Batches of 400 over the training part: points at every 2nd batch and the last one.
    n_batches = -(-len(train) // 400)
    assert s["batches"] == n_batches
    assert [p[0] for p in s["curve"]] == sorted({min(k * 800, len(train)) for k in range(1, n_batches // 2 + 1)}
                                                | {len(train)})
    assert s["curve"][-1][1] == s["rmse"]
    # Learning happens: the last curve point is better than the first, and better than μ alone.
    assert s["curve"][-1][1] < s["curve"][0][1]
    mean = np.mean([r.rating for r in train])
    assert s["rmse"] < rmse([r.rating for r in test], np.full(len(test), mean))
    assert s["prequential_rmse"] > 0 and s["params"]["batch_size"] == 400

    ev.plot(report, tmp_path / "convergence.png")
    assert (tmp_path / "convergence.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Top-10 lists: every row is there with the five figures.
    r = report["ranking"]
    assert r["k"] == 10 and r["threshold"] == pytest.approx(4.0)
    for name in BLOCKS:
        assert {"precision", "recall", "ndcg", "map", "coverage"} <= set(r[name]), name
    # The popular row agrees with a plain re-implementation on the same split.
    ndcg, n_users = _popular_ndcg_by_hand(train, test, 4.0)
    assert r["users_evaluated"] == n_users and r["popular"]["users"] == n_users
    assert r["popular"]["ndcg"] == pytest.approx(ndcg)
    # Batch implicit ALS: the whole grid (2 points) plus the weights input at the best one,
    # chosen by validation NDCG, never by the test split.
    b = r["batch_implicit_als"]
    assert [(g["confidence"], g["alpha"]) for g in b["grid"]] == [("raw", 1.0), ("raw", 10.0),
                                                                   ("weights", b["grid"][-1]["alpha"])]
    best = max(b["grid"], key=lambda g: g["validation_ndcg"])
    assert (b["params"]["confidence"], b["params"]["alpha"]) == (best["confidence"], best["alpha"])
    assert b["params"]["rank"] == 3 and 0.0 <= b["ndcg"] <= 1.0
    # The explicit model's order, measured along the stream (every 3rd batch and the last).
    e = r["explicit_order"]
    assert [p[0] for p in e["curve"]] == sorted({min(k * 1200, len(train)) for k in range(1, n_batches // 3 + 1)}
                                               | {len(train)})
    assert e["curve"][-1][1] == e["ndcg"] and e["users"] == n_users
    st = r["streaming"]
    if ev.ranking_available():
        assert st["curve"][-1][1] == st["ndcg"] and st["users"] == n_users
        assert st["user_vectors"].startswith("folded in")
        assert r["streaming_model_vectors"]["curve"][-1][1] == r["streaming_model_vectors"]["ndcg"]
        # Two model partitions: the prequential probe needs every item vector in one task, so
        # this layout measures none (docs/ranking_model.md) and says so with None.
        assert st["prequential_probes"] == 0 and st["prequential_recall"] is None
    else:
        assert st["available"] is False and st["ndcg"] is None and st["prequential_recall"] is None
    sim = r["similar_items"]
    assert sim["pairs"] > 0 and 0.0 <= sim["cooccurrence"] <= 1.0 and 0.0 <= sim["explicit"] <= 1.0
    ev.plot_ranking(report, tmp_path / "ranking.png")
    assert (tmp_path / "ranking.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    json.dumps(report)  # the report is plain JSON


def test_evaluate_an_implicit_file_has_ranking_rows_only(spark, planted, tmp_path):
    rows, _ = planted
    # Plays: every rating becomes an event whose weight grows with the rating.
    events = [EventRow(r.user, r.item, float(round(r.rating * 3)), r.timestamp, "play") for r in rows]
    report = ev.evaluate(spark, events, "plays", seed=3, batch_size=400, show_progress=False,
                         params={"rank": 3, "num_partitions": 1}, implicit_grid=SMALL_GRID)
    assert report["implicit"] and "batch_als" not in report and "no ratings" in report["explicit"]
    r = report["ranking"]
    assert r["threshold"] is None and r["relevance"] == "held-out events of positive weight"
    assert r["explicit_order"]["available"] is False
    assert r["batch_implicit_als"]["ndcg"] > 0 and r["popular"]["ndcg"] > 0
    # Every held-out event of a training user (weights here are all > 0) is relevant.
    train, test = ev.split_rows(events, 0.8, 3)
    users = {e.user for e in train}
    assert r["relevant_items"] == len({(e.user, e.item) for e in test if e.user in users})
    if not ev.ranking_available():
        assert "streaming" not in report and r["streaming"]["reason"] == ev.NOT_IN_BUILD


def test_ranking_data_scales_the_threshold_and_keeps_string_ids():
    scale = RatingScale(min=1, max=10)
    train = [RatingRow("0007", "a", 9, 1), RatingRow("0007", "b", 3, 2), RatingRow("u-2", "c", 8, 3)]
    test = [RatingRow("0007", "c", 8, 4), RatingRow("0007", "d", 7.5, 5), RatingRow("u-2", "x", 10, 6),
            RatingRow("u-3", "a", 10, 7)]
    data = ev.ranking_data(train, test, scale, implicit=False)
    assert data.threshold == pytest.approx(8.0)
    assert data.users == ["0007", "u-2"] and data.items == ["a", "b", "c"]
    # 0007 likes c (8 >= 8), not d (7.5); u-2 likes x, an item no training row has; u-3 is
    # not a training user.
    assert data.relevant.of(0).tolist() == [2] and data.relevant.of(1).tolist() == [3]
    assert (data.relevant_unscorable, data.test_users_unseen) == (1, 1)
    assert data.train.of(0).tolist() == [0, 1] and data.popularity.tolist() == [1, 1, 1]
    assert data.eval_users.tolist() == [0, 1] and data.describe()["users_with_relevant_items"] == 2
    # Many users: a seeded sample of them is scored, the same on every run.
    many = [RatingRow(f"u{n}", "a", 9, n) for n in range(50)]
    liked = [RatingRow(f"u{n}", "b", 9, n) for n in range(50)]
    sample = ev.ranking_data(many, liked, scale, implicit=False, max_users=10)
    assert len(sample.eval_users) == 10 and sample.users_with_relevant == 50
    assert sample.eval_users.tolist() == sorted(set(sample.eval_users.tolist()))
    assert np.array_equal(sample.eval_users,
                          ev.ranking_data(many, liked, scale, implicit=False, max_users=10).eval_users)


def test_evaluate_cli_rejects_bad_input_before_starting_spark(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        ev.main(["--ratings", str(tmp_path / "missing.csv"), "--out", str(tmp_path)])
    assert exc.value.code == 2
    assert "missing.csv" in capsys.readouterr().err
    rows, movies = generate(n_users=10, n_items=20, n_ratings=50, seed=1)
    path, _ = write_movielens(tmp_path / "d", rows, movies)
    with pytest.raises(SystemExit):
        ev.main(["--ratings", str(path), "--train-fraction", "1.5"])
    # A file on a 0-10 scale read with the default 0.5-5: an error naming the range and the
    # settings, before Spark starts - not a silent loss of every rating above 5.
    ten = tmp_path / "ten.csv"
    ten.write_text("userId,movieId,rating,timestamp\n" + "".join(f"{u % 9},{u},{u % 11},{u}\n" for u in range(200)))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        ev.main(["--ratings", str(ten), "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "span 0..10" in err and "RATING_MIN=0 RATING_MAX=10" in err
    with pytest.raises(SystemExit):
        ev.main(["--ratings", str(ten), "--rating-min", "5", "--rating-max", "1"])
    assert "--rating-min must be below --rating-max" in capsys.readouterr().err
