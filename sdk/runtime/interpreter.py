"""One small interface over whichever TFLite interpreter is installed.

Backends, in the order they are tried: ``tflite-runtime`` (skipped under numpy 2, where it fails at
interpreter creation), ``ai-edge-litert`` (its maintained successor) and ``tensorflow.lite``.
``FLEETLITE_RUNTIME`` or the ``backend=`` argument picks one explicitly.

Loading untrusted bytes in this process is unsafe: a truncated model can crash the interpreter
with a segmentation fault. Files that have not passed
:func:`fleetlite.sdk.runtime.isolated.check_model` (which loads them in a subprocess) must not be
given to :func:`load_model` in a long-lived process.
"""

from __future__ import annotations

import importlib
import os
import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np
import numpy.typing as npt

from fleetlite.sdk.runtime.errors import (
    InferenceError,
    InputMismatchError,
    InvalidModelError,
    RuntimeMissingError,
    UnsupportedOpError,
)
from fleetlite.sdk.runtime.model_bounds import BoundsError, check_model_bounds
from fleetlite.sdk.runtime.native_log import runtime_log_filtered

BACKENDS = ("tflite-runtime", "ai-edge-litert", "tensorflow")
RUNTIME_ENV = "FLEETLITE_RUNTIME"
TFLITE_IDENTIFIER = b"TFL3"

ModelSource = Union[str, "os.PathLike[str]", bytes]
Array = npt.NDArray[Any]
InputsLike = Union[Mapping[str, Any], Sequence[Any], Array]


@dataclass(frozen=True)
class Backend:
    """An importable interpreter implementation."""

    name: str
    version: str
    interpreter_class: Any = field(repr=False, compare=False)


def _import_backend(name: str) -> Backend:
    from importlib import metadata

    if name == "tflite-runtime":
        if int(np.__version__.split(".")[0]) >= 2:
            raise RuntimeMissingError(
                f"tflite-runtime does not work with numpy {np.__version__} (it needs numpy<2). "
                "Install 'numpy<2', or use ai-edge-litert: pip install 'fleetlite[litert]' "
                f"and set {RUNTIME_ENV}=ai-edge-litert."
            )
        module = importlib.import_module("tflite_runtime.interpreter")
        return Backend(name, metadata.version("tflite-runtime"), module.Interpreter)
    if name == "ai-edge-litert":
        module = importlib.import_module("ai_edge_litert.interpreter")
        return Backend(name, metadata.version("ai-edge-litert"), module.Interpreter)
    if name == "tensorflow":
        tf = importlib.import_module("tensorflow")
        return Backend(name, str(tf.__version__), tf.lite.Interpreter)
    raise RuntimeMissingError(
        f"unknown TFLite backend {name!r}; choose one of: {', '.join(BACKENDS)}"
    )


def select_backend(name: str | None = None) -> Backend:
    """Return the backend named by ``name``, ``$FLEETLITE_RUNTIME``, or the first that imports."""
    wanted = name or os.environ.get(RUNTIME_ENV) or None
    if wanted:
        try:
            return _import_backend(wanted)
        except ImportError as exc:
            raise RuntimeMissingError(
                f"TFLite backend {wanted!r} is not installed ({exc}). Install it, e.g. "
                "pip install 'fleetlite[litert]' for ai-edge-litert, or unset "
                f"{RUNTIME_ENV} to use whichever is installed."
            ) from exc
    problems = []
    for candidate in BACKENDS:
        try:
            return _import_backend(candidate)
        except (ImportError, RuntimeMissingError) as exc:
            problems.append(f"{candidate}: {exc}")
    raise RuntimeMissingError(
        "no TFLite interpreter is installed. Install the agent with its runtime: "
        "pip install fleetlite (tflite-runtime on Python <= 3.11, ai-edge-litert otherwise). "
        "Tried: " + "; ".join(problems)
    )


