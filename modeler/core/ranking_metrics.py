"""Top-N ranking quality from factor matrices: blocked top-k, precision/recall/NDCG/MAP@k,
catalogue coverage and item-to-item hit rates (numpy only).

Users and items are integer indices here (the caller maps ids to rows). A user's items are
held as :class:`UserItems`, a CSR-style table (``indptr``, sorted unique ``indices``).

Definitions (per evaluated user u with relevant held-out set R_u, list L_u of length k,
hit_j = 1 when the j-th item of L_u (j = 0..k−1) is in R_u; each metric is the mean over the
users with R_u non-empty):

* precision@k = Σ_j hit_j / k
* recall@k    = Σ_j hit_j / |R_u|
* NDCG@k      = DCG / IDCG, DCG = Σ_j hit_j / log2(j + 2), IDCG = Σ_{j < min(k, |R_u|)} 1 / log2(j + 2)
* MAP@k       = mean_u AP_u, AP_u = Σ_j hit_j · P@(j+1) / min(k, |R_u|), P@(j+1) = Σ_{l ≤ j} hit_l / (j + 1)
* coverage    = |∪_u L_u| / (catalogue size), over the evaluated users' lists

Top-k lists are computed in blocks of users so that a block's score matrix (users × items)
stays within ``block_floats`` numbers: 100,000 users × 60,000 items never exists at once.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np

K = 10
# A block's score matrix holds at most this many float32 scores (64 MB).
DEFAULT_BLOCK_FLOATS = 16_000_000
# The relevance threshold of the reference scale: MovieLens "liked" is a rating >= 4 on 0.5–5.
REFERENCE_THRESHOLD = 4.0
REFERENCE_SCALE = (0.5, 5.0)


class UserItems(NamedTuple):
    """Items per user (or users per item): row r holds ``indices[indptr[r]:indptr[r + 1]]``,
    sorted and unique."""

    indptr: np.ndarray
    indices: np.ndarray

    @classmethod
    def from_pairs(cls, rows: np.ndarray, cols: np.ndarray, n_rows: int) -> UserItems:
        rows = np.asarray(rows, dtype=np.int64)
        cols = np.asarray(cols, dtype=np.int64)
        if len(rows):
            # Sort by (row, col) and drop repeated pairs: the same user may rate an item twice.
            order = np.lexsort((cols, rows))
            rows, cols = rows[order], cols[order]
            keep = np.ones(len(rows), dtype=bool)
            keep[1:] = (rows[1:] != rows[:-1]) | (cols[1:] != cols[:-1])
            rows, cols = rows[keep], cols[keep]
        counts = np.bincount(rows, minlength=n_rows) if len(rows) else np.zeros(n_rows, np.int64)
        indptr = np.zeros(n_rows + 1, dtype=np.int64)
        np.cumsum(counts, out=indptr[1:])
        return cls(indptr, cols)

    @property
    def n_rows(self) -> int:
        return len(self.indptr) - 1

    def counts(self) -> np.ndarray:
        return np.diff(self.indptr)

    def of(self, row: int) -> np.ndarray:
        return self.indices[self.indptr[row]:self.indptr[row + 1]]

    def transpose(self, n_cols: int) -> UserItems:
        rows = np.repeat(np.arange(self.n_rows, dtype=np.int64), self.counts())
        return UserItems.from_pairs(self.indices, rows, n_cols)

    def gather(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(position in ``rows`` of each entry, entry) for every entry of the given rows."""
        rows = np.asarray(rows, dtype=np.int64)
        starts = self.indptr[rows]
        lens = self.indptr[rows + 1] - starts
        owner = np.repeat(np.arange(len(rows), dtype=np.int64), lens)
        # Position inside each row: arange over the total minus the row's running offset.
        offsets = np.repeat(np.cumsum(lens) - lens, lens)
        idx = np.repeat(starts, lens) + (np.arange(int(lens.sum()), dtype=np.int64) - offsets)
        return owner, self.indices[idx]


class RankingScores(NamedTuple):
    """Mean top-k metrics over ``users`` evaluated users (see the module docstring)."""

    precision: float
    recall: float
    ndcg: float
    map: float
    coverage: float
    users: int
    k: int

    def to_dict(self) -> dict[str, Any]:
        return self._asdict()


def relevance_threshold(scale_min: float, scale_max: float,
                        reference: float = REFERENCE_THRESHOLD,
                        reference_scale: tuple[float, float] = REFERENCE_SCALE) -> float:
    """The reference threshold (4 on 0.5–5) moved to the same relative position of another
    scale: lo + (hi − lo)·(4 − 0.5)/(5 − 0.5); 8.0 on 1–10, 7.78 on 0–10."""
    ref_lo, ref_hi = reference_scale
    t = (reference - ref_lo) / (ref_hi - ref_lo)
    return scale_min + (scale_max - scale_min) * t


