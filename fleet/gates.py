"""Performance gates of a rollout, evaluated per device class: p95 latency and peak memory of the
new version against the previous version's profiles, for language models also time to first token
and decode tokens/s, and smoke-test failures.

Pure functions over data (:class:`ProfileView`, :class:`GateSpec`); :mod:`fleetlite.fleet.rollout`
decides when to evaluate them and what a tripped gate does (docs/rollouts.md, "Gates").
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

from fleetlite.fleet.errors import RolloutError
from fleetlite.sdk.profile import ProfileRecord

__all__ = [
    "GATES",
    "SMOKE_REASONS",
    "Baseline",
    "GateResult",
    "GateSpec",
    "ProfileView",
    "baseline",
    "check_decode_rate",
    "check_latency",
    "check_memory",
    "check_profiles_present",
    "check_smoke",
    "check_ttft",
    "evaluate_class",
    "latest_profiles",
    "median",
]

SMOKE_REASONS = ("smoke_crashed", "smoke_timeout", "invalid_model", "smoke_vectors_mismatch",
                 "smoke_output_mismatch")
"""OTA reason codes that mean the release's model failed the on-device smoke test.
``smoke_test_unavailable`` is not one: the device could not run the test, the model is not at
fault."""

P95_LATENCY = "p95_latency"
PEAK_MEMORY = "peak_memory"
MEMORY_REGRESSION = "memory_regression"
SMOKE = "smoke"
PROFILES = "profiles"
TTFT = "ttft"
DECODE_RATE = "decode_rate"
GATES = (P95_LATENCY, PEAK_MEMORY, MEMORY_REGRESSION, SMOKE, PROFILES, TTFT, DECODE_RATE)
"""Gate names, as found in ``GateResult.gate`` and in the rollout's decisions."""


@dataclass(frozen=True)
class ProfileView:
    """What the gates read from one profile record, plus the device's class (which the record
    does not carry: the controller adds it from its registry). ``ttft_ms`` and
    ``decode_tokens_per_s`` come from a language model's ``lm`` section (``fleetlite.profile/2``)
    and are None for other models."""

    device_id: str
    device_class: str
    model: str
    version: Optional[int]
    p95_ms: float
    peak_rss_mb: float
    ts: float = 0.0
    ttft_ms: Optional[float] = None
    decode_tokens_per_s: Optional[float] = None

    @classmethod
    def from_record(cls, record: ProfileRecord, device_class: str) -> ProfileView:
        """Steady-state p95 and peak RSS during inference of a profile record (for a language
        model the p95 of a decode step), and an LM's warm TTFT and headline decode rate."""
        lm = record.lm
        return cls(
            device_id=record.device_id,
            device_class=device_class,
            model=record.model.name,
            version=record.model.version,
            p95_ms=record.timings.steady.p95_ms,
            peak_rss_mb=record.memory.peak_rss_inference_mb,
            ts=record.ts,
            ttft_ms=lm.ttft_ms if lm is not None else None,
            decode_tokens_per_s=lm.decode_tokens_per_s if lm is not None else None,
        )


