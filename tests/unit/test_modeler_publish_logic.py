"""Pure logic of the modeler's publishing: the incremental `popular` list, retry delays."""

from __future__ import annotations

import itertools
import random

from modeler.io.publish import backoff_delays, merge_popular


def _top(counts: dict[str, int], n: int) -> list[tuple[str, int]]:
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:n]


def test_incremental_popular_equals_recounting_everything():
    rng = random.Random(7)
    counts: dict[str, int] = {}
    popular: list[tuple[str, int]] = []
    for _ in range(200):
        # A batch rates some items; only their counts change (and only upwards).
        changed = {}
        for _ in range(rng.randrange(1, 30)):
            item = f"i{int(rng.paretovariate(1.2)) % 300}"
            counts[item] = counts.get(item, 0) + 1
            changed[item] = counts[item]
        popular = merge_popular(popular, changed.items(), 10)
        assert popular == _top(counts, 10)


def test_popular_is_most_rated_first_ties_by_id():
    assert merge_popular([("b", 5), ("a", 3)], [("c", 5), ("a", 6)], 3) == [("a", 6), ("b", 5), ("c", 5)]
    assert merge_popular([], [], 5) == []


def test_backoff_doubles_up_to_the_cap():
    assert list(itertools.islice(backoff_delays(0.5, 3.0), 6)) == [0.5, 1.0, 2.0, 3.0, 3.0, 3.0]
