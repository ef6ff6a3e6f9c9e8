"""Fleet-wide views over per-device profiles: aggregates per (device class, model version),
version comparisons, and their text-table / JSON / YAML renderings (pure, no I/O).

A *profile row* is the flat summary of one :class:`fleetlite.sdk.profile.ProfileRecord` that the
fleet keeps per device: latency percentiles (ms), mean (ms) and peak RSS (MiB, written ``mb``),
and for a language model (a ``fleetlite.profile/2`` record with an ``lm`` section) its warm time
to first token (ms), prefill and decode tokens/s (its percentiles are then a decode step's).
Functions accept :class:`ProfileRow` objects or plain mappings with the same keys (what a store
query or ``json.loads`` returns).

Aggregates count each device once: by default only the newest row per (device, model, version) is
used (:func:`latest_per_device`), so a device profiled ten times does not outvote the others.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Protocol, Union

from fleetlite.fleet.terminal_text import one_line

if TYPE_CHECKING:
    from fleetlite.sdk.profile import LmProfile, ProfileRecord

__all__ = [
    "OUTPUT_FORMATS",
    "Aggregate",
    "Comparison",
    "ComparisonRow",
    "ProfileRow",
    "RowLike",
    "aggregate",
    "aggregates_table",
    "compare",
    "comparison_table",
    "format_table",
    "latest_per_device",
    "lm_aggregates_table",
    "render",
    "to_rows",
]

OUTPUT_FORMATS = ("table", "json", "yaml")
"""The values of the CLI's ``-o`` option that :func:`render` understands."""
LM_FIELDS = ("ttft_ms", "prefill_tokens_per_s", "decode_tokens_per_s")
"""A language model's figures in a row (None for other models)."""


class StoredProfile(Protocol):
    """What :meth:`ProfileRow.from_stored` reads (``fleetlite.fleet.store.ProfileRow`` fits)."""

    @property
    def device_id(self) -> str: ...
    @property
    def device_class(self) -> str: ...
    @property
    def model(self) -> str: ...
    @property
    def version(self) -> Optional[int]: ...
    @property
    def p50_ms(self) -> float: ...
    @property
    def p95_ms(self) -> float: ...
    @property
    def p99_ms(self) -> float: ...
    @property
    def mean_ms(self) -> float: ...
    @property
    def peak_rss_mb(self) -> float: ...
    @property
    def ts(self) -> float: ...
    @property
    def trigger(self) -> str: ...
    @property
    def record_json(self) -> str: ...


@dataclass(frozen=True)
class ProfileRow:
    """One profile of one model version on one device, flattened for fleet-wide views."""

    device_id: str
    device_class: str
    model: str
    version: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float
    peak_rss_mb: float
    ts: float
    trigger: str = ""
    ttft_ms: Optional[float] = None
    prefill_tokens_per_s: Optional[float] = None
    decode_tokens_per_s: Optional[float] = None

    @property
    def is_lm(self) -> bool:
        """Whether the row carries a language model's figures."""
        return any(getattr(self, name) is not None for name in LM_FIELDS)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> ProfileRow:
        """Build from a mapping with this class's field names (``trigger`` and the language-model
        figures optional)."""
        try:
            return cls(
                device_id=str(data["device_id"]),
                device_class=str(data["device_class"]),
                model=str(data["model"]),
                version=int(data["version"]),
                p50_ms=float(data["p50_ms"]),
                p95_ms=float(data["p95_ms"]),
                p99_ms=float(data["p99_ms"]),
                mean_ms=float(data["mean_ms"]),
                peak_rss_mb=float(data["peak_rss_mb"]),
                ts=float(data["ts"]),
                trigger=str(data.get("trigger") or ""),
                **{name: None if data.get(name) is None else float(data[name])
                   for name in LM_FIELDS},
            )
        except KeyError as exc:
            raise ValueError(f"profile row lacks field {exc.args[0]!r}") from None

    @classmethod
    def from_stored(cls, stored: StoredProfile) -> ProfileRow:
        """Flatten a stored profile: its columns, and a language model's figures from its record
        (the store keeps them in ``record_json`` only). A model without a version counts as
        version 0, a profile without a class as class ``unknown``."""
        return cls(
            device_id=stored.device_id,
            device_class=stored.device_class or "unknown",
            model=stored.model,
            version=stored.version if stored.version is not None else 0,
            p50_ms=stored.p50_ms,
            p95_ms=stored.p95_ms,
            p99_ms=stored.p99_ms,
            mean_ms=stored.mean_ms,
            peak_rss_mb=stored.peak_rss_mb,
            ts=stored.ts,
            trigger=stored.trigger,
            **_lm_figures(_stored_lm(stored.record_json)),
        )

    @classmethod
    def from_record(cls, record: ProfileRecord, device_class: Optional[str] = None) -> ProfileRow:
        """Flatten a full profile record. ``device_class`` defaults to the record's device facts
        (``record.device["device_class"]``); a model without a version counts as version 0."""
        cls_name = device_class if device_class is not None else record.device.get("device_class")
        steady = record.timings.steady
        return cls(
            device_id=record.device_id,
            device_class=str(cls_name or "unknown"),
            model=record.model.name,
            version=record.model.version if record.model.version is not None else 0,
            p50_ms=steady.p50_ms,
            p95_ms=steady.p95_ms,
            p99_ms=steady.p99_ms,
            mean_ms=steady.mean_ms,
            peak_rss_mb=record.memory.peak_rss_mb,
            ts=record.ts,
            trigger=record.trigger,
            **_lm_figures(record.lm),
        )

    def to_dict(self) -> dict[str, Any]:
        """The fields by name; the language-model figures only in a language model's row."""
        lm = {name: getattr(self, name) for name in LM_FIELDS} if self.is_lm else {}
        return {
            "device_id": self.device_id,
            "device_class": self.device_class,
            "model": self.model,
            "version": self.version,
            "p50_ms": self.p50_ms,
            "p95_ms": self.p95_ms,
            "p99_ms": self.p99_ms,
            "mean_ms": self.mean_ms,
            "peak_rss_mb": self.peak_rss_mb,
            "ts": self.ts,
            "trigger": self.trigger,
            **lm,
        }


