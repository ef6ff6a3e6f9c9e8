"""The fleet simulator (``python -m fleetlite.tools.sim``), from its pure parts to the real ones.

- The seeded plan and the flags: exact class counts and install fates.
- The simulated install core alone (no broker): a table of releases, each with the outcome and
  reason a simulated device reports, as the ``sdk/`` checks decide them.
- 200 simulated devices of two classes against a real Mosquitto and a real controller on a real
  SQLite store: every device registers with its class and baseline profile; a signed release
  rolled out in two waves completes, the devices told to fail (10 %, ``download_stalled`` half
  way through the download) are the rollout's failed devices with that reason, and every other
  device installed it: verified against its root, fetched with real chunk requests and
  hash-checked with the ``sdk/`` code.
- Churn through a real broker: a drop fires the device's Will, and it comes back as its next
  connection.
"""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest

from fleetlite.fleet.controller import Controller
from fleetlite.fleet.release_builder import build_release
from fleetlite.fleet.rollout import RolloutSpec, RolloutState, parse_waves
from fleetlite.fleet.store import Store, open_store
from fleetlite.sdk import topics
from fleetlite.sdk.bundle import ReleaseBundle
from fleetlite.sdk.chunks import ChunkLayout, expand_ranges
from fleetlite.sdk.messages import Status
from fleetlite.sdk.ota_messages import ChunkRequest
from fleetlite.sdk.trust import Root, load_trusted_root
from fleetlite.tools.sim.config import SimConfig, SimConfigError, class_counts, parse_weights
from fleetlite.tools.sim.ota import Install, Outcome, Resubscribe
from fleetlite.tools.sim.plan import FAIL, INSTALL, REJECT, plan_fleet, slice_of
from tests.mqtt_harness import Collector, Mosquitto, Received, retained_under
from tests.test_ota_install import ISSUED, RELEASE_KEY, STRANGER, _resign, write_root

DEVICES = 200
FAILING = 20  # --fail-rate 0.1
CLASSES = {"raspberry-pi-4": 140, "jetson-orin-nano": 60}  # --classes rpi4=0.7,jetson=0.3
REASON = "download_stalled"


PI4 = "raspberry-pi-4"


# -- the plan and the flags ----------------------------------------------------------------------


def test_the_plan_gives_exact_class_counts_and_fates_whatever_the_split() -> None:
    config = SimConfig(devices=1001, classes=parse_weights("rpi4=0.7,jetson=0.2,x86=0.1",
                                                           "--classes"),
                       fail_rate=0.1, reject_rate=0.05, seed=3, processes=3)
    plans = plan_fleet(config)
    assert Counter(p.device_class for p in plans) == {
        "raspberry-pi-4": 701, "jetson-orin-nano": 200, "industrial-x86-gateway": 100}
    assert Counter(p.fate for p in plans) == {INSTALL: 851, FAIL: 100, REJECT: 50}
    assert plan_fleet(config) == plans  # seeded: the same on every run and in every process
    parts = [slice_of(plans, n, 3) for n in range(3)]
    assert sorted(p.index for part in parts for p in part) == list(range(1001))
    assert plans[0].device_id == "sim-000000"
    assert plan_fleet(SimConfig(devices=1001, seed=4, fail_rate=0.1)) != plans


@pytest.mark.parametrize(("text", "problem"), [
    ("rpi4=x", "is not NAME=NUMBER"), ("rpi4=-1", "finite number >= 0"),
    ("Bad Class=1", "not a class name"), ("rpi4=1,raspberry-pi-4=1", "named twice"),
    ("", "name at least one class")])
def test_bad_class_mixes_are_refused_with_what_to_write(text: str, problem: str) -> None:
    with pytest.raises(SimConfigError, match=problem):
        parse_weights(text, "--classes")


def test_class_counts_add_up() -> None:
    assert class_counts((("a", 1.0), ("b", 1.0), ("c", 1.0)), 10) == [("a", 4), ("b", 3),
                                                                       ("c", 3)]
    with pytest.raises(SimConfigError, match="must not exceed 1"):
        SimConfig(fail_rate=0.6, reject_rate=0.5)


# -- the install core, without a broker ---------------------------------------------------------


@pytest.fixture(scope="module")
def release(models_dir: Path) -> ReleaseBundle:
    return build_release([models_dir / "intent_classifier.tflite"], name="intent", version=2,
                         device_classes=[PI4], issued=ISSUED, keys=[RELEASE_KEY],
                         vocab=models_dir / "intent_classifier.vocab.json")


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Root:
    return load_trusted_root(write_root(tmp_path_factory.mktemp("root") / "root.json")
                             .read_bytes())


