"""Chunk frames, the received-chunk bitmap, missing ranges and the chunk request: pure tests,
hostile frames as a table of reason codes, properties with hypothesis."""

from __future__ import annotations

import re
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetlite.sdk import chunks, topics
from fleetlite.sdk.chunks import (
    HEADER,
    HEADER_SIZE,
    MAX_CHUNK_SIZE,
    MAX_REQUEST_CHUNKS,
    MAX_REQUEST_RANGES,
    MIN_CHUNK_SIZE,
    ChunkBitmap,
    ChunkError,
    ChunkLayout,
    check_chunk_size,
    chunk_count,
    compress_ranges,
    decode_frame,
    encode_frame,
    expand_ranges,
)
from fleetlite.sdk.messages import MessageError
from fleetlite.sdk.ota_messages import ChunkRequest

DOC = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"
RID = "ab" * 32
CS = 1024
# file 0: 2.5 chunks; file 1: exactly 2 chunks; file 2: empty; file 3: one short chunk
LAYOUT = ChunkLayout((2560, 2048, 0, 10), CS)
CONTENTS = [bytes((i * 7 + f) % 251 for i in range(n)) for f, n in enumerate(LAYOUT.lengths)]


def header(file_index: int, offset: int, length: int, *, magic: bytes = b"FLCH",
           version: int = 1) -> bytes:
    return struct.pack(">4sBHQI", magic, version, file_index, offset, length)


# --- frames -----------------------------------------------------------------------------------


def test_layout_counts_and_lengths() -> None:
    assert LAYOUT.counts == (3, 2, 0, 1)
    assert LAYOUT.total_chunks == 6
    assert LAYOUT.total_bytes == 2560 + 2048 + 10
    assert [LAYOUT.chunk_length(0, i) for i in range(3)] == [1024, 1024, 512]
    assert LAYOUT.chunk_length(3, 0) == 10
    assert chunk_count(0, CS) == 0 and chunk_count(1, CS) == 1 and chunk_count(1024, CS) == 1
    assert chunk_count(1025, CS) == 2


def test_frame_layout_is_the_documented_struct() -> None:
    frame = encode_frame(1, 1024, b"hello")
    assert HEADER_SIZE == 19 == HEADER.size
    assert frame == header(1, 1024, 5) + b"hello"
    assert frame[:4] == b"FLCH" and frame[4] == 1


def test_every_frame_decodes_back_to_the_file() -> None:
    rebuilt = [bytearray(n) for n in LAYOUT.lengths]
    seen = []
    for file_index, index, frame in LAYOUT.frames(CONTENTS):
        chunk = decode_frame(frame, LAYOUT)
        assert (chunk.file_index, chunk.index, chunk.offset) == (file_index, index, index * CS)
        rebuilt[file_index][chunk.offset:chunk.offset + len(chunk.data)] = chunk.data
        seen.append((file_index, index))
    assert [bytes(b) for b in rebuilt] == CONTENTS
    assert seen == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (3, 0)]


HOSTILE_FRAMES = [
    ("empty", b"", "truncated"),
    ("half a header", header(0, 0, 1024)[:10], "truncated"),
    ("wrong magic", header(0, 0, 1024, magic=b"FLCX") + bytes(1024), "bad_magic"),
    ("http", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "bad_magic"),
    ("frame version 2", header(0, 0, 1024, version=2) + bytes(1024), "bad_version"),
    ("frame version 0", header(0, 0, 1024, version=0) + bytes(1024), "bad_version"),
    ("file index past the manifest", header(4, 0, 10) + bytes(10), "unknown_file"),
    ("file index 65535", header(65535, 0, 10) + bytes(10), "unknown_file"),
    ("offset not on a chunk boundary", header(0, 100, 1024) + bytes(1024), "bad_offset"),
    ("offset one past a boundary", header(0, 1025, 1024) + bytes(1024), "bad_offset"),
    ("chunk past the end of the file", header(0, 3072, 1024) + bytes(1024), "beyond_signed_length"),
    ("huge offset", header(0, 2**63, 0), "beyond_signed_length"),
    ("last chunk too long", header(0, 2048, 1024) + bytes(1024), "beyond_signed_length"),
    ("empty file has no chunks", header(2, 0, 0), "beyond_signed_length"),
    ("short file, full chunk", header(3, 0, 1024) + bytes(1024), "beyond_signed_length"),
    ("length 4 GiB", header(0, 0, 2**32 - 1), "beyond_signed_length"),
    ("short middle chunk", header(0, 1024, 1000) + bytes(1000), "bad_length"),
    ("short last chunk", header(0, 2048, 511) + bytes(511), "bad_length"),
    ("zero length", header(1, 0, 0), "bad_length"),
    ("data cut short", header(0, 0, 1024) + bytes(1000), "truncated"),
    ("no data at all", header(1, 1024, 1024), "truncated"),
    ("trailing bytes", header(0, 0, 1024) + bytes(1025), "trailing_data"),
    ("two frames glued", 2 * (header(3, 0, 10) + bytes(10)), "trailing_data"),
]


