"""Offset planning and message validation of the modeler's Kafka source (no services)."""

from __future__ import annotations

import json
import math

import pytest

from common.schema import InvalidRating, RatingScale, parse_rating
from modeler.io.kafka_source import (
    allocate_caps,
    fast_parse,
    offsets_for_topic,
    offsets_key,
    parse_message,
    plan_batch,
)


def test_caps_split_equally_without_backlog_knowledge():
    caps = allocate_caps({0: None, 1: None, 2: None, 3: None}, 1000)
    assert caps == {0: 250, 1: 250, 2: 250, 3: 250}


def test_caps_follow_known_backlog_and_share_the_rest():
    caps = allocate_caps({0: 900, 1: 0, 2: 10, 3: 0}, 1000)
    assert sum(caps.values()) == 1000
    # The busy partition gets its whole backlog; the idle ones still get a share for
    # records that arrived since the last batch.
    assert caps[0] >= 900
    assert caps[2] >= 10
    assert min(caps.values()) >= 1


def test_caps_never_exceed_the_batch_and_every_partition_reads():
    caps = allocate_caps({p: 10_000 for p in range(8)}, 100)
    assert sum(caps.values()) == 100
    assert all(c >= 12 for c in caps.values())
    tiny = allocate_caps({0: 50, 1: 50, 2: 50}, 2)
    assert sum(tiny.values()) == 3 and min(tiny.values()) == 1


def test_plan_batch_starts_at_next_offsets():
    ranges = plan_batch("r", {0: 5, 1: 17}, {0: None, 1: 3}, 100)
    assert [(r.partition, r.start) for r in ranges] == [(0, 5), (1, 17)]
    assert sum(r.cap for r in ranges) == 100
    assert all(r.topic == "r" for r in ranges)


def test_offsets_round_trip_through_version_keys():
    stored = {offsets_key("ratings", 0): 10, offsets_key("ratings", 3): 7, offsets_key("other", 0): 99}
    assert offsets_for_topic(stored, "ratings") == {0: 10, 3: 7}
    # Topic names may contain dots and colons are split from the right.
    assert offsets_for_topic({offsets_key("a:b.c", 2): 4}, "a:b.c") == {2: 4}


GOOD = [
    {"user": "42", "item": "1193", "rating": 4.5, "timestamp": 978300760},
    {"user": 42, "item": 1193, "rating": 4, "timestamp": 0},
    {"user": "  u1 ", "item": "i", "rating": 0.5, "timestamp": 1, "extra": [1, 2]},
    {"user": "x" * 128, "item": "y", "rating": 5.0, "timestamp": 3},
]
BAD = [
    b"not json",
    b"[1, 2, 3]",
    b"",
    json.dumps({"user": "1", "item": "2"}).encode(),
    json.dumps({"user": "1", "item": "2", "rating": 7.0, "timestamp": 1}).encode(),
    json.dumps({"user": "", "item": "2", "rating": 3.0, "timestamp": 1}).encode(),
    json.dumps({"user": "   ", "item": "2", "rating": 3.0, "timestamp": 1}).encode(),
    json.dumps({"user": "1", "item": "2", "rating": "3", "timestamp": 1}).encode(),
    json.dumps({"user": "1", "item": "2", "rating": True, "timestamp": 1}).encode(),
    json.dumps({"user": True, "item": "2", "rating": 3.0, "timestamp": 1}).encode(),
    json.dumps({"user": "x" * 129, "item": "2", "rating": 3.0, "timestamp": 1}).encode(),
    json.dumps({"user": "1", "item": "2", "rating": 3.0, "timestamp": -5}).encode(),
    b'{"user": "1", "item": "2", "rating": NaN, "timestamp": 1}',
    b'{"user": "1", "item": "2", "rating": Infinity, "timestamp": 1}',
]


@pytest.mark.parametrize("message", GOOD)
def test_fast_path_agrees_with_the_schema_on_valid_messages(message):
    raw = json.dumps(message).encode()
    expected = parse_rating(raw)
    row, reason = parse_message(raw, 0.5, 5.0)
    assert reason == ""
    assert row == (expected.user, expected.item, float(expected.rating), expected.timestamp)
    assert fast_parse(raw, 0.5, 5.0) == row


@pytest.mark.parametrize("raw", BAD)
def test_invalid_messages_are_rejected_with_the_schemas_reason(raw):
    assert fast_parse(raw, 0.5, 5.0) is None
    row, reason = parse_message(raw, 0.5, 5.0)
    assert row is None and reason
    with pytest.raises(InvalidRating) as info:
        parse_rating(raw, RatingScale())
    assert reason == info.value.reason


def test_unusual_but_valid_messages_defer_to_the_schema():
    # A timestamp given as a string is accepted by the schema (lax int), not by the fast path.
    raw = json.dumps({"user": "1", "item": "2", "rating": 3.0, "timestamp": "17"}).encode()
    assert fast_parse(raw, 0.5, 5.0) is None
    row, reason = parse_message(raw, 0.5, 5.0)
    assert reason == "" and row == ("1", "2", 3.0, 17)
    # A missing timestamp is filled in with the time of parsing.
    row, _ = parse_message(json.dumps({"user": "1", "item": "2", "rating": 1.0}).encode(), 0.5, 5.0)
    assert row is not None and row[3] > 1_600_000_000


def test_scale_is_applied():
    raw = json.dumps({"user": "1", "item": "2", "rating": 9.0, "timestamp": 1}).encode()
    assert parse_message(raw, 1.0, 10.0)[0] == ("1", "2", 9.0, 1)
    row, reason = parse_message(raw, 0.5, 5.0)
    assert row is None and reason.startswith("rating")
    assert parse_message(None, 0.5, 5.0)[0] is None
    assert not math.isnan(fast_parse(json.dumps(GOOD[0]).encode(), 0.5, 5.0)[2])
