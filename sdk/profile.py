"""The on-device profile record (``fleetlite.profile/1``) and the statistics behind it.

A profile is what the agent's profiler (:mod:`fleetlite.agent.profiler`) measured for one model on
one device: model identity, run parameters, timings (init, first inference, warm-up, steady-state
latency distribution) and memory (RSS before, during and after load, peak during inference), next
to the device facts that produced them.

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

from fleetlite.sdk.messages import (
    BAD_TYPE,
    BAD_VALUE,
    MAX_ID_LENGTH,
    Message,
    MessageError,
    get_bool,
    get_dict,
    get_float,
    get_int,
    get_list,
    get_str,
)

__all__ = [
    "DEFAULT_MAX_RUNS",
    "DEFAULT_MAX_SECONDS",
    "DEFAULT_MIN_RUNS",
    "DEFAULT_MIN_SECONDS",
    "DEFAULT_WARMUP_MIN_SECONDS",
    "DEFAULT_WARMUP_RUNS",
    "MAX_RUNS_LIMIT",
    "PERCENTILE_METHOD",
    "QUANTIZATIONS",
    "SCHEMA",
    "TIMINGS",
    "TRIGGERS",
    "BudgetCheck",
    "LatencyStats",
    "MemoryStats",
    "ModelInfo",
    "ProfileRecord",
    "ProfileSettings",
    "RunParameters",
    "Timings",
    "check_budgets",
    "format_ms",
    "percentile",
    "render_text",
    "resolve_settings",
    "should_continue",
    "summarize_latencies",
]

SCHEMA = "fleetlite.profile/1"

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

TIMINGS = ("invoke",)
"""``invoke``: only ``interpreter.invoke()`` is timed; inputs are set (``set_tensor``) before each
run, outside the timed region, as in benchmark_model."""

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
            threads=get_int(data, "threads", minimum=1),
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
class ProfileRecord(Message):
    """One profile of one model on one device (schema ``fleetlite.profile/1``).

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

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ProfileRecord:
        trigger = get_str(data, "trigger", max_len=MAX_ID_LENGTH)
        if not trigger:
            raise MessageError(BAD_VALUE, "field 'trigger' must not be empty")
        return cls(
            device_id=get_str(data, "device_id", max_len=MAX_ID_LENGTH),
            ts=get_float(data, "ts"),
            trigger=trigger,
            model=_section(data, "model", ModelInfo.from_dict),
            run=_section(data, "run", RunParameters.from_dict),
            timings=_section(data, "timings", Timings.from_dict),
            memory=_section(data, "memory", MemoryStats.from_dict),
            device=get_dict(data, "device", optional=True),
        )


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
    """Compare a profile with a device class's budgets (peak RSS is the whole process's)."""
    return [
        BudgetCheck("p95 latency", record.timings.steady.p95_ms, budgets.max_p95_latency_ms, "ms"),
        BudgetCheck("first inference", record.timings.first_inference_ms,
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
    """A benchmark_model-like summary of a profile, with percentiles (and budgets if given)."""
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
    if budgets is not None:
        lines.append("")
        for check in check_budgets(record, budgets):
            value = check.measured
            if check.unit == "ms":
                measured = format_ms(value)
            else:
                measured = f"{value:.1f}" if value >= 10 else f"{value:.3f}"
            verdict = "ok" if check.ok else "OVER BUDGET"
            lines.append(f"budget {check.name:<16} {measured:>10} {check.unit} "
                         f"<= {check.limit:g} {check.unit}  {verdict}")
    return "\n".join(lines)
