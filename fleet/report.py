"""The fleet's self-contained HTML report: devices, per-class latency and memory plots, rollouts.

A language model's profiles (rows with its figures) get their own table per class (time to first
token, prefill and decode tokens/s, peak memory) and plots of TTFT and decode rate per device in
place of the latency plot.

:func:`render_report` turns a :class:`ReportData` (plain dataclasses, filled by the controller from
its store) into ONE HTML document: inline CSS, hand-written inline SVG plots and a small inline
script (sortable/filterable tables). It references nothing outside itself — no URLs, fonts,
images or scripts — so it can be mailed, archived or opened offline. All text is escaped.

The script ends by setting ``<body data-rendered="ok">``; on an exception it sets
``data-rendered="error"`` and writes the error into ``<pre id="script-error">``.
"""

from __future__ import annotations

import html
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional, Protocol, Union

from fleetlite.fleet.errors import FleetError
from fleetlite.fleet.profiles_view import (
    Aggregate,
    ProfileRow,
    RowLike,
    aggregate,
    latest_per_device,
    to_rows,
)
from fleetlite.sdk.profile import percentile

__all__ = [
    "PALETTE",
    "STATUS_BUCKETS",
    "STATUS_COLORS",
    "ClassBudget",
    "DecisionEntry",
    "DeviceSummary",
    "ReportData",
    "attention",
    "table_devices",
    "RolloutSummary",
    "VariantSummary",
    "WaveSummary",
    "format_number",
    "render_report",
    "version_colors",
    "write_report",
]

PALETTE = ("#4e79a7", "#f28e2b", "#59a14f", "#b07aa1", "#76b7b2", "#edc948", "#9c755f",
           "#ff9da7", "#bab0ac", "#17becf")
"""Colors of a model's versions, oldest first (Tableau 10 order, red left for failures)."""

STATUS_COLORS = {
    "installed": "#2e9e5b",
    "unchanged": "#9ccfb0",
    "in_progress": "#4e79a7",
    "failed": "#d64545",
    "rolled_back": "#e08a1e",
    "pending": "#cfd5dd",
}
"""Segment colors of the wave progress bars."""

STATUS_BUCKETS: dict[str, Optional[str]] = {
    "installed": "installed",
    "no_change": "unchanged",  # had the version already: succeeded, but not updated
    "failed": "failed",
    "rejected": "failed",
    "timed_out": "failed",
    "rollback_failed": "failed",
    "rolled_back": "rolled_back",
    "sent": "in_progress",
    "rollback_sent": "in_progress",
    "pending": "pending",
    "waiting_offline": "pending",
    "excluded": None,
}
"""Per-device rollout statuses (``fleet.rollout``'s constants) to progress-bar buckets."""

_BUDGET_COLOR = "#c0392b"

_INSTALL_PROBLEMS = {
    "failed": "install failed",
    "rejected": "install rejected",
    "timed_out": "install timed out",
    "rolled_back": "rolled back",
    "rollback_failed": "rollback failed",
}
"""Rollout statuses (``fleet.rollout``) that put a device in the report's attention list."""


# -- input ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceSummary:
    """One device as the devices table shows it. ``tags`` are labels (``"site=berlin"``) or a
    mapping rendered as ``key=value``; ``last_seen`` is Unix time (s)."""

    device_id: str
    device_class: str
    online: bool
    model: Optional[str] = None
    version: Optional[int] = None
    last_seen: Optional[float] = None
    tags: Union[Sequence[str], Mapping[str, str]] = ()
    agent_version: str = ""
    install: Optional[str] = None
    """Its status in the newest rollout that reached it (``fleet.rollout``'s constants:
    ``installed``, ``failed``, ``rejected``, ``rolled_back``...), None if none did."""


@dataclass(frozen=True)
class WaveSummary:
    """Progress of one wave: device counts by install outcome. ``state`` is free text
    (``"completed"``, ``"in progress"``, ``"paused"``, ``"rolled back"``, ``"waiting"``)."""

    name: str
    installed: int = 0
    unchanged: int = 0
    failed: int = 0
    rolled_back: int = 0
    pending: int = 0
    in_progress: int = 0
    state: str = ""
    device_classes: Sequence[str] = ()

    @property
    def total(self) -> int:
        return (self.installed + self.unchanged + self.failed + self.rolled_back + self.pending
                + self.in_progress)

    @classmethod
    def from_statuses(
        cls, name: str, statuses: Iterable[str], state: str = "",
        device_classes: Sequence[str] = (),
    ) -> WaveSummary:
        """Count per-device statuses into the bar's buckets (see :data:`STATUS_BUCKETS`);
        statuses mapped to ``None`` (``excluded``) are left out, unknown ones count as pending."""
        counts = {"installed": 0, "unchanged": 0, "failed": 0, "rolled_back": 0, "pending": 0,
                  "in_progress": 0}
        for status in statuses:
            bucket = STATUS_BUCKETS.get(status, "pending")
            if bucket is not None:
                counts[bucket] += 1
        return cls(name=name, state=state, device_classes=tuple(device_classes), **counts)


@dataclass(frozen=True)
class DecisionEntry:
    """One entry of a rollout's decision log. ``action`` is the engine's verb (``proceed``,
    ``pause``, ``rollback``, ``complete``...); ``reason`` the human-readable why."""

    ts: float
    action: str
    reason: str
    wave: str = ""
    device_class: str = ""


@dataclass(frozen=True)
class RolloutSummary:
    """A rollout of ``model`` to ``version`` (from ``from_version``), its waves in order, its
    decision log (oldest first) and its gates as short text (``"p95 latency +20%"``)."""

    rollout_id: str
    model: str
    version: int
    state: str
    waves: Sequence[WaveSummary] = ()
    decisions: Sequence[DecisionEntry] = ()
    from_version: Optional[int] = None
    created_at: Optional[float] = None
    gates: Sequence[str] = ()
    variants: Sequence[VariantSummary] = ()
    shadow: Sequence[Mapping[str, str]] = ()
    """Per device class of a shadow rollout, text cells keyed ``class``, ``verdict``,
    ``agreement``, ``samples``, ``active_alone_p95_ms``, ``active_shadowed_p95_ms``,
    ``budget_p95_ms``, ``candidate_p95_ms``, ``reason``."""


@dataclass(frozen=True)
class VariantSummary:
    """The variant a rollout chose for one device class (``variant`` empty: none fits, the
    class is excluded), whether an operator pinned it, why, and the figures of every candidate:
    ``rows`` of text cells keyed ``variant``, ``probed``, ``passed``, ``p95_ms``,
    ``budget_p95_ms``, ``peak_rss_mb``, ``budget_rss_mb``, ``fidelity``, ``why``."""

    device_class: str
    variant: str
    pinned: bool
    reason: str
    rows: Sequence[Mapping[str, str]] = ()


