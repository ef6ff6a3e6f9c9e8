"""``python -m fleetlite.tools.sim``: flags -> :class:`SimConfig`, then one or more processes.

Prints one JSON line per ``--stats-s`` to stdout (``{"event": "stats", ...}``: devices, online,
counts, per-second rates, install outcomes) and a last ``{"event": "summary", ...}`` line; logs
go to stderr. With ``--processes N`` the fleet is split over N processes (each its own event
loop) and the parent prints the sums. SIGINT or SIGTERM ends the run cleanly: every device says
``shutdown`` and disconnects.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import multiprocessing
import queue
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from fleetlite.tools.sim.config import SimConfig, SimConfigError, parse_weights
from fleetlite.tools.sim.plan import plan_fleet, slice_of
from fleetlite.tools.sim.runner import run_devices, with_rates
from fleetlite.tools.sim.stats import merge

log = logging.getLogger("fleetlite.tools.sim")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fleetlite.tools.sim",
        description="Simulate a fleet of FleetLite devices, each on its own MQTT connection, "
                    "speaking the real protocol (docs/scaling.md, 'Simulator').")
    d = SimConfig()
    p.add_argument("--broker", default=f"{d.host}:{d.port}", help="HOST:PORT of the broker")
    p.add_argument("--devices", type=int, default=d.devices)
    p.add_argument("--classes", default="rpi4=1",
                   help="class mix, e.g. rpi4=0.7,jetson=0.3 (aliases: rpi4, rpi5, jetson, x86, "
                        "arm; or full device class names)")
    p.add_argument("--prefix", default=d.prefix, help="device ids are PREFIX-000000, ...")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--model", default=d.model, help="the model every device serves at start")
    p.add_argument("--model-version", type=int, default=d.model_version)
    p.add_argument("--root", type=Path, help="the fleet's root.json (needed for installs)")
    p.add_argument("--report-s", type=float, default=d.report_s,
                   help="seconds between two telemetry reports of a device")
    p.add_argument("--fail-rate", type=float, default=d.fail_rate,
                   help="share of devices whose installs end 'failed'")
    p.add_argument("--fail-reason", default=d.fail_reason)
    p.add_argument("--reject-rate", type=float, default=d.reject_rate,
                   help="share of devices whose installs end 'rejected'")
    p.add_argument("--reject-reason", default=d.reject_reason)
    p.add_argument("--step-s", type=float, default=d.step_s,
                   help="mean seconds of each simulated install phase after the download")
    p.add_argument("--reply-s", type=float, default=d.reply_s,
                   help="mean seconds a device takes to answer a command")
    p.add_argument("--profile-ms", default="",
                   help="p95 ms that profiles report per class, e.g. rpi4=12,jetson=4")
    p.add_argument("--churn-per-hour", type=float, default=d.churn_per_hour,
                   help="abrupt disconnects per device per hour (the Will fires)")
    p.add_argument("--offline-s", type=float, default=d.offline_s,
                   help="mean offline period after a churn drop, and of --start-offline devices")
    p.add_argument("--start-offline", type=float, default=d.start_offline,
                   help="share of devices that start offline")
    p.add_argument("--connect-rate", type=float, default=d.connect_rate,
                   help="connections opened per second at start")
    p.add_argument("--keepalive", type=int, default=d.keepalive)
    p.add_argument("--duration-s", type=float, default=d.duration_s,
                   help="seconds to run (0: until SIGINT/SIGTERM)")
    p.add_argument("--stats-s", type=float, default=d.stats_s)
    p.add_argument("--processes", type=int, default=d.processes)
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def config_from_args(args: argparse.Namespace) -> SimConfig:
    host, _, port = args.broker.rpartition(":")
    if not host or not port.isdigit():
        raise SimConfigError(f"--broker {args.broker!r} must be HOST:PORT")
    root = args.root.read_bytes() if args.root else None
    return SimConfig(
        host=host, port=int(port), devices=args.devices,
        classes=parse_weights(args.classes, "--classes"), prefix=args.prefix, seed=args.seed,
        model=args.model, model_version=args.model_version, report_s=args.report_s,
        fail_rate=args.fail_rate, fail_reason=args.fail_reason, reject_rate=args.reject_rate,
        reject_reason=args.reject_reason, step_s=args.step_s, reply_s=args.reply_s,
        profile_ms=parse_weights(args.profile_ms, "--profile-ms") if args.profile_ms else (),
        churn_per_hour=args.churn_per_hour, offline_s=args.offline_s,
        start_offline=args.start_offline, root=root, connect_rate=args.connect_rate,
        keepalive=args.keepalive, duration_s=args.duration_s, stats_s=args.stats_s,
        processes=args.processes)


def _emit(event: str, data: dict[str, Any]) -> None:
    print(json.dumps({"event": event, **data}, sort_keys=True), flush=True)


def _install_stop(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)


def run_single(config: SimConfig) -> dict[str, Any]:
    """The whole fleet in this process; prints stats lines and returns the summary."""
    plans = plan_fleet(config)
    previous: list[Optional[dict[str, Any]]] = [None]

    def report(snapshot: dict[str, Any]) -> None:
        _emit("stats", with_rates(snapshot, previous[0], config.stats_s))
        previous[0] = snapshot

    async def main() -> dict[str, Any]:
        stop = asyncio.Event()
        _install_stop(asyncio.get_running_loop(), stop)
        return await run_devices(config, plans, report, stop)

    return asyncio.run(main())


def _child(config: SimConfig, part: int, stop_flag: Any, out: Any) -> None:
    """One process of a ``--processes`` run: its slice, snapshots to the parent's queue."""
    plans = slice_of(plan_fleet(config), part, config.processes)

    async def main() -> dict[str, Any]:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        _install_stop(loop, stop)

        async def watch_parent() -> None:
            while not stop_flag.is_set():
                await asyncio.sleep(0.2)
            stop.set()

        watcher = asyncio.ensure_future(watch_parent())
        try:
            return await run_devices(config, plans, lambda s: out.put((part, "stats", s)), stop)
        finally:
            watcher.cancel()

    out.put((part, "summary", asyncio.run(main())))


