"""On-device profiler: TFLite ``benchmark_model``'s measurement loop over the real interpreter.

Phases, as in benchmark_model: init (load + allocate tensors), warm-up (its first run is the
"first inference"), then steady-state runs until :func:`fleetlite.sdk.profile.should_continue`
says stop. Only ``interpreter.invoke()`` is timed (``time.perf_counter_ns``); inputs are set
before each run outside the timed region. Raw samples are kept, so the record carries
percentiles that benchmark_model cannot report.

Memory: a thread samples the process RSS during load (every 1 ms) and during inference. On
Linux the kernel's peak-RSS mark (``VmHWM``) is also reset before each phase (by writing ``5`` to
``/proc/self/clear_refs``) and read after it, which catches peaks between samples and while the
interpreter holds the GIL. That reset also resets this process's ``ru_maxrss``. With the kernel
mark the inference-phase sampler only wakes every 10 ms: each wake-up takes the GIL and can land
inside a timed ``invoke()``; at 1 ms it raised the p99 of a 3 us model about fivefold.

:func:`profile_model_isolated` runs the same in a fresh ``python -m fleetlite.agent.profiler``
subprocess (JSON request on stdin, JSON reply on stdout): the load peak is then not blurred by
whatever the caller's process holds, and a model that crashes the interpreter raises
:class:`~fleetlite.sdk.runtime.errors.ModelCrashedError` instead of killing the caller.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import sys
import tempfile
import threading
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Callable, Optional, TypedDict, Union, cast

import numpy as np
import numpy.typing as npt

from fleetlite.agent.errors import AgentError
from fleetlite.sdk.profile import (
    LatencyStats,
    MemoryStats,
    ModelInfo,
    ProfileRecord,
    ProfileSettings,
    RunParameters,
    Timings,
    resolve_settings,
    should_continue,
    summarize_latencies,
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
from fleetlite.sdk.runtime.interpreter import InputsLike, Model, ModelSource, load_model

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from fleetlite.agent.lm_profiler import LmProfileOptions
    from fleetlite.sdk.device_class import DeviceClass

__all__ = [
    "DEFAULT_INDEX_RANGE",
    "INFERENCE_SAMPLE_INTERVAL_S",
    "SAMPLE_INTERVAL_S",
    "ProfileOptions",
    "RssSampler",
    "detect_quantization",
    "profile_model",
    "profile_model_isolated",
    "quantization_of",
    "read_rss",
    "synthetic_inputs",
]

Array = npt.NDArray[Any]
DeviceClassArg = Union[str, "DeviceClass", None]

MB = float(2**20)
SAMPLE_INTERVAL_S = 0.001
INFERENCE_SAMPLE_INTERVAL_S = 0.01  # used while the kernel's peak mark is available
# Integer inputs not traced to a GATHER get values in [0, 8): small enough for any index use.
DEFAULT_INDEX_RANGE = 8
_INDEX_OPS = {"GATHER": (0, 1), "GATHER_ND": (0, 1), "EMBEDDING_LOOKUP": (1, 0)}  # (params, ids)
_ISOLATED_SLACK_S = 60.0


# -- memory ----------------------------------------------------------------------------------


def _statm_reader() -> Optional[Callable[[], int]]:
    try:
        fd = os.open("/proc/self/statm", os.O_RDONLY)
    except OSError:
        return None
    page = os.sysconf("SC_PAGE_SIZE")

    def read() -> int:
        return int(os.pread(fd, 128, 0).split()[1]) * page

    return read


def _psutil_reader() -> Callable[[], int]:
    import psutil

    process = psutil.Process()

    def read() -> int:
        return int(process.memory_info().rss)

    return read


# Reading /proc/self/statm directly costs ~2 us against ~35 us through psutil (same file): the
# sampler holds the GIL that long, and every such hold can delay the timed thread.
read_rss: Callable[[], int] = _statm_reader() or _psutil_reader()
"""The current resident set size of this process, in bytes."""


def _reset_kernel_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as file:
            file.write("5")
    except OSError:
        return False
    return True


def _kernel_peak() -> int:
    """VmHWM in bytes (0 if unavailable)."""
    try:
        with open("/proc/self/status") as file:
            for line in file:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


class RssSampler:
    """Context manager: a daemon thread records the highest RSS seen every ``interval_s``.

    ``peak`` also covers ``baseline`` and samples taken on entry and exit, so it is never below
    the RSS at either end of the window.
    """

    def __init__(self, interval_s: float = SAMPLE_INTERVAL_S, *, baseline: int = 0,
                 reader: Callable[[], int] = read_rss) -> None:
        self.interval_s = interval_s
        self.peak = baseline
        self.samples = 0
        self._read = reader
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)

    def _sample(self) -> None:
        value = self._read()
        self.samples += 1
        self.peak = max(self.peak, value)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self) -> RssSampler:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, exc_type: Optional[type[BaseException]], exc: Optional[BaseException],
                 tb: Optional[TracebackType]) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


# -- model facts and inputs ------------------------------------------------------------------


def _ops(model: Model) -> Optional[list[dict[str, Any]]]:
    return _interpreter_ops(model.interpreter)


def _interpreter_ops(interpreter: Any) -> Optional[list[dict[str, Any]]]:
    # _get_ops_details is private to the interpreter but present in tflite-runtime, ai-edge-litert
    # and tf.lite alike; without it the record just lacks the node count and delegate.
    try:
        ops = interpreter._get_ops_details()
    except (AttributeError, ValueError, RuntimeError):
        return None
    return list(ops)


def _tensor_details(model: Model) -> list[dict[str, Any]]:
    try:
        return list(model.interpreter.get_tensor_details())
    except (ValueError, RuntimeError):
        return []


def _is_quantized(detail: Mapping[str, Any]) -> bool:
    if not np.issubdtype(np.dtype(detail["dtype"]), np.integer):
        return False
    scale = detail.get("quantization", (0.0, 0))[0]
    scales = (detail.get("quantization_parameters") or {}).get("scales", ())
    return bool(scale) or len(scales) > 0


def detect_quantization(model: Model) -> str:
    """``float32``, ``float16``, ``int8``/``uint8``/``int16``, ``mixed`` or ``other``.

    A model is ``int8`` (etc.) when every quantized tensor other than int32 biases has that type
    and float tensors occur only at its inputs/outputs; quantized and float compute is ``mixed``.
    """
    io = {spec.index for spec in (*model.inputs, *model.outputs)}
    return quantization_of(_tensor_details(model), io)


def quantization_of(details: Sequence[Mapping[str, Any]], io: Collection[int]) -> str:
    """:func:`detect_quantization` over an interpreter's tensor details and the indices of its
    input and output tensors."""
    quantized = {np.dtype(d["dtype"]).name for d in details if _is_quantized(d)}
    floats = {np.dtype(d["dtype"]).name for d in details
              if np.issubdtype(np.dtype(d["dtype"]), np.floating)}
    inner_floats = [d for d in details
                    if np.issubdtype(np.dtype(d["dtype"]), np.floating) and d["index"] not in io]
    if not quantized:
        if "float16" in floats:
            return "float16"
        return "float32" if floats else "other"
    kinds = quantized - {"int32"} or quantized
    if inner_floats or len(kinds) > 1:
        return "mixed"
    (kind,) = kinds
    return kind if kind in ("int8", "uint8", "int16") else "other"


def _index_bounds(model: Model) -> dict[int, int]:
    """Input tensor index -> exclusive upper bound for values used as GATHER indices.

    The smallest dimension of the gathered tensor keeps indices in range whatever the axis.
    """
    shapes = {int(d["index"]): tuple(int(x) for x in d["shape"]) for d in _tensor_details(model)}
    bounds: dict[int, int] = {}
    for op in _ops(model) or []:
        positions = _INDEX_OPS.get(str(op["op_name"]))
        if positions is None:
            continue
        operands = [int(i) for i in op["inputs"]]
        if len(operands) < 2:
            continue
        params, ids = operands[positions[0]], operands[positions[1]]
        dims = [d for d in shapes.get(params, ()) if d > 0]
        if dims:
            bounds[ids] = min(bounds.get(ids, dims[0]), *dims)
    return bounds


def synthetic_inputs(model: Model, seed: int = 0) -> list[Array]:
    """Deterministic random inputs matching each input's dtype and shape, in input order.

    Floats: uniform in [-1, 1). Quantized or 8-bit integers: the whole integer range. Other
    integers (token ids, positions, masks): [0, n) where n is the smallest dimension of the
    tensor a GATHER/EMBEDDING_LOOKUP indexes with them, else [0, 8). Booleans: random.
    """
    rng = np.random.default_rng(seed)
    bounds = _index_bounds(model)
    arrays: list[Array] = []
    for spec in model.inputs:
        dtype, shape = spec.numpy_dtype, spec.shape
        if np.issubdtype(dtype, np.floating):
            arrays.append(rng.uniform(-1.0, 1.0, size=shape).astype(dtype))
        elif dtype == np.bool_:
            arrays.append(rng.integers(0, 2, size=shape).astype(np.bool_))
        elif np.issubdtype(dtype, np.integer):
            info = np.iinfo(dtype)
            if spec.quantized or dtype.itemsize == 1:
                low, high = int(info.min), int(info.max) + 1
            else:
                low, high = 0, min(bounds.get(spec.index, DEFAULT_INDEX_RANGE), int(info.max))
            arrays.append(rng.integers(low, high, size=shape, dtype=dtype))
        else:
            raise InputMismatchError(
                f"input {spec.name!r} has dtype {spec.dtype}, for which no synthetic data can be "
                "made; pass inputs= (or --inputs) with real values"
            )
    return arrays


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _default_name(source: ModelSource) -> str:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return "model"
    return Path(source).stem or "model"


# -- the measurement -------------------------------------------------------------------------


class _Runner:
    """Sets the inputs, then times one ``invoke()``."""

    def __init__(self, model: Model, arrays: Sequence[Array]) -> None:
        interp = model.interpreter
        self._set = interp.set_tensor
        self._invoke = interp.invoke
        self._feeds = [(spec.index, array) for spec, array in zip(model.inputs, arrays)]
        self._origin = model.origin
        current = interp.get_input_details()
        resized = False
        for (index, array), detail in zip(self._feeds, current):
            if tuple(array.shape) != tuple(int(d) for d in detail["shape"]):
                interp.resize_tensor_input(index, list(array.shape))
                resized = True
        if resized:
            interp.allocate_tensors()

    def once(self) -> int:
        for index, array in self._feeds:
            self._set(index, array)
        # Locals only between the clock reads: a global or attribute lookup there costs tens of
        # ns, a few percent of a microsecond-scale invoke.
        invoke, clock = self._invoke, time.perf_counter_ns
        start = clock()
        invoke()
        return clock() - start

    def failed(self, exc: Exception) -> InferenceError:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return InferenceError(f"{self._origin}: inference failed during profiling ({first})")


def _device_class(device_class: DeviceClassArg) -> Optional[DeviceClass]:
    if device_class is None or not isinstance(device_class, str):
        return device_class
    from fleetlite.sdk.device_class import find_device_class

    return find_device_class(device_class)


def _threads(num_threads: Optional[int], device_class: Optional[DeviceClass]) -> int:
    if num_threads is None:
        return device_class.runtime.default_threads if device_class is not None else 1
    if isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1:
        raise ValueError(f"num_threads must be an integer >= 1, got {num_threads!r}")
    return num_threads


def _interval(seconds: Optional[float]) -> Optional[float]:
    if seconds is not None and not 0 < seconds <= 1:
        raise ValueError(f"memory_sample_interval_s must be within (0, 1], got {seconds!r}")
    return seconds


class _LoopOptions(TypedDict, total=False):
    """The loop bounds, as :func:`~fleetlite.sdk.profile.resolve_settings` takes them."""

    warmup_runs: Optional[int]
    warmup_min_seconds: Optional[float]
    min_runs: Optional[int]
    max_runs: Optional[int]
    min_seconds: Optional[float]
    max_seconds: Optional[float]


class ProfileOptions(_LoopOptions, total=False):
    """The keyword arguments :func:`profile_model` and :func:`profile_model_isolated` share.

    Any may be left out; :func:`profile_model` says what each defaults to.
    """

    num_threads: Optional[int]
    backend: Optional[str]
    inputs: Optional[InputsLike]
    device_id: str
    device_class: DeviceClassArg
    model_name: Optional[str]
    model_version: Optional[int]
    trigger: str
    seed: int
    memory_sample_interval_s: Optional[float]


@dataclass(frozen=True)
class _Run:
    """The resolved parameters of one profile run; ``asdict`` of it is the child's request."""

    settings: ProfileSettings
    threads: int
    backend: Optional[str]
    device_id: str
    device_class: Optional[str]
    model_name: str
    model_version: Optional[int]
    trigger: str
    seed: int
    sample_interval_s: Optional[float]

    @classmethod
    def from_request(cls, request: Mapping[str, Any]) -> _Run:
        values = {f.name: request[f.name] for f in fields(cls)}
        values["settings"] = ProfileSettings(**request["settings"])
        return cls(**values)


