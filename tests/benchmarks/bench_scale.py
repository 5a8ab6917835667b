"""Scale benchmark: an ML-25M-shaped backlog through the broker into ``python -m modeler``.

    python -m tests.benchmarks.bench_scale [--ratings 3000000] [--ranks 10,50] [--window 25000]
        [--stores resident] [--kill-at 0.6] [--fresh-seconds 60 [--fresh-load 0.7]]

Synthetic explicit ratings with ML-25M's marginals (162,541 users, 59,047 items, log-normal
user activity, Zipf item popularity: :func:`common.synthetic.generate_events`), interleaved
over time, are written to a topic of the project's broker once; then, for every rank, a
fresh redis-server and ``python -m modeler`` (Spark ``local[2]``, defaults otherwise: the
ranking model is on) drain the whole backlog from offset 0. Per rank it reports:

* ratings/s and batch-interval p50/p95 per *window of model size* (keys in the model =
  users + items of the published version, in windows of ``--window`` keys). While the
  modeler drains a backlog it is never idle, so the time between two announcements is one
  whole batch (read, train, write, publish);
* the peak RSS and PSS of the modeler's whole process tree (the Python driver, the JVM,
  the PySpark Python workers and the resident layout's state server), sampled every 0.5 s
  (RSS counts shared pages once per process, PSS shares them out: PSS is the honest sum);
* Redis ``used_memory`` at the end, per rating, and the share of the rated-item hashes
  (``{p}:rated:*``, sampled with MEMORY USAGE);
* the predictor's load time (start to ``/readyz`` serving the final version, one worker)
  and its RSS with that model.

Two opt-in phases measure #14's other goals at that size:

* ``--kill-at F`` (exactly once, restart time): once the published ``ratings_seen`` passes
  F × ``--ratings`` (and the backlog is not drained yet), every process of the modeler's tree
  is frozen (SIGSTOP) and then killed with SIGKILL, as a lost host or container would lose
  them, and the benchmark checks that none survives. A new ``python -m modeler`` with the
  same settings (Redis, prefix, topic) restores and drains the rest. The run's ``kill``
  block has the version and ``ratings_seen`` at the kill, the seconds from starting the new
  process to its first new version, to the lease, and to its log's start-up lines (restored,
  first batch), and ``exactly_once``: the final ``ratings_seen`` and the stored offsets both
  equal the ratings produced. The restart includes waiting out the killed modeler's lease
  (``MODELER_LEASE_TTL_S``, 15 s by default). The throughput figures time each process's own
  batches, after the same warm-up, never the restart gap; the memory sampler follows the new
  tree.
* ``--fresh-seconds N`` (freshness): after the backlog is drained (the model at full size),
  ratings are produced at a steady ``--fresh-load`` (0.7) × the run's measured ratings/s for
  N s. They continue the same synthetic stream, keeping only users and items the backlog
  already had, so the model keeps its size (cycled, with the pairs rated again counted in
  ``repeated_pairs``, if the stream has too few rows left: from about 3M ratings). As in
  ``bench_modeler``'s phase 2 (its version watcher and helpers), every 50th rating's
  freshness is the time from ``send()`` to the announcement of the first version whose
  stored offsets cover it. The run's ``fresh`` block has p50/p95, the samples, the rate and
  the keys in the model meanwhile; the memory peaks then cover this phase too, while
  ``ratings_seen`` stays the drained backlog's. Runs after the first then drain a copy of
  the backlog in a topic of their own, so that every run learns the same ratings.

Writes ``build/bench/scale.json`` and a plot of ratings/s against keys beside it
(``scale.png``). On a shared machine every time is inflated by the
other jobs: the JSON records the load average.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import logging
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
log = logging.getLogger("bench_scale")

from common.keys import Keys  # noqa: E402
from tests.benchmarks.bench_modeler import VersionWatcher, wait_seen  # noqa: E402
from tests.benchmarks.bench_modeler import Watcher as OffsetWatcher  # noqa: E402

if TYPE_CHECKING:
    from common.synthetic import Events

ML25M_USERS, ML25M_ITEMS = 162_541, 59_047
#: Every n-th fresh rating is a freshness sample (as in bench_modeler's phase 2).
FRESH_SAMPLE_EVERY = 50
#: #14's goals these phases check.
RESTART_GOAL_S = 60.0
FRESHNESS_P95_GOAL_S = 5.0


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

    def first_after(self, version: int) -> Version | None:
        """The first announced version newer than ``version``."""
        return next((v for v in list(self.versions) if v.version > version), None)


# ------------------------------------------------------------------ the modeler's process tree


class Message(NamedTuple):
    """One Kafka record to produce."""

    key: bytes
    value: bytes


class Sample(NamedTuple):
    """A fresh rating whose freshness is measured: where the broker put it, and when it was sent."""

    partition: int
    offset: int
    sent: float  # time.time() at send()


@dataclass
class Tree:
    """The modeler's processes: the driver ``root``, its descendants (Spark's JVM, the PySpark
    daemon and workers) and the state servers of the resident layout."""

    root: int
    procs: list[psutil.Process]
    servers: set[int]

    def kind(self, p: psutil.Process) -> str:
        """``driver``, ``jvm``, ``state_server`` or ``python_workers`` (psutil.Error if gone)."""
        if p.name().startswith("java"):
            return "jvm"
        if p.pid == self.root:
            return "driver"
        return "state_server" if p.pid in self.servers else "python_workers"


def state_servers(tree: set[int]) -> list[psutil.Process]:
    """The state servers (``modeler.spark.resident``) that watch a process of ``tree`` (their
    PySpark daemon): detached by a double fork, so not descendants, but the modeler's all the same."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info.get("cmdline") or []
        if "modeler.spark.resident" in cmd and cmd[-1].isdigit() and int(cmd[-1]) in tree:
            found.append(p)
    return found


