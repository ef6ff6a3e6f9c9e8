"""An in-process fake fleet for OTA tests: it is both the MQTT link and the release server.

Like python-tuf's RepositorySimulator, it serves whatever release bytes a test gives it —
including hostile ones — to a real :class:`OtaManager` (real files, real model service, real
smoke-test subprocess), and records every status report and chunk request.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from paho.mqtt.client import topic_matches_sub

from fleetlite.sdk import topics
from fleetlite.sdk.chunks import chunk_count, encode_frame
from fleetlite.sdk.messages import Event, OtaStatus
from fleetlite.sdk.ota_messages import ChunkRequest
from fleetlite.sdk.shadow import ShadowReport


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
        self.bytes_sent = 0
        self.events: list[Event] = []
        self.shadow_reports: list[ShadowReport] = []
        self.published: list[tuple[str, bytes]] = []  # every report and live publish, raw
        self._cond = threading.Condition()

    def serve(self, release_id: str, served: Served) -> None:
        self.served[release_id] = served

    # -- link interface ------------------------------------------------------------------

    def subscribe(self, topic: str, handler: Callable[[bytes], None]) -> None:
        self.handlers[topic] = handler
        # as a broker does: the manifest topic brings the retained envelope, a chunk filter
        # (a block's, or an exact chunk topic) every retained chunk it matches, at once
        release_id = topic.split("/")[3]
        served = self.served.get(release_id)
        if served is None:
            return
        if topic == topics.release_topic(release_id, topics.RELEASE_MANIFEST):
            handler(served.envelope)
            return
        for file_index, content in enumerate(served.files):
            for index in range(chunk_count(len(content), served.chunk_size)):
                if (file_index, index) not in served.drop and topic_matches_sub(
                        topic, topics.chunk_topic(release_id, served.chunk_size, file_index,
                                                  index)):
                    self._send(handler, served, file_index, index)
        if topic == topics.block_filter(release_id, served.chunk_size, 0):
            for frame in served.extra_frames:
                handler(frame)

    def subscribe_many(self, names: Sequence[str], handler: Callable[[bytes], None]) -> None:
        for name in names:
            self.subscribe(name, handler)

    def unsubscribe_many(self, names: Sequence[str]) -> None:
        for name in names:
            self.unsubscribe(name)

    def _send(self, handler: Callable[[bytes], None], served: Served, file_index: int,
              index: int) -> None:
        offset = index * served.chunk_size
        data = served.files[file_index][offset:offset + served.chunk_size]
        if data:
            self.frames_sent += 1
            self.bytes_sent += len(data)
            handler(encode_frame(file_index, offset, data))

    def unsubscribe(self, topic: str) -> None:
        self.handlers.pop(topic, None)

    def publish_live(self, topic: str, payload: bytes, *, qos: int = 1,
                     retain: bool = False) -> None:
        self.published.append((topic, bytes(payload)))
        request = ChunkRequest.from_json(payload)
        self.requests.append(request)
        served = self.served.get(request.release_id)
        if served is None or not served.answer_requests or request.done:
            return
        for file_index, first, end in request.missing:
            for index in range(first, end):
                served.drop.discard((file_index, index))
                chunk = topics.chunk_topic(request.release_id, request.chunk_size, file_index,
                                           index)
                # re-published: every matching subscription gets it, as from a broker
                for name, handler in list(self.handlers.items()):
                    if topic_matches_sub(name, chunk):
                        self._send(handler, served, file_index, index)

    def report(self, kind: str, payload: bytes, *, priority: str = "telemetry") -> int:
        self.published.append((kind, bytes(payload)))
        if kind == topics.SHADOW:
            with self._cond:
                self.shadow_reports.append(ShadowReport.from_json(payload))
                self._cond.notify_all()
            return len(self.shadow_reports)
        if kind == topics.EVENTS:
            self.events.append(Event.from_json(payload))
            return len(self.events)
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

