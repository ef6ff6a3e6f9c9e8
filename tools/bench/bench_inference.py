"""What serving costs on top of the bare interpreter, and how much memory the agent takes.

``python -m fleetlite.tools.bench.bench_inference [--model PATH] [--runs N]`` measures, in one run
on one model: the raw interpreter loop (set_tensor + invoke + get_tensor, and invoke alone),
in-process :meth:`ModelService.infer`, and the local socket API called from another process (as a
local application would); p50 and p99 of each and their ratios to the raw loop. Then the resident
memory of an agent-like process, each in a fresh subprocess: bare Python, the agent's imports with
no model, and with the model loaded; and what each of the agent's dependencies adds to its imports.
Prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import numpy.typing as npt

from fleetlite.agent.local_api import LocalApiServer
from fleetlite.agent.model_service import ModelService
from fleetlite.sdk.runtime.interpreter import Model, load_model

REPO = Path(__file__).resolve().parents[2]
DEFAULT_MODEL = REPO / "tests" / "fixtures" / "models" / "intent_classifier.tflite"
MODEL_NAME = "bench"

_CLIENT_SCRIPT = """
import json, sys, time
import numpy as np
from fleetlite.sdk.local_client import LocalClient

socket_path, inputs_file = sys.argv[1], sys.argv[2]
runs, warmup = int(sys.argv[3]), int(sys.argv[4])
with np.load(inputs_file) as data:
    inputs = {name: data[name] for name in data.files}
with LocalClient(socket_path) as client:
    for _ in range(warmup):
        client.infer("bench", inputs)
    times = []
    for _ in range(runs):
        start = time.perf_counter_ns()
        client.infer("bench", inputs)
        times.append(time.perf_counter_ns() - start)
print(json.dumps(times))
"""

_RSS_SCRIPT = """
import sys
import psutil

stage = sys.argv[1]
if stage != "python":
    import fleetlite.agent.daemon  # everything the agent imports when it starts
    import fleetlite.agent.local_api
    from fleetlite.sdk.runtime.interpreter import select_backend
    select_backend()
if stage == "model":
    import numpy as np
    from fleetlite.agent.model_service import ModelService
    service = ModelService()
    active = service.activate("bench", sys.argv[2], num_threads=int(sys.argv[3]))
    service.infer("bench", [np.zeros(s.shape, s.numpy_dtype) for s in active.model.inputs])
print(psutil.Process().memory_info().rss)
"""

# Each step adds what it imports on top of the steps before it, in the order the agent needs them.
_BREAKDOWN_STEPS = (
    ("numpy", "import numpy"),
    ("the TFLite runtime",
     "from fleetlite.sdk.runtime.interpreter import select_backend; select_backend()"),
    ("paho-mqtt (with ssl)", "import paho.mqtt.client"),
    ("PyYAML", "import yaml"),
    ("cryptography (Ed25519 signature checks)",
     "import cryptography.hazmat.primitives.asymmetric.ed25519, "
     "cryptography.hazmat.primitives.serialization"),
    ("fleetlite's agent modules and the stdlib they use",
     "import fleetlite.agent.daemon, fleetlite.agent.local_api"),
)

_BREAKDOWN_SCRIPT = """
import json, sys
import psutil
process = psutil.Process()
sizes = [process.memory_info().rss]
for code in json.loads(sys.argv[1]):
    exec(code)
    sizes.append(process.memory_info().rss)
print(json.dumps(sizes))
"""


def rss_breakdown() -> list[tuple[str, float]]:
    """Each agent dependency's share of the agent's import-time RSS, in MiB, in a fresh process."""
    proc = subprocess.run(
        [sys.executable, "-c", _BREAKDOWN_SCRIPT, json.dumps([c for _, c in _BREAKDOWN_STEPS])],
        capture_output=True, text=True, check=True,
    )
    sizes = json.loads(proc.stdout.strip().splitlines()[-1])
    labels = ["python + psutil", *(label for label, _ in _BREAKDOWN_STEPS)]
    return [(label, (after - before) / 2**20)
            for label, before, after in zip(labels, [0, *sizes], sizes)]


def sample_inputs(model: Model, seed: int = 0) -> dict[str, npt.NDArray[Any]]:
    """Deterministic valid inputs: small non-negative integers (token ids) or normal floats."""
    rng = np.random.default_rng(seed)
    inputs: dict[str, npt.NDArray[Any]] = {}
    for spec in model.inputs:
        if np.issubdtype(spec.numpy_dtype, np.integer):
            inputs[spec.name] = rng.integers(0, 100, spec.shape).astype(spec.numpy_dtype)
        else:
            inputs[spec.name] = rng.normal(size=spec.shape).astype(spec.numpy_dtype)
    return inputs


def time_loop(body: Callable[[], object], runs: int, warmup: int) -> npt.NDArray[np.float64]:
    """Latencies of ``runs`` calls of ``body`` in ms, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        body()
    times = np.empty(runs, dtype=np.float64)
    clock = time.perf_counter_ns
    for i in range(runs):
        start = clock()
        body()
        times[i] = clock() - start
    result: npt.NDArray[np.float64] = times / 1e6
    return result


