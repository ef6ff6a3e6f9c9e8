"""A seeded stand-in for a fine-tune: the same ``.tflite`` with a fraction of its weights changed.

python -m fleetlite.tools.finetune_weights BASE.tflite OUT.tflite [--fraction 0.1]
                                           [--spread rows|scattered] [--seed N]

Delta updates (``sdk/delta.py``) are measured on "a fine-tune that changes 10% of a model's
weights". Training one is slow and needs TensorFlow, and how many bytes change depends on the
training run, so this makes one reproducibly. Weights are the constant float32 and int8 tensors
of two or more dimensions (dense kernels, embedding tables, convolution filters); biases, norms and
quantization parameters stay. Each weight buffer is changed once (the LM's signatures share them).

How the changed values are spread (``--spread``):

- ``rows`` (the default): in every weight tensor, ``fraction`` of its rows (first axis: a dense
  layer's output channels, an embedding table's tokens) are chosen and every value in them moves,
  which is where a fine-tune's updates concentrate when it adapts some units (or merges a low-rank
  adapter into some of them) and leaves the rest.
- ``scattered``: ``fraction`` of the values of every weight tensor, chosen uniformly: the worst
  case for any delta (no two changed values need be neighbours).

A float32 value moves by a seeded normal step of 2% of its tensor's standard deviation, so sign
and exponent mostly stay, as after a small learning rate; an int8 value moves by 1 to 3
quantization steps either way (clipped to [-127, 127], and never by zero). Only bytes inside
weight buffers change: the file's length and structure are the base's.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np
import numpy.typing as npt
from tflite.Model import Model
from tflite.TensorType import TensorType

from fleetlite.sdk.runtime.model_bounds import buffer_spans

__all__ = ["SPREADS", "finetune_weights", "weight_buffers"]

SPREADS = ("rows", "scattered")
_DTYPES: dict[int, np.dtype[Any]] = {TensorType.FLOAT32: np.dtype("<f4"),
                                     TensorType.INT8: np.dtype("i1")}


def weight_buffers(content: bytes) -> dict[int, tuple[np.dtype[Any], tuple[int, ...]]]:
    """Buffer index -> (dtype, shape) of every constant float32/int8 tensor of rank >= 2."""
    model = Model.GetRootAsModel(content, 0)
    found: dict[int, tuple[np.dtype[Any], tuple[int, ...]]] = {}
    for g in range(model.SubgraphsLength()):
        graph = model.Subgraphs(g)
        for t in range(graph.TensorsLength()):
            tensor = graph.Tensors(t)
            shape = tuple(int(d) for d in tensor.ShapeAsNumpy()) if tensor.ShapeLength() else ()
            dtype = _DTYPES.get(tensor.Type())
            if dtype is not None and len(shape) >= 2 and tensor.Buffer() > 0:
                found.setdefault(tensor.Buffer(), (dtype, shape))
    return found


def _chosen(rng: np.random.Generator, shape: tuple[int, ...], fraction: float,
            spread: str) -> npt.NDArray[np.bool_]:
    if spread == "rows":
        rows = np.zeros(shape[0], dtype=bool)
        rows[rng.choice(shape[0], max(1, round(fraction * shape[0])), replace=False)] = True
        return np.broadcast_to(rows.reshape((-1,) + (1,) * (len(shape) - 1)), shape).copy()
    mask = np.zeros(int(np.prod(shape)), dtype=bool)
    mask[rng.choice(mask.size, max(1, round(fraction * mask.size)), replace=False)] = True
    return mask.reshape(shape)


def finetune_weights(content: bytes, *, fraction: float = 0.1, spread: str = "rows",
                     seed: int = 0) -> bytes:
    """``content`` with ``fraction`` of every weight tensor's values changed (see module doc)."""
    if spread not in SPREADS:
        raise ValueError(f"spread must be one of {SPREADS}")
    if not 0 < fraction <= 1:
        raise ValueError("fraction must be in (0, 1]")
    rng = np.random.default_rng(seed)
    out = bytearray(content)
    spans = {i: (start, length) for i, start, length in buffer_spans(content)}
    for index, (dtype, shape) in sorted(weight_buffers(content).items()):
        start, length = spans.get(index, (0, 0))
        if length != int(np.prod(shape)) * dtype.itemsize:
            continue  # not stored inline as shaped (e.g. sparse): leave it
        values = np.frombuffer(content, dtype=dtype, count=length // dtype.itemsize,
                               offset=start).reshape(shape)
        mask = _chosen(rng, shape, fraction, spread)
        if dtype.kind == "f":
            scale = float(np.std(values)) or 1.0
            step = rng.normal(0.0, 0.02 * scale, size=shape).astype(np.float32)
            changed = np.where(mask, values + step, values).astype(dtype)
        else:
            step = rng.integers(1, 4, size=shape) * rng.choice([-1, 1], size=shape)
            moved = values.astype(np.int16) + step
            moved = np.where((moved > 127) | (moved < -127), values.astype(np.int16) - step, moved)
            changed = np.where(mask, np.clip(moved, -128, 127), values).astype(dtype)
        out[start:start + length] = changed.tobytes()
    return bytes(out)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fleetlite.tools.finetune_weights",
                                     description="Change a seeded fraction of a .tflite's weights.")
    parser.add_argument("base", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--spread", choices=SPREADS, default="rows")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    content = args.base.read_bytes()
    tuned = finetune_weights(content, fraction=args.fraction, spread=args.spread, seed=args.seed)
    args.out.write_bytes(tuned)
    changed = int(np.count_nonzero(np.frombuffer(content, np.uint8)
                                   != np.frombuffer(tuned, np.uint8)))
    print(f"wrote {args.out}: {changed} of {len(tuned)} bytes differ from {args.base}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
