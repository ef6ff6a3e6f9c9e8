"""A hand-driven release server over a real broker, for OTA tests that need to stop delivery
at a chosen point (the library publisher in fleet/ serves everything at once)."""

from __future__ import annotations

import threading
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from fleetlite.sdk import topics
from fleetlite.sdk.bundle import ReleaseBundle
from fleetlite.sdk.chunks import chunk_count, encode_frame
from fleetlite.sdk.ota_messages import ChunkRequest


class ManualRelease:
    """Publishes one release's manifest and chosen chunks; optionally answers requests."""

    def __init__(self, host: str, port: int, bundle: ReleaseBundle, chunk_size: int) -> None:
        self.bundle = bundle
        self.chunk_size = chunk_size
        self.rid = bundle.release_id
        self.contents = [bundle.files[f.name] for f in bundle.manifest.files]
        self.answer = False
        self.requests: list[ChunkRequest] = []
        self._lock = threading.Lock()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"test-rel-{self.rid[:8]}")
        self.client.on_message = self._on_request
        self.client.connect(host, port)
        self.client.loop_start()
        self.client.subscribe(f"{topics.DEVICE_PREFIX}/+/{topics.OTA_REQUEST}", qos=1)

    def all_chunks(self) -> list[tuple[int, int]]:
        return [(f, i) for f, content in enumerate(self.contents)
                for i in range(chunk_count(len(content), self.chunk_size))]

    def publish_manifest(self) -> None:
        topic = topics.release_topic(self.rid, topics.RELEASE_MANIFEST)
        self.client.publish(topic, self.bundle.envelope.to_json(), qos=1,
                            retain=True).wait_for_publish(10)

    def publish_chunks(self, chunks: list[tuple[int, int]]) -> None:
        infos = []
        for file_index, index in chunks:
            offset = index * self.chunk_size
            data = self.contents[file_index][offset:offset + self.chunk_size]
            topic = topics.chunk_topic(self.rid, self.chunk_size, file_index, index)
            infos.append(self.client.publish(topic,
                                             encode_frame(file_index, offset, data), qos=1,
                                             retain=True))
        for info in infos:
            info.wait_for_publish(10)

    def _on_request(self, client: Any, userdata: Any, message: Any) -> None:
        request = ChunkRequest.from_json(bytes(message.payload))
        with self._lock:
            self.requests.append(request)
            answer = self.answer
        if answer and not request.done:
            wanted = [(f, i) for f, a, b in request.missing for i in range(a, b)]
            threading.Thread(target=self.publish_chunks, args=(wanted,), daemon=True).start()

    def requested(self) -> set[tuple[int, int]]:
        with self._lock:
            return {(f, i) for r in self.requests for f, a, b in r.missing for i in range(a, b)}

    def clear_requests(self) -> None:
        with self._lock:
            self.requests.clear()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
