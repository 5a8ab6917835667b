"""Batch ALS bootstrap: the seeds' answer to cold start - learn offline first, then stream.

1. A baseline fit of the biases on the historic ratings (ridge, alternating; numpy):
   ``b_i = Σ_u (r − μ − b_u) / (λ_i + n_i)``, ``b_u = Σ_i (r − μ − b_i) / (λ_u + n_u)``.
2. Spark ML ALS (``pyspark.ml.recommendation.ALS``) on the residuals ``r − μ − b_u − b_i``,
   grid search over rank × reg_param on a random validation split, the best refitted on all.
3. The ranking model (when on): exact batch implicit ALS in numpy on the same ratings,
   mapped through the model's weighting (:func:`modeler.core.ranking.batch_ials`).
4. A :class:`~modeler.spark.streaming_als.StreamingALS` starting from those biases and factors
   (:meth:`StreamingALS.restore`), which then keeps learning from the stream.

``python -m modeler bootstrap --ratings FILE`` (wired to :func:`main`) runs it and writes the
grid and the chosen model's figures as JSON, and the factors as ``.npz`` (no pickle) when
``--out`` is given. The modeler service calls :func:`bootstrap_model` directly.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common.datasets import RatingRow, read_ratings
from common.logging import setup_logging
from common.schema import RatingScale
from modeler.core.als_math import rmse

log = logging.getLogger(__name__)

DEFAULT_RANKS = (10, 20)
DEFAULT_REGS = (0.05, 0.1, 0.15)


@dataclass
class Indexed:
    """Ratings as integer arrays for Spark ML (which needs int ids) plus the id tables."""

    users: list[str]
    items: list[str]
    u: np.ndarray
    i: np.ndarray
    r: np.ndarray

    @classmethod
    def from_rows(cls, rows: Sequence[RatingRow | tuple]) -> Indexed:
        u_index: dict[str, int] = {}
        i_index: dict[str, int] = {}
        u = np.fromiter((u_index.setdefault(str(x[0]), len(u_index)) for x in rows), np.int64, len(rows))
        i = np.fromiter((i_index.setdefault(str(x[1]), len(i_index)) for x in rows), np.int64, len(rows))
        r = np.fromiter((float(x[2]) for x in rows), np.float64, len(rows))
        return cls(list(u_index), list(i_index), u, i, r)


def fit_biases(u: np.ndarray, i: np.ndarray, r: np.ndarray, n_users: int, n_items: int,
               reg_user: float = 10.0, reg_item: float = 5.0, sweeps: int = 10
               ) -> tuple[float, np.ndarray, np.ndarray]:
    """Ridge baseline μ + b_u + b_i by alternating exact minimisation (formula in the module doc)."""
    mu = float(r.mean()) if len(r) else 0.0
    bu = np.zeros(n_users)
    bi = np.zeros(n_items)
    n_u = np.bincount(u, minlength=n_users)
    n_i = np.bincount(i, minlength=n_items)
    for _ in range(sweeps):
        bi = np.bincount(i, weights=r - mu - bu[u], minlength=n_items) / (reg_item + n_i)
        bu = np.bincount(u, weights=r - mu - bi[i], minlength=n_users) / (reg_user + n_u)
    return mu, bu, bi


def als_blocks(n_ratings: int) -> int:
    """User/item blocks for Spark ALS: ~1 per 100k ratings, 2..10. Spark's default of 10
    costs 10 tasks per stage of every iteration, which dominates on small data / 2 cores."""
    return max(2, min(10, n_ratings // 100_000))


def ratings_frame(spark, u: np.ndarray, i: np.ndarray, r: np.ndarray):
    """A cached DataFrame (u int, i int, r double) for :func:`spark_als` - build it once per
    training set and reuse it over a grid (creating it from Python rows is the slow part)."""
    from pyspark.sql.types import DoubleType, IntegerType, StructField, StructType

    schema = StructType([StructField("u", IntegerType(), False), StructField("i", IntegerType(), False),
                         StructField("r", DoubleType(), False)])
    data = list(zip(u.tolist(), i.tolist(), r.tolist(), strict=True))
    return spark.createDataFrame(data, schema).repartition(als_blocks(len(r))).cache()


def spark_als(spark, u: np.ndarray | None, i: np.ndarray | None, r: np.ndarray | None, rank: int,
              reg_param: float, iterations: int = 10, seed: int = 42, frame=None):
    """Fit ``pyspark.ml.recommendation.ALS`` (explicit) on int-indexed ratings (or ``frame``)."""
    from pyspark.ml.recommendation import ALS

    if frame is None:
        assert u is not None and i is not None and r is not None, "ratings or a frame"
        df = ratings_frame(spark, u, i, r)
    else:
        df = frame
    blocks = max(2, df.rdd.getNumPartitions())
    als = ALS(rank=rank, maxIter=iterations, regParam=reg_param, userCol="u", itemCol="i",
              ratingCol="r", seed=seed, coldStartStrategy="nan", nonnegative=False,
              numUserBlocks=blocks, numItemBlocks=blocks)
    model = als.fit(df)
    if frame is None:
        df.unpersist()
    return model


def pairs_frame(spark, u: np.ndarray, i: np.ndarray):
    """A cached DataFrame (k, u, i) of pairs to predict, reusable over a grid."""
    from pyspark.sql.types import IntegerType, LongType, StructField, StructType

    schema = StructType([StructField("k", LongType(), False), StructField("u", IntegerType(), False),
                         StructField("i", IntegerType(), False)])
    rows = list(zip(range(len(u)), u.tolist(), i.tolist(), strict=True))
    return spark.createDataFrame(rows, schema).repartition(als_blocks(len(u))).cache()


def als_predict(spark, model, u: np.ndarray, i: np.ndarray, frame=None) -> np.ndarray:
    """ALS predictions for int pairs, NaN where the user or item was not trained (in order)."""
    df = frame if frame is not None else pairs_frame(spark, u, i)
    out = np.full(len(u), np.nan)
    for row in model.transform(df).select("k", "prediction").collect():
        out[row["k"]] = row["prediction"]
    return out


@dataclass
class GridPoint:
    rank: int
    reg_param: float
    rmse: float
    seconds: float


@dataclass
class BootstrapReport:
    n_ratings: int
    n_train: int
    n_validation: int
    mu: float
    baseline_rmse: float
    grid: list[GridPoint] = field(default_factory=list)
    rank: int = 0
    reg_param: float = 0.0
    validation_rmse: float = float("nan")
    seconds: float = 0.0
    ranking_positives: int = 0  # the ranking model's start (batch implicit ALS), 0: none

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def bootstrap_model(
    spark,
    rows: Sequence[RatingRow | tuple],
    ranks: Sequence[int] = DEFAULT_RANKS,
    regs: Sequence[float] = DEFAULT_REGS,
    iterations: int = 10,
    validation_fraction: float = 0.1,
    seed: int = 42,
    scale: RatingScale | None = None,
    **streaming_kwargs: Any,
):
    """Baseline biases + grid-searched Spark ALS on residuals -> ``(StreamingALS, report)``.

    ``streaming_kwargs`` go to :class:`StreamingALS` (``rank`` is the one chosen here; the
    streaming ``reg_param`` defaults to the chosen one). The returned model has seen the
    historic ratings (``ratings_seen``, μ, per-id counts) but holds no replay sample; its
    ranking model (unless ``ranking=False``) starts from batch implicit ALS on them
    (``positives_seen`` = the liked ratings; statistics seeded from the counts, histories
    empty, as after a restore).
    """
    from modeler.spark.streaming_als import StreamingALS

    started = time.perf_counter()
    scale = scale or RatingScale()
    if not rows:
        raise ValueError("bootstrap needs at least one rating")
    data = Indexed.from_rows(rows)
    n = len(data.r)
    rng = np.random.default_rng(seed)
    is_val = rng.random(n) < validation_fraction
    tr, va = ~is_val, is_val

    def fit_all(mask: np.ndarray):
        mu, bu, bi = fit_biases(data.u[mask], data.i[mask], data.r[mask], len(data.users), len(data.items))
        return mu, bu, bi

    mu, bu, bi = fit_all(tr)
    base_val = np.clip(mu + bu[data.u[va]] + bi[data.i[va]], scale.min, scale.max)
    report = BootstrapReport(n, int(tr.sum()), int(va.sum()), mu, rmse(data.r[va], base_val))
    resid = data.r - mu - bu[data.u] - bi[data.i]
    best: GridPoint | None = None
    train_df = ratings_frame(spark, data.u[tr], data.i[tr], resid[tr])
    valid_df = pairs_frame(spark, data.u[va], data.i[va])
    for rank in ranks:
        for reg in regs:
            t0 = time.perf_counter()
            model = spark_als(spark, None, None, None, rank, reg, iterations, seed, frame=train_df)
            dot = np.nan_to_num(als_predict(spark, model, data.u[va], data.i[va], frame=valid_df))
            pred = np.clip(mu + bu[data.u[va]] + bi[data.i[va]] + dot, scale.min, scale.max)
            point = GridPoint(rank, reg, rmse(data.r[va], pred), time.perf_counter() - t0)
            log.info("bootstrap grid rank=%d reg=%.3f validation RMSE %.4f", rank, reg, point.rmse)
            report.grid.append(point)
            if best is None or point.rmse < best.rmse:
                best = point
    assert best is not None
    train_df.unpersist()
    valid_df.unpersist()
    report.rank, report.reg_param, report.validation_rmse = best.rank, best.reg_param, best.rmse

    # Refit on everything with the chosen grid point.
    everything = np.ones(n, dtype=bool)
    mu, bu, bi = fit_all(everything)
    resid = data.r - mu - bu[data.u] - bi[data.i]
    final = spark_als(spark, data.u, data.i, resid, best.rank, best.reg_param, iterations, seed)
    user_vec = _factor_matrix(final.userFactors.collect(), len(data.users), best.rank)
    item_vec = _factor_matrix(final.itemFactors.collect(), len(data.items), best.rank)
    n_u = np.bincount(data.u, minlength=len(data.users))
    n_i = np.bincount(data.i, minlength=len(data.items))
    sc = spark.sparkContext
    kwargs = {"reg_param": best.reg_param, **streaming_kwargs, "rank": best.rank, "scale": scale}
    slices = max(2, min(64, n // 50_000))
    user_rdd = sc.parallelize(
        [(k, (float(bu[j]), user_vec[j], int(n_u[j]))) for j, k in enumerate(data.users)], slices)
    item_rdd = sc.parallelize(
        [(k, (float(bi[j]), item_vec[j], int(n_i[j]))) for j, k in enumerate(data.items)], slices)
    extra: dict[str, Any] = {"rating_sum": float(data.r.sum())}
    ranking: dict[str, Any] = {}
    params = StreamingALS(**kwargs).params
    if params.ranking:
        ranking, extra_r = _bootstrap_ranking(sc, data, params, seed, slices)
        extra.update(extra_r)
        report.ranking_positives = int(extra_r["positives_seen"])
    model = StreamingALS.restore(sc, user_rdd, item_rdd, mu, n, extra, **ranking, **kwargs)
    report.mu = mu
    report.seconds = time.perf_counter() - started
    return model, report


RANKING_SWEEPS = 10  # batch iALS sweeps of the ranking bootstrap


def _bootstrap_ranking(sc, data: Indexed, params: Any, seed: int, slices: int
                       ) -> tuple[dict[str, Any], dict[str, Any]]:
    """The ranking model's start: exact batch implicit ALS (numpy,
    :func:`modeler.core.ranking.batch_ials`) on the historic ratings mapped through the
    model's weighting (liked ratings are positives), with its rank, λ and α. Returns the
    ``ranking_*_rdd`` arguments of :meth:`StreamingALS.restore` (keys with positives only,
    count = positives) and its counters for ``extra``."""
    from modeler.core.ranking import batch_ials, event_weights

    w = event_weights(data.r, np.full(len(data.r), np.nan), params.weighting, params.rating_min,
                      params.rating_max)
    pos = w > 0
    x, y = batch_ials(data.u, data.i, w, len(data.users), len(data.items), params.ranking_rank,
                      params.ranking_alpha, params.ranking_reg_param, RANKING_SWEEPS, seed,
                      params.init_scale, params.ranking_reg_scaling)
    n_u = np.bincount(data.u[pos], minlength=len(data.users))
    n_i = np.bincount(data.i[pos], minlength=len(data.items))
    users = [(k, (0.0, x[j], int(n_u[j]))) for j, k in enumerate(data.users) if n_u[j]]
    items = [(k, (0.0, y[j], int(n_i[j]))) for j, k in enumerate(data.items) if n_i[j]]
    conf_minus_1 = params.ranking_alpha * float(w[pos].sum())
    log.info("bootstrap ranking model: %d positives, %d users, %d items, rank %d", int(pos.sum()),
             len(users), len(items), params.ranking_rank)
    rdds = {"ranking_user_rdd": sc.parallelize(users, slices),
            "ranking_item_rdd": sc.parallelize(items, slices)}
    return rdds, {"positives_seen": int(pos.sum()), "conf_minus_1_sum": conf_minus_1}


def _factor_matrix(rows, n: int, rank: int) -> np.ndarray:
    """Spark ALS factor rows ``(id, features)`` -> dense float32 (n, rank), zeros if missing."""
    out = np.zeros((n, rank), dtype=np.float32)
    for row in rows:
        out[int(row["id"])] = np.asarray(row["features"], dtype=np.float32)
    return out


def save_factors(model, path: Path) -> None:
    """Write the model's factors to ``path`` (.npz of plain arrays, loadable with allow_pickle=False)."""
    state = model.state()
    arrays: dict[str, np.ndarray] = {}
    for side, rdd in (("user", state.users), ("item", state.items)):
        recs = sorted(rdd.collect(), key=lambda kv: kv[0])
        arrays[f"{side}_ids"] = np.array([k for k, _ in recs], dtype=str)
        arrays[f"{side}_bias"] = np.array([v[0] for _, v in recs], dtype=np.float32)
        arrays[f"{side}_vec"] = np.array([v[1] for _, v in recs], dtype=np.float32).reshape(len(recs), -1)
        arrays[f"{side}_count"] = np.array([v[2] for _, v in recs], dtype=np.int64)
    arrays["mu"] = np.array(state.mu)
    arrays["ratings_seen"] = np.array(state.ratings_seen)
    np.savez(path, **arrays)  # type: ignore[arg-type]  # numpy's stub types **kwds oddly


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    """``python -m modeler bootstrap --ratings FILE [--ranks 10,20] [--regs ...] [--out DIR]``."""
    parser = argparse.ArgumentParser(prog="python -m modeler bootstrap",
                                     description="Batch ALS bootstrap of the streaming model")
    parser.add_argument("--ratings", type=Path, required=True, help="ratings file (any MovieLens format)")
    parser.add_argument("--ranks", default=",".join(map(str, DEFAULT_RANKS)))
    parser.add_argument("--regs", default=",".join(map(str, DEFAULT_REGS)))
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--validation-fraction", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--master", default="local[2]")
    parser.add_argument("--out", type=Path, default=None,
                        help="write bootstrap.json and factors.npz here")
    args = parser.parse_args(argv)
    setup_logging("INFO")

    from common.errors import DatasetError
    from modeler.spark import get_spark

    try:
        rows = read_ratings(args.ratings)
    except DatasetError as exc:
        parser.error(str(exc))
    if not rows:
        parser.error(f"{args.ratings}: no valid ratings")
    spark = get_spark(args.master, app_name="streamrec-bootstrap")
    try:
        model, report = bootstrap_model(
            spark, rows, [int(x) for x in _floats(args.ranks)], _floats(args.regs),
            args.iterations, args.validation_fraction, args.seed,
        )
        log.info("bootstrap: rank %d reg %.3f validation RMSE %.4f (baseline %.4f) in %.1fs",
                 report.rank, report.reg_param, report.validation_rmse, report.baseline_rmse,
                 report.seconds)
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "bootstrap.json").write_text(json.dumps(report.to_dict(), indent=2))
            save_factors(model, args.out / "factors.npz")
            log.info("wrote %s and %s", args.out / "bootstrap.json", args.out / "factors.npz")
    finally:
        spark.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
