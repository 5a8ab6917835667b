"""Batch ALS bootstrap and the evaluation CLI on small synthetic data (real local Spark)."""

from __future__ import annotations

import json

import numpy as np
import pytest

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


def test_evaluate_writes_report_and_plot(spark, planted, tmp_path):
    rows, _ = planted
    report = ev.evaluate(spark, rows, "planted", train_fraction=0.8, seed=3, batch_size=400,
                         curve_every=2, ranks=(3,), regs=(0.1,), show_progress=False,
                         params={"rank": 3, "num_partitions": 2})
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
    json.dumps(report)  # the report is plain JSON


def test_evaluate_cli_rejects_bad_input_before_starting_spark(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        ev.main(["--ratings", str(tmp_path / "missing.csv"), "--out", str(tmp_path)])
    assert exc.value.code == 2
    assert "missing.csv" in capsys.readouterr().err
    rows, movies = generate(n_users=10, n_items=20, n_ratings=50, seed=1)
    path, _ = write_movielens(tmp_path / "d", rows, movies)
    with pytest.raises(SystemExit):
        ev.main(["--ratings", str(path), "--train-fraction", "1.5"])
