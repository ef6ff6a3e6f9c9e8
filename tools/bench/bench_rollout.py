"""Rollout at fleet scale (issue 13): what a wave-by-wave OTA rollout costs the fleet side.

``python -m fleetlite.tools.bench.bench_rollout --devices 1000 --model-kib 256
[--waves 1%,10%,100%] [--store sqlite|postgresql] [--processes 1] [--connect-rate 500]
[--kill-controller-at WAVE[:FRACTION] [--down-s 5]]``

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
  weights, built with ``fleet/tflite_builder.py``; no download), stored and rolled out with
  ``--waves`` (chunk size ``--chunk-size``, thresholds 0.9 / 0.1, as the first measured
  rollout of docs/scaling.md).

What the fleet side published is counted by **a counting client subscribed to the release
topics** (``fleetlite/v1/rel/+/chunks/#`` and ``.../manifest``, see ``sdk/topics.py`` and
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

The controller runs with a stable id (``--id bench-ctl``), so its MQTT session is persistent
(docs/scaling.md, "What a killed controller loses"): what the devices report while it is down
waits in its session.

**A killed controller** (``--kill-controller-at WAVE[:FRACTION]``, e.g. ``3:0.25``): once wave
WAVE has started and FRACTION (default 0.25) of its devices have a final status in the
rollout, the controller is killed with SIGKILL (no flush, no acknowledgement, no lease given
back), left down ``--down-s`` seconds (default 5) while the devices go on reporting, and started
again with the same command line: the same store, broker and id. It prints the time down and
the recovery: from the restart to the first report stored, to the first rollout decision, and
to the last of the statuses published while it was down being stored.

At the end of every run the simulator is stopped (its summary) and **every report is checked**
(:func:`check_reports`): the final OTA statuses stored for the release, by ``outcome`` or
``outcome:reason``, must equal the simulator's own count of ended installs (``outcomes`` of
its summary, ``tools/sim/stats.py``; a status is counted there once the broker acknowledged
it): fewer stored is a lost report, more a double count; every device the rollout holds in a
final state must have a stored final status with that outcome; and no more OTA statuses may be
stored than the simulator sent (the store keeps a redelivered QoS 1 duplicate once, by its
digest, so ``sent - stored`` is the finals a device said again plus any lost progress status).
A ``rolled_back`` final (an operator or engine rollback) is not counted by the simulator and is
left out. The verdict, and a JSON line with the figures, are printed; the exit status is 1 when
the check fails, or when a run with a kill did not complete.

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

from fleetlite.fleet.release_builder import build_release
from fleetlite.fleet.rollout import RolloutSpec, RolloutState, parse_waves
from fleetlite.fleet.store import OtaRecord, Store
from fleetlite.sdk import topics
from fleetlite.sdk.keys import SigningKey
from fleetlite.sdk.trust import new_root, root_envelope
from fleetlite.sdk.version import BUILD_TIME
from fleetlite.tools.bench.bench_ingest import Broker, fresh_store
from fleetlite.tools.bench.children import kill_child, stop_child
from fleetlite.tools.models import heavy_mlp

ROOT_KEY = SigningKey.from_seed(b"\x31" * 32)
RELEASE_KEY = SigningKey.from_seed(b"\x32" * 32)
CLASSES = ("raspberry-pi-4", "jetson-orin-nano")
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
CONTROLLER_ID = "bench-ctl"


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
    #: CPU seconds of the processes sampled before ``pid`` (a killed controller's)
    cpu_before: float = 0.0

    def start(self) -> Sampler:
        threading.Thread(target=self._run, daemon=True).start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(OSError, ValueError):
                self.samples.append((time.time(), self.cpu_before + cpu_seconds(self.pid),
                                     status_kb(self.pid, "VmRSS")))
            self._stop.wait(self.period)

    def cpu(self) -> float:
        """CPU seconds so far, the processes sampled before included."""
        return self.cpu_before + cpu_seconds(self.pid)

    def switch(self, pid: int) -> None:
        """Go on with another process (a restarted controller): its CPU time adds to the
        last sample of the one before."""
        self.cpu_before = self.samples[-1][1] if self.samples else self.cpu_before
        self.pid = pid

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
            client.subscribe([(f"{topics.RELEASE_PREFIX}/+/{topics.RELEASE_CHUNKS}/#", 0),
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
    # a rollout no controller has stepped yet has no state document (but may have devices)
    return (RolloutState.from_dict(record.state) if record and record.state.get("state")
            else RolloutState())


def wait_for(predicate: Any, timeout: float, what: str, step: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            print(f"# timed out after {timeout:g} s waiting for {what}", flush=True)
            return False
        time.sleep(step)
    return True


def last_stats(log: Path, event: Optional[str] = None) -> dict[str, Any]:
    """The simulator's last JSON line (of that ``event``, if given); {} if it printed none."""
    found: dict[str, Any] = {}
    with contextlib.suppress(OSError):
        for line in log.read_text().splitlines():
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    data = json.loads(line)
                    if event is None or data.get("event") == event:
                        found = data
    return found


