"""Where a benchmark's figures go: one JSON file under build/bench/, and a line saying so."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_report(path: Path, result: Any) -> None:
    """``result`` as indented JSON at ``path`` (its folder made if missing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}", flush=True)
