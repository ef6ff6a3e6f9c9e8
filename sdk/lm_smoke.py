"""Smoke vectors of a generative language model: prompts (as token ids) with the greedy tokens
and the first step's top logits the release's model produced when it was built.

File format (JSON, the release's file of role ``smoke`` for an LM variant)::

    {"_type": "fleetlite.lm_smoke", "spec_version": 1, "min_token_agreement": 1.0,
     "cases": [{"prompt_ids": [2, 17, ...], "expected_ids": [40, 9, ...],
                "first_top_ids": [40, 12, 7, 3, 99], "first_top_logits": [9.1, 4.2, ...]}]}

On the device each case runs greedily for ``len(expected_ids)`` tokens (stop ids ignored, so
every case is compared over the same length) and :func:`judge` compares:

- **token agreement**: per case, the share of ``expected_ids`` reproduced before the first
  difference (a greedy decode that diverges once never re-converges meaningfully); the mean over
  the cases must reach ``min_token_agreement`` (1.0 for float builds: identical greedy tokens);
- **first-step logits**: where the float build must agree, the logits of ``first_top_ids`` must
  be within the variant's tolerance (``atol + rtol * |expected|``), and the top id must match.
  Builds with ``min_token_agreement`` below 1 (quantized) skip this check.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fleetlite.sdk.envelope import strict_json_loads
from fleetlite.sdk.errors import MalformedError, OversizeError
from fleetlite.sdk.manifest import Tolerance
from fleetlite.sdk.trust import canonical_json

__all__ = [
    "LM_SMOKE_TYPE",
    "LmSmokeCase",
    "LmSmokeResult",
    "LmSmokeVectors",
    "is_lm_smoke",
    "judge",
    "token_agreement",
]

LM_SMOKE_TYPE = "fleetlite.lm_smoke"
SPEC_VERSION = 1
MAX_LM_SMOKE_BYTES = 1024 * 1024
MAX_CASES = 16
MAX_IDS = 4096
TOP = 5
_MAX_DOUBLE = sys.float_info.max


@dataclass(frozen=True)
class LmSmokeCase:
    prompt_ids: tuple[int, ...]
    expected_ids: tuple[int, ...]
    first_top_ids: tuple[int, ...]
    first_top_logits: tuple[float, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"prompt_ids": list(self.prompt_ids), "expected_ids": list(self.expected_ids),
                "first_top_ids": list(self.first_top_ids),
                "first_top_logits": list(self.first_top_logits)}


@dataclass(frozen=True)
class LmSmokeVectors:
    cases: tuple[LmSmokeCase, ...]
    min_token_agreement: float = 1.0

    def to_json(self) -> bytes:
        return canonical_json({"_type": LM_SMOKE_TYPE, "spec_version": SPEC_VERSION,
                               "min_token_agreement": self.min_token_agreement,
                               "cases": [c.to_dict() for c in self.cases]})

    @classmethod
    def from_json(cls, data: bytes) -> LmSmokeVectors:
        """Strict parse; :class:`MalformedError` (or :class:`OversizeError`) naming the field."""
        if len(data) > MAX_LM_SMOKE_BYTES:
            raise OversizeError(f"LM smoke vectors are {len(data)} bytes; the limit is "
                                f"{MAX_LM_SMOKE_BYTES}")
        try:
            doc = strict_json_loads(data)
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise MalformedError(f"LM smoke vectors: not UTF-8 JSON without duplicate keys "
                                 f"({exc})") from None
        if not isinstance(doc, dict) or set(doc) != {"_type", "spec_version",
                                                      "min_token_agreement", "cases"}:
            raise _bad("must be an object with _type, spec_version, min_token_agreement, cases")
        if doc["_type"] != LM_SMOKE_TYPE or type(doc["spec_version"]) is not int or (
                doc["spec_version"] != SPEC_VERSION):  # not true, not 1.0
            raise _bad(f"_type must be {LM_SMOKE_TYPE!r} and spec_version {SPEC_VERSION}")
        agreement = doc["min_token_agreement"]
        if isinstance(agreement, bool) or not isinstance(agreement, (int, float)) or not (
                0.0 <= agreement <= 1.0):
            raise _bad("min_token_agreement must be a number in [0, 1]")
        raw = doc["cases"]
        if not isinstance(raw, list) or not 1 <= len(raw) <= MAX_CASES:
            raise _bad(f"cases must be a list of 1-{MAX_CASES} cases")
        cases = []
        for i, case in enumerate(raw):
            what = f"cases[{i}]"
            if not isinstance(case, dict) or set(case) != {"prompt_ids", "expected_ids",
                                                           "first_top_ids", "first_top_logits"}:
                raise _bad(f"{what} must have prompt_ids, expected_ids, first_top_ids, "
                           "first_top_logits")
            prompt = _ids(case["prompt_ids"], f"{what}.prompt_ids", 1)
            expected = _ids(case["expected_ids"], f"{what}.expected_ids", 1)
            top_ids = _ids(case["first_top_ids"], f"{what}.first_top_ids", 1)
            logits = case["first_top_logits"]
            if not isinstance(logits, list) or len(logits) != len(top_ids) or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool)
                    and -_MAX_DOUBLE <= v <= _MAX_DOUBLE  # compared: 10**400 must not overflow
                    for v in logits):
                raise _bad(f"{what}.first_top_logits must be finite numbers, one per top id")
            cases.append(LmSmokeCase(prompt, expected, top_ids, tuple(float(v) for v in logits)))
        return cls(tuple(cases), float(agreement))


@dataclass(frozen=True)
class LmSmokeResult:
    """What the device produced for one case: its greedy ids and its first step's logits of
    the case's ``first_top_ids`` (and its own top id)."""

    ids: tuple[int, ...]
    first_logits: tuple[float, ...]
    first_top_id: int