def sim_summary(log: Path) -> dict[str, Any]:
    """The simulator's ``summary`` line ({} if it printed none)."""
    return last_stats(log, "summary")


# -- the killed controller and the report check ------------------------------------------------


@dataclass(frozen=True)
class KillPlan:
    """``WAVE[:FRACTION]``: kill once ``fraction`` of wave ``wave``'s devices have ended."""

    wave: int
    fraction: float = 0.25

    @classmethod
    def parse(cls, text: str) -> KillPlan:
        wave, _, fraction = text.partition(":")
        try:
            plan = cls(int(wave), float(fraction) if fraction else 0.25)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected WAVE[:FRACTION], got {text!r}") from None
        if plan.wave < 1 or not 0 <= plan.fraction < 1:
            raise argparse.ArgumentTypeError(f"WAVE >= 1 and 0 <= FRACTION < 1, got {text!r}")
        return plan

    def due(self, state: RolloutState) -> bool:
        mine = [d for d in state.devices.values() if d.wave == self.wave]
        if not mine or not any(d.sent_at for d in mine):
            return False
        ended = sum(1 for d in mine if d.status not in UNFINISHED)
        return ended >= max(1, math.ceil(self.fraction * len(mine))) if self.fraction else True


UNFINISHED = ("pending", "waiting_offline", "sent", "rollback_sent")


def outcome_key(outcome: str, reason: str) -> str:
    """As the simulator counts an ended install (``tools/sim/stats.py``)."""
    return f"{outcome}:{reason}" if reason else outcome


@dataclass
class ReportCheck:
    """Every final OTA status the simulated devices sent, against the store (see the module's
    docstring). ``ok`` when nothing is lost or counted twice."""

    sent_finals: dict[str, int]
    stored_finals: dict[str, int]
    lost: int  # finals the devices sent (acknowledged) that the store does not hold
    double_counted: int  # finals stored beyond what the devices sent
    statuses_sent: int
    statuses_stored: int
    devices_with_final: int  # devices with at least one stored final status of the release
    rollout_without_final: list[str]  # in a final state in the rollout, no such status stored
    rolled_back_stored: int  # rollback finals (not counted by the simulator)
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "lost": self.lost, "double_counted": self.double_counted,
                "sent_finals": self.sent_finals, "stored_finals": self.stored_finals,
                "statuses_sent": self.statuses_sent, "statuses_stored": self.statuses_stored,
                "devices_with_final": self.devices_with_final,
                "rollout_without_final": self.rollout_without_final[:20],
                "rolled_back_stored": self.rolled_back_stored, "problems": self.problems}


def check_reports(summary: dict[str, Any], records: list[OtaRecord],
                  state: Optional[RolloutState], devices: int) -> ReportCheck:
    """Compare the simulator's ``summary`` with the OTA statuses stored for the release
    (``records``) and the rollout's per-device ``state``."""
    problems: list[str] = []
    if summary.get("devices") != devices:
        problems.append(f"the simulator's summary covers {summary.get('devices')} devices, "
                        f"not {devices} (a process that printed none?)")
    sent = Counter({k: int(v) for k, v in summary.get("outcomes", {}).items()})
    finals = [r.status for r in records if r.status.final]
    stored = Counter(outcome_key(s.outcome, s.reason) for s in finals
                     if s.outcome != "rolled_back")
    lost = sum(max(0, n - stored[k]) for k, n in sent.items())
    double = sum(max(0, n - sent[k]) for k, n in stored.items())
    if lost:
        problems.append(f"{lost} final statuses sent but not stored: "
                        f"{dict((sent - stored).most_common(5))}")
    if double:
        problems.append(f"{double} final statuses stored beyond those sent: "
                        f"{dict((stored - sent).most_common(5))}")
    by_device: dict[str, set[str]] = {}
    for status in finals:
        by_device.setdefault(status.device_id, set()).add(status.outcome)
    missing = sorted(d.device_id for d in (state.devices.values() if state else ())
                     if d.status not in UNFINISHED and d.status not in ("timed_out", "excluded",
                                                                      "rollback_failed")
                     and d.status not in by_device.get(d.device_id, set()))
    if missing:
        problems.append(f"{len(missing)} devices final in the rollout without that final "
                        f"status stored, e.g. {missing[:3]}")
    statuses_sent = int(summary.get("counts", {}).get("ota_statuses", 0))
    if len(records) > statuses_sent:
        problems.append(f"{len(records)} OTA statuses stored, more than the {statuses_sent} sent")
    return ReportCheck(sent_finals=dict(sent), stored_finals=dict(stored), lost=lost,
                       double_counted=double, statuses_sent=statuses_sent,
                       statuses_stored=len(records), devices_with_final=len(by_device),
                       rollout_without_final=missing,
                       rolled_back_stored=sum(1 for s in finals if s.outcome == "rolled_back"),
                       problems=problems)


