"""Real models and their seeded fine-tunes for the delta tests (built once per session)."""

from __future__ import annotations

import functools

from fleetlite.tools.finetune_weights import finetune_weights
from fleetlite.tools.models import int8_classifier
from tests.conftest import REPO

LM = REPO / "fleet" / "lm" / "home_lm.tflite"


@functools.cache
def lm_pair(spread: str = "rows") -> tuple[bytes, bytes]:
    """The project's LM and a 10% fine-tune of it."""
    base = LM.read_bytes()
    return base, finetune_weights(base, fraction=0.1, spread=spread, seed=14)


@functools.cache
def int8_pair(spread: str = "rows") -> tuple[bytes, bytes]:
    """An int8 classifier (about 150 KB) and a 10% fine-tune of it."""
    base = int8_classifier().tflite
    return base, finetune_weights(base, fraction=0.1, spread=spread, seed=14)


@functools.cache
def small_pair() -> tuple[bytes, bytes]:
    """A small int8 classifier (a few KB) and a 10% fine-tune: cheap enough to fuzz."""
    base = int8_classifier(features=32, hidden=(32,), classes=4).tflite
    return base, finetune_weights(base, fraction=0.1, spread="scattered", seed=14)
