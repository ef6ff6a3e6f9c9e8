"""The shadow gate: from the devices' ``fleetlite.shadow_report/1`` messages, per device class,
whether a candidate version may be promoted (pass), must be stopped (fail) or needs more
samples (waiting), with the reasons and figures behind it.

Pure functions over :class:`~fleetlite.sdk.shadow.ShadowReport` values; the rollout decides
when to ask and what a verdict does (docs/rollouts.md, "Shadow evaluation").
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

from fleetlite.fleet.errors import RolloutError
from fleetlite.sdk.shadow import ShadowReport

__all__ = [
    "FAIL",
    "PASS",
    "VERDICTS",
    "WAITING",
    "ShadowVerdict",
    "latest_reports",
    "overall_verdict",
    "shadow_verdict",
]

PASS = "pass"
FAIL = "fail"
WAITING = "waiting"
VERDICTS = (PASS, FAIL, WAITING)

# Reason codes of a verdict (ShadowVerdict.codes).
NO_REPORTS = "no_reports"
TOO_FEW_SAMPLES = "too_few_samples"
LOW_AGREEMENT = "low_agreement"
CANDIDATE_ERRORS = "candidate_errors"
SHADOW_COST = "shadow_cost"
AGREES = "agrees"


@dataclass(frozen=True)
class ShadowVerdict:
    """One device class's verdict: ``verdict`` (pass/fail/waiting), reason codes, a sentence
    per reason for people, and the figures they rest on."""

    device_class: str
    verdict: str
    codes: tuple[str, ...]
    reasons: tuple[str, ...]
    figures: Mapping[str, Any] = field(default_factory=dict)


def latest_reports(reports: Iterable[ShadowReport]) -> list[ShadowReport]:
    """The newest report per device (reports are cumulative); later entries win ties."""
    newest: dict[str, ShadowReport] = {}
    for report in reports:
        known = newest.get(report.device_id)
        if known is None or report.ts >= known.ts:
            newest[report.device_id] = report
    return [newest[device] for device in sorted(newest)]


def shadow_verdict(
    reports_by_class: Mapping[str, Sequence[ShadowReport]],
    *,
    min_agreement: float = 0.98,
    min_samples: int = 200,
    p95_budget_ratio: Optional[float] = 1.25,
    p95_floor_ms: float = 0.05,
    min_latency_samples: int = 20,
) -> dict[str, ShadowVerdict]:
    """Per device class, the verdict on the candidate the reports are about.

    - fail ``low_agreement``: at least ``min_samples`` compared requests over the class's
      devices and the pooled agreement (agreed / compared units) is below ``min_agreement``;
    - fail ``candidate_errors``: the candidate failed on more than ``1 - min_agreement`` of the
      sampled requests (errors and compared together at least ``min_samples``);
    - fail ``shadow_cost``: on some device the active model's p95 while shadowed exceeded its
      p95 alone by more than ``p95_budget_ratio`` and by more than ``p95_floor_ms`` (both
      counted over at least ``min_latency_samples`` requests); ``None`` switches it off;
    - waiting ``no_reports`` or ``too_few_samples``; otherwise pass ``agrees``.

    Each device counts once, with its newest report. Raises :class:`RolloutError` when the
    limits are invalid or one class's reports are about different candidates (filter them by
    release first).
    """
    _check_limits(min_agreement, min_samples, p95_budget_ratio, p95_floor_ms,
                  min_latency_samples)
    return {
        device_class: _verdict(device_class, latest_reports(reports), min_agreement,
                               min_samples, p95_budget_ratio, p95_floor_ms, min_latency_samples)
        for device_class, reports in sorted(reports_by_class.items())
    }


def overall_verdict(verdicts: Mapping[str, ShadowVerdict]) -> str:
    """fail if any class failed, pass if every class passed, else waiting (also with none)."""
    found = {v.verdict for v in verdicts.values()}
    if FAIL in found:
        return FAIL
    return PASS if found == {PASS} else WAITING


def _verdict(device_class: str, reports: list[ShadowReport], min_agreement: float,
             min_samples: int, p95_budget_ratio: Optional[float], p95_floor_ms: float,
             min_latency_samples: int) -> ShadowVerdict:
    if not reports:
        return ShadowVerdict(device_class, WAITING, (NO_REPORTS,),
                             (f"no shadow report from class {device_class} yet",),
                             {"device_class": device_class, "devices": 0})
    _same_candidate(device_class, reports)
    first = reports[0]
    samples = sum(r.samples for r in reports)
    compared = sum(r.compared for r in reports)
    agreed = sum(r.agreed for r in reports)
    errors = sum(r.candidate_errors for r in reports)
    agreement = agreed / compared if compared else None
    figures: dict[str, Any] = {
        "device_class": device_class, "model": first.model, "version": first.version,
        "active_version": first.active_version, "kind": first.kind, "devices": len(reports),
        "requests": sum(r.requests for r in reports), "samples": samples,
        "compared": compared, "agreed": agreed, "agreement": agreement,
        "candidate_errors": errors,
        "skipped_budget": sum(r.skipped_budget for r in reports),
        "dropped_queue_full": sum(r.dropped_queue_full for r in reports),
        "min_agreement": min_agreement, "min_samples": min_samples,
        "p95_budget_ratio": p95_budget_ratio,
        "candidate_p95_ms": _median([r.candidate_p95_ms for r in reports]),
        "active_alone_p95_ms": _median([r.active_alone_p95_ms for r in reports]),
        "active_shadowed_p95_ms": _median([r.active_shadowed_p95_ms for r in reports]),
    }
    if first.kind == "regressor":
        figures["error_bound"] = first.error_bound
        figures["max_abs_error"] = max((r.max_abs_error or 0.0) for r in reports)
    codes: list[str] = []
    reasons: list[str] = []
    unit = "tokens" if first.kind == "lm" else "comparisons"
    pooled = (f"{agreed} of {compared} {unit} agree ({_percent(agreement)}) over {samples} "
              f"sampled request(s) on {len(reports)} device(s), minimum {min_agreement:.1%}")

    worst = _worst_shadow_cost(reports, p95_floor_ms, min_latency_samples)
    figures["worst_shadow_cost_ratio"] = worst[1] if worst else None
    # devices whose latencies the cost check could judge (enough requests of both kinds)
    figures["latency_judged_devices"] = sum(
        r.active_alone_count >= min_latency_samples
        and r.active_shadowed_count >= min_latency_samples for r in reports)
    figures["active_shadowed_count"] = sum(r.active_shadowed_count for r in reports)
    figures["min_latency_samples"] = min_latency_samples
    if worst is not None and p95_budget_ratio is not None and worst[1] > p95_budget_ratio:
        device, ratio, alone, shadowed = worst
        codes.append(SHADOW_COST)
        reasons.append(f"shadowing slowed the active model on {device} (class {device_class}): "
                       f"p95 {shadowed:.3f} ms while shadowed vs {alone:.3f} ms alone "
                       f"(x{ratio:.2f}, budget x{p95_budget_ratio:g}); lower the shadow's "
                       "sample rate or CPU budget for this class")
    tried = errors + samples
    if errors and tried >= min_samples and errors / tried > 1.0 - min_agreement:
        codes.append(CANDIDATE_ERRORS)
        reasons.append(f"the candidate failed on {errors} of {tried} sampled request(s) on "
                       f"class {device_class}: it does not take the active model's inputs or "
                       "fails at run time")
    if samples >= min_samples and agreement is not None and agreement < min_agreement:
        codes.append(LOW_AGREEMENT)
        reasons.append(f"the candidate disagrees with the active model on class "
                       f"{device_class}: {pooled}")
    if codes:
        return ShadowVerdict(device_class, FAIL, tuple(codes), tuple(reasons), figures)
    if samples < min_samples:
        return ShadowVerdict(device_class, WAITING, (TOO_FEW_SAMPLES,),
                             (f"{samples} of the {min_samples} sampled requests needed on class "
                              f"{device_class} so far ({pooled})",), figures)
    return ShadowVerdict(device_class, PASS, (AGREES,),
                         (f"the candidate agrees with the active model on class "
                          f"{device_class}: {pooled}",), figures)


def _same_candidate(device_class: str, reports: Sequence[ShadowReport]) -> None:
    about = {(r.model, r.version, r.active_version, r.kind, r.error_bound) for r in reports}
    if len(about) > 1:
        listed = ", ".join(f"{m} v{v} over v{a} ({k})" for m, v, a, k, _ in sorted(
            about, key=lambda t: (t[0], t[1], t[2], t[3])))
        raise RolloutError(f"the shadow reports of class {device_class} are about different "
                           f"candidates ({listed}); pass only one release's reports")


def _worst_shadow_cost(reports: Sequence[ShadowReport], floor_ms: float, min_count: int
                       ) -> Optional[tuple[str, float, float, float]]:
    """(device, ratio, alone p95, shadowed p95) of the device whose shadowing cost most, among
    those with enough requests of both kinds and a slowdown above the floor."""
    worst: Optional[tuple[str, float, float, float]] = None
    for r in reports:
        alone, shadowed = r.active_alone_p95_ms, r.active_shadowed_p95_ms
        if (alone is None or shadowed is None or alone <= 0.0
                or r.active_alone_count < min_count or r.active_shadowed_count < min_count
                or shadowed - alone <= floor_ms):
            continue
        ratio = shadowed / alone
        if worst is None or ratio > worst[1]:
            worst = (r.device_id, ratio, alone, shadowed)
    return worst


def _median(values: Sequence[Optional[float]]) -> Optional[float]:
    present = sorted(v for v in values if v is not None)
    if not present:
        return None
    mid = len(present) // 2
    return present[mid] if len(present) % 2 else (present[mid - 1] + present[mid]) / 2.0


def _percent(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def _check_limits(min_agreement: float, min_samples: int, p95_budget_ratio: Optional[float],
                  p95_floor_ms: float, min_latency_samples: int) -> None:
    problems = []
    if not (isinstance(min_agreement, (int, float)) and 0.0 <= min_agreement <= 1.0):
        problems.append(f"min_agreement must be a fraction from 0 to 1, got {min_agreement!r}")
    for name, value in (("min_samples", min_samples),
                        ("min_latency_samples", min_latency_samples)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            problems.append(f"{name} must be an integer >= 1, got {value!r}")
    if p95_budget_ratio is not None and not (
            isinstance(p95_budget_ratio, (int, float)) and math.isfinite(p95_budget_ratio)
            and p95_budget_ratio >= 1.0):
        problems.append(f"p95_budget_ratio must be a number >= 1 or None, got "
                        f"{p95_budget_ratio!r}")
    if not (isinstance(p95_floor_ms, (int, float)) and math.isfinite(p95_floor_ms)
            and p95_floor_ms >= 0.0):
        problems.append(f"p95_floor_ms must be a number >= 0, got {p95_floor_ms!r}")
    if problems:
        raise RolloutError("invalid shadow gate: " + "; ".join(problems) +
                           "; fix the rollout's shadow options")
