"""Bind every device report to its sender: the device the topic names, which the broker's ACL
authenticated, is the only device a report may speak about.

Pure functions over parsed messages and what the store knows; the controller
(:mod:`fleetlite.fleet.controller`) calls them before it stores anything and counts each
refusal against the *sender* (:meth:`fleetlite.fleet.store.Store.record_refusal`).
:class:`RefusalLog` keeps the log to one line per device and reason per interval, so a hostile
device cannot flood the controller's log.

The rule (docs/protocol.md, "Reports are bound to their sender"):

- every report's ``device_id`` equals the device id in its topic (``device_mismatch``);
- a profile's ``device.device_class`` fact, when present, equals the class the device declared
  in its birth (``class_mismatch``);
- an OTA status names a release the device was sent by a rollout (``not_sent``), and its
  ``model``/``version``, once known (the first statuses of an install may carry ``""``/0), are
  the release's (``wrong_release``).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Optional

from fleetlite.sdk.messages import OtaStatus
from fleetlite.sdk.profile import ProfileRecord

__all__ = [
    "CLASS_MISMATCH",
    "DEVICE_MISMATCH",
    "NOT_SENT",
    "REFUSAL_REASONS",
    "WRONG_RELEASE",
    "Refusal",
    "RefusalLog",
    "SentRelease",
    "check_device_id",
    "check_ota_status",
    "check_profile",
]

DEVICE_MISMATCH = "device_mismatch"
CLASS_MISMATCH = "class_mismatch"
NOT_SENT = "not_sent"
WRONG_RELEASE = "wrong_release"
REFUSAL_REASONS = (DEVICE_MISMATCH, CLASS_MISMATCH, NOT_SENT, WRONG_RELEASE)


@dataclass(frozen=True)
class Refusal:
    """Why a report was not stored: a reason code of :data:`REFUSAL_REASONS` and a message
    naming what the payload claimed (never more than a few ids, so it is safe to log)."""

    reason: str
    message: str


@dataclass(frozen=True)
class SentRelease:
    """A release a rollout sent to the device: the model and version it installs."""

    release_id: str
    model: str
    version: int


def check_device_id(topic_device: str, payload_device: str, kind: str) -> Optional[Refusal]:
    """``device_mismatch`` unless the payload names the topic's device."""
    if payload_device == topic_device:
        return None
    return Refusal(DEVICE_MISMATCH, f"a {kind} report on {topic_device}'s topic names device "
                                    f"{_short(payload_device)}")


def check_profile(topic_device: str, record: ProfileRecord,
                  known_class: Optional[str]) -> Optional[Refusal]:
    """Check a profile against its sender and the class the sender declared in its birth
    (``known_class``; None or "" when no birth was stored yet)."""
    refusal = check_device_id(topic_device, record.device_id, "profile")
    if refusal is not None:
        return refusal
    claimed = record.device.get("device_class")
    if known_class and claimed is not None and claimed != known_class:
        return Refusal(CLASS_MISMATCH, f"a profile from {topic_device} claims device class "
                                       f"{_short(claimed)}; its birth says {known_class}")
    return None


def check_ota_status(topic_device: str, status: OtaStatus,
                     sent: Collection[SentRelease]) -> Optional[Refusal]:
    """Check an OTA status against its sender and the releases rollouts sent it (``sent``)."""
    refusal = check_device_id(topic_device, status.device_id, "OTA status")
    if refusal is not None:
        return refusal
    release = next((r for r in sent if r.release_id == status.release_id), None)
    if release is None:
        return Refusal(NOT_SENT, f"{topic_device} reported on release "
                                 f"{_short(status.release_id)}, which no rollout sent it")
    if status.model and (status.model, status.version) != (release.model, release.version):
        return Refusal(WRONG_RELEASE, f"{topic_device} reported {_short(status.model)} "
                                      f"v{status.version} for release {release.release_id[:12]}, "
                                      f"which holds {release.model} v{release.version}")
    return None


class RefusalLog:
    """Decide when to log refusals: the first of each (device, reason) at once, then at most one
    line per ``interval_s`` carrying the count since the last line."""

    def __init__(self, interval_s: float = 60.0) -> None:
        self.interval_s = interval_s
        self._last: dict[tuple[str, str], float] = {}
        self._pending: dict[tuple[str, str], int] = {}

    def note(self, device_id: str, refusal: Refusal, now: float) -> Optional[str]:
        """Count one refusal; returns the line to log now, or None to stay quiet."""
        key = (device_id, refusal.reason)
        count = self._pending.get(key, 0) + 1
        last = self._last.get(key)
        if last is not None and now - last < self.interval_s:
            self._pending[key] = count
            return None
        self._last[key] = now
        self._pending[key] = 0
        if last is None:
            return f"refused a report from {device_id} ({refusal.reason}): {refusal.message}"
        return (f"refused {count} reports from {device_id} ({refusal.reason}) in the last "
                f"{now - last:.0f} s; latest: {refusal.message}")


def _short(value: object, limit: int = 64) -> str:
    """A claimed value fit for a log line: repr'd (no control characters) and cut."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "...'"
