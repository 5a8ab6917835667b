"""The seeds' experiment: streaming against batch on the same random test split, for predicted
ratings (RMSE) and for top-10 lists (precision, recall, NDCG, MAP, coverage). Long because
every side of the comparison (batch ALS, streaming, implicit batch ALS, popular, similar
items), its scoring and the report are one command, run end to end.

``python -m modeler.evaluate --ratings FILE [--train-fraction 0.8] [--seed 42]
[--batch-size 1000] [--curve-every k] [--rating-min 0.5 --rating-max 5] [--out DIR]``

FILE is any ratings file :mod:`common.datasets` reads, or an implicit-events file
(``user,item,weight[,timestamp]`` with a header). The rating scale comes from
``RATING_MIN``/``RATING_MAX`` or the flags; a file on another scale is refused with the
range it has.

Predicted ratings (rating files only):

* Random split of the ratings into train/test (``--seed``).
* Batch side: Spark ML ALS on the training part for every point of the grid rank ∈ {10, 20,
  50} × reg_param ∈ {0.05, 0.1, 0.15}, 10 iterations; the best TEST RMSE of the grid is
  reported (the most favourable choice for the batch side, so the ratio is conservative).
* Streaming side: the training part replayed in timestamp order in mini-batches of
  ``--batch-size`` through :class:`~modeler.spark.streaming_als.StreamingALS`; RMSE on the same
  test split after every ``k``-th mini-batch and at the end, and the prequential
  (test-then-train) RMSE of the stream itself. Its parameters are the defaults or, unless
  ``--no-tune``, the best of a few fixed candidates (:data:`CANDIDATES`) on a random 10%
  validation part of the TRAINING data (scored with the identical single-process
  :class:`~modeler.core.als_math.LocalStreamingALS`); the test split is never used to choose.
* Both sides predict test pairs whose user or item never appeared in training the same way:
  the model's fallback (ALS: the training mean; streaming: μ + whatever bias is known), and
  every prediction is clipped to the rating scale.

Top-10 lists (every file; :mod:`modeler.core.ranking_metrics` has the formulas): each user
of the training part with at least one relevant held-out item (a seeded random
:data:`MAX_EVAL_USERS` of them on larger sets) gets a list over the items of the training part
it has not seen in training. Relevant: a held-out rating ≥ the threshold
(4 on 0.5–5, the same relative position on another scale: 8 on 1–10), or, for implicit data,
every held-out event of positive weight. Rows:

* ``popular``: the most-rated (most-played) training items;
* ``batch_implicit_als``: Spark ML ALS with ``implicitPrefs=True``, the best of rank × regParam
  × alpha (:data:`IMPLICIT_GRID`, 10 iterations) by NDCG@10 on a random 10% validation part of
  the training data, refitted on the whole training part. Its confidence input is chosen there
  too: the raw value (rating or weight, c = 1 + α·r) for the whole grid, then our model's
  weights (:class:`common.feedback.Weighting`: liked ratings 1, others 0; log(1 + weight)) at
  the best point, the better of the two kept;
* ``streaming``: our streaming ranking model after one pass (the same StreamingALS run that
  measures the RMSE), with its prequential recall@10 (each batch's events probed before they
  are learned), NDCG@10 over the stream (a second plot);
* ``explicit_order``: our explicit model's order (μ + b_u + b_i + U·P), for the record;
* ``similar_items``: for ordered pairs of items liked by one user in the test split, the share
  whose second item is among the first's 10 most similar (cosine of item vectors), against
  item-item co-occurrence counts of the training part.

Writes ``DIR/report.json``, ``DIR/convergence.png`` (streaming RMSE per mini-batch, batch RMSE
dashed; rating files only) and ``DIR/ranking.png`` (NDCG@10 over the stream against the batch
and popular lines).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from common.datasets import EventRow, RatingRow, read_events
from common.feedback import Weighting
from common.logging import setup_logging
from common.schema import RATING, RatingScale
from modeler.core import ranking_metrics as rm
from modeler.core.als_math import rmse
from modeler.core.ranking import fold_in_users

log = logging.getLogger(__name__)

GRID_RANKS = (10, 20, 50)
GRID_REGS = (0.05, 0.1, 0.15)
MAX_CURVE_POINTS = 60
# The implicit baseline's grid: 8 Spark ALS fits (+ 1 for the confidence input, + 1 refit).
IMPLICIT_GRID: dict[str, tuple[float, ...]] = {"ranks": (20, 50), "regs": (0.01, 0.1), "alphas": (1.0, 10.0)}
RANKING_K = 10
# Lists are scored for at most this many users (a seeded random sample beyond): each scoring
# is a users × items product, repeated along the stream (ml-25m: 162k × 59k).
MAX_EVAL_USERS = 25_000
# NDCG@10 of the stream at most this many times (each point collects the factors).
MAX_RANKING_POINTS = 20
# Item-to-item: at most this many liked pairs of the test split are scored.
MAX_ITEM_PAIRS = 20_000
NOT_IN_BUILD = "not available in this build (StreamingALS has no ranking model yet)"


def split_rows(rows: Sequence[Any], train_fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    """Random train/test split: each rating goes to train with probability ``train_fraction``."""
    rng = np.random.default_rng(seed)
    to_train = rng.random(len(rows)) < train_fraction
    train = [r for r, k in zip(rows, to_train.tolist(), strict=True) if k]
    test = [r for r, k in zip(rows, to_train.tolist(), strict=True) if not k]
    return train, test


def batch_side(spark, train: Sequence[RatingRow], test: Sequence[RatingRow],
               ranks: Sequence[int] = GRID_RANKS, regs: Sequence[float] = GRID_REGS,
               iterations: int = 10, seed: int = 42, scale: RatingScale | None = None,
               progress: Any = None) -> dict[str, Any]:
    """Spark ML ALS over the grid; the best test RMSE with its parameters and the whole grid."""
    from modeler.bootstrap import Indexed, als_predict, pairs_frame, ratings_frame, spark_als

    scale = scale or RatingScale()
    data = Indexed.from_rows(train)
    u_index = {k: j for j, k in enumerate(data.users)}
    i_index = {k: j for j, k in enumerate(data.items)}
    tu = np.array([u_index.get(r.user, -1) for r in test], dtype=np.int64)
    ti = np.array([i_index.get(r.item, -1) for r in test], dtype=np.int64)
    truth = np.array([r.rating for r in test], dtype=np.float64)
    known = (tu >= 0) & (ti >= 0)
    mean = float(data.r.mean())
    grid = []
    best: dict[str, Any] | None = None
    train_df = ratings_frame(spark, data.u, data.i, data.r)
    test_df = pairs_frame(spark, tu[known], ti[known])
    for rank in ranks:
        for reg in regs:
            t0 = time.perf_counter()
            model = spark_als(spark, None, None, None, rank, reg, iterations, seed, frame=train_df)
            pred = np.full(len(test), mean)
            pred[known] = als_predict(spark, model, tu[known], ti[known], frame=test_df)
            pred = np.clip(np.nan_to_num(pred, nan=mean), scale.min, scale.max)
            point = {"rank": rank, "reg_param": reg, "rmse": rmse(truth, pred),
                     "seconds": time.perf_counter() - t0}
            grid.append(point)
            log.info("batch ALS rank=%d reg=%.2f test RMSE %.4f (%.1fs)", rank, reg,
                     point["rmse"], point["seconds"])
            if best is None or point["rmse"] < best["rmse"]:
                best = point
            if progress is not None:
                progress.update(1)
    assert best is not None
    train_df.unpersist()
    test_df.unpersist()
    return {**best, "iterations": iterations, "grid": grid,
            "test_pairs_unseen_in_train": int((~known).sum())}


# Candidates for the streaming parameters, chosen between on a validation part of the
# TRAINING data (never the test split): the defaults (least-squares vector steps, a
# 50,000-rating replay sample), stronger regularisation (sparse long-tail sets like ml-100k
# and ml-latest-small want it), rank 20 (as the batch side's grid has it), and the seeds' SGD
# vector step with a 200,000-rating replay sample or with more passes (which planted
# synthetic data with a strong low-rank signal prefers). Weaker
# regularisation (λ 0.05) and forgetting (β 0.95) were never chosen on any set we have.
CANDIDATES: tuple[dict[str, Any], ...] = (
    {},
    {"reg_param": 0.15},
    {"rank": 20},
    {"rank": 20, "reg_param": 0.15},
    {"vector_step": "sgd", "learning_rate": 0.05, "iterations": 3, "reservoir_size": 200_000},
    {"vector_step": "sgd", "reservoir_size": 50_000, "replay_ratio": 3.0, "reg_param": 0.05,
     "reg_bias": 0.1, "iterations": 4},
)


def sample_users(rows: Sequence[RatingRow], max_ratings: int, seed: int) -> list[RatingRow]:
    """All ratings of randomly chosen users, adding users while the total stays within
    ``max_ratings``."""
    per_user: dict[str, int] = {}
    for r in rows:
        per_user[r.user] = per_user.get(r.user, 0) + 1
    users = sorted(per_user)
    order = np.random.default_rng(seed).permutation(len(users))
    chosen: set[str] = set()
    total = 0
    for k in order.tolist():
        n = per_user[users[k]]
        if total + n <= max_ratings:
            chosen.add(users[k])
            total += n
    return [r for r in rows if r.user in chosen]


def choose_params(train: Sequence[RatingRow], batch_size: int, base: dict[str, Any] | None = None,
                  validation_fraction: float = 0.1, seed: int = 7,
                  candidates: Sequence[dict[str, Any]] = CANDIDATES,
                  max_ratings: int = 1_000_000, scale: RatingScale | None = None
                  ) -> tuple[dict[str, Any], list]:
    """Pick streaming parameters on a random validation part of ``train``.

    Each candidate streams the rest of ``train`` (timestamp order, same batch size) through
    :class:`~modeler.core.als_math.LocalStreamingALS` - the same algorithm as the Spark model,
    in one process - and is scored by RMSE on the held-out part. Returns the winner's
    overrides and the table of all candidates.
    """
    from modeler.core.als_math import ALSParams, LocalStreamingALS
    from modeler.spark.streaming_als import StreamingALS

    if len(train) > max_ratings:
        # Long histories: choose on the whole histories of a random subset of users (about
        # max_ratings ratings). The earliest ratings alone were a poor stand-in: on ml-1m the
        # first 150,000 preferred stronger regularisation than the whole stream does.
        train = sample_users(train, max_ratings, seed)
    fit, valid = split_rows(train, 1.0 - validation_fraction, seed)
    stream = sorted(fit, key=lambda r: (r.timestamp, r.user, r.item))
    truth = np.array([r.rating for r in valid])
    table: list[dict[str, Any]] = []
    for overrides in candidates:
        chosen = {**(base or {}), **overrides}
        params: ALSParams = StreamingALS(**chosen, scale=scale or RatingScale()).params
        local = LocalStreamingALS(params)
        for start in range(0, len(stream), batch_size):
            local.train(stream[start:start + batch_size])
        score = rmse(truth, local.predict([r.user for r in valid], [r.item for r in valid]))
        table.append({"overrides": overrides, "validation_rmse": score})
        log.info("streaming candidate %s: validation RMSE %.4f", overrides, score)
    best = min(table, key=lambda row: row["validation_rmse"])
    return {**(base or {}), **best["overrides"]}, table


def streaming_side(spark, train: Sequence[RatingRow | EventRow], test: Sequence[RatingRow | EventRow],
                   batch_size: int, curve_every: int, params: dict[str, Any] | None = None,
                   scale: RatingScale | None = None, progress: Any = None,
                   ranking_every: int | None = None, ranking_hook: Any = None,
                   explicit: bool = True) -> dict[str, Any]:
    """Replay ``train`` in timestamp order through StreamingALS; test RMSE curve + prequential.

    ``ranking_hook(model)`` (optional) is called every ``ranking_every`` batches and after the
    last one, its answers kept in ``ranking_curve`` as ``[ratings seen, answer]`` (the last
    one in ``model_ranking``); the batches' prequential recall counters (``ranking_hits``,
    ``ranking_probes`` of :class:`TrainStats`, when the model has them) are summed.
    ``explicit=False`` (implicit data): no RMSE is measured."""
    from modeler.spark import default_model_partitions
    from modeler.spark.streaming_als import StreamingALS

    sc = spark.sparkContext
    # The modeler's default layout unless told otherwise (local: one partition, one task per
    # mini-batch; on local[N] the job latency is what limits).
    params = {"num_partitions": default_model_partitions(sc), **(params or {})}
    model = StreamingALS(**params, scale=scale or RatingScale())
    stream = sorted(train, key=lambda r: (r.timestamp, r.user, r.item))
    test_rdd = sc.parallelize([(r[0], r[1], float(r[2])) for r in test],
                              max(2, model.num_partitions)).persist() if explicit else None
    n_batches = math.ceil(len(stream) / batch_size)
    curve: list[list[float]] = []
    sse = 0.0
    n_seen = 0
    train_seconds = 0.0
    eval_seconds = 0.0
    per_batch: list[float] = []
    ranking_curve: list[list[Any]] = []
    hits = probes = 0
    for b in range(n_batches):
        chunk = [stream_record(r) for r in stream[b * batch_size:(b + 1) * batch_size]]
        rdd = sc.parallelize(chunk, 2)
        t0 = time.perf_counter()
        stats = model.train(rdd)
        dt = time.perf_counter() - t0
        train_seconds += dt
        per_batch.append(dt)
        sse += stats.prequential_sse
        n_seen += stats.n_ratings
        hits += int(getattr(stats, "ranking_hits", 0) or 0)
        probes += int(getattr(stats, "ranking_probes", 0) or 0)
        if explicit and ((b + 1) % curve_every == 0 or b + 1 == n_batches):
            t1 = time.perf_counter()
            curve.append([model.ratings_seen, model.rmse(test_rdd)])
            eval_seconds += time.perf_counter() - t1
        if ranking_hook is not None and ranking_every and (
                (b + 1) % ranking_every == 0 or b + 1 == n_batches):
            t1 = time.perf_counter()
            ranking_curve.append([min((b + 1) * batch_size, len(stream)),
                                  ranking_hook(model)])
            eval_seconds += time.perf_counter() - t1
        if progress is not None:
            progress.update(1)
            if curve:
                progress.set_postfix(rmse=f"{curve[-1][1]:.4f}")
    if test_rdd is not None:
        test_rdd.unpersist()
    steady = per_batch[1:] or per_batch
    n_events = len(stream)
    return {
        "rmse": curve[-1][1] if curve else float("nan"),
        "prequential_rmse": math.sqrt(sse / n_seen) if n_seen else float("nan"),
        "ranking_hits": hits,
        "ranking_probes": probes,
        "prequential_recall": hits / probes if probes else None,
        "ranking_curve": ranking_curve,
        "model_ranking": ranking_curve[-1][1] if ranking_curve else None,
        "curve": curve,
        "params": {**model.params.to_dict(), "batch_size": batch_size},
        "seconds": train_seconds,
        "eval_seconds": eval_seconds,
        "batches": n_batches,
        "ratings_per_second": n_seen / train_seconds if train_seconds else float("nan"),
        "events_per_second": n_events / train_seconds if train_seconds else float("nan"),
        "median_batch_seconds": float(np.median(steady)) if steady else float("nan"),
    }


# ---------------------------------------------------------------------------------------------
# Top-10 lists
# ---------------------------------------------------------------------------------------------


def stream_record(row: RatingRow | EventRow) -> tuple:
    """What ``StreamingALS.train`` is given for one row: ``(user, item, rating, timestamp)``
    for a rating (as it always was), ``(user, item, weight, timestamp, type)`` (the
    :class:`~common.datasets.EventRow` as it is) for an implicit event."""
    if isinstance(row, EventRow) and row.type != RATING:
        return tuple(row)
    return (row[0], row[1], row[2], row[3])


def is_implicit(rows: Sequence[RatingRow | EventRow]) -> bool:
    return bool(rows) and isinstance(rows[0], EventRow) and rows[0].type != RATING


@dataclass
class RankingData:
    """A split as the metrics want it: training users and items as indices (the catalogue
    is the training items), each user's training items (never recommended) and relevant
    held-out items. Relevant items the training part never saw get indices past the
    catalogue: no list can hold them, but they count in |R_u| for every row alike."""

    users: list[str]
    items: list[str]
    u_index: dict[str, int]
    i_index: dict[str, int]
    train: rm.UserItems
    relevant: rm.UserItems
    eval_users: np.ndarray
    popularity: np.ndarray
    threshold: float | None
    relevant_unscorable: int
    test_users_unseen: int
    users_with_relevant: int = 0

    @property
    def n_items(self) -> int:
        return len(self.items)

    def describe(self) -> dict[str, Any]:
        return {
            "relevance": ("held-out events of positive weight" if self.threshold is None
                          else f"held-out ratings >= {self.threshold:g}"),
            "threshold": self.threshold,
            "users_evaluated": len(self.eval_users),
            "users_with_relevant_items": self.users_with_relevant,
            "catalogue": self.n_items,
            "relevant_items": int(self.relevant.indices.size),
            "relevant_items_unseen_in_training": self.relevant_unscorable,
            "test_users_unseen_in_training": self.test_users_unseen,
        }


def ranking_data(train: Sequence[RatingRow | EventRow], test: Sequence[RatingRow | EventRow],
                 scale: RatingScale, implicit: bool, max_users: int = MAX_EVAL_USERS,
                 seed: int = 42) -> RankingData:
    """The split for the metrics; lists are scored for every training user with a relevant
    held-out item, or a random ``max_users`` of them when there are more."""
    u_index: dict[str, int] = {}
    i_index: dict[str, int] = {}
    tu = np.fromiter((u_index.setdefault(r[0], len(u_index)) for r in train), np.int64, len(train))
    ti = np.fromiter((i_index.setdefault(r[1], len(i_index)) for r in train), np.int64, len(train))
    n_users, n_items = len(u_index), len(i_index)
    threshold = None if implicit else rm.relevance_threshold(scale.min, scale.max)
    extra: dict[str, int] = {}
    ru: list[int] = []
    ri: list[int] = []
    unseen_users: set[str] = set()
    for r in test:
        liked = r[2] > 0 if threshold is None else r[2] + 1e-9 >= threshold
        if r[0] not in u_index:
            unseen_users.add(r[0])
            continue
        if not liked:
            continue
        ru.append(u_index[r[0]])
        ri.append(i_index[r[1]] if r[1] in i_index else n_items + extra.setdefault(r[1], len(extra)))
    relevant = rm.UserItems.from_pairs(np.array(ru, np.int64), np.array(ri, np.int64), n_users)
    candidates = np.flatnonzero(relevant.counts() > 0)
    eval_users = candidates if len(candidates) <= max_users else \
        np.sort(np.random.default_rng(seed).choice(candidates, size=max_users, replace=False))
    return RankingData(
        users=list(u_index), items=list(i_index), u_index=u_index, i_index=i_index,
        train=rm.UserItems.from_pairs(tu, ti, n_users),
        relevant=relevant,
        eval_users=eval_users,
        popularity=np.bincount(ti, minlength=n_items).astype(np.float64),
        threshold=threshold,
        relevant_unscorable=int((relevant.indices >= n_items).sum()),
        test_users_unseen=len(unseen_users),
        users_with_relevant=len(candidates),
    )


def factor_matrix(index: dict[str, int], n: int, records: Any, rank: int | None = None) -> np.ndarray:
    """Rows of ``(id, vector)`` records placed at ``index[id]`` (zeros for missing ids; ids
    the index does not know are ignored)."""
    pairs = [(index[k], v) for k, v in records if k in index]
    width = rank if rank is not None else (len(pairs[0][1]) if pairs else 1)
    out = np.zeros((n, width), dtype=np.float32)
    for j, v in pairs:
        out[j] = np.asarray(v, dtype=np.float32)
    return out


def score_lists(data: RankingData, user_vecs: np.ndarray, item_vecs: np.ndarray,
                item_bias: np.ndarray | None = None, k: int = RANKING_K) -> dict[str, Any]:
    recs = rm.top_k(user_vecs, item_vecs, k, data.train, item_bias, data.eval_users)
    return rm.ranking_scores(recs, data.eval_users, data.relevant, data.n_items).to_dict()


def popular_side(data: RankingData, k: int = RANKING_K) -> dict[str, Any]:
    recs = rm.popular_top_k(data.popularity, data.eval_users, k, data.train)
    return {**rm.ranking_scores(recs, data.eval_users, data.relevant, data.n_items).to_dict(),
            "by": "training events per item"}


def confidence_values(rows: Sequence[RatingRow | EventRow], source: str, scale: RatingScale,
                      weighting: Weighting) -> np.ndarray:
    """Spark's implicit ``rating`` column: the raw value (rating or weight), or our model's
    weight w (c = 1 + α·w in both)."""
    if source == "raw":
        return np.fromiter((float(r[2]) for r in rows), np.float64, len(rows))
    if rows and isinstance(rows[0], EventRow) and rows[0].type != RATING:
        return np.fromiter((weighting.implicit_weight(r[2]) for r in rows), np.float64, len(rows))
    return np.fromiter((weighting.rating_weight(r[2], scale) for r in rows), np.float64, len(rows))


def spark_implicit_als(frame, rank: int, reg_param: float, alpha: float, iterations: int, seed: int):
    """``pyspark.ml.recommendation.ALS(implicitPrefs=True)`` on a (u, i, r) frame."""
    from pyspark.ml.recommendation import ALS

    blocks = max(2, frame.rdd.getNumPartitions())
    als = ALS(rank=rank, maxIter=iterations, regParam=reg_param, alpha=alpha, implicitPrefs=True,
              userCol="u", itemCol="i", ratingCol="r", seed=seed, coldStartStrategy="nan",
              nonnegative=False, numUserBlocks=blocks, numItemBlocks=blocks)
    return als.fit(frame)


def _als_vectors(model, data: RankingData, rank: int) -> tuple[np.ndarray, np.ndarray]:
    users = [(data.users[row["id"]], row["features"]) for row in model.userFactors.collect()]
    items = [(data.items[row["id"]], row["features"]) for row in model.itemFactors.collect()]
    return (factor_matrix(data.u_index, len(data.users), users, rank),
            factor_matrix(data.i_index, data.n_items, items, rank))


def batch_implicit_side(spark, train: Sequence[RatingRow | EventRow], data: RankingData,
                        scale: RatingScale, weighting: Weighting, implicit: bool,
                        grid: Mapping[str, Sequence[float]] | None = None, iterations: int = 10,
                        seed: int = 42, validation_fraction: float = 0.1, k: int = RANKING_K,
                        progress: Any = None) -> tuple[dict[str, Any], np.ndarray]:
    """Spark ML implicit ALS, chosen on validation (see the module docstring); returns the
    test block and the chosen model's item vectors (for the item-to-item scores)."""
    from modeler.bootstrap import ratings_frame

    grid = grid if grid is not None else IMPLICIT_GRID
    fit, valid = split_rows(train, 1.0 - validation_fraction, seed + 1)
    vdata = ranking_data(fit, valid, scale, implicit)
    vu = np.array([vdata.u_index[r[0]] for r in fit], np.int64)
    vi = np.array([vdata.i_index[r[1]] for r in fit], np.int64)
    frames = {"raw": ratings_frame(spark, vu, vi, confidence_values(fit, "raw", scale, weighting))}
    table: list[dict[str, Any]] = []

    def point(source: str, rank: int, reg: float, alpha: float) -> dict[str, Any]:
        t0 = time.perf_counter()
        if source not in frames:
            frames[source] = ratings_frame(spark, vu, vi, confidence_values(fit, source, scale, weighting))
        model = spark_implicit_als(frames[source], rank, reg, alpha, iterations, seed)
        x, y = _als_vectors(model, vdata, rank)
        ndcg = score_lists(vdata, x, y, None, k)["ndcg"]
        row = {"confidence": source, "rank": rank, "reg_param": reg, "alpha": alpha,
               "validation_ndcg": ndcg, "seconds": time.perf_counter() - t0}
        log.info("implicit ALS %s rank=%d reg=%g alpha=%g validation NDCG@%d %.4f (%.1fs)",
                 source, rank, reg, alpha, k, ndcg, row["seconds"])
        table.append(row)
        if progress is not None:
            progress.update(1)
        return row

    for rank in grid["ranks"]:
        for reg in grid["regs"]:
            for alpha in grid["alphas"]:
                point("raw", int(rank), float(reg), float(alpha))
    best = max(table, key=lambda r: r["validation_ndcg"])
    point("weights", best["rank"], best["reg_param"], best["alpha"])
    best = max(table, key=lambda r: r["validation_ndcg"])
    for f in frames.values():
        f.unpersist()

    t0 = time.perf_counter()
    u = np.array([data.u_index[r[0]] for r in train], np.int64)
    i = np.array([data.i_index[r[1]] for r in train], np.int64)
    frame = ratings_frame(spark, u, i, confidence_values(train, best["confidence"], scale, weighting))
    model = spark_implicit_als(frame, best["rank"], best["reg_param"], best["alpha"], iterations, seed)
    x, y = _als_vectors(model, data, best["rank"])
    frame.unpersist()
    if progress is not None:
        progress.update(1)
    params = {key: best[key] for key in ("rank", "reg_param", "alpha", "confidence")}
    params["iterations"] = iterations
    block = {**score_lists(data, x, y, None, k), "params": params, "grid": table,
             "confidence_inputs": {"raw": "the rating (or weight) itself",
                                   "weights": f"our model's weights ({weighting.to_dict()})"},
             "validation_fraction": validation_fraction,
             "refit_seconds": time.perf_counter() - t0}
    return block, y


