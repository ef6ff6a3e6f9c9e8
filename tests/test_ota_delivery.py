"""Chunked release delivery end to end through a real Mosquitto: the fleet's ReleasePublisher
serves a real signed bundle, its chunks retained; device-side test loops (plain paho +
ChunkStore + DownloadTracker) verify the retained manifest, subscribe to the chunks and
download, resume, take what they lost from the broker's retained copies by subscribing to the
missing chunks' topics, ask the fleet only for what the broker does not hold, and finish."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from fleetlite.agent.ota_download import (
    DONE,
    DUPLICATE,
    NEW,
    REQUEST,
    RESUBSCRIBE,
    ChunkStore,
    DownloadTracker,
)
from fleetlite.fleet.ota_publisher import PublishError, ReleasePublisher
from fleetlite.fleet.release_builder import build_release
from fleetlite.sdk import topics
from fleetlite.sdk.bundle import ReleaseBundle
from fleetlite.sdk.chunks import ChunkError, ChunkLayout, expand_ranges
from fleetlite.sdk.keys import SigningKey
from fleetlite.sdk.ota_messages import ChunkRequest
from fleetlite.sdk.trust import Root, new_root
from fleetlite.sdk.verify import verify_release
from tests.mqtt_harness import Collector, Mosquitto, retained_under

ROOT_KEY = SigningKey.from_seed(b"\x01" * 32)
RELEASE_KEY = SigningKey.from_seed(b"\x0b" * 32)
NOW = 1_764_201_600
CS = 1024
DEVICE_CLASS = "raspberry-pi-4"


def trusted_root() -> Root:
    return new_root([ROOT_KEY.public_key], [RELEASE_KEY.public_key], expires=NOW + 10**8)


@pytest.fixture(scope="module")
def bundle(models_dir: Path) -> ReleaseBundle:
    return build_release([models_dir / "intent_classifier.tflite"], name="intent", version=2,
                         device_classes=[DEVICE_CLASS], issued=NOW,
                         vocab=models_dir / "intent_classifier.vocab.json", keys=[RELEASE_KEY])


def layout_of(bundle: ReleaseBundle, chunk_size: int = CS) -> ChunkLayout:
    return ChunkLayout.from_manifest(bundle.manifest, chunk_size)


@pytest.fixture
def publisher(broker: Mosquitto) -> Iterator[ReleasePublisher]:
    with ReleasePublisher(broker.host, broker.port, client_id="fleet-ota", dedupe_s=0.2) as pub:
        yield pub


class Device:
    """A device's download as the OTA state machine will drive it: verify the retained
    manifest, open the chunk store, write frames, request what is missing, finalize."""

    def __init__(self, broker: Mosquitto, device_id: str, release_id: str, staging: Path, *,
                 chunk_size: int = CS, idle_s: float = 2.0, first_request_s: float = 10.0,
                 accept_limit: int | None = None, track: bool = True,
                 drop_first: Callable[[int, int], bool] | None = None) -> None:
        self.broker = broker
        self.device_id = device_id
        self.release_id = release_id
        self.staging = staging
        self.chunk_size = chunk_size
        self.idle_s = idle_s
        # long by default: these tests wait for the broker's retained chunks, however loaded
        # the machine; the tests of the request path make it short
        self.first_request_s = first_request_s
        self.accept_limit = accept_limit
        self.track = track
        # chunks whose first delivery this device "misses", as when the broker drops messages
        # for a client whose queue is full
        self.drop_first = drop_first
        self.dropped: list[tuple[int, int]] = []
        self.rounds: list[tuple[tuple[int, int], ...]] = []
        self.round_topics: list[str] = []
        self.manifest_topic = topics.release_topic(release_id, topics.RELEASE_MANIFEST)
        self.chunks_topic = topics.chunks_filter(release_id, chunk_size)
        self.store: ChunkStore | None = None
        self.accepted = 0
        self.early_frames = 0
        self.requests: list[ChunkRequest] = []
        self.paths: dict[str, Path] = {}
        self.errors: list[str] = []
        self.outcome = ""
        self.store_ready = threading.Event()
        self.finished = threading.Event()
        self._stop = threading.Event()
        self._client: Any = None
        self._thread: threading.Thread | None = None

    def start(self) -> Device:
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.device_id)
        subscribed = threading.Event()

        def on_connect(c: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
            c.subscribe(self.manifest_topic, 1)
            if self.store is not None:
                c.subscribe(self.chunks_topic, 1)

        def on_subscribe(c: Any, userdata: Any, mid: Any, rcs: Any, props: Any) -> None:
            subscribed.set()

        client.on_connect = on_connect
        client.on_subscribe = on_subscribe
        client.on_message = self._on_message
        client.connect(self.broker.host, self.broker.port)
        client.loop_start()
        self._client = client
        assert subscribed.wait(10), "device could not subscribe"
        if self.track:
            self._thread = threading.Thread(target=self._track, daemon=True)
            self._thread.start()
        return self

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        try:
            payload = bytes(message.payload)
            if message.topic == self.manifest_topic:
                if payload and self.store is None:
                    manifest = verify_release(payload, root=trusted_root(), installed_version=1,
                                              device_class=DEVICE_CLASS, time_floor=NOW)
                    assert manifest.release_id == self.release_id
                    self.store = ChunkStore(self.staging, manifest, self.chunk_size)
                    # the chunks only now: the broker delivers every retained one at once
                    client.subscribe(self.chunks_topic, 1)
                    self.store_ready.set()
            elif self.store is None:
                self.early_frames += 1
            elif self.accept_limit is not None and self.accepted >= self.accept_limit:
                return  # this "agent" is dead: frames go nowhere
            elif self._dropped(payload):
                return
            elif self.store.accept(payload) == NEW:
                self.accepted += 1
        except Exception as exc:  # record, never kill paho's thread
            self.errors.append(repr(exc))

    def _dropped(self, frame: bytes) -> bool:
        assert self.store is not None
        if self.drop_first is None:
            return False
        try:
            chunk = self.store.layout.decode(frame)
        except ChunkError:
            return False
        key = (chunk.file_index, chunk.index)
        if key in self.dropped or not self.drop_first(*key):
            return False
        self.dropped.append(key)
        return True

    def _end_round(self) -> None:
        if self.round_topics:
            self._client.unsubscribe(self.round_topics)
            self.round_topics = []

    def _track(self) -> None:
        try:
            if not self.store_ready.wait(10):
                self.outcome = "no_manifest"
                return
            store = self.store
            assert store is not None
            tracker = DownloadTracker(idle_s=self.idle_s, max_requests_without_progress=5,
                                      deadline_s=30.0, first_request_s=self.first_request_s)
            while not self._stop.is_set():
                decision = tracker.poll(store.received_chunks, complete=store.complete(),
                                        batch_done=store.request_satisfied,
                                        missing=store.missing_chunks)
                if decision.action == RESUBSCRIBE:
                    self._end_round()
                    self.rounds.append(decision.chunks)
                    store.expect(decision.chunks)
                    self.round_topics = [topics.chunk_topic(self.release_id, self.chunk_size,
                                                            f, i) for f, i in decision.chunks]
                    # one SUBSCRIBE naming every topic of the round
                    self._client.subscribe([(topic, 1) for topic in self.round_topics])
                elif decision.action == REQUEST:
                    self._end_round()
                    request = store.missing_request(self.device_id)
                    if request is not None:
                        self._send(request)
                elif decision.action == DONE:
                    self._end_round()
                    self.paths = store.finalize()
                    self._send(store.done_request(self.device_id))
                    self.outcome = "done"
                    return
                elif decision.action != "wait":
                    self.outcome = decision.reason
                    return
                self._stop.wait(min(decision.wait_s, 0.02) or 0.005)
        except Exception as exc:
            self.errors.append(repr(exc))
            self.outcome = "error"
        finally:
            self.finished.set()

    def _send(self, request: ChunkRequest) -> None:
        self.requests.append(request)
        topic = topics.device_topic(self.device_id, topics.OTA_REQUEST)
        self._client.publish(topic, request.to_json(), qos=1).wait_for_publish(5)

    @property
    def requested_chunks(self) -> list[tuple[int, int]]:
        return [key for r in self.requests for key in expand_ranges(r.missing)]

    def wait_done(self, timeout: float = 15.0) -> None:
        assert self.finished.wait(timeout), f"{self.device_id} did not finish"
        assert self.outcome == "done", (self.outcome, self.errors)
        assert not self.errors, self.errors

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        if self._client is not None:
            self._client.disconnect()
            self._client.loop_stop()
            self._client = None
        if self.store is not None:
            self.store.close()


@contextlib.contextmanager
def devices(*items: Device) -> Iterator[tuple[Device, ...]]:
    try:
        yield tuple(d.start() for d in items)
    finally:
        for device in items:
            device.stop()


CHUNKS = f"{topics.RELEASE_PREFIX}/+/{topics.RELEASE_CHUNKS}/+/+/+/+"


def chunk_counter(broker: Mosquitto, release_id: str) -> Collector:
    """An independent subscriber that counts every frame on the release's chunk topics."""
    return Collector(broker.host, broker.port, [topics.chunks_filter(release_id, CS)],
                     client_id="chunk-counter").start()