def _resolve(
    source: ModelSource,
    *,
    num_threads: Optional[int] = None,
    backend: Optional[str] = None,
    inputs: Optional[InputsLike] = None,
    device_id: str = "",
    device_class: DeviceClassArg = None,
    model_name: Optional[str] = None,
    model_version: Optional[int] = None,
    trigger: str = "cli",
    seed: int = 0,
    memory_sample_interval_s: Optional[float] = None,
    **loop: Unpack[_LoopOptions],
) -> tuple[_Run, Optional[InputsLike]]:
    """Apply the defaults of :class:`ProfileOptions` and check them; ``inputs`` passes through."""
    dc = _device_class(device_class)
    settings = resolve_settings(dc.profiler if dc is not None else None, **loop)
    run = _Run(
        settings=settings, threads=_threads(num_threads, dc), backend=backend,
        device_id=device_id, device_class=dc.name if dc is not None else None,
        model_name=model_name or _default_name(source), model_version=model_version,
        trigger=trigger, seed=seed, sample_interval_s=_interval(memory_sample_interval_s),
    )
    return run, inputs


def profile_model(source: ModelSource, **options: Unpack[ProfileOptions]) -> ProfileRecord:
    """Profile a model in this process and return its :class:`ProfileRecord`.

    Loop parameters (``warmup_runs``, ``warmup_min_seconds``, ``min_runs``, ``max_runs``,
    ``min_seconds``, ``max_seconds``) left out or None come from ``device_class``'s profiler
    defaults (a name or a :class:`~fleetlite.sdk.device_class.DeviceClass`), else
    benchmark_model's (see :func:`fleetlite.sdk.profile.resolve_settings`); ``num_threads`` from
    the class's ``default_threads``, else 1. The first inference always runs and counts as warm-up
    run 1. ``inputs`` (as for :meth:`Model.run`) replaces the synthetic inputs.
    ``memory_sample_interval_s`` fixes the inference-phase RSS sampling interval (default: 10 ms
    where the kernel's peak mark is available, else 1 ms). ``model_name`` defaults to the file's
    stem (``"model"`` for bytes), ``device_id`` to ``""``, ``trigger`` to ``"cli"``, ``seed``
    (of the synthetic inputs) to 0; ``backend`` and ``model_version`` to None.

    A generative language model (signatures ``decode`` and ``prefill_<N>``, read from the file)
    gets a language-model profile instead (:func:`fleetlite.agent.lm_profiler.profile_lm` with
    its default workload, a ``fleetlite.profile/2`` record): of the loop parameters only
    ``max_seconds`` applies to it, as its time budget, and ``inputs`` must be None.

    Only give this function models that passed the isolated check (or use
    :func:`profile_model_isolated`): a corrupt model can crash the interpreter process.
    Raises :class:`InvalidModelError`, :class:`InputMismatchError`, :class:`InferenceError`,
    :class:`~fleetlite.sdk.errors.DeviceClassError`, or :class:`ValueError` for bad parameters.
    """
    lm = _language_model_options(source, options)
    if lm is not None:
        from fleetlite.agent.lm_profiler import profile_lm

        return profile_lm(source, **lm)
    run, inputs = _resolve(source, **options)
    return _profile(source, run, inputs, isolated=False)


