"""The resident state store on real Spark: partitions held by the executors' state servers
give the same model as the cached-RDD layout, batch by batch, and a lost server is rebuilt
from the snapshot without learning any rating twice or losing one."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest

from common.synthetic import generate
from modeler.spark import resident
from modeler.spark.streaming_als import StreamingALS, row_blocks

pytestmark = pytest.mark.spark

BAD = [("u1", "i1", float("nan"), 1), ("", "i1", 3.0, 1)]


def _stream(n: int, seed: int = 17) -> list[tuple]:
    rows, _ = generate(n_users=90, n_items=120, n_ratings=n, rank=3, seed=seed)
    return [tuple(r) for r in rows]


def _model(store: str, partitions: int, interval: int = 3) -> StreamingALS:
    return StreamingALS(rank=4, iterations=2, reg_param=0.08, seed=5, num_partitions=partitions,
                        reservoir_size=300, ranking_rank=5, ranking_history=4,
                        checkpoint_interval=interval, state_store=store,
                        snapshot_chunk_bytes=2048)  # a snapshot of several records a partition


def _everything(model: StreamingALS) -> dict[str, dict]:
    def table(rdd):
        return {k: (b, np.asarray(v)) for k, (b, v) in rdd.collect()}

    return {
        "users": table(model.user_factors), "items": table(model.item_factors),
        "r_users": dict(model.ranking_user_factors.collect()),
        "r_items": dict(model.ranking_item_factors.collect()),
        "counts": dict(model.item_counts.collect()),
        "changed": sorted(k for k, _ in model.changed_users.collect()),
    }


def _same(a: dict, b: dict) -> None:
    for part in ("users", "items"):
        assert sorted(a[part]) == sorted(b[part])
        for k, (bias, vec) in a[part].items():
            assert bias == b[part][k][0], (part, k)
            np.testing.assert_array_equal(vec, b[part][k][1], err_msg=f"{part} {k}")
    for part in ("r_users", "r_items"):
        assert sorted(a[part]) == sorted(b[part])
        for k, vec in a[part].items():
            np.testing.assert_array_equal(vec, b[part][k], err_msg=f"{part} {k}")
    assert a["counts"] == b["counts"] and a["changed"] == b["changed"]


def _kill_state_server(sc) -> int:
    """SIGKILL this executor's state server, as a lost executor would lose it."""
    app = sc.applicationId
    pid = sc.parallelize([0], 1).map(lambda _: resident.server_pid(app)).collect()[0]
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        time.sleep(0.05)
    raise AssertionError("the state server did not die")


# (3 partitions: the lost-server test below also ends with resident == rdd bit for bit)
@pytest.mark.parametrize("partitions", [1])
def test_resident_partitions_give_the_cached_rdd_layouts_model_bit_for_bit(spark, partitions):
    sc = spark.sparkContext
    rows = _stream(1050)
    models = [_model("resident", partitions), _model("rdd", partitions)]
    for start in range(0, len(rows), 150):  # 7 batches: two snapshots on the way
        batch = rows[start:start + 150] + BAD
        stats = [m.train(sc.parallelize(batch, 2)) for m in models]
        assert stats[0].n_ratings == stats[1].n_ratings and stats[0].n_rejected == stats[1].n_rejected
        assert stats[0].prequential_sse == stats[1].prequential_sse
        assert stats[0].ranking_hits == stats[1].ranking_hits
    res, ref = models
    assert res.ratings_seen == ref.ratings_seen == 1050 and res.recoveries == 0
    np.testing.assert_array_equal(res.gram_users, ref.gram_users)
    _same(_everything(res), _everything(ref))
    # the state of a restore is read out of the servers the same way
    assert sorted(res.state().users.keys().collect()) == sorted(ref.state().users.keys().collect())


# Losses before the snapshot (after batch 3), just after it, and twice in a row; with 3
# partitions (the multi-stage plan: a read finds the loss, the job fails) the first only.
# deferred: the snapshot is taken after train() (snapshot_if_due, as the service does once
# the batch is published), not inside it; the kill at batch 3 then rebuilds from that snapshot.
@pytest.mark.parametrize(("partitions", "kills", "deferred"), [(1, (1, 3, 4), True), (3, (1,), False)])
def test_a_lost_state_server_is_rebuilt_and_no_rating_is_learned_twice_or_lost(spark, partitions, kills,
                                                                                deferred):
    sc = spark.sparkContext
    rows = _stream(750, seed=29)
    res, ref = _model("resident", partitions, interval=3), _model("rdd", partitions)
    res.snapshot_in_train = not deferred
    killed, snapshots = [], []
    for k, start in enumerate(range(0, len(rows), 150)):
        batch = rows[start:start + 150]
        if k in kills:
            killed.append(_kill_state_server(sc))
        res.train(sc.parallelize(batch, 2), sink=lambda u: len(u.batch_users))
        ref.train(sc.parallelize(batch, 2))
        if deferred:
            assert len(res._since) == (k + 1) - 3 * len(snapshots)  # train() took none
            if res.snapshot_if_due():
                snapshots.append(k)
            assert not res.snapshot_if_due()  # once due, once taken
        # the sink saw the batch once: the rebuilt batches since the snapshot are not re-sunk
        assert sum(x for x in res.last_sink_results if x) == len(batch)
    assert len(set(killed)) == len(kills)  # a new server each time
    assert snapshots == ([2] if deferred else [])  # every 3 batches: after the third
    assert res.recoveries == len(kills)
    assert res.ratings_seen == ref.ratings_seen == 750
    assert res.positives_seen == ref.positives_seen
    _same(_everything(res), _everything(ref))


