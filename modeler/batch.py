"""The seeds' batch job: ALS over a whole file, a grid search, top-N for every user, exported with the original ids.

``python -m modeler.batch --input FILE_OR_DIR --out DIR`` (or ``spark-submit modeler/batch.py ...``
on any master) runs, all on Spark and without collecting data or factor matrices to the driver:

1. **Read** (:func:`read_input`): MovieLens ratings (``ratings.csv`` with header, ml-100k
   ``u.data`` tab, ml-1m ``::``), implicit ``user,item,weight[,timestamp]`` files with a header
   (tab or comma, e.g. Last.fm ``user_artists.dat``), or a directory of CSV/Parquet part files.
   Ids stay strings, byte for byte. A bad row fails the job naming ``file:line`` (or is skipped
   with ``--skip-bad``).
2. **Index** ids with ``StringIndexer`` (frequency order, as seed 002), back with ``IndexToString``.
3. **Train** ``pyspark.ml.recommendation.ALS``: implicit (Hu, Koren & Volinsky 2008: confidence
   ``c = 1 + α·w``, preference ``p = [w > 0]``, w from :class:`common.feedback.Weighting`) or
   explicit (on ``r − μ``). A grid over rank × regParam (× α) is scored on a validation part of
   the training split: NDCG@10 for implicit data, RMSE for explicit. The chosen point is refitted
   on the training split and scored once on the test split (with most-popular as the yardstick),
   then refitted on everything for the exported and published model (``--no-refit`` skips that).
4. **Recommend** the top ``--top`` items for every user, the user's own items excluded, with a
   blocked product (:func:`blocked_top_k`: user blocks × item blocks on the executors, a top-k
   per block pair, merged per user block); ``--similar N`` does the same for item-item cosine.
5. **Export** ``(user, rank, item, score)`` rows (or one row per user with an array,
   ``--layout arrays``) as ``--format parquet|csv|json`` into ``--out``: Spark's part files and
   ``_SUCCESS`` per table, ``report.json`` and a top-level ``_SUCCESS``. Everything is written to
   a temporary directory beside ``--out`` and renamed at the end: a failed run leaves nothing.
6. **Publish** (``--publish``) the model into Redis as a version the predictor serves
   (:func:`publish_model`): segments written per partition from the executors with
   :func:`common.snapshot.write_segment`, the version flipped once on the driver.

Exit codes: 0 done, 2 bad input or arguments (one line naming the file and line, no
traceback), 3 publish refused (a live modeler holds the lease; ``--force`` overrides).

Long because the job is one pipeline: the six steps above are this file's sections, in that
order, and each fills in the one ``JobConfig``/``Report`` pair that ``run_job`` threads through
them (a split into reading, training and export modules is still open).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # `spark-submit modeler/batch.py`: make the packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import gzip
import json
import logging
import math
import os
import shutil
import tempfile
import time
import uuid
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

import numpy as np

from common.datasets import is_number
from common.errors import DatasetError, StreamrecError
from common.feedback import Weighting
from common.schema import MAX_ID_LENGTH, RatingScale

log = logging.getLogger(__name__)

EXIT_BAD_INPUT = 2
EXIT_PUBLISH_REFUSED = 3
FORMATS = ("parquet", "csv", "json")
DEFAULT_RANKS = (10, 50)
DEFAULT_REGS = (0.01, 0.1)
DEFAULT_ALPHAS = (1.0, 10.0)
# Header names that say the third column is an implicit weight (events) or a rating.
WEIGHT_NAMES = ("weight", "count", "plays", "playcount", "play_count", "clicks", "views", "value", "score")
RATING_NAMES = ("rating", "ratings", "stars")
USER_NAMES = ("user", "userid", "user_id", "uid")
ITEM_NAMES = ("item", "itemid", "item_id", "movieid", "movie_id", "artistid", "artist_id", "songid",
              "song_id", "trackid", "product", "productid")
USER_BLOCK = 1024  # users per block of the blocked product: 1024 x (item block) float32 scores
ITEM_BLOCK = 8192


class BatchError(StreamrecError):
    """The batch job cannot do what it was asked (arguments, output directory)."""


class PublishRefused(BatchError):
    """A live modeler holds the single-writer lease: publishing now would race it."""


# --------------------------------------------------------------------------- input


class InputSpec(NamedTuple):
    """What :func:`detect_input` found: how to read ``path`` and what its values are."""

    path: str
    fmt: str  # "text" (delimited lines) or "parquet"
    sep: str  # field separator of text input ("::", "\t", ",")
    header: str  # the header line to drop ("" when none)
    kind: str  # "rating" (explicit values on the scale) or "event" (implicit weights)
    files: tuple[str, ...]  # the data files (one, or the part files of a directory)
    columns: tuple[str, str, str]  # user, item, value column names (Parquet); labels otherwise


def _data_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(("_", ".")))
    return [p for p in files if not p.name.endswith(".crc")]


def _first_line(path: Path) -> str:
    with path.open("rb") as raw:
        head = raw.read(4)
    opener = gzip.open if head[:2] == b"\x1f\x8b" else open
    with opener(path, "rb") as fh:
        for line in fh:
            text = line.decode("utf-8", errors="replace").rstrip("\r\n")
            if text.strip():
                return text
    return ""


def detect_input(path: str | Path, kind: str | None = None) -> InputSpec:
    """Format, separator, header and value kind of ``path`` (a file or a directory of parts).

    Reads only the first line of the first data file, on the driver. Raises
    :class:`DatasetError` naming the file (and line 1) when it is not a known format.
    """
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"{path}: no such file or directory")
    files = _data_files(path)
    if not files:
        raise DatasetError(f"{path}: empty directory (no data files)")
    first = files[0]
    with first.open("rb") as fh:
        magic = fh.read(4)
    if magic == b"PAR1":
        return _detect_parquet(path, files, kind)
    line = ""
    for f in files:  # Spark may write empty part files; take the first non-empty one
        line = _first_line(f)
        if line:
            first = f
            break
    if not line:
        raise DatasetError(f"{path}: empty file")
    if "::" in line:
        sep = "::"
    elif "\t" in line:
        sep = "\t"
    elif "," in line:
        sep = ","
    else:
        raise DatasetError(f"{first}:1: unknown format (no ',', '::' or tab separator): {line[:80]!r}")
    parts = [p.strip().strip('"') for p in line.split(sep)]
    if len(parts) < 3:
        raise DatasetError(f"{first}:1: unknown format: expected user{sep}item{sep}value, got {len(parts)} field(s)")
    header = ""
    found = "rating"
    labels = ("user", "item", "rating")
    if not is_number(parts[2]):
        # A header line: its third name says ratings or events.
        header = line
        third = parts[2].lower()
        if third in WEIGHT_NAMES:
            found = "event"
        elif third not in RATING_NAMES:
            raise DatasetError(f"{first}:1: unknown format: third column {parts[2]!r} is neither a rating "
                               f"({', '.join(RATING_NAMES)}) nor a weight ({', '.join(WEIGHT_NAMES)})")
        labels = (parts[0], parts[1], parts[2])
    return InputSpec(str(path), "text", sep, header, kind or found, tuple(map(str, files)), labels)




def _pick(columns: Sequence[str], names: Sequence[str], what: str, where: str) -> str:
    lower = {c.lower(): c for c in columns}
    for name in names:
        if name in lower:
            return lower[name]
    raise DatasetError(f"{where}: no {what} column (looked for {', '.join(names)}; found {', '.join(columns)})")


def _detect_parquet(path: Path, files: list[Path], kind: str | None) -> InputSpec:
    # The column names are resolved against the schema Spark reads (see read_input).
    return InputSpec(str(path), "parquet", "", "", kind or "", tuple(map(str, files)), ("", "", ""))


class Parsed(NamedTuple):
    """The input as one DataFrame ``(user, item, value)`` plus what reading it found."""

    frame: Any  # DataFrame[user string, item string, value double]
    kind: str
    rows: int
    bad_rows: int
    cached: Any = None  # the checked rows, cached for the checks; unpersist once the pairs are cached


def _where(spec: InputSpec, file_uri: str, raw: str | None) -> str:
    """``file:line`` of a bad row: the line is found by scanning that one file on the driver
    (only on the failure path; the data itself is read and checked by Spark)."""
    from urllib.parse import unquote, urlparse

    path = Path(unquote(urlparse(file_uri).path)) if file_uri.startswith("file:") else Path(file_uri)
    if raw is None or spec.fmt != "text" or not path.is_file():
        return str(path)
    with path.open("rb") as head:
        magic = head.read(2)
    opener = gzip.open if magic == b"\x1f\x8b" else open
    with opener(path, "rb") as fh:
        for lineno, line in enumerate(fh, start=1):
            if line.decode("utf-8", errors="replace").rstrip("\r\n") == raw:
                return f"{path}:{lineno}"
    return str(path)


def read_input(spark, spec: InputSpec, scale: RatingScale | None = None, max_weight: float = 1e6,
               skip_bad: bool = False) -> Parsed:
    """Read ``spec`` with Spark into ``(user, item, value)``; bad rows fail (or are skipped).

    Values: a rating must lie on ``scale``; an event weight must be finite, >= 0 and <=
    ``max_weight``. Ids are trimmed of surrounding spaces only (as :mod:`common.datasets`).
    """
    from pyspark.sql import functions as F

    scale = scale or RatingScale()
    kind = spec.kind
    if spec.fmt == "parquet":
        df = spark.read.parquet(spec.path)
        where = spec.path
        user_col = _pick(df.columns, USER_NAMES, "user", where)
        item_col = _pick(df.columns, ITEM_NAMES, "item", where)
        try:
            value_col = _pick(df.columns, WEIGHT_NAMES, "weight", where)
            kind = kind or "event"
        except DatasetError:
            value_col = _pick(df.columns, RATING_NAMES + WEIGHT_NAMES, "rating or weight", where)
            kind = kind or "rating"
        raw_value = F.col(value_col).cast("string")
        frame = df.select(
            F.trim(F.col(user_col).cast("string")).alias("user"),
            F.trim(F.col(item_col).cast("string")).alias("item"),
            raw_value.alias("value_text"),
            F.lit(None).cast("string").alias("line"),
            F.lit(3).alias("n_fields"),
            F.input_file_name().alias("file"),
        )
    else:
        text = spark.read.text(list(spec.files))
        line = F.regexp_replace(F.col("value"), "\r$", "")
        text = text.select(line.alias("line"), F.input_file_name().alias("file"))
        text = text.filter(F.trim(F.col("line")) != "")
        if spec.header:
            # Spark writes the header into every part file of a CSV directory.
            text = text.filter(F.col("line") != spec.header)
        parts = F.split(F.col("line"), _regex_literal(spec.sep), -1)
        frame = text.select(
            F.trim(F.get(parts, 0)).alias("user"),
            F.trim(F.get(parts, 1)).alias("item"),
            F.trim(F.get(parts, 2)).alias("value_text"),
            F.col("line"),
            F.size(parts).alias("n_fields"),
            F.col("file"),
        )
    value = F.expr("try_cast(value_text AS DOUBLE)")
    frame = frame.withColumn("value", value)
    what = "rating" if kind == "rating" else "weight"
    finite = ~F.isnan(F.col("value")) & (F.abs(F.col("value")) < float("inf"))
    if kind == "rating":
        in_range = (F.col("value") >= scale.min) & (F.col("value") <= scale.max)
        range_msg = f"is outside {scale.min:g}..{scale.max:g}"
    else:
        in_range = (F.col("value") >= 0) & (F.col("value") <= max_weight)
        range_msg = f"must be >= 0 and <= {max_weight:g}"
    quoted = F.concat(F.lit("'"), F.coalesce(F.col("value_text"), F.lit("")), F.lit("'"))
    reason = (
        F.when(F.col("n_fields") < 3, F.concat(F.lit("expected user, item, value[, timestamp], got "),
                                               F.col("n_fields").cast("string"), F.lit(" field(s)")))
        .when(F.col("user").isNull() | (F.col("user") == ""), F.lit("user: empty id"))
        .when(F.col("item").isNull() | (F.col("item") == ""), F.lit("item: empty id"))
        .when((F.length("user") > MAX_ID_LENGTH) | (F.length("item") > MAX_ID_LENGTH),
              F.lit(f"id longer than {MAX_ID_LENGTH} characters"))
        .when(F.col("value").isNull(), F.concat(F.lit(f"{what}: "), quoted, F.lit(" is not a number")))
        .when(~finite, F.concat(F.lit(f"{what}: "), quoted, F.lit(" is not finite")))
        .when(~in_range, F.concat(F.lit(f"{what}: "), quoted, F.lit(f" {range_msg}")))
    )
    checked = frame.withColumn("reason", reason).cache()
    bad = checked.filter(F.col("reason").isNotNull())
    first_bad = bad.select("file", "line", "reason").first()
    n_bad = 0
    if first_bad is not None:
        n_bad = bad.count()
        where = _where(spec, first_bad["file"], first_bad["line"])
        message = f"{where}: {first_bad['reason']}"
        if not skip_bad:
            checked.unpersist()
            more = f" ({n_bad - 1} more bad row(s))" if n_bad > 1 else ""
            raise DatasetError(message + more)
        log.warning("skipping %d bad row(s), the first: %s", n_bad, message)
    good = checked.filter(F.col("reason").isNull()).select("user", "item", "value")
    rows = good.count()
    if rows == 0:
        checked.unpersist()
        raise DatasetError(f"{spec.path}: empty file (no valid rows)")
    return Parsed(good, kind or "rating", rows, n_bad, checked)


def _regex_literal(sep: str) -> str:
    import re

    return re.escape(sep)


# --------------------------------------------------------------------------- weights, pairs, index


def weight_column(kind: str, weighting: Weighting, scale: RatingScale):
    """The confidence weight w of :class:`common.feedback.Weighting` as a Spark column of ``value``.

    Ratings: t = (r − lo)/(hi − lo); w = 1 + slope·(t − liked) when t >= liked, else low_weight.
    Events: w = log1p(v) ("log") or v ("linear").
    """
    from pyspark.sql import functions as F

    v = F.col("value")
    if kind == "event":
        return F.log1p(v) if weighting.implicit == "log" else v
    span = scale.max - scale.min
    t = (v - F.lit(scale.min)) / F.lit(span) if span > 0 else F.lit(1.0)
    liked = F.lit(weighting.liked)
    positive = F.lit(1.0) + F.lit(weighting.slope) * (t - liked)
    return F.when(t + F.lit(1e-9) >= liked, positive).otherwise(F.lit(weighting.low_weight))


def pairs_frame(parsed: Parsed):
    """One row per (user, item): events add their weights up, a re-rated item keeps its mean rating."""
    from pyspark.sql import functions as F

    agg = F.sum("value") if parsed.kind == "event" else F.avg("value")
    return parsed.frame.groupBy("user", "item").agg(agg.alias("value"), F.count(F.lit(1)).alias("n"))


@dataclass
class Indexed:
    """Pairs with integer ids ``u``/``i`` for ALS and the indexers that map them back."""

    pairs: Any  # DataFrame[user, item, value, w, u int, i int]
    user_labels: list[str]
    item_labels: list[str]

    def to_user(self, col: str, out: str):
        from pyspark.ml.feature import IndexToString

        return IndexToString(inputCol=col, outputCol=out, labels=self.user_labels)

    def to_item(self, col: str, out: str):
        from pyspark.ml.feature import IndexToString

        return IndexToString(inputCol=col, outputCol=out, labels=self.item_labels)


def index_pairs(pairs) -> Indexed:
    """``StringIndexer`` over user and item (most frequent first), as seed 002's Pipeline does.

    The indexers' label arrays are the distinct ids (strings), not data or factors.
    """
    from pyspark.ml import Pipeline
    from pyspark.ml.feature import StringIndexer
    from pyspark.sql import functions as F

    pipeline = Pipeline(stages=[
        StringIndexer(inputCol="user", outputCol="u_d", stringOrderType="frequencyDesc", handleInvalid="error"),
        StringIndexer(inputCol="item", outputCol="i_d", stringOrderType="frequencyDesc", handleInvalid="error"),
    ])
    model = pipeline.fit(pairs)
    out = (model.transform(pairs)
           .withColumn("u", F.col("u_d").cast("int")).withColumn("i", F.col("i_d").cast("int"))
           .drop("u_d", "i_d"))
    users, items = model.stages  # fitted StringIndexerModels
    return Indexed(out, list(users.labelsArray[0]), list(items.labelsArray[0]))  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- blocked top-k (numpy)


class UserBlock(NamedTuple):
    """A block of query rows for the blocked product: ids, vectors, and each row's excluded
    column ids (CSR: row j excludes ``excluded[offsets[j]:offsets[j+1]]``)."""

    ids: np.ndarray  # int32 (b,)
    vectors: np.ndarray  # float32 (b, rank)
    offsets: np.ndarray  # int64 (b + 1,)
    excluded: np.ndarray  # int32


class ItemBlock(NamedTuple):
    ids: np.ndarray  # int32 (m,)
    vectors: np.ndarray  # float32 (m, rank)


class TopK(NamedTuple):
    """Best ``k`` columns per row of a user block (unordered until :func:`finish_top_k`)."""

    ids: np.ndarray  # int32 (b,)
    items: np.ndarray  # int32 (b, k), -1 where fewer than k candidates
    scores: np.ndarray  # float32 (b, k), -inf where fewer than k candidates


def block_top_k(users: UserBlock, items: ItemBlock, k: int, n_items: int) -> TopK:
    """Top-``k`` of ``S = U·Vᵀ`` per row over one item block, excluded columns masked to −inf."""
    # Negated in place (no copy of the block): the k smallest of −S are the k best of S.
    neg = users.vectors @ items.vectors.T  # (b, m) float32 GEMM
    np.negative(neg, out=neg)
    if len(users.excluded):
        # Column position of every excluded id in this block (-1: not in this block).
        pos = np.full(n_items, -1, dtype=np.int64)
        pos[items.ids] = np.arange(len(items.ids))
        rows = np.repeat(np.arange(len(users.ids)), np.diff(users.offsets))
        cols = pos[users.excluded]
        hit = cols >= 0
        neg[rows[hit], cols[hit]] = np.inf
    m = neg.shape[1]
    kk = min(k, m)
    # argpartition (introselect, O(m) per row) is most of a block's time; a chunk-minimum
    # prefilter was tried and measured no faster on this machine, so the plain selection stays.
    if kk < m:
        top = np.argpartition(neg, kk - 1, axis=1)[:, :kk]
    else:
        top = np.broadcast_to(np.arange(m), (len(users.ids), m)).copy()
    top_scores = -np.take_along_axis(neg, top, axis=1)
    top_items = items.ids[top].astype(np.int32)
    top_items[~np.isfinite(top_scores)] = -1
    return _pad(TopK(users.ids, top_items, top_scores.astype(np.float32)), k)


def _pad(t: TopK, k: int) -> TopK:
    short = k - t.items.shape[1]
    if short <= 0:
        return t
    b = len(t.ids)
    return TopK(t.ids, np.hstack([t.items, np.full((b, short), -1, np.int32)]),
                np.hstack([t.scores, np.full((b, short), -np.inf, np.float32)]))


def merge_top_k(a: TopK, b: TopK) -> TopK:
    """The best ``k`` of two partial top-k of the same rows (same row order)."""
    k = a.items.shape[1]
    items = np.hstack([a.items, b.items])
    scores = np.hstack([a.scores, b.scores])
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    return TopK(a.ids, np.take_along_axis(items, top, axis=1), np.take_along_axis(scores, top, axis=1))


def finish_top_k(t: TopK) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Per row: ``(id, items best first, scores)``, without the padding; ties by item id."""
    for j, uid in enumerate(t.ids.tolist()):
        items, scores = t.items[j], t.scores[j]
        keep = items >= 0
        items, scores = items[keep], scores[keep]
        order = np.lexsort((items, -scores))
        yield uid, items[order], scores[order]


