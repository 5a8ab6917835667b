"""The state server's chunked snapshot: a partition pickled in pieces and installed back from them."""

from __future__ import annotations

import pickle
import tempfile
import threading
from multiprocessing.connection import Listener

import numpy as np
import pytest

from modeler.spark import resident


def _whole(pid, part, msgs):
    return part


@pytest.fixture()
def server(tmp_path, monkeypatch):
    """A real state server on a Unix socket, in a thread of this process (so its chunk size
    can be made small)."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(resident, "CHUNK_BYTES", 64 << 10)
    app = "chunks-test"
    listener = Listener(resident.socket_path(app), family="AF_UNIX")
    srv = resident._Server()

    def accept() -> None:
        while True:
            try:
                conn = listener.accept()
            except OSError:
                return
            threading.Thread(target=srv.serve_connection, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    yield app, srv
    for conn in resident._conn.values():
        conn.close()
    resident._conn.clear()
    listener.close()


def _part():
    rng = np.random.default_rng(5)
    return {"vec": rng.normal(size=(3000, 24)).astype(np.float32),  # 288 KB: split in place
            "ids": [f"u{j}" for j in range(5000)], "scalar": 3.5,
            "empty": np.zeros((0, 4), np.float32), "strided": rng.normal(size=(40, 40))[:, ::3]}


def _same(a, b):
    assert sorted(a) == sorted(b)
    for k in a:
        if isinstance(a[k], np.ndarray):
            assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and a[k].tobytes() == b[k].tobytes()
        else:
            assert a[k] == b[k]


def test_a_dumped_partition_comes_in_bounded_chunks_and_installs_back_bit_for_bit(server):
    app, srv = server
    part = _part()
    resident.call(app, "install", "m", 0, 7, part, ())
    chunks = list(resident.dump(app, "m", 0, 7))
    assert len(chunks) > 5
    assert [c.seq for c in chunks] == list(range(len(chunks)))
    assert [c.last for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert all(0 < len(c.blob) <= resident.CHUNK_BYTES for c in chunks)
    assert pickle.loads(b"".join(c.blob for c in chunks))["scalar"] == 3.5
    answers = [resident.call(app, "install_chunk", "copy", 0, 9, c, ()) for c in chunks]
    assert answers == [False] * (len(chunks) - 1) + [True]
    assert not srv.pending
    _same(resident.call(app, "read", "copy", 0, 9, pickle.dumps(_whole), []), part)


def test_a_chunk_out_of_order_is_refused_and_a_first_chunk_starts_over(server):
    app, srv = server
    resident.call(app, "install", "m", 0, 1, _part(), ())
    chunks = list(resident.dump(app, "m", 0, 1))
    resident.call(app, "install_chunk", "copy", 0, 2, chunks[0], ())
    with pytest.raises(RuntimeError, match="out of order"):
        resident.call(app, "install_chunk", "copy", 0, 2, chunks[2], ())
    assert not srv.pending
    for c in chunks[:3]:  # a retried task: its first chunk starts the partition over
        resident.call(app, "install_chunk", "copy", 0, 2, c, ())
    for c in chunks:
        resident.call(app, "install_chunk", "copy", 0, 2, c, ())
    _same(resident.call(app, "read", "copy", 0, 2, pickle.dumps(_whole), []), _part())


def test_a_dump_left_half_read_does_not_spoil_the_next_call_and_a_missing_epoch_is_missing(server):
    app, _ = server
    resident.call(app, "install", "m", 0, 1, _part(), ())
    it = resident.dump(app, "m", 0, 1)
    next(it)
    it.close()  # the connection was mid-answer: dropped, the next call opens another
    assert resident.call(app, "has", "m", 0, 1) is True
    assert resident.dump(app, "m", 0, 2) is resident.MISSING
    assert len(list(resident.dump(app, "m", 0, 1))) > 5
