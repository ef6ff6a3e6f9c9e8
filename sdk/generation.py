"""Generation metadata of a language-model release: the manifest's ``generation`` object.

It names the tokenizer file (role ``tokenizer``), the prompt format, the stop conditions, the
model facts a device checks the ``.tflite`` against (:func:`check_generation`, after
:func:`~fleetlite.sdk.lm_signature.inspect_lm`) and the default sampling. Validation is strict
and pure: a bad value raises :class:`MalformedError` naming its field path
(``generation.sampling.top_p``), from the constructor and from :meth:`GenerationSpec.from_dict`.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any, Optional

from fleetlite.sdk.errors import LmFormatError, MalformedError, UnsafeNameError
from fleetlite.sdk.lm_signature import (
    CACHE_LAYOUTS,
    CACHE_SHAPE_MISMATCH,
    IDS_OUT_OF_RANGE,
    VOCAB_MISMATCH,
    LmLayout,
)

__all__ = [
    "MAX_CONTEXT_LENGTH",
    "MAX_LAYERS",
    "MAX_MAX_TOKENS",
    "MAX_PREFILL_LENGTHS",
    "MAX_PROMPT_TEMPLATE",
    "MAX_STOP_IDS",
    "MAX_STOP_STRING",
    "MAX_STOP_STRINGS",
    "MAX_TEMPERATURE",
    "MAX_VOCAB_SIZE",
    "PROMPT_PLACEHOLDER",
    "TOKENIZER_KINDS",
    "GenerationSpec",
    "Sampling",
    "check_generation",
]

TOKENIZER_KINDS = ("sentencepiece", "hf_tokenizers")
PROMPT_PLACEHOLDER = "{prompt}"
MAX_PROMPT_TEMPLATE = 1024
MAX_STOP_IDS = 16
MAX_STOP_STRINGS = 8
MAX_STOP_STRING = 64
MAX_TEMPERATURE = 10.0
MAX_MAX_TOKENS = 4096
# Caps far above any model a gateway runs, so hostile metadata cannot ask for absurd buffers.
MAX_CONTEXT_LENGTH = 1 << 20
MAX_VOCAB_SIZE = 1 << 22
MAX_LAYERS = 1024
MAX_PREFILL_LENGTHS = 16
_WHAT = "generation"


@dataclass(frozen=True)
class Sampling:
    """Default sampling of the release. ``temperature`` 0 is greedy (argmax, lowest id on a
    tie); ``top_k`` 0 and ``top_p`` 1 switch those filters off; ``max_tokens`` caps new tokens.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    max_tokens: int = 64

    def __post_init__(self) -> None:
        what = f"{_WHAT}.sampling"
        _check_number(self.temperature, f"{what}.temperature", 0.0, MAX_TEMPERATURE)
        _check_int(self.top_k, f"{what}.top_k", 0, MAX_VOCAB_SIZE)
        _check_number(self.top_p, f"{what}.top_p", 0.0, 1.0, open_minimum=True)
        _check_int(self.max_tokens, f"{what}.max_tokens", 1, MAX_MAX_TOKENS)
        object.__setattr__(self, "temperature", float(self.temperature))
        object.__setattr__(self, "top_p", float(self.top_p))

    def to_dict(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p,
                "max_tokens": self.max_tokens}

    @classmethod
    def from_dict(cls, data: Any) -> Sampling:
        """Strict: exactly the four fields, each of its type and range."""
        fields = _obj(data, f"{_WHAT}.sampling", {"temperature", "top_k", "top_p", "max_tokens"})
        return cls(temperature=fields["temperature"], top_k=fields["top_k"],
                   top_p=fields["top_p"], max_tokens=fields["max_tokens"])