@dataclass(frozen=True)
class TensorSpec:
    """What an input or output tensor expects: name, shape, dtype and quantization."""

    name: str
    index: int
    shape: tuple[int, ...]
    shape_signature: tuple[int, ...]
    dtype: str
    scale: float = 0.0
    zero_point: int = 0
    scales: tuple[float, ...] = ()
    zero_points: tuple[int, ...] = ()
    quantized_dimension: int = 0

    @property
    def quantized(self) -> bool:
        return bool(self.scales) or self.scale != 0.0

    @property
    def numpy_dtype(self) -> np.dtype[Any]:
        return np.dtype(self.dtype)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description (used in manifests and profiles)."""
        out: dict[str, Any] = {
            "name": self.name,
            "shape": list(self.shape),
            "dtype": self.dtype,
        }
        if self.shape_signature != self.shape:
            out["shape_signature"] = list(self.shape_signature)
        if self.quantized:
            out["quantization"] = {"scale": self.scale, "zero_point": self.zero_point}
            if len(self.scales) > 1:
                out["quantization"]["scales"] = list(self.scales)
                out["quantization"]["zero_points"] = list(self.zero_points)
                out["quantization"]["quantized_dimension"] = self.quantized_dimension
        return out

    @classmethod
    def from_details(cls, details: Mapping[str, Any]) -> TensorSpec:
        scale, zero_point = details.get("quantization", (0.0, 0))
        params = details.get("quantization_parameters") or {}
        scales = tuple(float(s) for s in np.asarray(params.get("scales", [])).ravel())
        zero_points = tuple(int(z) for z in np.asarray(params.get("zero_points", [])).ravel())
        shape = tuple(int(d) for d in details["shape"])
        signature = details.get("shape_signature")
        return cls(
            name=str(details["name"]),
            index=int(details["index"]),
            shape=shape,
            shape_signature=tuple(int(d) for d in signature) if signature is not None else shape,
            dtype=np.dtype(details["dtype"]).name,
            scale=float(scale),
            zero_point=int(zero_point),
            scales=scales,
            zero_points=zero_points,
            quantized_dimension=int(params.get("quantized_dimension", 0)),
        )


def quantize(values: Any, spec: TensorSpec) -> Array:
    """Real values -> the integer representation ``spec`` expects (round half to even, clamp)."""
    real = np.asarray(values, dtype=np.float64)
    if not spec.quantized:
        raise InputMismatchError(f"tensor {spec.name!r} is not quantized; pass {spec.dtype} values")
    scale, zero_point = _broadcast_params(spec, real.ndim)
    info = np.iinfo(spec.numpy_dtype)
    q = np.round(real / scale) + zero_point
    result: Array = np.clip(q, info.min, info.max).astype(spec.numpy_dtype)
    return result


def dequantize(values: Any, spec: TensorSpec) -> Array:
    """Integer tensor values -> real float32 values using ``spec``'s scale and zero point."""
    if not spec.quantized:
        return np.asarray(values, dtype=np.float32)
    scale, zero_point = _broadcast_params(spec, np.ndim(values))
    real: Array = ((np.asarray(values, dtype=np.float64) - zero_point) * scale).astype(np.float32)
    return real


def _broadcast_params(spec: TensorSpec, ndim: int) -> tuple[Array, Array]:
    if len(spec.scales) > 1:
        shape = [1] * max(ndim, 1)
        shape[spec.quantized_dimension] = len(spec.scales)
        return (
            np.asarray(spec.scales, dtype=np.float64).reshape(shape),
            np.asarray(spec.zero_points, dtype=np.float64).reshape(shape),
        )
    return np.asarray(spec.scale, dtype=np.float64), np.asarray(spec.zero_point, dtype=np.float64)


_UNSUPPORTED_OP = re.compile(
    r"(Didn't find op for builtin opcode '?(?P<builtin>[A-Z_0-9]+)'?"
    r"(?: version '?(?P<version>[0-9]+)'?)?)|"
    r"(Encountered unresolved custom op: (?P<custom>[^.\s]+))"
)


def _translate_load_error(exc: BaseException, origin: str) -> InvalidModelError:
    text = str(exc)
    match = _UNSUPPORTED_OP.search(text)
    if match:
        op = match.group("builtin") or match.group("custom")
        if match.group("version"):
            op += f" version {match.group('version')}"
        return UnsupportedOpError(
            f"{origin}: the model uses operator {op}, which this TFLite runtime does not provide. "
            "Rebuild the model with supported ops or install a runtime version that has it."
        )
    first_line = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return InvalidModelError(
        f"{origin}: not a loadable TFLite model ({first_line}). "
        "Check that the file is a complete .tflite flatbuffer."
    )


