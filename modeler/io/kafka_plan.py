"""Micro-batch planning on the driver: one offset range per topic partition, and the offsets JSON.

The batch's record cap is split over partitions by known backlog first
(:func:`allocate_caps`); a version's ``offsets`` name partitions ``"topic:partition"``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class OffsetRange:
    """What one executor task reads: ``[start, start + cap)`` of one partition, or less."""

    topic: str
    partition: int
    start: int
    cap: int


def allocate_caps(backlog: Mapping[int, int | None], max_records: int) -> dict[int, int]:
    """Split the batch's record cap over partitions.

    Known backlog (high-water minus next offset, from the previous batch) is served first
    by water-filling, so a single busy partition can use most of the batch; whatever is
    left is shared equally, because new records may have arrived anywhere. Unknown backlog
    counts as unlimited. Every partition gets at least 1, and the caps sum to
    ``max(max_records, number of partitions)``.
    """
    parts = sorted(backlog)
    if not parts:
        return {}
    total = max(max_records, len(parts))
    demand = {p: (total if backlog[p] is None else max(0, int(backlog[p] or 0))) for p in parts}
    caps = dict.fromkeys(parts, 0)
    left = total
    open_parts = [p for p in parts if demand[p] > 0]
    # Water-filling: repeatedly give every unsatisfied partition an equal share.
    while left > 0 and open_parts:
        share = max(1, left // len(open_parts))
        still_open = []
        for p in open_parts:
            give = min(share, demand[p] - caps[p], left)
            caps[p] += give
            left -= give
            if caps[p] < demand[p]:
                still_open.append(p)
            if left == 0:
                break
        open_parts = still_open
    # The rest (and the minimum of 1) goes to everyone equally, remainder to the first.
    if left > 0:
        share, rem = divmod(left, len(parts))
        for i, p in enumerate(parts):
            caps[p] += share + (1 if i < rem else 0)
    for p in parts:
        if caps[p] == 0:
            # Only possible when total == len(parts) went entirely to backlog: borrow 1.
            donor = max(parts, key=lambda q: caps[q])
            caps[donor] -= 1
            caps[p] = 1
    return caps


def plan_batch(
    topic: str,
    next_offsets: Mapping[int, int],
    backlog: Mapping[int, int | None],
    max_records: int,
) -> list[OffsetRange]:
    caps = allocate_caps({p: backlog.get(p) for p in next_offsets}, max_records)
    return [OffsetRange(topic, p, next_offsets[p], caps[p]) for p in sorted(next_offsets)]


def offsets_key(topic: str, partition: int) -> str:
    """Key of a partition in a version's ``offsets`` JSON: ``"topic:partition"``."""
    return f"{topic}:{partition}"


def offsets_for_topic(offsets: Mapping[str, int], topic: str) -> dict[int, int]:
    """The ``{partition: next offset}`` of ``topic`` in a version's ``offsets``."""
    out = {}
    for key, value in offsets.items():
        t, _, p = key.rpartition(":")
        if t == topic and p.isdigit():
            out[int(p)] = int(value)
    return out
