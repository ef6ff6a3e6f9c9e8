"""The fleet side end to end: controllers, a real Mosquitto, real stores (SQLite, and PostgreSQL
when FLEETLITE_TEST_PG_URL is set) and real agent processes of several device classes.

- a release rolls out in waves to every device;
- a release that is slower on one device class trips the p95 latency gate there: that class's
  wave devices are rolled back and the class is excluded, while the other class completes;
- on PostgreSQL both scenarios run with two controllers sharing the work (MQTT shared
  subscriptions, rollout leases), and no device is sent an install twice;
- a controller process killed with SIGKILL mid-rollout is restarted and finishes the rollout
  with every device updated once and no decision lost.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from html import escape as html_escape
from pathlib import Path
from typing import Any, Callable, Optional

import pytest

from fleetlite.fleet.controller import Controller
from fleetlite.fleet.gates import GateSpec
from fleetlite.fleet.intent_model import intent_classifier
from fleetlite.fleet.release_builder import build_release
from fleetlite.fleet.rollout import RolloutSpec, RolloutState, Selector, parse_waves
from fleetlite.fleet.store import Store, open_store
from fleetlite.sdk import topics
from fleetlite.sdk.bundle import ReleaseBundle
from fleetlite.sdk.messages import CommandResponse, OtaStatus
from fleetlite.sdk.profile import ProfileRecord
from fleetlite.tools.models import heavy_mlp
from tests.agent_harness import AgentProcess, write_config
from tests.mqtt_harness import Collector, Mosquitto, Received
from tests.test_ota_install import ISSUED, RELEASE_KEY, write_root

INTENT_DEVICES = {"gw-x86-1": "industrial-x86-gateway", "gw-x86-2": "industrial-x86-gateway",
                  "gw-pi-1": "raspberry-pi-4"}
FAST, SLOW = "industrial-x86-gateway", "raspberry-pi-5"
DETECTOR_DEVICES = {"gw-x86-1": FAST, "gw-x86-2": FAST, "gw-pi5-1": SLOW, "gw-pi5-2": SLOW}
# The latency gate of the detector rollout: the new version may be 50 % slower, and never trips
# for less than 2 ms more (the 1-thread class's jitter is ~0.01 ms; the 4-thread class on this
# 2-core machine pays ~4-8 ms of scheduling per parallel operator: see test_latency_gate...).
DETECTOR_GATES = GateSpec(max_p95_regression=0.5, p95_floor_ms=2.0)
OTA_SETTINGS = {"health_inferences": 3, "health_timeout_s": 0.5, "chunk_idle_s": 1.0,
                "max_requests_without_progress": 30}


# -- fixtures and harness ----------------------------------------------------------------------


def wait_until(predicate: Callable[[], object], timeout: float, what: str) -> None:
    """Poll ``predicate`` until it is truthy; TimeoutError naming ``what`` otherwise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")


