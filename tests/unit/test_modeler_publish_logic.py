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


def test_one_retry_delay_for_every_caller():
    from modeler.io.publish import backoff

    assert [backoff(a, 3.0) for a in range(6)] == [0.5, 1.0, 2.0, 3.0, 3.0, 3.0]
    assert backoff(-1) == 0.5 and backoff(10_000, 10.0) == 10.0  # no overflow on a long outage


def test_full_or_delta_is_one_rule():
    from modeler.io.publish import PublishPlan, SegmentSink, segment_is_full

    # A delta only while Redis holds our chain, below the cap, with nothing forcing a full one.
    assert not segment_is_full(False, True, 3, 8)
    assert segment_is_full(True, True, 3, 8)  # first version / after a restore request
    assert segment_is_full(False, False, 3, 8)  # Redis lost our chain
    assert segment_is_full(False, True, 8, 8)  # the chain is at its cap
    assert segment_is_full(False, True, 3, 8, switched=True)  # a search's leader switched
    # At the cap, with a share: full once the deltas hold that share of the full's records.
    assert not segment_is_full(False, True, 8, 8, delta_records=499, full_records=1000, share=0.5)
    assert segment_is_full(False, True, 8, 8, delta_records=500, full_records=1000, share=0.5)
    assert not segment_is_full(False, True, 7, 8, delta_records=5000, full_records=1000, share=0.5)
    assert segment_is_full(False, True, 64, 8, delta_records=1, full_records=1000, share=0.5)  # hard cap
    assert segment_is_full(False, True, 8, 8, delta_records=0, full_records=0, share=1.0)  # after a restore
    plan = PublishPlan(7, False, SegmentSink("redis://x", "p", 7, False))
    retry = plan.without_sink()
    assert (retry.version, retry.full, retry.sink) == (7, False, None)
    assert PublishPlan(7) == (7, None, None)  # undecided: the publish decides