def _user_blocks(rows: Iterable[Any], block: int, normalise: bool = False) -> Iterator[tuple[int, UserBlock]]:
    """Rows ``(id, features, excluded ids or None)`` -> keyed :class:`UserBlock`s."""
    batch: list[Any] = []

    def emit() -> tuple[int, UserBlock]:
        ids = np.array([r[0] for r in batch], dtype=np.int32)
        vecs = np.array([r[1] for r in batch], dtype=np.float32)
        if normalise:
            vecs = _unit(vecs)
        ex = [np.asarray(r[2] if r[2] is not None else (), dtype=np.int32) for r in batch]
        offsets = np.zeros(len(batch) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([len(e) for e in ex])
        excluded = np.concatenate(ex) if ex else np.zeros(0, np.int32)
        # The key only has to be unique per block: the first id of the block is.
        return int(ids[0]), UserBlock(ids, vecs, offsets, excluded.astype(np.int32))

    for row in rows:
        batch.append(row)
        if len(batch) == block:
            yield emit()
            batch = []
    if batch:
        yield emit()


def _item_blocks(rows: Iterable[Any], block: int, normalise: bool = False) -> Iterator[ItemBlock]:
    batch: list[Any] = []
    for row in rows:
        batch.append(row)
        if len(batch) == block:
            vecs = np.array([r[1] for r in batch], dtype=np.float32)
            yield ItemBlock(np.array([r[0] for r in batch], np.int32), _unit(vecs) if normalise else vecs)
            batch = []
    if batch:
        vecs = np.array([r[1] for r in batch], dtype=np.float32)
        yield ItemBlock(np.array([r[0] for r in batch], np.int32), _unit(vecs) if normalise else vecs)


def _unit(vecs: np.ndarray) -> np.ndarray:
    # cos(a, b) = a·b / (|a| |b|): normalise once, then the product is the cosine.
    norms = np.linalg.norm(vecs, axis=1, keepdims=True)
    return vecs / np.where(norms > 0, norms, 1.0)


def blocked_top_k(user_rows, item_rows, k: int, n_items: int, item_partitions: int | None = None,
                  cosine: bool = False, user_block: int = USER_BLOCK, item_block: int = ITEM_BLOCK):
    """Top-``k`` items per user of ``U·Vᵀ``, blocked, on the executors; RDD of
    ``(u, (items int32 best first, scores float32))``.

    ``user_rows``: RDD of ``(u, features, excluded item ids or None)``; ``item_rows``: RDD of
    ``(i, features)``. Every (user partition, item partition) pair is one task of a cartesian
    product: it multiplies its blocks (a GEMM per 1024 users × 8192 items), masks the excluded
    ids and keeps a top-k per user; the partial top-k of a user block are then merged across item
    partitions with ``reduceByKey``. Memory per task: one score block (32 MB) plus its inputs.
    ``cosine=True`` normalises both sides first (item-item similarity).
    """
    users = user_rows.mapPartitions(lambda rows: _user_blocks(rows, user_block, cosine))
    if item_partitions:
        item_rows = item_rows.repartition(item_partitions)
    items = item_rows.mapPartitions(lambda rows: _item_blocks(rows, item_block, cosine))

    def partial(pair: tuple[tuple[int, UserBlock], ItemBlock]) -> tuple[int, TopK]:
        (key, ub), ib = pair
        return key, block_top_k(ub, ib, k, n_items)

    def expand(kv: tuple[int, TopK]) -> Iterator[tuple[int, tuple[np.ndarray, np.ndarray]]]:
        for uid, its, scs in finish_top_k(kv[1]):
            yield uid, (its, scs)

    partials = users.cartesian(items).map(partial)
    n_parts = max(1, users.getNumPartitions())
    return partials.reduceByKey(merge_top_k, n_parts).flatMap(expand)


def factor_rows(model, seen=None, side: str = "user"):
    """ALS factors as RDD rows for :func:`blocked_top_k`: ``(id, features[, excluded])``."""
    from pyspark.sql import functions as F

    if side == "item":
        return model.itemFactors.rdd.map(lambda r: (int(r["id"]), r["features"]))
    users = model.userFactors
    if seen is not None:
        users = users.join(seen, users["id"] == seen["u"], "left").select("id", "features", "excluded")
    else:
        users = users.select("id", "features", F.lit(None).alias("excluded"))
    return users.rdd.map(lambda r: (int(r["id"]), r["features"], r["excluded"]))


def seen_frame(pairs):
    """``(u, excluded)``: each user's items (every pair, positive or not) to leave out of top-k."""
    from pyspark.sql import functions as F

    return pairs.groupBy("u").agg(F.collect_list("i").alias("excluded"))


# --------------------------------------------------------------------------- metrics


def dcg_gains(k: int) -> np.ndarray:
    # DCG@k = Σ_{j<k} rel_j / log2(j + 2); binary relevance.
    return 1.0 / np.log2(np.arange(k) + 2.0)


def ndcg_of(ranked: Sequence[int], relevant: set[int], k: int) -> float:
    """NDCG@k of one ranked list: DCG of the hits over the DCG of a perfect list (IDCG)."""
    gains = dcg_gains(k)
    dcg = sum(gains[j] for j, item in enumerate(list(ranked)[:k]) if item in relevant)
    ideal = gains[: min(len(relevant), k)].sum()
    return float(dcg / ideal) if ideal > 0 else 0.0


def relevant_frame(held_out, known_users):
    """``(u, relevant)``: held-out positives (w > 0) of users the model knows."""
    from pyspark.sql import functions as F

    pos = held_out.filter(F.col("w") > 0).join(known_users, "u", "left_semi")
    return pos.groupBy("u").agg(F.collect_set("i").alias("relevant"))


def ndcg_at_k(recs, relevant, k: int) -> tuple[float, int]:
    """Mean NDCG@k over the users of ``relevant`` (RDD join on the executors), and their count.

    ``recs``: RDD ``(u, (items best first, scores))``; a user without recommendations scores 0.
    """
    rel = relevant.rdd.map(lambda r: (int(r["u"]), set(r["relevant"])))

    def score(kv: tuple[int, tuple[set[int], Any]]) -> float:
        rel_set, rec = kv[1]
        ranked = rec[0].tolist() if rec is not None else []
        return ndcg_of(ranked, rel_set, k)

    scored = rel.leftOuterJoin(recs).map(score)
    total = scored.map(lambda x: (x, 1)).fold((0.0, 0), lambda a, b: (a[0] + b[0], a[1] + b[1]))
    return (total[0] / total[1] if total[1] else float("nan")), int(total[1])


def popular_ndcg(train, relevant, k: int) -> float:
    """NDCG@k of most-popular (train positives per item), each user's train items excluded."""
    from pyspark.sql import functions as F

    max_seen = train.groupBy("u").count().agg(F.max("count")).first()[0] or 0
    counts = train.filter(F.col("w") > 0).groupBy("i").count()
    # The ranked list only needs k + (most items any user has) entries: a short list of ids.
    head = [int(r["i"]) for r in counts.orderBy(F.desc("count"), F.asc("i")).limit(k + int(max_seen)).collect()]
    sc = train.sparkSession.sparkContext
    order = sc.broadcast(head)
    seen = seen_frame(train).rdd.map(lambda r: (int(r["u"]), set(r["excluded"])))
    rel = relevant.rdd.map(lambda r: (int(r["u"]), set(r["relevant"])))

    def score(kv: tuple[int, tuple[set[int], set[int] | None]]) -> float:
        rel_set, seen_set = kv[1]
        seen_set = seen_set or set()
        ranked: list[int] = []
        for item in order.value:
            if item not in seen_set:
                ranked.append(item)
                if len(ranked) == k:
                    break
        return ndcg_of(ranked, rel_set, k)

    scored = rel.leftOuterJoin(seen).map(score)
    total = scored.map(lambda x: (x, 1)).fold((0.0, 0), lambda a, b: (a[0] + b[0], a[1] + b[1]))
    return total[0] / total[1] if total[1] else float("nan")


def rmse_of(model, frame, mu: float, scale: RatingScale) -> float:
    """RMSE of μ + U·P (clipped to the scale) against the ``value`` of ``frame``'s known pairs."""
    from pyspark.sql import functions as F

    pred = model.transform(frame).filter(~F.isnan("prediction"))
    clipped = F.least(F.greatest(F.col("prediction") + F.lit(mu), F.lit(scale.min)), F.lit(scale.max))
    row = pred.agg(F.sqrt(F.avg((clipped - F.col("value")) ** 2)).alias("rmse")).first()
    return float(row["rmse"]) if row and row["rmse"] is not None else float("nan")


# --------------------------------------------------------------------------- training


@dataclass
class GridPoint:
    rank: int
    reg_param: float
    alpha: float
    metric: str
    score: float
    seconds: float


@dataclass
class JobConfig:
    """Everything one run needs; built from the command line by :func:`parse_args`."""

    input: str
    out: str | None = None
    fmt: str = "parquet"
    layout: str = "rows"
    implicit: bool | None = None  # None: implicit for event data, explicit for ratings
    ranks: tuple[int, ...] = DEFAULT_RANKS
    regs: tuple[float, ...] = DEFAULT_REGS
    alphas: tuple[float, ...] = DEFAULT_ALPHAS
    iterations: int = 10
    top: int = 10
    similar: int = 0
    k_eval: int = 10
    test_fraction: float = 0.2
    validation_fraction: float = 0.1
    seed: int = 42
    refit: bool = True
    skip_bad: bool = False
    weighting: Weighting = field(default_factory=lambda: Weighting(liked=0.0))
    scale: RatingScale = field(default_factory=RatingScale)
    max_weight: float = 1e6
    publish: bool = False
    force: bool = False
    redis_url: str = "redis://localhost:6379/0"
    redis_prefix: str = "rec"
    blocks: int = 0  # ALS user/item blocks; 0: from the data size


@dataclass
class Report:
    input: str
    format: str = ""
    kind: str = ""
    model: str = ""
    rows: int = 0
    bad_rows: int = 0
    pairs: int = 0
    users: int = 0
    items: int = 0
    split: dict[str, int] = field(default_factory=dict)
    grid: list[GridPoint] = field(default_factory=list)
    chosen: dict[str, Any] = field(default_factory=dict)
    test: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, Any] = field(default_factory=dict)
    published: dict[str, Any] = field(default_factory=dict)
    durations: dict[str, float] = field(default_factory=dict)
    spark: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _blocks(cfg: JobConfig, n: int) -> int:
    from modeler.bootstrap import als_blocks

    return cfg.blocks or als_blocks(n)


