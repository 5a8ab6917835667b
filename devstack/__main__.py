"""``python -m devstack up``: the whole local stack on embedded defaults.

Starts (or uses, when their env vars are set) a Kafka-protocol broker and Redis, creates the
topics, finds a dataset, loads the catalogue, starts the modeler, the predictor and the
frontend, streams the ratings in, prints the URLs and waits. Ctrl-C stops everything it
started, in reverse order.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

from common.logging import setup_logging
from devstack.services import (
    MissingDependency,
    Process,
    check_java,
    create_topics,
    free_port,
    start_broker,
    start_redis,
)

log = logging.getLogger("devstack")
ROOT = Path(__file__).resolve().parent.parent
SHARED_SMALL = ROOT.parent / "shared" / "data" / "ml-latest-small" / "ratings.csv"
GROUPLENS_SMALL = "https://files.grouplens.org/datasets/movielens/ml-latest-small.zip"


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _preferred_port(port: int) -> int | None:
    """The conventional port if free, else let the service pick a free one."""
    return port if _port_free(port) else None


def find_dataset(explicit: str | None, workdir: Path) -> tuple[Path, str]:
    """Ratings file to stream, and where it came from."""
    if explicit:
        path = Path(explicit)
        if not path.exists():
            raise SystemExit(f"up: --ratings {path}: no such file")
        return path, "given"
    if SHARED_SMALL.exists():
        return SHARED_SMALL, "../shared/data/ml-latest-small"
    cached = workdir / "data" / "ml-latest-small" / "ratings.csv"
    if cached.exists():
        return cached, "downloaded earlier"
    try:
        target = workdir / "data"
        target.mkdir(parents=True, exist_ok=True)
        zip_path = target / "ml-latest-small.zip"
        log.info("downloading %s", GROUPLENS_SMALL)
        with urllib.request.urlopen(GROUPLENS_SMALL, timeout=15) as resp:
            zip_path.write_bytes(resp.read())
        with zipfile.ZipFile(zip_path) as zf:
            zf.extractall(target)
        return cached, "GroupLens download"
    except (OSError, zipfile.BadZipFile) as exc:
        log.warning("download failed (%s); generating synthetic MovieLens-shaped data instead", exc)
    from common.synthetic import generate, write_movielens

    rows, movies = generate(n_users=800, n_items=3000, n_ratings=100_000, seed=42)[:2]
    ratings, _ = write_movielens(workdir / "data" / "synthetic", rows, movies)
    return ratings, "synthetic generator (no dataset found and no download possible)"


def check_dataset(path: Path, env: dict[str, str]) -> str | None:
    """Why ``path`` cannot be streamed with the scale of ``env`` (``RATING_MIN``/``RATING_MAX``),
    or ``None``: its format is unknown, or more than 1% of its ratings are off the scale."""
    from common.datasets import check_scale
    from common.errors import DatasetError
    from common.schema import DEFAULT_RATING_MAX, DEFAULT_RATING_MIN, RatingScale

    try:
        lo = float(env.get("RATING_MIN") or DEFAULT_RATING_MIN)
        hi = float(env.get("RATING_MAX") or DEFAULT_RATING_MAX)
    except ValueError:
        return (f"RATING_MIN={env.get('RATING_MIN')!r} / RATING_MAX={env.get('RATING_MAX')!r}: "
                f"not numbers")
    if not lo < hi:
        return f"RATING_MIN={lo:g} must be below RATING_MAX={hi:g}"
    try:
        check_scale(path, RatingScale(min=lo, max=hi))
    except DatasetError as exc:
        return str(exc)
    return None


def _has_main(module: str) -> bool:
    return importlib.util.find_spec(module) is not None and importlib.util.find_spec(f"{module}.__main__") is not None


class Stack:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.logs = workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.started: list[Process] = []

    def run(self, name: str, args: list[str], env: dict[str, str]) -> Process:
        log_path = self.logs / f"{name}.log"
        fh = open(log_path, "ab")  # noqa: SIM115 - the child owns it
        proc = subprocess.Popen(
            [sys.executable, "-m", *args], env=env, stdout=fh, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, cwd=ROOT, start_new_session=True,
        )
        p = Process(name, proc, "", None, log_path)
        self.started.append(p)
        return p

    def stop(self) -> None:
        for p in reversed(self.started):
            if p.alive():
                log.info("stopping %s", p.name)
            p.stop(timeout=20)


def _wait_http(url: str, proc: Process, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            return False
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as resp:
            if resp.status < 500:
                return True
        time.sleep(0.5)
    return False


def up(args: argparse.Namespace) -> int:
    workdir = Path(args.workdir).resolve()
    stack = Stack(workdir)
    env = dict(os.environ)
    env.setdefault("REDIS_PREFIX", "rec")
    env.setdefault("SPARK_MASTER", "local[2]")
    env["PYTHONUNBUFFERED"] = "1"
    summary: list[str] = []
    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    # The dataset first, and its rating scale checked, before anything is started: a file on
    # another scale (0-10) would otherwise lose every rating above 5 in the replay, silently.
    ratings, origin = find_dataset(args.ratings or os.environ.get("RATINGS_FILE"), workdir)
    problem = check_dataset(ratings, env)
    if problem:
        print(f"up: {problem}", file=sys.stderr, flush=True)
        return 2
    try:
        if not env.get("KAFKA_BOOTSTRAP_SERVERS"):
            broker = start_broker(_preferred_port(9092), workdir / "broker")
            stack.started.append(broker)
            env["KAFKA_BOOTSTRAP_SERVERS"] = broker.url
            summary.append(f"broker     {broker.url}  (Tansu, Kafka protocol, in-memory)")
        else:
            summary.append(f"broker     {env['KAFKA_BOOTSTRAP_SERVERS']}  (external)")
        if not env.get("REDIS_URL"):
            if args.fresh:
                shutil.rmtree(workdir / "redis", ignore_errors=True)
            redis = start_redis(_preferred_port(6379), workdir / "redis", persist=True)
            stack.started.append(redis)
            env["REDIS_URL"] = redis.url
            summary.append(f"redis      {redis.url}")
        else:
            summary.append(f"redis      {env['REDIS_URL']}  (external)")
        topic = env.get("RATINGS_TOPIC", "ratings")
        create_topics(env["KAFKA_BOOTSTRAP_SERVERS"], {topic: 4, env.get("DLQ_TOPIC", "ratings.dlq"): 1})

        summary.append(f"dataset    {ratings}  ({origin})")
        from common.catalog import find_movies_file

        movies = find_movies_file(ratings)
        if _has_main("predictor") and importlib.util.find_spec("predictor.load_catalog"):
            cmd = ["predictor.load_catalog", "--ratings", str(ratings)]
            if movies:
                cmd += ["--movies", str(movies)]
            loader = stack.run("load-catalog", cmd, env)
            loader.proc.wait(300)
            summary.append(f"catalogue  {movies or 'none found'} -> Redis (exit {loader.proc.returncode})")

        services = [s.strip() for s in args.services.split(",") if s.strip()]
        urls: list[str] = []
        if "modeler" in services and _has_main("modeler"):
            check_java()
            env.setdefault("MODELER_METRICS_PORT", str(_preferred_port(9400) or 0))
            stack.run("modeler", ["modeler"], env)
            summary.append(f"modeler    Spark {env['SPARK_MASTER']}, metrics :{env['MODELER_METRICS_PORT']}/metrics")
        for name, preferred, env_port in (
            ("predictor", args.predictor_port, "PREDICTOR_PORT"),
            ("frontend", args.frontend_port, "FRONTEND_PORT"),
        ):
            if name not in services or not _has_main(name):
                continue
            port = _preferred_port(preferred) or free_port()
            env[env_port] = str(port)
            url = f"http://127.0.0.1:{port}"
            if name == "predictor":
                env["PREDICTOR_URL"] = url  # the frontend, started next, reads through it
            p = stack.run(name, [name], env)
            if not _wait_http(f"{url}/healthz", p, 60):
                summary.append(f"{name:<10} did not come up; see {p.log_path}")
            elif name == "frontend":
                urls.insert(0, f"frontend   {url}/   <- open this page")
            else:
                urls.append(f"predictor  {url}/docs")
        if "replay" in services and importlib.util.find_spec("modeler.replay"):
            stored = _stored_model(env)
            if stored:
                # Redis keeps the model between runs, the in-memory broker does not: replaying
                # the dataset again would teach the model every rating a second time.
                summary.append(f"replay     skipped: Redis holds model version {stored[0]} "
                               f"({stored[1]} ratings seen); `make up FRESH=1` starts over")
            else:
                cmd = ["modeler.replay", "--ratings", str(ratings), "--rate", str(args.rate), "--no-progress"]
                stack.run("replay", cmd, env)
                summary.append(f"replay     {ratings.name} -> topic {topic} at {args.rate} ratings/s")

        print("\nstreamrec is up:\n  " + "\n  ".join(summary + urls), flush=True)
        print(f"  logs       {stack.logs}\nCtrl-C stops everything.", flush=True)
        deadline = time.monotonic() + args.exit_after if args.exit_after else None
        while not stopping and (deadline is None or time.monotonic() < deadline):
            dead = [p for p in stack.started if not p.alive() and p.name not in {"load-catalog", "replay"}]
            if dead:
                for p in dead:
                    print(f"{p.name} exited with {p.proc.returncode}; see {p.log_path}", flush=True)
                stack.started = [p for p in stack.started if p not in dead]
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    except MissingDependency as exc:
        print(f"up: {exc}", file=sys.stderr)
        return 2
    finally:
        stack.stop()
        print("stopped everything `up` started.", flush=True)
    return 0


def _stored_model(env: dict[str, str]) -> tuple[int, int] | None:
    """(version, ratings seen) of the model Redis already holds under the stack's prefix."""
    import redis as redis_lib

    from common.keys import Keys
    from common.snapshot import read_meta, read_pointer

    keys = Keys(env["REDIS_PREFIX"])  # set (or defaulted) when the stack's env was built
    try:
        with redis_lib.Redis.from_url(env["REDIS_URL"], socket_timeout=5) as client:
            pointer = read_pointer(client, keys)
            meta = read_meta(client, keys, pointer.version) if pointer else None
    except redis_lib.RedisError:
        return None
    return (pointer.version, meta.ratings_seen) if pointer and meta else None


def main(argv: list[str] | None = None) -> int:
    setup_logging("INFO")
    logging.getLogger("kafka").setLevel(logging.WARNING)
    parser = argparse.ArgumentParser(prog="python -m devstack")
    sub = parser.add_subparsers(dest="command", required=True)
    p_up = sub.add_parser("up", help="start the whole local stack")
    p_up.add_argument("--ratings", help="ratings file (any MovieLens format); default ml-latest-small")
    p_up.add_argument("--rate", type=int, default=2000, help="replay rate, ratings per second")
    p_up.add_argument("--services", default="modeler,predictor,frontend,replay")
    p_up.add_argument("--predictor-port", type=int, default=8000)
    p_up.add_argument("--frontend-port", type=int, default=8080)
    p_up.add_argument("--workdir", default=str(ROOT / "build" / "up"))
    p_up.add_argument("--fresh", action="store_true",
                      help="start with an empty Redis: forget the stored model and replay the dataset")
    p_up.add_argument("--exit-after", type=float, default=0, help="stop after N seconds (smoke runs)")
    args = parser.parse_args(argv)
    if args.command == "up":
        return up(args)
    return 1


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
