"""Chunked release delivery: chunk frames, chunk counting, the received-chunk bitmap and ranges.

Pure: no I/O, no clock. The frame layout and the request limits are part of the protocol
(docs/protocol.md, "OTA delivery"). A frame is checked against the SIGNED file lengths of the
verified manifest, so nothing past a file's signed length is ever accepted (TUF endless data).

A frame is the 19-byte header ``struct.pack(">4sBHQI", b"FLCH", 1, file_index, offset, length)``
followed by exactly ``length`` bytes. ``offset`` is a multiple of the release's chunk size and
``length == min(chunk_size, file_length - offset)``.
"""

from __future__ import annotations

import struct
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

from fleetlite.sdk.errors import FleetLiteError

if TYPE_CHECKING:
    from fleetlite.sdk.manifest import Manifest

__all__ = [
    "BAD_BITMAP", "BAD_CHUNK_SIZE", "BAD_LENGTH", "BAD_MAGIC", "BAD_OFFSET", "BAD_RANGE",
    "BAD_VERSION", "BEYOND_SIGNED_LENGTH", "FRAME_CODES", "TRAILING_DATA", "TRUNCATED",
    "UNKNOWN_FILE",
    "DEFAULT_CHUNK_SIZE",
    "FRAME_VERSION",
    "HEADER",
    "HEADER_SIZE",
    "LOOKAHEAD_BLOCKS",
    "MAGIC",
    "MAX_CHUNK_SIZE",
    "MAX_FILES",
    "MAX_REQUEST_CHUNKS",
    "MAX_REQUEST_RANGES",
    "MIN_CHUNK_SIZE",
    "Chunk",
    "ChunkBitmap",
    "ChunkError",
    "ChunkLayout",
    "ChunkRange",
    "check_chunk_size",
    "chunk_count",
    "compress_ranges",
    "decode_frame",
    "encode_frame",
    "expand_ranges",
]

MAGIC = b"FLCH"
FRAME_VERSION = 1
HEADER = struct.Struct(">4sBHQI")
HEADER_SIZE = HEADER.size  # 19
MIN_CHUNK_SIZE = 1024
MAX_CHUNK_SIZE = 256 * 1024
DEFAULT_CHUNK_SIZE = 16 * 1024
MAX_FILES = 0xFFFF + 1  # file_index is a u16
#: a download subscribes to this many blocks of a release at a time (docs/protocol.md, "Flow")
LOOKAHEAD_BLOCKS = 2
#: caps of one chunk request (``fleetlite.chunk_request/1``)
MAX_REQUEST_RANGES = 64
MAX_REQUEST_CHUNKS = 1024

# Reason codes of ChunkError; part of the protocol.
TRUNCATED = "truncated"
BAD_MAGIC = "bad_magic"
BAD_VERSION = "bad_version"
UNKNOWN_FILE = "unknown_file"
BAD_OFFSET = "bad_offset"
BEYOND_SIGNED_LENGTH = "beyond_signed_length"
BAD_LENGTH = "bad_length"
TRAILING_DATA = "trailing_data"
BAD_CHUNK_SIZE = "bad_chunk_size"
BAD_RANGE = "bad_range"
BAD_BITMAP = "bad_bitmap"
#: the codes :func:`decode_frame` can raise, in the order it checks them
FRAME_CODES = (TRUNCATED, BAD_MAGIC, BAD_VERSION, UNKNOWN_FILE, BAD_OFFSET,
               BEYOND_SIGNED_LENGTH, BAD_LENGTH, TRAILING_DATA)

#: (file_index, first_chunk, end_chunk_exclusive)
ChunkRange = tuple[int, int, int]


class ChunkError(FleetLiteError):
    """A chunk frame, chunk range, chunk size or persisted bitmap is invalid; see ``code``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{message} [{code}]")
        self.code = code


def check_chunk_size(chunk_size: int) -> int:
    """Return ``chunk_size`` if it is an allowed chunk size; else raise ``bad_chunk_size``."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or not (
            MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE):
        raise ChunkError(BAD_CHUNK_SIZE, f"chunk size {chunk_size!r} is outside "
                         f"{MIN_CHUNK_SIZE}..{MAX_CHUNK_SIZE} bytes")
    return chunk_size


