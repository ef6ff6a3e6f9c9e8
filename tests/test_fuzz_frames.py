"""Fuzzing of the binary frames: OTA chunk frames (and the persisted chunk bitmap) checked
against the signed file lengths, and the local API's socket frames read through a real socket
pair with :func:`recv_frame` then :func:`decode_tensors`. Every input is accepted or refused with
a :class:`ChunkError` / :class:`ProtocolError` code; nothing else escapes, nothing hangs.
"""

from __future__ import annotations

import json
import socket
import struct
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fleetlite.sdk import local_client as wire
from fleetlite.sdk.chunks import (
    BAD_BITMAP,
    FRAME_CODES,
    HEADER,
    MAGIC,
    ChunkBitmap,
    ChunkError,
    ChunkLayout,
    decode_frame,
    encode_frame,
)
from fleetlite.sdk.local_client import ProtocolError, decode_tensors, encode_tensors, recv_frame
from tests.fuzz_settings import (
    corrupted,
    dumps,
    fuzz,
    json_values,
    mutated,
    no_hang,
    parse_or_refuse,
    sweep,
)

# --- OTA chunk frames -------------------------------------------------------------------------

# The layout of docs/protocol.md's chunk frame vector: files of 5000 and 1030 bytes, 1 KiB chunks.
LAYOUT = ChunkLayout((5000, 1030, 0), 1024)
DOC_FRAME = bytes.fromhex("464c4348 01 0001 0000000000000400 00000006 666c65657421"
                          .replace(" ", ""))


def _frame_code(exc: ChunkError) -> None:
    assert exc.code in FRAME_CODES, exc.code


def _decode(frame: bytes) -> None:
    chunk = parse_or_refuse(lambda: decode_frame(frame, LAYOUT), ChunkError, _frame_code)
    if chunk is not None:  # never a byte past the signed length, never a chunk of odd size
        assert chunk.offset + len(chunk.data) <= LAYOUT.lengths[chunk.file_index]
        assert len(chunk.data) == LAYOUT.chunk_length(chunk.file_index, chunk.index)


def test_the_doc_frame_decodes() -> None:
    assert decode_frame(DOC_FRAME, LAYOUT).data == b"fleet!"


@fuzz(500)
@given(frame=st.binary(max_size=64) | corrupted(DOC_FRAME, max_insert=1100)
       | st.builds(lambda magic, version, index, offset, length, body:
                   HEADER.pack(magic, version, index, offset, length) + body,
                   st.sampled_from([MAGIC, b"FLCX", b"\x00" * 4]),
                   st.sampled_from([0, 1, 2, 255]),
                   st.integers(0, 0xFFFF) | st.sampled_from([0, 1, 2, 3]),
                   st.integers(0, 2**64 - 1) | st.sampled_from([0, 1024, 4096, 4999, 5000,
                                                                  2**63, 2**64 - 1024]),
                   st.integers(0, 2**32 - 1) | st.sampled_from([0, 6, 1024, 904, 1025]),
                   st.binary(max_size=1100)))
def test_chunk_frames_decode_or_refuse_with_a_code(frame: bytes) -> None:
    _decode(frame)


@fuzz(100)
@given(data=st.binary(max_size=64) | corrupted(ChunkBitmap(LAYOUT.counts).to_bytes()))
def test_persisted_chunk_bitmaps_load_or_refuse(data: bytes) -> None:
    bitmap = parse_or_refuse(lambda: ChunkBitmap.from_bytes(data, LAYOUT.counts), ChunkError,
                             lambda exc: _assert_code(exc, BAD_BITMAP))
    if bitmap is not None:
        assert bitmap.received <= bitmap.total


def _assert_code(exc: ChunkError, code: str) -> None:
    assert exc.code == code


# --- local API frames -------------------------------------------------------------------------

FRAME_CODES_LOCAL = {wire.BAD_FRAME, wire.FRAME_TOO_LARGE}
TENSOR_CODES = {wire.BAD_TENSOR}
MAX_HEADER = 4096
MAX_PAYLOAD = 64 * 1024


def frame_bytes(header: Any, buffers: Sequence[bytes] = ()) -> bytes:
    encoded = dumps(header).encode("utf-8", "surrogatepass")
    return struct.pack("!I", len(encoded)) + encoded + b"".join(buffers)


def infer_request() -> tuple[dict[str, Any], bytes]:
    descs, buffers = encode_tensors([
        ("tokens", np.arange(16, dtype=np.int32).reshape(1, 16)),
        ("mask", np.array([True, False, True])),
        ("empty", np.zeros((0, 4), dtype=np.float16)),
        (None, np.array(2.5, dtype=np.float64)),
    ])
    return {"v": 1, "id": 7, "op": "infer", "model": "intent", "inputs": descs}, \
        b"".join(bytes(b) for b in buffers)


REQUEST, TENSOR_BYTES = infer_request()
VALID_FRAME = frame_bytes(REQUEST, [TENSOR_BYTES])