def _lm_figures(lm: Optional[LmProfile]) -> dict[str, Optional[float]]:
    if lm is None:
        return {}
    return {"ttft_ms": lm.ttft_ms, "prefill_tokens_per_s": lm.prefill_tokens_per_s,
            "decode_tokens_per_s": lm.decode_tokens_per_s}


def _stored_lm(record_json: str) -> Optional[LmProfile]:
    """The ``lm`` section of a stored ``fleetlite.profile/2`` record (validated when the
    controller stored it; a section that no longer parses is left out rather than failing the
    whole view)."""
    from fleetlite.sdk.messages import MessageError
    from fleetlite.sdk.profile import SCHEMA_V2, LmProfile

    if '"lm"' not in record_json:  # every /1 record: skip parsing it
        return None
    try:
        data = json.loads(record_json)
        if data.get("schema") != SCHEMA_V2 or not isinstance(data.get("lm"), dict):
            return None
        return LmProfile.from_dict(data["lm"])
    except (ValueError, MessageError):
        return None


RowLike = Union[ProfileRow, Mapping[str, Any]]


def to_rows(rows: Iterable[RowLike]) -> list[ProfileRow]:
    """Normalise mappings to :class:`ProfileRow` (rows already of that type pass through)."""
    return [r if isinstance(r, ProfileRow) else ProfileRow.from_mapping(r) for r in rows]


def latest_per_device(rows: Iterable[RowLike]) -> list[ProfileRow]:
    """The newest row per (device, model, version), in input order of first appearance."""
    latest: dict[tuple[str, str, int], ProfileRow] = {}
    for row in to_rows(rows):
        key = (row.device_id, row.model, row.version)
        current = latest.get(key)
        if current is None or row.ts >= current.ts:
            latest[key] = row
    return list(latest.values())


@dataclass(frozen=True)
class Aggregate:
    """Statistics of one model version on one device class, over devices (one row each):
    medians across devices of their p50/p95/p99, the worst p95 and the worst peak RSS."""

    device_class: str
    model: str
    version: int
    count: int
    p50_ms_median: float
    p95_ms_median: float
    p99_ms_median: float
    p95_ms_max: float
    peak_rss_mb_max: float
    ttft_ms_median: Optional[float] = None
    prefill_tokens_per_s_median: Optional[float] = None
    decode_tokens_per_s_median: Optional[float] = None

    @property
    def is_lm(self) -> bool:
        """Whether the devices' profiles are a language model's (its medians are then set)."""
        return any(getattr(self, f"{name}_median") is not None for name in LM_FIELDS)

    def to_dict(self) -> dict[str, Any]:
        """The fields by name; the language-model medians only in a language model's."""
        lm = ({f"{name}_median": getattr(self, f"{name}_median") for name in LM_FIELDS}
              if self.is_lm else {})
        return {
            "device_class": self.device_class,
            "model": self.model,
            "version": self.version,
            "count": self.count,
            "p50_ms_median": self.p50_ms_median,
            "p95_ms_median": self.p95_ms_median,
            "p99_ms_median": self.p99_ms_median,
            "p95_ms_max": self.p95_ms_max,
            "peak_rss_mb_max": self.peak_rss_mb_max,
            **lm,
        }


