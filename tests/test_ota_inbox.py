"""The OTA inbox between the agent's network thread and its OTA worker: it holds the whole answer
to the device's own chunk request while the worker is busy (a persist fsyncs, the disk pauses),
and caps what it holds in bytes. Before, it held 256 frames: a request of 1,024 chunks delivered
during one fsync overflowed it, and every dropped chunk cost a chunk-idle wait (5 s) before it was
asked for again (tools/bench/bench_ota_transfer.py showed downloads of 8 s instead of 1 s)."""

from __future__ import annotations

import queue
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