def wait_for_stats(publisher: ReleasePublisher, predicate: Callable[[dict[str, Any]], bool],
                   timeout: float = 5.0) -> dict[str, Any]:
    """The publisher's stats once ``predicate`` holds (requests are handled asynchronously)."""
    deadline = time.monotonic() + timeout
    while True:
        stats = publisher.stats()
        if predicate(stats):
            return stats
        assert time.monotonic() < deadline, stats
        time.sleep(0.02)


def assert_files_match(device: Device, bundle: ReleaseBundle) -> None:
    assert {n: p.read_bytes() for n, p in device.paths.items()} == dict(bundle.files)


# --- tests ------------------------------------------------------------------------------------


def test_a_device_downloads_a_real_release(broker: Mosquitto, publisher: ReleasePublisher,
                                           bundle: ReleaseBundle, tmp_path: Path) -> None:
    total = layout_of(bundle).total_chunks
    assert total > 20
    with devices(Device(broker, "gw-1", bundle.release_id, tmp_path / "gw-1")) as (gw,):
        assert publisher.serve(bundle, CS) == total
        gw.wait_done()
        assert_files_match(gw, bundle)
        stats = wait_for_stats(publisher, lambda s: s["releases"][bundle.release_id][
            "done_devices"] == ["gw-1"])
    assert stats["chunks_published"] == total and stats["requests_malformed"] == 0
    assert gw.requested_chunks == [] and gw.early_frames == 0  # the broker delivered it all


