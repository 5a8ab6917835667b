"""The in-memory model and its maths: numpy only, no Redis, no Spark.

A version carries up to two factor sets (see :mod:`common.keys`).

The explicit rating model (bias matrix factorisation) predicts ratings::

    r̂(u, i) = mu + b_u + b_i + U_u · P_i         clipped to [rating_min, rating_max]

The ranking model (implicit-feedback ALS, Hu, Koren & Volinsky 2008) scores items for top-N
lists, similar items and fold-in; its score is not a rating::

    s(u, i) = x_u · y_i

Items are one row space for both sets: an item known to one set only has zeros in the
other (explicit: r̂ = mu + b_u, the model's own guess for an unrated item; ranking: s = 0).

One module (over 450 lines) on purpose: the model, its top-k selection and the batched
products share the row layout and the exclusion convention (-inf), and are tested together.

A :class:`FactorModel` is immutable once built: a new version is a new object, swapped in by
replacing one reference, so a request that took a reference at its start never sees a mix.
Per-version caches (user vectors, rated sets) hang off the model object and die with it
(a delta version starts with the entries of the users its segments leave alone:
``predictor.store.carry_user_cache``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from common.feedback import Weighting
from common.schema import RatingScale

F32 = np.float32

# How the model's lists are ordered: the ranking model's x_u·y_i, or the predicted rating.
BY_RANKING = "ranking"
BY_RATING = "rating"


@dataclass(frozen=True)
class UserEntry:
    """What one request needs about a user, as of one version."""

    bias: float
    vector: np.ndarray | None  # None: the model has no factors for this user
    rated: np.ndarray  # int64 row indices of rated items known to the model
    rated_ids: frozenset[str]  # every rated item id (also those the model lacks)
    rank_vector: np.ndarray | None = None  # x_u of the ranking model, None: absent


@dataclass(frozen=True, eq=False)
class RankingSet:
    """The ranking model's item side, aligned to the :class:`FactorModel`'s item rows."""

    rank: int
    factors: np.ndarray  # (n, rank) float32 C-contiguous, y_i
    unit: np.ndarray  # (n, rank) float32, y_i / |y_i|, for cosine
    # YᵀY (rank, rank) float64 over every item row: the unobserved cells of an iALS solve.
    gram: np.ndarray
    reg_param: float
    alpha: float
    weighting: Weighting
    # λ_u = λ·n_u ("count", the modeler's default: ALS-WR scaling) or λ ("constant").
    reg_scaling: str = "count"

    @classmethod
    def build(cls, factors: np.ndarray, *, reg_param: float, alpha: float, weighting: Weighting,
              reg_scaling: str = "count", gram: np.ndarray | None = None) -> RankingSet:
        y = np.ascontiguousarray(factors, dtype=F32)
        if gram is None:
            y64 = y.astype(np.float64)
            gram = y64.T @ y64  # YᵀY
        return cls(rank=y.shape[1], factors=y, unit=unit_rows(y), gram=gram,
                   reg_param=float(reg_param), alpha=float(alpha), weighting=weighting,
                   reg_scaling=reg_scaling)

    def fold_in(self, rows: np.ndarray, weights: np.ndarray) -> np.ndarray | None:
        """x for a visitor with event weights ``weights`` (w, :mod:`common.feedback`) on the
        item ``rows``; None without a positive (every w = 0).

        The iALS user solve against the cached Gramian, positives only (w > 0, p = 1)::

            c_i = 1 + α·w_i
            x = (YᵀY + Σ_i (c_i − 1) y_i y_iᵀ + λ_u I)⁻¹ Σ_i c_i y_i

        A w = 0 item has c = 1, p = 0: it adds nothing beyond YᵀY, as for any unseen item.
        """
        w = np.asarray(weights, np.float64)
        pos = w > 0
        if not pos.any():
            return None
        y = self.factors[np.asarray(rows)[pos]].astype(np.float64)
        c = 1.0 + self.alpha * w[pos]
        lam = self.reg_param * (int(pos.sum()) if self.reg_scaling == "count" else 1)
        lhs = self.gram + (y.T * (c - 1.0)) @ y + max(lam, 1e-9) * np.eye(self.rank)
        x = np.linalg.solve(lhs, y.T @ c)
        return x.astype(F32)

    def history_weights(self, values: Sequence[str], scale_min: float, scale_max: float) -> np.ndarray:
        """w of each ``{p}:rated:{user}`` value: a rating (decimal) through the version's
        :class:`~common.feedback.Weighting`, or ``implicit:<w>`` as the modeler recorded it
        (a bare ``implicit``, from older modelers, weighs as one event)."""
        scale = RatingScale(min=scale_min, max=scale_max)
        out = np.zeros(len(values))
        for k, v in enumerate(values):
            kind, sep, rest = v.partition(":")
            try:
                if kind == "implicit":
                    out[k] = float(rest) if sep else self.weighting.implicit_weight(1.0)
                else:
                    out[k] = self.weighting.rating_weight(float(v), scale)
            except ValueError:
                out[k] = 0.0  # not ours to judge here: an unreadable value is no positive
        return out


@dataclass(eq=False)
class FactorModel:
    version: int
    rank: int
    mu: float
    reg_param: float
    n_users: int
    ratings_seen: int
    created: float
    segments: tuple[int, ...]
    rating_min: float
    rating_max: float
    item_ids: list[str]
    index: dict[str, int]
    item_bias: np.ndarray  # (n,) float32, b_i
    # (n, rank + 1) float32 C-contiguous: [P_i | mu + b_i]; scores for all items are one
    # matrix-vector product with [U_u, 1].
    item_aug: np.ndarray
    item_unit: np.ndarray  # (n, rank) float32, P_i / |P_i| (zero rows stay zero), for cosine
    metrics: dict[str, Any] = field(default_factory=dict)
    popular: list[tuple[str, int]] = field(default_factory=list)
    user_cache: dict[str, UserEntry] = field(default_factory=dict)
    # False for a version of an implicit-only stream: no rating model, item_aug is zeros.
    has_explicit: bool = True
    ranking: RankingSet | None = None
    # The online search's candidates as published in the version metadata (informational).
    candidates: list[dict[str, Any]] = field(default_factory=list)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    @property
    def has_ranking(self) -> bool:
        return self.ranking is not None

    @property
    def default_order(self) -> str:
        """What lists are ranked by unless asked otherwise: the ranking model if present."""
        return BY_RANKING if self.ranking is not None else BY_RATING

    @property
    def item_factors(self) -> np.ndarray:
        return self.item_aug[:, : self.rank]

    # ------------------------------------------------------------------ building

    @classmethod
    def build(
        cls,
        *,
        item_ids: list[str],
        item_bias: np.ndarray,
        item_factors: np.ndarray,
        version: int,
        rank: int,
        mu: float,
        reg_param: float = 0.05,
        n_users: int = 0,
        ratings_seen: int = 0,
        created: float = 0.0,
        segments: Sequence[int] = (),
        rating_min: float = 0.5,
        rating_max: float = 5.0,
        metrics: dict[str, Any] | None = None,
        popular: list[tuple[str, int]] | None = None,
        index: dict[str, int] | None = None,
        has_explicit: bool = True,
        ranking: RankingSet | None = None,
        candidates: list[dict[str, Any]] | None = None,
    ) -> FactorModel:
        """``index`` (item id -> row of ``item_ids``) is built here unless given; ``ranking``
        must have one row per item of ``item_ids``."""
        n = len(item_ids)
        factors = np.asarray(item_factors, dtype=F32).reshape(n, rank)
        bias = np.ascontiguousarray(item_bias, dtype=F32).reshape(n)
        aug = np.empty((n, rank + 1), dtype=F32)
        aug[:, :rank] = factors
        aug[:, rank] = bias + F32(mu)
        return cls(
            version=version,
            rank=rank,
            mu=float(mu),
            reg_param=float(reg_param),
            n_users=n_users,
            ratings_seen=ratings_seen,
            created=created,
            segments=tuple(segments),
            rating_min=rating_min,
            rating_max=rating_max,
            item_ids=item_ids,
            index=index if index is not None else {item: row for row, item in enumerate(item_ids)},
            item_bias=bias,
            item_aug=aug,
            item_unit=unit_rows(factors),
            metrics=metrics or {},
            popular=popular or [],
            has_explicit=has_explicit,
            ranking=ranking,
            candidates=candidates or [],
        )

    def with_item_delta(
        self, ids: Sequence[str], biases: np.ndarray, vectors: np.ndarray,
        ranking_ids: Sequence[str] = (), ranking_vectors: np.ndarray | None = None, **meta: Any,
    ) -> FactorModel:
        """A new model: this one's items with ``ids`` (explicit set) and ``ranking_ids``
        (ranking set) overwritten or appended (a delta segment).

        Copies the arrays (the old model may still be serving requests). The ranking
        Gramian is updated by the changed rows only: YᵀY += Σ (y_new y_newᵀ − y_old y_oldᵀ)
        (a new item's old row is 0), O(changed · rank²) rather than O(items · rank²).
        """
        item_ids = list(self.item_ids)
        index = dict(self.index)

        def rows_of(keys: Sequence[str]) -> np.ndarray:
            rows = np.empty(len(keys), dtype=np.int64)
            for k, item in enumerate(keys):
                row = index.get(item)
                if row is None:
                    row = len(item_ids)
                    index[item] = row
                    item_ids.append(item)
                rows[k] = row
            return rows

        rows = rows_of(ids)
        rank_rows = rows_of(ranking_ids)
        n = len(item_ids)
        factors = np.zeros((n, self.rank), dtype=F32)
        factors[: self.n_items] = self.item_factors
        bias = np.zeros(n, dtype=F32)
        bias[: self.n_items] = self.item_bias
        if len(ids):
            factors[rows] = vectors
            bias[rows] = biases
        ranking = self.ranking
        if ranking is not None:
            y = np.zeros((n, ranking.rank), dtype=F32)
            y[: self.n_items] = ranking.factors
            gram = ranking.gram.copy()
            if len(ranking_ids) and ranking_vectors is not None:
                # Duplicate ids in one delta: the last record wins, once in the Gramian too.
                last = {int(r): k for k, r in enumerate(rank_rows)}
                sel_rows = np.fromiter(last.keys(), np.int64)
                sel = np.fromiter(last.values(), np.int64)
                old = y[sel_rows].astype(np.float64)
                new = np.asarray(ranking_vectors, F32)[sel]
                gram += new.astype(np.float64).T @ new.astype(np.float64) - old.T @ old
                y[sel_rows] = new
            ranking = RankingSet.build(y, reg_param=ranking.reg_param, alpha=ranking.alpha,
                                       weighting=ranking.weighting, reg_scaling=ranking.reg_scaling,
                                       gram=gram)
        fields: dict[str, Any] = {
            "version": self.version, "rank": self.rank, "mu": self.mu,
            "reg_param": self.reg_param, "n_users": self.n_users,
            "ratings_seen": self.ratings_seen, "created": self.created,
            "segments": self.segments, "rating_min": self.rating_min,
            "rating_max": self.rating_max, "metrics": self.metrics, "popular": self.popular,
            "has_explicit": self.has_explicit, "ranking": ranking, "candidates": self.candidates,
        }
        fields.update(meta)
        # The index is already up to date: rebuilding it is a 62k-step Python loop (13 ms)
        # holding the GIL, a stall for the event loop serving requests meanwhile.
        return FactorModel.build(item_ids=item_ids, item_bias=bias, item_factors=factors,
                                 index=index, **fields)

    # ------------------------------------------------------------------ maths

    def clip(self, values: np.ndarray | float) -> Any:
        return np.clip(values, self.rating_min, self.rating_max)

    def scores(self, user_bias: float, user_vector: np.ndarray | None) -> np.ndarray:
        """Unclipped r̂(u, i) for every item: ``[P | mu + b] @ [U_u, 1] + b_u``."""
        if user_vector is None:
            return self.item_aug[:, self.rank] + F32(user_bias)
        x = np.empty(self.rank + 1, dtype=F32)
        x[: self.rank] = user_vector
        x[self.rank] = 1.0
        out = self.item_aug @ x
        if user_bias:
            out += F32(user_bias)
        return out

    def predict_rows(self, user_bias: float, user_vector: np.ndarray | None, rows: np.ndarray) -> np.ndarray:
        """Clipped r̂ for the item rows ``rows`` only."""
        sub = self.item_aug[rows]
        if user_vector is None:
            raw = sub[:, self.rank] + user_bias
        else:
            raw = sub[:, : self.rank] @ np.asarray(user_vector, F32) + sub[:, self.rank] + user_bias
        return self.clip(raw)

    def predict_lists(self, users: Sequence[tuple[float, np.ndarray | None, np.ndarray]]) -> list[np.ndarray]:
        """:meth:`predict_rows` of several users at once, ``(bias, vector, rows)`` each: one
        gather and one row-wise product for the whole batch (a top-10 list needs 10 dot
        products per user, never a pass over every item)."""
        lens = [len(rows) for _, _, rows in users]
        if not sum(lens):
            return [np.empty(0, F32) for _ in users]
        rank = self.rank
        u = np.zeros((len(users), rank + 1), dtype=F32)
        u[:, rank] = 1.0
        bias = np.empty(len(users), dtype=F32)
        for j, (b, vector, _) in enumerate(users):
            bias[j] = b
            if vector is not None:
                u[j, :rank] = vector
        owner = np.repeat(np.arange(len(users)), lens)
        rows = np.concatenate([rows for _, _, rows in users])
        raw = np.einsum("ij,ij->i", self.item_aug[rows], u[owner]) + bias[owner]
        clipped = self.clip(raw)
        return np.split(clipped, np.cumsum(lens)[:-1])

    def similar(self, row: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows and cosines of the ``n`` items whose factors point closest to item ``row``'s:
        the ranking model's y_i when the version has it (they encode who consumed what
        together), else the rating model's P_i."""
        unit = self.ranking.unit if self.ranking is not None else self.item_unit
        cos = unit @ unit[row]
        cos[row] = -np.inf
        return top_k(cos, n)

    def fold_in(self, rows: np.ndarray, ratings: np.ndarray) -> tuple[float, np.ndarray]:
        """A temporary user ``(b_u, U_u)`` fitted to ratings of known item rows.

        Regularised least squares on x = [b_u, U_u] with features a_i = [1, P_i]:

            x = (AᵀA + λ m I)⁻¹ Aᵀ (r - mu - b_i)

        with the model's λ scaled by the number m of ratings, the same weighting the modeler's
        per-rating regularisation amounts to (ALS-WR style), so a visitor's vector is on the
        same footing as a trained user's.
        """
        m = len(rows)
        a = np.empty((m, self.rank + 1), dtype=np.float64)
        a[:, 0] = 1.0
        a[:, 1:] = self.item_factors[rows]
        y = np.asarray(ratings, np.float64) - self.mu - self.item_bias[rows].astype(np.float64)
        lam = max(self.reg_param, 1e-6) * m
        gram = a.T @ a + lam * np.eye(self.rank + 1)
        x = np.linalg.solve(gram, a.T @ y)
        return float(x[0]), x[1:].astype(F32)


def unit_rows(matrix: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length; all-zero rows stay zero (cosine 0 with everything)."""
    norms = np.linalg.norm(matrix, axis=1)
    norms[norms == 0] = 1.0
    return np.ascontiguousarray(matrix / norms[:, None], dtype=F32)


CHUNK = 64  # items per block for the top-k prefilter below


def _rank_rows(values: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best of ``values`` (with their ``rows``), best first, finite only.

    Order: value descending, ties by lower row, whatever path found the candidates (every
    value equal to the k-th best is kept until the final sort, so a tie at the cut is
    decided by row, not by where argpartition happened to put it).
    """
    if len(values) > k:
        kth = np.partition(values, len(values) - k)[len(values) - k]
        keep = values >= kth
        values, rows = values[keep], rows[keep]
    order = np.lexsort((rows, -values))[:k]
    values, rows = values[order], rows[order]
    keep = np.isfinite(values)
    if not keep.all():
        values, rows = values[keep], rows[keep]
    return rows, values


def top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices and values of the ``k`` largest finite scores, best first.

    Entries set to -inf (excluded items) never come out.
    """
    rows, values = top_k_columns(scores.reshape(-1, 1), [k])[0]
    return rows, values


def block_maxima(scores: np.ndarray) -> np.ndarray:
    """Maxima of ``scores`` (n, ...) over blocks of rows, for the top-k prefilter.

    Block b holds rows b, b + m, b + 2m, ... (m = n // CHUNK blocks, plus one block of the
    left-over tail): the maximum is then an element-wise max of CHUNK contiguous slabs,
    which vectorises, unlike a max along short contiguous runs.
    """
    n = scores.shape[0]
    m = n // CHUNK
    full = m * CHUNK
    maxima = scores[:full].reshape(CHUNK, m, *scores.shape[1:]).max(axis=0)
    if full < n:
        maxima = np.concatenate([maxima, scores[full:].max(axis=0, keepdims=True)])
    return maxima


def top_k_columns(scores: np.ndarray, ks: list[int]) -> list[tuple[np.ndarray, np.ndarray]]:
    """:func:`top_k` of every column of ``scores`` (n, B): ``ks[j]`` best of column j.

    Prefilter, for all columns at once: split the n rows into blocks (:func:`block_maxima`);
    k blocks whose maxima are >= t hold at least k values >= t, so t_j, the k_j-th largest
    block maximum of column j, never exceeds the k_j-th largest value of column j. Only the
    rows of blocks whose maximum reaches t_j can hold a value >= t_j, so those few blocks
    (about k_j per column, CHUNK rows each) are gathered and ranked; the (n, B) matrix is
    read once for the maxima and never scanned column by column. A column asking for so
    many that the blocks would not thin it out is ranked whole, on its own.
    """
    n, b = scores.shape
    ks = [min(k, n) for k in ks]
    whole = [n <= 4 * CHUNK or k * CHUNK * 4 > n for k in ks]
    out: list[tuple[np.ndarray, np.ndarray]] = [
        (np.empty(0, np.int64), np.empty(0, scores.dtype)) for _ in ks
    ]
    every_row = np.arange(n)
    for j in range(b):
        if whole[j] and ks[j] > 0:
            out[j] = _rank_rows(scores[:, j], every_row, ks[j])
    if all(whole):
        return out
    m = n // CHUNK
    full = m * CHUNK
    maxima = block_maxima(scores)  # (m or m + 1, B); the last row is the tail's if full < n
    blocks = maxima.shape[0]
    cut = [blocks - (1 if whole[j] else max(ks[j], 1)) for j in range(b)]
    cols = np.arange(b)
    t = np.partition(maxima, sorted(set(cut)), axis=0)[cut, cols]  # (B,) lower bounds on the k_j-th best
    t[np.array(whole)] = np.inf  # ranked whole above: no candidates from the prefilter
    sel_block, sel_col = np.nonzero(maxima[:m] >= t)
    # Rows of block s: s, s + m, ..., s + (CHUNK - 1) m.
    rows = (sel_block[:, None] + m * np.arange(CHUNK)).ravel()
    cand_cols = np.repeat(sel_col, CHUNK)
    if full < n:  # the tail block is small: take its rows for every column
        rows = np.concatenate([rows, np.tile(np.arange(full, n), b)])
        cand_cols = np.concatenate([cand_cols, np.repeat(cols, n - full)])
    values = scores[rows, cand_cols]
    keep = values >= t[cand_cols]
    rows, cand_cols, values = rows[keep], cand_cols[keep], values[keep]
    # One sort for the whole batch: by column, then value descending, then row.
    order = np.lexsort((rows, -values, cand_cols))
    rows, cand_cols, values = rows[order], cand_cols[order], values[order]
    starts = np.searchsorted(cand_cols, cols)
    ends = np.searchsorted(cand_cols, cols, side="right")
    for j in range(b):
        if whole[j]:
            continue
        lo = int(starts[j])
        hi = min(lo + ks[j], int(ends[j]))  # fewer only if a column holds NaN
        r, v = rows[lo:hi], values[lo:hi]
        # At least k_j candidates are >= t_j; -inf ones (excluded items) sort last: cut them.
        finite = np.isfinite(v)
        if not finite.all():
            r, v = r[finite], v[finite]
        out[j] = (r, v)
    return out


def _allowed(candidates: np.ndarray, exclude: np.ndarray | None) -> np.ndarray:
    """The distinct candidate rows not excluded, in ascending order."""
    cand = np.unique(candidates)
    if exclude is not None and len(exclude):
        cand = cand[~np.isin(cand, exclude)]
    return cand


def recommend(
    model: FactorModel,
    user_bias: float,
    user_vector: np.ndarray | None,
    n: int,
    exclude: np.ndarray | None = None,
    candidates: np.ndarray | None = None,
    by: str = BY_RATING,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``n`` item rows and unclipped scores for a user vector.

    ``by="rating"``: r̂ of the rating model for ``(user_bias, user_vector)``;
    ``by="ranking"``: x_u·y_i of the ranking model, ``user_vector`` being x_u (the bias is
    ignored). ``exclude``: rows never returned (items already rated). ``candidates``: if
    given, only these rows are ranked.
    """
    if by == BY_RANKING:
        if model.ranking is None or user_vector is None:
            raise ValueError("ranking by the ranking model needs its factors and x_u")
        y = model.ranking.factors
        x = np.asarray(user_vector, F32)
        if candidates is not None:
            cand = _allowed(candidates, exclude)
            if not len(cand):
                return np.empty(0, np.int64), np.empty(0, F32)
            order, vals = top_k(y[cand] @ x, n)
            return cand[order], vals
        scores = y @ x
        if exclude is not None and len(exclude):
            scores[exclude] = -np.inf
        return top_k(scores, n)
    if candidates is not None:
        cand = _allowed(candidates, exclude)
        if not len(cand):
            return np.empty(0, np.int64), np.empty(0, F32)
        sub = model.item_aug[cand]
        if user_vector is None:
            raw = sub[:, model.rank] + F32(user_bias)
        else:
            raw = sub[:, : model.rank] @ np.asarray(user_vector, F32) + sub[:, model.rank]
            raw += F32(user_bias)
        order, vals = top_k(raw, n)
        return cand[order], vals
    scores = model.scores(user_bias, user_vector)
    if exclude is not None and len(exclude):
        scores[exclude] = -np.inf
    return top_k(scores, n)


def recommend_batch(
    model: FactorModel,
    users: list[tuple[float, np.ndarray, int, np.ndarray | None]],
    by: str = BY_RATING,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """:func:`recommend` for several users at once: ``(bias, vector, n, exclude)`` each.

    One matrix-matrix product ``[P | mu + b] @ [[U_1 .. U_B], [1 .. 1]]`` (``by="ranking"``:
    ``Y @ [x_1 .. x_B]``) reads the item matrix once for the whole batch instead of once per
    user (the product is memory-bound). b_u shifts a user's scores uniformly, so it is added
    to the winners only (the ranking model has none).
    """
    if by == BY_RANKING:
        if model.ranking is None:
            raise ValueError("the model has no ranking factors")
        xr = np.empty((model.ranking.rank, len(users)), dtype=F32)
        for j, (_, vector, _, _) in enumerate(users):
            xr[:, j] = vector
        rscores = model.ranking.factors @ xr  # (n, B)
        for j, (_, _, _, exclude) in enumerate(users):
            if exclude is not None and len(exclude):
                rscores[exclude, j] = -np.inf
        return top_k_columns(rscores, [n for _, _, n, _ in users])
    x = np.empty((model.rank + 1, len(users)), dtype=F32)
    for j, (_, vector, _, _) in enumerate(users):
        x[: model.rank, j] = vector
    x[model.rank] = 1.0
    scores = model.item_aug @ x  # (n, B)
    for j, (_, _, _, exclude) in enumerate(users):
        if exclude is not None and len(exclude):
            scores[exclude, j] = -np.inf
    ranked = top_k_columns(scores, [n for _, _, n, _ in users])
    return [(rows, vals + F32(bias)) for (rows, vals), (bias, _, _, _) in zip(ranked, users, strict=True)]
