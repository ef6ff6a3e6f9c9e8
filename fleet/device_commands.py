"""Commands from operators to devices, through the store: ``fleetlite devices ping gw-1``.

The CLI (or a script, :meth:`fleetlite.fleet.client.Fleet.send_command`) records one command per
device in the store; the controller that runs on that store publishes each at its next tick
(so the operator's machine needs no broker access) and stores the device's answer when it
comes (``fleetlite.command_response/1``, accepted only from the device the command was sent
to). The sender waits for the answers up to a timeout and says, per device, what happened:
answered (ok or an error with its code), not answered in time (offline, or online but silent),
or never sent (no controller picked it up). Every command and its answer stay in the store:
``fleetlite devices history DEVICE``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional

from fleetlite.fleet.errors import FleetError
from fleetlite.fleet.store import CommandRecord, Store

__all__ = ["COMMANDS", "CommandOutcome", "outcome_of", "send_and_wait"]

#: The agent's commands an operator sends (docs/protocol.md, the command table); the OTA
#: install and rollback are sent by rollouts.
COMMANDS = ("ping", "info", "profile", "reload_config", "ota_slots", "ota_install",
            "update_root", "set_tags", "remove_model")

ANSWERED = "answered"  # ok
REFUSED = "refused"  # answered with an error
NO_ANSWER = "no_answer"  # published, not answered in time, device online
OFFLINE = "offline"  # published (or not), device offline
NOT_SENT = "not_sent"  # no controller published it in time


@dataclass(frozen=True)
class CommandOutcome:
    """What became of one command to one device: ``state`` is one of ``answered``,
    ``refused`` (the device answered with an error), ``no_answer``, ``offline`` or
    ``not_sent``; ``text`` says it in a sentence."""

    device_id: str
    command_id: str
    command: str
    state: str
    text: str
    result: Optional[dict[str, Any]] = None
    error_code: str = ""
    latency_s: Optional[float] = None

    @property
    def ok(self) -> bool:
        return self.state == ANSWERED

    def to_dict(self) -> dict[str, Any]:
        return {"device_id": self.device_id, "command_id": self.command_id,
                "command": self.command, "state": self.state, "ok": self.ok, "text": self.text,
                "result": self.result, "error_code": self.error_code or None,
                "latency_s": None if self.latency_s is None else round(self.latency_s, 3)}


def outcome_of(record: CommandRecord, online: Optional[bool]) -> CommandOutcome:
    """The outcome of ``record`` as stored now; ``online``: the device's state (None: the
    fleet never heard of it)."""
    def outcome(state: str, text: str, **more: Any) -> CommandOutcome:
        return CommandOutcome(record.device_id, record.command_id, record.command, state, text,
                              **more)

    if record.answered is not None:
        latency = record.answered - (record.sent if record.sent is not None else record.created)
        if record.ok:
            return outcome(ANSWERED, "answered", result=record.result or {},
                           latency_s=max(0.0, latency))
        code = record.error_code or "error"
        return outcome(REFUSED, f"refused ({code}): {record.error}", error_code=code,
                       latency_s=max(0.0, latency))
    if online is None:
        return outcome(OFFLINE, "unknown device: the fleet never heard of it (check the id "
                       "with `fleetlite devices list`)")
    if not online:
        return outcome(OFFLINE, "offline: not delivered (agents keep no session: send it "
                       "again once the device is online)")
    if record.sent is None:
        return outcome(NOT_SENT, "not sent: no controller picked it up (is `fleetlite serve` "
                       "running on this store?)")
    return outcome(NO_ANSWER, "online but no answer within the timeout")

def send_and_wait(store: Store, device_ids: Sequence[str], command: str,
                  args: Optional[Mapping[str, Any]] = None, *, timeout_s: float = 30.0,
                  origin: str = "sdk", poll_s: float = 0.2,
                  clock: Callable[[], float] = time.time,
                  sleep: Callable[[float], None] = time.sleep) -> list[CommandOutcome]:
    """Queue ``command`` for each device and wait up to ``timeout_s`` for every answer;
    returns the outcomes in ``device_ids`` order. ``timeout_s`` 0 queues and returns at once
    (the outcomes say ``not_sent``/``no_answer``; look later with ``command_history``)."""
    if command not in COMMANDS:
        raise FleetError(f"unknown command {command!r}: use one of {', '.join(COMMANDS)}")
    if not timeout_s >= 0:
        raise FleetError(f"the timeout must be 0 or more seconds, got {timeout_s}")
    if len(set(device_ids)) != len(device_ids):
        raise FleetError("a device is named twice: name each device once")
    now = clock()
    ids = [store.queue_command(device_id, command, dict(args or {}), origin=origin,
                               timeout_s=max(timeout_s, 1.0), now=now)
           for device_id in device_ids]
    deadline = now + timeout_s
    while True:
        records = store.get_commands(ids)
        if all(r.answered is not None for r in records) or clock() >= deadline:
            break
        sleep(poll_s)
    online = {d.device_id: d.online for d in store.list_devices(device_ids=device_ids)}
    return [outcome_of(r, online.get(r.device_id)) for r in records]
