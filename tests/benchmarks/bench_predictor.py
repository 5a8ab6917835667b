"""Predictor benchmark: top-10 over HTTP vs Spark MLlib's RDD path, on the same factors.

``python -m tests.benchmarks.bench_predictor`` (``make bench-predictor``) writes
``build/bench/predictor.json``. Two models:

* ``ml-latest-small``: factors trained here by a few sweeps of biased ALS in numpy on the
  100,836 MovieLens ratings (9,724 items);
* ``synthetic-62k``: random factors, 62,000 items × rank 50 (the size of ml-25m's catalogue).

Both carry the two factor sets of a version (``--models both``, the default): the explicit
rating model and the ranking model (random x_u, y_i of the explicit set's rank, for both
models: the cost of serving does not depend on what the vectors learned), so the measured
top-10 is what the predictor serves by default, ordered by x_u·y_i with the clipped
predicted rating of each item beside it. ``--models
explicit`` publishes the explicit set only (an older modeler: lists by r̂, as before).

For each: (1) Spark's ``MatrixFactorizationModel.recommendProducts(user, 10)`` on a model
loaded with ``MatrixFactorizationModel.load`` from the same factors (jiminy's serving path);
biases are folded into two extra factor columns (user ``[U, 1, mu + b_u]``, item
``[P, b_i, 1]``), so both sides rank by the identical r̂ = mu + b_u + b_i + U·P and their
top-10 lists are compared; (2) ``python -m predictor`` with ``--workers`` uvicorn workers
and a load generator in a separate process (asyncio, raw HTTP/1.1 keep-alive sockets,
``--clients`` connections), measuring requests/s and latency percentiles; (3) worker RSS;
(4) on the 62k model, a second load run while new versions (delta segments, then a full
one) are published: every request must still succeed.

Spark and the HTTP runs never overlap (2 cores). Options: ``--duration``, ``--clients``,
``--workers``, ``--skip-spark``, ``--skip-small`` (the 62k model only), ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from devstack.services import stop_process_group

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from common.feedback import Weighting  # noqa: E402
from common.keys import Keys  # noqa: E402
from common.schema import RatingScale  # noqa: E402
from common.snapshot import Meta, collect_garbage, publish_version, write_rated, write_segment  # noqa: E402

# The synthetic versions' ranking hyper-parameters (their Meta, and the refit check).
RANKING_REG, RANKING_ALPHA = 0.05, 1.0
ML_SMALL = Path(os.environ.get("SHARED_DATA", ROOT.parent / "shared" / "data")) / "ml-latest-small"


@dataclass
class Factors:
    name: str
    users: list[int]
    items: list[int]
    mu: float
    user_bias: np.ndarray
    user_factors: np.ndarray
    item_bias: np.ndarray
    item_factors: np.ndarray
    rated: dict[int, dict[int, float]]
    reg_param: float
    # The ranking model (None: the version has the explicit set only).
    rank_users: np.ndarray | None = None
    rank_items: np.ndarray | None = None

    @property
    def rank(self) -> int:
        return int(self.item_factors.shape[1])


# ---------------------------------------------------------------------- models


def biased_als(path: Path, rank: int = 10, reg: float = 0.1, sweeps: int = 5, seed: int = 0) -> Factors:
    """A few sweeps of biased ALS: for each user (then each item), with the other side fixed,

        [b_u, U_u] = (AᵀA + λ n_u I)⁻¹ Aᵀ (r - mu - b_i),  A = rows [1, P_i] of the rated items
    """
    from common.datasets import read_ratings

    rows = read_ratings(path / "ratings.csv")
    users = sorted({int(r.user) for r in rows})
    items = sorted({int(r.item) for r in rows})
    uix = {u: k for k, u in enumerate(users)}
    iix = {i: k for k, i in enumerate(items)}
    u_idx = np.array([uix[int(r.user)] for r in rows])
    i_idx = np.array([iix[int(r.item)] for r in rows])
    r = np.array([r.rating for r in rows])
    mu = float(r.mean())
    rng = np.random.default_rng(seed)
    ub, uf = np.zeros(len(users)), rng.normal(0, 0.1, (len(users), rank))
    ib, itf = np.zeros(len(items)), rng.normal(0, 0.1, (len(items), rank))
    by_user = _group(u_idx, len(users))
    by_item = _group(i_idx, len(items))

    def solve(groups: list[np.ndarray], other_idx: np.ndarray, other_b: np.ndarray,
              other_f: np.ndarray, bias: np.ndarray, fac: np.ndarray) -> None:
        eye = np.eye(rank + 1)
        for k, g in enumerate(groups):
            if not len(g):
                continue
            o = other_idx[g]
            a = np.empty((len(g), rank + 1))
            a[:, 0] = 1.0
            a[:, 1:] = other_f[o]
            y = r[g] - mu - other_b[o]
            x = np.linalg.solve(a.T @ a + reg * len(g) * eye, a.T @ y)
            bias[k], fac[k] = x[0], x[1:]

    for _ in range(sweeps):
        solve(by_user, i_idx, ib, itf, ub, uf)
        solve(by_item, u_idx, ub, uf, ib, itf)
    pred = mu + ub[u_idx] + ib[i_idx] + np.einsum("ij,ij->i", uf[u_idx], itf[i_idx])
    print(f"  biased ALS rank {rank}: train RMSE {np.sqrt(np.mean((pred - r) ** 2)):.3f}", flush=True)
    rated: dict[int, dict[int, float]] = defaultdict(dict)
    for row in rows:
        rated[int(row.user)][int(row.item)] = row.rating
    return Factors("ml-latest-small", users, items, mu, ub.astype(np.float32), uf.astype(np.float32),
                   ib.astype(np.float32), itf.astype(np.float32), dict(rated), reg)


def _group(idx: np.ndarray, n: int) -> list[np.ndarray]:
    order = np.argsort(idx, kind="stable")
    bounds = np.searchsorted(idx[order], np.arange(n + 1))
    return [order[bounds[k] : bounds[k + 1]] for k in range(n)]


def synthetic(n_items: int = 62_000, rank: int = 50, n_users: int = 5_000, seed: int = 1) -> Factors:
    rng = np.random.default_rng(seed)
    items = list(range(1, n_items + 1))
    users = list(range(1, n_users + 1))
    rated = {u: {int(i): 4.0 for i in rng.choice(n_items, 30, replace=False) + 1} for u in users}
    scale = 1.0 / np.sqrt(rank)
    return Factors(f"synthetic-{n_items // 1000}k", users, items, 3.5,
                   rng.normal(0, 0.2, n_users).astype(np.float32),
                   rng.normal(0, scale, (n_users, rank)).astype(np.float32),
                   rng.normal(0, 0.3, n_items).astype(np.float32),
                   rng.normal(0, scale, (n_items, rank)).astype(np.float32), rated, 0.05)


def with_ranking(f: Factors, seed: int = 2) -> Factors:
    """``f`` with a ranking factor set of the same rank (random, as the synthetic model)."""
    rng = np.random.default_rng(seed)
    scale = 1.0 / np.sqrt(f.rank)
    f.rank_users = rng.normal(0, scale, (len(f.users), f.rank)).astype(np.float32)
    f.rank_items = rng.normal(0, scale, (len(f.items), f.rank)).astype(np.float32)
    return f


def meta_for(f: Factors, version: int, segments: tuple[int, ...], ratings_seen: int) -> Meta:
    ranking = f.rank_items is not None
    return Meta(version=version, rank=f.rank, mu=f.mu, reg_param=f.reg_param, n_users=len(f.users),
                n_items=len(f.items), ratings_seen=ratings_seen, created=time.time(), segments=segments,
                models=("explicit", "ranking") if ranking else ("explicit",),
                ranking_rank=f.rank if ranking else 0, ranking_reg_param=RANKING_REG if ranking else 0.0,
                ranking_alpha=RANKING_ALPHA if ranking else 0.0)


def write_ranking(client: Any, keys: Keys, f: Factors, version: int, rows: np.ndarray | None = None,
                  urows: np.ndarray | None = None) -> None:
    if f.rank_items is None or f.rank_users is None:
        return
    rows = np.arange(len(f.items)) if rows is None else rows
    urows = np.arange(len(f.users)) if urows is None else urows
    write_segment(client, keys, version, "ranking_items", [str(f.items[k]) for k in rows],
                  np.zeros(len(rows), np.float32), f.rank_items[rows])
    write_segment(client, keys, version, "ranking_users", [str(f.users[k]) for k in urows],
                  np.zeros(len(urows), np.float32), f.rank_users[urows])


def publish_factors(client: Any, keys: Keys, f: Factors, version: int) -> None:
    write_segment(client, keys, version, "items", [str(i) for i in f.items], f.item_bias, f.item_factors)
    write_segment(client, keys, version, "users", [str(u) for u in f.users], f.user_bias, f.user_factors)
    write_ranking(client, keys, f, version)
    write_rated(client, keys, ((str(u), str(i), r) for u, d in f.rated.items() for i, r in d.items()))
    publish_version(client, keys, meta_for(f, version, (version,), sum(len(d) for d in f.rated.values())))


def expected_top(f: Factors, user: int, n: int = 10, served: bool = False) -> np.ndarray:
    """The n best r̂ = mu + b_u + b_i + U·P of a user, computed here in float64, best first;
    with ``served`` and a ranking set, the n best x_u·y_i (what the predictor serves).

    Scores, not ids, are compared with each serving path: ALS gives items rated once by the
    same user identical factors, and such exact ties may come out in any order.
    """
    u = f.users.index(user)
    if served and f.rank_items is not None and f.rank_users is not None:
        y = f.rank_items.astype(np.float64)
        return np.sort(y @ refit_vector(f, user, y))[::-1][:n]
    scores = f.mu + f.user_bias[u] + f.item_bias + f.item_factors.astype(np.float64) @ f.user_factors[u]
    return np.sort(scores)[::-1][:n]


def refit_vector(f: Factors, user: int, y: np.ndarray) -> np.ndarray:
    """The ranking model's x_u as the predictor serves it (``PREDICTOR_REFIT_USERS``, the
    default): the iALS user step from the user's rated history, written out here in float64
    from the formula, independently of the predictor's code::

        w_i = Weighting().rating_weight(r_ui)   (1 for a rating >= 0.7 of the scale, else 0)
        c_i = 1 + alpha * w_i
        x_u = (YᵀY + Σ_{w_i>0} (c_i − 1) y_i y_iᵀ + λ·n⁺ I)⁻¹ Σ_{w_i>0} c_i y_i

    with the version's alpha and λ (:func:`meta_for`) and n⁺ the number of positives; a user
    without a positive keeps the published vector.
    """
    u = f.users.index(user)
    scale = RatingScale(min=0.5, max=5.0)
    weighting = Weighting()
    rated = f.rated.get(user, {})
    rows = np.array([f.items.index(i) for i in rated], dtype=np.int64)
    w = np.array([weighting.rating_weight(r, scale) for r in rated.values()])
    pos = w > 0
    if not pos.any():
        return f.rank_users[u].astype(np.float64) if f.rank_users is not None else np.zeros(f.rank)
    yp, c = y[rows[pos]], 1.0 + RANKING_ALPHA * w[pos]
    lhs = y.T @ y + (yp.T * (c - 1.0)) @ yp + RANKING_REG * int(pos.sum()) * np.eye(y.shape[1])
    return np.linalg.solve(lhs, yp.T @ c)


def same_scores(got: list[float], expected: np.ndarray) -> bool:
    return len(got) == len(expected) and bool(np.allclose(got, expected, atol=2e-3))


# ---------------------------------------------------------------------- Spark RDD path


def spark_rdd_path(spark: Any, f: Factors, workdir: Path, calls: int) -> dict[str, Any]:
    """recommendProducts(user, 10) calls/s on the MLlib model saved from the same factors."""
    from pyspark.mllib.recommendation import MatrixFactorizationModel

    path = workdir / f"mllib-{f.name}"
    shutil.rmtree(path, ignore_errors=True)
    (path / "metadata").mkdir(parents=True)
    # MLlib's save format: a JSON metadata text file plus Parquet (id int, features array<double>).
    meta = {"class": "org.apache.spark.mllib.recommendation.MatrixFactorizationModel",
            "version": "1.0", "rank": f.rank + 2}
    (path / "metadata" / "part-00000").write_text(json.dumps(meta) + "\n")
    user_rows = [(u, [*map(float, f.user_factors[k]), 1.0, float(f.mu + f.user_bias[k])])
                 for k, u in enumerate(f.users)]
    item_rows = [(i, [*map(float, f.item_factors[k]), float(f.item_bias[k]), 1.0])
                 for k, i in enumerate(f.items)]
    schema = "id int, features array<double>"
    spark.createDataFrame(user_rows, schema).coalesce(2).write.parquet(str(path / "data" / "user"))
    spark.createDataFrame(item_rows, schema).coalesce(2).write.parquet(str(path / "data" / "product"))
    model = MatrixFactorizationModel.load(spark.sparkContext, str(path))
    rng = random.Random(3)
    sample = [rng.choice(f.users) for _ in range(calls + 2)]
    agree = 0
    for u in sample[:2]:  # warm-up (JIT, broadcast of the job closure)
        model.recommendProducts(u, 10)
    start = time.perf_counter()
    for u in sample[2:]:
        got = [r.rating for r in model.recommendProducts(u, 10)]
        agree += same_scores(got, expected_top(f, u))
    elapsed = time.perf_counter() - start
    return {"rdd_calls": calls, "rdd_seconds": round(elapsed, 3),
            "rdd_lookup_per_s": round(calls / elapsed, 2), "rdd_top10_matches_numpy": agree}


# ---------------------------------------------------------------------- load generator


async def _client_loop(host: str, port: int, paths: list[bytes], stop_at: float,
                       lat: list[float], errs: list[str]) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    k = random.randrange(len(paths))
    try:
        while time.perf_counter() < stop_at:
            k = (k + 1) % len(paths)
            t0 = time.perf_counter()
            writer.write(paths[k])
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            await reader.readexactly(length)
            lat.append(time.perf_counter() - t0)
            if status != 200:
                errs.append(str(status))
    except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
        errs.append(type(exc).__name__)
    finally:
        writer.close()


def _loadgen(host: str, port: int, users: list[int], clients: int, duration: float,
             queue: Any) -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    paths = [f"GET /v1/users/{u}/recommendations?n=10 HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
             for u in users]
    lat: list[float] = []
    errs: list[str] = []

    async def main() -> float:
        stop_at = time.perf_counter() + duration
        t0 = time.perf_counter()
        await asyncio.gather(*(_client_loop(host, port, paths, stop_at, lat, errs)
                               for _ in range(clients)))
        return time.perf_counter() - t0

    cpu0 = time.process_time()
    elapsed = asyncio.run(main())
    queue.put({"latencies": lat, "errors": errs, "elapsed": elapsed, "cpu": time.process_time() - cpu0})


def run_load(port: int, users: list[int], clients: int, duration: float) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_loadgen, args=("127.0.0.1", port, users, clients, duration, q))
    p.start()
    out = q.get(timeout=duration + 120)
    p.join(30)
    lat = np.array(out["latencies"]) * 1000
    n = len(lat)
    return {
        "requests": n,
        "rest_top10_per_s": round(n / out["elapsed"], 1),
        "p50_ms": round(float(np.percentile(lat, 50)), 2) if n else None,
        "p90_ms": round(float(np.percentile(lat, 90)), 2) if n else None,
        "p99_ms": round(float(np.percentile(lat, 99)), 2) if n else None,
        "errors": len(out["errors"]),
        "error_kinds": sorted(set(out["errors"]))[:10],
        "loadgen_cpu_ms_per_request": round(1000 * out["cpu"] / max(1, n), 3),
    }


# ---------------------------------------------------------------------- predictor process


def start_predictor(redis_url: str, prefix: str, workers: int) -> tuple[subprocess.Popen, int]:
    from devstack.services import free_port

    port = free_port()
    env = {**os.environ, "REDIS_URL": redis_url, "REDIS_PREFIX": prefix, "PREDICTOR_HOST": "127.0.0.1",
           "PREDICTOR_PORT": str(port), "PREDICTOR_WORKERS": str(workers), "LOG_LEVEL": "WARNING",
           "PREDICTOR_MODEL_POLL_INTERVAL_S": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "predictor"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    return proc, port


def stop_predictor(proc: subprocess.Popen) -> None:
    stop_process_group(proc, timeout=20)


def wait_model(port: int, version: int, workers: int, timeout: float = 120) -> None:
    """Until ``workers`` distinct worker processes have answered /readyz with ``version``.

    Fresh connections go to whichever worker accepts first, often the same one: a worker
    still loading the model (it would answer with the popular fallback) is only ruled out
    once every worker has been seen ready.
    """
    import httpx

    ready: set[int] = set()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            body = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).json()
            if body.get("version") == version:
                ready.add(body["worker"])
            if len(ready) >= workers:
                return
        except (httpx.HTTPError, ValueError, KeyError):
            pass
        time.sleep(0.02)
    raise TimeoutError(f"{len(ready)} of {workers} predictor workers served version {version} in {timeout}s")


def worker_pids(pid: int) -> list[str]:
    """The uvicorn worker processes: children of the main process, or (one worker) the
    main process itself, which then serves in-process."""
    return Path(f"/proc/{pid}/task/{pid}/children").read_text().split() or [str(pid)]


def worker_rss_mb(pid: int) -> list[float]:
    """RSS of the uvicorn worker processes, in MB."""
    out = []
    for child in worker_pids(pid):
        try:
            status = Path(f"/proc/{child}/status").read_text()
        except FileNotFoundError:
            continue
        kb = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
        out.append(round(kb / 1024, 1))
    return out or [0.0]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of the uvicorn workers (see :func:`worker_pids`)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for child in worker_pids(pid):
        try:
            fields = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


def mean_batch_size(port: int) -> float | None:
    """Top-N requests per matrix product since start-up, from the answering worker's
    ``predictor_topn_batch_size`` histogram (one worker's view when there are several)."""
    import httpx

    total = count = 0.0
    for line in httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text.splitlines():
        if line.startswith("predictor_topn_batch_size_sum"):
            total = float(line.split()[-1])
        elif line.startswith("predictor_topn_batch_size_count"):
            count = float(line.split()[-1])
    return round(total / count, 1) if count else None


def top10_agreement(port: int, f: Factors, n_users: int = 20) -> tuple[int, list[dict[str, Any]]]:
    """How many of ``n_users`` sampled users get numpy's top-10 scores; the misses, described."""
    import httpx

    agree = 0
    misses = []
    for u in random.Random(5).sample(f.users, n_users):
        body = httpx.get(f"http://127.0.0.1:{port}/v1/users/{u}/recommendations?n=10&include_rated=true").json()
        got = [x["score"] for x in body["items"]]
        expected = expected_top(f, u, served=True)
        rated = [x.get("rating") for x in body["items"]]
        in_scale = all(r is not None and 0.5 <= r <= 5.0 for r in rated)
        if same_scores(got, expected) and in_scale:
            agree += 1
        else:
            misses.append({"user": u, "strategy": body.get("strategy"), "version": body.get("version"),
                           "got": got[:3], "expected": [round(float(x), 5) for x in expected[:3]],
                           "ratings": rated[:3]})
    return agree, misses


def swap_under_load(client: Any, keys: Keys, f: Factors, port: int, clients: int,
                    duration: float) -> dict[str, Any]:
    """Load run while the modeler-like writer publishes delta versions, then a full one."""
    import threading

    stop = threading.Event()
    published: list[int] = []

    def writer() -> None:
        rng = np.random.default_rng(9)
        v = 1
        time.sleep(0.5)
        while not stop.is_set():
            v += 1
            full = v % 5 == 0
            rows = np.arange(len(f.items)) if full else rng.choice(len(f.items), 500, replace=False)
            urows = rng.choice(len(f.users), 200, replace=False)
            write_segment(client, keys, v, "items", [str(f.items[k]) for k in rows],
                          f.item_bias[rows], f.item_factors[rows] * np.float32(1.01))
            write_segment(client, keys, v, "users", [str(f.users[k]) for k in urows],
                          f.user_bias[urows], f.user_factors[urows])
            write_ranking(client, keys, f, v, rows, urows)
            segments = (v,) if full else (*base_segments[-1], v)
            if full:
                # A full item segment needs the users too: write them all into it.
                write_segment(client, keys, v, "users", [str(u) for u in f.users], f.user_bias,
                              f.user_factors)
                write_ranking(client, keys, f, v)
            base_segments.append(segments)
            publish_version(client, keys, meta_for(f, v, segments, v))
            collect_garbage(client, keys, keep=3, min_age_s=1.0)
            published.append(v)
            stop.wait(duration / 6)

    base_segments: list[tuple[int, ...]] = [(1,)]
    t = threading.Thread(target=writer)
    t.start()
    try:
        result = run_load(port, f.users, clients, duration)
    finally:
        stop.set()
        t.join()
    result["versions_published"] = len(published)
    result["full_versions"] = sum(1 for v in published if v % 5 == 0)
    return result


# ---------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per load run")
    parser.add_argument("--clients", type=int, default=32)
    # One worker: it takes every client's request into one batch (one pass over the item
    # matrix for up to 32 users). Measured on this 2-core machine with the load generator
    # beside it, two workers each got batches of 4-8 and spent 0.42-0.57 ms CPU per request
    # against 0.27-0.31 ms for one, and served fewer requests per second.
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--rdd-calls", type=int, default=20)
    parser.add_argument("--skip-spark", action="store_true")
    parser.add_argument("--skip-small", action="store_true", help="only the synthetic 62k model")
    parser.add_argument("--models", choices=("both", "explicit"), default="both",
                        help="factor sets published: both (served top-N by the ranking model) or explicit")
    parser.add_argument("--out", default=str(ROOT / "build" / "bench" / "predictor.json"))
    args = parser.parse_args(argv)

    import redis

    from devstack.services import start_redis

    workdir = Path(tempfile.mkdtemp(prefix="bench-predictor-"))
    print("training / generating factors ...", flush=True)
    models = [synthetic()] if args.skip_small else [biased_als(ML_SMALL), synthetic()]
    if args.models == "both":
        models = [with_ranking(m) for m in models]
    runs: dict[str, dict[str, Any]] = {name: {} for name in (m.name for m in models)}

    skip_spark = args.skip_spark
    if not skip_spark:
        from modeler.runtime import MissingDependency, check_java

        try:
            check_java()
        except MissingDependency as exc:
            print(f"skipping the Spark RDD path: {exc}", flush=True)
            skip_spark = True
    if not skip_spark:
        from modeler.spark import get_spark

        spark = get_spark("local[2]", app_name="bench-predictor",
                          conf={"spark.ui.enabled": "false", "spark.driver.memory": "2g"})
        spark.sparkContext.setLogLevel("ERROR")
        try:
            for f in models:
                print(f"Spark RDD path on {f.name} ...", flush=True)
                runs[f.name].update(spark_rdd_path(spark, f, workdir, args.rdd_calls))
                print(f"  {runs[f.name]}", flush=True)
        finally:
            spark.stop()

    server = start_redis(workdir=workdir / "redis")
    client = redis.Redis.from_url(server.url)
    try:
        for f in models:
            keys = Keys(f"bench{f.name.replace('-', '')}")
            publish_factors(client, keys, f, 1)
            proc, port = start_predictor(server.url, keys.prefix, args.workers)
            try:
                wait_model(port, 1, args.workers)
                r = runs[f.name]
                r.update(items=len(f.items), rank=f.rank, users=len(f.users), workers=args.workers,
                         clients=args.clients)
                r["rest_top10_matches_numpy"], misses = top10_agreement(port, f)
                if misses:
                    r["rest_top10_misses"] = misses
                print(f"HTTP load on {f.name} ({args.clients} clients, {args.duration}s) ...", flush=True)
                run_load(port, f.users, args.clients, min(3.0, args.duration))  # warm-up
                r["load_average_1m_before"] = round(os.getloadavg()[0], 2)
                cpu0 = cpu_seconds(proc.pid)
                r.update(run_load(port, f.users, args.clients, args.duration))
                # CPU per request is what the server costs whatever else shares the machine.
                r["server_cpu_ms_per_request"] = round(
                    1000 * (cpu_seconds(proc.pid) - cpu0) / max(1, r["requests"]), 3)
                r["load_average_1m"] = round(os.getloadavg()[0], 2)
                r["mean_batch_size"] = mean_batch_size(port)
                # Derived, not measured: the CPU-bound ceiling of server + load generator if
                # they had every core of this machine to themselves (it is shared here).
                r["derived_cpu_ceiling_per_s"] = round(
                    (os.cpu_count() or 1) * 1000
                    / (r["server_cpu_ms_per_request"] + r["loadgen_cpu_ms_per_request"]))
                r["rss_mb_per_worker"] = worker_rss_mb(proc.pid)
                r["rss_mb"] = max(r["rss_mb_per_worker"])
                if "rdd_lookup_per_s" in r:
                    r["ratio"] = round(r["rest_top10_per_s"] / r["rdd_lookup_per_s"], 1)
                if f.name.startswith("synthetic"):
                    print("  swap under load ...", flush=True)
                    swap = swap_under_load(client, keys, f, port, args.clients, args.duration)
                    swap["rss_mb_per_worker_after"] = worker_rss_mb(proc.pid)
                    r["swap_under_load"] = swap
                print(f"  {json.dumps(r)}", flush=True)
            finally:
                stop_predictor(proc)
    finally:
        client.close()
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    big = runs[models[-1].name]
    small = runs.get("ml-latest-small", {})
    swap = big.get("swap_under_load", {})
    result = {
        "benchmark": "predictor",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count()},
        "served_by": "ranking model (x_u·y_i), ratings clipped" if args.models == "both" else "explicit r̂",
        # Headline figures: the 62k-item × rank-50 model (the harder one).
        **{k: big.get(k) for k in ("rdd_lookup_per_s", "rest_top10_per_s", "ratio", "p50_ms",
                                    "p99_ms", "rss_mb", "items", "rank", "errors")},
        "swap_errors": swap.get("errors"),
        "runs": runs,
        "goals": {
            "rest_top10_per_s>=2000": all(r.get("rest_top10_per_s", 0) >= 2000 for r in runs.values()),
            "p99_ms<=25": all((r.get("p99_ms") or 1e9) <= 25 for r in runs.values()),
            "ratio>=200": all((r.get("ratio") or 0) >= 200 for r in runs.values()) if not skip_spark else None,
            "rss_mb<=300 (62k)": (big.get("rss_mb") or 1e9) <= 300,
            "swap drops no request": swap.get("errors") == 0 and swap.get("requests", 0) > 0,
        },
        "small": {k: small.get(k) for k in ("rest_top10_per_s", "p99_ms", "ratio")},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
