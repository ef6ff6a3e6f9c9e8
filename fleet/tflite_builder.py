"""Write ``.tflite`` files without TensorFlow: numpy + flatbuffers + the ``tflite`` schema package.

A :class:`ModelBuilder` collects tensors, constant buffers and operators of one subgraph and
serialises them as a schema-version-3 TFLite flatbuffer with a ``serving_default`` signature.
The output depends only on the calls made, so the same calls always give the same bytes.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import flatbuffers
import numpy as np
import numpy.typing as npt

SCHEMA_VERSION = 3
FILE_IDENTIFIER = b"TFL3"
SIGNATURE_KEY = "serving_default"
# The TFLite converter aligns constant data to 16 bytes; SIMD kernels may read it in place.
BUFFER_ALIGNMENT = 16
# OperatorCode.deprecated_builtin_code is an int8: larger codes store this placeholder there.
_PLACEHOLDER_FOR_GREATER_OP_CODES = 127

ACTIVATIONS = ("NONE", "RELU", "RELU_N1_TO_1", "RELU6")

OptionValue = Union[bool, int, float]


def schema_module(name: str) -> Any:
    """The generated module ``tflite.<name>``, with its ``Start``/``Add*``/``End`` functions.

    ``tflite/__init__.py`` star-imports the generated classes, so ``tflite.Buffer`` is the class of
    the same name, not the module that holds the builder functions.
    """
    return importlib.import_module(f"tflite.{name}")


def _enum(module: str, member: str) -> int:
    value = getattr(getattr(schema_module(module), module), member)
    return int(value)


_TENSOR_TYPES: dict[np.dtype[Any], str] = {
    np.dtype(np.float32): "FLOAT32",
    np.dtype(np.int8): "INT8",
    np.dtype(np.uint8): "UINT8",
    np.dtype(np.int32): "INT32",
}


def tensor_type(dtype: npt.DTypeLike) -> int:
    """The schema's TensorType code for a numpy dtype (float32, int8, uint8 or int32)."""
    key = np.dtype(dtype)
    if key not in _TENSOR_TYPES:
        supported = ", ".join(d.name for d in _TENSOR_TYPES)
        raise ValueError(f"unsupported tensor dtype {key}; use one of: {supported}")
    return _enum("TensorType", _TENSOR_TYPES[key])


@dataclass(frozen=True)
class Quantization:
    """Affine quantization: ``real = scale * (q - zero_point)``, per tensor or per channel."""

    scale: tuple[float, ...]
    zero_point: tuple[int, ...]
    axis: int = 0

    def __post_init__(self) -> None:
        if not self.scale or len(self.scale) != len(self.zero_point):
            raise ValueError("quantization needs one zero point per scale (at least one)")
        if any(not s > 0 for s in self.scale):
            raise ValueError(f"quantization scales must be positive, got {self.scale}")

    @classmethod
    def per_tensor(cls, scale: float, zero_point: int = 0) -> Quantization:
        return cls((float(scale),), (int(zero_point),))

    @classmethod
    def per_channel(cls, scales: Sequence[float], axis: int = 0) -> Quantization:
        """Symmetric per-channel quantization (zero points 0), as TFLite wants for weights."""
        return cls(tuple(float(s) for s in scales), (0,) * len(scales), axis)


@dataclass(frozen=True)
class Options:
    """A builtin options table: its schema name and scalar fields, e.g.
    ``Options("FullyConnectedOptions", {"FusedActivationFunction": 1})``."""

    table: str
    fields: dict[str, OptionValue] = field(default_factory=dict)


