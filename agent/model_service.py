"""The active model(s) of the agent: load, serve in-process inference, hot swap, latency statistics.

A device may serve several models, each under a name. :meth:`ModelService.swap` replaces a model
without stopping the service: the new model is loaded completely first, then the reference is
replaced under a short lock; requests that already hold the old model finish on it, and the lock is
never held while a model runs. Statistics (counts and a latency histogram) are kept per active
model; model inputs and outputs are never recorded.
"""

from __future__ import annotations

import bisect
import contextlib
import math
import queue
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple

from fleetlite.agent.errors import AgentError, ModelNotFoundError
from fleetlite.sdk.runtime.errors import InputMismatchError, ModelRuntimeError
from fleetlite.sdk.runtime.interpreter import Array, InputsLike, Model, read_model_source

MAX_NAME_LENGTH = 128

# Latency bucket upper bounds in ms: 10**(k/10), i.e. 10 per decade (each bucket spans a factor of
# about 1.26) from 0.05 ms to 5000 ms, aligned so that 0.1, 1, 10, ... are bounds; plus one bucket
# below the lowest and one above the highest bound.
BUCKETS_PER_DECADE = 10
BUCKET_BOUNDS_MS: tuple[float, ...] = tuple(
    float(f"{10 ** (k / BUCKETS_PER_DECADE):.6g}") for k in range(-13, 38)
)


class LatencyHistogram:
    """Latencies in fixed log-spaced buckets, with count, sum, min and max.

    Pure data structure, not thread-safe on its own (the model service guards it with a lock).
    Percentiles are estimated from the buckets: within one bucket's width of the exact value.
    """

    bounds: tuple[float, ...] = BUCKET_BOUNDS_MS

    def __init__(self) -> None:
        self.counts = [0] * (len(self.bounds) + 1)  # the last bucket holds values above the top
        self.count = 0
        self.sum = 0.0
        self.min = math.inf
        self.max = -math.inf

    def observe(self, ms: float) -> None:
        """Record one latency in milliseconds."""
        if not ms >= 0.0 or math.isinf(ms):  # also rejects NaN
            raise ValueError(f"latency must be a finite number >= 0 ms, got {ms!r}")
        self.counts[bisect.bisect_left(self.bounds, ms)] += 1
        self.count += 1
        self.sum += ms
        self.min = min(self.min, ms)
        self.max = max(self.max, ms)

    def percentile(self, q: float) -> float | None:
        """Estimate the ``q``-th percentile (0..100) in ms; ``None`` when nothing was observed.

        Finds the bucket holding the ``ceil(q/100 * count)``-th smallest value and interpolates
        log-linearly inside it; the result is clamped to the observed min and max.
        """
        if not 0.0 <= q <= 100.0:
            raise ValueError(f"percentile must be between 0 and 100, got {q}")
        if self.count == 0:
            return None
        rank = max(1, math.ceil(q / 100.0 * self.count))
        if rank == 1:
            return self.min
        if rank == self.count:
            return self.max
        seen = index = in_bucket = 0
        for index, in_bucket in enumerate(self.counts):  # noqa: B007 (used after the loop)
            if in_bucket and seen + in_bucket >= rank:
                break
            seen += in_bucket
        low = self.bounds[index - 1] if index > 0 else self.min
        high = self.bounds[index] if index < len(self.bounds) else self.max
        low, high = max(low, self.min), min(high, self.max)
        fraction = (rank - seen - 0.5) / in_bucket  # the rank-th value sits mid-way in its slot
        # Log-linear inside the log-spaced buckets; linear in the one below the lowest bound.
        if index == 0:
            return low + (high - low) * fraction
        return min(max(low * math.pow(high / low, fraction), self.min), self.max)

    def snapshot(self) -> dict[str, Any]:
        """JSON-ready summary: count, sum/min/max, p50/p95/p99 and the non-empty buckets.

        ``buckets`` is a list of ``[upper_bound_ms, count]``; the bucket above the highest bound
        has upper bound ``null``.
        """
        empty = self.count == 0
        buckets: list[list[Any]] = []
        for index, in_bucket in enumerate(self.counts):
            if in_bucket:
                upper = self.bounds[index] if index < len(self.bounds) else None
                buckets.append([upper, in_bucket])
        return {
            "count": self.count,
            "sum_ms": round(self.sum, 6),
            "min_ms": None if empty else round(self.min, 6),
            "max_ms": None if empty else round(self.max, 6),
            "p50_ms": _rounded(self.percentile(50)),
            "p95_ms": _rounded(self.percentile(95)),
            "p99_ms": _rounded(self.percentile(99)),
            "buckets": buckets,
        }

    @classmethod
    def from_snapshot(cls, data: Mapping[str, Any]) -> LatencyHistogram:
        """Rebuild a histogram from :meth:`snapshot` output (e.g. on the fleet side)."""
        hist = cls()
        index_of = {bound: i for i, bound in enumerate(cls.bounds)}
        for upper, in_bucket in data.get("buckets", []):
            index = len(cls.bounds) if upper is None else index_of.get(float(upper))
            if index is None:
                raise ValueError(f"{upper!r} is not one of the histogram's bucket bounds")
            hist.counts[index] += int(in_bucket)
        hist.count = int(data.get("count", 0))
        if hist.count != sum(hist.counts):
            raise ValueError("histogram count does not match the sum of its buckets")
        hist.sum = float(data.get("sum_ms", 0.0))
        if hist.count:
            hist.min = float(data["min_ms"])
            hist.max = float(data["max_ms"])
        return hist


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


