"""Bytes on the wire for a full and a delta rollout of the same fine-tune to the same fleet.

``python -m fleetlite.tools.bench.bench_wire_delta [--devices 4] [--model int8,lm]
[--chunk-size 65536] [--json]``

For each model it starts, on this machine, a real Mosquitto on a free loopback port (``$SYS``
every second), and twice a fleet of ``--devices`` real agent processes (``python -m
fleetlite.agent.cli run``) that serve version 1 of the model from ``agent.yaml``:

- **full** (the baseline, measured in the same run): release v2, a seeded 10 % fine-tune of v1
  (``tools/finetune_weights.py``), built without deltas;
- **delta**: the same v2 built with ``--delta-from`` v1 (``fleet/delta_builder.py``): the
  release carries the full model AND its delta; a device that keeps v1 fetches the delta only.

Each release is served by the real release publisher (every file published once, retained) and
every device is sent ``ota_install``; the run waits for every final status. The broker's own
counters, ``$SYS/broker/bytes/received`` (what the fleet side and the devices sent it) and
``$SYS/broker/bytes/sent`` (what it sent to every client, the fan-out to the devices being most
of it), are read before the release is served and after the last final status (each time at the
broker's second next publication of them); the difference is the rollout's bytes on the wire.
Printed per model and mode: the model's size and the delta's, both counters, the broker's bytes
sent per device, and the delta mode's ratio to the full mode's.

No assertion: re-run it on your hardware. It exits 1 if a device does not end ``installed``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import paho.mqtt.client as mqtt
import yaml
from paho.mqtt.enums import CallbackAPIVersion

from fleetlite.fleet.delta_builder import BaseRelease, plan_deltas
from fleetlite.fleet.ota_publisher import ReleasePublisher
from fleetlite.fleet.release_builder import build_release
from fleetlite.sdk import topics
from fleetlite.sdk.bundle import ReleaseBundle
from fleetlite.sdk.messages import OtaStatus
from fleetlite.tools.bench.bench_ingest import Broker
from fleetlite.tools.bench.bench_ota_transfer import DEVICE_CLASS, RELEASE_KEY, write_root
from fleetlite.tools.bench.children import stop_child
from fleetlite.tools.finetune_weights import finetune_weights

REPO = Path(__file__).resolve().parents[2]
LM_DIR = REPO / "fleet" / "lm"
TEMPLATE = "<user> {prompt} <bot>"


@dataclass
class Row:
    model: str
    mode: str
    devices: int
    model_bytes: int
    delta_bytes: int
    broker_received: int
    broker_sent: int
    installed: int
    seconds: float

    @property
    def sent_per_device(self) -> float:
        return self.broker_sent / self.devices if self.devices else 0.0


class SysCounters:
    """The broker's ``$SYS/broker/bytes/{sent,received}``, as last published."""

    def __init__(self, port: int) -> None:
        self.values: dict[str, int] = {}
        self.updates = 0
        self._cond = threading.Condition()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2,
                                  client_id=f"bench-sys-{uuid.uuid4().hex[:8]}")

        def on_message(client: Any, userdata: Any, message: Any) -> None:
            with self._cond:
                self.values[str(message.topic).rsplit("/", 1)[-1]] = int(message.payload)
                self.updates += 1
                self._cond.notify_all()

        self.client.on_message = on_message
        self.client.on_connect = lambda client, *a: client.subscribe("$SYS/broker/bytes/+")
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def read(self, timeout: float = 30.0) -> tuple[int, int]:
        """(received, sent) as of the broker's next two publications (the counters then include
        whatever was in flight when asked; the $SYS messages themselves add a few hundred bytes
        a second, the same in both modes)."""
        with self._cond:
            wanted = self.updates + 4  # two publications of the two counters
            if not self._cond.wait_for(lambda: self.updates >= wanted, timeout=timeout):
                raise SystemExit("the broker publishes no $SYS byte counters (sys_interval?)")
            return self.values.get("received", 0), self.values.get("sent", 0)

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def releases(model: str, work: Path) -> tuple[dict[str, Any], bytes, ReleaseBundle, ReleaseBundle]:
    """The seed model entry of agent.yaml, v1's bytes, and release v2 without and with a delta."""
    if model == "lm":
        v1_path = LM_DIR / "home_lm.tflite"
        seed = {"name": "home-lm", "path": str(v1_path), "version": 1,
                "tokenizer": str(LM_DIR / "home_lm.spm.model"), "prompt_template": TEMPLATE}
        extra: dict[str, Any] = dict(tokenizer=LM_DIR / "home_lm.spm.model",
                                     prompt_template=TEMPLATE, smoke_tokens=8)
        name = "home-lm"
    else:
        from fleetlite.tools.models import int8_classifier

        v1_path = work / "classifier.tflite"
        v1_path.write_bytes(int8_classifier().tflite)
        seed = {"name": "classifier", "path": str(v1_path), "version": 1}
        extra = {}
        name = "classifier"
    v1 = v1_path.read_bytes()
    v2_path = work / model / v1_path.name
    v2_path.parent.mkdir(parents=True, exist_ok=True)
    v2_path.write_bytes(finetune_weights(v1, fraction=0.1, seed=14))
    common = dict(name=name, version=2, device_classes=[DEVICE_CLASS], keys=[RELEASE_KEY],
                  **extra)
    full = build_release([v2_path], **common)
    built, skipped = plan_deltas(BaseRelease("v1", {v2_path.name: v1}),
                                 [(v2_path.name, v2_path.read_bytes())])
    if skipped:
        raise SystemExit(f"no delta: {skipped[0]}")
    delta = build_release([v2_path], deltas=built, **common)
    return seed, v1, full, delta


