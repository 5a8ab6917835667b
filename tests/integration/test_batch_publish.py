"""The batch job publishing its model to Redis as the served factor sets, and refusing to
while a modeler holds the lease (real Spark, real redis-server)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from common.synthetic import Events, generate, write_movielens
from modeler.batch import EXIT_PUBLISH_REFUSED, JobConfig, PublishRefused, main, run_job
from tests.support.batch_job import (
    PLANTED_RANK,
    read_back,
    seen_by_user,
    small_config,
)

pytestmark = pytest.mark.spark


# --------------------------------------------------------------------------- publish


def test_publish_implicit_model_as_the_ranking_factor_set(
    spark, events_file: Path, events: Events, tmp_path: Path, redis_url, redis_client, keys
) -> None:
    from common.keys import RANKING, RANKING_ITEMS, RANKING_USERS
    from common.snapshot import read_all_factors, read_meta, read_pointer

    cfg = small_config(
        events_file, tmp_path / "out", fmt="parquet", publish=True, redis_url=redis_url, redis_prefix=keys.prefix
    )
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
    cfg = JobConfig(
        input=str(ratings),
        out=None,
        publish=True,
        redis_url=redis_url,
        redis_prefix=keys.prefix,
        ranks=(4,),
        regs=(0.05, 0.2),
        iterations=5,
    )
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


def test_publish_refused_while_a_modeler_holds_the_lease(
    spark, events_file: Path, tmp_path: Path, redis_url, redis_client, keys, capsys
) -> None:
    redis_client.set(keys.lease, "modeler-abc", px=900_000)  # outlives three Spark runs on a busy machine
    out = tmp_path / "out"
    argv = [
        "--input",
        str(events_file),
        "--out",
        str(out),
        "--publish",
        "--redis-url",
        redis_url,
        "--redis-prefix",
        keys.prefix,
        "--ranks",
        "2",
        "--regs",
        "0.1",
        "--alphas",
        "1",
        "--iterations",
        "2",
    ]
    assert main(argv, spark=spark) == EXIT_PUBLISH_REFUSED
    err = capsys.readouterr().err
    assert "lease" in err and "modeler-abc" in err and "--force" in err and "Traceback" not in err
    assert redis_client.get(keys.current) is None
    # Nothing of the run is left: no output, no staging directory beside it.
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))
    with pytest.raises(PublishRefused):
        run_job(
            spark,
            small_config(events_file, None, publish=True, redis_url=redis_url, redis_prefix=keys.prefix, iterations=2),
        )
    report = run_job(
        spark,
        small_config(
            events_file, None, publish=True, force=True, redis_url=redis_url, redis_prefix=keys.prefix, iterations=2
        ),
    )
    assert report.published["version"] == 1
    assert redis_client.get(keys.lease) == b"modeler-abc"  # --force does not take the modeler's lease away