def _aggregate_group(group: Sequence[ProfileRow]) -> Aggregate:
    first = group[0]
    return Aggregate(
        device_class=first.device_class,
        model=first.model,
        version=first.version,
        count=len(group),
        p50_ms_median=float(statistics.median(r.p50_ms for r in group)),
        p95_ms_median=float(statistics.median(r.p95_ms for r in group)),
        p99_ms_median=float(statistics.median(r.p99_ms for r in group)),
        p95_ms_max=max(r.p95_ms for r in group),
        peak_rss_mb_max=max(r.peak_rss_mb for r in group),
        **{f"{name}_median": _median_present([getattr(r, name) for r in group])
           for name in LM_FIELDS},
    )


def _median_present(values: Sequence[Optional[float]]) -> Optional[float]:
    present = [v for v in values if v is not None]
    return float(statistics.median(present)) if present else None


def aggregate(
    rows: Iterable[RowLike], model: Optional[str] = None, latest_only: bool = True
) -> list[Aggregate]:
    """Aggregates per (device class, model, version), sorted by those keys.

    ``model`` keeps only that model; ``latest_only=False`` counts every row, not one per device.
    """
    picked = latest_per_device(rows) if latest_only else to_rows(rows)
    groups: dict[tuple[str, str, int], list[ProfileRow]] = {}
    for row in picked:
        if model is None or row.model == model:
            groups.setdefault((row.device_class, row.model, row.version), []).append(row)
    return [_aggregate_group(groups[key]) for key in sorted(groups)]


def _ratio(new: float, old: float) -> Optional[float]:
    if old <= 0.0 or not math.isfinite(old) or not math.isfinite(new):
        return None
    return new / old


@dataclass(frozen=True)
class ComparisonRow:
    """One device class: version A and version B side by side; ratios are B / A (``None`` when
    a side has no profiles or A is zero), so 1.25 means B is 25 % slower or bigger."""

    device_class: str
    a: Optional[Aggregate]
    b: Optional[Aggregate]

    def _r(self, attr: str) -> Optional[float]:
        if self.a is None or self.b is None:
            return None
        return _ratio(float(getattr(self.b, attr)), float(getattr(self.a, attr)))

    @property
    def p50_ratio(self) -> Optional[float]:
        return self._r("p50_ms_median")

    @property
    def p95_ratio(self) -> Optional[float]:
        return self._r("p95_ms_median")

    @property
    def p99_ratio(self) -> Optional[float]:
        return self._r("p99_ms_median")

    @property
    def p95_max_ratio(self) -> Optional[float]:
        return self._r("p95_ms_max")

    @property
    def peak_rss_ratio(self) -> Optional[float]:
        return self._r("peak_rss_mb_max")

    @property
    def is_lm(self) -> bool:
        return any(side is not None and side.is_lm for side in (self.a, self.b))

    @property
    def ttft_ratio(self) -> Optional[float]:
        """B / A of the median TTFT (1.25: B's first token comes 25 % later)."""
        return self._lm_ratio("ttft_ms_median")

    @property
    def prefill_ratio(self) -> Optional[float]:
        """B / A of the median prefill tokens/s (0.8: B prefills 20 % slower)."""
        return self._lm_ratio("prefill_tokens_per_s_median")

    @property
    def decode_ratio(self) -> Optional[float]:
        """B / A of the median decode tokens/s (0.8: B decodes 20 % slower)."""
        return self._lm_ratio("decode_tokens_per_s_median")

    def _lm_ratio(self, attr: str) -> Optional[float]:
        if self.a is None or self.b is None:
            return None
        old, new = getattr(self.a, attr), getattr(self.b, attr)
        return None if old is None or new is None else _ratio(new, old)

    def to_dict(self) -> dict[str, Any]:
        """Both sides and the B / A ratios (a language model's also of TTFT and rates)."""
        lm = ({"ttft_ms_median": self.ttft_ratio,
               "prefill_tokens_per_s_median": self.prefill_ratio,
               "decode_tokens_per_s_median": self.decode_ratio} if self.is_lm else {})
        return {
            "device_class": self.device_class,
            "a": self.a.to_dict() if self.a is not None else None,
            "b": self.b.to_dict() if self.b is not None else None,
            "ratios": {
                "p50_ms_median": self.p50_ratio,
                "p95_ms_median": self.p95_ratio,
                "p99_ms_median": self.p99_ratio,
                "p95_ms_max": self.p95_max_ratio,
                "peak_rss_mb_max": self.peak_rss_ratio,
                **lm,
            },
        }