def raw_latencies(
    model: Model, inputs: dict[str, npt.NDArray[Any]], runs: int, warmup: int
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """The bare interpreter: set_tensor + invoke + get_tensor, and invoke alone."""
    interp = model.interpreter
    feeds = [(spec.index, inputs[spec.name]) for spec in model.inputs]
    fetches = [spec.index for spec in model.outputs]

    def full() -> None:
        for index, array in feeds:
            interp.set_tensor(index, array)
        interp.invoke()
        for index in fetches:
            interp.get_tensor(index)

    full_ms = time_loop(full, runs, warmup)
    invoke_ms = time_loop(interp.invoke, runs, warmup)
    return full_ms, invoke_ms


def socket_latencies(
    service: ModelService, inputs: dict[str, npt.NDArray[Any]], runs: int, warmup: int
) -> npt.NDArray[np.float64]:
    """The local socket API, called from a separate client process."""
    with tempfile.TemporaryDirectory(prefix="fleetlite-bench-") as tmp:
        socket_path = Path(tmp) / "agent.sock"
        inputs_file = Path(tmp) / "inputs.npz"
        np.savez(inputs_file, **inputs)
        with LocalApiServer(socket_path, service):
            proc = subprocess.run(
                [sys.executable, "-c", _CLIENT_SCRIPT, str(socket_path), str(inputs_file),
                 str(runs), str(warmup)],
                capture_output=True, text=True, check=True,
            )
    return np.asarray(json.loads(proc.stdout), dtype=np.float64) / 1e6


def rss_mib(stage: str, model: Path, threads: int) -> float:
    """Resident memory of a fresh process at ``stage``: python, agent (no model) or model."""
    proc = subprocess.run(
        [sys.executable, "-c", _RSS_SCRIPT, stage, str(model), str(threads)],
        capture_output=True, text=True, check=True,
    )
    return int(proc.stdout.strip().splitlines()[-1]) / 2**20


def latency_table(rows: Sequence[tuple[str, npt.NDArray[np.float64]]]) -> str:
    base = rows[0][1]
    base_p50, base_p99 = np.percentile(base, 50), np.percentile(base, 99)
    lines = [
        "| path | p50 ms | p99 ms | p50 vs raw | p99 vs raw |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for label, ms in rows:
        p50, p99 = np.percentile(ms, 50), np.percentile(ms, 99)
        lines.append(
            f"| {label} | {p50:.4f} | {p99:.4f} | {p50 / base_p50:.2f}x | {p99 / base_p99:.2f}x |"
        )
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fleetlite.tools.bench.bench_inference", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="a .tflite file")
    parser.add_argument("--runs", type=int, default=2000, help="timed calls per path")
    parser.add_argument("--warmup", type=int, default=200, help="untimed calls first")
    parser.add_argument("--threads", type=int, default=1, help="interpreter threads")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.warmup < 0:
        parser.error("--runs must be >= 1 and --warmup >= 0")

    model = load_model(args.model, num_threads=args.threads)
    inputs = sample_inputs(model)
    full_ms, invoke_ms = raw_latencies(model, inputs, args.runs, args.warmup)
    service = ModelService()
    service.activate(MODEL_NAME, args.model, num_threads=args.threads)
    service_ms = time_loop(lambda: service.infer(MODEL_NAME, inputs), args.runs, args.warmup)
    socket_ms = socket_latencies(service, inputs, args.runs, args.warmup)

    print(f"# Inference paths: {args.model.name}, {args.runs} runs, {args.threads} thread(s), "
          f"{model.backend.name} {model.backend.version}\n")
    print(latency_table([
        ("raw: set_tensor + invoke + get_tensor", full_ms),
        ("raw: invoke only", invoke_ms),
        ("ModelService.infer (in-process)", service_ms),
        ("local socket API (client process)", socket_ms),
    ]))
    print("\n# Agent memory (RSS, fresh process each)\n")
    print("| process | RSS MiB |\n| --- | ---: |")
    for label, stage in (
        ("python + psutil only", "python"),
        ("agent imports, no model", "agent"),
        (f"agent + {args.model.name} loaded and run once", "model"),
    ):
        print(f"| {label} | {rss_mib(stage, args.model, args.threads):.1f} |")
    print("\n# What the agent's imports are made of (RSS added by each step, one fresh process)\n")
    print("| step | + MiB | total MiB |\n| --- | ---: | ---: |")
    total = 0.0
    for label, added in rss_breakdown():
        total += added
        print(f"| {label} | {added:.1f} | {total:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
