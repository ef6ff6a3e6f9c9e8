"""Device time against the controller's: which reports count as hearing a device, and skew.

The fleet's notion of time is the controller's clock. A device's ``last_seen`` is when the
controller received its last report (:meth:`fleetlite.fleet.store.Store.upsert_status` and
friends, ``received_at``), never a ``ts`` the device wrote: a device whose clock runs two years
ahead would otherwise look freshly seen for two years. Device timestamps are still stored as sent.

Each such report also gives the device's clock offset: its ``ts`` minus the controller's receive
time (positive: the device is ahead). Transport delays only ever lower it (a report spooled on
the device while it was offline, or queued by the broker while the controller was down, arrives
late), so an offset far *ahead* is certain and one far *behind* may be such a delay; the next
live report corrects it.
"""

from __future__ import annotations

from typing import Optional

from fleetlite.sdk.messages import Status

__all__ = [
    "CLOCK_SKEW_LIMIT_S",
    "clock_offset",
    "describe_offset",
    "heard_from_device",
    "is_skewed",
    "offset_marker",
]

#: A device whose clock offset is larger than this (either way) is flagged by `fleetlite devices
#: show` and `devices list`. Wide enough for a gateway without NTP drifting for weeks and for a
#: report waiting a few seconds in the broker; narrow enough to catch a wrong date or time zone.
CLOCK_SKEW_LIMIT_S = 60.0

_LOST = "lost"  # the reason of the agent's Last Will (agent/link.py)


def heard_from_device(report: object, *, retained: bool) -> bool:
    """Whether receiving ``report`` now means the device just spoke.

    Not so for a retained message delivered on subscribing (a snapshot the broker kept, maybe
    from a device gone for months) nor for the Last Will (the broker publishes it when the
    connection is lost, with the ``ts`` of the connect): they update the device's state, but
    neither its last seen nor its clock offset.
    """
    if retained:
        return False
    return not (isinstance(report, Status) and not report.online and report.reason == _LOST)


def clock_offset(device_ts: float, received_at: float) -> float:
    """The device's clock minus the controller's, from one report (positive: ahead)."""
    return device_ts - received_at


def is_skewed(offset: Optional[float]) -> bool:
    """True if a known offset exceeds :data:`CLOCK_SKEW_LIMIT_S` either way."""
    return offset is not None and abs(offset) > CLOCK_SKEW_LIMIT_S


def _duration(seconds: float) -> str:
    for unit, size in (("days", 86400.0), ("hours", 3600.0), ("minutes", 60.0)):
        if seconds >= 2 * size:
            return f"{int(seconds // size)} {unit}"
    return f"{seconds:.1f} s" if seconds < 10 else f"{int(seconds)} s"


def describe_offset(offset: Optional[float]) -> str:
    """One line on a device's clock for `fleetlite devices show` (after ``clock``)."""
    if offset is None:
        return "- (no report received from the device since the controller started keeping it)"
    direction = "ahead of" if offset >= 0 else "behind"
    text = f"{_duration(abs(offset))} {direction} the controller's"
    if not is_skewed(offset):
        return f"{text} (within {CLOCK_SKEW_LIMIT_S:.0f} s)"
    text = (f"{text}: more than {CLOCK_SKEW_LIMIT_S:.0f} s off (device timestamps are kept as "
            "sent; last seen uses the controller's clock); set the device's time (NTP)")
    if offset < 0:
        text += (", unless its last report waited that long (spooled while it was offline, or "
                 "queued while the controller was down): the next one will tell")
    return text


def offset_marker(offset: Optional[float]) -> str:
    """A short note for a table cell, empty unless the clock is skewed: ``clock +731d``."""
    if not is_skewed(offset):
        return ""
    assert offset is not None
    size = abs(offset)
    for unit, seconds in (("d", 86400.0), ("h", 3600.0), ("m", 60.0)):
        if size >= seconds:
            return f"clock {'+' if offset > 0 else '-'}{int(size // seconds)}{unit}"
    return f"clock {'+' if offset > 0 else '-'}{int(size)}s"  # pragma: no cover (limit >= 60 s)