def read_model_source(source: ModelSource) -> tuple[bytes, str]:
    """Bytes of a model given as a path or bytes, and a name for it in messages."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source), "model bytes"
    path = Path(source)
    try:
        return path.read_bytes(), str(path)
    except FileNotFoundError as exc:
        raise InvalidModelError(f"{path}: no such model file") from exc
    except IsADirectoryError as exc:
        raise InvalidModelError(f"{path}: is a directory, expected a .tflite file") from exc
    except OSError as exc:
        raise InvalidModelError(f"{path}: cannot read model file ({exc.strerror})") from exc


def check_model_header(content: bytes, origin: str = "model bytes") -> None:
    """Reject bytes that are obviously not a TFLite flatbuffer, before an interpreter sees them."""
    if not content:
        raise InvalidModelError(f"{origin}: the model is empty (0 bytes); expected a .tflite file")
    if len(content) < 8 or content[4:8] != TFLITE_IDENTIFIER:
        raise InvalidModelError(
            f"{origin}: not a TFLite model (the file identifier at bytes 4-8 is "
            f"{content[4:8]!r}, expected {TFLITE_IDENTIFIER!r}). Check the file is a .tflite model."
        )
    try:
        check_model_bounds(content)
    except BoundsError as exc:
        raise InvalidModelError(
            f"{origin}: the model is truncated or corrupt ({exc}). "
            "Re-download or rebuild the file."
        ) from exc


def create_interpreter(
    content: bytes, origin: str, *, num_threads: int = 1, backend: str | None = None
) -> tuple[Backend, Any]:
    """A raw interpreter over ``content`` (header checked, tensors not yet allocated).

    For callers that drive signature runners themselves (the language-model engine); the same
    loading rules and error translation as :class:`Model`. ``content`` must outlive it.
    """
    check_model_header(content, origin)
    chosen = select_backend(backend)
    if num_threads < 1:
        raise ValueError(f"num_threads must be >= 1, got {num_threads}")
    try:
        with runtime_log_filtered():
            interpreter = chosen.interpreter_class(model_content=content, num_threads=num_threads)
    except (ValueError, RuntimeError, UnicodeDecodeError) as exc:
        raise _translate_load_error(exc, origin) from exc
    return chosen, interpreter


class Model:
    """A loaded TFLite model: describe its tensors and run it with numpy arrays.

    Thread-safe: calls to :meth:`run` are serialised by a lock (one interpreter is not re-entrant).
    """

    def __init__(
        self,
        content: bytes,
        *,
        origin: str = "model bytes",
        num_threads: int | None = None,
        backend: str | None = None,
    ) -> None:
        self.origin = origin
        self.size = len(content)
        self.num_threads = 1 if num_threads is None else int(num_threads)
        self._content = content  # the interpreter reads from this buffer; keep it alive
        self.backend, self._interpreter = create_interpreter(
            content, origin, num_threads=self.num_threads, backend=backend
        )
        try:
            with runtime_log_filtered():  # tflite-runtime 2.14 creates XNNPACK here
                self._interpreter.allocate_tensors()
        except (ValueError, RuntimeError, UnicodeDecodeError) as exc:
            raise _translate_load_error(exc, origin) from exc
        self.inputs = [TensorSpec.from_details(d) for d in self._interpreter.get_input_details()]
        self.outputs = [TensorSpec.from_details(d) for d in self._interpreter.get_output_details()]
        try:
            self.signature_keys = tuple(self._interpreter.get_signature_list().keys())
        except (AttributeError, ValueError):
            self.signature_keys = ()
        self._input_names = tuple(spec.name for spec in self.inputs)
        self._input_dtypes = tuple(spec.numpy_dtype for spec in self.inputs)
        self._current_shapes = [spec.shape for spec in self.inputs]
        self._lock = threading.Lock()

    @property
    def interpreter(self) -> Any:
        """The underlying interpreter (for benchmarks and advanced use; not thread-safe)."""
        return self._interpreter

    @property
    def input_names(self) -> list[str]:
        return list(self._input_names)

    @property
    def output_names(self) -> list[str]:
        return [spec.name for spec in self.outputs]

    def describe(self) -> dict[str, Any]:
        """JSON-ready description of inputs, outputs, signatures and the backend."""
        return {
            "inputs": [spec.to_dict() for spec in self.inputs],
            "outputs": [spec.to_dict() for spec in self.outputs],
            "signature_keys": list(self.signature_keys),
            "backend": self.backend.name,
            "backend_version": self.backend.version,
            "num_threads": self.num_threads,
        }

    def _arrange_inputs(self, inputs: InputsLike) -> list[Array]:
        if isinstance(inputs, Mapping):
            names = self._input_names
            if len(inputs) != len(names) or any(name not in inputs for name in names):
                unknown = sorted(set(inputs) - set(names))
                missing = [name for name in names if name not in inputs]
                raise InputMismatchError(
                    f"inputs do not match the model: missing {missing}, unexpected {unknown}; "
                    f"the model's inputs are {list(names)}"
                )
            ordered = [inputs[name] for name in names]
        elif isinstance(inputs, np.ndarray):
            ordered = [inputs]
        else:
            ordered = list(inputs)
        if len(ordered) != len(self.inputs):
            raise InputMismatchError(
                f"the model takes {len(self.inputs)} input(s) {self.input_names}, "
                f"got {len(ordered)}; pass a dict keyed by input name"
            )
        arrays = []
        for spec, dtype, value in zip(self.inputs, self._input_dtypes, ordered):
            array = np.asarray(value)
            if array.dtype != dtype:
                hint = (
                    "; quantize real values with "
                    "fleetlite.sdk.runtime.interpreter.quantize(x, spec)"
                    if spec.quantized
                    else f"; convert with np.asarray(x, dtype=np.{spec.dtype})"
                )
                raise InputMismatchError(
                    f"input {spec.name!r} expects dtype {spec.dtype}, got {array.dtype}{hint}"
                )
            if tuple(array.shape) != spec.shape and not self._resizable(spec, array.shape):
                raise InputMismatchError(
                    f"input {spec.name!r} expects shape {list(spec.shape_signature)}, "
                    f"got {list(array.shape)}"
                )
            arrays.append(array)
        return arrays

    @staticmethod
    def _resizable(spec: TensorSpec, shape: tuple[int, ...]) -> bool:
        if len(shape) != len(spec.shape_signature):
            return False
        return all(want in (-1, got) for want, got in zip(spec.shape_signature, shape))

    def run(self, inputs: InputsLike) -> dict[str, Array]:
        """Run the model once; returns a dict of output name -> array, in output order.

        ``inputs`` is a dict keyed by input name, a list in input order, or (one input) an array.
        """
        arrays = self._arrange_inputs(inputs)
        interp = self._interpreter
        with self._lock:
            try:
                resized = False
                for position, (spec, array) in enumerate(zip(self.inputs, arrays)):
                    if array.shape != self._current_shapes[position]:
                        interp.resize_tensor_input(spec.index, list(array.shape))
                        self._current_shapes[position] = array.shape
                        resized = True
                if resized:
                    interp.allocate_tensors()
                for spec, array in zip(self.inputs, arrays):
                    interp.set_tensor(spec.index, array)
                interp.invoke()
                return {spec.name: interp.get_tensor(spec.index) for spec in self.outputs}
            except (ValueError, RuntimeError) as exc:
                raise InferenceError(
                    f"{self.origin}: inference failed ({str(exc).strip().splitlines()[0]})"
                ) from exc


def load_model(
    source: ModelSource, *, num_threads: int | None = None, backend: str | None = None
) -> Model:
    """Load a ``.tflite`` model from a path or from bytes.

    Raises :class:`InvalidModelError` (or :class:`UnsupportedOpError`) when the interpreter
    refuses it, and :class:`RuntimeMissingError` when no runtime is installed.
    """
    content, origin = read_model_source(source)
    return Model(content, origin=origin, num_threads=num_threads, backend=backend)
