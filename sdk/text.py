"""Word tokenizer for the text models FleetLite ships (pure Python + numpy, usable on the device).

A vocabulary file is JSON::

    {"version": 1, "max_len": 16, "pad_id": 0, "unk_id": 1,
     "vocab": {"<pad>": 0, "<unk>": 1, "turn": 2, ...}, "labels": ["lights_on", ...]}

Encoding rule (so other implementations can match it): lowercase the text, take the runs of
ASCII letters and digits (``[a-z0-9]+``) as words, map each to its id (``unk_id`` when absent),
keep the first ``max_len`` ids and pad the rest with ``pad_id``. The result is an int32 array of
shape ``[1, max_len]``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any, Union

import numpy as np
import numpy.typing as npt

from fleetlite.sdk.errors import FleetLiteError

VOCAB_FORMAT_VERSION = 1
# A vocabulary file is read whole; anything bigger than this is not one of ours.
MAX_VOCAB_FILE_BYTES = 8 * 1024 * 1024
_WORD = re.compile(r"[a-z0-9]+")


class TokenizerError(FleetLiteError, ValueError):
    """A vocabulary file is missing, malformed or inconsistent."""


class Tokenizer:
    """Turns text into the fixed-length token-id array a text model takes as input."""

    def __init__(
        self,
        vocab: Mapping[str, int],
        labels: Sequence[str],
        *,
        max_len: int = 16,
        pad_id: int = 0,
        unk_id: int = 1,
    ) -> None:
        if max_len < 1:
            raise TokenizerError(f"max_len must be at least 1, got {max_len}")
        ids = list(vocab.values())
        if len(set(ids)) != len(ids):
            raise TokenizerError("vocabulary ids must be unique")
        if any(i < 0 for i in ids):
            raise TokenizerError("vocabulary ids must be non-negative")
        known = set(ids)
        if pad_id not in known or unk_id not in known or pad_id == unk_id:
            raise TokenizerError(
                f"pad_id {pad_id} and unk_id {unk_id} must be distinct ids of the vocabulary"
            )
        if len(set(labels)) != len(labels) or not all(labels):
            raise TokenizerError("labels must be unique, non-empty strings")
        self.vocab = dict(vocab)
        self.labels = list(labels)
        self.max_len = max_len
        self.pad_id = pad_id
        self.unk_id = unk_id

    @property
    def vocab_size(self) -> int:
        """Rows the embedding table needs: one past the largest id."""
        return max(self.vocab.values()) + 1

    @staticmethod
    def words(text: str) -> list[str]:
        """The words of ``text`` after normalisation (see the module docstring)."""
        return _WORD.findall(text.lower())

    def encode(self, text: str) -> npt.NDArray[np.int32]:
        """Token ids of ``text`` as int32 ``[1, max_len]``, truncated or padded."""
        ids = [self.vocab.get(w, self.unk_id) for w in self.words(text)][: self.max_len]
        ids += [self.pad_id] * (self.max_len - len(ids))
        return np.asarray([ids], dtype=np.int32)

    def label(self, scores: npt.ArrayLike) -> str:
        """The label with the highest score in a ``[1, n_labels]`` (or ``[n_labels]``) output."""
        flat = np.asarray(scores).reshape(-1)
        if flat.size != len(self.labels):
            raise TokenizerError(f"expected {len(self.labels)} scores, got {flat.size}")
        return self.labels[int(np.argmax(flat))]

    def to_dict(self) -> dict[str, Any]:
        """The JSON document :meth:`from_dict` reads back."""
        return {
            "version": VOCAB_FORMAT_VERSION,
            "max_len": self.max_len,
            "pad_id": self.pad_id,
            "unk_id": self.unk_id,
            "vocab": dict(sorted(self.vocab.items(), key=lambda item: item[1])),
            "labels": list(self.labels),
        }

    def to_json(self) -> bytes:
        """Canonical UTF-8 JSON bytes (stable across runs, so model bundles are reproducible)."""
        return (json.dumps(self.to_dict(), indent=1, ensure_ascii=False) + "\n").encode("utf-8")

    @classmethod
    def from_dict(cls, doc: Any) -> Tokenizer:
        """Validate and load a vocabulary document."""
        if not isinstance(doc, dict):
            raise TokenizerError("a vocabulary file must hold a JSON object")
        if doc.get("version") != VOCAB_FORMAT_VERSION:
            raise TokenizerError(
                f"unsupported vocabulary format version {doc.get('version')!r}; "
                f"this FleetLite reads version {VOCAB_FORMAT_VERSION}"
            )
        ints = {key: doc.get(key) for key in ("max_len", "pad_id", "unk_id")}
        for key, value in ints.items():
            if not isinstance(value, int) or isinstance(value, bool):
                raise TokenizerError(f"vocabulary field {key!r} must be an integer")
        vocab = doc.get("vocab")
        if not isinstance(vocab, dict) or not all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
            for k, v in vocab.items()
        ):
            raise TokenizerError("vocabulary field 'vocab' must map words to integer ids")
        labels = doc.get("labels")
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
            raise TokenizerError("vocabulary field 'labels' must be a list of strings")
        return cls(
            vocab,
            labels,
            max_len=int(doc["max_len"]),
            pad_id=int(doc["pad_id"]),
            unk_id=int(doc["unk_id"]),
        )

    @classmethod
    def from_file(cls, path: Union[str, os.PathLike[str]]) -> Tokenizer:
        """Load a vocabulary JSON file (e.g. ``intent_classifier.vocab.json``)."""
        try:
            with open(path, "rb") as f:
                raw = f.read(MAX_VOCAB_FILE_BYTES + 1)
        except OSError as exc:
            raise TokenizerError(f"{path}: cannot read vocabulary file ({exc.strerror})") from exc
        if len(raw) > MAX_VOCAB_FILE_BYTES:
            raise TokenizerError(f"{path}: vocabulary file exceeds {MAX_VOCAB_FILE_BYTES} bytes")
        try:
            doc = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise TokenizerError(f"{path}: not a JSON vocabulary file ({exc})") from exc
        try:
            return cls.from_dict(doc)
        except TokenizerError as exc:
            raise TokenizerError(f"{path}: {exc}") from exc