class _BudgetsLike(Protocol):
    @property
    def max_p95_latency_ms(self) -> float: ...
    @property
    def max_peak_rss_mb(self) -> float: ...


@dataclass(frozen=True)
class ClassBudget:
    """A device class's limits drawn into its plots (dashed red line)."""

    max_p95_ms: Optional[float] = None
    max_peak_rss_mb: Optional[float] = None

    @classmethod
    def from_budgets(cls, budgets: _BudgetsLike) -> ClassBudget:
        """From :class:`fleetlite.sdk.device_class.Budgets` (or anything with its fields)."""
        return cls(max_p95_ms=budgets.max_p95_latency_ms, max_peak_rss_mb=budgets.max_peak_rss_mb)


@dataclass(frozen=True)
class ReportData:
    """Everything the report shows. ``profiles`` are rows of
    :mod:`fleetlite.fleet.profiles_view` (objects or mappings); for each (device, model, version)
    only the newest is plotted. ``generated_at`` is Unix time (s)."""

    generated_at: float
    devices: Sequence[DeviceSummary] = ()
    profiles: Sequence[RowLike] = ()
    rollouts: Sequence[RolloutSummary] = ()
    budgets: Mapping[str, ClassBudget] = field(default_factory=dict)
    title: str = "FleetLite fleet report"
    max_devices: Optional[int] = 1000
    """Rows of the devices table at most (None or 0: every device): those needing attention
    first (:func:`attention`), then the rest by id. The counts, aggregates and plots are over
    every device whatever this is."""
    list_command: str = "fleetlite devices list --limit 0"
    """The command the report names for the devices its table leaves out."""
    stale_after_s: float = 600.0
    """An online device not heard from for longer than this (ten telemetry intervals by
    default) needs attention: its status may be out of date."""


def attention(device: DeviceSummary, now: float, stale_after_s: float = 600.0) -> list[str]:
    """Why ``device`` needs an operator's attention at ``now`` (empty: it does not): offline,
    its newest rollout's install failed, was rejected, timed out or was rolled back, or it is
    online but not heard from for more than ``stale_after_s``."""
    reasons = []
    if not device.online:
        reasons.append("offline")
    elif device.last_seen is not None and now - device.last_seen > stale_after_s:
        reasons.append("stale")
    if device.install in _INSTALL_PROBLEMS:
        reasons.append(_INSTALL_PROBLEMS[device.install])
    return reasons


def table_devices(data: ReportData) -> tuple[list[tuple[DeviceSummary, list[str]]], int]:
    """The devices table's rows with their attention reasons, in order (those needing
    attention first, then the rest; each part by id), capped at ``data.max_devices``; and how
    many devices need attention in all."""
    flagged = [(d, attention(d, data.generated_at, data.stale_after_s)) for d in data.devices]
    ordered = sorted(flagged, key=lambda item: (not item[1], item[0].device_id))
    needing = sum(1 for _, reasons in flagged if reasons)
    if data.max_devices:
        ordered = ordered[:data.max_devices]
    return ordered, needing


# -- formatting helpers ------------------------------------------------------------------------


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def format_number(value: float) -> str:
    """Four significant digits, no exponent below 10 000 (``0.41``, ``12.35``, ``1234``)."""
    if not math.isfinite(value):
        return str(value)
    if abs(value) >= 1000:
        return f"{value:.0f}"
    return f"{value:.4g}"


