"""``agent.yaml``: the device agent's configuration, parsed and validated.

Errors name the file, the key and the fix (:class:`AgentConfigError`). Parsing is a pure function
over the loaded mapping (:func:`parse_config`); :func:`load_config` adds the file I/O.
"""

from __future__ import annotations

import reprlib
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fleetlite.agent.errors import AgentConfigError
from fleetlite.sdk.topics import TopicError, validate_device_id

EXAMPLE = """\
device_id: gw-0001               # unique; letters, digits, - _ .
device_class: raspberry-pi-4     # a file in device_profiles/ (without .yaml)
tags: {site: plant-7}
broker:
  host: mqtt.example.net
  port: 8883
  tls: {ca: /etc/fleetlite/ca.pem, cert: /etc/fleetlite/device.pem, key: /etc/fleetlite/device.key}
state_dir: /var/lib/fleetlite
socket: /run/fleetlite/agent.sock
trust_root: /etc/fleetlite/root.json   # the fleet's signed root of trust (for OTA)
"""


@dataclass(frozen=True)
class TlsConfig:
    ca: Path
    cert: Path | None = None
    key: Path | None = None
    insecure_skip_hostname: bool = False


@dataclass(frozen=True)
class BrokerConfig:
    host: str = "localhost"
    port: int = 1883
    keepalive_s: int = 30
    tls: TlsConfig | None = None
    username: str | None = None
    password: str | None = None


@dataclass(frozen=True)
class ModelEntry:
    """A model to serve at start-up (before any OTA install). One with a ``tokenizer`` is a
    generative language model, served to the local API's ``generate``: its prompt template
    and stop ids (default: the tokenizer's end-of-sequence id) complete its metadata."""

    name: str
    path: Path
    version: int | None = None
    tokenizer: Path | None = None
    prompt_template: str = "{prompt}"
    stop_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class AgentConfig:
    device_id: str
    device_class: str
    state_dir: Path
    broker: BrokerConfig = field(default_factory=BrokerConfig)
    tags: dict[str, str] = field(default_factory=dict)
    socket: Path | None = None
    telemetry_interval_s: float = 60.0
    reconnect_min_s: float = 1.0
    reconnect_max_s: float = 60.0
    threads: int | None = None
    models: tuple[ModelEntry, ...] = ()
    spool_max_records: int = 10_000
    spool_max_mb: float = 16.0
    profile_on_model_change: bool = True
    trust_root: Path | None = None
    ota: dict[str, float] = field(default_factory=dict)
    source: Path | None = None

    @property
    def spool_dir(self) -> Path:
        return self.state_dir / "spool"


_TOP_KEYS = {
    "device_id", "device_class", "tags", "broker", "state_dir", "socket", "intervals",
    "threads", "models", "spool", "profile_on_model_change", "trust_root", "ota",
}
_OTA_KEYS = {
    "manifest_timeout_s", "chunk_idle_s", "max_requests_without_progress",
    "download_deadline_s", "smoke_timeout_s", "health_inferences", "health_timeout_s",
    "ended_memory_s", "shadow_report_s",
}
_BROKER_KEYS = {"host", "port", "keepalive_s", "tls", "username", "password"}
_TLS_KEYS = {"ca", "cert", "key", "insecure_skip_hostname"}
_INTERVAL_KEYS = {"telemetry_s", "reconnect_min_s", "reconnect_max_s"}
_SPOOL_KEYS = {"max_records", "max_mb"}
_MODEL_KEYS = {"name", "path", "version", "tokenizer", "prompt_template", "stop_ids"}
# Bad values are shown shortened: a YAML alias bomb expands to gigabytes when printed in full.
_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 80
_REPR.maxlevel = 3


def _shown(value: Any) -> str:
    return _REPR.repr(value)