def block_rows(n_items: int, block_floats: int = DEFAULT_BLOCK_FLOATS) -> int:
    return max(1, block_floats // max(1, n_items))


def _select_top(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k best scores of each row, best first (ties: lower index first);
    −1 where a row has fewer than k finite scores (everything else excluded)."""
    n, m = scores.shape
    kk = min(k, m)
    out = np.full((n, k), -1, dtype=np.int64)
    if kk == 0 or n == 0:
        return out
    part = np.argpartition(-scores, kk - 1, axis=1)[:, :kk] if kk < m else \
        np.tile(np.arange(m), (n, 1))
    top = np.take_along_axis(scores, part, axis=1)
    # Order the k candidates by (score descending, index ascending): deterministic lists.
    order = np.lexsort((part, -top), axis=1)
    part = np.take_along_axis(part, order, axis=1)
    top = np.take_along_axis(top, order, axis=1)
    part[~np.isfinite(top)] = -1
    out[:, :kk] = part
    return out


def top_k(user_vecs: np.ndarray, item_vecs: np.ndarray, k: int = K,
          exclude: UserItems | None = None, item_bias: np.ndarray | None = None,
          users: np.ndarray | None = None, block_floats: int = DEFAULT_BLOCK_FLOATS) -> np.ndarray:
    """Top-k item indices for each user of ``users`` (default: all rows of ``user_vecs``),
    score s_ui = x_u · y_i (+ b_i), items of ``exclude`` (the user's training items) never
    recommended. Returns (len(users), k) int64, best first, −1 padding."""
    x = np.asarray(user_vecs, dtype=np.float32)
    y = np.asarray(item_vecs, dtype=np.float32)
    n_items = y.shape[0]
    rows = np.arange(x.shape[0], dtype=np.int64) if users is None else np.asarray(users, np.int64)
    bias = None if item_bias is None else np.asarray(item_bias, dtype=np.float32)
    out = np.empty((len(rows), k), dtype=np.int64)
    step = block_rows(n_items, block_floats)
    yt = np.ascontiguousarray(y.T)
    for start in range(0, len(rows), step):
        block = rows[start:start + step]
        scores = x[block] @ yt
        if bias is not None:
            scores += bias
        if exclude is not None:
            owner, items = exclude.gather(block)
            scores[owner, items] = -np.inf
        out[start:start + len(block)] = _select_top(scores, k)
    return out


def popular_top_k(item_scores: np.ndarray, users: np.ndarray, k: int = K,
                  exclude: UserItems | None = None, block_floats: int = DEFAULT_BLOCK_FLOATS
                  ) -> np.ndarray:
    """The same list for everyone (highest ``item_scores``), minus each user's excluded items."""
    n_items = len(item_scores)
    zeros_u = np.zeros((int(np.max(users, initial=-1)) + 1, 1), dtype=np.float32)
    return top_k(zeros_u, np.zeros((n_items, 1), np.float32), k, exclude, item_scores, users,
                 block_floats)


def hits_matrix(recs: np.ndarray, users: np.ndarray, relevant: UserItems) -> np.ndarray:
    """hit[j, l] = recs[j, l] is a relevant item of user users[j]."""
    users = np.asarray(users, dtype=np.int64)
    width = int(max(int(relevant.indices.max(initial=0)), int(recs.max(initial=0)))) + 1
    # Pairs (u, i) as one sorted int64 key u·width + i, found with a binary search.
    rel_rows = np.repeat(np.arange(relevant.n_rows, dtype=np.int64), relevant.counts())
    keys = rel_rows * width + relevant.indices
    query = users[:, None] * width + recs
    pos = np.searchsorted(keys, query)
    pos = np.minimum(pos, max(len(keys) - 1, 0))
    found = (keys[pos] == query) if len(keys) else np.zeros(query.shape, dtype=bool)
    return found & (recs >= 0)


def ranking_scores(recs: np.ndarray, users: np.ndarray, relevant: UserItems, n_catalogue: int
                   ) -> RankingScores:
    """Metrics of the lists ``recs`` (row j for user ``users[j]``) against ``relevant``; users
    with no relevant item are left out (they are counted in no mean)."""
    users = np.asarray(users, dtype=np.int64)
    n_rel = relevant.counts()[users]
    keep = n_rel > 0
    recs, users, n_rel = recs[keep], users[keep], n_rel[keep].astype(np.float64)
    k = recs.shape[1]
    if len(users) == 0:
        nan = float("nan")
        return RankingScores(nan, nan, nan, nan, nan, 0, k)
    hit = hits_matrix(recs, users, relevant).astype(np.float64)
    n_hit = hit.sum(axis=1)
    discount = 1.0 / np.log2(np.arange(2, k + 2, dtype=np.float64))  # 1/log2(j + 2)
    dcg = hit @ discount
    ideal_len = np.minimum(n_rel, k).astype(np.int64)
    idcg = np.concatenate([[0.0], np.cumsum(discount)])[ideal_len]
    # AP: precision at each hit position, summed, over min(k, |R|).
    prec_at = np.cumsum(hit, axis=1) / np.arange(1, k + 1, dtype=np.float64)
    ap = (prec_at * hit).sum(axis=1) / np.minimum(n_rel, k)
    listed = np.unique(recs[recs >= 0])
    return RankingScores(
        precision=float(np.mean(n_hit / k)),
        recall=float(np.mean(n_hit / n_rel)),
        ndcg=float(np.mean(dcg / idcg)),
        map=float(np.mean(ap)),
        coverage=len(listed) / n_catalogue if n_catalogue else float("nan"),
        users=len(users),
        k=k,
    )


# ---------------------------------------------------------------------------------------------
# Item to item
# ---------------------------------------------------------------------------------------------


def cosine_top_k(item_vecs: np.ndarray, queries: np.ndarray, k: int = K,
                 block_floats: int = DEFAULT_BLOCK_FLOATS) -> np.ndarray:
    """For each query item, the k items of highest cosine y_q·y_i / (|y_q| |y_i|), itself
    excluded. Zero vectors have cosine 0 with everything."""
    y = np.asarray(item_vecs, dtype=np.float32)
    norms = np.linalg.norm(y, axis=1)
    unit = y / np.where(norms > 0, norms, 1.0)[:, None]
    queries = np.asarray(queries, dtype=np.int64)
    self_ex = UserItems(np.arange(len(queries) + 1, dtype=np.int64), queries)
    # top_k over "users" 0..q−1 whose vectors are the queries' unit vectors.
    return top_k(unit[queries], unit, k, self_ex, None, None, block_floats)


def cooccurrence_top_k(train: UserItems, n_items: int, queries: np.ndarray, k: int = K) -> np.ndarray:
    """For each query item a, the k items b most often held by the same training users:
    C_ab = |{u : a ∈ I_u, b ∈ I_u}|, a itself excluded; ties (and items never co-held) in
    order of training popularity, then index."""
    item_users = train.transpose(n_items)
    popularity = item_users.counts().astype(np.int64)
    tie = popularity.astype(np.float64) / (popularity.max(initial=0) + 1.0)  # < 1: breaks ties only
    queries = np.asarray(queries, dtype=np.int64)
    out = np.empty((len(queries), k), dtype=np.int64)
    for j, a in enumerate(queries.tolist()):
        users = item_users.of(a)
        _, items = train.gather(users)
        score = np.bincount(items, minlength=n_items).astype(np.float64) + tie
        score[a] = -np.inf
        out[j] = _select_top(score[None, :], k)[0]
    return out


class ItemPairs(NamedTuple):
    """Ordered pairs (a, b), a ≠ b, of items liked by one user."""

    a: np.ndarray
    b: np.ndarray


def liked_pairs(liked: UserItems, max_pairs: int = 20_000, seed: int = 42) -> ItemPairs:
    """Every ordered pair of distinct items in one user's liked set (a random ``max_pairs``
    of them when there are more; users with many items would otherwise dominate memory)."""
    counts = liked.counts()
    n_pairs = counts * (counts - 1)
    total = int(n_pairs.sum())
    if total == 0:
        return ItemPairs(np.empty(0, np.int64), np.empty(0, np.int64))
    rng = np.random.default_rng(seed)
    picks = np.arange(total, dtype=np.int64) if total <= max_pairs else \
        np.sort(rng.choice(total, size=max_pairs, replace=False))
    # Pair number p -> (user, local index): the user owning p, then (first, second) of the
    # user's n·(n−1) ordered pairs: first = q // (n−1), second = the q % (n−1)-th other item.
    ends = np.cumsum(n_pairs)
    user = np.searchsorted(ends, picks, side="right")
    q = picks - (ends[user] - n_pairs[user])
    n = counts[user]
    first = q // (n - 1)
    second = q % (n - 1)
    second = second + (second >= first)
    base = liked.indptr[user]
    return ItemPairs(liked.indices[base + first], liked.indices[base + second])


def pair_hit_rate(neighbours: np.ndarray, queries: np.ndarray, pairs: ItemPairs) -> float:
    """Share of pairs (a, b) with b among the neighbours of a (``neighbours`` row j belongs
    to ``queries[j]``; pairs whose a is not a query are not counted)."""
    if len(pairs.a) == 0:
        return float("nan")
    queries = np.asarray(queries, dtype=np.int64)
    order = np.argsort(queries)
    pos = np.searchsorted(queries[order], pairs.a)
    pos = np.minimum(pos, len(queries) - 1)
    known = queries[order][pos] == pairs.a
    if not known.any():
        return float("nan")
    rows = order[pos[known]]
    hit = (neighbours[rows] == pairs.b[known][:, None]).any(axis=1)
    return float(hit.mean())


def safe_ratio(a: float, b: float) -> float:
    return a / b if b and math.isfinite(a) and math.isfinite(b) else float("nan")