def _utc(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _ago(seconds: float) -> str:
    s = max(0.0, seconds)
    if s < 60:
        return f"{s:.0f} s ago"
    if s < 3600:
        return f"{s / 60:.0f} min ago"
    if s < 86400:
        return f"{s / 3600:.1f} h ago"
    return f"{s / 86400:.1f} d ago"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "x"


def _tags_text(tags: Union[Sequence[str], Mapping[str, str]]) -> list[str]:
    if isinstance(tags, Mapping):
        return [f"{k}={v}" for k, v in sorted(tags.items())]
    return [str(t) for t in tags]


def version_colors(rows: Iterable[RowLike]) -> dict[tuple[str, int], str]:
    """The color of each (model, version): per model, versions in ascending order take
    :data:`PALETTE` colors in order, so v1 and v2 of any model look the same everywhere."""
    versions: dict[str, set[int]] = {}
    for row in to_rows(rows):
        versions.setdefault(row.model, set()).add(row.version)
    return {
        (model, v): PALETTE[i % len(PALETTE)]
        for model, vs in versions.items()
        for i, v in enumerate(sorted(vs))
    }


# -- scales and SVG plots ----------------------------------------------------------------------


def _nice_step(raw: float) -> float:
    exp = math.floor(math.log10(raw))
    base = 10.0 ** exp
    for mult in (1.0, 2.0, 2.5, 5.0, 10.0):
        if raw <= mult * base * (1 + 1e-9):
            return mult * base
    return 10.0 * base


@dataclass(frozen=True)
class _Scale:
    lo: float
    hi: float
    log: bool
    x0: float
    x1: float
    ticks: tuple[float, ...]

    def __call__(self, value: float) -> float:
        v = min(max(value, self.lo), self.hi)
        if self.log:
            f = (math.log10(v) - math.log10(self.lo)) / (math.log10(self.hi) - math.log10(self.lo))
        else:
            f = (v - self.lo) / (self.hi - self.lo)
        return self.x0 + f * (self.x1 - self.x0)


def _log_ladder(lo_exp: int, hi_exp: int, mults: Sequence[float]) -> list[float]:
    return [m * 10.0 ** k for k in range(lo_exp, hi_exp + 1) for m in mults]


def _make_scale(values: Sequence[float], x0: float, x1: float, allow_log: bool) -> _Scale:
    """Linear from zero, or logarithmic (1-2-5 ticks) when positive values span 8x or more."""
    positive = [v for v in values if v > 0 and math.isfinite(v)]
    top = max(positive) if positive else 1.0
    if allow_log and positive and top / min(positive) >= 8.0:
        low = min(positive)
        ladder = _log_ladder(math.floor(math.log10(low)) - 1, math.ceil(math.log10(top)) + 1,
                             (1.0, 2.0, 5.0))
        lo = max(t for t in ladder if t <= low * (1 + 1e-9))
        hi = min(t for t in ladder if t >= top * (1 - 1e-9))
        ticks = [t for t in ladder if lo * (1 - 1e-9) <= t <= hi * (1 + 1e-9)]
        if len(ticks) > 9:  # many decades: label the decades only
            ticks = [t for t in ticks if abs(math.log10(t) - round(math.log10(t))) < 1e-9]
            ticks = sorted({lo, *ticks, hi})
        return _Scale(lo, hi, True, x0, x1, tuple(ticks))
    step = _nice_step(top / 5.0)
    hi = math.ceil(top / step - 1e-9) * step
    n = round(hi / step)
    return _Scale(0.0, hi, False, x0, x1, tuple(round(i * step, 12) for i in range(n + 1)))


def _tick_label(v: float) -> str:
    return f"{v:g}"


@dataclass(frozen=True)
class _Row:
    label: str
    sub: str
    color: str
    hollow: bool
    points: Sequence[tuple[str, float]]


@dataclass(frozen=True)
class _LegendItem:
    label: str
    color: str
    kind: str  # "swatch", "dot", "ring", "budget"


_ROW_H = 30
_LEFT = 92
_RIGHT = 22
_LEGEND_LINE = 18
_LEGEND_Y = 20
_BOTTOM = 46


def _legend_svg(items: Sequence[_LegendItem], y0: float, max_x: float) -> tuple[list[str], int]:
    """Legend entries left to right, wrapping onto new lines; returns the parts and line count."""
    out: list[str] = []
    x, y, lines = float(_LEFT), y0, 1
    for item in items:
        item_w = 19 + 6.8 * len(item.label)
        if x > _LEFT and x + item_w > max_x:
            x, y, lines = float(_LEFT), y + _LEGEND_LINE, lines + 1
        c = _e(item.color)
        if item.kind == "swatch":
            out.append(f'<rect x="{x:.1f}" y="{y - 9:.1f}" width="14" height="10" rx="2" '
                       f'fill="{c}"/>')
        elif item.kind == "dot":
            out.append(f'<circle cx="{x + 6:.1f}" cy="{y - 4:.1f}" r="4.5" fill="{c}"/>')
        elif item.kind == "ring":
            out.append(f'<circle cx="{x + 6:.1f}" cy="{y - 4:.1f}" r="4" fill="#fff" '
                       f'stroke="{c}" stroke-width="1.8"/>')
        else:
            out.append(f'<line x1="{x + 6:.1f}" y1="{y - 12:.1f}" x2="{x + 6:.1f}" '
                       f'y2="{y + 3:.1f}" stroke="{c}" stroke-width="1.6" '
                       f'stroke-dasharray="4 3"/>')
        out.append(f'<text x="{x + 19:.1f}" y="{y:.1f}" class="legend">{_e(item.label)}</text>')
        x += item_w + 18
    return out, lines


def _strip_plot(
    rows: Sequence[_Row],
    axis_label: str,
    unit: str,
    aria: str,
    legend: Sequence[_LegendItem],
    budget: Optional[float],
    budget_label: str,
    kind: str,
    width: int,
    allow_log: bool,
) -> str:
    """A horizontal box + strip plot: one row per (version, metric), one dot per device."""
    values = [v for r in rows for _, v in r.points]
    budget_on_scale = budget is not None and values != [] and budget <= 3.0 * max(values)
    scale_values = [*values, budget] if budget_on_scale and budget is not None else values
    scale = _make_scale(scale_values, _LEFT, width - _RIGHT, allow_log)
    legend_items = list(legend)
    if budget is not None:
        suffix = "" if budget_on_scale else " (off scale)"
        legend_items.append(_LegendItem(f"{budget_label} {format_number(budget)} {unit}{suffix}",
                                        _BUDGET_COLOR, "budget"))
    legend_parts, legend_lines = _legend_svg(legend_items, _LEGEND_Y, width - _RIGHT)
    top = _LEGEND_Y + (legend_lines - 1) * _LEGEND_LINE + 34 if legend_items else 20
    plot_h = len(rows) * _ROW_H
    height = top + plot_h + _BOTTOM
    parts: list[str] = [
        f'<svg class="plot" data-plot="{_e(kind)}" viewBox="0 0 {width} {height}" '
        f'width="{width}" height="{height}" role="img" aria-label="{_e(aria)}">',
        f'<rect x="0" y="0" width="{width}" height="{height}" fill="#ffffff"/>',
        *legend_parts,
    ]
    # version bands (alternate rows of the same label share a band)
    labels = [r.label for r in rows]
    band = 0
    i = 0
    while i < len(rows):
        j = i
        while j < len(rows) and labels[j] == labels[i]:
            j += 1
        if band % 2 == 0:
            parts.append(f'<rect x="{_LEFT}" y="{top + i * _ROW_H}" '
                         f'width="{width - _LEFT - _RIGHT}" height="{(j - i) * _ROW_H}" '
                         f'fill="#f5f7fa"/>')
        band += 1
        i = j
    # grid and ticks
    axis_y = top + plot_h
    for t in scale.ticks:
        x = scale(t)
        parts.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{axis_y}" '
                     f'stroke="#e1e5ea" stroke-width="1"/>')
        parts.append(f'<line x1="{x:.1f}" y1="{axis_y}" x2="{x:.1f}" y2="{axis_y + 5}" '
                     f'stroke="#5b6470" stroke-width="1"/>')
        parts.append(f'<text x="{x:.1f}" y="{axis_y + 18}" text-anchor="middle" '
                     f'class="tick">{_e(_tick_label(t))}</text>')
    parts.append(f'<line x1="{_LEFT}" y1="{axis_y}" x2="{width - _RIGHT}" y2="{axis_y}" '
                 f'stroke="#5b6470" stroke-width="1"/>')
    scale_note = ", log scale" if scale.log else ""
    parts.append(f'<text x="{(_LEFT + width - _RIGHT) / 2:.1f}" y="{height - 8}" '
                 f'text-anchor="middle" class="axis">{_e(axis_label)} ({_e(unit)}'
                 f'{scale_note})</text>')
    # rows
    for idx, row in enumerate(rows):
        cy = top + idx * _ROW_H + _ROW_H / 2
        label = row.label if idx == 0 or labels[idx - 1] != row.label else ""
        if label:
            parts.append(f'<text x="{_LEFT - 44}" y="{cy + 4:.1f}" text-anchor="end" '
                         f'class="rowlabel" fill="{_e(row.color)}">{_e(label)}</text>')
        parts.append(f'<text x="{_LEFT - 8}" y="{cy + 4:.1f}" text-anchor="end" '
                     f'class="sublabel">{_e(row.sub)}</text>')
        vals = sorted(v for _, v in row.points)
        if not vals:
            continue
        q1, med, q3 = (percentile(vals, q) for q in (25.0, 50.0, 75.0))
        xmin, xq1, xmed, xq3, xmax = (scale(v) for v in (vals[0], q1, med, q3, vals[-1]))
        c = _e(row.color)
        parts.append(f'<line x1="{xmin:.1f}" y1="{cy:.1f}" x2="{xmax:.1f}" y2="{cy:.1f}" '
                     f'stroke="{c}" stroke-width="1.2" opacity="0.7"/>')
        parts.append(f'<rect x="{xq1:.1f}" y="{cy - 8:.1f}" width="{max(xq3 - xq1, 1.0):.1f}" '
                     f'height="16" fill="{c}" fill-opacity="0.16" stroke="{c}" '
                     f'stroke-width="1.2" rx="2"/>')
        parts.append(f'<line x1="{xmed:.1f}" y1="{cy - 10:.1f}" x2="{xmed:.1f}" '
                     f'y2="{cy + 10:.1f}" stroke="{c}" stroke-width="2.4"/>')
        ordered = sorted(row.points, key=lambda p: (p[1], p[0]))
        for k, (device_id, value) in enumerate(ordered):
            x = scale(value)
            y = cy + ((k % 5) - 2) * 2.4
            tip = f"{device_id}: {row.sub} {format_number(value)} {unit}"
            if row.hollow:
                parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4" fill="#ffffff" '
                             f'stroke="{c}" stroke-width="1.8"><title>{_e(tip)}</title>'
                             f'</circle>')
            else:
                parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4.5" fill="{c}" '
                             f'stroke="#ffffff" stroke-width="0.8"><title>{_e(tip)}</title>'
                             f'</circle>')
    if budget_on_scale and budget is not None:
        bx = scale(budget)
        parts.append(f'<line x1="{bx:.1f}" y1="{top - 6}" x2="{bx:.1f}" y2="{axis_y}" '
                     f'stroke="{_BUDGET_COLOR}" stroke-width="1.6" stroke-dasharray="4 3"/>')
    parts.append("</svg>")
    return "".join(parts)


