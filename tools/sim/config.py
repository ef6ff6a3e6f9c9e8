"""The simulator's settings: one frozen dataclass with documented defaults, and the pure parsers
of its compact flag values (``--classes rpi4=0.7,jetson=0.3``, ``--profile-ms rpi4=12``)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from fleetlite.sdk import topics

#: short names accepted by ``--classes`` for the classes of ``device_profiles/``
CLASS_ALIASES = {
    "rpi4": "raspberry-pi-4",
    "rpi5": "raspberry-pi-5",
    "jetson": "jetson-orin-nano",
    "x86": "industrial-x86-gateway",
    "arm": "small-arm-gateway",
}
#: p95 inference latency (ms) a simulated device of a class reports when ``--profile-ms`` does
#: not say: the order of magnitude of the project's intent model on such hardware
DEFAULT_PROFILE_MS = {
    "raspberry-pi-4": 12.0,
    "raspberry-pi-5": 6.0,
    "jetson-orin-nano": 4.0,
    "industrial-x86-gateway": 2.0,
    "small-arm-gateway": 20.0,
}
FALLBACK_PROFILE_MS = 10.0
_CLASS_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}\Z")


class SimConfigError(ValueError):
    """A simulator flag has a value the simulator cannot use; the message says which."""


@dataclass(frozen=True)
class SimConfig:
    """Everything one simulator run needs; every field is a command-line flag.

    Rates are shares of the fleet (0..1); times are seconds. ``seed`` makes the plan (which
    device has which class, which installs fail, when a device churns) the same on every run.
    """

    host: str = "127.0.0.1"
    port: int = 1883
    devices: int = 100
    #: device class -> share of the fleet (normalised; the rounding remainder goes to the first)
    classes: tuple[tuple[str, float], ...] = (("raspberry-pi-4", 1.0),)
    prefix: str = "sim"
    seed: int = 1
    #: the model every device runs at start, and its version
    model: str = "intent"
    model_version: int = 1
    #: seconds between two telemetry reports of one device (the first one is spread over it)
    report_s: float = 10.0
    #: shares of the devices whose installs end ``failed`` / ``rejected``, and with what reason
    fail_rate: float = 0.0
    fail_reason: str = "download_stalled"
    reject_rate: float = 0.0
    reject_reason: str = "smoke_output_mismatch"
    #: mean seconds one simulated install step (smoke test, switch, health window) takes
    step_s: float = 0.2
    #: mean seconds a device takes to answer a command (a slow or busy gateway)
    reply_s: float = 0.0
    #: p95 latency (ms) per class that profiles report (others: DEFAULT_PROFILE_MS)
    profile_ms: tuple[tuple[str, float], ...] = ()
    #: disconnect churn: abrupt connection losses per device per hour (the Will fires), each
    #: followed by an offline period of ``offline_s`` (uniform 0.5x..1.5x) before reconnecting
    churn_per_hour: float = 0.0
    offline_s: float = 30.0
    #: share of the devices that start offline and come up after ``offline_s``
    start_offline: float = 0.0
    #: the pinned root of trust (root.json bytes); without one, installs end ``no_trusted_root``
    root: bytes | None = field(default=None, repr=False)
    #: connections opened per second at start (a real fleet does not connect in one burst)
    connect_rate: float = 500.0
    keepalive: int = 60
    #: seconds to run (0: until SIGINT/SIGTERM), and seconds between two stats lines
    duration_s: float = 0.0
    stats_s: float = 5.0
    processes: int = 1

    def __post_init__(self) -> None:
        if self.devices < 1:
            raise SimConfigError("--devices must be at least 1")
        for name in ("fail_rate", "reject_rate", "start_offline"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise SimConfigError(f"--{name.replace('_', '-')} must be within 0..1, "
                                     f"got {value}")
        if self.fail_rate + self.reject_rate > 1.0:
            raise SimConfigError("--fail-rate and --reject-rate together must not exceed 1")
        for name in ("report_s", "connect_rate", "stats_s"):
            if getattr(self, name) <= 0:
                raise SimConfigError(f"--{name.replace('_', '-')} must be positive")
        for name in ("step_s", "reply_s", "churn_per_hour", "offline_s", "duration_s"):
            if getattr(self, name) < 0:
                raise SimConfigError(f"--{name.replace('_', '-')} must not be negative")
        if not 1 <= self.processes <= self.devices:
            raise SimConfigError("--processes must be within 1..--devices")
        try:
            topics.validate_device_id(device_name(self.prefix, self.devices - 1))
        except topics.TopicError as exc:
            raise SimConfigError(f"--prefix: {exc}") from None

    def latency_ms(self, device_class: str) -> float:
        """The p95 latency that devices of ``device_class`` report in their profiles."""
        return dict(self.profile_ms).get(
            device_class, DEFAULT_PROFILE_MS.get(device_class, FALLBACK_PROFILE_MS))


def device_name(prefix: str, index: int) -> str:
    """The device id of simulated device ``index``: ``sim-000042``."""
    return f"{prefix}-{index:06d}"


def class_name(text: str) -> str:
    """A device class from a flag: a short alias (CLASS_ALIASES) or a class name."""
    name = CLASS_ALIASES.get(text.strip(), text.strip())
    if not _CLASS_NAME.match(name):
        raise SimConfigError(f"device class {text!r} is not a class name ([a-z0-9_-], up to 64) "
                             f"nor one of {', '.join(CLASS_ALIASES)}")
    return name


def parse_weights(text: str, what: str) -> tuple[tuple[str, float], ...]:
    """``rpi4=0.7,jetson=0.3`` -> ((raspberry-pi-4, 0.7), (jetson-orin-nano, 0.3)).

    Used for ``--classes`` (shares, normalised by the caller) and ``--profile-ms`` (values).
    A bare class name (``rpi4``) counts as ``=1``.
    """
    pairs: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.partition("=")
        try:
            number = float(value) if sep else 1.0
        except ValueError:
            raise SimConfigError(f"{what}: {item!r} is not NAME=NUMBER") from None
        if not math.isfinite(number) or number < 0:
            raise SimConfigError(f"{what}: {item!r} needs a finite number >= 0")
        key = class_name(name)
        if key in pairs:
            raise SimConfigError(f"{what}: class {key} is named twice")
        pairs[key] = number
    if not pairs:
        raise SimConfigError(f"{what}: name at least one class, e.g. rpi4=0.7,jetson=0.3")
    return tuple(pairs.items())


def class_counts(classes: tuple[tuple[str, float], ...], devices: int) -> list[tuple[str, int]]:
    """How many of ``devices`` each class gets: shares normalised, rounded down, and the
    remainder given to the classes with the largest fractional parts (so the counts add up)."""
    total = sum(share for _, share in classes)
    if total <= 0:
        raise SimConfigError("--classes: the shares add up to 0")
    exact = [(name, devices * share / total) for name, share in classes]
    counts = {name: math.floor(value) for name, value in exact}
    left = devices - sum(counts.values())
    order = sorted(range(len(exact)), key=lambda i: (-(exact[i][1] % 1), i))
    by_fraction = [exact[i] for i in order]
    for name, _ in by_fraction[:left]:
        counts[name] += 1
    return [(name, counts[name]) for name, _ in classes]
