"""Variants per device class in the rollout engine (fleet/rollout.py, variants="auto"): the
probe wave, the choice it leads to, and installs that name each class's variant. Pure: the
simulated fleet of tests/test_rollout_engine.py, with devices that answer probes."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Optional

import pytest

from fleetlite.fleet.errors import RolloutError
from fleetlite.fleet.rollout import (
    CHOOSE_VARIANT,
    PROBE_RESULT,
    SEND_INSTALL,
    SEND_PROBE,
    Decision,
    OutcomeView,
    RolloutSpec,
    RolloutState,
    VariantBudget,
    apply,
    decide,
    parse_waves,
    request,
)
from fleetlite.sdk.messages import OtaStatus
from tests.test_rollout_engine import MODEL, RELEASE, T0, Dev, FleetSim, make_spec

VARIANTS = ("fp32", "int8")
BUDGETS = {"rpi4": VariantBudget(max_p95_latency_ms=100.0, max_peak_rss_mb=500.0),
           "jetson": VariantBudget(max_p95_latency_ms=100.0, max_peak_rss_mb=500.0)}
# per class: variant -> (p95 ms, peak RSS MB, fidelity)
FIGURES = {"rpi4": {"fp32": (180.0, 300.0, 1.0), "int8": (40.0, 90.0, 0.97)},
           "jetson": {"fp32": (20.0, 300.0, 1.0), "int8": (8.0, 90.0, 0.97)}}


@dataclass
class VDev(Dev):
    """A gateway that answers a probe with ``figures`` (None: never answers the probe), or
    with ``probe_outcome`` other than probed."""

    figures: Optional[Mapping[str, tuple[float, float, float]]] = None
    probe_outcome: str = "probed"
    installed_variant: list[Optional[str]] = field(default_factory=list)


class VariantSim(FleetSim):
    def __init__(self, spec: RolloutSpec, devs: Sequence[VDev]) -> None:
        super().__init__(spec, devs)
        self.probes: list[str] = []

    def carry_out(self, d: Decision) -> None:
        if d.kind not in (SEND_PROBE, SEND_INSTALL):
            super().carry_out(d)
            return
        dev = self.devs[d.device_id or ""]
        assert isinstance(dev, VDev)
        if d.kind == SEND_PROBE:
            assert d.detail == {"command": "ota_install",
                                "args": {"release_id": RELEASE,
                                         "chunk_size": self.spec.chunk_size, "probe": True}}
            self.probes.append(dev.device_id)
            if dev.figures is not None or dev.probe_outcome != "probed":
                self.events.append((self.now + dev.delay, partial(self.probed, dev)))
        elif d.kind == SEND_INSTALL:
            args = dict(d.detail["args"])
            dev.installed_variant.append(args.pop("variant", None))
            assert args == {"release_id": RELEASE, "chunk_size": self.spec.chunk_size}
            self.installs[dev.device_id] += 1
            if dev.outcome is not None:
                self.events.append((self.now + dev.delay, partial(self.answer, dev)))

    def probed(self, dev: VDev, at: float) -> None:
        if dev.probe_outcome != "probed":
            self.outcomes.append(OutcomeView(dev.device_id, RELEASE, dev.probe_outcome,
                                             "download_failed", "", at))
            return
        assert dev.figures is not None
        variants = {name: {"passed": True, "reason": "", "p95_ms": p95, "peak_rss_mb": rss,
                           "load_ms": 10.0, "fidelity": fidelity}
                    for name, (p95, rss, fidelity) in dev.figures.items()}
        status = OtaStatus(dev.device_id, at, RELEASE, MODEL, 3, "done", final=True,
                           outcome="probed", progress={"variants": variants})
        # through the wire format, as the controller reads it
        self.outcomes.append(OutcomeView.from_status(OtaStatus.from_json(status.to_json()), at))


def vspec(**changes: Any) -> RolloutSpec:
    base: dict[str, Any] = {"variants": "auto", "variant_names": VARIANTS, "budgets": BUDGETS,
                            "waves": parse_waves("1,50%,100%")}
    base.update(changes)
    return make_spec(**base)


def devs(cls: str, n: int, **kw: Any) -> list[VDev]:
    return [VDev(f"{cls}-{i}", cls, figures=FIGURES[cls], **kw) for i in range(n)]


def test_each_class_gets_the_variant_its_budgets_call_for() -> None:
    sim = VariantSim(vspec(), devs("rpi4", 4) + devs("jetson", 3))
    state = sim.run()
    assert state.state == "completed", state.reason
    # two probes per class, before any install
    assert len(sim.probes) == 4
    first_install = next(i for i, d in enumerate(sim.log) if d.kind == SEND_INSTALL)
    assert all(i < first_install for i, d in enumerate(sim.log) if d.kind == CHOOSE_VARIANT)
    assert {c: ch.variant for c, ch in state.variant_choices.items()} == {
        "rpi4": "int8", "jetson": "fp32"}
    for dev in sim.devs.values():
        assert isinstance(dev, VDev)
        want = "int8" if dev.device_class == "rpi4" else "fp32"
        assert dev.installed_variant == [want], dev.device_id  # probe devices install too
    rpi = state.variant_choices["rpi4"]
    assert not rpi.pinned and "180.0 ms > budget 100 ms" in rpi.reason
    int8 = next(f for f in rpi.figures if f.variant == "int8")
    assert (int8.devices_probed, int8.median_p95_ms, int8.max_peak_rss_mb,
            int8.min_fidelity) == (2, 40.0, 90.0, 0.97)
    assert state.counts() == {"installed": 7}


def test_a_pin_wins() -> None:
    sim = VariantSim(vspec(pins={"jetson": "int8", "rpi4": "fp32"}),
                     devs("rpi4", 2) + devs("jetson", 2))
    state = sim.run()
    assert state.state == "completed"
    choices = state.variant_choices
    assert (choices["rpi4"].variant, choices["rpi4"].pinned) == ("fp32", True)
    assert "would not have been chosen" in choices["rpi4"].reason
    assert (choices["jetson"].variant, choices["jetson"].pinned) == ("int8", True)
    assert {d.device_id: d.installed_variant for d in sim.devs.values()  # type: ignore[attr-defined]
            } == {"rpi4-0": ["fp32"], "rpi4-1": ["fp32"], "jetson-0": ["int8"],
                  "jetson-1": ["int8"]}


def test_a_class_no_variant_fits_is_excluded_with_the_figures() -> None:
    tight = {**BUDGETS, "rpi4": VariantBudget(max_p95_latency_ms=10.0, max_peak_rss_mb=500.0)}
    sim = VariantSim(vspec(budgets=tight), devs("rpi4", 3) + devs("jetson", 2))
    state = sim.run()
    assert state.state == "completed"
    rpi = state.variant_choices["rpi4"]
    assert rpi.variant is None and "40.0 ms > budget 10 ms" in rpi.reason
    assert state.paused_classes["rpi4"].gate == "variant"
    assert {d.device_id for d in state.devices.values() if d.status == "excluded"} == {
        "rpi4-0", "rpi4-1", "rpi4-2"}
    assert "no variant was chosen" in state.reason
    assert sim.installs["rpi4-0"] == 0


def test_probes_that_time_out_or_fail_exclude_their_class() -> None:
    silent = [VDev(f"rpi4-{i}", "rpi4", figures=None) for i in range(3)]
    failing = [VDev(f"jetson-{i}", "jetson", probe_outcome="failed") for i in range(2)]
    sim = VariantSim(vspec(), silent + failing)
    state = sim.run()
    assert state.state == "aborted"  # no device took the release
    assert {p.status for p in state.probes.values() if p.device_class == "rpi4"} == {
        "timed_out"}
    assert {p.code for p in state.probes.values() if p.device_class == "jetson"} == {
        "download_failed"}
    for cls in ("rpi4", "jetson"):
        assert state.variant_choices[cls].variant is None
        assert "no device of it answered" in state.variant_choices[cls].reason
        assert "probes left out" in state.variant_choices[cls].reason


def test_one_failed_probe_of_two_leaves_the_other_to_decide() -> None:
    spec = vspec()
    rpi = devs("rpi4", 3)
    sim = VariantSim(spec, rpi + devs("jetson", 1))
    probed = sorted(d.device_id for d in sim.decide()
                    if d.kind == SEND_PROBE and d.device_class == "rpi4")
    failing = sim.devs[probed[0]]
    assert isinstance(failing, VDev)
    failing.probe_outcome = "rejected"
    state = sim.run()
    choice = state.variant_choices["rpi4"]
    assert choice.variant == "int8" and choice.probed_devices == (probed[1],)
    assert f"{probed[0]} failed (download_failed)" in choice.reason
    assert state.probes[probed[0]].status == "failed"


def test_no_probe_before_resume_when_created_paused() -> None:
    spec = vspec()
    sim = VariantSim(spec, devs("rpi4", 2))
    sim.state = request(RolloutState(), "pause", "created paused")
    sim.step()
    assert not sim.kinds(SEND_PROBE)
    sim.state = request(sim.state, "resume")
    assert sim.run().state == "completed"
    assert len(sim.kinds(SEND_PROBE)) == 2


def test_a_probed_status_is_never_an_install_outcome() -> None:
    """A device answers its probe at the very moment the install is sent: the install still
    waits for its own final status."""
    spec = vspec(waves=parse_waves("all"), probe_devices_per_class=1)
    sim = VariantSim(spec, devs("rpi4", 1, outcome=None))  # the install is never answered
    sim.run(until=lambda s: bool(s.kinds(SEND_INSTALL)))
    dev = sim.state.devices["rpi4-0"]
    assert dev.status == "sent"
    late = next(o for o in sim.outcomes if o.outcome == "probed")
    again = decide(spec, sim.state, sim.views(), [], sim.now,
                   outcomes=[*sim.outcomes, OutcomeView(late.device_id, RELEASE, "probed", "",
                                                        "", dev.sent_at or 0.0, late.progress)])
    assert not [d for d in again if d.device_id == "rpi4-0" and d.kind == "mark"]


def test_one_variant_or_option_off_changes_nothing() -> None:
    for spec in (make_spec(waves=parse_waves("1,100%")),
                 vspec(variant_names=("fp32",), waves=parse_waves("1,100%"))):
        sim = VariantSim(spec, devs("rpi4", 3))
        state = sim.run()
        assert state.state == "completed"
        assert not sim.probes and not state.variant_choices and not state.probes
        assert all(d.installed_variant == [None] for d in sim.devs.values())  # type: ignore
        assert "probes" not in state.to_dict()
    assert "variants" not in make_spec().to_dict()  # stored as before the option existed


def test_state_and_spec_with_variants_round_trip_through_json() -> None:
    spec = vspec(pins={"rpi4": "int8"}, probe_devices_per_class=3)
    assert RolloutSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    sim = VariantSim(spec, devs("rpi4", 4) + devs("jetson", 2))
    sim.run()
    stored = json.loads(json.dumps(sim.state.to_dict()))
    assert RolloutState.from_dict(stored) == sim.state
    # choices and probes are in the rollout-level document the store keeps in one row
    light = sim.state.to_dict(devices=False)
    assert set(light["variant_choices"]) == {"rpi4", "jetson"} and len(light["probes"]) == 5


@pytest.mark.parametrize(("changes", "match"), [
    ({"variants": "manual"}, "variants must be one of"),
    ({"probe_devices_per_class": 0}, "probe_devices_per_class"),
    ({"pins": {"rpi4": "fp16"}}, "not in the release"),
    ({"variants": "off", "pins": {"rpi4": "int8"}}, "--variants auto"),
])
def test_invalid_variant_specs(changes: dict[str, Any], match: str) -> None:
    with pytest.raises(RolloutError, match=match):
        vspec(**changes)


def test_apply_refuses_a_result_for_a_device_never_probed() -> None:
    with pytest.raises(RolloutError, match="not probed"):
        apply(RolloutState(), [Decision(PROBE_RESULT, "x", device_id="nope",
                                        detail={"status": "probed"})], T0)