def modeler_tree(root: int) -> Tree:
    """The tree of driver ``root`` as it is now (no processes if the driver is gone)."""
    try:
        top = psutil.Process(root)
        procs = [top, *top.children(recursive=True)]
    except psutil.NoSuchProcess:
        return Tree(root, [], set())
    servers = state_servers({p.pid for p in procs})
    return Tree(root, procs + servers, {p.pid for p in servers})


class TreeSampler(threading.Thread):
    """Peak RSS and PSS (bytes) of the modeler's process tree (:func:`modeler_tree`), every
    ``period`` s; :meth:`follow` moves it to a restarted modeler, the peaks go on."""

    def __init__(self, pid: int, period: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.pid, self.period = pid, period
        self.peak_rss = self.peak_pss = 0
        self.peak_by_kind: dict[str, int] = {}
        self.peak_pss_by_kind: dict[str, int] = {}
        #: Every sample: (unix time, RSS by kind, PSS by kind), to line the peak up with the log.
        self.timeline: list[tuple[float, dict[str, int], dict[str, int]]] = []
        self.stop = threading.Event()

    def follow(self, pid: int) -> None:
        """Sample the tree of driver ``pid`` from now on."""
        self.pid = pid

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

    def run(self) -> None:
        while not self.stop.is_set():
            tree = modeler_tree(self.pid)
            if tree.procs:  # none between a kill and the restart
                self._sample(tree)
            self.stop.wait(self.period)

    def _sample(self, tree: Tree) -> None:
        kinds: dict[str, int] = {}
        pss_kinds: dict[str, int] = {}
        for p in tree.procs:
            try:
                r = p.memory_info().rss
                kind = tree.kind(p)
            except psutil.Error:
                continue
            kinds[kind] = kinds.get(kind, 0) + r
            pss_kinds[kind] = pss_kinds.get(kind, 0) + self._pss(p.pid)
        self.peak_rss = max(self.peak_rss, sum(kinds.values()))
        self.peak_pss = max(self.peak_pss, sum(pss_kinds.values()))
        for k, v in kinds.items():
            self.peak_by_kind[k] = max(self.peak_by_kind.get(k, 0), v)
        for k, v in pss_kinds.items():
            self.peak_pss_by_kind[k] = max(self.peak_pss_by_kind.get(k, 0), v)
        self.timeline.append((time.time(), kinds, pss_kinds))


def peak_sample(timeline: list[tuple[float, dict[str, int], dict[str, int]]]) -> dict[str, Any]:
    """The sample with the highest total PSS: when it was and how it splits by process kind
    (the peaks by kind need not coincide)."""
    if not timeline:
        return {}
    t, by_rss, by_pss = max(timeline, key=lambda s: sum(s[2].values()))
    return {"t": round(t, 2), "pss_by_process_kind": by_pss, "rss_by_process_kind": by_rss}


@dataclass
class KillReport:
    """What a :func:`kill_tree` killed, and whether anything outlived it."""

    t: float  # time.time() of the first SIGSTOP
    seconds: float  # from the first SIGSTOP until every process was dead and reaped (or the wait ran out)
    killed: dict[str, int]  # processes by kind
    survivors: list[str]  # "pid name status" of processes still running after the wait
    zombies: int  # dead, but still not reaped by whoever inherited them after the wait


def _gone(p: psutil.Process) -> bool:
    try:
        return p.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_gone(procs: list[psutil.Process], timeout: float, reap_s: float = 5.0) -> tuple[list[str], int]:
    """Wait until ``procs`` (not our children) are dead, then up to ``reap_s`` more for whoever
    inherited them to reap them: ``("pid name status" of those still running after ``timeout``,
    how many are still unreaped zombies)``."""
    deadline = time.monotonic() + timeout
    while not all(_gone(p) for p in procs) and time.monotonic() < deadline:
        time.sleep(0.05)
    reaped = time.monotonic() + reap_s
    while any(p.is_running() for p in procs if _gone(p)) and time.monotonic() < reaped:
        time.sleep(0.05)
    survivors, zombies = [], 0
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            status = p.status()
            if status == psutil.STATUS_ZOMBIE:
                zombies += 1
            else:
                survivors.append(f"{p.pid} {p.name()} {status}")
    return survivors, zombies


def kill_tree(proc: subprocess.Popen, timeout: float = 15.0) -> KillReport:
    """``kill -9`` of the modeler's whole tree at once, as a lost host or container would see it.

    ``tests/support/modeler.py``'s ``kill_9`` kills the driver only: its JVM then exits at its
    stdin's EOF, the PySpark daemon with the JVM and the state server (another session, started
    by a double fork) once it sees its daemon gone, each with time to notice the others' death.
    Here every process is frozen with SIGSTOP first, again until the tree stops growing (no
    fork can slip through), and only then is each sent SIGKILL. The driver is our child and is
    reaped here; the others are waited for until they are gone or zombies."""
    t0, m0 = time.time(), time.monotonic()
    frozen: dict[int, psutil.Process] = {}
    kinds: dict[int, str] = {}
    while True:
        tree = modeler_tree(proc.pid)
        new = [p for p in tree.procs if p.pid not in frozen]
        if not new:
            break
        for p in new:
            frozen[p.pid] = p
            with contextlib.suppress(psutil.Error):
                kinds[p.pid] = tree.kind(p)
                p.send_signal(signal.SIGSTOP)
    for p in frozen.values():
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout)
    survivors, zombies = wait_gone([p for pid, p in frozen.items() if pid != proc.pid], timeout)
    if proc.poll() is None:
        survivors.append(f"{proc.pid} driver")
    return KillReport(t0, round(time.monotonic() - m0, 2), dict(Counter(kinds.values())), survivors, zombies)


