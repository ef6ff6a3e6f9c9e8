"""Smoke-test vectors: known inputs and the outputs a release's model must reproduce on device.

File format (JSON, one of the release's signed files, role ``smoke``)::

    {"_type": "fleetlite.smoke", "spec_version": 1,
     "cases": [{"inputs":  [{"name": "x", "dtype": "float32", "shape": [1, 4], "data": "<b64>"}],
                "outputs": [{"name": "y", "dtype": "float32", "shape": [1, 2], "data": "<b64>"}]}]}

``data`` is the base64 of the raw tensor bytes, little-endian, C order; inputs and outputs are
listed in the model's order. :func:`compare_outputs` is pure: the caller runs the model (in an
isolated process on the device) and passes what came out.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

import numpy as np
import numpy.typing as npt

from fleetlite.sdk.envelope import strict_json_loads
from fleetlite.sdk.errors import MalformedError, OversizeError
from fleetlite.sdk.manifest import DTYPES, ModelInfo, TensorInfo, Tolerance

__all__ = [
    "LSB_DTYPES",
    "MAX_SMOKE_BYTES",
    "SMOKE_TYPE",
    "SmokeCase",
    "SmokeVectors",
    "Tensor",
    "check_vectors_match_model",
    "compare_outputs",
    "run_smoke",
]

SMOKE_TYPE = "fleetlite.smoke"
SPEC_VERSION = 1
MAX_SMOKE_BYTES = 4 * 1024 * 1024
MAX_CASES = 16
# Quantized integer outputs may differ by a few steps between kernels (x86 vs ARM, XNNPACK vs
# reference); other integer and bool outputs (indices, flags) must match exactly.
LSB_DTYPES = ("int8", "uint8", "int16")
_MAX_ELEMENTS = 1 << 22

Array = npt.NDArray[Any]
Outputs = Union[Mapping[str, Any], Sequence[Any]]


@dataclass(frozen=True, eq=False)
class Tensor:
    """A named tensor value."""

    name: str
    array: Array

    def to_dict(self) -> dict[str, Any]:
        array = np.ascontiguousarray(self.array)
        little = array.astype(array.dtype.newbyteorder("<"), copy=False)
        return {
            "name": self.name,
            "dtype": array.dtype.name,
            "shape": list(array.shape),
            "data": base64.b64encode(little.tobytes()).decode("ascii"),
        }

    @classmethod
    def from_dict(cls, data: Any, what: str) -> Tensor:
        if not isinstance(data, dict) or set(data) != {"name", "dtype", "shape", "data"}:
            raise _bad(f"{what} must be an object with name, dtype, shape, data")
        name, dtype, shape, payload = data["name"], data["dtype"], data["shape"], data["data"]
        if not isinstance(name, str) or not name:
            raise _bad(f"{what}.name must be a non-empty string")
        if dtype not in DTYPES:
            raise _bad(f"{what}.dtype must be one of {list(DTYPES)}")
        if (not isinstance(shape, list) or len(shape) > 8
                or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                           for d in shape)):
            raise _bad(f"{what}.shape must be a list of at most 8 non-negative integers")
        count = math.prod(shape)
        # Zero dimensions included: numpy cannot shape even an empty array as [0, 2**70].
        if math.prod(d for d in shape if d) > _MAX_ELEMENTS:
            raise _bad(f"{what} has more than {_MAX_ELEMENTS} elements (counting the non-zero "
                       "dimensions of its shape)")
        if not isinstance(payload, str):
            raise _bad(f"{what}.data must be a base64 string")
        try:
            raw = base64.b64decode(payload.encode("ascii"), validate=True)
        except (binascii.Error, ValueError):
            raise _bad(f"{what}.data is not base64") from None
        np_dtype = np.dtype(dtype).newbyteorder("<")
        if len(raw) != count * np_dtype.itemsize:
            raise _bad(f"{what}.data holds {len(raw)} bytes; shape {shape} of {dtype} needs "
                       f"{count * np_dtype.itemsize}")
        array = np.frombuffer(raw, dtype=np_dtype).astype(np.dtype(dtype)).reshape(shape)
        return cls(name, array)


@dataclass(frozen=True, eq=False)
class SmokeCase:
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]

    def input_arrays(self) -> list[Array]:
        return [t.array for t in self.inputs]


@dataclass(frozen=True, eq=False)
class SmokeVectors:
    """The cases of a smoke file."""

    cases: tuple[SmokeCase, ...]

    def to_json(self) -> bytes:
        data = {
            "_type": SMOKE_TYPE,
            "spec_version": SPEC_VERSION,
            "cases": [
                {"inputs": [t.to_dict() for t in case.inputs],
                 "outputs": [t.to_dict() for t in case.outputs]}
                for case in self.cases
            ],
        }
        return (json.dumps(data, sort_keys=True, separators=(",", ":")) + "\n").encode()

    @classmethod
    def from_json(cls, payload: bytes, *, max_bytes: int = MAX_SMOKE_BYTES) -> SmokeVectors:
        """Parse a smoke file (verify its hash with the manifest first)."""
        if len(payload) > max_bytes:
            raise OversizeError(f"smoke file of {len(payload)} bytes exceeds {max_bytes} bytes")
        try:
            data = strict_json_loads(payload)
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise _bad("not UTF-8 JSON") from None
        if not isinstance(data, dict) or set(data) != {"_type", "spec_version", "cases"}:
            raise _bad("expected exactly the fields _type, spec_version, cases")
        if data["_type"] != SMOKE_TYPE or type(data["spec_version"]) is not int or (
                data["spec_version"] != SPEC_VERSION):  # not true, not 1.0
            raise _bad(f"not a {SMOKE_TYPE} spec_version {SPEC_VERSION} file")
        cases = data["cases"]
        if not isinstance(cases, list) or not 0 < len(cases) <= MAX_CASES:
            raise _bad(f"cases must be a list of 1-{MAX_CASES} cases")
        parsed = []
        for i, case in enumerate(cases):
            if not isinstance(case, dict) or set(case) != {"inputs", "outputs"}:
                raise _bad(f"cases[{i}] must be an object with inputs and outputs")
            tensors = []
            for kind in ("inputs", "outputs"):
                items = case[kind]
                if not isinstance(items, list) or not 0 < len(items) <= 64:
                    raise _bad(f"cases[{i}].{kind} must be a list of 1-64 tensors")
                tensors.append(tuple(Tensor.from_dict(t, f"cases[{i}].{kind}[{j}]")
                                     for j, t in enumerate(items)))
            parsed.append(SmokeCase(tensors[0], tensors[1]))
        return cls(tuple(parsed))


def _bad(message: str) -> MalformedError:
    return MalformedError(f"smoke vectors: {message}")


def check_vectors_match_model(vectors: SmokeVectors, model: ModelInfo) -> list[str]:
    """Problems if the vectors' tensors do not match the manifest's model description."""
    problems: list[str] = []
    for i, case in enumerate(vectors.cases):
        for kind, have, want in (("input", case.inputs, model.inputs),
                                 ("output", case.outputs, model.outputs)):
            if len(have) != len(want):
                problems.append(f"case {i}: {len(have)} {kind}s, the model has {len(want)}")
                continue
            for tensor, spec in zip(have, want):
                problems.extend(f"case {i}: {p}" for p in _spec_problems(kind, tensor, spec))
    return problems


def _spec_problems(kind: str, tensor: Tensor, spec: TensorInfo) -> list[str]:
    problems = []
    if tensor.name != spec.name:
        problems.append(f"{kind} {tensor.name!r} is {spec.name!r} in the model")
    if tensor.array.dtype.name != spec.dtype:
        problems.append(f"{kind} {spec.name!r} is {tensor.array.dtype.name}, model {spec.dtype}")
    signature = spec.shape_signature or spec.shape
    shape = tensor.array.shape
    if len(shape) != len(signature) or any(w not in (-1, g) for w, g in zip(signature, shape)):
        problems.append(f"{kind} {spec.name!r} has shape {list(shape)}, model "
                        f"{list(signature)}")
    return problems


def compare_outputs(
    expected: Sequence[Tensor], actual: Outputs, tolerance: Tolerance
) -> list[str]:
    """Problems (empty if none) comparing a model's outputs with the expected ones.

    ``actual`` is a mapping name -> array (what ``Model.run`` returns) or a sequence in model
    order. Float outputs: ``|a - e| <= atol + rtol * |e|`` elementwise (numpy ``allclose``);
    int8/uint8/int16: ``|a - e| <= max_lsb``; other integers and bool: exact.
    """
    if isinstance(actual, Mapping):
        missing = [t.name for t in expected if t.name not in actual]
        if missing:
            return [f"output(s) {missing} missing; got {sorted(actual)}"]
        arrays = [np.asarray(actual[t.name]) for t in expected]
    else:
        if len(actual) != len(expected):
            return [f"{len(actual)} outputs, expected {len(expected)}"]
        arrays = [np.asarray(a) for a in actual]
    problems: list[str] = []
    for want, got in zip(expected, arrays):
        problem = _compare_one(want.name, want.array, got, tolerance)
        if problem:
            problems.append(problem)
    return problems


def _compare_one(name: str, want: Array, got: Array, tolerance: Tolerance) -> str:
    if got.dtype != want.dtype:
        return f"output {name!r}: dtype {got.dtype.name}, expected {want.dtype.name}"
    if got.shape != want.shape:
        return f"output {name!r}: shape {list(got.shape)}, expected {list(want.shape)}"
    if want.size == 0:
        return ""
    if np.issubdtype(want.dtype, np.floating):
        e = want.astype(np.float64)
        a = got.astype(np.float64)
        ok = np.isclose(a, e, atol=tolerance.atol, rtol=tolerance.rtol, equal_nan=True)
        rule = f"atol={tolerance.atol:g} rtol={tolerance.rtol:g}"
    else:
        diff_int = np.abs(got.astype(np.int64) - want.astype(np.int64))
        limit = tolerance.max_lsb if want.dtype.name in LSB_DTYPES else 0
        ok = diff_int <= limit
        e, a = want.astype(np.float64), got.astype(np.float64)
        rule = f"max_lsb={limit}"
    if bool(ok.all()):
        return ""
    diff = np.where(ok, 0.0, np.abs(np.nan_to_num(a - e, nan=np.inf)))
    worst = np.unravel_index(int(np.argmax(diff)), diff.shape)
    return (f"output {name!r}: {int((~ok).sum())} of {ok.size} values differ beyond {rule} "
            f"(worst at {list(map(int, worst))}: got {float(a[worst]):.6g}, expected "
            f"{float(e[worst]):.6g})")


def run_smoke(
    vectors: SmokeVectors, run: Callable[[list[Array]], Outputs], tolerance: Tolerance
) -> list[str]:
    """Run every case through ``run`` (inputs in model order -> outputs) and compare."""
    problems: list[str] = []
    for i, case in enumerate(vectors.cases):
        problems.extend(f"case {i}: {p}"
                        for p in compare_outputs(case.outputs, run(case.input_arrays()),
                                                 tolerance))
    return problems
