"""Device class profiles: hardware facts, runtime preference, budgets and profiler defaults.

One YAML file per class, ``<device_class>.yaml``, lives in the profiles directory (see
:func:`default_profiles_dir`). Loading validates every key by hand and stops at the first problem
with a :class:`~fleetlite.sdk.errors.DeviceClassError` that names the file, the key and what to do.
"""

from __future__ import annotations

import difflib
import importlib.resources
import math
import os
import re
import reprlib
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, NoReturn, Optional, Union

import yaml

from fleetlite.sdk.errors import DeviceClassError

__all__ = [
    "ARCHES",
    "DELEGATES",
    "DEVICE_CLASS_NAME_RE",
    "PROFILES_ENV",
    "RUNTIMES",
    "SCHEMA_VERSION",
    "Budgets",
    "DeviceClass",
    "Hardware",
    "ProfilerDefaults",
    "RuntimePreference",
    "default_profiles_dir",
    "find_device_class",
    "load_device_class",
    "load_device_classes",
]

PathArg = Union[str, "os.PathLike[str]"]

SCHEMA_VERSION = 1
PROFILES_ENV = "FLEETLITE_DEVICE_PROFILES"
ARCHES = ("aarch64", "armv7l", "x86_64")
RUNTIMES = ("tflite-runtime", "ai-edge-litert")
DELEGATES = ("xnnpack", "none", "gpu")
# Device class names appear in file names, manifests and MQTT topics: keep them one plain level.
DEVICE_CLASS_NAME_RE = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*\Z")
_MAX_NAME_LENGTH = 64

_FIX_VALUE = "Fix the value in the file."


@dataclass(frozen=True)
class Hardware:
    """What the board is: CPU architecture and model, core count, RAM, optional accelerator."""

    arch: str
    cpu: str
    cores: int
    ram_mb: int
    accelerator: Optional[str]


@dataclass(frozen=True)
class RuntimePreference:
    """Which TFLite runtime and delegate to use, and the interpreter's default thread count."""

    prefer: str
    delegate: str
    default_threads: int


@dataclass(frozen=True)
class Budgets:
    """Limits a model must meet on this class (health checks and the OTA smoke test)."""

    max_p95_latency_ms: float
    max_first_inference_ms: float
    max_model_load_ms: float
    max_peak_rss_mb: float
    max_model_size_mb: float


@dataclass(frozen=True)
class ProfilerDefaults:
    """Benchmark loop: run while runs < min_runs or elapsed < min_seconds, up to either maximum."""

    warmup_runs: int
    min_runs: int
    max_runs: int
    min_seconds: float
    max_seconds: float


@dataclass(frozen=True)
class DeviceClass:
    """One validated device class profile; ``name`` is the YAML ``device_class`` key."""

    name: str
    description: str
    hardware: Hardware
    runtime: RuntimePreference
    budgets: Budgets
    profiler: ProfilerDefaults
    schema_version: int = SCHEMA_VERSION
    source: Optional[str] = field(default=None, compare=False)

    @classmethod
    def from_dict(
        cls,
        data: object,
        *,
        source: str = "<dict>",
        expected_name: Optional[str] = None,
    ) -> DeviceClass:
        """Validate parsed YAML; ``source`` names it in errors; ``expected_name`` is its stem."""
        return _Reader(source).device_class(data, expected_name)

    def to_dict(self) -> dict[str, Any]:
        """The profile in its YAML shape (``from_dict(to_dict())`` gives an equal object)."""
        return {
            "schema_version": self.schema_version,
            "device_class": self.name,
            "description": self.description,
            "hardware": asdict(self.hardware),
            "runtime": asdict(self.runtime),
            "budgets": asdict(self.budgets),
            "profiler": asdict(self.profiler),
        }


_TOP_KEYS = ("schema_version", "device_class", "description", "hardware", "runtime", "budgets",
             "profiler")
_TYPE_NAMES = {
    type(None): "null",
    bool: "a boolean",
    int: "an integer",
    float: "a number",
    str: "text",
    list: "a list",
    dict: "a mapping",
}


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 80
_REPR.maxlevel = 3


