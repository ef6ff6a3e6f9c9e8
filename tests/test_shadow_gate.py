"""The shadow gate (fleet/shadow_gate.py) as a table of cases, each with its verdict and reason
code, and fed by real device-side shadow runs: an identical candidate passes, a retrained
one fails before any device switches."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fleetlite.agent.shadow_runner import ModelShadow, ShadowIdentity
from fleetlite.fleet.errors import RolloutError
from fleetlite.fleet.intent_model import intent_classifier
from fleetlite.fleet.shadow_gate import (
    FAIL,
    PASS,
    WAITING,
    overall_verdict,
    shadow_verdict,
)
from fleetlite.sdk.runtime.interpreter import Model
from fleetlite.sdk.shadow import ShadowReport
from tests.test_shadow import ALL, run_shadowed, serve, token_inputs


def report(device: str = "gw-1", **fields: Any) -> ShadowReport:
    base: dict[str, Any] = dict(
        device_id=device, ts=100.0, since=10.0, release_id="ab" * 32, model="intent",
        version=2, active_version=1, kind="classifier", requests=1000, samples=150,
        compared=150, agreed=150, sample_rate=0.2, cpu_budget=0.25, p95_budget_ratio=1.25,
        active_alone_count=500, active_alone_p50_ms=0.08, active_alone_p95_ms=0.1,
        active_shadowed_count=300, active_shadowed_p50_ms=0.09, active_shadowed_p95_ms=0.11,
        candidate_count=150, candidate_p50_ms=0.08, candidate_p95_ms=0.12)
    base.update(fields)
    return ShadowReport(**base)


CASES: list[tuple[str, dict[str, list[ShadowReport]], str, str]] = [
    ("no reports", {"pi4": []}, WAITING, "no_reports"),
    ("one device below min_samples", {"pi4": [report()]}, WAITING, "too_few_samples"),
    ("two devices pool their samples", {"pi4": [report(), report("gw-2")]}, PASS, "agrees"),
    ("98% exactly passes", {"pi4": [report(samples=200, compared=200, agreed=196)]}, PASS,
     "agrees"),
    ("97.5% fails", {"pi4": [report(samples=200, compared=200, agreed=195)]}, FAIL,
     "low_agreement"),
    ("a device counts once, newest report",
     {"pi4": [report(samples=300, compared=300, agreed=300),
              report(ts=200.0, samples=400, compared=400, agreed=300)]}, FAIL, "low_agreement"),
    ("tokens are the unit of an LM", {"pi4": [report(kind="lm", samples=250, compared=5000,
                                                     agreed=4950)]}, PASS, "agrees"),
    ("a candidate that cannot run fails",
     {"pi4": [report(samples=0, compared=0, agreed=0, candidate_errors=250)]}, FAIL,
     "candidate_errors"),
    ("shadowing slowed the active model beyond its budget",
     {"pi4": [report(samples=250, compared=250, agreed=250, active_shadowed_p50_ms=0.2,
                     active_shadowed_p95_ms=0.3)]}, FAIL, "shadow_cost"),
    ("a slowdown under the floor does not count",
     {"pi4": [report(samples=250, compared=250, agreed=250, active_alone_p95_ms=0.01,
                     active_shadowed_p50_ms=0.02, active_shadowed_p95_ms=0.03)]}, PASS,
     "agrees"),
    ("too few shadowed requests to judge latency",
     {"pi4": [report(samples=250, compared=250, agreed=250, active_shadowed_count=5,
                     active_shadowed_p50_ms=0.2, active_shadowed_p95_ms=0.3)]}, PASS, "agrees"),
]


@pytest.mark.parametrize(("what", "reports", "verdict", "code"), CASES,
                         ids=[c[0] for c in CASES])
def test_verdicts(what: str, reports: dict[str, list[ShadowReport]], verdict: str,
                  code: str) -> None:
    result = shadow_verdict(reports, min_samples=200)["pi4"]
    assert (result.verdict, result.codes[0]) == (verdict, code), result.reasons
    assert result.reasons and all(result.reasons)


def test_each_class_gets_its_own_verdict_and_the_rollout_the_worst() -> None:
    verdicts = shadow_verdict({
        "pi4": [report(samples=250, compared=250, agreed=250)],
        "jetson": [report("gw-9", samples=250, compared=250, agreed=100)],
        "x86": [report("gw-5")],
    }, min_samples=200)
    assert {c: v.verdict for c, v in verdicts.items()} == {"pi4": PASS, "jetson": FAIL,
                                                          "x86": WAITING}
    assert verdicts["jetson"].figures["agreement"] == 0.4
    assert overall_verdict(verdicts) == FAIL
    assert overall_verdict({c: v for c, v in verdicts.items() if c != "jetson"}) == WAITING
    assert overall_verdict({}) == WAITING


def test_reports_about_other_candidates_or_bad_limits_are_refused() -> None:
    with pytest.raises(RolloutError, match="different candidates"):
        shadow_verdict({"pi4": [report(), report("gw-2", version=3)]})
    for limits in ({"min_agreement": 1.5}, {"min_samples": 0}, {"p95_budget_ratio": 0.5},
                   {"p95_floor_ms": -1.0}):
        with pytest.raises(RolloutError, match="shadow options"):
            shadow_verdict({}, **limits)


def test_real_shadow_runs_decide_the_gate(tmp_path: Path) -> None:
    content = intent_classifier().tflite
    verdicts = {}
    for name, candidate in (("same", content), ("retrained", intent_classifier(seed=7).tflite)):
        identity = ShadowIdentity("gw-1", "ab" * 32, "intent", 2, 1)
        (tmp_path / name).mkdir()
        service = serve(tmp_path / name, content)
        runner = ModelShadow(service, "m", Model(candidate), kind="classifier",
                             identity=identity, config=ALL)
        run_shadowed(runner, service, token_inputs(250))
        received = ShadowReport.from_json(runner.report().to_json())  # as the fleet gets it
        # a test's back-to-back requests are no live traffic: judge agreement only here
        verdicts[name] = shadow_verdict({"pi4": [received]}, min_samples=200,
                                        p95_budget_ratio=None)["pi4"]
    assert verdicts["same"].verdict == PASS
    assert verdicts["retrained"].verdict == FAIL
    assert verdicts["retrained"].codes == ("low_agreement",)
    assert verdicts["same"].figures["agreement"] == 1.0
    assert verdicts["retrained"].figures["agreement"] < 0.98