def agent_config(directory: Path, port: int, device_id: str, root: Path,
                 seed: dict[str, Any]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    config = {
        "device_id": device_id, "device_class": DEVICE_CLASS,
        "broker": {"host": "127.0.0.1", "port": port, "keepalive_s": 30},
        "state_dir": str(directory / "state"),
        "intervals": {"telemetry_s": 3600.0, "reconnect_min_s": 0.2, "reconnect_max_s": 1.0},
        "models": [seed], "profile_on_model_change": False, "trust_root": str(root),
        "threads": 1, "ota": {"health_inferences": 2, "health_timeout_s": 0.5},
    }
    path = directory / "agent.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def rollout(port: int, work: Path, root: Path, seed: dict[str, Any], bundle: ReleaseBundle,
            devices: int, chunk_size: int, counters: SysCounters,
            timeout: float) -> tuple[int, int, int, float]:
    """A fresh fleet at v1 installs ``bundle``: (broker received, broker sent, installed, s)."""
    ids = [f"gw-{uuid.uuid4().hex[:6]}" for _ in range(devices)]
    finals: dict[str, OtaStatus] = {}
    births: set[str] = set()
    cond = threading.Condition()
    monitor = mqtt.Client(CallbackAPIVersion.VERSION2,
                          client_id=f"bench-mon-{uuid.uuid4().hex[:6]}")

    def on_message(client: Any, userdata: Any, message: Any) -> None:
        device = str(message.topic).split("/")[3]
        with cond:
            if str(message.topic).endswith("/" + topics.BIRTH):
                births.add(device)
            else:
                with contextlib.suppress(Exception):
                    status = OtaStatus.from_json(bytes(message.payload))
                    if status.final and status.release_id == bundle.release_id:
                        finals[device] = status
            cond.notify_all()

    monitor.on_message = on_message
    def on_connect(client: Any, *args: Any) -> None:
        client.subscribe([(f"{topics.DEVICE_PREFIX}/+/{topics.BIRTH}", 1),
                          (f"{topics.DEVICE_PREFIX}/+/{topics.OTA_STATUS}", 1)])

    monitor.on_connect = on_connect
    monitor.connect("127.0.0.1", port)
    monitor.loop_start()
    agents = []
    for device_id in ids:
        directory = work / device_id
        config = agent_config(directory, port, device_id, root, seed)
        log = (directory / "agent.log").open("ab")
        agents.append(subprocess.Popen(
            [sys.executable, "-m", "fleetlite.agent.cli", "run", "--config", str(config),
             "--log-level", "WARNING"], stdout=log, stderr=log,
            env=dict(os.environ, PYTHONUNBUFFERED="1")))
        log.close()
    publisher = ReleasePublisher("127.0.0.1", port)
    try:
        with cond:
            if not cond.wait_for(lambda: births >= set(ids), timeout=120):
                raise SystemExit("the agents did not start within 120 s")
        publisher.start(timeout=30)
        before = counters.read()
        started = time.monotonic()
        publisher.serve(bundle, chunk_size, initial_pass=True, wait=False)
        for device_id in ids:
            command = {"schema": "fleetlite.command/1", "id": uuid.uuid4().hex[:10],
                       "command": "ota_install",
                       "args": {"release_id": bundle.release_id, "chunk_size": chunk_size}}
            monitor.publish(topics.device_topic(device_id, topics.COMMAND),
                            json.dumps(command).encode(), qos=1).wait_for_publish(10)
        with cond:
            cond.wait_for(lambda: len(finals) == len(ids), timeout=timeout)
        seconds = time.monotonic() - started
        after = counters.read()
        installed = sum(1 for s in finals.values() if s.outcome == "installed")
        for device_id, status in finals.items():
            if status.outcome != "installed":
                print(f"# {device_id}: {status.outcome} {status.reason} {status.message}")
        return after[0] - before[0], after[1] - before[1], installed, seconds
    finally:
        with contextlib.suppress(Exception):
            publisher.stop_serving(bundle.release_id, timeout=60)
        publisher.close()
        for agent in agents:
            stop_child(agent, 30)
        monitor.disconnect()
        monitor.loop_stop()