def deliver(install: Install, bundle: ReleaseBundle, envelope: bytes, tamper: bool = False,
            broker_holds: bool = True) -> Delivery:
    """Serve ``install`` as a broker holding the release would: the manifest, then every
    retained chunk but every fifth (lost, as from a full client queue); once the install re-
    subscribes to chunks after its idle time, their retained copies (``broker_holds``) or
    nothing (a broker that lost them: the install asks the fleet after another idle time);
    the frames of every chunk it requests (``tamper``: one byte of the model flipped), until
    it ends or is done."""
    contents = [bytearray(bundle.files[f.name]) for f in bundle.manifest.files]
    if tamper:
        contents[0][100] ^= 0xFF
    layout = ChunkLayout(tuple(len(c) for c in contents), install.chunk_size)

    def frame(file_index: int, index: int) -> bytes:
        return layout.frame(file_index, index, bytes(contents[file_index]))

    sent: list[ChunkRequest] = []
    rounds: list[Resubscribe] = []
    queue: list[ChunkRequest | Resubscribe] = list(install.on_manifest(envelope, 0.0))
    assert queue == []  # the retained chunks come on subscription: nothing to ask yet
    now = 0.5
    if install.manifest is not None:
        for file_index, count in enumerate(layout.counts):
            for index in range(count):
                if index % 5 != 4:
                    queue += install.on_chunk(frame(file_index, index), now)
        assert all(isinstance(r, ChunkRequest) and r.done for r in queue)  # nothing to ask
        now += install.idle_s
        queue += install.poll(now)
    while queue and install.ended is None:
        ask = queue.pop(0)
        now += 0.1
        if isinstance(ask, Resubscribe):
            rounds.append(ask)
            if broker_holds:
                for file_index, index in ask.chunks:
                    queue += install.on_chunk(frame(file_index, index), now)
            else:
                now += install.idle_s  # the round brought nothing
            queue += install.poll(now)
            continue
        request = ChunkRequest.from_json(ask.to_json())  # what goes on the wire
        sent.append(request)
        for file_index, index in expand_ranges(request.missing):
            queue += install.on_chunk(frame(file_index, index), now)
    phases = install.remaining_phases()
    return Delivery(install.finish(), sent, rounds, phases)


@dataclass
class Delivery:
    """What ``deliver`` saw: the outcome, the requests (on the wire), the re-subscription
    rounds and the phases reported after the download."""

    outcome: Outcome
    requests: list[ChunkRequest]
    rounds: list[Resubscribe]
    phases: list[str]


