"""Rollout at fleet scale (issue 13): what a wave-by-wave OTA rollout costs the fleet side.

``python -m fleetlite.tools.bench.bench_rollout --devices 1000 --model-kib 256
[--waves 1%,10%,100%] [--store sqlite|postgresql] [--processes 1] [--connect-rate 500]``

starts, on this machine:

- a real Mosquitto on a free loopback port (``max_queued_messages`` 1,000,000, so that no
  chunk is dropped for a slow client; the file descriptor limit is raised to its hard limit,
  as docs/scaling.md says, and the broker and the simulator inherit it);
- a real controller as a child process (``python -m fleetlite.fleet.controller --tick 0.5``),
  so that its CPU time and memory can be read from ``/proc/PID/stat`` and ``/proc/PID/status``
  (sampled every 0.25 s; the peak is the kernel's ``VmHWM``);
- the fleet simulator (``python -m fleetlite.tools.sim``) with ``--devices`` devices (70 %
  ``rpi4``, 30 % ``jetson``), pinned to a root of trust made for the run;
- a signed release of a model of about ``--model-kib`` KiB: ``heavy_mlp`` of
  ``fleetlite.tools.models`` with one dense layer of ``sqrt(KiB * 256)`` units (float32
  weights, built with ``tools/tflite_builder.py``; no download), stored and rolled out with
  ``--waves`` (chunk size ``--chunk-size``, thresholds 0.9 / 0.1, as the first measured
  rollout of docs/scaling.md).

What the fleet side published is counted by **a counting client subscribed to the release
topics** (``fleetlite/v1/rel/+/chunks/+/+/+`` and ``.../manifest``, see ``sdk/topics.py`` and
``fleet/ota_publisher.py``): the sum of the payload bytes the release publisher put on them,
attributed to the wave running when they arrived (from the wave's first install command to
the next wave's; the first wave's from the rollout's creation, so the release's first
publication, retained, counts there). Those are the bytes the publisher sent to the broker
once; the broker's fan-out to the downloading devices, and its retained copies handed to
devices that subscribe later, are not in it (the broker's cost, not the fleet's).

Per wave and in total it prints: time to complete from the rollout's creation (the last
device of the wave recorded) and from the wave's start (its first install command), the
controller's CPU seconds and RSS, the bytes published and their ratio to the model's size.
Also the controller's RSS before the devices came and once all were registered (per device),
the SQLite file's size at the end, and a **baseline** measured in the same run: a bare paho
client publishing the model's bytes in chunks of the same size (QoS 1) to one subscriber, the
floor of a transfer through this broker on this machine, with the ratio of each wave to it.

No assertion on time: re-run it on your hardware.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from fleetlite.fleet.rollout import RolloutSpec, RolloutState, parse_waves
from fleetlite.fleet.store import Store
from fleetlite.sdk import topics
from fleetlite.sdk.bundle import build_release
from fleetlite.sdk.keys import SigningKey
from fleetlite.sdk.trust import new_root, root_envelope
from fleetlite.sdk.version import BUILD_TIME
from fleetlite.tools.bench.bench_ingest import Broker, fresh_store
from fleetlite.tools.bench.children import stop_child
from fleetlite.tools.models import heavy_mlp

ROOT_KEY = SigningKey.from_seed(b"\x31" * 32)
RELEASE_KEY = SigningKey.from_seed(b"\x32" * 32)
CLASSES = ("raspberry-pi-4", "jetson-orin-nano")
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# -- the controller's CPU and memory, from /proc ----------------------------------------------


def cpu_seconds(pid: int) -> float:
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime


def status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


@dataclass
class Sampler:
    """Samples a process's CPU seconds and RSS every ``period`` s, in a thread."""

    pid: int
    period: float = 0.25
    samples: list[tuple[float, float, int]] = field(default_factory=list)  # (t, cpu, rss kB)
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> Sampler:
        threading.Thread(target=self._run, daemon=True).start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(OSError, ValueError):
                self.samples.append((time.time(), cpu_seconds(self.pid),
                                     status_kb(self.pid, "VmRSS")))
            self._stop.wait(self.period)

    def stop(self) -> None:
        self._stop.set()

    def at(self, t: float) -> tuple[float, int]:
        """CPU seconds and RSS of the last sample at or before ``t``."""
        before = [s for s in self.samples if s[0] <= t] or self.samples[:1]
        return before[-1][1], before[-1][2]

    def peak_rss(self, t0: float, t1: float) -> int:
        return max((s[2] for s in self.samples if t0 <= s[0] <= t1), default=0)


