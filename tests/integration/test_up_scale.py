"""`make up` refuses a dataset on another rating scale before it starts anything."""

import os
import subprocess
import sys
from pathlib import Path

from devstack.__main__ import check_dataset

ROOT = Path(__file__).resolve().parents[2]


def _ten(path: Path) -> Path:
    path.write_text("userId,movieId,rating,timestamp\n" + "".join(f"{u % 7},{u},{u % 11},{u}\n" for u in range(300)))
    return path


def test_check_dataset_names_the_range_and_the_settings(tmp_path):
    ten = _ten(tmp_path / "ratings.csv")
    problem = check_dataset(ten, {})
    assert problem is not None and "span 0..10" in problem and "RATING_MIN=0 RATING_MAX=10" in problem
    assert check_dataset(ten, {"RATING_MIN": "0", "RATING_MAX": "10"}) is None
    assert "not numbers" in (check_dataset(ten, {"RATING_MIN": "zero"}) or "")
    assert "must be below" in (check_dataset(ten, {"RATING_MIN": "5", "RATING_MAX": "1"}) or "")
    plays = tmp_path / "plays.tsv"
    plays.write_text("user\titem\tweight\n1\t2\t500\n1\t3\t9000\n")
    assert check_dataset(plays, {}) is None  # weights have no scale


def test_up_exits_with_the_message_and_starts_nothing(tmp_path):
    ten = _ten(tmp_path / "ratings.csv")
    env = {k: v for k, v in os.environ.items()
           if k not in {"REDIS_URL", "KAFKA_BOOTSTRAP_SERVERS", "RATING_MIN", "RATING_MAX"}}
    proc = subprocess.run(
        [sys.executable, "-m", "devstack", "up", "--ratings", str(ten), "--services", "",
         "--workdir", str(tmp_path / "up")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "up: " in proc.stderr and "RATING_MIN=0 RATING_MAX=10" in proc.stderr
    assert "Traceback" not in proc.stderr and "streamrec is up" not in proc.stdout
    assert not (tmp_path / "up" / "redis").exists()  # no Redis was started
