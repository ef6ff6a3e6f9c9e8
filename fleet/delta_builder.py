"""Deltas for a new release against an older one: which files get one, the delta files, and the
sizes the release builder reports.

Each new model file is paired with a base file: the base release's file of the same name, else
the base's model of the same variant position (the first model is the default variant), or, when
the base is a single ``.tflite``, the default model. Both kinds of ops are tried
(:mod:`fleetlite.fleet.delta_diff`: by tensor buffers, when both files are TFLite models, and by
block matching) and the smaller delta is kept, after checking that it rebuilds the new file byte
for byte. A delta is only worth offering when it is clearly smaller than the file: one of more
than ``max_ratio`` (default 50%) of the full size is dropped, and the report says why.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fleetlite.fleet.delta_diff import binary_ops, tensor_ops
from fleetlite.sdk.bundle import BUNDLE_SUFFIX, PathArg, load_bundle
from fleetlite.sdk.delta import KIND_BINARY, KIND_TENSORS, KINDS, apply_delta_bytes, encode_delta
from fleetlite.sdk.errors import BundleError
from fleetlite.sdk.manifest import DeltaRef, check_file_name, sha256_hex

__all__ = ["DEFAULT_MAX_RATIO", "BaseRelease", "BuiltDelta", "Skipped", "load_base",
           "make_delta", "plan_deltas"]

DEFAULT_MAX_RATIO = 0.5


@dataclass(frozen=True)
class BaseRelease:
    """What devices already have: a label for reports (``v1``), model files by name, in variant
    order (the default first)."""

    label: str
    models: dict[str, bytes]


@dataclass(frozen=True)
class BuiltDelta:
    """A delta file for one release file, and the figures the builder reports."""

    file: str
    delta_name: str
    content: bytes
    base_sha256: str
    base_label: str
    kind: str
    full_length: int
    seconds: float

    @property
    def ratio(self) -> float:
        return len(self.content) / self.full_length if self.full_length else 1.0

    @property
    def ref(self) -> DeltaRef:
        return DeltaRef(self.file, self.base_sha256, self.delta_name)

    def report(self) -> str:
        """e.g. ``model.tflite: delta 41.2 KiB from v1 (9.8% of 420.0 KiB, by tensors)``"""
        return (f"{self.file}: delta {_kib(len(self.content))} from {self.base_label} "
                f"({100 * self.ratio:.1f}% of {_kib(self.full_length)}, by {self.kind})")


@dataclass(frozen=True)
class Skipped:
    """A file that gets no delta, and why (for the report)."""

    file: str
    why: str

    def report(self) -> str:
        return f"{self.file}: no delta: {self.why}"


def _kib(n: int) -> str:
    return f"{n / 1024:.1f} KiB"


def load_base(source: PathArg) -> BaseRelease:
    """The base release's model files: from a bundle (``.flb`` or directory) or one ``.tflite``.

    Raises :class:`BundleError` if it cannot be read.
    """
    path = Path(source)
    if path.suffix == BUNDLE_SUFFIX or path.is_dir():
        bundle = load_bundle(path)
        manifest = bundle.manifest
        return BaseRelease(f"v{manifest.version}",
                           {v.model.file: bundle.files[v.model.file]
                            for v in manifest.all_variants()})
    try:
        return BaseRelease(path.name, {path.name: path.read_bytes()})
    except OSError as exc:
        raise BundleError(f"{path}: cannot read the base for --delta-from ({exc.strerror}); give "
                          "the release bundle devices have installed, or its .tflite") from None


def make_delta(base: bytes, target: bytes) -> tuple[str, bytes]:
    """The smaller of the tensor-buffer delta (when both are TFLite models) and the block-matching
    delta that rebuilds ``target`` from ``base``, checked by applying it: (kind name, bytes)."""
    candidates = []
    with contextlib.suppress(ValueError):  # not both TFLite flatbuffers: block matching alone
        candidates.append((KIND_TENSORS, encode_delta(KIND_TENSORS, base, target,
                                                      tensor_ops(base, target))))
    candidates.append((KIND_BINARY, encode_delta(KIND_BINARY, base, target,
                                                 binary_ops(base, target))))
    kind, content = min(candidates, key=lambda c: len(c[1]))
    if apply_delta_bytes(base, content) != target:
        raise AssertionError("a delta does not rebuild its target: a bug in fleet/delta_diff.py")
    return KINDS[kind], content


def _delta_name(file: str, label: str) -> str:
    tag = "".join(c if c.isalnum() else "-" for c in label.rsplit(".", 1)[0])[:24]
    return check_file_name(f"{file[:80]}.from-{tag}.delta")


def plan_deltas(base: BaseRelease, new_models: Sequence[tuple[str, bytes]], *,
                max_ratio: float = DEFAULT_MAX_RATIO) -> tuple[list[BuiltDelta], list[Skipped]]:
    """Deltas for the release's model files ``new_models`` ((name, content), default first)."""
    built: list[BuiltDelta] = []
    skipped: list[Skipped] = []
    by_position = list(base.models.items())
    for position, (name, content) in enumerate(new_models):
        if name in base.models:
            base_name, base_content = name, base.models[name]
        elif position < len(by_position):
            base_name, base_content = by_position[position]
        else:
            skipped.append(Skipped(name, f"{base.label} has no model in this variant position"))
            continue
        if base_content == content:
            skipped.append(Skipped(name, f"unchanged since {base.label}"))
            continue
        started = time.perf_counter()
        kind, delta = make_delta(base_content, content)
        seconds = time.perf_counter() - started
        item = BuiltDelta(name, _delta_name(name, base.label), delta, sha256_hex(base_content),
                          f"{base.label} ({base_name})" if base_name != name else base.label,
                          kind, len(content), seconds)
        if item.ratio > max_ratio:
            skipped.append(Skipped(name, f"the smallest delta from {item.base_label} is "
                                   f"{_kib(len(delta))}, {100 * item.ratio:.0f}% of the full "
                                   f"{_kib(len(content))}, over the {100 * max_ratio:.0f}% "
                                   "limit; devices fetch the full file"))
            continue
        built.append(item)
    return built, skipped

