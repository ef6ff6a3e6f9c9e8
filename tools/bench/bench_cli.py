"""Benchmark: how long a `fleetlite` command takes to start, against a bare Python start.

Every operator command (and every step of a CI script) pays the CLI's start-up: the
interpreter, then the imports. Each command runs as a fresh process, ``--runs`` times,
alternating with the baseline (``python -c pass``) so drift of the machine hits both alike; the
median wall time of each is printed with the ratio to the baseline and the difference. The
store is an empty SQLite file in a temporary directory.

    python -m fleetlite.tools.bench.bench_cli [--runs 15]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from fleetlite.fleet.store import open_store

BIN = Path(sys.executable).parent


def commands(db: str) -> dict[str, list[str]]:
    fleetlite = str(BIN / "fleetlite")
    return {
        "python -c pass (baseline)": [sys.executable, "-c", "pass"],
        "fleetlite --help": [fleetlite, "--help"],
        "fleetlite devices list": [fleetlite, "devices", "list", "--db", db],
        "fleetlite release list -o json": [fleetlite, "release", "list", "--db", db,
                                           "-o", "json"],
        "fleetlite-agent --help": [str(BIN / "fleetlite-agent"), "--help"],
    }


def wall_time(argv: Sequence[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=15, help="runs of each command")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fleetlite-bench-") as tmp:
        db = f"sqlite:///{Path(tmp) / 'fleet.db'}"
        todo = commands(db)
        open_store(db).close()  # an empty, migrated store
        times: dict[str, list[float]] = {name: [] for name in todo}
        for _ in range(args.runs):
            for name, command in todo.items():
                times[name].append(wall_time(command))
    base = statistics.median(times["python -c pass (baseline)"])
    print(f"# CLI start-up: median of {args.runs} runs each, fresh processes\n")
    print("| command | median ms | vs baseline | over baseline ms |")
    print("| --- | ---: | ---: | ---: |")
    for name, samples in times.items():
        median = statistics.median(samples)
        print(f"| {name} | {median * 1000:.0f} | {median / base:.1f}x | "
              f"{(median - base) * 1000:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
