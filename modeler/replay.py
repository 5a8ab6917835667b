"""Stream simulator: replay a ratings or events file into Kafka, as the seeds' experiment did.

    python -m modeler.replay --ratings FILE [--rate R | --batch 1000 --interval 5] [--loop]

FILE is any ratings file :mod:`common.datasets` reads (its ratings are checked against
``RATING_MIN``/``RATING_MAX``: a file on another scale is refused, naming its range) or an
implicit-events file (``user,item,weight[,timestamp]`` with a header, e.g. Last.fm
``user_artists.dat``). Messages are the wire format of :mod:`common.schema`: ratings
``{"user","item","rating","timestamp"}``, implicit events
``{"user","item","type":"play","weight","timestamp"}``; keyed by user (so one user's events
stay in order on one partition), in timestamp order (file order among equal timestamps).
``--rate`` paces a steady number of events per second; ``--batch N --interval S`` sends N at
once every S seconds; neither means as fast as the broker takes them.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Iterable, Sequence
from typing import Any

from common.schema import RATING

log = logging.getLogger(__name__)


def encode(user: str, item: str, rating: float, timestamp: int) -> bytes:
    return json.dumps(
        {"user": user, "item": item, "rating": rating, "timestamp": timestamp},
        separators=(",", ":"),
    ).encode()


def encode_row(row: Sequence[Any]) -> bytes:
    """The message of one row: a rating for ``(user, item, rating, timestamp)`` tuples and
    rating :class:`~common.datasets.EventRow` rows, an implicit event for the others."""
    kind = row[4] if len(row) > 4 else RATING
    if kind == RATING:
        return encode(str(row[0]), str(row[1]), float(row[2]), int(row[3]))
    return json.dumps(
        {"user": str(row[0]), "item": str(row[1]), "type": kind, "weight": float(row[2]),
         "timestamp": int(row[3])},
        separators=(",", ":"),
    ).encode()


def make_producer(bootstrap: str) -> Any:
    from kafka import KafkaProducer

    return KafkaProducer(
        bootstrap_servers=bootstrap.split(","),
        acks=1,
        linger_ms=10,
        batch_size=256 * 1024,
        client_id="streamrec-replay",
    )


def send_rows(producer: Any, topic: str, rows: Iterable[Sequence[Any]]) -> int:
    """Send ``(user, item, rating, timestamp)`` rows or :class:`~common.datasets.EventRow` rows
    keyed by user; returns how many."""
    n = 0
    for row in rows:
        producer.send(topic, key=str(row[0]).encode(), value=encode_row(row))
        n += 1
    return n


def replay(
    rows: Sequence[Sequence[Any]],
    bootstrap: str,
    topic: str,
    rate: float | None = None,
    batch: int | None = None,
    interval: float = 5.0,
    loop: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
) -> int:
    """Produce ``rows`` (again and again with ``loop``); returns the number sent."""
    from tqdm import tqdm

    producer = make_producer(bootstrap)
    sent = 0
    # Pace in chunks: a sleep per message would cost more than sending it.
    chunk = batch or (max(1, int(rate / 20)) if rate else 5000)
    bar = tqdm(total=None if loop else len(rows), unit="rating", disable=not progress, file=sys.stderr)
    t0 = time.monotonic()
    try:
        while True:
            for start in range(0, len(rows), chunk):
                part = rows[start : start + chunk]
                if stop_after is not None:
                    part = part[: max(0, stop_after - sent)]
                sent += send_rows(producer, topic, part)
                bar.update(len(part))
                if batch:
                    producer.flush()
                    time.sleep(interval)
                elif rate:
                    ahead = sent / rate - (time.monotonic() - t0)
                    if ahead > 0:
                        time.sleep(ahead)
                if stop_after is not None and sent >= stop_after:
                    return sent
            if not loop:
                return sent
    finally:
        producer.flush()
        producer.close()
        bar.close()
        elapsed = time.monotonic() - t0
        log.info("replayed %d ratings to %s in %.1f s (%.0f/s)", sent, topic, elapsed, sent / max(elapsed, 1e-9))


def main(argv: list[str] | None = None) -> int:
    from common.datasets import read_events
    from common.errors import DatasetError
    from common.schema import RatingScale
    from common.settings import CommonSettings

    parser = argparse.ArgumentParser(prog="python -m modeler.replay", description=__doc__.split("\n")[0])
    parser.add_argument("--ratings", required=True,
                        help="ratings file (MovieLens csv/dat/u.data) or implicit events "
                             "(user,item,weight[,timestamp] with a header); gz ok")
    parser.add_argument("--rating-min", type=float, help="rating scale (default RATING_MIN)")
    parser.add_argument("--rating-max", type=float, help="rating scale (default RATING_MAX)")
    pace = parser.add_mutually_exclusive_group()
    pace.add_argument("--rate", type=float, help="ratings per second")
    pace.add_argument("--batch", type=int, help="ratings per burst (with --interval)")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between bursts")
    parser.add_argument("--loop", action="store_true", help="start over at the end, forever")
    parser.add_argument("--limit", type=int, help="send at most this many ratings")
    parser.add_argument("--bootstrap", help="Kafka bootstrap servers (default KAFKA_BOOTSTRAP_SERVERS)")
    parser.add_argument("--topic", help="topic (default RATINGS_TOPIC)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if args.rate is not None and args.rate <= 0:
        parser.error("--rate must be positive")
    if args.batch is not None and args.batch <= 0:
        parser.error("--batch must be positive")
    settings = CommonSettings()  # type: ignore[call-arg]  # fields come from the env
    scale = settings.scale
    if args.rating_min is not None or args.rating_max is not None:
        scale = RatingScale(min=scale.min if args.rating_min is None else args.rating_min,
                            max=scale.max if args.rating_max is None else args.rating_max)
    if not scale.min < scale.max:
        parser.error(f"rating scale {scale.min}..{scale.max}: the minimum must be below the maximum")
    try:
        rows = sorted(read_events(args.ratings, scale=scale), key=lambda r: r.timestamp)
    except DatasetError as exc:
        log.error("%s", exc)
        return 2
    if args.limit is not None:
        rows = rows[: args.limit]
    bootstrap = args.bootstrap or settings.kafka_bootstrap_servers
    topic = args.topic or settings.ratings_topic
    from modeler.io.kafka_source import KafkaUnavailable, TopicAdmin

    try:
        TopicAdmin(bootstrap, topic, settings.dlq_topic).ensure_topics()
    except KafkaUnavailable as exc:
        log.error("%s", exc)
        return 1
    try:
        replay(rows, bootstrap, topic, rate=args.rate, batch=args.batch, interval=args.interval,
               loop=args.loop, progress=not args.no_progress)
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
