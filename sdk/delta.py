"""Delta files: a target file rebuilt from a base file the device already has, and its checks.

A delta is one small container::

    header   "FLDELTA\\0", version (u16), kind (u16), base sha256 + length, target sha256 +
             length, op count (u32), op table size (u32), literal byte count (u64)
    op table xz-compressed, op count x (code u8, base offset u64, length u64)
    literals xz-compressed, the bytes of every INSERT and XOR op in op order, to the end

Three ops rebuild the target front to back: ``COPY`` (base bytes at an offset), ``INSERT``
(literal bytes) and ``XOR`` (base bytes at an offset, XORed with as many literal bytes). XOR is
what makes a fine-tune cheap: a changed weight tensor keeps its size and place, and most of its
values (or their sign, exponent and high mantissa bits) stay, so XOR against the base tensor is
mostly zero bytes, which compress to almost nothing; the bytes of a buffer that did not change are
one COPY. This is bsdiff's "add" block (C. Percival, *Naive differences of executable code*, 2003)
in its simplest form, with no suffix sort: the producer finds the matches (by TFLite tensor
buffers, or by block matching for any file; see ``fleet/delta_diff.py``) and this module only
defines and applies the result, so the device side is a short loop that needs no model parser.
Both kinds share the container; ``kind`` records how the ops were found, for reports only.

:func:`apply_delta` streams: it never holds the base, the target or the literals in memory, checks
the base's sha256 and length before the first byte is written, refuses anything malformed or over
a cap (:class:`DeltaLimits`) with a :class:`~fleetlite.sdk.errors.DeltaError` and its ``reason``,
and checks the rebuilt bytes' sha256 and length at the end. A caller still writes to a temporary
file and renames only after success (``agent/delta_rebuild.py``).
"""

from __future__ import annotations

import hashlib
import lzma
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import BinaryIO, NamedTuple, Optional

from fleetlite.sdk.errors import (
    DELTA_BASE_MISMATCH,
    DELTA_CORRUPT,
    DELTA_TARGET_MISMATCH,
    DELTA_TOO_LARGE,
    DeltaError,
)

__all__ = [
    "COPY",
    "DEFAULT_DELTA_LIMITS",
    "INSERT",
    "KIND_BINARY",
    "KIND_TENSORS",
    "KINDS",
    "MAGIC",
    "VERSION",
    "XOR",
    "DeltaHeader",
    "DeltaLimits",
    "Op",
    "apply_delta",
    "apply_delta_bytes",
    "encode_delta",
    "read_header",
]

MAGIC = b"FLDELTA\x00"
VERSION = 1
KIND_TENSORS, KIND_BINARY = 1, 2
KINDS = {KIND_TENSORS: "tensors", KIND_BINARY: "binary"}
COPY, INSERT, XOR = 0, 1, 2
_HEADER = struct.Struct("<8sHH32sQ32sQIIQ")
_OP = struct.Struct("<BQQ")
_CHUNK = 64 * 1024
# xz preset 6: an 8 MiB dictionary, about 9 MiB to decompress; a device's decoder refuses more.
_PRESET = 6
_MEMLIMIT = 64 * 1024 * 1024


@dataclass(frozen=True)
class DeltaLimits:
    """Caps a device applies before it trusts anything in a delta (defaults in parentheses).

    ``max_target_bytes`` (256 MiB, the manifest's per-file cap) bounds the rebuilt file;
    ``max_ops`` (1 Mi) the op table; literal bytes can never exceed the target's length.
    """

    max_target_bytes: int = 256 * 1024 * 1024
    max_ops: int = 1 << 20


DEFAULT_DELTA_LIMITS = DeltaLimits()


class Op(NamedTuple):
    """One rebuild step: ``code`` (COPY, INSERT or XOR), base ``offset`` (0 for INSERT), length."""

    code: int
    offset: int
    length: int


@dataclass(frozen=True)
class DeltaHeader:
    """The fixed-size header: what the delta is made from and what it rebuilds."""

    kind: int
    base_sha256: str
    base_length: int
    target_sha256: str
    target_length: int
    op_count: int
    op_table_size: int
    literal_bytes: int

    @property
    def kind_name(self) -> str:
        return KINDS[self.kind]


# --- writing (fleet side) -------------------------------------------------------------------------


