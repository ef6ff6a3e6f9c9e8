"""The release manifest: what a signed release contains and where it may be installed.

The manifest is the payload of a DSSE envelope (payload type
``application/vnd.fleetlite.manifest+json``), written as compact key-sorted JSON. Times are
integer Unix seconds (UTC). :func:`parse_manifest` is strict: unknown fields, duplicate JSON keys,
wrong types and unsafe file names are refused. It does NOT check signatures: anything that will
be installed goes through :func:`fleetlite.sdk.verify.verify_release`, which verifies first.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, Optional

from fleetlite.sdk.device_class import DEVICE_CLASS_NAME_RE
from fleetlite.sdk.envelope import strict_json_loads
from fleetlite.sdk.errors import MalformedError, OversizeError, UnsafeNameError
from fleetlite.sdk.generation import GenerationSpec
from fleetlite.sdk.trust import canonical_json

__all__ = [
    "DEFAULT_MAX_FILES",
    "DEFAULT_MAX_FILE_BYTES",
    "DTYPES",
    "FILE_ROLES",
    "MAX_DELTAS",
    "MANIFEST_TYPE",
    "MAX_FILE_NAME_LENGTH",
    "MODEL_NAME_RE",
    "RESERVED_NAMES",
    "SPEC_VERSION",
    "DeltaRef",
    "FileEntry",
    "Manifest",
    "ModelInfo",
    "Quantization",
    "SmokeSpec",
    "TensorInfo",
    "Tolerance",
    "Variant",
    "check_file_name",
    "file_entry",
    "parse_manifest",
    "parse_version",
    "release_id",
    "sha256_hex",
]

MANIFEST_TYPE = "fleetlite.manifest"
SPEC_VERSION = 1
FILE_ROLES = ("model", "smoke", "vocab", "data", "tokenizer", "delta")
DTYPES = ("float32", "float16", "float64", "int8", "uint8", "int16", "int32", "int64", "bool")
MODEL_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}\Z")
VARIANT_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}\Z")
# A whitelist, then explicit refusals: no separators, no leading dot, no "..", no control chars.
_FILE_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+-]*\Z")
MAX_FILE_NAME_LENGTH = 128
# The bundle stores the envelope as manifest.json next to the files.
RESERVED_NAMES = frozenset({"manifest.json"})
_VERSION_RE = re.compile(r"[0-9]{1,6}(\.[0-9]{1,6}){0,3}\Z")
DEFAULT_MAX_FILES = 16
DEFAULT_MAX_FILE_BYTES = 256 * 1024 * 1024
_MAX_TENSORS = 64
_MAX_RANK = 8
_MAX_QUANT_PARAMS = 4096
_MAX_TEXT = 256
_MAX_VARIANTS = 8
MAX_DELTAS = 8
_HEX64_RE = re.compile(r"[0-9a-f]{64}\Z")
_MAX_DEVICE_CLASSES = 64
_MAX_NUMBER = 1.7976931348623157e308  # the largest finite double


def release_id(payload: bytes) -> str:
    """The release id: hex sha256 of the exact manifest bytes (names MQTT chunk topics)."""
    return hashlib.sha256(payload).hexdigest()


def parse_version(text: str) -> tuple[int, ...]:
    """'1.2.3' -> (1, 2, 3, 0): dotted numeric versions, compared as integer tuples.

    Suffixes of an installed agent's version (``0.2.0.dev1``, ``1.0rc1``) are ignored from the
    first non-numeric component on.
    """
    parts: list[int] = []
    for piece in text.split("."):
        digits = re.match(r"[0-9]+", piece)
        if digits is None:
            break
        parts.append(int(digits.group()))
        if digits.end() != len(piece):
            break
    return tuple(parts + [0] * (4 - len(parts)))


def check_file_name(name: object) -> str:
    """Return ``name`` if it is a plain file name safe to join to a directory; else raise
    :class:`UnsafeNameError` (path traversal defence: no '/', '\\', '..', leading '.', NUL)."""
    if not isinstance(name, str):
        raise UnsafeNameError("file name must be a string")
    shown = repr(name[:40])
    if not name or len(name) > MAX_FILE_NAME_LENGTH:
        raise UnsafeNameError(f"file name {shown} must be 1-{MAX_FILE_NAME_LENGTH} characters")
    if "/" in name or "\\" in name or "\x00" in name or ".." in name or name.startswith("."):
        raise UnsafeNameError(f"file name {shown} is not a plain file name (no '/', '\\', '..', "
                              "NUL or leading '.'); rename the file")
    if not _FILE_NAME_RE.match(name):
        raise UnsafeNameError(f"file name {shown} has characters outside [A-Za-z0-9._+-]; "
                              "rename the file")
    if name in RESERVED_NAMES:
        raise UnsafeNameError(f"file name {shown} is reserved for the bundle's envelope")
    return name


@dataclass(frozen=True)
class FileEntry:
    """One file of the release: a plain name, its sha256 (hex), exact length and role."""

    name: str
    sha256: str
    length: int
    role: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "sha256": self.sha256, "length": self.length,
                "role": self.role}


@dataclass(frozen=True)
class Quantization:
    scale: float
    zero_point: int
    scales: tuple[float, ...] = ()
    zero_points: tuple[int, ...] = ()
    quantized_dimension: int = 0

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"scale": self.scale, "zero_point": self.zero_point}
        if self.scales:
            out.update(scales=list(self.scales), zero_points=list(self.zero_points),
                       quantized_dimension=self.quantized_dimension)
        return out


@dataclass(frozen=True)
class TensorInfo:
    """A model input or output as the runtime reports it (``TensorSpec.to_dict()``)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    shape_signature: tuple[int, ...] | None = None
    quantization: Quantization | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}
        if self.shape_signature is not None:
            out["shape_signature"] = list(self.shape_signature)
        if self.quantization is not None:
            out["quantization"] = self.quantization.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TensorInfo:
        return _parse_tensor(data, "tensor")


