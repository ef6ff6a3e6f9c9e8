"""The rollout engine's shadow phase (docs/rollouts.md, "Shadow evaluation"): before any wave
installs, the targeted online devices shadow the release; each class's verdict from their
reports passes it into the waves, or stops it before any device switches."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import partial
from typing import Any, Optional

import pytest

from fleetlite.fleet.errors import RolloutError
from fleetlite.fleet.rollout import (
    SEND_INSTALL,
    SEND_SHADOW,
    SHADOW_RESULT,
    SHADOW_VERDICT,
    Decision,
    OutcomeView,
    RolloutSpec,
    RolloutState,
    ShadowSpec,
    decide,
    parse_waves,
)
from fleetlite.sdk.shadow import ShadowReport
from tests.test_rollout_engine import MODEL, RELEASE, T0, Dev, FleetSim, make_spec

SHADOW = ShadowSpec(min_agreement=0.98, min_samples=40, timeout_s=600.0)


@dataclass
class SDev(Dev):
    """A gateway that answers a shadow install with ``shadow_outcome`` (None: never) and then
    reports ``per_report`` more samples every step, ``agree`` of each ``per_report`` agreeing."""

    shadow_outcome: Optional[str] = "shadowing"
    shadow_code: str = ""
    per_report: int = 10
    agree: int = 10
    shadowed_p95_ms: float = 0.11
    shadowed_share: int = 1  # active requests overlapping a candidate run, per sample


class ShadowSim(FleetSim):
    def __init__(self, spec: RolloutSpec, devs: list[SDev]) -> None:
        super().__init__(spec, devs)
        self.reports: list[ShadowReport] = []
        self.shadowing: dict[str, int] = {}  # device -> samples so far
        self.stopped: list[str] = []

    def step(self) -> list[Decision]:
        # each shadowing device reports; FleetSim.step decides on them (twice: a fixed point)
        for device_id in sorted(self.shadowing):
            dev = self.devs[device_id]
            assert isinstance(dev, SDev)
            n = self.shadowing[device_id] = self.shadowing[device_id] + dev.per_report
            agreed = n // dev.per_report * dev.agree
            self.reports.append(ShadowReport(
                device_id=device_id, ts=self.now, since=T0, release_id=RELEASE, model=MODEL,
                version=3, active_version=2, kind="classifier", requests=5 * n, samples=n,
                compared=n, agreed=agreed, sample_rate=0.2, cpu_budget=0.25,
                p95_budget_ratio=1.25, active_alone_count=4 * n, active_alone_p95_ms=0.1,
                active_shadowed_count=n * dev.shadowed_share,
                active_shadowed_p95_ms=dev.shadowed_p95_ms,
                candidate_count=n, candidate_p95_ms=0.12))
        return super().step()

    def decide_on(self, state: RolloutState) -> list[Decision]:
        return decide(self.spec, state, self.views(), self.profiles, self.now,
                      outcomes=self.outcomes, shadow_reports=self.reports)

    def carry_out(self, d: Decision) -> None:
        if d.kind == SEND_SHADOW:
            dev = self.devs[d.device_id or ""]
            assert isinstance(dev, SDev)
            assert self.spec.shadow is not None
            assert d.detail == {"command": "ota_install", "args": {
                "release_id": RELEASE, "chunk_size": self.spec.chunk_size,
                **self.spec.shadow.install_args()}}
            if dev.shadow_outcome is not None:
                self.events.append((self.now + dev.delay, partial(self.shadow_answer, dev)))
        elif d.kind == SHADOW_VERDICT:
            for device_id in d.detail["stop"]:
                self.shadowing.pop(device_id, None)
                self.stopped.append(device_id)
        else:
            super().carry_out(d)

    def shadow_answer(self, dev: SDev, at: float) -> None:
        assert dev.shadow_outcome is not None
        self.outcomes.append(OutcomeView(dev.device_id, RELEASE, dev.shadow_outcome,
                                         dev.shadow_code, "", at))
        if dev.shadow_outcome == "shadowing":
            self.shadowing[dev.device_id] = 0


def sspec(**changes: Any) -> RolloutSpec:
    base: dict[str, Any] = {"shadow": SHADOW, "waves": parse_waves("1,100%")}
    base.update(changes)
    return make_spec(**base)


def devs(cls: str, n: int, **kw: Any) -> list[SDev]:
    return [SDev(f"{cls}-{i}", cls, **kw) for i in range(n)]


def test_a_class_that_agrees_installs_after_its_verdict() -> None:
    sim = ShadowSim(sspec(), devs("rpi4", 3))
    state = sim.run()
    assert state.state == "completed", state.reason
    first_install = next(i for i, d in enumerate(sim.log) if d.kind == SEND_INSTALL)
    verdict = next(i for i, d in enumerate(sim.log) if d.kind == SHADOW_VERDICT)
    assert len(sim.kinds(SEND_SHADOW)) == 3 and verdict < first_install
    assert sim.kinds(SEND_SHADOW)[0].detail == {"command": "ota_install", "args": {
        "release_id": RELEASE, "chunk_size": 16384, "shadow": True,
        "shadow_sample_rate": 0.2, "shadow_cpu_budget": 0.25, "shadow_p95_ratio": 1.25,
        "shadow_kind": "classifier"}}
    v = state.shadow_verdicts["rpi4"]
    assert v["verdict"] == "pass" and v["stopped"] == []
    figures = v["figures"]
    assert figures["agreement"] == 1.0 and figures["samples"] >= 40
    assert (figures["active_alone_p95_ms"], figures["active_shadowed_p95_ms"],
            figures["candidate_p95_ms"]) == (0.1, 0.11, 0.12)
    assert state.counts() == {"installed": 3}
    assert sim.stopped == []


def test_a_class_that_disagrees_is_stopped_before_any_device_switches() -> None:
    sim = ShadowSim(sspec(), devs("rpi4", 2, agree=9) + devs("jetson", 2))
    state = sim.run()
    assert state.state == "completed", state.reason
    fail = state.shadow_verdicts["rpi4"]
    assert fail["verdict"] == "fail" and fail["codes"] == ["low_agreement"]
    assert "90.0%" in fail["reason"] and "minimum 98.0%" in fail["reason"]
    assert sorted(sim.stopped) == ["rpi4-0", "rpi4-1"]
    assert {s.status for s in state.shadows.values() if s.device_class == "rpi4"} == {"stopped"}
    assert not any(d.device_id.startswith("rpi4") for d in sim.kinds(SEND_INSTALL))
    assert {d.status for d in state.devices.values() if d.device_class == "rpi4"} == {
        "excluded"}
    assert {d.status for d in state.devices.values() if d.device_class == "jetson"} == {
        "installed"}
    assert state.paused_classes["rpi4"].gate == "shadow"
    assert "stopped by its shadow verdict" in state.reason


def test_every_class_failing_aborts_the_rollout() -> None:
    sim = ShadowSim(sspec(), devs("rpi4", 2, agree=5))
    state = sim.run()
    assert state.state == "aborted"
    assert "no device took the release" in state.reason
    assert sim.installs == {}


def test_shadowing_slower_than_the_budget_fails() -> None:
    sim = ShadowSim(sspec(), devs("rpi4", 2, shadowed_p95_ms=0.5))
    state = sim.run()
    v = state.shadow_verdicts["rpi4"]
    assert v["verdict"] == "fail" and "shadow_cost" in v["codes"]
    assert state.state == "aborted" and sim.installs == {}


def test_too_few_samples_until_the_timeout_stops_naming_the_samples() -> None:
    spec = sspec(shadow=ShadowSpec(min_samples=10_000, timeout_s=60.0))
    sim = ShadowSim(spec, devs("rpi4", 2))
    state = sim.run()
    v = state.shadow_verdicts["rpi4"]
    assert v["verdict"] == "fail" and v["codes"] == ["shadow_timeout"]
    assert "sample(s) seen of the 10000 needed" in v["reason"]
    assert state.state == "aborted" and sim.installs == {}


def test_a_pass_waits_until_the_latency_cost_could_be_judged() -> None:
    spec = sspec(shadow=ShadowSpec(min_samples=40, timeout_s=60.0))
    sim = ShadowSim(spec, devs("rpi4", 2, shadowed_share=0))  # nothing ever overlapped
    state = sim.run()
    v = state.shadow_verdicts["rpi4"]
    assert v["verdict"] == "fail" and v["codes"] == ["shadow_timeout"]
    assert "the latency cost was judged on no device" in v["reason"]
    assert state.state == "aborted" and sim.installs == {}
    # without a latency budget the same figures pass
    spec = sspec(shadow=ShadowSpec(min_samples=40, timeout_s=60.0, p95_budget_ratio=None))
    sim = ShadowSim(spec, devs("rpi4", 2, shadowed_share=0))
    assert sim.run().state == "completed"


def test_a_device_that_cannot_shadow_is_noted_and_left_out() -> None:
    fleet = devs("rpi4", 2)
    fleet[0].shadow_outcome, fleet[0].shadow_code = "failed", "shadow_unavailable"
    sim = ShadowSim(sspec(), fleet)
    state = sim.run()
    assert state.shadows["rpi4-0"].status == "failed"
    assert state.shadows["rpi4-0"].code == "shadow_unavailable"
    assert any("shadow_unavailable" in d.reason for d in sim.kinds(SHADOW_RESULT))
    v = state.shadow_verdicts["rpi4"]
    assert v["verdict"] == "pass" and v["figures"]["failed_devices"] == ["rpi4-0"]
    assert state.state == "completed" and state.counts() == {"installed": 2}


def test_a_class_none_of_whose_devices_can_shadow_is_stopped() -> None:
    sim = ShadowSim(sspec(), devs("rpi4", 2, shadow_outcome="failed",
                                  shadow_code="shadow_unavailable"))
    state = sim.run()
    assert state.shadow_verdicts["rpi4"]["codes"] == ["no_shadow"]
    assert state.state == "aborted" and sim.installs == {}


def test_a_shadowing_status_is_never_an_install_outcome() -> None:
    sim = ShadowSim(sspec(), devs("rpi4", 2))
    state = sim.run()
    assert state.counts() == {"installed": 2}
    assert all(d.code != "shadowing" for d in state.devices.values())


def test_spec_and_state_round_trip_and_a_spec_without_shadow_is_unchanged() -> None:
    spec = sspec(shadow=ShadowSpec(kind="regressor", error_bound=0.5, min_samples=7))
    data = json.loads(json.dumps(spec.to_dict()))
    assert RolloutSpec.from_dict(data) == spec
    assert data["shadow"]["error_bound"] == 0.5
    assert "shadow" not in make_spec().to_dict()
    assert spec.shadow is not None
    assert spec.shadow.install_args()["shadow_error_bound"] == 0.5
    assert "shadow_kind" not in ShadowSpec(kind="lm").install_args()
    sim = ShadowSim(sspec(), devs("rpi4", 2, agree=9))
    state = sim.run()
    again = RolloutState.from_dict(json.loads(json.dumps(state.to_dict())))
    assert again == state
    assert "shadows" not in RolloutState().to_dict()


@pytest.mark.parametrize(("changes", "match"), [
    ({"min_agreement": 1.5}, "min_agreement"),
    ({"min_samples": 0}, "min_samples"),
    ({"kind": "regressor"}, "error_bound"),
    ({"error_bound": 0.1}, "regressor kind only"),
    ({"kind": "ranker"}, "kind must be one of"),
    ({"sample_rate": 0.0}, "sample_rate"),
    ({"timeout_s": 0}, "timeout_s"),
    ({"p95_budget_ratio": 0.5}, "p95_budget_ratio"),
])
def test_invalid_shadow_specs(changes: dict[str, Any], match: str) -> None:
    with pytest.raises(RolloutError, match=match):
        ShadowSpec(**changes)
