"""The OTA inbox between the agent's network thread and its OTA worker: it holds the whole answer
to the device's own chunk request while the worker is busy (a persist fsyncs, the disk pauses),
and caps what it holds in bytes. Before, it held 256 frames: a request of 1,024 chunks delivered
during one fsync overflowed it, and every dropped chunk cost a chunk-idle wait (5 s) before it was
asked for again (tools/bench/bench_ota_transfer.py showed downloads of 8 s instead of 1 s). While
a download runs, a frame that does not fit waits for room (the broker hands over a release's
retained chunks all at once), so such a burst loses nothing."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleetlite.agent.ota import (
    CHUNK_BUFFER_BYTES,
    REQUEST_WINDOW_BYTES,
    request_window,
)
from fleetlite.sdk.chunks import MAX_CHUNK_SIZE, MAX_REQUEST_CHUNKS, MIN_CHUNK_SIZE
from tests.test_ota_install import Device

HEADER = 19  # a chunk frame's header


@pytest.fixture
def device(tmp_path: Path, models_dir: Path) -> Iterator[Device]:
    d = Device(tmp_path, models_dir)  # its worker waits for a job: nothing drains the inbox
    yield d
    d.close()


@pytest.mark.parametrize("chunk_size", [MIN_CHUNK_SIZE, 4096, 16384, 65536, MAX_CHUNK_SIZE])
def test_a_request_asks_for_no_more_than_the_window(chunk_size: int) -> None:
    window = request_window(chunk_size)
    assert 1 <= window <= MAX_REQUEST_CHUNKS
    assert window * (chunk_size + HEADER) <= REQUEST_WINDOW_BYTES <= CHUNK_BUFFER_BYTES // 2


@pytest.mark.parametrize("chunk_size", [4096, MAX_CHUNK_SIZE])
def test_the_inbox_holds_a_whole_request_then_drops_and_counts(device: Device,
                                                               chunk_size: int) -> None:
    ota = device.ota
    frame = bytes(chunk_size + HEADER)
    for _ in range(request_window(chunk_size)):
        ota.on_message("chunk", frame)
    assert ota.stats()["chunks_dropped"] == 0
    offered = request_window(chunk_size)
    while ota.stats()["chunks_dropped"] == 0 and offered < 100_000:
        ota.on_message("chunk", frame)
        offered += 1
    assert ota.stats()["chunks_dropped"] == 1
    held = ota._inbox.qsize()
    assert held * len(frame) <= CHUNK_BUFFER_BYTES
    ota.on_message("manifest", b"{}")  # a small message still gets in
    # the worker's side gives the room back
    kinds = []
    with pytest.raises(queue.Empty):
        while True:
            kinds.append(ota._next_message(0.01)[0])
    assert kinds == ["chunk"] * held + ["manifest"]
    assert ota._inbox_bytes == 0
    ota.on_message("chunk", frame)
    assert ota.stats()["chunks_dropped"] == 1


def test_while_downloading_a_burst_waits_for_room_instead_of_dropping(device: Device) -> None:
    """The broker hands a device every retained chunk of a release at once: more than the
    buffer. The network thread waits for the worker to make room (TCP holds the rest back), so
    nothing is dropped and asked for again."""
    ota = device.ota
    frame = bytes(65536 + HEADER)
    count = 3 * CHUNK_BUFFER_BYTES // len(frame)
    ota._take_chunks(True)
    network = threading.Thread(target=lambda: [ota.on_message("chunk", frame)
                                               for _ in range(count)])
    network.start()
    taken = 0
    try:
        while taken < count:
            ota._next_message(30)
            taken += 1
    finally:
        ota._take_chunks(False)
        network.join(30)
    assert not network.is_alive()
    assert ota.stats()["chunks_dropped"] == 0
    assert ota._inbox_bytes == 0


def test_a_frame_waiting_for_room_is_dropped_when_the_download_ends(device: Device) -> None:
    ota = device.ota
    frame = bytes(MAX_CHUNK_SIZE + HEADER)
    ota._take_chunks(True)
    held = 0
    while ota._has_room(len(frame) + 64):
        ota.on_message("chunk", frame)
        held += 1
    waiting = threading.Thread(target=ota.on_message, args=("chunk", frame))
    waiting.start()
    waiting.join(0.2)
    assert waiting.is_alive()  # the network thread waits for the worker
    ota._take_chunks(False)  # the download ended: nothing will make room
    waiting.join(30)
    assert not waiting.is_alive()
    assert ota.stats()["chunks_dropped"] == 1
    assert ota._inbox.qsize() == held
