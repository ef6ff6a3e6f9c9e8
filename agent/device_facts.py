"""Facts about the machine the agent runs on: hardware, OS, Python and runtime versions.

Reported in the birth message, in ``fleetlite-agent info`` and in every profile record, so a
latency figure can always be read next to the hardware and software that produced it.
"""

from __future__ import annotations

import os
import platform
import socket
import sys
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from fleetlite.sdk.version import __version__


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (x86 'model name', ARM 'Model'/'Hardware')."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return platform.processor() or platform.machine()
    for key in ("model name", "Model", "Hardware", "cpu model"):
        for line in text.splitlines():
            name, _, value = line.partition(":")
            if name.strip() == key and value.strip():
                return value.strip()
    return platform.processor() or platform.machine()


def board_model() -> str | None:
    """The board name where the kernel exposes one (Raspberry Pi, Jetson device tree)."""
    for path in ("/proc/device-tree/model", "/sys/firmware/devicetree/base/model"):
        try:
            return Path(path).read_bytes().rstrip(b"\x00").decode(errors="replace") or None
        except OSError:
            continue
    return None


def cpu_governor() -> str | None:
    try:
        return Path("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor").read_text().strip()
    except OSError:
        return None


def temperature_c() -> float | None:
    """The hottest sensor psutil reports, in Celsius, or None where there is none."""
    reader = getattr(psutil, "sensors_temperatures", None)
    if reader is None:
        return None
    try:
        sensors = reader()
    except (OSError, RuntimeError):
        return None
    readings = [entry.current for entries in sensors.values() for entry in entries]
    return max(readings) if readings else None


def runtime_facts() -> dict[str, Any]:
    from fleetlite.sdk.runtime.errors import RuntimeMissingError
    from fleetlite.sdk.runtime.interpreter import select_backend

    try:
        backend = select_backend()
    except RuntimeMissingError as exc:
        return {"backend": None, "backend_version": None, "error": str(exc)}
    return {"backend": backend.name, "backend_version": backend.version}


def collect(device_class: str | None = None) -> dict[str, Any]:
    """Everything ``fleetlite-agent info`` prints, as a JSON-ready dict."""
    memory = psutil.virtual_memory()
    freq = psutil.cpu_freq() if hasattr(psutil, "cpu_freq") else None
    uname = platform.uname()
    facts: dict[str, Any] = {
        "hostname": socket.gethostname(),
        "device_class": device_class,
        "arch": uname.machine,
        "cpu_model": cpu_model(),
        "board": board_model(),
        "cores": os.cpu_count(),
        "cpu_max_mhz": round(freq.max, 1) if freq and freq.max else None,
        "cpu_governor": cpu_governor(),
        "ram_mb": round(memory.total / 2**20),
        "os": f"{uname.system} {uname.release}",
        "python": platform.python_version(),
        "numpy": np.__version__,
        "agent_version": __version__,
        "temperature_c": temperature_c(),
    }
    facts.update(runtime_facts())
    facts["executable"] = sys.executable
    return facts
