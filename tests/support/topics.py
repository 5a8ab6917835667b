"""Reading a topic partition back in tests (dead letters, what was produced): one helper."""

from __future__ import annotations

import time
from typing import Any

from kafka import KafkaConsumer, TopicPartition


def read_records(bootstrap: str, topic: str, n: int, partition: int = 0, start: int = 0,
                 timeout_s: float = 20.0) -> list[Any]:
    """The records of ``topic``/``partition`` from ``start`` until ``n`` have arrived or
    ``timeout_s`` has passed (kafka-python ``ConsumerRecord``\\ s, in offset order); the caller
    asserts how many it got."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    try:
        tp = TopicPartition(topic, partition)
        consumer.assign([tp])
        consumer.seek(tp, start)
        got: list[Any] = []
        deadline = time.monotonic() + timeout_s
        while len(got) < n and time.monotonic() < deadline:
            for recs in consumer.poll(timeout_ms=200).values():
                got.extend(recs)
        return got
    finally:
        consumer.close()


def consume_all(bootstrap: str, topic: str, idle_ms: int = 1500) -> list:
    """Every message of ``topic``, read from the start until ``idle_ms`` pass without one."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                             auto_offset_reset="earliest", consumer_timeout_ms=idle_ms)
    try:
        parts = consumer.partitions_for_topic(topic) or set()
        consumer.assign([TopicPartition(topic, p) for p in sorted(parts)])
        consumer.seek_to_beginning()
        return list(consumer)
    finally:
        consumer.close()
