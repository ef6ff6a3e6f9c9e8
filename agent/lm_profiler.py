"""Profiles of generative language models, in the manner of llama-bench's pp and tg tests.

:func:`measure_lm` measures a loaded :class:`~fleetlite.sdk.runtime.lm_engine.LmEngine` through its
``generate`` API, with token-id prompts (no tokenizer needed) and no stop ids (an engine without
a release spec has none), so every run decodes exactly the tokens asked for:

1. cold time to first token: the first generation after load, a ``prompt_tokens`` prompt;
2. warm time to first token: the same prompt, ``repetitions`` times;
3. ``pp<N>``: N prompt tokens prefilled into an empty cache, for N the model's prefill lengths
   below its context (the engine's prefill time of a prompt of N + 1 tokens);
4. ``tg<n> @ d<depth>``: n decode steps from context position ``depth`` (16 and half the context
   by default), each step's time kept, so ms/token percentiles come with the tokens/s.

Each pp and tg test first runs ``warmup_runs`` untimed generations of one token (a signature's
first call is several times slower than the next). Repeated figures are ``mean ± sd`` over the
runs, as llama-bench reports them. Past ``max_seconds`` every remaining test runs once.

:func:`profile_lm` loads the engine (timed, with the RSS sampling and kernel peak mark of
:mod:`fleetlite.agent.profiler`), measures and returns a ``fleetlite.profile/2`` record;
:func:`profile_lm_isolated` does the same in a fresh ``python -m fleetlite.agent.lm_profiler``
child, so a model that crashes the interpreter cannot take the caller down.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, TypedDict

import numpy as np

from fleetlite.agent.errors import AgentError
from fleetlite.agent.profiler import (
    INFERENCE_SAMPLE_INTERVAL_S,
    MB,
    SAMPLE_INTERVAL_S,
    DeviceClassArg,
    RssSampler,
    _default_name,
    _device_class,
    _file_sha256,
    _interpreter_ops,
    _interval,
    _kernel_peak,
    _reset_kernel_peak,
    _threads,
    quantization_of,
    read_rss,
)
from fleetlite.sdk.errors import FleetLiteError
from fleetlite.sdk.generation import MAX_CONTEXT_LENGTH, MAX_MAX_TOKENS
from fleetlite.sdk.lm_signature import DECODE, LmLayout
from fleetlite.sdk.profile import (
    MAX_LM_FIGURES,
    DecodeFigure,
    LmProfile,
    MemoryStats,
    ModelInfo,
    PrefillFigure,
    ProfileRecord,
    RunParameters,
    Timings,
    TtftFigure,
    summarize_latencies,
    summarize_runs,
)
from fleetlite.sdk.runtime.child_process import ChildFailures, run_json_child
from fleetlite.sdk.runtime.errors import (
    InferenceError,
    InputMismatchError,
    InvalidModelError,
    ModelRuntimeError,
    RuntimeMissingError,
    UnsupportedOpError,
)
from fleetlite.sdk.runtime.interpreter import ModelSource
from fleetlite.sdk.runtime.lm_engine import GenerateParams, GenerationStats, LmEngine

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = [
    "DEFAULT_DECODE_TOKENS",
    "DEFAULT_DEPTH",
    "DEFAULT_LM_MAX_SECONDS",
    "DEFAULT_PROMPT_TOKENS",
    "DEFAULT_REPETITIONS",
    "LmMeasures",
    "LmPlan",
    "LmProfileOptions",
    "LmWorkload",
    "measure_lm",
    "plan_workload",
    "profile_lm",
    "profile_lm_isolated",
    "workload_ids",
]

DEFAULT_REPETITIONS = 5  # llama-bench's -r
DEFAULT_WARMUP_RUNS = 1
DEFAULT_PROMPT_TOKENS = 16
DEFAULT_DECODE_TOKENS = 32
DEFAULT_DEPTH = 16
DEFAULT_LM_MAX_SECONDS = 300.0
_ISOLATED_SLACK_S = 120.0


# -- what to run -----------------------------------------------------------------------------


@dataclass(frozen=True)
class LmWorkload:
    """What an LM profile runs. Empty ``prefill_tokens`` means the model's prefill lengths
    (below its context); empty ``depths`` means 16 and half the context (where they fit).
    Explicit lengths or depths that do not fit the model's context are an error."""

    repetitions: int = DEFAULT_REPETITIONS
    warmup_runs: int = DEFAULT_WARMUP_RUNS
    prompt_tokens: int = DEFAULT_PROMPT_TOKENS
    prefill_tokens: tuple[int, ...] = ()
    decode_tokens: int = DEFAULT_DECODE_TOKENS
    depths: tuple[int, ...] = ()
    seed: int = 0
    max_seconds: float = DEFAULT_LM_MAX_SECONDS

    def __post_init__(self) -> None:
        for name, minimum, maximum in (("repetitions", 1, 10_000), ("warmup_runs", 0, 100),
                                       ("prompt_tokens", 1, MAX_CONTEXT_LENGTH),
                                       ("decode_tokens", 1, MAX_MAX_TOKENS),
                                       ("seed", 0, 2**63 - 1)):
            value = getattr(self, name)
            if (isinstance(value, bool) or not isinstance(value, int)
                    or not minimum <= value <= maximum):
                raise ValueError(f"{name} must be an integer within {minimum}..{maximum}, "
                                 f"got {value!r}")
        for name, minimum in (("prefill_tokens", 1), ("depths", 0)):
            values = getattr(self, name)
            if len(values) > MAX_LM_FIGURES or not all(
                    isinstance(v, int) and not isinstance(v, bool) and v >= minimum
                    for v in values):
                raise ValueError(f"{name} must be at most {MAX_LM_FIGURES} integers >= "
                                 f"{minimum}, got {list(values)!r}")
        seconds = self.max_seconds
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not (
                0 < seconds < float("inf")):
            raise ValueError(f"max_seconds must be a number > 0, got {seconds!r}")