def fit_als(train, implicit: bool, rank: int, reg: float, alpha: float, cfg: JobConfig, blocks: int):
    """Spark ML ALS on ``(u, i, target)``: implicit on w, explicit on r − μ."""
    from pyspark.ml.recommendation import ALS

    als = ALS(rank=rank, maxIter=cfg.iterations, regParam=reg, alpha=alpha, implicitPrefs=implicit,
              userCol="u", itemCol="i", ratingCol="target", seed=cfg.seed, coldStartStrategy="nan",
              numUserBlocks=blocks, numItemBlocks=blocks, intermediateStorageLevel="MEMORY_AND_DISK",
              finalStorageLevel="MEMORY_AND_DISK")
    return als.fit(train)


def _grid(cfg: JobConfig, implicit: bool) -> list[tuple[int, float, float]]:
    alphas = cfg.alphas if implicit else (0.0,)
    return [(r, g, a) for r in cfg.ranks for g in cfg.regs for a in alphas]


def evaluate_point(model, implicit: bool, train, held_out, k: int, n_items: int, mu: float, scale: RatingScale,
                   relevant=None) -> float:
    """Validation score of one fitted model: NDCG@k (implicit) or RMSE (explicit)."""
    if not implicit:
        return rmse_of(model, held_out, mu, scale)
    users = model.userFactors.join(relevant.select(relevant["u"].alias("id")), "id", "left_semi")
    seen = seen_frame(train)
    rows = users.join(seen, users["id"] == seen["u"], "left").select("id", "features", "excluded").rdd.map(
        lambda r: (int(r["id"]), r["features"], r["excluded"]))
    recs = blocked_top_k(rows, factor_rows(model, side="item"), k, n_items)
    score, _ = ndcg_at_k(recs, relevant, k)
    return score