def start_controller(store_url: str, port: int, log: Path) -> subprocess.Popen[bytes]:
    """The controller child, with the stable id (a persistent session): a restart is the same
    command line."""
    env = dict(os.environ, FLEETLITE_LOG_LEVEL="WARNING")
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "fleetlite.fleet.controller", "--db", store_url,
             "--broker", f"127.0.0.1:{port}", "--id", CONTROLLER_ID, "--tick", "0.5",
             "--log-level", "WARNING"],
            stdout=out, stderr=subprocess.STDOUT, env=env)


def run(args: argparse.Namespace) -> int:
    fd_limit = raise_fd_limit()
    model = model_bytes(args.model_kib)
    waves = parse_waves(args.waves)
    print(f"# devices {args.devices}, model {len(model):,} bytes, waves {args.waves}, "
          f"chunk {args.chunk_size}, max in flight {args.max_in_flight or 'no limit'}, "
          f"store {args.store}, fd limit {fd_limit}, "
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
    ctl_log = work / "controller.log"
    controller = start_controller(_store_url(store, work), broker.port, ctl_log)
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
             "--step-s", str(args.step_s), "--seed", "13", "--stats-s", "5", "--connect-rate",
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
                       chunk_size=args.chunk_size, max_in_flight=args.max_in_flight)
    cpu0 = sampler.cpu()
    t_create = time.time()
    store.create_rollout("r-bench", bundle.release_id, spec.to_dict())
    kill: dict[str, Any] = {}
    hwm_killed = 0
    died: list[int] = []

    def settled() -> bool:
        nonlocal controller, hwm_killed
        if controller.poll() is not None:  # not by us: no use waiting (its log tail follows)
            died.append(controller.returncode)
            print(f"# the controller exited by itself (status {controller.returncode})",
                  flush=True)
            return True
        state = rollout_state(store, "r-bench")
        if args.kill_controller_at and not kill and args.kill_controller_at.due(state):
            hwm_killed = status_kb(controller.pid, "VmHWM")
            kill["decision_id_at_kill"] = store.last_decision_id("r-bench")
            kill["ended_in_wave_at_kill"] = sum(
                1 for d in state.devices.values()
                if d.wave == args.kill_controller_at.wave and d.status not in UNFINISHED)
            kill["killed_at"] = kill_child(controller)
            print(f"# controller killed (SIGKILL) at {kill['killed_at'] - t_create:.1f} s, "
                  f"{kill['ended_in_wave_at_kill']} devices of wave "
                  f"{args.kill_controller_at.wave} ended; down {args.down_s:g} s", flush=True)
            time.sleep(args.down_s)
            controller = start_controller(_store_url(store, work), broker.port, ctl_log)
            kill["restarted_at"] = time.time()
            children.append(controller)
            sampler.switch(controller.pid)
            return False
        return state.finished and not any(d.status in ("sent", "rollback_sent")
                                          for d in state.devices.values())

    finished = wait_for(settled, args.timeout, "the rollout to finish", step=0.5) and not died
    t_end = time.time()
    time.sleep(1)
    sampler.stop()
    state = rollout_state(store, "r-bench")
    total_cpu = sampler.cpu() - cpu0
    hwm = max(0 if died else status_kb(controller.pid, "VmHWM"), hwm_killed)
    broker_hwm = status_kb(broker.process.pid, "VmHWM")  # what the broker held at its peak
    # the simulator's own counts: stop it (every device then sends its shutdown status)
    stop_child(sim, 120)
    summary = sim_summary(sim_log)
    sim_stats = summary or last_stats(sim_log)

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
          f"in {t_end - t_create:.1f} s; Mosquitto peak RSS {broker_hwm / 1024:.1f} MiB (VmHWM)")
    print(f"# simulator's last line: {json.dumps(sim_stats)[:1500]}", flush=True)
    counter.stop()
    tail = ctl_log.read_text(errors="replace").splitlines()[-5:]
    if tail:
        print("# controller log tail:\n#   " + "\n#   ".join(tail))

    # -- every report: the simulator's counts against the store
    def check() -> ReportCheck:
        return check_reports(summary, store.ota_records(release_id=bundle.release_id), state,
                             args.devices)

    verdict = check()
    deadline = time.monotonic() + 60  # what the controller received may still be stored
    while verdict.lost and time.monotonic() < deadline:
        time.sleep(1)
        verdict = check()
    completed = finished and state.state == "completed"
    print(f"# rollout completed: {'yes' if completed else 'NO'}; final OTA statuses sent "
          f"(acknowledged) {sum(verdict.sent_finals.values()):,}, stored "
          f"{sum(verdict.stored_finals.values()):,}: lost {verdict.lost}, double counted "
          f"{verdict.double_counted}; devices with a stored final status "
          f"{verdict.devices_with_final:,}; OTA statuses sent {verdict.statuses_sent:,}, "
          f"stored {verdict.statuses_stored:,}")
    print(f"# report check: {'OK' if verdict.ok else 'FAILED: ' + '; '.join(verdict.problems)}")
    if kill:
        kill.update(recovery(store, bundle.release_id, kill))
        print(f"# controller down {kill['down_s']:.1f} s (SIGKILL to restart); after the "
              f"restart: first report stored in {_s(kill.get('first_stored_s'))}, first rollout "
              f"decision in {_s(kill.get('first_decision_s'))}; "
              f"{kill['published_while_down']:,} OTA statuses published while it was down, "
              f"the last of them stored {_s(kill.get('outage_stored_s'))} after the restart",
              flush=True)
    elif args.kill_controller_at:
        print("# the controller was NOT killed: the kill condition never held")
    print(json.dumps({"bench": "rollout", "devices": args.devices, "completed": completed,
                      "state": state.state, "killed": bool(kill), "kill": kill,
                      "check": verdict.to_dict(), "sim": summary}), flush=True)
    if not verdict.ok or (args.kill_controller_at and not (kill and completed)):
        return 1
    return 0


