"""The on-device profile record (``fleetlite.profile/1`` and ``/2``) and the statistics behind it.

A profile is what the agent's profiler (:mod:`fleetlite.agent.profiler`) measured for one model on
one device: model identity, run parameters, timings (init, first inference, warm-up, steady-state
latency distribution) and memory (RSS before, during and after load, peak during inference), next
to the device facts that produced them.

A generative language model's profile (:mod:`fleetlite.agent.lm_profiler`) adds an ``lm`` section
(:class:`LmProfile`: load time, cold and warm time to first token, prefill and decode tokens/s at
fixed lengths, as llama-bench's pp/tg tests) and is written as ``fleetlite.profile/2``; a record
without it is still written as ``/1``, byte for byte as before, so older readers keep reading
every profile that is not an LM's. Both versions are read. In an LM record ``timings`` is kept
and summarises decode steps (``run.timing`` ``decode``), so readers of ``timings`` still work.

The run loop follows TFLite's ``benchmark_model`` (``tensorflow/lite/tools/benchmark``): same
defaults and the same stopping rule (:func:`should_continue`), plus a ``max_runs`` cap. Unlike
``benchmark_model``, raw samples are kept so percentiles can be reported
(:func:`summarize_latencies`).

All times are milliseconds, memory is MiB (2**20 bytes, written ``mb`` like the rest of
FleetLite), ``ts`` is Unix time in seconds.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional, Protocol

from fleetlite.sdk.lm_signature import CACHE_LAYOUTS
from fleetlite.sdk.messages import (
    BAD_TYPE,
    BAD_VALUE,
    MAX_ID_LENGTH,
    WRONG_SCHEMA,
    Message,
    MessageError,
    decode_object,
    get_bool,
    get_dict,
    get_float,
    get_int,
    get_list,
    get_str,
    get_ts,
)

__all__ = [
    "DEFAULT_MAX_RUNS",
    "DEFAULT_MAX_SECONDS",
    "DEFAULT_MIN_RUNS",
    "DEFAULT_MIN_SECONDS",
    "DEFAULT_WARMUP_MIN_SECONDS",
    "DEFAULT_WARMUP_RUNS",
    "MAX_RUNS_LIMIT",
    "LM_WORKLOADS",
    "MAX_LM_FIGURES",
    "PERCENTILE_METHOD",
    "QUANTIZATIONS",
    "SCHEMA",
    "SCHEMAS",
    "SCHEMA_V2",
    "TIMINGS",
    "TRIGGERS",
    "BudgetCheck",
    "DecodeFigure",
    "LatencyStats",
    "LmProfile",
    "MemoryStats",
    "ModelInfo",
    "PrefillFigure",
    "ProfileRecord",
    "ProfileSettings",
    "RepeatStats",
    "RunParameters",
    "Timings",
    "TtftFigure",
    "check_budgets",
    "format_ms",
    "percentile",
    "render_text",
    "resolve_settings",
    "should_continue",
    "summarize_latencies",
    "summarize_runs",
]

SCHEMA = "fleetlite.profile/1"
SCHEMA_V2 = "fleetlite.profile/2"
"""A record with an ``lm`` section; :meth:`ProfileRecord.to_dict` writes ``/1`` without one."""
SCHEMAS = (SCHEMA, SCHEMA_V2)
MAX_LM_FIGURES = 16
"""At most this many prefill and this many decode figures in an ``lm`` section."""

# benchmark_model's defaults (benchmark_model.cc): num_runs 50, min_secs 1, max_secs 150,
# warmup_runs 1, warmup_min_secs 0.5. It has no run cap; ours bounds the sample buffer.
DEFAULT_WARMUP_RUNS = 1
DEFAULT_WARMUP_MIN_SECONDS = 0.5
DEFAULT_MIN_RUNS = 50
DEFAULT_MAX_RUNS = 100_000
DEFAULT_MIN_SECONDS = 1.0
DEFAULT_MAX_SECONDS = 150.0
MAX_RUNS_LIMIT = 10_000_000

PERCENTILE_METHOD = "linear"
"""Percentiles use linear interpolation between closest ranks (Hyndman & Fan type 7): the default
method of ``numpy.percentile``, R and Excel's ``PERCENTILE.INC``. For sorted samples ``x[0..n-1]``,
``P(q) = x[k] + f * (x[k+1] - x[k])`` with ``h = (n - 1) * q / 100``, ``k = floor(h)``,
``f = h - k``."""

TRIGGERS = ("cli", "command", "model_change", "install", "schedule")
"""Why a profile was taken; other short identifiers are accepted for forward compatibility."""

QUANTIZATIONS = ("float32", "float16", "int8", "uint8", "int16", "mixed", "other")
"""``float32``/``float16``: no quantized tensors. ``int8``/``uint8``/``int16``: every quantized
tensor has that type and float tensors occur only at the model's inputs/outputs. ``mixed``:
quantized and float compute together (e.g. dynamic-range quantization). ``other``: neither."""

TIMINGS = ("invoke", "decode")
"""``invoke``: only ``interpreter.invoke()`` is timed; inputs are set (``set_tensor``) before each
run, outside the timed region, as in benchmark_model. ``decode`` (language models): one sample is
one decode step of the generation engine, the ``decode`` signature call and the choice of its
token."""

LM_WORKLOADS = ("token_ids",)
"""``token_ids``: prompts are deterministic pseudo-random token ids (``lm.seed``), generation
ignores stop ids: no tokenizer is needed and every run decodes exactly the tokens asked for."""

_SHA256_RE = re.compile(r"[0-9a-f]{64}\Z")


# -- statistics ------------------------------------------------------------------------------


@dataclass(frozen=True)
class LatencyStats:
    """Summary of latency samples in ms. ``std_ms`` is the population standard deviation (as in
    benchmark_model's ``Stat``); percentiles follow :data:`PERCENTILE_METHOD`."""

    count: int
    mean_ms: float
    std_ms: float
    min_ms: float
    p50_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LatencyStats:
        stats = cls(
            count=get_int(data, "count", minimum=1),
            mean_ms=_non_negative(data, "mean_ms"),
            std_ms=_non_negative(data, "std_ms"),
            min_ms=_non_negative(data, "min_ms"),
            p50_ms=_non_negative(data, "p50_ms"),
            p90_ms=_non_negative(data, "p90_ms"),
            p95_ms=_non_negative(data, "p95_ms"),
            p99_ms=_non_negative(data, "p99_ms"),
            max_ms=_non_negative(data, "max_ms"),
        )
        ordered = (stats.min_ms, stats.p50_ms, stats.p90_ms, stats.p95_ms, stats.p99_ms,
                   stats.max_ms)
        if any(a > b for a, b in zip(ordered, ordered[1:])):
            raise MessageError(BAD_VALUE, "latency statistics must satisfy "
                               "min <= p50 <= p90 <= p95 <= p99 <= max")
        if not stats.min_ms <= stats.mean_ms <= stats.max_ms:
            raise MessageError(BAD_VALUE, "latency mean must lie between min and max")
        return stats



def percentile(sorted_samples: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) of already sorted samples, by :data:`PERCENTILE_METHOD`."""
    n = len(sorted_samples)
    if n == 0:
        raise ValueError("percentile of no samples")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile must be within 0..100, got {q}")
    h = (n - 1) * q / 100.0
    k = min(math.floor(h), n - 1)
    if k == n - 1:
        return float(sorted_samples[k])
    lo, hi = float(sorted_samples[k]), float(sorted_samples[k + 1])
    # Clamping keeps the result monotone in q despite rounding in lo + f * (hi - lo).
    return min(max(lo + (h - k) * (hi - lo), lo), hi)


def summarize_latencies(samples_ms: Sequence[float]) -> LatencyStats:
    """Count, mean, population std, min, p50/p90/p95/p99 and max of latency samples (ms)."""
    values = sorted(float(v) for v in samples_ms)
    if not values:
        raise ValueError("no latency samples to summarize")
    if not all(math.isfinite(v) and v >= 0.0 for v in values):
        raise ValueError("latency samples must be finite and non-negative")
    n = len(values)
    lo, hi = values[0], values[-1]
    mean = min(max(math.fsum(values) / n, lo), hi)
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / n)
    return LatencyStats(
        count=n,
        mean_ms=mean,
        std_ms=std,
        min_ms=lo,
        p50_ms=percentile(values, 50),
        p90_ms=percentile(values, 90),
        p95_ms=percentile(values, 95),
        p99_ms=percentile(values, 99),
        max_ms=hi,
    )


@dataclass(frozen=True)
class RepeatStats:
    """One figure over repeated runs, as llama-bench reports ``mean ± sd``: ``sd`` is the sample
    standard deviation (n - 1; 0 for one run)."""

    count: int
    mean: float
    sd: float
    min: float
    max: float

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RepeatStats:
        stats = cls(
            count=get_int(data, "count", minimum=1),
            mean=_non_negative(data, "mean"),
            sd=_non_negative(data, "sd"),
            min=_non_negative(data, "min"),
            max=_non_negative(data, "max"),
        )
        if not stats.min <= stats.mean <= stats.max:
            raise MessageError(BAD_VALUE, "a repeated figure must satisfy min <= mean <= max")
        return stats

    def text(self, digits: int = 2) -> str:
        """``mean ± sd`` with ``digits`` decimals."""
        return f"{self.mean:.{digits}f} ± {self.sd:.{digits}f}"


def summarize_runs(values: Sequence[float]) -> RepeatStats:
    """Count, mean, sample standard deviation, min and max of one figure's runs."""
    runs = [float(v) for v in values]
    if not runs:
        raise ValueError("no runs to summarize")
    if not all(math.isfinite(v) and v >= 0.0 for v in runs):
        raise ValueError("run figures must be finite and non-negative")
    lo, hi = min(runs), max(runs)
    mean = min(max(math.fsum(runs) / len(runs), lo), hi)
    sd = 0.0
    if len(runs) > 1:
        sd = math.sqrt(math.fsum((v - mean) ** 2 for v in runs) / (len(runs) - 1))
    return RepeatStats(count=len(runs), mean=mean, sd=sd, min=lo, max=hi)


def should_continue(
    runs: int,
    elapsed_s: float,
    min_runs: int,
    max_runs: int,
    min_seconds: float,
    max_seconds: float,
) -> bool:
    """benchmark_model's loop condition, plus a run cap.

    Run again while (fewer than ``min_runs`` runs or less than ``min_seconds`` elapsed) and no more
    than ``max_seconds`` elapsed; never beyond ``max_runs`` runs (the cap wins over the minimums).
    """
    if runs >= max_runs:
        return False
    return (runs < min_runs or elapsed_s < min_seconds) and elapsed_s <= max_seconds


# -- run settings ----------------------------------------------------------------------------


class _ProfilerDefaultsLike(Protocol):
    """What :func:`resolve_settings` reads (``sdk.device_class.ProfilerDefaults`` fits)."""

    @property
    def warmup_runs(self) -> int: ...
    @property
    def min_runs(self) -> int: ...
    @property
    def max_runs(self) -> int: ...
    @property
    def min_seconds(self) -> float: ...
    @property
    def max_seconds(self) -> float: ...


@dataclass(frozen=True)
class ProfileSettings:
    """The run-loop parameters of one profile (see :func:`should_continue`)."""

    warmup_runs: int = DEFAULT_WARMUP_RUNS
    warmup_min_seconds: float = DEFAULT_WARMUP_MIN_SECONDS
    min_runs: int = DEFAULT_MIN_RUNS
    max_runs: int = DEFAULT_MAX_RUNS
    min_seconds: float = DEFAULT_MIN_SECONDS
    max_seconds: float = DEFAULT_MAX_SECONDS

    def __post_init__(self) -> None:
        for name in ("warmup_runs", "min_runs", "max_runs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        if self.min_runs < 1:
            raise ValueError(f"min_runs must be >= 1, got {self.min_runs}")
        if not 1 <= self.max_runs <= MAX_RUNS_LIMIT:
            raise ValueError(f"max_runs must be within 1..{MAX_RUNS_LIMIT}, got {self.max_runs}")
        for name in ("warmup_min_seconds", "min_seconds", "max_seconds"):
            value = getattr(self, name)
            if (isinstance(value, bool) or not isinstance(value, (int, float))
                    or not math.isfinite(value) or value < 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.max_seconds <= 0:
            raise ValueError(f"max_seconds must be > 0, got {self.max_seconds}")


def resolve_settings(
    defaults: Optional[_ProfilerDefaultsLike] = None,
    *,
    warmup_runs: Optional[int] = None,
    warmup_min_seconds: Optional[float] = None,
    min_runs: Optional[int] = None,
    max_runs: Optional[int] = None,
    min_seconds: Optional[float] = None,
    max_seconds: Optional[float] = None,
) -> ProfileSettings:
    """Explicit values, else the device class's profiler defaults, else benchmark_model's.

    Raises :class:`ValueError` for negative counts or durations, ``min_runs < 1``, ``max_runs``
    outside ``1..MAX_RUNS_LIMIT`` or ``max_seconds <= 0`` (so at least one steady run happens).
    """
    base = ProfileSettings()
    if defaults is not None:
        base = ProfileSettings(
            warmup_runs=defaults.warmup_runs,
            warmup_min_seconds=base.warmup_min_seconds,
            min_runs=defaults.min_runs,
            max_runs=defaults.max_runs,
            min_seconds=defaults.min_seconds,
            max_seconds=defaults.max_seconds,
        )
    return ProfileSettings(
        warmup_runs=base.warmup_runs if warmup_runs is None else warmup_runs,
        warmup_min_seconds=(base.warmup_min_seconds if warmup_min_seconds is None
                            else warmup_min_seconds),
        min_runs=base.min_runs if min_runs is None else min_runs,
        max_runs=base.max_runs if max_runs is None else max_runs,
        min_seconds=base.min_seconds if min_seconds is None else min_seconds,
        max_seconds=base.max_seconds if max_seconds is None else max_seconds,
    )


# -- the record ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelInfo:
    """Which model was profiled. ``inputs``/``outputs`` are ``TensorSpec.to_dict()`` entries;
    ``node_count`` counts the model's operators (before delegation), ``op_counts`` by type."""

    name: str
    sha256: str
    size_bytes: int
    quantization: str
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    version: Optional[int] = None
    node_count: Optional[int] = None
    op_counts: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelInfo:
        sha256 = get_str(data, "sha256", max_len=64)
        if not _SHA256_RE.match(sha256):
            raise MessageError(BAD_VALUE, "field 'sha256' must be 64 lower-case hex digits")
        quantization = get_str(data, "quantization", max_len=MAX_ID_LENGTH)
        if quantization not in QUANTIZATIONS:
            raise MessageError(BAD_VALUE, f"field 'quantization' must be one of "
                               f"{', '.join(QUANTIZATIONS)}, got {quantization!r}")
        op_counts = get_dict(data, "op_counts", optional=True)
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                   for v in op_counts.values()):
            raise MessageError(BAD_TYPE, "field 'op_counts' must map op names to counts")
        return cls(
            name=get_str(data, "name", max_len=256),
            sha256=sha256,
            size_bytes=get_int(data, "size_bytes", minimum=0),
            quantization=quantization,
            inputs=_tensor_list(data, "inputs"),
            outputs=_tensor_list(data, "outputs"),
            version=_optional_int(data, "version"),
            node_count=_optional_int(data, "node_count"),
            op_counts=op_counts,
        )


@dataclass(frozen=True)
class RunParameters:
    """How the model was run: interpreter, threads, delegate, timing method and loop settings.

    ``delegate`` is ``xnnpack`` when the default resolver delegated part of the graph, else
    ``none``; ``delegate_partitions`` counts the delegated subgraphs. ``inputs`` is ``synthetic``
    (deterministic random data, ``seed``) or ``given``. ``isolated``: measured in a fresh
    subprocess.
    """

    threads: int
    backend: str
    backend_version: str
    delegate: str
    resolver: str
    timing: str
    inputs: str
    warmup_runs: int
    warmup_min_seconds: float
    min_runs: int
    max_runs: int
    min_seconds: float
    max_seconds: float
    isolated: bool
    delegate_partitions: int = 0
    seed: int = 0

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunParameters:
        timing = get_str(data, "timing", max_len=MAX_ID_LENGTH)
        if timing not in TIMINGS:
            raise MessageError(BAD_VALUE, f"field 'timing' must be one of {', '.join(TIMINGS)}")
        return cls(
            threads=get_int(data, "threads", minimum=1, maximum=2**31 - 1),  # INTEGER column
            backend=get_str(data, "backend", max_len=MAX_ID_LENGTH),
            backend_version=get_str(data, "backend_version", max_len=MAX_ID_LENGTH),
            delegate=get_str(data, "delegate", max_len=MAX_ID_LENGTH),
            resolver=get_str(data, "resolver", max_len=MAX_ID_LENGTH),
            timing=timing,
            inputs=get_str(data, "inputs", max_len=MAX_ID_LENGTH),
            warmup_runs=get_int(data, "warmup_runs", minimum=0),
            warmup_min_seconds=_non_negative(data, "warmup_min_seconds"),
            min_runs=get_int(data, "min_runs", minimum=0),
            max_runs=get_int(data, "max_runs", minimum=1),
            min_seconds=_non_negative(data, "min_seconds"),
            max_seconds=_non_negative(data, "max_seconds"),
            isolated=get_bool(data, "isolated"),
            delegate_partitions=get_int(data, "delegate_partitions", optional=True, minimum=0),
            seed=get_int(data, "seed", optional=True),
        )


@dataclass(frozen=True)
class Timings:
    """Init (load + allocate), first inference (the first warm-up run, as in benchmark_model),
    warm-up mean over all warm-up runs, the steady-state distribution and its wall time."""

    init_ms: float
    first_inference_ms: float
    warmup_count: int
    warmup_mean_ms: float
    steady: LatencyStats
    steady_seconds: float

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Timings:
        return cls(
            init_ms=_non_negative(data, "init_ms"),
            first_inference_ms=_non_negative(data, "first_inference_ms"),
            warmup_count=get_int(data, "warmup_count", minimum=1),
            warmup_mean_ms=_non_negative(data, "warmup_mean_ms"),
            steady=_section(data, "steady", LatencyStats.from_dict),
            steady_seconds=_non_negative(data, "steady_seconds"),
        )


@dataclass(frozen=True)
class MemoryStats:
    """Process RSS in MiB. ``method`` says how peaks were found: ``sampling`` (a thread reading
    RSS every ``load_/inference_sample_interval_ms``) or ``sampling+vmhwm`` (also the kernel's
    peak-RSS mark, reset before each phase)."""

    rss_before_load_mb: float
    peak_rss_load_mb: float
    rss_after_load_mb: float
    peak_rss_inference_mb: float
    method: str
    load_sample_interval_ms: float
    inference_sample_interval_ms: float

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MemoryStats:
        return cls(
            rss_before_load_mb=_non_negative(data, "rss_before_load_mb"),
            peak_rss_load_mb=_non_negative(data, "peak_rss_load_mb"),
            rss_after_load_mb=_non_negative(data, "rss_after_load_mb"),
            peak_rss_inference_mb=_non_negative(data, "peak_rss_inference_mb"),
            method=get_str(data, "method", max_len=MAX_ID_LENGTH),
            load_sample_interval_ms=_non_negative(data, "load_sample_interval_ms"),
            inference_sample_interval_ms=_non_negative(data, "inference_sample_interval_ms"),
        )

    @property
    def peak_rss_mb(self) -> float:
        """The highest RSS seen in the whole profile."""
        return max(self.peak_rss_load_mb, self.peak_rss_inference_mb)


@dataclass(frozen=True)
class TtftFigure:
    """Time to first token of a ``prompt_tokens``-token prompt, from the generate call to the
    first token chosen: ``cold_ms`` for the first generation after load, ``warm_ms`` over the
    repeated runs after it."""

    prompt_tokens: int
    cold_ms: float
    warm_ms: RepeatStats

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TtftFigure:
        return cls(
            prompt_tokens=get_int(data, "prompt_tokens", minimum=1),
            cold_ms=_non_negative(data, "cold_ms"),
            warm_ms=_section(data, "warm_ms", RepeatStats.from_dict),
        )


@dataclass(frozen=True)
class PrefillFigure:
    """llama-bench's ``pp<tokens>``: ``tokens`` prompt tokens written into an empty cache by the
    prefill signatures; time per run and tokens per second over the runs."""

    tokens: int
    ms: RepeatStats
    tokens_per_s: RepeatStats

    @property
    def label(self) -> str:
        return f"pp{self.tokens}"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PrefillFigure:
        return cls(
            tokens=get_int(data, "tokens", minimum=1),
            ms=_section(data, "ms", RepeatStats.from_dict),
            tokens_per_s=_section(data, "tokens_per_s", RepeatStats.from_dict),
        )


@dataclass(frozen=True)
class DecodeFigure:
    """llama-bench's ``tg<tokens> @ d<depth>``: ``tokens`` decode steps per run starting at
    context position ``depth`` (the cache holding ``depth`` tokens). ``tokens_per_s`` is per run
    (tokens over the run's decode time); ``ms_per_token`` pools the steps of every run."""

    depth: int
    tokens: int
    tokens_per_s: RepeatStats
    ms_per_token: LatencyStats

    @property
    def label(self) -> str:
        return f"tg{self.tokens} @ d{self.depth}"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DecodeFigure:
        return cls(
            depth=get_int(data, "depth", minimum=0),
            tokens=get_int(data, "tokens", minimum=1),
            tokens_per_s=_section(data, "tokens_per_s", RepeatStats.from_dict),
            ms_per_token=_section(data, "ms_per_token", LatencyStats.from_dict),
        )


@dataclass(frozen=True)
class LmProfile:
    """What users of on-device LMs compare, for one generative LM (the record's ``lm`` section).

    The model's shape (``num_layers``, ``context_length``, ``vocab_size``, ``cache_layout``,
    ``prefill_lengths``) as its signatures state it; the workload (``workload`` of
    :data:`LM_WORKLOADS`, ``seed``, ``repetitions`` runs per figure after ``warmup_runs``
    untimed ones); ``load_ms`` (read, create the interpreter, allocate every signature);
    ``ttft``; ``prefill`` figures by ascending length; ``decode`` figures by ascending depth;
    ``memory_estimate_mb``: the engine's estimate of the model and its caches. Peak RSS is the
    record's ``memory``; runtime and threads its ``run``.
    """

    workload: str
    seed: int
    repetitions: int
    warmup_runs: int
    num_layers: int
    cache_layout: str
    context_length: int
    vocab_size: int
    prefill_lengths: tuple[int, ...]
    load_ms: float
    ttft: TtftFigure
    prefill: tuple[PrefillFigure, ...] = ()
    decode: tuple[DecodeFigure, ...] = ()
    memory_estimate_mb: Optional[float] = None

    @property
    def ttft_ms(self) -> float:
        """The headline time to first token: the warm mean."""
        return self.ttft.warm_ms.mean

    @property
    def prefill_tokens_per_s(self) -> Optional[float]:
        """The headline prefill rate: the mean of the longest prefill figure."""
        return self.prefill[-1].tokens_per_s.mean if self.prefill else None

    @property
    def decode_tokens_per_s(self) -> Optional[float]:
        """The headline decode rate: the mean of the shallowest decode figure."""
        return self.decode[0].tokens_per_s.mean if self.decode else None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LmProfile:
        workload = get_str(data, "workload", max_len=MAX_ID_LENGTH)
        if workload not in LM_WORKLOADS:
            raise MessageError(BAD_VALUE, f"field 'workload' must be one of "
                               f"{', '.join(LM_WORKLOADS)}, got {workload!r}")
        lengths = get_list(data, "prefill_lengths")
        if len(lengths) > MAX_LM_FIGURES or not all(
                isinstance(n, int) and not isinstance(n, bool) and 1 <= n < 2**31
                for n in lengths):
            raise MessageError(BAD_VALUE, f"field 'prefill_lengths' must list at most "
                               f"{MAX_LM_FIGURES} lengths within 1..2**31-1")
        cache_layout = get_str(data, "cache_layout", max_len=MAX_ID_LENGTH)
        if cache_layout not in CACHE_LAYOUTS:
            raise MessageError(BAD_VALUE, f"field 'cache_layout' must be one of "
                               f"{', '.join(CACHE_LAYOUTS)}, got {cache_layout!r:.40}")
        estimate = data.get("memory_estimate_mb")
        return cls(
            workload=workload,
            seed=get_int(data, "seed"),
            repetitions=get_int(data, "repetitions", minimum=1),
            warmup_runs=get_int(data, "warmup_runs", minimum=0),
            num_layers=get_int(data, "num_layers", minimum=1),
            cache_layout=cache_layout,
            context_length=get_int(data, "context_length", minimum=1),
            vocab_size=get_int(data, "vocab_size", minimum=1),
            prefill_lengths=tuple(lengths),
            load_ms=_non_negative(data, "load_ms"),
            ttft=_section(data, "ttft", TtftFigure.from_dict),
            prefill=_figures(data, "prefill", PrefillFigure.from_dict),
            decode=_figures(data, "decode", DecodeFigure.from_dict),
            memory_estimate_mb=None if estimate is None
            else _non_negative(data, "memory_estimate_mb"),
        )


@dataclass(frozen=True)
class ProfileRecord(Message):
    """One profile of one model on one device (schema ``fleetlite.profile/1``, or ``/2`` when it
    carries ``lm``: see the module's docstring).

    ``device_id`` may be empty for a profile taken outside the agent (``fleetlite-agent profile``);
    ``device`` holds the facts of :func:`fleetlite.agent.device_facts.collect` plus
    ``temperature_c_end``; ``trigger`` is one of :data:`TRIGGERS` (other identifiers are accepted).
    """

    SCHEMA: ClassVar[str] = SCHEMA

    device_id: str
    ts: float
    trigger: str
    model: ModelInfo
    run: RunParameters
    timings: Timings
    memory: MemoryStats
    device: dict[str, Any] = field(default_factory=dict)
    lm: Optional[LmProfile] = None

    @property
    def schema(self) -> str:
        """The version this record is written as: ``/2`` with an ``lm`` section, else ``/1``."""
        return SCHEMA if self.lm is None else SCHEMA_V2

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        data["schema"] = self.schema
        if self.lm is None:
            del data["lm"]
        else:
            data["lm"] = _lists(data["lm"])
        return data

    @classmethod
    def from_json(cls, payload: bytes) -> ProfileRecord:
        """Parse a ``fleetlite.profile/1`` or ``/2`` record (size, JSON and schema checked)."""
        try:
            data = decode_object(payload, SCHEMA, max_bytes=cls.MAX_BYTES)
        except MessageError as exc:
            if exc.code != WRONG_SCHEMA:
                raise
            try:
                data = decode_object(payload, SCHEMA_V2, max_bytes=cls.MAX_BYTES)
            except MessageError as again:
                if again.code != WRONG_SCHEMA:
                    raise
                raise MessageError(WRONG_SCHEMA, f"{exc}; this side also reads {SCHEMA_V2!r}"
                                   ) from None
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ProfileRecord:
        """Validate a record's fields. ``lm`` is read unless the record says it is ``/1``, which
        has no such section (a ``/1`` writer's ``lm`` key is ignored, as any unknown key)."""
        trigger = get_str(data, "trigger", max_len=MAX_ID_LENGTH)
        if not trigger:
            raise MessageError(BAD_VALUE, "field 'trigger' must not be empty")
        lm = None
        if data.get("lm") is not None and data.get("schema") != SCHEMA:
            lm = _section(data, "lm", LmProfile.from_dict)
        return cls(
            device_id=get_str(data, "device_id", max_len=MAX_ID_LENGTH),
            ts=get_ts(data),
            trigger=trigger,
            model=_section(data, "model", ModelInfo.from_dict),
            run=_section(data, "run", RunParameters.from_dict),
            timings=_section(data, "timings", Timings.from_dict),
            memory=_section(data, "memory", MemoryStats.from_dict),
            device=get_dict(data, "device", optional=True),
            lm=lm,
        )


def _lists(value: Any) -> Any:
    """``value`` with every tuple made a list, as JSON gives it back."""
    if isinstance(value, dict):
        return {k: _lists(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_lists(v) for v in value]
    return value


def _figures(data: Mapping[str, Any], key: str, parse: Any) -> tuple[Any, ...]:
    """A list of at most :data:`MAX_LM_FIGURES` objects; errors name the list and the index."""
    items = get_list(data, key, optional=True)
    if len(items) > MAX_LM_FIGURES:
        raise MessageError(BAD_VALUE, f"field {key!r} holds {len(items)} figures, more than "
                           f"{MAX_LM_FIGURES}")
    figures = []
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            raise MessageError(BAD_TYPE, f"field {key!r} must be a list of objects")
        try:
            figures.append(parse(item))
        except MessageError as exc:
            raise MessageError(exc.code, f"in {key!r}[{index}]: {exc}") from exc
    return tuple(figures)


def _section(data: Mapping[str, Any], key: str, parse: Any) -> Any:
    """Parse the object ``data[key]``; errors inside it name the section (``timings.steady``)."""
    section = get_dict(data, key)
    try:
        return parse(section)
    except MessageError as exc:
        raise MessageError(exc.code, f"in {key!r}: {exc}") from exc


def _non_negative(data: Mapping[str, Any], key: str) -> float:
    value = get_float(data, key)
    if value < 0:
        raise MessageError(BAD_VALUE, f"field {key!r} must be >= 0, got {value}")
    return value


def _optional_int(data: Mapping[str, Any], key: str) -> Optional[int]:
    if data.get(key) is None:
        return None
    return get_int(data, key, minimum=0)


def _tensor_list(data: Mapping[str, Any], key: str) -> list[dict[str, Any]]:
    items = get_list(data, key)
    for item in items:
        if not isinstance(item, dict):
            raise MessageError(BAD_TYPE, f"field {key!r} must be a list of tensor objects")
        get_str(item, "name", max_len=256)
        get_str(item, "dtype", max_len=MAX_ID_LENGTH)
        shape = get_list(item, "shape")
        if not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
            raise MessageError(BAD_TYPE, f"field {key!r}: a tensor shape must list integers")
    return items


# -- budgets and text ------------------------------------------------------------------------


class _BudgetsLike(Protocol):
    """What :func:`check_budgets` reads (``sdk.device_class.Budgets`` fits)."""

    @property
    def max_p95_latency_ms(self) -> float: ...
    @property
    def max_first_inference_ms(self) -> float: ...
    @property
    def max_model_load_ms(self) -> float: ...
    @property
    def max_peak_rss_mb(self) -> float: ...
    @property
    def max_model_size_mb(self) -> float: ...


@dataclass(frozen=True)
class BudgetCheck:
    """One budget of a device class against the measured value."""

    name: str
    measured: float
    limit: float
    unit: str

    @property
    def ok(self) -> bool:
        return self.measured <= self.limit


def check_budgets(record: ProfileRecord, budgets: _BudgetsLike) -> list[BudgetCheck]:
    """Compare a profile with a device class's budgets (peak RSS is the whole process's). For a
    language model the p95 is a decode step's and the first inference the cold TTFT."""
    lm = record.lm is not None
    return [
        BudgetCheck("p95 decode step" if lm else "p95 latency", record.timings.steady.p95_ms,
                    budgets.max_p95_latency_ms, "ms"),
        BudgetCheck("cold TTFT" if lm else "first inference", record.timings.first_inference_ms,
                    budgets.max_first_inference_ms, "ms"),
        BudgetCheck("model load", record.timings.init_ms, budgets.max_model_load_ms, "ms"),
        BudgetCheck("peak RSS", record.memory.peak_rss_mb, budgets.max_peak_rss_mb, "MB"),
        BudgetCheck("model size", record.model.size_bytes / 2**20, budgets.max_model_size_mb,
                    "MB"),
    ]


def format_ms(value: float) -> str:
    """Milliseconds with about four significant digits (microseconds stay visible)."""
    if value >= 100:
        return f"{value:.1f}"
    if value >= 1:
        return f"{value:.3f}"
    return f"{value:.4f}"


def render_text(record: ProfileRecord, budgets: Optional[_BudgetsLike] = None) -> str:
    """A benchmark_model-like summary of a profile, with percentiles (and budgets if given); for
    a language model, a llama-bench-like table of its pp and tg tests."""
    m, r, t, mem, d = record.model, record.run, record.timings, record.memory, record.device
    s = t.steady
    version = f" v{m.version}" if m.version is not None else ""
    nodes = f", {m.node_count} nodes" if m.node_count is not None else ""
    threads = f"{r.threads} thread{'s' if r.threads != 1 else ''}"
    device = ", ".join(str(d[k]) for k in ("cpu_model", "arch", "os") if d.get(k))
    cores = f" ({d['cores']} cores)" if d.get("cores") else ""
    lines = [
        f"model            {m.name}{version}  {m.size_bytes / 1024:.1f} KB  {m.quantization}"
        f"{nodes}  sha256 {m.sha256[:12]}",
        f"runtime          {r.backend} {r.backend_version}, {threads}, delegate {r.delegate}, "
        f"timing {r.timing}, {r.inputs} inputs{', isolated' if r.isolated else ''}",
    ]
    if device:
        lines.append(f"device           {device}{cores}")
    if record.lm is not None:
        return "\n".join(lines + _lm_lines(record.lm, mem) + _budget_lines(record, budgets))
    lines += [
        f"init             {format_ms(t.init_ms)} ms",
        f"first inference  {format_ms(t.first_inference_ms)} ms",
        f"warm-up          {t.warmup_count} runs, mean {format_ms(t.warmup_mean_ms)} ms",
        f"steady state     {s.count} runs in {t.steady_seconds:.2f} s",
        "",
    ]
    heads = ("mean", "std", "min", "p50", "p90", "p95", "p99", "max")
    values = (s.mean_ms, s.std_ms, s.min_ms, s.p50_ms, s.p90_ms, s.p95_ms, s.p99_ms, s.max_ms)
    cells = [format_ms(v) for v in values]
    widths = [max(len(h), len(c)) for h, c in zip(heads, cells)]
    lines.append("latency (ms)  " + "  ".join(h.rjust(w) for h, w in zip(heads, widths)))
    lines.append("              " + "  ".join(c.rjust(w) for c, w in zip(cells, widths)))
    lines += [
        "",
        f"memory (MB)      before load {mem.rss_before_load_mb:.1f}, peak load "
        f"{mem.peak_rss_load_mb:.1f}, after load {mem.rss_after_load_mb:.1f}, "
        f"peak inference {mem.peak_rss_inference_mb:.1f}  ({mem.method})",
    ]
    return "\n".join(lines + _budget_lines(record, budgets))


def _budget_lines(record: ProfileRecord, budgets: Optional[_BudgetsLike]) -> list[str]:
    if budgets is None:
        return []
    lines = [""]
    for check in check_budgets(record, budgets):
        value = check.measured
        if check.unit == "ms":
            measured = format_ms(value)
        else:
            measured = f"{value:.1f}" if value >= 10 else f"{value:.3f}"
        verdict = "ok" if check.ok else "OVER BUDGET"
        lines.append(f"budget {check.name:<16} {measured:>10} {check.unit} "
                     f"<= {check.limit:g} {check.unit}  {verdict}")
    return lines


def _lm_lines(lm: LmProfile, mem: MemoryStats) -> list[str]:
    """The language-model part of :func:`render_text`: shape, workload, load, TTFT, pp and tg."""
    lengths = ", ".join(str(n) for n in lm.prefill_lengths)
    warm = lm.ttft.warm_ms
    lines = [
        f"language model   {lm.num_layers} layers, context {lm.context_length}, vocab "
        f"{lm.vocab_size}, {lm.cache_layout} cache layout, prefill lengths {lengths}",
        f"workload         {lm.workload.replace('_', ' ')} (seed {lm.seed}), {lm.repetitions} "
        f"runs per test after {lm.warmup_runs} warm-up",
        f"load             {format_ms(lm.load_ms)} ms",
        f"TTFT             cold {format_ms(lm.ttft.cold_ms)} ms, warm {format_ms(warm.mean)} ± "
        f"{format_ms(warm.sd)} ms ({lm.ttft.prompt_tokens}-token prompt, {warm.count} runs)",
        "",
    ]
    heads = ("test", "tokens/s", "ms/run", "p50 ms/tok", "p90 ms/tok", "p99 ms/tok")
    rows = [[f.label, _rate(f.tokens_per_s), f"{format_ms(f.ms.mean)} ± {format_ms(f.ms.sd)}",
             "", "", ""] for f in lm.prefill]
    for g in lm.decode:
        per_token = g.ms_per_token
        rows.append([g.label, _rate(g.tokens_per_s), format_ms(per_token.mean_ms * g.tokens),
                     format_ms(per_token.p50_ms), format_ms(per_token.p90_ms),
                     format_ms(per_token.p99_ms)])
    widths = [max([len(h)] + [len(row[i]) for row in rows]) for i, h in enumerate(heads)]
    for cells in [list(heads), *rows]:
        text = [cells[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(cells[1:], widths[1:])]
        lines.append("  ".join(text).rstrip())
    estimate = (f"; engine estimate {lm.memory_estimate_mb:.1f}"
                if lm.memory_estimate_mb is not None else "")
    lines += [
        "",
        f"memory (MB)      before load {mem.rss_before_load_mb:.1f}, peak load "
        f"{mem.peak_rss_load_mb:.1f}, after load {mem.rss_after_load_mb:.1f}, "
        f"peak generating {mem.peak_rss_inference_mb:.1f}  ({mem.method}){estimate}",
    ]
    return lines


def _rate(stats: RepeatStats) -> str:
    return f"{stats.mean:.1f} ± {stats.sd:.1f}"