class Modeler:
    """``python -m modeler`` with one environment, started again after a kill: the current
    process, its log, and when it was started."""

    def __init__(self, env: dict[str, str], log_dir: Path, name: str) -> None:
        self.env, self.log_dir, self.name = env, log_dir, name
        self.starts = 0
        self.started = 0.0  # time.time() just before the current process started
        self.proc: subprocess.Popen | None = None
        self.log_path = log_dir / f"scale-modeler-{name}.log"

    def start(self) -> subprocess.Popen:
        suffix = f"-restart{self.starts}" if self.starts else ""
        self.log_path = self.log_dir / f"scale-modeler-{self.name}{suffix}.log"
        self.starts += 1
        self.started = time.time()
        with open(self.log_path, "wb") as fh:
            self.proc = subprocess.Popen([sys.executable, "-m", "modeler"], cwd=ROOT, env=self.env, stdout=fh,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        return self.proc

    def current(self) -> subprocess.Popen:
        """The current process; RuntimeError (with the log to read) if it has exited."""
        if self.proc is None or self.proc.poll() is not None:
            code = None if self.proc is None else self.proc.returncode
            raise RuntimeError(f"modeler exited with {code}; see {self.log_path}")
        return self.proc

    def stop(self, timeout: float = 120.0) -> list[str]:
        """SIGTERM (the modeler finishes its batch and stops Spark), the whole tree killed if
        it takes longer than ``timeout``; returns the tree's processes still running 15 s after
        the driver exited ("pid name status")."""
        if self.proc is None or self.proc.poll() is not None:
            return []
        tree = modeler_tree(self.proc.pid)
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return kill_tree(self.proc).survivors
        return wait_gone([p for p in tree.procs if p.pid != self.proc.pid], 15.0)[0]

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            kill_tree(self.proc)


#: Start-up lines of the modeler's text log (modeler.__main__ and modeler.service wording).
LOG_MARKS = {
    "started": re.compile(r" modeler: modeler: topic "),
    "lease_wait": re.compile(r" another modeler holds "),
    "restored": re.compile(r" modeler\.service: restored version "),
    "first_batch": re.compile(r" modeler\.service: version \d+: "),
}
_ASCTIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


def log_marks(path: Path) -> dict[str, float]:
    """Unix time of the first line of each of :data:`LOG_MARKS` in a modeler log (``LOG_FORMAT=text``:
    its asctime, local time, to the millisecond)."""
    found: dict[str, float] = {}
    with open(path, errors="replace") as fh:
        for line in fh:
            stamp = _ASCTIME.match(line)
            if stamp is None:
                continue
            for name, pattern in LOG_MARKS.items():
                if name not in found and pattern.search(line):
                    found[name] = datetime.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
    return found


# ------------------------------------------------------------------ kill -9 and restart


class Published(NamedTuple):
    """The visible version (``{p}:current``) and what its metadata says."""

    version: int
    seen: int
    offsets_total: int  # sum of the stored next offsets over the topic's partitions


def published(client: Any, keys: Keys, topic: str) -> Published:
    raw = client.get(keys.current)
    if raw is None:
        return Published(0, 0, 0)
    version = int(json.loads(raw)["version"])
    seen, offsets = client.hmget(keys.meta(version), "ratings_seen", "offsets")
    total = sum(int(o) for k, o in json.loads(offsets or b"{}").items() if k.rsplit(":", 1)[0] == topic)
    return Published(version, int(seen or 0), total)


@dataclass
class Kill:
    """The ``--kill-at`` kill of a run and the restart after it."""

    triggered_at_seen: int  # ratings_seen of the last version the watcher had seen
    report: KillReport
    at: Published  # the visible version once the tree was dead: what the new modeler restores
    lease_token: bytes | None  # the killed modeler's, still in Redis until its TTL runs out
    lease_ttl_left_s: float | None
    restarted: float  # time.time() just before the new process started
    log_path: Path  # the new process's log
    lease_taken: float | None = None  # when another token was first seen on the lease key

    def poll_lease(self, client: Any, key: str) -> None:
        if self.lease_taken is None:
            token = client.get(key)
            if token is not None and token != self.lease_token:
                self.lease_taken = time.time()

    def block(self, watcher: Watcher, final: Published, produced: int) -> dict[str, Any]:
        """The run's ``kill`` figures (seconds relative to starting the new process)."""
        first = watcher.first_after(self.at.version)
        marks = log_marks(self.log_path)

        def since_start(t: float | None) -> float | None:
            return None if t is None else round(t - self.restarted, 2)

        to_first = since_start(first.t if first else None)
        restored = marks.get("restored")
        return {
            "ratings_seen_triggered": self.triggered_at_seen,
            "ratings_seen_at_kill": self.at.seen,
            "version_at_kill": self.at.version,
            "mid_stream": 0 < self.at.seen < produced,
            "kill_seconds": self.report.seconds,
            "processes_killed": self.report.killed,
            "survivors": self.report.survivors,
            "zombies": self.report.zombies,
            "lease_ttl_left_at_kill_s": self.lease_ttl_left_s,
            "restart_seconds_to_first_version": to_first,
            "restart_seconds_from_kill_to_first_version":
                None if first is None else round(first.t - self.report.t, 2),
            "restart_seconds_to_lease": since_start(self.lease_taken),
            "restart_seconds_to_log": {name: since_start(t) for name, t in marks.items()},
            "restore_seconds_after_lease": None if restored is None or self.lease_taken is None
            else round(restored - self.lease_taken, 2),
            "first_version_after_restart": None if first is None else first.version,
            "first_version_ratings_seen": None if first is None else first.seen,
            "restart_goal_s": RESTART_GOAL_S,
            "restart_goal_met": to_first is not None and to_first <= RESTART_GOAL_S,
            "ratings_seen_final": final.seen,
            "offsets_total_final": final.offsets_total,
            "ratings_produced": produced,
            "exactly_once": final.seen == produced == final.offsets_total,
        }


def kill_and_restart(modeler: Modeler, sampler: TreeSampler, client: Any, keys: Keys, topic: str,
                     seen: int) -> Kill:
    """Kill the modeler's tree (:func:`kill_tree`) and start a new one with the same settings."""
    assert modeler.proc is not None
    report = kill_tree(modeler.proc)
    at = published(client, keys, topic)
    token = client.get(keys.lease)
    ttl_ms = int(client.pttl(keys.lease))
    log.info("kill -9 at version %d, ratings_seen %d: %s killed in %.2f s, survivors %s, zombies %d",
             at.version, at.seen, report.killed, report.seconds, report.survivors or "none", report.zombies)
    if report.survivors:
        log.warning("processes outlived the kill: %s", report.survivors)
    modeler.start()
    sampler.follow(modeler.current().pid)
    return Kill(seen, report, at, token, ttl_ms / 1000 if ttl_ms >= 0 else None, modeler.started, modeler.log_path)


def drain(modeler: Modeler, watcher: Watcher, sampler: TreeSampler, client: Any, keys: Keys, topic: str,
          args: argparse.Namespace) -> tuple[str | None, Kill | None]:
    """Until the published ``ratings_seen`` reaches ``--ratings``, with the ``--kill-at`` kill on
    the way; ``(why it stopped early or None, the kill or None)``."""
    deadline = time.monotonic() + args.timeout
    kill: Kill | None = None
    stopped = None
    while (seen := watcher.seen()) < args.ratings:
        modeler.current()  # raises if the modeler has exited
        if kill is not None:
            kill.poll_lease(client, keys.lease)
        if time.monotonic() > deadline:
            stopped = f"timeout after {args.timeout:.0f} s"
        elif sampler.peak_pss > args.max_memory_gb * 2**30:
            # A shared machine: a model that outgrows the guard is stopped, not let run
            # (at rank 50 every key holds ~10 KB of statistics, copied ~6 times per batch).
            stopped = f"memory guard: process tree PSS above {args.max_memory_gb} GB"
        if stopped:
            log.warning("%s: %s after %d of %d ratings", modeler.name, stopped, seen, args.ratings)
            break
        if kill is None and args.kill_at and seen >= args.kill_at * args.ratings:
            kill = kill_and_restart(modeler, sampler, client, keys, topic, seen)
        time.sleep(0.2)
    return stopped, kill


# ------------------------------------------------------------------ throughput


class Interval(NamedTuple):
    """One batch while draining: the time between two announcements, its ratings, and the
    keys in the model at its end."""

    seconds: float
    ratings: int
    keys: int


def intervals(versions: list[Version]) -> list[Interval]:
    return [Interval(b.t - a.t, b.seen - a.seen, b.keys) for a, b in itertools.pairwise(versions)]


def timed_intervals(versions: list[Version], kill_version: int | None, warmup: int) -> tuple[list[Interval], int]:
    """The batches the throughput figures time, and the warm-up used: from the ``warmup``-th
    version of each modeler process on (the first include Spark's start and the first Python
    workers), so never the gap of a restart after ``kill_version``. With too few versions for
    that (a small smoke run) the warm-up is timed too: warm-up 1, recorded in the JSON."""
    segments = [versions]
    if kill_version is not None:
        segments = [[v for v in versions if v.version <= kill_version],
                    [v for v in versions if v.version > kill_version]]
    for w, need in ((warmup, 2), (1, 1)):
        spans = [s for seg in segments for s in intervals(seg[w - 1:])]
        if len(spans) >= need:
            return spans, w
    raise RuntimeError("too few versions to time: raise --ratings")


def windows(spans: list[Interval], width: int) -> list[dict[str, Any]]:
    """Ratings/s and batch-interval p50/p95 per window of keys in the model (by the keys of
    the version that ends each batch)."""
    rows: dict[int, list[Interval]] = {}
    for s in spans:
        rows.setdefault(s.keys // width, []).append(s)
    out = []
    for w in sorted(rows):
        seconds = [s.seconds for s in rows[w]]
        n = sum(s.ratings for s in rows[w])
        out.append({
            "keys_from": w * width, "keys_to": (w + 1) * width, "batches": len(seconds),
            "ratings": n, "ratings_per_s": round(n / max(sum(seconds), 1e-9), 1),
            "batch_seconds_p50": round(float(np.percentile(seconds, 50)), 3),
            "batch_seconds_p95": round(float(np.percentile(seconds, 95)), 3),
            "batch_ratings_p50": float(np.percentile([s.ratings for s in rows[w]], 50)),
        })
    return out


# ------------------------------------------------------------------ freshness at full size


@dataclass
class FreshStream:
    """The ratings of a freshness phase."""

    messages: list[Message]
    repeated: int  # of them, (user, item) pairs rated before: the stream had too few new rows


def fresh_stream(ev: Events, backlog: int, count: int) -> FreshStream:
    """``count`` ratings that continue the backlog's stream: the generated rows after its first
    ``backlog``, keeping those whose user and item the backlog has (the model keeps its size).
    If there are too few they are cycled, and without any the backlog's own rows are."""
    from modeler.replay import encode

    later = np.arange(backlog, len(ev))
    known = np.isin(ev.users[later], ev.users[:backlog]) & np.isin(ev.items[later], ev.items[:backlog])
    pool = later[known]
    repeated = max(0, count - len(pool))
    if len(pool) == 0:
        pool, repeated = np.arange(backlog), count
    rows = np.resize(pool, count)  # cycles
    uid, iid = ev.user_ids, ev.item_ids
    messages = []
    for u, i, r, ts in zip(ev.users[rows].tolist(), ev.items[rows].tolist(), ev.values[rows].tolist(),
                           ev.timestamps[rows].tolist(), strict=True):
        user = uid[u]
        messages.append(Message(user.encode(), encode(user, iid[i], r, ts)))
    return FreshStream(messages, repeated)


def _record_sample(samples: list[Sample], sent: float, md: Any) -> None:
    """A send's callback (kafka-python's producer thread): the broker's record metadata ``md``."""
    samples.append(Sample(md.partition, md.offset, sent))


def send_steady(producer: Any, topic: str, messages: list[Message], rate: float, samples: list[Sample]) -> None:
    """``messages`` at ``rate`` per second (chunks of 1/50 s, as bench_modeler); every
    FRESH_SAMPLE_EVERY-th one's partition and offset (once the broker has it) and send time
    go to ``samples``."""
    chunk = max(1, int(rate / 50))
    t0 = time.monotonic()
    for start in range(0, len(messages), chunk):
        stop = min(start + chunk, len(messages))
        for j in range(start, stop):
            fut = producer.send(topic, key=messages[j].key, value=messages[j].value)
            if (j + 1) % FRESH_SAMPLE_EVERY == 0:
                fut.add_callback(_record_sample, samples, time.time())
        ahead = stop / rate - (time.monotonic() - t0)
        if ahead > 0:
            time.sleep(ahead)


def fresh_phase(modeler: Modeler, watcher: Watcher, broker_url: str, topic: str, redis_url: str, prefix: str,
                stream: FreshStream, rate: float, load: float, throughput: float) -> dict[str, Any]:
    """Produce ``stream`` at ``rate`` and measure the freshness of its samples (bench_modeler's
    phase 2: its offsets watcher, ``visible_at`` and ``wait_seen``); the run's ``fresh`` block."""
    from modeler.replay import make_producer

    offsets = OffsetWatcher(redis_url, prefix)
    offsets.start()
    try:
        base = watcher.versions[-1]
        n = len(stream.messages)
        samples: list[Sample] = []
        producer = make_producer(broker_url)
        t_wall, t0 = time.time(), time.monotonic()
        send_steady(producer, topic, stream.messages, rate, samples)
        producer.flush()
        producer.close()
        produce_s = time.monotonic() - t0
        caught_up = wait_seen(offsets, base.seen + n, 120 + n / rate, modeler.current())
        fresh = [t - s.sent for s in samples if (t := offsets.visible_at(s.partition, s.offset)) is not None]
    finally:
        offsets.stop.set()
        offsets.join(2)
    during = [v for v in watcher.versions if v.version > base.version]
    seen_end = offsets.seen()
    span = max(during[-1].t - t_wall if during else 0.0, produce_s)
    batches = intervals([base, *during])
    p95 = round(float(np.percentile(fresh, 95)), 3) if fresh else None
    result = {
        "seconds": round(n / rate, 1),
        "load": load,
        "measured_ratings_per_s": round(throughput, 1),
        "rate_offered": rate,
        "produce_seconds": round(produce_s, 2),
        "ratings_produced": n,
        "repeated_pairs": stream.repeated,
        "steady_ratings_per_s": round((seen_end - base.seen) / max(span, 1e-9), 1),
        "caught_up": caught_up,
        "ratings_seen_before": base.seen,
        "ratings_seen_end": seen_end,
        "counted_once": seen_end == base.seen + n,
        "freshness_p50_s": round(float(np.percentile(fresh, 50)), 3) if fresh else None,
        "freshness_p95_s": p95,
        "freshness_max_s": round(max(fresh), 3) if fresh else None,
        "freshness_samples": len(fresh),
        "freshness_unmatched": len(samples) - len(fresh),
        "sample_every": FRESH_SAMPLE_EVERY,
        "freshness_p95_goal_s": FRESHNESS_P95_GOAL_S,
        "freshness_goal_met": p95 is not None and p95 <= FRESHNESS_P95_GOAL_S,
        "versions": len(during),
        "batch_seconds_p50": round(float(np.percentile([b.seconds for b in batches], 50)), 3) if batches else None,
        "batch_ratings_p50": float(np.percentile([b.ratings for b in batches], 50)) if batches else None,
        "keys_in_model_before": base.keys,
        "keys_in_model_min": min((v.keys for v in during), default=None),
        "keys_in_model_max": max((v.keys for v in during), default=None),
    }
    log.info("%s fresh: %.0f ratings/s offered for %.0f s, freshness p50 %s s p95 %s s over %d samples",
             modeler.name, rate, n / rate, result["freshness_p50_s"], p95, len(fresh))
    return result


# ------------------------------------------------------------------ the backlog, Redis, the predictor


def generate_backlog(n: int, seed: int) -> tuple[Events, float]:
    """The ML-25M-shaped ratings whose first ``n`` are the backlog (the rest continue the stream
    for a freshness phase), and the seconds it took."""
    from common.synthetic import generate_events

    t0 = time.perf_counter()
    # generate_events gives every user at least 20 ratings (3.25M at ML-25M's user count);
    # a random interleaving's first n rows are a uniform sample of them.
    ev = generate_events(ML25M_USERS, ML25M_ITEMS, max(n, 20 * ML25M_USERS), implicit=False, seed=seed)
    return ev, time.perf_counter() - t0


def produce_backlog(bootstrap: str, topic: str, ev: Events, n: int, gen_s: float) -> dict[str, Any]:
    """The first ``n`` ratings of ``ev`` into ``topic`` (keyed by user); returns figures."""
    from modeler.replay import encode, make_producer

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
    log.info("backlog: %d ratings (%d users, %d items) generated in %.1f s, produced into %s in %.1f s",
             n, n_users, n_items, gen_s, topic, produce_s)
    return {"ratings": n, "distinct_users": n_users, "distinct_items": n_items,
            "keys": n_users + n_items, "generate_seconds": round(gen_s, 1),
            "produce_seconds": round(produce_s, 1)}


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


# ------------------------------------------------------------------ one run


def modeler_env(broker_url: str, topic: str, redis_url: str, prefix: str, rank: int, store: str,
                args: argparse.Namespace) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "KAFKA_BOOTSTRAP_SERVERS": broker_url, "RATINGS_TOPIC": topic, "DLQ_TOPIC": f"{topic}.dlq",
        "REDIS_URL": redis_url, "REDIS_PREFIX": prefix, "SPARK_MASTER": "local[2]",
        "MODELER_BATCH_MAX_RECORDS": str(args.batch_max_records), "MODELER_BATCH_MAX_INTERVAL_S": "0.1",
        "MODELER_METRICS_PORT": "0", "LOG_FORMAT": "text", "MODEL_RANK": str(rank),
        "MODELER_STATE_STORE": store,
    })
    if args.ranking_rank:
        env["MODEL_RANKING_RANK"] = str(rank if args.ranking_rank == "same" else args.ranking_rank)
    return env