def test_three_devices_share_one_publish_per_chunk(broker: Mosquitto, bundle: ReleaseBundle,
                                                   tmp_path: Path) -> None:
    total = layout_of(bundle).total_chunks
    counter = chunk_counter(broker, bundle.release_id)
    names = ["gw-a", "gw-b", "gw-c"]
    try:
        with ReleasePublisher(broker.host, broker.port, dedupe_s=5.0) as publisher, \
                devices(*(Device(broker, n, bundle.release_id, tmp_path / n) for n in names)) \
                as fleet:
            publisher.serve(bundle, CS)
            for device in fleet:
                device.wait_done()
                assert_files_match(device, bundle)
                assert device.early_frames == 0 and device.requested_chunks == []
            stats = wait_for_stats(publisher, lambda s: len(
                s["releases"][bundle.release_id]["done_devices"]) == 3)
        # fan-out: every chunk crossed the fleet's connection once, for all three devices
        assert stats["chunks_published"] == total
        release = stats["releases"][bundle.release_id]
        assert release["initial_published"] == total and release["resent_total"] == 0
        counter.wait_for(CHUNKS, count=total)
        assert len(counter.on_topic(CHUNKS)) == total
        assert release["requests"] == 3 and release["done_devices"] == names  # only "done"
    finally:
        counter.stop()