def _latency_plot(
    device_class: str, model: str, rows: Sequence[ProfileRow],
    colors: Mapping[tuple[str, int], str], budget: Optional[float],
) -> str:
    versions = sorted({r.version for r in rows})
    plot_rows: list[_Row] = []
    legend: list[_LegendItem] = []
    for v in versions:
        color = colors.get((model, v), PALETTE[0])
        of_v = [r for r in rows if r.version == v]
        legend.append(_LegendItem(f"v{v} ({len(of_v)})", color, "swatch"))
        plot_rows.append(_Row(f"v{v}", "p50", color, True,
                              [(r.device_id, r.p50_ms) for r in of_v]))
        plot_rows.append(_Row(f"v{v}", "p95", color, False,
                              [(r.device_id, r.p95_ms) for r in of_v]))
    legend.append(_LegendItem("p50", "#5b6470", "ring"))
    legend.append(_LegendItem("p95 (one dot per device)", "#5b6470", "dot"))
    return _strip_plot(
        plot_rows, "steady-state latency per device", "ms",
        f"Latency of {model} on {device_class} by version", legend, budget, "p95 budget",
        "latency", 660, allow_log=True,
    )


def _lm_plot(
    device_class: str, model: str, rows: Sequence[ProfileRow],
    colors: Mapping[tuple[str, int], str], figure: str,
) -> str:
    """TTFT (``figure`` ``ttft``) or decode tokens/s (``decode``) per device, by version."""
    ttft = figure == "ttft"
    versions = sorted({r.version for r in rows})
    plot_rows: list[_Row] = []
    for v in versions:
        points = [(r.device_id, r.ttft_ms if ttft else r.decode_tokens_per_s)
                  for r in rows if r.version == v]
        plot_rows.append(_Row(f"v{v}", "TTFT" if ttft else "rate",
                              colors.get((model, v), PALETTE[0]), False,
                              [(d, value) for d, value in points if value is not None]))
    legend = [_LegendItem(f"v{v}", colors.get((model, v), PALETTE[0]), "swatch")
              for v in versions]
    legend.append(_LegendItem("one dot per device", "#5b6470", "dot"))
    if ttft:
        return _strip_plot(plot_rows, "warm time to first token per device", "ms",
                           f"Time to first token of {model} on {device_class} by version",
                           legend, None, "", "ttft", 460, allow_log=True)
    return _strip_plot(plot_rows, "decode rate per device", "tokens/s",
                       f"Decode rate of {model} on {device_class} by version", legend, None, "",
                       "decode", 460, allow_log=True)


def _memory_plot(
    device_class: str, model: str, rows: Sequence[ProfileRow],
    colors: Mapping[tuple[str, int], str], budget: Optional[float],
) -> str:
    versions = sorted({r.version for r in rows})
    plot_rows = [
        _Row(f"v{v}", "peak", colors.get((model, v), PALETTE[0]), False,
             [(r.device_id, r.peak_rss_mb) for r in rows if r.version == v])
        for v in versions
    ]
    legend = [_LegendItem(f"v{v}", colors.get((model, v), PALETTE[0]), "swatch")
              for v in versions]
    legend.append(_LegendItem("peak RSS", "#5b6470", "dot"))
    return _strip_plot(
        plot_rows, "peak RSS per device", "MiB",
        f"Peak memory of {model} on {device_class} by version", legend, budget, "budget",
        "memory", 460, allow_log=False,
    )


# -- sections ----------------------------------------------------------------------------------


def _header(data: ReportData, needing: int) -> str:
    total = len(data.devices)
    online = sum(1 for d in data.devices if d.online)
    classes = len({d.device_class for d in data.devices}
                  | {r.device_class for r in to_rows(data.profiles)})
    active = sum(1 for r in data.rollouts if r.state.lower() not in ("completed", "done",
                                                                     "rolled back", "aborted"))
    pct = f" ({online * 100 / total:.0f}%)" if total else ""
    cards = [
        ("Fleet size", str(total), "devices", "fleet-size"),
        ("Online", str(online), f"of {total}{pct}", "online-count"),
        ("Needs attention", str(needing), "offline, failed installs, stale", "attention-count"),
        ("Device classes", str(classes), "", "class-count"),
        ("Rollouts", str(len(data.rollouts)), f"{active} active", "rollout-count"),
    ]
    card_html = "".join(
        f'<div class="card"><div class="card-label">{_e(label)}</div>'
        f'<div class="card-value" id="{key}">{_e(value)}</div>'
        f'<div class="card-note">{_e(note)}</div></div>'
        for label, value, note, key in cards
    )
    return (
        f'<header><h1>{_e(data.title)}</h1>'
        f'<p class="generated">Generated at <time id="generated-at">'
        f'{_e(_utc(data.generated_at))}</time></p>'
        f'<div class="cards">{card_html}</div>'
        '<nav><a href="#devices">Devices</a><a href="#classes">Device classes</a>'
        '<a href="#rollouts">Rollouts</a></nav></header>'
    )