class ModelStats:
    """Thread-safe inference counters and latency histogram of one active model."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.inferences = 0
        self.errors = 0
        self.rejected = 0
        self.latency = LatencyHistogram()

    def record_success(self, ms: float) -> None:
        with self._lock:
            self.inferences += 1
            self.latency.observe(ms)

    def record_error(self, *, rejected: bool) -> None:
        with self._lock:
            self.errors += 1
            if rejected:
                self.rejected += 1

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "inferences": self.inferences,
                "errors": self.errors,
                "rejected_inputs": self.rejected,
                "latency_ms": self.latency.snapshot(),
            }


class _InterpreterPool:
    """``size`` interpreters of one model; a request borrows a free one (size 1: no queue)."""

    def __init__(self, models: Sequence[Model]) -> None:
        self.models = list(models)
        self._free: queue.SimpleQueue[Model] = queue.SimpleQueue()
        for model in self.models:
            self._free.put(model)

    def run(self, inputs: InputsLike) -> dict[str, Array]:
        if len(self.models) == 1:
            return self.models[0].run(inputs)  # Model.run serialises on its own lock
        model = self._free.get()
        try:
            return model.run(inputs)
        finally:
            self._free.put(model)


@dataclass(frozen=True, eq=False)
class ActiveModel:
    """One loaded model serving under ``name``, with its provenance and statistics."""

    name: str
    path: Path
    version: int | None
    sha256: str | None
    model: Model = field(repr=False)
    pool: _InterpreterPool = field(repr=False)
    stats: ModelStats = field(repr=False)
    activated_at: float

    @property
    def num_threads(self) -> int:
        return self.model.num_threads

    @property
    def pool_size(self) -> int:
        return len(self.pool.models)

    def run(self, inputs: InputsLike) -> dict[str, Array]:
        return self.pool.run(inputs)

    def describe(self) -> dict[str, Any]:
        """JSON-ready: name, version, sha256, path, tensors, backend and threading."""
        description = self.model.describe()
        return {
            "name": self.name,
            "version": self.version,
            "sha256": self.sha256,
            "path": str(self.path),
            "size": self.model.size,
            "inputs": description["inputs"],
            "outputs": description["outputs"],
            "backend": description["backend"],
            "num_threads": self.num_threads,
            "pool_size": self.pool_size,
            "activated_at": round(self.activated_at, 3),
        }


class Inference(NamedTuple):
    """The result of :meth:`ModelService.run`: outputs and the model that produced them."""

    outputs: dict[str, Array]
    model: ActiveModel
    latency_ms: float


InferenceObserver = Callable[[InputsLike, Inference], None]
"""Called with a request's inputs and its :class:`Inference` after each successful inference of
the model it watches (see :meth:`ModelService.observe`)."""


class ModelService:
    """Active models by name: activate, infer, hot swap, roll back, describe, statistics.

    ``pool_size`` interpreters are loaded per model (default 1) so that that many requests to the
    same model can run at once; ``keep_previous`` keeps the replaced model loaded for
    :meth:`rollback` (costs its memory until the next swap).
    """

    def __init__(
        self,
        *,
        pool_size: int = 1,
        keep_previous: bool = True,
        backend: str | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if pool_size < 1:
            raise ValueError(f"pool_size must be >= 1, got {pool_size}")
        self.pool_size = pool_size
        self.keep_previous = keep_previous
        self.backend = backend
        self._clock = clock
        self._lock = threading.Lock()  # guards the two dicts; held only to read or replace
        self._load_lock = threading.Lock()  # serialises activations so 'previous' stays exact
        self._active: dict[str, ActiveModel] = {}
        self._previous: dict[str, ActiveModel] = {}
        self._observers: dict[str, InferenceObserver] = {}

    # -- lifecycle -----------------------------------------------------------------------------

    def activate(
        self,
        name: str,
        path: str | Path,
        *,
        version: int | None = None,
        sha256: str | None = None,
        num_threads: int = 1,
        pool_size: int | None = None,
    ) -> ActiveModel:
        """Load ``path`` and serve it as ``name``, replacing any model active under that name.

        The caller is responsible for having checked the file in isolation first
        (:func:`fleetlite.sdk.runtime.isolated.check_model`): a corrupt model can crash the
        interpreter, and this loads it in the agent's own process. Raises
        :class:`InvalidModelError` when the runtime refuses the file; the model active before stays
        active in that case.
        """
        _check_name(name)
        path = Path(path)
        size = self.pool_size if pool_size is None else pool_size
        if size < 1:
            raise ValueError(f"pool_size must be >= 1, got {size}")
        with self._load_lock:
            content, _ = read_model_source(path)
            models = [
                Model(content, origin=str(path), num_threads=num_threads, backend=self.backend)
                for _ in range(size)
            ]
            active = ActiveModel(
                name=name,
                path=path,
                version=version,
                sha256=sha256,
                model=models[0],
                pool=_InterpreterPool(models),
                stats=ModelStats(),
                activated_at=time.time(),
            )
            with self._lock:
                replaced = self._active.get(name)
                self._active[name] = active
                if replaced is not None and self.keep_previous:
                    self._previous[name] = replaced
                else:
                    self._previous.pop(name, None)
        return active

    def swap(
        self,
        name: str,
        new_path: str | Path,
        *,
        version: int | None = None,
        sha256: str | None = None,
        num_threads: int | None = None,
        pool_size: int | None = None,
    ) -> ActiveModel:
        """Hot-swap the model serving ``name`` for ``new_path`` (same checks as :meth:`activate`).

        No request fails or waits for the load: requests that started on the old model finish
        on it, later ones run on the new one. Threads and pool size default to the old model's.
        """
        current = self.get(name)
        return self.activate(
            name,
            new_path,
            version=version,
            sha256=sha256,
            num_threads=current.num_threads if num_threads is None else num_threads,
            pool_size=current.pool_size if pool_size is None else pool_size,
        )

    def previous(self, name: str) -> ActiveModel | None:
        """The model ``name`` served before the last swap, if still kept."""
        with self._lock:
            return self._previous.get(name)

    def rollback(self, name: str) -> ActiveModel:
        """Serve the previous model of ``name`` again (already loaded: instant)."""
        with self._lock:
            previous = self._previous.get(name)
            if previous is None:
                raise ModelNotFoundError(
                    f"model {name!r} has no previous version loaded to roll back to; "
                    "activate the earlier file again instead"
                )
            current = self._active.get(name)
            self._active[name] = previous
            if current is not None:
                self._previous[name] = current
            else:
                del self._previous[name]
        return previous

    def deactivate(self, name: str) -> None:
        """Stop serving ``name`` (requests already running finish)."""
        with self._lock:
            if self._active.pop(name, None) is None:
                raise self._not_found(name)
            self._previous.pop(name, None)

    # -- serving -------------------------------------------------------------------------------

    def get(self, name: str) -> ActiveModel:
        """The model active under ``name``; raises :class:`ModelNotFoundError`."""
        with self._lock:
            active = self._active.get(name)
        if active is None:
            raise self._not_found(name)
        return active

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._active)

    def run(self, name: str, inputs: InputsLike) -> Inference:
        """Run model ``name`` once and say which model answered (useful across swaps)."""
        active = self.get(name)
        start = self._clock()
        try:
            outputs = active.run(inputs)
        except (AgentError, ModelRuntimeError) as exc:
            active.stats.record_error(rejected=isinstance(exc, InputMismatchError))
            raise
        latency_ms = (self._clock() - start) * 1000.0
        active.stats.record_success(latency_ms)
        inference = Inference(outputs, active, latency_ms)
        observer = self._observers.get(name)
        if observer is not None:
            with contextlib.suppress(Exception):  # a watcher never fails a live request
                observer(inputs, inference)
        return inference

    def observe(self, name: str, observer: InferenceObserver | None) -> None:
        """Call ``observer(inputs, inference)`` in the caller's thread after each successful
        inference of ``name`` (across swaps), or stop with ``None``; one observer per name.

        For shadow evaluation (:mod:`fleetlite.agent.shadow_runner`). The observer gets the
        caller's own input objects and outputs, uncopied: it must return quickly, copy what it
        keeps, and not raise (an exception is ignored). Nothing is copied without an observer.
        """
        _check_name(name)
        with self._lock:
            if observer is None:
                self._observers.pop(name, None)
            else:
                self._observers[name] = observer

    def infer(self, name: str, inputs: InputsLike) -> dict[str, Array]:
        """Run model ``name``: dict by input name, list in input order, or one array.

        Returns output name -> array in output order. Raises :class:`ModelNotFoundError`,
        :class:`InputMismatchError` or :class:`InferenceError`.
        """
        return self.run(name, inputs).outputs

    # -- reporting -----------------------------------------------------------------------------

    def describe(self) -> list[dict[str, Any]]:
        """The active models (name, version, sha256, path, inputs, outputs, ...), by name."""
        with self._lock:
            actives = sorted(self._active.values(), key=lambda a: a.name)
        return [active.describe() for active in actives]

    def stats(self) -> dict[str, dict[str, Any]]:
        """Per model name: version, counts and latency histogram since that model was activated.

        Counters restart when a model is swapped; ``activated_at`` tells consumers when.
        """
        with self._lock:
            actives = list(self._active.values())
        return {
            active.name: {
                "version": active.version,
                "sha256": active.sha256,
                "activated_at": round(active.activated_at, 3),
                **active.stats.snapshot(),
            }
            for active in sorted(actives, key=lambda a: a.name)
        }

    def _not_found(self, name: str) -> ModelNotFoundError:
        names = self.names()
        return ModelNotFoundError(
            f"no active model named {name!r}; active models: {names or 'none'}. "
            "Use one of those names, or add the model to agent.yaml's 'models' or roll it out."
        )


def _check_name(name: str) -> None:
    if (
        not isinstance(name, str)
        or not 0 < len(name) <= MAX_NAME_LENGTH
        or not name.isprintable()
        or name != name.strip()
    ):
        raise ValueError(
            f"model name {name!r} must be 1-{MAX_NAME_LENGTH} printable characters "
            "without leading or trailing spaces"
        )
