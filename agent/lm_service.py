"""One generation at a time on a language model, callers queued: how the agent serves an
:class:`~fleetlite.sdk.runtime.lm_engine.LmEngine` to its local API and OTA health checks.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Generator, Sequence
from typing import Callable, Optional

from fleetlite.sdk.runtime.lm_engine import (
    CANCELLED,
    BusyError,
    GenerateParams,
    Generation,
    GenerationStats,
    LmEngine,
    TextStream,
)

GenerationObserver = Callable[[Sequence[int], GenerateParams, Sequence[int], GenerationStats],
                              None]
"""Called with a generation's prompt ids, parameters, generated ids and statistics when it ends
(see :meth:`LmService.observe`)."""

DEFAULT_MAX_QUEUE = 4
_CANCEL_POLL_S = 0.05  # how often a caller waiting for the engine looks at its cancel event


class LmService:
    """One generation at a time on ``engine``; up to ``max_queue`` callers wait their turn.

    A caller beyond the queue gets :class:`BusyError` at once instead of waiting. A caller
    whose ``cancel`` event is set while it waits leaves the queue with an empty generation
    (stop reason ``cancelled``). The engine is released when the generation ends or is closed.
    """

    def __init__(self, engine: LmEngine, *, max_queue: int = DEFAULT_MAX_QUEUE) -> None:
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        self.engine = engine
        self.max_queue = max_queue
        self._turn = threading.Condition()
        self._running = False
        self._waiting = 0
        self._observer: Optional[GenerationObserver] = None

    @property
    def waiting(self) -> int:
        """How many callers are waiting for the engine now."""
        with self._turn:
            return self._waiting

    def generate(
        self,
        prompt_ids: Sequence[int],
        params: Optional[GenerateParams] = None,
        *,
        cancel: Optional[threading.Event] = None,
    ) -> Generation:
        """:meth:`LmEngine.generate` once the engine is free (see the class for waiting).

        The prompt is checked before queueing; the time to first token includes the wait.
        """
        generation = self.engine.generate(prompt_ids, params, cancel=cancel)  # runs when iterated
        queued = time.perf_counter()
        try:
            entered = self._enter(cancel)
        except BusyError:
            generation.close()
            raise
        generation.stats.queued_ms = (time.perf_counter() - queued) * 1000.0
        if not entered:
            generation.close()  # never started: it yields nothing
            generation.stats.stop_reason = CANCELLED
            return generation
        observer = self._observer
        if observer is not None:
            generation = _observed(generation, list(prompt_ids), params or
                                   self.engine.default_params(), observer)
        generation.on_close(self._leave)
        return generation

    def observe(self, observer: Optional[GenerationObserver]) -> None:
        """Call ``observer(prompt_ids, params, generated_ids, stats)`` once per generation that
        started, when it ends or is closed (after the engine is released), or stop with ``None``.

        For shadow evaluation (:mod:`fleetlite.agent.shadow_runner`); it runs in the caller's
        thread, so it must return quickly and not raise (an exception is ignored). Token ids are
        collected only while an observer is set.
        """
        self._observer = observer

    def stream(
        self,
        prompt: str,
        params: Optional[GenerateParams] = None,
        *,
        cancel: Optional[threading.Event] = None,
    ) -> TextStream:
        """:meth:`LmEngine.stream` once the engine is free."""
        prompt_ids = self.engine.encode_prompt(prompt)
        return self.engine.text_stream(self.generate(prompt_ids, params, cancel=cancel), params)

    def _enter(self, cancel: Optional[threading.Event]) -> bool:
        with self._turn:
            if self._running and self._waiting >= self.max_queue:
                raise BusyError(
                    f"the language model is busy: one generation running and {self._waiting} "
                    f"waiting, the most allowed (max_queue={self.max_queue}); retry in a moment"
                )
            self._waiting += 1
            try:
                while self._running:
                    if cancel is not None and cancel.is_set():
                        return False
                    self._turn.wait(_CANCEL_POLL_S if cancel is not None else None)
                self._running = True
                return True
            finally:
                self._waiting -= 1

    def _leave(self) -> None:
        with self._turn:
            self._running = False
            self._turn.notify_all()  # a waiter may have left on cancel: wake them all


def _observed(generation: Generation, prompt_ids: list[int], params: GenerateParams,
              observer: GenerationObserver) -> Generation:
    """``generation`` re-yielded through a recorder that tells ``observer`` when it ends."""
    seen: list[int] = []

    def tokens() -> Generator[int, None, None]:
        for token in generation:
            seen.append(token)
            yield token

    def tell() -> None:
        with contextlib.suppress(Exception):  # a watcher never fails a live generation
            observer(prompt_ids, params, seen, generation.stats)

    outer = Generation(tokens(), generation.stats)
    outer.on_close(generation.close)
    outer.on_close(tell)
    return outer
