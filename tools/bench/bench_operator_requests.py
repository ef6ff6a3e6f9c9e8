"""Operator requests during a large rollout (issue 13): how long a ``pause``, ``resume`` or
``abort`` takes to be applied while a controller drives a rollout to ``--devices`` devices,
against the same requests on the same store with the rollout idle; and the decisions per second
the controller stores meanwhile (and its counters: ``stale_batches`` are the steps whose
decisions were discarded because a request changed the rollout while they were decided).

``python -m fleetlite.tools.bench.bench_operator_requests [--devices 10000]
[--store sqlite|postgresql|both] [--requests 50]``

For each store it starts, on this machine:

- a real Mosquitto on a free loopback port (no ACL: one client may speak for every device);
- a store seeded with ``--devices`` registered devices through the Store API (status and
  birth, 70 % ``raspberry-pi-4`` and 30 % ``jetson-orin-nano``, each running ``intent`` v1), as
  ``bench_large_fleet`` does, with one profile of v1 each (the gates' baseline);
- a real controller as a child process (``python -m fleetlite.fleet.controller --tick 0.5``);
- two signed releases of a small model (``intent`` v2 and v3), stored;
- **one responder process** (this module with ``--respond``) standing in for the devices: it
  subscribes to every device's command topic (``fleetlite/v1/dev/+/cmd``) and answers each
  ``ota_install`` on that device's ``ota/status`` topic: ``accepted``, then the final
  ``installed`` (``--fail-rate`` of the devices, chosen by a hash of their id: ``failed``),
  and for an installed device its new birth and a profile of v2, as the agent does. So
  the rollout's decisions and store writes are the controller's real ones; only the devices are
  not. It holds back the final status of the last 1 % of devices it is sent an install (at
  least one), so that the rollout cannot complete before the operator's last request, and lets
  them answer once the abort is applied.

Two phases, each the same sequence of ``--requests`` requests through the SDK
(:class:`fleetlite.fleet.Fleet`, as an operator's script would call them: ``pause`` then
``resume``, repeated, and last ``pause`` then ``abort``), each waiting for the controller's
answer:

1. **baseline, the rollout idle**: a rollout of v3 to every device whose first wave was sent to
   devices that never answer (the responder is not running yet): the controller ticks and reads
   it, but nothing is ingested and nothing is decided; requests follow each other every 0.2 s;
2. **under load**: a rollout of v2 to every device, waves ``--waves`` (default 1%,10%,100%),
   thresholds 0.5/0.5, answered by the responder; the requests are spread over the rollout's
   progress (the i-th pair once ``i/(pairs+1)`` of 95 % of the answers came), so that they fall
   in the waves' busiest moments. The table also splits them: those called while the devices'
   answers were still arriving (the ingest under way), and those after (the held devices keep
   the rollout running, and the controller reads it on every tick).

A request's latency is from the call to the SDK's return with the controller's answer (what an
operator waits for: the request is written under the rollout's lock, the controller applies it
within 0.1 s, the SDK polls the decision log every 25 ms); the rollout's state is checked
after each (``paused``, ``running``, ``aborted``). Printed per phase and action: count, p50,
p95, p99, max, and the ratio of load to baseline; also the time to the step that applied it
(the decision's ``ts``, the start of the controller's tick) and the decisions per second
(decisions about a device the controller logged, over the rollout, and the busiest second).

No assertion on time: re-run it on your hardware. ``--json`` adds one JSON line per store.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import select
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid
import zlib
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from fleetlite.fleet.client import Fleet
from fleetlite.fleet.release_builder import build_release
from fleetlite.fleet.rollout import RolloutSpec, RolloutState, Selector, parse_waves
from fleetlite.fleet.store import Store, open_store
from fleetlite.sdk import topics
from fleetlite.sdk.messages import OtaStatus
from fleetlite.sdk.version import BUILD_TIME
from fleetlite.tools.bench.bench_ingest import Broker
from fleetlite.tools.bench.bench_rollout import RELEASE_KEY, model_bytes, raise_fd_limit
from fleetlite.tools.bench.children import stop_child
from fleetlite.tools.sim.reports import DeviceState, birth, online_status, profile

CLASSES = ("raspberry-pi-4", "jetson-orin-nano")
MODEL = "intent"
LOAD_ID, IDLE_ID = "r-load", "r-idle"
REQUEST_WAIT_S = 120.0
EXPECTED_STATE = {"pause": "paused", "resume": "running", "abort": "aborted"}


# -- the responder (a child process) ---------------------------------------------------------


def device_class(device_id: str) -> str:
    """70 % of the devices are ``raspberry-pi-4``, the rest ``jetson-orin-nano`` (by id)."""
    return CLASSES[0] if zlib.crc32(b"class:" + device_id.encode()) % 10 < 7 else CLASSES[1]


def latency_ms(device_id: str) -> float:
    return 12.0 if device_class(device_id) == CLASSES[0] else 4.0


def failing(device_id: str, fail_rate: float) -> bool:
    """Whether the responder fails this device's install: a stable fraction of ids."""
    return zlib.crc32(device_id.encode()) % 10_000 < fail_rate * 10_000


