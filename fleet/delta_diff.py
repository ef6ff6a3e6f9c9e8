"""Finding the ops of a delta (:mod:`fleetlite.sdk.delta`): by TFLite tensor buffers, or by block
matching for any file.

**By tensor buffers** (:func:`tensor_ops`): both ``.tflite`` files are read with
:func:`~fleetlite.sdk.runtime.model_bounds.buffer_spans`. A target buffer whose bytes appear as a
base buffer is one COPY; a changed buffer is XORed against the base buffer of the same index when
it has the same size (a fine-tune keeps every tensor's shape and the exporter's buffer order), so
its unchanged values become zero bytes; any other buffer is inserted. The bytes between buffers
(the flatbuffer's tables: names, shapes, quantization, operators) go through the block matcher.

**By block matching** (:func:`binary_ops`, any file): the base's aligned ``BLOCK``-byte blocks are
indexed by a weak rolling checksum (rsync's idea: a sum and a position-weighted sum, here computed
for every target offset at once with numpy prefix sums), every target offset whose checksum hits
is confirmed byte for byte, and a confirmed match is extended forwards as far as the bytes agree.
The gap between two matches is XORed against the base bytes that follow the previous match when at
least a third of them are equal (bsdiff's observation: edited regions stay roughly in place),
and inserted otherwise.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from fleetlite.sdk.delta import COPY, INSERT, XOR, Op
from fleetlite.sdk.runtime.model_bounds import BoundsError, buffer_spans

__all__ = ["BLOCK", "BlockIndex", "binary_ops", "merge_ops", "tensor_ops"]

BLOCK = 32
_EXTEND = 4096
_XOR_MIN_EQUAL = 1 / 3
U8 = npt.NDArray[np.uint8]
I64 = npt.NDArray[np.int64]


def _weak(a: I64, b: I64) -> I64:
    result: I64 = a + (b << np.int64(16))
    return result


class BlockIndex:
    """The base's aligned blocks by weak checksum, for matching any range of a target."""

    def __init__(self, base: bytes, block: int = BLOCK) -> None:
        self.base = base
        self.block = block
        self.base_arr: U8 = np.frombuffer(base, dtype=np.uint8)
        count = len(base) // block
        blocks = self.base_arr[:count * block].reshape(count, block).astype(np.int64)
        weights = np.arange(block, 0, -1, dtype=np.int64)
        hashes = _weak(blocks.sum(axis=1), blocks @ weights)
        self.offsets: dict[int, int] = {}
        for j, h in enumerate(hashes.tolist()):
            self.offsets.setdefault(h, j * block)
        self.keys: I64 = np.fromiter(self.offsets, dtype=np.int64, count=len(self.offsets))

    def _rolling(self, window: U8) -> I64:
        """The weak checksum of every ``block``-byte window of ``window``."""
        n, x = self.block, window.astype(np.int64)
        k = np.arange(len(x), dtype=np.int64)
        s = np.concatenate(([0], np.cumsum(x)))
        t = np.concatenate(([0], np.cumsum(k * x)))
        p = np.arange(len(x) - n + 1, dtype=np.int64)
        a = s[n:] - s[:-n]
        b = (p + n) * a - (t[n:] - t[:-n])
        return _weak(a, b)

    def _extend(self, target: U8, at: int, offset: int, end: int) -> int:
        """How many bytes from ``target[at]`` equal the base from ``offset`` (up to ``end``)."""
        length = 0
        while at + length < end and offset + length < len(self.base):
            n = min(_EXTEND, end - at - length, len(self.base) - offset - length)
            same = target[at + length:at + length + n] == self.base_arr[
                offset + length:offset + length + n]
            if not same.all():
                return length + int(np.argmin(same))
            length += n
        return length

    def ops(self, target: bytes, start: int = 0, end: int | None = None) -> list[Op]:
        """Ops that produce ``target[start:end]``."""
        end = len(target) if end is None else end
        arr: U8 = np.frombuffer(target, dtype=np.uint8)
        ops: list[Op] = []
        gap_start, resume = start, start  # resume: base offset after the last match
        if end - start >= self.block and len(self.keys):
            hits = self._rolling(arr[start:end])
            candidates = np.flatnonzero(np.isin(hits, self.keys)) + start
            pos = 0
            while pos < len(candidates):
                at = int(candidates[pos])
                offset = self.offsets[int(hits[at - start])]
                length = self._extend(arr, at, offset, end)
                if length < self.block:
                    pos += 1
                    continue
                ops += self._gap(arr, gap_start, at, resume)
                ops.append(Op(COPY, offset, length))
                gap_start, resume = at + length, offset + length
                pos = int(np.searchsorted(candidates, gap_start))
        ops += self._gap(arr, gap_start, end, resume)
        return ops

    def _gap(self, target: U8, start: int, end: int, offset: int) -> list[Op]:
        n = end - start
        if n <= 0:
            return []
        if offset + n <= len(self.base):
            equal = int(np.count_nonzero(target[start:end] == self.base_arr[offset:offset + n]))
            if equal >= _XOR_MIN_EQUAL * n:
                return [Op(XOR, offset, n)]
        return [Op(INSERT, 0, n)]


def merge_ops(ops: Sequence[Op]) -> list[Op]:
    """Join neighbours that continue each other (fewer ops, same bytes)."""
    merged: list[Op] = []
    for op in ops:
        if merged:
            last = merged[-1]
            if op.code == last.code and (op.code == INSERT
                                         or op.offset == last.offset + last.length):
                merged[-1] = Op(last.code, last.offset, last.length + op.length)
                continue
        merged.append(op)
    return merged


def binary_ops(base: bytes, target: bytes) -> list[Op]:
    """Ops that rebuild any ``target`` from ``base`` by block matching."""
    return merge_ops(BlockIndex(base).ops(target))


def tensor_ops(base: bytes, target: bytes) -> list[Op]:
    """Ops that rebuild the ``.tflite`` ``target`` from the ``.tflite`` ``base``, buffer by buffer.

    Raises :class:`ValueError` if either file is not a readable TFLite flatbuffer.
    """
    try:
        base_spans, target_spans = buffer_spans(base), buffer_spans(target)
    except BoundsError as exc:
        raise ValueError(f"not a TFLite model: {exc}") from None
    by_content = {hashlib.sha256(base[s:s + n]).digest(): s for _, s, n in base_spans}
    by_index = {i: (s, n) for i, s, n in base_spans}
    index = BlockIndex(base)
    ops: list[Op] = []
    at = 0
    for i, start, length in sorted(target_spans, key=lambda span: span[1]):
        if start < at:
            raise ValueError("the model's buffers overlap")
        ops += index.ops(target, at, start)
        same = by_content.get(hashlib.sha256(target[start:start + length]).digest())
        if same is not None:
            ops.append(Op(COPY, same, length))
        elif by_index.get(i, (0, -1))[1] == length:
            ops.append(Op(XOR, by_index[i][0], length))
        else:
            ops.append(Op(INSERT, 0, length))
        at = start + length
    ops += index.ops(target, at, len(target))
    return merge_ops(ops)
