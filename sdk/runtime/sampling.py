"""Choosing the next token from a language model's logits, and holding back stop strings.

Pure numpy and string logic, no interpreter: :func:`choose_token` (greedy, or temperature, top-k
and top-p sampling with a seeded generator) and :class:`StopMatcher` (stop strings over streamed
text pieces).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from fleetlite.sdk.runtime.errors import InferenceError


def choose_token(
    logits: npt.NDArray[Any],
    *,
    temperature: float,
    top_k: int,
    top_p: float,
    rng: np.random.Generator,
) -> int:
    """The next token id from ``logits`` (any shape; read as one row of the vocabulary).

    ``temperature == 0`` is greedy: the highest logit, the lowest id on ties, ``rng`` unused.
    Otherwise the logits are divided by ``temperature``, cut to the ``top_k`` highest (0: all; ties
    at the cut go to the lower ids), then to the nucleus (the fewest most probable tokens whose
    probability adds up to at least ``top_p``; 1.0: all), and one token is drawn with ``rng``.
    Raises :class:`InferenceError` when the logits hold no usable value (NaN, or all -inf).
    """
    if temperature < 0 or top_k < 0 or not 0.0 < top_p <= 1.0:
        raise ValueError(
            f"need temperature >= 0, top_k >= 0 and 0 < top_p <= 1; got temperature={temperature}, "
            f"top_k={top_k}, top_p={top_p}"
        )
    row = logits.reshape(-1)
    best = int(np.argmax(row))  # NaN wins argmax, so checking the winner finds any NaN
    if not np.isfinite(row[best]):
        raise InferenceError(
            "the model produced no usable logits (NaN or -inf everywhere); the model file is "
            "broken or mis-converted: roll back to the previous release"
        )
    if temperature == 0:
        return best
    candidates = _top_k_ids(row, top_k)
    scaled = (row[candidates].astype(np.float64) - float(row[best])) / temperature
    if top_p < 1.0:
        candidates, scaled = _nucleus(candidates, scaled, top_p)
    cumulative = np.cumsum(np.exp(scaled))
    drawn = int(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right"))
    return int(candidates[min(drawn, len(cumulative) - 1)])


def _nucleus(
    ids: npt.NDArray[np.intp], scaled: npt.NDArray[np.float64], top_p: float
) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.float64]]:
    """The fewest most probable of ``ids`` whose probability adds up to at least ``top_p``."""
    order = np.lexsort((ids, -scaled))  # most probable first, the lower id first on ties
    ids, scaled = ids[order], scaled[order]
    cumulative = np.cumsum(np.exp(scaled))
    keep = int(np.searchsorted(cumulative, top_p * cumulative[-1], side="left")) + 1
    return ids[:keep], scaled[:keep]


def _top_k_ids(row: npt.NDArray[Any], top_k: int) -> npt.NDArray[np.intp]:
    """Ids of the ``top_k`` highest logits (all ids when 0 or >= the vocabulary), in O(vocab)."""
    if top_k == 0 or top_k >= row.size:
        return np.arange(row.size)
    threshold = np.partition(row, row.size - top_k)[row.size - top_k]
    above = np.flatnonzero(row > threshold)
    tied = np.flatnonzero(row == threshold)[: top_k - above.size]
    return np.concatenate((above, tied))


class StopMatcher:
    """Finds stop strings in text that arrives in pieces, and says which text is safe to emit.

    A stop string may span pieces: text that could be the start of a stop string is held back
    until the next pieces show it is not. When a stop string appears, the text before it is
    released and the stop string itself never is. Pure logic, one instance per generation.
    """

    def __init__(self, stop_strings: Sequence[str]) -> None:
        if any(not stop for stop in stop_strings):
            raise ValueError("stop strings must not be empty")
        self.stop_strings = tuple(stop_strings)
        self.stopped = False
        self._held = ""

    def feed(self, piece: str) -> str:
        """Add ``piece``; return the text now safe to emit (``stopped`` is set on a stop string)."""
        if self.stopped:
            return ""
        text = self._held + piece
        # The stop string that ends first (then the longest), as if text came one character at
        # a time: the result must not depend on how the text was cut into pieces.
        found = [
            (start + len(stop), start)
            for stop, start in ((stop, text.find(stop)) for stop in self.stop_strings)
            if start >= 0
        ]
        if found:
            self.stopped = True
            self._held = ""
            return text[: min(found)[1]]
        hold = self._partial_stop_length(text)
        self._held = text[len(text) - hold :]
        return text[: len(text) - hold]

    def flush(self) -> str:
        """The text held back, when the generation ends without a stop string."""
        held, self._held = self._held, ""
        return held

    def _partial_stop_length(self, text: str) -> int:
        """Length of the longest end of ``text`` that is a proper start of a stop string."""
        longest = 0
        for stop in self.stop_strings:
            for length in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:length]):
                    longest = length
                    break
        return longest
