"""The agent's MQTT link sends a live publish queued by another thread at once, not when its
network thread next comes out of paho's select: a chunk request waited up to 50 ms there
(LOOP_TIMEOUT_S), at every request window of a download (tools/bench/bench_ota_transfer.py).
With the select's timeout made a minute long, live publishes still arrive within 3 s (without the
wake-up, each waited until the select timed out or the broker happened to send something:
seconds). Batched subscriptions (``subscribe_many``: one SUBSCRIBE for many topics, always
sent, so the broker re-sends retained copies) keep their order with live publishes."""

from __future__ import annotations

import threading
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


# --- batched subscriptions (a device's window of exact chunk topics) -------------------------


class RecordingClient:
    """What the link asks of paho, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def subscribe(self, topic: Any, qos: int = 0) -> None:
        self.calls.append(("subscribe", topic))

    def unsubscribe(self, topic: Any) -> None:
        self.calls.append(("unsubscribe", topic))

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> None:
        self.calls.append(("publish", topic))


def idle_link(tmp_path: Path) -> MqttLink:
    config = load_config(write_config(tmp_path / "agent", port=1, socket=False))
    return MqttLink(config, session=1, outbox=MemoryOutbox(), birth=lambda: b"{}",
                    on_command=lambda payload: None)


def test_subscribe_many_is_one_packet_always_sent_in_order_with_live_publishes(
        tmp_path: Path) -> None:
    link = idle_link(tmp_path)
    client = RecordingClient()
    link.subscribe_many(["a/1", "a/2", "a/3"], lambda payload: None)
    link.subscribe_many(["a/1", "a/2"], lambda payload: None)  # already subscribed: sent again
    link.publish_live("req", b"x")
    link.unsubscribe_many(["a/1", "a/2"])
    link.subscribe_many([], lambda payload: None)  # nothing to send
    link._run_actions(client)  # type: ignore[arg-type]
    assert client.calls == [("subscribe", [("a/1", 1), ("a/2", 1), ("a/3", 1)]),
                            ("subscribe", [("a/1", 1), ("a/2", 1)]),
                            ("publish", "req"),
                            ("unsubscribe", ["a/1", "a/2"])]
    # a new connection subscribes what is wanted in one packet; queued (un)subscriptions are
    # dropped (they would repeat it), live publishes kept
    link.subscribe_many(["a/4"], lambda payload: None)
    link.publish_live("req", b"y")
    client = RecordingClient()
    link._handle_connect(client, None, None, SimpleNamespace(is_failure=False), None)  # type: ignore[arg-type]
    assert ("subscribe", [("a/3", 1), ("a/4", 1)]) in client.calls
    link._run_actions(client)  # type: ignore[arg-type]
    assert [c for c in client.calls if c[1] == "req"] == [("publish", "req")]
    assert client.calls.count(("subscribe", [("a/3", 1), ("a/4", 1)])) == 1


def test_subscribe_many_against_mosquitto_resends_retained_and_precedes_a_later_publish(
        tmp_path: Path, broker: Mosquitto) -> None:
    config = load_config(write_config(tmp_path / "agent", port=broker.port, socket=False))
    collector = Collector(broker.host, broker.port, [f"{topics.DEVICE_PREFIX}/#"]).start()
    link = MqttLink(config, session=1, outbox=MemoryOutbox(), birth=lambda: b"{}",
                    on_command=lambda payload: None)
    got: list[bytes] = []
    arrived = threading.Condition()

    def handler(payload: bytes) -> None:
        with arrived:
            got.append(payload)
            arrived.notify_all()

    def wait_count(count: int) -> None:
        with arrived:
            assert arrived.wait_for(lambda: len(got) >= count, timeout=20), got

    names = [f"test/window/{n}" for n in range(3)]
    for n, name in enumerate(names):
        collector.publish(name, b"retained %d" % n, retain=True)
    link.start()
    try:
        collector.wait_for(topics.BIRTH)
        link.subscribe_many(names, handler)
        wait_count(3)
        assert sorted(got) == [b"retained 0", b"retained 1", b"retained 2"]
        # subscribed again (already subscribed): the broker sends the retained copies again
        link.subscribe_many(names[:2], handler)
        wait_count(5)
        assert sorted(got[3:]) == [b"retained 0", b"retained 1"]
        # a subscription is in place before a live publish made after it: the link's own
        # publish on a topic it just subscribed comes back, every time
        for n in range(3):
            fresh = f"test/window/fresh/{n}"
            link.subscribe_many([fresh], handler)
            link.publish_live(fresh, b"own %d" % n, retain=False)
            wait_count(6 + n)
            assert got[-1] == b"own %d" % n
        # unsubscribed: a later message is not delivered (a still-subscribed topic's message,
        # published after it by the same client, arrives; the broker keeps their order)
        link.unsubscribe_many(names[:2])
        link.publish_live(names[0], b"after", retain=False)
        link.publish_live(names[2], b"marker", retain=False)
        wait_count(9)
        assert got[-1] == b"marker" and b"after" not in got
    finally:
        link.stop()
        collector.stop()