def train_and_choose(spark, indexed: Indexed, implicit: bool, cfg: JobConfig, report: Report):
    """Grid on validation, the chosen point scored on test, the final fit; returns ``(model, mu)``."""
    from pyspark.sql import functions as F

    pairs = indexed.pairs
    n_items = len(indexed.item_labels)
    test_w = cfg.test_fraction
    rest, test = pairs.randomSplit([1.0 - test_w, test_w], seed=cfg.seed)
    fit_part, valid = rest.randomSplit([1.0 - cfg.validation_fraction, cfg.validation_fraction], seed=cfg.seed + 1)
    fit_part, valid, rest, test = (d.cache() for d in (fit_part, valid, rest, test))
    report.split = {"fit": fit_part.count(), "validation": valid.count(), "train": rest.count(), "test": test.count()}
    blocks = _blocks(cfg, report.pairs)
    k = cfg.k_eval
    metric = f"ndcg@{k}" if implicit else "rmse"

    def mean_of(frame) -> float:
        return float(frame.agg(F.avg("value")).first()[0]) if not implicit else 0.0

    mu_fit = mean_of(fit_part)
    target = (lambda d, mu: d.withColumn("target", F.col("w"))) if implicit else (
        lambda d, mu: d.withColumn("target", F.col("value") - F.lit(mu)))
    fit_frame = target(fit_part, mu_fit).cache()
    relevant_valid = relevant_frame(valid, fit_part.select("u").distinct()).cache() if implicit else None
    started = time.perf_counter()
    best: GridPoint | None = None
    points = _grid(cfg, implicit)
    for n, (rank, reg, alpha) in enumerate(points, start=1):
        t0 = time.perf_counter()
        model = fit_als(fit_frame, implicit, rank, reg, alpha, cfg, blocks)
        score = evaluate_point(model, implicit, fit_part, valid, k, n_items, mu_fit, cfg.scale, relevant_valid)
        point = GridPoint(rank, reg, alpha if implicit else 0.0, metric, score, round(time.perf_counter() - t0, 2))
        report.grid.append(point)
        log.info("grid %d/%d: rank=%d regParam=%g%s -> validation %s %.4f (%.1fs)", n, len(points), rank, reg,
                 f" alpha={alpha:g}" if implicit else "", metric, score, point.seconds)
        better = best is None or (score > best.score if implicit else score < best.score)
        if better and math.isfinite(score):
            best = point
        model.userFactors.unpersist()
        model.itemFactors.unpersist()
    if best is None:
        raise BatchError("no grid point produced a finite validation score")
    report.durations["grid_s"] = round(time.perf_counter() - started, 2)
    report.chosen = {"rank": best.rank, "reg_param": best.reg_param, "alpha": best.alpha,
                     "metric": metric, "validation": best.score}
    log.info("chosen: rank=%d regParam=%g%s (validation %s %.4f)", best.rank, best.reg_param,
             f" alpha={best.alpha:g}" if implicit else "", metric, best.score)

    # The chosen point on the whole training split, scored once on the test split.
    t0 = time.perf_counter()
    mu_train = mean_of(rest)
    train_model = fit_als(target(rest, mu_train), implicit, best.rank, best.reg_param, best.alpha, cfg, blocks)
    if implicit:
        relevant_test = relevant_frame(test, rest.select("u").distinct()).cache()
        score = evaluate_point(train_model, True, rest, test, k, n_items, 0.0, cfg.scale, relevant_test)
        pop = popular_ndcg(rest, relevant_test, k)
        report.test = {metric: score, f"popular_{metric}": pop, "ratio_to_popular": score / pop if pop else None,
                       "users": relevant_test.count()}
        log.info("test %s %.4f, most-popular %.4f (x%.2f)", metric, score, pop, score / pop if pop else float("nan"))
    else:
        score = rmse_of(train_model, test, mu_train, cfg.scale)
        report.test = {"rmse": score, "mean_rmse": _mean_rmse(rest, test, mu_train)}
        log.info("test RMSE %.4f (global mean %.4f)", score, report.test["mean_rmse"])
    report.durations["test_s"] = round(time.perf_counter() - t0, 2)

    if not cfg.refit:
        return train_model, mu_train
    t0 = time.perf_counter()
    mu_all = mean_of(pairs)
    final = fit_als(target(pairs, mu_all), implicit, best.rank, best.reg_param, best.alpha, cfg, blocks)
    report.durations["refit_s"] = round(time.perf_counter() - t0, 2)
    for d in (fit_part, valid, rest, test, fit_frame):
        d.unpersist()
    return final, mu_all


