"""The modeler service in tests: settings on the shared broker and Redis, ratings from
ml-latest-small, running until a count is learned, and readers of a published version that use
only the documented key layout (``common.keys``) with a plain redis client and numpy."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis

from common.datasets import read_ratings
from modeler.config import ModelerSettings
from modeler.service import ModelerService


def settings_for(bootstrap: str, topic: str, redis_url: str, prefix: str, **extra: object) -> ModelerSettings:
    env = {
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "RATINGS_TOPIC": topic,
        "DLQ_TOPIC": f"{topic}.dlq",
        "REDIS_URL": redis_url,
        "REDIS_PREFIX": prefix,
        "MODEL_RANK": 6,
        "MODEL_ITERATIONS": 2,
        "MODEL_NUM_PARTITIONS": 4,
        "MODELER_BATCH_MAX_INTERVAL_S": 0.2,
        "MODELER_LEASE_TTL_S": 5,
        "MODELER_RETRY_MAX_BACKOFF_S": 1.0,
        "MODELER_METRICS_PORT": 0,
    }
    env.update({k: v for k, v in extra.items()})
    return ModelerSettings(**env)


def ml_rows(ml_small, n: int, seed: int = 0) -> list[tuple[str, str, float, int]]:
    rows = read_ratings(ml_small / "ratings.csv")
    rows = sorted(rows, key=lambda r: (r.timestamp, r.user, r.item))[:n]
    return [(r.user, r.item, float(r.rating), int(r.timestamp)) for r in rows]


def plain_snapshot(client: redis.Redis, prefix: str) -> dict:
    """Read the visible version with nothing but the documented key layout."""
    for _ in range(10):
        pointer = json.loads(client.get(f"{prefix}:current"))
        meta = {k.decode(): v.decode() for k, v in client.hgetall(f"{prefix}:ver:{pointer['version']}").items()}
        rank = int(meta["rank"])
        out: dict = {"pointer": pointer, "meta": meta, "rank": rank}
        complete = True
        for kind in ("users", "items"):
            merged: dict[str, bytes] = {}
            for seg in pointer["segments"]:  # oldest first, newer records override
                raw = client.hgetall(f"{prefix}:seg:{seg}:{kind}")
                if not raw and seg == pointer["segments"][0]:
                    complete = False
                merged.update({k.decode(): v for k, v in raw.items()})
            out[kind] = {
                k: (float(a[0]), a[1:]) for k, a in ((k, np.frombuffer(v, "<f4")) for k, v in merged.items())
            }
            for k, (_, vec) in out[kind].items():
                assert vec.shape == (rank,), f"{kind} {k}: record is not rank {rank}"
        if complete and client.exists(f"{prefix}:ver:{pointer['version']}"):
            return out
    raise AssertionError("could not read a consistent version")


def plain_predict(snap: dict, user: str, item: str) -> float:
    mu = float(snap["meta"]["mu"])
    bu, pu = snap["users"].get(user, (0.0, np.zeros(snap["rank"], np.float32)))
    bi, qi = snap["items"].get(item, (0.0, np.zeros(snap["rank"], np.float32)))
    lo, hi = float(snap["meta"]["rating_min"]), float(snap["meta"]["rating_max"])
    return float(np.clip(mu + bu + bi + float(pu @ qi), lo, hi))


def run_until_seen(service: ModelerService, n: int, timeout: float = 180.0, counter: str = "ratings_seen") -> None:
    """Run the service until its model's ``counter`` (``ratings_seen``, or ``events_seen``
    for a stream with implicit events) reaches ``n``; TimeoutError after ``timeout`` s."""
    deadline = time.monotonic() + timeout

    def done(svc: ModelerService) -> bool:
        seen = getattr(svc.model, counter) if svc.model is not None else 0
        if time.monotonic() > deadline:
            raise TimeoutError(f"{counter} {seen} < {n} after {timeout} s")
        return seen >= n

    service.run(until=done)


def plain_ranking(client: redis.Redis, prefix: str) -> tuple[dict, dict]:
    """The visible version's ranking factor set, read with the documented layout only."""
    pointer = json.loads(client.get(f"{prefix}:current"))
    meta = {k.decode(): v.decode() for k, v in client.hgetall(f"{prefix}:ver:{pointer['version']}").items()}
    rank = int(meta["ranking_rank"])
    out = []
    for kind in ("users", "items"):
        merged: dict[str, bytes] = {}
        for seg in pointer["segments"]:
            merged.update({k.decode(): v for k, v in client.hgetall(f"{prefix}:seg:{seg}:ranking:{kind}").items()})
        table = {}
        for k, v in merged.items():
            rec = np.frombuffer(v, "<f4")
            assert rec.shape == (rank + 1,) and rec[0] == 0.0  # bias slot reserved
            table[k] = rec[1:]
        out.append(table)
    return out[0], out[1]


# ------------------------------------------------------------- python -m modeler as a process

ROOT = Path(__file__).resolve().parents[2]


def start_modeler(env: dict[str, str], log_path: Path) -> subprocess.Popen:
    log = open(log_path, "ab")  # noqa: SIM115 - the child owns it
    return subprocess.Popen(
        [sys.executable, "-m", "modeler"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL, start_new_session=True,
    )


@contextlib.contextmanager
def reaped(proc: subprocess.Popen) -> Iterator[subprocess.Popen]:
    """``proc`` is killed and waited for when the block ends, whatever happened in it."""
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def kill_9(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)


def published(client: redis.Redis, prefix: str) -> tuple[int, int]:
    """(version, ratings_seen) of the visible version, (0, 0) before the first."""
    raw = client.get(f"{prefix}:current")
    if raw is None:
        return 0, 0
    version = json.loads(raw)["version"]
    seen = client.hget(f"{prefix}:ver:{version}", "ratings_seen")
    return version, int(seen or 0)


def wait_for(cond, timeout: float, proc: subprocess.Popen, log_path: Path, what: str) -> None:
    """Until ``cond()``; fails with the modeler's log if it exits or the time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        if proc.poll() is not None:
            pytest.fail(f"modeler exited ({proc.returncode}) before {what}:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}:\n{log_path.read_text()[-3000:]}")


def assert_complete_once(client: redis.Redis, prefix: str, rows: list) -> dict:
    """The current version holds every user and item of ``rows``, each rating counted once
    (``ratings_seen`` and the stored offsets); returns the snapshot."""
    snap = plain_snapshot(client, prefix)
    meta = snap["meta"]
    assert int(meta["ratings_seen"]) == len(rows)
    assert sum(json.loads(meta["offsets"]).values()) == len(rows)
    assert set(snap["users"]) == {r[0] for r in rows}
    assert set(snap["items"]) == {r[1] for r in rows}
    return snap