@dataclass(frozen=True)
class LmPlan:
    """The tests of one profile, fitted to the model: the TTFT prompt length, the pp lengths and
    the tg (depth, tokens) pairs, all ascending."""

    prompt_tokens: int
    prefill: tuple[int, ...]
    decode: tuple[tuple[int, int], ...]


def plan_workload(layout: LmLayout, workload: LmWorkload) -> LmPlan:
    """Fit ``workload`` to a model of ``layout`` (pure). A pp of N needs N + 1 tokens of context
    and a tg of n at depth d needs d + n; default lengths and depths that do not fit are left
    out, default tg lengths shortened; explicit ones that do not fit raise
    :class:`~fleetlite.sdk.runtime.errors.InputMismatchError`."""
    context = layout.context_length
    prompt = min(workload.prompt_tokens, context)
    if workload.prefill_tokens:
        too_long = [n for n in workload.prefill_tokens if n + 1 > context]
        if too_long:
            raise InputMismatchError(
                f"pp{too_long[0]} needs {too_long[0] + 1} tokens of context but the model holds "
                f"{context}; ask for at most {context - 1}")
        prefill = sorted(set(workload.prefill_tokens))
    else:
        prefill = sorted({min(n, context - 1) for n in layout.prefill_lengths} - {0})
    if workload.depths:
        full = [d for d in workload.depths if d >= context]
        if full:
            raise InputMismatchError(
                f"depth {full[0]} leaves no room to decode in the model's context of {context}; "
                f"ask for depths below {context}")
        depths = sorted(set(workload.depths))
    else:
        depths = sorted({d for d in (DEFAULT_DEPTH, context // 2) if d < context})
    decode = tuple((d, min(workload.decode_tokens, context - d)) for d in depths)
    return LmPlan(prompt, tuple(prefill[:MAX_LM_FIGURES]), decode[:MAX_LM_FIGURES])


def workload_ids(count: int, vocab_size: int, seed: int) -> list[int]:
    """``count`` deterministic pseudo-random token ids in ``[0, vocab_size)``: every prompt of a
    profile is a prefix of them."""
    rng = np.random.default_rng(seed)
    return [int(i) for i in rng.integers(0, vocab_size, size=count)]


# -- the measurement -------------------------------------------------------------------------


@dataclass(frozen=True)
class LmMeasures:
    """What :func:`measure_lm` found. ``steady_ms``: the decode steps the record's ``timings``
    summarise (those of the first tg test, else of the warm TTFT runs)."""

    ttft: TtftFigure
    prefill: tuple[PrefillFigure, ...]
    decode: tuple[DecodeFigure, ...]
    steady_ms: tuple[float, ...]


def _generate(engine: LmEngine, prompt: Sequence[int], tokens: int) -> GenerationStats:
    with engine.generate(prompt, GenerateParams(max_tokens=tokens)) as generation:
        for _ in generation:
            pass
    stats = generation.stats
    if len(stats.decode_ms) != tokens:
        raise InferenceError(
            f"{engine.origin}: a profile run stopped after {len(stats.decode_ms)} of {tokens} "
            f"decode steps ({stats.stop_reason}); profile the model without its release's stop "
            "ids (load the engine without spec=)")
    return stats


def measure_lm(engine: LmEngine, plan: LmPlan, workload: LmWorkload) -> LmMeasures:
    """Run ``plan`` on a freshly loaded ``engine`` (its first generation is the cold TTFT).

    Garbage collection is off while it runs, as in :mod:`fleetlite.agent.profiler`.
    """
    ids = workload_ids(engine.layout.context_length, engine.layout.vocab_size, workload.seed)
    deadline = time.perf_counter() + workload.max_seconds

    def runs() -> range:
        return range(workload.repetitions if time.perf_counter() < deadline else 1)

    def warm_up(prompt: Sequence[int]) -> None:
        for _ in range(workload.warmup_runs if time.perf_counter() < deadline else 0):
            _generate(engine, prompt, 1)

    gc_enabled = gc.isenabled()
    gc.disable()
    try:
        prompt = ids[:plan.prompt_tokens]
        cold = _ttft(_generate(engine, prompt, 1))
        warm = [_generate(engine, prompt, 1) for _ in runs()]
        prefill = []
        for n in plan.prefill:
            warm_up(ids[:n + 1])
            times = [_generate(engine, ids[:n + 1], 1).prefill_ms for _ in runs()]
            prefill.append(PrefillFigure(
                tokens=n, ms=summarize_runs(times),
                tokens_per_s=summarize_runs([n / max(ms, 1e-9) * 1000.0 for ms in times])))
        decode, steady = [], [s.decode_ms[0] for s in warm]
        for depth, tokens in plan.decode:
            warm_up(ids[:depth + 1])
            steps = [_generate(engine, ids[:depth + 1], tokens).decode_ms for _ in runs()]
            pooled = [ms for run in steps for ms in run]
            decode.append(DecodeFigure(
                depth=depth, tokens=tokens,
                tokens_per_s=summarize_runs([tokens / max(sum(run), 1e-9) * 1000.0
                                             for run in steps]),
                ms_per_token=summarize_latencies(pooled)))
            if len(decode) == 1:
                steady = pooled
    finally:
        if gc_enabled:
            gc.enable()
    ttft = TtftFigure(prompt_tokens=plan.prompt_tokens, cold_ms=cold,
                      warm_ms=summarize_runs([_ttft(s) for s in warm]))
    return LmMeasures(ttft, tuple(prefill), tuple(decode), tuple(steady))


def _ttft(stats: GenerationStats) -> float:
    assert stats.time_to_first_token_ms is not None  # _generate checked a token came
    return stats.time_to_first_token_ms


# -- the record ------------------------------------------------------------------------------


class LmProfileOptions(TypedDict, total=False):
    """The keyword arguments :func:`profile_lm` and :func:`profile_lm_isolated` take; any may be
    left out (:func:`profile_lm` says what each defaults to)."""

    num_threads: Optional[int]
    backend: Optional[str]
    cache_layout: Optional[str]
    device_id: str
    device_class: DeviceClassArg
    model_name: Optional[str]
    model_version: Optional[int]
    trigger: str
    repetitions: int
    warmup_runs: int
    prompt_tokens: int
    prefill_tokens: Sequence[int]
    decode_tokens: int
    depths: Sequence[int]
    seed: int
    max_seconds: Optional[float]
    memory_sample_interval_s: Optional[float]


@dataclass(frozen=True)
class _LmRun:
    """The resolved parameters of one LM profile; ``asdict`` of it is the child's request."""

    workload: LmWorkload
    threads: int
    backend: Optional[str]
    cache_layout: Optional[str]
    device_id: str
    device_class: Optional[str]
    model_name: str
    model_version: Optional[int]
    trigger: str
    sample_interval_s: Optional[float]

    @classmethod
    def from_request(cls, request: Mapping[str, Any]) -> _LmRun:
        values = {f.name: request[f.name] for f in fields(cls)}
        work = dict(request["workload"])
        work["prefill_tokens"] = tuple(work["prefill_tokens"])
        work["depths"] = tuple(work["depths"])
        values["workload"] = LmWorkload(**work)
        return cls(**values)


def _resolve(
    source: ModelSource,
    *,
    num_threads: Optional[int] = None,
    backend: Optional[str] = None,
    cache_layout: Optional[str] = None,
    device_id: str = "",
    device_class: DeviceClassArg = None,
    model_name: Optional[str] = None,
    model_version: Optional[int] = None,
    trigger: str = "cli",
    repetitions: int = DEFAULT_REPETITIONS,
    warmup_runs: int = DEFAULT_WARMUP_RUNS,
    prompt_tokens: int = DEFAULT_PROMPT_TOKENS,
    prefill_tokens: Sequence[int] = (),
    decode_tokens: int = DEFAULT_DECODE_TOKENS,
    depths: Sequence[int] = (),
    seed: int = 0,
    max_seconds: Optional[float] = None,
    memory_sample_interval_s: Optional[float] = None,
) -> _LmRun:
    dc = _device_class(device_class)
    workload = LmWorkload(
        repetitions=repetitions, warmup_runs=warmup_runs, prompt_tokens=prompt_tokens,
        prefill_tokens=tuple(prefill_tokens), decode_tokens=decode_tokens, depths=tuple(depths),
        seed=seed, max_seconds=DEFAULT_LM_MAX_SECONDS if max_seconds is None else max_seconds)
    return _LmRun(
        workload=workload, threads=_threads(num_threads, dc), backend=backend,
        cache_layout=cache_layout, device_id=device_id,
        device_class=dc.name if dc is not None else None,
        model_name=model_name or _default_name(source), model_version=model_version,
        trigger=trigger, sample_interval_s=_interval(memory_sample_interval_s))


def profile_lm(source: ModelSource, **options: Unpack[LmProfileOptions]) -> ProfileRecord:
    """Profile a generative LM in this process and return its ``fleetlite.profile/2`` record.

    ``num_threads`` defaults to ``device_class``'s ``default_threads``, else 1; ``repetitions``
    to 5, ``warmup_runs`` to 1, ``prompt_tokens`` (the TTFT prompt) to 16, ``prefill_tokens``
    to the model's prefill lengths, ``decode_tokens`` to 32, ``depths`` to 16 and half the
    context, ``seed`` (of the token ids) to 0, ``max_seconds`` to 300; ``cache_layout`` is
    detected from the cache shapes (give it when they fit both layouts). The identity options
    (``device_id``, ``model_name``, ``model_version``, ``trigger``) are those of
    :func:`fleetlite.agent.profiler.profile_model`.

    Only give this function models that passed the isolated check (or use
    :func:`profile_lm_isolated`). Raises :class:`~fleetlite.sdk.errors.LmFormatError` for a
    model outside the LM convention, the runtime's load errors, :class:`InferenceError`, and
    :class:`ValueError` for bad parameters.
    """
    return _profile_lm(source, _resolve(source, **options), isolated=False)


def _profile_lm(source: ModelSource, run: _LmRun, *, isolated: bool) -> ProfileRecord:
    from fleetlite.agent import device_facts

    ts = time.time()
    facts = device_facts.collect(run.device_class)
    gc.collect()
    rss_before = read_rss()
    kernel = _reset_kernel_peak()
    with RssSampler(baseline=rss_before) as load_sampler:
        start = time.perf_counter_ns()
        engine = LmEngine(source, cache_layout=run.cache_layout, num_threads=run.threads,
                          backend=run.backend)
        load_ms = (time.perf_counter_ns() - start) / 1e6
    rss_after = read_rss()
    peak_load = max(load_sampler.peak, rss_after, _kernel_peak() if kernel else 0)

    plan = plan_workload(engine.layout, run.workload)
    kernel = kernel and _reset_kernel_peak()
    interval = run.sample_interval_s or (INFERENCE_SAMPLE_INTERVAL_S if kernel
                                         else SAMPLE_INTERVAL_S)
    with RssSampler(interval, baseline=rss_after) as sampler:
        measures = measure_lm(engine, plan, run.workload)
    peak_generating = max(sampler.peak, _kernel_peak() if kernel else 0)
    facts["temperature_c_end"] = device_facts.temperature_c()

    if isinstance(source, (bytes, bytearray, memoryview)):
        sha256 = hashlib.sha256(source).hexdigest()
    else:
        sha256 = _file_sha256(Path(source))
    # The engine's interpreter: its primary subgraph's ops and every tensor's type.
    interpreter = engine.interpreter
    ops = _interpreter_ops(interpreter)
    op_counts: dict[str, int] = {}
    for op in ops or []:
        op_counts[str(op["op_name"])] = op_counts.get(str(op["op_name"]), 0) + 1
    partitions = op_counts.pop("DELEGATE", 0)
    io = {int(d["index"]) for d in (*interpreter.get_input_details(),
                                    *interpreter.get_output_details())}
    inputs, outputs = engine.signatures[DECODE]
    layout, work = engine.layout, run.workload
    steady = summarize_latencies(measures.steady_ms)
    return ProfileRecord(
        device_id=run.device_id,
        ts=ts,
        trigger=run.trigger,
        model=ModelInfo(
            name=run.model_name,
            version=run.model_version,
            sha256=sha256,
            size_bytes=engine.model_size,
            quantization=quantization_of(interpreter.get_tensor_details(), io),
            inputs=[{"name": n, "shape": list(t.shape), "dtype": t.dtype}
                    for n, t in sorted(inputs.items())],
            outputs=[{"name": n, "shape": list(t.shape), "dtype": t.dtype}
                     for n, t in sorted(outputs.items())],
            node_count=sum(op_counts.values()) if ops is not None else None,
            op_counts=op_counts,
        ),
        run=RunParameters(
            threads=run.threads,
            backend=engine.backend.name,
            backend_version=engine.backend.version,
            delegate=("xnnpack" if partitions else "none") if ops is not None else "unknown",
            resolver="auto",
            timing="decode",
            inputs="synthetic",
            warmup_runs=work.warmup_runs,
            warmup_min_seconds=0.0,
            min_runs=work.repetitions,
            max_runs=work.repetitions,
            min_seconds=0.0,
            max_seconds=work.max_seconds,
            isolated=isolated,
            delegate_partitions=partitions,
            seed=work.seed,
        ),
        timings=Timings(
            init_ms=load_ms,
            first_inference_ms=measures.ttft.cold_ms,
            warmup_count=1,
            warmup_mean_ms=measures.ttft.cold_ms,
            steady=steady,
            steady_seconds=sum(measures.steady_ms) / 1e3,
        ),
        memory=MemoryStats(
            rss_before_load_mb=rss_before / MB,
            peak_rss_load_mb=peak_load / MB,
            rss_after_load_mb=rss_after / MB,
            peak_rss_inference_mb=peak_generating / MB,
            method="sampling+vmhwm" if kernel else "sampling",
            load_sample_interval_ms=SAMPLE_INTERVAL_S * 1e3,
            inference_sample_interval_ms=interval * 1e3,
        ),
        device=facts,
        lm=LmProfile(
            workload="token_ids",
            seed=work.seed,
            repetitions=work.repetitions,
            warmup_runs=work.warmup_runs,
            num_layers=layout.num_layers,
            cache_layout=layout.cache_layout,
            context_length=layout.context_length,
            vocab_size=layout.vocab_size,
            prefill_lengths=layout.prefill_lengths,
            load_ms=load_ms,
            ttft=measures.ttft,
            prefill=measures.prefill,
            decode=measures.decode,
            memory_estimate_mb=engine.memory_estimate / MB,
        ),
    )


# -- isolated --------------------------------------------------------------------------------

_FAILURES = ChildFailures(
    timed_out="{origin}: the isolated LM profile did not finish within {timeout:g} s; the model "
    "hangs or is far slower than max_seconds allows (lower --repetitions or the tg length)",
    crashed="{origin}: the TFLite interpreter crashed ({signal}) while the language model was "
    "profiled in an isolated process; the file is corrupt or hostile",
    failed="{origin}: the isolated LM profile failed",
    error=InvalidModelError,
    kinds={
        cls.__name__: cls
        for cls in (InvalidModelError, UnsupportedOpError, InputMismatchError, InferenceError,
                    RuntimeMissingError)
    },
    required="record",
)


def profile_lm_isolated(
    source: ModelSource, *, timeout: Optional[float] = None, **options: Unpack[LmProfileOptions]
) -> ProfileRecord:
    """:func:`profile_lm` in a fresh subprocess; the record has ``run.isolated`` true.

    ``timeout`` defaults to twice ``max_seconds`` plus 120 s (a test that started before the
    time was up finishes its run). Raises
    :class:`~fleetlite.sdk.runtime.errors.ModelCrashedError` if the child dies from a signal or
    times out; a model outside the LM convention or refused by the runtime raises
    :class:`InvalidModelError` with the child's message; otherwise the errors of
    :func:`profile_lm`.
    """
    run = _resolve(source, **options)
    if timeout is None:
        timeout = 2 * run.workload.max_seconds + _ISOLATED_SLACK_S
    request: dict[str, Any] = asdict(run)
    with tempfile.TemporaryDirectory(prefix="fleetlite-lm-profile-") as tmp:
        if isinstance(source, (bytes, bytearray, memoryview)):
            path = Path(tmp) / "model.tflite"
            path.write_bytes(source)
            origin = "model bytes"
        else:
            path = Path(source)
            origin = str(path)
        request["model"] = str(path)
        reply = run_json_child([sys.executable, "-m", "fleetlite.agent.lm_profiler"], request,
                               timeout=timeout, origin=origin, failures=_FAILURES)
    return ProfileRecord.from_dict(reply["record"])


def _child_main() -> int:
    # Keep the real stdout for the reply alone; anything the runtime prints goes to stderr.
    reply_fd = os.dup(1)
    os.dup2(2, 1)
    with os.fdopen(reply_fd, "w") as out:
        request = json.loads(sys.stdin.read())
        try:
            record = _profile_lm(request["model"], _LmRun.from_request(request), isolated=True)
        except FleetLiteError as exc:
            own = isinstance(exc, (AgentError, ModelRuntimeError))
            kind = type(exc).__name__ if own else "InvalidModelError"
            json.dump({"ok": False, "kind": kind, "error": str(exc)}, out)
            return 1
        json.dump({"ok": True, "record": record.to_dict()}, out)
    return 0


if __name__ == "__main__":
    sys.exit(_child_main())