def explicit_vectors(model, data: RankingData) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(user vectors, item vectors, item biases) of the explicit streaming model on the
    split's indices: its order μ + b_u + b_i + x_u·y_i is b_i + x_u·y_i for one user."""
    users = model.user_factors.map(lambda kv: (kv[0], kv[1][1])).collect()
    items = model.item_factors.map(lambda kv: (kv[0], (kv[1][0], kv[1][1]))).collect()
    x = factor_matrix(data.u_index, len(data.users), users, model.rank)
    y = factor_matrix(data.i_index, data.n_items, [(k, v[1]) for k, v in items], model.rank)
    bias = np.zeros(data.n_items, dtype=np.float32)
    for key, (b, _) in items:
        if key in data.i_index:
            bias[data.i_index[key]] = b
    return x, y, bias


def streaming_ranking_factors(model, data: RankingData) -> tuple[np.ndarray, np.ndarray] | None:
    """The streaming RANKING model's (user vectors, item vectors) on the split's indices, or
    ``None`` when this build's StreamingALS has no ranking model (the one place that asks)."""
    users_rdd = getattr(model, "ranking_user_factors", None)
    items_rdd = getattr(model, "ranking_item_factors", None)
    if users_rdd is None or items_rdd is None:
        return None
    users = users_rdd.collect()
    items = items_rdd.collect()
    rank = len(items[0][1]) if items else 1
    return (factor_matrix(data.u_index, len(data.users), users, rank),
            factor_matrix(data.i_index, data.n_items, items, rank))