def serve_bytes(data: bytes) -> list[tuple[dict[str, Any], bytearray]]:
    """What :func:`recv_frame` reads, frame after frame, from a peer that sends ``data`` and
    closes; refusals raise :class:`ProtocolError` as they would in the agent."""
    server, client = socket.socketpair()
    frames = []
    try:
        server.settimeout(5.0)
        writer = threading.Thread(target=_send_and_close, args=(client, data), daemon=True)
        writer.start()
        with no_hang():
            while True:
                frame = recv_frame(server, tensors_key="inputs", max_header_bytes=MAX_HEADER,
                                   max_payload_bytes=MAX_PAYLOAD)
                if frame is None:
                    break
                frames.append(frame)
        writer.join(5.0)
    finally:
        server.close()
        client.close()
    return frames


def _send_and_close(sock: socket.socket, data: bytes) -> None:
    try:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass  # the reader refused the frame and closed


def _read(data: bytes) -> None:
    def check(exc: ProtocolError) -> None:
        assert exc.code in FRAME_CODES_LOCAL, exc.code
        assert exc.fatal

    frames = parse_or_refuse(lambda: serve_bytes(data), ProtocolError, check)
    for header, payload in frames or []:
        tensors = parse_or_refuse(
            lambda header=header, payload=payload: decode_tensors(header.get("inputs", []),
                                                                  payload),
            ProtocolError, lambda exc: _in(exc.code, TENSOR_CODES))
        for _name, array in tensors or []:
            assert isinstance(array, np.ndarray)


def _in(code: str, codes: set[str]) -> None:
    assert code in codes, code


def test_the_valid_request_round_trips() -> None:
    [(header, payload)] = serve_bytes(VALID_FRAME * 1)
    tensors = decode_tensors(header["inputs"], payload)
    assert [name for name, _ in tensors] == ["tokens", "mask", "empty", None]


@fuzz(300)
@given(data=st.binary(max_size=128) | corrupted(VALID_FRAME, max_insert=256)
       | corrupted(VALID_FRAME + VALID_FRAME))
def test_local_api_frames_byte_level(data: bytes) -> None:
    _read(data)


@fuzz(300)
@given(header=mutated(REQUEST, deep=1500), extra=st.binary(max_size=64))
def test_local_api_frames_with_hostile_headers(header: Any, extra: bytes) -> None:
    _read(frame_bytes(header, [TENSOR_BYTES, extra]))


def test_local_api_headers_every_field_with_every_hostile_value() -> None:
    sweep(REQUEST, lambda header: _read(frame_bytes(header, [TENSOR_BYTES])), deep=1500)


@fuzz(200)
@given(descs=st.lists(
    st.fixed_dictionaries({
        "dtype": st.sampled_from(sorted(wire.ALLOWED_DTYPES)) | json_values(),
        "shape": st.lists(st.integers(0, 2**70) | st.sampled_from([0, 0, 1, 2, 2**31, 2**63]),
                          max_size=9) | json_values(),
        "nbytes": st.integers(0, 64) | st.sampled_from([0, 2**63, -1, True]) | json_values(),
    }, optional={"name": st.text(max_size=300) | json_values()}),
    max_size=4),
    payload=st.binary(max_size=64))
def test_tensor_descriptions_decode_or_refuse(descs: list[dict[str, Any]], payload: bytes) -> None:
    # as recv_frame hands them over: the payload holds exactly the declared bytes
    try:
        declared = sum(d["nbytes"] for d in descs)
    except TypeError:
        declared = -1
    if isinstance(declared, int) and 0 <= declared <= 4096:
        payload = (payload * (declared // max(1, len(payload)) + 1))[:declared]
    _read(frame_bytes({"v": 1, "op": "infer", "model": "m", "inputs": descs}, [payload]))


@pytest.mark.parametrize("shape", [[0, 2**70], [2**40, 0, 2**40], [0, 2**31]])
def test_an_empty_tensor_with_a_huge_dimension_is_refused(shape: list[int]) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_tensors([{"dtype": "int8", "shape": shape, "nbytes": 0}], b"")
    assert info.value.code == wire.BAD_TENSOR


def test_declared_but_unsent_bytes_are_refused_at_the_close() -> None:
    header = json.dumps({"v": 1, "op": "infer", "model": "m",
                         "inputs": [{"dtype": "int8", "shape": [60000], "nbytes": 60000}]})
    with pytest.raises(ProtocolError) as info:
        serve_bytes(struct.pack("!I", len(header)) + header.encode() + b"x" * 10)
    assert info.value.code == wire.BAD_FRAME


def test_frames_can_carry_a_chunk_frame_round_trip() -> None:
    # the encoder and decoder agree on every chunk of the layout
    contents = [bytes([i % 251 for i in range(n)]) for n in LAYOUT.lengths]
    for file_index, index, frame in LAYOUT.frames(contents):
        chunk = decode_frame(frame, LAYOUT)
        assert (chunk.file_index, chunk.index) == (file_index, index)
    assert encode_frame(1, 1024, b"fleet!") == DOC_FRAME
