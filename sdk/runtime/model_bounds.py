"""A structural bounds check of a ``.tflite`` flatbuffer, in pure Python, before any interpreter.

tflite-runtime does not verify the flatbuffer: a truncated file either crashes the interpreter or,
when only weight bytes are cut off, loads and runs on whatever memory follows the buffer. This walks
the parts of the TFLite schema the interpreter dereferences (operator codes, subgraphs, tensors,
operators, buffers) and checks that every offset, vector and index lies inside the file. It is a
cheap first line; the isolated check (:mod:`fleetlite.sdk.runtime.isolated`) remains the crash
barrier and the manifest's sha256 the integrity check.
"""

from __future__ import annotations

import struct

MAX_VECTOR_LENGTH = 1 << 28

# Field numbers from tensorflow/lite/schema/schema.fbs
MODEL_OPERATOR_CODES, MODEL_SUBGRAPHS, MODEL_BUFFERS = 1, 2, 4
SUBGRAPH_TENSORS, SUBGRAPH_INPUTS, SUBGRAPH_OUTPUTS, SUBGRAPH_OPERATORS = 0, 1, 2, 3
TENSOR_SHAPE, TENSOR_BUFFER, TENSOR_NAME = 0, 2, 3
OPERATOR_OPCODE_INDEX, OPERATOR_INPUTS, OPERATOR_OUTPUTS = 0, 1, 2
BUFFER_DATA, BUFFER_OFFSET, BUFFER_SIZE = 0, 1, 2


class BoundsError(ValueError):
    """The flatbuffer points outside the file or has inconsistent indices."""


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.size = len(data)

    def need(self, pos: int, length: int, what: str) -> None:
        if pos < 0 or length < 0 or pos + length > self.size:
            raise BoundsError(
                f"{what} at byte {pos} (+{length}) lies outside the {self.size}-byte file"
            )

    def u16(self, pos: int, what: str) -> int:
        self.need(pos, 2, what)
        return int(struct.unpack_from("<H", self.data, pos)[0])

    def u32(self, pos: int, what: str) -> int:
        self.need(pos, 4, what)
        return int(struct.unpack_from("<I", self.data, pos)[0])

    def i32(self, pos: int, what: str) -> int:
        self.need(pos, 4, what)
        return int(struct.unpack_from("<i", self.data, pos)[0])

    def u64(self, pos: int, what: str) -> int:
        self.need(pos, 8, what)
        return int(struct.unpack_from("<Q", self.data, pos)[0])

    def table(self, pos: int, what: str) -> _Table:
        vtable = pos - self.i32(pos, f"{what} table")
        vt_size = self.u16(vtable, f"{what} vtable")
        table_size = self.u16(vtable + 2, f"{what} vtable")
        if vt_size < 4 or vt_size % 2:
            raise BoundsError(f"{what} has a malformed vtable")
        self.need(vtable, vt_size, f"{what} vtable")
        self.need(pos, table_size, f"{what} table")
        return _Table(self, pos, vtable, vt_size, what)

    def vector(self, pos: int, elem_size: int, what: str) -> tuple[int, int]:
        """(start of elements, length) of the vector whose offset field is at ``pos``."""
        start = pos + self.u32(pos, what)
        length = self.u32(start, f"{what} length")
        if length > MAX_VECTOR_LENGTH:
            raise BoundsError(f"{what} claims {length} elements")
        self.need(start + 4, length * elem_size, what)
        return start + 4, length


