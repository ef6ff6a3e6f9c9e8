"""The small models FleetLite's tests and benchmarks run, built deterministically from a seed.

Each builder returns a :class:`~fleetlite.fleet.intent_model.BuiltModel`: the ``.tflite`` bytes,
the numpy weights needed to recompute its outputs independently, and any side files. Weights are
trained or drawn with numpy and then snapped to a coarse grid, so last-bit differences between
machines' BLAS/libm are very unlikely to change a single byte of the files. The intent classifier
(the demo's and the conformance kit's model) is product code: :mod:`fleetlite.fleet.intent_model`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Callable

import numpy as np
import numpy.typing as npt

from fleetlite.fleet.intent_model import (
    DEFAULT_SEED,
    BuiltModel,
    _Adam,
    _on_grid,
    intent_classifier,
)
from fleetlite.fleet.tflite_builder import ModelBuilder, Options, Quantization

Array = npt.NDArray[Any]
# Calibration ranges are rounded to multiples of this step (see the module docstring).
RANGE_GRID = 2.0**-6

SENSOR_WINDOW = 16
AUTOENCODER_UNITS = (8, 4, 8, 16)
AUTOENCODER_RELU = (True, True, True, False)


# -- sensor autoencoder -----------------------------------------------------------------------


def sensor_samples(count: int, seed: int = DEFAULT_SEED) -> npt.NDArray[np.float32]:
    """Synthetic sensor windows [count, 16]: noisy sine waves with random amplitude and offset."""
    rng = np.random.default_rng(seed)
    t = np.arange(SENSOR_WINDOW, dtype=np.float64)
    amp = rng.uniform(0.5, 1.5, size=(count, 1))
    freq = rng.uniform(0.5, 2.0, size=(count, 1))
    phase = rng.uniform(0.0, 2 * np.pi, size=(count, 1))
    offset = rng.uniform(-0.5, 0.5, size=(count, 1))
    noise = rng.normal(0.0, 0.05, size=(count, SENSOR_WINDOW))
    waves: npt.NDArray[np.float64] = (
        offset + amp * np.sin(2 * np.pi * freq * t / SENSOR_WINDOW + phase) + noise
    )
    return waves.astype(np.float32)


Layer = tuple[Array, Array]


def mlp_forward(x: Array, layers: Sequence[Layer], relu: Sequence[bool]) -> list[Array]:
    """Activations after each dense layer (weights [out, in]); the last item is the output."""
    outs = []
    h = x
    for (w, b), r in zip(layers, relu):
        h = h @ w.T + b
        if r:
            h = np.maximum(h, 0)
        outs.append(h)
    return outs


def _init_layers(sizes: Sequence[int], rng: np.random.Generator) -> list[Layer]:
    return [
        (rng.normal(0.0, np.sqrt(2.0 / fan_in), size=(fan_out, fan_in)), np.zeros(fan_out))
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:])
    ]


def _train_autoencoder(seed: int, steps: int) -> list[Layer]:
    rng = np.random.default_rng(seed)
    data = sensor_samples(512, seed).astype(np.float64)
    layers = _init_layers((SENSOR_WINDOW, *AUTOENCODER_UNITS), rng)
    adam = _Adam([p for layer in layers for p in layer], lr=0.01)
    for _ in range(steps):
        acts = mlp_forward(data, layers, AUTOENCODER_RELU)
        grad = 2 * (acts[-1] - data) / data.size
        grads: list[Array] = []
        for i in reversed(range(len(layers))):
            if AUTOENCODER_RELU[i]:
                grad = grad * (acts[i] > 0)
            below = acts[i - 1] if i else data
            grads[:0] = [grad.T @ below, grad.sum(0)]
            grad = grad @ layers[i][0]
        adam.step(grads)
    return [(_on_grid(w), _on_grid(b)) for w, b in layers]


def _dense_model(
    name: str,
    description: str,
    layers: Sequence[Layer],
    relu: Sequence[bool],
    in_name: str,
    out_name: str,
) -> bytes:
    mb = ModelBuilder(description)
    h = mb.add_input(in_name, [1, layers[0][0].shape[1]], np.float32)
    for i, ((w, b), r) in enumerate(zip(layers, relu)):
        last = i == len(layers) - 1
        h = mb.fully_connected(
            h,
            mb.add_constant(f"{name}/fc{i}/weight", w),
            mb.add_constant(f"{name}/fc{i}/bias", b),
            name=out_name if last else f"{name}/fc{i}",
            activation="RELU" if r else "NONE",
        )
    mb.mark_output(h)
    return mb.build()


def _layer_weights(layers: Sequence[Layer]) -> dict[str, Array]:
    weights: dict[str, Array] = {}
    for i, (w, b) in enumerate(layers):
        weights[f"fc{i}.weight"] = w
        weights[f"fc{i}.bias"] = b
    return weights


def sensor_autoencoder(seed: int = DEFAULT_SEED, *, steps: int = 600) -> BuiltModel:
    """Dense float32 autoencoder for 16-sample sensor windows: 16 -> 8 -> 4 -> 8 -> 16 (ReLU).

    Trained on :func:`sensor_samples`; its reconstruction error is an anomaly score.
    """
    layers = _train_autoencoder(seed, steps)
    content = _dense_model(
        "autoencoder",
        f"fleetlite sensor_autoencoder: float32 (seed {seed})",
        layers,
        AUTOENCODER_RELU,
        "window",
        "reconstruction",
    )
    return BuiltModel("sensor_autoencoder", content, _layer_weights(layers))


def _affine_int8(lo: float, hi: float) -> Quantization:
    """Asymmetric int8 parameters covering [lo, hi] (widened to include 0, snapped outwards)."""
    lo = float(np.floor(min(lo, 0.0) / RANGE_GRID) * RANGE_GRID)
    hi = float(np.ceil(max(hi, 0.0) / RANGE_GRID) * RANGE_GRID)
    hi = max(hi, lo + RANGE_GRID)
    scale = float(np.float32((hi - lo) / 255.0))
    zero_point = int(np.clip(np.round(-128 - lo / scale), -128, 127))
    return Quantization.per_tensor(scale, zero_point)


def sensor_autoencoder_int8(
    seed: int = DEFAULT_SEED, *, per_channel: bool = True, steps: int = 600
) -> BuiltModel:
    """Full-integer int8 build of :func:`sensor_autoencoder` (same seed, same float weights).

    int8 input and output; int8 weights, symmetric per output channel (or per tensor); int32
    biases with scale ``input_scale * weight_scale``; activation ranges calibrated on
    ``sensor_samples(2048, seed + 1)``.
    """
    layers = _train_autoencoder(seed, steps)
    calibration = sensor_samples(2048, seed + 1).astype(np.float64)
    acts = mlp_forward(calibration, layers, AUTOENCODER_RELU)

    mb = ModelBuilder(f"fleetlite sensor_autoencoder_int8: full-integer int8 (seed {seed})")
    in_q = _affine_int8(float(calibration.min()), float(calibration.max()))
    h = mb.add_input("window", [1, SENSOR_WINDOW], np.int8, in_q)
    weights: dict[str, Array] = {
        "input_scale": np.asarray(in_q.scale[0], dtype=np.float32),
        "input_zero_point": np.asarray(in_q.zero_point[0], dtype=np.int32),
    }
    for i, ((w, b), act) in enumerate(zip(layers, acts)):
        max_abs = np.abs(w).max(axis=1) if per_channel else np.full(w.shape[0], np.abs(w).max())
        w_scale = (np.maximum(max_abs, 1e-6) / 127.0).astype(np.float32)
        w_q = np.clip(np.round(w / w_scale[:, None]), -127, 127).astype(np.int8)
        b_scale = (np.float64(in_q.scale[0]) * w_scale.astype(np.float64)).astype(np.float32)
        b_q = np.round(b / b_scale).astype(np.int32)
        out_q = _affine_int8(float(act.min()), float(act.max()))
        w_quant = (
            Quantization.per_channel(w_scale.tolist())
            if per_channel
            else Quantization.per_tensor(float(w_scale[0]))
        )
        b_quant = (
            Quantization.per_channel(b_scale.tolist())
            if per_channel
            else Quantization.per_tensor(float(b_scale[0]))
        )
        last = i == len(layers) - 1
        h = mb.fully_connected(
            h,
            mb.add_constant(f"autoencoder/fc{i}/weight", w_q, w_quant),
            mb.add_constant(f"autoencoder/fc{i}/bias", b_q, b_quant),
            name="reconstruction" if last else f"autoencoder/fc{i}",
            activation="RELU" if AUTOENCODER_RELU[i] else "NONE",
            quantization=out_q,
        )
        weights.update(
            {
                f"fc{i}.weight": w_q,
                f"fc{i}.weight_scale": w_scale,
                f"fc{i}.bias": b_q,
                f"fc{i}.output_scale": np.asarray(out_q.scale[0], dtype=np.float32),
                f"fc{i}.output_zero_point": np.asarray(out_q.zero_point[0], dtype=np.int32),
            }
        )
        in_q = out_q
    mb.mark_output(h)
    return BuiltModel("sensor_autoencoder_int8", mb.build(), weights)


# -- interface and latency fixtures -----------------------------------------------------------


def two_in_two_out(seed: int = DEFAULT_SEED) -> BuiltModel:
    """Two named float32 inputs ``a``, ``b`` [1, 8]; outputs ``out_sum`` = a + b [1, 8] and
    ``out_score`` = FC(a * b) [1, 4]."""
    rng = np.random.default_rng(seed)
    weight = _on_grid(rng.normal(0.0, 0.5, size=(4, 8)))
    bias = _on_grid(rng.normal(0.0, 0.1, size=4))
    mb = ModelBuilder(f"fleetlite two_in_two_out: multi-input/output fixture (seed {seed})")
    a = mb.add_input("a", [1, 8], np.float32)
    b = mb.add_input("b", [1, 8], np.float32)
    mb.mark_output(mb.add(a, b, name="out_sum"))
    product = mb.mul(a, b, name="product")
    mb.mark_output(
        mb.fully_connected(
            product,
            mb.add_constant("score/weight", weight),
            mb.add_constant("score/bias", bias),
            name="out_score",
        )
    )
    return BuiltModel("two_in_two_out", mb.build(), {"weight": weight, "bias": bias})


def heavy_mlp(size: int = 64, layers: int = 4, seed: int = DEFAULT_SEED) -> BuiltModel:
    """Float32 MLP ``x`` [1, size] -> ``layers`` dense layers of ``size`` units -> ``y``.

    Work (and file size: ``4 * size * size * layers`` bytes) grows with ``size**2 * layers``,
    which makes a model as slow as a latency gate needs.
    """
    if size < 1 or layers < 1:
        raise ValueError("heavy_mlp needs size >= 1 and layers >= 1")
    rng = np.random.default_rng(seed)
    dense = [(_on_grid(w), _on_grid(b)) for w, b in _init_layers([size] * (layers + 1), rng)]
    relu = [True] * (layers - 1) + [False]
    content = _dense_model(
        "mlp", f"fleetlite heavy_mlp: {layers} x {size} units (seed {seed})", dense, relu, "x", "y"
    )
    return BuiltModel("heavy_mlp", content, _layer_weights(dense))


def int8_classifier(features: int = 256, hidden: Sequence[int] = (256, 256), classes: int = 10,
                    seed: int = DEFAULT_SEED) -> BuiltModel:
    """Full-integer int8 MLP classifier ``features`` [1, F] -> ReLU dense ``hidden`` -> ``logits``
    [1, classes], as :func:`sensor_autoencoder_int8` quantizes: int8 weights per output channel,
    int32 biases, activation ranges calibrated on 512 random inputs. Its weights are drawn, not
    trained: it exists to measure what travels when int8 weights change (delta updates), and its
    file is almost all weight bytes (about ``sum(in * out)`` bytes), as a real classifier's is.
    """
    rng = np.random.default_rng(seed)
    sizes = [features, *hidden, classes]
    layers = [(_on_grid(w), _on_grid(b)) for w, b in _init_layers(sizes, rng)]
    relu = [True] * len(hidden) + [False]
    calibration = rng.normal(0.0, 1.0, size=(512, features))
    acts = mlp_forward(calibration, layers, relu)
    mb = ModelBuilder(f"fleetlite int8_classifier: {sizes} (seed {seed})")
    in_q = _affine_int8(float(calibration.min()), float(calibration.max()))
    h = mb.add_input("features", [1, features], np.int8, in_q)
    for i, ((w, b), act) in enumerate(zip(layers, acts)):
        w_scale = (np.maximum(np.abs(w).max(axis=1), 1e-6) / 127.0).astype(np.float32)
        w_q = np.clip(np.round(w / w_scale[:, None]), -127, 127).astype(np.int8)
        b_scale = (np.float64(in_q.scale[0]) * w_scale.astype(np.float64)).astype(np.float32)
        out_q = _affine_int8(float(act.min()), float(act.max()))
        last = i == len(layers) - 1
        h = mb.fully_connected(
            h,
            mb.add_constant(f"classifier/fc{i}/weight", w_q,
                            Quantization.per_channel(w_scale.tolist())),
            mb.add_constant(f"classifier/fc{i}/bias", np.round(b / b_scale).astype(np.int32),
                            Quantization.per_channel(b_scale.tolist())),
            name="logits" if last else f"classifier/fc{i}",
            activation="NONE" if last else "RELU",
            quantization=out_q,
        )
        in_q = out_q
    mb.mark_output(h)
    return BuiltModel("int8_classifier", mb.build(), {})


def unsupported_op_model() -> bytes:
    """A well-formed model whose only operator is the custom op ``FleetLiteNoSuchOp``."""
    mb = ModelBuilder("fleetlite fixture: a custom operator no runtime provides")
    x = mb.add_input("x", [1, 4], np.float32)
    y = mb.add_tensor("y", [1, 4], np.float32)
    mb.add_custom_operator("FleetLiteNoSuchOp", [x], [y])
    mb.mark_output(y)
    return mb.build()


def crashing_model() -> bytes:
    """A structurally valid model that makes tflite-runtime 2.14 segfault when it is prepared.

    Its MEAN operator names the optional-tensor marker (-1) as its data input; the MEAN kernel
    dereferences it without a check. It passes every check short of running it, like a hostile
    release whose signatures are valid: the agent must only ever load it in an isolated process.
    """
    mb = ModelBuilder("fleetlite fixture: crashes the interpreter (MEAN of a missing tensor)")
    mb.add_input("x", [1, 4, 4], np.float32)
    axes = mb.add_constant("axes", np.asarray([1], dtype=np.int32))
    y = mb.add_tensor("y", [1, 4], np.float32)
    mb.add_operator(
        "MEAN", [-1, axes], [y], Options("ReducerOptions", {"KeepDims": False}), version=1
    )
    mb.mark_output(y)
    return mb.build()


# The models written to tests/fixtures/models by tools/build_models.py.
FIXTURES: dict[str, Callable[[int], BuiltModel]] = {
    "intent_classifier": intent_classifier,
    "sensor_autoencoder": sensor_autoencoder,
    "sensor_autoencoder_int8": sensor_autoencoder_int8,
    "two_in_two_out": two_in_two_out,
    "heavy_mlp": lambda seed: heavy_mlp(seed=seed),
}


def build_all(seed: int = DEFAULT_SEED) -> list[BuiltModel]:
    """Every fixture model, in a fixed order."""
    return [build(seed) for build in FIXTURES.values()]