class _Reader:
    """Typed access to a nested mapping that reports errors as ``origin: key.path: problem``."""

    def __init__(self, origin: str) -> None:
        self.origin = origin

    def fail(self, key: str, problem: str) -> AgentConfigError:
        return AgentConfigError(f"{self.origin}: {key}: {problem}")

    def mapping(self, value: Any, key: str, allowed: set[str]) -> Mapping[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise self.fail(key, f"expected a mapping, got {type(value).__name__}")
        unknown = sorted(str(k) for k in set(value) - allowed)  # YAML keys may be numbers
        if unknown:
            raise self.fail(
                f"{key}.{unknown[0]}" if key else unknown[0],
                f"unknown key; allowed keys here are: {', '.join(sorted(allowed))}",
            )
        return value

    def string(self, data: Mapping[str, Any], key: str, path: str, default: str | None = None,
               required: bool = False) -> str | None:
        if key not in data or data[key] is None:
            if required:
                raise self.fail(path, "is required; add it to the file")
            return default
        value = data[key]
        if not isinstance(value, str) or not value:
            raise self.fail(path, f"expected a non-empty string, got {_shown(value)}")
        return value

    def number(self, data: Mapping[str, Any], key: str, path: str, default: float,
               minimum: float = 0.0, exclusive: bool = True) -> float:
        if key not in data:
            return default
        value = data[key]
        # Compared before float(): .nan, .inf and integers beyond a double's range are refused.
        ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
              and -sys.float_info.max <= value <= sys.float_info.max)
        if not ok or (value <= minimum if exclusive else value < minimum):
            bound = f"> {minimum:g}" if exclusive else f">= {minimum:g}"
            raise self.fail(path, f"expected a finite number {bound}, got {_shown(value)}")
        return float(value)

    def integer(self, data: Mapping[str, Any], key: str, path: str, default: int | None,
                low: int, high: int) -> int | None:
        if key not in data or data[key] is None:
            return default
        value = data[key]
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise self.fail(path, f"expected an integer from {low} to {high}, got {_shown(value)}")
        return value


def _path(value: str, base: Path | None) -> Path:
    try:
        path = Path(value).expanduser()
    except (RuntimeError, ValueError):  # ~user of an unknown user, or a NUL byte
        raise AgentConfigError(f"path {_shown(value)}: cannot expand '~' (no such user, or a "
                               "NUL byte); write the path in full") from None
    return path if path.is_absolute() or base is None else base / path


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except (OSError, ValueError):  # e.g. a name too long for the file system
        return False