def _devices_section(data: ReportData,
                     shown: Sequence[tuple[DeviceSummary, list[str]]], needing: int) -> str:
    rows: list[str] = []
    marked = ' data-attention="1"'
    for d, reasons in shown:
        tags = "".join(f'<span class="tag">{_e(t)}</span>' for t in _tags_text(d.tags))
        status = ('<span class="status on">online</span>' if d.online
                  else '<span class="status off">offline</span>')
        model = _e(d.model) if d.model else '<span class="muted">none</span>'
        version = f"v{d.version}" if d.version is not None else ""
        if d.last_seen is not None:
            seen = (f'<td data-v="{d.last_seen:.3f}" title="{_e(_utc(d.last_seen))}">'
                    f'{_e(_ago(data.generated_at - d.last_seen))}</td>')
        else:
            seen = '<td data-v="0"><span class="muted">never</span></td>'
        flags = "".join(f'<span class="badge {"warn" if r in ("offline", "stale") else "bad"}">'
                        f'{_e(r)}</span> ' for r in reasons).rstrip()
        rows.append(
            f'<tr data-device-id="{_e(d.device_id)}"{marked if reasons else ""}>'
            f'<td class="mono">{_e(d.device_id)}</td>'
            f'<td>{_e(d.device_class)}</td><td>{tags}</td>'
            f'<td data-v="{1 if d.online else 0}">{status}</td><td>{model}</td>'
            f'<td data-v="{d.version if d.version is not None else -1}">{_e(version)}</td>'
            f'{seen}<td data-v="{len(reasons)}">{flags}</td></tr>'
        )
    body = "".join(rows) or '<tr><td colspan="8" class="muted">No devices.</td></tr>'
    total = len(data.devices)
    left_out = total - len(shown)
    stale = f"online but not heard from for over {_duration(data.stale_after_s)}"
    if left_out:
        first = (f"the {needing:,} needing attention (offline, failed or rejected installs, "
                 f"rolled back, {stale}) first, then the rest by id"
                 if needing else "no device needs attention; the first by id")
        note = (f'<p class="note" id="devices-left-out">Showing {len(shown):,} of {total:,} '
                f'devices: {_e(first)}. <strong>{left_out:,} left out</strong>; list them all '
                f'with <code>{_e(data.list_command)}</code>.</p>')
    elif needing:
        note = (f'<p class="note">The {needing:,} device{"" if needing == 1 else "s"} needing '
                f'attention (offline, failed or rejected installs, rolled back, {_e(stale)}) '
                'first, then the rest by id.</p>')
    else:
        note = ""
    return (
        '<section id="devices"><div class="section-head"><h2>Devices</h2>'
        '<input id="device-filter" type="search" placeholder="Filter devices"'
        ' aria-label="Filter devices"></div>'
        f'{note}<table class="sortable" id="devices-table"><thead><tr>'
        '<th>Device</th><th>Class</th><th>Tags</th><th>Status</th><th>Model</th>'
        '<th>Version</th><th>Last seen</th><th>Attention</th>'
        f'</tr></thead><tbody>{body}</tbody></table></section>'
    )


def _duration(seconds: float) -> str:
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{seconds / 3600:g} h"
    if seconds >= 60 and seconds % 60 == 0:
        return f"{seconds / 60:g} min"
    return f"{seconds:g} s"


def _lm_aggregate_table(aggs: Sequence[Aggregate],
                        colors: Mapping[tuple[str, int], str]) -> str:
    rows: list[str] = []
    previous: Optional[Aggregate] = None
    for a in aggs:
        change = ""
        old = previous.decode_tokens_per_s_median if previous is not None else None
        new = a.decode_tokens_per_s_median
        if previous is not None and previous.model == a.model and old and new is not None:
            pct = (new / old - 1.0) * 100
            cls = "worse" if pct < -0.5 else "better" if pct > 0.5 else ""
            change = f'<span class="{cls}">{pct:+.0f}% vs v{previous.version}</span>'
        color = _e(colors.get((a.model, a.version), PALETTE[0]))
        cells = (a.ttft_ms_median, a.prefill_tokens_per_s_median, a.decode_tokens_per_s_median,
                 a.p95_ms_median, a.peak_rss_mb_max)
        rows.append(
            f'<tr data-model="{_e(a.model)}" data-version="{a.version}" data-lm="1">'
            f'<td>{_e(a.model)}</td>'
            f'<td><span class="swatch" style="background:{color}"></span>v{a.version}</td>'
            f'<td class="num">{a.count}</td>'
            + "".join(f'<td class="num">{"-" if v is None else format_number(v)}</td>'
                      for v in cells)
            + f'<td>{change}</td></tr>'
        )
        previous = a
    return (
        '<table class="aggregates lm"><thead><tr><th>Language model</th><th>Version</th>'
        '<th class="num">Devices</th><th class="num">TTFT ms</th>'
        '<th class="num">prefill tok/s</th><th class="num">decode tok/s</th>'
        '<th class="num">decode p95 ms</th><th class="num">max peak MiB</th>'
        '<th>decode change</th></tr></thead>'
        f'<tbody>{"".join(rows)}</tbody></table>'
        '<p class="note">Medians across devices of each device\'s latest profile: warm time to '
        'first token, the longest prefill test and the shallowest decode test.</p>'
    )