def model_weighting() -> Weighting:
    """The rating/weight -> confidence mapping our ranking model trains with (its
    ``ALSParams.weighting`` default once it has one, else :class:`Weighting`'s defaults)."""
    from modeler.core.als_math import ALSParams

    w = getattr(ALSParams(), "weighting", None)
    return w if isinstance(w, Weighting) else Weighting()


def ranking_available() -> bool:
    from modeler.spark.streaming_als import StreamingALS

    return hasattr(StreamingALS, "ranking_user_factors")


def similar_items_side(data: RankingData,
                       vectors: dict[str, np.ndarray | None], k: int = RANKING_K,
                       max_pairs: int = MAX_ITEM_PAIRS, seed: int = 42) -> dict[str, Any]:
    """Hit rate of liked test pairs (a, b) in a's top-k similar items, per set of item
    vectors (cosine), against training co-occurrence."""
    liked = rm.UserItems(data.relevant.indptr, data.relevant.indices)
    # Only items of the catalogue can be queried or found.
    inside = liked.indices < data.n_items
    rows = np.repeat(np.arange(liked.n_rows), liked.counts())[inside]
    liked = rm.UserItems.from_pairs(rows, liked.indices[inside], liked.n_rows)
    pairs = rm.liked_pairs(liked, max_pairs, seed)
    queries = np.unique(pairs.a)
    out: dict[str, Any] = {"k": k, "pairs": len(pairs.a), "query_items": len(queries),
                           "pairs_from": "ordered pairs of relevant held-out items of one user"}
    t0 = time.perf_counter()
    out["cooccurrence"] = rm.pair_hit_rate(rm.cooccurrence_top_k(data.train, data.n_items, queries, k),
                                           queries, pairs)
    for name, y in vectors.items():
        out[name] = None if y is None else rm.pair_hit_rate(rm.cosine_top_k(y, queries, k), queries, pairs)
    out["seconds"] = time.perf_counter() - t0
    return out


