"""Scale benchmark: an ML-25M-shaped backlog through the broker into ``python -m modeler``.

    python -m tests.benchmarks.bench_scale [--ratings 3000000] [--ranks 10,50] [--window 25000]

Synthetic explicit ratings with ML-25M's marginals (162,541 users, 59,047 items, log-normal
user activity, Zipf item popularity: :func:`common.synthetic.generate_events`), interleaved
over time, are written to a topic of the project's broker once; then, for every rank, a
fresh redis-server and ``python -m modeler`` (Spark ``local[2]``, defaults otherwise: the
ranking model is on) drain the whole backlog from offset 0. Per rank it reports:

* ratings/s and batch-interval p50/p95 per *window of model size* (keys in the model =
  users + items of the published version, in windows of ``--window`` keys). While the
  modeler drains a backlog it is never idle, so the time between two announcements is one
  whole batch (read, train, write, publish);
* the peak RSS and PSS of the modeler's whole process tree (the Python driver, the JVM and
  the PySpark Python workers), sampled every 0.5 s (RSS counts shared pages once per
  process, PSS shares them out: PSS is the honest sum);
* Redis ``used_memory`` at the end, per rating, and the share of the rated-item hashes
  (``{p}:rated:*``, sampled with MEMORY USAGE);
* the predictor's load time (start to ``/readyz`` serving the final version, one worker)
  and its RSS with that model.

Writes ``build/bench/scale.json`` and a plot of ratings/s against keys beside it
(``scale.png``). On a shared machine every time is inflated by the
other jobs: the JSON records the load average.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
log = logging.getLogger("bench_scale")

from tests.benchmarks.bench_modeler import VersionWatcher  # noqa: E402

ML25M_USERS, ML25M_ITEMS = 162_541, 59_047


class Version:
    """One announced version as the watcher saw it."""

    __slots__ = ("keys", "seen", "t", "version")

    def __init__(self, t: float, version: int, seen: int, keys: int) -> None:
        self.t, self.version, self.seen, self.keys = t, version, seen, keys


class Watcher(VersionWatcher):
    """Every announced version: when it became visible, ratings seen, keys in the model."""

    fields = ("ratings_seen", "n_users", "n_items")

    def __init__(self, redis_url: str, prefix: str) -> None:
        super().__init__(redis_url, prefix)
        self.versions: list[Version] = []

    def record(self, t: float, version: int, values: list[Any]) -> None:
        seen, users, items = values
        self.versions.append(Version(t, version, int(seen), int(users) + int(items)))

    def seen(self) -> int:
        return self.versions[-1].seen if self.versions else 0


class TreeSampler(threading.Thread):
    """Peak RSS and PSS (bytes) of a process and all its descendants, every ``period`` s."""

    def __init__(self, pid: int, period: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.pid, self.period = pid, period
        self.peak_rss = self.peak_pss = 0
        self.peak_by_kind: dict[str, int] = {}
        self.peak_pss_by_kind: dict[str, int] = {}
        #: Every sample: (unix time, RSS by kind, PSS by kind), to line the peak up with the log.
        self.timeline: list[tuple[float, dict[str, int], dict[str, int]]] = []
        self._servers: list[Any] = []
        self.stop = threading.Event()

    @staticmethod
    def _pss(pid: int) -> int:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as fh:
                for line in fh:
                    if line.startswith("Pss:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    def _state_servers(self, psutil: Any, tree: set[int]) -> list[Any]:
        """The state servers (modeler.spark.resident) of the tree's PySpark daemons: detached
        processes (a double fork), so not descendants, but the modeler's memory all the same."""
        found = []
        for p in psutil.process_iter(["cmdline"]):
            cmd = p.info.get("cmdline") or []
            if "modeler.spark.resident" in cmd and cmd[-1].isdigit() and int(cmd[-1]) in tree:
                found.append(p)
        self._servers = found
        return found

    def run(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        while not self.stop.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            procs += self._state_servers(psutil, {p.pid for p in procs})
            rss = pss = 0
            kinds: dict[str, int] = {}
            pss_kinds: dict[str, int] = {}
            for p in procs:
                try:
                    r = p.memory_info().rss
                    name = p.name()
                except psutil.Error:
                    continue
                kind = ("jvm" if name.startswith("java") else "driver" if p.pid == self.pid
                        else "state_server" if p in self._servers else "python_workers")
                kinds[kind] = kinds.get(kind, 0) + r
                s = self._pss(p.pid)
                pss_kinds[kind] = pss_kinds.get(kind, 0) + s
                rss += r
                pss += s
            self.peak_rss = max(self.peak_rss, rss)
            self.peak_pss = max(self.peak_pss, pss)
            for k, v in kinds.items():
                self.peak_by_kind[k] = max(self.peak_by_kind.get(k, 0), v)
            for k, v in pss_kinds.items():
                self.peak_pss_by_kind[k] = max(self.peak_pss_by_kind.get(k, 0), v)
            self.timeline.append((time.time(), kinds, pss_kinds))
            self.stop.wait(self.period)


def peak_sample(timeline: list[tuple[float, dict[str, int], dict[str, int]]]) -> dict[str, Any]:
    """The sample with the highest total PSS: when it was and how it splits by process kind
    (the peaks by kind need not coincide)."""
    if not timeline:
        return {}
    t, by_rss, by_pss = max(timeline, key=lambda s: sum(s[2].values()))
    return {"t": round(t, 2), "pss_by_process_kind": by_pss, "rss_by_process_kind": by_rss}


def produce_backlog(bootstrap: str, topic: str, n: int, seed: int) -> dict[str, Any]:
    """``n`` ML-25M-shaped explicit ratings into ``topic`` (keyed by user); returns figures."""
    from common.synthetic import generate_events
    from modeler.replay import encode, make_producer

    t0 = time.perf_counter()
    # generate_events gives every user at least 20 ratings (3.25M at ML-25M's user count);
    # a random interleaving's first n rows are a uniform sample of them.
    ev = generate_events(ML25M_USERS, ML25M_ITEMS, max(n, 20 * ML25M_USERS), implicit=False, seed=seed)
    gen_s = time.perf_counter() - t0
    users, items = ev.users[:n].tolist(), ev.items[:n].tolist()
    values, stamps = ev.values[:n].tolist(), ev.timestamps[:n].tolist()
    uid, iid = ev.user_ids, ev.item_ids
    producer = make_producer(bootstrap)
    t1 = time.perf_counter()
    for u, i, r, ts in zip(users, items, values, stamps, strict=True):
        user = uid[u]
        producer.send(topic, key=user.encode(), value=encode(user, iid[i], r, ts))
    producer.flush()
    producer.close()
    produce_s = time.perf_counter() - t1
    n_users = len(set(users))
    n_items = len(set(items))
    log.info("backlog: %d ratings (%d users, %d items) generated in %.1f s, produced in %.1f s",
             n, n_users, n_items, gen_s, produce_s)
    return {"ratings": n, "distinct_users": n_users, "distinct_items": n_items,
            "keys": n_users + n_items, "generate_seconds": round(gen_s, 1),
            "produce_seconds": round(produce_s, 1)}


def windows(versions: list[Version], width: int) -> list[dict[str, Any]]:
    """Ratings/s and batch-interval p50/p95 per window of keys in the model (by the keys of
    the version that ends each batch)."""
    rows: dict[int, list[tuple[float, int]]] = {}
    for a, b in itertools.pairwise(versions):
        rows.setdefault(b.keys // width, []).append((b.t - a.t, b.seen - a.seen))
    out = []
    for w in sorted(rows):
        spans = [s for s, _ in rows[w]]
        n = sum(k for _, k in rows[w])
        out.append({
            "keys_from": w * width, "keys_to": (w + 1) * width, "batches": len(spans),
            "ratings": n, "ratings_per_s": round(n / max(sum(spans), 1e-9), 1),
            "batch_seconds_p50": round(float(np.percentile(spans, 50)), 3),
            "batch_seconds_p95": round(float(np.percentile(spans, 95)), 3),
            "batch_ratings_p50": float(np.percentile([k for _, k in rows[w]], 50)),
        })
    return out


def redis_figures(client: Any, prefix: str, ratings: int, sample: int = 2000) -> dict[str, Any]:
    """``used_memory`` and an estimate of the rated-item hashes' share (MEMORY USAGE of a
    random sample of ``{p}:rated:*`` keys, scaled to their count)."""
    info = client.info("memory")
    rated = [k for k in client.scan_iter(f"{prefix}:rated:*", count=10_000)]
    rnd = random.Random(0)
    picked = rnd.sample(rated, min(sample, len(rated)))
    pipe = client.pipeline(transaction=False)
    for k in picked:
        pipe.memory_usage(k, samples=0)
        pipe.hlen(k)
    answers = pipe.execute()
    mem = sum(int(m or 0) for m in answers[0::2])
    entries = sum(int(h or 0) for h in answers[1::2])
    rated_bytes = mem * len(rated) / max(1, len(picked))
    # The factor segments and their state hashes: few keys, each measured whole.
    segs = list(client.scan_iter(f"{prefix}:seg:*", count=1000))
    pipe = client.pipeline(transaction=False)
    for k in segs:
        pipe.memory_usage(k, samples=0)
    seg_bytes = sum(int(m or 0) for m in pipe.execute()) if segs else 0
    return {
        "segment_keys": len(segs),
        "segment_bytes": seg_bytes,
        "used_memory": int(info["used_memory"]),
        "used_memory_rss": int(info["used_memory_rss"]),
        "bytes_per_rating": round(int(info["used_memory"]) / max(1, ratings), 1),
        "rated_keys": len(rated),
        "rated_bytes_estimate": int(rated_bytes),
        "rated_bytes_per_entry": round(mem / max(1, entries), 1),
        "dbsize": int(client.dbsize()),
    }


def predictor_figures(redis_url: str, prefix: str, version: int) -> dict[str, Any]:
    """Time from starting ``python -m predictor`` (one worker) to serving ``version``, and its RSS."""
    import psutil

    from tests.benchmarks.bench_predictor import start_predictor, stop_predictor, wait_model

    t0 = time.monotonic()
    proc, port = start_predictor(redis_url, prefix, 1)
    try:
        wait_model(port, version, 1, timeout=600)
        load_s = time.monotonic() - t0
        time.sleep(1.0)
        root = psutil.Process(proc.pid)
        rss = sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
    finally:
        stop_predictor(proc)
    return {"load_seconds": round(load_s, 2), "rss_bytes": rss}


def run_rank(broker_url: str, topic: str, rank: int, args: argparse.Namespace, out_dir: Path,
             store: str = "resident") -> dict[str, Any]:
    import redis

    from devstack.services import start_redis

    redis_proc = start_redis()
    prefix = f"scale{rank}{store}"
    proc = watcher = sampler = None
    try:
        env = dict(os.environ)
        env.update({
            "KAFKA_BOOTSTRAP_SERVERS": broker_url, "RATINGS_TOPIC": topic, "DLQ_TOPIC": f"{topic}.dlq",
            "REDIS_URL": redis_proc.url, "REDIS_PREFIX": prefix, "SPARK_MASTER": "local[2]",
            "MODELER_BATCH_MAX_RECORDS": str(args.batch_max_records), "MODELER_BATCH_MAX_INTERVAL_S": "0.1",
            "MODELER_METRICS_PORT": "0", "LOG_FORMAT": "text", "MODEL_RANK": str(rank),
            "MODELER_STATE_STORE": store,
        })
        if args.ranking_rank:
            env["MODEL_RANKING_RANK"] = str(rank if args.ranking_rank == "same" else args.ranking_rank)
        client = redis.Redis.from_url(redis_proc.url)
        base_memory = int(client.info("memory")["used_memory"])
        log_path = out_dir / f"scale-modeler-rank{rank}-{store}.log"
        watcher = Watcher(redis_proc.url, prefix)
        watcher.start()
        t_start = time.time()
        with open(log_path, "wb") as fh:
            proc = subprocess.Popen([sys.executable, "-m", "modeler"], cwd=ROOT, env=env, stdout=fh,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        sampler = TreeSampler(proc.pid)
        sampler.start()
        deadline = time.monotonic() + args.timeout
        stopped = None
        while watcher.seen() < args.ratings:
            if proc.poll() is not None:
                raise RuntimeError(f"modeler exited with {proc.returncode}; see {log_path}")
            if time.monotonic() > deadline:
                stopped = f"timeout after {args.timeout:.0f} s"
            elif sampler.peak_pss > args.max_memory_gb * 2**30:
                # A shared machine: a model that outgrows the guard is stopped, not let run
                # (at rank 50 every key holds ~10 KB of statistics, copied ~6 times per batch).
                stopped = f"memory guard: process tree PSS above {args.max_memory_gb} GB"
            if stopped:
                log.warning("rank %d: %s after %d of %d ratings", rank, stopped, watcher.seen(), args.ratings)
                break
            time.sleep(0.2)
        sampler.stop.set()
        sampler.join(5)
        with open(out_dir / f"scale-memory-rank{rank}-{store}.jsonl", "w") as fh:
            for t, by_rss, by_pss in sampler.timeline:
                fh.write(json.dumps({"t": round(t, 2), "rss": by_rss, "pss": by_pss}) + "\n")
        versions = list(watcher.versions)
        busy = versions[args.warmup - 1:]
        if len(busy) < 3:
            raise RuntimeError("too few versions to time: raise --ratings")
        span = busy[-1].t - busy[0].t
        timed = busy[-1].seen - busy[0].seen
        spans = [b.t - a.t for a, b in itertools.pairwise(busy)]
        # Freeze the model: stop the modeler before measuring Redis and the predictor.
        proc.terminate()
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
        final = watcher.versions[-1]
        rfig = redis_figures(client, prefix, final.seen)
        rfig["used_memory_model"] = rfig["used_memory"] - base_memory
        meta = client.hgetall(f"{prefix}:ver:{final.version}")
        pfig = predictor_figures(redis_proc.url, prefix, final.version)
        metrics = [json.loads(m) for m in client.lrange(f"{prefix}:metrics", 0, -1)]
        before_publish = [m["batch_seconds"] for m in metrics if "batch_seconds" in m]
        result = {
            "rank": rank,
            "stopped": stopped,
            "ranking_rank": int(meta.get(b"ranking_rank", b"0")),
            "models": json.loads(meta.get(b"models", b'["explicit"]')),
            "ratings_seen": final.seen,
            "ratings_timed": timed,
            "seconds_timed": round(span, 1),
            "seconds_total": round(final.t - t_start, 1),
            "ratings_per_s": round(timed / max(span, 1e-9), 1),
            "batch_seconds_p50": round(float(np.percentile(spans, 50)), 3),
            "batch_seconds_p95": round(float(np.percentile(spans, 95)), 3),
            "batch_seconds_before_publish_p50": round(float(np.percentile(before_publish, 50)), 3)
            if before_publish else None,
            "keys_final": final.keys,
            "users_final": int(meta[b"n_users"]),
            "items_final": int(meta[b"n_items"]),
            "versions": final.version,
            "windows": windows(busy, args.window),
            "modeler_peak_rss_bytes": sampler.peak_rss,
            "modeler_peak_pss_bytes": sampler.peak_pss,
            "modeler_peak_rss_by_process_kind": sampler.peak_by_kind,
            "modeler_peak_pss_by_process_kind": sampler.peak_pss_by_kind,
            "modeler_peak_pss_sample": peak_sample(sampler.timeline),
            "redis": rfig,
            "predictor": pfig,
            "load_average_1m_at_end": round(os.getloadavg()[0], 2),
        }
        log.info("rank %d: %.0f ratings/s over %d ratings, %d keys, peak PSS %.0f MB, Redis %.0f MB",
                 rank, result["ratings_per_s"], timed, final.keys, sampler.peak_pss / 2**20,
                 rfig["used_memory"] / 2**20)
        return result
    finally:
        if sampler is not None:
            sampler.stop.set()
        if watcher is not None:
            watcher.stop.set()
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(30)
        redis_proc.stop()


def plot(result: dict[str, Any], path: Path) -> None:
    """Ratings/s against keys in the model, one line per rank (the windows of each run)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for run in result["runs"]:
        xs = [(w["keys_from"] + w["keys_to"]) / 2 / 1000 for w in run["windows"]]
        ax.plot(xs, [w["ratings_per_s"] for w in run["windows"]], marker="o",
                label=f"rank {run['rank']} (+ ranking rank {run['ranking_rank']}), "
                      f"{run.get('state_store', 'rdd')} state")
    ax.set_xlabel("keys in the model (thousands)")
    ax.set_ylabel("ratings/s (end to end)")
    ax.set_title(f"python -m modeler, local[2], batches of {result['batch_max_records']:,}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ratings", type=int, default=3_000_000, help="backlog size (default 3,000,000)")
    parser.add_argument("--ranks", default="10,50", help="explicit model ranks, one modeler run each")
    parser.add_argument("--ranking-rank", default="",
                        help="MODEL_RANKING_RANK for the runs: a number, 'same' (= rank), or empty"
                             " for the model's default")
    parser.add_argument("--stores", default="resident",
                        help="MODELER_STATE_STORE values, one run each per rank (e.g. resident,rdd)")
    parser.add_argument("--window", type=int, default=25_000, help="width of a model-size window, in keys")
    parser.add_argument("--batch-max-records", type=int, default=20_000)
    parser.add_argument("--warmup", type=int, default=3, help="first versions not timed (Spark start)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="per rank, seconds")
    parser.add_argument("--max-memory-gb", type=float, default=8.0,
                        help="stop a rank's run when the modeler's process tree passes this PSS")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", default=str(ROOT / "build" / "bench" / "scale.json"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("kafka").setLevel(logging.ERROR)

    from devstack.services import create_topics, start_broker

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    ranks = [int(r) for r in args.ranks.split(",") if r.strip()]
    broker = start_broker()
    try:
        topic = "scale-ratings"
        create_topics(broker.url, {topic: 4, f"{topic}.dlq": 1})
        backlog = produce_backlog(broker.url, topic, args.ratings, args.seed)
        result: dict[str, Any] = {
            "backlog": backlog,
            "runs": [],
            "spark_master": "local[2]",
            "batch_max_records": args.batch_max_records,
            "cpu_count": os.cpu_count(),
            "note": "shared machine: times are inflated by other jobs (see load averages)",
        }
        stores = [x.strip() for x in args.stores.split(",") if x.strip()]
        for rank, store in itertools.product(ranks, stores):
            try:
                run = run_rank(broker.url, topic, rank, args, out.parent, store)
                result["runs"].append({"state_store": store, **run})
            except Exception as exc:  # one rank's failure must not lose the others' figures
                log.exception("rank %d (%s) failed", rank, store)
                result["runs"].append({"rank": rank, "state_store": store,
                                       "error": f"{type(exc).__name__}: {exc}"})
            # Written after every rank: a long run's first figures survive a later failure.
            out.write_text(json.dumps(result, indent=2) + "\n")
        ok = [r for r in result["runs"] if "error" not in r]
        if ok:
            plot({**result, "runs": ok}, out.with_suffix(".png"))
        print(json.dumps(result, indent=2))
        return 0 if len(ok) == len(result["runs"]) else 1
    finally:
        broker.stop()


if __name__ == "__main__":
    sys.exit(main())