def _aggregate_table(aggs: Sequence[Aggregate], colors: Mapping[tuple[str, int], str]) -> str:
    lm = [a for a in aggs if a.is_lm]
    if lm:
        others = [a for a in aggs if not a.is_lm]
        return ((_aggregate_table(others, colors) if others else "")
                + _lm_aggregate_table(lm, colors))
    rows: list[str] = []
    previous: Optional[Aggregate] = None
    for a in aggs:
        change = ""
        if previous is not None and previous.model == a.model and previous.p95_ms_median > 0:
            pct = (a.p95_ms_median / previous.p95_ms_median - 1.0) * 100
            cls = "worse" if pct > 0.5 else "better" if pct < -0.5 else ""
            change = f'<span class="{cls}">{pct:+.0f}% vs v{previous.version}</span>'
        color = _e(colors.get((a.model, a.version), PALETTE[0]))
        rows.append(
            f'<tr data-model="{_e(a.model)}" data-version="{a.version}">'
            f'<td>{_e(a.model)}</td>'
            f'<td><span class="swatch" style="background:{color}"></span>v{a.version}</td>'
            f'<td class="num">{a.count}</td>'
            f'<td class="num">{format_number(a.p50_ms_median)}</td>'
            f'<td class="num">{format_number(a.p95_ms_median)}</td>'
            f'<td class="num">{format_number(a.p99_ms_median)}</td>'
            f'<td class="num">{format_number(a.p95_ms_max)}</td>'
            f'<td class="num">{format_number(a.peak_rss_mb_max)}</td>'
            f'<td>{change}</td></tr>'
        )
        previous = a
    return (
        '<table class="aggregates"><thead><tr><th>Model</th><th>Version</th>'
        '<th class="num">Devices</th><th class="num">p50 ms</th><th class="num">p95 ms</th>'
        '<th class="num">p99 ms</th><th class="num">max p95 ms</th>'
        '<th class="num">max peak MiB</th><th>p95 change</th></tr></thead>'
        f'<tbody>{"".join(rows)}</tbody></table>'
        '<p class="note">Medians across devices of each device\'s latest profile.</p>'
    )


def _classes_section(data: ReportData) -> str:
    rows = latest_per_device(data.profiles)
    colors = version_colors(rows)
    class_names = sorted({d.device_class for d in data.devices} | {r.device_class for r in rows})
    parts = ['<section id="classes"><h2>Device classes</h2>']
    for name in class_names:
        of_class = [r for r in rows if r.device_class == name]
        n_devices = sum(1 for d in data.devices if d.device_class == name)
        budget = data.budgets.get(name, ClassBudget())
        parts.append(
            f'<section class="device-class" id="class-{_e(_slug(name))}" '
            f'data-device-class="{_e(name)}"><h3>{_e(name)} '
            f'<span class="muted">· {n_devices} device{"" if n_devices == 1 else "s"}</span>'
            '</h3>'
        )
        if not of_class:
            parts.append('<p class="muted">No profiles yet.</p></section>')
            continue
        parts.append(_aggregate_table(aggregate(of_class), colors))
        for model in sorted({r.model for r in of_class}):
            of_model = [r for r in of_class if r.model == model]
            if any(r.is_lm for r in of_model):
                parts.append(
                    f'<div class="plots lm" data-model="{_e(model)}">'
                    f'<figure><figcaption>Time to first token · {_e(model)}</figcaption>'
                    f'{_lm_plot(name, model, of_model, colors, "ttft")}</figure>'
                    f'<figure><figcaption>Decode rate · {_e(model)}</figcaption>'
                    f'{_lm_plot(name, model, of_model, colors, "decode")}</figure>'
                    f'<figure><figcaption>Peak memory · {_e(model)}</figcaption>'
                    f'{_memory_plot(name, model, of_model, colors, budget.max_peak_rss_mb)}'
                    '</figure></div>'
                )
                continue
            parts.append(
                f'<div class="plots" data-model="{_e(model)}">'
                f'<figure><figcaption>Latency distribution · {_e(model)}</figcaption>'
                f'{_latency_plot(name, model, of_model, colors, budget.max_p95_ms)}</figure>'
                f'<figure><figcaption>Peak memory · {_e(model)}</figcaption>'
                f'{_memory_plot(name, model, of_model, colors, budget.max_peak_rss_mb)}'
                '</figure></div>'
            )
        parts.append("</section>")
    if not class_names:
        parts.append('<p class="muted">No devices or profiles.</p>')
    parts.append("</section>")
    return "".join(parts)


_STATUS_LABELS = (
    ("installed", "installed"),
    ("unchanged", "already had it"),
    ("in_progress", "in progress"),
    ("failed", "failed"),
    ("rolled_back", "rolled back"),
    ("pending", "pending"),
)


def _action_class(action: str) -> str:
    a = action.lower()
    if any(w in a for w in ("rollback", "roll back", "rolled", "abort", "halt", "fail", "trip",
                            "refuse", "reject", "timed")):
        return "bad"
    if any(w in a for w in ("pause", "hold", "wait")):
        return "warn"
    if any(w in a for w in ("proceed", "continue", "promote", "complete", "start", "pass",
                            "resume", "install")):
        return "good"
    return "neutral"


def _wave_html(wave: WaveSummary) -> str:
    total = wave.total
    segments: list[str] = []
    counts: list[str] = []
    for key, label in _STATUS_LABELS:
        n = int(getattr(wave, key))
        if key in ("in_progress", "unchanged") and n == 0:
            continue
        counts.append(f'<span class="count" data-status="{key}"><span class="swatch" '
                      f'style="background:{STATUS_COLORS[key]}"></span>{n} {label}</span>')
        if n and total:
            segments.append(
                f'<span class="seg" data-status="{key}" title="{n} {label}" '
                f'style="width:{n * 100 / total:.3f}%;background:{STATUS_COLORS[key]}"></span>'
            )
    classes = ", ".join(wave.device_classes)
    state = f'<span class="badge {_action_class(wave.state)}">{_e(wave.state)}</span>' \
        if wave.state else ""
    return (
        f'<div class="wave" data-wave="{_e(wave.name)}">'
        f'<div class="wave-name">{_e(wave.name)} {state}'
        f'<div class="muted small">{_e(classes)}{" · " if classes else ""}{total} devices</div>'
        f'</div><div class="wave-bar"><div class="bar">{"".join(segments)}</div>'
        f'<div class="counts">{"".join(counts)}</div></div></div>'
    )


