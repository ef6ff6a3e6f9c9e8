"""What one rollout step reads from the store, at fleet scale: full reads against incremental.

``python -m fleetlite.tools.bench.bench_rollout_step [--devices 10000] [--statuses 6]
[--repeat 5]`` fills a SQLite store with ``--devices`` devices (as
:mod:`fleetlite.tools.bench.bench_large_fleet` does: two profiles each, a completed rollout)
and ``--statuses`` OTA statuses per device for the release (accepted, downloading..., the final
``installed``), then times, on the same store in the same run:

- **baseline**, what a controller's tick read for a running rollout before issue 13's fix:
  every OTA status of the release parsed (``Store.ota_records``) and every profile of the model
  parsed into a :class:`~fleetlite.fleet.gates.ProfileView`;
- **incremental**, what it reads now (:mod:`fleetlite.fleet.rollout_inputs`): the ids of the
  final statuses and of the profiles, and only the records not parsed yet (the first tick
  parses them all, later ticks none), and the last time any device was heard of the release
  (``Store.ota_heard_latest``, one index lookup; the per-device times are read only for
  devices silent for longer than the re-send delay);

the median of ``--repeat`` runs each, and the ratio. The pieces of a step are timed apart too:
the final statuses' ids, the per-device last heard of every device (what a step read before
migration 10), the device registry and list, and the rollout state, which both paths read.
Use ``--statuses 36`` for what a real install leaves (its progress statuses, by steps). No
assertion: re-run it on your hardware.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from fleetlite.fleet.gates import ProfileView
from fleetlite.fleet.rollout import RolloutState
from fleetlite.fleet.rollout_inputs import OutcomeViews, ProfileViews
from fleetlite.fleet.store import Store, open_store
from fleetlite.sdk.messages import OtaStatus
from fleetlite.tools.bench.bench_large_fleet import RELEASE, fill

PHASES = ("accepted", "downloading", "verifying", "smoke_testing", "switching", "health_check")


def add_statuses(store: Store, devices: int, per_device: int) -> None:
    """``per_device`` statuses of the release per device, the last one final (installed)."""
    now = time.time()
    for start in range(0, devices, 500):
        with store.batch():
            for n in range(start, min(start + 500, devices)):
                device_id = f"sim-{n:05d}"
                for k in range(per_device):
                    final = k == per_device - 1
                    store.add_ota_status(OtaStatus(
                        device_id=device_id, ts=now + k, release_id=RELEASE, model="kws",
                        version=2, phase="done" if final else PHASES[k % len(PHASES)],
                        final=final, outcome="installed" if final else ""),
                        received_at=now + k)


def median_s(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--statuses", type=int, default=6, help="OTA statuses per device")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-step-") as tmp:
        db = Path(tmp) / "fleet.db"
        t0 = time.perf_counter()
        fill(db, args.devices)
        with open_store(f"sqlite:///{db}") as store:
            add_statuses(store, args.devices, args.statuses)
            print(f"# {args.devices} devices, {args.statuses} OTA statuses each, 2 profiles "
                  f"each; filled in {time.perf_counter() - t0:.1f} s")
            classes = {d.device_id: d.device_class for d in store.list_devices()}

            def baseline() -> None:
                records = store.ota_records(release_id=RELEASE)
                _ = [r for r in records if r.status.final]
                _ = [ProfileView.from_record(row.record(), row.device_class)
                     for row in store.profiles(model="kws")]

            views, outcomes = ProfileViews(), OutcomeViews()

            def incremental() -> None:
                outcomes.views(store, RELEASE)
                store.ota_heard_latest(RELEASE)
                views.views(store, "kws", classes)

            t1 = time.perf_counter()
            incremental()
            first_s = time.perf_counter() - t1

            base = median_s(baseline, args.repeat)
            inc = median_s(incremental, args.repeat)
            devices_s = median_s(store.list_devices, args.repeat)
            registry_s = median_s(store.registry, args.repeat)
            finals_s = median_s(lambda: store.ota_outcome_ids(RELEASE), args.repeat)
            latest_s = median_s(lambda: store.ota_heard_latest(RELEASE), args.repeat)
            heard_s = median_s(lambda: store.ota_last_heard(RELEASE), args.repeat)

            def state() -> None:
                record = store.get_rollout("ro-all")
                assert record is not None
                RolloutState.from_dict(record.state)

            state_s = median_s(state, args.repeat)
        print("| what | median per tick | vs baseline |")
        print("| --- | --- | --- |")
        print(f"| baseline: all OTA statuses + all profiles parsed | {base * 1000:.0f} ms | 1.00 |")
        print(f"| incremental: outcomes + last heard + new profiles | {inc * 1000:.0f} ms | "
              f"{inc / base:.2f} |")
        print(f"| (first incremental tick: parses {views.parsed} profiles and "
              f"{outcomes.parsed} outcomes) | {first_s * 1000:.0f} ms | {first_s / base:.2f} |")
        print(f"| part: the final statuses' ids | {finals_s * 1000:.1f} ms | — |")
        print(f"| part: when the release was last heard of | {latest_s * 1000:.2f} ms | — |")
        print(f"| (each device's last heard, all devices) | {heard_s * 1000:.0f} ms | — |")
        print(f"| both: the device registry (a step's read) | {registry_s * 1000:.0f} ms | — |")
        print(f"| both: the device list | {devices_s * 1000:.0f} ms | — |")
        print(f"| both: the rollout state ({args.devices} devices) | {state_s * 1000:.0f} ms | — |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
