"""Stable hashing for the streaming models: partitions, initial factors, replay priorities.

Every random-looking choice of the models (the partition of a key, a newcomer's initial
vector, a rating's replay priority) is a pure function of the id strings and the seed:
``zlib.crc32`` mixed by splitmix64, never Python's salted ``hash``. So the same seed and
batches give the same model on any machine and in any partition layout. numpy only.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MASK32 = np.uint64(0xFFFFFFFF)


def stable_hash(key: str) -> int:
    """A 32-bit hash of an id that is the same in every process (unlike ``hash()``)."""
    return zlib.crc32(key.encode("utf-8"))


def partition_of(key: str, num_partitions: int) -> int:
    """The partition a user or item id lives in, for every RDD of the model."""
    return zlib.crc32(key.encode("utf-8")) % num_partitions


def id_list(keys: Sequence[str]) -> Sequence[str]:
    """``keys`` as a list when it is a numpy array (iterating one makes a numpy scalar per
    id, twice the cost of a list's str), else as it is."""
    return keys.tolist() if isinstance(keys, np.ndarray) else keys


def hash_ids(keys: Sequence[str]) -> np.ndarray:
    """:func:`stable_hash` of many ids as a uint64 array."""
    ks = id_list(keys)
    # str.encode's default is UTF-8, as stable_hash's; map() runs without a Python frame per id.
    return np.fromiter(map(zlib.crc32, map(str.encode, ks)), dtype=np.uint64, count=len(ks))


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser, vectorised: a well-mixed uint64 from any uint64 (wraps mod 2^64)."""
    with np.errstate(over="ignore"):
        z = x.astype(np.uint64) + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _seeded(h: np.ndarray, seed: int, salt: int) -> np.ndarray:
    with np.errstate(over="ignore"):
        base = splitmix64(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64) + np.uint64(salt))
        return splitmix64(h.astype(np.uint64) ^ base)


def init_factors(ids: Sequence[str], rank: int, seed: int, init_scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Initial ``(bias (n,), vectors (n, rank))`` float32 for newcomers.

    Bias 0 (a newcomer is average until its ratings say otherwise). Vector entries uniform on
    [−a, a] with a = init_scale·√3 (standard deviation ``init_scale``), drawn from
    splitmix64(hash(seed, id), j): a pure function of (seed, id), whatever the partition or order.
    """
    n = len(ids)
    bias = np.zeros(n, dtype=np.float32)
    if n == 0:
        return bias, np.zeros((0, rank), dtype=np.float32)
    h = _seeded(hash_ids(ids), seed, 1)
    with np.errstate(over="ignore"):
        z = splitmix64(h[:, None] + np.arange(1, rank + 1, dtype=np.uint64)[None, :] * _GOLDEN)
    unit = (z >> np.uint64(11)).astype(np.float64) * (1.0 / 9007199254740992.0)  # [0, 1)
    vec = ((2.0 * unit - 1.0) * (init_scale * math.sqrt(3.0))).astype(np.float32)
    return bias, vec


def rating_priority(users: Sequence[str], items: Sequence[str], timestamps: np.ndarray, seed: int) -> np.ndarray:
    """A uniform-looking uint64 per rating, a pure function of (seed, user, item, timestamp).

    The reservoir keeps the ratings of smallest priority ("bottom-k"), which is a uniform
    sample of everything seen, independent of arrival order and partitioning.
    """
    hu = _seeded(hash_ids(users), seed, 2)
    hi = _seeded(hash_ids(items), seed, 3)
    with np.errstate(over="ignore"):
        return splitmix64(hu ^ splitmix64(hi ^ np.asarray(timestamps, dtype=np.int64).astype(np.uint64)))


def replay_mask(priority: np.ndarray, batch_no: int, fraction: float) -> np.ndarray:
    """Which reservoir entries are replayed in batch ``batch_no``: a fresh ~``fraction`` each batch."""
    if fraction >= 1.0:
        return np.ones(priority.shape, dtype=bool)
    if fraction <= 0.0:
        return np.zeros(priority.shape, dtype=bool)
    # A second hash of (priority, batch): independent of the bottom-k selection itself.
    with np.errstate(over="ignore"):
        z = splitmix64(priority ^ (np.uint64(batch_no) * _GOLDEN)) & _MASK32
    return z < np.uint64(int(fraction * 4294967296.0))
