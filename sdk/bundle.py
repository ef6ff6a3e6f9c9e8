"""Release bundles: build a signed release from .tflite files, sign it again, read it, show it.

A bundle is either a directory or a single ``.flb`` file (an uncompressed POSIX tar) holding
``manifest.json`` (the signed DSSE envelope of the manifest) and exactly the files the manifest
lists. Reading a ``.flb`` refuses links, directories, devices, unlisted, duplicate, absolute and
traversing member names before anything is read into memory.

Building reads each model with the real runtime layer (after a crash-isolated check) to describe
its tensors and to compute the smoke vectors; this module is fleet-side tooling and imports the
runtime lazily, so the agent never pulls it in.
"""

from __future__ import annotations

import datetime as _dt
import io
import os
import re
import stat
import tarfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Union

import numpy as np
import numpy.typing as npt

from fleetlite.sdk.durations import DEFAULT_EXPIRES_IN, parse_duration
from fleetlite.sdk.envelope import MANIFEST_PAYLOAD_TYPE, Envelope
from fleetlite.sdk.errors import BundleError, UnsafeNameError, UpdateRejected
from fleetlite.sdk.generation import Sampling
from fleetlite.sdk.keys import SigningKey, require_role
from fleetlite.sdk.lm_release import (
    DEFAULT_SMOKE_PROMPTS,
    DEFAULT_SMOKE_TOKENS,
    DEFAULT_VARIANT_AGREEMENT,
    build_lm_parts,
    is_lm_file,
)
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
)
from fleetlite.sdk.smoke import (
    SmokeCase,
    SmokeVectors,
    Tensor,
    check_vectors_match_model,
    compare_outputs,
    run_smoke,
)
from fleetlite.sdk.trust import Root
from fleetlite.sdk.verify import DEFAULT_LIMITS, Limits, verify_bytes, verify_release
from fleetlite.sdk.version import __version__

__all__ = [
    "BUNDLE_SUFFIX",
    "DEFAULT_EXPIRES_IN",
    "ENVELOPE_NAME",
    "ReleaseBundle",
    "build_release",
    "bundle_from_bytes",
    "load_bundle",
    "parse_duration",
    "run_bundle_smoke",
    "sign_bundle",
    "smoke_inputs",
]

PathArg = Union[str, "os.PathLike[str]"]
Array = npt.NDArray[Any]

ENVELOPE_NAME = "manifest.json"
BUNDLE_SUFFIX = ".flb"
DEFAULT_SMOKE_CASES = 3
# Token ids for int32/int64 inputs stay in 0..7: valid for any vocabulary with 8+ entries.
TOKEN_RANGE = 8


