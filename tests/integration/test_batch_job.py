"""The batch job (``modeler.batch``) on real Spark: grid choice, exports, bad input.

Publishing is in test_batch_publish.py, ``spark-submit`` on the standalone cluster in
test_batch_cluster.py (apart, so the suite's workers share them out).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from common.synthetic import Events
from modeler.batch import EXIT_BAD_INPUT, Report, main, read_and_index, run_job
from tests.support.batch_job import (
    PLANTED_RANK,
    read_back,
    seen_by_user,
    small_config,
)

pytestmark = pytest.mark.spark

ROOT = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------- the grid


def test_grid_picks_the_planted_rank_on_implicit_data(spark, events_file: Path, tmp_path: Path) -> None:
    cfg = small_config(events_file, tmp_path / "out", ranks=(1, PLANTED_RANK), iterations=10)
    report = run_job(spark, cfg)
    assert report.model == "implicit" and report.kind == "event"  # a weight column: implicit by default
    scores = {g.rank: g.score for g in report.grid}
    assert set(scores) == {1, PLANTED_RANK} and all(g.metric == "ndcg@10" for g in report.grid)
    assert report.chosen["rank"] == PLANTED_RANK
    # Not a coin flip: the planted rank is clearly better than a popularity-like rank 1.
    assert scores[PLANTED_RANK] > scores[1] + 0.05, scores
    assert report.test["ndcg@10"] > report.test["popular_ndcg@10"]
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["chosen"]["rank"] == PLANTED_RANK and len(saved["grid"]) == 2
    assert {"read_index_s", "grid_s", "test_s", "recommend_write_s", "total_s"} <= set(saved["durations"])


# --------------------------------------------------------------------------- exports


@pytest.fixture(scope="module")
def exports(spark, events_file: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("exports")
    out = {}
    for fmt in ("parquet", "csv", "json"):
        run_job(spark, small_config(events_file, base / fmt, fmt=fmt, similar=5))
        out[fmt] = base / fmt
    return out


@pytest.mark.parametrize("fmt", ["parquet", "csv", "json"])
def test_export_round_trips_with_original_ids(spark, exports, events: Events, fmt: str) -> None:
    out = exports[fmt]
    assert (out / "_SUCCESS").exists() and (out / "recommendations" / "_SUCCESS").exists()
    assert list((out / "recommendations").glob("part-*"))
    rows = read_back(spark, out / "recommendations", fmt)
    report = json.loads((out / "report.json").read_text())
    assert report["outputs"]["recommendations"]["rows"] == len(rows)
    users, items = set(events.user_ids), set(events.item_ids)
    seen = seen_by_user(events)
    by_user: dict[str, list[tuple[int, str, float]]] = {}
    for user, rank, item, score in rows:
        by_user.setdefault(user, []).append((rank, item, score))
    # Every user, byte-identical ids (UUIDs; items keep their leading zeros), none of their own items.
    assert set(by_user) == users
    assert {i for _, _, i, _ in rows} <= items and all(i.startswith("0") for _, _, i, _ in rows)
    for user, recs in by_user.items():
        recs.sort()
        assert [r for r, _, _ in recs] == list(range(1, 11))
        assert not {i for _, i, _ in recs} & seen[user]
        scores = [s for _, _, s in recs]
        assert scores == sorted(scores, reverse=True)
    # The three formats hold the same rows (the same seeded model each time).
    if fmt != "parquet":
        reference = read_back(spark, exports["parquet"] / "recommendations", "parquet")
        assert [r[:3] for r in rows] == [r[:3] for r in reference]
        np.testing.assert_allclose([r[3] for r in rows], [r[3] for r in reference], rtol=1e-6)


def test_similar_items_are_cosines_of_other_items(spark, exports, events: Events) -> None:
    frame = spark.read.parquet(str(exports["parquet"] / "similar"))
    rows = frame.collect()
    assert frame.columns == ["source_item", "rank", "item", "score"]
    assert {r["source_item"] for r in rows} <= set(events.item_ids)
    assert all(r["source_item"] != r["item"] and -1.0001 <= r["score"] <= 1.0001 for r in rows)
    assert max(r["rank"] for r in rows) == 5


def test_arrays_layout_has_one_row_per_user(spark, events_file: Path, events: Events, tmp_path: Path) -> None:
    run_job(spark, small_config(events_file, tmp_path / "arr", fmt="json", layout="arrays", iterations=2))
    frame = spark.read.json(str(tmp_path / "arr" / "recommendations"))
    rows = frame.collect()
    assert len(rows) == len(events.user_ids) == len({r["user"] for r in rows})
    first = rows[0]["recommendations"]
    assert [x["rank"] for x in first] == list(range(1, 11))


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_directory_of_part_files_is_an_input(spark, events: Events, tmp_path: Path, fmt: str) -> None:
    parts = tmp_path / f"events.{fmt}"
    rows = [(u, i, float(v)) for u, i, v, _ in events.rows()]
    frame = spark.createDataFrame(rows, "user_id STRING, item_id STRING, weight DOUBLE").repartition(3)
    if fmt == "csv":
        frame.write.option("header", True).csv(str(parts))  # a header in every part file
    else:
        frame.write.parquet(str(parts))
    # The job's reading step (what differs with a directory input); the steps after it are the
    # same as for a file, run by the tests above.
    report = Report(input=str(parts))
    indexed, implicit = read_and_index(spark, small_config(parts, None), report)
    indexed.pairs.unpersist()
    assert implicit and report.pairs == len(events)
    assert report.format == ("parquet" if fmt == "parquet" else "csv") and report.kind == "event"
    assert report.rows == len(events) and report.bad_rows == 0
    assert report.users == len(events.user_ids) and report.items == len(events.item_ids)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("content", "line", "reason"),
    [
        ("user,item,weight\nu1,i1,1\nu2,i2,lots\nu3,i3,2\n", 3, "weight: 'lots' is not a number"),
        ("user\titem\tweight\nu1\ti1\t1\nu2\ti2\t-4\n", 3, "weight: '-4' must be >= 0"),
        ("userId,movieId,rating,timestamp\r\n1,10,4.0,1\r\n2,20,9.5,2\r\n", 3, "rating: '9.5' is outside 0.5..5"),
        ("1::10::4::0\n2::20\n", 2, "expected user, item, value"),
    ],
)
def test_bad_rows_fail_naming_file_and_line(
    spark, tmp_path: Path, capsys, content: str, line: int, reason: str
) -> None:
    path = tmp_path / "input.txt"
    path.write_bytes(content.encode())
    out = tmp_path / "out"
    assert main(["--input", str(path), "--out", str(out), "--iterations", "1"], spark=spark) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert f"{path}:{line}: {reason}" in err, err
    assert "Traceback" not in err and not out.exists() and not list(tmp_path.glob(".out.tmp-*"))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "empty file"),
        ("\n\n", "empty file"),
        ("hello world\nsecond line\n", ":1: unknown format"),
        ("user,item,colour\na,b,red\n", ":1: unknown format: third column 'colour'"),
    ],
)
def test_unknown_or_empty_input_fails_before_spark_starts(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "input.csv"
    path.write_text(content)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-m", "modeler.batch", "--input", str(path), "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=60,
    )
    assert proc.returncode == EXIT_BAD_INPUT
    assert message in proc.stderr and str(path) in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()