def test_a_device_that_comes_later_gets_the_release_from_the_broker(
        broker: Mosquitto, publisher: ReleasePublisher, bundle: ReleaseBundle,
        tmp_path: Path) -> None:
    """A later wave, a device that was offline: the broker holds every chunk retained, so the
    fleet publishes nothing more, even with the release publisher gone."""
    total = layout_of(bundle).total_chunks
    publisher.serve(bundle, CS)  # nobody listens yet
    publisher.close()
    counter = chunk_counter(broker, bundle.release_id)
    try:
        counter.wait_for(CHUNKS, count=total)  # retained copies, to a new subscriber
        with devices(Device(broker, "gw-late", bundle.release_id, tmp_path / "late")) as (late,):
            late.wait_done()
            assert_files_match(late, bundle)
            assert late.requested_chunks == []
        assert [m.retain for m in counter.on_topic(CHUNKS)] == [True] * total
    finally:
        counter.stop()


def test_a_device_asks_only_for_what_the_broker_does_not_hold(
        broker: Mosquitto, publisher: ReleasePublisher, bundle: ReleaseBundle,
        tmp_path: Path) -> None:
    """Chunks the broker does not hold (a restart without persistence, a release cleared):
    the device's re-subscription round brings nothing, so it asks for exactly those, once,
    and the publisher publishes exactly those."""
    layout = layout_of(bundle)
    contents = [bundle.files[e.name] for e in bundle.manifest.files]
    publisher.serve(bundle, CS, initial_pass=False)  # the broker holds no chunk
    # the device already holds every third chunk of the model and the whole vocabulary
    staging = tmp_path / "gw-late"
    held = set()
    with ChunkStore(staging, bundle.manifest, CS) as seed:
        for file_index, index, frame in layout.frames(contents):
            role = bundle.manifest.files[file_index].role
            if (role == "model" and index % 3 == 0) or role == "vocab":
                assert seed.accept(frame) == NEW
                held.add((file_index, index))
    everything = {(f, i) for f, n in enumerate(layout.counts) for i in range(n)}
    missing = everything - held
    counter = chunk_counter(broker, bundle.release_id)
    try:
        with devices(Device(broker, "gw-late", bundle.release_id, staging, idle_s=0.3,
                            first_request_s=0.3)) as (late,):
            late.wait_done()
            assert_files_match(late, bundle)
            # the broker's retained copies first: one round of the first missing chunks, which
            # brought nothing, then the fleet
            assert late.rounds == [tuple(sorted(missing))[:64]]
            assert set(expand_ranges(late.requests[0].missing)) == missing
            assert sorted(late.requested_chunks) == sorted(missing)  # asked once, no more
        stats = wait_for_stats(publisher, lambda s: s["releases"][bundle.release_id][
            "done_devices"] == ["gw-late"])
        assert stats["releases"][bundle.release_id]["resent"] == {"gw-late": len(missing)}
        counter.wait_for(CHUNKS, count=len(missing))
        time.sleep(0.2)
        assert len(counter.on_topic(CHUNKS)) == len(missing)
    finally:
        counter.stop()