def _language_model_options(
    source: ModelSource, options: ProfileOptions
) -> Optional[LmProfileOptions]:
    """The options of an LM profile when ``source`` is a generative LM, else None."""
    from fleetlite.sdk.runtime.lm_detect import is_language_model

    if not is_language_model(source):
        return None
    if options.get("inputs") is not None:
        raise InputMismatchError(
            "a language model is profiled with token-id prompts: inputs= does not apply to it "
            "(use fleetlite.agent.lm_profiler.profile_lm to choose its tests)")
    keep = ("num_threads", "backend", "device_id", "device_class", "model_name", "model_version",
            "trigger", "seed", "max_seconds", "memory_sample_interval_s")
    given: dict[str, Any] = dict(options)
    return cast("LmProfileOptions", {k: given[k] for k in keep if k in given})


def _profile(
    source: ModelSource, run: _Run, inputs: Optional[InputsLike], *, isolated: bool
) -> ProfileRecord:
    from fleetlite.agent import device_facts

    ts = time.time()
    facts = device_facts.collect(run.device_class)
    # Touch the sample buffer now so its pages count in the baseline, not as inference memory.
    samples_ns = np.empty(run.settings.max_runs, dtype=np.int64)
    samples_ns.fill(0)
    gc.collect()

    rss_before = read_rss()
    kernel = _reset_kernel_peak()
    with RssSampler(baseline=rss_before) as load_sampler:
        start = time.perf_counter_ns()
        model = load_model(source, num_threads=run.threads, backend=run.backend)
        init_ns = time.perf_counter_ns() - start
    rss_after = read_rss()
    peak_load = max(load_sampler.peak, rss_after, _kernel_peak() if kernel else 0)

    arrays = synthetic_inputs(model, run.seed) if inputs is None else model._arrange_inputs(inputs)
    runner = _Runner(model, arrays)
    kernel = kernel and _reset_kernel_peak()
    sample_interval_s = run.sample_interval_s
    if sample_interval_s is None:
        sample_interval_s = INFERENCE_SAMPLE_INTERVAL_S if kernel else SAMPLE_INTERVAL_S
    gc_enabled = gc.isenabled()
    gc.disable()  # as timeit does: a collection inside a timed run is not the model's cost
    try:
        with RssSampler(sample_interval_s, baseline=rss_after) as inference_sampler:
            warmup_count, first_ns, warmup_ns = _warm_up(runner, run.settings)
            steady_count, steady_ns = _steady(runner, run.settings, samples_ns)
    except (ValueError, RuntimeError) as exc:
        raise runner.failed(exc) from exc
    finally:
        if gc_enabled:
            gc.enable()
    peak_inference = max(inference_sampler.peak, _kernel_peak() if kernel else 0)
    facts["temperature_c_end"] = device_facts.temperature_c()

    if isinstance(source, (bytes, bytearray, memoryview)):
        sha256 = hashlib.sha256(source).hexdigest()
    else:
        sha256 = _file_sha256(Path(source))
    ops = _ops(model)
    op_counts: dict[str, int] = {}
    for op in ops or []:
        name = str(op["op_name"])
        op_counts[name] = op_counts.get(name, 0) + 1
    partitions = op_counts.pop("DELEGATE", 0)
    steady: LatencyStats = summarize_latencies((samples_ns[:steady_count] / 1e6).tolist())

    return ProfileRecord(
        device_id=run.device_id,
        ts=ts,
        trigger=run.trigger,
        model=ModelInfo(
            name=run.model_name,
            version=run.model_version,
            sha256=sha256,
            size_bytes=model.size,
            quantization=detect_quantization(model),
            inputs=[spec.to_dict() for spec in model.inputs],
            outputs=[spec.to_dict() for spec in model.outputs],
            node_count=sum(op_counts.values()) if ops is not None else None,
            op_counts=op_counts,
        ),
        run=RunParameters(
            threads=model.num_threads,
            backend=model.backend.name,
            backend_version=model.backend.version,
            # The Python Interpreter's default (AUTO) resolver applies XNNPACK, the only default
            # delegate; its partitions show up as DELEGATE nodes.
            delegate=("xnnpack" if partitions else "none") if ops is not None else "unknown",
            resolver="auto",
            timing="invoke",
            inputs="synthetic" if inputs is None else "given",
            isolated=isolated,
            delegate_partitions=partitions,
            seed=run.seed,
            **asdict(run.settings),
        ),
        timings=Timings(
            init_ms=init_ns / 1e6,
            first_inference_ms=first_ns / 1e6,
            warmup_count=warmup_count,
            warmup_mean_ms=warmup_ns / warmup_count / 1e6,
            steady=steady,
            steady_seconds=steady_ns / 1e9,
        ),
        memory=MemoryStats(
            rss_before_load_mb=rss_before / MB,
            peak_rss_load_mb=peak_load / MB,
            rss_after_load_mb=rss_after / MB,
            peak_rss_inference_mb=peak_inference / MB,
            method="sampling+vmhwm" if kernel else "sampling",
            load_sample_interval_ms=SAMPLE_INTERVAL_S * 1e3,
            inference_sample_interval_ms=sample_interval_s * 1e3,
        ),
        device=facts,
    )


