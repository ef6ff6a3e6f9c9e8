"""Building a signed release from ``.tflite`` files: describe each model's tensors, compute its
smoke vectors, write the manifest, sign it (the bundle format is :mod:`fleetlite.sdk.bundle`).

Building reads each model with the model runtime (:mod:`fleetlite.sdk.runtime`, after a
crash-isolated check) to describe its tensors and to compute the smoke vectors; a generative
language model is checked and described by :mod:`fleetlite.fleet.lm_release_builder`. The runtime
is imported lazily, so the CLI starts without it.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from fleetlite.fleet.delta_builder import BuiltDelta
from fleetlite.fleet.lm_release_builder import (
    DEFAULT_SMOKE_PROMPTS,
    DEFAULT_SMOKE_TOKENS,
    DEFAULT_VARIANT_AGREEMENT,
    build_lm_parts,
    is_lm_file,
)
from fleetlite.sdk.bundle import PathArg, ReleaseBundle
from fleetlite.sdk.durations import DEFAULT_EXPIRES_IN
from fleetlite.sdk.envelope import MANIFEST_PAYLOAD_TYPE, Envelope
from fleetlite.sdk.errors import BundleError, UnsafeNameError, UpdateRejected
from fleetlite.sdk.generation import Sampling
from fleetlite.sdk.keys import SigningKey
from fleetlite.sdk.manifest import (
    MODEL_NAME_RE,
    FileEntry,
    Manifest,
    ModelInfo,
    SmokeSpec,
    TensorInfo,
    Tolerance,
    Variant,
    check_file_name,
    file_entry,
    parse_manifest,
    sha256_hex,
)
from fleetlite.sdk.smoke import SmokeCase, SmokeVectors, Tensor, compare_outputs
from fleetlite.sdk.verify import DEFAULT_LIMITS, Limits
from fleetlite.sdk.version import __version__

__all__ = ["DEFAULT_SMOKE_CASES", "build_release", "smoke_inputs"]

Array = npt.NDArray[Any]

DEFAULT_SMOKE_CASES = 3
# Token ids for int32/int64 inputs stay in 0..7: valid for any vocabulary with 8+ entries.
TOKEN_RANGE = 8


def smoke_inputs(specs: Sequence[Any], case: int) -> list[Array]:
    """Deterministic inputs valid for each runtime ``TensorSpec``'s dtype (no RNG involved).

    Floats: a sine pattern in [-1, 1]; quantized integers: that pattern quantized with the
    tensor's scale and zero point; other integers (token ids): 0..7; bool: alternating.
    """
    from fleetlite.sdk.runtime.interpreter import quantize

    arrays = []
    for position, spec in enumerate(specs):
        shape = tuple(spec.shape)
        count = int(np.prod(shape)) if shape else 1
        index = np.arange(count, dtype=np.float64)
        phase = 0.7 * case + 0.3 * position
        real = np.sin(index * (0.37 + 0.11 * case) + phase).reshape(shape)
        dtype = np.dtype(spec.dtype)
        if dtype == np.bool_:
            array: Array = ((np.arange(count) + case) % 2 == 0).reshape(shape)
        elif np.issubdtype(dtype, np.floating):
            array = real.astype(dtype)
        elif spec.quantized:
            array = quantize(real, spec)
        else:
            ids = (np.arange(count) * (3 + 2 * case) + case + position) % TOKEN_RANGE
            array = ids.astype(dtype).reshape(shape)
        arrays.append(array)
    return arrays


def _variant_name(path: Path, taken: set[str]) -> str:
    base = re.sub(r"[^a-z0-9_-]+", "-", path.stem.lower()).strip("-_")[:32] or "variant"
    name, n = base, 2
    while name in taken or name == "default" or not re.match(r"[a-z0-9]", name):
        name = f"v{n}-{base}"[:32]
        n += 1
    return name


def _describe_and_smoke(
    path: Path, content: bytes, cases: int, tolerance: Tolerance
) -> tuple[tuple[TensorInfo, ...], tuple[TensorInfo, ...], SmokeVectors]:
    from fleetlite.sdk.runtime.interpreter import load_model
    from fleetlite.sdk.runtime.isolated import check_model

    check_model(path)  # a hostile or truncated file must not crash the operator's process
    model = load_model(content)
    inputs = tuple(TensorInfo.from_dict(s.to_dict()) for s in model.inputs)
    outputs = tuple(TensorInfo.from_dict(s.to_dict()) for s in model.outputs)
    smoke_cases = []
    for case in range(cases):
        arrays = smoke_inputs(model.inputs, case)
        result = model.run(arrays)
        expected = tuple(Tensor(name, np.array(value)) for name, value in result.items())
        again = compare_outputs(expected, model.run(arrays), tolerance)
        if again:
            raise BundleError(f"{path}: the model gives different outputs for the same input "
                              f"({again[0]}); smoke vectors would not be reproducible")
        smoke_cases.append(SmokeCase(
            tuple(Tensor(s.name, a) for s, a in zip(model.inputs, arrays)), expected))
    return inputs, outputs, SmokeVectors(tuple(smoke_cases))


def _check_delta_target(delta: BuiltDelta, files: dict[str, bytes]) -> None:
    import io

    from fleetlite.sdk.delta import read_header

    content = files.get(delta.file)
    header = read_header(io.BytesIO(delta.content))
    if content is None or header.target_sha256 != sha256_hex(content):
        raise BundleError(f"the delta {delta.delta_name} does not rebuild this release's "
                          f"{delta.file}; make the deltas from the same model files")


def build_release(
    models: Sequence[PathArg],
    *,
    name: str,
    version: int,
    device_classes: Sequence[str],
    vocab: PathArg | None = None,
    expires_in: int = DEFAULT_EXPIRES_IN,
    issued: int | None = None,
    min_agent_version: str = __version__,
    tolerance: Tolerance | None = None,
    smoke_cases: int = DEFAULT_SMOKE_CASES,
    keys: Sequence[SigningKey] = (),
    limits: Limits = DEFAULT_LIMITS,
    tokenizer: PathArg | None = None,
    prompt_template: str = "{prompt}",
    stop_ids: Sequence[int] = (),
    stop_strings: Sequence[str] = (),
    sampling: Sampling | None = None,
    smoke_prompts: Sequence[str] = DEFAULT_SMOKE_PROMPTS,
    smoke_tokens: int = DEFAULT_SMOKE_TOKENS,
    min_token_agreement: float = DEFAULT_VARIANT_AGREEMENT,
    deltas: Sequence[BuiltDelta] = (),
) -> ReleaseBundle:
    """Build a release of one or more ``.tflite`` files (the first is the default variant, the
    others variants named after their files), plus an optional vocabulary file, signed by
    ``keys`` (none: an unsigned bundle to sign later with
    :func:`fleetlite.sdk.bundle.sign_bundle`).

    A generative language model (signatures ``prefill_<N>`` and ``decode``) needs its
    ``tokenizer``; ``prompt_template``, ``stop_ids`` (default: the tokenizer's end-of-sequence
    id), ``stop_strings`` and the default ``sampling`` complete its generation metadata, and its
    smoke vectors are ``smoke_prompts``' greedy tokens (see
    :mod:`fleetlite.fleet.lm_release_builder`).

    ``deltas`` (from :func:`fleetlite.fleet.delta_builder.plan_deltas`) are added as files of
    role ``delta`` with their manifest ``deltas`` entries; each must rebuild one of the release's
    files.
    """
    if not models:
        raise BundleError("give at least one .tflite model file")
    if not MODEL_NAME_RE.match(name):
        raise BundleError(f"release name {name!r} must be 1-64 characters of [a-z0-9_-]")
    tolerance = tolerance or Tolerance()
    issued = int(time.time()) if issued is None else issued
    files: dict[str, bytes] = {}
    entries: list[FileEntry] = []

    def add(file_name: str, content: bytes, role: str) -> None:
        try:
            check_file_name(file_name)
        except UnsafeNameError as exc:
            raise BundleError(f"{exc}") from None
        if file_name in files:
            raise BundleError(f"two release files would be named {file_name!r}; rename one")
        if len(content) > limits.max_file_bytes:
            raise BundleError(f"{file_name} is {len(content)} bytes; devices accept at most "
                              f"{limits.max_file_bytes}")
        files[file_name] = content
        entries.append(file_entry(file_name, content, role))

    variants: list[Variant] = []
    smoke_files: list[tuple[str, bytes]] = []
    paths = [Path(source) for source in models]
    generation = None
    if is_lm_file(paths[0]):
        if tokenizer is None:
            raise BundleError(f"{paths[0]} is a generative language model (signatures "
                              "prefill_<N> and decode): give its tokenizer (--tokenizer)")
        lm = build_lm_parts(paths, Path(tokenizer), device_classes,
                            prompt_template=prompt_template, stop_ids=stop_ids,
                            stop_strings=stop_strings, sampling=sampling,
                            smoke_prompts=smoke_prompts, smoke_tokens=smoke_tokens,
                            min_token_agreement=min_token_agreement, tolerance=tolerance)
        generation = lm.spec
        for path, (inputs, outputs, lm_vectors) in zip(paths, lm.variants):
            smoke_name = f"{path.stem}.smoke.json"
            add(path.name, path.read_bytes(), "model")
            smoke_files.append((smoke_name, lm_vectors.to_json()))
            vname = "default" if not variants else _variant_name(path, {v.name for v in variants})
            variants.append(Variant(vname, ModelInfo(path.name, inputs, outputs),
                                    SmokeSpec(smoke_name, tolerance)))
        add(generation.tokenizer, lm.tokenizer_bytes, "tokenizer")
        models = ()
    elif tokenizer is not None:
        raise BundleError(f"{paths[0]} is not a generative language model (no prefill_<N> and "
                          "decode signatures): drop --tokenizer, or give the LM's .tflite")
    for source in models:
        path = Path(source)
        try:
            content = path.read_bytes()
        except OSError as exc:
            raise BundleError(f"{path}: cannot read the model ({exc.strerror})") from None
        inputs, outputs, vectors = _describe_and_smoke(path, content, smoke_cases, tolerance)
        smoke_name = f"{path.stem}.smoke.json"
        add(path.name, content, "model")
        smoke_files.append((smoke_name, vectors.to_json()))
        vname = "default" if not variants else _variant_name(path, {v.name for v in variants})
        variants.append(Variant(vname, ModelInfo(path.name, inputs, outputs),
                                SmokeSpec(smoke_name, tolerance)))
    for smoke_name, content in smoke_files:
        add(smoke_name, content, "smoke")
    if vocab is not None:
        vocab_path = Path(vocab)
        try:
            add(vocab_path.name, vocab_path.read_bytes(), "vocab")
        except OSError as exc:
            raise BundleError(f"{vocab_path}: cannot read the vocabulary ({exc.strerror})") \
                from None
    for delta in deltas:
        _check_delta_target(delta, files)
        add(delta.delta_name, delta.content, "delta")
    manifest = Manifest(
        name=name,
        version=version,
        files=tuple(entries),
        model=variants[0].model,
        smoke=variants[0].smoke,
        device_classes=tuple(dict.fromkeys(device_classes)),
        min_agent_version=min_agent_version,
        issued=issued,
        expires=issued + expires_in,
        variants=tuple(variants[1:]),
        generation=generation,
        deltas=tuple(d.ref for d in deltas),
    )
    payload = manifest.to_json()
    try:
        parsed = parse_manifest(payload, max_bytes=limits.max_manifest_bytes,
                                max_files=limits.max_files, max_file_bytes=limits.max_file_bytes)
    except UpdateRejected as exc:
        raise BundleError(f"the release would not pass a device's checks: {exc}") from None
    bundle = ReleaseBundle(Envelope(MANIFEST_PAYLOAD_TYPE, payload), parsed, files)
    for key in keys:
        bundle = bundle.sign(key)
    return bundle
