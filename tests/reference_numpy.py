"""Independent numpy references for the TFLite kernels the fixture models use.

Float kernels compute in float64. The int8 path follows TFLite's integer arithmetic: int32
accumulation of ``(x - x_zero_point) * w``, then requantisation with a 32-bit fixed-point
multiplier and shift (``QuantizeMultiplier`` and ``MultiplyByQuantizedMultiplier`` with gemmlowp's
double rounding), then the output zero point and the activation clamp.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

Array = npt.NDArray[Any]


# -- float ------------------------------------------------------------------------------------


def fully_connected(x: Array, weight: Array, bias: Array, *, relu: bool = False) -> Array:
    """``x @ weight.T + bias`` (weights are [units, features]), optionally ReLU."""
    out = x.astype(np.float64) @ weight.astype(np.float64).T + bias.astype(np.float64)
    return np.maximum(out, 0.0) if relu else out


def gather(params: Array, indices: Array) -> Array:
    """Rows of ``params`` picked by ``indices`` (axis 0)."""
    return params.astype(np.float64)[indices]


def mean(x: Array, axis: int) -> Array:
    result: Array = x.astype(np.float64).mean(axis=axis)
    return result


def softmax(x: Array) -> Array:
    """Softmax over the last axis."""
    shifted = x.astype(np.float64) - x.max(axis=-1, keepdims=True)
    e = np.exp(shifted)
    result: Array = e / e.sum(axis=-1, keepdims=True)
    return result


def dense_stack(x: Array, layers: Sequence[tuple[Array, Array]], relu: Sequence[bool]) -> Array:
    """A chain of fully connected layers."""
    h = x.astype(np.float64)
    for (weight, bias), r in zip(layers, relu):
        h = fully_connected(h, weight, bias, relu=r)
    return h


# -- int8 -------------------------------------------------------------------------------------

_INT32_MIN = -(2**31)


def quantize(x: Array, scale: float, zero_point: int) -> Array:
    """Real values -> int8 (round half away from zero, like TFLite's QUANTIZE, then clamp)."""
    scaled = x.astype(np.float64) / np.float64(scale)
    rounded: Array = np.sign(scaled) * np.floor(np.abs(scaled) + 0.5)
    return np.clip(rounded + zero_point, -128, 127).astype(np.int8)


def dequantize(q: Array, scale: float, zero_point: int) -> Array:
    result: Array = (q.astype(np.float64) - zero_point) * np.float64(scale)
    return result


def quantize_multiplier(real_multiplier: float) -> tuple[int, int]:
    """TFLite's QuantizeMultiplier: ``real ~= multiplier * 2**(shift - 31)``, multiplier in Q31."""
    if real_multiplier == 0.0:
        return 0, 0
    fraction, shift = math.frexp(real_multiplier)
    q = math.floor(fraction * 2**31 + 0.5)  # round half away from zero; fraction > 0
    if q == 2**31:
        q //= 2
        shift += 1
    if shift < -31:
        return 0, 0
    return q, shift


def _divide_toward_zero(a: Array, divisor: int) -> Array:
    """C integer division (truncates toward zero), unlike numpy's floor division."""
    magnitude = np.abs(a) // divisor
    result: Array = np.where(a < 0, -magnitude, magnitude)
    return result


def saturating_rounding_doubling_high_mul(a: Array, b: Array) -> Array:
    """gemmlowp's SaturatingRoundingDoublingHighMul on int32 values held in int64."""
    ab = a.astype(np.int64) * b.astype(np.int64)
    nudge = np.where(ab >= 0, np.int64(1 << 30), np.int64(1 - (1 << 30)))
    high = _divide_toward_zero(ab + nudge, 1 << 31)
    overflow = (a == _INT32_MIN) & (b == _INT32_MIN)
    result: Array = np.where(overflow, np.int64(2**31 - 1), high)
    return result


def rounding_divide_by_pot(x: Array, exponent: Array) -> Array:
    """gemmlowp's RoundingDivideByPOT: divide by ``2**exponent``, rounding half away from zero."""
    exponent = np.asarray(exponent, dtype=np.int64)
    mask = (np.int64(1) << exponent) - 1
    remainder = x & mask
    threshold = (mask >> 1) + (x < 0)
    result: Array = (x >> exponent) + (remainder > threshold)
    return result


def multiply_by_quantized_multiplier(acc: Array, multiplier: Array, shift: Array) -> Array:
    """TFLite's MultiplyByQuantizedMultiplier (the double-rounding variant, the 2.x default)."""
    shift = np.asarray(shift, dtype=np.int64)
    left = np.where(shift > 0, shift, 0)
    right = np.where(shift > 0, 0, -shift)
    high = saturating_rounding_doubling_high_mul(acc.astype(np.int64) << left, multiplier)
    return rounding_divide_by_pot(high, right)


def fully_connected_int8(
    x_q: Array,
    x_scale: float,
    x_zero_point: int,
    weight_q: Array,
    weight_scale: Array,
    bias_q: Array,
    out_scale: float,
    out_zero_point: int,
    *,
    relu: bool = False,
) -> Array:
    """Integer FULLY_CONNECTED: int8 [batch, in] x int8 [units, in] (+ int32 bias) -> int8.

    ``weight_scale`` holds one scale per unit (per-channel) or a single scale (per-tensor);
    weight zero points are 0, as TFLite requires for int8 weights.
    """
    acc = (x_q.astype(np.int64) - x_zero_point) @ weight_q.astype(np.int64).T + bias_q
    scales = np.broadcast_to(np.asarray(weight_scale, dtype=np.float64), (weight_q.shape[0],))
    pairs = [
        quantize_multiplier(float(np.float64(x_scale) * s / np.float64(out_scale))) for s in scales
    ]
    multiplier = np.asarray([m for m, _ in pairs], dtype=np.int64)
    shift = np.asarray([s for _, s in pairs], dtype=np.int64)
    out = multiply_by_quantized_multiplier(acc, multiplier, shift) + out_zero_point
    low = max(out_zero_point, -128) if relu else -128
    return np.clip(out, low, 127).astype(np.int8)
