"""`make up` runs `python -m devstack up`: it starts real infrastructure, says what it
started, and stops everything on Ctrl-C."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parents[2]


def test_up_starts_infrastructure_and_stops_cleanly_on_ctrl_c(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in {"REDIS_URL", "KAFKA_BOOTSTRAP_SERVERS"}}
    proc = subprocess.Popen(
        [sys.executable, "-m", "devstack", "up", "--services", "", "--workdir", str(tmp_path),
         "--predictor-port", "0", "--frontend-port", "0"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    lines: list[str] = []
    deadline = time.monotonic() + 90
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if "Ctrl-C stops everything" in line:
            break
    out = "".join(lines)
    assert "streamrec is up" in out, out
    redis_url = next(line.split()[1] for line in lines if line.strip().startswith("redis "))
    assert redis.Redis.from_url(redis_url).ping()
    assert "dataset" in out and "ratings.csv" in out
    proc.send_signal(signal.SIGINT)
    rest = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0, rest
    assert "stopped everything" in rest
    try:
        redis.Redis.from_url(redis_url, socket_connect_timeout=1).ping()
    except redis.ConnectionError:
        pass
    else:
        raise AssertionError("redis-server still running after up stopped")
