"""What the modeler needs from its machine beyond Python packages: a Java runtime for Spark.

Kept apart from :mod:`modeler.spark` so the check runs (and can say what is missing) before
pyspark is imported, and imports nothing but the standard library: the modeler image ships
``common``, ``modeler`` and ``predictor`` only, so neither the service nor the local stack
tooling (``devstack``, which imports this) may need anything else to run it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

from common.errors import StreamrecError

# Spark 4 runs on Java 17 or newer.
MIN_JAVA = 17


class MissingDependency(StreamrecError, RuntimeError):
    """A binary or runtime the modeler (or the local stack) needs is not installed; the
    message says how to get it. ``RuntimeError`` too, for callers written against the old
    devstack class."""


def java_major(version_output: str) -> int | None:
    """The major version in ``java -version``'s output (``1.8.0_x`` is 8), or None."""
    m = re.search(r'version "(\d+)(?:\.(\d+))?', version_output)
    if not m:
        return None
    # Before Java 9 versions read "1.<major>".
    return int(m.group(1)) if m.group(1) != "1" else int(m.group(2) or 0)


def check_java(minimum: int = MIN_JAVA) -> str:
    """Return the Java major version (as text), or raise :class:`MissingDependency` saying
    what is missing. ``JAVA_HOME`` wins over ``PATH``, as for Spark's own launcher."""
    java_home = os.environ.get("JAVA_HOME")
    java = shutil.which("java", path=os.path.join(java_home, "bin")) if java_home else shutil.which("java")
    if not java:
        raise MissingDependency(
            f"Spark needs Java >= {minimum} and no `java` is on PATH or in JAVA_HOME "
            "(Debian: apt-get install -y openjdk-17-jre-headless)"
        )
    out = subprocess.run([java, "-version"], capture_output=True, text=True, check=False).stderr
    major = java_major(out)
    if major is None:
        raise MissingDependency(f"cannot tell the Java version from: {out.strip()[:200]}")
    if major < minimum:
        raise MissingDependency(f"Spark needs Java >= {minimum}, found {major} at {java}")
    return f"{major}"