@dataclass(frozen=True)
class Tensor:
    """A tensor of the subgraph; ``buffer`` 0 means no constant data."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype[Any]
    buffer: int
    quantization: Optional[Quantization]


@dataclass(frozen=True)
class _OperatorCode:
    builtin: int
    version: int
    custom: str = ""


@dataclass(frozen=True)
class _Operator:
    opcode_index: int
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    options: Optional[Options]


_INT8_VERSION_2 = frozenset(
    {"ADD", "MUL", "MEAN", "SOFTMAX", "CONCATENATION", "RELU", "DEQUANTIZE", "GATHER"}
)


def operator_version(
    op: str, input_dtypes: Sequence[np.dtype[Any]], output_dtypes: Sequence[np.dtype[Any]]
) -> int:
    """The version the TFLite converter gives ``op`` for these types.

    The runtime accepts a model only if each (op, version) is registered, and some kernels read
    the version, so this mirrors TensorFlow's ``lite/tools/versioning/op_version.cc`` for the ops
    and types this builder supports.
    """
    first = input_dtypes[0] if input_dtypes else np.dtype(np.float32)
    int8 = np.dtype(np.int8)
    if op == "FULLY_CONNECTED":
        if len(input_dtypes) == 2:
            return 6  # no bias
        if first == int8 and input_dtypes[1] == int8 and output_dtypes[0] == int8:
            return 4
        if first == np.float32 and input_dtypes[1] == int8:
            return 3  # hybrid: float activations, int8 weights
        return 1
    if op == "RELU" and first == np.uint8:
        return 2
    if op in _INT8_VERSION_2 and first == int8:
        return 2
    return 1


def _activation(name: str) -> int:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown fused activation {name!r}; use one of: {', '.join(ACTIVATIONS)}")
    return _enum("ActivationFunctionType", name)


def _broadcast_shape(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(int(d) for d in np.broadcast_shapes(a, b))


class ModelBuilder:
    """Builds a single-subgraph TFLite model.

    Tensors are referred to by their index. Inputs and outputs take the tensor's name, which is
    also its name in the ``serving_default`` signature, so names of inputs and outputs must be
    unique.
    """

    def __init__(self, description: str = "") -> None:
        self.description = description
        self._buffers: list[bytes] = [b""]  # buffer 0: the empty sentinel every model starts with
        self._tensors: list[Tensor] = []
        self._opcodes: list[_OperatorCode] = []
        self._operators: list[_Operator] = []
        self._inputs: list[int] = []
        self._outputs: list[int] = []

    # -- tensors -------------------------------------------------------------------------------

    def tensor(self, index: int) -> Tensor:
        """The tensor with this index."""
        if not 0 <= index < len(self._tensors):
            raise IndexError(f"no tensor {index}; the model has {len(self._tensors)} tensors")
        return self._tensors[index]

    def add_tensor(
        self,
        name: str,
        shape: Sequence[int],
        dtype: npt.DTypeLike,
        quantization: Optional[Quantization] = None,
        *,
        data: Optional[npt.NDArray[Any]] = None,
    ) -> int:
        """Add a tensor (constant when ``data`` is given) and return its index."""
        kind = np.dtype(dtype)
        tensor_type(kind)
        dims = tuple(int(d) for d in shape)
        if quantization is not None and len(quantization.scale) > 1:
            axis = quantization.axis
            if not 0 <= axis < len(dims) or dims[axis] != len(quantization.scale):
                raise ValueError(
                    f"tensor {name!r}: {len(quantization.scale)} per-channel scales do not match "
                    f"dimension {axis} of shape {list(dims)}"
                )
        buffer = 0
        if data is not None:
            array = np.asarray(data)
            if array.dtype != kind or array.shape != dims:
                raise ValueError(
                    f"tensor {name!r}: data is {array.dtype}{list(array.shape)}, "
                    f"declared {kind}{list(dims)}"
                )
            buffer = len(self._buffers)
            self._buffers.append(
                np.ascontiguousarray(array).astype(kind.newbyteorder("<")).tobytes()
            )
        self._tensors.append(Tensor(name, dims, kind, buffer, quantization))
        return len(self._tensors) - 1

    def add_constant(
        self, name: str, array: npt.ArrayLike, quantization: Optional[Quantization] = None
    ) -> int:
        """Add a constant tensor holding ``array`` (its dtype and shape are kept)."""
        data = np.asarray(array)
        return self.add_tensor(name, data.shape, data.dtype, quantization, data=data)

    def add_input(
        self,
        name: str,
        shape: Sequence[int],
        dtype: npt.DTypeLike,
        quantization: Optional[Quantization] = None,
    ) -> int:
        """Add a model input and return its tensor index."""
        self._check_io_name(name)
        index = self.add_tensor(name, shape, dtype, quantization)
        self._inputs.append(index)
        return index

    def mark_output(self, index: int) -> None:
        """Make tensor ``index`` a model output (outputs keep the order they are marked in)."""
        self._check_io_name(self.tensor(index).name)
        self._outputs.append(index)

    def _check_io_name(self, name: str) -> None:
        taken = {self._tensors[i].name for i in self._inputs + self._outputs}
        if not name or name in taken:
            raise ValueError(f"model inputs and outputs need unique, non-empty names: {name!r}")

    # -- operators -----------------------------------------------------------------------------

    def add_operator(
        self,
        op: str,
        inputs: Sequence[int],
        outputs: Sequence[int],
        options: Optional[Options] = None,
        *,
        version: Optional[int] = None,
    ) -> None:
        """Add builtin operator ``op`` (a BuiltinOperator name such as ``"FULLY_CONNECTED"``).

        ``version`` defaults to what the TFLite converter would choose, see
        :func:`operator_version`.
        """
        code = _enum("BuiltinOperator", op)
        if version is None:
            version = operator_version(
                op,
                [self.tensor(i).dtype for i in inputs],
                [self.tensor(i).dtype for i in outputs],
            )
        self._append_operator(_OperatorCode(code, version), inputs, outputs, options)

    def add_custom_operator(
        self, custom_code: str, inputs: Sequence[int], outputs: Sequence[int], *, version: int = 1
    ) -> None:
        """Add a custom operator; a runtime without a kernel registered for it refuses the model."""
        code = _OperatorCode(_enum("BuiltinOperator", "CUSTOM"), version, custom_code)
        self._append_operator(code, inputs, outputs, None)

    def _append_operator(
        self,
        code: _OperatorCode,
        inputs: Sequence[int],
        outputs: Sequence[int],
        options: Optional[Options],
    ) -> None:
        for index in (*inputs, *outputs):
            if index != -1:  # -1 marks an omitted optional input in the TFLite schema
                self.tensor(index)
        if code not in self._opcodes:
            self._opcodes.append(code)
        self._operators.append(
            _Operator(self._opcodes.index(code), tuple(inputs), tuple(outputs), options)
        )

    def _output_like(
        self,
        name: str,
        shape: Sequence[int],
        source: int,
        dtype: Optional[npt.DTypeLike] = None,
        quantization: Optional[Quantization] = None,
    ) -> int:
        like = self.tensor(source)
        kind = like.dtype if dtype is None else np.dtype(dtype)
        if quantization is None and kind == like.dtype:
            quantization = like.quantization
        return self.add_tensor(name, shape, kind, quantization)

    def fully_connected(
        self,
        x: int,
        weights: int,
        bias: Optional[int],
        *,
        name: str,
        activation: str = "NONE",
        quantization: Optional[Quantization] = None,
    ) -> int:
        """``activation(x @ weights.T + bias)``; weights are ``[units, features]``.

        For int8, ``bias`` is int32 with scale ``input_scale * weight_scale`` and zero point 0.
        """
        batch = self.tensor(x).shape[0]
        units = self.tensor(weights).shape[0]
        out = self._output_like(name, (batch, units), x, quantization=quantization)
        options = Options(
            "FullyConnectedOptions", {"FusedActivationFunction": _activation(activation)}
        )
        inputs = [x, weights] if bias is None else [x, weights, bias]
        self.add_operator("FULLY_CONNECTED", inputs, [out], options)
        return out

    def gather(self, params: int, indices: int, *, name: str, axis: int = 0) -> int:
        """Rows (along ``axis``) of ``params`` picked by the int32 ``indices`` tensor."""
        p_shape = self.tensor(params).shape
        shape = p_shape[:axis] + self.tensor(indices).shape + p_shape[axis + 1 :]
        out = self._output_like(name, shape, params)
        self.add_operator(
            "GATHER", [params, indices], [out], Options("GatherOptions", {"Axis": axis})
        )
        return out

    def mean(
        self,
        x: int,
        axes: Sequence[int],
        *,
        name: str,
        keep_dims: bool = False,
        quantization: Optional[Quantization] = None,
    ) -> int:
        """Mean of ``x`` over ``axes``."""
        shape = self.tensor(x).shape
        rank = len(shape)
        reduced = {a % rank for a in axes}
        kept = [1 if i in reduced else d for i, d in enumerate(shape)]
        out_shape = kept if keep_dims else [d for i, d in enumerate(shape) if i not in reduced]
        axes_tensor = self.add_constant(f"{name}/axes", np.asarray(list(axes), dtype=np.int32))
        out = self._output_like(name, out_shape, x, quantization=quantization)
        self.add_operator(
            "MEAN", [x, axes_tensor], [out], Options("ReducerOptions", {"KeepDims": keep_dims})
        )
        return out

    def softmax(
        self,
        x: int,
        *,
        name: str,
        beta: float = 1.0,
        quantization: Optional[Quantization] = None,
    ) -> int:
        """Softmax over the last axis (int8 output wants scale 1/256, zero point -128)."""
        out = self._output_like(name, self.tensor(x).shape, x, quantization=quantization)
        self.add_operator("SOFTMAX", [x], [out], Options("SoftmaxOptions", {"Beta": beta}))
        return out

    def _binary(
        self,
        op: str,
        a: int,
        b: int,
        name: str,
        activation: str,
        quantization: Optional[Quantization],
    ) -> int:
        shape = _broadcast_shape(self.tensor(a).shape, self.tensor(b).shape)
        out = self._output_like(name, shape, a, quantization=quantization)
        table = "AddOptions" if op == "ADD" else "MulOptions"
        options = Options(table, {"FusedActivationFunction": _activation(activation)})
        self.add_operator(op, [a, b], [out], options)
        return out

    def add(
        self,
        a: int,
        b: int,
        *,
        name: str,
        activation: str = "NONE",
        quantization: Optional[Quantization] = None,
    ) -> int:
        """Element-wise ``a + b`` with broadcasting."""
        return self._binary("ADD", a, b, name, activation, quantization)

    def mul(
        self,
        a: int,
        b: int,
        *,
        name: str,
        activation: str = "NONE",
        quantization: Optional[Quantization] = None,
    ) -> int:
        """Element-wise ``a * b`` with broadcasting."""
        return self._binary("MUL", a, b, name, activation, quantization)

    def relu(self, x: int, *, name: str) -> int:
        """``max(x, 0)``; quantized outputs keep the input's quantization."""
        out = self._output_like(name, self.tensor(x).shape, x)
        self.add_operator("RELU", [x], [out])
        return out

    def quantize(
        self, x: int, *, name: str, dtype: npt.DTypeLike, quantization: Quantization
    ) -> int:
        """Float to integer (or integer requantisation) with the given output parameters."""
        out = self.add_tensor(name, self.tensor(x).shape, dtype, quantization)
        self.add_operator("QUANTIZE", [x], [out], Options("QuantizeOptions"))
        return out

    def dequantize(self, x: int, *, name: str) -> int:
        """Integer to float32, using ``x``'s quantization."""
        out = self.add_tensor(name, self.tensor(x).shape, np.float32)
        self.add_operator("DEQUANTIZE", [x], [out], Options("DequantizeOptions"))
        return out

    def concatenation(
        self,
        xs: Sequence[int],
        *,
        name: str,
        axis: int,
        activation: str = "NONE",
        quantization: Optional[Quantization] = None,
    ) -> int:
        """Join tensors along ``axis``."""
        shapes = [self.tensor(i).shape for i in xs]
        axis_n = axis % len(shapes[0])
        shape = list(shapes[0])
        shape[axis_n] = sum(s[axis_n] for s in shapes)
        out = self._output_like(name, shape, xs[0], quantization=quantization)
        options = Options(
            "ConcatenationOptions",
            {"Axis": axis, "FusedActivationFunction": _activation(activation)},
        )
        self.add_operator("CONCATENATION", list(xs), [out], options)
        return out

    # -- serialisation -------------------------------------------------------------------------

    def build(self) -> bytes:
        """Serialise the model; the same builder state always gives the same bytes."""
        if not self._inputs or not self._outputs:
            raise ValueError("a model needs at least one input and one output")
        b = flatbuffers.Builder(1024)
        buffers = self._write_buffers(b)
        tensors = _offset_vector(b, [self._write_tensor(b, t) for t in self._tensors])
        operators = _offset_vector(b, [self._write_operator(b, op) for op in self._operators])
        subgraph_name = b.CreateString("main")
        sg = schema_module("SubGraph")
        inputs = _int32_vector(b, self._inputs)
        outputs = _int32_vector(b, self._outputs)
        sg.Start(b)
        sg.AddTensors(b, tensors)
        sg.AddInputs(b, inputs)
        sg.AddOutputs(b, outputs)
        sg.AddOperators(b, operators)
        sg.AddName(b, subgraph_name)
        subgraphs = _offset_vector(b, [sg.End(b)])
        opcodes = _offset_vector(b, [_write_opcode(b, c) for c in self._opcodes])
        signatures = _offset_vector(b, [self._write_signature(b)])
        description = b.CreateString(self.description)

        model = schema_module("Model")
        model.Start(b)
        model.AddVersion(b, SCHEMA_VERSION)
        model.AddOperatorCodes(b, opcodes)
        model.AddSubgraphs(b, subgraphs)
        model.AddDescription(b, description)
        model.AddBuffers(b, buffers)
        model.AddSignatureDefs(b, signatures)
        b.Finish(model.End(b), file_identifier=FILE_IDENTIFIER)
        return bytes(b.Output())

    def _write_buffers(self, b: flatbuffers.Builder) -> int:
        buf = schema_module("Buffer")
        data = [_byte_vector(b, raw) if raw else None for raw in self._buffers]
        tables = []
        for vector in data:
            buf.Start(b)
            if vector is not None:
                buf.AddData(b, vector)
            tables.append(buf.End(b))
        return _offset_vector(b, tables)

    def _write_tensor(self, b: flatbuffers.Builder, tensor: Tensor) -> int:
        name = b.CreateString(tensor.name)
        shape = _int32_vector(b, tensor.shape)
        quant = _write_quantization(b, tensor.quantization) if tensor.quantization else None
        t = schema_module("Tensor")
        t.Start(b)
        t.AddShape(b, shape)
        t.AddType(b, tensor_type(tensor.dtype))
        t.AddBuffer(b, tensor.buffer)
        t.AddName(b, name)
        if quant is not None:
            t.AddQuantization(b, quant)
        return int(t.End(b))

    def _write_operator(self, b: flatbuffers.Builder, op: _Operator) -> int:
        inputs = _int32_vector(b, op.inputs)
        outputs = _int32_vector(b, op.outputs)
        options = _write_options(b, op.options) if op.options else None
        o = schema_module("Operator")
        o.Start(b)
        o.AddOpcodeIndex(b, op.opcode_index)
        o.AddInputs(b, inputs)
        o.AddOutputs(b, outputs)
        if op.options is not None and options is not None:
            o.AddBuiltinOptionsType(b, _enum("BuiltinOptions", op.options.table))
            o.AddBuiltinOptions(b, options)
        return int(o.End(b))

    def _write_signature(self, b: flatbuffers.Builder) -> int:
        tm = schema_module("TensorMap")

        def tensor_maps(indices: Sequence[int]) -> int:
            names = [b.CreateString(self._tensors[i].name) for i in indices]
            maps = []
            for index, name in zip(indices, names):
                tm.Start(b)
                tm.AddName(b, name)
                tm.AddTensorIndex(b, index)
                maps.append(tm.End(b))
            return _offset_vector(b, maps)

        inputs = tensor_maps(self._inputs)
        outputs = tensor_maps(self._outputs)
        key = b.CreateString(SIGNATURE_KEY)
        sd = schema_module("SignatureDef")
        sd.Start(b)
        sd.AddInputs(b, inputs)
        sd.AddOutputs(b, outputs)
        sd.AddSignatureKey(b, key)
        sd.AddSubgraphIndex(b, 0)
        return int(sd.End(b))


