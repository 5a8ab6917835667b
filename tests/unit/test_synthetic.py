"""The synthetic generators: the MovieLens-shaped ratings are unchanged, the ML-25M-shaped events have the shape."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from common.synthetic import generate, generate_events, make_ids, write_events
from modeler.batch import detect_input


def test_generate_output_is_unchanged_by_the_vectorised_sampler() -> None:
    # Digests of generate(200, 500, 8000, rank=4, seed=3) from the loop-and-set sampler it replaced.
    rows, movies = generate(200, 500, 8000, rank=4, seed=3)[:2]
    assert hashlib.sha256(repr(rows).encode()).hexdigest()[:16] == "19fc64d5603bee09"
    assert hashlib.sha256(repr(movies).encode()).hexdigest()[:16] == "e72153d41052eabd"


def test_events_have_lognormal_activity_zipf_popularity_and_distinct_pairs() -> None:
    e = generate_events(2000, 1500, 200_000, seed=7)
    assert 0.9 * 200_000 <= len(e) <= 200_000  # short only where a user hits the cap (half the items)
    per_user = np.bincount(e.users, minlength=2000)
    assert per_user.min() >= 20 and per_user.max() > 10 * np.median(per_user)  # heavy-tailed activity
    per_item = np.sort(np.bincount(e.items, minlength=1500))[::-1]
    assert per_item[:15].sum() > 0.1 * len(e)  # the top 1% of items: a tenth of all plays
    keys = e.users * 1500 + e.items
    assert len(np.unique(keys)) == len(e)
    assert np.all(np.diff(e.timestamps) > 0) and np.all(e.values >= 1) and e.implicit
    explicit = generate_events(300, 200, 10_000, implicit=False, seed=7)
    assert set(np.unique(explicit.values * 2)) <= set(range(1, 11))
    # Deterministic per seed.
    again = generate_events(2000, 1500, 200_000, seed=7)
    assert np.array_equal(again.items, e.items) and again.user_ids == e.user_ids


def test_planted_events_follow_the_planted_preference() -> None:
    e = generate_events(200, 300, 6000, rank=4, signal=5.0, seed=3)
    assert e.user_factors is not None and e.item_factors is not None
    chosen = np.einsum("ij,ij->i", e.user_factors[e.users], e.item_factors[e.items])
    random_items = np.random.default_rng(0).integers(0, 300, len(e))
    baseline = np.einsum("ij,ij->i", e.user_factors[e.users], e.item_factors[random_items])
    assert chosen.mean() > baseline.mean() + 0.3


def test_id_styles_and_the_writer(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    assert make_ids(3, "digits", rng) == ["1", "2", "3"]
    assert make_ids(3, "padded", rng, width=5) == ["00001", "00002", "00003"]
    uuids = make_ids(100, "uuid", rng)
    assert len(set(uuids)) == 100 and all(len(u) == 36 and u[14] == "4" for u in uuids)
    e = generate_events(50, 40, 1200, ids="uuid", seed=2)
    path = write_events(tmp_path / "events.tsv", e, sep="\t")
    lines = path.read_text().splitlines()
    assert lines[0] == "user\titem\tweight\ttimestamp" and len(lines) == len(e) + 1
    assert lines[1].split("\t")[0] in e.user_ids
    assert detect_input(path).kind == "event"
