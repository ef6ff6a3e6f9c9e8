"""Ingest under a hostile device: what one device flooding the fleet costs the others.

``python -m fleetlite.tools.bench.bench_ingest [--devices 20] [--rate 4] [--seconds 10]``
starts a real Mosquitto (``--broker-queue``: its per-client ``max_queued_messages``; 1000 is
Mosquitto's default, 50000 what ``fleetlite broker-config`` writes) and a real
:class:`~fleetlite.fleet.controller.Controller` on SQLite (and on PostgreSQL when
``FLEETLITE_TEST_PG_URL`` is set), with ``--devices`` honest devices in another process: plain
paho clients that publish their birth and status, then telemetry at ``--rate`` reports per
second each for ``--seconds``. It counts the honest reports the controller stores (every
``record_telemetry`` call), per second and lost, and their latency (publish to store), in three
scenarios, each on a fresh broker and store:

- **alone**: the honest devices only (the baseline);
- **burst** (the measurement of issue 11): one device publishes 100 one-megabyte messages and
  3,000 telemetry reports; each honest device sends its reports just after;
- **flood**: one device publishes as fast as it can for the whole run, a mix of one-megabyte
  payloads, valid telemetry of its own, and reports naming the honest devices;
- **bare-flood** (optional): the same flood, received by a bare paho client in place of the
  controller (it parses the honest telemetry and stores nothing): the ceiling that paho and the
  broker set on this machine, whatever the controller does.

``--big 0`` leaves the one-megabyte payloads out (a flood of small messages, which a broker with
``fleetlite broker-config``'s ``max_packet_size`` lets through: with ``--max-packet-size 589824``
it disconnects the hostile device at its first one-megabyte message, and nothing more arrives).

It prints the figures, their ratio to the baseline, and what the hostile device left in the
store (rows and bytes). No assertion on time: re-run it on your hardware.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import select
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from fleetlite.fleet.broker import free_port, mosquitto_path
from fleetlite.fleet.controller import INGEST_KINDS, Controller
from fleetlite.fleet.store import Store, open_store
from fleetlite.sdk import topics
from fleetlite.sdk.messages import Birth, OtaStatus, Status, Telemetry
from fleetlite.tools.bench.children import stop_child

HOSTILE = "gw-hostile"
BIG = 1024 * 1024
DRAIN_S = 30.0


# -- the devices (run as child processes: --role honest / --role hostile) -----------------------


def _client(device_id: str, port: int, inflight: int = 20) -> mqtt.Client:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=device_id, clean_session=True)
    client.max_inflight_messages_set(inflight)
    client.connect("127.0.0.1", port, keepalive=60)
    client.loop_start()
    return client


def _telemetry(device_id: str, seq: int, claimed: Optional[str] = None) -> bytes:
    return Telemetry(device_id=claimed or device_id, session=1, seq=seq, ts=time.time(),
                     system={"cpu_percent": 3.5, "load_1m": 0.2, "mem_available_mb": 812.0,
                             "agent_rss_mb": 55.1, "disk_free_mb": 20480.0,
                             "temperature_c": 51.0},
                     models={"kws": {"count": seq * 10, "errors": 0}},
                     spool={"records": 0}).to_json()


def _announce(client: mqtt.Client, device_id: str) -> list[mqtt.MQTTMessageInfo]:
    now = time.time()
    status = Status(device_id=device_id, online=True, session=1, ts=now, reason="connected",
                    conn=1).to_json()
    birth = Birth(device_id=device_id, session=1, ts=now, device_class="raspberry-pi-4",
                  agent_version="0.1.0", tags={"site": "bench"},
                  facts={"arch": "aarch64", "cores": 4}).to_json()
    return [client.publish(topics.device_topic(device_id, topics.STATUS), status, qos=1,
                           retain=True),
            client.publish(topics.device_topic(device_id, topics.BIRTH), birth, qos=1,
                           retain=True)]


def run_honest(port: int, devices: int, rate: float, seconds: float) -> int:
    """Connect, announce, print ``ready``; on ``go`` (stdin) publish telemetry at ``rate`` per
    device for ``seconds``; print what was sent, when (monotonic clock, shared by processes)."""
    ids = [f"gw-{i:03d}" for i in range(devices)]
    clients = {d: _client(d, port) for d in ids}
    infos = [info for d, c in clients.items() for info in _announce(c, d)]
    for info in infos:
        info.wait_for_publish(30)
    print("ready", flush=True)
    sys.stdin.readline()
    sent: dict[str, list[tuple[int, float]]] = {d: [] for d in ids}
    last: list[mqtt.MQTTMessageInfo] = []
    rounds = max(1, round(rate * seconds))
    start = time.monotonic()
    for k in range(rounds):
        pause = start + k / rate - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        last = []
        for device_id, client in clients.items():
            sent_at = time.monotonic()
            last.append(client.publish(topics.device_topic(device_id, topics.TELEMETRY),
                                       _telemetry(device_id, k + 1), qos=1))
            sent[device_id].append((k + 1, sent_at))
    unacked = 0
    for info in last:
        with contextlib.suppress(RuntimeError, ValueError):
            info.wait_for_publish(30)
        unacked += not info.is_published()
    print(json.dumps({"sent": sent, "unacked": unacked}), flush=True)
    for client in clients.values():
        client.disconnect()
        client.loop_stop()
    return 0


def _big(size: int) -> bytes:
    return b'{"schema":"fleetlite.telemetry/1","pad":"' + b"x" * size + b'"}'


def _hostile_messages(victims: Sequence[str], big: int) -> Iterator[tuple[str, bytes]]:
    """The flood's mix, forever: per round one payload of ``big`` bytes (none if 0), 20 valid
    telemetry reports of its own, and 10 reports naming honest devices (telemetry, OTA status,
    status)."""
    own = topics.device_topic(HOSTILE, topics.TELEMETRY)
    large = _big(big) if big else b""
    seq = 0
    round_no = 0
    while True:
        round_no += 1
        if large:
            yield own, large
        for _ in range(20):
            seq += 1
            yield own, _telemetry(HOSTILE, seq)
        for i in range(10):
            victim = victims[(round_no * 10 + i) % len(victims)]
            if i % 3 == 0:
                yield own, _telemetry(HOSTILE, seq, claimed=victim)
            elif i % 3 == 1:
                yield (topics.device_topic(HOSTILE, topics.OTA_STATUS),
                       OtaStatus(device_id=victim, ts=time.time(), release_id="f" * 64,
                                 model="kws", version=9, phase="done", final=True,
                                 outcome="installed").to_json())
            else:
                yield (topics.device_topic(HOSTILE, topics.STATUS),
                       Status(device_id=victim, online=False, session=99, ts=time.time(),
                              reason="lost", conn=1).to_json())


def run_hostile(port: int, mode: str, seconds: float, victims: Sequence[str],
                big: int = BIG) -> int:
    """``burst``: 100 one-megabyte messages and 3,000 telemetry reports, as fast as possible.
    ``flood``: the mix of :func:`_hostile_messages` for ``seconds``. QoS 1 with 100 messages in
    flight (a device modified to flood). Prints the counts when done: messages the broker
    acknowledged (a broker with ``max_packet_size`` disconnects it at its first one-megabyte
    message, which paho then sends again at every reconnect)."""
    client = _client(HOSTILE, port, inflight=100)
    for info in _announce(client, HOSTILE):
        info.wait_for_publish(30)
    own = topics.device_topic(HOSTILE, topics.TELEMETRY)
    if mode == "burst":
        messages: Iterator[tuple[str, bytes]] = iter(
            [(own, _big(big))] * (100 if big else 0)
            + [(own, _telemetry(HOSTILE, i + 1)) for i in range(3000)])
        deadline = time.monotonic() + 120
    else:
        messages = _hostile_messages(victims, big)
        deadline = time.monotonic() + seconds
    sent = size = 0
    window: list[tuple[mqtt.MQTTMessageInfo, int]] = []

    def settle(infos: Sequence[tuple[mqtt.MQTTMessageInfo, int]]) -> None:
        nonlocal sent, size
        for info, length in infos:
            with contextlib.suppress(RuntimeError, ValueError):  # failed: not connected
                info.wait_for_publish(max(0.1, deadline + 5 - time.monotonic()))
                if info.is_published():
                    sent += 1
                    size += length

    for topic, payload in messages:
        if time.monotonic() >= deadline:
            break
        window.append((client.publish(topic, payload, qos=1), len(payload)))
        if len(window) >= 200:  # keep paho's own queue short: wait for the oldest half
            settle(window[:100])
            del window[:100]
    settle(window)
    print(json.dumps({"sent": sent, "bytes": size}), flush=True)
    client.disconnect()
    client.loop_stop()
    return 0


# -- the fleet side (this process) -------------------------------------------------------------


class Broker:
    """A Mosquitto child process on a free loopback port."""

    def __init__(self, workdir: Path, max_queued: int, max_packet_size: int = 0,
                 extra: Sequence[str] = ()) -> None:
        binary = mosquitto_path()
        if binary is None:
            raise SystemExit("mosquitto is not installed: sudo apt-get install mosquitto")
        self.port = free_port()
        conf = workdir / "mosquitto.conf"
        lines = [f"listener {self.port} 127.0.0.1", "allow_anonymous true", "persistence false",
                 f"max_queued_messages {max_queued}", *extra]
        if max_packet_size:
            lines.append(f"max_packet_size {max_packet_size}")
        if os.geteuid() == 0:
            lines.append("user root")
        conf.write_text("\n".join(lines) + "\n")
        self.log = workdir / "mosquitto.log"
        with self.log.open("ab") as out:
            self.process = subprocess.Popen([binary, "-c", str(conf)], stdout=out, stderr=out)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port),
                                                                        0.2):
                return
            time.sleep(0.02)
        self.stop()
        raise SystemExit(f"mosquitto did not listen on port {self.port}")

    def stop(self) -> None:
        stop_child(self.process, 5, kill_wait_s=5)


@contextlib.contextmanager
def fresh_store(backend: str, workdir: Path) -> Iterator[Store]:
    """An empty store: a SQLite file in ``workdir``, or a new database on the PostgreSQL server
    of FLEETLITE_TEST_PG_URL (dropped afterwards)."""
    if backend == "sqlite":
        with open_store(f"sqlite:///{workdir / 'fleet.db'}") as store:
            yield store
        return
    import psycopg

    admin_url = os.environ["FLEETLITE_TEST_PG_URL"]
    name = f"fleetlite_bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    parts = urllib.parse.urlsplit(admin_url)
    try:
        with open_store(urllib.parse.urlunsplit(parts._replace(path=f"/{name}"))) as store:
            yield store
    finally:
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@dataclass
class Stored:
    """When each telemetry report reached the store (this process's monotonic clock)."""

    at: dict[tuple[str, int], float] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def watch(self, store: Store) -> None:
        record = store.record_telemetry

        def counting(telemetry: Telemetry, **kwargs: Any) -> bool:
            kept = record(telemetry, **kwargs)
            with self.lock:
                self.at.setdefault((telemetry.device_id, telemetry.seq), time.monotonic())
            return kept

        store.record_telemetry = counting  # type: ignore[method-assign]

    def count(self, keys: Sequence[tuple[str, int]]) -> int:
        with self.lock:
            return sum(key in self.at for key in keys)


@dataclass
class Result:
    scenario: str
    backend: str
    sent: int
    stored: int
    seconds: float
    latencies_ms: list[float]
    unacked: int
    hostile_sent: int = 0
    hostile_bytes: int = 0
    footprint: dict[str, int] = field(default_factory=dict)
    counters: dict[str, int] = field(default_factory=dict)

    @property
    def lost(self) -> int:
        return self.sent - self.stored

    @property
    def per_second(self) -> float:
        return self.stored / self.seconds if self.seconds > 0 else 0.0

    def latency(self, q: float) -> float:
        if not self.latencies_ms:
            return float("nan")
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class BareSubscriber:
    """A paho client subscribed like the controller that notes the honest telemetry it receives
    (parsed, not stored): what the controller could do at best on this machine."""

    tick_s = 0.5

    def __init__(self, port: int, stored: Stored) -> None:
        self.counters: dict[str, int] = {"received": 0}
        self.connected = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bare-subscriber",
                                  clean_session=True)

        def on_connect(client: mqtt.Client, userdata: Any, flags: Any, reason: Any,
                       properties: Any) -> None:
            for kind in INGEST_KINDS:  # what the controller receives
                client.subscribe(topics.fleet_subscription(kind), qos=1)
            self.connected.set()

        def on_message(client: mqtt.Client, userdata: Any, message: Any) -> None:
            self.counters["received"] += 1
            if message.topic.endswith(topics.TELEMETRY) and HOSTILE not in message.topic:
                data = json.loads(message.payload)
                with stored.lock:
                    stored.at.setdefault((data["device_id"], data["seq"]), time.monotonic())

        self.client.on_connect = on_connect
        self.client.on_message = on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def footprint(store: Store, device_id: str) -> dict[str, int]:
    """Rows and bytes the store holds for ``device_id``: its device row's JSON, profiles, OTA
    statuses and refusal counters."""
    device = store.get_device(device_id)
    telemetry = len(device.telemetry.to_json()) if device and device.telemetry else 0
    profiles = store.profiles(device_id=device_id)
    statuses = store.ota_history(device_id=device_id)
    refusals = store.refusals(device_id)
    return {
        "device rows": int(device is not None),
        "telemetry bytes": telemetry,
        "profile rows": len(profiles),
        "profile bytes": sum(len(p.record_json) for p in profiles),
        "OTA status rows": len(statuses),
        "OTA status bytes": sum(len(s.to_json()) for s in statuses),
        "refusal rows": len(refusals),
        "refusal bytes": sum(len(r.last_message) for r in refusals),
    }


