"""The OTA install's smoke test: run a release's model against its smoke vectors and the device
class's budgets, in a subprocess so that a hostile model cannot crash the agent.

:func:`run_smoke_test` starts ``python -m fleetlite.agent.smoke_test`` (one JSON request on stdin,
one JSON reply on stdout; anything the runtime prints goes to stderr). The child reads the smoke
vectors, loads the model (timed; the runtime layer's header and bounds checks run first), checks
the vectors fit the model's inputs and outputs, runs every case (the first run is the timed first
inference) and compares the outputs with the tolerance, then times ``latency_runs`` further
``invoke()`` calls on case 0 as :mod:`fleetlite.agent.profiler` does (inputs set outside the
timed region). Peak RSS is the child's whole-process peak (interpreter, numpy, runtime and model)
during load and inference: a sampling thread plus the kernel's ``VmHWM`` mark, reset before the
load. The budgets are then checked by the pure :func:`check_budgets`.

Reason codes of a failed :class:`SmokeResult` (stable), in the order they are decided:

=========================  ======================================================================
``smoke_crashed``          the child died from a signal; the message names it (e.g. SIGSEGV)
``smoke_timeout``          the child did not finish within ``timeout_s`` (it is killed)
``invalid_model``          the runtime refused the model (header, bounds, unsupported op, invoke)
``smoke_vectors_mismatch`` the vectors are malformed or do not fit the model's inputs/outputs
``smoke_output_mismatch``  outputs differ from the vectors beyond the tolerance (the message
                           gives the worst difference; ``mismatches`` lists every problem)
``over_latency_budget``    p95, first inference or load time above the device class's budget
``over_memory_budget``     peak RSS or model size above the budget
=========================  ======================================================================

A generative language model (its smoke file is ``fleetlite.lm_smoke``) is loaded as the generation
engine loads it, with the release's tokenizer and ``generation`` metadata: when they disagree the
reason is the :mod:`fleetlite.sdk.lm_signature` code (``missing_decode``, ``vocab_mismatch``,
``cache_shape_mismatch``, ``ids_out_of_range``, ...); its greedy tokens and first-step logits are
judged by :func:`fleetlite.sdk.lm_smoke.judge` (``smoke_output_mismatch``), and the decode steps'
p95 stands for the latency budget's p95.

One exception to that order: a model file larger than ``max_model_size_mb`` is refused
(``over_memory_budget``) before any process loads it. A bad model never raises; an
:class:`~fleetlite.agent.errors.AgentError` from :func:`run_smoke_test` means the device could not
run the test at all (no runtime installed, a broken install), which says nothing about the release.
"""

from __future__ import annotations

import gc
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

from fleetlite.agent.errors import AgentError, SmokeTestError
from fleetlite.sdk.child_lifetime import run_tied
from fleetlite.sdk.device_class import Budgets
from fleetlite.sdk.manifest import Tolerance
from fleetlite.sdk.runtime.errors import ModelRuntimeError, RuntimeMissingError

if TYPE_CHECKING:
    from fleetlite.sdk.runtime.interpreter import Array, Model
    from fleetlite.sdk.smoke import SmokeVectors, Tensor

__all__ = [
    "DEFAULT_LATENCY_RUNS",
    "DEFAULT_TIMEOUT_S",
    "INVALID_MODEL",
    "OVER_LATENCY_BUDGET",
    "OVER_MEMORY_BUDGET",
    "REASONS",
    "SMOKE_CRASHED",
    "SMOKE_OUTPUT_MISMATCH",
    "SMOKE_TIMEOUT",
    "SMOKE_VECTORS_MISMATCH",
    "SmokeMeasures",
    "SmokeResult",
    "check_budgets",
    "run_smoke_test",
]

PathArg = Union[str, "os.PathLike[str]"]