def run_rank(broker_url: str, topic: str, rank: int, args: argparse.Namespace, out_dir: Path,
             store: str = "resident", events: Events | None = None) -> dict[str, Any]:
    """Drain the backlog in ``topic`` (killing and restarting the modeler on the way with
    ``--kill-at``), then the freshness phase (``--fresh-seconds``, continuing ``events``), then
    Redis and the predictor with the final version."""
    import redis

    from devstack.services import start_redis

    redis_proc = start_redis()
    prefix = f"scale{rank}{store}"
    keys = Keys(prefix)
    modeler = Modeler(modeler_env(broker_url, topic, redis_proc.url, prefix, rank, store, args), out_dir,
                      f"rank{rank}-{store}")
    watcher = sampler = None
    try:
        client = redis.Redis.from_url(redis_proc.url)
        base_memory = int(client.info("memory")["used_memory"])
        watcher = Watcher(redis_proc.url, prefix)
        watcher.start()
        t_start = time.time()
        sampler = TreeSampler(modeler.start().pid)
        sampler.start()
        stopped, kill = drain(modeler, watcher, sampler, client, keys, topic, args)
        drained = published(client, keys, topic)
        versions = list(watcher.versions)
        spans, warmup = timed_intervals(versions, kill.at.version if kill else None, args.warmup)
        timed = sum(s.ratings for s in spans)
        span = sum(s.seconds for s in spans)
        throughput = timed / max(span, 1e-9)
        seconds = [s.seconds for s in spans]
        kill_block = None
        if args.kill_at:
            kill_block = {"at_fraction": args.kill_at, **(
                kill.block(watcher, drained, args.ratings) if kill is not None
                else {"skipped": stopped or "ratings_seen went from below the fraction to the whole backlog"})}
        fresh_block = None
        if args.fresh_seconds:
            if stopped or events is None:
                fresh_block = {"skipped": stopped or "no generated stream to continue"}
            else:
                rate = max(100.0, round(args.fresh_load * throughput, -2))
                stream = fresh_stream(events, args.ratings, int(rate * args.fresh_seconds))
                fresh_block = fresh_phase(modeler, watcher, broker_url, topic, redis_proc.url, prefix, stream,
                                          rate, args.fresh_load, throughput)
        sampler.stop.set()
        sampler.join(5)
        with open(out_dir / f"scale-memory-rank{rank}-{store}.jsonl", "w") as fh:
            for t, by_rss, by_pss in sampler.timeline:
                fh.write(json.dumps({"t": round(t, 2), "rss": by_rss, "pss": by_pss}) + "\n")
        # Freeze the model: stop the modeler before measuring Redis and the predictor.
        left_after_stop = modeler.stop()
        if left_after_stop:
            log.warning("still running after the modeler stopped: %s", left_after_stop)
        final = watcher.versions[-1]
        rfig = redis_figures(client, prefix, final.seen)
        rfig["used_memory_model"] = rfig["used_memory"] - base_memory
        meta = client.hgetall(keys.meta(final.version))
        pfig = predictor_figures(redis_proc.url, prefix, final.version)
        metrics = [json.loads(m) for m in client.lrange(keys.metrics, 0, -1)]
        before_publish = [m["batch_seconds"] for m in metrics if "batch_seconds" in m]
        result = {
            "rank": rank,
            "stopped": stopped,
            "topic": topic,
            "ranking_rank": int(meta.get(b"ranking_rank", b"0")),
            "models": json.loads(meta.get(b"models", b'["explicit"]')),
            "ratings_seen": versions[-1].seen,  # the drained backlog (the freshness phase's are in "fresh")
            "ratings_timed": timed,
            "seconds_timed": round(span, 1),
            "seconds_total": round(versions[-1].t - t_start, 1),
            "ratings_per_s": round(throughput, 1),
            "warmup_versions": warmup,
            "timing_excludes_restart": kill is not None,
            "batch_seconds_p50": round(float(np.percentile(seconds, 50)), 3),
            "batch_seconds_p95": round(float(np.percentile(seconds, 95)), 3),
            "batch_seconds_before_publish_p50": round(float(np.percentile(before_publish, 50)), 3)
            if before_publish else None,
            "keys_final": final.keys,
            "users_final": int(meta[b"n_users"]),
            "items_final": int(meta[b"n_items"]),
            "versions": final.version,
            "windows": windows(spans, args.window),
            "modeler_peak_rss_bytes": sampler.peak_rss,
            "modeler_peak_pss_bytes": sampler.peak_pss,
            "modeler_peak_rss_by_process_kind": sampler.peak_by_kind,
            "modeler_peak_pss_by_process_kind": sampler.peak_pss_by_kind,
            "modeler_peak_pss_sample": peak_sample(sampler.timeline),
            "redis": rfig,
            "predictor": pfig,
            "load_average_1m_at_end": round(os.getloadavg()[0], 2),
            "processes_left_after_stop": left_after_stop,
        }
        if kill_block is not None:
            result["kill"] = kill_block
        if fresh_block is not None:
            result["fresh"] = fresh_block
            result["ratings_seen_end"] = final.seen
        log.info("rank %d: %.0f ratings/s over %d ratings, %d keys, peak PSS %.0f MB, Redis %.0f MB",
                 rank, result["ratings_per_s"], timed, final.keys, sampler.peak_pss / 2**20,
                 rfig["used_memory"] / 2**20)
        return result
    finally:
        if sampler is not None:
            sampler.stop.set()
        if watcher is not None:
            watcher.stop.set()
            watcher.join(2)  # before Redis goes: its pubsub would raise in the thread
        modeler.kill()
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




def fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not in [0, 1)")
    return value


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
    parser.add_argument("--warmup", type=int, default=3,
                        help="first versions of each modeler process not timed (Spark start)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="per rank, seconds to drain the backlog")
    parser.add_argument("--max-memory-gb", type=float, default=8.0,
                        help="stop a rank's run when the modeler's process tree passes this PSS")
    parser.add_argument("--kill-at", type=fraction, default=0.0, metavar="FRACTION",
                        help="kill -9 the modeler's whole process tree once ratings_seen passes this fraction"
                             " of --ratings, restart it and check exactly-once (0: off)")
    parser.add_argument("--fresh-seconds", type=float, default=0.0,
                        help="after the drain, produce ratings at a steady rate for this long and measure"
                             " their freshness (0: off)")
    parser.add_argument("--fresh-load", type=float, default=0.7,
                        help="the freshness phase's rate as a fraction of the run's measured ratings/s")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", default=str(ROOT / "build" / "bench" / "scale.json"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("kafka").setLevel(logging.ERROR)

    from devstack.services import create_topics, start_broker

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    ranks = [int(r) for r in args.ranks.split(",") if r.strip()]
    events, gen_s = generate_backlog(args.ratings, args.seed)
    broker = start_broker()
    try:
        topic = "scale-ratings"
        create_topics(broker.url, {topic: 4, f"{topic}.dlq": 1})
        backlog = produce_backlog(broker.url, topic, events, args.ratings, gen_s)
        result: dict[str, Any] = {
            "backlog": backlog,
            "runs": [],
            "spark_master": "local[2]",
            "batch_max_records": args.batch_max_records,
            "kill_at": args.kill_at,
            "fresh_seconds": args.fresh_seconds,
            "cpu_count": os.cpu_count(),
            "note": "shared machine: times are inflated by other jobs (see load averages)",
        }
        stores = [x.strip() for x in args.stores.split(",") if x.strip()]
        for k, (rank, store) in enumerate(itertools.product(ranks, stores)):
            run_topic = topic
            if k and args.fresh_seconds:
                # The previous run's fresh ratings are in the first topic: a copy of the backlog alone.
                run_topic = f"{topic}-{k + 1}"
                create_topics(broker.url, {run_topic: 4, f"{run_topic}.dlq": 1})
                produce_backlog(broker.url, run_topic, events, args.ratings, gen_s)
            try:
                run = run_rank(broker.url, run_topic, rank, args, out.parent, store, events)
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