@dataclass(frozen=True)
class Comparison:
    """Two versions of one model, per device class (classes that ran either version)."""

    model: str
    version_a: int
    version_b: int
    rows: tuple[ComparisonRow, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "version_a": self.version_a,
            "version_b": self.version_b,
            "device_classes": [r.to_dict() for r in self.rows],
        }


def compare(
    rows: Iterable[RowLike], model: str, version_a: int, version_b: int, latest_only: bool = True
) -> Comparison:
    """Compare ``version_b`` of ``model`` against ``version_a``, per device class."""
    aggs = [
        a for a in aggregate(rows, model=model, latest_only=latest_only)
        if a.version in (version_a, version_b)
    ]
    by_class: dict[str, dict[int, Aggregate]] = {}
    for agg in aggs:
        by_class.setdefault(agg.device_class, {})[agg.version] = agg
    out = tuple(
        ComparisonRow(device_class=c, a=by_class[c].get(version_a), b=by_class[c].get(version_b))
        for c in sorted(by_class)
    )
    return Comparison(model=model, version_a=version_a, version_b=version_b, rows=out)


# -- rendering -------------------------------------------------------------------------------


def _num(value: Optional[float], digits: int = 3) -> str:
    if value is None:
        return "-"
    if abs(value) >= 100:
        return f"{value:.1f}"
    if abs(value) >= 1:
        return f"{value:.{digits}f}"
    return f"{value:.{digits + 1}f}"


def _ratio_text(value: Optional[float]) -> str:
    if value is None:
        return "-"
    return f"x{value:.2f} ({(value - 1.0) * 100:+.0f}%)"


def format_table(
    headers: Sequence[str], rows: Sequence[Sequence[str]], right: Iterable[int] = ()
) -> str:
    """Columns padded to their widest cell, two spaces apart; ``right`` holds indices of
    right-aligned (numeric) columns. No trailing spaces; ends without a newline."""
    right_cols = set(right)
    widths = [len(h) for h in headers]
    # what a device sent stays in its cell; an empty cell shows as "-", never as a gap
    rows = [[one_line(cell) if cell.strip() else "-" for cell in row] for row in rows]
    for row in rows:
        if len(row) != len(headers):
            raise ValueError(f"row has {len(row)} cells, expected {len(headers)}")
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))

    def line(cells: Sequence[str]) -> str:
        parts = [c.rjust(widths[i]) if i in right_cols else c.ljust(widths[i])
                 for i, c in enumerate(cells)]
        return "  ".join(parts).rstrip()

    return "\n".join([line(headers), *(line(r) for r in rows)])


def aggregates_table(aggs: Sequence[Aggregate]) -> str:
    """The text table of :func:`aggregate`'s result (the CLI's ``-o table``): language models
    in a table of their own (:func:`lm_aggregates_table`) below the other models'."""
    lm = [a for a in aggs if a.is_lm]
    if lm:
        others = [a for a in aggs if not a.is_lm]
        return "\n\n".join(([aggregates_table(others)] if others else [])
                            + [lm_aggregates_table(lm)])
    headers = ["DEVICE CLASS", "MODEL", "VERSION", "DEVICES", "P50 MS", "P95 MS", "P99 MS",
               "MAX P95 MS", "MAX PEAK RSS MB"]
    rows = [
        [a.device_class, a.model, str(a.version), str(a.count), _num(a.p50_ms_median),
         _num(a.p95_ms_median), _num(a.p99_ms_median), _num(a.p95_ms_max),
         _num(a.peak_rss_mb_max, 1)]
        for a in aggs
    ]
    return format_table(headers, rows, right=range(2, 9))


def lm_aggregates_table(aggs: Sequence[Aggregate]) -> str:
    """Language models per class and version: medians over devices of the warm time to first
    token, prefill and decode tokens/s and the decode step's p95, and the worst peak RSS."""
    headers = ["DEVICE CLASS", "MODEL", "VERSION", "DEVICES", "TTFT MS", "PREFILL TOK/S",
               "DECODE TOK/S", "DECODE P95 MS", "MAX PEAK RSS MB"]
    rows = [
        [a.device_class, a.model, str(a.version), str(a.count), _num(a.ttft_ms_median),
         _num(a.prefill_tokens_per_s_median, 1), _num(a.decode_tokens_per_s_median, 1),
         _num(a.p95_ms_median), _num(a.peak_rss_mb_max, 1)]
        for a in aggs
    ]
    return format_table(headers, rows, right=range(2, 9))


