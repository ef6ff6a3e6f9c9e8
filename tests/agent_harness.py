"""Run real ``fleetlite-agent`` processes in tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

DEVICE_CLASS = "industrial-x86-gateway"


def write_config(directory: Path, *, port: int, device_id: str = "gw-1",
                 models: list[dict[str, Any]] | None = None, telemetry_s: float = 60.0,
                 socket: bool = True, profile_on_model_change: bool = False,
                 extra: dict[str, Any] | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    config: dict[str, Any] = {
        "device_id": device_id,
        "device_class": DEVICE_CLASS,
        "tags": {"site": "test-lab"},
        "broker": {"host": "127.0.0.1", "port": port, "keepalive_s": 10},
        "state_dir": str(directory / "state"),
        "intervals": {"telemetry_s": telemetry_s, "reconnect_min_s": 0.2,
                      "reconnect_max_s": 1.0},
        "models": [{"name": m["name"], "path": str(m["path"]), **(
            {"version": m["version"]} if "version" in m else {})} for m in (models or [])],
        "profile_on_model_change": profile_on_model_change,
    }
    if socket:
        config["socket"] = str(directory / "agent.sock")
    if extra:
        config.update(extra)
    path = directory / "agent.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


class AgentProcess:
    """``python -m fleetlite.agent.cli run --config ...`` as a child process."""

    def __init__(self, config: Path) -> None:
        self.config = config
        self.log = config.parent / "agent.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> AgentProcess:
        out = self.log.open("ab")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fleetlite.agent.cli", "run", "--config", str(self.config),
             "--log-level", "DEBUG"],
            stdout=out, stderr=out, env=env,
        )
        out.close()
        return self

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def kill9(self) -> None:
        self.signal(signal.SIGKILL)
        self.wait(10)

    def terminate(self, timeout: float = 20.0) -> int:
        self.signal(signal.SIGTERM)
        return self.wait(timeout)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.alive:
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait(10)

    def read_log(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait_for_log(self, text: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.read_log():
                return
            if not self.alive:
                break
            time.sleep(0.05)
        raise TimeoutError(f"agent log never showed {text!r}:\n{self.read_log()[-3000:]}")