def _child(role: str, port: int, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "fleetlite.tools.bench.bench_ingest", "--role", role,
         "--port", str(port), *extra],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def _read_line(proc: subprocess.Popen[str], timeout: float, what: str) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline() if ready else ""
    if not line:
        proc.kill()
        why = "exited without an answer" if ready else f"did not answer within {timeout:g} s"
        raise SystemExit(f"the {what} process {why} (its errors are above)")
    return line


def run_scenario(scenario: str, backend: str, args: argparse.Namespace) -> Result:
    with tempfile.TemporaryDirectory(prefix="fleetlite-bench-ingest-") as tmp:
        workdir = Path(tmp)
        broker = Broker(workdir, args.broker_queue, args.max_packet_size)
        try:
            with fresh_store(backend, workdir) as store:
                return _run(scenario, backend, args, broker, store)
        finally:
            broker.stop()


def _run(scenario: str, backend: str, args: argparse.Namespace, broker: Broker,
         store: Store) -> Result:
    stored = Stored()
    stored.watch(store)
    bare = scenario == "bare-flood"
    controller: Union[Controller, BareSubscriber] = (
        BareSubscriber(broker.port, stored) if bare
        else Controller(store, "127.0.0.1", broker.port).start())
    hostile: Optional[subprocess.Popen[str]] = None
    honest: Optional[subprocess.Popen[str]] = None
    try:
        if not controller.connected.wait(10):
            raise SystemExit("the controller did not connect to the broker")
        # the honest devices send one round (burst) or --rate x --seconds rounds
        rate, seconds = (1.0, 1.0) if scenario == "burst" else (args.rate, args.seconds)
        honest = _child("honest", broker.port, "--devices", str(args.devices),
                        "--rate", str(rate), "--seconds", str(seconds))
        _read_line(honest, 60, "honest devices")
        victims = ",".join(f"gw-{i:03d}" for i in range(args.devices))
        if scenario == "burst":
            hostile = _child("hostile", broker.port, "--mode", "burst", "--victims", victims,
                             "--big", str(args.big))
            hostile_out = json.loads(_read_line(hostile, 300, "hostile device"))
        elif scenario in ("flood", "bare-flood"):
            hostile = _child("hostile", broker.port, "--mode", "flood", "--victims", victims,
                             "--seconds", str(args.seconds + 3), "--big", str(args.big))
            time.sleep(1.0)  # the flood is under way before the honest devices start
        assert honest.stdin is not None
        honest.stdin.write("go\n")
        honest.stdin.flush()
        out = json.loads(_read_line(honest, args.seconds + 120, "honest devices"))
        sent = {(device, int(seq)): float(at) for device, rows in out["sent"].items()
                for seq, at in rows}
        keys = sorted(sent)
        deadline = time.monotonic() + DRAIN_S
        while stored.count(keys) < len(keys) and time.monotonic() < deadline:
            time.sleep(0.1)
        if hostile is not None and scenario != "burst":
            hostile_out = json.loads(_read_line(hostile, 120, "hostile device"))
        with stored.lock:
            done = {k: stored.at[k] for k in keys if k in stored.at}
        first_sent = min(sent.values())
        last_stored = max(done.values(), default=first_sent)
        result = Result(scenario, backend, len(keys), len(done), last_stored - first_sent,
                        [(done[k] - sent[k]) * 1000 for k in done], int(out["unacked"]))
        if scenario != "alone":
            result.hostile_sent = int(hostile_out["sent"])
            result.hostile_bytes = int(hostile_out["bytes"])
        if scenario != "alone" and not bare:
            time.sleep(max(1.0, 2 * controller.tick_s))  # refusal counters flushed by a tick
            result.footprint = footprint(store, HOSTILE)
        result.counters = dict(controller.counters)
        honest.wait(30)
        return result
    finally:
        for child in (hostile, honest):
            if child is not None and child.poll() is None:
                child.kill()
                child.wait(10)
        controller.stop()