@dataclass(frozen=True)
class GateSpec:
    """The performance limits of a rollout. ``None`` switches a limit off.

    - ``max_p95_regression``: trip when the median p95 of the new version on a class exceeds the
      previous version's median p95 on that class by more than this fraction (0.2 = +20 %) *and*
      by more than ``p95_floor_ms`` (so sub-0.05 ms jitter of tiny models never trips it).
    - ``max_peak_rss_mb``: trip when any device of the class peaks above this many MiB.
    - ``max_rss_regression``: like the p95 gate, for the median peak RSS, with ``rss_floor_mb``.
    - ``max_smoke_failures``: trip when more devices of the class than this failed the smoke test
      (an OTA outcome ``rejected`` with a reason in ``smoke_reasons``) during the rollout.
    - ``min_profiles``: profiles of the new version needed per class and wave before the latency
      and memory gates can pass (fewer if fewer devices installed); 0 makes profiles optional.
    - ``max_ttft_regression`` (language models): like the p95 gate, for the median warm time to
      first token, with ``ttft_floor_ms``.
    - ``max_decode_regression`` (language models): trip when the median decode tokens/s of the
      new version on a class falls below the previous version's by more than this fraction
      (0.2 = -20 %) *and* each token takes more than ``decode_floor_ms`` longer.

    The language-model gates compare only profiles with an ``lm`` section; others pass them.
    """

    max_p95_regression: Optional[float] = 0.2
    p95_floor_ms: float = 0.05
    max_peak_rss_mb: Optional[float] = None
    max_rss_regression: Optional[float] = None
    rss_floor_mb: float = 1.0
    max_smoke_failures: Optional[int] = 0
    smoke_reasons: tuple[str, ...] = SMOKE_REASONS
    min_profiles: int = 1
    max_ttft_regression: Optional[float] = 0.2
    ttft_floor_ms: float = 1.0
    max_decode_regression: Optional[float] = 0.2
    decode_floor_ms: float = 0.05

    def __post_init__(self) -> None:
        for name in ("max_p95_regression", "max_peak_rss_mb", "max_rss_regression",
                     "max_ttft_regression", "max_decode_regression"):
            value = getattr(self, name)
            if value is not None and not _finite_non_negative(value):
                raise RolloutError(f"gates.{name} must be a number >= 0 or None, got {value!r}")
        lost = self.max_decode_regression
        if lost is not None and lost >= 1:
            raise RolloutError("gates.max_decode_regression is the share of the decode rate that "
                               f"may be lost; it must be below 1, got {lost!r}")
        for name in ("p95_floor_ms", "rss_floor_mb", "ttft_floor_ms", "decode_floor_ms"):
            value = getattr(self, name)
            if not _finite_non_negative(value):
                raise RolloutError(f"gates.{name} must be a number >= 0, got {value!r}")
        for name in ("max_smoke_failures", "min_profiles"):
            value = getattr(self, name)
            if value is None and name == "max_smoke_failures":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise RolloutError(f"gates.{name} must be an integer >= 0, got {value!r}")
        reasons: object = self.smoke_reasons
        if not isinstance(reasons, tuple) or not all(isinstance(r, str) for r in reasons):
            raise RolloutError("gates.smoke_reasons must be a tuple of reason codes")

    def to_dict(self) -> dict[str, Any]:
        return {
            "max_p95_regression": self.max_p95_regression,
            "p95_floor_ms": self.p95_floor_ms,
            "max_peak_rss_mb": self.max_peak_rss_mb,
            "max_rss_regression": self.max_rss_regression,
            "rss_floor_mb": self.rss_floor_mb,
            "max_smoke_failures": self.max_smoke_failures,
            "smoke_reasons": list(self.smoke_reasons),
            "min_profiles": self.min_profiles,
            "max_ttft_regression": self.max_ttft_regression,
            "ttft_floor_ms": self.ttft_floor_ms,
            "max_decode_regression": self.max_decode_regression,
            "decode_floor_ms": self.decode_floor_ms,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GateSpec:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        if "smoke_reasons" in known:
            known["smoke_reasons"] = tuple(known["smoke_reasons"])
        return cls(**known)


@dataclass(frozen=True)
class GateResult:
    """One gate's verdict for one device class: ``passed``, a sentence for people, the numbers."""

    gate: str
    passed: bool
    reason: str
    detail: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Baseline:
    """The previous version on one device class: median p95 and peak RSS over its devices, and
    for a language model median TTFT and decode rate over those of its devices that have them."""

    version: Optional[int]
    devices: int = 0
    p95_ms: Optional[float] = None
    peak_rss_mb: Optional[float] = None
    ttft_ms: Optional[float] = None
    decode_tokens_per_s: Optional[float] = None


def median(values: Iterable[float]) -> float:
    """The median (mean of the two middle values for an even count)."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("median of no values")
    mid = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[mid]
    return (ordered[mid - 1] + ordered[mid]) / 2.0


def latest_profiles(
    profiles: Iterable[ProfileView],
    model: str,
    version: int,
    *,
    device_class: Optional[str] = None,
    device_ids: Optional[Collection[str]] = None,
) -> dict[str, ProfileView]:
    """The newest profile of ``model`` at ``version`` per device, optionally of one class or of
    some devices only. Later entries win ties in ``ts``."""
    latest: dict[str, ProfileView] = {}
    for p in profiles:
        if p.model != model or p.version != version:
            continue
        if device_class is not None and p.device_class != device_class:
            continue
        if device_ids is not None and p.device_id not in device_ids:
            continue
        known = latest.get(p.device_id)
        if known is None or p.ts >= known.ts:
            latest[p.device_id] = p
    return latest


def baseline(profiles: Iterable[ProfileView], model: str, version: Optional[int],
             device_class: str) -> Baseline:
    """The previous version's medians on ``device_class`` (every device of the class that
    profiled it counts once, with its newest profile)."""
    if version is None:
        return Baseline(version=None)
    latest = latest_profiles(profiles, model, version, device_class=device_class)
    if not latest:
        return Baseline(version=version)
    return Baseline(
        version=version,
        devices=len(latest),
        p95_ms=median(p.p95_ms for p in latest.values()),
        peak_rss_mb=median(p.peak_rss_mb for p in latest.values()),
        ttft_ms=_median_of([p.ttft_ms for p in latest.values()]),
        decode_tokens_per_s=_median_of([p.decode_tokens_per_s for p in latest.values()]),
    )


def _median_of(values: Sequence[Optional[float]]) -> Optional[float]:
    present = [v for v in values if v is not None]
    return median(present) if present else None


def check_latency(spec: GateSpec, device_class: str, new: Sequence[ProfileView],
                  base: Baseline) -> GateResult:
    """Median p95 of ``new`` against the baseline's, with the relative limit and absolute floor."""
    if spec.max_p95_regression is None:
        return GateResult(P95_LATENCY, True, "p95 latency gate is off")
    if not new:
        return GateResult(P95_LATENCY, True, f"no profiles of class {device_class} to compare")
    new_p95 = median(p.p95_ms for p in new)
    detail: dict[str, Any] = {
        "device_class": device_class,
        "new_p95_ms": new_p95,
        "new_devices": len(new),
        "baseline_version": base.version,
        "baseline_p95_ms": base.p95_ms,
        "baseline_devices": base.devices,
        "max_p95_regression": spec.max_p95_regression,
        "p95_floor_ms": spec.p95_floor_ms,
    }
    if base.p95_ms is None:
        return GateResult(P95_LATENCY, True, f"p95 on class {device_class}: no baseline profiles "
                          f"of version {base.version}, not compared (median p95 "
                          f"{new_p95:.3f} ms)", detail)
    limit = base.p95_ms * (1.0 + spec.max_p95_regression)
    detail["limit_p95_ms"] = limit
    change = _change(new_p95, base.p95_ms)
    numbers = (f"median p95 {new_p95:.3f} ms over {len(new)} device(s) vs {base.p95_ms:.3f} ms "
               f"for version {base.version} over {base.devices} device(s) ({change}, limit "
               f"+{spec.max_p95_regression:.0%}, floor {spec.p95_floor_ms:g} ms)")
    if new_p95 > limit and new_p95 - base.p95_ms > spec.p95_floor_ms:
        return GateResult(P95_LATENCY, False,
                          f"p95 latency regressed on class {device_class}: {numbers}", detail)
    return GateResult(P95_LATENCY, True, f"p95 latency within limits on class {device_class}: "
                      f"{numbers}", detail)


