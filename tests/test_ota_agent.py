"""OTA through a real Mosquitto into real agent processes: kill -9 at each phase, resumed
downloads that fetch only what is missing, and a live switch with zero failed requests."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fleetlite.fleet.intent_model import intent_classifier
from fleetlite.fleet.ota_publisher import ReleasePublisher
from fleetlite.fleet.release_builder import build_release
from fleetlite.sdk import topics
from fleetlite.sdk.bundle import ReleaseBundle
from fleetlite.sdk.local_client import LocalClient
from fleetlite.sdk.messages import Birth, OtaStatus
from fleetlite.sdk.runtime.interpreter import load_model
from fleetlite.sdk.text import Tokenizer
from tests.agent_harness import AgentProcess, write_config
from tests.mqtt_harness import Collector, Mosquitto
from tests.ota_harness import ManualRelease
from tests.test_ota_install import CLASS, ISSUED, RELEASE_KEY, write_root

DEVICE = "gw-1"
CHUNK = 1024


@pytest.fixture
def v2(tmp_path: Path, models_dir: Path) -> ReleaseBundle:
    path = tmp_path / "intent_v2.tflite"
    path.write_bytes(intent_classifier(seed=7).tflite)  # different weights: outputs tell apart
    return build_release([path], name="intent", version=2, device_classes=[CLASS],
                         issued=ISSUED, vocab=models_dir / "intent_classifier.vocab.json",
                         keys=[RELEASE_KEY])


def agent_config(tmp_path: Path, broker: Mosquitto, models_dir: Path,
                 **ota: float) -> Path:
    return write_config(
        tmp_path / "agent", port=broker.port,
        models=[{"name": "intent", "path": models_dir / "intent_classifier.tflite",
                 "version": 1}],
        extra={"trust_root": str(write_root(tmp_path / "root.json")),
               "ota": {"chunk_idle_s": 0.5, "health_inferences": 5, "health_timeout_s": 0.5,
                       **ota}},
    )


@pytest.fixture
def collector(broker: Mosquitto) -> Iterator[Collector]:
    c = Collector(broker.host, broker.port, [f"{topics.DEVICE_PREFIX}/#"]).start()
    yield c
    c.stop()


def command(collector: Collector, name: str, args: dict[str, Any],
            timeout: float = 20.0) -> dict[str, Any]:
    """Send one command to the agent ``DEVICE`` and return its response."""
    command_id = uuid.uuid4().hex[:10]
    collector.publish(topics.device_topic(DEVICE, topics.COMMAND), json.dumps(
        {"schema": "fleetlite.command/1", "id": command_id, "command": name, "args": args}
    ).encode())
    (response,) = collector.wait_for(
        topics.COMMAND_RESPONSE, timeout=timeout,
        predicate=lambda m: json.loads(m.payload)["id"] == command_id)
    result: dict[str, Any] = json.loads(response.payload)
    return result


def statuses(collector: Collector) -> list[OtaStatus]:
    return [OtaStatus.from_json(m.payload) for m in collector.on_topic(topics.OTA_STATUS)]


def wait_phase(collector: Collector, phase: str, timeout: float = 60) -> None:
    collector.wait_for(topics.OTA_STATUS, timeout=timeout,
                       predicate=lambda m: OtaStatus.from_json(m.payload).phase == phase)


def wait_final(collector: Collector, timeout: float = 90) -> OtaStatus:
    msgs = collector.wait_for(topics.OTA_STATUS, timeout=timeout,
                              predicate=lambda m: OtaStatus.from_json(m.payload).final)
    return OtaStatus.from_json(msgs[-1].payload)


def serving_version(collector: Collector) -> int:
    birth = Birth.from_json(collector.on_topic(topics.BIRTH)[-1].payload)
    return int(birth.models[0]["version"])


def test_kill_mid_download_resumes_fetching_only_missing_chunks(
    tmp_path: Path, broker: Mosquitto, collector: Collector, models_dir: Path,
    v2: ReleaseBundle,
) -> None:
    config = agent_config(tmp_path, broker, models_dir)
    rel = ManualRelease(broker.host, broker.port, v2, CHUNK)
    agent = AgentProcess(config).start()
    try:
        collector.wait_for(topics.BIRTH)
        rel.publish_manifest()
        assert command(collector, "ota_install", {"release_id": rel.rid,
                                                  "chunk_size": CHUNK})["ok"]
        wait_phase(collector, "downloading")
        first_half = rel.all_chunks()[: len(rel.all_chunks()) // 2]
        time.sleep(0.3)  # the agent is subscribed to the chunk topic once it says downloading
        rel.publish_chunks(first_half)
        time.sleep(1.5)  # the received-chunk bitmap is persisted at least every second
        agent.kill9()
        rel.clear_requests()
        rel.answer = True
        agent = AgentProcess(config).start()
        final = wait_final(collector)
        assert (final.outcome, final.reason) == ("installed", ""), final.message
        assert rel.requested() == set(rel.all_chunks()) - set(first_half)
        collector.wait_for(topics.BIRTH, predicate=lambda m: Birth.from_json(
            m.payload).models[0]["version"] == 2)
    finally:
        agent.stop()
        rel.close()


@pytest.mark.parametrize("phase", ["smoke_testing", "switching", "health_check"])
def test_kill_9_at_each_phase_leaves_a_serving_model(
    tmp_path: Path, broker: Mosquitto, collector: Collector, models_dir: Path,
    v2: ReleaseBundle, phase: str,
) -> None:
    # a long health window with no traffic keeps the agent in it until killed
    config = agent_config(tmp_path, broker, models_dir, health_inferences=10_000,
                          health_timeout_s=60)
    rel = ManualRelease(broker.host, broker.port, v2, CHUNK)
    rel.answer = True
    agent = AgentProcess(config).start()
    try:
        collector.wait_for(topics.BIRTH)
        rel.publish_manifest()
        command(collector, "ota_install", {"release_id": rel.rid, "chunk_size": CHUNK})
        wait_phase(collector, phase)
        agent.kill9()
        rel.clear_requests()
        if phase != "health_check":
            # The long window was only there to be killed in; resuming through a 60 s window
            # and 10,000 inferences proves nothing more than a short one.
            config = agent_config(tmp_path, broker, models_dir)
        agent = AgentProcess(config).start()
        agent.wait_for_log("running (session 2)")
        # its online status of session 2: from then on a command reaches it
        collector.wait_for(topics.STATUS, predicate=lambda m: b'"session":2' in m.payload
                           and b'"online":true' in m.payload, timeout=60)
        if phase == "smoke_testing":
            # verified files are kept: the install resumes without fetching a chunk again
            final = wait_final(collector, timeout=120)
            assert final.outcome == "installed", final.message
            assert rel.requested() == set()
        elif phase == "health_check":
            final = wait_final(collector)
            assert (final.outcome, final.reason) == ("rolled_back",
                                                     "crashed_during_health_window")
            # the rolled-back release leaves nothing behind: no staging copy, no slot
            state = tmp_path / "agent" / "state"
            assert not any((state / "ota" / "staging").iterdir())
            assert not (state / "models" / "intent" / "a").exists()
        # whatever the phase, the device serves a model, the old or the new one
        tokenizer = Tokenizer.from_file(models_dir / "intent_classifier.vocab.json")
        with LocalClient(tmp_path / "agent" / "agent.sock") as client:
            out = client.infer("intent", tokenizer.encode("turn off the kitchen lights"))
        assert next(iter(out.values())).shape == (1, 11)
        slots = command(collector, "ota_slots", {})["result"]["models"]["intent"]
        assert slots["pending"] is None or phase == "switching"
    finally:
        agent.stop()
        rel.close()


def test_live_switch_drops_no_request(
    tmp_path: Path, broker: Mosquitto, collector: Collector, models_dir: Path,
    v2: ReleaseBundle,
) -> None:
    config = agent_config(tmp_path, broker, models_dir, health_inferences=20)
    tokenizer = Tokenizer.from_file(models_dir / "intent_classifier.vocab.json")
    tokens = tokenizer.encode("set the thermostat to 21 degrees")
    old = next(iter(load_model(models_dir / "intent_classifier.tflite").run(tokens).values()))
    new = next(iter(load_model(v2.files[v2.manifest.model.file]).run(tokens).values()))
    assert not np.array_equal(old, new)
    agent = AgentProcess(config).start()
    results = {"ok": 0, "failed": 0, "old": 0, "new": 0, "other": 0}
    stop = threading.Event()

    def hammer() -> None:
        with LocalClient(tmp_path / "agent" / "agent.sock") as client:
            while not stop.is_set():
                try:
                    out = next(iter(client.infer("intent", tokens).values()))
                except Exception:
                    results["failed"] += 1
                    continue
                results["ok"] += 1
                key = ("old" if np.array_equal(out, old) else
                       "new" if np.array_equal(out, new) else "other")
                results[key] += 1

    # the product's publisher: manifest retained, chunks by fan-out, re-sends on request
    publisher = ReleasePublisher(broker.host, broker.port, client_id="fleet-publisher").start()
    try:
        collector.wait_for(topics.BIRTH)
        worker = threading.Thread(target=hammer)
        worker.start()
        publisher.serve(v2, 4096, initial_pass=False)
        command(collector, "ota_install", {"release_id": v2.release_id, "chunk_size": 4096})
        final = wait_final(collector)
        time.sleep(0.3)
        stop.set()
        worker.join(10)
        assert (final.outcome, final.reason) == ("installed", ""), final.message
        assert results["failed"] == 0 and results["other"] == 0, results
        assert results["old"] > 0 and results["new"] > 0, results
        assert publisher.stats()["requests_received"] >= 1
    finally:
        stop.set()
        agent.stop()
        publisher.close()
