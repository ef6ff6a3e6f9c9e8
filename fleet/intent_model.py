"""The text intent classifier that ``fleetlite demo`` rolls out and ``fleetlite conformance``
installs: smart-home commands in, intent probabilities out, built in memory from a seed (nothing is
downloaded; tools/models.py builds the other test models the same way).

:func:`intent_classifier` returns a :class:`BuiltModel`: the ``.tflite`` bytes (written by
:mod:`fleetlite.fleet.tflite_builder`), the numpy weights needed to recompute its outputs
independently, and its vocabulary file. Weights are trained with numpy and then snapped to a
coarse grid, so last-bit differences between machines' BLAS/libm are very unlikely to change a
single byte of the file.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from fleetlite.fleet.tflite_builder import ModelBuilder
from fleetlite.sdk.text import Tokenizer

__all__ = [
    "DEFAULT_SEED",
    "INTENT_LABELS",
    "INTENT_MAX_LEN",
    "INTENT_TEMPLATES",
    "BuiltModel",
    "intent_classifier",
    "intent_dataset",
    "intent_tokenizer",
]

DEFAULT_SEED = 20240611
Array = npt.NDArray[Any]
# Weights are rounded to multiples of this step (see the module docstring).
WEIGHT_GRID = 2.0**-12


@dataclass(frozen=True)
class BuiltModel:
    """A generated model: its bytes, reference weights and side files."""

    name: str
    tflite: bytes
    weights: dict[str, Array]
    extra_files: dict[str, bytes] = field(default_factory=dict)

    def files(self) -> dict[str, bytes]:
        """File name -> content of everything this model writes to disk."""
        return {f"{self.name}.tflite": self.tflite, **self.extra_files}


def _on_grid(values: npt.ArrayLike, step: float = WEIGHT_GRID) -> npt.NDArray[np.float32]:
    snapped: npt.NDArray[np.float64] = np.round(np.asarray(values, dtype=np.float64) / step)
    return (snapped * step).astype(np.float32)


def _softmax(logits: Array) -> Array:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(shifted)
    result: Array = e / e.sum(axis=-1, keepdims=True)
    return result


class _Adam:
    """Adam over a list of float64 parameter arrays, updated in place."""

    def __init__(self, params: list[Array], lr: float) -> None:
        self.params = params
        self.lr = lr
        self.m = [np.zeros_like(p) for p in params]
        self.v = [np.zeros_like(p) for p in params]
        self.t = 0

    def step(self, grads: Sequence[Array]) -> None:
        self.t += 1
        b1, b2 = 0.9, 0.999
        for p, g, m, v in zip(self.params, grads, self.m, self.v):
            m[...] = b1 * m + (1 - b1) * g
            v[...] = b2 * v + (1 - b2) * g * g
            m_hat = m / (1 - b1**self.t)
            v_hat = v / (1 - b2**self.t)
            p[...] -= self.lr * m_hat / (np.sqrt(v_hat) + 1e-8)


# -- intent classifier ------------------------------------------------------------------------

INTENT_MAX_LEN = 16

_SLOTS: dict[str, tuple[str, ...]] = {
    "room": (
        "kitchen",
        "living room",
        "bedroom",
        "bathroom",
        "hallway",
        "garage",
        "office",
        "dining room",
        "kids room",
        "basement",
    ),
    "door": ("front door", "back door", "garage door", "side door", "patio door"),
    "temp": tuple(str(t) for t in range(16, 29)),
    "genre": ("jazz", "rock", "pop", "classical music", "hip hop", "country", "the beatles"),
    "when": ("today", "tomorrow", "this weekend", "tonight", "this afternoon"),
    "n": ("1", "2", "5", "10", "15", "20", "30", "45"),
}

INTENT_TEMPLATES: dict[str, tuple[str, ...]] = {
    "lights_on": (
        "turn on the {room} lights",
        "switch on the lights in the {room}",
        "lights on",
        "{room} lights on",
        "turn the {room} light on",
        "can you turn on the lights",
        "please switch the {room} lamp on",
        "it is too dark in the {room}",
        "light up the {room}",
    ),
    "lights_off": (
        "turn off the {room} lights",
        "switch off the lights in the {room}",
        "lights off",
        "{room} lights off",
        "turn the {room} light off",
        "kill the lights in the {room}",
        "please switch the {room} lamp off",
        "no more light in the {room}",
        "can you turn off the lights",
    ),
    "set_temperature": (
        "set the thermostat to {temp} degrees",
        "set the temperature to {temp}",
        "make it {temp} degrees in the {room}",
        "change the heating to {temp} degrees",
        "turn up the heat",
        "turn down the heating",
        "it is too cold in the {room}",
        "heat the {room} to {temp} degrees",
        "set the {room} thermostat to {temp}",
    ),
    "lock_door": (
        "lock the {door}",
        "lock the {door} please",
        "make sure the {door} is locked",
        "secure the {door}",
        "lock up the house",
        "lock all the doors",
    ),
    "unlock_door": (
        "unlock the {door}",
        "open the {door}",
        "let me in through the {door}",
        "unlock the {door} please",
        "unlock all the doors",
        "can you unlock the {door}",
    ),
    "play_music": (
        "play some {genre}",
        "play {genre} in the {room}",
        "put on some {genre}",
        "play music in the {room}",
        "start playing {genre}",
        "i want to listen to {genre}",
        "play my playlist",
        "play a song",
    ),
    "stop_music": (
        "stop the music",
        "stop playing",
        "pause the music",
        "turn the music off",
        "stop the music in the {room}",
        "stop the song",
        "pause playback",
    ),
    "volume_up": (
        "turn up the volume",
        "louder please",
        "increase the volume in the {room}",
        "make it louder",
        "volume up",
    ),
    "volume_down": (
        "turn down the volume",
        "quieter please",
        "lower the volume in the {room}",
        "make it quieter",
        "volume down",
    ),
    "weather": (
        "what is the weather like",
        "what is the weather {when}",
        "will it rain {when}",
        "is it going to be sunny {when}",
        "weather forecast for {when}",
        "do i need an umbrella {when}",
        "how cold is it outside",
        "what is the temperature outside",
    ),
    "set_timer": (
        "set a timer for {n} minutes",
        "start a {n} minute timer",
        "timer for {n} minutes",
        "remind me in {n} minutes",
        "count down {n} seconds",
        "set a {n} second timer",
    ),
}
INTENT_LABELS = tuple(INTENT_TEMPLATES)
_PLACEHOLDER = re.compile(r"\{\w+\}")


def intent_tokenizer() -> Tokenizer:
    """The intent classifier's tokenizer: every word the templates can produce, sorted."""
    words: set[str] = set()
    for template in itertools.chain.from_iterable(INTENT_TEMPLATES.values()):
        words.update(Tokenizer.words(_PLACEHOLDER.sub(" ", template)))
    for values in _SLOTS.values():
        for value in values:
            words.update(Tokenizer.words(value))
    vocab = {"<pad>": 0, "<unk>": 1}
    vocab.update({w: i + 2 for i, w in enumerate(sorted(words))})
    return Tokenizer(vocab, INTENT_LABELS, max_len=INTENT_MAX_LEN, pad_id=0, unk_id=1)