@dataclass(frozen=True)
class ModelInfo:
    """The model file a variant runs and its inputs/outputs (in the model's order)."""

    file: str
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "inputs": [t.to_dict() for t in self.inputs],
                "outputs": [t.to_dict() for t in self.outputs]}


@dataclass(frozen=True)
class Tolerance:
    """How close smoke-test outputs must be: float ``|a-e| <= atol + rtol*|e|``; integer
    outputs ``|a-e| <= max_lsb`` (in quantized steps)."""

    atol: float = 1e-4
    rtol: float = 1e-3
    max_lsb: int = 1

    def to_dict(self) -> dict[str, Any]:
        return {"atol": self.atol, "rtol": self.rtol, "max_lsb": self.max_lsb}


@dataclass(frozen=True)
class SmokeSpec:
    """The smoke-test vectors file and the tolerance its outputs are compared with."""

    file: str
    tolerance: Tolerance = field(default_factory=Tolerance)

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "tolerance": self.tolerance.to_dict()}


@dataclass(frozen=True)
class Variant:
    """One build of the model (e.g. fp32 or int8); the manifest's ``model``/``smoke`` are the
    variant named ``default``, ``variants`` lists the others."""

    name: str
    model: ModelInfo
    smoke: SmokeSpec

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "model": self.model.to_dict(), "smoke": self.smoke.to_dict()}


@dataclass(frozen=True)
class DeltaRef:
    """A delta update offered for one release file: the listed file ``delta`` (role ``delta``,
    signed and hash-checked like any file) rebuilds the listed file ``file`` from a file the
    device already has whose sha256 is ``base_sha256`` (:mod:`fleetlite.sdk.delta`)."""

    file: str
    base_sha256: str
    delta: str

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "base_sha256": self.base_sha256, "delta": self.delta}