def _mean_rmse(train, test, mu: float) -> float:
    from pyspark.sql import functions as F

    return float(test.agg(F.sqrt(F.avg((F.col("value") - F.lit(mu)) ** 2))).first()[0])


# --------------------------------------------------------------------------- export


def recommendation_frame(spark, recs, indexed: Indexed, to_item_side: bool = False):
    """RDD ``(u, (items, scores))`` -> DataFrame ``(user, rank, item, score)`` with the original ids."""
    from pyspark.sql.types import FloatType, IntegerType, StructField, StructType

    def rows(kv: tuple[int, tuple[np.ndarray, np.ndarray]]) -> Iterator[tuple[int, int, int, float]]:
        uid, (items, scores) = kv
        for r, (i, s) in enumerate(zip(items.tolist(), scores.tolist()), start=1):
            yield uid, r, int(i), float(s)

    schema = StructType([StructField("u", IntegerType(), False), StructField("rank", IntegerType(), False),
                         StructField("i", IntegerType(), False), StructField("score", FloatType(), False)])
    flat = spark.createDataFrame(recs.flatMap(rows), schema)
    left = indexed.to_item("u", "user") if to_item_side else indexed.to_user("u", "user")
    named = indexed.to_item("i", "item").transform(left.transform(flat))
    return named.select("user", "rank", "item", "score")


