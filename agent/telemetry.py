"""Periodic telemetry: system load, memory, disk, temperature and per-model inference statistics.

Only counts and latency statistics leave the device, never model inputs or outputs.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import psutil

from fleetlite.agent.device_facts import temperature_c

_PROCESS = psutil.Process(os.getpid())


def system_snapshot(state_dir: Path) -> dict[str, Any]:
    """CPU, memory, agent RSS, disk free under the state directory, temperature."""
    memory = psutil.virtual_memory()
    try:
        disk = shutil.disk_usage(state_dir)
        disk_free_mb: float | None = round(disk.free / 2**20, 1)
        disk_used_pct: float | None = round(100.0 * disk.used / disk.total, 1)
    except OSError:
        disk_free_mb = disk_used_pct = None
    load1, load5, _ = os.getloadavg()
    return {
        "cpu_percent": psutil.cpu_percent(interval=None),
        "load_1m": round(load1, 2),
        "load_5m": round(load5, 2),
        "mem_total_mb": round(memory.total / 2**20),
        "mem_available_mb": round(memory.available / 2**20),
        "mem_used_pct": memory.percent,
        "agent_rss_mb": round(_PROCESS.memory_info().rss / 2**20, 1),
        "agent_threads": _PROCESS.num_threads(),
        "disk_free_mb": disk_free_mb,
        "disk_used_pct": disk_used_pct,
        "temperature_c": temperature_c(),
    }
