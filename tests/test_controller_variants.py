"""Variants per device class through the controller, a real Mosquitto and a real store
(issue 14, deliverable 1, fleet side): fake devices answer the probe installs with ``probed``
finals of given figures over MQTT, and the rollout ends with each class on the variant its
budgets call for and a pinned class on its pin, as ``fleetlite rollout status -o json`` shows.
Also: the rollout state with probes and choices round-trips through the store on SQLite and
PostgreSQL. (The end-to-end test with real agents comes with the device side.)"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from fleetlite.fleet.client import Fleet
from fleetlite.fleet.controller import Controller
from fleetlite.fleet.gates import GateSpec
from fleetlite.fleet.release_builder import build_release
from fleetlite.fleet.rollout import RolloutSpec, RolloutState, VariantBudget
from fleetlite.fleet.store import open_store
from fleetlite.sdk import topics
from fleetlite.sdk.messages import OtaStatus, Status
from tests.mqtt_harness import Collector, Mosquitto, Received
from tests.test_ota_install import ISSUED, RELEASE_KEY
from tests.test_rollout_variants import VariantSim, devs, vspec
from tests.test_store import birth

RPI, JETSON, X86 = "raspberry-pi-4", "jetson-orin-nano", "industrial-x86-gateway"
DEVICES = {f"pi-{i}": RPI for i in range(3)} | {f"jn-{i}": JETSON for i in range(3)} | {
    f"x86-{i}": X86 for i in range(2)}


def figures(device_class: str, variants: tuple[str, str]) -> dict[str, Any]:
    """What a device of the class measures: the float model is too slow for a Pi 4's budget
    (150 ms); on a Jetson both fit and the float model agrees better."""
    fp32, int8 = variants
    p95 = {RPI: (210.0, 60.0), JETSON: (30.0, 12.0), X86: (20.0, 9.0)}[device_class]
    return {fp32: {"passed": True, "reason": "", "p95_ms": p95[0], "peak_rss_mb": 120.0,
                   "load_ms": 30.0, "fidelity": 1.0},
            int8: {"passed": True, "reason": "", "p95_ms": p95[1], "peak_rss_mb": 70.0,
                   "load_ms": 20.0, "fidelity": 0.96}}


@pytest.fixture
def site(models_dir: Path, broker: Mosquitto,
         store_url: str) -> Iterator[tuple[Fleet, Controller, Collector, str, tuple[str, str]]]:
    store = open_store(store_url)
    controller_store = open_store(store_url)
    devices = Collector(broker.host, broker.port,
                        [topics.device_topic(d, topics.COMMAND) for d in DEVICES],
                        client_id="fake-devices").start()
    controller = Controller(controller_store, broker.host, broker.port, tick_s=3600,
                            wake_s=0).start()
    fleet = Fleet(db=store_url)
    try:
        assert controller.connected.wait(20)
        now = time.time()
        for device_id, cls in DEVICES.items():
            store.upsert_birth(birth(device_id, 1, now, device_class=cls, models=[]))
            store.upsert_status(Status(device_id=device_id, online=True, session=1, ts=now,
                                       reason="connected"))
        bundle = build_release([models_dir / "sensor_autoencoder.tflite",
                                models_dir / "sensor_autoencoder_int8.tflite"],
                               name="anomaly", version=2, device_classes=[RPI, JETSON, X86],
                               issued=ISSUED, keys=[RELEASE_KEY])
        names = tuple(v.name for v in bundle.manifest.all_variants())
        assert len(names) == 2
        store.add_release(bundle.release_id, "anomaly", 2, bundle.envelope.to_json(),
                          dict(bundle.files), bundle.manifest.to_dict())
        yield fleet, controller, devices, bundle.release_id, (names[0], names[1])
    finally:
        fleet.close()
        controller.stop()
        devices.stop()
        controller_store.close()
        store.close()


def answer(devices: Collector, command: Received, release_id: str,
           variants: tuple[str, str]) -> dict[str, Any]:
    """Answer one command as a device would: a probe with its figures, an install with
    ``installed``; returns the command's args."""
    doc = json.loads(command.payload)
    assert doc["command"] == "ota_install"
    device_id = command.topic.split("/")[-2]
    args = doc["args"]
    if args.get("probe"):
        status = OtaStatus(device_id, time.time(), release_id, "anomaly", 2, "done", final=True,
                           outcome="probed",
                           progress={"variants": figures(DEVICES[device_id], variants)})
    else:
        status = OtaStatus(device_id, time.time(), release_id, "anomaly", 2, "done", final=True,
                           outcome="installed")
    devices.publish(topics.device_topic(device_id, topics.OTA_STATUS), status.to_json())
    return {"device": device_id, **args}


