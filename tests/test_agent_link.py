"""The agent's MQTT link sends a live publish queued by another thread at once, not when its
network thread next comes out of paho's select: a chunk request waited up to 50 ms there
(LOOP_TIMEOUT_S), at every request window of a download (tools/bench/bench_ota_transfer.py).
With the select's timeout made a minute long, live publishes still arrive within 3 s (without the
wake-up, each waited until the select timed out or the broker happened to send something:
seconds)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from fleetlite.agent import link as link_module
from fleetlite.agent.config import load_config
from fleetlite.agent.link import MqttLink
from fleetlite.sdk import topics
from tests.agent_harness import write_config
from tests.mqtt_harness import Collector, Mosquitto


class MemoryOutbox:
    """The spool's interface, in memory."""

    def __init__(self) -> None:
        self.records: list[Any] = []

    def append(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
               priority: str = "telemetry") -> int:
        self.records.append(SimpleNamespace(seq=len(self.records), topic=topic,
                                            payload=payload, qos=qos, retain=retain))
        return len(self.records) - 1

    def peek(self, limit: int, after: int = -1) -> list[Any]:
        return [r for r in self.records if r.seq > after][:limit]

    def ack(self, seq: int) -> None:
        pass


def test_work_from_another_thread_does_not_wait_for_the_select_timeout(
        tmp_path: Path, broker: Mosquitto, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(link_module, "LOOP_TIMEOUT_S", 60.0)
    config = load_config(write_config(tmp_path / "agent", port=broker.port, socket=False))
    collector = Collector(broker.host, broker.port, [f"{topics.DEVICE_PREFIX}/#"]).start()
    link = MqttLink(config, session=1, outbox=MemoryOutbox(), birth=lambda: b"{}",
                    on_command=lambda payload: None)
    link.start()
    try:
        collector.wait_for(topics.BIRTH)
        request_topic = topics.device_topic(config.device_id, topics.OTA_REQUEST)
        for n in range(3):
            link.publish_live(request_topic, b"request %d" % n)
            collector.wait_for(topics.OTA_REQUEST, count=n + 1, timeout=3)
    finally:
        link.stop()
        collector.stop()
