"""A broker for the demo and for trying FleetLite on one machine.

Mosquitto when it is installed (the broker FleetLite is tested against), otherwise the embedded
pure-Python broker ``amqtt`` (MQTT 3.1.1 only; fine for a demo, not for a fleet). Either runs as a
child process on a loopback port; :func:`start_local_broker` says which one it started. The child
gets SIGTERM when the process that started it dies, even by SIGKILL
(:mod:`fleetlite.sdk.child_lifetime`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from fleetlite.fleet.errors import FleetError
from fleetlite.sdk.child_lifetime import start_tied


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def mosquitto_path() -> str | None:
    for candidate in (shutil.which("mosquitto"), "/usr/sbin/mosquitto"):
        if candidate and Path(candidate).exists():
            return candidate
    return None


@dataclass
class LocalBroker:
    """A broker child process on 127.0.0.1:``port``."""

    kind: str  # "mosquitto" or "embedded (amqtt)"
    port: int
    process: subprocess.Popen[bytes]
    workdir: Path
    host: str = "127.0.0.1"
    _tmp: tempfile.TemporaryDirectory[str] | None = field(default=None, repr=False)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        if self._tmp is not None:
            self._tmp.cleanup()


def _wait_for_port(port: int, process: subprocess.Popen[bytes], log: Path,
                   timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise FleetError(f"the broker exited at start (code {process.returncode}): "
                             f"{log.read_text(errors='replace')[-500:]}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise FleetError(f"the broker did not listen on port {port} within {timeout:g} s")


def start_local_broker(port: int | None = None, *, prefer: str = "auto") -> LocalBroker:
    """Start Mosquitto if installed (``prefer='auto'``/``'mosquitto'``), else amqtt."""
    port = port or free_port()
    tmp = tempfile.TemporaryDirectory(prefix="fleetlite-broker-")
    workdir = Path(tmp.name)
    log = workdir / "broker.log"
    mosquitto = mosquitto_path() if prefer in ("auto", "mosquitto") else None
    if prefer == "mosquitto" and mosquitto is None:
        raise FleetError("mosquitto is not installed: sudo apt-get install mosquitto")
    if mosquitto is not None:
        from fleetlite.fleet.broker_config import local_mosquitto_conf

        conf = workdir / "mosquitto.conf"
        # the same generator as `fleetlite broker-config`: the protocol's size and queue limits;
        # `user root` also keeps Mosquitto from switching user, which would clear its tie to us
        conf.write_text(local_mosquitto_conf(port) + ("user root\n" if os.geteuid() == 0 else ""))
        cmd = [mosquitto, "-c", str(conf)]
        kind = "mosquitto"
    else:
        try:
            import amqtt  # noqa: F401
        except ImportError as exc:
            raise FleetError(
                "no MQTT broker: install Mosquitto (sudo apt-get install mosquitto) or the "
                "embedded broker (pip install 'fleetlite[fleet]' on Python 3.10+)"
            ) from exc
        cmd = [sys.executable, "-m", "fleetlite.fleet.broker", "--port", str(port)]
        kind = "embedded (amqtt)"
    with log.open("ab") as out:
        process = start_tied(cmd, death_signal=signal.SIGTERM, stdout=out, stderr=out)
    broker = LocalBroker(kind, port, process, workdir, _tmp=tmp)
    try:
        _wait_for_port(port, process, log)
    except BaseException:
        broker.stop()
        raise
    return broker


async def _serve_amqtt(port: int) -> None:
    from amqtt.broker import Broker

    config = {
        "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {
            "allow_anonymous": True}},
    }
    broker = Broker(config)
    await broker.start()
    await asyncio.Event().wait()


def main(argv: list[str] | None = None) -> int:
    """``python -m fleetlite.fleet.broker --port N``: run the embedded broker in the foreground."""
    parser = argparse.ArgumentParser(description="Run the embedded amqtt MQTT broker.")
    parser.add_argument("--port", type=int, default=1883)
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve_amqtt(args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
