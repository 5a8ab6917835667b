"""End-to-end modeler benchmark: broker -> ``python -m modeler`` (Spark local[2]) -> Redis.

    python -m tests.benchmarks.bench_modeler [--rate R] [--seconds 30] [--backlog 300000] [--batch-max-records N]

Two phases against a real broker, redis-server and the modeler as its own process:

1. *throughput*: ``--backlog`` ratings are in the topic before the modeler starts; ratings/s
   is the rate at which published versions' ``ratings_seen`` grows while it drains them,
   from its third version on (the first ones include Spark's start and warm-up).
2. *freshness*: ratings are produced at a steady ``--rate`` (default 70% of the phase-1
   throughput) for ``--seconds``; for a sample
   of them (every 50th) the time from ``send()`` to the announcement of the first version
   whose stored offsets cover it (so its user's factors changed in a visible version).
   Sustained ratings/s of this phase is reported too.

Ratings are MovieLens ml-latest-small replayed in timestamp order (looping), keyed by user.
Writes ``build/bench/modeler.json``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
log = logging.getLogger("bench_modeler")


def _rows() -> list[tuple[str, str, float, int]]:
    from common.datasets import read_ratings

    data = Path(os.environ.get("SHARED_DATA", ROOT.parent / "shared" / "data")) / "ml-latest-small" / "ratings.csv"
    if data.exists():
        rows = sorted(read_ratings(data), key=lambda r: r.timestamp)
        return [(r.user, r.item, float(r.rating), int(r.timestamp)) for r in rows]
    from common.synthetic import generate

    rows, _ = generate(n_users=600, n_items=9000, n_ratings=100_000, seed=1)
    return [(r.user, r.item, float(r.rating), int(r.timestamp)) for r in rows]


class VersionWatcher(threading.Thread):
    """Follows the modeler's version announcements on ``{p}:events``; for each, reads
    ``fields`` of the version hash and hands them to :meth:`record` (subclasses keep what
    they need). Shared with ``bench_scale``."""

    fields: tuple[str, ...] = ()

    def __init__(self, redis_url: str, prefix: str) -> None:
        super().__init__(daemon=True)
        import redis

        self.client = redis.Redis.from_url(redis_url)
        self.prefix = prefix
        self.stop = threading.Event()
        self.pubsub = self.client.pubsub()
        self.pubsub.subscribe(f"{prefix}:events")

    def run(self) -> None:
        while not self.stop.is_set():
            msg = self.pubsub.get_message(timeout=0.2)
            if not msg or msg["type"] != "message":
                continue
            t = time.time()
            v = int(msg["data"])
            values = self.client.hmget(f"{self.prefix}:ver:{v}", *self.fields)
            if values[0] is not None:
                self.record(t, v, values)

    def record(self, t: float, version: int, values: list[Any]) -> None:
        raise NotImplementedError


class Watcher(VersionWatcher):
    """Records, for every announced version, when it became visible and its offsets."""

    fields = ("offsets", "ratings_seen")

    def __init__(self, redis_url: str, prefix: str) -> None:
        super().__init__(redis_url, prefix)
        self.versions: list[tuple[float, int, dict[int, int], int]] = []  # (t, v, offsets, seen)

    def record(self, t: float, version: int, values: list[Any]) -> None:
        offsets = {int(k.rsplit(":", 1)[1]): int(o) for k, o in json.loads(values[0]).items()}
        self.versions.append((t, version, offsets, int(values[1])))

    def seen(self) -> int:
        return self.versions[-1][3] if self.versions else 0

    def visible_at(self, partition: int, offset: int) -> float | None:
        for t, _, offsets, _ in self.versions:
            if offsets.get(partition, 0) > offset:
                return t
        return None


WARMUP_VERSIONS = 3


def wait_seen(watcher: Watcher, n: int, timeout: float, proc: subprocess.Popen) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if watcher.seen() >= n:
            return True
        if proc.poll() is not None:
            raise RuntimeError(f"modeler exited with {proc.returncode}")
        time.sleep(0.05)
    return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rate", type=float, default=None,
                        help="steady ratings/s in phase 2 (default: 70%% of the phase-1 throughput, so that"
                             " freshness is measured under a load the modeler sustains)")
    parser.add_argument("--seconds", type=float, default=30.0, help="length of phase 2")
    parser.add_argument("--backlog", type=int, default=300_000, help="ratings drained in phase 1")
    parser.add_argument("--batch-max-records", type=int, default=20_000)
    parser.add_argument("--out", default=str(ROOT / "build" / "bench" / "modeler.json"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("kafka").setLevel(logging.ERROR)

    from devstack.services import create_topics, start_broker, start_redis
    from modeler.replay import encode, make_producer

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = _rows()
    broker = start_broker()
    redis_proc = start_redis()
    proc = None
    watcher = None
    try:
        topic, prefix = "bench-ratings", "bench"
        create_topics(broker.url, {topic: 4, f"{topic}.dlq": 1})
        env = dict(os.environ)
        env.update({
            "KAFKA_BOOTSTRAP_SERVERS": broker.url, "RATINGS_TOPIC": topic, "DLQ_TOPIC": f"{topic}.dlq",
            "REDIS_URL": redis_proc.url, "REDIS_PREFIX": prefix, "SPARK_MASTER": "local[2]",
            "MODELER_BATCH_MAX_RECORDS": str(args.batch_max_records), "MODELER_BATCH_MAX_INTERVAL_S": "0.1",
            "MODELER_METRICS_PORT": "0", "LOG_FORMAT": "text",
        })
        log_path = out.parent / "modeler-bench.log"
        producer = make_producer(broker.url)
        cursor = 0

        def send(n: int, sample_every: int = 0, samples: list | None = None) -> None:
            nonlocal cursor
            for _ in range(n):
                u, i, r, t = rows[cursor % len(rows)]
                cursor += 1
                fut = producer.send(topic, key=u.encode(), value=encode(u, i, r, t))
                if sample_every and cursor % sample_every == 0 and samples is not None:
                    sent = time.time()
                    fut.add_callback(lambda md, sent=sent: samples.append((md.partition, md.offset, sent)))

        # Phase 1: the whole backlog is in the topic before the modeler starts (a modeler
        # draining while the producer still writes would share the 2 cores with it, and only
        # the tail of the drain would be timed). Its first WARMUP_VERSIONS versions (Spark
        # start, first Python workers, JIT) are not counted.
        send(args.backlog)
        producer.flush()
        with open(log_path, "wb") as fh:
            proc = subprocess.Popen([sys.executable, "-m", "modeler"], cwd=ROOT, env=env, stdout=fh,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        watcher = Watcher(redis_proc.url, prefix)
        watcher.start()
        if not wait_seen(watcher, args.backlog, 600, proc):
            raise RuntimeError(f"modeler did not drain the backlog; see {log_path}")
        busy = watcher.versions[WARMUP_VERSIONS - 1:]
        if len(busy) < 3:
            raise RuntimeError("backlog too small to time: raise --backlog")
        t0, start_seen = busy[0][0], busy[0][3]
        t1, drained = busy[-1][0], busy[-1][3] - start_seen
        throughput = drained / max(t1 - t0, 1e-9)
        log.info("phase 1: %d ratings in %.1f s = %.0f ratings/s (after %d warm-up versions)",
                 drained, t1 - t0, throughput, WARMUP_VERSIONS)
        # While draining, the modeler is never idle: the time between two announcements is
        # one whole batch (read, train, write, publish).
        batch_intervals = [b[0] - a[0] for a, b in itertools.pairwise(busy)]
        batch_sizes = [b[3] - a[3] for a, b in itertools.pairwise(busy)]

        # Phase 2: steady rate, freshness of sampled ratings.
        rate = args.rate or max(100.0, round(0.7 * throughput, -2))
        log.info("phase 2: %.0f ratings/s for %.0f s", rate, args.seconds)
        samples: list[tuple[int, int, float]] = []
        first_version = watcher.versions[-1][1]
        base_seen = watcher.seen()
        n_total = int(rate * args.seconds)
        t_start = time.monotonic()
        sent = 0
        chunk = max(1, int(rate / 50))
        while sent < n_total:
            send(min(chunk, n_total - sent), sample_every=50, samples=samples)
            sent += min(chunk, n_total - sent)
            ahead = sent / rate - (time.monotonic() - t_start)
            if ahead > 0:
                time.sleep(ahead)
        producer.flush()
        produce_seconds = time.monotonic() - t_start
        caught_up = wait_seen(watcher, base_seen + n_total, 120 + args.seconds, proc)
        steady_seen = watcher.seen() - base_seen
        phase2_versions = [v for v in watcher.versions if v[1] > first_version]
        span = (phase2_versions[-1][0] - (time.time() - (time.monotonic() - t_start))) if phase2_versions else 0
        fresh = []
        for partition, offset, t_sent in samples:
            t_vis = watcher.visible_at(partition, offset)
            if t_vis is not None:
                fresh.append(t_vis - t_sent)
        import redis

        client = redis.Redis.from_url(redis_proc.url)
        metrics = [json.loads(m) for m in client.lrange(f"{prefix}:metrics", 0, -1)]
        phase2 = [m for m in metrics if m["version"] > first_version]
        before_publish = [m["batch_seconds"] for m in phase2] or [m["batch_seconds"] for m in metrics]
        result = {
            "ratings_per_s": round(throughput, 1),
            "steady_rate_offered": rate,
            "steady_ratings_per_s": round(steady_seen / max(span, produce_seconds), 1),
            "steady_caught_up": caught_up,
            "freshness_p50_s": round(float(np.percentile(fresh, 50)), 3) if fresh else None,
            "freshness_p95_s": round(float(np.percentile(fresh, 95)), 3) if fresh else None,
            "freshness_samples": len(fresh),
            "freshness_unmatched": len(samples) - len(fresh),
            "batch_seconds_p50": round(float(np.percentile(batch_intervals, 50)), 3),
            "batch_seconds_p95": round(float(np.percentile(batch_intervals, 95)), 3),
            "batch_ratings_p50_phase1": float(np.percentile(batch_sizes, 50)),
            "steady_batch_seconds_before_publish_p50": round(float(np.percentile(before_publish, 50)), 3),
            "steady_batch_ratings_p50": float(np.percentile([m["batch_ratings"] for m in phase2 or metrics], 50)),
            "ratings": watcher.seen(),
            "phase1_backlog": args.backlog,
            "phase1_ratings_timed": drained,
            "phase1_seconds": round(t1 - t0, 2),
            "versions": watcher.versions[-1][1],
            "batch_max_records": args.batch_max_records,
            "spark_master": "local[2]",
            "cpu_count": os.cpu_count(),
            "load_average_1m_at_end": round(os.getloadavg()[0], 2),
        }
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
        return 0
    finally:
        if watcher is not None:
            watcher.stop.set()
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
        redis_proc.stop()
        broker.stop()


if __name__ == "__main__":
    sys.exit(main())
