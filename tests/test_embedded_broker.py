"""The demo's broker choice: the embedded amqtt broker carries what the agent needs (retained
status and birth, QoS 1, the Last Will), checked with a real agent process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fleetlite.sdk import topics
from fleetlite.sdk.messages import Birth, Status
from tests.agent_harness import AgentProcess, write_config
from tests.mqtt_harness import Collector

pytestmark = pytest.mark.skipif(sys.version_info < (3, 10),
                                reason="amqtt, the embedded broker, needs Python 3.10+")


def test_agent_works_against_the_embedded_broker(tmp_path: Path, models_dir: Path) -> None:
    from fleetlite.fleet.broker import start_local_broker

    broker = start_local_broker(prefer="embedded")
    assert broker.kind == "embedded (amqtt)"
    agent = AgentProcess(write_config(
        tmp_path / "agent", port=broker.port,
        models=[{"name": "intent", "path": models_dir / "intent_classifier.tflite"}])).start()
    collector = Collector(broker.host, broker.port, [f"{topics.DEVICE_PREFIX}/#"]).start()
    try:
        collector.wait_for(topics.BIRTH)
        # a client that subscribes later gets the retained birth. amqtt 0.12 also hands it
        # retained messages of sibling topics (and duplicates): consumers must check the topic,
        # as the agent's link and the fleet side do.
        out = subprocess.run(
            ["mosquitto_sub", "-h", broker.host, "-p", str(broker.port), "-v", "-t",
             topics.device_topic("gw-1", topics.BIRTH), "-W", "3"],
            capture_output=True, timeout=20, check=False)
        births = [payload for topic, payload in
                  (line.split(b" ", 1) for line in out.stdout.splitlines() if line.strip())
                  if topic.decode() == topics.device_topic("gw-1", topics.BIRTH)]
        assert births, out.stdout[:300]
        assert Birth.from_json(births[-1]).models[0]["name"] == "intent"
        agent.kill9()
        offline = collector.wait_for(
            topics.STATUS, predicate=lambda m: not Status.from_json(m.payload).online)
        assert Status.from_json(offline[-1].payload).reason == "lost"
    finally:
        agent.stop()
        collector.stop()
        broker.stop()


def test_mosquitto_is_preferred_when_installed() -> None:
    from fleetlite.fleet.broker import mosquitto_path, start_local_broker

    if mosquitto_path() is None:
        pytest.skip("mosquitto is not installed")
    broker = start_local_broker()
    try:
        assert broker.kind == "mosquitto"
    finally:
        broker.stop()
