"""The models' state: factor tables with their least-squares statistics, the replay
reservoir, and row groupings; plain picklable objects (one per partition in Spark). numpy only.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from modeler.core.hashing import id_list, init_factors, replay_mask
from modeler.core.sgd import aggregate, apply_update, finite_rows

if TYPE_CHECKING:
    from modeler.core.als_math import ALSParams


#: Rows per step when scanning statistics: bounds the temporaries of a scan over a table.
_CHUNK = 4096


def _bits_set(gram: np.ndarray, moment: np.ndarray, mass: np.ndarray,
              rows: np.ndarray | None = None, values: bool = False) -> np.ndarray:
    """Per row (of ``rows``, or all), True when its statistics have any bit set (``values``:
    any value ≠ 0, so −0.0 counts as none), scanned ``_CHUNK`` rows at a time."""
    n = len(mass) if rows is None else len(rows)
    out = np.zeros(n, dtype=bool)
    for a in range(0, n, _CHUNK):
        b = min(n, a + _CHUNK)
        idx: Any = slice(a, b) if rows is None else rows[a:b]
        g = np.ascontiguousarray(gram[idx]).reshape(b - a, -1)
        m = np.ascontiguousarray(moment[idx])
        w = np.ascontiguousarray(mass[idx])
        if not values:
            g, m, w = g.view(np.uint32), m.view(np.uint32), w.view(np.uint32)
        out[a:b] = (w != 0) | (m != 0).any(axis=1) | (g != 0).any(axis=1)
    return out


def _put_rows(dst: tuple[np.ndarray, ...], at: np.ndarray, src: tuple[np.ndarray, ...],
              rows: np.ndarray) -> None:
    """``dst[at] = src[rows]`` for the three statistics arrays, skipping the rows of ``src``
    that are all zero bits (``dst`` holds zeros there already). Zero rows are never written,
    so the pages of a fresh ``np.zeros`` that only zeros would land on are never touched: a
    table or working set whose rows mostly hold no statistics (the ranking model with
    per-key histories) costs memory for the rows that do only."""
    nz = np.flatnonzero(_bits_set(src[0], src[1], src[2], rows=rows))
    if len(nz):
        for d, s in zip(dst, src, strict=True):
            d[at[nz]] = s[rows[nz]]


@dataclass
class RowStats:
    """Least-squares statistics of some rows (see :class:`FactorTable`), float32."""

    gram: np.ndarray
    moment: np.ndarray
    mass: np.ndarray

    @classmethod
    def zeros(cls, n: int, rank: int) -> RowStats:
        return cls(np.zeros((n, rank, rank), dtype=np.float32), np.zeros((n, rank), dtype=np.float32),
                   np.zeros(n, dtype=np.float32))

    @property
    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.gram, self.moment, self.mass

    @classmethod
    def concat(cls, parts: Sequence[RowStats], rank: int) -> RowStats:
        if len(parts) == 1:  # nothing to join (the caller owns the parts: no copy)
            return parts[0]
        out = cls.zeros(sum(len(p.mass) for p in parts), rank)
        at = 0
        for p in parts:
            n = len(p.mass)
            _put_rows(out.arrays, np.arange(at, at + n), p.arrays, np.arange(n))
            at += n
        return out

    def select(self, mask: np.ndarray) -> RowStats:
        """The rows where ``mask`` is True (a copy; zero rows are not written)."""
        rows = np.flatnonzero(mask)
        out = RowStats.zeros(len(rows), self.gram.shape[1] if self.gram.ndim == 3 else 0)
        _put_rows(out.arrays, np.arange(len(rows)), self.arrays, rows)
        return out


@dataclass
class FactorTable:
    """Rows of one side (users or items) of one partition: ids, biases, vectors, counts.

    Rows are never removed: a key absent from a batch keeps its row (the seeds' code lost them).
    ``touched`` marks rows changed by the last batch (the service publishes those as a delta).
    ``gram`` (n, rank, rank), ``moment`` (n, rank) and ``mass`` (n,) are the least-squares
    statistics of the ``"rls"`` vector step (A_k, m_k, N_k in the module docstring).
    """

    rank: int
    ids: list[str] = field(default_factory=list)
    index: dict[str, int] = field(default_factory=dict)
    bias: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float32))
    vec: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), dtype=np.float32))
    count: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    touched: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    gram: np.ndarray = field(default_factory=lambda: np.zeros((0, 0, 0), dtype=np.float32))
    moment: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), dtype=np.float32))
    mass: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float32))

    def __post_init__(self) -> None:
        n, r = len(self.bias), self.rank
        if self.vec.shape[1:] != (r,):
            self.vec = np.zeros((len(self.ids), r), dtype=np.float32)
        if self.gram.shape != (n, r, r):
            self.gram = np.zeros((n, r, r), dtype=np.float32)
            self.moment = np.zeros((n, r), dtype=np.float32)
            self.mass = np.zeros(n, dtype=np.float32)

    # Pickled with the statistics of the rows that hold some only: a Spark partition is
    # pickled and unpickled with every batch, and most rows of the ranking model (per-key
    # histories) have none - (rank² + rank + 1) × 4 zero bytes each otherwise.
    def stats_held(self, rows: np.ndarray | None = None) -> np.ndarray:
        """True for the rows (all by default) whose statistics (A, b, N) are not all zero:
        the only ones a solve needs to add, or a pickle to carry."""
        return _bits_set(self.gram, self.moment, self.mass, rows, values=True)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_buf", None)  # the views below carry the rows; spare capacity is not sent
        n = len(self.mass)
        if self.gram.shape == (n, self.rank, self.rank) and n:
            rows = np.flatnonzero(self.stats_held())
            if len(rows) < n:  # every row holds some (the explicit model): the arrays as they are, no copy
                state.update(gram=self.gram[rows], moment=self.moment[rows], mass=self.mass[rows],
                             stats_rows=rows, stats_n=n)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        rows = state.pop("stats_rows", None)
        n = state.pop("stats_n", 0)
        if rows is not None:
            full = RowStats.zeros(n, state["rank"])
            full.gram[rows], full.moment[rows], full.mass[rows] = state["gram"], state["moment"], state["mass"]
            state.update(gram=full.gram, moment=full.moment, mass=full.mass)
        self.__dict__.update(state)

    def copy(self) -> FactorTable:
        """A deep copy (a persisted partition may be read again: never mutate it in place)."""
        return FactorTable(self.rank, list(self.ids), dict(self.index), self.bias.copy(),
                           self.vec.copy(), self.count.copy(), self.touched.copy(),
                           self.gram.copy(), self.moment.copy(), self.mass.copy())

    def stats(self, rows: np.ndarray) -> RowStats:
        """Copies of the least-squares statistics of ``rows`` (zeros where row == −1)."""
        known = np.flatnonzero(rows >= 0)
        out = RowStats.zeros(len(rows), self.rank)
        _put_rows(out.arrays, known, (self.gram, self.moment, self.mass), rows[known])
        return out

    def __len__(self) -> int:
        return len(self.ids)

    def rows(self, keys: Sequence[str]) -> np.ndarray:
        """Row numbers of existing keys (KeyError for an unknown key)."""
        ks = id_list(keys)
        return np.fromiter(map(self.index.__getitem__, ks), dtype=np.int64, count=len(ks))

    def lookup(self, keys: Sequence[str]) -> np.ndarray:
        """Row numbers, −1 for unknown keys (``map`` over the dict's own ``get``: no Python
        frame per key)."""
        ks = id_list(keys)
        return np.fromiter(map(self.index.get, ks, itertools.repeat(-1)), dtype=np.int64, count=len(ks))

    def ensure(self, keys: Iterable[str], seed: int, init_scale: float) -> int:
        """Add rows for keys never seen (in first-seen order), initialised from (seed, id)."""
        new: list[str] = []
        index = self.index
        for k in keys:
            if k not in index:
                index[k] = len(self.ids) + len(new)
                new.append(k)
        if new:
            self.add_rows(new, *init_factors(new, self.rank, seed, init_scale))
        return len(new)

    def add_rows(self, keys: list[str], bias: np.ndarray, vec: np.ndarray,
                 count: np.ndarray | None = None) -> None:
        """Append rows. The arrays are views of buffers with spare capacity (grown 1.5× when
        full), so a table that gains a few rows per batch costs O(new rows), not a copy of
        every array (the state server keeps one table for the whole stream)."""
        start = len(self.ids)
        end = start + len(keys)
        self.ids.extend(keys)
        for j, k in enumerate(keys):
            self.index[k] = start + j
        buf = self._buffers(start, end)
        buf["bias"][start:end] = np.asarray(bias, dtype=np.float32)
        buf["vec"][start:end] = np.asarray(vec, dtype=np.float32).reshape(-1, self.rank)
        buf["count"][start:end] = 0 if count is None else np.asarray(count, dtype=np.int64)
        buf["touched"][start:end] = False
        # gram/moment/mass rows from ``start`` on are zero already: a buffer's rows past the
        # views' end are never written (``_buffers``), and writing zeros would make pages of
        # statistics resident that most ranking rows never use.
        for name, b in buf.items():
            setattr(self, name, b[:end])

    def reserve(self, n: int) -> None:
        """Room for ``n`` rows in all, so that appending up to that many (a restore, a chunk
        of rows at a time) copies no buffer on the way."""
        start = len(self.ids)
        if n > start:
            for name, b in self._buffers(start, n).items():
                setattr(self, name, b[:start])

    _GROWN = ("bias", "vec", "count", "touched", "gram", "moment", "mass")
    _STATS = ("gram", "moment", "mass")

    def _buffers(self, start: int, end: int) -> dict[str, np.ndarray]:
        """The backing buffers, with room for ``end`` rows (rows < ``start`` kept)."""
        buf: dict[str, np.ndarray] | None = self.__dict__.get("_buf")
        if buf is not None and len(buf["bias"]) >= end and all(
                getattr(self, k).base is buf[k] and len(getattr(self, k)) == start for k in self._GROWN):
            return buf
        cap = max(end, start + start // 2 + 16)
        r = self.rank
        shapes = {"bias": ((cap,), np.float32), "vec": ((cap, r), np.float32), "count": ((cap,), np.int64),
                  "touched": ((cap,), bool), "gram": ((cap, r, r), np.float32),
                  "moment": ((cap, r), np.float32), "mass": ((cap,), np.float32)}
        new = {}
        for k, (shape, dtype) in shapes.items():
            new[k] = np.zeros(shape, dtype=dtype)
            if k not in self._STATS:
                new[k][:start] = getattr(self, k)[:start]
        old = np.arange(start)  # statistics: only the rows with bits set (the rest stay untouched zeros)
        _put_rows(tuple(new[k] for k in self._STATS), old, tuple(getattr(self, k) for k in self._STATS), old)
        self.__dict__["_buf"] = new
        return new

    def update(self, rows: np.ndarray, err: np.ndarray, other: np.ndarray, params: ALSParams) -> int:
        """Apply one pass's gradients of the ratings at ``rows``; return rows refused as non-finite."""
        n, s_b, s_v = aggregate(rows, len(self.ids), err, other)
        hit = np.flatnonzero(n)
        new_b, new_v = apply_update(
            self.bias[hit], self.vec[hit], n[hit], s_b[hit], s_v[hit],
            params.learning_rate, params.reg_param, params.reg_bias, params.aggregation,
            self.count[hit], params.history_weight,
        )
        ok = finite_rows(new_b, new_v)
        self.bias[hit[ok]] = new_b[ok]
        self.vec[hit[ok]] = new_v[ok]
        self.touched[hit] = True
        return int((~ok).sum())

    def upsert(self, keys: Sequence[str], bias: np.ndarray, vec: np.ndarray,
               count_inc: np.ndarray, stats: RowStats | None = None) -> None:
        """Overwrite the rows of known keys, append unknown keys (in the given order); add
        ``count_inc`` to the counts, overwrite their statistics (when given) and mark exactly
        these rows as touched."""
        self.touched[:] = False
        if not len(keys):
            return
        rows = self.lookup(keys)
        fresh = np.flatnonzero(rows < 0)
        if len(fresh):
            self.add_rows([keys[int(j)] for j in fresh], bias[fresh], vec[fresh])
            rows = self.lookup(keys)
        self.bias[rows] = bias
        self.vec[rows] = vec
        self.count[rows] += np.asarray(count_inc, dtype=np.int64)
        self.touched[rows] = True
        if stats is not None:
            # Only rows with bits set on either side: a zero row written over a zero row
            # changes no bit, and would touch a page of statistics the table never needs.
            own = (self.gram, self.moment, self.mass)
            write = np.flatnonzero(_bits_set(*stats.arrays) | _bits_set(*own, rows=rows))
            for d, src in zip(own, stats.arrays, strict=True):
                d[rows[write]] = src[write]

    def records(self, only_touched: bool = False) -> list[tuple[str, tuple[float, np.ndarray]]]:
        """``[(id, (bias, vector float32 (rank,)))]``."""
        sel = np.flatnonzero(self.touched) if only_touched else range(len(self.ids))
        return [(self.ids[j], (float(self.bias[j]), self.vec[j].copy())) for j in sel]


def keep_fraction(reservoir_size: int, ratings_seen: int) -> float:
    """Share of all ratings seen that the replay sample keeps: min(1, R / seen)."""
    if reservoir_size <= 0:
        return 0.0
    return 1.0 if ratings_seen <= reservoir_size else reservoir_size / ratings_seen


def keep_mask(priority: np.ndarray, fraction: float) -> np.ndarray:
    """Ratings in the replay sample: priority / 2^64 < fraction (a pure function of the rating).

    Because membership depends only on (rating, fraction), every partition holding a copy of
    an entry (by user and by item) agrees on it without talking to the others, and the sample
    is uniform over the whole history: its expected size is min(seen, R), its spread ±√R.
    """
    if fraction >= 1.0:
        return np.ones(priority.shape, dtype=bool)
    return (np.asarray(priority, dtype=np.uint64) >> np.uint64(11)) < np.uint64(int(fraction * 2.0**53))


@dataclass
class Reservoir:
    """The replay sample's entries held by one partition (see :func:`keep_mask`).

    A ``mirror`` (the item side's copy) keeps item ids and priorities only: enough to know
    which of its items' rows a replay needs.
    """

    mirror: bool = False
    users: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=str))
    items: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=str))
    ratings: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float32))
    priority: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.uint64))

    def __len__(self) -> int:
        return len(self.priority)

    def selected(self, batch_no: int, fraction: float) -> np.ndarray:
        return replay_mask(self.priority, batch_no, fraction)

    def updated(self, keep_frac: float, users: Any, items: Any, ratings: Any, priority: Any) -> Reservoir:
        """A new reservoir: old entries still under the threshold plus the new ones under it."""
        pr = np.concatenate([self.priority, np.asarray(priority, dtype=np.uint64)])
        keep = keep_mask(pr, keep_frac)
        it = np.concatenate([self.items, np.asarray(items, dtype=str)])[keep]
        if self.mirror:
            return Reservoir(True, items=it, priority=pr[keep])
        us = np.concatenate([self.users, np.asarray(users, dtype=str)])[keep]
        rs = np.concatenate([self.ratings, np.asarray(ratings, dtype=np.float32)])[keep]
        return Reservoir(False, us, it, rs, pr[keep])


