"""The batch job's driver-free parts: input detection, the blocked top-k maths, NDCG, staging."""

from __future__ import annotations

import gzip
import re
from pathlib import Path

import numpy as np
import pytest

from common.errors import DatasetError
from modeler.batch import (
    ItemBlock,
    Staging,
    _item_blocks,
    _user_blocks,
    block_top_k,
    detect_input,
    finish_top_k,
    grid_table,
    merge_top_k,
    ndcg_of,
)


def _write(path: Path, text: str, gz: bool = False) -> Path:
    data = text.encode()
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


@pytest.mark.parametrize(("text", "sep", "kind", "header"), [
    ("userId,movieId,rating,timestamp\r\n1,1,4.0,964982703\r\n", ",", "rating", True),
    ("196\t242\t3\t881250949\n", "\t", "rating", False),
    ("6039::669::4::956703932\n", "::", "rating", False),
    ("userID\tartistID\tweight\n2\t51\t13883\n", "\t", "event", True),
    ("user,item,plays\nabc,0042,3\n", ",", "event", True),
])
def test_detect_input_knows_the_formats(tmp_path: Path, text: str, sep: str, kind: str, header: bool) -> None:
    spec = detect_input(_write(tmp_path / "f", text))
    assert (spec.fmt, spec.sep, spec.kind, bool(spec.header)) == ("text", sep, kind, header)


def test_detect_input_reads_gzip_and_part_directories(tmp_path: Path) -> None:
    assert detect_input(_write(tmp_path / "r.gz", "1::2::3::4\n", gz=True)).sep == "::"
    parts = tmp_path / "parts"
    parts.mkdir()
    _write(parts / "_SUCCESS", "")
    _write(parts / "part-00000.csv", "")  # Spark writes empty parts for empty partitions
    _write(parts / "part-00001.csv", "user,item,weight\nu,i,1\n")
    spec = detect_input(parts)
    assert spec.kind == "event" and spec.header == "user,item,weight" and len(spec.files) == 2
    _write(tmp_path / "p.parquet", "PAR1....")
    assert detect_input(tmp_path / "p.parquet").fmt == "parquet"


@pytest.mark.parametrize(("text", "message"), [
    ("", "empty file"),
    ("just words\n", ":1: unknown format (no ','"),
    ("a,b\n", ":1: unknown format: expected user,item,value"),
    ("user,item,colour\n", "third column 'colour'"),
])
def test_detect_input_names_the_file_of_bad_input(tmp_path: Path, text: str, message: str) -> None:
    path = _write(tmp_path / "bad.csv", text)
    with pytest.raises(DatasetError, match=re.escape(message)) as info:
        detect_input(path)
    assert str(path) in str(info.value)
    with pytest.raises(DatasetError, match="no such file"):
        detect_input(tmp_path / "missing")


def _brute_top_k(u: np.ndarray, v: np.ndarray, excluded: list[set[int]], k: int) -> list[list[int]]:
    scores = u @ v.T
    out = []
    for j, ex in enumerate(excluded):
        order = [int(c) for c in np.lexsort((np.arange(len(v)), -scores[j])) if int(c) not in ex]
        out.append(order[:k])
    return out


@pytest.mark.parametrize(("n_items", "item_block", "k"), [(50, 7, 5), (30, 64, 10), (12, 5, 10)])
def test_blocked_top_k_equals_the_brute_force_product(n_items: int, item_block: int, k: int) -> None:
    rng = np.random.default_rng(n_items)
    n_users, rank = 23, 4
    u = rng.normal(size=(n_users, rank)).astype(np.float32)
    v = rng.normal(size=(n_items, rank)).astype(np.float32)
    excluded = [set(rng.choice(n_items, int(rng.integers(0, n_items // 2)), replace=False).tolist())
                for _ in range(n_users)]
    excluded[0] = set(range(n_items - 3))  # fewer than k candidates left for this one
    users = list(_user_blocks(((j, u[j].tolist(), sorted(excluded[j]) or None) for j in range(n_users)), 8))
    items = list(_item_blocks(((i, v[i].tolist()) for i in rng.permutation(n_items).tolist()), item_block))
    got: dict[int, list[int]] = {}
    for _, ub in users:
        acc = None
        for ib in items:
            part = block_top_k(ub, ib, k, n_items)
            acc = part if acc is None else merge_top_k(acc, part)
        assert acc is not None
        for uid, its, scores in finish_top_k(acc):
            got[uid] = its.tolist()
            assert np.all(np.diff(scores) <= 0)
    want = _brute_top_k(u, v, excluded, k)
    assert [got[j] for j in range(n_users)] == want
    assert len(got[0]) == 3


def test_cosine_blocks_normalise_the_vectors() -> None:
    rows = [(0, [3.0, 4.0]), (1, [0.0, 2.0])]
    (block,) = list(_item_blocks(rows, 10, normalise=True))
    np.testing.assert_allclose(np.linalg.norm(block.vectors, axis=1), 1.0, rtol=1e-6)
    (_, ub), = list(_user_blocks([(0, [3.0, 4.0], [0])], 10, normalise=True))
    top = block_top_k(ub, ItemBlock(block.ids, block.vectors), 1, 2)
    assert top.items.tolist() == [[1]] and top.scores[0, 0] == pytest.approx(0.8)


def test_ndcg_of_a_ranked_list() -> None:
    # One hit at position 2 of 2 relevant: (1/log2 3) / (1 + 1/log2 3).
    assert ndcg_of([5, 7, 9], {7, 11}, 10) == pytest.approx((1 / np.log2(3)) / (1 + 1 / np.log2(3)))
    assert ndcg_of([7, 11], {7, 11}, 10) == pytest.approx(1.0)
    assert ndcg_of([1, 2], {3}, 10) == 0.0
    assert ndcg_of([1, 2, 3], {3}, 2) == 0.0  # beyond k does not count


def test_staging_replaces_the_output_only_on_commit(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("previous run")
    with Staging(str(out)) as stage:
        (stage.path / "new.txt").write_text("this run")
        assert stage.path.parent == tmp_path and stage.path.name.startswith(".out.tmp-")
    # Without commit: the previous output untouched, no staging directory left.
    assert (out / "old.txt").exists() and [p.name for p in tmp_path.iterdir()] == ["out"]
    with Staging(str(out)) as stage:
        (stage.path / "new.txt").write_text("this run")
        stage.commit()
    assert [p.name for p in out.iterdir()] == ["new.txt"] and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_grid_table_lists_best_first() -> None:
    grid = [{"rank": 10, "reg_param": 0.1, "alpha": 1.0, "metric": "ndcg@10", "score": 0.2, "seconds": 3.0},
            {"rank": 50, "reg_param": 0.1, "alpha": 1.0, "metric": "ndcg@10", "score": 0.3, "seconds": 9.0}]
    lines = grid_table({"grid": grid}).splitlines()
    assert lines[0].startswith("| rank | regParam | alpha | validation ndcg@10")
    assert lines[2].startswith("| 50 |") and lines[3].startswith("| 10 |")