@dataclass(frozen=True, eq=False)
class ReleaseBundle:
    """A release in memory: its envelope, the manifest parsed from it, and its files.

    ``manifest`` is parsed but NOT verified; call :meth:`verify` with a trusted root.
    """

    envelope: Envelope
    manifest: Manifest
    files: Mapping[str, bytes]

    @property
    def release_id(self) -> str:
        return self.manifest.release_id

    def envelope_bytes(self) -> bytes:
        return self.envelope.to_json()

    def sign(self, key: SigningKey) -> ReleaseBundle:
        """Add ``key``'s signature over the exact payload (never re-serialised); a key whose
        role is not ``release`` is refused (:class:`KeyFileError`)."""
        require_role(key.role, "release", f"key {key.keyid[:12]}")
        return replace(self, envelope=self.envelope.sign(key))

    def verify(
        self,
        root: Root,
        *,
        device_class: str | None = None,
        time_floor: float | None = None,
        installed_version: int | None = None,
        agent_version: str = __version__,
        limits: Limits = DEFAULT_LIMITS,
    ) -> Manifest:
        """:func:`verify_release` on the envelope, then every file against its entry."""
        manifest = verify_release(
            self.envelope_bytes(),
            root=root,
            installed_version=installed_version,
            device_class=device_class,
            time_floor=time.time() if time_floor is None else time_floor,
            agent_version=agent_version,
            limits=limits,
        )
        for entry in manifest.files:
            verify_bytes(self.files.get(entry.name, b""), entry)
        return manifest

    def write_dir(self, directory: PathArg) -> Path:
        """Write ``manifest.json`` and the files into ``directory`` (created; must be empty)."""
        target = Path(directory)
        if target.exists() and (not target.is_dir() or any(target.iterdir())):
            raise BundleError(f"{target}: exists and is not an empty directory; choose a new "
                              "--out directory")
        target.mkdir(parents=True, exist_ok=True)
        from fleetlite.sdk.atomic import write_atomic

        for entry in self.manifest.files:
            write_atomic(target / entry.name, self.files[entry.name])
        write_atomic(target / ENVELOPE_NAME, self.envelope_bytes())
        return target

    def flb_bytes(self) -> bytes:
        """The single-file form: a deterministic uncompressed tar, manifest.json first."""
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
            members = [(ENVELOPE_NAME, self.envelope_bytes())]
            members += [(e.name, self.files[e.name]) for e in self.manifest.files]
            for name, content in members:
                info = tarfile.TarInfo(name)
                info.size = len(content)
                info.mode = 0o644
                info.mtime = self.manifest.issued
                tar.addfile(info, io.BytesIO(content))
        return buffer.getvalue()

    def write_flb(self, path: PathArg) -> Path:
        from fleetlite.sdk.atomic import write_atomic

        target = Path(path)
        write_atomic(target, self.flb_bytes())
        return target

    def summary(self, now: float | None = None) -> dict[str, Any]:
        """A JSON-ready description (unverified unless the caller verified it); times are UTC
        ISO 8601 and ``expired`` says whether ``expires`` has passed at ``now`` (default: the
        current time)."""
        m = self.manifest
        files = []
        for entry in m.files:
            try:
                verify_bytes(self.files.get(entry.name, b""), entry)
                status = "ok"
            except UpdateRejected as exc:
                status = exc.reason
            files.append({**entry.to_dict(), "status": status})
        return {
            "name": m.name,
            "version": m.version,
            "release_id": m.release_id,
            "issued": _iso(m.issued),
            "expires": _iso(m.expires),
            "expired": m.expires <= (time.time() if now is None else now),
            "device_classes": list(m.device_classes),
            "min_agent_version": m.min_agent_version,
            "signatures": [s.keyid for s in self.envelope.signatures],
            "files": files,
            "variants": [
                {"name": v.name, "file": v.model.file, "smoke": v.smoke.file,
                 "tolerance": v.smoke.tolerance.to_dict(),
                 "inputs": [t.to_dict() for t in v.model.inputs],
                 "outputs": [t.to_dict() for t in v.model.outputs]}
                for v in m.all_variants()
            ],
        }


def _iso(ts: int) -> str:
    return _dt.datetime.fromtimestamp(ts, tz=_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- building ---------------------------------------------------------------------------------


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
) -> ReleaseBundle:
    """Build a release of one or more ``.tflite`` files (the first is the default variant, the
    others variants named after their files), plus an optional vocabulary file, signed by
    ``keys`` (none: an unsigned bundle to sign later with :func:`sign_bundle`).

    A generative language model (signatures ``prefill_<N>`` and ``decode``) needs its
    ``tokenizer``; ``prompt_template``, ``stop_ids`` (default: the tokenizer's end-of-sequence
    id), ``stop_strings`` and the default ``sampling`` complete its generation metadata, and its
    smoke vectors are ``smoke_prompts``' greedy tokens (see :mod:`fleetlite.sdk.lm_release`).
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


def run_bundle_smoke(bundle: ReleaseBundle) -> list[str]:
    """Run every variant's smoke vectors on this machine's runtime; problems, empty if none.

    Verify the bundle first: this loads its models (after a crash-isolated check).
    """
    import tempfile

    from fleetlite.sdk.runtime.interpreter import load_model
    from fleetlite.sdk.runtime.isolated import check_model

    if bundle.manifest.generation is not None:
        return _run_lm_bundle_smoke(bundle)
    problems: list[str] = []
    for variant in bundle.manifest.all_variants():
        vectors = SmokeVectors.from_json(bundle.files[variant.smoke.file])
        found = check_vectors_match_model(vectors, variant.model)
        if not found:
            with tempfile.TemporaryDirectory() as tmp:
                model_path = Path(tmp) / variant.model.file
                model_path.write_bytes(bundle.files[variant.model.file])
                check_model(model_path)
            model = load_model(bundle.files[variant.model.file])
            found = run_smoke(vectors, model.run, variant.smoke.tolerance)
        problems.extend(f"variant {variant.name}: {p}" for p in found)
    return problems


def _run_lm_bundle_smoke(bundle: ReleaseBundle) -> list[str]:
    """A language model's smoke test here, as a device runs it: model, tokenizer and metadata
    agree, then each variant's greedy tokens and first-step logits are judged."""
    import tempfile

    from fleetlite.sdk.errors import FleetLiteError
    from fleetlite.sdk.lm_smoke import LmSmokeVectors, judge
    from fleetlite.sdk.runtime.isolated import check_language_model
    from fleetlite.sdk.runtime.lm_engine import LmEngine
    from fleetlite.sdk.runtime.lm_smoke_runner import run_vectors
    from fleetlite.sdk.runtime.tokenizer import load_tokenizer

    spec = bundle.manifest.generation
    assert spec is not None
    problems: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, content in bundle.files.items():
            (Path(tmp) / name).write_bytes(content)
        for variant in bundle.manifest.all_variants():
            model = Path(tmp) / variant.model.file
            try:
                check_language_model(model)
                engine = LmEngine(model, spec=spec,
                                  tokenizer=load_tokenizer(Path(tmp) / spec.tokenizer,
                                                           spec.tokenizer_kind))
                vectors = LmSmokeVectors.from_json(bundle.files[variant.smoke.file])
                found = judge(vectors, run_vectors(engine, vectors), variant.smoke.tolerance)
            except FleetLiteError as exc:
                reason = getattr(exc, "reason", "")
                found = [f"{exc}" + (f" [{reason}]" if reason else "")]
            problems.extend(f"variant {variant.name}: {p}" for p in found)
    return problems