@dataclass
class Site:
    """Agents, controllers, an observing MQTT client and the test's own store handle."""

    tmp_path: Path
    broker: Mosquitto
    store: Store
    agents: dict[str, AgentProcess] = field(default_factory=dict)
    controllers: list[Controller] = field(default_factory=list)
    controller_stores: list[Store] = field(default_factory=list)
    collector: Optional[Collector] = None

    def observe(self) -> Collector:
        """Record every command, command response and OTA status that crosses the broker."""
        self.collector = Collector(
            self.broker.host, self.broker.port,
            [topics.fleet_subscription(topics.COMMAND),
             topics.fleet_subscription(topics.COMMAND_RESPONSE),
             topics.fleet_subscription(topics.OTA_STATUS),
             topics.fleet_subscription(topics.PROFILE)],
            client_id=f"observer-{uuid.uuid4().hex[:6]}").start()
        return self.collector

    def start_agents(self, devices: dict[str, str], model: str, path: Path,
                     threads: Optional[dict[str, int]] = None, socket: bool = False,
                     ota: Optional[dict[str, Any]] = None) -> None:
        root = write_root(self.tmp_path / "root.json")
        for device_id, device_class in devices.items():
            extra: dict[str, Any] = {"device_class": device_class, "trust_root": str(root),
                                     "ota": OTA_SETTINGS if ota is None else ota}
            if threads and device_class in threads:
                extra["threads"] = threads[device_class]
            config = write_config(
                self.tmp_path / device_id, port=self.broker.port, device_id=device_id,
                socket=socket, models=[{"name": model, "path": path, "version": 1}],
                profile_on_model_change=True, extra=extra)
            self.agents[device_id] = AgentProcess(config).start()

    def start_controllers(self, url: str, count: int) -> list[Controller]:
        """``count`` controllers, each with its own store connection (as separate processes
        would have); two or more share the ingest as the MQTT group ``ctl``."""
        group = "ctl" if count > 1 else None
        for n in range(count):
            store = open_store(url)
            self.controller_stores.append(store)
            self.controllers.append(Controller(
                store, self.broker.host, self.broker.port, group=group,
                controller_id=f"ctl-{'ab'[n]}", tick_s=0.2).start())
        return self.controllers

    def close(self) -> None:
        for controller in self.controllers:
            controller.stop()
        for store in self.controller_stores:
            store.close()
        for agent in self.agents.values():
            agent.stop()
        if self.collector is not None:
            self.collector.stop()
        self.store.close()

    # -- what the fleet and the devices say ----------------------------------------------

    def wait_for_fleet(self, model: str, devices: dict[str, str]) -> None:
        """Every device registered and its version-1 profile (the gates' baseline) stored."""
        wait_until(lambda: {d.device_id for d in self.store.list_devices()} == set(devices),
                   40, "every birth")
        wait_until(lambda: {p.device_id for p in self.store.profiles(model=model, version=1)}
                   == set(devices), 60, "a version-1 profile from every device")

    def add_release(self, path: Path, model: str, devices: dict[str, str]) -> ReleaseBundle:
        bundle = build_release([path], name=model, version=2,
                               device_classes=sorted(set(devices.values())), issued=ISSUED,
                               keys=[RELEASE_KEY])
        self.store.add_release(bundle.release_id, model, 2, bundle.envelope.to_json(),
                               dict(bundle.files), bundle.manifest.to_dict())
        return bundle

    def state(self, rollout_id: str) -> RolloutState:
        record = self.store.get_rollout(rollout_id)
        assert record is not None
        return RolloutState.from_stored(record.state)

    def settled(self, rollout_id: str) -> bool:
        """Finished, and no install or rollback it sent is still unanswered."""
        state = self.state(rollout_id)
        return state.finished and not any(d.status in ("sent", "rollback_sent")
                                          for d in state.devices.values())

    def model_versions(self, model: str) -> dict[str, Optional[int]]:
        """Per device, the version of ``model`` its latest birth reports."""
        return {d.device_id: next((m.version for m in d.models if m.name == model), None)
                for d in self.store.list_devices()}

    def installs_sent(self) -> Counter[str]:
        """``ota_install`` commands per device, as seen on the broker."""
        assert self.collector is not None
        found: Counter[str] = Counter()
        for message in self.collector.on_topic("/" + topics.COMMAND):
            body = json.loads(message.payload)
            if body.get("command") == "ota_install":
                found[topics.parse_device_topic(message.topic).device_id] += 1
        return found

    def final_statuses(self, release_id: str) -> dict[str, list[str]]:
        """Per device, the outcomes of its final OTA statuses of a release, as published."""
        assert self.collector is not None
        found: dict[str, list[str]] = {}
        for message in self.collector.on_topic("/" + topics.OTA_STATUS):
            status = OtaStatus.from_json(message.payload)
            if status.final and status.release_id == release_id:
                found.setdefault(status.device_id, []).append(status.outcome)
        return found

    def ask(self, device_id: str, command: str, timeout: float = 20.0) -> dict[str, Any]:
        """Send a command to an agent and return its result."""
        assert self.collector is not None
        command_id = uuid.uuid4().hex[:16]
        self.collector.publish(topics.device_topic(device_id, topics.COMMAND), json.dumps(
            {"schema": "fleetlite.command/1", "id": command_id, "command": command,
             "args": {}}).encode())
        found = self.collector.wait_for(
            "/" + topics.COMMAND_RESPONSE, timeout=timeout,
            predicate=lambda m: CommandResponse.from_json(m.payload).id == command_id)
        response = CommandResponse.from_json(found[0].payload)
        assert response.ok, response.error
        return response.result