def encode_delta(kind: int, base: bytes, target: bytes, ops: Sequence[Op]) -> bytes:
    """The delta that rebuilds ``target`` from ``base`` with ``ops`` (checked, then serialized).

    Raises :class:`ValueError` if the ops do not cover the target exactly or read outside the base
    (a bug in the producer, not hostile input).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown delta kind {kind}")
    table = bytearray()
    literals = lzma.LZMACompressor(format=lzma.FORMAT_XZ, preset=_PRESET)
    packed: list[bytes] = []
    at = literal_bytes = 0
    for op in ops:
        if op.length <= 0 or op.code not in (COPY, INSERT, XOR):
            raise ValueError(f"bad op {op}")
        if op.code != INSERT and op.offset + op.length > len(base):
            raise ValueError(f"op {op} reads past the base's {len(base)} bytes")
        piece = target[at:at + op.length]
        if op.code == COPY and base[op.offset:op.offset + op.length] != piece:
            raise ValueError(f"COPY op {op} does not match the target at {at}")
        if op.code == INSERT:
            packed.append(literals.compress(piece))
            literal_bytes += op.length
        elif op.code == XOR:
            packed.append(literals.compress(_xor(piece, base[op.offset:op.offset + op.length])))
            literal_bytes += op.length
        table += _OP.pack(op.code, op.offset if op.code != INSERT else 0, op.length)
        at += op.length
    if at != len(target):
        raise ValueError(f"the ops cover {at} of the target's {len(target)} bytes")
    packed.append(literals.flush())
    op_table = lzma.compress(bytes(table), format=lzma.FORMAT_XZ, preset=_PRESET)
    header = _HEADER.pack(MAGIC, VERSION, kind, hashlib.sha256(base).digest(), len(base),
                          hashlib.sha256(target).digest(), len(target), len(ops), len(op_table),
                          literal_bytes)
    return header + op_table + b"".join(packed)


def _xor(a: bytes, b: bytes) -> bytes:
    n = len(a)
    return (int.from_bytes(a, "little") ^ int.from_bytes(b, "little")).to_bytes(n, "little")


# --- reading (device side) ------------------------------------------------------------------------


def _corrupt(what: str) -> DeltaError:
    return DeltaError(f"the delta file is corrupt: {what}; fetch the full file instead",
                      reason=DELTA_CORRUPT)


def read_header(delta: BinaryIO, limits: DeltaLimits = DEFAULT_DELTA_LIMITS) -> DeltaHeader:
    """Read and check the header at the delta's current position (caps included)."""
    raw = delta.read(_HEADER.size)
    if len(raw) != _HEADER.size:
        raise _corrupt(f"{len(raw)} bytes, shorter than the {_HEADER.size}-byte header")
    (magic, version, kind, base_sha, base_len, target_sha, target_len, op_count, table_size,
     literal_bytes) = _HEADER.unpack(raw)
    if magic != MAGIC:
        raise _corrupt("it does not start with the delta magic")
    if version != VERSION:
        raise DeltaError(f"delta format version {version} is not supported (this side reads "
                         f"{VERSION}); upgrade the agent or fetch the full file",
                         reason=DELTA_CORRUPT)
    if kind not in KINDS:
        raise _corrupt(f"unknown kind {kind}")
    if target_len > limits.max_target_bytes:
        raise DeltaError(f"the delta rebuilds {target_len} bytes; the cap is "
                         f"{limits.max_target_bytes}; fetch the full file instead",
                         reason=DELTA_TOO_LARGE)
    if op_count > limits.max_ops or table_size > 64 + 2 * _OP.size * op_count:
        raise DeltaError(f"the delta has {op_count} ops in {table_size} bytes; the cap is "
                         f"{limits.max_ops} ops; fetch the full file instead",
                         reason=DELTA_TOO_LARGE)
    if literal_bytes > target_len or (op_count == 0) != (target_len == 0):
        raise _corrupt("its op and byte counts contradict its target length")
    return DeltaHeader(kind, base_sha.hex(), base_len, target_sha.hex(), target_len, op_count,
                       table_size, literal_bytes)


def _read_ops(delta: BinaryIO, header: DeltaHeader) -> list[Op]:
    compressed = delta.read(header.op_table_size)
    if len(compressed) != header.op_table_size:
        raise _corrupt("the op table is cut short")
    size = header.op_count * _OP.size
    decoder = lzma.LZMADecompressor(format=lzma.FORMAT_XZ, memlimit=_MEMLIMIT)
    try:
        table = decoder.decompress(compressed, max_length=size + 1)
    except lzma.LZMAError as exc:
        raise _corrupt(f"the op table does not decompress ({exc})") from None
    if len(table) != size or not decoder.eof or decoder.unused_data:
        raise _corrupt(f"the op table is not {header.op_count} ops")
    ops: list[Op] = []
    at = literals = 0
    for code, offset, length in _OP.iter_unpack(table):
        if code not in (COPY, INSERT, XOR) or length == 0 or length > header.target_length - at:
            raise _corrupt(f"op {len(ops)} ({code}, {offset}, {length}) does not fit the target")
        if code == INSERT:
            if offset:
                raise _corrupt(f"INSERT op {len(ops)} names a base offset")
            literals += length
        else:
            if offset > header.base_length or length > header.base_length - offset:
                raise _corrupt(f"op {len(ops)} reads past the base's {header.base_length} bytes")
            literals += length if code == XOR else 0
        ops.append(Op(code, offset, length))
        at += length
    if at != header.target_length or literals != header.literal_bytes:
        raise _corrupt("its ops do not add up to its target length and literal count")
    return ops