def unavailable(reason: str) -> dict[str, Any]:
    nan = None
    return {"available": False, "reason": reason, "precision": nan, "recall": nan, "ndcg": nan,
            "map": nan, "coverage": nan}


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = np.asarray(report["streaming"]["curve"], dtype=float).reshape(-1, 2)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(curve[:, 0], curve[:, 1], color="tab:blue", lw=1.5, label="streaming ALS (test RMSE)")
    ax.axhline(report["batch_als"]["rmse"], color="black", ls="--", lw=1.2,
               label=f"batch ALS rank {report['batch_als']['rank']}, "
                     f"λ={report['batch_als']['reg_param']} ({report['batch_als']['rmse']:.4f})")
    ax.set_xlabel("training ratings seen (timestamp order)")
    ax.set_ylabel("RMSE on the test split")
    ax.set_title(f"{report['dataset']}: streaming {report['streaming']['rmse']:.4f} vs batch "
                 f"{report['batch_als']['rmse']:.4f} (ratio {report['ratio']:.3f})")
    if len(curve):
        top = min(float(curve[:, 1].max()), report["batch_als"]["rmse"] * 1.6)
        ax.set_ylim(report["batch_als"]["rmse"] * 0.95, max(top, report["batch_als"]["rmse"] * 1.1))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_ranking(report: dict[str, Any], path: Path) -> None:
    """NDCG@k of the stream over time (ranking model, explicit order) against the batch
    implicit ALS and most-popular lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ranking = report["ranking"]
    k = ranking["k"]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, color, label in (("streaming", "tab:blue", "streaming ranking model"),
                               ("explicit_order", "tab:orange", "streaming explicit model's order")):
        curve = np.asarray(ranking[name].get("curve") or [], dtype=float).reshape(-1, 2)
        if len(curve):
            ax.plot(curve[:, 0], curve[:, 1], color=color, lw=1.5,
                    label=f"{label} ({ranking[name]['ndcg']:.3f})")
    batch = ranking["batch_implicit_als"]
    bp = batch["params"]
    ax.axhline(batch["ndcg"], color="black", ls="--", lw=1.2,
               label=f"batch implicit ALS rank {bp['rank']}, λ={bp['reg_param']:g}, "
                     f"α={bp['alpha']:g} ({batch['ndcg']:.3f})")
    ax.axhline(ranking["popular"]["ndcg"], color="gray", ls=":", lw=1.2,
               label=f"most popular ({ranking['popular']['ndcg']:.3f})")
    ax.set_xlabel("training events seen (timestamp order)")
    ax.set_ylabel(f"NDCG@{k} on the test split")
    missing = "" if ranking["streaming"].get("available", True) else \
        " (no streaming ranking model in this build)"
    ax.set_title(f"{report['dataset']}: top-{k} lists over the stream{missing}", fontsize=10)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


class TrainHistory(NamedTuple):
    """Each training user's items with their confidence weights w (CSR on the split's
    indices): what ``{p}:rated:{user}`` holds for the predictor's fold-in."""

    indptr: np.ndarray
    items: np.ndarray
    weights: np.ndarray

    @classmethod
    def of(cls, train: Sequence[RatingRow | EventRow], data: RankingData, weighting: Weighting,
           scale: RatingScale) -> TrainHistory:
        # Later rows of the same pair win, as HSET does in Redis.
        last: dict[tuple[int, int], float] = {}
        for r in train:
            implicit = isinstance(r, EventRow) and r.type != RATING
            w = weighting.implicit_weight(r[2]) if implicit else weighting.rating_weight(r[2], scale)
            last[(data.u_index[r[0]], data.i_index[r[1]])] = w
        pairs = np.array(list(last), dtype=np.int64).reshape(-1, 2)
        ws = np.fromiter(last.values(), np.float64, len(last))
        order = np.lexsort((pairs[:, 1], pairs[:, 0]))
        counts = np.bincount(pairs[:, 0], minlength=len(data.users))
        indptr = np.zeros(len(data.users) + 1, dtype=np.int64)
        np.cumsum(counts, out=indptr[1:])
        return cls(indptr, pairs[order, 1], ws[order])