def run_processes(config: SimConfig) -> dict[str, Any]:
    """The fleet split over ``config.processes`` processes; the parent prints the sums."""
    ctx = multiprocessing.get_context("spawn")
    stop_flag = ctx.Event()
    out: Any = ctx.Queue()
    children = [ctx.Process(target=_child, args=(config, part, stop_flag, out), daemon=True)
                for part in range(config.processes)]
    for child in children:
        child.start()
    stopping = [False]

    def on_signal(signum: int, frame: Any) -> None:
        stopping[0] = True
        stop_flag.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    latest: dict[int, dict[str, Any]] = {}
    summaries: dict[int, dict[str, Any]] = {}
    previous: Optional[dict[str, Any]] = None
    last_print = time.monotonic()
    while len(summaries) < len(children):
        try:
            part, kind, snapshot = out.get(timeout=0.5)
        except queue.Empty:
            if not any(child.is_alive() for child in children):
                break
            continue
        (summaries if kind == "summary" else latest)[part] = snapshot
        if kind == "stats" and len(latest) == len(children) \
                and time.monotonic() - last_print >= config.stats_s * 0.9:
            merged = merge(list(latest.values()))
            _emit("stats", {**with_rates(merged, previous, time.monotonic() - last_print),
                            "processes": len(children)})
            previous, last_print = merged, time.monotonic()
    for child in children:
        child.join(10)
    return merge(list(summaries.values()))


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = config_from_args(args)
    except (SimConfigError, OSError) as exc:
        print(f"fleetlite sim: {exc}", file=sys.stderr)
        return 2
    summary = run_single(config) if config.processes == 1 else run_processes(config)
    _emit("summary", summary)
    return 0
