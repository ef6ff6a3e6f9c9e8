"""What shadow evaluation costs the active model's latency.

``python -m fleetlite.tools.bench.bench_shadow [--requests N] [--rounds R] [--gap-ms G]
[--generations K]`` serves a model, sends it live requests one at a time with ``G`` ms between
them (an open-ish loop, as a gateway's traffic: back-to-back requests would leave the shadow
worker no time), and times each request as its caller sees it (the observer's bookkeeping
included). Four phases, interleaved over ``R`` rounds so drift on a shared machine hits each
alike: the active model alone (the baseline of the same run), shadowed at the default settings
(20 % of requests, 25 % CPU budget, back-off at 1.25x p95), at 100 % sampling with the default
budget, and at 100 % sampling with neither budget nor back-off (what the budget protects
against). Candidates are identical copies of the active model (the candidate's cost is the
active model's). Models: the intent classifier (~25 µs), a 512x8 MLP (~0.6 ms), and the
project's language model (per decode step, greedy generations). First, the observer's own cost:
back-to-back requests with and without a runner that samples nothing. Prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import numpy.typing as npt

from fleetlite.agent.lm_service import LmService
from fleetlite.agent.model_service import ModelService
from fleetlite.agent.shadow_runner import LmShadow, ModelShadow, ShadowConfig, ShadowIdentity
from fleetlite.sdk.generation import GenerationSpec
from fleetlite.sdk.runtime.interpreter import Model
from fleetlite.sdk.runtime.lm_engine import GenerateParams, LmEngine
from fleetlite.sdk.runtime.tokenizer import SentencePieceTokenizer
from fleetlite.sdk.shadow import ShadowReport
from fleetlite.tools.models import heavy_mlp

REPO = Path(__file__).resolve().parents[2]
INTENT = REPO / "tests" / "fixtures" / "models" / "intent_classifier.tflite"
LM_DIR = REPO / "fleet" / "lm"
IDENTITY = ShadowIdentity("bench", "ab" * 32, "bench", 2, 1)
PROMPTS = ("turn off the kitchen lights", "set the bedroom heating to 20 degrees",
           "is the front door locked", "dim the living room lights")

#: (label, settings or None for the active model alone)
PHASES: tuple[tuple[str, Optional[ShadowConfig]], ...] = (
    ("alone (baseline)", None),
    ("shadowed, defaults (20 %, budget 25 %)", ShadowConfig()),
    ("shadowed, 100 % sampling, budget 25 %", ShadowConfig(sample_rate=1.0)),
    ("shadowed, 100 %, no budget, no back-off",
     ShadowConfig(sample_rate=1.0, cpu_budget=1.0, burst_s=60.0, p95_budget_ratio=1000.0,
                  queue_size=64)),
)


@dataclass
class Phase:
    """Latencies of one phase over every round, and the shadow runner's counts."""

    latencies: list[float] = field(default_factory=list)
    requests: int = 0
    samples: int = 0
    compared: int = 0
    agreed: int = 0
    skipped_budget: int = 0
    dropped: int = 0
    backoffs: int = 0

    def add(self, latencies: Sequence[float], report: Optional[ShadowReport]) -> None:
        self.latencies.extend(latencies)
        if report is not None:
            self.requests += report.requests
            self.samples += report.samples
            self.compared += report.compared
            self.agreed += report.agreed
            self.skipped_budget += report.skipped_budget
            self.dropped += report.dropped_queue_full
            self.backoffs += report.backoffs


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def classifier_round(service: ModelService, candidate: Model, inputs: npt.NDArray[Any],
                     config: Optional[ShadowConfig], requests: int, gap_s: float
                     ) -> tuple[list[float], Optional[ShadowReport]]:
    runner = None
    if config is not None:
        runner = ModelShadow(service, "m", candidate, kind="classifier", identity=IDENTITY,
                             config=config)
        runner.start()
    clock = time.perf_counter
    latencies = []
    try:
        for _ in range(requests):
            start = clock()
            service.infer("m", inputs)
            latencies.append((clock() - start) * 1000.0)
            time.sleep(gap_s)
    finally:
        if runner is not None:
            runner.wait_idle()
            runner.stop()
    return latencies, runner.report() if runner is not None else None