class StreamRankingProbe:
    """:func:`streaming_side`'s ranking hook: scores the ranking model and the explicit order
    on the test split, and keeps the last item vectors (for the item-to-item scores).

    ``streaming`` scores what the predictor serves: the streamed item vectors with each user
    folded in from their training history (``PREDICTOR_REFIT_USERS``, the default);
    ``streaming_model_vectors`` the streamed user vectors themselves, for the record."""

    def __init__(self, data: RankingData, explicit: bool, k: int = RANKING_K,
                 history: TrainHistory | None = None) -> None:
        self.data = data
        self.explicit = explicit
        self.k = k
        self.history = history
        self.item_vectors: dict[str, np.ndarray] = {}

    def __call__(self, model) -> dict[str, Any]:
        out: dict[str, Any] = {}
        factors = streaming_ranking_factors(model, self.data)
        if factors is not None:
            x, y = factors
            if self.history is not None:
                p = model.params
                served = np.zeros_like(x)
                served[self.data.eval_users] = fold_in_users(
                    self.history.indptr, self.history.items, self.history.weights,
                    self.data.eval_users, y, p.ranking_alpha, p.ranking_reg_param, p.ranking_reg_scaling)
                out["streaming"] = {**score_lists(self.data, served, y, None, self.k),
                                    "user_vectors": "folded in from their history (served)"}
                out["streaming_model_vectors"] = score_lists(self.data, x, y, None, self.k)
            else:
                out["streaming"] = score_lists(self.data, x, y, None, self.k)
            self.item_vectors["streaming"] = y
        if self.explicit:
            x, y, b = explicit_vectors(model, self.data)
            out["explicit_order"] = score_lists(self.data, x, y, b, self.k)
            self.item_vectors["explicit"] = y
        return out


