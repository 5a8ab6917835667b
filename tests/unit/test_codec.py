import numpy as np
import pytest

from common.codec import decode_matrix, decode_record, encode_matrix, encode_record


def test_record_is_float32_little_endian_bias_first():
    data = encode_record(0.25, [1.0, -2.0])
    assert data == np.array([0.25, 1.0, -2.0], dtype="<f4").tobytes()
    bias, vec = decode_record(data, rank=2)
    assert bias == 0.25 and vec.dtype == np.float32 and vec.tolist() == [1.0, -2.0]


def test_matrix_roundtrip():
    rng = np.random.default_rng(0)
    biases, vectors = rng.normal(size=5).astype(np.float32), rng.normal(size=(5, 3)).astype(np.float32)
    b2, v2 = decode_matrix(encode_matrix(biases, vectors), 3)
    np.testing.assert_array_equal(b2, biases)
    np.testing.assert_array_equal(v2, vectors)


def test_wrong_sizes_are_rejected():
    with pytest.raises(ValueError, match="rank 2, expected 3"):
        decode_record(encode_record(0.0, [1.0, 2.0]), rank=3)
    with pytest.raises(ValueError, match="not a float32 array"):
        decode_record(b"abc")
    with pytest.raises(ValueError, match="not all rank 3"):
        decode_matrix([encode_record(0.0, [1.0, 2.0, 3.0]), encode_record(0.0, [1.0])], 3)