@dataclass(frozen=True)
class Manifest:
    """A release manifest. ``release_id`` is set by :func:`parse_manifest` from the exact bytes.

    ``generation`` is set for a generative language model (every variant is then such a model,
    checked against it on the device); it is serialized only when set. ``deltas`` lists the delta
    updates the release offers (serialized only when there are some): a device that has a base
    may fetch a delta instead of the full file, and falls back to the full file.
    """

    name: str
    version: int
    files: tuple[FileEntry, ...]
    model: ModelInfo
    smoke: SmokeSpec
    device_classes: tuple[str, ...]
    min_agent_version: str
    issued: int
    expires: int
    variants: tuple[Variant, ...] = ()
    generation: Optional[GenerationSpec] = None
    deltas: tuple[DeltaRef, ...] = ()
    spec_version: int = SPEC_VERSION
    release_id: str = field(default="", compare=False)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "_type": MANIFEST_TYPE,
            "spec_version": self.spec_version,
            "name": self.name,
            "version": self.version,
            "issued": self.issued,
            "expires": self.expires,
            "min_agent_version": self.min_agent_version,
            "targets": {"device_classes": list(self.device_classes)},
            "files": [f.to_dict() for f in self.files],
            "model": self.model.to_dict(),
            "smoke": self.smoke.to_dict(),
        }
        if self.variants:
            out["variants"] = [v.to_dict() for v in self.variants]
        if self.generation is not None:
            out["generation"] = self.generation.to_dict()
        if self.deltas:
            out["deltas"] = [d.to_dict() for d in self.deltas]
        return out

    def to_json(self) -> bytes:
        """The canonical payload bytes (what gets signed)."""
        return canonical_json(self.to_dict())

    def file(self, name: str) -> FileEntry:
        for entry in self.files:
            if entry.name == name:
                return entry
        raise KeyError(name)

    @property
    def default_variant(self) -> Variant:
        return Variant("default", self.model, self.smoke)

    def all_variants(self) -> tuple[Variant, ...]:
        return (self.default_variant, *self.variants)

    def variant(self, name: str) -> Variant:
        for variant in self.all_variants():
            if variant.name == name:
                return variant
        raise KeyError(name)

    def deltas_for(self, name: str) -> tuple[DeltaRef, ...]:
        """The deltas that rebuild the listed file ``name`` (from different bases)."""
        return tuple(d for d in self.deltas if d.file == name)

    @property
    def total_length(self) -> int:
        return sum(f.length for f in self.files)


# --- strict parsing ---------------------------------------------------------------------------


def _bad(message: str) -> MalformedError:
    return MalformedError(f"manifest: {message}")


def _obj(value: Any, what: str, required: set[str], optional: Collection[str] = ()
         ) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _bad(f"{what} must be an object")
    missing = required - set(value)
    unknown = set(value) - required - set(optional)
    if missing:
        raise _bad(f"{what} is missing {sorted(missing)}")
    if unknown:
        raise _bad(f"{what} has unknown field(s) {sorted(unknown)[:5]}; a newer spec? upgrade "
                   "the agent")
    return value


def _int(value: Any, what: str, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(f"{what} must be an integer")
    if minimum is not None and value < minimum:
        raise _bad(f"{what} must be >= {minimum}")
    return value


def _num(value: Any, what: str, minimum: float = 0.0) -> float:
    # Compared before float(): an integer beyond a double's range must not overflow.
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or not minimum <= value <= _MAX_NUMBER):
        raise _bad(f"{what} must be a finite number >= {minimum}")
    return float(value)


def _str(value: Any, what: str, max_len: int = _MAX_TEXT) -> str:
    if not isinstance(value, str) or not value or len(value) > max_len:
        raise _bad(f"{what} must be a non-empty string of at most {max_len} characters")
    return value


def _list(value: Any, what: str, max_len: int) -> list[Any]:
    if not isinstance(value, list):
        raise _bad(f"{what} must be a list")
    if len(value) > max_len:
        raise _bad(f"{what} has more than {max_len} entries")
    return value