class _Literals:
    """The literal stream, decompressed on demand in bounded pieces."""

    def __init__(self, delta: BinaryIO) -> None:
        self.delta = delta
        self.decoder = lzma.LZMADecompressor(format=lzma.FORMAT_XZ, memlimit=_MEMLIMIT)

    def take(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            out += self._next(n - len(out), "the literal bytes are cut short")
        return bytes(out)

    def _next(self, n: int, short: str) -> bytes:
        if self.decoder.eof:
            raise _corrupt("the literal bytes end early")
        if self.decoder.needs_input:
            chunk = self.delta.read(_CHUNK)
            if not chunk:
                raise _corrupt(short)
        else:
            chunk = b""
        try:
            return self.decoder.decompress(chunk, max_length=n)
        except lzma.LZMAError as exc:
            raise _corrupt(f"the literal bytes do not decompress ({exc})") from None

    def finish(self) -> None:
        """Refuse anything after the literals: extra output or trailing bytes."""
        while not self.decoder.eof:
            if self._next(1, "the literal stream is cut short"):
                raise _corrupt("it holds more literal bytes than its ops use")
        if self.decoder.unused_data or self.delta.read(1):
            raise _corrupt("bytes follow the end of the delta")


def _base_digest(base: BinaryIO) -> tuple[str, int]:
    base.seek(0)
    digest, length = hashlib.sha256(), 0
    for block in iter(lambda: base.read(_CHUNK), b""):
        digest.update(block)
        length += len(block)
    return digest.hexdigest(), length


def _read_base(base: BinaryIO, offset: int, length: int) -> Iterable[bytes]:
    base.seek(offset)
    while length:
        block = base.read(min(length, _CHUNK))
        if not block:
            raise DeltaError("the base file shrank while the delta was applied; fetch the full "
                             "file instead", reason=DELTA_BASE_MISMATCH)
        length -= len(block)
        yield block


def apply_delta(
    base: BinaryIO,
    delta: BinaryIO,
    out: BinaryIO,
    *,
    expected_sha256: Optional[str] = None,
    expected_length: Optional[int] = None,
    limits: DeltaLimits = DEFAULT_DELTA_LIMITS,
) -> DeltaHeader:
    """Rebuild the target from ``base`` (seekable) and ``delta`` (read from its current position)
    into ``out``, streaming; returns the delta's header.

    ``expected_sha256``/``expected_length`` are the target's signed manifest entry: a delta made
    for another file, or longer than the signed length, is refused before anything is written.
    Raises :class:`~fleetlite.sdk.errors.DeltaError` with ``reason`` ``delta_too_large``,
    ``delta_corrupt``, ``delta_base_mismatch`` (``base`` is not the file the delta was made
    from) or ``delta_target_mismatch``; ``out`` may then hold a partial file, which the caller
    discards.
    """
    header = read_header(delta, limits)
    if expected_length is not None and header.target_length > expected_length:
        raise DeltaError(f"the delta rebuilds {header.target_length} bytes but the signed file "
                         f"has {expected_length}; fetch the full file instead",
                         reason=DELTA_TOO_LARGE)
    if expected_sha256 is not None and (header.target_sha256 != expected_sha256
                                        or header.target_length != expected_length):
        raise DeltaError("the delta rebuilds a different file than the signed one; fetch the "
                         "full file instead", reason=DELTA_TARGET_MISMATCH)
    base_sha, base_len = _base_digest(base)
    if (base_sha, base_len) != (header.base_sha256, header.base_length):
        raise DeltaError(f"the delta was made from a base with sha256 {header.base_sha256[:12]}…, "
                         f"not this one ({base_sha[:12]}…); fetch the full file instead",
                         reason=DELTA_BASE_MISMATCH)
    ops = _read_ops(delta, header)
    literals = _Literals(delta)
    digest = hashlib.sha256()
    for op in ops:
        if op.code == COPY:
            for block in _read_base(base, op.offset, op.length):
                digest.update(block)
                out.write(block)
            continue
        done = 0
        while done < op.length:
            n = min(op.length - done, _CHUNK)
            piece = literals.take(n)
            if op.code == XOR:
                piece = _xor(piece, b"".join(_read_base(base, op.offset + done, n)))
            digest.update(piece)
            out.write(piece)
            done += n
    literals.finish()
    if digest.hexdigest() != header.target_sha256:
        raise DeltaError("the rebuilt file's sha256 is not the one the delta promises; fetch "
                         "the full file instead", reason=DELTA_TARGET_MISMATCH)
    return header


def apply_delta_bytes(base: bytes, delta: bytes, *,
                      limits: DeltaLimits = DEFAULT_DELTA_LIMITS) -> bytes:
    """In-memory :func:`apply_delta` (tests, tools and the release builder's self-check)."""
    import io

    out = io.BytesIO()
    apply_delta(io.BytesIO(base), io.BytesIO(delta), out, limits=limits)
    return out.getvalue()
