"""What the generation engine costs on top of bare signature runners, and how much memory it takes.

``python -m fleetlite.tools.bench.bench_generate [--model PATH ...] [--runs N]`` measures, per model
in one run (default: tests/fixtures/lm/home_lm.tflite and its int8 variant): decode ms/token p50 of
:class:`~fleetlite.sdk.runtime.lm_engine.LmEngine` (the interval between tokens as its caller sees
it) against a bare signature-runner loop over the same model and the same tokens, and their ratio;
load time; time to first token cold (a freshly loaded engine) and warm; prefill and decode
tokens/s; and, in a fresh subprocess, peak RSS (VmHWM) with the model against the same process
without it, beside the model file size and the engine's memory estimate. Prints markdown tables;
asserts nothing (times depend on the machine and its load).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from fleetlite.sdk.runtime.interpreter import Array
from fleetlite.sdk.runtime.lm_engine import GenerateParams, LmEngine, causal_mask, plan_prefill

REPO = Path(__file__).resolve().parents[2]
LM = REPO / "tests" / "fixtures" / "lm"
DEFAULT_MODELS = (LM / "home_lm.tflite", LM / "home_lm_int8.tflite")

_RSS_SCRIPT = """
import sys
from fleetlite.sdk.runtime.lm_engine import GenerateParams, LmEngine
from fleetlite.sdk.runtime.interpreter import select_backend

select_backend()
model, prompt_tokens, new_tokens, threads = sys.argv[1], *map(int, sys.argv[2:5])
if model != "-":
    engine = LmEngine(model, num_threads=threads)
    prompt = [(7 * i) % engine.layout.vocab_size for i in range(prompt_tokens)]
    for _ in engine.generate(prompt, GenerateParams(max_tokens=new_tokens)):
        pass
status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
print(int(status["VmHWM"].split()[0]) * 1024)
"""


@dataclass
class Timings:
    """One generation: prefill and time to first token in ms, and the gaps between tokens."""

    prefill_ms: float
    ttft_ms: float
    token_gaps_ms: list[float]


def engine_run(engine: LmEngine, prompt: list[int], new_tokens: int) -> tuple[Timings, list[int]]:
    """Greedy ``new_tokens`` through the engine; gaps measured where its caller sees them."""
    generation = engine.generate(prompt, GenerateParams(max_tokens=new_tokens))
    clock = time.perf_counter
    tokens: list[int] = []
    gaps: list[float] = []
    last = clock()
    for token in generation:
        now = clock()
        if tokens:
            gaps.append((now - last) * 1000.0)
        tokens.append(token)
        last = now
    stats = generation.stats
    return Timings(stats.prefill_ms, stats.time_to_first_token_ms or 0.0, gaps), tokens


def bare_run(engine: LmEngine, runners: dict[str, Any], prompt: list[int],
             tokens: list[int]) -> Timings:
    """The same prompt and tokens through signature runners directly: the lower bound."""
    layout = engine.layout
    decode_inputs = runners["decode"].get_input_details()
    caches: dict[str, Array] = {name: np.zeros(d["shape"], np.float32)
                                for name, d in decode_inputs.items()
                                if name.startswith("kv_cache_")}
    mask = causal_mask(layout.context_length) if layout.has_mask else None
    clock = time.perf_counter
    started = clock()
    for step in plan_prefill(len(prompt) - 1, layout.prefill_lengths, layout.context_length):
        ids = np.zeros((1, step.size), np.int32)
        ids[0, : step.filled] = prompt[step.start : step.start + step.filled]
        feeds = {"tokens": ids,
                 "input_pos": np.arange(step.start, step.start + step.size, dtype=np.int32)}
        if mask is not None:
            rows = np.ascontiguousarray(mask[step.start : step.start + step.size])
            feeds["mask"] = rows.reshape(1, 1, step.size, -1)
        caches = runners[step.signature](**feeds, **caches)
        caches.pop("logits", None)
    prefill_ms = (clock() - started) * 1000.0
    gaps: list[float] = []
    ttft_ms = 0.0
    last = clock()
    for position, token in enumerate([prompt[-1], *tokens[:-1]], start=len(prompt) - 1):
        feeds = {"tokens": np.array([[token]], np.int32),
                 "input_pos": np.array([position], np.int32)}
        if mask is not None:
            feeds["mask"] = mask[position].reshape(1, 1, 1, -1)
        caches = runners["decode"](**feeds, **caches)
        int(np.argmax(caches.pop("logits")))
        now = clock()
        if position == len(prompt) - 1:
            ttft_ms = (now - started) * 1000.0
        else:
            gaps.append((now - last) * 1000.0)
        last = now
    return Timings(prefill_ms, ttft_ms, gaps)


def peak_rss_bytes(model: str, prompt_tokens: int, new_tokens: int, threads: int) -> int:
    """VmHWM of a fresh process that loads ``model`` (``-``: none) and generates once."""
    proc = subprocess.run(
        [sys.executable, "-c", _RSS_SCRIPT, model, str(prompt_tokens), str(new_tokens),
         str(threads)],
        capture_output=True, text=True, check=True,
    )
    return int(proc.stdout.strip().splitlines()[-1])


def p50(values: Sequence[float]) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), 50))


def bench_model(path: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Every figure of one model (see the module docstring)."""
    cold: list[float] = []
    loads: list[float] = []
    for _ in range(args.runs):
        started = time.perf_counter()
        fresh = LmEngine(path, num_threads=args.threads)
        loads.append((time.perf_counter() - started) * 1000.0)
        prompt = prompt_ids(fresh, args.prompt_tokens)
        cold.append(engine_run(fresh, prompt, 1)[0].ttft_ms)
        del fresh
    engine = LmEngine(path, num_threads=args.threads)
    prompt = prompt_ids(engine, args.prompt_tokens)
    new_tokens = min(args.new_tokens, engine.layout.context_length - len(prompt) + 1)
    bare_interpreter = engine.backend.interpreter_class(
        model_path=str(path), num_threads=args.threads
    )
    bare_interpreter.allocate_tensors()  # as the engine does: tflite-runtime's XNNPACK is here
    runners = {name: bare_interpreter.get_signature_runner(name)
               for name in bare_interpreter.get_signature_list()}
    # In blocks, each after an untimed warm-up: alternating two interpreters call by call slows
    # whichever runs second (their working sets evict each other), which would bias the ratio.
    tokens = engine_run(engine, prompt, new_tokens)[1]  # greedy: every run gives these tokens
    # A few ms each, so many runs: the median then resists the odd preemption of a busy machine.
    first_runs = [engine_run(engine, prompt, 1)[0] for _ in range(10 * args.runs)]
    engine_runs = [engine_run(engine, prompt, new_tokens)[0] for _ in range(args.runs)]
    bare_run(engine, runners, prompt, tokens)
    bare_first = [bare_run(engine, runners, prompt, tokens[:1]) for _ in range(10 * args.runs)]
    bare_runs = [bare_run(engine, runners, prompt, tokens) for _ in range(args.runs)]
    engine_gap = p50([g for run in engine_runs for g in run.token_gaps_ms])
    bare_gap = p50([g for run in bare_runs for g in run.token_gaps_ms])
    prefilled = len(prompt) - 1
    with_model = peak_rss_bytes(str(path), len(prompt), new_tokens, args.threads)
    without = peak_rss_bytes("-", 0, 0, args.threads)
    return {
        "model": path.name,
        "size_mib": path.stat().st_size / 2**20,
        "prompt_tokens": len(prompt),
        "new_tokens": new_tokens,
        "engine_ms": engine_gap,
        "bare_ms": bare_gap,
        "ratio": engine_gap / bare_gap,
        "load_ms": p50(loads),
        "ttft_cold_ms": p50(cold),
        "ttft_warm_ms": p50([run.ttft_ms for run in first_runs]),
        "bare_ttft_ms": p50([run.ttft_ms for run in bare_first]),
        "prefill_tps": prefilled / p50([run.prefill_ms for run in first_runs]) * 1000.0,
        "bare_prefill_tps": prefilled / p50([run.prefill_ms for run in bare_first]) * 1000.0,
        "decode_tps": 1000.0 / engine_gap,
        "peak_rss_mib": with_model / 2**20,
        "rss_over_imports_mib": (with_model - without) / 2**20,
        "estimate_mib": engine.memory_estimate / 2**20,
    }


