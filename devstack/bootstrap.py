"""System-level prerequisites that pip cannot provide: Java for Spark, Chromium for the
browser test. Installed with apt-get when we are root and they are missing; otherwise
we say exactly what is missing (the tests that need them then fail with that message)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

APT_PACKAGES = {
    # binary on PATH -> Debian package
    "java": "openjdk-17-jre-headless",
    "chromium": "chromium",
}


def main() -> int:
    missing = [pkg for binary, pkg in APT_PACKAGES.items() if shutil.which(binary) is None]
    if not missing:
        return 0
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        print(f"bootstrap: missing system packages {missing}; install them "
              f"(apt-get install -y {' '.join(missing)})", file=sys.stderr)
        return 0
    print(f"bootstrap: installing {' '.join(missing)} with apt-get", file=sys.stderr)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=False, env=env)
    done = subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=False, env=env)
    return 0 if done.returncode == 0 else done.returncode


if __name__ == "__main__":
    sys.exit(main())
