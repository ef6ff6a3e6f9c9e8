"""Shadow evaluation on the device: a candidate version runs beside the active model on a
sample of live requests, and only agreement statistics and latency leave the device.

The caller never waits for the candidate. The service's observer hook hands each sampled
request (inputs copied) to a bounded queue after the active model has answered; one background
thread runs the candidate on it and compares. A full queue drops the sample. A CPU budget
protects the active model: a token bucket lets candidate runs take at most ``cpu_budget`` of
wall time (each run is charged its elapsed time), and when the active model's recent p95 while
shadowed rises above its unshadowed p95 times ``p95_budget_ratio``, shadowing pauses (backing
off, doubling up to ``max_backoff_s``). :meth:`report` gives the
``fleetlite.shadow_report/1`` message (:mod:`fleetlite.sdk.shadow`).

The candidate is passed in loaded: it must have passed the crash-isolated check and smoke test
first (the OTA receiver does that), since it runs in the agent's process.
"""

from __future__ import annotations

import collections
import math
import queue
import random
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from fleetlite.agent.errors import AgentConfigError, AgentError
from fleetlite.agent.lm_service import LmService
from fleetlite.agent.model_service import Inference, LatencyHistogram, ModelService
from fleetlite.sdk.runtime.interpreter import Array, InputsLike, Model
from fleetlite.sdk.runtime.lm_engine import STOP_TOKEN, GenerateParams, GenerationStats, LmEngine
from fleetlite.sdk.shadow import CLASSIFIER, LM, REGRESSOR, STOP, ShadowReport, ShadowStats

__all__ = ["LmShadow", "ModelShadow", "ShadowConfig", "ShadowIdentity"]

Clock = Callable[[], float]
_Job = Callable[[], None]


