"""The fleet end of chunked release delivery: publish a release once for every device, then
answer the devices' requests for the chunks they missed.

For each served release a :class:`ReleasePublisher` publishes the signed envelope RETAINED on
``fleetlite/v1/rel/{id}/manifest`` and every chunk frame once, RETAINED on its own topic
``.../chunks/{chunk_size}/{block}/{file_index}/{index}``: the broker holds the release, and a
device that subscribes to ``.../chunks/{chunk_size}/{block}/+/+`` (two blocks at a time) gets every
chunk from the broker however late it comes (a later wave, a retry, a controller that is stopped
meanwhile), so the fleet publishes each chunk once per release. Chunks that devices ask for on
``fleetlite/v1/dev/+/ota/request`` (the broker dropped them from a full client queue, or lost its
retained messages in a restart without persistence) are published again, retained; a chunk that is
already queued, or went out less than ``dedupe_s`` (10 s) ago, is not sent again, so many devices
asking for the same chunk cost one publish (each goes to every device downloading the release: on a
broker too busy to deliver the retained chunks quickly, re-publishing them would only multiply its
work). :meth:`ReleasePublisher.stop_serving` clears the manifest and every chunk from the broker.

Threads: paho's network thread only hands incoming requests to a bounded queue; one worker thread
parses requests and publishes chunks with at most ``max_inflight`` unacknowledged QoS 1 messages.
No lock of ours is held around a paho call or inside a paho callback.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import queue
import secrets
import ssl
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from fleetlite.fleet.errors import PublishError
from fleetlite.sdk import topics
from fleetlite.sdk.bundle import ReleaseBundle
from fleetlite.sdk.chunks import ChunkError, ChunkLayout, check_chunk_size, expand_ranges
from fleetlite.sdk.messages import MessageError
from fleetlite.sdk.ota_messages import MAX_CHUNK_REQUEST_BYTES, ChunkRequest

__all__ = ["PublishError", "ReleasePublisher"]

log = logging.getLogger("fleetlite.fleet.ota_publisher")

# Reasons a request is counted as malformed, besides the MessageError codes.
BAD_TOPIC = "bad_topic"
DEVICE_MISMATCH = "device_mismatch"
WRONG_CHUNK_SIZE = "wrong_chunk_size"

_WAKE = "\0wake"  # not a valid topic: an inbox entry that only wakes the worker


@dataclass
class _Release:
    """Serving state of one release (guarded by the publisher's lock)."""

    bundle: ReleaseBundle
    layout: ChunkLayout
    contents: tuple[bytes, ...]
    manifest_topic: str
    last_sent: dict[tuple[int, int], float] = field(default_factory=dict)
    pending: set[tuple[int, int]] = field(default_factory=set)
    initial_published: int = 0
    resent: Counter[str] = field(default_factory=Counter)
    requests: int = 0
    deduped: int = 0
    done_devices: set[str] = field(default_factory=set)

    def snapshot(self) -> dict[str, Any]:
        return {
            "chunks": self.layout.total_chunks,
            "chunk_size": self.layout.chunk_size,
            "bytes": self.layout.total_bytes,
            "initial_published": self.initial_published,
            "resent": dict(self.resent),
            "resent_total": sum(self.resent.values()),
            "requests": self.requests,
            "deduped": self.deduped,
            "queued": len(self.pending),
            "done_devices": sorted(self.done_devices),
        }


@dataclass(frozen=True)
class _Send:
    release_id: str
    file_index: int
    index: int
    device_id: str | None  # None: the initial pass


class ReleasePublisher:
    """Serves releases over MQTT: retained manifest, fan-out chunks, re-sends on request.

    Use as a context manager (or :meth:`start` / :meth:`close`). ``tls`` is an
    :class:`ssl.SSLContext` holding the fleet's client certificate for a TLS listener.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        tls: ssl.SSLContext | None = None,
        client_id: str | None = None,
        username: str | None = None,
        password: str | None = None,
        keepalive: int = 30,
        max_inflight: int = 32,
        dedupe_s: float = 10.0,
        publish_timeout_s: float = 10.0,
        max_queued_requests: int = 1024,
    ) -> None:
        self.host = host
        self.port = port
        self.max_inflight = max(1, max_inflight)
        self.dedupe_s = dedupe_s
        self.publish_timeout_s = publish_timeout_s
        self.client_id = client_id or f"fleetlite-ota-{os.getpid()}-{secrets.token_hex(3)}"
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id,
                             clean_session=True)
        if tls is not None:
            client.tls_set_context(tls)
        if username is not None:
            client.username_pw_set(username, password)
        client.max_inflight_messages_set(self.max_inflight)
        client.reconnect_delay_set(1, 30)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        self._client = client
        self._keepalive = keepalive
        self._connected = threading.Event()
        self._stopping = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self._republish = threading.Event()
        self._inbox: queue.Queue[tuple[str, bytes]] = queue.Queue(maxsize=max_queued_requests)
        self._lock = threading.Lock()
        self._releases: dict[str, _Release] = {}
        self._uncleared: dict[str, ChunkLayout] = {}  # stopped, not yet cleared from the broker
        self._sends: collections.deque[_Send] = collections.deque()
        self._window: collections.deque[tuple[mqtt.MQTTMessageInfo, _Send]] = (
            collections.deque())
        self._worker: threading.Thread | None = None
        self._request_topic = topics.fleet_subscription(topics.OTA_REQUEST)
        self._counters: Counter[str] = Counter()
        self._malformed: Counter[str] = Counter()
        # written only by paho's network thread
        self._dropped = 0
        self._connects = 0

    # -- lifetime ----------------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> ReleasePublisher:
        """Connect (retrying in the background) and start the worker; wait for the first
        connection up to ``timeout`` seconds."""
        self._client.connect_async(self.host, self.port, keepalive=self._keepalive)
        self._client.loop_start()
        self._worker = threading.Thread(target=self._run, name="fleetlite-ota-publisher",
                                        daemon=True)
        self._worker.start()
        if not self._connected.wait(timeout):
            self.close()
            raise PublishError(f"cannot connect to the MQTT broker at {self.host}:{self.port} "
                               f"within {timeout} s; check the address, TLS and credentials")
        return self

    def close(self) -> None:
        """Stop the worker and disconnect (retained manifests stay: see :meth:`stop_serving`)."""
        self._stopping.set()
        self._wake()
        if self._worker is not None:
            self._worker.join(10)
            self._worker = None
        self._client.disconnect()
        self._client.loop_stop()

    def __enter__(self) -> ReleasePublisher:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- serving -----------------------------------------------------------------------------

    def serve(self, bundle: ReleaseBundle, chunk_size: int, *, initial_pass: bool = True,
              wait: bool = True, timeout: float = 300.0) -> int:
        """Serve ``bundle`` with chunks of ``chunk_size`` bytes: publish its envelope retained,
        queue every chunk once, retained (``initial_pass``; devices rely on it: they ask only
        for what has not come once they subscribed) and answer requests from now on.

        With ``wait`` it returns once everything queued was acknowledged by the broker. Returns
        the number of chunks queued for the initial pass (chunks already queued or sent within
        the dedupe window are skipped). Serving a served release again re-publishes its
        manifest; its chunk size cannot change while it is served.
        """
        check_chunk_size(chunk_size)
        release_id = topics.validate_release_id(bundle.release_id)
        layout = ChunkLayout.from_manifest(bundle.manifest, chunk_size)
        contents = tuple(bundle.files[entry.name] for entry in bundle.manifest.files)
        for entry, content in zip(bundle.manifest.files, contents):
            if len(content) != entry.length:
                raise PublishError(f"{entry.name}: the bundle holds {len(content)} bytes, the "
                                   f"manifest signs {entry.length}; rebuild the bundle")
        with self._lock:
            release = self._releases.get(release_id)
            if release is not None and release.layout.chunk_size != chunk_size:
                raise PublishError(f"release {release_id[:12]} is served with chunks of "
                                   f"{release.layout.chunk_size} bytes; stop serving it first")
            if release is None:
                release = _Release(
                    bundle=bundle, layout=layout, contents=contents,
                    manifest_topic=topics.release_topic(release_id, topics.RELEASE_MANIFEST))
                self._releases[release_id] = release
        self._publish_and_wait(release.manifest_topic, bundle.envelope_bytes(), retain=True)
        queued = 0
        if initial_pass:
            now = time.monotonic()
            with self._lock:
                for file_index, count in enumerate(layout.counts):
                    for index in range(count):
                        if self._queue_locked(release, release_id, (file_index, index), None,
                                              now):
                            queued += 1
        self._wake()
        if wait and not self.wait_idle(timeout):
            raise PublishError(f"release {release_id[:12]}: chunks still unacknowledged after "
                               f"{timeout} s; is the broker overloaded?")
        return queued

    def stop_serving(self, release_id: str, *, layout: ChunkLayout | None = None,
                     timeout: float = 30.0) -> None:
        """Stop answering requests for a release, drop its queued chunks and clear it from the
        broker: an empty retained message on its manifest, so devices that come later do not
        start it, and on every chunk topic (of the layout it is served with, else ``layout``:
        a release served by another controller or before a restart), so the broker does not
        hold its bytes for ever. When the broker does not acknowledge it all, it raises
        :class:`PublishError`; calling it again finishes the job."""
        with self._lock:
            release = self._releases.pop(release_id, None)
            self._sends = collections.deque(s for s in self._sends
                                            if s.release_id != release_id)
            if release is not None:
                layout = release.layout
            layout = self._uncleared.pop(release_id, layout)
        try:
            self._publish_and_wait(topics.release_topic(release_id, topics.RELEASE_MANIFEST),
                                   b"", retain=True, timeout=timeout)
            if layout is not None:
                self._clear_chunks(release_id, layout, timeout)
        except PublishError:
            if layout is not None:
                with self._lock:
                    self._uncleared[release_id] = layout
            raise
        self._wake()

    def _clear_chunks(self, release_id: str, layout: ChunkLayout, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        size = layout.chunk_size
        infos = [self._client.publish(topics.chunk_topic(release_id, size, file_index, index), b"",
                                      qos=1, retain=True)
                 for file_index, count in enumerate(layout.counts) for index in range(count)]
        for info in infos:
            with contextlib.suppress(RuntimeError, ValueError):
                info.wait_for_publish(max(0.0, deadline - time.monotonic()))
            if not _acknowledged(info):
                raise PublishError(f"release {release_id[:12]}: the broker did not acknowledge "
                                   f"clearing its {len(infos)} chunks within {timeout} s; is it "
                                   "overloaded? Stopping the release again clears them")

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until no chunk is queued or unacknowledged; False on timeout."""
        return self._idle.wait(timeout)

    def serving(self) -> list[str]:
        with self._lock:
            return list(self._releases)

    def stats(self) -> dict[str, Any]:
        """Counters: publishes, requests (received, malformed by reason, unknown release,
        dropped), and per release: initial publishes, re-sends per device, dedupes, done
        devices."""
        with self._lock:
            releases = {rid: r.snapshot() for rid, r in self._releases.items()}
            counters = dict(self._counters)
            malformed = dict(self._malformed)
        return {
            "connected": self._connected.is_set(),
            "connects": self._connects,
            "chunks_published": counters.get("chunks_published", 0),
            "requests_received": counters.get("requests_received", 0),
            "requests_malformed": sum(malformed.values()),
            "malformed": malformed,
            "requests_unknown_release": counters.get("requests_unknown_release", 0),
            "requests_dropped": self._dropped,
            "publish_timeouts": counters.get("publish_timeouts", 0),
            "releases": releases,
        }

    # -- internals: queueing -----------------------------------------------------------------

    def _queue_locked(self, release: _Release, release_id: str, key: tuple[int, int],
                      device_id: str | None, now: float) -> bool:
        if key in release.pending:
            return False
        sent = release.last_sent.get(key)
        if sent is not None and now - sent < self.dedupe_s:
            return False
        release.pending.add(key)
        self._sends.append(_Send(release_id, key[0], key[1], device_id))
        self._idle.clear()
        return True

    def _wake(self) -> None:
        with contextlib.suppress(queue.Full):
            self._inbox.put_nowait((_WAKE, b""))

    def _publish_and_wait(self, topic: str, payload: bytes, *, retain: bool,
                          timeout: float | None = None) -> None:
        timeout = self.publish_timeout_s if timeout is None else timeout
        if not self._connected.wait(timeout):
            raise PublishError(f"not connected to the MQTT broker at {self.host}:{self.port}; "
                               "it retries in the background, try again later")
        info = self._client.publish(topic, payload, qos=1, retain=retain)
        try:
            info.wait_for_publish(timeout)
        except (RuntimeError, ValueError) as exc:
            raise PublishError(f"publishing to {topic} failed: {exc}") from exc
        if not info.is_published():
            raise PublishError(f"the broker did not acknowledge {topic} within {timeout} s")

    # -- internals: paho callbacks (network thread; no locks of ours) ------------------------

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any,
                    properties: Any) -> None:
        if reason.is_failure:
            log.warning("broker refused the connection: %s", reason)
            return
        client.subscribe(self._request_topic, qos=1)
        self._connects += 1
        self._connected.set()
        if self._connects > 1:  # the first connection comes before any release is served
            self._republish.set()
            self._wake()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any,
                       properties: Any) -> None:
        self._connected.clear()
        if not self._stopping.is_set():
            log.warning("disconnected from the broker (%s); reconnecting", reason)

    def _on_message(self, client: mqtt.Client, userdata: Any, message: Any) -> None:
        # one byte over the cap is enough for the size check to refuse it
        payload = bytes(message.payload[:MAX_CHUNK_REQUEST_BYTES + 1])
        try:
            self._inbox.put_nowait((str(message.topic), payload))
        except queue.Full:
            self._dropped += 1

    # -- internals: the worker ---------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                self._step()
            except Exception:  # the worker must outlive any bug in one step
                log.exception("OTA publisher step failed")
                time.sleep(0.1)

    def _step(self) -> None:
        if self._republish.is_set():
            self._republish.clear()
            self._republish_manifests()
        for _ in range(256):
            try:
                topic, payload = self._inbox.get_nowait()
            except queue.Empty:
                break
            self._handle_inbox(topic, payload)
        send = self._next_send()
        if send is not None:
            self._send(send)
            return
        self._reap(block=False)
        with self._lock:
            if not self._sends and not self._window:
                self._idle.set()
        try:
            topic, payload = self._inbox.get(timeout=0.05 if self._window else 0.5)
        except queue.Empty:
            return
        self._handle_inbox(topic, payload)

    def _handle_inbox(self, topic: str, payload: bytes) -> None:
        if topic != _WAKE:
            self._handle_request(topic, payload)

    def _republish_manifests(self) -> None:
        """A broker restarted without persistence loses retained messages: publish them again."""
        # under the lock: a release stopped meanwhile must not have its cleared manifest put
        # back (stop_serving's clear is queued after this publish, or the release is gone)
        with self._lock:
            for release in self._releases.values():
                self._client.publish(release.manifest_topic, release.bundle.envelope_bytes(),
                                     qos=1, retain=True)

    def _handle_request(self, topic: str, payload: bytes) -> None:
        with self._lock:
            self._counters["requests_received"] += 1
        try:
            parsed = topics.parse_device_topic(topic)
            if parsed.kind != topics.OTA_REQUEST:
                raise topics.TopicError(f"{topic!r} is not a request topic")
        except topics.TopicError:
            self._malformed_request(BAD_TOPIC, topic)
            return
        try:
            request = ChunkRequest.from_json(payload)
        except MessageError as exc:
            self._malformed_request(exc.code, topic)
            return
        if request.device_id != parsed.device_id:
            self._malformed_request(DEVICE_MISMATCH, topic)
            return
        now = time.monotonic()
        with self._lock:
            release = self._releases.get(request.release_id)
            if release is None:
                self._counters["requests_unknown_release"] += 1
                return
            if request.chunk_size != release.layout.chunk_size:
                self._malformed[WRONG_CHUNK_SIZE] += 1
                return
            try:
                ranges = release.layout.check_ranges(request.missing)
            except ChunkError as exc:
                self._malformed[exc.code] += 1
                return
            release.requests += 1
            if request.done:
                release.done_devices.add(request.device_id)
                return
            for key in expand_ranges(ranges):
                if not self._queue_locked(release, request.release_id, key, request.device_id,
                                          now):
                    release.deduped += 1

    def _malformed_request(self, code: str, topic: str) -> None:
        with self._lock:
            self._malformed[code] += 1
        log.debug("ignored a malformed chunk request on %.120s (%s)", topic, code)

    def _next_send(self) -> _Send | None:
        with self._lock:
            while self._sends:
                send = self._sends.popleft()
                release = self._releases.get(send.release_id)
                if release is not None:
                    return send
        return None

    def _send(self, send: _Send) -> None:
        with self._lock:
            release = self._releases.get(send.release_id)
            if release is None:
                return
            frame = release.layout.frame(send.file_index, send.index,
                                         release.contents[send.file_index])
            chunk_size = release.layout.chunk_size
        topic = topics.chunk_topic(send.release_id, chunk_size, send.file_index, send.index)
        while not self._connected.wait(0.5):
            if self._stopping.is_set():
                return
        info = self._client.publish(topic, frame, qos=1, retain=True)
        key = (send.file_index, send.index)
        with self._lock:
            self._counters["chunks_published"] += 1
            release.pending.discard(key)
            release.last_sent[key] = time.monotonic()
            if send.device_id is None:
                release.initial_published += 1
            else:
                release.resent[send.device_id] += 1
        self._window.append((info, send))
        while len(self._window) >= self.max_inflight and not self._stopping.is_set():
            self._reap(block=True)

    def _reap(self, *, block: bool) -> None:
        """Drop acknowledged messages from the in-flight window; with ``block``, first wait for
        the oldest one. A message unacknowledged for ``publish_timeout_s`` is given up on here
        (paho still delivers it after a reconnect; a device that misses it asks again)."""
        if block and self._window:
            info = self._window[0][0]
            deadline = time.monotonic() + self.publish_timeout_s
            while not _acknowledged(info) and not self._stopping.is_set():
                if time.monotonic() >= deadline:
                    with self._lock:
                        self._counters["publish_timeouts"] += 1
                    break
                with contextlib.suppress(RuntimeError, ValueError):
                    info.wait_for_publish(0.25)
            self._window.popleft()
        while self._window and _acknowledged(self._window[0][0]):
            self._window.popleft()


def _acknowledged(info: mqtt.MQTTMessageInfo) -> bool:
    """``is_published`` that treats a failed publish (not connected, queue full) as final."""
    try:
        return bool(info.is_published())
    except (RuntimeError, ValueError):
        return True
