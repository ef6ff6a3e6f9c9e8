"""The agent's OTA worker subscribes to a bounded window of exact chunk topics, not to the whole
release: the first W missing chunks, moved on as they arrive (the broker never queues more than
W chunks for the device). Chunks it lost come from the broker's retained copies: after the chunk
idle time it subscribes to the window's chunks AGAIN (a round), the broker re-sends their
retained copies to this device alone, and the fleet is asked only for what the broker does not
hold. The link is an in-process fake broker (a real :class:`OtaManager`, real files, a real smoke
test); tests/test_ota_delivery.py shows the rounds against a real Mosquitto, and
tests/test_ota_window.py the window."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import pytest

from fleetlite.agent import ota_download
from fleetlite.agent.ota import OtaSettings
from fleetlite.sdk import topics
from fleetlite.sdk.bundle import ReleaseBundle
from fleetlite.sdk.chunks import ChunkLayout, encode_frame
from tests import test_ota_install
from tests.ota_simulator import FleetSimulator, Served
from tests.test_ota_install import Device, release

CHUNK = 1024
WINDOW = 8  # chunks: the release below has 24


class RetainingBroker(FleetSimulator):
    """A fleet whose broker holds every chunk but those a test marks ``drop`` (as
    :class:`FleetSimulator`), and loses the first delivery of each chunk in ``lost`` to this
    device (a full client queue). Records the most exact chunk topics subscribed at once and the
    rounds: SUBSCRIBE packets naming a topic subscribed before (the window only ever adds
    topics it never had)."""

    def __init__(self, lost: Iterable[tuple[int, int]]) -> None:
        super().__init__()
        self.lost = set(lost)
        self.lost_once: set[tuple[int, int]] = set()
        self.ever: set[str] = set()
        self.rounds: list[list[tuple[int, int]]] = []
        self.most_subscribed = 0

    def subscribe_many(self, names: Sequence[str], handler: Callable[[bytes], None]) -> None:
        exact = [topics.parse_release_topic(name) for name in names if "/chunks/" in name]
        if exact and any(name in self.ever for name in names):
            self.rounds.append([(t.file_index or 0, t.index or 0) for t in exact])
        self.ever.update(names)
        self.most_subscribed = max(self.most_subscribed,
                                   len(self.subscribed_chunks() | set(names)))
        super().subscribe_many(names, handler)

    def _send(self, handler: Callable[[bytes], None], served: Served, file_index: int,
              index: int) -> None:
        if (file_index, index) in self.lost - self.lost_once:
            self.lost_once.add((file_index, index))
            return
        super()._send(handler, served, file_index, index)


@pytest.fixture(autouse=True)
def small_window(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(test_ota_install, "CHUNK", CHUNK)
    monkeypatch.setattr(ota_download, "WINDOW_BYTES", WINDOW * CHUNK)


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


def broker_of(device: Device) -> RetainingBroker:
    assert isinstance(device.fleet, RetainingBroker)
    return device.fleet


def test_the_device_subscribes_a_window_of_exact_chunk_topics(
        device_factory: Callable[[Iterable[tuple[int, int]]], Device],
        bundle: ReleaseBundle) -> None:
    chunks = every_chunk(bundle)
    assert len(chunks) >= 3 * WINDOW
    device = device_factory(())
    fleet = broker_of(device)
    final = device.install(bundle)
    assert (final.outcome, final.reason) == ("installed", ""), final.message
    # never the wildcard filter; never more than the window at once; each chunk subscribed
    # once, in order, the first window in one packet and the rest as half windows
    assert not any("+" in name for packet in fleet.subscribe_packets for name in packet)
    assert fleet.most_subscribed == WINDOW
    chunk_packets = [p for p in fleet.subscribe_packets if p and "/chunks/" in p[0]]
    subscribed = [name for packet in chunk_packets for name in packet]
    assert subscribed == [topics.chunk_topic(bundle.release_id, CHUNK, f, i) for f, i in chunks]
    assert len(chunk_packets[0]) == WINDOW
    assert all(len(p) >= WINDOW // 2 for p in chunk_packets[1:-1])
    # received chunks are unsubscribed in batches, and every one by the end
    unsubscribed = [p for p in fleet.unsubscribe_packets if p and "/chunks/" in p[0]]
    assert all(len(p) >= WINDOW // 2 for p in unsubscribed[:-1])
    assert sorted(name for p in unsubscribed for name in p) == sorted(subscribed)
    assert not fleet.subscribed_chunks()
    assert fleet.frames_sent == len(chunks)  # nothing twice
    assert not fleet.rounds and [(r.done, r.missing) for r in fleet.requests] == [(True, ())]


def test_lost_chunks_come_from_the_brokers_retained_copies_without_a_request(
        device_factory: Callable[[Iterable[tuple[int, int]]], Device],
        bundle: ReleaseBundle) -> None:
    chunks = every_chunk(bundle)
    lost = [key for key in chunks if key[1] % 2 == 1]  # every other chunk of every file
    assert lost
    device = device_factory(lost)
    fleet = broker_of(device)
    final = device.install(bundle)
    assert (final.outcome, final.reason) == ("installed", ""), final.message
    # no chunk request: the fleet heard only "done"
    assert [(r.done, r.missing) for r in fleet.requests] == [(True, ())]
    # each round re-subscribed the window (at most WINDOW chunks, the first missing, in order)
    # and brought the lost chunks; the window stayed bounded throughout
    assert fleet.rounds and all(len(round_) <= WINDOW for round_ in fleet.rounds)
    assert set(lost) <= {key for round_ in fleet.rounds for key in round_}
    assert fleet.most_subscribed <= WINDOW
    assert not fleet.subscribed_chunks()
    assert device.ota.stats()["chunk_resubscribes"] == len(fleet.rounds)
    assert device.ota.stats()["chunk_requests"] == 0


def test_the_fleet_is_asked_only_for_what_the_broker_does_not_hold(
        device_factory: Callable[[Iterable[tuple[int, int]]], Device],
        bundle: ReleaseBundle) -> None:
    chunks = every_chunk(bundle)
    lost = chunks[1:3]  # the broker holds these: a round brings them
    gone = set(chunks[-2:])  # the broker does not hold these (never published, or cleared)
    device = device_factory(lost)
    fleet = broker_of(device)
    final = device.install(bundle, drop=set(gone))
    assert (final.outcome, final.reason) == ("installed", ""), final.message
    # a round of everything missing brought the lost chunks; the next round, of what was still
    # missing, brought nothing; then one request for exactly what the broker lacked, which
    # reached the device on the exact topics it was subscribed to
    assert fleet.rounds == [lost + sorted(gone), sorted(gone)]
    assert fleet.requested_chunks() == gone
    assert [r.done for r in fleet.requests] == [False, True]
    assert fleet.most_subscribed <= WINDOW


def test_the_fake_broker_treats_an_exact_chunk_topic_exactly(bundle: ReleaseBundle) -> None:
    fleet = FleetSimulator()
    contents = [bundle.files[f.name] for f in bundle.manifest.files]
    fleet.serve(bundle.release_id, Served(b"{}", contents, CHUNK, drop={(0, 3)},
                                          extra_frames=[b"junk"]))
    got: list[bytes] = []
    fleet.subscribe_many([topics.chunk_topic(bundle.release_id, CHUNK, 0, 2),
                          topics.chunk_topic(bundle.release_id, CHUNK, 0, 3)], got.append)
    assert got == [encode_frame(0, 2 * CHUNK, contents[0][2 * CHUNK:3 * CHUNK])]
    # subscribed again: the retained copy again
    fleet.subscribe_many([topics.chunk_topic(bundle.release_id, CHUNK, 0, 2)], got.append)
    assert len(got) == 2 and got[0] == got[1]
    everything: list[bytes] = []
    fleet.subscribe(topics.chunks_filter(bundle.release_id, CHUNK), everything.append)
    assert len(everything) == len(every_chunk(bundle)) - 1 + 1  # all but (0, 3), plus junk
