"""Serving an installed language-model release: read its generation metadata from the slot's
signed manifest, check the model in a child process, and load it as an
:class:`~fleetlite.agent.language_models.ServedLm`.

The OTA receiver and the agent's start-up use it for a slot whose manifest carries
``generation``; other models go to the model service as before.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from fleetlite.agent.language_models import ServedLm
from fleetlite.agent.lm_service import LmService
from fleetlite.sdk.envelope import Envelope
from fleetlite.sdk.errors import FleetLiteError
from fleetlite.sdk.generation import GenerationSpec
from fleetlite.sdk.manifest import parse_manifest
from fleetlite.sdk.runtime.isolated import check_language_model
from fleetlite.sdk.runtime.lm_engine import LmEngine
from fleetlite.sdk.runtime.tokenizer import load_tokenizer
from fleetlite.sdk.verify import DEFAULT_LIMITS

__all__ = ["ENVELOPE_NAME", "load_served_lm", "release_generation"]

ENVELOPE_NAME = "manifest.json"


def release_generation(slot_dir: Path) -> Optional[GenerationSpec]:
    """The ``generation`` metadata of the release installed in ``slot_dir`` (its signed
    manifest was verified at install), or None for a model that is not a language model."""
    path = slot_dir / ENVELOPE_NAME
    if not path.is_file():
        return None
    try:
        with path.open("rb") as handle:
            data = handle.read(DEFAULT_LIMITS.max_envelope_bytes + 1)
        envelope = Envelope.from_json(data, max_bytes=DEFAULT_LIMITS.max_envelope_bytes,
                                      max_payload_bytes=DEFAULT_LIMITS.max_manifest_bytes)
        return parse_manifest(envelope.payload,
                              max_bytes=DEFAULT_LIMITS.max_manifest_bytes).generation
    except (OSError, FleetLiteError):
        return None


def load_served_lm(name: str, model: Path, spec: GenerationSpec, *, version: Optional[int],
                   sha256: str, num_threads: int,
                   memory_budget_mib: Optional[float] = None) -> ServedLm:
    """Check ``model`` in a child process, then load it with its tokenizer (the file
    ``spec.tokenizer`` beside it) for serving; raises the engine's errors."""
    check_language_model(model, num_threads=num_threads)
    tokenizer = load_tokenizer(model.parent / spec.tokenizer, spec.tokenizer_kind)
    engine = LmEngine(model, spec=spec, tokenizer=tokenizer, num_threads=num_threads,
                      memory_budget_mib=memory_budget_mib)
    return ServedLm(name, LmService(engine), version=version, sha256=sha256, path=model)