@pytest.mark.parametrize(("frame", "code"), [(f, c) for _, f, c in HOSTILE_FRAMES],
                         ids=[name for name, _, _ in HOSTILE_FRAMES])
def test_hostile_frames_are_refused_with_their_code(frame: bytes, code: str) -> None:
    with pytest.raises(ChunkError) as info:
        decode_frame(frame, LAYOUT)
    assert info.value.code == code
    assert code in chunks.FRAME_CODES
    assert f"[{code}]" in str(info.value)


@pytest.mark.parametrize("size", [0, 1, 1023, MAX_CHUNK_SIZE + 1, 2**40, True, 1024.0])
def test_chunk_size_bounds(size: object) -> None:
    with pytest.raises(ChunkError) as info:
        check_chunk_size(size)  # type: ignore[arg-type]
    assert info.value.code == "bad_chunk_size"
    with pytest.raises(ChunkError):
        ChunkLayout((10,), size)  # type: ignore[arg-type]


def test_chunk_size_limits_accepted() -> None:
    assert check_chunk_size(MIN_CHUNK_SIZE) == 1024
    assert check_chunk_size(MAX_CHUNK_SIZE) == 256 * 1024


@settings(max_examples=200, deadline=None)
@given(lengths=st.lists(st.integers(0, 9000), min_size=1, max_size=4),
       chunk_size=st.integers(MIN_CHUNK_SIZE, 4096), data=st.data())
def test_any_frame_that_decodes_stays_inside_the_signed_lengths(
        lengths: list[int], chunk_size: int, data: st.DataObject) -> None:
    layout = ChunkLayout(tuple(lengths), chunk_size)
    file_index = data.draw(st.integers(0, 6))
    offset = data.draw(st.one_of(st.integers(0, 20000), st.sampled_from(
        [0, chunk_size, 2 * chunk_size, 8 * chunk_size, 2**64 - 1])))
    length = data.draw(st.one_of(st.integers(0, 9000), st.just(chunk_size)))
    body = data.draw(st.integers(0, 9000))
    frame = header(file_index, offset, length) + bytes(min(body, 20000))
    try:
        chunk = decode_frame(frame, layout)
    except ChunkError as exc:
        assert exc.code in chunks.FRAME_CODES
        return
    assert chunk.offset % chunk_size == 0
    assert chunk.offset + len(chunk.data) <= lengths[chunk.file_index]
    assert len(chunk.data) == layout.chunk_length(chunk.file_index, chunk.index) > 0


@settings(max_examples=100, deadline=None)
@given(content=st.binary(max_size=5000), chunk_size=st.integers(MIN_CHUNK_SIZE, 2048),
       flip=st.integers(0, 30), value=st.integers(0, 255))
def test_mutated_headers_never_escape_the_layout(content: bytes, chunk_size: int, flip: int,
                                                 value: int) -> None:
    layout = ChunkLayout((len(content),), chunk_size)
    for _, _, frame in layout.frames([content]):
        mutated = bytearray(frame)
        mutated[min(flip, len(mutated) - 1)] = value
        try:
            chunk = decode_frame(bytes(mutated), layout)
        except ChunkError:
            continue
        assert chunk.offset + len(chunk.data) <= len(content)


