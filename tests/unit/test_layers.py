"""The modeler's layers import one way: service -> publishing -> io/spark -> core; core is numpy only."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
IMPORT = re.compile(r"^\s*(?:from|import)\s+([\w.]+)", re.M)

RULES = {
    "modeler/core": ("pyspark", "redis", "kafka", "modeler.spark", "modeler.io", "modeler.service",
                     "modeler.publishing"),
    "modeler/spark": ("redis", "kafka", "modeler.io", "modeler.service", "modeler.publishing"),
    "modeler/io": ("modeler.service", "modeler.publishing"),
}


@pytest.mark.parametrize("folder", sorted(RULES))
def test_no_import_runs_up_a_layer(folder: str) -> None:
    bad = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        for name in IMPORT.findall(path.read_text()):
            if any(name == f or name.startswith(f + ".") for f in RULES[folder]):
                bad.append(f"{path.relative_to(ROOT)}: {name}")
    assert not bad, bad