def check_memory(spec: GateSpec, device_class: str, new: Sequence[ProfileView],
                 base: Baseline) -> list[GateResult]:
    """The absolute peak-RSS cap (worst device) and the regression of the median peak RSS."""
    results: list[GateResult] = []
    if not new:
        return results
    if spec.max_peak_rss_mb is not None:
        worst = max(new, key=lambda p: (p.peak_rss_mb, p.device_id))
        detail = {"device_class": device_class, "max_peak_rss_mb": spec.max_peak_rss_mb,
                  "worst_peak_rss_mb": worst.peak_rss_mb, "worst_device": worst.device_id}
        if worst.peak_rss_mb > spec.max_peak_rss_mb:
            results.append(GateResult(
                PEAK_MEMORY, False,
                f"peak memory over the cap on class {device_class}: {worst.device_id} peaked at "
                f"{worst.peak_rss_mb:.1f} MiB, cap {spec.max_peak_rss_mb:g} MiB", detail))
        else:
            results.append(GateResult(
                PEAK_MEMORY, True,
                f"peak memory under the cap on class {device_class}: at most "
                f"{worst.peak_rss_mb:.1f} MiB, cap {spec.max_peak_rss_mb:g} MiB", detail))
    if spec.max_rss_regression is not None and base.peak_rss_mb is not None:
        new_rss = median(p.peak_rss_mb for p in new)
        limit = base.peak_rss_mb * (1.0 + spec.max_rss_regression)
        detail = {"device_class": device_class, "new_peak_rss_mb": new_rss,
                  "baseline_peak_rss_mb": base.peak_rss_mb, "baseline_version": base.version,
                  "limit_peak_rss_mb": limit, "max_rss_regression": spec.max_rss_regression,
                  "rss_floor_mb": spec.rss_floor_mb}
        numbers = (f"median peak RSS {new_rss:.1f} MiB vs {base.peak_rss_mb:.1f} MiB for "
                   f"version {base.version} ({_change(new_rss, base.peak_rss_mb)}, limit "
                   f"+{spec.max_rss_regression:.0%}, floor {spec.rss_floor_mb:g} MiB)")
        if new_rss > limit and new_rss - base.peak_rss_mb > spec.rss_floor_mb:
            results.append(GateResult(MEMORY_REGRESSION, False,
                                      f"peak memory regressed on class {device_class}: {numbers}",
                                      detail))
        else:
            results.append(GateResult(MEMORY_REGRESSION, True,
                                      f"peak memory within limits on class {device_class}: "
                                      f"{numbers}", detail))
    return results


