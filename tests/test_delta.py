"""Delta updates (``sdk/delta.py``, ``fleet/delta_diff.py``) on real models and their seeded
fine-tunes: the rebuilt bytes equal the target, a 10% fine-tune travels in at most 15% of the full
size, and every kind of bad delta is refused with its reason before or instead of a wrong file."""

from __future__ import annotations

import io
import struct
from typing import Callable

import numpy as np
import pytest

from fleetlite.fleet.delta_diff import binary_ops, tensor_ops
from fleetlite.sdk.delta import (
    KIND_BINARY,
    KIND_TENSORS,
    DeltaLimits,
    apply_delta,
    apply_delta_bytes,
    encode_delta,
    read_header,
)
from fleetlite.sdk.errors import DeltaError, UpdateRejected
from fleetlite.sdk.manifest import sha256_hex
from tests.delta_fixtures import int8_pair, lm_pair, small_pair

PAIRS: dict[str, Callable[[], tuple[bytes, bytes]]] = {
    "lm-rows": lambda: lm_pair("rows"),
    "lm-scattered": lambda: lm_pair("scattered"),
    "int8-rows": lambda: int8_pair("rows"),
    "int8-scattered": lambda: int8_pair("scattered"),
}
KINDS = {"tensors": (KIND_TENSORS, tensor_ops), "binary": (KIND_BINARY, binary_ops)}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("pair", PAIRS)
def test_a_ten_percent_fine_tune_travels_in_at_most_15_percent(pair: str, kind: str) -> None:
    base, target = PAIRS[pair]()
    changed = np.count_nonzero(np.frombuffer(base, np.uint8) != np.frombuffer(target, np.uint8))
    assert changed > 0.02 * len(target)  # the fine-tune really changed the weights
    code, find = KINDS[kind]
    delta = encode_delta(code, base, target, find(base, target))
    assert apply_delta_bytes(base, delta) == target
    assert len(delta) <= 0.15 * len(target), f"{len(delta)} of {len(target)} bytes"


def test_the_fine_tuned_int8_classifier_still_runs_in_the_interpreter() -> None:
    from fleetlite.sdk.runtime.interpreter import create_interpreter

    _, target = int8_pair()
    _, interpreter = create_interpreter(target, "the fine-tuned int8 classifier")
    interpreter.allocate_tensors()
    interpreter.invoke()


def test_any_file_rebuilds_by_block_matching_even_when_bytes_move() -> None:
    base, _ = lm_pair()
    target = base[:1000] + b"inserted" + base[1000:500_000] + base[600_000:] + b"tail"
    with pytest.raises(ValueError):
        tensor_ops(base, target)  # no longer a readable TFLite file: the fallback is needed
    delta = encode_delta(KIND_BINARY, base, target, binary_ops(base, target))
    assert apply_delta_bytes(base, delta) == target
    assert len(delta) < 2000


def test_the_header_says_what_the_delta_rebuilds() -> None:
    base, target = small_pair()
    header = read_header(io.BytesIO(encode_delta(KIND_TENSORS, base, target,
                                                 tensor_ops(base, target))))
    assert (header.base_sha256, header.base_length) == (sha256_hex(base), len(base))
    assert (header.target_sha256, header.target_length) == (sha256_hex(target), len(target))
    assert header.kind_name == "tensors"


def _delta() -> tuple[bytes, bytes, bytes]:
    base, target = small_pair()
    return base, target, encode_delta(KIND_TENSORS, base, target, tensor_ops(base, target))


def _with_header(delta: bytes, field: int, value: object) -> bytes:
    layout = struct.Struct("<8sHH32sQ32sQIIQ")
    fields = list(layout.unpack_from(delta))
    fields[field] = value
    return layout.pack(*fields) + delta[layout.size:]


HOSTILE = [
    # (case, how to spoil (base, delta), apply keyword arguments, reason)
    ("another base", lambda b, d: (b[:-1] + b"\x00", d), {}, "delta_base_mismatch"),
    ("a shorter base", lambda b, d: (b[:-10], d), {}, "delta_base_mismatch"),
    ("empty file", lambda b, d: (b, b""), {}, "delta_corrupt"),
    ("wrong magic", lambda b, d: (b, b"X" + d[1:]), {}, "delta_corrupt"),
    ("future version", lambda b, d: (b, _with_header(d, 1, 2)), {}, "delta_corrupt"),
    ("unknown kind", lambda b, d: (b, _with_header(d, 2, 9)), {}, "delta_corrupt"),
    ("truncated", lambda b, d: (b, d[:-20]), {}, "delta_corrupt"),
    ("cut in the op table", lambda b, d: (b, d[:130]), {}, "delta_corrupt"),
    ("trailing bytes", lambda b, d: (b, d + b"\x00"), {}, "delta_corrupt"),
    ("a flipped literal", lambda b, d: (b, d[:-40] + bytes([d[-40] ^ 1]) + d[-39:]), {},
     "delta_corrupt"),
    ("more ops than the cap", lambda b, d: (b, _with_header(d, 7, 1 << 30)), {},
     "delta_too_large"),
    ("a target over the cap", lambda b, d: (b, _with_header(d, 6, 1 << 40)), {},
     "delta_too_large"),
    ("a target longer than signed", lambda b, d: (b, d), {"expected_length": 100},
     "delta_too_large"),
    ("made for another file", lambda b, d: (b, d), {"expected_sha256": "0" * 64},
     "delta_target_mismatch"),
    ("promises other bytes", lambda b, d: (b, _with_header(d, 5, b"\x01" * 32)), {},
     "delta_target_mismatch"),
]


@pytest.mark.parametrize("case,spoil,kwargs,reason", HOSTILE, ids=[c[0] for c in HOSTILE])
def test_a_bad_delta_is_refused_with_its_reason(case: str, spoil: Callable[[bytes, bytes], tuple[
        bytes, bytes]], kwargs: dict[str, object], reason: str) -> None:
    base, target, delta = _delta()
    bad_base, bad_delta = spoil(base, delta)
    if "expected_sha256" in kwargs:
        kwargs = {**kwargs, "expected_length": len(target)}
    with pytest.raises(DeltaError) as caught:
        apply_delta(io.BytesIO(bad_base), io.BytesIO(bad_delta), io.BytesIO(), **kwargs)
    assert caught.value.reason == reason
    assert isinstance(caught.value, UpdateRejected)
    assert "fetch the full file" in str(caught.value)


def test_a_delta_for_the_signed_entry_applies() -> None:
    base, target, delta = _delta()
    out = io.BytesIO()
    apply_delta(io.BytesIO(base), io.BytesIO(delta), out, expected_sha256=sha256_hex(target),
                expected_length=len(target), limits=DeltaLimits(max_target_bytes=len(target)))
    assert out.getvalue() == target


def test_the_encoder_refuses_ops_that_do_not_rebuild_the_target() -> None:
    base, target = small_pair()
    ops = tensor_ops(base, target)
    with pytest.raises(ValueError):
        encode_delta(KIND_TENSORS, base, target + b"x", ops)
