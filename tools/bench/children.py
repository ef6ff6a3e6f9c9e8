"""Stopping the child processes a benchmark started (a broker, a controller, an agent)."""

from __future__ import annotations

import subprocess
from typing import Any

__all__ = ["stop_child"]


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