def intent_dataset(
    seed: int = DEFAULT_SEED, per_intent: int = 80
) -> tuple[list[str], npt.NDArray[np.int64]]:
    """Synthetic smart-home commands and their label indices, drawn from the templates."""
    rng = np.random.default_rng(seed)
    texts: list[str] = []
    labels: list[int] = []
    for label, templates in enumerate(INTENT_TEMPLATES.values()):
        for _ in range(per_intent):
            template = templates[int(rng.integers(len(templates)))]
            values = {k: v[int(rng.integers(len(v)))] for k, v in _SLOTS.items()}
            texts.append(template.format(**values))
            labels.append(label)
    return texts, np.asarray(labels, dtype=np.int64)


def _train_intent_weights(
    tokens: Array, labels: Array, vocab_size: int, dim: int, rng: np.random.Generator, steps: int
) -> tuple[Array, Array, Array]:
    n, length = tokens.shape
    classes = len(INTENT_LABELS)
    # GATHER + MEAN equals a word-count matrix times the table over the sequence length; the
    # matrix form trains in a fraction of the time of scattering gradients row by row.
    counts = np.zeros((n, vocab_size))
    np.add.at(counts, (np.repeat(np.arange(n), length), tokens.ravel()), 1.0)
    counts /= length
    embedding = rng.normal(0.0, 0.3, size=(vocab_size, dim))
    embedding[0] = 0.0
    weight = rng.normal(0.0, 0.3, size=(classes, dim))
    bias = np.zeros(classes)
    onehot = np.eye(classes)[labels]
    decay = 1e-4
    adam = _Adam([embedding, weight, bias], lr=0.05)
    for _ in range(steps):
        pooled = counts @ embedding
        probs = _softmax(pooled @ weight.T + bias)
        g_logits = (probs - onehot) / n
        g_embedding = counts.T @ (g_logits @ weight)
        g_embedding[0] = 0.0  # the pad row stays zero: padding must not shift the mean
        adam.step(
            [
                g_embedding + decay * embedding,
                g_logits.T @ pooled + decay * weight,
                g_logits.sum(0),
            ]
        )
    embedding[0] = 0.0
    return embedding, weight, bias