def test_a_lost_server_between_batches_is_rebuilt_for_a_read_too(spark):
    sc = spark.sparkContext
    rows = _stream(600, seed=31)
    res, ref = _model("resident", 1), _model("rdd", 1)
    for start in range(0, len(rows), 150):
        for m in (res, ref):
            m.train(sc.parallelize(rows[start:start + 150], 2))
    _kill_state_server(sc)
    _same(_everything(res), _everything(ref))
    assert res.recoveries == 1


@pytest.mark.parametrize("partitions", [1, 3])
def test_a_restore_built_in_the_state_server_from_pieces_equals_the_cached_rdd_layouts(spark, partitions):
    """The restored partitions are built where they live, from pieces of rows (here ~20 rows
    a piece, so every partition takes several): the same model as the cached-RDD layout's
    restore (one piece a partition, from RowBlocks rather than a tuple per row), and the
    pieces rebuild a server lost before the first snapshot."""
    sc = spark.sparkContext
    rows = _stream(900, seed=37)
    trained = _model("rdd", partitions)
    for start in range(0, 450, 150):
        trained.train(sc.parallelize(rows[start:start + 150], 2))
    state = trained.state()

    def collected(rdd, blocks: bool):
        rows = [(k, (b, np.asarray(v, np.float32), c)) for k, (b, v, c) in rdd.collect()]
        if blocks:  # as the service restores: RowBlocks of up to 16 rows
            return sc.parallelize(row_blocks([r[0] for r in rows], np.asarray([r[1][0] for r in rows]),
                                             np.asarray([r[1][1] for r in rows]), [r[1][2] for r in rows],
                                             size=16), 2)
        return sc.parallelize(rows, 2)

    def restored(store: str, chunk: int, blocks: bool) -> StreamingALS:
        return StreamingALS.restore(
            sc, collected(state.users, blocks), collected(state.items, blocks), state.mu, state.ratings_seen,
            state.extra, ranking_user_rdd=collected(state.ranking_users, blocks),
            ranking_item_rdd=collected(state.ranking_items, blocks), state_store=store, snapshot_chunk_bytes=chunk)

    res, ref = restored("resident", 2048, False), restored("rdd", 1 << 30, True)
    np.testing.assert_array_equal(res.gram_items, ref.gram_items)
    np.testing.assert_allclose(res.gram_items, trained.gram_items, atol=1e-9)  # recomputed from the rows
    _same(_everything(res), _everything(ref))
    for k, start in enumerate(range(450, 900, 150)):
        if k == 1:  # before the first snapshot: rebuilt from the restore's pieces
            _kill_state_server(sc)
        batch = sc.parallelize(rows[start:start + 150], 2)
        a, b = res.train(batch), ref.train(batch)
        assert a.prequential_sse == b.prequential_sse and a.ranking_hits == b.ranking_hits
    assert res.recoveries == 1 and res.ratings_seen == ref.ratings_seen == 900
    np.testing.assert_array_equal(res.gram_users, ref.gram_users)
    _same(_everything(res), _everything(ref))


def test_a_released_model_leaves_the_state_server(spark):
    sc = spark.sparkContext
    model = _model("resident", 1)
    model.train(sc.parallelize(_stream(300, seed=5), 2))
    key, epoch = model._key, model._epoch
    app = sc.applicationId
    held = sc.parallelize([0], 1).map(lambda _: resident.call(app, "has", key, 0, epoch)).collect()[0]
    assert held is True  # it was there before the release
    model.release()
    other = _model("resident", 1)  # its first step carries the drop
    other.train(sc.parallelize(_stream(300, seed=6), 2))
    held = sc.parallelize([0], 1).map(lambda _: resident.call(app, "has", key, 0, epoch)).collect()[0]
    assert held is False


def test_an_unknown_state_store_is_refused():
    with pytest.raises(ValueError, match="state_store"):
        StreamingALS(state_store="redis")