def print_table(rows: Sequence[Row]) -> None:
    print("| model | mode | devices | model file | delta file | broker received | broker sent "
          "| sent per device | vs full | installed |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    full = {r.model: r for r in rows if r.mode == "full"}
    for r in rows:
        base = full.get(r.model)
        ratio = f"{r.broker_sent / base.broker_sent:.2f}x" if base and base.broker_sent else "—"
        print(f"| {r.model} | {r.mode} | {r.devices} | {r.model_bytes / 1024:.1f} KiB | "
              f"{r.delta_bytes / 1024:.1f} KiB | {r.broker_received / 1024:.1f} KiB | "
              f"{r.broker_sent / 1024:.1f} KiB | {r.sent_per_device / 1024:.1f} KiB | {ratio} | "
              f"{r.installed} of {r.devices} |")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fleetlite.tools.bench.bench_wire_delta",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--devices", type=int, default=4, help="agent processes per fleet")
    parser.add_argument("--model", default="int8,lm",
                        help="comma-separated: int8 (a 146 KiB int8 classifier), lm (the "
                             "project's 2.2 MB float32 LM)")
    parser.add_argument("--chunk-size", type=int, default=65536)
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="seconds for every device's final status")
    parser.add_argument("--json", action="store_true", help="also print JSON rows")
    args = parser.parse_args(argv)
    models = [m.strip() for m in args.model.split(",") if m.strip()]
    if not models or any(m not in ("int8", "lm") for m in models):
        parser.error("--model takes int8 and/or lm")
    print(f"# full vs delta rollout of a 10 % fine-tune to {args.devices} device(s), chunk "
          f"size {args.chunk_size}; {os.cpu_count()} CPUs, load "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
          f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}", flush=True)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="bench-delta-rollout-") as tmp:
        work = Path(tmp)
        root = write_root(work / "root.json")
        broker = Broker(work, max_queued=100_000, extra=["sys_interval 1"])
        counters = SysCounters(broker.port)
        try:
            for model in models:
                seed, _v1, full, delta = releases(model, work)
                model_file = full.manifest.default_variant.model.file
                (ref,) = delta.manifest.deltas
                for mode, bundle in (("full", full), ("delta", delta)):
                    received, sent, installed, seconds = rollout(
                        broker.port, work / model / mode, root, seed, bundle, args.devices,
                        args.chunk_size, counters, args.timeout)
                    rows.append(Row(model, mode, args.devices,
                                    full.manifest.file(model_file).length,
                                    delta.manifest.file(ref.delta).length, received, sent,
                                    installed, seconds))
                    print(f"# {model} {mode}: {installed} of {args.devices} installed in "
                          f"{seconds:.1f} s", flush=True)
        finally:
            counters.stop()
            broker.stop()
    print_table(rows)
    if args.json:
        for row in rows:
            print(json.dumps(asdict(row)))
    return 0 if all(r.installed == r.devices for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