def held_back(bundle: ReleaseBundle) -> int:
    """How many chunks ``deliver`` holds back from the retained delivery (every fifth)."""
    return sum(count // 5 for count in ChunkLayout.from_manifest(bundle.manifest, 1024).counts)


def _install(root: Root | None, release_id: str, **kwargs: Any) -> Install:
    settings: dict[str, Any] = {"device_class": PI4, "installed_version": 1}
    settings.update(kwargs)
    return Install(device_id="sim-000001", release_id=release_id, chunk_size=1024, root=root,
                   model="intent", **settings)


CASES: list[tuple[str, str, str, dict[str, Any]]] = [
    ("installs", "installed", "", {}),
    ("planned download failure", "failed", "download_stalled",
     {"planned": "failed", "planned_reason": "download_stalled"}),
    ("planned smoke rejection", "rejected", "smoke_output_mismatch",
     {"planned": "rejected", "planned_reason": "smoke_output_mismatch"}),
    ("signed by a stranger", "rejected", "untrusted_signer", {"envelope": "stranger"}),
    ("another release's manifest", "rejected", "release_id_mismatch", {"release_id": "0" * 64}),
    ("same version", "no_change", "same_version", {"installed_version": 2}),
    ("rolled back before", "rejected", "previously_rejected", {"rejected_versions": {2}}),
    ("another class", "rejected", "wrong_device_class", {"device_class": "jetson-orin-nano"}),
    ("tampered model file", "failed", "hash_mismatch", {"tamper": True}),
    ("no root provisioned", "rejected", "no_trusted_root", {"root": None}),
]


@pytest.mark.parametrize(("case", "outcome", "reason", "options"), CASES,
                         ids=[c[0] for c in CASES])
def test_simulated_install_checks_what_a_device_checks(
        release: ReleaseBundle, root: Root, case: str, outcome: str, reason: str,
        options: dict[str, Any]) -> None:
    options = dict(options)
    envelope = release.envelope.to_json()
    if options.pop("envelope", None) == "stranger":
        envelope = _resign(release, release.envelope.payload, STRANGER)
    tamper = options.pop("tamper", False)
    install = _install(options.pop("root", root), options.pop("release_id", release.release_id),
                       **options)
    delivery = deliver(install, release, envelope, tamper=tamper)
    ended, requests, phases = delivery.outcome, delivery.requests, delivery.phases
    assert (ended.outcome, ended.reason) == (outcome, reason), ended.message
    final = install.final()
    assert (final.final, final.phase, final.outcome, final.reason) == (True, "done", outcome,
                                                                       reason)
    if outcome == "installed":
        # the lost chunks came from the broker's retained copies: the fleet heard only "done"
        assert [(r.done, r.missing) for r in requests] == [(True, ())]
        assert sum(len(r.chunks) for r in delivery.rounds) == held_back(release)
        assert all(len(r.chunks) <= 64 for r in delivery.rounds)
        assert (final.model, final.version) == ("intent", 2)
        assert phases == ["verifying", "smoke_testing", "switching", "health_check"]
    if reason == "smoke_output_mismatch":  # it ends in the smoke test
        assert phases == ["verifying", "smoke_testing"]
    if reason == "download_stalled":  # it gave up half way, as planned
        assert install.bitmap is not None and 0 < install.bitmap.received < install.bitmap.total


def test_a_simulated_device_asks_the_fleet_when_the_broker_does_not_hold_the_chunks(
        release: ReleaseBundle, root: Root) -> None:
    install = _install(root, release.release_id)
    delivery = deliver(install, release, release.envelope.to_json(), broker_holds=False)
    assert delivery.outcome.outcome == "installed", delivery.outcome.message
    assert len(delivery.rounds) == 1  # one round, which brought nothing, then the fleet
    assert delivery.requests[-1].done and not delivery.requests[-1].missing
    assert [r.chunk_total for r in delivery.requests[:-1]] == [held_back(release)]  # once


# -- the simulator against a real broker and controller ------------------------------------------


def wait_until(predicate: Callable[[], Any], timeout: float, what: str) -> None:
    """Poll the store until ``predicate`` holds; TimeoutError naming ``what`` otherwise."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.1)


@pytest.fixture
def store(tmp_path: Path, broker: Mosquitto) -> Iterator[Store]:
    """The test's store handle, and a controller (on its own handle) on the same file."""
    url = f"sqlite:///{tmp_path / 'fleet.db'}"
    mine, theirs = open_store(url), open_store(url)
    controller = Controller(theirs, broker.host, broker.port, tick_s=0.2).start()
    try:
        yield mine
    finally:
        controller.stop()
        theirs.close()
        mine.close()


def store_intent_v2(store: Store, models_dir: Path, classes: list[str]) -> ReleaseBundle:
    """The real intent model as release v2 for ``classes``, signed with the key the simulated
    devices' root trusts, stored for a rollout."""
    bundle = build_release([models_dir / "intent_classifier.tflite"], name="intent", version=2,
                           device_classes=classes, issued=ISSUED, keys=[RELEASE_KEY],
                           vocab=models_dir / "intent_classifier.vocab.json")
    store.add_release(bundle.release_id, "intent", 2, bundle.envelope.to_json(),
                      dict(bundle.files), bundle.manifest.to_dict())
    return bundle


def start_sim(broker: Mosquitto, root: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "fleetlite.tools.sim", "--broker",
             f"{broker.host}:{broker.port}", "--devices", str(DEVICES),
             "--classes", "rpi4=0.7,jetson=0.3", "--root", str(root), "--fail-rate", "0.1",
             "--fail-reason", REASON, "--report-s", "5", "--step-s", "0.05", "--seed", "13",
             "--stats-s", "2", "--connect-rate", "200"],
            stdout=out, stderr=subprocess.STDOUT)


def stop_sim(sim: subprocess.Popen[bytes], log: Path) -> dict[str, Any]:
    """SIGTERM, then the simulator's summary line."""
    if sim.poll() is None:
        sim.send_signal(signal.SIGTERM)
        sim.wait(60)
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    summaries = [line for line in lines if line.get("event") == "summary"]
    assert summaries, log.read_text()[-3000:]
    summary: dict[str, Any] = summaries[-1]
    return summary


def rollout_state(store: Store, rollout_id: str) -> RolloutState:
    record = store.get_rollout(rollout_id)
    assert record is not None
    return RolloutState.from_stored(record.state)


def settled(store: Store, rollout_id: str) -> bool:
    state = rollout_state(store, rollout_id)
    return state.finished and not any(d.status in ("sent", "rollback_sent")
                                      for d in state.devices.values())


