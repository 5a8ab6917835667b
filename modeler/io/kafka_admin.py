"""Kafka metadata and topic creation on the driver; never reads records."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterable, Mapping
from typing import Any

from common.errors import InfraUnavailable

log = logging.getLogger(__name__)


def create_missing(admin: Any, wanted: Mapping[str, int]) -> list[str]:
    """Create the topics of ``wanted`` (name -> partitions, replication 1) that ``admin`` (a
    kafka-python ``KafkaAdminClient``) does not list yet; returns the names created."""
    from kafka.admin import NewTopic
    from kafka.errors import TopicAlreadyExistsError

    existing = set(admin.list_topics())
    new = [NewTopic(t, n, 1) for t, n in wanted.items() if t not in existing]
    if new:
        with contextlib.suppress(TopicAlreadyExistsError):  # another process was first
            admin.create_topics(new)
    return [t.name for t in new]


class KafkaUnavailable(InfraUnavailable, RuntimeError):
    """The broker cannot be reached or the topic metadata is missing; retry later."""


class TopicAdmin:
    """Driver-side metadata only (partitions, beginning offsets); never reads records."""

    def __init__(self, bootstrap: str, topic: str, dlq_topic: str, partitions: int = 4) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.dlq_topic = dlq_topic
        self.n_partitions = partitions
        self._consumer: Any = None

    def _client(self) -> Any:
        if self._consumer is None:
            from kafka import KafkaConsumer
            from kafka.errors import KafkaError

            try:
                self._consumer = KafkaConsumer(
                    bootstrap_servers=self.bootstrap.split(","),
                    group_id=None,
                    enable_auto_commit=False,
                    request_timeout_ms=15000,
                    client_id="streamrec-modeler-planner",
                )
            except KafkaError as exc:
                raise KafkaUnavailable(f"broker {self.bootstrap} unreachable: {exc}") from exc
        return self._consumer

    def ensure_topics(self) -> None:
        """Create the ratings and dead-letter topics if they do not exist."""
        from kafka.admin import KafkaAdminClient
        from kafka.errors import KafkaError

        wanted = {self.topic: self.n_partitions, self.dlq_topic: 1}
        try:
            admin = KafkaAdminClient(
                bootstrap_servers=self.bootstrap.split(","), request_timeout_ms=10000
            )
        except KafkaError as exc:
            raise KafkaUnavailable(f"broker {self.bootstrap} unreachable: {exc}") from exc
        try:
            created = create_missing(admin, wanted)
            if created:
                log.info("created topics %s", created)
        except KafkaError as exc:
            raise KafkaUnavailable(f"cannot create topics on {self.bootstrap}: {exc}") from exc
        finally:
            admin.close()

    def partitions(self) -> list[int]:
        from kafka.errors import KafkaError

        try:
            client = self._client()
            deadline = time.monotonic() + 10
            while True:
                parts = client.partitions_for_topic(self.topic)
                if parts:
                    return sorted(parts)
                if time.monotonic() > deadline:
                    raise KafkaUnavailable(f"topic {self.topic!r} has no partitions")
                with contextlib.suppress(Exception):
                    client.topics()  # forces a metadata refresh
                time.sleep(0.2)
        except KafkaError as exc:
            self.close()
            raise KafkaUnavailable(f"metadata of {self.topic!r} unavailable: {exc}") from exc

    def beginning_offsets(self, partitions: Iterable[int]) -> dict[int, int]:
        from kafka import TopicPartition
        from kafka.errors import KafkaError

        tps = [TopicPartition(self.topic, p) for p in partitions]
        if not tps:
            return {}
        try:
            got = self._client().beginning_offsets(tps)
        except KafkaError as exc:
            self.close()
            raise KafkaUnavailable(f"beginning offsets of {self.topic!r}: {exc}") from exc
        return {tp.partition: int(off) for tp, off in got.items()}

    def close(self) -> None:
        if self._consumer is not None:
            with contextlib.suppress(Exception):
                self._consumer.close()
            self._consumer = None
