"""Delta updates through the agent: a device that keeps the base receives only the delta and
rebuilds the signed model; a bad delta is refused with its reason and the full model fetched
instead; kill -9 in the middle of a rebuild leaves the active model serving and the install
completes after the restart (a real agent process, a real Mosquitto, the real publisher)."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleetlite.fleet.ota_publisher import ReleasePublisher
from fleetlite.sdk import topics
from fleetlite.sdk.local_client import LocalClient
from fleetlite.sdk.manifest import release_id
from fleetlite.sdk.messages import Birth, Event
from fleetlite.sdk.text import Tokenizer
from tests.agent_harness import AgentProcess
from tests.mqtt_harness import Collector, Mosquitto
from tests.ota_simulator import Served
from tests.test_conformance import FaultAgent
from tests.test_ota_agent import agent_config, command, wait_final
from tests.test_ota_install import Device
from tests.test_ota_machine import delta_release

CHUNK = 4096


@pytest.fixture
def device(tmp_path: Path, models_dir: Path) -> Iterator[Device]:
    d = Device(tmp_path, models_dir)
    yield d
    d.close()


def test_a_device_with_the_base_receives_only_the_delta(device: Device, models_dir: Path,
                                                        tmp_path: Path) -> None:
    rel = delta_release(models_dir, tmp_path)
    manifest = rel.bundle.manifest
    final = device.install(rel.bundle)
    assert (final.outcome, final.reason) == ("installed", ""), final.message
    assert device.serving_version() == 2
    # what crossed the wire: the delta and the small files, never the full model
    others = sum(f.length for f in manifest.files if f.name not in (rel.model, rel.delta))
    assert device.fleet.bytes_sent == others + manifest.file(rel.delta).length
    assert manifest.file(rel.delta).length <= 0.15 * manifest.file(rel.model).length
    slot = device.state_dir / "models" / "intent" / "a"
    served = (slot / rel.model).read_bytes()
    assert hashlib.sha256(served).hexdigest() == manifest.file(rel.model).sha256
    assert not (slot / rel.delta).exists()  # the slot holds the model, not the delta
    assert device.fleet.events == []


def test_a_shadowed_delta_release_is_promoted_from_its_kept_files(
        device: Device, models_dir: Path, tmp_path: Path) -> None:
    """Shadowing downloads the delta and rebuilds the model once; installing the same release
    then promotes the kept files with no byte fetched again (it fetched the delta twice)."""
    rel = delta_release(models_dir, tmp_path)
    manifest = rel.bundle.manifest
    rid = release_id(rel.bundle.envelope.payload)
    device.fleet.serve(rid, Served(rel.bundle.envelope.to_json(),
                                   [rel.bundle.files[f.name] for f in manifest.files], CHUNK))
    shadowing = device.send_install({"release_id": rid, "chunk_size": CHUNK, "shadow": True})
    assert (shadowing.outcome, shadowing.reason) == ("shadowing", ""), shadowing.message
    assert device.serving_version() == 1
    others = sum(f.length for f in manifest.files if f.name not in (rel.model, rel.delta))
    assert device.fleet.bytes_sent == others + manifest.file(rel.delta).length
    sent = device.fleet.bytes_sent
    final = device.send_install({"release_id": rid, "chunk_size": CHUNK})
    assert (final.outcome, final.reason) == ("installed", ""), final.message
    assert device.fleet.bytes_sent == sent  # the kept files, not the delta again
    assert device.serving_version() == 2
    served = (device.state_dir / "models" / "intent" / "a" / rel.model).read_bytes()
    assert hashlib.sha256(served).hexdigest() == manifest.file(rel.model).sha256


def test_a_corrupted_delta_falls_back_to_the_full_model(device: Device, models_dir: Path,
                                                        tmp_path: Path) -> None:
    rel = delta_release(models_dir, tmp_path)
    manifest = rel.bundle.manifest
    files = [bytes(b ^ 0x55 for b in rel.bundle.files[f.name][:64])
             + rel.bundle.files[f.name][64:] if f.name == rel.delta
             else rel.bundle.files[f.name] for f in manifest.files]
    final = device.install(rel.bundle, files=files)
    assert (final.outcome, final.reason) == ("installed", ""), final.message
    assert device.serving_version() == 2
    (event,) = device.fleet.events
    assert event.kind == "ota_delta_refused" and event.detail["reason"] == "hash_mismatch"
    assert "fetching the full files" in event.message
    assert device.fleet.bytes_sent >= manifest.file(rel.model).length
    # not the release's fault: nothing is remembered as rejected
    assert device.counters() == (2, ())


def test_a_device_without_the_base_downloads_the_full_model(tmp_path: Path,
                                                            models_dir: Path) -> None:
    rel = delta_release(models_dir, tmp_path)
    other = tmp_path / "other-seed"
    other.mkdir()
    seed = other / "intent_classifier.tflite"
    seed.write_bytes((models_dir / "sensor_autoencoder.tflite").read_bytes())
    device = Device(tmp_path, models_dir)
    try:
        device.ota.seeds["intent"] = (seed, 1)  # the device keeps some other model
        final = device.install(rel.bundle)
        assert (final.outcome, final.reason) == ("installed", ""), final.message
        manifest = rel.bundle.manifest
        assert device.fleet.bytes_sent == sum(f.length for f in manifest.files
                                              if f.name != rel.delta)
        assert device.fleet.events == []
    finally:
        device.close()


@pytest.fixture
def collector(broker: Mosquitto) -> Iterator[Collector]:
    c = Collector(broker.host, broker.port, [f"{topics.DEVICE_PREFIX}/#"]).start()
    yield c
    c.stop()


def test_kill_9_during_a_delta_rebuild_leaves_the_active_model_serving(
    tmp_path: Path, broker: Mosquitto, collector: Collector, models_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rel = delta_release(models_dir, tmp_path)
    seed = models_dir / "intent_classifier.tflite"
    seed_sha = hashlib.sha256(seed.read_bytes()).hexdigest()
    marker = tmp_path / "rebuild-paused"
    monkeypatch.setenv("FLEETLITE_TEST_PAUSE_MARKER", str(marker))
    config = agent_config(tmp_path, broker, models_dir)
    publisher = ReleasePublisher(broker.host, broker.port, client_id="fleet-publisher").start()
    agent: AgentProcess = FaultAgent(config, "pause_rebuild").start()
    try:
        publisher.serve(rel.bundle, CHUNK)
        collector.wait_for(topics.BIRTH, timeout=60)
        assert command(collector, "ota_install", {"release_id": rel.bundle.release_id,
                                                  "chunk_size": CHUNK})["ok"]
        deadline = time.monotonic() + 90
        while not marker.exists():
            assert time.monotonic() < deadline, "the agent never reached the delta rebuild"
            assert agent.alive, "the agent exited before the rebuild"
            time.sleep(0.05)
        agent.kill9()
        staging = tmp_path / "agent" / "state" / "ota" / "staging" / rel.bundle.release_id
        assert not (staging / rel.model).exists()  # only the half-written temporary file
        assert hashlib.sha256(seed.read_bytes()).hexdigest() == seed_sha  # the base untouched
        agent = AgentProcess(config).start()
        final = wait_final(collector, timeout=120)
        assert (final.outcome, final.reason) == ("installed", ""), final.message
        collector.wait_for(topics.BIRTH, timeout=60, predicate=lambda msg: Birth.from_json(
            msg.payload).models[0]["version"] == 2)
        tokenizer = Tokenizer.from_file(models_dir / "intent_classifier.vocab.json")
        with LocalClient(tmp_path / "agent" / "agent.sock") as client:
            out = client.infer("intent", tokenizer.encode("turn off the kitchen lights"))
        assert next(iter(out.values())).shape == (1, 11)
        events = [Event.from_json(m.payload) for m in collector.on_topic(topics.EVENTS)]
        assert not [e for e in events if e.kind == "ota_delta_refused"]
        assert not list(staging.parent.glob("*/.*rebuild-*"))  # no temporary file left
    finally:
        agent.stop()
        publisher.close()


def test_a_language_model_that_agent_yaml_serves_is_a_delta_base(tmp_path: Path) -> None:
    """agent.yaml's language models are not seeds of the OTA state, but their files are bases:
    a fine-tune of the served LM travels as its delta (found by a benchmark, fixed)."""
    from fleetlite.fleet.delta_builder import BaseRelease, plan_deltas
    from fleetlite.tools.finetune_weights import finetune_weights
    from tests.test_lm_install import LM, LmDevice, lm_release
    from tests.test_ota_variants import send

    base = LM / "home_lm.tflite"
    tuned = tmp_path / "tuned" / "home_lm.tflite"
    tuned.parent.mkdir()
    tuned.write_bytes(finetune_weights(base.read_bytes(), seed=14))
    built, _ = plan_deltas(BaseRelease("v1", {tuned.name: base.read_bytes()}),
                           [(tuned.name, tuned.read_bytes())])
    bundle = lm_release(2, model=str(tuned), deltas=built)
    device = LmDevice(tmp_path)
    try:
        device.ota.bases = [base]
        final = send(device, bundle)
        assert (final.outcome, final.reason) == ("installed", ""), final.message
        manifest = bundle.manifest
        (ref,) = manifest.deltas
        others = sum(f.length for f in manifest.files if f.name not in (ref.file, ref.delta))
        assert device.fleet.bytes_sent == others + manifest.file(ref.delta).length
    finally:
        device.ota.stop()