def _offset_vector(b: flatbuffers.Builder, offsets: Sequence[int]) -> int:
    b.StartVector(4, len(offsets), 4)
    for offset in reversed(offsets):
        b.PrependUOffsetTRelative(offset)
    return int(b.EndVector())


def _int32_vector(b: flatbuffers.Builder, values: Sequence[int]) -> int:
    return int(b.CreateNumpyVector(np.asarray(values, dtype="<i4")))


def _byte_vector(b: flatbuffers.Builder, data: bytes) -> int:
    b.StartVector(1, len(data), BUFFER_ALIGNMENT)
    b.head = b.head - len(data)
    b.Bytes[b.head : b.head + len(data)] = data
    return int(b.EndVector())


def _write_quantization(b: flatbuffers.Builder, quant: Quantization) -> int:
    scale = b.CreateNumpyVector(np.asarray(quant.scale, dtype="<f4"))
    zero_point = b.CreateNumpyVector(np.asarray(quant.zero_point, dtype="<i8"))
    q = schema_module("QuantizationParameters")
    q.Start(b)
    q.AddScale(b, scale)
    q.AddZeroPoint(b, zero_point)
    q.AddQuantizedDimension(b, quant.axis)
    return int(q.End(b))


def _write_options(b: flatbuffers.Builder, options: Options) -> int:
    module = schema_module(options.table)
    module.Start(b)
    for name, value in options.fields.items():
        adder = getattr(module, f"Add{name}", None)
        if adder is None:
            raise ValueError(f"{options.table} has no field {name!r}")
        adder(b, value)
    return int(module.End(b))


def _write_opcode(b: flatbuffers.Builder, code: _OperatorCode) -> int:
    custom = b.CreateString(code.custom) if code.custom else None
    oc = schema_module("OperatorCode")
    oc.Start(b)
    oc.AddDeprecatedBuiltinCode(b, min(code.builtin, _PLACEHOLDER_FOR_GREATER_OP_CODES))
    oc.AddBuiltinCode(b, code.builtin)
    oc.AddVersion(b, code.version)
    if custom is not None:
        oc.AddCustomCode(b, custom)
    return int(oc.End(b))
