"""Whether a ``.tflite`` file is a generative language model, read from its flatbuffer without
an interpreter: its signature names (``decode``, ``prefill_<N>``), every offset bounds-checked.
A model this machine's runtime cannot load is still recognised.
"""

from __future__ import annotations

import mmap
from typing import cast

from fleetlite.sdk.lm_signature import is_lm
from fleetlite.sdk.runtime.interpreter import ModelSource
from fleetlite.sdk.runtime.model_bounds import BoundsError, _Reader

__all__ = ["is_language_model", "signature_keys"]

# Model.signature_defs and SignatureDef.signature_key in tensorflow/lite/schema/schema.fbs
_MODEL_SIGNATURE_DEFS, _SIGNATURE_KEY = 7, 2


def signature_keys(content: bytes) -> tuple[str, ...]:
    """The signature names of a ``.tflite`` flatbuffer, read without an interpreter (every
    offset bounds-checked: :class:`~fleetlite.sdk.runtime.model_bounds.BoundsError` otherwise)."""
    reader = _Reader(content)
    model = reader.table(reader.u32(0, "root offset"), "model")
    keys = []
    for i, signature in enumerate(model.tables(_MODEL_SIGNATURE_DEFS, "signature_defs")):
        pos = signature.field(_SIGNATURE_KEY)
        if pos is None:
            continue
        start, length = reader.vector(pos, 1, f"signature_defs[{i}].signature_key")
        keys.append(bytes(content[start:start + length]).decode("utf-8", errors="replace"))
    return tuple(keys)


def is_language_model(source: ModelSource) -> bool:
    """Whether a model claims the LM signatures (``decode``, ``prefill_<N>``), read from its
    flatbuffer without an interpreter (a file is mapped, not read). False for anything that is
    not a readable flatbuffer: loading it then says what is wrong."""
    try:
        if isinstance(source, (bytes, bytearray, memoryview)):
            return is_lm(signature_keys(bytes(source)))
        with open(source, "rb") as file, mmap.mmap(file.fileno(), 0,
                                                   access=mmap.ACCESS_READ) as mapped:
            return is_lm(signature_keys(cast(bytes, mapped)))
    except (OSError, ValueError, BoundsError):
        return False
