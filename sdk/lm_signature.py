"""The signature contract of a generative language model, checked over signature shapes alone.

A generative LM release carries one ``.tflite`` in the convention litert-torch exports and
LiteRT-LM loads: signatures ``prefill_<N>`` (one per prefill length N) and ``decode``. Inputs:
``tokens`` int32 [1,N] ([1,1] for decode), ``input_pos`` int32 [N] ([1]), per layer i
``kv_cache_k_<i>`` / ``kv_cache_v_<i>`` float32 and, optionally in every signature, ``mask``
float32 [1,1,N,T]. Prefill outputs the caches (same names); decode outputs ``logits`` float32
[1,1,vocab] and the caches. Cache layouts, T being the context length:

- ``default``: K and V both [1,T,heads,head_dim];
- ``transposed``: K [1,heads,T,head_dim], V [1,heads,head_dim,T] (what LiteRT-LM needs).

:func:`inspect_lm` is pure: the caller reads the shapes from its runtime (in the crash-isolated
process on a device) and passes them here. Checks run in this order and the first failure is
raised: ``decode`` present, a ``prefill_<N>`` present, no other signature, each signature's
tensor names, dtypes and ranks (decode first, then prefills by N), cache shapes equal across
layers and signatures, the layout, then logits, tokens, input_pos and mask shapes.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Optional

from fleetlite.sdk.errors import LmFormatError

__all__ = [
    "AMBIGUOUS_LAYOUT",
    "BAD_LM_SIGNATURE",
    "CACHE_LAYOUTS",
    "CACHE_SHAPE_MISMATCH",
    "DECODE",
    "DEFAULT_LAYOUT",
    "IDS_OUT_OF_RANGE",
    "LM_REASONS",
    "MISSING_DECODE",
    "MISSING_PREFILL",
    "TRANSPOSED_LAYOUT",
    "VOCAB_MISMATCH",
    "LmLayout",
    "SignatureShapes",
    "TensorShape",
    "inspect_lm",
    "is_lm",
    "prefill_name",
]

# Reason codes of LmFormatError: part of the protocol (docs/protocol.md, "Release manifest").
MISSING_DECODE = "missing_decode"  # no ``decode`` signature
MISSING_PREFILL = "missing_prefill"  # no ``prefill_<N>`` signature
# A signature's tensors break the convention: a missing, extra, wrong-dtype or wrong-rank input
# or output, layers not numbered 0..L-1, logits not [1,1,V], an unknown signature. Not
# ``bad_signature``: that code already means an invalid cryptographic signature.
BAD_LM_SIGNATURE = "bad_lm_signature"
# Caches disagree across layers or signatures, or with the (given or detected) layout; a mask or
# prefill length disagrees with the context length; generation metadata disagrees with the model.
CACHE_SHAPE_MISMATCH = "cache_shape_mismatch"
AMBIGUOUS_LAYOUT = "ambiguous_layout"  # K and V shapes fit both layouts; pass cache_layout
VOCAB_MISMATCH = "vocab_mismatch"  # tokenizer, metadata and logits disagree on the vocabulary
IDS_OUT_OF_RANGE = "ids_out_of_range"  # a bos or stop id outside [0, vocab_size)
LM_REASONS = (MISSING_DECODE, MISSING_PREFILL, BAD_LM_SIGNATURE, CACHE_SHAPE_MISMATCH,
              AMBIGUOUS_LAYOUT, VOCAB_MISMATCH, IDS_OUT_OF_RANGE)

DEFAULT_LAYOUT = "default"
TRANSPOSED_LAYOUT = "transposed"
CACHE_LAYOUTS = (DEFAULT_LAYOUT, TRANSPOSED_LAYOUT)
DECODE = "decode"
_PREFILL_RE = re.compile(r"prefill_([1-9][0-9]{0,8})\Z")
_CACHE_RE = re.compile(r"kv_cache_([kv])_(0|[1-9][0-9]{0,8})\Z")
_TOKENS, _INPUT_POS, _MASK, _LOGITS = "tokens", "input_pos", "mask", "logits"


@dataclass(frozen=True)
class TensorShape:
    """A signature tensor's static shape and numpy dtype name (``"int32"``, ``"float32"``)."""

    shape: tuple[int, ...]
    dtype: str


# Signature name -> (inputs by name, outputs by name), as a runtime's signature runner reports.
SignatureShapes = Mapping[str, tuple[Mapping[str, TensorShape], Mapping[str, TensorShape]]]