def test_simulated_fleet_registers_and_takes_a_rollout_with_its_failure_rate(
        tmp_path: Path, broker: Mosquitto, store: Store, models_dir: Path) -> None:
    root = write_root(tmp_path / "root.json")
    log = tmp_path / "sim.log"
    sim = start_sim(broker, root, log)
    try:
        # 1. every device registered, with its class, online, with a baseline profile
        # a status or telemetry report may be stored before the device's birth (another topic):
        # a device's class comes with its birth
        wait_until(lambda: sum(1 for d in store.list_devices() if d.device_class) == DEVICES, 60,
                   "every simulated birth")
        devices = store.list_devices()
        assert Counter(d.device_class for d in devices) == CLASSES
        wait_until(lambda: all(d.online for d in store.list_devices()), 30,
                   "every device online")
        wait_until(lambda: len({p.device_id for p in store.profiles(model="intent", version=1)})
                   == DEVICES, 30, "a version-1 profile from every device")

        # 2. a signed release of the real model to both classes, in two waves
        bundle = store_intent_v2(store, models_dir, sorted(CLASSES))
        spec = RolloutSpec(rollout_id="r-sim", release_id=bundle.release_id, model="intent",
                           version=2, previous_version=1, waves=parse_waves("10%,100%"),
                           success_threshold=0.5, failure_threshold=0.5, wave_timeout_s=120,
                           chunk_size=4096)
        counter = Collector(broker.host, broker.port,
                            [topics.chunks_filter(bundle.release_id, 4096)],
                            client_id="chunk-counter").start()
        try:
            store.create_rollout("r-sim", bundle.release_id, spec.to_dict())
            wait_until(lambda: settled(store, "r-sim"), 90, "the rollout to finish")
        finally:
            counter.stop()
    finally:
        summary = stop_sim(sim, log)

    # the broker held the release: the fleet published each chunk about once for both waves
    # (a device that asks, on a loaded machine, may cost a few more), not once per wave
    chunks = ChunkLayout.from_manifest(bundle.manifest, 4096).total_chunks
    published = len(counter.messages)
    assert chunks <= published <= chunks * 3 // 2, (published, chunks)
    # and once the rollout settled, the controller cleared it from the broker
    release_topics = f"{topics.RELEASE_PREFIX}/{bundle.release_id}/#"
    wait_until(lambda: not retained_under(broker.host, broker.port, release_topics,
                                          topics.chunk_topic(bundle.release_id, 4096, 9, 9)),
               30, "the release cleared from the broker")

    state = rollout_state(store, "r-sim")
    assert state.state == "completed", state.reason
    statuses = Counter(d.status for d in state.devices.values())
    assert statuses == {"installed": DEVICES - FAILING, "failed": FAILING}, statuses
    assert {d.code for d in state.devices.values() if d.status == "failed"} == {REASON}
    # the simulator says the same, and its devices registered the new version
    assert summary["outcomes"] == {"installed": DEVICES - FAILING,
                                   f"failed:{REASON}": FAILING}, summary
    versions = Counter(next(m.version for m in d.models if m.name == "intent")
                       for d in store.list_devices())
    assert versions == {2: DEVICES - FAILING, 1: FAILING}
    # a clean stop: every device said "shutdown" itself, so the fleet sees it offline
    wait_until(lambda: not any(d.online for d in store.list_devices()), 30,
               "every device offline after the simulator stopped")


