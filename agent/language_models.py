"""The generative language models an agent serves, by name (beside the model service's other
models), and the counts that may leave the device.

Each model is an :class:`~fleetlite.agent.lm_service.LmService`: one generation at a time with a
bounded wait queue. Prompts and replies never leave the device: :meth:`LanguageModels.stats`
holds only counts and timings (generations, tokens, time to first token, decode rate).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from fleetlite.agent.errors import ModelNotFoundError
from fleetlite.agent.lm_service import LmService
from fleetlite.sdk.runtime.lm_engine import GenerationStats

__all__ = ["LanguageModels", "ServedLm"]


@dataclass
class _Counts:
    generations: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    ttft_ms_sum: float = 0.0
    ttft_count: int = 0
    decode_ms_sum: float = 0.0
    decode_steps: int = 0
    stop_reasons: dict[str, int] = field(default_factory=dict)


@dataclass
class ServedLm:
    """One served language model: its release identity and its :class:`LmService`."""

    name: str
    service: LmService
    version: Optional[int] = None
    sha256: str = ""
    path: Optional[Path] = None
    _counts: _Counts = field(default_factory=_Counts)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, stats: GenerationStats) -> None:
        """Count one finished generation (its numbers only)."""
        with self._lock:
            c = self._counts
            c.generations += 1
            c.prompt_tokens += stats.prompt_tokens
            c.generated_tokens += stats.generated_tokens
            if stats.time_to_first_token_ms is not None:
                c.ttft_ms_sum += stats.time_to_first_token_ms
                c.ttft_count += 1
            c.decode_ms_sum += sum(stats.decode_ms)
            c.decode_steps += len(stats.decode_ms)
            reason = stats.stop_reason or "unknown"
            c.stop_reasons[reason] = c.stop_reasons.get(reason, 0) + 1

    def record_error(self) -> None:
        with self._lock:
            self._counts.errors += 1

    def describe(self) -> dict[str, Any]:
        layout = self.service.engine.layout
        spec = self.service.engine.spec
        return {
            "name": self.name, "kind": "generative", "version": self.version,
            "sha256": self.sha256, "context_length": layout.context_length,
            "vocab_size": layout.vocab_size, "layers": layout.num_layers,
            "cache_layout": layout.cache_layout,
            "prompt_template": spec.prompt_template if spec else None,
        }

    def stats(self) -> dict[str, Any]:
        with self._lock:
            c = self._counts
            return {
                "generations": c.generations, "errors": c.errors,
                "prompt_tokens": c.prompt_tokens, "generated_tokens": c.generated_tokens,
                "mean_ttft_ms": round(c.ttft_ms_sum / c.ttft_count, 3) if c.ttft_count else None,
                "decode_tokens_per_s": (round(c.decode_steps / c.decode_ms_sum * 1000.0, 2)
                                        if c.decode_ms_sum else None),
                "stop_reasons": dict(c.stop_reasons),
                "waiting": self.service.waiting,
            }


class LanguageModels:
    """The served language models by name; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._models: dict[str, ServedLm] = {}

    def add(self, served: ServedLm) -> Optional[ServedLm]:
        """Serve ``served`` under its name; returns the one it replaces, if any."""
        with self._lock:
            previous = self._models.get(served.name)
            self._models[served.name] = served
            return previous

    def remove(self, name: str) -> Optional[ServedLm]:
        with self._lock:
            return self._models.pop(name, None)

    def get(self, name: str) -> ServedLm:
        with self._lock:
            found = self._models.get(name)
            names = sorted(self._models)
        if found is None:
            listed = ", ".join(names) or "none"
            raise ModelNotFoundError(
                f"no language model named {name!r} is served (served: {listed}); list them with "
                "`fleetlite-agent info` or the local API's 'models' op")
        return found

    def __contains__(self, name: object) -> bool:
        with self._lock:
            return name in self._models

    def __iter__(self) -> Iterator[ServedLm]:
        with self._lock:
            return iter(list(self._models.values()))

    def describe(self) -> list[dict[str, Any]]:
        return [served.describe() for served in self]

    def stats(self) -> dict[str, dict[str, Any]]:
        """Counts and timings per model: what telemetry may carry (never prompts or text)."""
        return {served.name: served.stats() for served in self}
