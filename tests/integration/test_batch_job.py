"""The batch job (``modeler.batch``) on real Spark: grid choice, exports, publishing, bad input, cluster mode.

Data: planted implicit events (common.synthetic.generate_events) with UUID user ids and
zero-padded item ids, so a cast to a number anywhere would show as a changed id.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from common.synthetic import Events, generate, generate_events, make_ids, write_events, write_movielens
from modeler.batch import EXIT_BAD_INPUT, EXIT_PUBLISH_REFUSED, JobConfig, PublishRefused, main, run_job
from tests.support.standalone import spark_home

pytestmark = pytest.mark.spark

ROOT = Path(__file__).resolve().parents[2]
PLANTED_RANK = 4


def planted_events(seed: int = 5) -> Events:
    events = generate_events(300, 240, 12_000, rank=PLANTED_RANK, signal=5.0, min_per_user=15, ids="uuid",
                             seed=seed)
    events.item_ids = make_ids(len(events.item_ids), "padded", np.random.default_rng(seed), width=8)
    return events


@pytest.fixture(scope="module")
def events() -> Events:
    return planted_events()


@pytest.fixture(scope="module")
def events_file(events: Events, tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Tab-separated with a header, like Last.fm's user_artists.dat.
    return write_events(tmp_path_factory.mktemp("events") / "user_items.tsv", events, sep="\t")


def small_config(input_path: Path, out: Path | None, **kw) -> JobConfig:
    base: dict = dict(ranks=(PLANTED_RANK,), regs=(0.1,), alphas=(1.0,), iterations=5, top=10)
    base.update(kw)
    return JobConfig(input=str(input_path), out=str(out) if out else None, **base)


def seen_by_user(events: Events) -> dict[str, set[str]]:
    seen: dict[str, set[str]] = {}
    for u, i in zip(events.users.tolist(), events.items.tolist()):
        seen.setdefault(events.user_ids[u], set()).add(events.item_ids[i])
    return seen


def read_back(spark, path: Path, fmt: str) -> list[tuple[str, int, str, float]]:
    """The exported rows, read with a string schema for the ids (nothing inferred)."""
    schema = "user STRING, rank INT, item STRING, score FLOAT"
    reader = spark.read.schema(schema)
    frame = reader.option("header", True).csv(str(path)) if fmt == "csv" else reader.format(fmt).load(str(path))
    return sorted((r["user"], r["rank"], r["item"], float(r["score"])) for r in frame.collect())


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
    report = run_job(spark, small_config(parts, tmp_path / "out", iterations=2))
    assert report.format == ("parquet" if fmt == "parquet" else "csv") and report.kind == "event"
    assert report.rows == len(events) and report.bad_rows == 0
    assert report.users == len(events.user_ids) and report.items == len(events.item_ids)


# --------------------------------------------------------------------------- publish


def test_publish_implicit_model_as_the_ranking_factor_set(spark, events_file: Path, events: Events, tmp_path: Path,
                                                         redis_url, redis_client, keys) -> None:
    from common.keys import RANKING, RANKING_ITEMS, RANKING_USERS
    from common.snapshot import read_all_factors, read_meta, read_pointer

    cfg = small_config(events_file, tmp_path / "out", fmt="parquet", publish=True, redis_url=redis_url,
                       redis_prefix=keys.prefix)
    report = run_job(spark, cfg)
    pointer = read_pointer(redis_client, keys)
    assert pointer is not None and pointer.version == report.published["version"] == 1
    meta = read_meta(redis_client, keys, pointer.version)
    assert meta is not None and meta.models == (RANKING,) and meta.has_ranking and not meta.has_explicit
    assert meta.ranking_rank == PLANTED_RANK and meta.ranking_alpha == 1.0 and meta.ranking_reg_param == 0.1
    assert meta.ranking_weighting["implicit"] == "log" and meta.n_users == len(events.user_ids)
    user_ids, user_bias, user_vec = read_all_factors(redis_client, keys, pointer, RANKING_USERS, PLANTED_RANK)
    item_ids, _, item_vec = read_all_factors(redis_client, keys, pointer, RANKING_ITEMS, PLANTED_RANK)
    assert set(user_ids) == set(events.user_ids) and set(item_ids) == set(events.item_ids)
    assert not np.any(user_bias)
    # The published factors give the exported recommendations (same model, same exclusions).
    seen = seen_by_user(events)
    exported = read_back(spark, tmp_path / "out" / "recommendations", "parquet")
    col = {i: j for j, i in enumerate(item_ids)}
    for j in range(0, len(user_ids), 37):
        user = user_ids[j]
        scores = item_vec @ user_vec[j]
        scores[[col[i] for i in seen[user]]] = -np.inf
        want = [item_ids[c] for c in np.argsort(-scores, kind="stable")[:10]]
        got = [r[2] for r in sorted((r for r in exported if r[0] == user), key=lambda r: r[1])]
        assert got[:5] == want[:5], user
    # The rated sets are there for the predictor's exclusions, with each pair's confidence
    # weight w ("implicit:<w>") for its fold-in.
    some_user = events.user_ids[0]
    rated = {k.decode(): v.decode() for k, v in redis_client.hgetall(keys.rated(some_user)).items()}
    assert set(rated) == seen[some_user]
    assert all(v.startswith("implicit:") and float(v.split(":", 1)[1]) > 0 for v in rated.values())

    # The predictor serves the version: lists ranked by the ranking model, seen items excluded;
    # Spark's last user step is the same solve as the predictor's fold-in, so the lists agree
    # at the top with the exported ones.
    from fastapi.testclient import TestClient

    from predictor.app import create_app
    from predictor.config import PredictorSettings

    settings = PredictorSettings(REDIS_URL=redis_url, REDIS_PREFIX=keys.prefix, PREDICTOR_MODEL_POLL_INTERVAL_S=0.2)
    with TestClient(create_app(settings)) as api:
        deadline = time.monotonic() + 15
        while api.app.state.svc.watcher.model is None and time.monotonic() < deadline:
            time.sleep(0.05)
        agree = 0
        checked = user_ids[::37][:12]
        for user in checked:
            body = api.get(f"/v1/users/{user}/recommendations?n=10").json()
            assert body["strategy"] == "model" and body["rank_by"] == "ranking", body
            served = [x["item"] for x in body["items"]]
            assert not set(served) & seen[user] and all("rating" not in x for x in body["items"])
            got = [r[2] for r in sorted((r for r in exported if r[0] == user), key=lambda r: r[1])]
            agree += len(set(served[:5]) & set(got[:5]))
        assert agree >= 0.6 * 5 * len(checked), agree


def test_publish_explicit_model_the_predictor_serves(spark, tmp_path: Path, redis_url, keys) -> None:
    from fastapi.testclient import TestClient

    from predictor.app import create_app
    from predictor.config import PredictorSettings

    rows, movies = generate(120, 300, 6000, rank=4, seed=11)[:2]
    ratings, _ = write_movielens(tmp_path / "ml", rows, movies)
    cfg = JobConfig(input=str(ratings), out=None, publish=True, redis_url=redis_url, redis_prefix=keys.prefix,
                    ranks=(4,), regs=(0.05, 0.2), iterations=5)
    report = run_job(spark, cfg)
    assert report.model == "explicit" and report.grid[0].metric == "rmse"
    assert report.test["rmse"] < report.test["mean_rmse"]
    settings = PredictorSettings(REDIS_URL=redis_url, REDIS_PREFIX=keys.prefix, PREDICTOR_MODEL_POLL_INTERVAL_S=0.2)
    with TestClient(create_app(settings)) as api:
        import time

        deadline = time.monotonic() + 20
        while api.get("/readyz").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        model = api.get("/v1/model").json()
        assert model["version"] == report.published["version"]
        user = rows[0].user
        body = api.get(f"/v1/users/{user}/recommendations", params={"n": 5}).json()
        assert body["strategy"] == "model" and len(body["items"]) == 5
        rated = {r.item for r in rows if r.user == user}
        assert not {x["item"] for x in body["items"]} & rated
        pred = api.get("/v1/predict", params={"user": user, "item": rows[0].item}).json()
        assert pred["strategy"] == "model" and 0.5 <= pred["rating"] <= 5.0


def test_publish_refused_while_a_modeler_holds_the_lease(spark, events_file: Path, tmp_path: Path, redis_url,
                                                         redis_client, keys, capsys) -> None:
    redis_client.set(keys.lease, "modeler-abc", px=900_000)  # outlives three Spark runs on a busy machine
    out = tmp_path / "out"
    argv = ["--input", str(events_file), "--out", str(out), "--publish", "--redis-url", redis_url,
            "--redis-prefix", keys.prefix, "--ranks", "2", "--regs", "0.1", "--alphas", "1", "--iterations", "2"]
    assert main(argv, spark=spark) == EXIT_PUBLISH_REFUSED
    err = capsys.readouterr().err
    assert "lease" in err and "modeler-abc" in err and "--force" in err and "Traceback" not in err
    assert redis_client.get(keys.current) is None
    # Nothing of the run is left: no output, no staging directory beside it.
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))
    with pytest.raises(PublishRefused):
        run_job(spark, small_config(events_file, None, publish=True, redis_url=redis_url, redis_prefix=keys.prefix,
                                    iterations=2))
    report = run_job(spark, small_config(events_file, None, publish=True, force=True, redis_url=redis_url,
                                         redis_prefix=keys.prefix, iterations=2))
    assert report.published["version"] == 1
    assert redis_client.get(keys.lease) == b"modeler-abc"  # --force does not take the modeler's lease away


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(("content", "line", "reason"), [
    ("user,item,weight\nu1,i1,1\nu2,i2,lots\nu3,i3,2\n", 3, "weight: 'lots' is not a number"),
    ("user\titem\tweight\nu1\ti1\t1\nu2\ti2\t-4\n", 3, "weight: '-4' must be >= 0"),
    ("userId,movieId,rating,timestamp\r\n1,10,4.0,1\r\n2,20,9.5,2\r\n", 3, "rating: '9.5' is outside 0.5..5"),
    ("1::10::4::0\n2::20\n", 2, "expected user, item, value"),
])
def test_bad_rows_fail_naming_file_and_line(spark, tmp_path: Path, capsys, content: str, line: int,
                                            reason: str) -> None:
    path = tmp_path / "input.txt"
    path.write_bytes(content.encode())
    out = tmp_path / "out"
    assert main(["--input", str(path), "--out", str(out), "--iterations", "1"], spark=spark) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert f"{path}:{line}: {reason}" in err, err
    assert "Traceback" not in err and not out.exists() and not list(tmp_path.glob(".out.tmp-*"))


@pytest.mark.parametrize(("content", "message"), [
    ("", "empty file"),
    ("\n\n", "empty file"),
    ("hello world\nsecond line\n", ":1: unknown format"),
    ("user,item,colour\na,b,red\n", ":1: unknown format: third column 'colour'"),
])
def test_unknown_or_empty_input_fails_before_spark_starts(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "input.csv"
    path.write_text(content)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "modeler.batch", "--input", str(path), "--out",
                           str(tmp_path / "out")], capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
    assert proc.returncode == EXIT_BAD_INPUT
    assert message in proc.stderr and str(path) in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- cluster mode


def test_spark_submit_on_the_standalone_cluster_gives_the_local_result(spark, standalone, events_file: Path,
                                                                       tmp_path: Path) -> None:
    local_out, cluster_out = tmp_path / "local", tmp_path / "cluster"
    cfg = small_config(events_file, local_out, fmt="csv", iterations=5, blocks=2)
    run_job(spark, cfg)
    env = dict(os.environ, PYSPARK_PYTHON=sys.executable, PYSPARK_DRIVER_PYTHON=sys.executable,
               SPARK_DRIVER_MEMORY="768m", SPARK_LOCAL_IP="127.0.0.1")
    env.pop("PYTHONPATH", None)  # the script makes its packages importable and ships them itself
    proc = subprocess.run(
        [str(spark_home() / "bin" / "spark-submit"), "--master", standalone.url,
         "--conf", "spark.executor.memory=512m", "--conf", "spark.executor.cores=1", "--conf", "spark.cores.max=2",
         "--conf", "spark.driver.host=127.0.0.1", "--conf", "spark.driver.bindAddress=127.0.0.1",
         str(ROOT / "modeler" / "batch.py"), "--master", standalone.url, "--input", str(events_file),
         "--out", str(cluster_out), "--format", "csv", "--ranks", str(PLANTED_RANK), "--regs", "0.1",
         "--alphas", "1", "--iterations", "5", "--blocks", "2"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=480)
    assert proc.returncode == 0, proc.stderr[-4000:] + standalone.tail()
    report = json.loads((cluster_out / "report.json").read_text())
    assert report["spark"]["master"] == standalone.url
    local = read_back(spark, local_out / "recommendations", "csv")
    cluster = read_back(spark, cluster_out / "recommendations", "csv")
    assert len(cluster) == len(local)
    # Same data, seed and blocks: the same model up to floating-point summation order.
    local_pairs = {(u, i): s for u, _, i, s in local}
    cluster_pairs = {(u, i): s for u, _, i, s in cluster}
    common = local_pairs.keys() & cluster_pairs.keys()
    assert len(common) >= 0.97 * len(local_pairs)
    np.testing.assert_allclose([cluster_pairs[p] for p in common], [local_pairs[p] for p in common], atol=1e-3)

