"""One simulator process: its slice of the fleet on one asyncio event loop, and its stats lines.

Each device is one task with its own MQTT connection (:class:`~fleetlite.tools.sim.device.
SimDevice`); the loop also runs a reporter that hands a stats snapshot to ``report`` every
``stats_s`` seconds. The run ends at ``stop`` (a signal, or the ``--duration``): every
connected device then publishes its ``shutdown`` status and disconnects cleanly.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fleetlite.sdk.trust import load_trusted_root
from fleetlite.tools.sim.config import SimConfig
from fleetlite.tools.sim.device import SimDevice
from fleetlite.tools.sim.plan import DevicePlan
from fleetlite.tools.sim.stats import Stats

Report = Callable[[dict[str, Any]], None]
#: threads for aiomqtt's blocking connect() (it runs paho's connect in the loop's executor)
CONNECT_THREADS = 16
STOP_GRACE_S = 30.0


async def run_devices(config: SimConfig, plans: list[DevicePlan], report: Report,
                      stop: asyncio.Event) -> dict[str, Any]:
    """Run ``plans``' devices until ``stop`` is set (or ``duration_s`` passed); returns the
    final stats snapshot."""
    loop = asyncio.get_running_loop()
    executor = ThreadPoolExecutor(CONNECT_THREADS, thread_name_prefix="sim-connect")
    loop.set_default_executor(executor)
    root = load_trusted_root(config.root) if config.root else None
    stats = Stats(len(plans))
    session = int(time.time())
    devices = [SimDevice(plan, config, root, stats, stop, session) for plan in plans]
    tasks = [asyncio.ensure_future(device.run()) for device in devices]
    reporter = asyncio.ensure_future(_report_every(stats, config.stats_s, report))
    try:
        if config.duration_s > 0:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), config.duration_s)
        else:
            await stop.wait()
    finally:
        stop.set()
        _, pending = await asyncio.wait(tasks, timeout=STOP_GRACE_S)
        for task in pending:
            task.cancel()
        reporter.cancel()
        await asyncio.gather(*tasks, reporter, return_exceptions=True)
        executor.shutdown(wait=False)
    return stats.snapshot()


async def _report_every(stats: Stats, every_s: float, report: Report) -> None:
    while True:
        await asyncio.sleep(every_s)
        report(stats.snapshot())


def with_rates(current: dict[str, Any], previous: dict[str, Any] | None,
               seconds: float) -> dict[str, Any]:
    """``current`` plus per-second rates of its counts since ``previous``."""
    before = previous["counts"] if previous else {}
    rates = {f"{name}_per_s": round((value - before.get(name, 0)) / seconds, 1)
             for name, value in current["counts"].items()
             if name in ("telemetry", "connects", "ota_statuses")} if seconds > 0 else {}
    return {**current, "at": round(time.time(), 1), **rates}