@dataclass(frozen=True)
class GenerationSpec:
    """How to drive the release's LM: tokenizer, prompt, stop conditions, model facts, sampling.

    ``tokenizer`` is the name of the release's file of role ``tokenizer``, of ``tokenizer_kind``
    ``sentencepiece`` (a ``.model`` file) or ``hf_tokenizers`` (a ``tokenizer.json``).
    ``prompt_template`` holds ``{prompt}`` exactly once (other braces are literal text). The
    model facts (``context_length``, ``cache_layout``, ``num_layers``, ``vocab_size``,
    ``prefill_lengths`` ascending) must match what ``inspect_lm`` reads from the model.
    """

    tokenizer: str
    tokenizer_kind: str
    prompt_template: str
    bos_id: Optional[int]
    stop_ids: tuple[int, ...]
    context_length: int
    cache_layout: str
    num_layers: int
    vocab_size: int
    prefill_lengths: tuple[int, ...]
    stop_strings: tuple[str, ...] = ()
    sampling: Sampling = field(default_factory=Sampling)

    def __post_init__(self) -> None:
        from fleetlite.sdk.manifest import check_file_name  # manifest.py imports this module

        try:
            check_file_name(self.tokenizer)
        except UnsafeNameError as exc:
            raise UnsafeNameError(f"manifest: {_WHAT}.tokenizer: {exc}") from None
        if self.tokenizer_kind not in TOKENIZER_KINDS:
            raise _bad(f"{_WHAT}.tokenizer_kind must be one of {list(TOKENIZER_KINDS)}")
        template: Any = self.prompt_template
        if (not isinstance(template, str) or len(template) > MAX_PROMPT_TEMPLATE
                or template.count(PROMPT_PLACEHOLDER) != 1):
            raise _bad(f"{_WHAT}.prompt_template must be a string of at most "
                       f"{MAX_PROMPT_TEMPLATE} characters holding {PROMPT_PLACEHOLDER} exactly "
                       "once")
        if self.bos_id is not None:
            _check_int(self.bos_id, f"{_WHAT}.bos_id", 0, MAX_VOCAB_SIZE)
        _check_ints(self.stop_ids, f"{_WHAT}.stop_ids", 1, MAX_STOP_IDS, MAX_VOCAB_SIZE)
        if len(set(self.stop_ids)) != len(self.stop_ids):
            raise _bad(f"{_WHAT}.stop_ids lists an id twice")
        _check_tuple(self.stop_strings, f"{_WHAT}.stop_strings", 0, MAX_STOP_STRINGS)
        for text in self.stop_strings:
            if not isinstance(text, str) or not 1 <= len(text) <= MAX_STOP_STRING:
                raise _bad(f"{_WHAT}.stop_strings entries must be strings of 1-{MAX_STOP_STRING} "
                           "characters")
        if len(set(self.stop_strings)) != len(self.stop_strings):
            raise _bad(f"{_WHAT}.stop_strings lists a string twice")
        _check_int(self.context_length, f"{_WHAT}.context_length", 1, MAX_CONTEXT_LENGTH)
        if self.cache_layout not in CACHE_LAYOUTS:
            raise _bad(f"{_WHAT}.cache_layout must be one of {list(CACHE_LAYOUTS)}")
        _check_int(self.num_layers, f"{_WHAT}.num_layers", 1, MAX_LAYERS)
        _check_int(self.vocab_size, f"{_WHAT}.vocab_size", 1, MAX_VOCAB_SIZE)
        _check_ints(self.prefill_lengths, f"{_WHAT}.prefill_lengths", 1, MAX_PREFILL_LENGTHS,
                    self.context_length, minimum=1)
        if list(self.prefill_lengths) != sorted(set(self.prefill_lengths)):
            raise _bad(f"{_WHAT}.prefill_lengths must be strictly ascending")

    def to_dict(self) -> dict[str, Any]:
        """The manifest's ``generation`` object; ``bos_id`` and ``stop_strings`` only when set."""
        out: dict[str, Any] = {
            "tokenizer": self.tokenizer,
            "tokenizer_kind": self.tokenizer_kind,
            "prompt_template": self.prompt_template,
            "stop_ids": list(self.stop_ids),
            "context_length": self.context_length,
            "cache_layout": self.cache_layout,
            "num_layers": self.num_layers,
            "vocab_size": self.vocab_size,
            "prefill_lengths": list(self.prefill_lengths),
            "sampling": self.sampling.to_dict(),
        }
        if self.bos_id is not None:
            out["bos_id"] = self.bos_id
        if self.stop_strings:
            out["stop_strings"] = list(self.stop_strings)
        return out

    @classmethod
    def from_dict(cls, data: Any) -> GenerationSpec:
        """Strict: unknown or missing fields and wrong types raise :class:`MalformedError`."""
        fields = _obj(data, _WHAT, {"tokenizer", "tokenizer_kind", "prompt_template", "stop_ids",
                                    "context_length", "cache_layout", "num_layers", "vocab_size",
                                    "prefill_lengths", "sampling"}, {"bos_id", "stop_strings"})
        if "bos_id" in fields and fields["bos_id"] is None:
            raise _bad(f"{_WHAT}.bos_id must be an integer; omit it when the model has no BOS "
                       "token")
        return cls(
            tokenizer=fields["tokenizer"],
            tokenizer_kind=fields["tokenizer_kind"],
            prompt_template=fields["prompt_template"],
            bos_id=fields.get("bos_id"),
            stop_ids=_tuple(fields["stop_ids"], f"{_WHAT}.stop_ids", MAX_STOP_IDS),
            context_length=fields["context_length"],
            cache_layout=fields["cache_layout"],
            num_layers=fields["num_layers"],
            vocab_size=fields["vocab_size"],
            prefill_lengths=_tuple(fields["prefill_lengths"], f"{_WHAT}.prefill_lengths",
                                   MAX_PREFILL_LENGTHS),
            stop_strings=_tuple(fields.get("stop_strings", []), f"{_WHAT}.stop_strings",
                                MAX_STOP_STRINGS),
            sampling=Sampling.from_dict(fields["sampling"]),
        )

    def render_prompt(self, prompt: str) -> str:
        """The text to tokenize: ``prompt_template`` with ``{prompt}`` replaced by ``prompt``."""
        before, after = self.prompt_template.split(PROMPT_PLACEHOLDER)
        return before + prompt + after