def respond(port: int, devices: int, fail_rate: float, version: int) -> int:
    """Answer every ``ota_install`` command as its device would, until stdin closes. Holds back
    the final status of the last ``max(1, devices // 100)`` devices it is sent an install until
    a line ``release`` arrives on stdin. An installed device then publishes its new birth
    (retained) and a profile of the new version, as the agent does (the rollout's gates wait
    for it). Prints ``ready`` once subscribed, then a JSON summary."""
    hold = max(1, devices // 100)
    seen: set[str] = set()
    held: list[tuple[str, str]] = []
    counts: Counter[str] = Counter()
    lock = threading.Lock()
    released = threading.Event()
    subscribed = threading.Event()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-responder",
                         clean_session=True)
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)

    rng = random.Random(31)

    def status(device_id: str, release_id: str, final: bool) -> None:
        bad = failing(device_id, fail_rate)
        now = time.time()
        message = OtaStatus(
            device_id=device_id, ts=now, release_id=release_id, model=MODEL,
            version=version, phase="done" if final else "accepted", final=final,
            outcome=("failed" if bad else "installed") if final else "",
            reason="download_timeout" if final and bad else "")
        client.publish(topics.device_topic(device_id, topics.OTA_STATUS), message.to_json(),
                       qos=1)
        counts["final_failed" if final and bad else "final_installed" if final
               else "accepted"] += 1
        if final and not bad:
            state = DeviceState(device_id, device_class(device_id), MODEL, version)
            client.publish(topics.device_topic(device_id, topics.BIRTH),
                           birth(state, now, {}).to_json(), qos=1, retain=True)
            client.publish(topics.device_topic(device_id, topics.PROFILE),
                           profile(state, now, latency_ms(device_id), rng).to_json(), qos=1)

    def on_connect(c: mqtt.Client, userdata: Any, flags: Any, reason: Any,
                   properties: Any) -> None:
        c.subscribe(topics.fleet_subscription(topics.COMMAND), qos=1)

    def on_message(c: mqtt.Client, userdata: Any, message: Any) -> None:
        try:
            command = json.loads(message.payload)
            device_id = topics.parse_device_topic(message.topic).device_id
        except (ValueError, topics.TopicError):
            return
        if command.get("command") != "ota_install":
            return
        release_id = str(command.get("args", {}).get("release_id", ""))
        with lock:
            counts["commands"] += 1
            first = device_id not in seen
            seen.add(device_id)
            hold_it = not released.is_set() and (
                (first and len(seen) > devices - hold) or device_id in dict(held))
            status(device_id, release_id, final=False)
            if hold_it:
                held.append((device_id, release_id))
                counts["held"] += 1
                return
            status(device_id, release_id, final=True)

    client.on_connect = on_connect
    client.on_subscribe = lambda *a: subscribed.set()
    client.on_message = on_message
    client.connect("127.0.0.1", port, keepalive=60)
    client.loop_start()
    if not subscribed.wait(30):
        print("error: could not subscribe", flush=True)
        return 1
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() == "release":
            with lock:
                released.set()
                for device_id, release_id in held:
                    status(device_id, release_id, final=True)
                held.clear()
            print("released", flush=True)
    print(json.dumps(dict(counts)), flush=True)
    client.disconnect()
    client.loop_stop()
    return 0


# -- the fleet side (this process) -----------------------------------------------------------


