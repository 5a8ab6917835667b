"""The Redis layout contract, against a real redis-server."""

import json
import threading
import time

import numpy as np
import pytest

from common.keys import ITEMS, USERS
from common.snapshot import (
    Meta,
    Pointer,
    SnapshotChanged,
    collect_garbage,
    publish_version,
    read_all_factors,
    read_factors,
    read_meta,
    read_pointer,
    write_segment,
)

RANK = 3


def _meta(version, segments, **kw):
    return Meta(version=version, rank=RANK, mu=3.5, reg_param=0.05, n_users=2, n_items=3,
                ratings_seen=10 * version, created=time.time() - kw.pop("age", 0),
                segments=tuple(segments), offsets={"ratings:0": 5 * version}, **kw)


def _vec(x):
    return np.full((1, RANK), x, np.float32)


def test_versions_compose_from_segments_and_flip_atomically(redis_client, keys):
    assert read_pointer(redis_client, keys) is None
    write_segment(redis_client, keys, 1, USERS, ["u1", "u2"], np.array([0.1, 0.2]), np.ones((2, RANK)))
    write_segment(redis_client, keys, 1, ITEMS, ["a", "b", "c"], np.zeros(3), np.eye(3, RANK))
    publish_version(redis_client, keys, _meta(1, [1], popular=[("a", 3)]))
    # Version 2 changes only u2 and item b: a delta segment.
    write_segment(redis_client, keys, 2, USERS, ["u2"], np.array([0.5]), _vec(2.0))
    write_segment(redis_client, keys, 2, ITEMS, ["b"], np.array([-0.5]), _vec(7.0))
    # Before the flip, readers still see version 1 only.
    p = read_pointer(redis_client, keys)
    assert p == Pointer(1, (1,))
    assert read_factors(redis_client, keys, p, USERS, ["u2"], RANK)["u2"][0] == pytest.approx(0.2)
    publish_version(redis_client, keys, _meta(2, [1, 2]))
    p = read_pointer(redis_client, keys)
    assert p == Pointer(2, (1, 2))
    users = read_factors(redis_client, keys, p, USERS, ["u1", "u2", "ghost"], RANK)
    assert set(users) == {"u1", "u2"}
    assert users["u2"][0] == pytest.approx(0.5) and users["u2"][1].tolist() == [2.0] * RANK
    assert users["u1"][0] == pytest.approx(0.1)
    ids, biases, vectors = read_all_factors(redis_client, keys, p, ITEMS, RANK)
    assert sorted(ids) == ["a", "b", "c"]
    assert vectors[ids.index("b")].tolist() == [7.0] * RANK and biases[ids.index("b")] == -0.5
    meta = read_meta(redis_client, keys, 2)
    assert meta.ratings_seen == 20 and meta.offsets == {"ratings:0": 10} and meta.segments == (1, 2)
    # The documented layout is plain: a client that knows only keys.py can read it.
    raw = json.loads(redis_client.get(f"{keys.prefix}:current"))
    assert raw == {"version": 2, "segments": [1, 2]}
    blob = redis_client.hget(f"{keys.prefix}:seg:2:users", "u2")
    assert np.frombuffer(blob, "<f4").tolist() == [0.5, 2.0, 2.0, 2.0]


def test_publish_announces_on_pubsub(redis_url, redis_client, keys):
    import redis

    sub = redis.Redis.from_url(redis_url).pubsub()
    sub.subscribe(keys.events)
    assert sub.get_message(timeout=2)["type"] == "subscribe"
    write_segment(redis_client, keys, 1, ITEMS, ["a"], np.zeros(1), _vec(1.0))
    publish_version(redis_client, keys, _meta(1, [1]))
    msg = sub.get_message(timeout=2)
    assert msg["type"] == "message" and msg["data"] == b"1"
    sub.close()


def test_garbage_collection_bounds_memory_and_spares_live_segments(redis_client, keys):
    # Versions 1..6: full segment at 1 and 4, deltas otherwise; all old enough to collect.
    chains = {1: [1], 2: [1, 2], 3: [1, 2, 3], 4: [4], 5: [4, 5], 6: [4, 5, 6]}
    for v, chain in chains.items():
        write_segment(redis_client, keys, v, ITEMS, [f"i{v}"], np.zeros(1), _vec(v))
        publish_version(redis_client, keys, _meta(v, chain, age=60))
    deleted = collect_garbage(redis_client, keys, keep=3, min_age_s=5)
    assert deleted > 0
    remaining = {k.decode() for k in redis_client.scan_iter(f"{keys.prefix}:*")}
    assert f"{keys.prefix}:seg:4:items" in remaining  # base of the live chain
    assert f"{keys.prefix}:seg:1:items" not in remaining
    assert f"{keys.prefix}:ver:3" not in remaining and f"{keys.prefix}:ver:4" in remaining
    ids, _, _ = read_all_factors(redis_client, keys, read_pointer(redis_client, keys), ITEMS, RANK)
    assert sorted(ids) == ["i4", "i5", "i6"]
    # A reader holding a collected version's pointer is told to start over.
    with pytest.raises(SnapshotChanged):
        read_all_factors(redis_client, keys, Pointer(3, (1, 2, 3)), ITEMS, RANK)


def test_reader_never_sees_a_half_written_version(redis_url, keys):
    """Writer publishes versions whose every item vector equals the version number;
    concurrent readers must always get a uniform matrix."""
    import redis

    writer = redis.Redis.from_url(redis_url)
    items = [f"i{n}" for n in range(300)]
    write_segment(writer, keys, 1, ITEMS, items, np.zeros(300), np.full((300, RANK), 1.0))
    publish_version(writer, keys, _meta(1, [1]))
    stop = threading.Event()
    mixed: list[set] = []
    completed: list[int] = []  # version of every read that came back whole

    def read_loop():
        reader = redis.Redis.from_url(redis_url)
        while not stop.is_set():
            p = read_pointer(reader, keys)
            try:
                _, _, vec = read_all_factors(reader, keys, p, ITEMS, RANK)
            except SnapshotChanged:
                continue
            values = set(np.unique(vec).tolist())
            if values != {float(p.version)}:
                mixed.append(values)
            completed.append(p.version)

    def wait_for(cond, what: str) -> None:
        deadline = time.monotonic() + 20
        while not cond():
            assert time.monotonic() < deadline, what
            time.sleep(0.005)

    thread = threading.Thread(target=read_loop)
    thread.start()
    wait_for(lambda: completed, "the reader never completed a read")
    for v in range(2, 12):
        # Write in small chunks so a non-atomic reader would catch it half-way.
        for start in range(0, 300, 50):
            write_segment(writer, keys, v, ITEMS, items[start:start + 50], np.zeros(50), np.full((50, RANK), float(v)))
        publish_version(writer, keys, _meta(v, [v]))
        collect_garbage(writer, keys, keep=2, min_age_s=0)
        # Let the reader finish a read of this version, so reads overlap the writes of the next.
        wait_for(lambda v=v: completed and completed[-1] >= v, f"no complete read of version {v}")
    stop.set()
    thread.join()
    assert mixed == []
    # The check above means something only if reads really ran across the versions.
    assert set(range(2, 12)) <= set(completed)
