"""Tokenizers of generative language models: SentencePiece, and Hugging Face ``tokenizer.json``.

A tokenizer file travels in a release beside its model, so it is outside input: its size is capped
and the library's exceptions become :class:`TokenizerError`. :class:`IncrementalDecoder` turns
generated ids into text token by token, giving the same text as decoding all ids at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional, Protocol, Union

from fleetlite.sdk.generation import TOKENIZER_KINDS
from fleetlite.sdk.runtime.errors import ModelRuntimeError

MAX_TOKENIZER_BYTES = 16 * 2**20
_INCOMPLETE = "\ufffd"  # what a partial UTF-8 byte sequence decodes to (byte-fallback pieces)

PathLike = Union[str, Path]


class TokenizerError(ModelRuntimeError):
    """A tokenizer file cannot be used, its library is missing, or ids do not belong to it."""


class Tokenizer(Protocol):
    """What the generation engine needs from a tokenizer."""

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without BOS/EOS (the engine adds the model's BOS)."""
        ...

    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids``; control tokens (BOS, EOS, ...) decode to nothing."""
        ...


def read_tokenizer_file(path: PathLike, limit: int = MAX_TOKENIZER_BYTES) -> bytes:
    """The bytes of a tokenizer file, refusing files over ``limit`` bytes."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            content = handle.read(limit + 1)
    except OSError as exc:
        raise TokenizerError(
            f"{path}: cannot read the tokenizer file ({exc.strerror or exc}); check the release "
            "was installed completely"
        ) from exc
    if len(content) > limit:
        raise TokenizerError(
            f"{path}: the tokenizer file is larger than {limit // 2**20} MiB, the limit for "
            "tokenizer files; this is not a small language model's tokenizer"
        )
    return content


class SentencePieceTokenizer:
    """A SentencePiece ``.model`` file (the ``sentencepiece`` package)."""

    def __init__(self, path: PathLike) -> None:
        import sentencepiece

        self.path = Path(path)
        content = read_tokenizer_file(self.path)
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_proto=content)
        except RuntimeError as exc:
            raise _bad_file(self.path, "SentencePiece model", exc) from exc
        # An empty proto "loads" as an uninitialised processor with no pieces.
        if self._sp.get_piece_size() == 0:
            raise _bad_file(self.path, "SentencePiece model", "it has no pieces")
        self._vocab_size = int(self._sp.get_piece_size())

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def bos_id(self) -> Optional[int]:
        """The beginning-of-sequence id, or None when the model defines none."""
        value = int(self._sp.bos_id())
        return value if value >= 0 else None

    @property
    def eos_id(self) -> Optional[int]:
        """The end-of-sequence id, or None when the model defines none."""
        value = int(self._sp.eos_id())
        return value if value >= 0 else None

    def encode(self, text: str) -> list[int]:
        return list(self._sp.encode(text, out_type=int))

    def decode(self, ids: Sequence[int]) -> str:
        try:
            return str(self._sp.decode(list(ids)))
        except IndexError as exc:
            raise _out_of_vocabulary(ids, self._vocab_size) from exc


class HfTokenizer:
    """A Hugging Face ``tokenizer.json`` (the optional ``tokenizers`` package)."""

    def __init__(self, path: PathLike) -> None:
        try:
            import tokenizers
        except ImportError as exc:
            raise TokenizerError(
                f"{path}: reading a Hugging Face tokenizer.json needs the 'tokenizers' package; "
                "install it with: pip install 'fleetlite[hf]'"
            ) from exc
        self.path = Path(path)
        content = read_tokenizer_file(self.path)
        try:
            self._tok: Any = tokenizers.Tokenizer.from_str(content.decode("utf-8"))
        except Exception as exc:  # tokenizers raises plain Exception on a bad file
            raise _bad_file(self.path, "Hugging Face tokenizer.json", exc) from exc
        self._vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        if any(not 0 <= i < self._vocab_size for i in ids):
            raise _out_of_vocabulary(ids, self._vocab_size)
        return str(self._tok.decode(list(ids), skip_special_tokens=True))


def load_tokenizer(path: PathLike, kind: str) -> Tokenizer:
    """The tokenizer in ``path``; ``kind`` is ``sentencepiece`` or ``hf_tokenizers`` (a
    ``tokenizer.json``), as the release's ``generation.tokenizer_kind`` says."""
    if kind == "sentencepiece":
        return SentencePieceTokenizer(path)
    if kind == "hf_tokenizers":
        return HfTokenizer(path)
    raise TokenizerError(
        f"{path}: unknown tokenizer kind {kind!r}; the release must name one of "
        f"{', '.join(TOKENIZER_KINDS)}"
    )


class IncrementalDecoder:
    """Text of generated ids as they come: what :meth:`push` and :meth:`flush` return, joined,
    equals ``tokenizer.decode(all ids)``.

    Each step decodes a short window (from the token before the last emitted text) twice and emits
    the difference, so a piece's leading space ("▁") shows only when text precedes it, and the
    bytes of a character split over byte-fallback pieces are held until the character is complete.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix = 0  # the window starts here; it gives the next text its context
        self._read = 0  # ids before this have been emitted

    def push(self, token: int) -> str:
        """Add one generated id; return the text it completes (maybe empty)."""
        self._ids.append(token)
        before = self._tokenizer.decode(self._ids[self._prefix : self._read])
        text = self._tokenizer.decode(self._ids[self._prefix :])
        if len(text) <= len(before) or text.endswith(_INCOMPLETE):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(before) :]

    def flush(self) -> str:
        """The text still held back (an unfinished character), at the end of a generation."""
        before = self._tokenizer.decode(self._ids[self._prefix : self._read])
        text = self._tokenizer.decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return text[len(before) :]


def _bad_file(path: Path, what: str, problem: object) -> TokenizerError:
    detail = str(problem).strip().splitlines()[0] if str(problem).strip() else "unreadable"
    return TokenizerError(
        f"{path}: not a valid {what} ({detail}); rebuild the release with the tokenizer file "
        "the model was trained with"
    )


def _out_of_vocabulary(ids: Sequence[int], vocab_size: int) -> TokenizerError:
    bad = next((i for i in ids if not 0 <= i < vocab_size), None)
    return TokenizerError(
        f"token id {bad} is outside the tokenizer's vocabulary of {vocab_size}; the model and "
        "its tokenizer do not belong together: check the release"
    )