# -- the counting client -----------------------------------------------------------------------


class Counting:
    """Subscribed to every release's manifest and chunk topics: (time, payload bytes) of each."""

    def __init__(self, port: int, client_id: str = "bench-counter") -> None:
        self.seen: list[tuple[float, int]] = []
        self.ready = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                                  clean_session=True)

        def on_connect(client: mqtt.Client, userdata: Any, flags: Any, reason: Any,
                       properties: Any) -> None:
            client.subscribe([(f"{topics.RELEASE_PREFIX}/+/{topics.RELEASE_CHUNKS}/+/+/+", 0),
                              (f"{topics.RELEASE_PREFIX}/+/{topics.RELEASE_MANIFEST}", 0)])

        def on_subscribe(*args: Any) -> None:
            self.ready.set()

        def on_message(client: mqtt.Client, userdata: Any, message: Any) -> None:
            if not message.retain:  # a retained message replayed at subscribe is not news
                self.seen.append((time.time(), len(message.payload)))

        self.client.on_connect = on_connect
        self.client.on_subscribe = on_subscribe
        self.client.on_message = on_message
        self.client.connect("127.0.0.1", port, keepalive=60)
        self.client.loop_start()
        if not self.ready.wait(10):
            raise SystemExit("the counting client could not subscribe")

    def between(self, t0: float, t1: float) -> tuple[int, int]:
        """Messages and payload bytes that arrived in [t0, t1)."""
        chosen = [n for t, n in self.seen if t0 <= t < t1]
        return len(chosen), sum(chosen)

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def bare_transfer(port: int, model: bytes, chunk_size: int) -> float:
    """Seconds for a bare paho client to publish ``model`` in ``chunk_size`` pieces (QoS 1, 20
    in flight) to one subscriber until it has them all: the floor of a transfer here."""
    chunks = [model[i:i + chunk_size] for i in range(0, len(model), chunk_size)]
    got = threading.Event()
    received = [0]
    topic = "bench/bare/chunks"
    sub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-bare-sub", clean_session=True)
    subscribed = threading.Event()

    def on_message(client: mqtt.Client, userdata: Any, message: Any) -> None:
        received[0] += 1
        if received[0] == len(chunks):
            got.set()

    sub.on_message = on_message
    sub.on_subscribe = lambda *a: subscribed.set()
    sub.on_connect = lambda c, *a: c.subscribe(topic, qos=1)
    sub.connect("127.0.0.1", port, keepalive=60)
    sub.loop_start()
    subscribed.wait(10)
    pub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-bare-pub", clean_session=True)
    pub.max_inflight_messages_set(20)
    pub.connect("127.0.0.1", port, keepalive=60)
    pub.loop_start()
    time.sleep(0.2)
    start = time.monotonic()
    for chunk in chunks:
        pub.publish(topic, chunk, qos=1)
    got.wait(600)
    seconds = time.monotonic() - start
    for client in (pub, sub):
        client.disconnect()
        client.loop_stop()
    return seconds


# -- the run ----------------------------------------------------------------------------------


def model_bytes(kib: int) -> bytes:
    units = max(4, round(math.sqrt(kib * 1024 / 4)))
    return heavy_mlp(size=units, layers=1).tflite


def rollout_state(store: Store, rollout_id: str) -> RolloutState:
    record = store.get_rollout(rollout_id)
    return RolloutState.from_dict(record.state) if record and record.state else RolloutState()


