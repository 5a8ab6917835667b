"""The batch job's test data and helpers: planted implicit events with UUID user ids and
zero-padded item ids (a cast to a number anywhere would show as a changed id), a small job
configuration, and the exports read back with string ids."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from common.synthetic import Events, generate_events, make_ids, write_events
from modeler.batch import JobConfig

PLANTED_RANK = 4


def planted_events(seed: int = 5) -> Events:
    events = generate_events(300, 240, 12_000, rank=PLANTED_RANK, signal=5.0, min_per_user=15, ids="uuid", seed=seed)
    events.item_ids = make_ids(len(events.item_ids), "padded", np.random.default_rng(seed), width=8)
    return events


def events_tsv(events: Events, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tab-separated with a header, like Last.fm's user_artists.dat."""
    return write_events(tmp_path_factory.mktemp("events") / "user_items.tsv", events, sep="\t")


def small_config(input_path: Path, out: Path | None, **kw) -> JobConfig:
    base: dict = dict(ranks=(PLANTED_RANK,), regs=(0.1,), alphas=(1.0,), iterations=5, top=10)
    base.update(kw)
    return JobConfig(input=str(input_path), out=str(out) if out else None, **base)


def seen_by_user(events: Events) -> dict[str, set[str]]:
    seen: dict[str, set[str]] = {}
    for u, i in zip(events.users.tolist(), events.items.tolist()):
        seen.setdefault(events.user_ids[u], set()).add(events.item_ids[i])
    return seen


def read_back(spark, path: Path, fmt: str) -> list[tuple[str, int, str, float]]:
    """The exported rows, read with a string schema for the ids (nothing inferred)."""
    schema = "user STRING, rank INT, item STRING, score FLOAT"
    reader = spark.read.schema(schema)
    frame = reader.option("header", True).csv(str(path)) if fmt == "csv" else reader.format(fmt).load(str(path))
    return sorted((r["user"], r["rank"], r["item"], float(r["score"])) for r in frame.collect())


@pytest.fixture(scope="module")
def events() -> Events:
    """Module fixture: import it (and ``events_file``) into a test module to use it."""
    return planted_events()


@pytest.fixture(scope="module")
def events_file(events: Events, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return events_tsv(events, tmp_path_factory)