def _warm_up(runner: _Runner, settings: ProfileSettings) -> tuple[int, int, int]:
    """Returns (runs, first run ns, total ns); the first run always happens."""
    start = time.perf_counter_ns()
    first = total = runner.once()
    runs = 1
    while should_continue(runs, (time.perf_counter_ns() - start) / 1e9, settings.warmup_runs,
                          settings.max_runs, settings.warmup_min_seconds, settings.max_seconds):
        total += runner.once()
        runs += 1
    return runs, first, total


def _steady(runner: _Runner, settings: ProfileSettings, samples_ns: Array) -> tuple[int, int]:
    """Fills ``samples_ns``; returns (runs, wall ns of the loop)."""
    runs, elapsed_s = 0, 0.0
    start = time.perf_counter_ns()
    while should_continue(runs, elapsed_s, settings.min_runs, settings.max_runs,
                          settings.min_seconds, settings.max_seconds):
        samples_ns[runs] = runner.once()
        runs += 1
        elapsed_s = (time.perf_counter_ns() - start) / 1e9
    return runs, time.perf_counter_ns() - start


# -- isolated --------------------------------------------------------------------------------

_FAILURES = ChildFailures(
    timed_out="{origin}: the isolated profile did not finish within {timeout:g} s; the model "
    "hangs or is far slower than max_seconds allows",
    crashed="{origin}: the TFLite interpreter crashed ({signal}) while the model was profiled in "
    "an isolated process; the file is corrupt or hostile",
    failed="{origin}: the isolated profile failed",
    error=AgentError,
    kinds={
        cls.__name__: cls
        for cls in (InvalidModelError, UnsupportedOpError, InputMismatchError, InferenceError,
                    RuntimeMissingError)
    },
    required="record",
)