def _describe(value: object) -> str:
    """Show a bad value the way a reader of the YAML file recognises it."""
    if value is None:
        return "null (an empty value)"
    shown = _REPR.repr(value)  # bounded: a YAML alias bomb expands to gigabytes
    if len(shown) > 60:
        shown = shown[:57] + "..."
    kind = _TYPE_NAMES.get(type(value), type(value).__name__)
    return f"{shown} ({kind})"


class _Reader:
    """Reads one parsed profile; every failure names the source and the dotted key path."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, key: str, problem: str, fix: str = _FIX_VALUE) -> NoReturn:
        raise DeviceClassError(f"{self.source}: {key}: {problem}. {fix}", path=self.source, key=key)

    def device_class(self, data: object, expected_name: Optional[str]) -> DeviceClass:
        if not isinstance(data, dict):
            raise DeviceClassError(
                f"{self.source}: expected a mapping with the keys {', '.join(_TOP_KEYS)}, "
                f"got {_describe(data)}. Write the profile as 'key: value' lines.",
                path=self.source,
            )
        # The version decides which keys are valid, so it is checked before anything else.
        if "schema_version" not in data:
            self.fail("schema_version", "missing key",
                      f"Add 'schema_version: {SCHEMA_VERSION}' at the top of the file.")
        version = data["schema_version"]
        if type(version) is not int or version != SCHEMA_VERSION:
            self.fail("schema_version",
                      f"unsupported schema version {_describe(version)}; this FleetLite reads "
                      f"version {SCHEMA_VERSION}",
                      f"Set 'schema_version: {SCHEMA_VERSION}' or upgrade FleetLite.")
        top = self.mapping(data, "", _TOP_KEYS)
        name = self.device_class_name(top["device_class"], expected_name)
        description = self.text(top, "", "description")

        hw = self.mapping(top["hardware"], "hardware", _keys(Hardware))
        hardware = Hardware(
            arch=self.choice(hw, "hardware", "arch", ARCHES),
            cpu=self.text(hw, "hardware", "cpu"),
            cores=self.integer(hw, "hardware", "cores", minimum=1),
            ram_mb=self.integer(hw, "hardware", "ram_mb", minimum=1),
            accelerator=self.optional_text(hw, "hardware", "accelerator"),
        )

        rt = self.mapping(top["runtime"], "runtime", _keys(RuntimePreference))
        runtime = RuntimePreference(
            prefer=self.choice(rt, "runtime", "prefer", RUNTIMES),
            delegate=self.choice(rt, "runtime", "delegate", DELEGATES),
            default_threads=self.integer(rt, "runtime", "default_threads", minimum=1),
        )

        bd = self.mapping(top["budgets"], "budgets", _keys(Budgets))
        budgets = Budgets(
            max_p95_latency_ms=self.number(bd, "budgets", "max_p95_latency_ms"),
            max_first_inference_ms=self.number(bd, "budgets", "max_first_inference_ms"),
            max_model_load_ms=self.number(bd, "budgets", "max_model_load_ms"),
            max_peak_rss_mb=self.number(bd, "budgets", "max_peak_rss_mb"),
            max_model_size_mb=self.number(bd, "budgets", "max_model_size_mb"),
        )

        pf = self.mapping(top["profiler"], "profiler", _keys(ProfilerDefaults))
        profiler = ProfilerDefaults(
            warmup_runs=self.integer(pf, "profiler", "warmup_runs", minimum=0),
            min_runs=self.integer(pf, "profiler", "min_runs", minimum=1),
            max_runs=self.integer(pf, "profiler", "max_runs", minimum=1),
            min_seconds=self.number(pf, "profiler", "min_seconds", allow_zero=True),
            max_seconds=self.number(pf, "profiler", "max_seconds"),
        )

        self.check_consistency(hardware, runtime, budgets, profiler)
        return DeviceClass(name=name, description=description, hardware=hardware,
                           runtime=runtime, budgets=budgets, profiler=profiler,
                           schema_version=SCHEMA_VERSION, source=self.source)

    def check_consistency(self, hardware: Hardware, runtime: RuntimePreference,
                          budgets: Budgets, profiler: ProfilerDefaults) -> None:
        if runtime.default_threads > hardware.cores:
            self.fail("runtime.default_threads",
                      f"{runtime.default_threads} threads is more than hardware.cores "
                      f"({hardware.cores})", "Lower it to at most the core count.")
        if runtime.prefer == "ai-edge-litert" and hardware.arch == "armv7l":
            self.fail("runtime.prefer", "ai-edge-litert publishes no wheels for armv7l",
                      "Use 'tflite-runtime' on 32-bit ARM boards.")
        if runtime.delegate == "gpu" and hardware.accelerator is None:
            self.fail("runtime.delegate", "'gpu' needs an accelerator but hardware.accelerator "
                      "is null", "Name the accelerator or use 'xnnpack'.")
        if budgets.max_peak_rss_mb > hardware.ram_mb:
            self.fail("budgets.max_peak_rss_mb",
                      f"{budgets.max_peak_rss_mb:g} MB is more than hardware.ram_mb "
                      f"({hardware.ram_mb})", "Lower it below the board's RAM.")
        if budgets.max_model_size_mb > budgets.max_peak_rss_mb:
            self.fail("budgets.max_model_size_mb",
                      f"{budgets.max_model_size_mb:g} MB is more than budgets.max_peak_rss_mb "
                      f"({budgets.max_peak_rss_mb:g}); a model that size cannot run within it",
                      "Lower it or raise the memory budget.")
        if profiler.min_runs > profiler.max_runs:
            self.fail("profiler.min_runs",
                      f"{profiler.min_runs} is more than profiler.max_runs ({profiler.max_runs})",
                      "Make min_runs <= max_runs.")
        if profiler.min_seconds > profiler.max_seconds:
            self.fail("profiler.min_seconds",
                      f"{profiler.min_seconds:g} is more than profiler.max_seconds "
                      f"({profiler.max_seconds:g})", "Make min_seconds <= max_seconds.")

    # --- helpers: each reads one key of a mapping already checked by mapping() ---

    def mapping(self, value: object, path: str, keys: tuple[str, ...]) -> Mapping[str, object]:
        """Check ``value`` is a mapping with exactly ``keys``; ``path`` is its dotted key path."""
        if not isinstance(value, dict):
            self.fail(path, f"expected a mapping of {', '.join(keys)}, got {_describe(value)}",
                      "Write it as an indented block of 'key: value' lines.")
        for key in value:
            if not isinstance(key, str):
                self.fail(_join(path, str(key)), f"keys must be text, got {_describe(key)}",
                          "Rename the key.")
        for key in value:
            if key not in keys:
                close = difflib.get_close_matches(key, keys, n=1)
                hint = f"Did you mean '{close[0]}'? " if close else ""
                self.fail(_join(path, key), "unknown key",
                          f"{hint}Remove or rename it (allowed: {', '.join(keys)}).")
        for key in keys:
            if key not in value:
                self.fail(_join(path, key), "missing key", "Add it to the file.")
        return value

    def device_class_name(self, value: object, expected_name: Optional[str]) -> str:
        if not isinstance(value, str) or not _is_valid_name(value):
            self.fail("device_class",
                      f"expected a name of lower-case letters, digits and single hyphens "
                      f"(at most {_MAX_NAME_LENGTH} characters), got {_describe(value)}")
        if expected_name is not None and value != expected_name:
            self.fail("device_class",
                      f"'{value}' does not match the file name '{expected_name}'",
                      f"Set 'device_class: {expected_name}' or rename the file to {value}.yaml.")
        return value

    def text(self, m: Mapping[str, object], path: str, key: str) -> str:
        value = m[key]
        if not isinstance(value, str) or not value.strip():
            self.fail(_join(path, key), f"expected non-empty text, got {_describe(value)}")
        return value

    def optional_text(self, m: Mapping[str, object], path: str, key: str) -> Optional[str]:
        value = m[key]
        if value is None:
            return None
        if not isinstance(value, str) or not value.strip():
            self.fail(_join(path, key), f"expected non-empty text or null, got {_describe(value)}")
        return value

    def choice(self, m: Mapping[str, object], path: str, key: str,
               choices: tuple[str, ...]) -> str:
        value = m[key]
        if not isinstance(value, str) or value not in choices:
            self.fail(_join(path, key),
                      f"expected one of {', '.join(choices)}, got {_describe(value)}",
                      "Use one of the listed values.")
        return value

    def integer(self, m: Mapping[str, object], path: str, key: str, *, minimum: int) -> int:
        value = m[key]
        wanted = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        # bool is an int subclass in Python; 'true' is never a valid count.
        if type(value) is not int or value < minimum:
            self.fail(_join(path, key), f"expected {wanted}, got {_describe(value)}")
        return value

    def number(self, m: Mapping[str, object], path: str, key: str, *,
               allow_zero: bool = False) -> float:
        value = m[key]
        wanted = "a number >= 0" if allow_zero else "a positive number"
        # Compared before float(): an integer beyond a double's range must not overflow.
        if (isinstance(value, bool) or not isinstance(value, (int, float))
                or not -sys.float_info.max <= value <= sys.float_info.max):
            self.fail(_join(path, key), f"expected {wanted}, got {_describe(value)}")
        number = float(value)
        if not math.isfinite(number) or number < 0 or (number == 0 and not allow_zero):
            self.fail(_join(path, key), f"expected {wanted}, got {_describe(value)}")
        return number


def _keys(section: type) -> tuple[str, ...]:
    """The YAML keys of a section are the field names of its dataclass."""
    return tuple(f.name for f in fields(section))


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _is_valid_name(name: str) -> bool:
    return len(name) <= _MAX_NAME_LENGTH and DEVICE_CLASS_NAME_RE.match(name) is not None


def _parse_yaml(text: str, source: str) -> object:
    """``yaml.safe_load`` with errors that carry the line, plus a duplicate-key check."""
    try:
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or exc.context or "syntax error"
        if mark is None:
            raise DeviceClassError(f"{source}: invalid YAML: {problem}. Fix the YAML syntax.",
                                   path=source) from exc
        line = mark.line + 1
        raise DeviceClassError(
            f"{source}: line {line}, column {mark.column + 1}: invalid YAML: {problem}. "
            "Fix the YAML syntax at that line.",
            path=source, line=line,
        ) from exc
    except yaml.YAMLError as exc:
        raise DeviceClassError(f"{source}: invalid YAML: {exc}. Fix the file.",
                               path=source) from exc
    except RecursionError as exc:
        raise DeviceClassError(f"{source}: invalid YAML: nested too deeply. Flatten the file.",
                               path=source) from exc
    except ValueError as exc:  # a tagged or implicit value that cannot be built: 2024-13-01
        raise DeviceClassError(f"{source}: invalid YAML value ({_REPR.repr(str(exc))}). Fix it, "
                               "or quote it to make it text.", path=source) from exc
    # safe_load keeps the last of two equal keys silently; a budget given twice is a mistake.
    _check_duplicate_keys(yaml.compose(text, Loader=yaml.SafeLoader), "", source, set())
    return data


def _check_duplicate_keys(node: Optional[yaml.Node], path: str, source: str,
                          checked: set[int]) -> None:
    # An alias is the node it names: check each node once, or an alias bomb takes forever.
    if id(node) in checked:
        return
    checked.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _check_duplicate_keys(item, path, source, checked)
    if not isinstance(node, yaml.MappingNode):
        return
    seen: set[tuple[str, str]] = set()
    for key_node, value_node in node.value:
        key = str(key_node.value) if isinstance(key_node, yaml.ScalarNode) else "?"
        key_path = _join(path, key)
        if isinstance(key_node, yaml.ScalarNode):
            if (key_node.tag, key_node.value) in seen:
                line = key_node.start_mark.line + 1
                raise DeviceClassError(
                    f"{source}: line {line}: {key_path}: duplicate key. "
                    "Keep only one of the entries.",
                    path=source, key=key_path, line=line,
                )
            seen.add((key_node.tag, key_node.value))
        _check_duplicate_keys(value_node, key_path, source, checked)


def load_device_class(path: PathArg) -> DeviceClass:
    """Load and validate one profile file; its ``device_class`` must equal the file stem."""
    file = Path(path)
    source = str(path)
    try:
        raw = file.read_bytes()
    except FileNotFoundError:
        raise DeviceClassError(f"{source}: file not found. Check the path or the device class "
                               "name.", path=source) from None
    except OSError as exc:
        raise DeviceClassError(f"{source}: cannot read the file ({exc.strerror or exc}). "
                               "Check that it is a readable file.", path=source) from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DeviceClassError(f"{source}: not UTF-8 text (byte {exc.start}). Save the file as "
                               "UTF-8.", path=source) from exc
    data = _parse_yaml(text, source)
    if data is None:
        raise DeviceClassError(f"{source}: the file is empty. Write the profile into it, e.g. by "
                               "copying another file in the same directory.", path=source)
    return DeviceClass.from_dict(data, source=source, expected_name=file.stem)


def default_profiles_dir() -> Path:
    """Where profiles are read from when no directory is given.

    ``$FLEETLITE_DEVICE_PROFILES`` if set; else ``device_profiles/`` next to the package source
    (a checkout, or the installed ``fleetlite/device_profiles``); else the installed package data
    ``fleetlite.device_profiles``.
    """
    env = os.environ.get(PROFILES_ENV)
    if env:
        return Path(env).expanduser()
    beside_source = Path(__file__).resolve().parent.parent / "device_profiles"
    if beside_source.is_dir():
        return beside_source
    try:
        return Path(str(importlib.resources.files("fleetlite.device_profiles")))
    except ModuleNotFoundError:
        raise DeviceClassError(
            "no device profiles directory: fleetlite.device_profiles is not installed. "
            f"Reinstall fleetlite or set {PROFILES_ENV} to a directory of profiles."
        ) from None


def _profiles_dir(directory: Optional[PathArg]) -> Path:
    folder = default_profiles_dir() if directory is None else Path(directory)
    if not folder.is_dir():
        raise DeviceClassError(
            f"{folder}: device profiles directory not found. Pass an existing directory or set "
            f"{PROFILES_ENV}.", path=str(folder)
        )
    return folder


def _profile_files(folder: Path) -> list[Path]:
    files = []
    for file in sorted(folder.iterdir()):
        if file.name.startswith(".") or not file.is_file():
            continue
        if file.suffix == ".yml":
            raise DeviceClassError(f"{file}: profiles must end in .yaml, this one is skipped "
                                   f"otherwise. Rename it to {file.stem}.yaml.", path=str(file))
        if file.suffix == ".yaml":
            files.append(file)
    return files


def load_device_classes(directory: Optional[PathArg] = None) -> dict[str, DeviceClass]:
    """Load every ``*.yaml`` profile of ``directory`` (default: :func:`default_profiles_dir`)."""
    classes = (load_device_class(file) for file in _profile_files(_profiles_dir(directory)))
    return {device_class.name: device_class for device_class in classes}


def find_device_class(name: str, directory: Optional[PathArg] = None) -> DeviceClass:
    """Load the profile of one device class by name, e.g. ``raspberry-pi-4``."""
    if not isinstance(name, str) or not _is_valid_name(name):
        raise DeviceClassError(
            f"{name!r} is not a device class name. Use lower-case letters, digits and single "
            "hyphens, e.g. 'raspberry-pi-4'."
        )
    folder = _profiles_dir(directory)
    file = folder / f"{name}.yaml"
    if not file.is_file():
        known = ", ".join(f.stem for f in _profile_files(folder)) or "(none)"
        raise DeviceClassError(
            f"{folder}: no device class {name!r}; known: {known}. Use one of these or add "
            f"{name}.yaml.", path=str(folder)
        )
    return load_device_class(file)