def _curve_of(streaming: dict[str, Any], name: str) -> list[list[float]]:
    return [[seen, point[name]["ndcg"]] for seen, point in streaming.get("ranking_curve", [])
            if name in point]


def evaluate(spark, rows: Sequence[RatingRow | EventRow], dataset: str, train_fraction: float = 0.8,
             seed: int = 42, batch_size: int = 1000, curve_every: int | None = None,
             params: dict[str, Any] | None = None, ranks: Sequence[int] = GRID_RANKS,
             regs: Sequence[float] = GRID_REGS, show_progress: bool = True,
             tune: bool = True, scale: RatingScale | None = None, ranking: bool = True,
             implicit_grid: Mapping[str, Sequence[float]] | None = None, k: int = RANKING_K,
             ranking_every: int | None = None, weighting: Weighting | None = None) -> dict[str, Any]:
    """Run every side and return the report dict (see the module docstring).

    ``rows``: ratings (:class:`RatingRow`, or :class:`EventRow` of type rating) or implicit
    events (:class:`EventRow` of another type: no RMSE then, ranking rows only)."""
    from tqdm import tqdm

    scale = scale or RatingScale()
    implicit = is_implicit(rows)
    if not implicit:
        # Plain 4-field ratings: the explicit model sees exactly what it always saw.
        rows = [r if type(r) is RatingRow else RatingRow(r[0], r[1], float(r[2]), int(r[3]))
                for r in rows]
    train, test = split_rows(rows, train_fraction, seed)
    if not train or not test:
        raise ValueError("the split left an empty training or test part; use more ratings")
    grid = implicit_grid if implicit_grid is not None else IMPLICIT_GRID
    n_batches = math.ceil(len(train) / batch_size)
    every = curve_every or max(1, math.ceil(n_batches / MAX_CURVE_POINTS))
    r_every = ranking_every or max(1, math.ceil(n_batches / MAX_RANKING_POINTS))
    has_ranking_model = ranking_available()
    stream_runs = not implicit or has_ranking_model
    n_implicit_fits = len(grid["ranks"]) * len(grid["regs"]) * len(grid["alphas"]) + 2
    total = ((0 if implicit else len(ranks) * len(regs)) + (n_implicit_fits if ranking else 0)
             + (n_batches if stream_runs else 0))
    weighting = weighting or model_weighting()
    report: dict[str, Any] = {
        "dataset": dataset, "n_ratings": len(rows), "n_train": len(train), "n_test": len(test),
        "train_fraction": train_fraction, "seed": seed, "implicit": implicit,
        "scale": {"min": scale.min, "max": scale.max}, "curve_every": every,
    }
    with tqdm(total=total, desc="evaluate", unit="step", disable=not show_progress,
              file=sys.stderr) as bar:
        batch = None
        if not implicit:
            bar.set_description("batch ALS grid")
            started = time.perf_counter()
            batch = batch_side(spark, train, test, ranks, regs, seed=seed, scale=scale, progress=bar)
            batch["seconds_total"] = time.perf_counter() - started
        data = probe = None
        ranking_block: dict[str, Any] = {}
        if ranking:
            data = ranking_data(train, test, scale, implicit)
            ranking_block = {"k": k, **data.describe(), "popular": popular_side(data, k)}
            bar.set_description("batch implicit ALS grid")
            started = time.perf_counter()
            batch_ranking, batch_items = batch_implicit_side(
                spark, train, data, scale, weighting, implicit, grid, seed=seed, k=k, progress=bar)
            batch_ranking["seconds_total"] = time.perf_counter() - started
            ranking_block["batch_implicit_als"] = batch_ranking
            probe = StreamRankingProbe(data, explicit=not implicit, k=k,
                                       history=TrainHistory.of(train, data, weighting, scale))
        selection = None
        if tune and not implicit:
            bar.set_description("streaming: choosing parameters on validation")
            t0 = time.perf_counter()
            params, table = choose_params(train, batch_size, params, scale=scale)
            selection = {"candidates": table, "chosen": params,
                         "seconds": time.perf_counter() - t0}
        streaming = None
        if stream_runs:
            bar.set_description("streaming")
            streaming = streaming_side(spark, train, test, batch_size, every, params, scale=scale,
                                       progress=bar, ranking_every=r_every if ranking else None,
                                       ranking_hook=probe, explicit=not implicit)
            streaming["selection"] = selection
    if implicit:
        report["explicit"] = "not measured: an implicit-events file has no ratings (no RMSE, " \
                             "no explicit model)"
    else:
        assert batch is not None and streaming is not None
        report.update({"batch_als": batch, "ratio": streaming["rmse"] / batch["rmse"]})
    if streaming is not None:
        report["streaming"] = {key: v for key, v in streaming.items()
                               if key not in ("ranking_curve", "model_ranking")}
    if ranking and data is not None and probe is not None:
        run = streaming or {}
        final = run.get("model_ranking") or {}
        if "streaming" in final:
            ranking_block["streaming"] = {
                **final["streaming"], "prequential_recall": run["prequential_recall"],
                "prequential_probes": run["ranking_probes"],
                "curve": _curve_of(run, "streaming"),
            }
        else:
            ranking_block["streaming"] = {**unavailable(NOT_IN_BUILD),
                                          "prequential_recall": None}
        if "streaming_model_vectors" in final:
            ranking_block["streaming_model_vectors"] = {
                **final["streaming_model_vectors"], "curve": _curve_of(run, "streaming_model_vectors")}
        if "explicit_order" in final:
            ranking_block["explicit_order"] = {**final["explicit_order"],
                                               "curve": _curve_of(run, "explicit_order")}
        else:
            ranking_block["explicit_order"] = unavailable(
                "implicit data: no explicit model is trained" if implicit else "no streaming run")
        b_ndcg = ranking_block["batch_implicit_als"]["ndcg"]
        p_ndcg = ranking_block["popular"]["ndcg"]
        s_ndcg = ranking_block["streaming"]["ndcg"]
        ranking_block["ratios"] = {
            "streaming_to_batch_ndcg": None if s_ndcg is None else rm.safe_ratio(s_ndcg, b_ndcg),
            "streaming_to_popular_ndcg": None if s_ndcg is None else rm.safe_ratio(s_ndcg, p_ndcg),
            "batch_to_popular_ndcg": rm.safe_ratio(b_ndcg, p_ndcg),
        }
        ranking_block["similar_items"] = similar_items_side(
            data, {"batch_implicit_als": batch_items,
                         "streaming": probe.item_vectors.get("streaming"),
                         "explicit": probe.item_vectors.get("explicit")}, k, seed=seed)
        ranking_block["curve_every"] = r_every
        report["ranking"] = ranking_block
    return report