class FinalCounter:
    """Counts the final OTA statuses of one release published on the broker: the pace of the
    rollout, read without adding to the store's load."""

    def __init__(self, port: int) -> None:
        self.finals: dict[str, set[str]] = {}
        self.last_at: dict[str, float] = {}  # when the release's last final status came
        self._lock = threading.Lock()
        ready = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-op-counter",
                                  clean_session=True)

        def on_message(c: mqtt.Client, userdata: Any, message: Any) -> None:
            with contextlib.suppress(ValueError):
                data = json.loads(message.payload)
                if data.get("final"):
                    with self._lock:
                        release = str(data.get("release_id"))
                        self.finals.setdefault(release, set()).add(str(data.get("device_id")))
                        self.last_at[release] = time.time()

        self.client.on_connect = lambda c, *a: c.subscribe(
            topics.fleet_subscription(topics.OTA_STATUS), qos=0)
        self.client.on_subscribe = lambda *a: ready.set()
        self.client.on_message = on_message
        self.client.connect("127.0.0.1", port, keepalive=60)
        self.client.loop_start()
        if not ready.wait(30):
            raise SystemExit("the status counter could not subscribe")

    def count(self, release_id: str) -> int:
        with self._lock:
            return len(self.finals.get(release_id, ()))

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@dataclass
class Timed:
    """One operator request: its latency to the SDK's answer and to the deciding step."""

    action: str
    seconds: float
    to_step: float
    applied: bool
    state: str
    answered_at: float = 0.0


@dataclass
class Phase:
    """One phase's requests and what the controller decided meanwhile."""

    name: str
    requests: list[Timed] = field(default_factory=list)
    device_decisions: int = 0
    decisions: int = 0
    window_s: float = 0.0
    peak_per_s: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    final_state: str = ""
    answers_until: float = 0.0  # the last device's answer came then (the held ones aside)

    @property
    def per_second(self) -> float:
        return self.device_decisions / self.window_s if self.window_s > 0 else 0.0


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) by the nearest rank: the value at or above which 1-q lie."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(1, -(-len(ordered) * q // 1))
    return ordered[min(len(ordered), int(rank)) - 1]


def seed(store: Store, devices: int) -> None:
    """``devices`` registered, online devices, each running ``intent`` v1 with one profile of
    it (the gates' baseline)."""
    rng = random.Random(13)
    now = time.time()
    for start in range(0, devices, 500):
        with store.batch():
            for n in range(start, min(start + 500, devices)):
                device_id = f"sim-{n:05d}"
                state = DeviceState(device_id, device_class(device_id), MODEL, 1)
                store.upsert_status(online_status(state, now), received_at=now)
                store.upsert_birth(birth(state, now, {"site": f"s{n % 20}"}), received_at=now)
                store.add_profile(profile(state, now, latency_ms(device_id), rng),
                                  device_class=state.device_class)


def add_release(store: Store, work: Path, version: int) -> str:
    path = work / "intent.tflite"
    if not path.exists():
        path.write_bytes(model_bytes(16))
    bundle = build_release([path], name=MODEL, version=version, device_classes=list(CLASSES),
                           issued=BUILD_TIME + 86400, keys=[RELEASE_KEY])
    store.add_release(bundle.release_id, MODEL, version, bundle.envelope.to_json(),
                      dict(bundle.files), bundle.manifest.to_dict())
    return bundle.release_id


def create(store: Store, rollout_id: str, release_id: str, version: int, waves: str) -> None:
    spec = RolloutSpec(rollout_id=rollout_id, release_id=release_id, model=MODEL,
                       version=version, previous_version=1, selector=Selector(CLASSES),
                       waves=parse_waves(waves), success_threshold=0.5, failure_threshold=0.5,
                       wave_timeout_s=3600, chunk_size=4096)
    store.create_rollout(rollout_id, release_id, spec.to_dict())


def state_of(store: Store, rollout_id: str) -> RolloutState:
    record = store.get_rollout(rollout_id)
    return RolloutState.from_stored(record.state) if record else RolloutState()


def wait_for(predicate: Any, timeout: float, what: str, step: float = 0.25,
             why: Optional[Any] = None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout:g} s waiting for {what}"
                             + (f": {why()}" if why else ""))
        time.sleep(step)


def timed_request(fleet: Fleet, rollout_id: str, action: str, note: str) -> Timed:
    started, t0 = time.time(), time.perf_counter()
    result = fleet.request(rollout_id, action, note=note, wait=REQUEST_WAIT_S)
    seconds = time.perf_counter() - t0
    decision = result.decision
    applied = decision is not None and decision.kind == action
    return Timed(action, seconds, (decision.ts - started) if decision else float("nan"),
                 applied, result.rollout.state, time.time())


