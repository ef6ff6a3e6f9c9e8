"""The fleet simulator through the real parts: a real Mosquitto, a real controller on a real
SQLite store, and ``python -m fleetlite.tools.sim`` with 200 devices of two classes.

Every simulated device registers with its class and its baseline profile; a signed release
rolled out to all of them in two waves completes, and the devices the simulator was told to
fail (10 %, ``download_stalled`` half way through the download) are the rollout's failed devices,
with that reason, while every other device installed the release: verified against its root,
fetched chunk by chunk with real chunk requests and hash-checked with the ``sdk/`` code.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import pytest

from fleetlite.fleet.controller import Controller
from fleetlite.fleet.rollout import RolloutSpec, RolloutState, parse_waves
from fleetlite.fleet.store import Store, open_store
from fleetlite.sdk.bundle import build_release
from tests.mqtt_harness import Mosquitto
from tests.test_ota_install import ISSUED, RELEASE_KEY, write_root

DEVICES = 200
FAILING = 20  # --fail-rate 0.1
CLASSES = {"raspberry-pi-4": 140, "jetson-orin-nano": 60}  # --classes rpi4=0.7,jetson=0.3
REASON = "download_stalled"


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
    return RolloutState.from_dict(record.state) if record.state else RolloutState()


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
        wait_until(lambda: len(store.list_devices()) == DEVICES, 60, "every simulated birth")
        devices = store.list_devices()
        assert Counter(d.device_class for d in devices) == CLASSES
        wait_until(lambda: all(d.online for d in store.list_devices()), 30,
                   "every device online")
        wait_until(lambda: len({p.device_id for p in store.profiles(model="intent", version=1)})
                   == DEVICES, 30, "a version-1 profile from every device")

        # 2. a signed release of the real model to both classes, in two waves
        bundle = build_release([models_dir / "intent_classifier.tflite"], name="intent",
                               version=2, device_classes=sorted(CLASSES), issued=ISSUED,
                               keys=[RELEASE_KEY],
                               vocab=models_dir / "intent_classifier.vocab.json")
        store.add_release(bundle.release_id, "intent", 2, bundle.envelope.to_json(),
                          dict(bundle.files), bundle.manifest.to_dict())
        spec = RolloutSpec(rollout_id="r-sim", release_id=bundle.release_id, model="intent",
                           version=2, previous_version=1, waves=parse_waves("10%,100%"),
                           success_threshold=0.5, failure_threshold=0.5, wave_timeout_s=120,
                           chunk_size=4096)
        store.create_rollout("r-sim", bundle.release_id, spec.to_dict())
        wait_until(lambda: settled(store, "r-sim"), 90, "the rollout to finish")
    finally:
        summary = stop_sim(sim, log)

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