@pytest.fixture
def site(tmp_path: Path, broker: Mosquitto, store_url: str) -> Iterator[Site]:
    s = Site(tmp_path, broker, open_store(store_url))
    s.observe()
    try:
        yield s
    finally:
        s.close()


def controllers_for(store_url: str) -> int:
    """One controller on SQLite; two sharing the work on PostgreSQL."""
    return 2 if store_url.startswith("postgresql") else 1


def check_shared_work(site: Site, rollout_id: str, devices: dict[str, str]) -> None:
    """Two controllers: both ingested device reports through the shared subscription, one
    drove the rollout, and no device was sent the install twice."""
    a, b = site.controllers
    for controller in (a, b):
        shared = controller.ingested_by_kind[topics.OTA_STATUS]
        assert shared > 0, f"{controller.id} ingested no OTA status: {controller.counters}"
    print("ingest split:", {c.id: dict(c.ingested_by_kind) for c in (a, b)})
    print("decisions applied:", {c.id: c.counters["decisions"] for c in (a, b)},
          "stale batches:", {c.id: c.counters["stale_batches"] for c in (a, b)})
    sends = Counter(d.device_id for d in site.store.decisions(rollout_id)
                    if d.kind == "send_install")
    assert all(n == 1 for n in sends.values()), sends
    assert all(n == 1 for n in site.installs_sent().values()), site.installs_sent()


def wave_spec(rollout_id: str, bundle: ReleaseBundle, model: str, waves: str,
              gates: Optional[GateSpec] = None) -> RolloutSpec:
    return RolloutSpec(rollout_id=rollout_id, release_id=bundle.release_id, model=model,
                       version=2, previous_version=1, selector=Selector(),
                       waves=parse_waves(waves), wave_timeout_s=90, gates=gates or GateSpec(),
                       chunk_size=4096)


def intent_v2(tmp_path: Path) -> Path:
    path = tmp_path / "intent_v2.tflite"
    path.write_bytes(intent_classifier(seed=11).tflite)
    return path