def _print(results: Sequence[Result], args: argparse.Namespace) -> None:
    packets = f", max_packet_size {args.max_packet_size}" if args.max_packet_size else ""
    packets += f"; hostile large payloads {args.big} bytes" if args.big else (
        "; no large hostile payloads")
    print(f"# Ingest with a hostile device: {args.devices} honest devices, telemetry at "
          f"{args.rate:g}/s each for {args.seconds:g} s; Mosquitto max_queued_messages "
          f"{args.broker_queue}{packets}\n")
    print("| store | scenario | honest sent | stored | lost | stored/s | vs alone | "
          "latency p50 ms | p99 ms | max ms | hostile msgs | hostile MB |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    base = {r.backend: r for r in results if r.scenario == "alone"}
    for r in results:
        ratio = "" if r.scenario in ("alone", "burst") else (
            f"{r.per_second / base[r.backend].per_second:.2f}x")
        rate = "" if r.scenario == "burst" else f"{r.per_second:.0f}"
        print(f"| {r.backend} | {r.scenario} | {r.sent} | {r.stored} | {r.lost} | {rate} | "
              f"{ratio} | {r.latency(0.5):.1f} | {r.latency(0.99):.1f} | "
              f"{max(r.latencies_ms, default=float('nan')):.1f} | {r.hostile_sent} | "
              f"{r.hostile_bytes / 2**20:.0f} |")
    print("\n# What the hostile device left in the store\n")
    hostile = [r for r in results if r.footprint]
    if hostile:
        keys = list(hostile[0].footprint)
        print("| store | scenario | " + " | ".join(keys) + " |")
        print("| --- | --- |" + " ---: |" * len(keys))
        for r in hostile:
            print(f"| {r.backend} | {r.scenario} | "
                  + " | ".join(str(r.footprint[k]) for k in keys) + " |")
    print("\n# Controller counters\n")
    for r in results:
        print(f"- {r.backend} {r.scenario}: {json.dumps(r.counters, sort_keys=True)}")
    print()
    for backend in base:
        bursts = [r for r in results if r.scenario == "burst" and r.backend == backend]
        if bursts:
            print(f"burst ({backend}): {sum(r.lost for r in bursts)} of "
                  f"{sum(r.sent for r in bursts)} honest reports lost over {len(bursts)} runs")
    for scenario, label in (("flood", "controller"), ("bare-flood", "bare paho subscriber")):
        for backend, alone in base.items():
            runs = [r for r in results if r.scenario == scenario and r.backend == backend]
            if not runs:
                continue
            ratios = [r.per_second / alone.per_second for r in runs]
            print(f"{scenario} ({backend}), {label}: honest ingest at "
                  f"{statistics.median(ratios):.2f}x of alone (median of {len(runs)}: "
                  f"{min(ratios):.2f}x to {max(ratios):.2f}x), {sum(r.lost for r in runs)} of "
                  f"{sum(r.sent for r in runs)} honest reports lost, p99 latency "
                  f"{statistics.median(r.latency(0.99) for r in runs):.0f} ms (median)")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fleetlite.tools.bench.bench_ingest",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--devices", type=int, default=20, help="honest devices")
    parser.add_argument("--rate", type=float, default=4.0,
                        help="telemetry reports per second per honest device (default 4: "
                        "within the controller's default telemetry limit of 5 a second, "
                        "so the honest devices lose nothing to their own limit)")
    parser.add_argument("--seconds", type=float, default=10.0, help="how long they send")
    parser.add_argument("--broker-queue", type=int, default=1000,
                        help="Mosquitto max_queued_messages (1000: its default)")
    parser.add_argument("--big", type=int, default=BIG,
                        help="bytes of the hostile device's large payloads (default 1 MiB; 0: "
                        "none, a flood of small messages)")
    parser.add_argument("--max-packet-size", type=int, default=0,
                        help="Mosquitto max_packet_size (0: none; `fleetlite broker-config` "
                        "writes the protocol's largest message + 64 KiB)")
    parser.add_argument("--scenarios", default="alone,burst,flood",
                        help="comma-separated: alone (always run first), burst, flood, "
                        "bare-flood")
    parser.add_argument("--bursts", type=int, default=3,
                        help="how many times the burst scenario runs (its losses vary from run "
                        "to run)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="how many times the flood scenarios run")
    parser.add_argument("--store", choices=("sqlite", "postgresql", "both"), default=None,
                        help="default: sqlite, and postgresql when FLEETLITE_TEST_PG_URL is set")
    parser.add_argument("--role", choices=("fleet", "honest", "hostile"), default="fleet",
                        help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=("burst", "flood"), help=argparse.SUPPRESS)
    parser.add_argument("--victims", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role == "honest":
        return run_honest(args.port, args.devices, args.rate, args.seconds)
    if args.role == "hostile":
        return run_hostile(args.port, args.mode, args.seconds, args.victims.split(","),
                           args.big)
    if (args.devices < 1 or args.rate <= 0 or args.seconds <= 0 or args.bursts < 1
            or args.repeat < 1):
        parser.error("--devices, --rate, --seconds, --bursts and --repeat must be positive")
    pg = bool(os.environ.get("FLEETLITE_TEST_PG_URL"))
    store = args.store or ("both" if pg else "sqlite")
    if store in ("postgresql", "both") and not pg:
        parser.error("a PostgreSQL run needs FLEETLITE_TEST_PG_URL (bash tools/postgres.sh)")
    backends = ["sqlite", "postgresql"] if store == "both" else [store]
    scenarios = ["alone", *(s for s in args.scenarios.split(",") if s and s != "alone")]
    scenarios = [r for s in scenarios
                 for r in ([s] if s == "alone" else [s] * (args.bursts if s == "burst" else
                                                         args.repeat))]
    if not set(scenarios) <= {"alone", "burst", "flood", "bare-flood"}:
        parser.error(f"unknown scenario in {args.scenarios!r}: use alone, burst, flood, "
                     "bare-flood")
    load = os.getloadavg()
    # the controller logs as in production (INFO), to a file: log floods are part of the cost
    with tempfile.NamedTemporaryFile(prefix="fleetlite-bench-ingest-", suffix=".log") as log:
        handler = logging.FileHandler(log.name)
        logging.basicConfig(level=logging.INFO, handlers=[handler])
        results = [run_scenario(s, b, args) for b in backends for s in scenarios]
        handler.close()
        lines = len(Path(log.name).read_text(errors="replace").splitlines())
    _print(results, args)
    print(f"\ncontroller log: {lines} lines over all runs; load average before "
          f"{load[0]:.2f}, after {os.getloadavg()[0]:.2f} ({os.cpu_count()} CPUs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
