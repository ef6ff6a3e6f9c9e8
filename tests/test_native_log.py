"""The runtime's "INFO: Created TensorFlow Lite XNNPACK delegate for CPU." line stays off the
user's terminal (issue 12), while anything else written to stderr during a model load, warnings
and errors included, still reaches it (sdk/runtime/native_log.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from fleetlite.sdk.runtime.interpreter import load_model, select_backend
from fleetlite.sdk.runtime.native_log import runtime_log_filtered

INFO = "INFO: Created TensorFlow Lite XNNPACK delegate for CPU."


def test_the_runtime_info_line_is_dropped_and_everything_else_kept(
        capfd: pytest.CaptureFixture[str]) -> None:
    with runtime_log_filtered():
        os.write(2, f"{INFO}\nWARNING: kept 1\n".encode())
        os.write(2, b"ERROR: kept 2\n")
    captured = capfd.readouterr()
    assert captured.err == "WARNING: kept 1\nERROR: kept 2\n"


def test_stderr_is_restored_after_loads_in_several_threads(models_dir: Path) -> None:
    before = os.fstat(2)
    errors: list[BaseException] = []

    def load() -> None:
        try:
            for _ in range(5):
                load_model(models_dir / "intent_classifier.tflite")
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=load) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    after = os.fstat(2)
    assert (after.st_dev, after.st_ino) == (before.st_dev, before.st_ino)


def test_agent_commands_do_not_print_it(models_dir: Path) -> None:
    model = str(models_dir / "intent_classifier.tflite")
    backend = select_backend().name
    module = "ai_edge_litert" if backend == "ai-edge-litert" else "tflite_runtime"
    # the runtime does print it when loaded directly: the check below can fail
    raw = subprocess.run(
        [sys.executable, "-c", f"from {module}.interpreter import Interpreter; "
         f"i = Interpreter(model_path={model!r}); i.allocate_tensors()"],
        capture_output=True, text=True, timeout=120, check=True)
    assert INFO in raw.stderr
    proc = subprocess.run(
        [sys.executable, "-m", "fleetlite.agent.cli", "profile", model, "--in-process",
         "--max-seconds", "1", "--json"],
        capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert INFO not in proc.stderr and INFO not in proc.stdout
