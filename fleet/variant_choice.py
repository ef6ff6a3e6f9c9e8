"""Which variant of a release each device class gets, from the probe results of its devices.

Pure: no I/O, no clock. A probe (``ota_install`` with ``probe: true``) ends with one final OTA
status ``outcome: "probed"`` whose ``progress.variants`` holds, per variant, whether its smoke
test passed and what it measured (docs/protocol.md, "Probing variants"). For one class,
:func:`choose_variant` keeps the variants that passed on every probed device and fit the class's
latency (median p95) and memory (max peak RSS) budgets, and picks the best fidelity (ties: the
smaller median p95, then the name). An operator's pin wins, whatever the figures say. The choice
carries the figures behind it so that ``rollout status`` and the report can show them.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

from fleetlite.fleet.errors import RolloutError

__all__ = [
    "VariantBudget",
    "VariantChoice",
    "VariantFigures",
    "VariantProbe",
    "choose_variant",
    "probes_from_progress",
]


@dataclass(frozen=True)
class VariantBudget:
    """A device class's limits a variant must fit (device_profiles/<class>.yaml ``budgets``);
    None: no limit of that kind."""

    max_p95_latency_ms: Optional[float] = None
    max_peak_rss_mb: Optional[float] = None

    def to_dict(self) -> dict[str, Optional[float]]:
        return {"max_p95_latency_ms": self.max_p95_latency_ms,
                "max_peak_rss_mb": self.max_peak_rss_mb}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> VariantBudget:
        return cls(_number(data.get("max_p95_latency_ms")), _number(data.get("max_peak_rss_mb")))


@dataclass(frozen=True)
class VariantProbe:
    """What one device measured of one variant in its probe."""

    device_id: str
    variant: str
    passed: bool
    reason: str = ""
    p95_ms: Optional[float] = None
    peak_rss_mb: Optional[float] = None
    load_ms: Optional[float] = None
    fidelity: Optional[float] = None
    ttft_ms: Optional[float] = None
    decode_tok_s: Optional[float] = None


def probes_from_progress(device_id: str, progress: Mapping[str, Any]) -> list[VariantProbe]:
    """The per-variant results of a ``probed`` final status's ``progress``. An entry that is not
    an object counts as a failed smoke test (``malformed_probe``): the device said nothing usable
    about that variant. Figures that are not finite numbers >= 0 read as not measured."""
    variants = progress.get("variants")
    if not isinstance(variants, Mapping):
        return []
    found = []
    for name, entry in sorted(variants.items()):
        if not isinstance(entry, Mapping):
            found.append(VariantProbe(device_id, str(name), False, "malformed_probe"))
            continue
        fidelity = _number(entry.get("fidelity"))
        found.append(VariantProbe(
            device_id, str(name), entry.get("passed") is True, str(entry.get("reason") or ""),
            p95_ms=_number(entry.get("p95_ms")), peak_rss_mb=_number(entry.get("peak_rss_mb")),
            load_ms=_number(entry.get("load_ms")),
            fidelity=fidelity if fidelity is None or fidelity <= 1.0 else None,
            ttft_ms=_number(entry.get("ttft_ms")),
            decode_tok_s=_number(entry.get("decode_tok_s"))))
    return found


@dataclass(frozen=True)
class VariantFigures:
    """One variant on one class: over the devices probed, how many passed, the median p95, the
    max peak RSS and the min fidelity (None: not measured), whether it fits and, if not, why."""

    variant: str
    devices_probed: int
    devices_passed: int
    median_p95_ms: Optional[float]
    max_peak_rss_mb: Optional[float]
    min_fidelity: Optional[float]
    fits: bool
    why: str = ""

    def describe(self) -> str:
        def num(value: Optional[float], unit: str, spec: str = ".1f") -> str:
            return "n/a" if value is None else f"{value:{spec}}{unit}"
        return (f"{self.variant}: passed on {self.devices_passed} of {self.devices_probed}, "
                f"median p95 {num(self.median_p95_ms, ' ms')}, max peak RSS "
                f"{num(self.max_peak_rss_mb, ' MB')}, min fidelity "
                f"{num(self.min_fidelity, '', '.3f')}")

    def to_dict(self) -> dict[str, Any]:
        return {"variant": self.variant, "devices_probed": self.devices_probed,
                "devices_passed": self.devices_passed, "median_p95_ms": self.median_p95_ms,
                "max_peak_rss_mb": self.max_peak_rss_mb, "min_fidelity": self.min_fidelity,
                "fits": self.fits, "why": self.why}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> VariantFigures:
        return cls(str(data["variant"]), int(data["devices_probed"]),
                   int(data["devices_passed"]), _number(data.get("median_p95_ms")),
                   _number(data.get("max_peak_rss_mb")), _number(data.get("min_fidelity")),
                   bool(data["fits"]), str(data.get("why", "")))


@dataclass(frozen=True)
class VariantChoice:
    """The variant a class gets (None: the class is excluded), whether an operator pinned it,
    the sentence that says why, the budget applied and every candidate's figures."""

    device_class: str
    variant: Optional[str]
    pinned: bool
    reason: str
    budget: VariantBudget = field(default_factory=VariantBudget)
    figures: tuple[VariantFigures, ...] = ()
    probed_devices: tuple[str, ...] = ()

    @property
    def excluded(self) -> bool:
        return self.variant is None

    def to_dict(self) -> dict[str, Any]:
        return {"device_class": self.device_class, "variant": self.variant,
                "pinned": self.pinned, "reason": self.reason, "budget": self.budget.to_dict(),
                "figures": [f.to_dict() for f in self.figures],
                "probed_devices": list(self.probed_devices)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> VariantChoice:
        try:
            variant = data.get("variant")
            return cls(str(data["device_class"]), None if variant is None else str(variant),
                       bool(data.get("pinned", False)), str(data.get("reason", "")),
                       VariantBudget.from_dict(data.get("budget", {})),
                       tuple(VariantFigures.from_dict(f) for f in data.get("figures", ())),
                       tuple(str(d) for d in data.get("probed_devices", ())))
        except (KeyError, TypeError, ValueError) as exc:
            raise RolloutError(f"a stored variant choice is malformed ({exc!r})") from exc


def choose_variant(device_class: str, variants: Sequence[str], probes: Sequence[VariantProbe],
                   budget: Optional[VariantBudget], *, pin: Optional[str] = None,
                   probed_devices: Sequence[str] = ()) -> VariantChoice:
    """The variant ``device_class`` gets, from the probes of its devices.

    ``probed_devices``: the devices whose probe ended ``probed`` (default: those in
    ``probes``); a variant passes only if it passed on every one of them. ``pin`` (an
    operator's) wins if it names one of ``variants``; the figures are still computed and shown.
    """
    limits = budget or VariantBudget()
    devices = tuple(sorted(set(probed_devices) | {p.device_id for p in probes}))
    figures = tuple(_figures(name, devices, [p for p in probes if p.variant == name], limits)
                    for name in variants)
    shown = "; ".join(f.describe() + ("" if f.fits else f" ({f.why})") for f in figures)
    what = _budget_text(limits)

    def make(variant: Optional[str], pinned: bool, reason: str) -> VariantChoice:
        return VariantChoice(device_class, variant, pinned, reason, limits, figures, devices)

    if pin is not None:
        if pin not in variants:
            return make(None, True, f"class {device_class} is pinned to variant {pin!r}, which "
                        f"the release does not have (it has {', '.join(variants)}): excluded; "
                        "roll out again with a pin the release has")
        chosen = next(f for f in figures if f.variant == pin)
        note = "" if chosen.fits else f"; it would not have been chosen: {chosen.why}"
        probed = (f"; probed on {len(devices)} device(s): {shown}" if devices
                  else "; no probe results")
        return make(pin, True, f"class {device_class} gets {pin}: pinned by the operator"
                    f"{note}{probed}")
    if not devices:
        return make(None, False, f"class {device_class} is excluded: no device of it answered "
                    "the probe with results (timed out or failed); check those devices, or pin "
                    "a variant for the class (--pin CLASS=VARIANT)")
    fitting = [f for f in figures if f.fits]
    if not fitting:
        return make(None, False, f"class {device_class} is excluded: no variant passed on every "
                    f"probed device and fits {what}: {shown}; pin a variant "
                    "(--pin CLASS=VARIANT) to install one anyway, or raise the budgets in "
                    f"device_profiles/{device_class}.yaml")
    best = min(fitting, key=lambda f: (-(f.min_fidelity if f.min_fidelity is not None else -1.0),
                                       f.median_p95_ms if f.median_p95_ms is not None
                                       else math.inf, f.variant))
    return make(best.variant, False, f"class {device_class} gets {best.variant}: the best "
                f"fidelity of the variants that passed on all {len(devices)} probed device(s) "
                f"and fit {what}: {shown}")


def _figures(name: str, devices: Sequence[str], probes: Sequence[VariantProbe],
             limits: VariantBudget) -> VariantFigures:
    passed = [p for p in probes if p.passed and p.device_id in devices]
    passed_on = {p.device_id for p in passed}
    p95s = [p.p95_ms for p in passed if p.p95_ms is not None]
    rss = [p.peak_rss_mb for p in passed if p.peak_rss_mb is not None]
    fidelity = [p.fidelity for p in passed if p.fidelity is not None]
    median_p95 = float(statistics.median(p95s)) if p95s else None
    max_rss = max(rss) if rss else None
    why = ""
    if len(passed_on) < len(devices):
        failed = sorted({f"{p.device_id}: {p.reason or 'failed'}" for p in probes
                         if not p.passed})
        missing = sorted(set(devices) - {p.device_id for p in probes})
        listed = failed + [f"{d}: not probed" for d in missing]
        why = (f"failed its smoke test on {len(devices) - len(passed_on)} of {len(devices)} "
               f"device(s) ({', '.join(listed)})")
    elif limits.max_p95_latency_ms is not None and median_p95 is None:
        why = "p95 latency not measured"
    elif (limits.max_p95_latency_ms is not None and median_p95 is not None
          and median_p95 > limits.max_p95_latency_ms):
        why = f"median p95 {median_p95:.1f} ms > budget {limits.max_p95_latency_ms:g} ms"
    elif limits.max_peak_rss_mb is not None and max_rss is None:
        why = "peak RSS not measured"
    elif (limits.max_peak_rss_mb is not None and max_rss is not None
          and max_rss > limits.max_peak_rss_mb):
        why = f"max peak RSS {max_rss:.1f} MB > budget {limits.max_peak_rss_mb:g} MB"
    return VariantFigures(name, len(devices), len(passed_on), median_p95, max_rss,
                          min(fidelity) if fidelity else None, fits=not why, why=why)


def _budget_text(limits: VariantBudget) -> str:
    parts = []
    if limits.max_p95_latency_ms is not None:
        parts.append(f"p95 <= {limits.max_p95_latency_ms:g} ms")
    if limits.max_peak_rss_mb is not None:
        parts.append(f"peak RSS <= {limits.max_peak_rss_mb:g} MB")
    return "the class's budgets (" + ", ".join(parts) + ")" if parts else "no budgets"


def _number(value: object) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    number = float(value)
    return number if math.isfinite(number) and number >= 0 else None
