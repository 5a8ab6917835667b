"""Kafka -> RDD, the way Spark's direct Kafka stream does it, with kafka-python: one import.

The driver plans each micro-batch as one *range* per topic partition (start offset and a
record cap); executors read their range, validate each message where it was read, send bad
ones to the dead-letter topic, and report the offsets they reached. The source is split by
topic, and this module re-exports the names the service, the commands and the tests use:

- :mod:`modeler.io.kafka_parse`: message bytes -> event row (fast path, then the schema);
- :mod:`modeler.io.kafka_plan`: offset ranges of a batch, the version's offsets JSON;
- :mod:`modeler.io.kafka_read`: executor-side reading into columnar blocks, and their RDD;
- :mod:`modeler.io.kafka_admin`: topic creation and metadata on the driver;
- :mod:`modeler.io.kafka_fetch`: the raw Fetch client and record decoder the reader uses.
"""

from __future__ import annotations

from modeler.io.kafka_admin import KafkaUnavailable, TopicAdmin
from modeler.io.kafka_parse import DEFAULT_MAX_WEIGHT, MAX_ID_LENGTH, fast_parse, parse_message
from modeler.io.kafka_plan import OffsetRange, allocate_caps, offsets_for_topic, offsets_key, plan_batch
from modeler.io.kafka_read import (
    Block,
    BlockSummary,
    batch_blocks,
    read_range,
    read_range_chunks,
    read_ranges,
)

__all__ = [
    "DEFAULT_MAX_WEIGHT",
    "MAX_ID_LENGTH",
    "Block",
    "BlockSummary",
    "KafkaUnavailable",
    "OffsetRange",
    "TopicAdmin",
    "allocate_caps",
    "batch_blocks",
    "fast_parse",
    "offsets_for_topic",
    "offsets_key",
    "parse_message",
    "plan_batch",
    "read_range",
    "read_range_chunks",
    "read_ranges",
]
