"""Benchmark of the modeler's executor-side Kafka read -> build/bench/kafka_read.json.

``python -m tests.benchmarks.bench_kafka_read [--ratings N] [--range 5000] [--repeat 5]``

Produces ml-latest-small (or a synthetic set of the same size) to a fresh 4-partition topic
on a local broker, keyed by user like ``modeler.replay``, then times
``kafka_source.read_range`` in this one Python process (what one executor task does), both
paths alternately:

* ``fast``: raw Fetch requests and the record decoder of ``modeler.io.kafka_fetch``;
* ``consumer``: the kafka-python ``KafkaConsumer`` path (``fast=False``).

Two shapes: each partition read whole (one range per partition), and ranges of ``--range``
records (a 20,000-record batch over 4 partitions is 5,000 per range). Figures are
microseconds per record (validation included: every record is parsed), the best and the
median of ``--repeat`` runs; the fast path's own parts (fetch, decode, validation) are
timed separately. The machine's load average is recorded: on a shared 2-core machine it
moves the figures a lot.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

OUT = ROOT / "build" / "bench" / "kafka_read.json"
ML_SMALL = Path(os.environ.get("SHARED_DATA", ROOT.parent / "shared" / "data")) / "ml-latest-small" / "ratings.csv"
PARTITIONS = 4


def _rows(n: int) -> tuple[str, list[tuple[str, str, float, int]]]:
    if ML_SMALL.exists():
        from common.datasets import read_ratings

        rows = sorted(read_ratings(ML_SMALL), key=lambda r: r.timestamp)[:n]
        return "ml-latest-small", [(r.user, r.item, float(r.rating), int(r.timestamp)) for r in rows]
    from common.synthetic import generate

    rows, _ = generate(n_users=600, n_items=9000, n_ratings=n, seed=1)
    return "synthetic", [(r.user, r.item, float(r.rating), int(r.timestamp)) for r in rows]


def _read_all(bootstrap: str, topic: str, ends: dict[int, int], chunk: int | None, fast: bool) -> tuple[float, int]:
    """Seconds to read every partition to its end in ranges of ``chunk`` (None: whole)."""
    from modeler.io import kafka_source as ks

    n = 0
    t0 = time.perf_counter()
    for p, end in ends.items():
        pos = 0
        while pos < end:
            cap = end - pos if chunk is None else min(chunk, end - pos)
            block = ks.read_range(ks.OffsetRange(topic, p, pos, cap), bootstrap, f"{topic}.dlq", 0.5, 5.0,
                                  fast=fast)
            if block.next_offset <= pos:
                raise RuntimeError(f"no progress on partition {p} at {pos}")
            n += block.next_offset - pos
            pos = block.next_offset
    return time.perf_counter() - t0, n


def _parts(bootstrap: str, topic: str, ends: dict[int, int]) -> dict[str, float]:
    """The fast path's pieces, summed over all partitions: seconds fetching, decoding, validating."""
    from modeler.io import kafka_fetch as kf
    from modeler.io import kafka_read as kr
    from modeler.io import kafka_source as ks

    f = kf.fetcher(bootstrap)
    fetch = decode = validate = 0.0
    for p, end in ends.items():
        pos = 0
        while pos < end:
            t0 = time.perf_counter()
            data = f.fetch(topic, p, pos, f.fetch_bytes(end - pos), 10.0)
            t1 = time.perf_counter()
            got = kf.decode_batches(data.records or b"", pos, end)
            t2 = time.perf_counter()
            rng = ks.OffsetRange(topic, p, pos, end - pos)
            block = ks.Block(p, pos, pos, None)
            kr._Ingest(block, rng, bootstrap, None, 0.5, 5.0)(got.offsets, got.values)
            t3 = time.perf_counter()
            fetch, decode, validate = fetch + t1 - t0, decode + t2 - t1, validate + t3 - t2
            pos = got.next_offset
    return {"fetch": fetch, "decode": decode, "validate": validate}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ratings", type=int, default=100_000)
    parser.add_argument("--range", type=int, default=5_000, help="records per range in the batch-shaped run")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("kafka").setLevel(logging.ERROR)

    from devstack.services import create_topics, start_broker
    from modeler.io import kafka_read as kr
    from modeler.io import kafka_source as ks
    from modeler.replay import encode, make_producer

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    source, rows = _rows(args.ratings)
    broker = start_broker()
    try:
        bootstrap, topic = broker.url, "bench-read"
        create_topics(bootstrap, {topic: PARTITIONS, f"{topic}.dlq": 1})
        producer = make_producer(bootstrap)
        for user, item, rating, ts in rows:
            producer.send(topic, key=user.encode(), value=encode(user, item, rating, ts))
        producer.flush()
        producer.close()
        # Where each partition ends, as the consumer path sees it (one whole read).
        ends = {}
        for p in range(PARTITIONS):
            block = ks.read_range(ks.OffsetRange(topic, p, 0, len(rows)), bootstrap, None, 0.5, 5.0, fast=False)
            ends[p] = block.next_offset
        assert sum(ends.values()) == len(rows), (ends, len(rows))

        load_before = os.getloadavg()
        shapes: dict[str, Any] = {}
        for shape, chunk in (("whole_partition", None), (f"ranges_of_{args.range}", args.range)):
            us: dict[str, list[float]] = {"fast": [], "consumer": []}
            for _ in range(args.repeat):
                for path in ("fast", "consumer"):
                    seconds, n = _read_all(bootstrap, topic, ends, chunk, path == "fast")
                    assert n == len(rows)
                    us[path].append(seconds / n * 1e6)
            shapes[shape] = {
                path: {"us_per_record_best": round(min(v), 3), "us_per_record_median": round(statistics.median(v), 3),
                       "runs": [round(x, 3) for x in v]}
                for path, v in us.items()
            }
            shapes[shape]["speedup_median"] = round(
                statistics.median(us["consumer"]) / statistics.median(us["fast"]), 2)
        parts = [_parts(bootstrap, topic, ends) for _ in range(args.repeat)]
        fast_parts = {k: round(min(p[k] for p in parts) / len(rows) * 1e6, 3) for k in parts[0]}
        result = {
            "source": source,
            "ratings": len(rows),
            "partitions": PARTITIONS,
            "records_per_partition": ends,
            "repeat": args.repeat,
            "shapes": shapes,
            "fast_path_parts_us_per_record_best": fast_parts,
            "cpu_count": os.cpu_count(),
            "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        }
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
        return 0
    finally:
        kr.close_clients(broker.url)
        broker.stop()


if __name__ == "__main__":
    sys.exit(main())