# --- reading ----------------------------------------------------------------------------------


def load_bundle(path: PathArg, *, limits: Limits = DEFAULT_LIMITS) -> ReleaseBundle:
    """Read a bundle directory or ``.flb`` file. Structure is checked; signatures are not."""
    source = Path(path)
    if source.is_dir():
        return _load_dir(source, limits)
    if source.is_file():
        return _load_flb(source, limits)
    raise BundleError(f"{source}: no such bundle (a directory with manifest.json or a .flb file)")


def bundle_from_bytes(envelope: bytes, files: Mapping[str, bytes], *, origin: str = "the release",
                      limits: Limits = DEFAULT_LIMITS) -> ReleaseBundle:
    """A bundle from its envelope bytes and file contents (e.g. a release kept in the fleet
    store). Structure is checked; signatures are not."""
    parsed, manifest = _parse_envelope(envelope, origin, limits)
    return ReleaseBundle(parsed, manifest, dict(files))


def _parse_envelope(data: bytes, origin: str, limits: Limits) -> tuple[Envelope, Manifest]:
    try:
        envelope = Envelope.from_json(data, max_bytes=limits.max_envelope_bytes,
                                      max_payload_bytes=limits.max_manifest_bytes,
                                      max_signatures=limits.max_signatures)
        manifest = parse_manifest(envelope.payload, max_bytes=limits.max_manifest_bytes,
                                  max_files=limits.max_files,
                                  max_file_bytes=limits.max_file_bytes)
    except UpdateRejected as exc:
        raise BundleError(f"{origin}: {exc} [{exc.reason}]") from None
    return envelope, manifest


def _read_capped(path: Path, cap: int) -> bytes:
    with path.open("rb") as handle:
        return handle.read(cap + 1)


def _load_dir(directory: Path, limits: Limits) -> ReleaseBundle:
    envelope_path = directory / ENVELOPE_NAME
    if not envelope_path.is_file() or envelope_path.is_symlink():
        raise BundleError(f"{directory}: no {ENVELOPE_NAME}; is this a release bundle?")
    envelope, manifest = _parse_envelope(
        _read_capped(envelope_path, limits.max_envelope_bytes), str(envelope_path), limits)
    listed = {e.name: e for e in manifest.files}
    for child in directory.iterdir():
        if child.name != ENVELOPE_NAME and child.name not in listed:
            raise BundleError(f"{child}: not listed in the manifest; remove it from the bundle")
    files: dict[str, bytes] = {}
    for entry in manifest.files:
        member = directory / entry.name
        try:
            info = member.lstat()
        except FileNotFoundError:
            raise BundleError(f"{member}: listed in the manifest but missing") from None
        if not stat.S_ISREG(info.st_mode):
            raise BundleError(f"{member}: not a regular file (links are refused)")
        # At most one byte past the signed length: enough for verification to refuse it.
        files[entry.name] = _read_capped(member, entry.length)
    return ReleaseBundle(envelope, manifest, files)


