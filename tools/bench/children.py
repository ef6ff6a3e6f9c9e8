"""Stopping the child processes a benchmark started (a broker, a controller, an agent)."""

from __future__ import annotations

import signal
import subprocess
import time
from typing import Any

__all__ = ["kill_child", "stop_child"]


def stop_child(proc: subprocess.Popen[Any], grace_s: float, kill_wait_s: float = 10.0) -> None:
    """SIGTERM a child still running, wait ``grace_s`` for it, then SIGKILL it and reap it."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(kill_wait_s)


def kill_child(proc: subprocess.Popen[Any], wait_s: float = 30.0) -> float:
    """SIGKILL a child (no clean-up of its own: no flush, no DISCONNECT, nothing given back) and
    reap it; the time (``time.time()``) of the kill."""
    killed_at = time.time()
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait(wait_s)
    return killed_at