def wait_for(predicate: Any, timeout: float, what: str, step: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            print(f"# timed out after {timeout:g} s waiting for {what}", flush=True)
            return False
        time.sleep(step)
    return True


def last_stats(log: Path) -> dict[str, Any]:
    found: dict[str, Any] = {}
    with contextlib.suppress(OSError):
        for line in log.read_text().splitlines():
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    found = json.loads(line)
    return found


def run(args: argparse.Namespace) -> int:
    fd_limit = raise_fd_limit()
    model = model_bytes(args.model_kib)
    waves = parse_waves(args.waves)
    print(f"# devices {args.devices}, model {len(model):,} bytes, waves {args.waves}, "
          f"chunk {args.chunk_size}, store {args.store}, fd limit {fd_limit}, "
          f"load {os.getloadavg()[0]:.2f}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-rollout-") as tmp:
        work = Path(tmp)
        (work / "heavy_mlp.tflite").write_bytes(model)
        root = work / "root.json"
        root.write_bytes(root_envelope(new_root(
            [ROOT_KEY.public_key], [RELEASE_KEY.public_key], release_threshold=1,
            expires=BUILD_TIME + 10 * 365 * 86400)).sign(ROOT_KEY).to_json())
        broker = Broker(work, max_queued=1_000_000)
        children: list[subprocess.Popen[bytes]] = []
        try:
            with fresh_store(args.store, work) as store:
                return _measure(args, work, broker, store, model, waves, root, children)
        finally:
            for child in reversed(children):
                stop_child(child, 60)
            broker.stop()


def _store_url(store: Store, work: Path) -> str:
    url = getattr(store, "url", None)
    return str(url) if url else f"sqlite:///{work / 'fleet.db'}"


def _measure(args: argparse.Namespace, work: Path, broker: Broker, store: Store, model: bytes,
             waves: Any, root: Path, children: list[subprocess.Popen[bytes]]) -> int:
    baseline = bare_transfer(broker.port, model, args.chunk_size)
    print(f"# baseline: bare publish of {len(model):,} bytes in {args.chunk_size}-byte chunks "
          f"to one subscriber: {baseline:.3f} s", flush=True)
    counter = Counting(broker.port)
    env = dict(os.environ, FLEETLITE_LOG_LEVEL="WARNING")
    ctl_log = (work / "controller.log").open("wb")
    controller = subprocess.Popen(
        [sys.executable, "-m", "fleetlite.fleet.controller", "--db", _store_url(store, work),
         "--broker", f"127.0.0.1:{broker.port}", "--tick", "0.5", "--log-level", "WARNING"],
        stdout=ctl_log, stderr=subprocess.STDOUT, env=env)
    children.append(controller)
    sampler = Sampler(controller.pid).start()
    time.sleep(3)
    rss_idle = status_kb(controller.pid, "VmRSS")
    sim_log = work / "sim.log"
    with sim_log.open("wb") as out:
        sim = subprocess.Popen(
            [sys.executable, "-m", "fleetlite.tools.sim", "--broker",
             f"127.0.0.1:{broker.port}", "--devices", str(args.devices), "--classes",
             "rpi4=0.7,jetson=0.3", "--root", str(root), "--report-s", str(args.report_s),
             "--step-s", "0.05", "--seed", "13", "--stats-s", "5", "--connect-rate",
             str(args.connect_rate), "--processes", str(args.processes)],
            stdout=out, stderr=subprocess.STDOUT)
    children.insert(0, sim)
    t_sim = time.time()
    ok = wait_for(lambda: len(store.list_devices()) >= args.devices, args.register_timeout,
                  "every device to register", step=1.0)
    registered = len(store.list_devices())
    t_reg = time.time()
    time.sleep(5)  # let the births' profiles and first reports settle
    rss_reg = status_kb(controller.pid, "VmRSS")
    print(f"# registered {registered} of {args.devices} in {t_reg - t_sim:.1f} s; controller "
          f"RSS {rss_idle / 1024:.1f} MiB idle -> {rss_reg / 1024:.1f} MiB "
          f"({(rss_reg - rss_idle) * 1024 / max(1, registered):,.0f} bytes per device)",
          flush=True)
    if not ok and registered == 0:
        return 1

    bundle = build_release([work / "heavy_mlp.tflite"], name="intent", version=2,
                           device_classes=list(CLASSES), issued=BUILD_TIME + 86400,
                           keys=[RELEASE_KEY])
    store.add_release(bundle.release_id, "intent", 2, bundle.envelope.to_json(),
                      dict(bundle.files), bundle.manifest.to_dict())
    spec = RolloutSpec(rollout_id="r-bench", release_id=bundle.release_id, model="intent",
                       version=2, previous_version=1, waves=waves, success_threshold=0.9,
                       failure_threshold=0.1, wave_timeout_s=args.timeout,
                       chunk_size=args.chunk_size)
    cpu0 = cpu_seconds(controller.pid)
    t_create = time.time()
    store.create_rollout("r-bench", bundle.release_id, spec.to_dict())

    def settled() -> bool:
        state = rollout_state(store, "r-bench")
        return state.finished and not any(d.status in ("sent", "rollback_sent")
                                          for d in state.devices.values())

    finished = wait_for(settled, args.timeout, "the rollout to finish", step=0.5)
    t_end = time.time()
    time.sleep(1)
    sampler.stop()
    state = rollout_state(store, "r-bench")
    total_cpu = cpu_seconds(controller.pid) - cpu0
    hwm = status_kb(controller.pid, "VmHWM")
    sim_stats = last_stats(sim_log)

    # -- the table
    print(f"# rollout {state.state} {'' if finished else '(NOT settled) '}{state.reason}; "
          f"statuses {dict(Counter(d.status for d in state.devices.values()))}")
    size = len(model)
    rows = []
    numbers = sorted({d.wave for d in state.devices.values()})
    starts = {w: min((d.sent_at for d in state.devices.values() if d.wave == w and d.sent_at),
                     default=None) for w in numbers}
    for w in numbers:
        mine = [d for d in state.devices.values() if d.wave == w]
        start = starts[w]
        ends = [d.updated_at for d in mine if d.updated_at]
        end = max(ends) if ends else None
        nxt = next((starts[v] for v in numbers if v > w and starts[v]), None)
        window_end = nxt if nxt else t_end + 1
        msgs, published = counter.between(start or t_create, window_end)
        if w == numbers[0]:
            msgs, published = counter.between(t_create, window_end)
        c0, _ = sampler.at(start or t_create)
        c1, _ = sampler.at(end or t_end)
        peak = sampler.peak_rss(start or t_create, end or t_end)
        rows.append((w, len(mine), Counter(d.status for d in mine),
                     (end - t_create) if end else float("nan"),
                     (end - start) if end and start else float("nan"),
                     c1 - c0, peak, msgs, published))
    print()
    print("| wave | devices | installed / failed | done after creation (s) | "
          "done after wave start (s) | vs bare transfer | controller CPU (s) | "
          "controller peak RSS (MiB) | release messages | bytes published | x model |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for w, n, st, since_create, since_start, cpu, peak, msgs, published in rows:
        print(f"| {w} | {n:,} | {st.get('installed', 0):,} / {st.get('failed', 0):,} | "
              f"{since_create:.1f} | {since_start:.1f} | {since_start / baseline:.1f}x | "
              f"{cpu:.1f} | {peak / 1024:.1f} | {msgs:,} | {published:,} | "
              f"{published / size:.2f} |")
    all_msgs, all_bytes = counter.between(t_create, t_end + 1)
    print(f"| all | {len(state.devices):,} | "
          f"{sum(r[2].get('installed', 0) for r in rows):,} / "
          f"{sum(r[2].get('failed', 0) for r in rows):,} | {t_end - t_create:.1f} | — | — | "
          f"{total_cpu:.1f} | {hwm / 1024:.1f} (VmHWM) | {all_msgs:,} | {all_bytes:,} | "
          f"{all_bytes / size:.2f} |")
    print()
    db = work / "fleet.db"
    db_bytes = sum(p.stat().st_size for p in work.glob("fleet.db*")) if db.exists() else 0
    print(f"# model {size:,} bytes; baseline bare transfer {baseline:.3f} s; store at the end "
          f"{db_bytes:,} bytes (SQLite file with its -wal/-shm); controller RSS idle "
          f"{rss_idle / 1024:.1f} MiB, registered {rss_reg / 1024:.1f} MiB, peak "
          f"{hwm / 1024:.1f} MiB; controller CPU in the rollout {total_cpu:.1f} s "
          f"in {t_end - t_create:.1f} s")
    print(f"# simulator's last line: {json.dumps(sim_stats)[:1500]}", flush=True)
    counter.stop()
    ctl_log.close()
    tail = (work / "controller.log").read_text(errors="replace").splitlines()[-5:]
    if tail:
        print("# controller log tail:\n#   " + "\n#   ".join(tail))
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--model-kib", type=int, default=256)
    parser.add_argument("--waves", default="1%,10%,100%")
    parser.add_argument("--store", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--processes", type=int, default=1, help="simulator processes")
    parser.add_argument("--connect-rate", type=float, default=500)
    parser.add_argument("--report-s", type=float, default=10.0, help="simulated telemetry period")
    parser.add_argument("--chunk-size", type=int, default=4096)
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="seconds for the rollout (also each wave's timeout)")
    parser.add_argument("--register-timeout", type=float, default=300.0)
    args = parser.parse_args(argv)
    if args.store == "postgresql" and not os.environ.get("FLEETLITE_TEST_PG_URL"):
        parser.error("--store postgresql needs FLEETLITE_TEST_PG_URL "
                     '(FLEETLITE_TEST_PG_URL="$(bash tools/postgres.sh)")')
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