def _ints(value: Any, what: str, minimum: int) -> tuple[int, ...]:
    return tuple(_int(v, what, minimum) for v in _list(value, what, _MAX_RANK))


def _parse_quantization(value: Any, what: str) -> Quantization:
    data = _obj(value, what, {"scale", "zero_point"},
                {"scales", "zero_points", "quantized_dimension"})
    scales = tuple(_num(v, f"{what}.scales") for v in
                   _list(data.get("scales", []), f"{what}.scales", _MAX_QUANT_PARAMS))
    zero_points = tuple(_int(v, f"{what}.zero_points") for v in
                        _list(data.get("zero_points", []), f"{what}.zero_points",
                              _MAX_QUANT_PARAMS))
    if len(scales) != len(zero_points):
        raise _bad(f"{what}: scales and zero_points differ in length")
    return Quantization(
        scale=_num(data["scale"], f"{what}.scale"),
        zero_point=_int(data["zero_point"], f"{what}.zero_point"),
        scales=scales,
        zero_points=zero_points,
        quantized_dimension=_int(data.get("quantized_dimension", 0),
                                 f"{what}.quantized_dimension", 0),
    )


def _parse_tensor(value: Any, what: str) -> TensorInfo:
    data = _obj(value, what, {"name", "shape", "dtype"}, {"shape_signature", "quantization"})
    dtype = data["dtype"]
    if dtype not in DTYPES:
        raise _bad(f"{what}.dtype must be one of {list(DTYPES)}")
    return TensorInfo(
        name=_str(data["name"], f"{what}.name"),
        shape=_ints(data["shape"], f"{what}.shape", 0),
        dtype=dtype,
        shape_signature=(_ints(data["shape_signature"], f"{what}.shape_signature", -1)
                         if "shape_signature" in data else None),
        quantization=(_parse_quantization(data["quantization"], f"{what}.quantization")
                      if "quantization" in data else None),
    )


def _parse_model(value: Any, what: str) -> ModelInfo:
    data = _obj(value, what, {"file", "inputs", "outputs"})
    inputs = _list(data["inputs"], f"{what}.inputs", _MAX_TENSORS)
    outputs = _list(data["outputs"], f"{what}.outputs", _MAX_TENSORS)
    if not inputs or not outputs:
        raise _bad(f"{what} needs at least one input and one output")
    return ModelInfo(
        file=check_file_name(data["file"]),
        inputs=tuple(_parse_tensor(t, f"{what}.inputs[{i}]") for i, t in enumerate(inputs)),
        outputs=tuple(_parse_tensor(t, f"{what}.outputs[{i}]") for i, t in enumerate(outputs)),
    )


def _parse_smoke(value: Any, what: str) -> SmokeSpec:
    data = _obj(value, what, {"file", "tolerance"})
    tol = _obj(data["tolerance"], f"{what}.tolerance", {"atol", "rtol", "max_lsb"})
    return SmokeSpec(
        file=check_file_name(data["file"]),
        tolerance=Tolerance(
            atol=_num(tol["atol"], f"{what}.tolerance.atol"),
            rtol=_num(tol["rtol"], f"{what}.tolerance.rtol"),
            max_lsb=_int(tol["max_lsb"], f"{what}.tolerance.max_lsb", 0),
        ),
    )


def _parse_files(value: Any, *, max_files: int, max_file_bytes: int) -> tuple[FileEntry, ...]:
    if not isinstance(value, list):
        raise _bad("files must be a list")
    if len(value) > max_files:
        raise OversizeError(f"manifest lists {len(value)} files; the cap is {max_files}")
    if not value:
        raise _bad("files must not be empty")
    entries: list[FileEntry] = []
    seen: set[str] = set()
    for i, item in enumerate(value):
        data = _obj(item, f"files[{i}]", {"name", "sha256", "length", "role"})
        name = check_file_name(data["name"])
        if name in seen:
            raise _bad(f"file {name!r} is listed twice")
        seen.add(name)
        digest = data["sha256"]
        if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise _bad(f"files[{i}].sha256 must be 64 lowercase hex digits")
        length = _int(data["length"], f"files[{i}].length", 0)
        if length > max_file_bytes:
            raise OversizeError(f"file {name!r} is {length} bytes; the cap is {max_file_bytes}")
        role = data["role"]
        if role not in FILE_ROLES:
            raise _bad(f"files[{i}].role must be one of {list(FILE_ROLES)}")
        entries.append(FileEntry(name, digest, length, role))
    return tuple(entries)