def write_table(frame, path: str, fmt: str, layout: str, key: str = "user") -> None:
    """Write rows (or one row per ``key`` with an array of ``(rank, item, score)``) as ``fmt``."""
    from pyspark.sql import functions as F

    if layout == "arrays":
        frame = frame.groupBy(key).agg(
            F.sort_array(F.collect_list(F.struct("rank", "item", "score"))).alias("recommendations"))
    writer = frame.write.mode("error")
    if fmt == "csv":
        writer.option("header", True).csv(path)
    elif fmt == "json":
        writer.json(path)
    else:
        writer.parquet(path)


class Staging:
    """A temporary directory beside ``out``; :meth:`commit` renames it into place.

    On failure (or without commit) it is removed, so ``out`` is either the previous run's
    complete output or this run's complete output, never a mix or a partial write.
    """

    def __init__(self, out: str) -> None:
        self.out = Path(out).resolve()
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.path = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.tmp-", dir=self.out.parent))

    def __enter__(self) -> Staging:
        return self

    def commit(self) -> None:
        old = None
        if self.out.exists():
            old = self.out.parent / f".{self.out.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(self.out, old)
        os.rename(self.path, self.out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def __exit__(self, *exc: object) -> None:
        if self.path.exists():
            shutil.rmtree(self.path, ignore_errors=True)


# --------------------------------------------------------------------------- publish


def publish_model(spark, model, indexed: Indexed, implicit: bool, mu: float, report: Report, cfg: JobConfig) -> int:
    """Write the model as a new version in Redis (factors per partition from the executors,
    the rated sets, then the pointer flip on the driver); returns the version number.

    Refuses (:class:`PublishRefused`) while a live modeler holds ``{p}:lease:modeler``, unless
    ``cfg.force``; otherwise holds the lease itself while it writes, so no modeler starts meanwhile.
    """
    import redis
    from pyspark.sql import functions as F

    from common.keys import EXPLICIT, ITEMS, RANKING, RANKING_ITEMS, RANKING_USERS, USERS, Keys
    from common.snapshot import Meta, collect_garbage, publish_version, read_pointer

    keys = Keys(cfg.redis_prefix)
    client = redis.Redis.from_url(cfg.redis_url)
    token = f"batch-{uuid.uuid4().hex}"
    try:
        holder: Any = client.get(keys.lease)
        if holder is not None and not cfg.force:
            raise PublishRefused(
                f"{keys.lease} is held by a live modeler ({holder.decode(errors='replace')}): stop it first, "
                "or pass --force to publish anyway")
        took = bool(client.set(keys.lease, token, nx=True, px=15 * 60 * 1000))
        pointer = read_pointer(client, keys)
        newest: Any = client.zrevrange(keys.versions, 0, 0)
        version = max(pointer.version if pointer else 0, int(newest[0]) if newest else 0) + 1
        kinds = (RANKING_USERS, RANKING_ITEMS) if implicit else (USERS, ITEMS)
        # A failed earlier attempt may have left segment hashes of this number: start clean.
        client.delete(*(keys.segment(version, kind) for kind in (USERS, ITEMS, RANKING_USERS, RANKING_ITEMS)))
        url, prefix = cfg.redis_url, cfg.redis_prefix  # plain strings into the closures
        sides = ((model.userFactors, indexed.to_user("id", "key"), kinds[0]),
                 (model.itemFactors, indexed.to_item("id", "key"), kinds[1]))
        # Items first, as the modeler does: a reader never finds a user whose items are missing.
        for factors, to_key, kind in reversed(sides):
            named = to_key.transform(factors).select("key", "features")
            named.foreachPartition(lambda rows, kind=kind: _write_partition(url, prefix, version, kind, rows))
        # An implicit model's history is recorded as "implicit:<w>" (its confidence weight), as
        # the streaming modeler records implicit events: the predictor folds users in from it.
        rated_value = F.concat(F.lit("implicit:"), F.col("w").cast("string")) if implicit else \
            F.col("value").cast("double").cast("string")
        indexed.pairs.select("user", "item", rated_value.alias("value")).foreachPartition(
            lambda rows: _write_rated(url, prefix, rows))
        popular = [(str(r["item"]), int(r["count"])) for r in
                   indexed.pairs.groupBy("item").count().orderBy(F.desc("count"), F.asc("item")).limit(100).collect()]
        rank = int(report.chosen["rank"])
        meta = Meta(
            version=version, rank=0 if implicit else rank, mu=mu,
            reg_param=0.0 if implicit else float(report.chosen["reg_param"]),
            n_users=report.users, n_items=report.items, ratings_seen=report.pairs, created=time.time(),
            segments=(version,), offsets={}, metrics={"source": "batch", "input": report.input,
                                                      **{k: v for k, v in report.test.items()}},
            popular=popular, rating_min=cfg.scale.min, rating_max=cfg.scale.max,
            models=(RANKING,) if implicit else (EXPLICIT,),
            ranking_rank=rank if implicit else 0,
            ranking_reg_param=float(report.chosen["reg_param"]) if implicit else 0.0,
            ranking_alpha=float(report.chosen["alpha"]) if implicit else 0.0,
            ranking_weighting=cfg.weighting.to_dict() if implicit else {},
        )
        publish_version(client, keys, meta)
        collect_garbage(client, keys)
        log.info("published version %d (%s) to %s prefix %r", version, "ranking" if implicit else "explicit",
                 cfg.redis_url, cfg.redis_prefix)
        if took:
            client.eval("if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end "
                        "return 0", 1, keys.lease, token)
        return version
    finally:
        client.close()


def _write_partition(url: str, prefix: str, version: int, kind: str, rows: Iterable[Any]) -> None:
    """Executor side: HSET this partition's factor records (bias slot 0.0), 2000 at a time."""
    import redis

    from common.keys import Keys
    from common.snapshot import write_segment

    client = redis.Redis.from_url(url)
    keys = Keys(prefix)
    try:
        ids: list[str] = []
        vecs: list[Any] = []
        for row in rows:
            ids.append(row["key"])
            vecs.append(row["features"])
            if len(ids) == 2000:
                write_segment(client, keys, version, kind, ids, np.zeros(len(ids), np.float32),
                              np.asarray(vecs, np.float32))
                ids, vecs = [], []
        if ids:
            write_segment(client, keys, version, kind, ids, np.zeros(len(ids), np.float32),
                          np.asarray(vecs, np.float32))
    finally:
        client.close()


def _write_rated(url: str, prefix: str, rows: Iterable[Any]) -> None:
    """Executor side: ``{p}:rated:{user}`` item -> value, so the predictor excludes seen items."""
    import redis

    from common.keys import Keys

    client = redis.Redis.from_url(url)
    keys = Keys(prefix)
    try:
        pipe = client.pipeline(transaction=False)
        for n, row in enumerate(rows, start=1):
            pipe.hset(keys.rated(row["user"]), row["item"], row["value"])
            if n % 5000 == 0:
                pipe.execute()
        pipe.execute()
    finally:
        client.close()


# --------------------------------------------------------------------------- the job


def _ship_packages(sc) -> None:
    """On a cluster, send ``common`` and ``modeler`` to the executors (``spark-submit`` of a
    single file ships only that file)."""
    if sc.master.startswith("local"):
        return
    root = Path(__file__).resolve().parent.parent
    target = Path(tempfile.mkdtemp(prefix="streamrec-py-")) / "streamrec.zip"
    with zipfile.ZipFile(target, "w") as zf:
        for package in ("common", "modeler"):
            for src in (root / package).rglob("*.py"):
                zf.write(src, src.relative_to(root))
    sc.addPyFile(str(target))


def read_and_index(spark, cfg: JobConfig, report: Report) -> tuple[Indexed, bool]:
    """The job's first step: read ``cfg.input``, weigh and index its pairs (cached); fills the
    report's input fields. Returns ``(indexed, implicit)``. Raises :class:`DatasetError`."""
    spec = detect_input(cfg.input)
    t0 = time.perf_counter()
    parsed = read_input(spark, spec, cfg.scale, cfg.max_weight, cfg.skip_bad)
    implicit = cfg.implicit if cfg.implicit is not None else parsed.kind == "event"
    report.format = spec.fmt if spec.fmt == "parquet" else {"::": "dat", "\t": "tab", ",": "csv"}[spec.sep]
    report.kind, report.model = parsed.kind, "implicit" if implicit else "explicit"
    report.rows, report.bad_rows = parsed.rows, parsed.bad_rows
    pairs = pairs_frame(parsed).withColumn("w", weight_column(parsed.kind, cfg.weighting, cfg.scale))
    indexed = index_pairs(pairs)
    indexed.pairs = indexed.pairs.cache()
    report.pairs = indexed.pairs.count()
    report.users, report.items = len(indexed.user_labels), len(indexed.item_labels)
    if parsed.cached is not None:
        parsed.cached.unpersist()
    report.durations["read_index_s"] = round(time.perf_counter() - t0, 2)
    log.info("%s: %d rows (%s, %s) -> %d pairs, %d users, %d items; %s model", cfg.input, report.rows,
             report.format, parsed.kind, report.pairs, report.users, report.items, report.model)
    return indexed, implicit


def run_job(spark, cfg: JobConfig) -> Report:
    """Read, index, grid-search, recommend, export and publish as ``cfg`` says; the report.

    Raises :class:`DatasetError` for bad input, :class:`PublishRefused`, :class:`BatchError`.
    """
    started = time.perf_counter()
    if cfg.fmt not in FORMATS:
        raise BatchError(f"--format must be one of {', '.join(FORMATS)}, not {cfg.fmt!r}")
    if cfg.layout == "arrays" and cfg.fmt == "csv":
        raise BatchError("--layout arrays needs --format parquet or json (CSV has no arrays)")
    if cfg.out is None and not cfg.publish:
        raise BatchError("nothing to do: give --out DIR and/or --publish")
    report = Report(input=cfg.input)
    sc = spark.sparkContext
    _ship_packages(sc)
    report.spark = {"master": sc.master, "default_parallelism": sc.defaultParallelism, "version": spark.version}
    indexed, implicit = read_and_index(spark, cfg, report)
    model, mu = train_and_choose(spark, indexed, implicit, cfg, report)

    staging = Staging(cfg.out) if cfg.out else None
    try:
        if staging is not None:
            t0 = time.perf_counter()
            seen = seen_frame(indexed.pairs)
            recs = blocked_top_k(factor_rows(model, seen), factor_rows(model, side="item"), cfg.top, report.items)
            frame = recommendation_frame(spark, recs, indexed)
            write_table(frame, str(staging.path / "recommendations"), cfg.fmt, cfg.layout, "user")
            report.durations["recommend_write_s"] = round(time.perf_counter() - t0, 2)
            written = spark.read.format(cfg.fmt).options(**({"header": True} if cfg.fmt == "csv" else {})).load(
                str(staging.path / "recommendations"))
            report.outputs["recommendations"] = {"path": "recommendations", "rows": written.count(),
                                                 "layout": cfg.layout, "format": cfg.fmt}
            if cfg.similar > 0:
                t0 = time.perf_counter()
                items = factor_rows(model, side="item")
                selves = items.map(lambda r: (r[0], r[1], [r[0]]))
                sim = blocked_top_k(selves, items, cfg.similar, report.items, cosine=True)
                sim_frame = recommendation_frame(spark, sim, indexed, to_item_side=True).withColumnRenamed(
                    "user", "source_item")
                write_table(sim_frame, str(staging.path / "similar"), cfg.fmt, cfg.layout, "source_item")
                report.durations["similar_write_s"] = round(time.perf_counter() - t0, 2)
                report.outputs["similar"] = {"path": "similar", "rows": sim_frame.count() if cfg.layout == "rows"
                                             else None, "format": cfg.fmt}
        if cfg.publish:
            t0 = time.perf_counter()
            version = publish_model(spark, model, indexed, implicit, mu, report, cfg)
            report.published = {"version": version, "redis_prefix": cfg.redis_prefix,
                                "factor_set": "ranking" if implicit else "explicit"}
            report.durations["publish_s"] = round(time.perf_counter() - t0, 2)
        report.durations["total_s"] = round(time.perf_counter() - started, 2)
        if staging is not None:
            (staging.path / "report.json").write_text(json.dumps(report.to_dict(), indent=2, default=float))
            (staging.path / "_SUCCESS").write_text("")
            staging.commit()
            log.info("wrote %s", staging.out)
    finally:
        if staging is not None:
            staging.__exit__(None, None, None)
        indexed.pairs.unpersist()
    return report


def grid_table(report: Report | dict[str, Any]) -> str:
    """The grid as a Markdown table, best first (for logs and the README)."""
    data = report.to_dict() if isinstance(report, Report) else report
    grid = data["grid"]
    if not grid:
        return ""
    metric = grid[0]["metric"]
    best_first = sorted(grid, key=lambda g: -g["score"] if metric.startswith("ndcg") else g["score"])
    lines = [f"| rank | regParam | alpha | validation {metric} | seconds |", "|---|---|---|---|---|"]
    for g in best_first:
        lines.append(f"| {g['rank']} | {g['reg_param']:g} | {g['alpha']:g} | {g['score']:.4f} | {g['seconds']:.1f} |")
    return "\n".join(lines)


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x.strip())