def check_ttft(spec: GateSpec, device_class: str, new: Sequence[ProfileView],
               base: Baseline) -> GateResult:
    """Median warm TTFT of the language-model profiles in ``new`` against the baseline's, with
    the relative limit and absolute floor."""
    if spec.max_ttft_regression is None:
        return GateResult(TTFT, True, "TTFT gate is off")
    values = [p.ttft_ms for p in new if p.ttft_ms is not None]
    if not values:
        return GateResult(TTFT, True, f"no language-model profiles of class {device_class}: "
                          "TTFT not compared")
    new_ttft = median(values)
    detail: dict[str, Any] = {
        "device_class": device_class, "new_ttft_ms": new_ttft, "new_devices": len(values),
        "baseline_version": base.version, "baseline_ttft_ms": base.ttft_ms,
        "max_ttft_regression": spec.max_ttft_regression, "ttft_floor_ms": spec.ttft_floor_ms,
    }
    if base.ttft_ms is None:
        return GateResult(TTFT, True, f"TTFT on class {device_class}: no baseline language-model "
                          f"profiles of version {base.version}, not compared (median TTFT "
                          f"{new_ttft:.2f} ms)", detail)
    limit = base.ttft_ms * (1.0 + spec.max_ttft_regression)
    detail["limit_ttft_ms"] = limit
    numbers = (f"median TTFT {new_ttft:.2f} ms over {len(values)} device(s) vs "
               f"{base.ttft_ms:.2f} ms for version {base.version} "
               f"({_change(new_ttft, base.ttft_ms)}, limit +{spec.max_ttft_regression:.0%}, floor "
               f"{spec.ttft_floor_ms:g} ms)")
    if new_ttft > limit and new_ttft - base.ttft_ms > spec.ttft_floor_ms:
        return GateResult(TTFT, False, f"time to first token regressed on class {device_class}: "
                          f"{numbers}", detail)
    return GateResult(TTFT, True, f"time to first token within limits on class {device_class}: "
                      f"{numbers}", detail)