def test_a_device_that_lost_chunks_takes_the_brokers_retained_copies_not_the_fleets(
        broker: Mosquitto, publisher: ReleasePublisher, bundle: ReleaseBundle,
        tmp_path: Path) -> None:
    """The device misses the first delivery of every third chunk (as when Mosquitto drops
    messages for a client whose queue is full): after idle_s it subscribes to those chunks'
    exact topics, the broker re-sends its retained copies to this device alone, and neither a
    chunk request nor a re-publish happens."""
    layout = layout_of(bundle)
    total = layout.total_chunks
    counter = chunk_counter(broker, bundle.release_id)
    try:
        # idle_s is the device's own silence rule, not a test wait: long enough that a round's
        # retained copies come within it on a loaded machine, so the fleet is never asked
        device = Device(broker, "gw-lossy", bundle.release_id, tmp_path / "lossy", idle_s=4.0,
                        drop_first=lambda f, i: i % 3 == 1)
        with devices(device) as (gw,):
            publisher.serve(bundle, CS)
            gw.wait_done(timeout=60)
            assert_files_match(gw, bundle)
            lost = sorted(gw.dropped)
            assert len(lost) >= total // 3 - len(layout.counts)
            # rounds of at most 64, the missing chunks in order, each fetched once
            assert [key for chunks in gw.rounds for key in chunks] == lost
            assert all(len(chunks) <= 64 for chunks in gw.rounds)
            assert gw.requested_chunks == []
            assert [r.done for r in gw.requests] == [True]
            assert gw.accepted == total
        stats = wait_for_stats(publisher, lambda s: s["releases"][bundle.release_id][
            "done_devices"] == ["gw-lossy"])
        release = stats["releases"][bundle.release_id]
        assert stats["chunks_published"] == total
        assert release["resent"] == {} and release["resent_total"] == 0
        assert release["requests"] == 1  # the "done" message only
        counter.wait_for(CHUNKS, count=total)
        # the retained copies went to the lossy device's exact topics only: other subscribers
        # of the release saw each chunk once
        assert len(counter.on_topic(CHUNKS)) == total
    finally:
        counter.stop()


def test_overlapping_subscriptions_and_rounds_bring_duplicates_the_store_ignores(
        broker: Mosquitto, publisher: ReleasePublisher, bundle: ReleaseBundle,
        tmp_path: Path) -> None:
    """While a round's exact topic is subscribed beside the release's wildcard, a chunk the
    fleet re-publishes reaches the device (once per matching subscription where a broker sends
    duplicates; Mosquitto 2.0 sends one), and a round's retained copy can repeat a chunk that
    came meanwhile: every later copy is a duplicate, counted and never written again."""
    layout = layout_of(bundle)
    contents = [bundle.files[e.name] for e in bundle.manifest.files]
    frame = next(f for fi, i, f in layout.frames(contents) if (fi, i) == (0, 2))
    publisher.serve(bundle, CS, initial_pass=False)  # nothing retained: one publish to see
    exact = topics.chunk_topic(bundle.release_id, CS, 0, 2)
    both = Collector(broker.host, broker.port, [topics.chunks_filter(bundle.release_id, CS),
                                                exact], client_id="gw-asker").start()
    try:
        both.publish(topics.device_topic("gw-asker", topics.OTA_REQUEST), ChunkRequest(
            device_id="gw-asker", release_id=bundle.release_id, chunk_size=CS,
            ts=float(NOW), missing=((0, 2, 3),)).to_json(), qos=1)
        both.wait_for(exact, predicate=lambda m: m.payload == frame)
        # the broker queued every copy of the fleet's publish at once: a marker published now
        # on the same topic comes after all of them
        both.publish(exact, b"marker")
        both.wait_for(exact, predicate=lambda m: m.payload == b"marker")
        # a new round on the same topic: the broker re-sends its retained copy
        both._client.subscribe(exact, 1)
        copies = both.wait_for(exact, count=2, predicate=lambda m: m.payload == frame)
        assert copies[-1].retain
        stats = wait_for_stats(publisher, lambda s: s["releases"][bundle.release_id][
            "resent_total"] == 1)
        assert stats["chunks_published"] == 1
        with ChunkStore(tmp_path / "overlap", bundle.manifest, CS) as store:
            outcomes = [store.accept(m.payload) for m in copies]
            assert outcomes == [NEW] + [DUPLICATE] * (len(copies) - 1)
            assert store.duplicates == len(copies) - 1 and store.received_chunks == 1
    finally:
        both.stop()