def lm_round(service: LmService, candidate: LmEngine, config: Optional[ShadowConfig],
             generations: int, gap_s: float) -> tuple[list[float], Optional[ShadowReport]]:
    runner = None
    if config is not None:
        runner = LmShadow(service, candidate, identity=IDENTITY, config=config)
        runner.start()
    params = GenerateParams(temperature=0.0, max_tokens=24)
    steps: list[float] = []
    try:
        for i in range(generations):
            prompt = service.engine.encode_prompt(PROMPTS[i % len(PROMPTS)])
            with service.generate(prompt, params) as generation:
                for _ in generation:
                    pass
                steps.extend(generation.stats.decode_ms)
            time.sleep(gap_s)
    finally:
        if runner is not None:
            runner.wait_idle()
            runner.stop()
    return steps, runner.report() if runner is not None else None


def run_phases(one_round: Callable[[Optional[ShadowConfig]],
                                   tuple[list[float], Optional[ShadowReport]]],
               rounds: int) -> list[Phase]:
    phases = [Phase() for _ in PHASES]
    for round_index in range(rounds):
        for phase, (_, config) in zip(phases, PHASES):
            # each round draws other requests: the same seed would sample the same positions
            seeded = None if config is None else replace(config, seed=round_index)
            phase.add(*one_round(seeded))
    return phases