def check_decode_rate(spec: GateSpec, device_class: str, new: Sequence[ProfileView],
                      base: Baseline) -> GateResult:
    """Median decode tokens/s of the language-model profiles in ``new`` against the baseline's:
    trips when it fell by more than the limit and each token takes more than the floor longer."""
    if spec.max_decode_regression is None:
        return GateResult(DECODE_RATE, True, "decode-rate gate is off")
    values = [p.decode_tokens_per_s for p in new if p.decode_tokens_per_s is not None]
    if not values:
        return GateResult(DECODE_RATE, True, f"no language-model profiles of class "
                          f"{device_class}: decode rate not compared")
    new_rate = median(values)
    detail: dict[str, Any] = {
        "device_class": device_class, "new_decode_tokens_per_s": new_rate,
        "new_devices": len(values), "baseline_version": base.version,
        "baseline_decode_tokens_per_s": base.decode_tokens_per_s,
        "max_decode_regression": spec.max_decode_regression,
        "decode_floor_ms": spec.decode_floor_ms,
    }
    if base.decode_tokens_per_s is None:
        return GateResult(DECODE_RATE, True, f"decode rate on class {device_class}: no baseline "
                          f"language-model profiles of version {base.version}, not compared "
                          f"(median {new_rate:.1f} tokens/s)", detail)
    old_rate = base.decode_tokens_per_s
    limit = old_rate * (1.0 - spec.max_decode_regression)
    detail["limit_decode_tokens_per_s"] = limit
    slower_ms = _ms_per_token(new_rate) - _ms_per_token(old_rate)
    numbers = (f"median decode {new_rate:.1f} tokens/s over {len(values)} device(s) vs "
               f"{old_rate:.1f} tokens/s for version {base.version} "
               f"({_change(new_rate, old_rate)}, {slower_ms:+.3f} ms/token; limit "
               f"-{spec.max_decode_regression:.0%}, floor {spec.decode_floor_ms:g} ms/token)")
    if new_rate < limit and slower_ms > spec.decode_floor_ms:
        return GateResult(DECODE_RATE, False, f"decode rate regressed on class {device_class}: "
                          f"{numbers}", detail)
    return GateResult(DECODE_RATE, True, f"decode rate within limits on class {device_class}: "
                      f"{numbers}", detail)


def _ms_per_token(tokens_per_s: float) -> float:
    return 1000.0 / tokens_per_s if tokens_per_s > 0 else math.inf


def check_smoke(spec: GateSpec, device_class: str, failed: Sequence[str]) -> GateResult:
    """``failed``: the devices of the class whose install was rejected by the smoke test."""
    detail = {"device_class": device_class, "smoke_failures": len(failed),
              "max_smoke_failures": spec.max_smoke_failures, "devices": sorted(failed)}
    if spec.max_smoke_failures is None or len(failed) <= spec.max_smoke_failures:
        return GateResult(SMOKE, True, f"{len(failed)} smoke-test failure(s) on class "
                          f"{device_class} (allowed {spec.max_smoke_failures})", detail)
    return GateResult(SMOKE, False,
                      f"{len(failed)} device(s) of class {device_class} failed the smoke test "
                      f"({', '.join(sorted(failed)[:5])}), more than the "
                      f"{spec.max_smoke_failures} allowed", detail)


def check_profiles_present(spec: GateSpec, device_class: str, installed: int,
                           profiled: int) -> GateResult:
    """Enough profiles to judge: ``min(min_profiles, installed)`` of them."""
    needed = min(spec.min_profiles, installed)
    detail = {"device_class": device_class, "installed": installed, "profiled": profiled,
              "min_profiles": spec.min_profiles}
    if profiled >= needed:
        return GateResult(PROFILES, True, f"{profiled} of {installed} installed device(s) of "
                          f"class {device_class} published a profile", detail)
    return GateResult(PROFILES, False,
                      f"only {profiled} of {installed} installed device(s) of class "
                      f"{device_class} published a profile of the new version in time "
                      f"({needed} needed): no performance evidence", detail)


def evaluate_class(
    spec: GateSpec,
    device_class: str,
    model: str,
    version: int,
    previous_version: Optional[int],
    installed: Collection[str],
    profiles: Sequence[ProfileView],
) -> list[GateResult]:
    """The latency, memory and profile-presence gates for the ``installed`` devices of one class,
    and the TTFT and decode-rate gates when their profiles are a language model's (smoke
    failures are counted separately, by :func:`check_smoke`)."""
    new = list(latest_profiles(profiles, model, version, device_ids=installed).values())
    new.sort(key=lambda p: p.device_id)
    base = baseline(profiles, model, previous_version, device_class)
    results = [check_profiles_present(spec, device_class, len(installed), len(new))]
    results.append(check_latency(spec, device_class, new, base))
    results.extend(check_memory(spec, device_class, new, base))
    if any(p.ttft_ms is not None or p.decode_tokens_per_s is not None for p in new):
        results.append(check_ttft(spec, device_class, new, base))
        results.append(check_decode_rate(spec, device_class, new, base))
    return results


def _change(new: float, old: float) -> str:
    if old <= 0.0:
        return f"{new - old:+.3f}"
    return f"{(new - old) / old:+.0%}"


def _finite_non_negative(value: object) -> bool:
    return (not isinstance(value, bool) and isinstance(value, (int, float))
            and math.isfinite(value) and value >= 0)