def is_lm_smoke(data: bytes) -> bool:
    """Whether a smoke file is an LM's (by its ``_type``), without parsing it strictly."""
    return f'"_type":"{LM_SMOKE_TYPE}"'.encode() in data[:4096]


def token_agreement(expected: Sequence[int], got: Sequence[int]) -> float:
    """The share of ``expected`` reproduced before the first difference."""
    if not expected:
        return 1.0
    same = 0
    for want, have in zip(expected, got):
        if want != have:
            break
        same += 1
    return same / len(expected)


def judge(vectors: LmSmokeVectors, results: Sequence[LmSmokeResult],
          tolerance: Tolerance) -> list[str]:
    """Problems with the device's results, empty when the model passes its smoke test."""
    if len(results) != len(vectors.cases):
        return [f"{len(results)} results for {len(vectors.cases)} cases"]
    problems: list[str] = []
    rates = []
    for i, (case, result) in enumerate(zip(vectors.cases, results)):
        rate = token_agreement(case.expected_ids, result.ids)
        rates.append(rate)
        if vectors.min_token_agreement < 1.0:
            continue
        if result.first_top_id != case.first_top_ids[0]:
            problems.append(f"case {i}: the first greedy token is {result.first_top_id}, "
                            f"expected {case.first_top_ids[0]}")
        for token, want, have in zip(case.first_top_ids, case.first_top_logits,
                                     result.first_logits):
            if not abs(have - want) <= tolerance.atol + tolerance.rtol * abs(want):
                problems.append(f"case {i}: first-step logit of token {token} is {have:.6g}, "
                                f"expected {want:.6g} (atol {tolerance.atol:g}, rtol "
                                f"{tolerance.rtol:g})")
                break
    mean = sum(rates) / len(rates)
    if mean < vectors.min_token_agreement:
        worst = min(range(len(rates)), key=lambda k: rates[k])
        problems.append(f"greedy token agreement {mean:.1%} is below the release's "
                        f"{vectors.min_token_agreement:.1%} (case {worst}: {rates[worst]:.0%})")
    return problems


def _ids(value: Any, what: str, minimum: int) -> tuple[int, ...]:
    if not isinstance(value, list) or not minimum <= len(value) <= MAX_IDS or not all(
            isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 22 for v in value):
        raise _bad(f"{what} must be a list of {minimum}-{MAX_IDS} token ids")
    return tuple(value)


def _bad(message: str) -> MalformedError:
    return MalformedError(f"LM smoke vectors: {message}")
