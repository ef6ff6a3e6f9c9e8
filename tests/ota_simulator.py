"""An in-process fake fleet for OTA tests: it is both the MQTT link and the release server.

Like python-tuf's RepositorySimulator, it serves whatever release bytes a test gives it —
including hostile ones — to a real :class:`OtaManager` (real files, real model service, real
smoke-test subprocess), and records every status report and chunk request.

As a broker it holds every chunk of a served release retained but those a test marks ``drop``
(until requested): subscribing delivers the retained messages that match the topic or filter
subscribed (an exact chunk topic brings that one chunk, the chunks filter all of them), also
for a topic already subscribed (as MQTT 3.1.1 says), and a re-published chunk reaches every
subscription that matches its topic.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import paho.mqtt.client as mqtt

from fleetlite.sdk import topics
from fleetlite.sdk.chunks import chunk_count, encode_frame
from fleetlite.sdk.messages import OtaStatus
from fleetlite.sdk.ota_messages import ChunkRequest


@dataclass
class Served:
    """What the simulator answers for one release id (the bytes need not match the manifest)."""

    envelope: bytes
    files: Sequence[bytes]  # in the manifest's file order
    chunk_size: int
    drop: set[tuple[int, int]] = field(default_factory=set)  # never sent at first
    answer_requests: bool = True
    extra_frames: list[bytes] = field(default_factory=list)


class FleetSimulator:
    """Implements the parts of MqttLink that OtaManager uses."""

    def __init__(self) -> None:
        self.served: dict[str, Served] = {}
        self.handlers: dict[str, Callable[[bytes], None]] = {}
        self.statuses: list[OtaStatus] = []
        self.requests: list[ChunkRequest] = []
        self.frames_sent = 0
        #: the topics of every subscribe/subscribe_many call, in order (one list per packet)
        self.subscribe_packets: list[list[str]] = []
        self.unsubscribe_packets: list[list[str]] = []
        self._cond = threading.Condition()

    def serve(self, release_id: str, served: Served) -> None:
        self.served[release_id] = served

    # -- link interface ------------------------------------------------------------------

    def subscribe(self, topic: str, handler: Callable[[bytes], None]) -> None:
        self.subscribe_many([topic], handler)

    def subscribe_many(self, names: Sequence[str], handler: Callable[[bytes], None]) -> None:
        self.subscribe_packets.append(list(names))
        for name in names:
            self.handlers[name] = handler
        for name in names:
            self._deliver_retained(name, handler)

    def _deliver_retained(self, topic: str, handler: Callable[[bytes], None]) -> None:
        """The retained messages matching ``topic`` (a topic or filter), as from a broker."""
        release_id = topic.split("/")[3]
        served = self.served.get(release_id)
        if served is None:
            return
        if topic == topics.release_topic(release_id, topics.RELEASE_MANIFEST):
            handler(served.envelope)
            return
        try:
            parsed = topics.parse_release_topic(topic)
        except topics.TopicError:  # a filter
            parsed = None
        if parsed is not None and parsed.file_index is not None and parsed.index is not None:
            key = (parsed.file_index, parsed.index)
            if parsed.chunk_size == served.chunk_size and key not in served.drop \
                    and key[0] < len(served.files):
                self._send(handler, served, *key)
            return
        for file_index, content in enumerate(served.files):
            for index in range(chunk_count(len(content), served.chunk_size)):
                exact = topics.chunk_topic(release_id, served.chunk_size, file_index, index)
                if (file_index, index) not in served.drop \
                        and mqtt.topic_matches_sub(topic, exact):
                    self._send(handler, served, file_index, index)
        if topic == topics.chunks_filter(release_id, served.chunk_size):
            for frame in served.extra_frames:  # retained on topics no exact name matches
                handler(frame)

    def _send(self, handler: Callable[[bytes], None], served: Served, file_index: int,
              index: int) -> None:
        offset = index * served.chunk_size
        data = served.files[file_index][offset:offset + served.chunk_size]
        if data:
            self.frames_sent += 1
            handler(encode_frame(file_index, offset, data))

    def unsubscribe(self, topic: str) -> None:
        self.unsubscribe_many([topic])

    def unsubscribe_many(self, names: Sequence[str]) -> None:
        self.unsubscribe_packets.append(list(names))
        for name in names:
            self.handlers.pop(name, None)

    def subscribed_chunks(self) -> set[str]:
        """The exact chunk topics subscribed now."""
        return {name for name in self.handlers
                if "/chunks/" in name and "+" not in name and "#" not in name}

    def publish_live(self, topic: str, payload: bytes, *, qos: int = 1,
                     retain: bool = False) -> None:
        request = ChunkRequest.from_json(payload)
        self.requests.append(request)
        served = self.served.get(request.release_id)
        if served is None or not served.answer_requests or request.done:
            return
        for file_index, first, end in request.missing:
            for index in range(first, end):
                served.drop.discard((file_index, index))
                # re-published retained: every matching subscription gets it (once each)
                exact = topics.chunk_topic(request.release_id, served.chunk_size,
                                           file_index, index)
                for name, handler in list(self.handlers.items()):
                    if mqtt.topic_matches_sub(name, exact):
                        self._send(handler, served, file_index, index)

    def report(self, kind: str, payload: bytes, *, priority: str = "telemetry") -> int:
        assert kind == topics.OTA_STATUS
        with self._cond:
            self.statuses.append(OtaStatus.from_json(payload))
            self._cond.notify_all()
        return len(self.statuses)

    # -- test helpers ----------------------------------------------------------------------

    def finals(self) -> list[OtaStatus]:
        with self._cond:
            return [s for s in self.statuses if s.final]

    def wait_final(self, count: int = 1, timeout: float = 60.0) -> OtaStatus:
        deadline = time.monotonic() + timeout
        with self._cond:
            while len([s for s in self.statuses if s.final]) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"no final OTA status; saw {self.statuses}")
                self._cond.wait(remaining)
            return [s for s in self.statuses if s.final][count - 1]

    def requested_chunks(self) -> set[tuple[int, int]]:
        return {(f, i) for r in self.requests for f, a, b in r.missing for i in range(a, b)}