SMOKE_CRASHED = "smoke_crashed"
SMOKE_TIMEOUT = "smoke_timeout"
INVALID_MODEL = "invalid_model"
SMOKE_VECTORS_MISMATCH = "smoke_vectors_mismatch"
SMOKE_OUTPUT_MISMATCH = "smoke_output_mismatch"
OVER_LATENCY_BUDGET = "over_latency_budget"
OVER_MEMORY_BUDGET = "over_memory_budget"
REASONS = (SMOKE_CRASHED, SMOKE_TIMEOUT, INVALID_MODEL, SMOKE_VECTORS_MISMATCH,
           SMOKE_OUTPUT_MISMATCH, OVER_LATENCY_BUDGET, OVER_MEMORY_BUDGET)

DEFAULT_TIMEOUT_S = 120.0
DEFAULT_LATENCY_RUNS = 50
MB = float(2**20)
_STDERR_TAIL = 400


@dataclass(frozen=True)
class SmokeMeasures:
    """What the budgets are checked against (ms and MiB)."""

    load_ms: float
    first_inference_ms: float
    p95_ms: float
    peak_rss_mb: float
    model_size_mb: float


@dataclass(frozen=True)
class SmokeResult:
    """The verdict. ``reason`` is one of :data:`REASONS`, or ``""`` when ``passed``.

    Measurements the child did not get to (a crash, a timeout, an early failure) are None.
    ``cases`` counts the smoke cases that were run; ``duration_s`` is the wall time of the whole
    test including the subprocess's start.
    """

    passed: bool
    reason: str
    message: str
    load_ms: Optional[float] = None
    first_inference_ms: Optional[float] = None
    p50_ms: Optional[float] = None
    p95_ms: Optional[float] = None
    peak_rss_mb: Optional[float] = None
    model_size_mb: Optional[float] = None
    cases: int = 0
    mismatches: list[str] = field(default_factory=list)
    duration_s: float = 0.0
    #: share of the smoke outputs that agree with the release's expected ones: top-1 for an
    #: output with scores along its last axis, within tolerance for others, greedy tokens for
    #: a language model (what a variant's fidelity is judged by); None when not measured
    fidelity: Optional[float] = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (for OTA status reports)."""
        return asdict(self)


def check_budgets(measures: SmokeMeasures, budgets: Budgets) -> Optional[tuple[str, str]]:
    """``(reason, message)`` if ``measures`` break ``budgets``, else None.

    Latency wins over memory for the reason; the message lists every exceeded budget.
    """
    latency = [
        ("model load", measures.load_ms, budgets.max_model_load_ms, "ms"),
        ("first inference", measures.first_inference_ms, budgets.max_first_inference_ms, "ms"),
        ("p95 latency", measures.p95_ms, budgets.max_p95_latency_ms, "ms"),
    ]
    memory = [
        ("peak RSS", measures.peak_rss_mb, budgets.max_peak_rss_mb, "MB"),
        ("model size", measures.model_size_mb, budgets.max_model_size_mb, "MB"),
    ]
    over_latency = [_over(*item) for item in latency if not item[1] <= item[2]]
    over_memory = [_over(*item) for item in memory if not item[1] <= item[2]]
    if not over_latency and not over_memory:
        return None
    reason = OVER_LATENCY_BUDGET if over_latency else OVER_MEMORY_BUDGET
    return reason, "; ".join(over_latency + over_memory)


def _over(what: str, value: float, limit: float, unit: str) -> str:
    return f"{what} {value:.4g} {unit} exceeds the budget of {limit:g} {unit}"


def run_smoke_test(
    model_path: PathArg,
    smoke_path: PathArg,
    *,
    tolerance: Tolerance,
    budgets: Budgets,
    num_threads: int,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    latency_runs: int = DEFAULT_LATENCY_RUNS,
    backend: Optional[str] = None,
    generation: Optional[Mapping[str, Any]] = None,
    tokenizer_path: Optional[PathArg] = None,
) -> SmokeResult:
    """Smoke-test ``model_path`` with the vectors in ``smoke_path`` in a subprocess.

    A language model's release also gives its ``generation`` metadata (the manifest's object)
    and ``tokenizer_path``: the model, tokenizer and metadata must agree (else the failure's
    reason is the :mod:`fleetlite.sdk.lm_signature` code, e.g. ``vocab_mismatch``).

    Give it files whose hashes the manifest has verified. Returns a failed :class:`SmokeResult`
    for every problem of the model or vectors. Raises ValueError for bad arguments,
    :class:`RuntimeMissingError` when no TFLite runtime is installed, and :class:`SmokeTestError`
    when the child ends without a verdict (or cannot be started).
    """
    if isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1:
        raise ValueError(f"num_threads must be an integer >= 1, got {num_threads!r}")
    if isinstance(latency_runs, bool) or not isinstance(latency_runs, int) or latency_runs < 1:
        raise ValueError(f"latency_runs must be an integer >= 1, got {latency_runs!r}")
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
    started = time.monotonic()
    origin = str(model_path)

    def failed(reason: str, message: str, **measured: Any) -> SmokeResult:
        if not message.startswith(origin):  # the runtime's messages already name the file
            message = f"{origin}: {message}"
        return SmokeResult(False, reason, message, **measured,
                           duration_s=time.monotonic() - started)

    try:
        size_mb: Optional[float] = os.stat(model_path).st_size / MB
    except OSError:
        size_mb = None  # the child reports the unreadable file as invalid_model
    if size_mb is not None and size_mb > budgets.max_model_size_mb:
        # Never load it: an oversized model can exhaust the device's memory.
        return failed(OVER_MEMORY_BUDGET, f"model size {size_mb:.4g} MB exceeds the budget of "
                      f"{budgets.max_model_size_mb:g} MB; not loaded", model_size_mb=size_mb)

    request = {
        "model": os.fspath(model_path),
        "smoke": os.fspath(smoke_path),
        "tolerance": tolerance.to_dict(),
        "num_threads": num_threads,
        "backend": backend,
        "latency_runs": latency_runs,
        "generation": dict(generation) if generation is not None else None,
        "tokenizer": os.fspath(tokenizer_path) if tokenizer_path is not None else None,
    }
    try:
        # killed with the agent too: a SIGKILLed agent leaves no smoke test behind
        proc = run_tied([sys.executable, "-m", "fleetlite.agent.smoke_test"],
                        input=json.dumps(request).encode(), timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return failed(SMOKE_TIMEOUT, f"the smoke test did not finish within {timeout_s:g} s "
                      "and was killed; the model hangs or is far too slow for this device")
    except OSError as exc:
        raise SmokeTestError(f"cannot start the smoke-test subprocess ({exc})") from exc
    stderr = proc.stderr.decode(errors="replace").strip()
    if proc.returncode < 0:
        try:
            name = signal.Signals(-proc.returncode).name
        except ValueError:
            name = f"signal {-proc.returncode}"
        hint = " (SIGKILL: possibly the kernel's out-of-memory killer)" \
            if -proc.returncode == signal.SIGKILL else ""
        return failed(SMOKE_CRASHED, f"the TFLite interpreter crashed ({name}){hint} while the "
                      "model was smoke-tested in an isolated process; the file is corrupt or "
                      "hostile")
    try:
        reply = json.loads(proc.stdout.decode() or "null")
    except ValueError:
        reply = None
    if proc.returncode != 0 or not isinstance(reply, dict):
        raise SmokeTestError(f"{origin}: the smoke-test subprocess exited with status "
                             f"{proc.returncode} without a verdict: {stderr[-_STDERR_TAIL:]}")
    if not reply.get("ok"):
        error = RuntimeMissingError if reply.get("kind") == "RuntimeMissingError" \
            else SmokeTestError
        raise error(str(reply.get("error")))

    raw = reply.get("measures") or {}
    measured: dict[str, Any] = {
        key: float(raw[key]) if raw.get(key) is not None else None
        for key in ("load_ms", "first_inference_ms", "p50_ms", "p95_ms", "peak_rss_mb",
                    "model_size_mb", "fidelity")
    }
    measured["cases"] = int(reply.get("cases", 0))
    measured["mismatches"] = [str(m) for m in reply.get("mismatches", [])]
    if reply.get("reason"):
        return failed(str(reply["reason"]), str(reply.get("message", "")), **measured)
    needed = {key: measured[key] for key in (
        "load_ms", "first_inference_ms", "p95_ms", "peak_rss_mb", "model_size_mb")}
    if None in needed.values():
        raise SmokeTestError(f"{origin}: the smoke-test subprocess passed the model without "
                             f"measuring it: {needed}")
    measures = SmokeMeasures(**needed)
    verdict = check_budgets(measures, budgets)
    if verdict is not None:
        return failed(verdict[0], verdict[1], **measured)
    return SmokeResult(
        True, "",
        f"{origin}: {measured['cases']} smoke case(s) passed; load {measures.load_ms:.3g} ms, "
        f"first inference {measures.first_inference_ms:.3g} ms, p95 {measures.p95_ms:.3g} ms, "
        f"peak RSS {measures.peak_rss_mb:.4g} MB",
        **measured, duration_s=time.monotonic() - started,
    )


# -- the child -------------------------------------------------------------------------------


class _FailedError(Exception):
    """Ends the child's run with a failure reason (internal to the child)."""

    def __init__(self, reason: str, message: str, mismatches: Sequence[str] = (),
                 cases: int = 0) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.mismatches = list(mismatches)
        self.cases = cases


