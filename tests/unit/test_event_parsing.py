"""Implicit events on the Kafka decode path (modeler.io.kafka_source): fast path and schema agree."""

from __future__ import annotations

import json

import pytest

from common.schema import InvalidRating, RatingScale, parse_event
from modeler.io.kafka_source import Block, fast_parse, parse_message

GOOD = [
    {"user": "u1", "item": "a9", "type": "play", "weight": 12, "timestamp": 978300760},
    {"user": 7, "item": 3, "type": "click", "timestamp": 5},  # weight defaults to 1
    {"user": " u ", "item": "i", "type": "view", "weight": 0.0, "timestamp": 0},
    {"user": "u", "item": "i", "type": "play", "weight": 1e6, "timestamp": 1},
]
BAD = [
    ({"user": "u", "item": "i", "type": "play", "weight": -1, "timestamp": 1}, "weight"),
    ({"user": "u", "item": "i", "type": "play", "weight": 1e6 + 1, "timestamp": 1}, "weight"),
    ({"user": "u", "item": "i", "type": "play", "weight": "3", "timestamp": 1}, "weight"),
    ({"user": "u", "item": "i", "type": "play", "rating": 4, "timestamp": 1}, "rating"),
    ({"user": "u", "item": "i", "type": "Play!", "weight": 1, "timestamp": 1}, "type"),
    ({"user": "u", "item": "i", "rating": 4.0, "weight": 2, "timestamp": 1}, "weight"),
]


@pytest.mark.parametrize("message", GOOD)
def test_fast_path_and_schema_agree_on_valid_implicit_events(message):
    raw = json.dumps(message).encode()
    e = parse_event(raw)
    row, reason = parse_message(raw, 0.5, 5.0)
    assert reason == "" and row == (e.user, e.item, None, e.timestamp, e.weight)
    assert fast_parse(raw, 0.5, 5.0) == row


@pytest.mark.parametrize(("message", "field"), BAD)
def test_bad_weights_are_refused_with_the_schemas_reason(message, field):
    raw = json.dumps(message).encode()
    assert fast_parse(raw, 0.5, 5.0) is None
    row, reason = parse_message(raw, 0.5, 5.0)
    with pytest.raises(InvalidRating) as info:
        parse_event(raw, RatingScale())
    assert row is None and reason == info.value.reason and reason.startswith(field)


def test_nan_weights_and_the_configured_cap_are_refused():
    raw = b'{"user": "u", "item": "i", "type": "play", "weight": NaN, "timestamp": 1}'
    row, reason = parse_message(raw, 0.5, 5.0)
    assert row is None and reason
    raw = json.dumps({"user": "u", "item": "i", "type": "play", "weight": 50, "timestamp": 1}).encode()
    assert parse_message(raw, 0.5, 5.0, max_weight=100)[0] is not None
    row, reason = parse_message(raw, 0.5, 5.0, max_weight=10)
    assert row is None and reason.startswith("weight") and "EVENT_MAX_WEIGHT" in reason


def test_a_block_yields_ratings_then_implicit_events_as_model_records():
    block = Block(0, 0, 2, 2, ["a"], ["x"], [4.0], [1], i_users=["b"], i_items=["y"],
                  i_weights=[3.0], i_timestamps=[2])
    assert list(block.rows()) == [("a", "x", 4.0, 1), ("b", "y", None, 2, 3.0)]
    assert block.summary().n_valid == 2 and block.summary().n_implicit == 1