@dataclass(frozen=True)
class ShadowConfig:
    """How much shadowing a device does (defaults in parentheses).

    - ``sample_rate`` (0.2): the chance that a live request is also run on the candidate,
      drawn from a ``random.Random(seed)`` (``seed`` 0; ``None`` for a fresh one); 1 samples all.
    - ``cpu_budget`` (0.25): candidate runs may take at most this share of wall time on average,
      with bursts of up to ``burst_s`` (0.25 s) of candidate time.
    - ``p95_budget_ratio`` (1.25): back off when the active model's p95 over the last ``window``
      (256) shadowed requests exceeds its unshadowed p95 times this, and by more than
      ``p95_floor_ms`` (0.05 ms, so sub-0.1 ms jitter of tiny models does not count); judged
      once ``min_window`` (20) shadowed requests are known. The unshadowed p95 is the runner's
      ``baseline_p95_ms`` when given, else that of the last ``window`` requests that did not
      overlap a candidate run (once ``min_window`` of them), else the service's p95 of the model
      before shadowing began (once it has 20 inferences).
    - ``backoff_s`` (5 s), doubling per consecutive back-off up to ``max_backoff_s`` (300 s).
    - ``queue_size`` (4): sampled requests waiting for the candidate; beyond, they are dropped.
    """

    sample_rate: float = 0.2
    seed: Optional[int] = 0
    cpu_budget: float = 0.25
    burst_s: float = 0.25
    p95_budget_ratio: float = 1.25
    p95_floor_ms: float = 0.05
    window: int = 256
    min_window: int = 20
    backoff_s: float = 5.0
    max_backoff_s: float = 300.0
    queue_size: int = 4

    def __post_init__(self) -> None:
        problems = []
        for name in ("sample_rate", "cpu_budget"):
            value = getattr(self, name)
            if not 0.0 < value <= 1.0:
                problems.append(f"{name} must be a fraction in (0, 1], got {value!r}")
        if not 1.0 <= self.p95_budget_ratio <= 1000.0:
            problems.append(f"p95_budget_ratio must be within 1..1000, got "
                            f"{self.p95_budget_ratio!r}")
        for name in ("burst_s", "p95_floor_ms", "backoff_s", "max_backoff_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0.0):
                problems.append(f"{name} must be a number >= 0, got {value!r}")
        for name in ("window", "min_window", "queue_size"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if self.min_window > self.window:
            problems.append("min_window must not exceed window")
        if problems:
            raise AgentConfigError("invalid shadow settings: " + "; ".join(problems) +
                                   "; fix them in the rollout's shadow options")


@dataclass(frozen=True)
class ShadowIdentity:
    """What a report is about: the device, the release and both versions of the model."""

    device_id: str
    release_id: str
    model: str
    version: int
    active_version: int


def _p95(values: Sequence[float]) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


class _ShadowRunner:
    """The mechanics both kinds share: sampling, budget, queue, worker, latency, report."""

    def __init__(self, kind: str, identity: ShadowIdentity, config: ShadowConfig,
                 error_bound: Optional[float], clock: Clock, wall_clock: Clock,
                 baseline_p95_ms: Optional[float], earlier_p95_ms: Optional[float] = None
                 ) -> None:
        self.identity = identity
        self.config = config
        self._clock = clock
        self._wall_clock = wall_clock
        self._lock = threading.Lock()
        self._stats = ShadowStats(kind, error_bound)
        self._rng = random.Random(config.seed)
        self._queue: queue.Queue[Optional[_Job]] = queue.Queue(maxsize=config.queue_size)
        self._thread: Optional[threading.Thread] = None
        self._since = wall_clock()
        self._baseline_p95_ms = baseline_p95_ms
        self._earlier_p95_ms = earlier_p95_ms
        # budget: candidate seconds available; may go negative (debt) after a long run
        self._bucket = config.burst_s
        self._refilled = clock()
        self._paused_until = -math.inf
        self._consecutive_backoffs = 0
        self._running = False
        self._pending = 0  # queued or running samples
        self._last_end = -math.inf
        self._alone = LatencyHistogram()
        self._shadowed = LatencyHistogram()
        self._candidate = LatencyHistogram()
        self._alone_window: collections.deque[float] = collections.deque(maxlen=config.window)
        self._shadowed_window: collections.deque[float] = collections.deque(maxlen=config.window)
        self.requests = 0
        self.skipped_budget = 0
        self.dropped_queue_full = 0
        self.skipped_other = 0
        self.candidate_errors = 0
        self.backoffs = 0

    # -- lifetime ------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the worker and begin observing live requests."""
        if self._thread is not None:
            raise AgentError("this shadow runner was already started; make a new one for "
                             "another shadowing period")
        self._thread = threading.Thread(target=self._work, name="fleetlite-shadow", daemon=True)
        self._thread.start()
        self._attach()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop observing, let the worker finish the sample it runs, drop the queued ones."""
        self._detach()
        thread = self._thread
        if thread is None:
            return
        while True:  # make room for the stop signal: queued samples are dropped, not run
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                with self._lock:
                    self._pending -= 1
        self._queue.put(None)
        thread.join(timeout)

    def __enter__(self) -> _ShadowRunner:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _attach(self) -> None:
        raise NotImplementedError

    def _detach(self) -> None:
        raise NotImplementedError

    # -- the caller's side (must stay cheap) --------------------------------------------------

    def _record_active(self, latencies_ms: Sequence[float], duration_ms: float,
                       now: float) -> None:
        """Latencies of one live request that ended at ``now`` after ``duration_ms``: shadowed
        when a candidate run overlapped it."""
        with self._lock:
            self.requests += 1
            shadowed = self._running or self._last_end > now - duration_ms / 1000.0
            histogram = self._shadowed if shadowed else self._alone
            window = self._shadowed_window if shadowed else self._alone_window
            for ms in latencies_ms:
                histogram.observe(ms)
                window.append(ms)

    def _admit(self, now: float) -> bool:
        """Whether this request is sampled and the budget lets the candidate run on it."""
        with self._lock:
            if self._rng.random() >= self.config.sample_rate:
                return False
            return self._within_budget(now)

    def _within_budget(self, now: float) -> bool:
        """Refill the bucket up to ``now``; False (counted) when paused or in debt. Locked."""
        self._bucket = min(self.config.burst_s,
                           self._bucket + (now - self._refilled) * self.config.cpu_budget)
        self._refilled = now
        if now < self._paused_until or self._bucket <= 0.0:
            self.skipped_budget += 1
            return False
        return True

    def _submit(self, job: _Job) -> None:
        with self._lock:
            try:
                self._queue.put_nowait(job)
            except queue.Full:
                self.dropped_queue_full += 1
            else:
                self._pending += 1

    def _skip(self) -> None:
        with self._lock:
            self.skipped_other += 1

    # -- the worker ----------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            start = self._clock()
            with self._lock:
                # checked again: samples admitted together may have spent the budget meanwhile
                if not self._within_budget(start):
                    self._pending -= 1
                    continue
                self._running = True
            try:
                job()
            except Exception:  # the candidate's failure, whatever it is, must not end the worker
                with self._lock:
                    self.candidate_errors += 1
            finally:
                end = self._clock()
                with self._lock:
                    self._running = False
                    self._pending -= 1
                    self._last_end = end
                    self._bucket -= end - start
                self._check_backoff(end)

    def _record_candidate(self, latencies_ms: Sequence[float]) -> None:
        with self._lock:
            for ms in latencies_ms:
                self._candidate.observe(ms)

    def _check_backoff(self, now: float) -> None:
        config = self.config
        with self._lock:
            if len(self._shadowed_window) < config.min_window:
                return
            reference = self._baseline_p95_ms
            if reference is None and len(self._alone_window) >= config.min_window:
                reference = _p95(self._alone_window)
            elif reference is None:
                reference = self._earlier_p95_ms
            if reference is None:
                return
            shadowed = _p95(self._shadowed_window)
            if (shadowed > reference * config.p95_budget_ratio
                    and shadowed - reference > config.p95_floor_ms):
                pause = min(config.max_backoff_s,
                            config.backoff_s * 2.0 ** self._consecutive_backoffs)
                self._paused_until = now + pause
                self._consecutive_backoffs += 1
                self.backoffs += 1
                self._shadowed_window.clear()
            else:
                self._consecutive_backoffs = 0

    # -- reporting -----------------------------------------------------------------------------

    @property
    def stats(self) -> ShadowStats:
        """A copy of the agreement counts so far."""
        with self._lock:
            return self._stats.merge(ShadowStats(self._stats.kind, self._stats.error_bound))

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """Wait until every queued sample has been compared (for tests and benchmarks)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if not self._pending:
                    return True
            time.sleep(0.002)
        return False

    def report(self) -> ShadowReport:
        """The ``fleetlite.shadow_report/1`` message of everything since :meth:`start`."""
        ident, config = self.identity, self.config
        with self._lock:
            stats = self._stats
            alone, shadowed, cand = self._alone, self._shadowed, self._candidate
            return ShadowReport(
                device_id=ident.device_id, ts=max(self._wall_clock(), self._since),
                since=self._since, release_id=ident.release_id, model=ident.model,
                version=ident.version, active_version=ident.active_version, kind=stats.kind,
                requests=self.requests, samples=min(stats.samples, self.requests),
                compared=stats.compared, agreed=stats.agreed,
                sample_rate=config.sample_rate, cpu_budget=config.cpu_budget,
                p95_budget_ratio=config.p95_budget_ratio,
                skipped_budget=self.skipped_budget, dropped_queue_full=self.dropped_queue_full,
                skipped_other=self.skipped_other, candidate_errors=self.candidate_errors,
                backoffs=self.backoffs, error_bound=stats.error_bound,
                max_abs_error=stats.max_abs_error if stats.kind == REGRESSOR else None,
                mean_abs_error=stats.mean_abs_error,
                active_alone_count=alone.count, active_alone_p50_ms=_ms(alone, 50),
                active_alone_p95_ms=_ms(alone, 95),
                active_shadowed_count=shadowed.count, active_shadowed_p50_ms=_ms(shadowed, 50),
                active_shadowed_p95_ms=_ms(shadowed, 95),
                candidate_count=cand.count, candidate_p50_ms=_ms(cand, 50),
                candidate_p95_ms=_ms(cand, 95),
            )


def _ms(histogram: LatencyHistogram, q: float) -> Optional[float]:
    value = histogram.percentile(q)
    return None if value is None else round(value, 6)


def _copy_inputs(inputs: InputsLike) -> InputsLike:
    if isinstance(inputs, Mapping):
        return {name: np.array(value, copy=True) for name, value in inputs.items()}
    if isinstance(inputs, np.ndarray):
        return np.array(inputs, copy=True)
    return [np.array(value, copy=True) for value in inputs]


class ModelShadow(_ShadowRunner):
    """Shadow a classifier or regressor served by a :class:`ModelService` under ``name``.

    ``candidate`` is the new version, loaded (after its isolated check) with the same inputs
    and outputs. ``kind`` is ``classifier`` (top-1 agreement per output row) or ``regressor``
    (agreement within ``error_bound``, absolute, in output units). Requests answered by a model
    other than ``identity.active_version`` (after a swap) count as ``skipped_other``.
    ``baseline_p95_ms`` fixes the unshadowed p95 back-offs are judged by (e.g. from the active
    version's profile); by default the runner measures it (:class:`ShadowConfig`).
    """

    def __init__(self, service: ModelService, name: str, candidate: Model, *, kind: str,
                 identity: ShadowIdentity, config: Optional[ShadowConfig] = None,
                 error_bound: Optional[float] = None, clock: Clock = time.perf_counter,
                 wall_clock: Clock = time.time,
                 baseline_p95_ms: Optional[float] = None) -> None:
        if kind not in (CLASSIFIER, REGRESSOR):
            raise AgentConfigError(f"a model service shadows a classifier or a regressor, not "
                                   f"{kind!r}; shadow language models with LmShadow")
        if kind == REGRESSOR and error_bound is None:
            raise AgentConfigError("a regressor's shadow needs error_bound (the largest "
                                   "absolute difference that still agrees, in output units)")
        before = service.get(name).stats.snapshot()
        earlier = before["latency_ms"]["p95_ms"] if before["inferences"] >= 20 else None
        super().__init__(kind, identity, config or ShadowConfig(), error_bound, clock,
                         wall_clock, baseline_p95_ms, earlier)
        self.service = service
        self.name = name
        self.candidate = candidate

    def _attach(self) -> None:
        self.service.observe(self.name, self._on_inference)

    def _detach(self) -> None:
        self.service.observe(self.name, None)

    def _on_inference(self, inputs: InputsLike, inference: Inference) -> None:
        now = self._clock()
        self._record_active((inference.latency_ms,), inference.latency_ms, now)
        if not self._admit(now):
            return
        if inference.model.version != self.identity.active_version:
            self._skip()
            return
        copied = _copy_inputs(inputs)
        outputs = [np.array(value, copy=True) for value in inference.outputs.values()]
        self._submit(lambda: self._compare(copied, outputs))

    def _compare(self, inputs: InputsLike, active: list[Array]) -> None:
        start = self._clock()
        outputs = self.candidate.run(inputs)
        self._record_candidate(((self._clock() - start) * 1000.0,))
        with self._lock:
            self._stats.add_outputs(active, list(outputs.values()))


class LmShadow(_ShadowRunner):
    """Shadow a generative language model served by an :class:`LmService`: greedy-token
    agreement.

    For a sampled generation that was greedy (temperature 0) the candidate engine runs greedily
    on the same prompt ids for as many steps as the active model took, and the token ids are
    compared position by position; a step where the active model chose a stop id agrees when
    the candidate chose one too. A sampled generation that was **not** greedy is skipped
    (``skipped_other``): its tokens are random draws, and replaying the active model greedily
    would hold the engine live callers wait for. Latencies are per decode step; a generation
    counts as shadowed when its compute time (prefill and decode) overlapped a candidate run.
    """

    def __init__(self, service: LmService, candidate: LmEngine, *, identity: ShadowIdentity,
                 config: Optional[ShadowConfig] = None, clock: Clock = time.perf_counter,
                 wall_clock: Clock = time.time,
                 baseline_p95_ms: Optional[float] = None) -> None:
        super().__init__(LM, identity, config or ShadowConfig(), None, clock, wall_clock,
                         baseline_p95_ms)  # the LM service keeps no latency figures of its own
        self.service = service
        self.candidate = candidate

    def _attach(self) -> None:
        self.service.observe(self._on_generation)

    def _detach(self) -> None:
        self.service.observe(None)

    def _on_generation(self, prompt_ids: Sequence[int], params: GenerateParams,
                       generated: Sequence[int], stats: GenerationStats) -> None:
        now = self._clock()
        self._record_active(stats.decode_ms, stats.prefill_ms + sum(stats.decode_ms), now)
        if not self._admit(now):
            return
        active = [int(token) for token in generated]
        if stats.stop_reason == STOP_TOKEN:
            active.append(STOP)
        if params.temperature != 0.0 or not active:
            self._skip()
            return
        prompt = [int(token) for token in prompt_ids]
        stop_ids = frozenset(params.stop_ids) | frozenset(
            self.candidate.spec.stop_ids if self.candidate.spec else ())
        self._submit(lambda: self._compare(prompt, active, stop_ids))

    def _compare(self, prompt: list[int], active: list[int], stop_ids: frozenset[int]) -> None:
        chosen: list[int] = []
        steps_ms: list[float] = []
        last = self._clock()
        for logits in self.candidate.greedy_logits(prompt, len(active)):
            token = int(np.argmax(logits))
            chosen.append(STOP if token in stop_ids else token)
            now = self._clock()
            steps_ms.append((now - last) * 1000.0)
            last = now
        self._record_candidate(steps_ms[1:] or steps_ms)  # the first step includes the prefill
        with self._lock:
            self._stats.add_tokens(active, chosen)