@dataclass(frozen=True)
class LmLayout:
    """What :func:`inspect_lm` learned: the numbers a generation loop allocates and feeds by.

    ``prefill_lengths`` is ascending; ``has_mask``: every signature (decode included) takes a
    ``mask`` input.
    """

    num_layers: int
    cache_layout: str
    num_heads: int
    head_dim: int
    context_length: int
    vocab_size: int
    prefill_lengths: tuple[int, ...]
    has_mask: bool


def prefill_name(length: int) -> str:
    """The signature name of the prefill of ``length`` tokens (``prefill_<N>``)."""
    return f"prefill_{length}"


def is_lm(signature_names: Collection[str]) -> bool:
    """True when the model has a ``decode`` or a ``prefill_<N>`` signature: it claims to be a
    generative LM, so :func:`inspect_lm` must accept it before anything runs it."""
    return any(name == DECODE or _PREFILL_RE.match(name) for name in signature_names)


def inspect_lm(signatures: SignatureShapes, cache_layout: Optional[str] = None) -> LmLayout:
    """Check ``signatures`` against the LM convention and return the layout they describe.

    ``cache_layout`` (``"default"`` or ``"transposed"``, e.g. from the manifest's ``generation``)
    is checked against the cache shapes; without it the layout is detected from them. Raises
    :class:`LmFormatError` with one of the reason codes above; :class:`ValueError` for a
    ``cache_layout`` outside :data:`CACHE_LAYOUTS` (a caller's bug: the manifest admits no other).
    """
    if cache_layout is not None and cache_layout not in CACHE_LAYOUTS:
        raise ValueError(f"cache_layout must be one of {list(CACHE_LAYOUTS)}, not {cache_layout!r}")
    names = sorted(signatures)
    if DECODE not in signatures:
        raise LmFormatError(f"the model has no 'decode' signature (it has {names[:8]}); export "
                            "it with litert-torch's decode signature", reason=MISSING_DECODE)
    prefills = sorted(int(m.group(1)) for m in map(_PREFILL_RE.match, names) if m)
    if not prefills:
        raise LmFormatError(f"the model has no 'prefill_<N>' signature (it has {names[:8]}); "
                            "export at least one prefill length (a current litert-torch names "
                            "it prefill_<N>)", reason=MISSING_PREFILL)
    order = [DECODE, *(prefill_name(n) for n in prefills)]
    unknown = sorted(set(names) - set(order))
    if unknown:
        raise _format(f"signature {unknown[0]!r} is not part of the LM convention (only "
                      "'decode' and 'prefill_<N>'); export the model without it")
    decode_inputs, decode_outputs = signatures[DECODE]
    num_layers = _count_layers(decode_inputs)
    has_mask = _MASK in decode_inputs
    caches = {f"kv_cache_{kv}_{i}": 4 for i in range(num_layers) for kv in "kv"}
    for name in order:
        inputs, outputs = signatures[name]
        wanted_inputs = {_TOKENS: 2, _INPUT_POS: 1, **caches, **({_MASK: 4} if has_mask else {})}
        _check_tensors(name, "input", inputs, wanted_inputs)
        _check_tensors(name, "output", outputs, {_LOGITS: 3, **caches} if name == DECODE
                       else caches)
    for name in order:
        for side, tensors in zip(("input", "output"), signatures[name]):
            for tensor in caches:
                reference = tensor[:len("kv_cache_k_")] + "0"
                got, expected = tensors[tensor].shape, decode_inputs[reference].shape
                if got != expected:
                    raise _mismatch(f"{name} {side} {tensor} is {list(got)} but decode's input "
                                    f"{reference} is {list(expected)}; every layer and "
                                    "signature must share one cache shape")
    key, value = decode_inputs["kv_cache_k_0"].shape, decode_inputs["kv_cache_v_0"].shape
    layout, heads, context, head_dim = _layout(key, value, cache_layout)
    logits = decode_outputs[_LOGITS].shape
    if logits[:2] != (1, 1):
        raise _format(f"decode output logits is {list(logits)}; it must be [1, 1, vocab_size]")
    for name, length in ((DECODE, 1), *((prefill_name(n), n) for n in prefills)):
        inputs = signatures[name][0]
        _check_shape(name, _TOKENS, inputs[_TOKENS].shape, (1, length))
        _check_shape(name, _INPUT_POS, inputs[_INPUT_POS].shape, (length,))
        if has_mask:
            mask = inputs[_MASK].shape
            if mask[:3] != (1, 1, length):
                raise _format(f"{name} input mask is {list(mask)}; it must be [1, 1, {length}, "
                              f"{context}]")
            if mask[3] != context:
                raise _mismatch(f"{name} input mask covers {mask[3]} positions but the cache "
                                f"holds {context} ({layout} layout); they must be equal")
        if length > context:
            raise _mismatch(f"{name} prefills {length} tokens but the context holds only "
                            f"{context}; drop that prefill length or enlarge the cache")
    return LmLayout(num_layers=num_layers, cache_layout=layout, num_heads=heads,
                    head_dim=head_dim, context_length=context, vocab_size=logits[2],
                    prefill_lengths=tuple(prefills), has_mask=has_mask)


