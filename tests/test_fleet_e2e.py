"""The fleet side end to end: a controller, a real Mosquitto, a real store and real agent
processes of two device classes; a release rolls out in waves to all of them."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleetlite.fleet.controller import Controller
from fleetlite.fleet.rollout import RolloutSpec, RolloutState, Selector, parse_waves
from fleetlite.fleet.store import Store, open_store
from fleetlite.sdk.bundle import ReleaseBundle, build_release
from fleetlite.tools.models import intent_classifier
from tests.agent_harness import AgentProcess, write_config
from tests.mqtt_harness import Mosquitto
from tests.test_ota_install import ISSUED, RELEASE_KEY, write_root

DEVICES = {"gw-x86-1": "industrial-x86-gateway", "gw-x86-2": "industrial-x86-gateway",
           "gw-pi-1": "raspberry-pi-4"}


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = open_store(f"sqlite:///{tmp_path / 'fleet.db'}")
    yield s
    s.close()


def start_agents(tmp_path: Path, broker: Mosquitto, models_dir: Path) -> list[AgentProcess]:
    root = write_root(tmp_path / "root.json")
    agents = []
    for device_id, device_class in DEVICES.items():
        config = write_config(
            tmp_path / device_id, port=broker.port, device_id=device_id, socket=False,
            models=[{"name": "intent", "path": models_dir / "intent_classifier.tflite",
                     "version": 1}],
            profile_on_model_change=True,
            extra={"device_class": device_class, "trust_root": str(root),
                   "ota": {"health_inferences": 3, "health_timeout_s": 0.5}},
        )
        agents.append(AgentProcess(config).start())
    return agents


def release_v2(tmp_path: Path, models_dir: Path) -> ReleaseBundle:
    path = tmp_path / "intent_v2.tflite"
    path.write_bytes(intent_classifier(seed=11).tflite)
    return build_release([path], name="intent", version=2,
                         device_classes=sorted(set(DEVICES.values())), issued=ISSUED,
                         vocab=models_dir / "intent_classifier.vocab.json", keys=[RELEASE_KEY])


def wait_until(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.2)
    raise TimeoutError(f"timed out waiting for {what}")


def test_release_rolls_out_in_waves_to_every_device(
    tmp_path: Path, broker: Mosquitto, store: Store, models_dir: Path
) -> None:
    agents = start_agents(tmp_path, broker, models_dir)
    controller = Controller(store, broker.host, broker.port, tick_s=0.2).start()
    try:
        wait_until(lambda: len(store.list_devices()) == len(DEVICES), 30, "three births")
        bundle = release_v2(tmp_path, models_dir)
        store.add_release(bundle.release_id, "intent", 2, bundle.envelope.to_json(),
                          dict(bundle.files), bundle.manifest.to_dict())
        spec = RolloutSpec(rollout_id="r-1", release_id=bundle.release_id, model="intent",
                           version=2, previous_version=1, selector=Selector(),
                           waves=parse_waves("1,100%"), wave_timeout_s=60,
                           chunk_size=4096)
        store.create_rollout("r-1", bundle.release_id, spec.to_dict())

        def finished() -> bool:
            record = store.get_rollout("r-1")
            return bool(record and record.state and
                        RolloutState.from_dict(record.state).finished)

        wait_until(finished, 120, "the rollout to finish")
        record = store.get_rollout("r-1")
        assert record is not None
        state = RolloutState.from_dict(record.state)
        assert state.state == "completed", state.reason
        assert {d.status for d in state.devices.values()} == {"installed"}
        waves = sorted({d.wave for d in state.devices.values()})
        assert waves == [1, 2]  # a canary of one, then the rest
        wait_until(lambda: all(m.version == 2 for d in store.list_devices()
                               for m in d.models), 30, "births with version 2")
        kinds = [d.kind for d in store.decisions("r-1")]
        assert kinds.count("send_install") == len(DEVICES)  # no device was sent it twice
        assert "complete" in kinds
        assert all(d.reason for d in store.decisions("r-1"))
        # every install produced a profile of the new version, per device
        profiled = {p.device_id for p in store.profiles(model="intent", version=2)}
        assert profiled == set(DEVICES)
        print(json.dumps(state.counts()))
    finally:
        controller.stop()
        for agent in agents:
            agent.stop()
