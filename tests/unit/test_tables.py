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