def _format(message: str) -> LmFormatError:
    return LmFormatError(f"{message} (LM signature convention: docs/protocol.md)",
                         reason=BAD_LM_SIGNATURE)


def _mismatch(message: str) -> LmFormatError:
    return LmFormatError(message, reason=CACHE_SHAPE_MISMATCH)


def _count_layers(inputs: Mapping[str, TensorShape]) -> int:
    """The number of layers L, after checking decode's caches are numbered exactly 0..L-1."""
    layers: dict[str, set[int]] = {"k": set(), "v": set()}
    for name in inputs:
        match = _CACHE_RE.match(name)
        if match:
            layers[match.group(1)].add(int(match.group(2)))
    count = len(layers["k"])
    if count == 0:
        raise _format("decode has no kv_cache_k_<i> input; the model must take its key/value "
                      "cache as inputs kv_cache_k_0.. and kv_cache_v_0..")
    for kv, found in layers.items():
        if found != set(range(count)):
            missing = sorted(set(range(count)) - found) or sorted(found - set(range(count)))
            raise _format(f"decode's kv_cache_{kv}_<i> inputs are numbered {sorted(found)[:8]}; "
                          f"they must be 0..{count - 1} (check kv_cache_{kv}_{missing[0]})")
    return count


def _check_tensors(signature: str, side: str, tensors: Mapping[str, TensorShape],
                   wanted: Mapping[str, int]) -> None:
    """Exactly the ``wanted`` names (name -> rank), each of the convention's dtype and rank."""
    missing = sorted(set(wanted) - set(tensors))
    if missing:
        raise _format(f"{signature} has no {side} {missing[0]!r}")
    extra = sorted(set(tensors) - set(wanted))
    if extra:
        raise _format(f"{signature} has an unexpected {side} {extra[0]!r}")
    for name, rank in wanted.items():
        tensor = tensors[name]
        dtype = "int32" if name in (_TOKENS, _INPUT_POS) else "float32"
        if tensor.dtype != dtype:
            raise _format(f"{signature} {side} {name} is {tensor.dtype}; it must be {dtype}")
        if len(tensor.shape) != rank:
            raise _format(f"{signature} {side} {name} has shape {list(tensor.shape)}; it must "
                          f"have rank {rank}")
        if any(dim < 1 for dim in tensor.shape):
            raise _format(f"{signature} {side} {name} has shape {list(tensor.shape)}; every "
                          "dimension must be static and at least 1")


def _check_shape(signature: str, name: str, got: tuple[int, ...],
                 expected: tuple[int, ...]) -> None:
    if got != expected:
        raise _format(f"{signature} input {name} is {list(got)}; it must be {list(expected)}")


def _layout(key: tuple[int, ...], value: tuple[int, ...], given: Optional[str]
            ) -> tuple[str, int, int, int]:
    """(layout, heads, context length, head_dim) of caches K and V (rank 4, checked before)."""
    if key[0] != 1:
        raise _format(f"decode input kv_cache_k_0 is {list(key)}: batch size {key[0]}; the "
                      "convention's batch size is 1")
    fits_default = key == value
    fits_transposed = value == (key[0], key[1], key[3], key[2])
    shapes = f"K {list(key)}, V {list(value)}"
    if given is None:
        if fits_default and fits_transposed:
            raise LmFormatError(f"the cache shapes ({shapes}) fit both the default and the "
                                "transposed layout; state generation.cache_layout",
                                reason=AMBIGUOUS_LAYOUT)
        if not (fits_default or fits_transposed):
            raise _mismatch(f"the cache shapes ({shapes}) fit neither layout: default needs "
                            "K = V = [1,T,heads,head_dim], transposed K [1,heads,T,head_dim] "
                            "and V [1,heads,head_dim,T]")
        given = DEFAULT_LAYOUT if fits_default else TRANSPOSED_LAYOUT
    elif not (fits_default if given == DEFAULT_LAYOUT else fits_transposed):
        raise _mismatch(f"the cache shapes ({shapes}) do not fit the {given} layout stated in "
                        "generation.cache_layout; state the layout the model was exported with")
    if given == DEFAULT_LAYOUT:
        return given, key[2], key[1], key[3]
    return given, key[1], key[2], key[3]