def slow_class_threads() -> Optional[dict[str, int]]:
    """The slow class runs its class default (4 threads) on a 2-core machine; on a bigger
    machine its agents get twice as many threads as there are cores, to oversubscribe alike."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = cores or 2
    return None if cores <= 2 else {SLOW: 2 * cores}


# -- 1. waves ----------------------------------------------------------------------------------


def test_release_rolls_out_in_waves_to_every_device(site: Site, store_url: str,
                                                     models_dir: Path) -> None:
    site.start_agents(INTENT_DEVICES, "intent", models_dir / "intent_classifier.tflite")
    controllers = site.start_controllers(store_url, controllers_for(store_url))
    site.wait_for_fleet("intent", INTENT_DEVICES)
    bundle = site.add_release(intent_v2(site.tmp_path), "intent", INTENT_DEVICES)
    spec = wave_spec("r-1", bundle, "intent", "1,100%")
    site.store.create_rollout("r-1", bundle.release_id, spec.to_dict())

    wait_until(lambda: site.settled("r-1"), 120, "the rollout to finish")
    state = site.state("r-1")
    assert state.state == "completed", state.reason
    assert {d.status for d in state.devices.values()} == {"installed"}
    assert sorted({d.wave for d in state.devices.values()}) == [1, 2]  # a canary, then the rest
    wait_until(lambda: set(site.model_versions("intent").values()) == {2}, 30,
               "births with version 2")
    decisions = site.store.decisions("r-1")
    kinds = [d.kind for d in decisions]
    assert kinds.count("send_install") == len(INTENT_DEVICES)  # no device was sent it twice
    assert "complete" in kinds
    assert all(d.reason for d in decisions)
    # every install produced a profile of the new version, per device
    assert {p.device_id for p in site.store.profiles(model="intent", version=2)} == set(
        INTENT_DEVICES)
    assert site.final_statuses(bundle.release_id) == {d: ["installed"] for d in INTENT_DEVICES}
    if len(controllers) > 1:
        check_shared_work(site, "r-1", INTENT_DEVICES)
    print(json.dumps(state.counts()))


# -- 2. a release slower on one class ----------------------------------------------------------


def test_latency_gate_rolls_back_the_slower_class_and_the_other_class_completes(
    site: Site, store_url: str
) -> None:
    """``detector`` v1 is a 2-layer MLP of 16 units, v2 of 64 units. XNNPACK runs layers this
    small on the calling thread, but splits the 64-unit layers over its thread pool. The
    industrial gateways here run inference on one thread (their site pins it: the gateways also
    run protocol converters) and v2 stays within microseconds of v1. The Raspberry Pi 5 class
    uses its default of 4 threads; on this 2-core machine the pool is oversubscribed and every
    split layer waits for a scheduler tick, so v2's p95 is tens of ms (measured with
    ``fleetlite-agent profile --threads 4``: ~24-30 ms, ~0.003-0.007 ms with 1 thread). The
    engine decides from the profiles the agents publish after each install."""
    from fleetlite.sdk.runtime.interpreter import select_backend

    if select_backend().name != "tflite-runtime":
        # measured with ai-edge-litert 2.3.0 on this machine: v2 p95 0.014 ms with 4 threads
        pytest.skip("the slow class comes from oversubscribing tflite-runtime 2.14's XNNPACK "
                    "thread pool, which does not slow ai-edge-litert; the gate decisions "
                    "themselves are covered by test_rollout_engine.py")
    v1, v2 = site.tmp_path / "detector_v1.tflite", site.tmp_path / "detector_v2.tflite"
    v1.write_bytes(heavy_mlp(16, 2).tflite)
    v2.write_bytes(heavy_mlp(64, 2).tflite)
    site.start_agents(DETECTOR_DEVICES, "detector", v1,
                      threads={FAST: 1, **(slow_class_threads() or {})})
    controllers = site.start_controllers(store_url, controllers_for(store_url))
    site.wait_for_fleet("detector", DETECTOR_DEVICES)
    bundle = site.add_release(v2, "detector", DETECTOR_DEVICES)
    spec = wave_spec("r-gate", bundle, "detector", "50%,100%", DETECTOR_GATES)
    site.store.create_rollout("r-gate", bundle.release_id, spec.to_dict())

    wait_until(lambda: site.settled("r-gate"), 150, "the rollout to finish and roll back")
    state = site.state("r-gate")
    decisions = site.store.decisions("r-gate")
    log = "\n".join(f"{d.kind:13} {d.device_id or d.device_class or '':24} {d.reason}"
                    for d in decisions)
    print(log)
    assert state.state == "completed", state.reason
    # the slow class tripped the p95 gate in wave 1 and was excluded, with the numbers
    assert set(state.paused_classes) == {SLOW}
    verdict = state.paused_classes[SLOW]
    assert (verdict.gate, verdict.wave) == ("p95_latency", 1)
    assert "p95 latency regressed on class raspberry-pi-5" in verdict.reason
    tripped = [d for d in decisions if d.kind == "gate_tripped"]
    assert [(d.device_class, d.wave) for d in tripped] == [(SLOW, 1)]
    latency = next(r for r in tripped[0].detail["results"] if r["gate"] == "p95_latency")
    assert latency["new_p95_ms"] - latency["baseline_p95_ms"] > DETECTOR_GATES.p95_floor_ms
    assert latency["new_p95_ms"] > latency["limit_p95_ms"]
    passed = [d for d in decisions if d.kind == "gate_passed"]
    assert [(d.device_class, d.wave) for d in passed] == [(FAST, 1), (FAST, 2)]
    for d in passed:
        fast = next(r for r in d.detail["results"] if r["gate"] == "p95_latency")
        assert fast["passed"]
        print(f"{FAST} wave {d.wave}: p95 {fast['new_p95_ms']:.4f} ms vs "
              f"{fast['baseline_p95_ms']:.4f} ms")
    print(f"{SLOW} wave 1: p95 {latency['new_p95_ms']:.3f} ms vs "
          f"{latency['baseline_p95_ms']:.4f} ms (limit {latency['limit_p95_ms']:.4f} ms, floor "
          f"{DETECTOR_GATES.p95_floor_ms:g} ms)")

    # the slow class's wave device was rolled back, its other device never sent the release;
    # the fast class has it everywhere
    by_status = {d.device_id: (d.device_class, d.wave, d.status) for d in state.devices.values()}
    slow_canary = next(i for i, (c, w, _) in by_status.items() if c == SLOW and w == 1)
    assert by_status[slow_canary][2] == "rolled_back"
    assert {s for c, w, s in by_status.values() if c == SLOW and w == 2} == {"excluded"}
    assert {s for c, _, s in by_status.values() if c == FAST} == {"installed"}
    assert [d.device_id for d in decisions if d.kind == "send_rollback"] == [slow_canary]
    sends = Counter(d.device_id for d in decisions if d.kind == "send_install")
    assert sends == Counter({i: 1 for i, (c, w, _) in by_status.items() if c == FAST or w == 1})
    assert "rolled back" in state.devices[slow_canary].reason

    # the devices agree: births, OTA statuses and the agents' slots
    expected = {i: (2 if c == FAST else 1) for i, c in DETECTOR_DEVICES.items()}
    wait_until(lambda: site.model_versions("detector") == expected, 30,
               f"births showing {expected}")
    finals = site.final_statuses(bundle.release_id)
    assert finals == {**{i: ["installed"] for i, c in DETECTOR_DEVICES.items() if c == FAST},
                      slow_canary: ["installed", "rolled_back"]}
    slots = site.ask(slow_canary, "ota_slots")["models"]["detector"]
    assert slots["active"] is None and slots["seed_version"] == 1  # back on the seed v1
    assert 2 in slots["rejected"]
    for device_id, device_class in DETECTOR_DEVICES.items():
        if device_class == FAST:
            slots = site.ask(device_id, "ota_slots")["models"]["detector"]
            assert slots["slots"][slots["active"]]["version"] == 2
    # the operator's report says why: the tripped gate with its numbers, per class
    from fleetlite.fleet.client import Fleet

    with Fleet(db=store_url) as fleet:
        html = fleet.report(site.tmp_path / "report.html").read_text()
    gate_reason = next(d.reason for d in decisions if d.kind == "gate_tripped")
    assert "p95" in gate_reason and SLOW in gate_reason
    assert html_escape(gate_reason) in html
    if len(controllers) > 1:
        check_shared_work(site, "r-gate", DETECTOR_DEVICES)


# -- 4. a controller killed mid-rollout --------------------------------------------------------


class ControllerProcess:
    """``python -m fleetlite.fleet.controller`` as a child process."""

    def __init__(self, directory: Path, name: str, args: list[str]) -> None:
        self.log = directory / f"{name}.log"
        self.out = directory / f"{name}.out"
        with self.log.open("ab") as err, self.out.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "fleetlite.fleet.controller", *args],
                stdout=out, stderr=err, env=dict(os.environ, PYTHONUNBUFFERED="1"))

    def wait_subscribed(self, timeout: float = 60) -> None:
        """Until the controller has logged its subscriptions acknowledged: from then on the
        broker keeps the devices' reports for it (none is sent to no one)."""
        def subscribed() -> bool:
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            return " connected to " in self.log.read_text()

        wait_until(subscribed, timeout, "the controller's subscriptions")

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self) -> dict[str, Any]:
        """SIGTERM, then the counters it prints on the way out."""
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(20) == 0, self.log.read_text()[-3000:]
        result: dict[str, Any] = json.loads(self.out.read_text().strip().splitlines()[-1])
        return result

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def test_a_controller_killed_mid_rollout_is_restarted_and_finishes_it(
    site: Site, store_url: str, models_dir: Path
) -> None:
    args = ["--db", store_url, "--broker", f"{site.broker.host}:{site.broker.port}",
            "--id", "ctl-main", "--tick", "0.2"]
    processes: list[ControllerProcess] = []
    try:
        # subscribed before the agents start: their version-1 profiles (the gates' baseline)
        # are not retained, and a controller process still starting would miss them
        processes.append(ControllerProcess(site.tmp_path, "controller-1", args))
        processes[0].wait_subscribed()
        site.start_agents(INTENT_DEVICES, "intent", models_dir / "intent_classifier.tflite")
        site.wait_for_fleet("intent", INTENT_DEVICES)
        bundle = site.add_release(intent_v2(site.tmp_path), "intent", INTENT_DEVICES)
        spec = wave_spec("r-kill", bundle, "intent", "1,100%")
        site.store.create_rollout("r-kill", bundle.release_id, spec.to_dict())

        def first_wave_sent() -> bool:
            return any(d.kind == "send_install" for d in site.store.decisions("r-kill"))

        wait_until(first_wave_sent, 30, "the first wave's install decision")
        canary = next(d.device_id for d in site.store.decisions("r-kill")
                      if d.kind == "send_install")
        assert canary is not None
        collector = site.collector
        assert collector is not None

        def canary_status(m: Received, *, final: bool = False) -> bool:
            status = OtaStatus.from_json(m.payload)
            return status.device_id == canary and (status.final or (
                not final and status.phase in ("smoke_testing", "switching", "health_check")))

        # kill it once the canary has the release's files: mid-rollout, wave 2 not started
        collector.wait_for("/" + topics.OTA_STATUS, timeout=30, predicate=canary_status)
        processes[0].kill9()
        before = [(d.id, d.kind, d.device_id) for d in site.store.decisions("r-kill")]
        assert [k for _, k, _ in before].count("start_wave") == 1
        assert site.state("r-kill").current_wave == 1
        assert site.state("r-kill").devices[canary].status == "sent"

        # with no controller running, the canary finishes: its outcome and its profile (which
        # the gates need) go to the broker, which queues them in the controller's session
        collector.wait_for("/" + topics.OTA_STATUS, timeout=30,
                           predicate=lambda m: canary_status(m, final=True))
        collector.wait_for("/" + topics.PROFILE, timeout=30, predicate=lambda m: f"/{canary}/"
                           in m.topic and ProfileRecord.from_json(m.payload).model.version == 2)

        processes.append(ControllerProcess(site.tmp_path, "controller-2", args))
        wait_until(lambda: site.settled("r-kill"), 120, "the restarted controller to finish")
        result = processes[1].terminate()
        print("restarted controller:", result)
    finally:
        for process in processes:
            process.stop()

    record = site.store.get_rollout("r-kill")
    assert record is not None
    state = RolloutState.from_dict(record.state)
    assert state.state == "completed", state.reason
    assert {d.status for d in state.devices.values()} == {"installed"}
    decisions = site.store.decisions("r-kill")
    print("\n".join(f"r{d.revision:<3} {d.kind:13} {d.device_id or '':10} {d.reason}"
                    for d in decisions))
    # nothing decided before the kill was lost or rewritten, and the log has no gaps
    assert [(d.id, d.kind, d.device_id) for d in decisions[:len(before)]] == before
    revisions = [d.revision for d in decisions]
    assert revisions == sorted(revisions)
    assert sorted(set(revisions)) == list(range(record.revision))
    # each device: one install decision, one install command on the broker, one install
    sends = Counter(d.device_id for d in decisions if d.kind == "send_install")
    assert sends == Counter({i: 1 for i in INTENT_DEVICES})
    assert site.installs_sent() == Counter({i: 1 for i in INTENT_DEVICES})
    assert site.final_statuses(bundle.release_id) == {i: ["installed"] for i in INTENT_DEVICES}
    history = {i: [s.outcome for s in site.store.ota_history(device_id=i,
                                                              release_id=bundle.release_id)
                   if s.final] for i in INTENT_DEVICES}
    assert history == {i: ["installed"] for i in INTENT_DEVICES}
    # the restarted controller took the canary's outcome and profile from its persistent
    # session: the canary was judged by the gates on its profile, and not sent anything again
    assert result["counters"]["commands_resent"] == 0
    passed = [d for d in decisions if d.kind == "gate_passed" and d.wave == 1]
    assert passed and passed[0].detail["evaluated"] == 1
    wait_until(lambda: set(site.model_versions("intent").values()) == {2}, 30,
               "births with version 2")