def comparison_table(cmp: Comparison) -> str:
    """The text table of :func:`compare`'s result: medians of A and B and B/A ratios (for a
    language model: TTFT, prefill and decode tokens/s and peak RSS)."""
    if any(r.is_lm for r in cmp.rows):
        return _lm_comparison_table(cmp)
    va, vb = f"v{cmp.version_a}", f"v{cmp.version_b}"
    headers = ["DEVICE CLASS", f"DEVICES {va}/{vb}", f"P50 MS {va}", f"P50 MS {vb}", "P50 B/A",
               f"P95 MS {va}", f"P95 MS {vb}", "P95 B/A", f"PEAK RSS MB {va}",
               f"PEAK RSS MB {vb}", "RSS B/A"]
    rows = []
    for r in cmp.rows:
        a, b = r.a, r.b
        rows.append([
            r.device_class,
            f"{a.count if a else 0}/{b.count if b else 0}",
            _num(a.p50_ms_median if a else None), _num(b.p50_ms_median if b else None),
            _ratio_text(r.p50_ratio),
            _num(a.p95_ms_median if a else None), _num(b.p95_ms_median if b else None),
            _ratio_text(r.p95_ratio),
            _num(a.peak_rss_mb_max if a else None, 1), _num(b.peak_rss_mb_max if b else None, 1),
            _ratio_text(r.peak_rss_ratio),
        ])
    title = f"{cmp.model}: v{cmp.version_b} (B) against v{cmp.version_a} (A)"
    return title + "\n" + format_table(headers, rows, right=range(1, 11))


def _lm_comparison_table(cmp: Comparison) -> str:
    va, vb = f"v{cmp.version_a}", f"v{cmp.version_b}"
    headers = ["DEVICE CLASS", f"DEVICES {va}/{vb}", f"TTFT MS {va}", f"TTFT MS {vb}",
               "TTFT B/A", f"PREFILL TOK/S {va}", f"PREFILL TOK/S {vb}", "PREFILL B/A",
               f"DECODE TOK/S {va}", f"DECODE TOK/S {vb}", "DECODE B/A", f"PEAK RSS MB {va}",
               f"PEAK RSS MB {vb}", "RSS B/A"]
    rows = []
    for r in cmp.rows:
        a, b = r.a, r.b
        rows.append([
            r.device_class,
            f"{a.count if a else 0}/{b.count if b else 0}",
            _num(a.ttft_ms_median if a else None), _num(b.ttft_ms_median if b else None),
            _ratio_text(r.ttft_ratio),
            _num(a.prefill_tokens_per_s_median if a else None, 1),
            _num(b.prefill_tokens_per_s_median if b else None, 1), _ratio_text(r.prefill_ratio),
            _num(a.decode_tokens_per_s_median if a else None, 1),
            _num(b.decode_tokens_per_s_median if b else None, 1), _ratio_text(r.decode_ratio),
            _num(a.peak_rss_mb_max if a else None, 1), _num(b.peak_rss_mb_max if b else None, 1),
            _ratio_text(r.peak_rss_ratio),
        ])
    title = (f"{cmp.model}: v{cmp.version_b} (B) against v{cmp.version_a} (A); tokens/s: a B/A "
             "below 1 is slower")
    return title + "\n" + format_table(headers, rows, right=range(1, 14))


def render(view: Union[Sequence[Aggregate], Comparison], output: str = "table") -> str:
    """Render aggregates or a comparison as ``table``, ``json`` or ``yaml`` text.

    JSON/YAML documents: aggregates as ``{"aggregates": [...]}``, a comparison as
    :meth:`Comparison.to_dict`. Only plain types appear, so ``yaml.safe_dump`` works.
    """
    if output not in OUTPUT_FORMATS:
        raise ValueError(f"output must be one of {', '.join(OUTPUT_FORMATS)}, got {output!r}")
    if isinstance(view, Comparison):
        doc: dict[str, Any] = view.to_dict()
        table = comparison_table(view) if output == "table" else ""
    else:
        doc = {"aggregates": [a.to_dict() for a in view]}
        table = aggregates_table(view) if output == "table" else ""
    if output == "table":
        return table
    if output == "json":
        return json.dumps(doc, indent=2, sort_keys=False)
    import yaml

    return str(yaml.safe_dump(doc, sort_keys=False, default_flow_style=False)).rstrip("\n")