def profile_model_isolated(
    source: ModelSource, *, timeout: Optional[float] = None, **options: Unpack[ProfileOptions]
) -> ProfileRecord:
    """:func:`profile_model` in a fresh subprocess; the record has ``run.isolated`` true.

    ``timeout`` defaults to twice ``max_seconds`` (warm-up and steady state) plus 60 s. Raises
    :class:`~fleetlite.sdk.runtime.errors.ModelCrashedError` if the child dies from a signal or
    times out, otherwise the same errors as :func:`profile_model`. A generative language model
    gets a language-model profile, as from :func:`profile_model`
    (:func:`fleetlite.agent.lm_profiler.profile_lm_isolated`).
    """
    lm = _language_model_options(source, options)
    if lm is not None:
        from fleetlite.agent.lm_profiler import profile_lm_isolated

        return profile_lm_isolated(source, timeout=timeout, **lm)
    run, inputs = _resolve(source, **options)
    request: dict[str, Any] = asdict(run)
    if timeout is None:
        timeout = 2 * run.settings.max_seconds + _ISOLATED_SLACK_S
    with tempfile.TemporaryDirectory(prefix="fleetlite-profile-") as tmp:
        if isinstance(source, (bytes, bytearray, memoryview)):
            path = Path(tmp) / "model.tflite"
            path.write_bytes(source)
            origin = "model bytes"
        else:
            path = Path(source)
            origin = str(path)
        request["model"] = str(path)
        if inputs is not None:
            request["inputs"] = _save_inputs(inputs, Path(tmp) / "inputs.npz")
        reply = run_json_child(
            _child_command(), request, timeout=timeout, origin=origin, failures=_FAILURES
        )
    return ProfileRecord.from_dict(reply["record"])


