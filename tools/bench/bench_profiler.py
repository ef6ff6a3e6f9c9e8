"""Benchmark: the profiler's p50 against an independent bare ``invoke()`` loop, per model.

The baseline loads the model separately, sets zero inputs once and times ``interpreter.invoke()``
with ``time.perf_counter_ns`` around each call, in a plain loop. The profiler runs the same
number of steady runs (``min_runs = max_runs = --runs``, no time minimum). Rounds alternate
between the two and the median of each side's per-round figure is printed, so slow drift of the
machine affects both alike. Also shown: the untimed bare loop's mean (total / runs), i.e. the
cost of invoke without the two clock reads; the profiler's p99 with its inference-phase RSS sampler
forced to 1 ms (its default is 10 ms where the kernel's peak mark is available); and the isolated
profiler's p50 (one round).

    python -m fleetlite.tools.bench.bench_profiler [--runs 5000] [--rounds 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fleetlite.agent.profiler import profile_model, profile_model_isolated
from fleetlite.sdk.runtime.interpreter import load_model

MODELS_DIR = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "models"
WARMUP_RUNS = 100


def bare_loop(path: Path, runs: int, threads: int) -> dict[str, float]:
    """p50/p99 of individually timed invokes and the mean of an untimed loop, in microseconds."""
    model = load_model(path, num_threads=threads)
    interp = model.interpreter
    for spec in model.inputs:
        interp.set_tensor(spec.index, np.zeros(spec.shape, dtype=spec.numpy_dtype))
    invoke = interp.invoke
    clock = time.perf_counter_ns
    for _ in range(WARMUP_RUNS):
        invoke()
    samples = []
    for _ in range(runs):
        start = clock()
        invoke()
        samples.append(clock() - start)
    start = clock()
    for _ in range(runs):
        invoke()
    untimed = (clock() - start) / runs
    p50, p99 = np.percentile(np.asarray(samples, dtype=np.float64), [50, 99]) / 1e3
    return {"p50": float(p50), "p99": float(p99), "untimed_mean": untimed / 1e3}


def profiler_run(
    path: Path, runs: int, threads: int, *, isolated: bool = False,
    sample_interval_s: float | None = None,
) -> dict[str, float]:
    options: dict[str, Any] = {
        "memory_sample_interval_s": sample_interval_s,
        "num_threads": threads,
        "warmup_runs": WARMUP_RUNS,
        "warmup_min_seconds": 0.0,
        "min_runs": runs,
        "max_runs": runs,
        "min_seconds": 0.0,
    }
    record = (profile_model_isolated if isolated else profile_model)(path, **options)
    steady = record.timings.steady
    return {"p50": steady.p50_ms * 1e3, "p99": steady.p99_ms * 1e3}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", type=Path,
                        help=f"model files (default: every .tflite in {MODELS_DIR})")
    parser.add_argument("--runs", type=int, default=5000, help="timed runs per round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per model")
    parser.add_argument("--threads", type=int, default=1, help="interpreter threads")
    args = parser.parse_args(argv)
    models = args.models or sorted(MODELS_DIR.glob("*.tflite"))
    if not models:
        print(f"no models in {MODELS_DIR}; build them with python -m fleetlite.tools.build_models",
              file=sys.stderr)
        return 1

    print(f"profiler p50 vs bare invoke() loop: {args.runs} runs x {args.rounds} rounds, "
          f"{args.threads} thread(s); microseconds, median over rounds")
    header = (f"{'model':<26}{'profiler p50':>13}{'bare p50':>10}{'ratio':>7}"
              f"{'profiler p99':>14}{'bare p99':>10}{'p99 @1ms':>10}{'untimed mean':>14}"
              f"{'isolated p50':>14}")
    print(header)
    print("-" * len(header))
    for path in models:
        prof: list[dict[str, float]] = []
        bare: list[dict[str, float]] = []
        fine: list[dict[str, float]] = []
        for _ in range(args.rounds):
            prof.append(profiler_run(path, args.runs, args.threads))
            bare.append(bare_loop(path, args.runs, args.threads))
            fine.append(profiler_run(path, args.runs, args.threads, sample_interval_s=0.001))
        isolated = profiler_run(path, args.runs, args.threads, isolated=True)

        def median(rows: list[dict[str, float]], key: str) -> float:
            return statistics.median(row[key] for row in rows)

        p50, b50 = median(prof, "p50"), median(bare, "p50")
        print(f"{path.stem:<26}{p50:>13.3f}{b50:>10.3f}{p50 / b50:>7.3f}"
              f"{median(prof, 'p99'):>14.3f}{median(bare, 'p99'):>10.3f}"
              f"{median(fine, 'p99'):>10.3f}{median(bare, 'untimed_mean'):>14.3f}"
              f"{isolated['p50']:>14.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