def _s(seconds: Optional[float]) -> str:
    return "never" if seconds is None else f"{seconds:.1f} s"


def recovery(store: Store, release_id: str, kill: dict[str, Any]) -> dict[str, Any]:
    """How the restarted controller caught up, from the store: seconds from the restart to its
    first stored report, to its first rollout decision, and to the last stored of the statuses
    the devices published while it was down (device time in [kill, restart))."""
    killed, restarted = kill["killed_at"], kill["restarted_at"]
    records = store.ota_records(release_id=release_id)
    after = [r.received_at for r in records if r.received_at >= restarted]
    outage = [r for r in records if killed <= r.status.ts < restarted]
    decisions = store.decisions("r-bench", after=kill["decision_id_at_kill"])
    return {"down_s": restarted - killed,
            "first_stored_s": (min(after) - restarted) if after else None,
            "first_decision_s": (decisions[0].ts - restarted) if decisions else None,
            "published_while_down": len(outage),
            "stored_before_restart": sum(1 for r in outage if r.received_at < restarted),
            "outage_stored_s": (max(r.received_at for r in outage) - restarted) if outage else None}


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
    parser.add_argument("--max-in-flight", type=int, default=0, metavar="N",
                        help="the rollout's max_in_flight: at most N devices installing at once "
                        "(default 0: no limit)")
    parser.add_argument("--step-s", type=float, default=0.05,
                        help="the simulator's delay per install phase (a slower install)")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="seconds for the rollout (also each wave's timeout)")
    parser.add_argument("--register-timeout", type=float, default=300.0)
    parser.add_argument("--kill-controller-at", metavar="WAVE[:FRACTION]", type=KillPlan.parse,
                        help="SIGKILL the controller once FRACTION (default 0.25) of wave "
                        "WAVE's devices have ended, restart it after --down-s with the same "
                        "store, broker and id, and report the outage and the recovery")
    parser.add_argument("--down-s", type=float, default=5.0,
                        help="seconds the killed controller stays down")
    args = parser.parse_args(argv)
    if args.store == "postgresql" and not os.environ.get("FLEETLITE_TEST_PG_URL"):
        parser.error("--store postgresql needs FLEETLITE_TEST_PG_URL "
                     '(FLEETLITE_TEST_PG_URL="$(bash tools/postgres.sh)")')
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
