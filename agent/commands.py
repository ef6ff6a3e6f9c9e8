"""Commands to the device: validate, dispatch to a handler, always answer.

A command is a ``fleetlite.command/1`` message on the device's command topic; the response carries
the same correlation id. Anything wrong with a command (oversize, not JSON, wrong schema, wrong
types, unknown command, bad arguments, a failing handler) becomes an error response with a
reason code and a counter increment; :meth:`CommandDispatcher.handle` never raises.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

from fleetlite.agent.errors import AgentError
from fleetlite.sdk.errors import FleetLiteError
from fleetlite.sdk.messages import MAX_COMMAND_BYTES, Command, CommandResponse, MessageError

log = logging.getLogger("fleetlite.agent.commands")

UNKNOWN_COMMAND = "unknown_command"
BAD_ARGS = "bad_args"
FAILED = "failed"
INTERNAL = "internal"

Handler = Callable[[Mapping[str, Any]], Mapping[str, Any]]


class CommandArgumentError(AgentError):
    """A handler's arguments are missing or of the wrong type (reason code ``bad_args``)."""


class CommandDispatcher:
    """Maps command names to handlers and turns every outcome into a response."""

    def __init__(self, device_id: str, handlers: Mapping[str, Handler],
                 *, max_bytes: int = MAX_COMMAND_BYTES) -> None:
        self.device_id = device_id
        self.handlers = dict(handlers)
        self.max_bytes = max_bytes
        self.received = 0
        self.succeeded = 0
        self.rejected: Counter[str] = Counter()
        self._lock = threading.Lock()

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "received": self.received,
                "succeeded": self.succeeded,
                "rejected": dict(self.rejected),
            }

    def _error(self, command_id: str, code: str, message: str) -> CommandResponse:
        with self._lock:
            self.rejected[code] += 1
        log.warning("command %r rejected (%s): %s", command_id, code, message)
        return CommandResponse(
            id=command_id, device_id=self.device_id, ok=False, ts=time.time(),
            error_code=code, error=message[:1000],
        )

    def handle(self, payload: bytes) -> CommandResponse:
        with self._lock:
            self.received += 1
        try:
            if len(payload) > self.max_bytes:
                raise MessageError(
                    "oversize", f"command of {len(payload)} bytes exceeds {self.max_bytes} bytes"
                )
            command = Command.from_json(payload)
        except MessageError as exc:
            return self._error(_salvage_id(payload), exc.code, str(exc))
        handler = self.handlers.get(command.command)
        if handler is None:
            known = ", ".join(sorted(self.handlers))
            return self._error(
                command.id, UNKNOWN_COMMAND,
                f"unknown command {command.command!r}; this agent knows: {known}",
            )
        try:
            result = dict(handler(command.args))
        except CommandArgumentError as exc:
            return self._error(command.id, BAD_ARGS, str(exc))
        except FleetLiteError as exc:
            return self._error(command.id, FAILED, str(exc))
        except Exception as exc:
            log.exception("command %r crashed", command.command)
            return self._error(command.id, INTERNAL, f"{type(exc).__name__}: {exc}")
        with self._lock:
            self.succeeded += 1
        return CommandResponse(
            id=command.id, device_id=self.device_id, ok=True, ts=time.time(), result=result
        )


def _salvage_id(payload: bytes) -> str:
    """The correlation id of a rejected command, if one can be read safely; else ''."""
    return _salvage(payload, "id")


def command_name(payload: bytes) -> str:
    """The command a (possibly rejected) command names, if it can be read safely; else ''."""
    return _salvage(payload, "command")


def _salvage(payload: bytes, key: str) -> str:
    if len(payload) > MAX_COMMAND_BYTES:
        return ""
    try:
        data = json.loads(payload)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return ""
    if isinstance(data, dict) and isinstance(data.get(key), str) and len(data[key]) <= 64:
        return str(data[key])
    return ""


def arg(args: Mapping[str, Any], key: str, kind: type | tuple[type, ...], default: Any = None,
        *, required: bool = False) -> Any:
    """Read one handler argument, raising :class:`CommandArgumentError` with a clear message."""
    if key not in args:
        if required:
            raise CommandArgumentError(f"argument {key!r} is required")
        return default
    value = args[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds:
        raise CommandArgumentError(f"argument {key!r} has the wrong type (bool)")
    if not isinstance(value, kinds):
        names = "/".join(k.__name__ for k in kinds)
        raise CommandArgumentError(f"argument {key!r} must be {names}, got {type(value).__name__}")
    return value