@dataclass(frozen=True)
class Groups:
    """Ratings grouped by row: ``order`` sorts them by row, ``starts`` opens each group,
    ``keys`` are the rows (ascending) and ``n`` their numbers of ratings."""

    order: np.ndarray
    starts: np.ndarray
    keys: np.ndarray
    n: np.ndarray

    @classmethod
    def of(cls, rows: np.ndarray) -> Groups:
        order = np.argsort(rows, kind="stable")
        sorted_rows = rows[order]
        starts = np.flatnonzero(np.r_[True, sorted_rows[1:] != sorted_rows[:-1]]) if len(rows) \
            else np.zeros(0, dtype=np.int64)
        return cls(order, starts, sorted_rows[starts], np.diff(np.r_[starts, len(rows)]).astype(np.float64))

    def chunks(self, rank: int) -> Iterator[tuple[slice, Groups]]:
        """The groups in runs of consecutive keys whose rank × rank float64 sums take about
        16 MB (:data:`_SUM_ENTRIES`), each with its slice of ``keys``: a pass that sums, adds
        and solves one run at a time keeps its temporaries in cache and reuses their pages,
        instead of faulting in arrays of every key's rank² sums (at 33k keys of rank 24 that
        halved the user pass). A run's groups keep the whole ``order``; each key's sums are
        of its own events only (:meth:`moments`), so the runs change no bit of the result.
        A run's ``n`` is its groups' counts; weighted masses must be summed over the whole."""
        step = max(64, _SUM_ENTRIES // max(1, rank * rank))
        total = len(self.starts)
        for a in range(0, total, step):
            s = slice(a, min(total, a + step))
            yield s, Groups(self.order, self.starts[s], self.keys[s], self.n[s])

    def moments(self, q: np.ndarray, gram_w: np.ndarray, rhs_w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per group g (in ``keys`` order): G_g = Σ gram_w q qᵀ and h_g = Σ rhs_w q, float64,
        over the events of the group (``q``, ``gram_w``, ``rhs_w``: one row or value per
        event, in the order the groups were made from).

        Groups of similar size are padded with zero-weight events to a common width and
        summed as ONE batched product (groups, rank, width) @ (groups, width, rank + 1):
        no Python loop per group, no rank loop. The widths are a fixed ladder (each ~1.25×
        the last: at most 25% padding), so a group's width, and with it the bits of its
        sums, depends on its own events only, never on which other groups share the call
        (the layouts of the Spark model solve the same keys in different company). Padded
        temporaries are bounded by :data:`_PAD_EVENTS` events per product.
        """
        rank = q.shape[1]
        n = len(self.starts)
        gram = np.empty((n, rank, rank))
        h = np.empty((n, rank))
        if not n:
            return gram, h
        gram_w = np.asarray(gram_w, dtype=np.float64)
        rhs_w = np.asarray(rhs_w, dtype=np.float64)
        sizes = self.n.astype(np.int64)
        widths = pad_widths(sizes)
        for width in np.unique(widths).tolist():
            members = np.flatnonzero(widths == width)
            step = max(1, _PAD_EVENTS // width)
            offs = np.arange(width)
            for a in range(0, len(members), step):
                gi = members[a:a + step]
                valid = offs[None, :] < sizes[gi][:, None]
                ev = self.order[np.where(valid, self.starts[gi][:, None] + offs[None, :], 0)]
                qb = np.asarray(q[ev], dtype=np.float64)  # (groups, width, rank)
                qt = qb.transpose(0, 2, 1)
                wq = qb * np.where(valid, gram_w[ev], 0.0)[:, :, None]
                gram[gi] = np.matmul(qt, wq)
                h[gi] = np.matmul(qt, np.where(valid, rhs_w[ev], 0.0)[:, :, None])[:, :, 0]
        return gram, h


def group_mass(groups: Groups, weights: np.ndarray | None = None) -> np.ndarray:
    """Σ ``weights`` over each group's events (float64; the groups' counts without weights)."""
    if weights is None or not len(groups.order):
        return groups.n
    return np.add.reduceat(np.asarray(weights, dtype=np.float64)[groups.order], groups.starts)


def fold_runs(table: FactorTable, groups: Groups, q: np.ndarray, gram_w: np.ndarray,
              rhs_w: np.ndarray, mass: np.ndarray, forgetting: float) -> None:
    """Fold per-group sums into ``table``'s statistics, one run of keys at a time
    (:meth:`Groups.chunks`): A ← β A + Σ gram_w q qᵀ, b ← β b + Σ rhs_w q, N ← β N + ``mass``
    (one value per group, e.g. :func:`group_mass`), float64 sums stored as float32."""
    beta = forgetting
    for at, run in groups.chunks(table.rank):
        keys = run.keys
        gram, h = run.moments(q, gram_w, rhs_w)
        table.gram[keys] = (beta * table.gram[keys].astype(np.float64) + gram).astype(np.float32)
        table.moment[keys] = (beta * table.moment[keys].astype(np.float64) + h).astype(np.float32)
        table.mass[keys] = (beta * table.mass[keys].astype(np.float64) + mass[at]).astype(np.float32)


def each_run(groups: Groups, rank: int, work: Callable[[slice, Groups], Any]) -> list[Any]:
    """``work(at, run)`` for every run of ``groups.chunks(rank)``, in run order, on up to
    :data:`RUN_THREADS` threads. numpy's products and LAPACK's solves release the GIL, so the
    runs of one pass share the cores; every run reads the same inputs and writes only its own
    keys' rows, and its bits do not depend on the other runs, so the result is the same bit
    for bit with one thread or several."""
    runs = list(groups.chunks(rank))
    if len(runs) < 2 or RUN_THREADS < 2:
        return [work(at, run) for at, run in runs]
    return list(_run_pool().map(lambda r: work(*r), runs))


#: Threads of :func:`each_run`: two where the machine has two cores or more. The modeler's
#: one-partition layout runs a batch as one task, so its second core is otherwise idle.
RUN_THREADS = min(2, os.cpu_count() or 1)
_pool: ThreadPoolExecutor | None = None


def _run_pool() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(RUN_THREADS, thread_name_prefix="runs")
    return _pool


#: Float64 entries of per-group rank × rank sums a chunked pass holds at once
#: (:meth:`Groups.chunks`; 2²¹ entries = 16 MB).
_SUM_ENTRIES = 1 << 21

#: Padded events per batched product in :meth:`Groups.moments` (bounds its temporaries:
#: ~3 arrays of this many × rank float64).
_PAD_EVENTS = 1 << 15

#: Ratio between successive padded widths of :meth:`Groups.moments`.
_PAD_RATIO = 1.25


def pad_widths(sizes: np.ndarray) -> np.ndarray:
    """The padded width of groups of these sizes: the smallest rung of the ladder
    ⌈1.25^j⌉ (j = 0, 1, …) that holds the group; 1 for an empty one."""
    sz = np.maximum(np.asarray(sizes, dtype=np.int64), 1)
    j = np.ceil(np.log(sz) / np.log(_PAD_RATIO) - 1e-9)
    return np.maximum(np.ceil(_PAD_RATIO ** j - 1e-9).astype(np.int64), sz)