def _save_inputs(inputs: InputsLike, path: Path) -> dict[str, Any]:
    if isinstance(inputs, Mapping):
        names: Optional[list[str]] = [str(name) for name in inputs]
        arrays = [np.asarray(inputs[name]) for name in inputs]
    elif isinstance(inputs, np.ndarray):
        names, arrays = None, [inputs]
    else:
        names, arrays = None, [np.asarray(value) for value in inputs]
    np.savez(path, *arrays)
    return {"path": str(path), "names": names}


def _load_inputs(spec: Mapping[str, Any]) -> InputsLike:
    with np.load(spec["path"], allow_pickle=False) as data:
        arrays = [data[f"arr_{i}"] for i in range(len(data.files))]
    names = spec.get("names")
    return dict(zip(names, arrays)) if names is not None else arrays


def _child_command() -> list[str]:
    return [sys.executable, "-m", "fleetlite.agent.profiler"]


def _child_main() -> int:
    # Keep the real stdout for the reply alone; anything the runtime prints goes to stderr.
    reply_fd = os.dup(1)
    os.dup2(2, 1)
    with os.fdopen(reply_fd, "w") as out:
        request = json.loads(sys.stdin.read())
        try:
            inputs = _load_inputs(request["inputs"]) if request.get("inputs") else None
            record = _profile(request["model"], _Run.from_request(request), inputs, isolated=True)
        except (AgentError, ModelRuntimeError) as exc:
            json.dump({"ok": False, "kind": type(exc).__name__, "error": str(exc)}, out)
            return 1
        json.dump({"ok": True, "record": record.to_dict()}, out)
    return 0


if __name__ == "__main__":
    sys.exit(_child_main())