def _rollouts_section(data: ReportData) -> str:
    parts = ['<section id="rollouts"><h2>Rollouts</h2>']
    if not data.rollouts:
        parts.append('<p class="muted">No rollouts.</p>')
    for r in data.rollouts:
        from_v = f"v{r.from_version} → " if r.from_version is not None else ""
        created = f" · created {_e(_utc(r.created_at))}" if r.created_at is not None else ""
        gates = "".join(f'<span class="tag">{_e(g)}</span>' for g in r.gates)
        parts.append(
            f'<article class="rollout" data-rollout-id="{_e(r.rollout_id)}">'
            f'<h3><span class="mono">{_e(r.rollout_id)}</span> · {_e(r.model)} '
            f'{_e(from_v)}v{r.version} '
            f'<span class="badge {_action_class(r.state)}">{_e(r.state)}</span></h3>'
            f'<p class="muted small">{len(r.waves)} waves{created}</p>'
        )
        if gates:
            parts.append(f'<p class="gates">Gates: {gates}</p>')
        if r.variants:
            parts.append(_variants_html(r.variants))
        if r.shadow:
            parts.append(_shadow_html(r.shadow))
        parts.append('<div class="waves">')
        parts.extend(_wave_html(w) for w in r.waves)
        parts.append("</div>")
        log_rows = "".join(
            f'<tr class="decision {_action_class(d.action)}">'
            f'<td class="nowrap" data-v="{d.ts:.3f}">{_e(_utc(d.ts))}</td>'
            f'<td class="nowrap">{_e(d.wave)}</td><td class="nowrap">{_e(d.device_class)}</td>'
            f'<td><span class="badge {_action_class(d.action)}">{_e(d.action)}</span></td>'
            f'<td class="reason">{_e(d.reason)}</td></tr>'
            for d in r.decisions
        ) or '<tr><td colspan="5" class="muted">No decisions yet.</td></tr>'
        parts.append(
            '<h4>Decision log</h4><table class="decisions"><thead><tr><th>Time</th>'
            '<th>Wave</th><th>Device class</th><th>Action</th><th>Reason</th></tr></thead>'
            f'<tbody>{log_rows}</tbody></table></article>'
        )
    parts.append("</section>")
    return "".join(parts)


def _variants_html(variants: Sequence[VariantSummary]) -> str:
    """Per class, the chosen variant (pinned or measured) and the figures that decided it."""
    rows = []
    for v in variants:
        chosen = (f'<span class="badge {"warn" if v.pinned else "good"}">'
                  f'{_e(v.variant)}{" (pinned)" if v.pinned else ""}</span>' if v.variant
                  else '<span class="badge bad">excluded</span>')
        for i, row in enumerate(v.rows or [{}]):
            first = i == 0
            rows.append(
                f'<tr data-class="{_e(v.device_class)}">'
                f'<td class="nowrap">{_e(v.device_class) if first else ""}</td>'
                f'<td class="nowrap">{chosen if first else ""}</td>'
                + "".join(f'<td class="nowrap">{_e(row.get(k, ""))}</td>' for k in (
                    "variant", "probed", "passed", "p95_ms", "budget_p95_ms", "peak_rss_mb",
                    "budget_rss_mb", "fidelity"))
                + f'<td class="reason">{_e(row.get("why", ""))}</td></tr>')
        rows.append(f'<tr><td></td><td colspan="10" class="reason muted small">'
                    f'{_e(v.reason)}</td></tr>')
    return ('<h4>Variants per device class</h4><table class="variants"><thead><tr>'
            '<th>Device class</th><th>Chosen</th><th>Variant</th><th>Probed</th><th>Passed</th>'
            '<th>Median p95 ms</th><th>Budget ms</th><th>Max peak RSS MB</th><th>Budget MB</th>'
            '<th>Min fidelity</th><th>Why not</th></tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table>')


def _shadow_html(rows: Sequence[Mapping[str, str]]) -> str:
    """Per class, the shadow verdict, agreement, samples and the active model's p95 alone vs
    while shadowed vs its budget."""
    body = "".join(
        f'<tr data-class="{_e(r.get("class", ""))}">'
        f'<td class="nowrap">{_e(r.get("class", ""))}</td>'
        f'<td><span class="badge {_shadow_badge(r.get("verdict", "").split(" ")[0])}">'
        f'{_e(r.get("verdict", ""))}</span></td>'
        + "".join(f'<td class="num">{_e(r.get(k, ""))}</td>' for k in (
            "agreement", "samples", "active_alone_p95_ms", "active_shadowed_p95_ms",
            "budget_p95_ms", "candidate_p95_ms"))
        + f'<td class="reason">{_e(r.get("reason", ""))}</td></tr>' for r in rows)
    return ('<h4>Shadow evaluation</h4><table class="shadow"><thead><tr>'
            '<th>Device class</th><th>Verdict</th><th class="num">Agreement</th>'
            '<th class="num">Samples</th><th class="num">Active p95 alone ms</th>'
            '<th class="num">Shadowed ms</th><th class="num">Budget ms</th>'
            '<th class="num">Candidate p95 ms</th><th>Why</th></tr></thead>'
            f'<tbody>{body}</tbody></table>')


def _shadow_badge(verdict: str) -> str:
    return {"pass": "good", "fail": "bad"}.get(verdict, "warn")


# -- page --------------------------------------------------------------------------------------