def parse_args(argv: list[str] | None = None) -> tuple[JobConfig, str, dict[str, str]]:
    """Command line (and ``REDIS_URL``/``REDIS_PREFIX``/``SPARK_MASTER``) -> ``(config, master, conf)``."""
    from common.settings import CommonSettings

    env = CommonSettings()  # fields come from the environment
    p = argparse.ArgumentParser(prog="python -m modeler.batch", description=__doc__.splitlines()[0])
    p.add_argument("--input", required=True, help="ratings/events file or a directory of CSV/Parquet part files")
    p.add_argument("--out", help="output directory (replaced atomically)")
    p.add_argument("--format", dest="fmt", choices=FORMATS, default="parquet")
    p.add_argument("--layout", choices=("rows", "arrays"), default="rows",
                   help="rows: (user, rank, item, score); arrays: one row per user")
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--implicit", dest="implicit", action="store_true", default=None,
                      help="implicit-feedback ALS (default for event data)")
    kind.add_argument("--explicit", dest="implicit", action="store_false", help="explicit ALS on ratings")
    p.add_argument("--ratings-as", choices=("played", "liked"), default="played",
                   help="implicit model on ratings: every rating is a play (w=1), or only liked ones are positives")
    p.add_argument("--ranks", default=",".join(map(str, DEFAULT_RANKS)))
    p.add_argument("--regs", default=",".join(map(str, DEFAULT_REGS)))
    p.add_argument("--alphas", default=",".join(map(str, DEFAULT_ALPHAS)))
    p.add_argument("--iterations", type=int, default=10)
    p.add_argument("--top", type=int, default=10)
    p.add_argument("--similar", type=int, default=0, help="also the N most similar items of every item")
    p.add_argument("--test-fraction", type=float, default=0.2)
    p.add_argument("--validation-fraction", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--no-refit", dest="refit", action="store_false",
                   help="export the model of the training split instead of refitting on everything")
    p.add_argument("--skip-bad", action="store_true", help="skip bad rows (counted in the report) instead of failing")
    p.add_argument("--blocks", type=int, default=0, help="ALS user/item blocks (default: from the data size)")
    p.add_argument("--publish", action="store_true", help="publish the model into Redis for the predictor")
    p.add_argument("--force", action="store_true", help="publish even while a modeler holds the lease")
    p.add_argument("--redis-url", default=env.redis_url)
    p.add_argument("--redis-prefix", default=env.redis_prefix)
    p.add_argument("--master", default=os.environ.get("SPARK_MASTER", "local[2]"))
    p.add_argument("--conf", action="append", default=[], metavar="KEY=VALUE",
                   help="extra Spark configuration (repeatable), e.g. spark.executor.memory=4g")
    a = p.parse_args(argv)
    conf: dict[str, str] = {}
    for item in a.conf:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            p.error(f"--conf {item!r}: expected KEY=VALUE")
        conf[key.strip()] = value
    for name in ("top", "iterations"):
        if getattr(a, name) < 1:
            p.error(f"--{name} must be >= 1")
    if not 0 < a.test_fraction < 1 or not 0 < a.validation_fraction < 1:
        p.error("--test-fraction and --validation-fraction must be between 0 and 1")
    try:
        ranks, regs, alphas = _ints(a.ranks), _floats(a.regs), _floats(a.alphas)
    except ValueError as exc:
        p.error(f"--ranks/--regs/--alphas: {exc}")
    if not ranks or not regs or not alphas or min(ranks) < 1 or min(regs) < 0 or min(alphas) < 0:
        p.error("--ranks must be >= 1, --regs and --alphas >= 0, none empty")
    weighting = Weighting(liked=0.0) if a.ratings_as == "played" else Weighting()
    cfg = JobConfig(
        input=a.input, out=a.out, fmt=a.fmt, layout=a.layout, implicit=a.implicit, ranks=ranks, regs=regs,
        alphas=alphas, iterations=a.iterations, top=a.top, similar=a.similar, test_fraction=a.test_fraction,
        validation_fraction=a.validation_fraction, seed=a.seed, refit=a.refit, skip_bad=a.skip_bad,
        weighting=weighting, scale=env.scale, publish=a.publish, force=a.force, redis_url=a.redis_url,
        redis_prefix=a.redis_prefix, blocks=a.blocks,
    )
    if cfg.layout == "arrays" and cfg.fmt == "csv":
        p.error("--layout arrays needs --format parquet or json (CSV has no arrays)")
    if cfg.out is None and not cfg.publish:
        p.error("nothing to do: give --out DIR and/or --publish")
    return cfg, a.master, conf


def main(argv: list[str] | None = None, spark=None) -> int:
    """The command. ``spark``: an existing session to use (and leave running), e.g. in tests."""
    from common.logging import setup_logging

    setup_logging("INFO")
    cfg, master, conf = parse_args(argv)
    try:
        # Fail on an unknown or empty input before paying for a Spark start-up.
        detect_input(cfg.input)
    except DatasetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    own = spark is None
    if own:
        from modeler.spark import get_spark

        spark = get_spark(master, app_name="streamrec-batch", conf=conf)
    try:
        report = run_job(spark, cfg)
    except (DatasetError, BatchError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_PUBLISH_REFUSED if isinstance(exc, PublishRefused) else EXIT_BAD_INPUT
    finally:
        if own:
            spark.stop()
    table = grid_table(report)
    log.info("grid (validation):\n%s", table)
    log.info("test: %s", json.dumps(report.test))
    return 0


if __name__ == "__main__":
    # Run the imported module's main, not this __main__ copy: Spark then pickles the executor
    # functions by reference to `modeler.batch` instead of by value.
    from modeler.batch import main as _main

    raise SystemExit(_main())