def _param(text: str) -> tuple[str, Any]:
    key, _, value = text.partition("=")
    if not key or not value:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _fmt(x: Any) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def summary(report: dict[str, Any]) -> str:
    """One paragraph of the figures, for the terminal."""
    lines = []
    if "batch_als" in report:
        b, st = report["batch_als"], report["streaming"]
        lines.append(f"{report['dataset']}: RMSE batch ALS {b['rmse']:.4f} (rank {b['rank']}, reg "
                     f"{b['reg_param']}), streaming {st['rmse']:.4f}, ratio {report['ratio']:.4f}, "
                     f"prequential {st['prequential_rmse']:.4f}")
    else:
        lines.append(f"{report['dataset']}: {report['explicit']}")
    if "ranking" in report:
        r = report["ranking"]
        for name in ("popular", "batch_implicit_als", "streaming", "streaming_model_vectors",
                     "explicit_order"):
            if name not in r:
                continue
            block = r[name]
            note = f" ({block['reason']})" if block.get("available") is False else ""
            lines.append(f"  NDCG@{r['k']} {name:<23} {_fmt(block['ndcg'])}  precision "
                         f"{_fmt(block['precision'])}  recall {_fmt(block['recall'])}  MAP "
                         f"{_fmt(block['map'])}  coverage {_fmt(block['coverage'])}{note}")
        lines.append(f"  prequential recall@{r['k']} {_fmt(r['streaming'].get('prequential_recall'))}")
        sim = r["similar_items"]
        lines.append(f"  similar items hit rate@{sim['k']} over {sim['pairs']} pairs: co-occurrence "
                     f"{_fmt(sim['cooccurrence'])}, batch implicit ALS "
                     f"{_fmt(sim['batch_implicit_als'])}, streaming {_fmt(sim['streaming'])}, "
                     f"explicit {_fmt(sim['explicit'])}")
    return "\n".join(lines)


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x.strip())