# --- ranges and the bitmap --------------------------------------------------------------------


def test_compress_and_expand_ranges() -> None:
    assert compress_ranges([5, 0, 1, 2, 2, 9, 10]) == [(0, 3), (5, 6), (9, 11)]
    assert compress_ranges([]) == []
    assert list(expand_ranges([(1, 3, 5), (0, 0, 1)])) == [(1, 3), (1, 4), (0, 0)]


@given(st.sets(st.integers(0, 300)))
def test_compress_ranges_round_trips(indices: set[int]) -> None:
    runs = compress_ranges(indices)
    assert {i for a, b in runs for i in range(a, b)} == indices
    assert all(a < b for a, b in runs)
    assert all(runs[k][1] < runs[k + 1][0] for k in range(len(runs) - 1))  # gaps between runs


def test_bitmap_basics() -> None:
    bitmap = ChunkBitmap(LAYOUT.counts)
    assert bitmap.total == 6 and bitmap.received == 0 and not bitmap.complete()
    assert bitmap.file_complete(2)  # an empty file is complete from the start
    assert bitmap.missing_ranges() == [(0, 0, 3), (1, 0, 2), (3, 0, 1)]
    assert bitmap.set(0, 1) is True
    assert bitmap.set(0, 1) is False
    assert bitmap.have(0, 1) and not bitmap.have(0, 0)
    assert bitmap.missing_ranges() == [(0, 0, 1), (0, 2, 3), (1, 0, 2), (3, 0, 1)]
    for f, i in [(0, 0), (0, 2), (1, 0), (1, 1), (3, 0)]:
        bitmap.set(f, i)
    assert bitmap.complete() and bitmap.missing_ranges() == []
    bitmap.clear_file(1)
    assert bitmap.received == 4 and bitmap.missing_ranges() == [(1, 0, 2)]
    bitmap.fill_file(1)
    assert bitmap.complete()
    with pytest.raises(IndexError):
        bitmap.have(0, 3)
    with pytest.raises(IndexError):
        bitmap.set(4, 0)


def test_missing_ranges_respect_the_request_caps() -> None:
    bitmap = ChunkBitmap([5000])
    for i in range(0, 5000, 2):  # every other chunk: 2500 one-chunk holes
        bitmap.set(0, i)
    ranges = bitmap.missing_ranges()
    assert len(ranges) == MAX_REQUEST_RANGES
    assert ranges[:2] == [(0, 1, 2), (0, 3, 4)]
    full = ChunkBitmap([5000])
    assert full.missing_ranges() == [(0, 0, MAX_REQUEST_CHUNKS)]
    assert full.missing_ranges(limit_chunks=10) == [(0, 0, 10)]
    two = ChunkBitmap([3, 4000])
    assert two.missing_ranges(limit_chunks=5) == [(0, 0, 3), (1, 0, 2)]
    assert two.missing_ranges(limit_ranges=1) == [(0, 0, 3)]


@settings(max_examples=200, deadline=None)
@given(counts=st.lists(st.integers(0, 200), min_size=1, max_size=5), data=st.data())
def test_bitmap_properties(counts: list[int], data: st.DataObject) -> None:
    bitmap = ChunkBitmap(counts)
    chosen = set()
    for f, n in enumerate(counts):
        if n:
            chosen |= {(f, i) for i in data.draw(st.sets(st.integers(0, n - 1)))}
    for key in chosen:
        bitmap.set(*key)
    assert bitmap.received == len(chosen)
    everything = {(f, i) for f, n in enumerate(counts) for i in range(n)}
    # uncapped: the missing ranges are exactly the complement, as maximal runs
    missing = bitmap.missing_ranges(limit_ranges=10**6, limit_chunks=10**6)
    assert set(expand_ranges(missing)) == everything - chosen
    assert len(missing) == sum(len(compress_ranges(i for g, i in everything - chosen if g == f))
                               for f in range(len(counts)))
    # capped: a prefix of that, within both caps
    limit_ranges = data.draw(st.integers(1, 10))
    limit_chunks = data.draw(st.integers(1, 50))
    capped = bitmap.missing_ranges(limit_ranges, limit_chunks)
    assert len(capped) <= limit_ranges
    assert sum(b - a for _, a, b in capped) <= limit_chunks
    assert set(expand_ranges(capped)) <= everything - chosen
    # persistence round-trips
    again = ChunkBitmap.from_bytes(bitmap.to_bytes(), counts)
    assert again == bitmap and again.received == bitmap.received
    assert again.complete() == (chosen == everything)


