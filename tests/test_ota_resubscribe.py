"""The agent's OTA worker takes chunks it lost from the broker's retained copies: after the chunk
idle time it subscribes to the exact topics of the missing chunks (rounds of at most 64, in
order), the broker sends their retained copies to this device alone, and the fleet is asked only
for what the broker does not hold. The link is an in-process fake broker (a real
:class:`OtaManager`, real files, a real smoke test); tests/test_ota_delivery.py shows the same
rule against a real Mosquitto."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import pytest

from fleetlite.agent.ota import OtaSettings
from fleetlite.sdk import topics
from fleetlite.sdk.bundle import ReleaseBundle
from fleetlite.sdk.chunks import ChunkLayout
from tests.ota_simulator import FleetSimulator
from tests.test_ota_install import CHUNK, Device, release


class RetainingBroker(FleetSimulator):
    """A fleet whose broker holds every chunk but those a test marks ``drop`` (as
    :class:`FleetSimulator`), and loses the first delivery of each chunk in ``lost`` to this
    device (a full client queue). Subscribing to one chunk's exact topic delivers that chunk's
    retained copy, if the broker holds it."""

    def __init__(self, lost: Iterable[tuple[int, int]]) -> None:
        super().__init__()
        self.lost = set(lost)
        self.rounds: list[list[tuple[int, int]]] = []  # exact topics subscribed, by round
        self.unsubscribed: list[str] = []
        self._round_open = False

    def subscribe(self, topic: str, handler: Callable[[bytes], None]) -> None:
        try:
            parsed = topics.parse_release_topic(topic)
        except topics.TopicError:  # the chunks filter: the retained chunks, minus the lost
            served = self.served.get(topic.split("/")[3])
            if served is not None:
                served.drop |= self.lost
                try:
                    super().subscribe(topic, handler)
                finally:
                    served.drop -= self.lost
            return
        if parsed.kind == topics.RELEASE_MANIFEST:
            super().subscribe(topic, handler)
            return
        assert parsed.file_index is not None and parsed.index is not None
        key = (parsed.file_index, parsed.index)
        if not self._round_open:  # the agent ends a round (unsubscribes) before the next
            self.rounds.append([])
            self._round_open = True
        self.rounds[-1].append(key)
        self.handlers[topic] = handler
        served = self.served[parsed.release_id]
        if key not in served.drop:
            self._send(handler, served, *key)

    def unsubscribe(self, topic: str) -> None:
        self.unsubscribed.append(topic)
        self._round_open = False
        super().unsubscribe(topic)


def lossy_device(tmp_path: Path, models_dir: Path, lost: Iterable[tuple[int, int]]) -> Device:
    # the chunk idle time is the device's own silence rule (a round that brings nothing in it
    # is followed by a request); the in-process broker answers at once
    return Device(tmp_path, models_dir, fleet=RetainingBroker(lost),
                  settings=OtaSettings(manifest_timeout_s=5, chunk_idle_s=0.3,
                                       max_requests_without_progress=3, health_inferences=5,
                                       health_timeout_s=0.2))


@pytest.fixture
def bundle(models_dir: Path, tmp_path: Path) -> ReleaseBundle:
    return release(models_dir, tmp_path, 2)


def every_chunk(bundle: ReleaseBundle) -> list[tuple[int, int]]:
    layout = ChunkLayout.from_manifest(bundle.manifest, CHUNK)
    return [(f, i) for f, count in enumerate(layout.counts) for i in range(count)]


@pytest.fixture
def device_factory(tmp_path: Path, models_dir: Path) -> Iterator[
        Callable[[Iterable[tuple[int, int]]], Device]]:
    made: list[Device] = []

    def make(lost: Iterable[tuple[int, int]]) -> Device:
        made.append(lossy_device(tmp_path, models_dir, lost))
        return made[-1]

    yield make
    for device in made:
        device.close()


def test_lost_chunks_come_from_the_brokers_retained_copies_without_a_request(
        device_factory: Callable[[Iterable[tuple[int, int]]], Device],
        bundle: ReleaseBundle) -> None:
    chunks = every_chunk(bundle)
    lost = [key for key in chunks if key[1] % 2 == 1]  # every other chunk of every file
    assert lost
    device = device_factory(lost)
    fleet = device.fleet
    assert isinstance(fleet, RetainingBroker)
    final = device.install(bundle)
    assert (final.outcome, final.reason) == ("installed", ""), final.message
    # no chunk request: the fleet heard only "done"
    assert [(r.done, r.missing) for r in fleet.requests] == [(True, ())]
    # rounds of at most 64 exact topics, the missing chunks in order, each subscribed once
    assert [key for round_ in fleet.rounds for key in round_] == lost
    assert all(len(round_) <= 64 for round_ in fleet.rounds)
    # every exact topic was unsubscribed again
    exact = {topics.chunk_topic(bundle.release_id, CHUNK, f, i) for f, i in lost}
    assert exact <= set(fleet.unsubscribed)
    assert not exact & set(fleet.handlers)
    assert device.ota.stats()["chunk_resubscribes"] == len(fleet.rounds)
    assert device.ota.stats()["chunk_requests"] == 0


def test_the_fleet_is_asked_only_for_what_the_broker_does_not_hold(
        device_factory: Callable[[Iterable[tuple[int, int]]], Device],
        bundle: ReleaseBundle) -> None:
    chunks = every_chunk(bundle)
    lost = chunks[1:3]  # the broker holds these: a round brings them
    gone = set(chunks[-2:])  # the broker does not hold these (never published, or cleared)
    assert len(chunks) > 4
    device = device_factory(lost)
    fleet = device.fleet
    assert isinstance(fleet, RetainingBroker)
    final = device.install(bundle, drop=set(gone))
    assert (final.outcome, final.reason) == ("installed", ""), final.message
    # a round of everything missing brought the lost chunks; the next round, of what was still
    # missing, brought nothing; then one request for exactly what the broker lacked
    assert fleet.rounds == [lost + sorted(gone), sorted(gone)]
    assert fleet.requested_chunks() == gone
    assert [r.done for r in fleet.requests] == [False, True]
