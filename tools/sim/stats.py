"""Counters of one simulator process, and how the counters of several processes add up.

Single-threaded (one event loop), so plain integers; :meth:`Stats.snapshot` gives a JSON-ready
copy that a parent process sums over its children (:func:`merge`)."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any


class Stats:
    """What the simulated devices of one process did so far."""

    def __init__(self, devices: int) -> None:
        self.devices = devices
        self.started = time.monotonic()
        self.online = 0
        self.peak_online = 0
        self.counts: Counter[str] = Counter()
        self.outcomes: Counter[str] = Counter()

    def add(self, name: str, n: int = 1) -> None:
        self.counts[name] += n

    def connected(self, delta: int) -> None:
        """A connection opened (+1) or ended (-1)."""
        self.online += delta
        self.peak_online = max(self.peak_online, self.online)
        if delta > 0:
            self.counts["connects"] += 1

    def outcome(self, outcome: str, reason: str) -> None:
        """An install ended: counted as ``outcome`` or ``outcome:reason``."""
        self.outcomes[f"{outcome}:{reason}" if reason else outcome] += 1

    def snapshot(self) -> dict[str, Any]:
        return {"devices": self.devices, "online": self.online, "peak_online": self.peak_online,
                "elapsed_s": round(time.monotonic() - self.started, 1),
                "counts": dict(self.counts), "outcomes": dict(self.outcomes)}


def merge(snapshots: list[dict[str, Any]]) -> dict[str, Any]:
    """The sum of several processes' snapshots (elapsed: the longest)."""
    counts: Counter[str] = Counter()
    outcomes: Counter[str] = Counter()
    for snap in snapshots:
        counts.update(snap["counts"])
        outcomes.update(snap["outcomes"])
    return {"devices": sum(s["devices"] for s in snapshots),
            "online": sum(s["online"] for s in snapshots),
            "peak_online": sum(s["peak_online"] for s in snapshots),
            "elapsed_s": max((s["elapsed_s"] for s in snapshots), default=0.0),
            "counts": dict(counts), "outcomes": dict(outcomes)}