def prompt_ids(engine: LmEngine, count: int) -> list[int]:
    """A fixed prompt of ``count`` ids (the same in every run and process)."""
    return [(7 * i) % engine.layout.vocab_size for i in range(count)]


def tables(results: Sequence[dict[str, Any]]) -> str:
    lines = [
        "| model | prompt + new | decode ms/token p50: engine | bare runners | ratio | "
        "decode tok/s | prefill tok/s (bare) | load ms | TTFT cold ms | TTFT warm ms (bare) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        lines.append(
            f"| {r['model']} | {r['prompt_tokens']} + {r['new_tokens']} | {r['engine_ms']:.3f} "
            f"| {r['bare_ms']:.3f} | {r['ratio']:.3f}x | {r['decode_tps']:.0f} "
            f"| {r['prefill_tps']:.0f} ({r['bare_prefill_tps']:.0f}) | {r['load_ms']:.1f} "
            f"| {r['ttft_cold_ms']:.2f} "
            f"| {r['ttft_warm_ms']:.2f} ({r['bare_ttft_ms']:.2f}) |"
        )
    lines += [
        "",
        "| model | file MiB | peak RSS MiB (VmHWM) | over the same process without it | "
        "engine estimate MiB |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        lines.append(
            f"| {r['model']} | {r['size_mib']:.2f} | {r['peak_rss_mib']:.1f} "
            f"| {r['rss_over_imports_mib']:.1f} | {r['estimate_mib']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fleetlite.tools.bench.bench_generate", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--model", type=Path, action="append",
                        help="a generative LM .tflite (repeatable; default: home_lm and its int8)")
    parser.add_argument("--runs", type=int, default=10, help="timed generations per model")
    parser.add_argument("--prompt-tokens", type=int, default=32, help="prompt length in tokens")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens generated per run")
    parser.add_argument("--threads", type=int, default=1, help="interpreter threads")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON too")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.prompt_tokens < 1 or args.new_tokens < 2:
        parser.error("--runs and --prompt-tokens must be >= 1, --new-tokens >= 2")
    models = args.model or list(DEFAULT_MODELS)
    results = [bench_model(path, args) for path in models]
    engine = LmEngine(models[0])
    print(f"# Generation: {args.runs} runs, {args.threads} thread(s), "
          f"{engine.backend.name} {engine.backend.version}, greedy, no stop ids\n")
    print(tables(results))
    if args.json:
        print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