def test_max_in_flight_keeps_that_many_devices_installing_at_once(
        tmp_path: Path, broker: Mosquitto, store: Store, models_dir: Path) -> None:
    """A rollout with ``max_in_flight`` through the real controller and simulated devices:
    each device's install runs, by its own statuses, from its ``accepted`` to its final
    status, and no more of those overlap than the cap; the rollout completes. (The device's
    times, not the controller's: a step decides at the time it started, so a send can be
    stamped before the receipt of the final status that freed its slot.)"""
    cap = 8
    root = write_root(tmp_path / "root.json")
    log = tmp_path / "sim.log"
    sim = start_sim(broker, root, log)
    try:
        wait_until(lambda: sum(1 for d in store.list_devices() if d.device_class and d.online)
                   == DEVICES, 60, "every simulated device registered and online")
        bundle = store_intent_v2(store, models_dir, sorted(CLASSES))
        spec = RolloutSpec(rollout_id="r-cap", release_id=bundle.release_id, model="intent",
                           version=2, previous_version=1, waves=parse_waves("100%"),
                           success_threshold=0.5, failure_threshold=0.5, wave_timeout_s=120,
                           chunk_size=4096, max_in_flight=cap)
        store.create_rollout("r-cap", bundle.release_id, spec.to_dict())
        wait_until(lambda: settled(store, "r-cap"), 180, "the rollout to finish")
    finally:
        stop_sim(sim, log)
    state = rollout_state(store, "r-cap")
    assert state.state == "completed", state.reason
    assert Counter(d.status for d in state.devices.values()) == {
        "installed": DEVICES - FAILING, "failed": FAILING}
    spans: dict[str, list[float]] = {}
    for record in store.ota_records(release_id=bundle.release_id):
        status = record.status
        span = spans.setdefault(status.device_id, [math.inf, -math.inf])
        if status.phase == "accepted":
            span[0] = min(span[0], status.ts)
        if status.final:
            span[1] = max(span[1], status.ts)
    assert len(spans) == DEVICES and all(math.isfinite(a) and math.isfinite(b)
                                         for a, b in spans.values()), spans
    events = [(at, change) for start, end in spans.values()
              for at, change in ((start, 1), (end, -1))]
    running = peak = 0
    for _, change in sorted(events):  # a receipt at the send's instant frees the slot first
        running += change
        peak = max(peak, running)
    # never more than the cap; and the cap was used (under load, one of the first turn may
    # finish before the last of it has said "accepted")
    assert cap // 2 <= peak <= cap, f"{peak} devices installing at once with max_in_flight {cap}"


def test_churn_fires_the_will_and_the_device_comes_back_as_its_next_connection(
        tmp_path: Path, broker: Mosquitto) -> None:
    """A churn drop is a TCP close without DISCONNECT: the broker publishes the device's Will
    (offline, ``lost``, that connection's number), and the device reconnects as ``conn`` + 1."""
    collector = Collector(broker.host, broker.port, [topics.fleet_subscription(topics.STATUS)],
                          client_id="churn-observer").start()
    log = tmp_path / "sim.log"
    with log.open("wb") as out:
        sim = subprocess.Popen(
            [sys.executable, "-m", "fleetlite.tools.sim", "--broker",
             f"{broker.host}:{broker.port}", "--devices", "5", "--churn-per-hour", "3600",
             "--offline-s", "0.3", "--report-s", "1", "--stats-s", "1"],
            stdout=out, stderr=subprocess.STDOUT)
    try:
        def status(message: Received) -> Status:
            return Status.from_json(message.payload)

        will = status(collector.wait_for(
            "/status", timeout=30, predicate=lambda m: status(m).reason == "lost")[0])
        assert not will.online
        back = status(collector.wait_for("/status", timeout=30, predicate=lambda m: (
            status(m).device_id == will.device_id and status(m).online
            and status(m).conn == will.conn + 1))[0])
        assert back.session == will.session
    finally:
        summary = stop_sim(sim, log)
        collector.stop()
    assert summary["counts"]["churn_drops"] >= 1


def test_two_processes_share_the_fleet_and_devices_answer_commands(
        tmp_path: Path, broker: Mosquitto) -> None:
    """``--processes 2``: every device is run once, by one of the two processes, and answers a
    command (after ``--reply-s``); the parent's summary adds the two up."""
    collector = Collector(broker.host, broker.port,
                          [topics.fleet_subscription(topics.BIRTH),
                           topics.fleet_subscription(topics.COMMAND_RESPONSE)],
                          client_id="processes-observer").start()
    log = tmp_path / "sim.log"
    with log.open("wb") as out:
        sim = subprocess.Popen(
            [sys.executable, "-m", "fleetlite.tools.sim", "--broker",
             f"{broker.host}:{broker.port}", "--devices", "10", "--processes", "2",
             "--reply-s", "0.2", "--report-s", "1", "--stats-s", "1", "--prefix", "two"],
            stdout=out, stderr=subprocess.STDOUT)
    try:
        births = collector.wait_for("/birth", count=10, timeout=60)
        assert {topics.parse_device_topic(m.topic).device_id for m in births} == {
            f"two-{n:06d}" for n in range(10)}
        collector.publish(topics.device_topic("two-000003", topics.COMMAND), json.dumps(
            {"schema": "fleetlite.command/1", "id": "c-1", "command": "ping"}).encode())
        answer = collector.wait_for("/cmd/resp", timeout=30)[0]
        assert json.loads(answer.payload)["ok"] is True
    finally:
        summary = stop_sim(sim, log)
        collector.stop()
    assert (summary["devices"], summary["peak_online"], summary["counts"]["births"]) == (
        10, 10, 10), summary
