"""FactorTable's growth into spare capacity: appends stay O(new rows), and what a pickle or a
copy carries is exactly the rows held."""

from __future__ import annotations

import pickle

import numpy as np

from modeler.core.tables import FactorTable, RowStats


def _grown(n_batches: int = 40, per: int = 7, rank: int = 3) -> FactorTable:
    t = FactorTable(rank)
    rng = np.random.default_rng(1)
    for b in range(n_batches):
        keys = [f"k{b}-{j}" for j in range(per)]
        t.add_rows(keys, rng.normal(size=per), rng.normal(size=(per, rank)), np.arange(per))
        t.upsert(keys[:2], np.ones(2, np.float32), np.ones((2, rank), np.float32), np.ones(2),
                 RowStats(np.full((2, rank, rank), b, np.float32), np.ones((2, rank), np.float32),
                          np.ones(2, np.float32)))
    return t


def test_appends_reuse_the_buffers_and_the_arrays_hold_exactly_the_rows():
    t = _grown()
    n = len(t)
    assert n == 280
    for name in FactorTable._GROWN:
        arr = getattr(t, name)
        assert len(arr) == n and arr.base is not None  # a view of a buffer with spare room
    before = t.bias.base
    t.add_rows(["one-more"], np.zeros(1), np.zeros((1, 3)))
    assert t.bias.base is before or len(before) < n + 1  # grown only when full
    assert t.index["one-more"] == n and t.count[n] == 0 and not t.touched[n]
    assert not t.gram[n].any() and t.mass[n] == 0


def test_a_pickle_and_a_copy_carry_the_rows_not_the_capacity():
    t = _grown()
    back = pickle.loads(pickle.dumps(t))
    for name in FactorTable._GROWN:
        np.testing.assert_array_equal(getattr(back, name), getattr(t, name))
    assert back.ids == t.ids and back.index == t.index
    assert "_buf" not in back.__dict__
    assert len(t.__dict__["_buf"]["gram"]) > len(t)  # spare rows exist...
    c = t.copy()
    assert "_buf" not in c.__dict__
    assert len(pickle.dumps(t)) == len(pickle.dumps(c))  # ...and the pickle does not carry them
    c.bias[0] = 99.0
    assert t.bias[0] != 99.0


def test_arrays_replaced_from_outside_are_not_overwritten_by_a_stale_buffer():
    t = _grown(3)
    t.vec = t.vec.copy()  # e.g. a restore seeding new arrays
    t.vec[0] = 5.0
    t.add_rows(["x"], np.zeros(1), np.ones((1, 3)))
    assert (t.vec[0] == 5.0).all() and (t.vec[-1] == 1.0).all() and len(t.vec) == len(t)


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).view(np.uint32)


def _sparse_stats(n: int, rank: int, seed: int) -> RowStats:
    """Statistics where most rows are all zero (as the ranking model's), one row holding
    only −0.0 (zero by value, not by bits)."""
    rng = np.random.default_rng(seed)
    st = RowStats.zeros(n, rank)
    held = rng.random(n) < 0.2
    st.gram[held] = rng.normal(size=(int(held.sum()), rank, rank))
    st.moment[held] = rng.normal(size=(int(held.sum()), rank))
    st.mass[held] = rng.random(int(held.sum())) + 1
    st.gram[np.flatnonzero(~held)[0]] = -0.0
    return st


def test_statistics_keep_every_bit_through_growth_upserts_and_copies():
    rank = 4
    t = FactorTable(rank)
    ref = RowStats.zeros(0, rank)  # the dense statement of the same writes
    rng = np.random.default_rng(3)
    for b in range(12):
        keys = [f"k{b}-{j}" for j in range(50)]
        t.add_rows(keys, rng.normal(size=50), rng.normal(size=(50, rank)))
        ref = RowStats(*(np.concatenate([a, np.zeros_like(a[:50], shape=(50, *a.shape[1:]))])
                         for a in ref.arrays))
        pick = rng.choice(len(t), size=min(60, len(t)), replace=False)
        k = len(pick)
        st = _sparse_stats(k, rank, b)
        t.upsert([t.ids[j] for j in pick], np.zeros(k, np.float32), np.zeros((k, rank), np.float32),
                 np.zeros(k), st)
        for a, s in zip(ref.arrays, st.arrays, strict=True):
            a[pick] = s
        for a, r in zip((t.gram, t.moment, t.mass), ref.arrays, strict=True):
            np.testing.assert_array_equal(_bits(a), _bits(r))
    rows = np.r_[rng.choice(len(t), size=100), -1, -1]
    got = t.stats(rows)
    for g, r in zip(got.arrays, ref.arrays, strict=True):
        np.testing.assert_array_equal(_bits(g[:-2]), _bits(r[rows[:-2]]))
        assert not _bits(g[-2:]).any()
    mask = rng.random(len(rows)) < 0.5
    sel = got.select(mask)
    both = RowStats.concat([sel, got], rank)
    for s, c, g in zip(sel.arrays, both.arrays, got.arrays, strict=True):
        np.testing.assert_array_equal(_bits(s), _bits(g[mask]))
        np.testing.assert_array_equal(_bits(c), _bits(np.concatenate([g[mask], g])))
    back = pickle.loads(pickle.dumps(t))
    held = t.stats_held()
    for a, b_ in zip((back.gram, back.moment, back.mass), (t.gram, t.moment, t.mass), strict=True):
        np.testing.assert_array_equal(_bits(a[held]), _bits(b_[held]))


