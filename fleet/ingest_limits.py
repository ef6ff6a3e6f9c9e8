"""Limits on what the fleet side accepts from devices, so one noisy or hostile device can neither
grow the store nor starve the ingest of the others (docs/operator-guide.md, "Limits on device
input").

Pure classes over data, the clock passed in; the controller (:mod:`fleetlite.fleet.controller`)
applies them on its network thread before it parses anything, and the store
(:mod:`fleetlite.fleet.store`) prunes with the retention numbers:

- :meth:`IngestGate.check`: a size cap per message kind, then a token bucket per sending device
  (the topic's device id), one for telemetry and one for everything else. A message over its
  cap is refused ``oversize`` and one over the rate ``rate_limited``, both unread. Telemetry over
  the rate is not dropped at once: the store keeps only a device's newest report, so the newest
  one over the rate is *held* and stored when the device's bucket has a token again
  (:meth:`IngestGate.release_held`); only the reports it supersedes are refused.
- :class:`RefusalTally`: refusals counted in memory per (sender, kind, reason), so the store is
  written once per batch (:meth:`fleetlite.fleet.store.Store.record_refusals`), not per refused
  message.
- :func:`check_birth`: the rows a birth becomes (tags, models) are bounded.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Optional, Union

from fleetlite.fleet.errors import FleetError
from fleetlite.fleet.sender_check import Refusal
from fleetlite.sdk import topics
from fleetlite.sdk.messages import MAX_REPORT_BYTES, Birth
from fleetlite.sdk.shadow import MAX_SHADOW_REPORT_BYTES

__all__ = [
    "ADMIT",
    "DEFAULT_MAX_BYTES",
    "ENV_VAR",
    "HOLD",
    "MALFORMED",
    "OVERSIZE",
    "RATE_LIMITED",
    "IngestGate",
    "IngestLimits",
    "IngestLimitsError",
    "RefusalCount",
    "RefusalTally",
    "TokenBucket",
    "check_birth",
]

OVERSIZE = "oversize"
RATE_LIMITED = "rate_limited"
MALFORMED = "malformed"

KiB = 1024
#: the environment variable ``fleetlite serve`` and ``python -m fleetlite.fleet.controller`` read
#: limits from: ``key=value`` pairs, comma-separated (``rate=20,max_bytes.telemetry=131072``)
ENV_VAR = "FLEETLITE_INGEST_LIMITS"


class IngestLimitsError(FleetError, ValueError):
    """A limit is out of range or cannot be read; the message names it and what is accepted."""


#: Largest payload accepted per kind, in bytes. Measured on real messages of this agent (5 models
#: active): status 142 B, birth 2.8 KB (a generative LM's tensor list adds ~20 KB per model),
#: telemetry 2.5 KB, profile 1.8 KB (an LM's with the most figures allowed: 9.2 KB), OTA status
#: 1.4 KB (with a 1000-character message); command responses carry whole profiles and ``info``
#: results (stored with the command they answer); an event is a sentence and a small detail.
DEFAULT_MAX_BYTES: Mapping[str, int] = MappingProxyType({
    topics.STATUS: 8 * KiB,
    topics.BIRTH: MAX_REPORT_BYTES,
    topics.TELEMETRY: 64 * KiB,
    topics.PROFILE: 64 * KiB,
    topics.OTA_STATUS: 16 * KiB,
    topics.COMMAND_RESPONSE: MAX_REPORT_BYTES,
    topics.EVENTS: 16 * KiB,
    topics.SHADOW: MAX_SHADOW_REPORT_BYTES,
})


@dataclass(frozen=True)
class IngestLimits:
    """Every limit on device input, with its default (docs/operator-guide.md lists them).

    Rates are per sending device (the topic's device id). ``rate``/``burst``: status, birth,
    profile, OTA status and command response messages together; ``telemetry_rate``/
    ``telemetry_burst``: telemetry. A healthy agent sends telemetry once per
    ``intervals.telemetry_s`` (60 s by default), OTA progress at each 10 % of a download or
    every 10 s, a handful of statuses per install and a profile per model change: far below
    both.
    """

    max_bytes: Mapping[str, int] = field(default_factory=lambda: DEFAULT_MAX_BYTES)
    rate: float = 10.0
    burst: int = 100
    telemetry_rate: float = 5.0
    telemetry_burst: int = 30
    #: rows a birth may become: tags and active models per device
    max_birth_tags: int = 256
    max_birth_models: int = 64
    #: profiles kept per device (the newest); the newest of each model version a rollout names
    #: is kept beyond it
    profiles_per_device: int = 500
    #: OTA statuses kept per device and release (the newest); the newest final one is kept
    #: beyond it
    ota_statuses_per_release: int = 200
    #: events kept per device (the newest)
    events_per_device: int = 1000
    #: devices whose buckets are tracked at once (idle ones are forgotten first)
    max_devices: int = 100_000
    #: bytes of telemetry held over the rate, over all devices
    max_held_bytes: int = 64 * 1024 * 1024
    #: distinct (sender, kind, reason) refusal counters between two flushes
    max_refusal_keys: int = 10_000
    #: reports kept while the store cannot take them (fleet/ingest_backlog.py): at most this
    #: many, and this many bytes
    backlog_messages: int = 200_000
    backlog_bytes: int = 256 * 1024 * 1024

    def __post_init__(self) -> None:
        for name in _RATES:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise IngestLimitsError(f"ingest limit {name} must be a number > 0, got {value!r}")
        for name in _COUNTS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise IngestLimitsError(f"ingest limit {name} must be an integer >= 1, got "
                                        f"{value!r}")
        for kind, cap in self.max_bytes.items():
            if kind not in DEFAULT_MAX_BYTES:
                raise IngestLimitsError(f"ingest limit max_bytes.{kind}: no such message kind; "
                                        f"use one of {', '.join(DEFAULT_MAX_BYTES)}")
            if (isinstance(cap, bool) or not isinstance(cap, int)
                    or not 0 < cap <= MAX_REPORT_BYTES):
                raise IngestLimitsError(f"ingest limit max_bytes.{kind} must be 1.."
                                        f"{MAX_REPORT_BYTES} (the protocol's cap on a report), "
                                        f"got {cap!r}")

    @classmethod
    def from_text(cls, text: str, base: Optional[IngestLimits] = None) -> IngestLimits:
        """``base`` (default: the defaults) with the ``key=value`` pairs of ``text`` applied;
        keys are the field names, ``max_bytes.KIND`` for a size cap."""
        changes: dict[str, Any] = {}
        caps = dict((base or cls()).max_bytes)
        for item in (part.strip() for part in text.split(",")):
            if not item:
                continue
            key, sep, value = (x.strip() for x in item.partition("="))
            if not sep:
                raise IngestLimitsError(f"cannot read {item!r} in {ENV_VAR}: write key=value "
                                        "pairs separated by commas, e.g. rate=20,burst=200")
            try:
                if key.startswith("max_bytes."):
                    caps[key[len("max_bytes."):]] = int(value)
                elif key in _RATES:
                    changes[key] = float(value)
                elif key in _COUNTS:
                    changes[key] = int(value)
                else:
                    known = ", ".join((*_RATES, *_COUNTS, "max_bytes.KIND"))
                    raise IngestLimitsError(f"unknown ingest limit {key!r} in {ENV_VAR}; "
                                            f"known: {known}")
            except ValueError as exc:
                if isinstance(exc, IngestLimitsError):
                    raise
                raise IngestLimitsError(f"ingest limit {key} in {ENV_VAR} must be a number, "
                                        f"got {value!r}") from None
        return dataclasses.replace(base or cls(), max_bytes=MappingProxyType(caps), **changes)

    @classmethod
    def from_env(cls, environ: Optional[Mapping[str, str]] = None) -> IngestLimits:
        """The defaults with :data:`ENV_VAR` applied (when set)."""
        return cls.from_text((os.environ if environ is None else environ).get(ENV_VAR, ""))

    def max_bytes_of(self, kind: str) -> int:
        """The size cap of ``kind``: ``max_bytes`` overrides the defaults kind by kind."""
        return self.max_bytes.get(kind, DEFAULT_MAX_BYTES.get(kind, MAX_REPORT_BYTES))


_RATES = ("rate", "telemetry_rate")
_COUNTS = ("burst", "telemetry_burst", "max_birth_tags", "max_birth_models",
           "profiles_per_device", "ota_statuses_per_release", "events_per_device",
           "max_devices", "max_held_bytes", "max_refusal_keys", "backlog_messages",
           "backlog_bytes")


class TokenBucket:
    """``burst`` tokens, refilled at ``rate`` per second; each message takes one."""

    __slots__ = ("burst", "rate", "tokens", "updated")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.updated = now

    def _refill(self, now: float) -> None:
        if now > self.updated:
            self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
            self.updated = now

    def take(self, now: float) -> bool:
        """Take a token if there is one."""
        self._refill(now)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False

    def full(self, now: float) -> bool:
        """Refilled to the brim: the same as a new bucket, so it may be forgotten."""
        self._refill(now)
        return self.tokens >= self.burst


class _Buckets:
    """One bucket per device; at most ``max_devices``, forgetting full (idle) ones first."""

    def __init__(self, rate: float, burst: int, max_devices: int) -> None:
        self.rate = rate
        self.burst = burst
        self.max_devices = max_devices
        self._buckets: dict[str, TokenBucket] = {}

    def get(self, device_id: str, now: float) -> TokenBucket:
        bucket = self._buckets.get(device_id)
        if bucket is None:
            if len(self._buckets) >= self.max_devices:
                self._forget(now)
            bucket = self._buckets[device_id] = TokenBucket(self.rate, self.burst, now)
        return bucket

    def _forget(self, now: float) -> None:
        idle = [d for d, b in self._buckets.items() if b.full(now)]
        if len(idle) < len(self._buckets) // 10:
            # nearly every tracked device is busy (ids made up by a client without an ACL):
            # forget the oldest tenth; each such id gets a fresh burst, nothing more
            idle = list(self._buckets)[: max(1, len(self._buckets) // 10)]
        for device_id in idle:
            del self._buckets[device_id]

    def __len__(self) -> int:
        return len(self._buckets)


ADMIT = "admit"
HOLD = "hold"
Verdict = Union[str, Refusal]
"""What :meth:`IngestGate.check` decides: :data:`ADMIT`, :data:`HOLD` (telemetry over the rate,
to be given to :meth:`IngestGate.hold`) or a :class:`Refusal` (``oversize``, ``rate_limited``)."""


class IngestGate:
    """The size caps and the per-device rates, applied before a message is parsed.

    Not thread-safe: the controller calls it under its own lock.
    """

    def __init__(self, limits: IngestLimits) -> None:
        self.limits = limits
        self._reports = _Buckets(limits.rate, limits.burst, limits.max_devices)
        self._telemetry = _Buckets(limits.telemetry_rate, limits.telemetry_burst,
                                   limits.max_devices)
        self._held: dict[str, bytes] = {}
        self._held_bytes = 0
        self._oversize = {kind: Refusal(OVERSIZE, f"a {kind} message over the cap of "
                                                  f"{limits.max_bytes_of(kind)} bytes, dropped "
                                                  "unread")
                          for kind in topics.DEVICE_TO_FLEET}
        self._rate_limited = Refusal(
            RATE_LIMITED, f"over {limits.rate:g} reports/s (burst {limits.burst}), dropped unread")
        self._superseded = Refusal(
            RATE_LIMITED, f"telemetry over {limits.telemetry_rate:g} reports/s (burst "
                          f"{limits.telemetry_burst}): superseded by a newer report before it "
                          "could be stored")

    def check(self, device_id: str, kind: str, size: int, now: float) -> Verdict:
        """Decide about one message of ``size`` bytes from ``device_id`` at ``now``."""
        if size > self.limits.max_bytes_of(kind):
            return self._oversize.get(kind) or Refusal(OVERSIZE, f"a {kind} message over the "
                                                                 "cap, dropped unread")
        if kind == topics.TELEMETRY:
            if self._telemetry.get(device_id, now).take(now):
                return ADMIT
            return HOLD
        if self._reports.get(device_id, now).take(now):
            return ADMIT
        return self._rate_limited

    def hold(self, device_id: str, payload: bytes) -> Optional[Refusal]:
        """Keep ``payload`` as the device's newest telemetry over the rate. Returns the refusal
        of what is dropped: the report it supersedes, or this one if the held reports of all
        devices already fill ``max_held_bytes``."""
        previous = self._held.pop(device_id, None)
        if previous is not None:
            self._held_bytes -= len(previous)
        if self._held_bytes + len(payload) > self.limits.max_held_bytes:
            if previous is not None:  # keep the older one rather than nothing
                self._held[device_id] = previous
                self._held_bytes += len(previous)
            return self._superseded
        self._held[device_id] = payload
        self._held_bytes += len(payload)
        return self._superseded if previous is not None else None

    def release_held(self, now: float, *, everything: bool = False) -> list[tuple[str, bytes]]:
        """The held telemetry of devices whose telemetry bucket has a token again (taken), or
        all of it (``everything``: the controller stops)."""
        released = []
        for device_id in list(self._held):
            if everything or self._telemetry.get(device_id, now).take(now):
                payload = self._held.pop(device_id)
                self._held_bytes -= len(payload)
                released.append((device_id, payload))
        return released

    @property
    def held(self) -> int:
        """Devices with telemetry held now."""
        return len(self._held)

    @property
    def tracked(self) -> int:
        """Devices with a bucket now."""
        return max(len(self._reports), len(self._telemetry))


@dataclass(frozen=True)
class RefusalCount:
    """Refusals of one (sender, kind, reason) since the last flush: what
    :meth:`fleetlite.fleet.store.Store.record_refusals` adds to the stored counters."""

    device_id: str
    kind: str
    reason: str
    count: int
    first_at: float
    last_at: float
    last_message: str


@dataclass
class _Tally:
    count: int
    first_at: float
    last_at: float
    last_message: str


class RefusalTally:
    """Refusals counted in memory until the next flush, per (sender, kind, reason).

    At most ``max_keys`` distinct counters are kept between flushes; refusals beyond them are
    only counted in ``unrecorded`` (a client making up device ids, without a broker ACL).
    Not thread-safe: the controller calls it under its own lock.
    """

    def __init__(self, max_keys: int = 10_000) -> None:
        self.max_keys = max_keys
        self._by_device: dict[str, dict[tuple[str, str], _Tally]] = {}
        self._keys = 0
        self.unrecorded = 0

    def add(self, device_id: str, kind: str, refusal: Refusal, now: float) -> None:
        mine = self._by_device.get(device_id)
        tally = mine.get((kind, refusal.reason)) if mine is not None else None
        if tally is not None:
            tally.count += 1
            tally.last_at = now
            tally.last_message = refusal.message
            return
        if self._keys >= self.max_keys:
            self.unrecorded += 1
            return
        if mine is None:
            mine = self._by_device[device_id] = {}
        mine[(kind, refusal.reason)] = _Tally(1, now, now, refusal.message)
        self._keys += 1

    def pending(self, device_id: Optional[str] = None) -> bool:
        """Whether refusals (of ``device_id``, or of anyone) wait for a flush."""
        if device_id is None:
            return bool(self._by_device)
        return device_id in self._by_device

    def drain(self, device_id: Optional[str] = None) -> list[RefusalCount]:
        """Take the counts (of one sender, or all), oldest first, and forget them."""
        if device_id is None:
            taken, self._by_device = self._by_device, {}
        else:
            mine = self._by_device.pop(device_id, None)
            taken = {device_id: mine} if mine else {}
        out = [RefusalCount(sender, kind, reason, t.count, t.first_at, t.last_at, t.last_message)
               for sender, tallies in taken.items() for (kind, reason), t in tallies.items()]
        self._keys -= len(out)
        return sorted(out, key=lambda c: c.first_at)

    def restore(self, counts: Iterable[RefusalCount]) -> None:
        """Put counts back after a failed flush (merged with any counted since)."""
        for c in counts:
            mine = self._by_device.setdefault(c.device_id, {})
            tally = mine.get((c.kind, c.reason))
            if tally is None:
                mine[(c.kind, c.reason)] = _Tally(c.count, c.first_at, c.last_at, c.last_message)
                self._keys += 1
            else:
                tally.count += c.count
                tally.first_at = min(tally.first_at, c.first_at)


def check_birth(birth: Birth, limits: IngestLimits) -> Optional[Refusal]:
    """``oversize`` when a birth would become more tag or model rows than the limits allow."""
    if len(birth.tags) > limits.max_birth_tags:
        return Refusal(OVERSIZE, f"a birth with {len(birth.tags)} tags; at most "
                                 f"{limits.max_birth_tags} are accepted")
    if len(birth.models) > limits.max_birth_models:
        return Refusal(OVERSIZE, f"a birth with {len(birth.models)} active models; at most "
                                 f"{limits.max_birth_models} are accepted")
    return None
