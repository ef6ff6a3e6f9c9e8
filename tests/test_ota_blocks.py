"""A device takes a release two chunk blocks at a time (docs/protocol.md, "OTA delivery", Flow).

Blocks are shrunk to 4 chunks of 1 KiB here so that the intent classifier's release spans
many of them. Through a real Mosquitto (the agent's OtaManager on a real MqttLink, the fleet's
ReleasePublisher serving the release retained), Mosquitto's own log of every SUBSCRIBE and
UNSUBSCRIBE shows the device subscribed to each block's filter once, never to more than two
at once (so the broker never queued more than two blocks for it) and to none at the end. With
the fake fleet dropping chunks in many blocks, every re-subscribe round and every request names
only chunks of the blocks subscribed at that moment (the only ones that can reach the device)
and the install still completes.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from paho.mqtt.client import topic_matches_sub

from fleetlite.agent.config import load_config
from fleetlite.agent.link import MqttLink
from fleetlite.agent.ota import OtaSettings
from fleetlite.fleet.ota_publisher import ReleasePublisher
from fleetlite.sdk import topics
from fleetlite.sdk.bundle import ReleaseBundle
from fleetlite.sdk.chunks import LOOKAHEAD_BLOCKS, ChunkLayout
from fleetlite.sdk.ota_messages import ChunkRequest
from tests import test_ota_install
from tests.agent_harness import write_config
from tests.mqtt_harness import Mosquitto
from tests.ota_simulator import FleetSimulator
from tests.test_agent_link import MemoryOutbox
from tests.test_ota_install import Device, release

CHUNK = 1024
PER_BLOCK = 4


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(test_ota_install, "CHUNK", CHUNK)
    monkeypatch.setattr(topics, "BLOCK_BYTES", PER_BLOCK * CHUNK)


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


def block_subscriptions(log: str, client_id: str, release_id: str) -> tuple[list[str], int,
                                                                              set[str]]:
    """From Mosquitto's subscribe/unsubscribe log lines, in order: the block filters
    ``client_id`` subscribed to, the most it held at once, and those still held at the end."""
    prefix = topics.release_topic(release_id, topics.RELEASE_CHUNKS)
    subscribe = re.compile(rf"^\d+: {re.escape(client_id)} \d (\S+)$")
    unsubscribe = re.compile(rf"^\d+: {re.escape(client_id)} (\S+)$")
    held: set[str] = set()
    order: list[str] = []
    most = 0
    for line in log.splitlines():
        if (match := subscribe.match(line)) and match.group(1).startswith(prefix):
            if match.group(1).endswith("/+/+"):
                held.add(match.group(1))
                order.append(match.group(1))
        elif (match := unsubscribe.match(line)) and match.group(1).startswith(prefix):
            held.discard(match.group(1))
        most = max(most, len(held))
    return order, most, held


def test_a_download_holds_two_blocks_at_a_time_at_the_broker(
        tmp_path: Path, models_dir: Path, logged_broker: Mosquitto) -> None:
    bundle: ReleaseBundle = release(models_dir, tmp_path, 2)
    counts = ChunkLayout.from_manifest(bundle.manifest, CHUNK).counts
    blocks = -(-max(counts) // PER_BLOCK)
    assert blocks >= 5, counts
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
    order, most, left = block_subscriptions(logged_broker.read_log(), config.device_id,
                                            bundle.release_id)
    # every block once (two may go in one SUBSCRIBE, in any order); never more than two
    # held; none left
    assert sorted(order) == sorted(topics.block_filter(bundle.release_id, CHUNK, block)
                                   for block in range(blocks)), order
    assert most == LOOKAHEAD_BLOCKS, f"{most} block filters subscribed at once"
    assert not left, f"still subscribed at the end: {sorted(left)}"


class WatchedFleet(FleetSimulator):
    """The fake fleet, checking every ask against the block filters subscribed at that moment."""

    def __init__(self) -> None:
        super().__init__()
        self.outside: list[tuple[str, tuple[int, int]]] = []
        self.rounds = 0

    def _blocks(self) -> list[str]:
        return [name for name in self.handlers if name.endswith("/+/+")]

    def _check(self, kind: str, release_id: str, chunk: tuple[int, int]) -> None:
        topic = topics.chunk_topic(release_id, CHUNK, *chunk)
        if not any(topic_matches_sub(name, topic) for name in self._blocks()):
            self.outside.append((kind, chunk))

    def subscribe_many(self, names: Sequence[str], handler: Callable[[bytes], None]) -> None:
        self.rounds += 1
        for name in names:
            parsed = topics.parse_release_topic(name)
            assert parsed.file_index is not None and parsed.index is not None
            self._check("round", parsed.release_id, (parsed.file_index, parsed.index))
        super().subscribe_many(names, handler)

    def publish_live(self, topic: str, payload: bytes, *, qos: int = 1,
                     retain: bool = False) -> None:
        request = ChunkRequest.from_json(payload)
        for file_index, first, end in request.missing:
            for index in range(first, end):
                self._check("request", request.release_id, (file_index, index))
        super().publish_live(topic, payload, qos=qos, retain=retain)


def test_asks_name_only_chunks_of_the_subscribed_blocks(tmp_path: Path,
                                                       models_dir: Path) -> None:
    bundle = release(models_dir, tmp_path, 2)
    counts = ChunkLayout.from_manifest(bundle.manifest, CHUNK).counts
    # a chunk lost in every other block of file 0: only the fleet's answer to a request brings
    # it (the fake broker keeps no retained copy), after a round that brings nothing
    dropped = {(0, index) for index in range(1, counts[0], 2 * PER_BLOCK)}
    assert len(dropped) >= 3, counts
    fleet = WatchedFleet()
    device = Device(tmp_path, models_dir, fleet=fleet)
    try:
        final = device.install(bundle, drop=set(dropped))
    finally:
        device.close()
    assert (final.outcome, final.reason) == ("installed", ""), final.message
    assert fleet.rounds > 0 and fleet.requests, "no ask was made: nothing was checked"
    assert fleet.outside == [], f"asked for chunks outside the subscribed blocks: {fleet.outside}"
    assert dropped <= fleet.requested_chunks()