def test_rows_of_zero_statistics_are_not_written():
    """What keeps the pages of unused statistics untouched: a copy skips the rows that are all
    zero bits (the destination is zeros already), and copies −0.0 rows."""
    from modeler.core.tables import _put_rows

    src = _sparse_stats(40, 3, 0)
    dst = RowStats(*(np.full_like(a, np.nan) for a in src.arrays))
    rows = np.arange(40)
    _put_rows(dst.arrays, rows, src.arrays, rows)
    zero = ~(_bits(src.gram).reshape(40, -1).any(axis=1) | _bits(src.moment).any(axis=1)
             | (_bits(src.mass) != 0))
    assert zero.sum() > 20 and (~zero).sum() > 5
    assert np.isnan(dst.gram[zero]).all() and np.isnan(dst.mass[zero]).all()
    np.testing.assert_array_equal(_bits(dst.gram[~zero]), _bits(src.gram[~zero]))
    np.testing.assert_array_equal(_bits(dst.moment[~zero]), _bits(src.moment[~zero]))


def _half_steps(monkeypatch, sum_entries: int, threads: int):
    """Both models' half steps on one random working set, with the given run size and threads."""
    from modeler.core import tables
    from modeler.core.als_math import ALSParams, rls_half_step
    from modeler.core.ranking import gramian, implicit_half_step

    monkeypatch.setattr(tables, "_SUM_ENTRIES", sum_entries)
    monkeypatch.setattr(tables, "RUN_THREADS", threads)
    rng = np.random.default_rng(11)
    n_users, n_items, rank, n = 700, 90, 6, 5000
    u_rows = rng.integers(0, n_users, n)
    i_rows = rng.integers(0, n_items, n)

    def table(k: int) -> FactorTable:
        t = FactorTable(rank)
        t.add_rows([f"k{j}" for j in range(k)], rng.normal(size=k).astype(np.float32),
                   rng.normal(size=(k, rank)).astype(np.float32))
        held = rng.random(k) < 0.3  # some rows hold statistics, most none
        g = rng.normal(size=(k, rank, rank)).astype(np.float32)
        t.gram[held] = np.einsum("kij,klj->kil", g, g)[held]
        t.moment[held] = rng.normal(size=(k, rank)).astype(np.float32)[held]
        t.mass[held] = rng.uniform(1, 9, k).astype(np.float32)[held]
        return t

    users, items = table(n_users), table(n_items)
    r_users, r_items = table(n_users), table(n_items)
    conf = 1.0 + 3.0 * rng.random(n)
    refused = implicit_half_step(u_rows, r_users, i_rows, r_items, conf, gramian(r_items.vec), 0.1, "count")
    rates = rng.uniform(0.5, 5.0, n)
    refused += rls_half_step(3.5, rates, i_rows, items, u_rows, users, ALSParams(rank=rank))
    return refused, users, items, r_users, r_items


def test_solves_in_runs_on_two_threads_keep_every_bit(monkeypatch):
    # Groups.chunks/each_run split a pass's keys into runs solved on up to two threads; a
    # key's sums and solve are its own, so neither the runs nor the threads change a bit.
    want = _half_steps(monkeypatch, 1 << 30, 1)
    for sum_entries, threads in ((64 * 36, 1), (64 * 36, 2), (100 * 36, 2)):
        got = _half_steps(monkeypatch, sum_entries, threads)
        assert got[0] == want[0]
        for a, b in zip(got[1:], want[1:], strict=True):
            assert a.vec.tobytes() == b.vec.tobytes()
            assert a.bias.tobytes() == b.bias.tobytes()
            assert a.touched.tolist() == b.touched.tolist()


def test_runs_cover_every_group_once_in_order():
    from modeler.core.tables import Groups

    g = Groups.of(np.random.default_rng(3).integers(0, 5000, 20000))
    runs = list(g.chunks(rank=10))  # 2²¹ / 100 = 20,971 keys a run: one run
    assert len(runs) == 1 and runs[0][1].keys.tolist() == g.keys.tolist()
    runs = list(g.chunks(rank=200))  # 52 keys a run, at least 64
    assert all(len(r.keys) == 64 for _, r in runs[:-1])
    assert np.concatenate([r.keys for _, r in runs]).tolist() == g.keys.tolist()
    assert [at.start for at, _ in runs] == list(range(0, len(g.keys), 64))


def test_a_table_whose_every_row_holds_statistics_pickles_them_as_they_are():
    """The explicit model's rows all hold statistics: the pickle carries the arrays without a
    row index (no gathered copy of them at a snapshot), and they come back bit for bit."""
    rng = np.random.default_rng(3)
    t = FactorTable(4)
    t.add_rows([f"k{j}" for j in range(50)], rng.normal(size=50).astype(np.float32),
               rng.normal(size=(50, 4)).astype(np.float32))
    t.gram[:] = rng.normal(size=(50, 4, 4)).astype(np.float32)
    t.moment[:] = rng.normal(size=(50, 4)).astype(np.float32)
    t.mass[:] = rng.uniform(1, 5, 50).astype(np.float32)
    t.mass[7] = -0.0  # still held: its gram and moment are not zero
    assert "stats_rows" not in t.__getstate__()
    back = pickle.loads(pickle.dumps(t, protocol=pickle.HIGHEST_PROTOCOL))
    for a, b_ in zip((back.gram, back.moment, back.mass, back.vec), (t.gram, t.moment, t.mass, t.vec), strict=True):
        assert a.shape == b_.shape and a.tobytes() == b_.tobytes()
    t.gram[9], t.moment[9], t.mass[9] = 0, 0, 0  # one row without: the index is back
    assert len(t.__getstate__()["stats_rows"]) == 49