HOSTILE_BITMAPS = [
    ("empty", b""),
    ("wrong magic", b"XXXX" + ChunkBitmap([3]).to_bytes()[4:]),
    ("wrong version", b"FLBM\x02" + ChunkBitmap([3]).to_bytes()[5:]),
    ("other file count", ChunkBitmap([3, 3]).to_bytes()),
    ("other chunk count", ChunkBitmap([9]).to_bytes()),
    ("truncated", ChunkBitmap([3]).to_bytes()[:-1]),
    ("trailing", ChunkBitmap([3]).to_bytes() + b"\0"),
    ("bits past the last chunk", ChunkBitmap([3]).to_bytes()[:-1] + b"\x08"),
]


@pytest.mark.parametrize("data", [d for _, d in HOSTILE_BITMAPS],
                         ids=[n for n, _ in HOSTILE_BITMAPS])
def test_hostile_bitmaps_are_refused(data: bytes) -> None:
    with pytest.raises(ChunkError) as info:
        ChunkBitmap.from_bytes(data, [3])
    assert info.value.code == "bad_bitmap"


def test_layout_checks_requested_ranges() -> None:
    assert LAYOUT.check_ranges([(0, 0, 3), (3, 0, 1)]) == [(0, 0, 3), (3, 0, 1)]
    for bad in [(4, 0, 1), (0, 0, 4), (0, 2, 2), (2, 0, 1), (-1, 0, 1), (0, -1, 1)]:
        with pytest.raises(ChunkError) as info:
            LAYOUT.check_ranges([bad])
        assert info.value.code == "bad_range"


# --- the chunk request message ----------------------------------------------------------------


def request_json(**override: object) -> bytes:
    import json

    data: dict[str, object] = {"schema": "fleetlite.chunk_request/1", "device_id": "gw-1",
                               "release_id": RID, "chunk_size": 16384, "ts": 1.5,
                               "missing": [[0, 0, 4]], "done": False}
    data.update(override)
    return json.dumps(data).encode()


def test_chunk_request_round_trips() -> None:
    request = ChunkRequest(device_id="gw-1", release_id=RID, chunk_size=16384, ts=1.5,
                           missing=((0, 0, 4), (2, 7, 9)))
    assert ChunkRequest.from_json(request.to_json()) == request
    assert request.chunk_total == 6
    assert b'"missing":[[0,0,4],[2,7,9]]' in request.to_json()


HOSTILE_REQUESTS = [
    ("oversize", request_json(device_id="x" * 9000), "oversize"),
    ("other schema", request_json(schema="fleetlite.chunk_request/2"), "wrong_schema"),
    ("no release id", request_json(release_id=None).replace(b'"release_id": null, ', b""),
     "missing_field"),
    ("upper-case release id", request_json(release_id=RID.upper()), "bad_value"),
    ("short release id", request_json(release_id="ab"), "bad_value"),
    ("device id with a slash", request_json(device_id="gw/1"), "bad_value"),
    ("chunk size too small", request_json(chunk_size=10), "bad_value"),
    ("chunk size too big", request_json(chunk_size=2**20), "bad_value"),
    ("missing is an object", request_json(missing={"0": 1}), "bad_type"),
    ("range of two numbers", request_json(missing=[[0, 1]]), "bad_type"),
    ("range with a bool", request_json(missing=[[0, True, 2]]), "bad_type"),
    ("range with a float", request_json(missing=[[0, 0.0, 2]]), "bad_type"),
    ("empty range", request_json(missing=[[0, 3, 3]]), "bad_value"),
    ("reversed range", request_json(missing=[[0, 5, 3]]), "bad_value"),
    ("negative file", request_json(missing=[[-1, 0, 3]]), "bad_value"),
    ("file index past u16", request_json(missing=[[65536, 0, 3]]), "bad_value"),
    ("huge end", request_json(missing=[[0, 0, 10**30]]), "bad_value"),
    ("65 ranges", request_json(missing=[[0, 2 * i, 2 * i + 1] for i in range(65)]),
     "bad_value"),
    ("1025 chunks", request_json(missing=[[0, 0, 1000], [1, 0, 25]]), "bad_value"),
    ("done but missing chunks", request_json(done=True), "bad_value"),
    ("done as a string", request_json(done="yes"), "bad_type"),
]