def intent_classifier(
    seed: int = DEFAULT_SEED,
    *,
    embedding_dim: int = 32,
    steps: int = 300,
    scramble_labels: bool = False,
) -> BuiltModel:
    """Text intent classifier for smart-home commands: the small-language-model case.

    ``tokens`` int32 [1, 16] -> GATHER embedding [V, D] -> MEAN over words -> FULLY_CONNECTED ->
    SOFTMAX -> ``probabilities`` [1, n_intents]. Trained with numpy on :func:`intent_dataset`.
    ``scramble_labels`` shifts the output rows by one, a model with the same interface that gets
    every answer wrong (for output-agreement gates).
    """
    tokenizer = intent_tokenizer()
    texts, labels = intent_dataset(seed)
    augmented = [_with_unknown_word(t, i) for i, t in enumerate(texts)]
    tokens = np.concatenate([tokenizer.encode(t) for t in texts + augmented])
    rng = np.random.default_rng(seed)
    embedding, weight, bias = _train_intent_weights(
        tokens, np.concatenate([labels, labels]), tokenizer.vocab_size, embedding_dim, rng, steps
    )
    embedding, weight, bias = _on_grid(embedding), _on_grid(weight), _on_grid(bias)
    if scramble_labels:
        weight, bias = np.roll(weight, -1, axis=0), np.roll(bias, -1)

    mb = ModelBuilder(f"fleetlite intent_classifier: smart-home command intents (seed {seed})")
    x = mb.add_input("tokens", [1, INTENT_MAX_LEN], np.int32)
    table = mb.add_constant("embedding", embedding)
    embedded = mb.gather(table, x, name="embedded")
    pooled = mb.mean(embedded, [1], name="pooled")
    logits = mb.fully_connected(
        pooled,
        mb.add_constant("dense/weight", weight),
        mb.add_constant("dense/bias", bias),
        name="logits",
    )
    mb.mark_output(mb.softmax(logits, name="probabilities"))
    return BuiltModel(
        "intent_classifier",
        mb.build(),
        {"embedding": embedding, "weight": weight, "bias": bias},
        {"intent_classifier.vocab.json": tokenizer.to_json()},
    )


def _with_unknown_word(text: str, i: int) -> str:
    # Out-of-vocabulary filler words teach the <unk> embedding to stay neutral.
    words = text.split()
    filler = ("hey", "could", "kindly", "now")[i % 4]
    words.insert(i % (len(words) + 1), filler)
    return " ".join(words)