def chunk_count(length: int, chunk_size: int) -> int:
    """Number of chunks of a file of ``length`` bytes (0 for an empty file)."""
    return -(-length // chunk_size)


@dataclass(frozen=True)
class Chunk:
    """One decoded, validated chunk: ``data`` belongs at ``offset`` of file ``file_index``."""

    file_index: int
    index: int
    offset: int
    data: bytes


def encode_frame(file_index: int, offset: int, data: bytes) -> bytes:
    """The frame bytes for ``data`` at ``offset`` of file ``file_index`` (no layout checks)."""
    return HEADER.pack(MAGIC, FRAME_VERSION, file_index, offset, len(data)) + data


@dataclass(frozen=True)
class ChunkLayout:
    """How a release's files split into chunks: the signed file lengths and the chunk size."""

    lengths: tuple[int, ...]
    chunk_size: int
    counts: tuple[int, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        check_chunk_size(self.chunk_size)
        if len(self.lengths) > MAX_FILES or any(n < 0 for n in self.lengths):
            raise ValueError("a layout needs at most 65536 files of non-negative length")
        object.__setattr__(self, "counts",
                           tuple(chunk_count(n, self.chunk_size) for n in self.lengths))

    @classmethod
    def from_manifest(cls, manifest: Manifest, chunk_size: int,
                      only: Optional[Collection[str]] = None) -> ChunkLayout:
        """The layout of a (verified) manifest's files, in the manifest's order; with ``only``,
        the files not named there count as empty (a device that fetches one variant, or a
        delta instead of a full file: a frame of another file is refused as out of range)."""
        return cls(tuple(f.length if only is None or f.name in only else 0
                         for f in manifest.files), chunk_size)

    @property
    def total_chunks(self) -> int:
        return sum(self.counts)

    @property
    def total_bytes(self) -> int:
        return sum(self.lengths)

    def chunk_length(self, file_index: int, index: int) -> int:
        """The exact length of chunk ``index`` of file ``file_index``."""
        return min(self.chunk_size, self.lengths[file_index] - index * self.chunk_size)

    def frame(self, file_index: int, index: int, content: bytes) -> bytes:
        """The frame of chunk ``index`` of a file whose whole ``content`` is given."""
        if not 0 <= index < self.counts[file_index]:
            raise IndexError(f"file {file_index} has no chunk {index}")
        offset = index * self.chunk_size
        return encode_frame(file_index, offset, content[offset:offset + self.chunk_size])

    def frames(self, contents: Sequence[bytes]) -> Iterator[tuple[int, int, bytes]]:
        """(file_index, chunk_index, frame) for every chunk of every file, in order."""
        for file_index, content in enumerate(contents):
            for index in range(self.counts[file_index]):
                yield file_index, index, self.frame(file_index, index, content)

    def decode(self, frame: bytes) -> Chunk:
        return decode_frame(frame, self)

    def check_ranges(self, ranges: Iterable[ChunkRange]) -> list[ChunkRange]:
        """Return ``ranges`` if each names existing chunks of this layout; else ``bad_range``."""
        checked = []
        for file_index, first, end in ranges:
            if not 0 <= file_index < len(self.counts):
                raise ChunkError(BAD_RANGE, f"range names file {file_index}; the release has "
                                 f"{len(self.counts)}")
            if not 0 <= first < end <= self.counts[file_index]:
                raise ChunkError(BAD_RANGE, f"range [{first}, {end}) is outside file "
                                 f"{file_index}'s {self.counts[file_index]} chunks")
            checked.append((file_index, first, end))
        return checked


def decode_frame(frame: bytes, layout: ChunkLayout) -> Chunk:
    """Parse and validate one frame against ``layout`` (the signed lengths).

    Checks, in order: header present (``truncated``), magic (``bad_magic``), version
    (``bad_version``), file index (``unknown_file``), offset a multiple of the chunk size
    (``bad_offset``), offset + length within the signed length (``beyond_signed_length``),
    length equal to the expected chunk length (``bad_length``), and exactly ``length`` bytes of
    data following (``truncated`` / ``trailing_data``).
    """
    if len(frame) < HEADER_SIZE:
        raise ChunkError(TRUNCATED, f"a frame of {len(frame)} bytes has no complete "
                         f"{HEADER_SIZE}-byte header")
    magic, version, file_index, offset, length = HEADER.unpack_from(frame)
    if magic != MAGIC:
        raise ChunkError(BAD_MAGIC, f"frame magic {magic!r} is not {MAGIC!r}")
    if version != FRAME_VERSION:
        raise ChunkError(BAD_VERSION, f"frame version {version} is not {FRAME_VERSION}; "
                         "upgrade the older side")
    if file_index >= len(layout.lengths):
        raise ChunkError(UNKNOWN_FILE, f"frame for file {file_index}; the release has "
                         f"{len(layout.lengths)} files")
    if offset % layout.chunk_size:
        raise ChunkError(BAD_OFFSET, f"offset {offset} is not a multiple of the chunk size "
                         f"{layout.chunk_size}")
    signed = layout.lengths[file_index]
    if offset + length > signed or offset >= signed:
        raise ChunkError(BEYOND_SIGNED_LENGTH, f"bytes {offset}..{offset + length} of file "
                         f"{file_index} pass its signed length of {signed}")
    index = offset // layout.chunk_size
    expected = layout.chunk_length(file_index, index)
    if length != expected:
        raise ChunkError(BAD_LENGTH, f"chunk {index} of file {file_index} must be {expected} "
                         f"bytes, the frame says {length}")
    body = len(frame) - HEADER_SIZE
    if body < length:
        raise ChunkError(TRUNCATED, f"frame carries {body} of its {length} data bytes")
    if body > length:
        raise ChunkError(TRAILING_DATA, f"frame carries {body - length} bytes past its "
                         f"{length} data bytes")
    return Chunk(file_index, index, offset, bytes(frame[HEADER_SIZE:]))


# --- ranges -----------------------------------------------------------------------------------


def compress_ranges(indices: Iterable[int]) -> list[tuple[int, int]]:
    """Chunk indices -> sorted ``[first, end)`` runs: {0, 1, 2, 5} -> [(0, 3), (5, 6)]."""
    runs: list[tuple[int, int]] = []
    for index in sorted(set(indices)):
        if runs and runs[-1][1] == index:
            runs[-1] = (runs[-1][0], index + 1)
        else:
            runs.append((index, index + 1))
    return runs


def expand_ranges(ranges: Iterable[ChunkRange]) -> Iterator[tuple[int, int]]:
    """(file_index, first, end) ranges -> (file_index, chunk_index) pairs."""
    for file_index, first, end in ranges:
        for index in range(first, end):
            yield file_index, index


# --- bitmap -----------------------------------------------------------------------------------

_BITMAP_MAGIC = b"FLBM"
_BITMAP_VERSION = 1
_BITMAP_HEADER = struct.Struct(">4sBI")
_COUNT = struct.Struct(">I")


class ChunkBitmap:
    """Which chunks of each file have been received: one bitset per file.

    Chunk ``i`` of a file is bit ``i % 8`` (least significant first) of byte ``i // 8``.
    """

    def __init__(self, counts: Sequence[int]) -> None:
        if any(n < 0 for n in counts):
            raise ValueError("chunk counts must be >= 0")
        self.counts = tuple(counts)
        self._bits = [bytearray((n + 7) // 8) for n in self.counts]
        self._received = [0] * len(self.counts)

    @property
    def total(self) -> int:
        return sum(self.counts)

    @property
    def received(self) -> int:
        return sum(self._received)

    @property
    def missing(self) -> int:
        return self.total - self.received

    def received_in(self, file_index: int) -> int:
        return self._received[file_index]

    def have(self, file_index: int, index: int) -> bool:
        self._check(file_index, index)
        return bool(self._bits[file_index][index >> 3] & (1 << (index & 7)))

    def set(self, file_index: int, index: int) -> bool:
        """Mark a chunk received; True if it was not already."""
        if self.have(file_index, index):
            return False
        self._bits[file_index][index >> 3] |= 1 << (index & 7)
        self._received[file_index] += 1
        return True

    def clear_file(self, file_index: int) -> None:
        """Forget every chunk of one file (it will be fetched again)."""
        self._bits[file_index] = bytearray(len(self._bits[file_index]))
        self._received[file_index] = 0

    def fill_file(self, file_index: int) -> None:
        """Mark every chunk of one file received."""
        count = self.counts[file_index]
        bits = bytearray(b"\xff" * (count // 8))
        if count % 8:
            bits.append((1 << (count % 8)) - 1)
        self._bits[file_index] = bits
        self._received[file_index] = count

    def file_complete(self, file_index: int) -> bool:
        return self._received[file_index] == self.counts[file_index]

    def complete(self) -> bool:
        return self._received == list(self.counts)

    def missing_in(self, file_index: int) -> Iterator[tuple[int, int]]:
        """The ``[first, end)`` runs of missing chunks of one file, in order."""
        count = self.counts[file_index]
        if self._received[file_index] == count:
            return
        value = int.from_bytes(self._bits[file_index], "little")
        position = 0
        while position < count:
            rest = value >> position
            first = position + ((~rest & (rest + 1)).bit_length() - 1)  # lowest zero bit
            if first >= count:
                return
            rest = value >> first
            end = count if rest == 0 else min(count, first + (rest & -rest).bit_length() - 1)
            yield first, end
            position = end

    def missing_ranges(self, limit_ranges: int = MAX_REQUEST_RANGES,
                       limit_chunks: int = MAX_REQUEST_CHUNKS,
                       below: int | None = None) -> list[ChunkRange]:
        """The first missing chunks as (file_index, first, end) ranges, capped at
        ``limit_ranges`` ranges and ``limit_chunks`` chunks (the request caps); with ``below``,
        only chunks whose index (in any file) is below it."""
        ranges: list[ChunkRange] = []
        budget = limit_chunks
        for file_index in range(len(self.counts)):
            for first, end in self.missing_in(file_index):
                if below is not None and first >= below:
                    break
                if budget <= 0 or len(ranges) >= limit_ranges:
                    return ranges
                stop = min(end, first + budget, below if below is not None else end)
                ranges.append((file_index, first, stop))
                budget -= stop - first
        return ranges

    def first_missing(self) -> int | None:
        """The lowest chunk index missing in any file (None when complete)."""
        firsts = [next(self.missing_in(f), (None, None))[0] for f in range(len(self.counts))]
        present = [first for first in firsts if first is not None]
        return min(present) if present else None

    def wanted_blocks(self, chunks_per_block: int, lookahead: int = LOOKAHEAD_BLOCKS) -> range:
        """The blocks (of ``chunks_per_block`` chunks, counted in every file alike) a download
        subscribes to now: the first one with a missing chunk and the ``lookahead - 1`` after
        it that exist; empty when complete."""
        first = self.first_missing()
        if first is None:
            return range(0)
        blocks = -(-max(self.counts, default=0) // chunks_per_block)
        low = first // chunks_per_block
        return range(low, min(low + max(1, lookahead), blocks))

    def copy(self) -> ChunkBitmap:
        other = ChunkBitmap(self.counts)
        other._bits = [bytearray(b) for b in self._bits]
        other._received = list(self._received)
        return other

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ChunkBitmap):
            return NotImplemented
        return self.counts == other.counts and self._bits == other._bits

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"ChunkBitmap(received {self.received}/{self.total})"

    def to_bytes(self) -> bytes:
        """``FLBM``, version 1, the file count, each file's chunk count (u32), then the bits."""
        parts = [_BITMAP_HEADER.pack(_BITMAP_MAGIC, _BITMAP_VERSION, len(self.counts))]
        parts += [_COUNT.pack(n) for n in self.counts]
        parts += [bytes(b) for b in self._bits]
        return b"".join(parts)

    @classmethod
    def from_bytes(cls, data: bytes, counts: Sequence[int]) -> ChunkBitmap:
        """Parse :meth:`to_bytes` output, requiring the same per-file ``counts``; else
        ``bad_bitmap`` (the caller starts the download over)."""
        if len(data) < _BITMAP_HEADER.size:
            raise ChunkError(BAD_BITMAP, "bitmap is truncated")
        magic, version, files = _BITMAP_HEADER.unpack_from(data)
        if magic != _BITMAP_MAGIC or version != _BITMAP_VERSION:
            raise ChunkError(BAD_BITMAP, "not a version 1 chunk bitmap")
        if files != len(counts):
            raise ChunkError(BAD_BITMAP, f"bitmap has {files} files, expected {len(counts)}")
        bitmap = cls(counts)
        position = _BITMAP_HEADER.size
        expected = position + _COUNT.size * files + sum((n + 7) // 8 for n in counts)
        if len(data) != expected:
            raise ChunkError(BAD_BITMAP, f"bitmap is {len(data)} bytes, expected {expected}")
        for file_index, count in enumerate(counts):
            (stored,) = _COUNT.unpack_from(data, position)
            position += _COUNT.size
            if stored != count:
                raise ChunkError(BAD_BITMAP, f"bitmap has {stored} chunks for file "
                                 f"{file_index}, expected {count}")
        for file_index, count in enumerate(counts):
            size = (count + 7) // 8
            bits = bytearray(data[position:position + size])
            position += size
            if count % 8 and bits[-1] >> (count % 8):
                raise ChunkError(BAD_BITMAP, f"bitmap of file {file_index} has bits past its "
                                 "last chunk")
            bitmap._bits[file_index] = bits
            bitmap._received[file_index] = bin(int.from_bytes(bits, "little")).count("1")
        return bitmap

    def _check(self, file_index: int, index: int) -> None:
        if not 0 <= file_index < len(self.counts) or not 0 <= index < self.counts[file_index]:
            raise IndexError(f"no chunk {index} in file {file_index}")