def test_an_interrupted_download_resumes_after_a_restart(broker: Mosquitto,
                                                         publisher: ReleasePublisher,
                                                         bundle: ReleaseBundle,
                                                         tmp_path: Path) -> None:
    total = layout_of(bundle).total_chunks
    staging = tmp_path / "gw-r"
    # first life: the agent receives 10 chunks, then "dies" (stops taking frames, no requests)
    first = Device(broker, "gw-r", bundle.release_id, staging, accept_limit=10, track=False)
    with devices(first):
        publisher.serve(bundle, CS)
        deadline = time.monotonic() + 5
        while first.accepted < 10:
            assert time.monotonic() < deadline and not first.errors, first.errors
            time.sleep(0.01)
    assert ChunkStore.read_persisted(staging, bundle.manifest, CS) is not None
    # second life: a new store on the same directory takes the rest from the broker
    with devices(Device(broker, "gw-r", bundle.release_id, staging)) as (second,):
        second.wait_done()
        assert_files_match(second, bundle)
        assert second.accepted == total - 10
        assert second.requested_chunks == []
    stats = wait_for_stats(publisher, lambda s: s["releases"][bundle.release_id][
        "done_devices"] == ["gw-r"])
    assert stats["releases"][bundle.release_id]["resent"] == {}
    assert stats["chunks_published"] == total


def test_malformed_requests_are_counted_and_ignored(broker: Mosquitto,
                                                    publisher: ReleasePublisher,
                                                    bundle: ReleaseBundle,
                                                    tmp_path: Path) -> None:
    publisher.serve(bundle, CS, initial_pass=False)
    rid = bundle.release_id
    good = ChunkRequest(device_id="gw-x", release_id=rid, chunk_size=CS, ts=1.0,
                        missing=((0, 0, 1),))

    def req(**change: Any) -> bytes:
        return ChunkRequest(**{**good.__dict__, **change}).to_json()

    hostile = [
        ("gw-x", b"\xff\xfe not json"),
        ("gw-x", b"x" * 100_000),
        ("gw-x", b'{"schema":"fleetlite.chunk_request/9"}'),
        ("gw-x", b"[]"),
        ("gw-y", req()),  # device id differs from the topic's
        ("gw-x", req(chunk_size=2048)),
        ("gw-x", req(missing=((7, 0, 1),))),
        ("gw-x", req(missing=((0, 0, 10_000),))),
        ("gw-x", req(release_id="0" * 64)),  # not served: ignored, counted apart
    ]
    sender = Collector(broker.host, broker.port, ["test/nothing"], client_id="hostile").start()
    try:
        for device_id, payload in hostile:
            sender.publish(topics.device_topic(device_id, topics.OTA_REQUEST), payload)
        sender.publish("fleetlite/v1/dev/gw-x/ota/request/extra", req())  # not subscribed
        sender.publish(topics.device_topic("gw-x", topics.OTA_REQUEST), req())
        wait_for_stats(publisher, lambda s: s["requests_received"] == len(hostile) + 1)
    finally:
        sender.stop()
    publisher.wait_idle(5)
    stats = publisher.stats()
    assert stats["malformed"] == {"malformed": 2, "oversize": 1, "wrong_schema": 1,
                                  "device_mismatch": 1, "wrong_chunk_size": 1,
                                  "bad_range": 1, "bad_value": 1}
    assert stats["requests_unknown_release"] == 1
    # and the valid request after all that was served
    assert stats["releases"][rid]["resent"] == {"gw-x": 1}


