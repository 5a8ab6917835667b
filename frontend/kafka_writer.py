"""The write path: validated ratings -> the ratings topic, keyed by user, ``acks=all``.

All-or-nothing, and what that honestly means here
-------------------------------------------------
The schema fixes one JSON rating per message, keyed by user, so a request of several ratings
is several messages. The HTTP layer only accepts a request whose ratings share one user; they
therefore hash to ONE partition, and this writer makes them travel as ONE record batch:

* sends of one request happen under a lock, with ``linger_ms`` long enough that the sender
  thread does not drain the partition between the first ``send`` and our ``flush``, and a
  ``batch_size`` larger than the biggest request we accept;
* a Kafka broker appends a record batch atomically, so the broker either has all of the
  request's ratings or none of them;
* the idempotent producer (kafka-python's default, on with ``acks=all``) lets the producer
  retry a batch inside its own delivery timeout without writing it twice.

The request answers 202 only when that batch's future says the broker acknowledged it.
Any failure (no broker, metadata timeout, delivery timeout) answers 503 and none of the
request is accepted: ``delivery_timeout_ms`` bounds how long an unacknowledged batch may live
and covers batches already in flight, so when ``flush`` returns every future is done and a
failed batch is never sent later behind the caller's back. After a failure the producer is
closed and a fresh one is made on the next request, so the service recovers on its own.

The one case no client can rule out without transactions: the broker appended the batch but
the acknowledgement was lost (connection cut at exactly that moment). The caller then sees
503 and may resubmit; the stream then holds the same (user, item, rating, timestamp) twice,
which downstream treats as a re-rating with the same value.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from common.errors import InfraUnavailable
from common.schema import Rating

log = logging.getLogger(__name__)

# A request of max_batch ratings is at most ~max_batch * 200 bytes of JSON; the record batch
# must hold it whole (see the module docstring), and stay below the broker's request limit.
_BATCH_BYTES = 1_000_000


class BrokerUnavailable(InfraUnavailable):
    """The ratings could not be handed to the broker; none of the request was accepted."""


@dataclass(frozen=True)
class WriteReceipt:
    topic: str
    partition: int
    offset: int  # offset of the first rating of the request
    count: int


class RatingWriter:
    """A lazily created Kafka producer for the ratings topic; thread-safe."""

    def __init__(
        self, bootstrap_servers: list[str], topic: str, timeout_s: float = 5.0,
        client_id: str = "streamrec-frontend",
    ) -> None:
        self.bootstrap_servers = bootstrap_servers
        self.topic = topic
        self.timeout_s = timeout_s
        self.client_id = client_id
        self._producer: Any = None
        # One request's sends + flush at a time, so two requests never interleave records in
        # a batch that the other's flush drains half-built.
        self._lock = threading.Lock()

    def _config(self) -> dict[str, Any]:
        total_ms = int(self.timeout_s * 1000)
        # We always flush right after our sends, so linger only has to outlast the send loop
        # of one request (even a slow one on a busy host); kafka-python wants
        # delivery_timeout >= linger + request_timeout, so the rest goes to the request.
        linger_ms = max(200, total_ms // 2)
        request_ms = max(500, total_ms - linger_ms - 200)
        return {
            "bootstrap_servers": self.bootstrap_servers,
            "client_id": self.client_id,
            "acks": "all",
            "enable_idempotence": True,
            "linger_ms": linger_ms,
            "batch_size": _BATCH_BYTES,
            "max_request_size": _BATCH_BYTES + 64_000,
            "request_timeout_ms": request_ms,
            "delivery_timeout_ms": linger_ms + request_ms,
            # Bounded waits so an unreachable broker turns into a quick 503, not a hung request.
            "max_block_ms": total_ms,
            "bootstrap_timeout_ms": total_ms,
            "reconnect_backoff_max_ms": 1000,
            "retry_backoff_ms": 100,
        }

    def _ensure_producer(self) -> Any:
        if self._producer is None:
            from kafka import KafkaProducer
            from kafka.errors import KafkaError

            try:
                self._producer = KafkaProducer(**self._config())
            except (KafkaError, OSError) as exc:
                raise BrokerUnavailable(
                    f"cannot reach the Kafka broker at {','.join(self.bootstrap_servers)}: {exc!r}"
                ) from exc
            log.info("Kafka producer connected to %s", ",".join(self.bootstrap_servers))
        return self._producer

    def _discard_producer(self) -> None:
        producer, self._producer = self._producer, None
        if producer is None:
            return
        try:
            # Every future is done by now (delivery timeout), so nothing is left to send.
            producer.close(timeout=0)
        except Exception as exc:  # a failing close must not mask the 503
            log.warning("closing the failed Kafka producer: %r", exc)

    def write(self, ratings: Sequence[Rating]) -> WriteReceipt:
        """Produce ``ratings`` (one user) and wait for the broker's acknowledgement.

        Raises :class:`BrokerUnavailable` when any of them was not acknowledged.
        """
        if not ratings:
            raise ValueError("nothing to write")
        users = {r.user for r in ratings}
        if len(users) != 1:
            raise ValueError("one request carries the ratings of one user")
        key = ratings[0].user.encode()
        from kafka.errors import KafkaError

        with self._lock:
            producer = self._ensure_producer()
            futures = []
            try:
                for rating in ratings:
                    futures.append(
                        producer.send(self.topic, key=key, value=rating.to_json_bytes())
                    )
                # Waits for every future: delivery_timeout_ms < timeout_s, so they all finish.
                producer.flush(timeout=self.timeout_s + 1.0)
                metadata = [f.get(timeout=0) for f in futures]
            except (KafkaError, OSError) as exc:
                self._discard_producer()
                log.warning(
                    "producing %d rating(s) of user %s failed, none accepted: %r",
                    len(ratings), ratings[0].user, exc,
                )
                raise BrokerUnavailable(
                    f"the Kafka broker did not acknowledge the ratings: {exc!r}"
                ) from exc
        first = metadata[0]
        return WriteReceipt(first.topic, first.partition, first.offset, len(metadata))

    def ping(self) -> bool:
        """True when the broker answers metadata for the ratings topic (readiness detail)."""
        from kafka.errors import KafkaError

        try:
            with self._lock:
                producer = self._ensure_producer()
            return bool(producer.partitions_for(self.topic))
        except (KafkaError, InfraUnavailable, OSError):
            return False

    def close(self) -> None:
        with self._lock:
            producer, self._producer = self._producer, None
        if producer is not None:
            producer.close(timeout=self.timeout_s)