def main(argv: list[str] | None = None) -> int:
    from common.settings import CommonSettings

    settings_scale = CommonSettings().scale  # RATING_MIN / RATING_MAX; the flags win
    parser = argparse.ArgumentParser(prog="python -m modeler.evaluate",
                                     description="Streaming vs batch on a random test split: "
                                                 "RMSE and top-10 lists")
    parser.add_argument("--ratings", type=Path, required=True,
                        help="ratings file (MovieLens formats) or implicit events "
                             "(user,item,weight[,timestamp] with a header)")
    parser.add_argument("--train-fraction", type=float, default=0.8)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--curve-every", type=int, default=None,
                        help=f"test RMSE after every k-th mini-batch (default: at most "
                             f"{MAX_CURVE_POINTS} points)")
    parser.add_argument("--ranking-every", type=int, default=None,
                        help=f"test NDCG after every k-th mini-batch (default: at most "
                             f"{MAX_RANKING_POINTS} points)")
    parser.add_argument("--rating-min", type=float, default=settings_scale.min,
                        help="rating scale (default RATING_MIN)")
    parser.add_argument("--rating-max", type=float, default=settings_scale.max,
                        help="rating scale (default RATING_MAX)")
    parser.add_argument("--out", type=Path, default=Path("build/eval"))
    parser.add_argument("--master", default="local[2]")
    parser.add_argument("--ranks", default=",".join(map(str, GRID_RANKS)), help="batch ALS grid")
    parser.add_argument("--regs", default=",".join(map(str, GRID_REGS)), help="batch ALS grid")
    parser.add_argument("--implicit-ranks", default=",".join(map(str, IMPLICIT_GRID["ranks"])),
                        help="batch implicit ALS grid")
    parser.add_argument("--implicit-regs", default=",".join(map(str, IMPLICIT_GRID["regs"])),
                        help="batch implicit ALS grid")
    parser.add_argument("--implicit-alphas", default=",".join(map(str, IMPLICIT_GRID["alphas"])),
                        help="batch implicit ALS grid")
    parser.add_argument("--no-ranking", action="store_true", help="RMSE only (no top-10 lists)")
    parser.add_argument("--param", type=_param, action="append", default=[],
                        help="streaming parameter override key=value (for experiments)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--no-tune", action="store_true",
                        help="use the streaming defaults instead of choosing among a few "
                             "candidates on a validation part of the training data")
    args = parser.parse_args(argv)
    setup_logging("WARNING")
    if not 0.0 < args.train_fraction < 1.0:
        parser.error("--train-fraction must be between 0 and 1")
    if args.batch_size < 1 or (args.curve_every is not None and args.curve_every < 1) \
            or (args.ranking_every is not None and args.ranking_every < 1):
        parser.error("--batch-size, --curve-every and --ranking-every must be positive")
    if not args.rating_min < args.rating_max:
        parser.error("--rating-min must be below --rating-max")
    try:
        implicit_grid = {"ranks": tuple(int(x) for x in _floats(args.implicit_ranks)),
                         "regs": _floats(args.implicit_regs), "alphas": _floats(args.implicit_alphas)}
        ranks, regs = [int(x) for x in _floats(args.ranks)], list(_floats(args.regs))
    except ValueError as exc:
        parser.error(f"grid: {exc}")
    if not all(implicit_grid.values()) or not ranks or not regs:
        parser.error("every grid needs at least one value")
    scale = RatingScale(min=args.rating_min, max=args.rating_max)

    from common.errors import DatasetError
    from modeler.spark import get_spark

    try:
        rows = read_events(args.ratings, scale=scale)
    except DatasetError as exc:
        parser.error(str(exc))
    if len(rows) < 10:
        parser.error(f"{args.ratings}: only {len(rows)} valid rows")
    dataset = args.ratings.parent.name if args.ratings.name.startswith(("ratings", "u.data")) \
        else args.ratings.stem
    spark = get_spark(args.master, app_name="streamrec-evaluate")
    try:
        report = evaluate(
            spark, rows, dataset, args.train_fraction, args.seed, args.batch_size,
            args.curve_every, dict(args.param), ranks, regs, show_progress=not args.no_progress,
            tune=not args.no_tune, scale=scale, ranking=not args.no_ranking,
            implicit_grid=implicit_grid, ranking_every=args.ranking_every,
        )
    finally:
        spark.stop()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.json").write_text(json.dumps(report, indent=2))
    written = [args.out / "report.json"]
    if "batch_als" in report:
        plot(report, args.out / "convergence.png")
        written.append(args.out / "convergence.png")
    if "ranking" in report:
        plot_ranking(report, args.out / "ranking.png")
        written.append(args.out / "ranking.png")
    sys.stderr.write(summary(report) + f"\nwrote {', '.join(map(str, written))}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