_CSS = """
:root { --fg:#1f2933; --muted:#667085; --line:#e4e7ec; --bg:#f6f7f9; --accent:#4e79a7; }
* { box-sizing: border-box; }
body { margin:0; background:var(--bg); color:var(--fg);
  font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans",
  "Liberation Sans", Arial, sans-serif; }
main { max-width: 1200px; margin: 0 auto; padding: 24px 28px 48px; }
h1 { font-size: 26px; margin: 0 0 2px; letter-spacing: -0.01em; }
h2 { font-size: 20px; margin: 0 0 12px; }
h3 { font-size: 16px; margin: 0 0 10px; }
h4 { font-size: 14px; margin: 18px 0 6px; color: var(--muted); text-transform: uppercase;
  letter-spacing: .04em; }
section, article { background:#fff; border:1px solid var(--line); border-radius:10px;
  padding: 18px 20px; margin: 18px 0; }
section section, section article { border-radius: 8px; margin: 14px 0 0; background:#fff; }
.generated { color: var(--muted); margin: 0 0 14px; }
.cards { display:flex; gap:12px; flex-wrap:wrap; }
.card { background:#fff; border:1px solid var(--line); border-radius:10px; padding:10px 16px;
  min-width: 170px; }
.card-label { color:var(--muted); font-size:12px; text-transform:uppercase; letter-spacing:.05em; }
.card-value { font-size: 26px; font-weight: 650; }
.card-note { color:var(--muted); font-size:12px; min-height: 1em; }
nav { margin-top: 14px; display:flex; gap: 16px; }
nav a { color: var(--accent); text-decoration: none; font-weight: 600; }
.section-head { display:flex; justify-content:space-between; align-items:center; }
.section-head h2 { margin: 0; }
input[type=search] { font: inherit; padding: 5px 10px; border:1px solid #cfd5dd;
  border-radius: 6px; width: 240px; }
table { border-collapse: collapse; width: 100%; margin-top: 10px; }
th, td { text-align: left; padding: 6px 10px; border-bottom: 1px solid var(--line);
  vertical-align: middle; }
th { font-size: 12px; color: var(--muted); text-transform: uppercase; letter-spacing: .04em;
  background: #fafbfc; white-space: nowrap; }
table.sortable th { cursor: pointer; user-select: none; }
th.sorted-asc::after { content: " \\25B2"; } th.sorted-desc::after { content: " \\25BC"; }
tbody tr:nth-child(even) { background: #fbfcfd; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
.mono { font-family: "DejaVu Sans Mono", "Liberation Mono", Menlo, Consolas, monospace;
  font-size: 13px; }
.muted { color: var(--muted); } .small { font-size: 12px; } .nowrap { white-space: nowrap; }
.tag { display:inline-block; background:#eef2f6; border-radius: 4px; padding: 0 6px;
  margin: 1px 4px 1px 0; font-size: 12px; }
.status::before { content:""; display:inline-block; width:8px; height:8px; border-radius:50%;
  margin-right:6px; vertical-align: 1px; }
.status.on::before { background:#2e9e5b; } .status.off::before { background:#b0b7c3; }
.status.off { color: var(--muted); }
.swatch { display:inline-block; width:10px; height:10px; border-radius:2px; margin-right:6px;
  vertical-align: -1px; }
.worse { color:#c0392b; font-weight:600; } .better { color:#2e9e5b; font-weight:600; }
.note { color: var(--muted); font-size: 12px; margin: 6px 0 0; }
.plots { display:grid; grid-template-columns: 660fr 460fr; gap: 16px; margin-top: 14px; }
.plots.lm { grid-template-columns: 1fr 1fr; }
figure { margin: 0; } figcaption { font-weight: 600; margin-bottom: 4px; }
svg.plot { width: 100%; height: auto; display:block; }
svg.plot text { font-family: inherit; font-size: 12px; fill: #3d4652; }
svg.plot text.rowlabel { font-weight: 700; font-size: 13px; }
svg.plot text.axis { fill: #667085; }
svg.plot text.tick { fill: #667085; font-size: 11px; }
.badge { display:inline-block; border-radius: 10px; padding: 0 8px; font-size: 12px;
  font-weight: 600; vertical-align: 1px; background:#eef2f6; color:#3d4652; }
.badge.good { background:#e3f4ea; color:#1e7a44; }
.badge.warn { background:#fdf0dc; color:#9a5a06; }
.badge.bad { background:#fbe4e4; color:#a52a2a; }
.waves { display:flex; flex-direction:column; gap: 10px; margin-top: 6px; }
.wave { display:grid; grid-template-columns: 230px 1fr; gap: 16px; align-items:center; }
.wave-name { font-weight: 600; }
.bar { display:flex; height: 18px; border-radius: 5px; overflow:hidden; background:#eef1f4; }
.seg { display:block; height:100%; }
.counts { display:flex; gap: 14px; font-size: 12px; color: #3d4652; margin-top: 4px; }
.gates { margin: 0 0 10px; }
tr.decision.bad td.reason { color:#8b1f1f; font-weight: 600; }
#script-error { background:#fbe4e4; color:#8b1f1f; padding:10px; white-space:pre-wrap; }
footer { color: var(--muted); font-size: 12px; text-align: center; }
"""

_JS = """
(function () {
  var body = document.body;
  try {
    var cellValue = function (row, i) {
      var cell = row.cells[i];
      if (!cell) { return ""; }
      var v = cell.getAttribute("data-v");
      return v !== null ? parseFloat(v) : cell.textContent.trim().toLowerCase();
    };
    var tables = document.querySelectorAll("table.sortable");
    Array.prototype.forEach.call(tables, function (table) {
      var heads = table.tHead.rows[0].cells;
      Array.prototype.forEach.call(heads, function (th, i) {
        th.addEventListener("click", function () {
          var asc = !th.classList.contains("sorted-asc");
          Array.prototype.forEach.call(heads, function (h) {
            h.classList.remove("sorted-asc", "sorted-desc");
          });
          th.classList.add(asc ? "sorted-asc" : "sorted-desc");
          var tbody = table.tBodies[0];
          var rows = Array.prototype.slice.call(tbody.rows);
          rows.sort(function (a, b) {
            var x = cellValue(a, i), y = cellValue(b, i);
            return (x < y ? -1 : x > y ? 1 : 0) * (asc ? 1 : -1);
          });
          rows.forEach(function (r) { tbody.appendChild(r); });
        });
      });
    });
    var filter = document.getElementById("device-filter");
    var devices = document.getElementById("devices-table");
    if (filter && devices) {
      filter.addEventListener("input", function () {
        var q = filter.value.trim().toLowerCase();
        Array.prototype.forEach.call(devices.tBodies[0].rows, function (r) {
          r.style.display = !q || r.textContent.toLowerCase().indexOf(q) >= 0 ? "" : "none";
        });
      });
    }
    var plots = document.querySelectorAll("svg.plot");
    var dots = document.querySelectorAll("svg.plot circle title");
    body.setAttribute("data-plots", String(plots.length));
    body.setAttribute("data-points", String(dots.length));
    body.dataset.rendered = "ok";
  } catch (err) {
    body.dataset.rendered = "error";
    var pre = document.createElement("pre");
    pre.id = "script-error";
    pre.textContent = "report script error: " + (err && err.stack ? err.stack : String(err));
    body.insertBefore(pre, body.firstChild);
  }
})();
"""


def render_report(data: ReportData) -> str:
    """The whole report as one self-contained HTML document (UTF-8 text)."""
    shown, needing = table_devices(data)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"<title>{_e(data.title)} · {_e(_utc(data.generated_at))}</title>"
        f"<style>{_CSS}</style></head>\n<body data-rendered=\"no\"><main>"
        f"{_header(data, needing)}\n{_devices_section(data, shown, needing)}\n"
        f"{_classes_section(data)}\n"
        f"{_rollouts_section(data)}\n"
        "<footer>FleetLite report · self-contained: no external resources</footer>"
        f"</main>\n<script>{_JS}</script></body></html>\n"
    )


def write_report(path: Union[str, os.PathLike[str]], data: ReportData) -> Path:
    """Render and write the report atomically (temp file + rename); returns the path."""
    target = Path(path)
    text = render_report(data)
    if target.is_dir():
        raise FleetError(f"{target} is a directory: give the report a file name, e.g. "
                         f"{target / 'fleet.html'}")
    if not target.parent.is_dir():
        raise FleetError(f"cannot write the report {target}: the directory {target.parent} "
                         f"does not exist (create it first: mkdir -p {target.parent})")
    from fleetlite.sdk.atomic import write_atomic

    try:
        write_atomic(target, text.encode("utf-8"), mode=0o644, exact_mode=True)
    except OSError as exc:
        raise FleetError(f"cannot write the report {target}: {exc.strerror or exc}") from None
    return target
