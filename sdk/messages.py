"""Versioned JSON message schemas shared by the agent and the fleet side.

Every message is a JSON object with a ``schema`` field naming its type and version
(``fleetlite.status/1``). Decoding checks, in this order: size cap, UTF-8, JSON (no NaN or
Infinity, no number beyond a double, no key twice in one object), object, nesting depth, schema
name and version, then each field's presence, type and range. Unknown fields are ignored. An
integer field takes only a JSON number written without fraction or exponent (``7``, not
``7.0``); a float field takes any JSON number. A failure raises :class:`MessageError` with a
machine-readable ``code`` that the agent echoes in its error responses.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, TypeVar

from fleetlite.sdk.errors import FleetLiteError

MAX_COMMAND_BYTES = 16 * 1024
MAX_REPORT_BYTES = 256 * 1024
MAX_ID_LENGTH = 64
MAX_TEXT_LENGTH = 2048
# Integers are signed 64-bit (the fleet store's BIGINT columns): a larger one is a bad value at
# parse time, not a store error later.
MIN_INT = -(2**63)
MAX_INT = 2**63 - 1
# A ``ts`` is Unix seconds from 1970 to the end of year 9999, the range a date can be shown in.
MAX_TS = 253_402_300_799.0
#: objects and lists nest at most this deep (a parsed message must stay cheap to re-encode)
MAX_DEPTH = 32
_MAX_FLOAT = sys.float_info.max

# Reason codes of MessageError; part of the protocol (docs/protocol.md).
OVERSIZE = "oversize"
MALFORMED = "malformed"
WRONG_SCHEMA = "wrong_schema"
MISSING_FIELD = "missing_field"
BAD_TYPE = "bad_type"
BAD_VALUE = "bad_value"


class MessageError(FleetLiteError):
    """A message failed validation; ``code`` says how (see the reason codes above)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def decode_object(payload: bytes, schema: str, *, max_bytes: int) -> dict[str, Any]:
    """Bytes -> dict, checking size, encoding, JSON, object-ness and the schema tag."""
    if len(payload) > max_bytes:
        raise MessageError(OVERSIZE, f"message of {len(payload)} bytes exceeds {max_bytes} bytes")
    try:
        data = json.loads(payload.decode("utf-8"), parse_constant=_reject_constant,
                          parse_float=_finite_float, object_pairs_hook=_no_duplicate_keys)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise MessageError(MALFORMED, f"message is not valid UTF-8 JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise MessageError(MALFORMED, f"message must be a JSON object, got {type(data).__name__}")
    if _nests_deeper(data, MAX_DEPTH):
        raise MessageError(MALFORMED, f"message nests objects/lists more than {MAX_DEPTH} levels "
                           "deep; send a flatter message")
    got = data.get("schema")
    if got != schema:
        name = schema.split("/", maxsplit=1)[0]
        if isinstance(got, str) and got.split("/")[0] == name:
            raise MessageError(
                WRONG_SCHEMA,
                f"unsupported version {got!r}; this side speaks {schema!r}: upgrade the older one",
            )
        raise MessageError(WRONG_SCHEMA, f"expected a {schema!r} message, got schema {got!r}")
    return data


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # JSON parsers disagree on which of two equal keys wins; a message must mean one thing.
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("an object has the same key twice")
    return result


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # e.g. 1e400: JSON has no infinity
        raise ValueError(f"number {text[:40]} is out of the range of a double")
    return value


def _nests_deeper(data: Any, limit: int) -> bool:
    stack = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            if depth > limit:
                return True
            children = value.values() if isinstance(value, dict) else value
            stack.extend((child, depth + 1) for child in children)
    return False


def encode(data: Mapping[str, Any]) -> bytes:
    """Compact, key-sorted JSON bytes (deterministic, so test vectors are stable)."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def get_str(data: Mapping[str, Any], key: str, *, max_len: int = MAX_TEXT_LENGTH,
            optional: bool = False, default: str = "") -> str:
    if key not in data:
        if optional:
            return default
        raise MessageError(MISSING_FIELD, f"field {key!r} is required")
    value = data[key]
    if not isinstance(value, str):
        raise MessageError(BAD_TYPE, f"field {key!r} must be a string, got {type(value).__name__}")
    if len(value) > max_len:
        raise MessageError(BAD_VALUE, f"field {key!r} is longer than {max_len} characters")
    return value


def get_int(data: Mapping[str, Any], key: str, *, optional: bool = False, default: int = 0,
            minimum: int | None = None, maximum: int = MAX_INT) -> int:
    """An integer from ``minimum`` (default: the signed 64-bit minimum) to ``maximum``."""
    if key not in data:
        if optional:
            return default
        raise MessageError(MISSING_FIELD, f"field {key!r} is required")
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, int):
        kind = type(value).__name__
        raise MessageError(BAD_TYPE, f"field {key!r} must be an integer, got {kind}")
    if minimum is not None and value < minimum:
        raise MessageError(BAD_VALUE, f"field {key!r} must be >= {minimum}, got "
                                      f"{_int_text(value)}")
    if not MIN_INT <= value <= maximum:
        low = MIN_INT if minimum is None else minimum
        raise MessageError(BAD_VALUE, f"field {key!r} must be within {low}..{maximum} (a "
                                      f"signed 64-bit integer), got {_int_text(value)}")
    return value


def _int_text(value: int) -> str:
    """An integer for an error message: thousands of digits are named by their size."""
    return str(value) if abs(value) < 10**30 else f"an integer of {value.bit_length()} bits"


def get_float(data: Mapping[str, Any], key: str, *, optional: bool = False,
              default: float = 0.0) -> float:
    if key not in data:
        if optional:
            return default
        raise MessageError(MISSING_FIELD, f"field {key!r} is required")
    value = data[key]
    # Compared, not math.isfinite(): an integer beyond a double's range must not overflow.
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or not -_MAX_FLOAT <= value <= _MAX_FLOAT):
        raise MessageError(BAD_TYPE, f"field {key!r} must be a finite number, got {value!r:.40}")
    return float(value)


def get_ts(data: Mapping[str, Any], key: str = "ts") -> float:
    """A Unix time in seconds, from 0 to :data:`MAX_TS` (the end of year 9999)."""
    value = get_float(data, key)
    if not 0.0 <= value <= MAX_TS:
        raise MessageError(BAD_VALUE, f"field {key!r} must be Unix seconds within 0..{MAX_TS:.0f} "
                                      f"(1970 to the end of 9999), got {value!r}")
    return value


def get_bool(data: Mapping[str, Any], key: str) -> bool:
    if key not in data:
        raise MessageError(MISSING_FIELD, f"field {key!r} is required")
    value = data[key]
    if not isinstance(value, bool):
        raise MessageError(BAD_TYPE, f"field {key!r} must be true or false")
    return value


def get_dict(data: Mapping[str, Any], key: str, *, optional: bool = False) -> dict[str, Any]:
    if key not in data:
        if optional:
            return {}
        raise MessageError(MISSING_FIELD, f"field {key!r} is required")
    value = data[key]
    if not isinstance(value, dict):
        raise MessageError(BAD_TYPE, f"field {key!r} must be an object, got {type(value).__name__}")
    return value


def get_list(data: Mapping[str, Any], key: str, *, optional: bool = False) -> list[Any]:
    if key not in data:
        if optional:
            return []
        raise MessageError(MISSING_FIELD, f"field {key!r} is required")
    value = data[key]
    if not isinstance(value, list):
        raise MessageError(BAD_TYPE, f"field {key!r} must be a list, got {type(value).__name__}")
    return value


M = TypeVar("M", bound="Message")


@dataclass(frozen=True)
class Message:
    """Base of the schema dataclasses: ``to_json``/``from_json`` with validation."""

    SCHEMA: ClassVar[str] = ""
    MAX_BYTES: ClassVar[int] = MAX_REPORT_BYTES

    def to_dict(self) -> dict[str, Any]:
        return {"schema": self.SCHEMA, **asdict(self)}

    def to_json(self) -> bytes:
        return encode(self.to_dict())

    @classmethod
    def from_json(cls: type[M], payload: bytes) -> M:
        return cls.from_dict(decode_object(payload, cls.SCHEMA, max_bytes=cls.MAX_BYTES))

    @classmethod
    def from_dict(cls: type[M], data: Mapping[str, Any]) -> M:
        raise NotImplementedError


@dataclass(frozen=True)
class Status(Message):
    """Retained online/offline state. The Last Will carries ``online=False, reason='lost'``.

    ``session`` increases on every agent start and ``conn`` on every connection within a
    session (from 1; 0 from agents that predate it), so a late Will of an older session or of an
    earlier connection can be told apart from the current state (the Sparkplug bdSeq idea).
    """

    SCHEMA: ClassVar[str] = "fleetlite.status/1"

    device_id: str
    online: bool
    session: int
    ts: float
    reason: str = ""
    conn: int = 0

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Status:
        return cls(
            device_id=get_str(data, "device_id", max_len=MAX_ID_LENGTH),
            online=get_bool(data, "online"),
            session=get_int(data, "session", minimum=0),
            ts=get_ts(data),
            reason=get_str(data, "reason", optional=True),
            conn=get_int(data, "conn", optional=True, minimum=0),
        )


@dataclass(frozen=True)
class Birth(Message):
    """Retained on every connect: device facts, class, tags and the active model(s)."""

    SCHEMA: ClassVar[str] = "fleetlite.birth/1"

    device_id: str
    session: int
    ts: float
    device_class: str
    agent_version: str
    tags: dict[str, str] = field(default_factory=dict)
    facts: dict[str, Any] = field(default_factory=dict)
    models: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Birth:
        tags = get_dict(data, "tags", optional=True)
        if not all(isinstance(v, str) for v in tags.values()):
            raise MessageError(BAD_TYPE, "field 'tags' must map strings to strings")
        return cls(
            device_id=get_str(data, "device_id", max_len=MAX_ID_LENGTH),
            session=get_int(data, "session", minimum=0),
            ts=get_ts(data),
            device_class=get_str(data, "device_class", max_len=MAX_ID_LENGTH),
            agent_version=get_str(data, "agent_version", max_len=MAX_ID_LENGTH),
            tags=tags,
            facts=get_dict(data, "facts", optional=True),
            models=get_list(data, "models", optional=True),
        )


@dataclass(frozen=True)
class Telemetry(Message):
    """Periodic statistics. ``seq`` counts reports per session so gaps can be seen."""

    SCHEMA: ClassVar[str] = "fleetlite.telemetry/1"

    device_id: str
    session: int
    seq: int
    ts: float
    system: dict[str, Any]
    models: dict[str, Any]
    spool: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Telemetry:
        return cls(
            device_id=get_str(data, "device_id", max_len=MAX_ID_LENGTH),
            session=get_int(data, "session", minimum=0),
            seq=get_int(data, "seq", minimum=0),
            ts=get_ts(data),
            system=get_dict(data, "system"),
            models=get_dict(data, "models"),
            spool=get_dict(data, "spool", optional=True),
        )


@dataclass(frozen=True)
class Event(Message):
    """Something an operator should see: a rejected command, a model error, a dropped report."""

    SCHEMA: ClassVar[str] = "fleetlite.event/1"

    device_id: str
    ts: float
    kind: str
    message: str
    detail: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Event:
        return cls(
            device_id=get_str(data, "device_id", max_len=MAX_ID_LENGTH),
            ts=get_ts(data),
            kind=get_str(data, "kind", max_len=MAX_ID_LENGTH),
            message=get_str(data, "message"),
            detail=get_dict(data, "detail", optional=True),
        )


@dataclass(frozen=True)
class Command(Message):
    """A command to one device. ``id`` is the correlation id echoed in the response."""

    SCHEMA: ClassVar[str] = "fleetlite.command/1"
    MAX_BYTES: ClassVar[int] = MAX_COMMAND_BYTES

    id: str
    command: str
    args: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Command:
        command_id = get_str(data, "id", max_len=MAX_ID_LENGTH)
        if not command_id:
            raise MessageError(BAD_VALUE, "field 'id' must not be empty")
        return cls(
            id=command_id,
            command=get_str(data, "command", max_len=MAX_ID_LENGTH),
            args=get_dict(data, "args", optional=True),
        )


@dataclass(frozen=True)
class CommandResponse(Message):
    """The answer to a command: ``ok`` with a ``result``, or an ``error`` with a code."""

    SCHEMA: ClassVar[str] = "fleetlite.command_response/1"

    id: str
    device_id: str
    ok: bool
    ts: float
    result: dict[str, Any] = field(default_factory=dict)
    error_code: str = ""
    error: str = ""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CommandResponse:
        """``ok`` and ``error_code`` must agree: a success has no code (``""`` or absent), a
        failure has one; a failure's ``result`` is ignored (producers write ``{}``)."""
        ok = get_bool(data, "ok")
        error_code = get_str(data, "error_code", optional=True, max_len=MAX_ID_LENGTH)
        if ok and error_code:
            raise MessageError(BAD_VALUE, f"an ok response must not carry an error_code, got "
                                          f"{error_code!r}")
        if not ok and not error_code:
            raise MessageError(BAD_VALUE, "a failed response (ok: false) needs an error_code")
        return cls(
            id=get_str(data, "id", max_len=MAX_ID_LENGTH),
            device_id=get_str(data, "device_id", max_len=MAX_ID_LENGTH),
            ok=ok,
            ts=get_ts(data),
            result=get_dict(data, "result", optional=True),
            error_code=error_code,
            error=get_str(data, "error", optional=True),
        )


# OTA phases and final outcomes (docs/protocol.md, "OTA status").
OTA_PHASES = ("accepted", "downloading", "verifying", "smoke_testing", "switching",
              "health_check", "done")
# "probed": an install with ``probe: true`` smoke-tested every variant and switched nothing; its
# ``progress.variants`` holds each variant's figures (docs/protocol.md, "Probing variants").
# "shadowing": an install with ``shadow: true`` runs beside the active model (agent/ota_shadow.py).
OTA_OUTCOMES = ("installed", "no_change", "rejected", "rolled_back", "failed", "probed",
                "shadowing")


@dataclass(frozen=True)
class OtaStatus(Message):
    """Progress and the final outcome of one install, on ``.../ota/status``.

    Every install ends in exactly one message with ``final: true`` whose ``outcome`` is one of
    OTA_OUTCOMES and whose ``reason`` is a machine-readable code (empty when installed).
    """

    SCHEMA: ClassVar[str] = "fleetlite.ota_status/1"

    device_id: str
    ts: float
    release_id: str
    model: str
    version: int
    phase: str
    final: bool = False
    outcome: str = ""
    reason: str = ""
    message: str = ""
    progress: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> OtaStatus:
        phase = get_str(data, "phase", max_len=MAX_ID_LENGTH)
        if phase not in OTA_PHASES:
            raise MessageError(BAD_VALUE, f"unknown OTA phase {phase!r}")
        outcome = get_str(data, "outcome", optional=True, max_len=MAX_ID_LENGTH)
        if outcome and outcome not in OTA_OUTCOMES:
            raise MessageError(BAD_VALUE, f"unknown OTA outcome {outcome!r}")
        return cls(
            device_id=get_str(data, "device_id", max_len=MAX_ID_LENGTH),
            ts=get_ts(data),
            release_id=get_str(data, "release_id", max_len=MAX_ID_LENGTH),
            model=get_str(data, "model", max_len=MAX_ID_LENGTH),
            version=get_int(data, "version", minimum=0),
            phase=phase,
            final=get_bool(data, "final"),
            outcome=outcome,
            reason=get_str(data, "reason", optional=True, max_len=MAX_ID_LENGTH),
            message=get_str(data, "message", optional=True),
            progress=get_dict(data, "progress", optional=True),
        )
