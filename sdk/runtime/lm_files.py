"""Generation metadata for a language model given as files (a ``.tflite`` and its tokenizer)
rather than as a release: what ``fleetlite-agent generate FILE.tflite`` and the release builder
start from.

The model's facts (layers, cache layout, context, vocabulary, prefill lengths) are read from its
signatures; the tokenizer gives the beginning- and end-of-sequence ids; the caller gives the
prompt template and may give other stop ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from fleetlite.sdk.errors import LmFormatError
from fleetlite.sdk.generation import GenerationSpec, Sampling
from fleetlite.sdk.lm_signature import IDS_OUT_OF_RANGE, LmLayout, inspect_lm
from fleetlite.sdk.runtime.interpreter import create_interpreter, read_model_source
from fleetlite.sdk.runtime.lm_engine import read_signatures
from fleetlite.sdk.runtime.tokenizer import SentencePieceTokenizer, Tokenizer, load_tokenizer

__all__ = ["read_layout", "spec_for_files", "special_ids", "tokenizer_kind"]


def tokenizer_kind(path: Path) -> str:
    """``hf_tokenizers`` for a ``*.json`` file, else ``sentencepiece``."""
    return "hf_tokenizers" if path.suffix.lower() == ".json" else "sentencepiece"


def special_ids(tokenizer: Tokenizer) -> tuple[Optional[int], Optional[int]]:
    """The tokenizer's (BOS, EOS) ids where it defines them (SentencePiece does)."""
    if isinstance(tokenizer, SentencePieceTokenizer):
        return tokenizer.bos_id, tokenizer.eos_id
    return None, None


def read_layout(model: Path, cache_layout: Optional[str] = None, *,
                backend: Optional[str] = None) -> LmLayout:
    """The LM facts of a ``.tflite`` file, read from its signatures (``LmFormatError`` when it
    does not follow the convention)."""
    content, origin = read_model_source(model)
    _, interpreter = create_interpreter(content, origin, num_threads=1, backend=backend)
    signatures, _ = read_signatures(interpreter)
    return inspect_lm(signatures, cache_layout)


def spec_for_files(
    model: Path,
    tokenizer_path: Path,
    *,
    prompt_template: str = "{prompt}",
    stop_ids: Sequence[int] = (),
    bos_id: Optional[int] = None,
    stop_strings: Sequence[str] = (),
    cache_layout: Optional[str] = None,
    sampling: Optional[Sampling] = None,
    backend: Optional[str] = None,
) -> tuple[GenerationSpec, Tokenizer]:
    """A :class:`GenerationSpec` for ``model`` and its tokenizer, and the loaded tokenizer.

    ``bos_id`` and ``stop_ids`` default to the tokenizer's BOS and EOS ids; a tokenizer without
    an EOS id needs ``stop_ids``.
    """
    kind = tokenizer_kind(tokenizer_path)
    tokenizer = load_tokenizer(tokenizer_path, kind)
    layout = read_layout(model, cache_layout, backend=backend)
    bos, eos = special_ids(tokenizer)
    stops = tuple(stop_ids) or ((eos,) if eos is not None else ())
    if not stops:
        raise LmFormatError(
            f"{tokenizer_path} defines no end-of-sequence id: give the ids that end a reply "
            "(--stop-id)", reason=IDS_OUT_OF_RANGE)
    spec = GenerationSpec(
        tokenizer=tokenizer_path.name,
        tokenizer_kind=kind,
        prompt_template=prompt_template,
        bos_id=bos_id if bos_id is not None else bos,
        stop_ids=stops,
        stop_strings=tuple(stop_strings),
        context_length=layout.context_length,
        cache_layout=layout.cache_layout,
        num_layers=layout.num_layers,
        vocab_size=layout.vocab_size,
        prefill_lengths=layout.prefill_lengths,
        sampling=sampling or Sampling(),
    )
    return spec, tokenizer