def sequence(requests: int) -> list[str]:
    """``pause``/``resume`` pairs, the last pair ``pause``/``abort``: ``requests`` in all."""
    pairs = max(1, requests // 2)
    return ["pause", "resume"] * (pairs - 1) + ["pause", "abort"]


def decision_figures(store: Store, rollout_id: str, phase: Phase,
                     until: Optional[float] = None) -> None:
    """The phase's decisions: about devices, up to ``until`` (the abort's answer)."""
    rows = [r for r in store.decisions(rollout_id) if until is None or r.ts <= until]
    phase.decisions = len(rows)
    stamps = [r.ts for r in rows if r.device_id]
    phase.device_decisions = len(stamps)
    if stamps:
        phase.window_s = max(stamps) - min(stamps)
        phase.peak_per_s = max(Counter(int(t) for t in stamps).values())
    state = state_of(store, rollout_id)
    phase.outcomes = dict(Counter(d.status for d in state.devices.values()))
    phase.final_state = state.state


def run_idle(store: Store, fleet: Fleet, release_id: str, requests: int) -> Phase:
    """The baseline: the rollout's first wave sent to devices that never answer."""
    create(store, IDLE_ID, release_id, 3, "1%,10%,100%")
    wait_for(lambda: any(d.status == "sent" for d in state_of(store, IDLE_ID).devices.values()),
             120, "the idle rollout's first wave")
    phase = Phase("idle")
    for n, action in enumerate(sequence(requests)):
        time.sleep(0.2)
        phase.requests.append(timed_request(fleet, IDLE_ID, action, f"idle {n}"))
    decision_figures(store, IDLE_ID, phase)
    return phase


def settle_idle(store: Store, port: int, release_id: str) -> None:
    """Answer the idle rollout's sent installs (failed), so that the controller settles it and
    no longer reads it while the loaded rollout runs."""
    sent = [d.device_id for d in state_of(store, IDLE_ID).devices.values()
            if d.status == "sent"]
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-idle-settle",
                         clean_session=True)
    client.connect("127.0.0.1", port, keepalive=60)
    client.loop_start()
    infos = [client.publish(topics.device_topic(device_id, topics.OTA_STATUS), OtaStatus(
        device_id=device_id, ts=time.time(), release_id=release_id, model=MODEL, version=3,
        phase="done", final=True, outcome="failed", reason="bench_idle").to_json(), qos=1)
        for device_id in sent]
    for info in infos:
        info.wait_for_publish(30)
    client.disconnect()
    client.loop_stop()
    wait_for(lambda: not any(d.status == "sent"
                             for d in state_of(store, IDLE_ID).devices.values()),
             300, "the idle rollout to settle")