def check_generation(spec: GenerationSpec, layout: LmLayout,
                     tokenizer_vocab_size: Optional[int] = None) -> None:
    """Check ``spec`` against the model's ``layout`` (and the loaded tokenizer's vocabulary size).

    In this order: the model facts (``cache_shape_mismatch``), the vocabulary sizes of the
    tokenizer, the spec and the model's logits (``vocab_mismatch``), then the bos and stop ids
    (``ids_out_of_range``). Raises :class:`LmFormatError` naming both disagreeing values.
    """
    for name, stated, actual in (
        ("context_length", spec.context_length, layout.context_length),
        ("num_layers", spec.num_layers, layout.num_layers),
        ("cache_layout", spec.cache_layout, layout.cache_layout),
        ("prefill_lengths", list(spec.prefill_lengths), list(layout.prefill_lengths)),
    ):
        if stated != actual:
            raise LmFormatError(f"generation.{name} is {stated!r} but the model has {actual!r}; "
                                "rebuild the release with the model's values",
                                reason=CACHE_SHAPE_MISMATCH)
    if spec.vocab_size != layout.vocab_size:
        raise LmFormatError(f"generation.vocab_size is {spec.vocab_size} but the model's logits "
                            f"have {layout.vocab_size} entries; they must be equal",
                            reason=VOCAB_MISMATCH)
    if tokenizer_vocab_size is not None and tokenizer_vocab_size != spec.vocab_size:
        raise LmFormatError(f"the tokenizer {spec.tokenizer!r} has {tokenizer_vocab_size} "
                            f"tokens but the model's vocabulary has {spec.vocab_size}; ship the "
                            "tokenizer the model was trained with", reason=VOCAB_MISMATCH)
    named = [("bos_id", spec.bos_id)] if spec.bos_id is not None else []
    named += [(f"stop_ids[{i}]", token) for i, token in enumerate(spec.stop_ids)]
    for name, token in named:
        if token >= spec.vocab_size:
            raise LmFormatError(f"generation.{name} is {token}, outside the vocabulary "
                                f"[0, {spec.vocab_size}); use an id the tokenizer defines",
                                reason=IDS_OUT_OF_RANGE)


# --- strict checks ----------------------------------------------------------------------------


def _bad(message: str) -> MalformedError:
    return MalformedError(f"manifest: {message}")


def _obj(value: Any, what: str, required: set[str], optional: Collection[str] = ()
         ) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _bad(f"{what} must be an object")
    missing = required - set(value)
    unknown = set(value) - required - set(optional)
    if missing:
        raise _bad(f"{what} is missing {sorted(missing)}")
    if unknown:
        raise _bad(f"{what} has unknown field(s) {sorted(map(str, unknown))[:5]}; a newer "
                   "spec? upgrade the agent")
    return value


def _tuple(value: Any, what: str, max_len: int) -> tuple[Any, ...]:
    if not isinstance(value, list):
        raise _bad(f"{what} must be a list")
    if len(value) > max_len:
        raise _bad(f"{what} has more than {max_len} entries")
    return tuple(value)


def _check_tuple(value: Any, what: str, min_len: int, max_len: int) -> None:
    if not isinstance(value, tuple) or not min_len <= len(value) <= max_len:
        raise _bad(f"{what} must list {min_len}-{max_len} entries")


def _check_int(value: Any, what: str, minimum: int, maximum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        raise _bad(f"{what} must be an integer in [{minimum}, {maximum}]")


def _check_ints(value: Any, what: str, min_len: int, max_len: int, maximum: int,
                minimum: int = 0) -> None:
    _check_tuple(value, what, min_len, max_len)
    for i, item in enumerate(value):
        _check_int(item, f"{what}[{i}]", minimum, maximum)


def _check_number(value: Any, what: str, minimum: float, maximum: float,
                  open_minimum: bool = False) -> None:
    # Compared before any float() so that a huge integer cannot raise OverflowError; NaN fails.
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or not minimum <= value <= maximum or (open_minimum and value == minimum)):
        raise _bad(f"{what} must be a number in {'(' if open_minimum else '['}{minimum:g}, "
                   f"{maximum:g}]")
