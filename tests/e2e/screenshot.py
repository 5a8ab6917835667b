"""The README screenshot: ``python -m tests.e2e.screenshot [--out docs/screenshot.png]``.

Runs ``python -m devstack up`` (what ``make up`` runs: broker, Redis, catalogue, modeler,
predictor, frontend, ml-latest-small replayed into Kafka), then a headless Chromium rates a
few movies as a new visitor, waits until the streaming model has learned them and a few more
versions have been published, and saves a full-page screenshot. Everything ``up`` started is
stopped at the end (it is also told to exit on its own after a while).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.e2e.conftest import CHROMIUM_ARGS, ROOT, chromium_path, rate

VISITOR_RATINGS = [
    ("matrix", "Matrix, The (1999)", 5),
    ("star wars: episode iv", "Star Wars: Episode IV", 4.5),
    ("amelie", "Amelie", 4),
    ("titanic", "Titanic (1997)", 1.5),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.e2e.screenshot")
    parser.add_argument("--out", default=str(ROOT / "docs" / "screenshot.png"))
    parser.add_argument("--rate", type=int, default=500, help="replay rate, ratings/s")
    parser.add_argument("--versions", type=int, default=6,
                        help="model versions to wait for before the final screenshot")
    args = parser.parse_args(argv)

    env = {k: v for k, v in os.environ.items() if k not in {"REDIS_URL", "KAFKA_BOOTSTRAP_SERVERS"}}
    workdir = tempfile.mkdtemp(prefix="streamrec-shot-")
    up = subprocess.Popen(
        [sys.executable, "-m", "devstack", "up", "--exit-after", "600", "--workdir", workdir,
         "--predictor-port", "0", "--frontend-port", "0", "--rate", str(args.rate)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = None
        assert up.stdout is not None
        for line in up.stdout:
            sys.stderr.write(line)
            found = re.search(r"frontend\s+(http://\S+?)/", line)
            if found:
                url = found.group(1)
            if "Ctrl-C" in line:
                break
        if url is None:
            sys.stderr.write("the frontend did not come up\n")
            return 1
        shoot(url, Path(args.out), args.versions)
        return 0
    finally:
        if up.poll() is None:
            up.send_signal(signal.SIGINT)
            try:
                up.wait(90)
            except subprocess.TimeoutExpired:
                up.kill()


def shoot(url: str, out: Path, versions: int) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            tempfile.mkdtemp(prefix="streamrec-chromium-"), executable_path=chromium_path(),
            headless=True, args=CHROMIUM_ARGS, viewport={"width": 1280, "height": 1000})
        try:
            page = context.new_page()
            page.goto(url + "/")
            page.locator("#m-version").filter(has_text=re.compile(r"\d")).wait_for(timeout=300_000)
            for query, title, stars in VISITOR_RATINGS:
                rate(page, title, query, stars)
            page.locator('#recs[data-strategy="model"] li.movie').first.wait_for(timeout=300_000)
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                if int(page.locator("#m-version").inner_text() or 0) >= versions:
                    break
                page.wait_for_timeout(1000)
            page.mouse.move(0, 0)
            page.evaluate("window.scrollTo(0, 0)")
            out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(out), full_page=True)
            sys.stderr.write(f"saved {out}\n")
        finally:
            context.close()


if __name__ == "__main__":
    sys.exit(main())