def parse_manifest(
    payload: bytes,
    *,
    max_bytes: int = 256 * 1024,
    max_files: int = DEFAULT_MAX_FILES,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
) -> Manifest:
    """Parse manifest bytes strictly. Signatures are NOT checked here (see module docstring).

    Raises :class:`OversizeError` (bytes, file count, a file's length), :class:`UnsafeNameError`
    (a file name that is not plain) or :class:`MalformedError` (anything else).
    """
    if len(payload) > max_bytes:
        raise OversizeError(f"manifest of {len(payload)} bytes exceeds the {max_bytes}-byte cap")
    try:
        raw = strict_json_loads(payload)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise _bad("not UTF-8 JSON without duplicate keys") from None
    data = _obj(raw, "manifest",
                {"_type", "spec_version", "name", "version", "issued", "expires",
                 "min_agent_version", "targets", "files", "model", "smoke"},
                {"variants", "generation", "deltas"})
    if data["_type"] != MANIFEST_TYPE:
        raise _bad(f"_type must be {MANIFEST_TYPE!r}")
    if _int(data["spec_version"], "spec_version", 1) != SPEC_VERSION:
        raise _bad(f"spec_version {data['spec_version']} is not supported (this agent speaks "
                   f"{SPEC_VERSION}); upgrade the agent")
    name = data["name"]
    if not isinstance(name, str) or not MODEL_NAME_RE.match(name):
        raise _bad("name must be 1-64 characters of [a-z0-9_-], starting with a letter or digit")
    issued = _int(data["issued"], "issued", 0)
    expires = _int(data["expires"], "expires", 0)
    if expires <= issued:
        raise _bad("expires must be later than issued")
    min_agent = data["min_agent_version"]
    if not isinstance(min_agent, str) or not _VERSION_RE.match(min_agent):
        raise _bad("min_agent_version must be a dotted numeric version such as '0.1.0'")
    targets = _obj(data["targets"], "targets", {"device_classes"})
    classes = _list(targets["device_classes"], "targets.device_classes", _MAX_DEVICE_CLASSES)
    if not classes:
        raise _bad("targets.device_classes must name at least one device class")
    for device_class in classes:
        if not isinstance(device_class, str) or not DEVICE_CLASS_NAME_RE.match(device_class):
            raise _bad("targets.device_classes entries must be device class names like "
                       "'raspberry-pi-4'")
    files = _parse_files(data["files"], max_files=max_files, max_file_bytes=max_file_bytes)
    model = _parse_model(data["model"], "model")
    smoke = _parse_smoke(data["smoke"], "smoke")
    variants: list[Variant] = []
    for i, item in enumerate(_list(data.get("variants", []), "variants", _MAX_VARIANTS)):
        entry = _obj(item, f"variants[{i}]", {"name", "model", "smoke"})
        vname = entry["name"]
        if not isinstance(vname, str) or not VARIANT_NAME_RE.match(vname) or vname == "default":
            raise _bad(f"variants[{i}].name must be 1-32 characters of [a-z0-9_-], not 'default'")
        variants.append(Variant(vname, _parse_model(entry["model"], f"variants[{i}].model"),
                                _parse_smoke(entry["smoke"], f"variants[{i}].smoke")))
    manifest = Manifest(
        name=name,
        version=_int(data["version"], "version", 1),
        files=files,
        model=model,
        smoke=smoke,
        device_classes=tuple(classes),
        min_agent_version=min_agent,
        issued=issued,
        expires=expires,
        variants=tuple(variants),
        generation=(GenerationSpec.from_dict(data["generation"]) if "generation" in data
                    else None),
        deltas=_parse_deltas(data.get("deltas", [])),
        release_id=release_id(payload),
    )
    _check_references(manifest)
    return manifest