def _read_vectors(path: Path) -> tuple[Optional[SmokeVectors], str]:
    from fleetlite.sdk.errors import FleetLiteError
    from fleetlite.sdk.smoke import SmokeVectors

    try:
        return SmokeVectors.from_json(path.read_bytes()), ""
    except OSError as exc:
        return None, f"cannot read the smoke vectors {path} ({exc.strerror})"
    except FleetLiteError as exc:
        return None, str(exc)


def _vector_problems(vectors: SmokeVectors, model: Model) -> list[str]:
    from fleetlite.sdk.errors import FleetLiteError
    from fleetlite.sdk.manifest import ModelInfo, TensorInfo
    from fleetlite.sdk.smoke import check_vectors_match_model

    try:
        info = ModelInfo(
            "model",
            tuple(TensorInfo.from_dict(s.to_dict()) for s in model.inputs),
            tuple(TensorInfo.from_dict(s.to_dict()) for s in model.outputs),
        )
    except FleetLiteError as exc:  # e.g. a string tensor, which smoke vectors cannot hold
        return [f"the model's tensors cannot be smoke-tested ({exc})"]
    return check_vectors_match_model(vectors, info)


def _worst_difference(
    failing: Sequence[tuple[int, Tensor, Array]]
) -> Optional[str]:
    """The largest ``|got - expected|`` over the failing outputs of equal dtype and shape."""
    import numpy as np

    worst: Optional[tuple[float, str]] = None
    for case, want, got in failing:
        if got.dtype != want.array.dtype or got.shape != want.array.shape or not got.size:
            continue
        e, a = want.array.astype(np.float64), got.astype(np.float64)
        diff = np.abs(np.nan_to_num(a - e, nan=np.inf))
        at = np.unravel_index(int(np.argmax(diff)), diff.shape)
        value = float(diff[at])
        if worst is None or value > worst[0]:
            worst = value, (f"worst difference {value:.6g} in case {case} output {want.name!r} "
                            f"at {list(map(int, at))} (got {float(a[at]):.6g}, expected "
                            f"{float(e[at]):.6g})")
    return worst[1] if worst is not None else None


