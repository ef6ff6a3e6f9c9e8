"""A device downloads a release through a real Mosquitto with a bounded window of exact chunk
subscriptions: the agent's OtaManager on a real MqttLink, the fleet's ReleasePublisher serving
the release retained. Mosquitto's own log of every SUBSCRIBE and UNSUBSCRIBE topic shows that
the device never had more than the window's chunk topics subscribed (so the broker never queued
more than that many chunks for it), never the wildcard filter, and that it ended with none."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from fleetlite.agent import ota_download
from fleetlite.agent.config import load_config
from fleetlite.agent.link import MqttLink
from fleetlite.agent.ota import OtaSettings
from fleetlite.fleet.ota_publisher import ReleasePublisher
from fleetlite.sdk import topics
from fleetlite.sdk.bundle import ReleaseBundle
from fleetlite.sdk.chunks import ChunkLayout
from tests import test_ota_install
from tests.agent_harness import write_config
from tests.mqtt_harness import Mosquitto
from tests.ota_simulator import FleetSimulator
from tests.test_agent_link import MemoryOutbox
from tests.test_ota_install import Device, release

CHUNK = 1024
WINDOW = 8  # chunks


class BrokerLink(FleetSimulator):
    """The OtaManager's link: a real :class:`MqttLink` to the broker; OTA statuses are kept
    here (as the fake fleet keeps them) instead of being spooled."""

    def __init__(self, link: MqttLink) -> None:
        super().__init__()
        self.link = link

    def subscribe(self, topic: str, handler: Callable[[bytes], None]) -> None:
        self.link.subscribe(topic, handler)

    def unsubscribe(self, topic: str) -> None:
        self.link.unsubscribe(topic)

    def subscribe_many(self, names: Sequence[str], handler: Callable[[bytes], None]) -> None:
        self.link.subscribe_many(names, handler)

    def unsubscribe_many(self, names: Sequence[str]) -> None:
        self.link.unsubscribe_many(names)

    def publish_live(self, topic: str, payload: bytes, *, qos: int = 1,
                     retain: bool = False) -> None:
        self.link.publish_live(topic, payload, qos=qos, retain=retain)


@pytest.fixture
def logged_broker(tmp_path: Path) -> Iterator[Mosquitto]:
    broker = Mosquitto(tmp_path / "mosquitto",
                       extra_conf="log_type subscribe\nlog_type unsubscribe\n").start()
    yield broker
    broker.stop()


@pytest.fixture(autouse=True)
def small_window(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(test_ota_install, "CHUNK", CHUNK)
    monkeypatch.setattr(ota_download, "WINDOW_BYTES", WINDOW * CHUNK)


def chunk_subscriptions(log: str, client_id: str, release_id: str) -> tuple[int, set[str], int]:
    """From Mosquitto's subscribe/unsubscribe log lines, in order: the most chunk topics
    ``client_id`` had subscribed at once, those still subscribed, and the SUBSCRIBEs seen."""
    prefix = topics.release_topic(release_id, topics.RELEASE_CHUNKS)
    subscribe = re.compile(rf"^\d+: {re.escape(client_id)} \d (\S+)$")
    unsubscribe = re.compile(rf"^\d+: {re.escape(client_id)} (\S+)$")
    held: set[str] = set()
    most = seen = 0
    for line in log.splitlines():
        if (match := subscribe.match(line)) and match.group(1).startswith(prefix):
            held.add(match.group(1))
            seen += 1
        elif (match := unsubscribe.match(line)) and match.group(1).startswith(prefix):
            held.discard(match.group(1))
        most = max(most, len(held))
    return most, held, seen


def test_a_download_never_has_more_than_the_window_subscribed_at_the_broker(
        tmp_path: Path, models_dir: Path, logged_broker: Mosquitto) -> None:
    bundle: ReleaseBundle = release(models_dir, tmp_path, 2)
    total = sum(ChunkLayout.from_manifest(bundle.manifest, CHUNK).counts)
    assert total >= 3 * WINDOW
    config = load_config(write_config(tmp_path / "agent", port=logged_broker.port,
                                      socket=False))
    link = MqttLink(config, session=1, outbox=MemoryOutbox(), birth=lambda: b"{}",
                    on_command=lambda payload: None)
    publisher = ReleasePublisher(logged_broker.host, logged_broker.port,
                                 client_id="fleet-publisher").start()
    device: Any = None
    link.start()
    try:
        assert link.connected.wait(20)
        publisher.serve(bundle, CHUNK)
        device = Device(tmp_path, models_dir, fleet=BrokerLink(link),
                        settings=OtaSettings(manifest_timeout_s=20, chunk_idle_s=2.0,
                                             health_inferences=5, health_timeout_s=0.5))
        final = device.install(bundle)
        assert (final.outcome, final.reason) == ("installed", ""), final.message
    finally:
        if device is not None:
            device.close()
        link.stop()
        publisher.close()
    most, left, seen = chunk_subscriptions(logged_broker.read_log(), config.device_id,
                                           bundle.release_id)
    assert seen >= total, "Mosquitto logged no chunk subscriptions: is log_type subscribe on?"
    # the first window filled up, and it never grew past that
    assert most == WINDOW, f"{most} chunk topics subscribed at once (window {WINDOW})"
    assert not left, f"still subscribed at the end: {sorted(left)}"
    wildcard = topics.chunks_filter(bundle.release_id, CHUNK)
    assert f"{config.device_id} 1 {wildcard}" not in logged_broker.read_log()