def _load_flb(path: Path, limits: Limits) -> ReleaseBundle:
    try:
        tar = tarfile.open(path, mode="r:")  # noqa: SIM115 - closed below
    # ValueError: tarfile's own parse of a pax header, e.g. size=nan (Python 3.11)
    except (tarfile.TarError, OSError, ValueError) as exc:
        raise BundleError(f"{path}: not a .flb bundle (an uncompressed tar): {exc}") from None
    with tar:
        try:
            first = tar.next()
            if first is None or first.name != ENVELOPE_NAME or not first.isreg():
                raise BundleError(f"{path}: the first member must be {ENVELOPE_NAME}")
            if first.size > limits.max_envelope_bytes:
                raise BundleError(f"{path}: {ENVELOPE_NAME} exceeds "
                                  f"{limits.max_envelope_bytes} bytes [oversize]")
            envelope, manifest = _parse_envelope(_extract(tar, first, first.size), str(path),
                                                 limits)
            listed = {e.name: e for e in manifest.files}
            files: dict[str, bytes] = {}
            while True:
                member = tar.next()
                if member is None:
                    break
                _check_member(path, member, listed, files)
                files[member.name] = _extract(tar, member, listed[member.name].length + 1)
        except (tarfile.TarError, ValueError) as exc:  # e.g. "unexpected end of data"
            raise BundleError(f"{path}: truncated or corrupt .flb ({exc}); copy it again or "
                              "rebuild it (fleetlite release build)") from None
        _check_archive_end(path, tar)
    missing = [name for name in listed if name not in files]
    if missing:
        raise BundleError(f"{path}: listed in the manifest but missing: {', '.join(missing)}")
    return ReleaseBundle(envelope, manifest, files)


def _check_archive_end(path: Path, tar: tarfile.TarFile) -> None:
    """After the last member: the two zero blocks that end a tar, then nothing but the zero
    padding tar writers add up to the 10240-byte record (docs/protocol.md, "Bundles")."""
    end = tar.offset  # where the block that ended the member list starts
    record = tarfile.RECORDSIZE
    allowed = -(-(end + 2 * tarfile.BLOCKSIZE) // record) * record - end
    assert tar.fileobj is not None
    tar.fileobj.seek(end)
    tail = tar.fileobj.read(allowed + 1)
    if len(tail) < 2 * tarfile.BLOCKSIZE:
        raise BundleError(f"{path}: truncated: the archive stops {len(tail)} bytes after its last "
                          "member, before the two zero blocks that end a tar; copy it again or "
                          "rebuild it (fleetlite release build)")
    if len(tail) > allowed or tail.count(0) != len(tail):
        raise BundleError(f"{path}: unexpected bytes after the end of the archive (offset {end}):"
                          f" a damaged member header or appended data; only zero padding up to "
                          f"the {record}-byte tar record may follow. Copy it again or rebuild it")


def _check_member(path: Path, member: tarfile.TarInfo, listed: Mapping[str, FileEntry],
                  seen: Mapping[str, bytes]) -> None:
    name = member.name
    try:
        check_file_name(name)
    except UnsafeNameError as exc:
        raise BundleError(f"{path}: unsafe member name: {exc}") from None
    if not member.isreg():
        raise BundleError(f"{path}: member {name!r} is not a regular file (links, directories "
                          "and devices are refused)")
    if name not in listed:
        raise BundleError(f"{path}: member {name!r} is not listed in the manifest")
    if name in seen:
        raise BundleError(f"{path}: member {name!r} appears twice")


def _extract(tar: tarfile.TarFile, member: tarfile.TarInfo, cap: int) -> bytes:
    handle = tar.extractfile(member)
    if handle is None:  # pragma: no cover - isreg() was checked
        raise BundleError(f"member {member.name!r} has no content")
    with handle:
        return handle.read(cap)


def sign_bundle(path: PathArg, key: SigningKey, *, limits: Limits = DEFAULT_LIMITS) -> Envelope:
    """Add ``key``'s signature to the bundle at ``path`` (directory or .flb), in place."""
    from fleetlite.sdk.atomic import write_atomic

    source = Path(path)
    bundle = load_bundle(source, limits=limits).sign(key)
    if source.is_dir():
        write_atomic(source / ENVELOPE_NAME, bundle.envelope_bytes())
    else:
        write_atomic(source, bundle.flb_bytes())
    return bundle.envelope