def table(title: str, unit: str, phases: Sequence[Phase]) -> str:
    base50 = percentile(phases[0].latencies, 50)
    base95 = percentile(phases[0].latencies, 95)
    lines = [f"### {title}", "",
             f"| phase | {unit} | p50 ms | p95 ms | p99 ms | p50 vs alone | p95 vs alone | "
             "samples | agreement | skipped (budget) | dropped (queue) | back-offs |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for (label, config), phase in zip(PHASES, phases):
        p50, p95 = percentile(phase.latencies, 50), percentile(phase.latencies, 95)
        p99 = percentile(phase.latencies, 99)
        shadow = (f"{phase.samples} | {phase.agreed / phase.compared:.1%} | "
                  f"{phase.skipped_budget} | {phase.dropped} | {phase.backoffs}"
                  if config is not None and phase.compared else
                  ("0 | - | " f"{phase.skipped_budget} | {phase.dropped} | {phase.backoffs}"
                   if config is not None else "- | - | - | - | -"))
        lines.append(f"| {label} | {len(phase.latencies)} | {p50:.4f} | {p95:.4f} | {p99:.4f} | "
                     f"{p50 / base50:.2f}x | {p95 / base95:.2f}x | {shadow} |")
    return "\n".join(lines)


def bench_classifier(label: str, content: bytes, inputs: npt.NDArray[Any], requests: int,
                     rounds: int, gap_s: float) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "active.tflite"
        path.write_bytes(content)
        service = ModelService()
        service.activate("m", path, version=1)
        candidate = Model(content)
        for _ in range(200):  # warm both
            service.infer("m", inputs)
            candidate.run(inputs)
        phases = run_phases(
            lambda config: classifier_round(service, candidate, inputs, config, requests,
                                            gap_s), rounds)
    return table(f"{label}: {requests * rounds} requests per phase, {gap_s * 1000:g} ms apart",
                 "requests", phases)


def bookkeeping(content: bytes, inputs: npt.NDArray[Any], requests: int, rounds: int) -> str:
    """The observer's own cost per request: back-to-back requests, a runner that samples none."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "active.tflite"
        path.write_bytes(content)
        service = ModelService()
        service.activate("m", path, version=1)
        clock = time.perf_counter
        alone: list[float] = []
        observed: list[float] = []
        for round_index in range(rounds):
            for watched, into in ((False, alone), (True, observed)):
                runner = ModelShadow(service, "m", Model(content), kind="classifier",
                                     identity=IDENTITY,
                                     config=ShadowConfig(sample_rate=1e-12, seed=round_index))
                if watched:
                    runner.start()
                for _ in range(requests):
                    start = clock()
                    service.infer("m", inputs)
                    into.append((clock() - start) * 1000.0)
                runner.stop()
    a50, o50 = percentile(alone, 50), percentile(observed, 50)
    a95, o95 = percentile(alone, 95), percentile(observed, 95)
    return "\n".join([
        f"### Observer bookkeeping: intent_classifier, {requests * rounds} back-to-back requests",
        "", "| path | p50 ms | p95 ms |", "| --- | ---: | ---: |",
        f"| alone | {a50:.4f} | {a95:.4f} |",
        f"| observed, nothing sampled | {o50:.4f} | {o95:.4f} |",
        f"| difference | {o50 - a50:+.4f} | {o95 - a95:+.4f} |"])


def load_lm(name: str) -> LmEngine:
    """The project's LM ``name`` from fleet/lm/, with the spec its reference file records."""
    ref = json.loads((LM_DIR / f"{name}.reference.json").read_text())
    model, tok = ref["model"], ref["tokenizer"]
    spec = GenerationSpec(tokenizer=tok["file"], tokenizer_kind="sentencepiece",
                          prompt_template=ref["prompt_template"], bos_id=tok["bos_id"],
                          stop_ids=tuple(tok["stop_ids"]), context_length=model["context_length"],
                          cache_layout=model["cache_layout"], num_layers=model["num_layers"],
                          vocab_size=tok["vocab_size"],
                          prefill_lengths=tuple(model["prefill_lengths"]))
    return LmEngine(LM_DIR / model["file"], spec=spec,
                    tokenizer=SentencePieceTokenizer(LM_DIR / tok["file"]))


def bench_lm(generations: int, rounds: int, gap_s: float) -> str:
    service, candidate = LmService(load_lm("home_lm")), load_lm("home_lm")
    for prompt in PROMPTS:  # warm both
        ids = service.engine.encode_prompt(prompt)
        list(service.generate(ids, GenerateParams(temperature=0.0, max_tokens=24)))
        list(candidate.greedy_logits(ids, 24))
    phases = run_phases(lambda config: lm_round(service, candidate, config, generations, gap_s),
                        rounds)
    return table(f"home_lm (float32, 2.2 MB): {generations * rounds} greedy generations per "
                 f"phase, {gap_s * 1000:g} ms apart; latency per decode step", "decode steps",
                 phases)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fleetlite.tools.bench.bench_shadow",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=500, help="requests per phase and round")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--gap-ms", type=float, default=1.0,
                        help="pause between a classifier's requests")
    parser.add_argument("--generations", type=int, default=16,
                        help="LM generations per phase and round (0: skip the LM)")
    args = parser.parse_args(argv)
    gap = args.gap_ms / 1000.0
    print(bookkeeping(INTENT.read_bytes(), np.arange(16, dtype=np.int32).reshape(1, 16) % 40,
                      args.requests, args.rounds))
    print()
    print(bench_classifier("intent_classifier (~25 µs)", INTENT.read_bytes(),
                           np.arange(16, dtype=np.int32).reshape(1, 16) % 40, args.requests,
                           args.rounds, gap))
    print()
    print(bench_classifier("heavy_mlp 512x8 (~0.6 ms)", heavy_mlp(size=512, layers=8).tflite,
                           np.ones((1, 512), dtype=np.float32), args.requests, args.rounds, gap))
    if args.generations:
        print()
        print(bench_lm(args.generations, args.rounds, 5 * gap))
    return 0


if __name__ == "__main__":
    sys.exit(main())