def _smoke(request: Mapping[str, Any], measures: dict[str, Any]) -> int:
    """Runs the test, filling ``measures``; returns the cases run or raises _FailedError."""
    import numpy as np

    from fleetlite.agent.profiler import (
        INFERENCE_SAMPLE_INTERVAL_S,
        SAMPLE_INTERVAL_S,
        RssSampler,
        _kernel_peak,
        _reset_kernel_peak,
        _Runner,
        read_rss,
    )
    from fleetlite.sdk.profile import summarize_latencies
    from fleetlite.sdk.runtime.errors import InferenceError, InputMismatchError, InvalidModelError
    from fleetlite.sdk.runtime.interpreter import load_model, select_backend
    from fleetlite.sdk.smoke import compare_outputs

    backend = request.get("backend")
    select_backend(backend)  # imports the runtime now, outside the timed load
    if _is_lm_smoke(Path(request["smoke"])):
        return _smoke_language_model(request, measures)
    tolerance = Tolerance(**request["tolerance"])
    latency_runs = int(request["latency_runs"])
    # Parsed before the load so their memory is in the baseline; a problem with them is only
    # reported after the load (a crashing or invalid model is decided first).
    vectors, vectors_problem = _read_vectors(Path(request["smoke"]))
    samples_ns = np.zeros(latency_runs, dtype=np.int64)
    gc.collect()

    kernel = _reset_kernel_peak()
    rss_before = read_rss()
    try:
        with RssSampler(SAMPLE_INTERVAL_S, baseline=rss_before) as load_sampler:
            start = time.perf_counter_ns()
            model = load_model(request["model"], num_threads=int(request["num_threads"]),
                               backend=backend)
            load_ns = time.perf_counter_ns() - start
    except InvalidModelError as exc:
        raise _FailedError(INVALID_MODEL, str(exc)) from None
    except MemoryError:
        raise _FailedError(OVER_MEMORY_BUDGET, "out of memory while loading the model") from None
    except RuntimeMissingError:
        raise
    except Exception as exc:  # untrusted bytes: whatever the runtime raises is a refusal
        raise _FailedError(INVALID_MODEL, f"the runtime failed to load the model "
                           f"({type(exc).__name__}: {exc})") from None
    measures["load_ms"] = load_ns / 1e6
    measures["model_size_mb"] = model.size / MB
    measures["peak_rss_mb"] = max(load_sampler.peak, _kernel_peak() if kernel else 0) / MB

    if vectors is None:
        raise _FailedError(SMOKE_VECTORS_MISMATCH, vectors_problem, [vectors_problem])
    problems = _vector_problems(vectors, model)
    if problems:
        raise _FailedError(SMOKE_VECTORS_MISMATCH,
                       f"the smoke vectors do not fit the model: {problems[0]}"
                       + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""),
                       problems)

    interval = INFERENCE_SAMPLE_INTERVAL_S if kernel else SAMPLE_INTERVAL_S
    mismatches: list[str] = []
    failing: list[tuple[int, Tensor, Array]] = []
    failed_cases = 0
    agreeing = compared = 0
    try:
        with RssSampler(interval, baseline=read_rss()) as sampler:
            for i, case in enumerate(vectors.cases):
                start = time.perf_counter_ns()
                outputs = model.run(case.input_arrays())
                if i == 0:
                    measures["first_inference_ms"] = (time.perf_counter_ns() - start) / 1e6
                found = compare_outputs(case.outputs, outputs, tolerance)
                for want in case.outputs:
                    if want.name in outputs:
                        compared += 1
                        agreeing += _agrees(want, np.asarray(outputs[want.name]),
                                            not compare_outputs([want], outputs, tolerance))
                if found:
                    failed_cases += 1
                    mismatches.extend(f"case {i}: {p}" for p in found)
                    failing.extend((i, want, np.asarray(outputs[want.name]))
                                   for want in case.outputs if want.name in outputs)
            if not mismatches:
                runner = _Runner(model, vectors.cases[0].input_arrays())
                gc_enabled = gc.isenabled()
                gc.disable()  # a collection inside a timed run is not the model's cost
                try:
                    for run in range(latency_runs):
                        samples_ns[run] = runner.once()
                except (ValueError, RuntimeError) as exc:
                    raise runner.failed(exc) from exc
                finally:
                    if gc_enabled:
                        gc.enable()
    except InferenceError as exc:
        raise _FailedError(INVALID_MODEL, str(exc)) from None
    except InputMismatchError as exc:
        raise _FailedError(SMOKE_VECTORS_MISMATCH, str(exc), [str(exc)]) from None
    except MemoryError:
        raise _FailedError(OVER_MEMORY_BUDGET, "out of memory while running the model") from None
    peak = max(load_sampler.peak, sampler.peak, _kernel_peak() if kernel else 0)
    measures["peak_rss_mb"] = peak / MB
    if compared:
        measures["fidelity"] = agreeing / compared

    if mismatches:
        worst = _worst_difference(failing) or mismatches[0]
        raise _FailedError(
            SMOKE_OUTPUT_MISMATCH,
            f"{failed_cases} of {len(vectors.cases)} smoke case(s) differ from the vectors beyond "
            f"atol={tolerance.atol:g} rtol={tolerance.rtol:g} max_lsb={tolerance.max_lsb}; "
            f"{worst}",
            mismatches,
            len(vectors.cases),
        )
    stats = summarize_latencies((samples_ns / 1e6).tolist())
    measures["p50_ms"] = stats.p50_ms
    measures["p95_ms"] = stats.p95_ms
    return len(vectors.cases)