@pytest.mark.parametrize(("payload", "code"), [(p, c) for _, p, c in HOSTILE_REQUESTS],
                         ids=[n for n, _, _ in HOSTILE_REQUESTS])
def test_hostile_chunk_requests_are_refused(payload: bytes, code: str) -> None:
    with pytest.raises(MessageError) as info:
        ChunkRequest.from_json(payload)
    assert info.value.code == code


def test_request_at_the_caps_is_accepted() -> None:
    ranges = [[0, 16 * i, 16 * i + 16] for i in range(64)]
    request = ChunkRequest.from_json(request_json(missing=ranges))
    assert request.chunk_total == MAX_REQUEST_CHUNKS and len(request.missing) == 64
    done = ChunkRequest.from_json(request_json(missing=[], done=True))
    assert done.done and done.missing == ()


# --- topics -----------------------------------------------------------------------------------


def test_release_topics() -> None:
    assert topics.release_topic(RID, topics.RELEASE_CHUNKS) == f"fleetlite/v1/rel/{RID}/chunks"
    assert topics.parse_release_topic(f"fleetlite/v1/rel/{RID}/manifest") == \
        topics.ReleaseTopic(RID, "manifest")
    assert topics.device_topic("gw-1", topics.OTA_REQUEST) == "fleetlite/v1/dev/gw-1/ota/request"
    assert topics.fleet_subscription(topics.OTA_REQUEST) == "fleetlite/v1/dev/+/ota/request"
    assert topics.parse_device_topic("fleetlite/v1/dev/gw-1/ota/request").kind == "ota/request"
    for bad in ["", "ab" * 31, "AB" * 32, "ab" * 32 + "0", "g" * 64, "+", "#"]:
        with pytest.raises(topics.TopicError):
            topics.release_topic(bad, topics.RELEASE_CHUNKS)
    for bad in [f"fleetlite/v1/rel/{RID}/other", f"fleetlite/v1/rel/{RID}",
                f"fleetlite/v1/dev/{RID}/chunks", f"fleetlite/v1/rel/{RID[:-1]}/chunks"]:
        with pytest.raises(topics.TopicError):
            topics.parse_release_topic(bad)
    with pytest.raises(topics.TopicError):
        topics.release_topic(RID, "files")