def parse_config(data: Any, *, origin: str = "agent.yaml", base: Path | None = None) -> AgentConfig:
    """Validate a loaded YAML document; relative paths resolve against ``base``."""
    r = _Reader(origin)
    if not isinstance(data, Mapping):
        raise AgentConfigError(
            f"{origin}: expected a mapping of settings, e.g.\n{EXAMPLE}"
        )
    top = r.mapping(data, "", _TOP_KEYS)
    device_id = r.string(top, "device_id", "device_id", required=True)
    assert device_id is not None
    try:
        validate_device_id(device_id)
    except TopicError as exc:
        raise r.fail("device_id", str(exc)) from exc
    device_class = r.string(top, "device_class", "device_class", required=True)
    assert device_class is not None
    state_dir = r.string(top, "state_dir", "state_dir", required=True)
    assert state_dir is not None

    tags_value = top.get("tags")
    tags_raw = r.mapping(tags_value, "tags",
                         set(tags_value) if isinstance(tags_value, Mapping) else set())
    tags: dict[str, str] = {}
    for key, value in tags_raw.items():
        if not isinstance(key, str) or not isinstance(value, (str, int, float)):
            raise r.fail(f"tags.{key}", "tags map names to strings, e.g. tags: {site: plant-7}")
        tags[key] = str(value)

    b = r.mapping(top.get("broker"), "broker", _BROKER_KEYS)
    tls_cfg: TlsConfig | None = None
    if b.get("tls") is not None:
        t = r.mapping(b["tls"], "broker.tls", _TLS_KEYS)
        ca = r.string(t, "ca", "broker.tls.ca", required=True)
        assert ca is not None
        cert = r.string(t, "cert", "broker.tls.cert")
        key_file = r.string(t, "key", "broker.tls.key")
        if (cert is None) != (key_file is None):
            raise r.fail("broker.tls", "give both cert and key (the device's client certificate)")
        skip = t.get("insecure_skip_hostname", False)
        if not isinstance(skip, bool):
            raise r.fail("broker.tls.insecure_skip_hostname", "expected true or false")
        tls_cfg = TlsConfig(
            ca=_path(ca, base),
            cert=_path(cert, base) if cert else None,
            key=_path(key_file, base) if key_file else None,
            insecure_skip_hostname=skip,
        )
        for label, file in (("ca", tls_cfg.ca), ("cert", tls_cfg.cert), ("key", tls_cfg.key)):
            if file is not None and not _is_file(file):
                raise r.fail(f"broker.tls.{label}", f"file {file} does not exist")
    default_port = 8883 if tls_cfg else 1883
    port = r.integer(b, "port", "broker.port", default_port, 1, 65535)
    keepalive = r.integer(b, "keepalive_s", "broker.keepalive_s", 30, 5, 3600)
    broker = BrokerConfig(
        host=r.string(b, "host", "broker.host", "localhost") or "localhost",
        port=port or default_port,
        keepalive_s=keepalive or 30,
        tls=tls_cfg,
        username=r.string(b, "username", "broker.username"),
        password=r.string(b, "password", "broker.password"),
    )

    iv = r.mapping(top.get("intervals"), "intervals", _INTERVAL_KEYS)
    reconnect_min = r.number(iv, "reconnect_min_s", "intervals.reconnect_min_s", 1.0)
    reconnect_max = r.number(iv, "reconnect_max_s", "intervals.reconnect_max_s", 60.0)
    if reconnect_max < reconnect_min:
        raise r.fail("intervals.reconnect_max_s", "must be >= intervals.reconnect_min_s")

    sp = r.mapping(top.get("spool"), "spool", _SPOOL_KEYS)

    models_raw = top.get("models") or []
    if not isinstance(models_raw, list):
        raise r.fail("models", "expected a list of {name, path} entries")
    models = []
    for i, entry in enumerate(models_raw):
        m = r.mapping(entry, f"models[{i}]", _MODEL_KEYS)
        name = r.string(m, "name", f"models[{i}].name", required=True)
        mpath = r.string(m, "path", f"models[{i}].path", required=True)
        assert name is not None and mpath is not None
        tokenizer = r.string(m, "tokenizer", f"models[{i}].tokenizer")
        template = r.string(m, "prompt_template", f"models[{i}].prompt_template", "{prompt}")
        if template is None or template.count("{prompt}") != 1:
            raise r.fail(f"models[{i}].prompt_template", "must hold {prompt} exactly once")
        stop_raw = m.get("stop_ids", [])
        if not isinstance(stop_raw, list) or not all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in stop_raw):
            raise r.fail(f"models[{i}].stop_ids", "expected a list of token ids (integers >= 0)")
        if tokenizer is None and ("prompt_template" in m or "stop_ids" in m):
            raise r.fail(f"models[{i}].tokenizer", "a language model needs its tokenizer file")
        models.append(
            ModelEntry(
                name=name,
                path=_path(mpath, base),
                version=r.integer(m, "version", f"models[{i}].version", None, 0, 2**53),
                tokenizer=_path(tokenizer, base) if tokenizer is not None else None,
                prompt_template=template,
                stop_ids=tuple(stop_raw),
            )
        )

    ota_raw = r.mapping(top.get("ota"), "ota", _OTA_KEYS)
    ota = {key: r.number(ota_raw, key, f"ota.{key}", 0.0) for key in ota_raw}
    trust_root = r.string(top, "trust_root", "trust_root")
    if trust_root is not None and not _is_file(_path(trust_root, base)):
        raise r.fail("trust_root", f"file {_path(trust_root, base)} does not exist; copy the "
                     "fleet's root.json there (fleetlite keys root init makes one)")
    socket = r.string(top, "socket", "socket")
    profile_flag = top.get("profile_on_model_change", True)
    if not isinstance(profile_flag, bool):
        raise r.fail("profile_on_model_change", "expected true or false")
    return AgentConfig(
        device_id=device_id,
        device_class=device_class,
        state_dir=_path(state_dir, base),
        broker=broker,
        tags=tags,
        socket=_path(socket, base) if socket else None,
        telemetry_interval_s=r.number(iv, "telemetry_s", "intervals.telemetry_s", 60.0),
        reconnect_min_s=reconnect_min,
        reconnect_max_s=reconnect_max,
        threads=r.integer(top, "threads", "threads", None, 1, 256),
        models=tuple(models),
        spool_max_records=r.integer(sp, "max_records", "spool.max_records", 10_000, 1, 10**8)
        or 10_000,
        spool_max_mb=r.number(sp, "max_mb", "spool.max_mb", 16.0),
        profile_on_model_change=profile_flag,
        trust_root=_path(trust_root, base) if trust_root else None,
        ota=ota,
    )


def load_config(path: str | Path) -> AgentConfig:
    """Read and validate ``agent.yaml``."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError as exc:
        raise AgentConfigError(
            f"{path}: no such config file; create one, for example:\n{EXAMPLE}"
        ) from exc
    except OSError as exc:
        raise AgentConfigError(f"{path}: cannot read the config file ({exc.strerror})") from exc
    except UnicodeDecodeError as exc:
        raise AgentConfigError(f"{path}: not UTF-8 text (byte {exc.start}); save the file as "
                               "UTF-8") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise AgentConfigError(f"{path}: invalid YAML{where}: {exc}") from exc
    except RecursionError as exc:
        raise AgentConfigError(f"{path}: invalid YAML: nested too deeply; flatten the "
                               "file") from exc
    except ValueError as exc:  # a tagged or implicit value that cannot be built: 2024-13-01
        raise AgentConfigError(f"{path}: invalid YAML value ({_shown(str(exc))}); fix it, or "
                               "quote it to make it a string") from exc
    config = parse_config(data, origin=str(path), base=path.parent.resolve())
    return _with_source(config, path)


def _with_source(config: AgentConfig, path: Path) -> AgentConfig:
    from dataclasses import replace

    return replace(config, source=path.resolve())
