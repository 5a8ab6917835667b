"""Factor vectors as float32 little-endian bytes; nothing here is ever pickled.

A *factor record* is ``[bias, f_1, ..., f_rank]`` packed as ``rank + 1`` little-endian
float32 values (``4 * (rank + 1)`` bytes). Users and items use the same record shape.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

DTYPE = np.dtype("<f4")


def encode_record(bias: float, vector: Sequence[float] | np.ndarray) -> bytes:
    out = np.empty(len(vector) + 1, dtype=DTYPE)
    out[0] = bias
    out[1:] = vector
    return out.tobytes()


def decode_record(data: bytes, rank: int | None = None) -> tuple[float, np.ndarray]:
    """Return ``(bias, vector)``; ``vector`` is a float32 array of length ``rank``."""
    if len(data) % 4 or len(data) < 4:
        raise ValueError(f"factor record of {len(data)} bytes is not a float32 array")
    arr = np.frombuffer(data, dtype=DTYPE)
    if rank is not None and arr.size != rank + 1:
        raise ValueError(f"factor record holds rank {arr.size - 1}, expected {rank}")
    return float(arr[0]), arr[1:]


def encode_matrix(biases: np.ndarray, vectors: np.ndarray) -> list[bytes]:
    """Encode many records at once: ``biases`` (n,), ``vectors`` (n, rank)."""
    block = np.empty((vectors.shape[0], vectors.shape[1] + 1), dtype=DTYPE)
    block[:, 0] = biases
    block[:, 1:] = vectors
    return [row.tobytes() for row in block]


def decode_matrix(records: Sequence[bytes], rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Decode records into ``(biases (n,), vectors (n, rank))`` float32 arrays."""
    width = 4 * (rank + 1)
    buf = b"".join(records)
    if len(buf) != width * len(records):
        raise ValueError(f"records are not all rank {rank}")
    block = np.frombuffer(buf, dtype=DTYPE).reshape(len(records), rank + 1)
    return block[:, 0].copy(), block[:, 1:].copy()