def run_load(store: Store, fleet: Fleet, release_id: str, requests: int, devices: int,
             waves: str, counter: FinalCounter, responder: subprocess.Popen[str],
             timeout: float) -> Phase:
    """The loaded phase: requests spread over the rollout's progress."""
    hold = max(1, devices // 100)
    answering = devices - hold
    todo = sequence(requests)
    pairs = len(todo) // 2
    t_create = time.time()
    create(store, LOAD_ID, release_id, 2, waves)
    phase = Phase("load")
    for i in range(pairs):
        target = answering * 0.95 * (i + 1) / (pairs + 1)
        wait_for(lambda t=target: counter.count(release_id) >= t, timeout,
                 f"{target:.0f} answers", step=0.02,
                 why=lambda: f"rollout {state_of(store, LOAD_ID).state} "
                 f"({state_of(store, LOAD_ID).reason}), {counter.count(release_id)} answers")
        for action in todo[2 * i:2 * i + 2]:
            phase.requests.append(timed_request(fleet, LOAD_ID, action, f"load {i}"))
    phase.answers_until = counter.last_at.get(release_id, 0.0)
    # the abort is applied: the held devices answer, and every install has its outcome
    assert responder.stdin is not None
    responder.stdin.write("release\n")
    responder.stdin.flush()
    wait_for(lambda: not any(d.status == "sent"
                             for d in state_of(store, LOAD_ID).devices.values()),
             timeout, "the held devices' outcomes", step=0.5)
    decision_figures(store, LOAD_ID, phase, until=phase.requests[-1].answered_at)
    phase.window_s = phase.window_s or (time.time() - t_create)
    return phase


def read_line(proc: subprocess.Popen[str], timeout: float, what: str) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline() if ready else ""
    if not line:
        raise SystemExit(f"the {what} did not answer within {timeout:g} s")
    return line.strip()


@contextlib.contextmanager
def child(args: Sequence[str], log: Path, *,
          stdin: bool = False) -> Iterator[subprocess.Popen[str]]:
    with log.open("w") as err:
        proc = subprocess.Popen(list(args), stdin=subprocess.PIPE if stdin else None,
                                stdout=subprocess.PIPE if stdin else err, stderr=err, text=True,
                                env=dict(os.environ, FLEETLITE_LOG_LEVEL="WARNING"))
        try:
            yield proc
        finally:
            if proc.stdin is not None:
                with contextlib.suppress(OSError):
                    proc.stdin.close()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(10)
            stop_child(proc, 30)
            if proc.stdout is not None:
                proc.stdout.close()


@contextlib.contextmanager
def fresh_store(backend: str, work: Path) -> Iterator[tuple[Store, str]]:
    """An empty store and its URL (with its password: the controller and the SDK connect with
    it): a SQLite file in ``work``, or a new database on the PostgreSQL server of
    FLEETLITE_TEST_PG_URL, dropped afterwards."""
    if backend == "sqlite":
        url = f"sqlite:///{work / 'fleet.db'}"
        with open_store(url) as store:
            yield store, url
        return
    import psycopg

    admin_url = os.environ["FLEETLITE_TEST_PG_URL"]
    name = f"fleetlite_bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = urllib.parse.urlunsplit(urllib.parse.urlsplit(admin_url)._replace(path=f"/{name}"))
    try:
        with open_store(url) as store:
            yield store, url
    finally:
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def run_store(backend: str, args: argparse.Namespace) -> dict[str, Any]:
    """Both phases on one store; returns the figures."""
    with tempfile.TemporaryDirectory(prefix="bench-operator-") as tmp:
        work = Path(tmp)
        broker = Broker(work, max_queued=1_000_000)
        try:
            with fresh_store(backend, work) as (store, url):
                return _run(backend, args, work, broker, store, url)
        finally:
            broker.stop()


def _run(backend: str, args: argparse.Namespace, work: Path, broker: Broker,
         store: Store, url: str) -> dict[str, Any]:
    store.migrate()
    t0 = time.perf_counter()
    seed(store, args.devices)
    seeded = time.perf_counter() - t0
    load_release = add_release(store, work, 2)
    idle_release = add_release(store, work, 3)
    print(f"# {backend}: {args.devices} devices seeded in {seeded:.1f} s; load "
          f"{os.getloadavg()[0]:.2f}", flush=True)
    controller_cmd = [sys.executable, "-m", "fleetlite.fleet.controller", "--db", url,
                      "--broker", f"127.0.0.1:{broker.port}", "--tick", "0.5",
                      "--log-level", "WARNING"]
    responder_cmd = [sys.executable, "-m", "fleetlite.tools.bench.bench_operator_requests",
                     "--respond", str(broker.port), "--devices", str(args.devices),
                     "--fail-rate", str(args.fail_rate)]
    counter = FinalCounter(broker.port)
    try:
        with child(controller_cmd, work / "controller.log") as controller, \
                Fleet(db=url) as fleet:
            idle = run_idle(store, fleet, idle_release, args.requests)
            settle_idle(store, broker.port, idle_release)
            print(f"# {backend}: baseline done ({len(idle.requests)} requests)", flush=True)
            with child(responder_cmd, work / "responder.log", stdin=True) as responder:
                read_line(responder, 60, "responder")
                load = run_load(store, fleet, load_release, args.requests, args.devices,
                                args.waves, counter, responder, args.timeout)
                assert responder.stdin is not None
                responder.stdin.close()
                line = read_line(responder, 60, "responder")
                while not line.startswith("{"):
                    line = read_line(responder, 60, "responder")
                summary = json.loads(line)
            if controller.poll() is not None:
                raise SystemExit(f"the controller exited with {controller.returncode}: "
                                 f"{(work / 'controller.log').read_text()[-2000:]}")
    finally:
        counter.stop()
    counters: dict[str, Any] = {}
    for line in (work / "controller.log").read_text(errors="replace").splitlines():
        if line.startswith("{"):  # what the controller prints when it stops
            with contextlib.suppress(ValueError):
                counters = json.loads(line).get("counters", {})
    return {"store": backend, "devices": args.devices, "seeded_s": round(seeded, 1),
            "responder": summary, "controller": counters, "idle": phase_dict(idle),
            "load": phase_dict(load)}


def phase_dict(phase: Phase) -> dict[str, Any]:
    data = asdict(phase)
    data["per_second"] = round(phase.per_second, 1)
    data["all_applied"] = all(r.applied and r.state == EXPECTED_STATE[r.action]
                              for r in phase.requests)
    return data


def summary_row(label: str, values: Sequence[float]) -> str:
    return (f"{label} | {len(values)} | {percentile(values, 0.5) * 1000:.0f} | "
            f"{percentile(values, 0.95) * 1000:.0f} | {percentile(values, 0.99) * 1000:.0f} | "
            f"{max(values) * 1000:.0f}")


def print_figures(result: dict[str, Any]) -> None:
    idle, load = result["idle"], result["load"]
    print(f"\n## {result['store']}: operator requests, {result['devices']} devices\n")
    print("| phase | action | requests | p50 ms | p95 ms | p99 ms | max ms |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for phase in (idle, load):
        for action in ("pause", "resume", "abort", "all"):
            values = [r["seconds"] for r in phase["requests"]
                      if action in ("all", r["action"])]
            if values:
                print(f"| {phase['name']} | {summary_row(action, values)} |")
    until = load["answers_until"]
    for label, chosen in (("load, answers arriving", True), ("load, answers done", False)):
        values = [r["seconds"] for r in load["requests"]
                  if (r["answered_at"] - r["seconds"] <= until) == chosen]
        if values:
            print(f"| {label} | {summary_row('all', values)} |")
    all_idle = [r["seconds"] for r in idle["requests"]]
    all_load = [r["seconds"] for r in load["requests"]]
    step_load = [r["to_step"] for r in load["requests"]]
    step_idle = [r["to_step"] for r in idle["requests"]]
    print(f"\n# load / idle: p50 {percentile(all_load, .5) / percentile(all_idle, .5):.1f}x, "
          f"p99 {percentile(all_load, .99) / percentile(all_idle, .99):.1f}x; to the deciding "
          f"tick's start: p50 {statistics.median(step_idle) * 1000:.0f} ms idle, "
          f"{statistics.median(step_load) * 1000:.0f} ms load, p99 "
          f"{percentile(step_load, .99) * 1000:.0f} ms load")
    print(f"# decisions under load: {load['device_decisions']:,} about devices "
          f"({load['decisions']:,} in all) from the first to the last before the abort's answer, "
          f"{load['window_s']:.1f} s = "
          f"{load['per_second']:,.0f}/s, busiest second {load['peak_per_s']:,}; outcomes "
          f"{load['outcomes']}; final state {load['final_state']}; idle phase "
          f"{idle['device_decisions']:,} device decisions")
    print(f"# every request applied and the state as asked: idle {idle['all_applied']}, "
          f"load {load['all_applied']}; responder {result['responder']}; controller "
          f"{result['controller']}", flush=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--store", choices=("sqlite", "postgresql", "both"), default="both")
    parser.add_argument("--requests", type=int, default=50,
                        help="requests per phase (pause/resume pairs, the last pause/abort)")
    parser.add_argument("--waves", default="1%,10%,100%")
    parser.add_argument("--fail-rate", type=float, default=0.02)
    parser.add_argument("--timeout", type=float, default=900.0,
                        help="seconds to wait for the rollout's progress at each step")
    parser.add_argument("--json", action="store_true", help="also print one JSON line a store")
    parser.add_argument("--respond", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.respond:
        return respond(args.respond, args.devices, args.fail_rate, 2)
    backends = ["sqlite", "postgresql"] if args.store == "both" else [args.store]
    if "postgresql" in backends and not os.environ.get("FLEETLITE_TEST_PG_URL"):
        parser.error("--store postgresql needs FLEETLITE_TEST_PG_URL "
                     '(FLEETLITE_TEST_PG_URL="$(bash tools/postgres.sh)")')
    fd_limit = raise_fd_limit()
    print(f"# operator requests: {args.devices} devices, {args.requests} requests a phase, "
          f"waves {args.waves}, fail rate {args.fail_rate}, fd limit {fd_limit}, "
          f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}, "
          f"load {os.getloadavg()[0]:.2f}", flush=True)
    for backend in backends:
        result = run_store(backend, args)
        print_figures(result)
        if args.json:
            print(json.dumps(result, sort_keys=True), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
