"""modeler.replay on the real broker: rating files as ratings, implicit files as implicit
events, wrong scales refused before anything is sent."""

from __future__ import annotations

import logging
import time

from common.datasets import EventRow
from common.schema import RatingScale, parse_event
from modeler import replay


def _consume(bootstrap: str, topic: str, n: int, timeout_s: float = 30.0) -> list[tuple[bytes, bytes]]:
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=[bootstrap], enable_auto_commit=False,
                             consumer_timeout_ms=2000, auto_offset_reset="earliest")
    try:
        parts = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        consumer.assign(parts)
        consumer.seek_to_beginning(*parts)
        out: list[tuple[bytes, bytes]] = []
        deadline = time.monotonic() + timeout_s
        while len(out) < n and time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=500).values():
                out.extend((m.key, m.value) for m in batch)
        return out
    finally:
        consumer.close()


def test_encode_row_makes_schema_events():
    rating = parse_event(replay.encode_row(EventRow("7", "0042", 4.5, 10, "rating")))
    assert rating.is_rating and (rating.item, rating.rating, rating.timestamp) == ("0042", 4.5, 10)
    assert parse_event(replay.encode_row(("7", "1", 3.0, 11))).rating == 3.0
    play = parse_event(replay.encode_row(EventRow("u-1", "a9", 12.0, 0, "play")))
    assert (play.type, play.weight, play.user) == ("play", 12.0, "u-1")


def test_an_implicit_file_is_replayed_as_implicit_events(tmp_path, bootstrap, topic):
    path = tmp_path / "user_artists.dat"
    rows = [("2", "51", 13883), ("2", "0052", 11690), ("3", "51", 0), ("4", "7", 250)]
    path.write_text("userID\tartistID\tweight\n" + "".join(f"{u}\t{i}\t{w}\n" for u, i, w in rows))
    code = replay.main(["--ratings", str(path), "--bootstrap", bootstrap, "--topic", topic,
                        "--no-progress"])
    assert code == 0
    got = _consume(bootstrap, topic, len(rows))
    events = sorted(((e.user, e.item, e.type, e.weight), k.decode()) for e, k in
                    ((parse_event(v), k) for k, v in got))
    assert events == sorted(((u, i, "play", float(w)), u) for u, i, w in rows)


def test_a_file_on_another_scale_is_refused_before_sending(tmp_path, bootstrap, topic, caplog):
    path = tmp_path / "ten.csv"
    path.write_text("userId,movieId,rating,timestamp\n" + "".join(f"{u % 5},{u},{u % 11},{u}\n" for u in range(100)))
    with caplog.at_level(logging.ERROR):
        code = replay.main(["--ratings", str(path), "--bootstrap", bootstrap, "--topic", topic,
                            "--no-progress"])
    assert code == 2
    assert "span 0..10" in caplog.text and "RATING_MIN=0 RATING_MAX=10" in caplog.text
    assert _consume(bootstrap, topic, 1, timeout_s=3) == []
    # On the right scale every rating goes out, 10s included.
    assert replay.main(["--ratings", str(path), "--bootstrap", bootstrap, "--topic", topic,
                        "--rating-min", "0", "--rating-max", "10", "--no-progress"]) == 0
    sent = [parse_event(v, scale=RatingScale(min=0, max=10)) for _, v in _consume(bootstrap, topic, 100)]
    assert len(sent) == 100 and max(e.rating for e in sent) == 10
