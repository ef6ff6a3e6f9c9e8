"""Load and run a model in a child process, so a crashing interpreter cannot take the agent (or
the operator's release build) down.

tflite-runtime can die with a segmentation fault on a truncated or hostile model; Python cannot
catch that. Every model that has not yet been checked is therefore first loaded here, in
``python -m fleetlite.sdk.runtime.isolated``, and only a model that loads and runs there is loaded
in the agent's own process. The child reads one JSON request on stdin and writes one JSON reply.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fleetlite.sdk.runtime.child_process import ChildFailures, run_json_child
from fleetlite.sdk.runtime.errors import InvalidModelError, ModelRuntimeError

DEFAULT_TIMEOUT_S = 60.0
_FAILURES = ChildFailures(
    timed_out="{origin}: the isolated model check did not finish within {timeout:g} s; "
    "the model is treated as broken",
    crashed="{origin}: the TFLite interpreter crashed ({signal}) while loading or running the "
    "model in an isolated process; the file is corrupt or hostile and was not loaded by the agent",
    failed="{origin}: isolated check failed",
    error=InvalidModelError,
)


@dataclass(frozen=True)
class ModelCheck:
    """What the isolated check learnt about a model that loaded and ran."""

    description: dict[str, Any]
    load_ms: float
    first_inference_ms: float


def check_model(
    path: str | Path,
    *,
    timeout: float = DEFAULT_TIMEOUT_S,
    num_threads: int = 1,
    backend: str | None = None,
) -> ModelCheck:
    """Load ``path`` and run it once on zero inputs in a subprocess.

    Raises :class:`~fleetlite.sdk.runtime.errors.ModelCrashedError` if the child dies (signal) or
    hangs past ``timeout``, and :class:`InvalidModelError` (or a subclass) if the runtime refuses
    the model.
    """
    return _check({"model": str(path), "num_threads": num_threads, "backend": backend},
                  timeout)


def check_language_model(
    path: str | Path,
    *,
    timeout: float = DEFAULT_TIMEOUT_S,
    num_threads: int = 1,
    backend: str | None = None,
) -> ModelCheck:
    """Like :func:`check_model` for a generative LM: load it as the generation engine does and
    generate one token from token id 0, in a subprocess. ``first_inference_ms`` is that
    token's time (prefill and one decode step)."""
    return _check({"model": str(path), "num_threads": num_threads, "backend": backend,
                   "lm": True}, timeout)


def _check(request: dict[str, Any], timeout: float) -> ModelCheck:
    reply = run_json_child(
        [sys.executable, "-m", "fleetlite.sdk.runtime.isolated"],
        request,
        timeout=timeout,
        origin=str(request["model"]),
        failures=_FAILURES,
    )
    return ModelCheck(
        description=reply["description"],
        load_ms=float(reply["load_ms"]),
        first_inference_ms=float(reply["first_inference_ms"]),
    )


def _zero_inputs(model: Any) -> dict[str, Any]:
    return {spec.name: np.zeros(spec.shape, dtype=spec.numpy_dtype) for spec in model.inputs}


def _child_main() -> int:
    from fleetlite.sdk.runtime.interpreter import load_model

    request = json.loads(sys.stdin.read())
    if request.get("lm"):
        return _child_language_model(request)
    try:
        started = time.perf_counter()
        model = load_model(
            request["model"], num_threads=request.get("num_threads"), backend=request.get("backend")
        )
        loaded = time.perf_counter()
        model.run(_zero_inputs(model))
        ran = time.perf_counter()
    except ModelRuntimeError as exc:
        json.dump({"ok": False, "error": str(exc)}, sys.stdout)
        return 1
    json.dump(
        {
            "ok": True,
            "description": model.describe(),
            "load_ms": (loaded - started) * 1e3,
            "first_inference_ms": (ran - loaded) * 1e3,
        },
        sys.stdout,
    )
    return 0


def _child_language_model(request: dict[str, Any]) -> int:
    from fleetlite.sdk.errors import FleetLiteError
    from fleetlite.sdk.runtime.lm_engine import GenerateParams, LmEngine

    try:
        started = time.perf_counter()
        engine = LmEngine(request["model"], num_threads=request.get("num_threads") or 1,
                          backend=request.get("backend"))
        loaded = time.perf_counter()
        with engine.generate([0], GenerateParams(max_tokens=1)) as generation:
            list(generation)
        ran = time.perf_counter()
    except FleetLiteError as exc:
        json.dump({"ok": False, "error": str(exc)}, sys.stdout)
        return 1
    json.dump({"ok": True, "description": {"layout": vars(engine.layout)},
               "load_ms": (loaded - started) * 1e3, "first_inference_ms": (ran - loaded) * 1e3},
              sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(_child_main())