class _Table:
    def __init__(self, reader: _Reader, pos: int, vtable: int, vt_size: int, what: str) -> None:
        self.r, self.pos, self.vtable, self.vt_size, self.what = reader, pos, vtable, vt_size, what

    def field(self, index: int) -> int | None:
        slot = 4 + 2 * index
        if slot >= self.vt_size:
            return None
        offset = self.r.u16(self.vtable + slot, self.what)
        return self.pos + offset if offset else None

    def vector(self, index: int, elem_size: int, name: str) -> tuple[int, int]:
        pos = self.field(index)
        if pos is None:
            return 0, 0
        return self.r.vector(pos, elem_size, f"{self.what}.{name}")

    def tables(self, index: int, name: str) -> list[_Table]:
        start, length = self.vector(index, 4, name)
        return [
            self.r.table(start + 4 * i + self.r.u32(start + 4 * i, name), f"{name}[{i}]")
            for i in range(length)
        ]

    def int_vector(self, index: int, name: str) -> list[int]:
        start, length = self.vector(index, 4, name)
        return [self.r.i32(start + 4 * i, name) for i in range(length)]

    def u32_field(self, index: int, default: int = 0) -> int:
        pos = self.field(index)
        return default if pos is None else self.r.u32(pos, self.what)

    def u64_field(self, index: int) -> int:
        pos = self.field(index)
        return 0 if pos is None else self.r.u64(pos, self.what)


def check_model_bounds(content: bytes) -> None:
    """Raise :class:`BoundsError` if the TFLite flatbuffer references bytes it does not have."""
    r = _Reader(content)
    model = r.table(r.u32(0, "root offset"), "model")
    opcodes = model.tables(MODEL_OPERATOR_CODES, "operator_codes")
    buffers = model.tables(MODEL_BUFFERS, "buffers")
    for i, buf in enumerate(buffers):
        buf.vector(BUFFER_DATA, 1, f"buffers[{i}].data")
        offset, size = buf.u64_field(BUFFER_OFFSET), buf.u64_field(BUFFER_SIZE)
        if offset > 1:  # external buffer data lives at an absolute file offset
            r.need(offset, size, f"buffers[{i}] external data")
    subgraphs = model.tables(MODEL_SUBGRAPHS, "subgraphs")
    if not subgraphs:
        raise BoundsError("the model has no subgraph")
    for g, graph in enumerate(subgraphs):
        tensors = graph.tables(SUBGRAPH_TENSORS, f"subgraphs[{g}].tensors")
        for t, tensor in enumerate(tensors):
            tensor.vector(TENSOR_SHAPE, 4, f"tensors[{t}].shape")
            tensor.vector(TENSOR_NAME, 1, f"tensors[{t}].name")
            if tensor.u32_field(TENSOR_BUFFER) >= max(len(buffers), 1):
                raise BoundsError(f"subgraphs[{g}].tensors[{t}] names a buffer that does not exist")
        indices = graph.int_vector(SUBGRAPH_INPUTS, "inputs") + graph.int_vector(
            SUBGRAPH_OUTPUTS, "outputs"
        )
        for o, op in enumerate(graph.tables(SUBGRAPH_OPERATORS, f"subgraphs[{g}].operators")):
            if op.u32_field(OPERATOR_OPCODE_INDEX) >= len(opcodes):
                raise BoundsError(f"subgraphs[{g}].operators[{o}] names an unknown operator code")
            indices += op.int_vector(OPERATOR_INPUTS, "inputs")
            indices += op.int_vector(OPERATOR_OUTPUTS, "outputs")
        bad = [i for i in indices if i < -1 or i >= len(tensors)]
        if bad:
            raise BoundsError(f"subgraphs[{g}] refers to tensor {bad[0]}, which does not exist")


def buffer_spans(content: bytes) -> list[tuple[int, int, int]]:
    """``(buffer index, start, length)`` in the file of every non-empty buffer's bytes.

    A buffer's bytes are either its ``data`` vector or, for a model over 2 GiB, an absolute
    ``offset``/``size`` pair. Raises :class:`BoundsError` if a span lies outside the file. Delta
    updates (:mod:`fleetlite.sdk.delta`) use the spans as anchors: a fine-tune changes the bytes
    inside them and leaves their boundaries where they were.
    """
    r = _Reader(content)
    model = r.table(r.u32(0, "root offset"), "model")
    spans = []
    for i, buf in enumerate(model.tables(MODEL_BUFFERS, "buffers")):
        start, length = buf.vector(BUFFER_DATA, 1, f"buffers[{i}].data")
        offset, size = buf.u64_field(BUFFER_OFFSET), buf.u64_field(BUFFER_SIZE)
        if offset > 1:
            r.need(offset, size, f"buffers[{i}] external data")
            start, length = offset, size
        if length:
            spans.append((i, start, length))
    return spans