def test_stop_serving_clears_the_retained_manifest(broker: Mosquitto,
                                                   publisher: ReleasePublisher,
                                                   bundle: ReleaseBundle) -> None:
    publisher.serve(bundle, CS, initial_pass=False)
    manifest_topic = topics.release_topic(bundle.release_id, topics.RELEASE_MANIFEST)
    seen = Collector(broker.host, broker.port, [manifest_topic], client_id="m1").start()
    try:
        (retained,) = seen.wait_for("/manifest")
        assert retained.retain and retained.payload == bundle.envelope_bytes()
    finally:
        seen.stop()
    assert publisher.stats()["chunks_published"] == 0
    publisher.stop_serving(bundle.release_id)
    assert publisher.serving() == []
    later = Collector(broker.host, broker.port, [manifest_topic], client_id="m2").start()
    try:
        time.sleep(0.3)
        assert later.on_topic("/manifest") == []
    finally:
        later.stop()
    with pytest.raises(ChunkError) as info:
        publisher.serve(bundle, 100)
    assert info.value.code == "bad_chunk_size"


def test_stop_serving_clears_every_retained_chunk(broker: Mosquitto,
                                                 publisher: ReleasePublisher,
                                                 bundle: ReleaseBundle) -> None:
    total = layout_of(bundle).total_chunks
    publisher.serve(bundle, CS)
    held = chunk_counter(broker, bundle.release_id)
    try:
        held.wait_for(CHUNKS, count=total)  # the broker holds the whole release
    finally:
        held.stop()
    publisher.stop_serving(bundle.release_id)
    left = retained_under(broker.host, broker.port,
                          f"{topics.RELEASE_PREFIX}/{bundle.release_id}/#",
                          topics.chunk_topic(bundle.release_id, CS, 9, 9))
    assert left == []


def test_a_release_the_broker_could_not_clear_is_cleared_by_the_next_stop(
        broker: Mosquitto, publisher: ReleasePublisher, bundle: ReleaseBundle) -> None:
    total = layout_of(bundle).total_chunks
    publisher.serve(bundle, CS)
    broker.stop()
    with pytest.raises(PublishError):
        publisher.stop_serving(bundle.release_id, timeout=1)
    assert publisher.serving() == []  # no longer answered, but still owed a clearing
    broker.start()
    wait_for_stats(publisher, lambda s: s["connected"], timeout=30)
    clears = Collector(broker.host, broker.port, [CHUNKS], client_id="clears").start()
    try:
        publisher.stop_serving(bundle.release_id)  # nothing says which chunks: it remembers
        clears.wait_for(CHUNKS, count=total)
        assert {m.payload for m in clears.on_topic(CHUNKS)} == {b""}
    finally:
        clears.stop()


def test_serving_needs_a_broker(tmp_path: Path) -> None:
    from tests.mqtt_harness import free_port

    with pytest.raises(PublishError, match="cannot connect"):
        ReleasePublisher("127.0.0.1", free_port()).start(timeout=0.5)


def test_manifest_is_retained_again_after_a_broker_restart(broker: Mosquitto,
                                                          publisher: ReleasePublisher,
                                                          bundle: ReleaseBundle) -> None:
    """A broker without persistence forgets retained messages; the publisher re-publishes
    the manifests it serves when it reconnects."""
    publisher.serve(bundle, CS, initial_pass=False)
    broker.restart()
    wait_for_stats(publisher, lambda s: s["connects"] == 2, timeout=10)
    manifest_topic = topics.release_topic(bundle.release_id, topics.RELEASE_MANIFEST)
    deadline = time.monotonic() + 5
    while True:  # a fresh subscriber each time: only a retained message reaches it
        seen = Collector(broker.host, broker.port, [manifest_topic], client_id="m3").start()
        try:
            time.sleep(0.1)
            found = seen.on_topic("/manifest")
        finally:
            seen.stop()
        # a live copy (retain false) means the republish came while this one was subscribed:
        # the next fresh subscriber tells whether it was retained
        if found and found[0].retain:
            assert found[0].payload == bundle.envelope_bytes()
            return
        assert time.monotonic() < deadline, "the manifest was not retained again"
