"""Building a release of a generative language model (used by
:func:`fleetlite.fleet.release_builder.build_release` when a model's signatures are
``prefill_<N>`` and ``decode``).

Before anything is signed, the model, its tokenizer and the generation metadata must agree
(vocabulary, token ids, cache shapes: :func:`fleetlite.sdk.generation.check_generation`), and the
model must load and generate in the *oldest* TFLite runtime its device classes use, in a child
process, so an op that runtime lacks is refused here with its name rather than on the devices.
The smoke vectors are each prompt's greedy tokens on the default variant; every variant must
reproduce them on this machine (the default exactly, others at ``min_token_agreement``).

It imports the model runtime (:mod:`fleetlite.sdk.runtime`) lazily, like the rest of the builder.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from fleetlite.sdk.device_class import find_device_class
from fleetlite.sdk.errors import BundleError, FleetLiteError
from fleetlite.sdk.generation import GenerationSpec, Sampling
from fleetlite.sdk.lm_smoke import LmSmokeVectors, judge
from fleetlite.sdk.manifest import TensorInfo, Tolerance

__all__ = [
    "DEFAULT_SMOKE_PROMPTS",
    "DEFAULT_SMOKE_TOKENS",
    "LmBuild",
    "RUNTIME_AGE",
    "build_lm_parts",
    "is_lm_file",
    "oldest_runtime",
]

DEFAULT_SMOKE_PROMPTS = ("hello", "what can you do", "turn on the lights")
DEFAULT_SMOKE_TOKENS = 16
DEFAULT_VARIANT_AGREEMENT = 0.9
# Runtimes from oldest to newest: a model that loads in one loads in the later ones.
RUNTIME_AGE = ("tflite-runtime", "ai-edge-litert")


@dataclass(frozen=True)
class LmBuild:
    """What the builder needs for the LM's files and manifest."""

    spec: GenerationSpec
    tokenizer_bytes: bytes
    variants: tuple[tuple[tuple[TensorInfo, ...], tuple[TensorInfo, ...], LmSmokeVectors], ...]
    runtime_checked: str


def is_lm_file(path: Path) -> bool:
    """Whether a ``.tflite`` file has the LM signatures, read from its flatbuffer without an
    interpreter (so a model this machine's runtime cannot load is still recognised)."""
    from fleetlite.sdk.runtime.lm_detect import is_language_model

    return is_language_model(path)


def oldest_runtime(device_classes: Sequence[str]) -> str:
    """The oldest TFLite runtime any of ``device_classes`` prefers (see :data:`RUNTIME_AGE`)."""
    preferred = {find_device_class(name).runtime.prefer for name in device_classes}
    known = [r for r in RUNTIME_AGE if r in preferred]
    return known[0] if known else RUNTIME_AGE[-1]


def _installed(runtime: str) -> bool:
    from fleetlite.sdk.runtime.interpreter import select_backend

    try:
        select_backend(runtime)
    except FleetLiteError:
        return False
    return True


def _check_in_runtime(paths: Sequence[Path], device_classes: Sequence[str]) -> str:
    """Load and generate with each model in a child process of the oldest runtime its classes
    use; returns the runtime used. When that runtime is not installed here, an older installed
    one may stand in (what loads there loads in the newer one), but a failure there proves
    nothing about the devices' runtime: then the message asks for that runtime."""
    from fleetlite.sdk.runtime.isolated import check_language_model

    wanted = oldest_runtime(device_classes)
    targets = ", ".join(device_classes)
    package = "ai-edge-litert" if wanted == "ai-edge-litert" else "tflite-runtime"
    older = [r for r in RUNTIME_AGE[: RUNTIME_AGE.index(wanted)] if _installed(r)]
    runtime = wanted if _installed(wanted) else (older[-1] if older else None)
    if runtime is None:
        raise BundleError(
            f"the device classes {targets} run {wanted}, which is not installed here: install "
            f"it to check the model loads there before signing (pip install {package})")
    for path in paths:
        try:
            check_language_model(path, backend=runtime)
        except FleetLiteError as exc:
            if runtime != wanted:
                raise BundleError(
                    f"{path} does not run in {runtime}, the runtime installed here ({exc}); "
                    f"the device classes {targets} run {wanted}: install it (pip install "
                    f"{package}) to check the model in the devices' runtime") from None
            raise BundleError(
                f"{path} does not run in {runtime}, the TFLite runtime of {targets}: {exc}. "
                "Convert it for that runtime (for tflite-runtime 2.14: no "
                "STABLEHLO_COMPOSITE, FULLY_CONNECTED at most version 9) or target device "
                "classes with a newer runtime") from None
    return runtime


def _signature_tensors(engine: Any) -> tuple[tuple[TensorInfo, ...], tuple[TensorInfo, ...]]:
    """The decode signature's inputs and outputs, as the manifest describes a model."""
    inputs, outputs = engine.signatures["decode"]
    return (tuple(TensorInfo(n, t.shape, t.dtype) for n, t in sorted(inputs.items())),
            tuple(TensorInfo(n, t.shape, t.dtype) for n, t in sorted(outputs.items())))


def build_lm_parts(
    models: Sequence[Path],
    tokenizer: Path,
    device_classes: Sequence[str],
    *,
    prompt_template: str = "{prompt}",
    stop_ids: Sequence[int] = (),
    stop_strings: Sequence[str] = (),
    sampling: Optional[Sampling] = None,
    smoke_prompts: Sequence[str] = DEFAULT_SMOKE_PROMPTS,
    smoke_tokens: int = DEFAULT_SMOKE_TOKENS,
    min_token_agreement: float = DEFAULT_VARIANT_AGREEMENT,
    tolerance: Optional[Tolerance] = None,
) -> LmBuild:
    """Check an LM (``models[0]`` the default variant, the rest its variants) with its tokenizer
    and compute its generation metadata and smoke vectors; :class:`BundleError` says what
    disagrees and how to fix it."""
    from fleetlite.sdk.runtime.lm_engine import LmEngine
    from fleetlite.sdk.runtime.lm_files import spec_for_files
    from fleetlite.sdk.runtime.lm_smoke_runner import make_vectors, run_vectors

    tolerance = tolerance or Tolerance()
    runtime = _check_in_runtime(models, device_classes)
    try:
        spec, tok = spec_for_files(models[0], tokenizer, prompt_template=prompt_template,
                                   stop_ids=stop_ids, stop_strings=stop_strings,
                                   sampling=sampling)
        engines = [LmEngine(path, spec=spec, tokenizer=tok) for path in models]
    except FleetLiteError as exc:
        reason = getattr(exc, "reason", "")
        raise BundleError(f"{exc}" + (f" [{reason}]" if reason else "")) from None
    prompts = [engines[0].encode_prompt(text) for text in smoke_prompts]
    reference = make_vectors(engines[0], prompts, smoke_tokens, 1.0)
    variants = []
    for index, (path, engine) in enumerate(zip(models, engines)):
        vectors = reference if index == 0 else LmSmokeVectors(reference.cases,
                                                              min_token_agreement)
        problems = judge(vectors, run_vectors(engine, vectors), tolerance)
        if problems:
            raise BundleError(
                f"{path} does not reproduce its own smoke vectors on this machine: "
                f"{problems[0]}" + ("" if index == 0 else "; lower --min-token-agreement if "
                                    "this variant is meant to differ that much"))
        inputs, outputs = _signature_tensors(engine)
        variants.append((inputs, outputs, vectors))
    return LmBuild(spec, tokenizer.read_bytes(), tuple(variants), runtime)
