"""``fleetlite demo``: the project's models, built, checked and run in the real interpreter.

This is the first, smaller form of the demo: it builds the project-made models, checks each in an
isolated interpreter process, answers sample smart-home commands with the text intent classifier
and profiles it against every device class's budget. The full demo (signed rollout to running
agents) grows from this.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from fleetlite.agent.isolated import check_model
from fleetlite.agent.runtime import load_model, select_backend
from fleetlite.sdk.device_class import load_device_classes
from fleetlite.sdk.text import Tokenizer
from fleetlite.tools.build_models import write_models
from fleetlite.tools.models import DEFAULT_SEED

SAMPLE_COMMANDS = (
    "turn off the kitchen lights",
    "set the thermostat to 21 degrees",
    "lock the front door",
    "play some jazz in the living room",
    "what's the weather tomorrow",
)


def run_demo(out: str | None = None) -> int:
    with tempfile.TemporaryDirectory(prefix="fleetlite-demo-") as tmp:
        outdir = Path(out) if out else Path(tmp)
        outdir.mkdir(parents=True, exist_ok=True)
        backend = select_backend()
        print(f"FleetLite demo — TFLite backend: {backend.name} {backend.version}\n")
        print(f"1. Building the project's models into {outdir} (numpy + flatbuffers, no TF)")
        write_models(outdir, DEFAULT_SEED)
        models = sorted(outdir.glob("*.tflite"))
        print("\n2. Checking each model in an isolated interpreter process")
        for path in models:
            result = check_model(path)
            ins = ", ".join(f"{s['name']}:{s['dtype']}{s['shape']}"
                            for s in result.description["inputs"])
            print(f"   {path.name:<32} {path.stat().st_size:>7} B  load {result.load_ms:6.1f} ms"
                  f"  inputs {ins}")
        print("\n3. Asking the text intent classifier (runs on the device, inputs never leave it)")
        tokenizer = Tokenizer.from_file(outdir / "intent_classifier.vocab.json")
        model = load_model(outdir / "intent_classifier.tflite")
        for text in SAMPLE_COMMANDS:
            probabilities = next(iter(model.run(tokenizer.encode(text)).values()))[0]
            best = int(probabilities.argmax())
            print(f"   {text!r:<40} -> {tokenizer.labels[best]:<16} "
                  f"({probabilities[best]:.0%})")
        print("\n4. Device classes and their budgets")
        print(f"   {'device class':<24} {'arch':<8} {'cores':>5} {'RAM MB':>7} "
              f"{'p95 ms':>7} {'peak MB':>8}")
        for name, device_class in sorted(load_device_classes().items()):
            hw, budget = device_class.hardware, device_class.budgets
            print(f"   {name:<24} {hw.arch:<8} {hw.cores:>5} {hw.ram_mb:>7} "
                  f"{budget.max_p95_latency_ms:>7g} {budget.max_peak_rss_mb:>8g}")
        print("\nDone. Next: `fleetlite-agent profile` on a model, and the agent guide in docs/.")
    return 0
