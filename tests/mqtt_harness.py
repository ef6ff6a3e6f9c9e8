"""Test harness: a real Mosquitto broker per test, and an independent paho collector.

The broker runs as a subprocess on a free loopback port with a config written to a temp dir;
tests can stop, kill and restart it on the same port.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion


def mosquitto_binary() -> str:
    for candidate in (shutil.which("mosquitto"), "/usr/sbin/mosquitto"):
        if candidate and Path(candidate).exists():
            return candidate
    raise RuntimeError("mosquitto is not installed; run tools/bootstrap.sh --system")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.02)
    raise TimeoutError(f"nothing listens on port {port} after {timeout} s")


@dataclass
class TlsFiles:
    ca: Path
    server_cert: Path
    server_key: Path


class Mosquitto:
    """One Mosquitto broker process for a test."""

    def __init__(self, workdir: Path, *, port: int | None = None, tls: TlsFiles | None = None,
                 extra_conf: str = "", persistent: bool = False) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self.tls = tls
        self.conf = workdir / "mosquitto.conf"
        self.log = workdir / "mosquitto.log"
        persistence = (["persistence true", f"persistence_location {workdir}/"] if persistent
                       else ["persistence false"])
        # as root, mosquitto would drop to the 'mosquitto' user, who cannot write to pytest's
        # private temp dirs; tests run it as the invoking user instead
        user = ["user root"] if os.geteuid() == 0 else []
        lines = [f"listener {self.port} 127.0.0.1", "allow_anonymous true", *persistence, *user,
                 "max_queued_messages 100000", "log_type error", "log_type warning",
                 "log_type notice", "log_type information", "connection_messages true"]
        if tls is not None:
            lines += [f"cafile {tls.ca}", f"certfile {tls.server_cert}",
                      f"keyfile {tls.server_key}", "require_certificate true",
                      "use_identity_as_username true"]
        self.conf.write_text("\n".join(lines) + "\n" + extra_conf)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Mosquitto:
        out = self.log.open("ab")
        self.proc = subprocess.Popen([mosquitto_binary(), "-c", str(self.conf)],
                                     stdout=out, stderr=out)
        out.close()
        try:
            # generous: on a loaded machine a broker can take seconds to listen
            wait_for_port(self.port, timeout=30.0)
        except BaseException:
            self.stop()  # never leave a broker running (and un-waited) behind a failed start
            raise
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def read_log(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@dataclass
class Received:
    topic: str
    payload: bytes
    retain: bool
    qos: int
    at: float = field(default_factory=time.time)  # when the collector received it


def _matches(suffix: str, topic: str) -> bool:
    if "+" in suffix or "#" in suffix:
        return bool(mqtt.topic_matches_sub(suffix, topic))
    return topic.endswith(suffix)


@dataclass
class Collector:
    """An independent MQTT client (plain paho) that records what it receives."""

    host: str
    port: int
    subscriptions: list[str]
    client_id: str = "test-collector"
    messages: list[Received] = field(default_factory=list)
    _cond: threading.Condition = field(default_factory=threading.Condition)
    _client: Any = None

    def start(self, clean_session: bool = True) -> Collector:
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id,
                             clean_session=clean_session)
        subscribed = threading.Event()

        def on_connect(c: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
            c.subscribe([(t, 1) for t in self.subscriptions])

        def on_subscribe(c: Any, userdata: Any, mid: Any, rcs: Any, props: Any) -> None:
            subscribed.set()

        def on_message(c: Any, userdata: Any, msg: Any) -> None:
            with self._cond:
                self.messages.append(Received(msg.topic, bytes(msg.payload), msg.retain, msg.qos))
                self._cond.notify_all()

        client.on_connect = on_connect
        client.on_subscribe = on_subscribe
        client.on_message = on_message
        client.connect(self.host, self.port)
        client.loop_start()
        if not subscribed.wait(10):
            raise TimeoutError("collector could not subscribe")
        self._client = client
        return self

    def stop(self) -> None:
        if self._client is not None:
            self._client.disconnect()
            self._client.loop_stop()
            self._client = None

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        info.wait_for_publish(10)

    def on_topic(self, suffix: str) -> list[Received]:
        """Messages whose topic ends with ``suffix``, or matches it if it is a filter."""
        with self._cond:
            return [m for m in self.messages if _matches(suffix, m.topic)]

    def wait_for(self, suffix: str, count: int = 1, timeout: float = 20.0,
                 predicate: Any = None) -> list[Received]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [m for m in self.messages if _matches(suffix, m.topic)
                         and (predicate is None or predicate(m))]
                if len(found) >= count:
                    return found
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(
                        f"saw {len(found)}/{count} messages on *{suffix} within {timeout} s; "
                        f"topics seen: {sorted({m.topic for m in self.messages})}"
                    )
                self._cond.wait(remaining)


def retained_under(host: str, port: int, topic_filter: str, marker: str) -> list[Received]:
    """The retained messages the broker holds under ``topic_filter`` (with a payload), read by
    a fresh subscriber. ``marker``, a topic under the filter, is retained after subscribing and
    cleared again: once it arrives, every retained message arrived before it."""
    seen = Collector(host, port, [topic_filter], client_id=f"retained-{time.monotonic_ns()}")
    seen.start()
    try:
        seen.publish(marker, b"marker", retain=True)
        seen.wait_for(marker)
        return [m for m in seen.messages if m.payload and m.topic != marker]
    finally:
        seen.publish(marker, b"", retain=True)
        seen.stop()

