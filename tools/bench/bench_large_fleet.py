"""Benchmark: the operator's reading commands on a large fleet, against the same commands on a
fleet of ten devices (issue 13's target: ``devices list`` and the report under 2 s at 10,000
devices).

A SQLite store is filled, as the controller would fill it, with ``--devices`` devices (status,
birth, one telemetry report and two profiles each, built by the fleet simulator's report code;
one in 50 offline) and a completed rollout that installed a release on every one of them but
one in 100 (failed), with its decisions; a second store holds ten devices the same way (the
baseline). ``devices list --limit 0`` and ``report --max-devices 0`` list every device, as both
did before they paged (500 rows and 1,000 rows by default). Each command runs as a fresh
process ``--runs`` times, alternating between the two stores, and the median wall time of each
is printed with the ratio to the baseline and the store's size.

    python -m fleetlite.tools.bench.bench_large_fleet [--devices 10000] [--runs 5]

No assertion on time: re-run it on your hardware.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from fleetlite.fleet.cli_fleet import continue_token
from fleetlite.fleet.rollout import (
    FAILED,
    INSTALLED,
    DeviceProgress,
    RolloutSpec,
    RolloutState,
    Selector,
    parse_waves,
)
from fleetlite.fleet.store import open_store
from fleetlite.tools.bench.bench_cli import wall_time
from fleetlite.tools.sim.reports import (
    DeviceState,
    birth,
    online_status,
    profile,
    telemetry,
    will_status,
)

BIN = Path(sys.executable).parent
CLASSES = ("rpi4", "jetson")
RELEASE = "b" * 64


def fill(db: Path, devices: int) -> None:
    """A store with ``devices`` devices and one completed rollout to all of them."""
    rng = random.Random(7)
    now = time.time()
    with open_store(f"sqlite:///{db}") as store:
        manifest = {"name": "kws", "version": 2, "files": [], "targets": {
            "device_classes": list(CLASSES)}}
        store.add_release(RELEASE, "kws", 2, b"{}", {}, manifest)
        progress = {}
        for start in range(0, devices, 500):
            with store.batch():
                for n in range(start, min(start + 500, devices)):
                    state = DeviceState(f"sim-{n:05d}", CLASSES[n % 2], "kws", 1)
                    status = will_status if n % 50 == 7 else online_status
                    store.upsert_status(status(state, now), received_at=now)
                    store.upsert_birth(birth(state, now, {"site": f"s{n % 20}"}),
                                       received_at=now)
                    store.record_telemetry(telemetry(state, now, rng), received_at=now)
                    store.add_profile(profile(state, now, 12.0, rng),
                                      device_class=state.device_class)
                    state.version = 2
                    store.add_profile(profile(state, now + 1, 12.5, rng),
                                      device_class=state.device_class)
                    progress[state.device_id] = DeviceProgress(
                        state.device_id, state.device_class, 1,
                        status=FAILED if n % 100 == 13 else INSTALLED,
                        sent_at=now, updated_at=now)
        spec = RolloutSpec(rollout_id="ro-all", release_id=RELEASE, model="kws", version=2,
                           previous_version=1, selector=Selector(), waves=parse_waves("100%"),
                           wave_timeout_s=600, chunk_size=16384)
        done = RolloutState(state="completed", current_wave=1, devices=progress,
                            reason="every device installed")
        store.create_rollout("ro-all", RELEASE, spec.to_dict(), state=done.to_dict())


def commands(db: Path, out: Path, devices: int) -> dict[str, list[str]]:
    fleetlite, url = str(BIN / "fleetlite"), f"sqlite:///{db}"
    middle = continue_token(f"sim-{devices // 2 - 1:05d}")
    return {
        "devices list": [fleetlite, "devices", "list", "--db", url],
        "devices list --limit 0": [fleetlite, "devices", "list", "--limit", "0", "--db", url],
        "devices list --continue (the middle)": [fleetlite, "devices", "list", "--continue",
                                                 middle, "--db", url],
        "devices list -o json": [fleetlite, "devices", "list", "-o", "json", "--db", url],
        "devices list --class jetson": [fleetlite, "devices", "list", "--class", "jetson",
                                        "--db", url],
        "rollout list": [fleetlite, "rollout", "list", "--db", url],
        "rollout status ro-all": [fleetlite, "rollout", "status", "ro-all", "--db", url],
        "profiles show --model kws": [fleetlite, "profiles", "show", "--model", "kws",
                                      "--db", url],
        "report --html": [fleetlite, "report", "--html", str(out), "--db", url],
        "report --html --max-devices 0": [fleetlite, "report", "--html",
                                          str(out.with_suffix(".all.html")),
                                          "--max-devices", "0", "--db", url],
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=10_000, help="devices in the large store")
    parser.add_argument("--runs", type=int, default=5, help="runs of each command per store")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fleetlite-bench-") as tmp:
        small, large = Path(tmp) / "small.db", Path(tmp) / "large.db"
        started = time.perf_counter()
        fill(small, 10)
        fill(large, args.devices)
        filled = time.perf_counter() - started
        todo = {"small": commands(small, Path(tmp) / "small.html", 10),
                "large": commands(large, Path(tmp) / "large.html", args.devices)}
        times: dict[tuple[str, str], list[float]] = {}
        for _ in range(args.runs):
            for name in todo["small"]:
                for which in ("small", "large"):
                    times.setdefault((which, name), []).append(wall_time(todo[which][name]))
        size_mb = large.stat().st_size / 1e6
        report_mb = (Path(tmp) / "large.html").stat().st_size / 1e6
        all_mb = (Path(tmp) / "large.all.html").stat().st_size / 1e6
    print(f"# reading commands at {args.devices} devices (store {size_mb:.1f} MB, filled in "
          f"{filled:.0f} s; report {report_mb:.1f} MB, {all_mb:.1f} MB with --max-devices 0) "
          f"against 10 devices: median of {args.runs} runs each, fresh processes\n")
    print(f"| command | 10 devices ms | {args.devices} devices ms | ratio |")
    print("| --- | ---: | ---: | ---: |")
    for name in todo["small"]:
        base = statistics.median(times[("small", name)])
        big = statistics.median(times[("large", name)])
        print(f"| fleetlite {name} | {base * 1000:.0f} | {big * 1000:.0f} | {big / base:.1f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