def _agrees(want: Tensor, got: Array, within_tolerance: bool) -> bool:
    """Whether one output agrees with its expected value: the same top-1 along the last axis
    for scores (a float output with more than one value there), else within tolerance."""
    import numpy as np

    expected = np.asarray(want.array)
    if (expected.dtype.kind == "f" and expected.ndim and expected.shape[-1] > 1
            and got.shape == expected.shape):
        return bool(np.array_equal(expected.argmax(-1), got.argmax(-1)))
    return within_tolerance


def _is_lm_smoke(path: Path) -> bool:
    from fleetlite.sdk.lm_smoke import is_lm_smoke

    try:
        with path.open("rb") as handle:
            return is_lm_smoke(handle.read(4096))
    except OSError:
        return False  # the classifier path reports the unreadable file


def _smoke_language_model(request: Mapping[str, Any], measures: dict[str, Any]) -> int:
    """The smoke test of a generative LM: load it as the generation engine does, generate each
    case's tokens greedily and judge them (:func:`fleetlite.sdk.lm_smoke.judge`). The first
    token's time is the first inference; the decode steps' p95 is checked against the latency
    budget."""
    from fleetlite.agent.profiler import SAMPLE_INTERVAL_S, RssSampler, read_rss
    from fleetlite.sdk.errors import FleetLiteError, LmFormatError
    from fleetlite.sdk.generation import GenerationSpec
    from fleetlite.sdk.lm_smoke import LmSmokeResult, LmSmokeVectors, judge
    from fleetlite.sdk.profile import summarize_latencies
    from fleetlite.sdk.runtime.errors import InferenceError, InvalidModelError
    from fleetlite.sdk.runtime.lm_engine import LmEngine
    from fleetlite.sdk.runtime.tokenizer import load_tokenizer

    tolerance = Tolerance(**request["tolerance"])
    try:
        vectors = LmSmokeVectors.from_json(Path(request["smoke"]).read_bytes())
    except (OSError, FleetLiteError) as exc:
        raise _FailedError(SMOKE_VECTORS_MISMATCH, str(exc), [str(exc)]) from None
    gc.collect()
    steps_ms: list[float] = []
    results = []
    try:
        with RssSampler(SAMPLE_INTERVAL_S, baseline=read_rss()) as sampler:
            start = time.perf_counter_ns()
            spec = tokenizer = None
            if request.get("generation") is not None:
                spec = GenerationSpec.from_dict(request["generation"])
                tokenizer = load_tokenizer(request["tokenizer"], spec.tokenizer_kind)
            engine = LmEngine(request["model"], num_threads=int(request["num_threads"]),
                              backend=request.get("backend"), spec=spec, tokenizer=tokenizer)
            measures["load_ms"] = (time.perf_counter_ns() - start) / 1e6
            measures["model_size_mb"] = engine.model_size / MB
            for i, case in enumerate(vectors.cases):
                ids: list[int] = []
                first_logits: Any = None
                clock = time.perf_counter_ns()
                for step, logits in enumerate(engine.greedy_logits(case.prompt_ids,
                                                                   len(case.expected_ids))):
                    now = time.perf_counter_ns()
                    if step == 0:
                        first_logits = logits.reshape(-1)
                        if i == 0:
                            measures["first_inference_ms"] = (now - clock) / 1e6
                    else:
                        steps_ms.append((now - clock) / 1e6)
                    ids.append(int(logits.argmax()))
                    clock = time.perf_counter_ns()
                results.append(LmSmokeResult(
                    tuple(ids), tuple(float(first_logits[t]) for t in case.first_top_ids),
                    int(first_logits.argmax())))
    except LmFormatError as exc:  # model, tokenizer and metadata disagree: the code says how
        raise _FailedError(exc.reason, str(exc), [str(exc)]) from None
    except InvalidModelError as exc:
        raise _FailedError(INVALID_MODEL, str(exc)) from None
    except (InferenceError, FleetLiteError) as exc:
        raise _FailedError(INVALID_MODEL, str(exc), [str(exc)]) from None
    except MemoryError:
        raise _FailedError(OVER_MEMORY_BUDGET, "out of memory while running the model") from None
    measures["peak_rss_mb"] = sampler.peak / MB
    expected = [t for case in vectors.cases for t in case.expected_ids]
    if expected:
        same = sum(a == b for case, result in zip(vectors.cases, results)
                   for a, b in zip(case.expected_ids, result.ids))
        measures["fidelity"] = same / len(expected)
    problems = judge(vectors, results, tolerance)
    if problems:
        raise _FailedError(SMOKE_OUTPUT_MISMATCH,
                           f"the language model's greedy tokens differ from the release's: "
                           f"{problems[-1]}", problems, len(vectors.cases))
    stats = summarize_latencies(steps_ms or [measures.get("first_inference_ms", 0.0)])
    measures["p50_ms"] = stats.p50_ms
    measures["p95_ms"] = stats.p95_ms
    return len(vectors.cases)


def _child_main() -> int:
    # Keep the real stdout for the reply alone; anything the runtime prints goes to stderr.
    reply_fd = os.dup(1)
    os.dup2(2, 1)
    with os.fdopen(reply_fd, "w") as out:
        request = json.loads(sys.stdin.read())
        measures: dict[str, Any] = {}
        reply: dict[str, Any]
        try:
            cases = _smoke(request, measures)
            reply = {"ok": True, "reason": "", "message": "", "cases": cases, "mismatches": []}
        except _FailedError as verdict:
            reply = {"ok": True, "reason": verdict.reason, "message": verdict.message,
                     "cases": verdict.cases, "mismatches": verdict.mismatches}
        # RuntimeMissingError: the device cannot test, not a verdict
        except (AgentError, ModelRuntimeError) as exc:
            reply = {"ok": False, "kind": type(exc).__name__, "error": str(exc)}
        reply["measures"] = {k: v for k, v in measures.items() if math.isfinite(v)}
        json.dump(reply, out)
    return 0


if __name__ == "__main__":
    sys.exit(_child_main())