def test_every_chunk_has_one_retained_topic() -> None:
    # 128 chunks of 4096 bytes to a 512 KiB block: chunk 70 is in block 0, chunk 200 in block 1
    assert topics.chunks_per_block(4096) == 128 and topics.chunks_per_block(16384) == 32
    assert topics.chunks_per_block(262144) == 2 and topics.chunks_per_block(1024 * 1024) == 1
    assert topics.chunk_topic(RID, 4096, 1, 70) == f"fleetlite/v1/rel/{RID}/chunks/4096/0/1/70"
    assert topics.chunk_topic(RID, 4096, 1, 200) == f"fleetlite/v1/rel/{RID}/chunks/4096/1/1/200"
    assert topics.block_filter(RID, 4096, 1) == f"fleetlite/v1/rel/{RID}/chunks/4096/1/+/+"
    assert topics.chunks_filter(RID, 4096) == f"fleetlite/v1/rel/{RID}/chunks/4096/+/+/+"
    assert topics.parse_release_topic(topics.chunk_topic(RID, 1024, 0, 123456789)) == \
        topics.ReleaseTopic(RID, "chunks", 1024, 0, 123456789)
    assert topics.parse_release_topic(topics.chunk_topic(RID, 16384, 65535, 0)).file_index == \
        65535
    for bad in ["chunks", "chunks/1", "chunks/1/2", "chunks/4096/1/2", "chunks/4096/0/1/2/3",
                "chunks/4096/0/01/2", "chunks/4096/0/1/02", "chunks/04096/0/1/2",
                "chunks/0/0/1/2", "chunks/4096/0/-1/2", "chunks/4096/0/1/+",
                "chunks/4096/0/65536/0", "chunks/4096/0/1/" + "9" * 21,
                "chunks/4096/0/\u0661/2", "chunks/4096/0//2", "chunks/4096/00/1/2",
                "chunks/4096/1/1/70",  # chunk 70 is in block 0: one topic per chunk
                "chunks/4096/0/1/200", "chunks/4096/+/1/2"]:
        with pytest.raises(topics.TopicError):
            topics.parse_release_topic(f"fleetlite/v1/rel/{RID}/{bad}")
    for size, file_index, index in [(4096, -1, 0), (4096, 65536, 0), (4096, 0, -1), (0, 0, 0)]:
        with pytest.raises(topics.TopicError):
            topics.chunk_topic(RID, size, file_index, index)
    with pytest.raises(topics.TopicError):
        topics.block_filter(RID, 4096, -1)


def test_a_download_wants_the_first_block_it_misses_and_the_next() -> None:
    bitmap = ChunkBitmap([100, 5])  # blocks of 32 chunks: file 0 has 4, file 1 one
    assert bitmap.wanted_blocks(32) == range(0, 2)
    for index in range(40):
        bitmap.set(0, index)
    assert bitmap.wanted_blocks(32) == range(0, 2)  # file 1's block 0 is still missing
    for index in range(5):
        bitmap.set(1, index)
    assert bitmap.first_missing() == 40 and bitmap.wanted_blocks(32) == range(1, 3)
    assert bitmap.wanted_blocks(32, lookahead=1) == range(1, 2)
    for index in range(40, 96):
        bitmap.set(0, index)
    assert bitmap.wanted_blocks(32) == range(3, 4)  # the last block: no block after it
    # what an ask may name: only chunks of the subscribed blocks
    assert bitmap.missing_ranges(below=97) == [(0, 96, 97)]
    assert bitmap.missing_ranges(below=96) == []
    for index in range(96, 100):
        bitmap.set(0, index)
    assert bitmap.first_missing() is None and bitmap.wanted_blocks(32) == range(0)


# --- docs/protocol.md -------------------------------------------------------------------------


def doc_vector(name: str) -> str:
    found = re.search(rf"<!-- ota-vector: {name} -->\s*```\w*\n(.*?)\n```", DOC.read_text(), re.S)
    assert found, f"docs/protocol.md has no ota-vector {name}"
    return found.group(1)


def test_doc_chunk_frame_vector() -> None:
    layout = ChunkLayout((5000, 1030), 1024)  # the layout the doc states
    frame = bytes.fromhex(doc_vector("chunk_frame").replace(" ", "").replace("\n", ""))
    chunk = decode_frame(frame, layout)
    assert (chunk.file_index, chunk.index, chunk.offset, chunk.data) == (1, 1, 1024, b"fleet!")
    assert frame == encode_frame(1, 1024, b"fleet!")


def test_doc_chunk_request_vector() -> None:
    payload = doc_vector("chunk_request").encode()
    request = ChunkRequest.from_json(payload)
    assert request.to_json() == payload
    assert request.missing == ((0, 3, 5), (1, 0, 1))


def test_doc_lists_the_codes() -> None:
    text = DOC.read_text()
    for code in (*chunks.FRAME_CODES, chunks.BAD_CHUNK_SIZE, chunks.BAD_RANGE,
                 "disk_full", "download_stalled", "download_timeout"):
        assert f"`{code}`" in text
    assert ("`fleetlite/v1/rel/{release_id}/chunks/{chunk_size}/{block}/{file_index}/{index}`"
            in text)
