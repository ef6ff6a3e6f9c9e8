"""Fuzzing of the delta reader (:func:`fleetlite.sdk.delta.apply_delta`): arbitrary bytes and
damaged valid deltas (of a real int8 model's fine-tune, both kinds) never raise anything but
:class:`DeltaError`, never hang, and whatever they do rebuild is the target, byte for byte."""

from __future__ import annotations

import functools
import io

from hypothesis import given
from hypothesis import strategies as st

from fleetlite.fleet.delta_diff import binary_ops, tensor_ops
from fleetlite.sdk.delta import KIND_BINARY, KIND_TENSORS, MAGIC, apply_delta, encode_delta
from fleetlite.sdk.errors import DELTA_REASONS, DeltaError
from tests.delta_fixtures import small_pair
from tests.fuzz_settings import corrupted, fuzz, parse_or_refuse


@functools.cache
def deltas() -> tuple[bytes, bytes, bytes, bytes]:
    base, target = small_pair()
    return (base, target, encode_delta(KIND_TENSORS, base, target, tensor_ops(base, target)),
            encode_delta(KIND_BINARY, base, target, binary_ops(base, target)))


def _check(exc: BaseException) -> None:
    assert isinstance(exc, DeltaError) and exc.reason in DELTA_REASONS


def _apply(base: bytes, delta: bytes) -> bytes:
    out = io.BytesIO()
    apply_delta(io.BytesIO(base), io.BytesIO(delta), out)
    return out.getvalue()


@fuzz(300)
@given(blob=st.binary(max_size=512) | st.binary(max_size=200).map(lambda b: MAGIC + b))
def test_arbitrary_bytes_are_refused(blob: bytes) -> None:
    base, _, _, _ = deltas()
    assert parse_or_refuse(lambda: _apply(base, blob), DeltaError, _check) is None


@fuzz(400)
@given(data=st.data(), which=st.sampled_from([2, 3]))
def test_damaged_deltas_rebuild_the_target_or_are_refused(data: st.DataObject,
                                                          which: int) -> None:
    base, target, *_ = deltas()
    delta = deltas()[which]
    # landmarks: the header's fields, the op table's start
    damaged = data.draw(corrupted(delta, landmarks=(0, 8, 10, 12, 44, 52, 84, 92, 96, 100, 108)))
    rebuilt = parse_or_refuse(lambda: _apply(base, damaged), DeltaError, _check)
    assert rebuilt is None or rebuilt == target


U64 = st.integers(0, 2**64 - 1)
SMALL = st.integers(0, 300)


@fuzz(300)
@given(ops=st.lists(st.tuples(st.integers(0, 255), st.one_of(SMALL, U64), st.one_of(SMALL, U64)),
                    max_size=8),
       literals=st.binary(max_size=300), target_length=st.one_of(SMALL, U64),
       literal_count=st.one_of(SMALL, U64), extra=st.binary(max_size=4))
def test_well_compressed_hostile_op_tables_are_refused(
        ops: list[tuple[int, int, int]], literals: bytes, target_length: int, literal_count: int,
        extra: bytes) -> None:
    """Past the xz checks: op tables and literals that decompress fine but lie."""
    import hashlib
    import lzma
    import struct

    base, *_ = deltas()
    table = b"".join(struct.pack("<BQQ", *op) for op in ops) + extra
    packed = lzma.compress(table, format=lzma.FORMAT_XZ)
    header = struct.pack("<8sHH32sQ32sQIIQ", MAGIC, 1, 2, hashlib.sha256(base).digest(),
                         len(base), b"\x00" * 32, target_length % 2**64, len(ops), len(packed),
                         literal_count)
    blob = header + packed + lzma.compress(literals, format=lzma.FORMAT_XZ)
    assert parse_or_refuse(lambda: _apply(base, blob), DeltaError, _check) is None
