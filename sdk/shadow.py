"""Shadow evaluation's contract: the ``fleetlite.shadow_report/1`` message and the agreement
statistics it carries.

A device runs a candidate version beside the active one on a sample of live requests and keeps
:class:`ShadowStats`: how often the candidate agreed with the active model (top-1 class for a
classifier, an absolute error bound for a regressor, greedy tokens for a language model) and
latency percentiles. Only these figures leave the device, never an input, an output, a prompt
or a reply (docs/protocol.md, "Shadow report"). Pure: no I/O, no clock.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import numpy as np
import numpy.typing as npt

from fleetlite.sdk.messages import (
    BAD_VALUE,
    MAX_ID_LENGTH,
    Message,
    MessageError,
    get_float,
    get_int,
    get_str,
    get_ts,
)

__all__ = [
    "CLASSIFIER",
    "KINDS",
    "LM",
    "MAX_SHADOW_REPORT_BYTES",
    "REGRESSOR",
    "STOP",
    "ShadowReport",
    "ShadowStats",
]

CLASSIFIER = "classifier"
REGRESSOR = "regressor"
LM = "lm"
KINDS = (CLASSIFIER, REGRESSOR, LM)
"""What a shadow compares: top-1 classes, values within an error bound, or greedy tokens."""

#: a report is a few dozen numbers; 8 KiB leaves room for long names and future fields
MAX_SHADOW_REPORT_BYTES = 8 * 1024

STOP = -1
"""The token id :meth:`ShadowStats.add_tokens` takes for "the model stopped here" (a stop id)."""

_LATENCY_FIELDS = ("active_alone", "active_shadowed", "candidate")


@dataclass
class ShadowStats:
    """Agreement counts of one candidate against the active model; pure and mergeable.

    ``compared`` counts units compared and ``agreed`` those that agreed: for a classifier one
    unit per row of each output (the top-1 class, argmax of the last axis); for a regressor one
    unit per sample (it agrees when every value is within ``error_bound`` of the active model's,
    absolute, in the output's units), with the largest and mean absolute error over all values;
    for a language model one unit per token position. ``samples`` counts compared requests.
    Not thread-safe: the shadow runner guards it.
    """

    kind: str
    error_bound: Optional[float] = None
    samples: int = 0
    compared: int = 0
    agreed: int = 0
    abs_error_sum: float = 0.0
    abs_error_count: int = 0
    max_abs_error: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {list(KINDS)}, got {self.kind!r}")
        bound = self.error_bound
        if self.kind == REGRESSOR:
            if bound is None or not (math.isfinite(bound) and bound >= 0):
                raise ValueError("a regressor's shadow needs error_bound, a finite number >= 0 "
                                 f"in the output's units; got {bound!r}")
        elif bound is not None:
            raise ValueError(f"error_bound applies to regressors only, not to {self.kind!r}")

    @property
    def agreement(self) -> Optional[float]:
        """``agreed / compared``, or None before anything was compared."""
        return self.agreed / self.compared if self.compared else None

    @property
    def mean_abs_error(self) -> Optional[float]:
        """Mean absolute error over every compared value (regressors), None before any."""
        return self.abs_error_sum / self.abs_error_count if self.abs_error_count else None

    def add_outputs(self, active: Sequence[npt.ArrayLike],
                    candidate: Sequence[npt.ArrayLike]) -> bool:
        """Compare one request's outputs (in output order); True when the candidate agreed."""
        if self.kind == LM:
            raise ValueError("a language model's shadow compares tokens: use add_tokens")
        if len(active) != len(candidate):
            raise ValueError(f"the models have {len(active)} and {len(candidate)} outputs; a "
                             "candidate must keep the active model's outputs to be shadowed")
        pairs = []
        for a, c in zip(active, candidate):
            a_arr, c_arr = np.asarray(a, dtype=np.float64), np.asarray(c, dtype=np.float64)
            if a_arr.shape != c_arr.shape:
                raise ValueError(f"output shapes differ ({list(a_arr.shape)} vs "
                                 f"{list(c_arr.shape)}); a candidate must keep the active "
                                 "model's output shapes to be shadowed")
            pairs.append((a_arr, c_arr))
        self.samples += 1
        if self.kind == CLASSIFIER:
            rows = agreeing = 0
            for a_arr, c_arr in pairs:
                a_top = np.argmax(a_arr.reshape(-1, a_arr.shape[-1] if a_arr.ndim else 1), axis=-1)
                c_top = np.argmax(c_arr.reshape(-1, c_arr.shape[-1] if c_arr.ndim else 1), axis=-1)
                rows += int(a_top.size)
                agreeing += int(np.count_nonzero(a_top == c_top))
            self.compared += rows
            self.agreed += agreeing
            return agreeing == rows
        worst = 0.0
        for a_arr, c_arr in pairs:
            errors = np.abs(a_arr - c_arr)
            if errors.size:
                if not np.all(np.isfinite(errors)):
                    worst = math.inf
                    continue
                worst = max(worst, float(errors.max()))
                self.abs_error_sum += float(errors.sum())
                self.abs_error_count += int(errors.size)
        if math.isfinite(worst):
            self.max_abs_error = max(self.max_abs_error, worst)
        bound = self.error_bound if self.error_bound is not None else 0.0
        agrees = worst <= bound
        self.compared += 1
        self.agreed += int(agrees)
        return agrees

    def add_tokens(self, active: Sequence[int], candidate: Sequence[int]) -> int:
        """Compare the token ids two models chose for one prompt, position by position.

        ``active`` sets how many positions count; a missing candidate token disagrees. Use
        :data:`STOP` for a position where a model chose a stop id. Returns the agreeing count.
        """
        if self.kind != LM:
            raise ValueError(f"a {self.kind}'s shadow compares outputs: use add_outputs")
        agreeing = sum(1 for i, token in enumerate(active)
                       if i < len(candidate) and int(candidate[i]) == int(token))
        self.samples += 1
        self.compared += len(active)
        self.agreed += agreeing
        return agreeing

    def merge(self, other: ShadowStats) -> ShadowStats:
        """The counts of both (e.g. two devices, or two report periods) as a new object."""
        if other.kind != self.kind or other.error_bound != self.error_bound:
            raise ValueError(f"cannot merge a {other.kind} shadow (error bound "
                             f"{other.error_bound}) into a {self.kind} one (error bound "
                             f"{self.error_bound})")
        return ShadowStats(
            kind=self.kind,
            error_bound=self.error_bound,
            samples=self.samples + other.samples,
            compared=self.compared + other.compared,
            agreed=self.agreed + other.agreed,
            abs_error_sum=self.abs_error_sum + other.abs_error_sum,
            abs_error_count=self.abs_error_count + other.abs_error_count,
            max_abs_error=max(self.max_abs_error, other.max_abs_error),
        )


def _get_opt_float(data: Mapping[str, Any], key: str, *, minimum: float = 0.0
                   ) -> Optional[float]:
    """A number >= ``minimum``, or None when the field is absent or ``null``."""
    if data.get(key) is None:
        return None
    value = get_float(data, key)
    if value < minimum:
        raise MessageError(BAD_VALUE, f"field {key!r} must be >= {minimum:g}, got {value!r}")
    return value


def _get_fraction(data: Mapping[str, Any], key: str, *, allow_zero: bool) -> float:
    value = get_float(data, key)
    if not (0.0 <= value <= 1.0) or (value == 0.0 and not allow_zero):
        low = "0" if allow_zero else "above 0"
        raise MessageError(BAD_VALUE, f"field {key!r} must be a fraction from {low} to 1, got "
                                      f"{value!r}")
    return value


@dataclass(frozen=True)
class ShadowReport(Message):
    """Agreement and latency of a candidate shadowing the active model on one device.

    Counts are cumulative since shadowing started (``since``). ``compared``/``agreed`` are in
    the units of ``kind`` (:class:`ShadowStats`). Latencies are in ms, per inference (per decode
    step for a language model): ``active_alone_*`` of live requests while the candidate was not
    running, ``active_shadowed_*`` of those that overlapped a candidate run, ``candidate_*`` of
    the candidate's own runs; a percentile is null until its count is non-zero. ``skipped_budget``
    counts sampled requests the CPU budget or a latency back-off left out, ``dropped_queue_full``
    those the full queue dropped, ``skipped_other`` those that could not be compared (e.g. a
    sampled, non-greedy generation) and ``candidate_errors`` failed candidate runs.
    """

    SCHEMA: ClassVar[str] = "fleetlite.shadow_report/1"
    MAX_BYTES: ClassVar[int] = MAX_SHADOW_REPORT_BYTES

    device_id: str
    ts: float
    since: float
    release_id: str
    model: str
    version: int
    active_version: int
    kind: str
    requests: int
    samples: int
    compared: int
    agreed: int
    sample_rate: float
    cpu_budget: float
    p95_budget_ratio: float
    skipped_budget: int = 0
    dropped_queue_full: int = 0
    skipped_other: int = 0
    candidate_errors: int = 0
    backoffs: int = 0
    error_bound: Optional[float] = None
    max_abs_error: Optional[float] = None
    mean_abs_error: Optional[float] = None
    active_alone_count: int = 0
    active_alone_p50_ms: Optional[float] = None
    active_alone_p95_ms: Optional[float] = None
    active_shadowed_count: int = 0
    active_shadowed_p50_ms: Optional[float] = None
    active_shadowed_p95_ms: Optional[float] = None
    candidate_count: int = 0
    candidate_p50_ms: Optional[float] = None
    candidate_p95_ms: Optional[float] = None

    @property
    def agreement(self) -> Optional[float]:
        """``agreed / compared``, or None before anything was compared."""
        return self.agreed / self.compared if self.compared else None

    @property
    def shadow_cost_ratio(self) -> Optional[float]:
        """Active p95 while shadowed over active p95 alone (None unless both are known)."""
        alone, shadowed = self.active_alone_p95_ms, self.active_shadowed_p95_ms
        if alone is None or shadowed is None or alone <= 0.0:
            return None
        return shadowed / alone

    def stats(self) -> ShadowStats:
        """The agreement counts as :class:`ShadowStats` (the error sums rebuilt from the mean)."""
        mean = self.mean_abs_error
        count = self.compared if mean is not None else 0
        return ShadowStats(
            kind=self.kind, error_bound=self.error_bound, samples=self.samples,
            compared=self.compared, agreed=self.agreed,
            abs_error_sum=(mean or 0.0) * count, abs_error_count=count,
            max_abs_error=self.max_abs_error or 0.0,
        )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ShadowReport:
        """Field by field (see :mod:`fleetlite.sdk.messages`), then the cross-field rules:
        ``agreed <= compared``, ``samples <= requests``, ``since <= ts``, p50 <= p95, an error
        bound exactly when the kind is a regressor."""
        kind = get_str(data, "kind", max_len=MAX_ID_LENGTH)
        if kind not in KINDS:
            raise MessageError(BAD_VALUE, f"field 'kind' must be one of {list(KINDS)}, got "
                                          f"{kind!r}")
        counts: dict[str, Any] = {key: get_int(data, key, minimum=0)
                  for key in ("version", "active_version", "requests", "samples", "compared",
                              "agreed")}
        optional_counts: dict[str, Any] = {key: get_int(data, key, optional=True, minimum=0)
                           for key in ("skipped_budget", "dropped_queue_full", "skipped_other",
                                       "candidate_errors", "backoffs", "active_alone_count",
                                       "active_shadowed_count", "candidate_count")}
        if counts["agreed"] > counts["compared"]:
            raise MessageError(BAD_VALUE, "field 'agreed' must not exceed 'compared'")
        if counts["samples"] > counts["requests"]:
            raise MessageError(BAD_VALUE, "field 'samples' must not exceed 'requests'")
        ts, since = get_ts(data), get_ts(data, "since")
        if since > ts:
            raise MessageError(BAD_VALUE, "field 'since' must not be later than 'ts'")
        ratio = get_float(data, "p95_budget_ratio")
        if not 1.0 <= ratio <= 1000.0:
            raise MessageError(BAD_VALUE, "field 'p95_budget_ratio' must be within 1..1000, got "
                                          f"{ratio!r}")
        latencies: dict[str, Any] = {}
        for prefix in _LATENCY_FIELDS:
            p50 = _get_opt_float(data, f"{prefix}_p50_ms")
            p95 = _get_opt_float(data, f"{prefix}_p95_ms")
            if p50 is not None and p95 is not None and p50 > p95:
                raise MessageError(BAD_VALUE, f"field '{prefix}_p50_ms' must not exceed "
                                              f"'{prefix}_p95_ms'")
            latencies[f"{prefix}_p50_ms"], latencies[f"{prefix}_p95_ms"] = p50, p95
        error_bound = _get_opt_float(data, "error_bound")
        if (error_bound is not None) != (kind == REGRESSOR):
            raise MessageError(BAD_VALUE, "field 'error_bound' is required for a regressor and "
                                          "must be null or absent otherwise")
        return cls(
            device_id=get_str(data, "device_id", max_len=MAX_ID_LENGTH),
            ts=ts,
            since=since,
            release_id=get_str(data, "release_id", max_len=MAX_ID_LENGTH),
            model=get_str(data, "model", max_len=MAX_ID_LENGTH),
            kind=kind,
            sample_rate=_get_fraction(data, "sample_rate", allow_zero=False),
            cpu_budget=_get_fraction(data, "cpu_budget", allow_zero=False),
            p95_budget_ratio=ratio,
            error_bound=error_bound,
            max_abs_error=_get_opt_float(data, "max_abs_error"),
            mean_abs_error=_get_opt_float(data, "mean_abs_error"),
            **counts,
            **optional_counts,
            **latencies,
        )