def test_each_class_ends_on_the_variant_its_budgets_call_for(
        site: tuple[Fleet, Controller, Collector, str, tuple[str, str]], store_url: str,
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    fleet, controller, devices, release_id, (fp32, int8) = site
    # the fake devices publish no profiles: the gates do not wait for them
    rollout = fleet.create_rollout(release_id, variants="auto", pins={X86: int8},
                                   waves="1,100%", wave_timeout_s=60,
                                   gates=GateSpec(min_profiles=0))
    assert rollout.spec.probing and rollout.spec.pins == {X86: int8}
    assert rollout.spec.budgets[RPI] == VariantBudget(150.0, 1024.0)
    sent: list[dict[str, Any]] = []
    handled = 0
    deadline = time.monotonic() + 60
    while not fleet.rollout(rollout.rollout_id).finished:
        assert time.monotonic() < deadline, fleet.rollout(rollout.rollout_id).progress_line()
        controller.drive(rollout.rollout_id, time.time())
        time.sleep(0.2)  # commands reach the devices, statuses reach the controller's store
        for command in list(devices.messages)[handled:]:
            sent.append(answer(devices, command, release_id, (fp32, int8)))
            handled += 1
        time.sleep(0.3)
    final = fleet.rollout(rollout.rollout_id)
    assert final.completed, final.reason
    probes = [s for s in sent if s.get("probe")]
    installs = [s for s in sent if not s.get("probe")]
    # two probe devices per class, each sent {release_id, chunk_size, probe: true}
    assert sorted(DEVICES[p["device"]] for p in probes) == sorted([RPI, RPI, JETSON, JETSON,
                                                                    X86, X86])
    assert all(set(p) == {"device", "release_id", "chunk_size", "probe"} for p in probes)
    # every device installs once, naming its class's variant; the probe devices too
    want = {RPI: int8, JETSON: fp32, X86: int8}
    assert sorted(i["device"] for i in installs) == sorted(DEVICES)
    for install in installs:
        assert install["variant"] == want[DEVICES[install["device"]]], install
        assert set(install) == {"device", "release_id", "chunk_size", "variant"}
    # what the operator sees
    from fleetlite.fleet.cli import main

    assert main(["rollout", "status", rollout.rollout_id, "-o", "json",
                 "--db", store_url]) == 0
    doc = json.loads(capsys.readouterr().out)
    chosen = {c: (v["variant"], v["pinned"]) for c, v in doc["variants"].items()}
    assert chosen == {RPI: (int8, False), JETSON: (fp32, False), X86: (int8, True)}
    rpi = doc["variants"][RPI]
    assert "210.0 ms > budget 150 ms" in rpi["reason"]
    by_variant = {f["variant"]: f for f in rpi["figures"]}
    assert by_variant[int8] | {} == {
        "variant": int8, "devices_probed": 2, "devices_passed": 2, "median_p95_ms": 60.0,
        "max_peak_rss_mb": 70.0, "min_fidelity": 0.96, "fits": True, "why": ""}
    assert not by_variant[fp32]["fits"]
    assert main(["rollout", "status", rollout.rollout_id, "--db", store_url]) == 0
    text = capsys.readouterr().out
    assert "variants  auto" in text and "pinned" in text and "WHY NOT" in text
    # and the HTML report
    html = fleet.write_report(tmp_path / "fleet.html").path.read_text(encoding="utf-8")
    assert "Variants per device class" in html and f"{int8} (pinned)" in html
    assert "210.0 ms &gt; budget 150 ms" in html


def test_probes_and_choices_round_trip_through_the_store(store_url: str) -> None:
    sim = VariantSim(vspec(pins={"rpi4": "int8"}), devs("rpi4", 3) + devs("jetson", 2))
    state = sim.run()
    assert state.variant_choices and state.probes
    with open_store(store_url) as store:
        from tests.test_store import add_release

        add_release(store, sim.spec.release_id)
        store.create_rollout("r-1", sim.spec.release_id, sim.spec.to_dict(),
                             state=RolloutState().to_dict())
        record = store.get_rollout("r-1")
        assert record is not None
        assert store.apply_decisions("r-1", record.revision, sim.log,
                                     progress=list(state.devices.values()),
                                     new_state=state.to_dict(devices=False))
        back = store.get_rollout("r-1")
        assert back is not None
        assert RolloutSpec.from_dict(back.spec) == sim.spec
        stored = RolloutState.from_stored(back.state)
        # the per-device rows take the store's write time; the rest is the state as applied
        assert replace(stored, devices={}) == replace(state, devices={})
        assert {k: d.status for k, d in stored.devices.items()} == {
            k: d.status for k, d in state.devices.items()}
        kinds = {d.kind for d in store.decisions("r-1")}
        assert {"send_probe", "probe_result", "choose_variant"} <= kinds
        light = store.get_rollout("r-1", devices=False)
        assert light is not None
        assert RolloutState.from_stored(light.state).variant_choices == state.variant_choices




@pytest.fixture
def stored(models_dir: Path, tmp_path: Path) -> Iterator[tuple[Fleet, str, str]]:
    """A SQLite store with the devices and the two-variant release, no broker."""
    url = f"sqlite:///{tmp_path / 'fleet.db'}"
    with open_store(url) as store:
        now = time.time()
        for device_id, cls in DEVICES.items():
            store.upsert_birth(birth(device_id, 1, now, device_class=cls, models=[]))
        bundle = build_release([models_dir / "sensor_autoencoder.tflite",
                                models_dir / "sensor_autoencoder_int8.tflite"],
                               name="anomaly", version=2, device_classes=[RPI, JETSON, X86],
                               issued=ISSUED, keys=[RELEASE_KEY])
        store.add_release(bundle.release_id, "anomaly", 2, bundle.envelope.to_json(),
                          dict(bundle.files), bundle.manifest.to_dict())
    fleet = Fleet(db=url)
    try:
        yield fleet, url, bundle.release_id
    finally:
        fleet.close()


@pytest.mark.parametrize(("argv", "words"), [
    (["--pin", "raspberry-pi-4"], "a pin is written CLASS=VARIANT"),
    (["--pin", "raspberry-pi-4=fp16"], "has the variants default, sensor_autoencoder_int8"),
    (["--pin", "small-arm-gateway=default"], "does not select"),
    (["--variants", "manual"], "invalid choice"),
    (["--variants", "auto", "--probe-devices", "0"], "a number of devices >= 1"),
])
def test_rollout_create_refuses_bad_variant_options(
        stored: tuple[Fleet, str, str], argv: list[str], words: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    from fleetlite.fleet.cli import main

    _, url, release_id = stored
    try:
        code = main(["rollout", "create", release_id, "--db", url, *argv])
    except SystemExit as exc:  # a usage error
        code = exc.code
    assert code != 0
    assert words in capsys.readouterr().err


def test_rollout_create_records_the_variant_options(
        stored: tuple[Fleet, str, str], capsys: pytest.CaptureFixture[str]) -> None:
    from fleetlite.fleet.cli import main

    fleet, url, release_id = stored
    assert main(["rollout", "create", release_id, "--db", url, "--pin",
                 f"{JETSON}=sensor_autoencoder_int8", "--probe-devices", "3", "-o",
                 "json"]) == 0
    spec = json.loads(capsys.readouterr().out)["spec"]
    assert spec["variants"] == "auto"  # a pin implies it
    assert spec["variant_names"] == ["default", "sensor_autoencoder_int8"]
    assert spec["pins"] == {JETSON: "sensor_autoencoder_int8"}
    assert spec["probe_devices_per_class"] == 3
    assert spec["budgets"][RPI] == {"max_p95_latency_ms": 150.0, "max_peak_rss_mb": 1024.0}
    # without the option, the spec is stored as before
    plain = fleet.create_rollout(release_id)
    assert "variants" not in plain.spec.to_dict() and not plain.spec.probing
    with pytest.raises(SystemExit):
        main(["rollout", "create", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--variants {off,auto}" in text and "--pin CLASS=VARIANT" in text
    assert "fits its latency and memory budgets" in text