def _parse_deltas(value: Any) -> tuple[DeltaRef, ...]:
    refs = []
    for i, item in enumerate(_list(value, "deltas", MAX_DELTAS)):
        entry = _obj(item, f"deltas[{i}]", {"file", "base_sha256", "delta"})
        base = entry["base_sha256"]
        if not isinstance(base, str) or not _HEX64_RE.match(base):
            raise _bad(f"deltas[{i}].base_sha256 must be 64 lowercase hex digits")
        refs.append(DeltaRef(check_file_name(entry["file"]), base,
                             check_file_name(entry["delta"])))
    return tuple(refs)


def _check_deltas(manifest: Manifest) -> None:
    files = {f.name: f for f in manifest.files}
    used: set[str] = set()
    pairs: set[tuple[str, str]] = set()
    for i, ref in enumerate(manifest.deltas):
        target, delta = files.get(ref.file), files.get(ref.delta)
        if target is None or target.role == "delta":
            raise _bad(f"deltas[{i}].file {ref.file!r} is not a listed file (other than a delta)")
        if delta is None or delta.role != "delta":
            raise _bad(f"deltas[{i}].delta {ref.delta!r} is not a listed file of role 'delta'")
        if ref.delta in used:
            raise _bad(f"delta file {ref.delta!r} is used by two deltas entries")
        if (ref.file, ref.base_sha256) in pairs:
            raise _bad(f"two deltas rebuild {ref.file!r} from the same base")
        if ref.base_sha256 == target.sha256:
            raise _bad(f"deltas[{i}] rebuilds {ref.file!r} from itself")
        used.add(ref.delta)
        pairs.add((ref.file, ref.base_sha256))
    orphans = [n for n, f in files.items() if f.role == "delta" and n not in used]
    if orphans:
        raise _bad(f"delta file {orphans[0]!r} is not named by any deltas entry; drop it or add "
                   "its entry")


def _check_references(manifest: Manifest) -> None:
    roles = {f.name: f.role for f in manifest.files}
    if len({v.name for v in manifest.all_variants()}) != len(manifest.all_variants()):
        raise _bad("variant names must be unique")
    used: set[str] = set()
    for variant in manifest.all_variants():
        for ref, role in ((variant.model.file, "model"), (variant.smoke.file, "smoke")):
            if roles.get(ref) != role:
                raise _bad(f"variant {variant.name!r} refers to {ref!r}, which is not a listed "
                           f"file of role {role!r}")
        if variant.model.file in used:
            raise _bad(f"model file {variant.model.file!r} is used by two variants")
        used.add(variant.model.file)
    unused = [n for n, role in roles.items() if role == "model" and n not in used]
    if unused:
        raise _bad(f"model file {unused[0]!r} is not used by any variant")
    tokenizer = manifest.generation.tokenizer if manifest.generation is not None else None
    if tokenizer is not None and roles.get(tokenizer) != "tokenizer":
        raise _bad(f"generation.tokenizer refers to {tokenizer!r}, which is not a listed file of "
                   "role 'tokenizer'")
    unreferenced = [n for n, role in roles.items() if role == "tokenizer" and n != tokenizer]
    if unreferenced:
        raise _bad(f"tokenizer file {unreferenced[0]!r} is not referenced by generation."
                   "tokenizer; drop the file or add the generation metadata that uses it")
    _check_deltas(manifest)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_entry(name: str, content: bytes, role: str) -> FileEntry:
    """The manifest entry of ``content`` (for builders)."""
    return FileEntry(check_file_name(name), sha256_hex(content), len(content), role)

