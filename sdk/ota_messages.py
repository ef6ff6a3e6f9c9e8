"""JSON messages of OTA delivery: the device's chunk request (docs/protocol.md, "OTA delivery")."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from fleetlite.sdk.chunks import (
    MAX_CHUNK_SIZE,
    MAX_FILES,
    MAX_REQUEST_CHUNKS,
    MAX_REQUEST_RANGES,
    MIN_CHUNK_SIZE,
    ChunkRange,
)
from fleetlite.sdk.messages import (
    BAD_TYPE,
    BAD_VALUE,
    MAX_ID_LENGTH,
    Message,
    MessageError,
    get_bool,
    get_int,
    get_list,
    get_str,
    get_ts,
)
from fleetlite.sdk.topics import TopicError, validate_device_id, validate_release_id

__all__ = ["MAX_CHUNK_REQUEST_BYTES", "ChunkRequest"]

#: 64 ranges of three numbers fit in ~2 KiB; the cap leaves room for the other fields
MAX_CHUNK_REQUEST_BYTES = 8 * 1024
_MAX_CHUNK_INDEX = 2**32


@dataclass(frozen=True)
class ChunkRequest(Message):
    """A device asks the fleet for the chunks it is missing, on ``.../dev/{id}/ota/request``.

    ``missing`` holds ``[file_index, first_chunk, end_chunk_exclusive]`` ranges: at most
    MAX_REQUEST_RANGES ranges and MAX_REQUEST_CHUNKS chunks in all. ``done`` is true (and
    ``missing`` empty) once the device has every chunk, so the fleet can stop serving.
    """

    SCHEMA: ClassVar[str] = "fleetlite.chunk_request/1"
    MAX_BYTES: ClassVar[int] = MAX_CHUNK_REQUEST_BYTES

    device_id: str
    release_id: str
    chunk_size: int
    ts: float
    missing: tuple[ChunkRange, ...] = ()
    done: bool = False

    @property
    def chunk_total(self) -> int:
        """How many chunks the request names."""
        return sum(end - first for _, first, end in self.missing)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ChunkRequest:
        device_id = get_str(data, "device_id", max_len=MAX_ID_LENGTH)
        release_id = get_str(data, "release_id", max_len=MAX_ID_LENGTH)
        try:
            validate_device_id(device_id)
            validate_release_id(release_id)
        except TopicError as exc:
            raise MessageError(BAD_VALUE, str(exc)) from None
        chunk_size = get_int(data, "chunk_size", minimum=MIN_CHUNK_SIZE)
        if chunk_size > MAX_CHUNK_SIZE:
            raise MessageError(BAD_VALUE, f"field 'chunk_size' must be <= {MAX_CHUNK_SIZE}")
        missing = _parse_ranges(get_list(data, "missing"))
        done = get_bool(data, "done")
        if done and missing:
            raise MessageError(BAD_VALUE, "a request with 'done': true must not list chunks")
        return cls(device_id=device_id, release_id=release_id, chunk_size=chunk_size,
                   ts=get_ts(data), missing=missing, done=done)


def _parse_ranges(items: list[Any]) -> tuple[ChunkRange, ...]:
    if len(items) > MAX_REQUEST_RANGES:
        raise MessageError(BAD_VALUE, f"field 'missing' has {len(items)} ranges; at most "
                           f"{MAX_REQUEST_RANGES} are allowed")
    ranges: list[ChunkRange] = []
    total = 0
    for item in items:
        if (not isinstance(item, list) or len(item) != 3
                or any(isinstance(v, bool) or not isinstance(v, int) for v in item)):
            raise MessageError(BAD_TYPE, "each 'missing' entry must be [file_index, "
                               "first_chunk, end_chunk] integers")
        file_index, first, end = item
        if not (0 <= file_index < MAX_FILES and 0 <= first < end <= _MAX_CHUNK_INDEX):
            raise MessageError(BAD_VALUE, f"'missing' range {item!r:.60} is not "
                               "[file_index, first, end) with first < end")
        total += end - first
        if total > MAX_REQUEST_CHUNKS:
            raise MessageError(BAD_VALUE, f"field 'missing' names more than "
                               f"{MAX_REQUEST_CHUNKS} chunks")
        ranges.append((file_index, first, end))
    return tuple(ranges)
