"""The rollout engine (fleet/rollout.py) and its gates (fleet/gates.py): pure tests.

Whole rollouts run in :class:`FleetSim`, a simulated fleet that answers ``ota_install`` with
outcomes and profiles and ``ota_rollback`` with ``rolled_back``, through the same
decide -> send -> apply loop a controller runs. Every step of every simulation also checks that
deciding again on the applied state decides nothing.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Callable, Optional

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from fleetlite.fleet import gates
from fleetlite.fleet.errors import RolloutError
from fleetlite.fleet.gates import Baseline, GateSpec, ProfileView
from fleetlite.fleet.rollout import (
    ABORT,
    ASSIGN,
    COMPLETE,
    GATE_PASSED,
    GATE_TRIPPED,
    MARK,
    PAUSE,
    REFUSE,
    RESUME,
    ROLLBACK,
    SEND_INSTALL,
    SEND_ROLLBACK,
    START_WAVE,
    SUCCEEDED_STATUSES,
    Decision,
    DeviceView,
    OutcomeView,
    RolloutSpec,
    RolloutState,
    Selector,
    WaveSpec,
    answer_requests,
    apply,
    decide,
    parse_waves,
    plan,
    request,
    wave_bounds,
)
from fleetlite.sdk.messages import OtaStatus
from fleetlite.sdk.profile import (
    MemoryStats,
    ModelInfo,
    ProfileRecord,
    RunParameters,
    Timings,
    summarize_latencies,
)

RELEASE = "ab" * 32
MODEL = "intent"
T0 = 1_000_000.0


def make_spec(**changes: object) -> RolloutSpec:
    base: dict[str, object] = {
        "rollout_id": "r-1", "release_id": RELEASE, "model": MODEL, "version": 3,
        "previous_version": 2, "waves": parse_waves("1%,10%,50%,100%"), "wave_timeout_s": 60.0,
    }
    base.update(changes)
    return RolloutSpec(**base)  # type: ignore[arg-type]


# -- the simulated fleet ---------------------------------------------------------------------


@dataclass
class Dev:
    """One simulated gateway and how it answers."""

    device_id: str
    device_class: str = "rpi4"
    tags: dict[str, str] = field(default_factory=dict)
    outcome: Optional[str] = "installed"  # None: never answers
    code: str = ""
    delay: float = 5.0
    p95_ms: float = 10.0
    rss_mb: float = 50.0
    base_p95_ms: float = 10.0
    base_rss_mb: float = 50.0
    profiles: bool = True
    profile_delay: float = 0.0  # after the outcome
    online_from: float = 0.0  # offline before this time
    online_until: float = float("inf")

    def view(self, now: float) -> DeviceView:
        return DeviceView(self.device_id, self.device_class, dict(self.tags),
                          self.online_from <= now < self.online_until)


class FleetSim:
    """Runs the controller's loop over a simulated fleet: decide, send, apply, deliver answers."""

    def __init__(self, spec: RolloutSpec, devs: Sequence[Dev], step_s: float = 5.0) -> None:
        self.spec = spec
        self.devs = {d.device_id: d for d in devs}
        self.step_s = step_s
        self.now = T0
        self.state = RolloutState()
        self.outcomes: list[OutcomeView] = []
        self.profiles: list[ProfileView] = []
        if spec.previous_version is not None:
            self.profiles = [ProfileView(d.device_id, d.device_class, MODEL,
                                         spec.previous_version, d.base_p95_ms, d.base_rss_mb, 1.0)
                             for d in devs]
        self.events: list[tuple[float, Callable[[float], None]]] = []
        self.log: list[Decision] = []
        self.installs: Counter[str] = Counter()
        self.rollbacks: Counter[str] = Counter()
        self.on_decision: Optional[Callable[[RolloutState, Decision], None]] = None
        self.delivered = 0

    def views(self) -> list[DeviceView]:
        return [d.view(self.now) for d in self.devs.values()]

    def decide(self) -> list[Decision]:
        return self.decide_on(self.state)

    def decide_on(self, state: RolloutState) -> list[Decision]:
        return decide(self.spec, state, self.views(), self.profiles, self.now,
                      outcomes=self.outcomes)

    def step(self) -> list[Decision]:
        decisions = self.decide()
        if self.on_decision is not None:
            state = self.state
            for d in decisions:
                self.on_decision(state, d)
                state = apply(state, [d], self.now)
        new_state = apply(self.state, decisions, self.now)
        again = self.decide_on(new_state)
        assert again == [], f"decided twice: {again}"
        for d in decisions:
            self.carry_out(d)
        self.state = new_state
        self.log.extend(decisions)
        self.now += self.step_s
        due = [e for e in self.events if e[0] <= self.now]
        self.events = [e for e in self.events if e[0] > self.now]
        for at, deliver in sorted(due, key=lambda e: e[0]):
            deliver(at)
        self.delivered = len(due)
        return decisions

    def carry_out(self, d: Decision) -> None:
        if d.kind == SEND_INSTALL:
            assert d.detail["command"] == "ota_install"
            assert d.detail["args"] == {"release_id": RELEASE, "chunk_size": self.spec.chunk_size}
            dev = self.devs[d.device_id or ""]
            self.installs[dev.device_id] += 1
            if dev.outcome is not None:
                self.events.append((self.now + dev.delay, partial(self.answer, dev)))
        elif d.kind == SEND_ROLLBACK:
            assert d.detail == {"command": "ota_rollback", "args": {"model": MODEL}}
            dev = self.devs[d.device_id or ""]
            self.rollbacks[dev.device_id] += 1
            self.events.append((self.now + dev.delay, partial(self.rolled_back, dev)))

    def answer(self, dev: Dev, at: float) -> None:
        assert dev.outcome is not None
        self.outcomes.append(OutcomeView(dev.device_id, RELEASE, dev.outcome, dev.code, "", at))
        if dev.outcome == "installed" and dev.profiles:
            self.events.append((at + dev.profile_delay, partial(self.profile, dev)))

    def profile(self, dev: Dev, at: float) -> None:
        self.profiles.append(ProfileView(dev.device_id, dev.device_class, MODEL,
                                         self.spec.version, dev.p95_ms, dev.rss_mb, at))

    def rolled_back(self, dev: Dev, at: float) -> None:
        self.outcomes.append(OutcomeView(dev.device_id, RELEASE, "rolled_back",
                                         "operator_rollback", "", at))

    def run(self, max_steps: int = 400,
            until: Optional[Callable[[FleetSim], bool]] = None) -> RolloutState:
        """Step until ``until`` holds, or by default until the rollout is finished or paused and
        nothing is left to happen (no decision, no answer in flight, none just delivered)."""
        for _ in range(max_steps):
            decisions = self.step()
            if until is not None:
                if until(self):
                    return self.state
            elif (not decisions and not self.events and not self.delivered
                  and (self.state.finished or self.state.state == "paused")):
                return self.state
        raise AssertionError(f"rollout did not settle: {self.state.state} "
                             f"wave {self.state.current_wave} {self.state.counts()}")

    def kinds(self, kind: str) -> list[Decision]:
        return [d for d in self.log if d.kind == kind]


def fleet(n: int, cls: str = "rpi4", prefix: str = "gw", **kw: object) -> list[Dev]:
    return [Dev(f"{prefix}-{i:03d}", cls, **kw) for i in range(n)]  # type: ignore[arg-type]


# -- planning --------------------------------------------------------------------------------


@pytest.mark.parametrize(("waves", "n", "bounds"), [
    ("1%,10%,50%,100%", 100, [1, 10, 50, 100]),
    ("1%,10%,50%,100%", 3, [1, 2, 3, 3]),
    ("1%,10%,50%,100%", 0, [0, 0, 0, 0]),
    ("10%,100%", 30, [3, 30]),          # 10% of 30 must not round up to 4
    ("1,5,all", 10, [1, 6, 10]),
    ("1,5,all", 2, [1, 2, 2]),
    ("2,50%,all", 10, [2, 5, 10]),
    ("all", 7, [7]),
])
def test_wave_bounds(waves: str, n: int, bounds: list[int]) -> None:
    assert wave_bounds(parse_waves(waves), n) == bounds


def test_plan_is_deterministic_and_independent_of_input_order() -> None:
    views = [DeviceView(f"gw-{i:03d}", "rpi4" if i % 3 else "jetson") for i in range(100)]
    spec = make_spec()
    first = plan(spec, views)
    assert plan(spec, list(reversed(views))) == first
    assert Counter(first.values()) == {1: 1, 2: 9, 3: 40, 4: 50}
    other = plan(make_spec(rollout_id="r-2"), views)
    assert other != first and Counter(other.values()) == Counter(first.values())


def test_plan_spreads_each_class_over_the_waves() -> None:
    views = [DeviceView(f"a-{i}", "a") for i in range(50)] + [
        DeviceView(f"b-{i}", "b") for i in range(50)]
    waves = plan(make_spec(waves=parse_waves("10%,100%")), views)
    first = Counter(d.split("-")[0] for d, w in waves.items() if w == 1)
    assert first == {"a": 5, "b": 5}


@pytest.mark.parametrize(("selector", "expected"), [
    (Selector(), {"a1", "a2", "b1"}),
    (Selector(device_classes=("a",)), {"a1", "a2"}),
    (Selector(tags={"site": "berlin"}), {"a1", "b1"}),
    (Selector(tags={"site": "berlin", "line": "2"}), {"a1"}),
    (Selector(device_classes=("a",), tags={"site": "berlin"}), {"a1"}),
    (Selector(device_ids=("a2", "b1")), {"a2", "b1"}),
    (Selector(device_classes=("b",), device_ids=("a2", "b1")), {"b1"}),
])
def test_selector(selector: Selector, expected: set[str]) -> None:
    views = [DeviceView("a1", "a", {"site": "berlin", "line": "2"}),
             DeviceView("a2", "a", {"site": "paris"}),
             DeviceView("b1", "b", {"site": "berlin"})]
    assert {v.device_id for v in views if selector.matches(v)} == expected


@pytest.mark.parametrize(("changes", "match"), [
    ({"waves": parse_waves("1%,50%")}, "end the waves with 100% or all"),
    ({"waves": parse_waves("1,5")}, "end the waves"),
    ({"waves": ()}, "non-empty"),
    ({"waves": parse_waves("all,100%")}, "only the last wave"),
    ({"success_threshold": 1.5}, "success_threshold"),
    ({"failure_threshold": -0.1}, "failure_threshold"),
    ({"on_failure": "explode"}, "on_failure"),
    ({"wave_timeout_s": 0}, "wave_timeout_s"),
    ({"chunk_size": 10}, "chunk_size"),
    ({"max_in_flight": -1}, "max_in_flight"),
    ({"max_in_flight": True}, "max_in_flight"),
    ({"version": -1}, "version"),
    ({"rollout_id": ""}, "rollout_id"),
])
def test_invalid_specs(changes: dict[str, object], match: str) -> None:
    with pytest.raises(RolloutError, match=match):
        make_spec(**changes)


@pytest.mark.parametrize("text", ["0%", "101%", "0", "-1", "lots", "1.5"])
def test_invalid_waves(text: str) -> None:
    with pytest.raises(RolloutError):
        WaveSpec.parse(text)


@pytest.mark.parametrize("changes", [{"max_p95_regression": -1.0}, {"p95_floor_ms": float("nan")},
                                     {"max_smoke_failures": -1}, {"min_profiles": 1.5},
                                     {"smoke_reasons": "smoke_crashed"}])
def test_invalid_gate_specs(changes: dict[str, object]) -> None:
    with pytest.raises(RolloutError):
        GateSpec(**changes)  # type: ignore[arg-type]


def test_spec_and_state_round_trip_through_json() -> None:
    spec = make_spec(selector=Selector(("a",), {"site": "x"}, ("gw-1",)),
                     gates=GateSpec(max_peak_rss_mb=128.0), max_in_flight=7)
    assert RolloutSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    sim = FleetSim(make_spec(), fleet(5))
    for _ in range(3):
        sim.step()
    stored = json.loads(json.dumps(sim.state.to_dict()))
    assert RolloutState.from_dict(stored) == sim.state
    with pytest.raises(RolloutError, match="malformed"):
        RolloutState.from_dict({"state": "running"})
    with pytest.raises(RolloutError, match="malformed"):
        RolloutSpec.from_dict({"rollout_id": "x"})
    json.dumps([d.to_dict() for d in sim.log])


# -- whole rollouts --------------------------------------------------------------------------


def test_percent_waves_run_to_completion() -> None:
    sim = FleetSim(make_spec(), fleet(40))
    state = sim.run()
    assert state.state == "completed"
    assert state.counts() == {"installed": 40}
    assert set(sim.installs.values()) == {1}
    assert [d.wave for d in sim.kinds(START_WAVE)] == [1, 2, 3, 4]
    assert [d.detail["devices"] for d in sim.kinds(START_WAVE)] == [1, 3, 16, 20]
    assert len(sim.kinds(GATE_PASSED)) == 4
    done = sim.kinds(COMPLETE)
    assert len(done) == 1 and "40 installed" in done[0].reason
    # every wave's installs were sent only after the previous wave's devices all answered
    sends = [d for d in sim.log if d.kind == SEND_INSTALL]
    assert [d.wave for d in sends] == sorted(d.wave or 0 for d in sends)


def run_in_flight(sim: FleetSim) -> tuple[RolloutState, int, Counter[float]]:
    """Run ``sim``; the most devices ever ``sent`` at once, and the installs sent per step."""
    peak = 0
    per_step: Counter[float] = Counter()

    def watch(state: RolloutState, decision: Decision) -> None:
        nonlocal peak
        after = apply(state, [decision], sim.now)
        peak = max(peak, sum(d.status == "sent" for d in after.devices.values()))
        if decision.kind == SEND_INSTALL:
            per_step[sim.now] += 1

    sim.on_decision = watch
    return sim.run(), peak, per_step


def test_max_in_flight_sends_a_wave_in_turns() -> None:
    devs = fleet(40)
    for i, dev in enumerate(devs):
        dev.delay = 5.0 + (i % 7) * 5.0  # answers come back at different times
    sim = FleetSim(make_spec(waves=parse_waves("10%,100%"), max_in_flight=5), devs)
    state, peak, per_step = run_in_flight(sim)
    assert state.state == "completed" and state.counts() == {"installed": 40}
    assert peak == 5, peak  # the cap was reached and never passed
    assert set(sim.installs.values()) == {1}
    assert Counter(d.wave for d in sim.kinds(SEND_INSTALL)) == {1: 4, 2: 36}
    # wave 2's 36 devices went out in turns over many steps, never more than 5 in one
    assert max(per_step.values()) <= 5 and len(per_step) >= 36 // 5 + 1
    assert [d.wave for d in sim.kinds(START_WAVE)] == [1, 2]


def test_max_in_flight_stops_a_failing_release_before_the_whole_wave_has_it() -> None:
    devs = fleet(40, outcome="failed", code="smoke_crashed")
    sim = FleetSim(make_spec(waves=parse_waves("100%"), max_in_flight=4), devs)
    state = sim.run()
    assert state.state == "paused" and "above the failure threshold" in state.reason
    # only the first turn got the release: a wave without the cap sends it to all 40
    assert sum(sim.installs.values()) == 4
    assert state.counts() == {"failed": 4, "pending": 36}
    uncapped = FleetSim(make_spec(waves=parse_waves("100%")), fleet(40, outcome="failed",
                                                                     code="smoke_crashed"))
    uncapped.run()
    assert sum(uncapped.installs.values()) == 40


def test_max_in_flight_counts_devices_back_from_offline() -> None:
    devs = fleet(12, delay=20.0)
    for dev in devs[:6]:
        dev.online_from = T0 + 10.0  # offline at the start, back while the others install
    sim = FleetSim(make_spec(waves=parse_waves("100%"), max_in_flight=3,
                             replace_offline=False), devs)
    state, peak, _ = run_in_flight(sim)
    assert state.state == "completed" and state.counts() == {"installed": 12}
    assert peak == 3
    assert any("is back online" in d.reason for d in sim.kinds(SEND_INSTALL))


def test_count_waves_and_no_change_devices() -> None:
    devs = fleet(9)
    devs[4].outcome, devs[4].code = "no_change", "same_version"
    sim = FleetSim(make_spec(waves=parse_waves("1,5,all")), devs)
    state = sim.run()
    assert state.state == "completed"
    assert [d.detail["devices"] for d in sim.kinds(START_WAVE)] == [1, 5, 3]
    assert state.counts() == {"installed": 8, "no_change": 1}
    assert state.devices["gw-004"].code == "same_version"
    # gw-004 is in wave 2: it succeeded, but the log never calls it updated
    passed = [d.reason for d in sim.kinds(START_WAVE) if d.wave == 3]
    assert passed and "4 of 5 device(s) updated, 1 already had v" in passed[0], passed


def test_an_empty_selector_completes_at_once() -> None:
    sim = FleetSim(make_spec(selector=Selector(device_classes=("none",))), fleet(3))
    decisions = sim.step()
    assert [d.kind for d in decisions] == [COMPLETE]
    assert "no device matches" in decisions[0].reason


def test_first_decide_plans_starts_and_sends() -> None:
    sim = FleetSim(make_spec(waves=parse_waves("2,all")), fleet(4))
    decisions = sim.step()
    assert [d.kind for d in decisions] == [ASSIGN] * 4 + [START_WAVE, SEND_INSTALL, SEND_INSTALL]
    assert sim.state.current_wave == 1
    assert all(sim.state.devices[d.device_id or ""].status == "sent"
               for d in decisions if d.kind == SEND_INSTALL)


# -- thresholds ------------------------------------------------------------------------------


def failing_fleet() -> list[Dev]:
    devs = fleet(10)
    order = plan(make_spec(waves=parse_waves("2,3,all")), [d.view(0) for d in devs])
    second = sorted(d for d, w in order.items() if w == 2)
    bad = next(d for d in devs if d.device_id == second[0])
    bad.outcome, bad.code = "failed", "download_stalled"
    return devs


@pytest.mark.parametrize(("on_failure", "final"), [("pause", "paused"), ("abort", "aborted"),
                                                   ("rollback", "rolled_back")])
def test_failure_threshold_pauses_aborts_or_rolls_back(on_failure: str, final: str) -> None:
    sim = FleetSim(make_spec(waves=parse_waves("2,3,all"), on_failure=on_failure),
                   failing_fleet())
    state = sim.run()
    assert state.state == final
    assert state.current_wave == 2
    assert "1 of 3 device(s) failed" in state.reason and "download_stalled x1" in state.reason
    assert not any(d.wave == 3 for d in sim.kinds(SEND_INSTALL))
    installed = {k for k, d in state.devices.items()
                 if d.wave <= 2 and d.code != "download_stalled"}
    if on_failure == "rollback":
        assert set(sim.rollbacks) == installed
        assert state.counts() == {"failed": 1, "pending": 5, "rolled_back": 4}
    else:
        assert not sim.rollbacks


def test_a_tolerant_failure_threshold_lets_the_wave_pass() -> None:
    spec = make_spec(waves=parse_waves("2,3,all"), failure_threshold=0.5, success_threshold=0.6)
    sim = FleetSim(spec, failing_fleet())
    state = sim.run()
    assert state.state == "completed"
    assert state.counts() == {"failed": 1, "installed": 9}


def test_success_threshold_pauses_a_wave_that_ends_short() -> None:
    spec = make_spec(waves=parse_waves("2,3,all"), failure_threshold=0.5, success_threshold=0.9)
    sim = FleetSim(spec, failing_fleet())
    state = sim.run()
    assert state.state == "paused" and state.paused_by == "threshold"
    assert "below the success threshold of 90%" in state.reason
    # resuming overrides the thresholds of that wave only
    sim.state = request(sim.state, "resume", "disk issue, known")
    state = sim.run(until=lambda s: s.state.finished)
    assert state.state == "completed" and state.override_wave == 2
    resume = sim.kinds(RESUME)[0]
    assert "overridden" in resume.reason and "disk issue" in resume.reason


# -- timeouts --------------------------------------------------------------------------------


def test_silent_device_times_out_and_a_late_answer_is_recorded() -> None:
    devs = fleet(3)
    devs[1].outcome = None
    spec = make_spec(waves=parse_waves("all"), failure_threshold=0.5, success_threshold=0.5)
    sim = FleetSim(spec, devs)
    sim.step()
    sent_at = sim.state.devices["gw-001"].sent_at
    assert sent_at == T0
    while sim.now < T0 + 60.0:
        sim.step()
        assert sim.state.devices["gw-001"].status == "sent"
    sim.step()
    gw1 = sim.state.devices["gw-001"]
    assert gw1.status == "timed_out" and gw1.code == "timeout"
    assert sim.state.state == "completed"
    # the device answers after all: recorded, never sent again
    sim.outcomes.append(OutcomeView("gw-001", RELEASE, "installed", "", "", sim.now))
    decisions = sim.step()
    assert [d.kind for d in decisions] == [MARK]
    assert decisions[0].reason.startswith("late answer: gw-001 installed")
    assert sim.installs["gw-001"] == 1


def test_a_success_after_a_failure_is_recorded_even_while_paused() -> None:
    """A device gave up (download_stalled) and the rollout paused on it; a re-sent install then
    reached it and it installed: the record follows the device, not its first answer."""
    sim = FleetSim(make_spec(waves=parse_waves("2,3,all")), failing_fleet())
    state = sim.run()
    assert state.state == "paused"
    bad = next(k for k, d in state.devices.items() if d.status == "failed")
    sim.outcomes.append(OutcomeView(bad, RELEASE, "installed", "", "", sim.now))
    decisions = sim.step()
    assert [(d.kind, d.device_id) for d in decisions] == [(MARK, bad)]
    assert decisions[0].reason == f"after it reported failed: {bad} installed intent v3"
    assert sim.state.devices[bad].status == "installed"
    assert sim.state.state == "paused"  # the operator still decides; the record is true
    assert sim.installs[bad] == 1  # the engine did not send it again


def test_a_stale_failure_never_undoes_an_install() -> None:
    sim = FleetSim(make_spec(waves=parse_waves("all")), fleet(2))
    sim.run()
    sent_at = sim.state.devices["gw-000"].sent_at
    assert sent_at is not None
    # a failure received after the install was recorded (e.g. a duplicate of an older attempt)
    sim.outcomes.append(OutcomeView("gw-000", RELEASE, "failed", "internal", "", sim.now))
    assert sim.step() == []
    assert sim.state.devices["gw-000"].status == "installed"


def test_outcomes_older_than_the_send_are_ignored() -> None:
    sim = FleetSim(make_spec(waves=parse_waves("all")), fleet(1))
    sim.outcomes.append(OutcomeView("gw-000", RELEASE, "rejected", "previously_rejected", "",
                                    T0 - 100))
    sim.outcomes.append(OutcomeView("gw-000", "cd" * 32, "failed", "x", "", T0 + 1))
    assert sim.run().counts() == {"installed": 1}


def test_an_unconfirmed_rollback_is_reported() -> None:
    devs = fleet(2)
    sim = FleetSim(make_spec(waves=parse_waves("all")), devs)
    sim.run()
    for d in devs:
        d.delay = 10_000.0  # the rollbacks will not be answered in time
    sim.state = request(sim.state, "rollback")
    sim.run(until=lambda s: all(d.status == "rollback_failed"
                                for d in s.state.devices.values()), max_steps=30)
    assert "did not confirm the rollback" in sim.state.devices["gw-000"].reason


# -- offline devices and late joiners --------------------------------------------------------


def test_offline_device_waits_is_replaced_and_picked_up_when_back() -> None:
    devs = fleet(6, delay=30.0)
    spec = make_spec(waves=parse_waves("1,2,all"))
    order = plan(spec, [d.view(0) for d in devs])
    canary = next(d for d in devs if order[d.device_id] == 1)
    canary.online_from = T0 + 40.0   # back during wave 2
    sim = FleetSim(spec, devs)
    first = sim.step()
    marks = [d for d in first if d.kind == MARK]
    assert len(marks) == 1 and marks[0].detail["status"] == "waiting_offline"
    assert "not sent and not counted" in marks[0].reason
    stand_in = [d for d in first if d.kind == SEND_INSTALL]
    assert len(stand_in) == 1 and stand_in[0].detail["replaces"] == canary.device_id
    assert stand_in[0].wave == 1 and order[stand_in[0].device_id or ""] == 2
    state = sim.run()
    assert state.state == "completed"
    assert state.counts() == {"installed": 6}
    back = [d for d in sim.kinds(SEND_INSTALL) if d.device_id == canary.device_id]
    assert len(back) == 1 and back[0].detail["from_wave"] == 1
    assert "back online" in back[0].reason and back[0].wave is not None and back[0].wave > 1
    assert sim.installs[canary.device_id] == 1


def test_a_wave_of_offline_devices_waits_when_there_is_no_stand_in() -> None:
    devs = fleet(2, online_from=T0 + 200.0)
    sim = FleetSim(make_spec(waves=parse_waves("1,all")), devs)
    for _ in range(20):
        sim.step()
    assert sim.state.state == "running" and sim.state.current_wave == 1
    assert sim.state.counts() == {"pending": 1, "waiting_offline": 1}
    assert sim.run().counts() == {"installed": 2}


def test_offline_devices_left_at_the_end_do_not_block_completion() -> None:
    devs = fleet(4)
    devs[3].online_from = float("inf")
    state = FleetSim(make_spec(waves=parse_waves("all")), devs).run()
    assert state.state == "completed"
    assert state.counts() == {"installed": 3, "waiting_offline": 1}


def test_a_device_joining_mid_rollout_gets_a_later_wave() -> None:
    devs = fleet(10, delay=20.0)
    sim = FleetSim(make_spec(waves=parse_waves("1,2,all")), devs)
    sim.step()
    assert sim.state.current_wave == 1
    sim.devs["gw-new"] = Dev("gw-new")
    sim.devs["gw-other"] = Dev("gw-other", "jetson")
    decisions = sim.step()
    joined = [d for d in decisions if d.kind == ASSIGN]
    assert {d.device_id for d in joined} == {"gw-new", "gw-other"}
    assert all(d.wave == 2 and d.detail["late"] for d in joined)
    state = sim.run()
    assert state.state == "completed" and state.counts() == {"installed": 12}
    assert state.devices["gw-new"].wave == 2


def test_a_device_joining_during_the_last_wave_gets_an_extra_wave() -> None:
    sim = FleetSim(make_spec(waves=parse_waves("1,all")), fleet(3, delay=20.0))
    sim.run(until=lambda s: s.state.current_wave == 2)
    sim.devs["gw-late"] = Dev("gw-late")
    decisions = sim.step()
    assert [d.wave for d in decisions if d.kind == ASSIGN] == [3]
    assert "extra wave after the 2 planned" in decisions[0].reason
    state = sim.run()
    assert state.state == "completed" and state.devices["gw-late"].status == "installed"
    assert [d.wave for d in sim.kinds(START_WAVE)] == [1, 2, 3]
    assert "wave 3 of 3" in sim.kinds(START_WAVE)[-1].reason


def test_devices_that_leave_the_selector_before_their_wave_are_excluded() -> None:
    devs = fleet(4, tags={"site": "x"}, delay=20.0)
    spec = make_spec(waves=parse_waves("1,all"), selector=Selector(tags={"site": "x"}))
    sim = FleetSim(spec, devs)
    sim.step()
    later = [k for k, d in sim.state.devices.items() if d.wave == 2]
    sim.devs[later[0]].tags = {"site": "y"}
    del sim.devs[later[1]]
    state = sim.run()
    assert state.devices[later[0]].code == "left_selector"
    assert state.devices[later[1]].code == "left_fleet"
    assert state.counts() == {"excluded": 2, "installed": 2}


# -- performance gates -----------------------------------------------------------------------


def two_class_fleet(a_p95: float = 10.0, a_rss: float = 50.0, n: int = 10) -> list[Dev]:
    return (fleet(n, "rpi4", "a", p95_ms=a_p95, rss_mb=a_rss)
            + fleet(n, "jetson", "b", base_p95_ms=4.0, p95_ms=4.1))


def test_latency_gate_trips_for_one_class_only() -> None:
    sim = FleetSim(make_spec(waves=parse_waves("10%,50%,100%")), two_class_fleet(a_p95=20.0))
    state = sim.run()
    assert state.state == "completed"
    trips = sim.kinds(GATE_TRIPPED)
    assert len(trips) == 1 and trips[0].device_class == "rpi4" and trips[0].wave == 1
    why = state.paused_classes["rpi4"].reason
    assert "p95" in why and "20.000 ms" in why and "10.000 ms" in why and "+100%" in why
    assert trips[0].detail["gate"] == "p95_latency"
    latency = next(r for r in trips[0].detail["results"] if r["gate"] == "p95_latency")
    assert latency["new_p95_ms"] == 20.0 and latency["baseline_p95_ms"] == 10.0
    # class A's wave-1 devices were rolled back, the rest of class A never got the release
    a_wave1 = {k for k, d in state.devices.items() if k.startswith("a-") and d.wave == 1}
    assert set(sim.rollbacks) == a_wave1 == set(trips[0].detail["rollback"])
    assert all(state.devices[k].status == "rolled_back" for k in a_wave1)
    assert {d.status for k, d in state.devices.items()
            if k.startswith("a-") and k not in a_wave1} == {"excluded"}
    assert {d.status for k, d in state.devices.items() if k.startswith("b-")} == {"installed"}
    assert sim.installs.keys().isdisjoint(
        {k for k, d in state.devices.items() if d.status == "excluded"})


def test_a_late_install_in_a_tripped_wave_is_rolled_back_too() -> None:
    devs = fleet(3, p95_ms=30.0)
    devs[2].delay = 100.0   # answers after its 60 s timeout
    sim = FleetSim(make_spec(waves=parse_waves("all")), devs)
    state = sim.run()
    assert [d.device_id for d in sim.kinds(SEND_ROLLBACK)] == ["gw-000", "gw-001", "gw-002"]
    late = [d for d in sim.log if d.device_id == "gw-002" and d.kind == MARK]
    # it is as slow to confirm the rollback: rollback_failed first, then confirmed late
    assert [d.detail["status"] for d in late] == ["timed_out", "installed", "rollback_failed",
                                                  "rolled_back"]
    assert state.state == "aborted" and state.counts() == {"rolled_back": 3}


def test_latency_floor_ignores_sub_floor_noise() -> None:
    devs = fleet(4, base_p95_ms=0.02, p95_ms=0.06)   # +200 %, but only 0.04 ms
    assert FleetSim(make_spec(waves=parse_waves("all")), devs).run().state == "completed"
    devs = fleet(4, base_p95_ms=0.02, p95_ms=0.08)   # 0.06 ms over: trips
    sim = FleetSim(make_spec(waves=parse_waves("all")), devs)
    sim.run()
    assert sim.kinds(GATE_TRIPPED)[0].detail["gate"] == "p95_latency"


@pytest.mark.parametrize(("gate_spec", "gate"), [
    (GateSpec(max_peak_rss_mb=64.0), "peak_memory"),
    (GateSpec(max_rss_regression=0.25), "memory_regression"),
])
def test_memory_gates(gate_spec: GateSpec, gate: str) -> None:
    sim = FleetSim(make_spec(waves=parse_waves("all"), gates=gate_spec),
                   two_class_fleet(a_rss=80.0, n=3))
    state = sim.run()
    trip = sim.kinds(GATE_TRIPPED)
    assert len(trip) == 1 and trip[0].device_class == "rpi4" and trip[0].detail["gate"] == gate
    assert "MiB" in trip[0].reason and "80.0" in trip[0].reason
    assert state.state == "completed" and state.counts() == {"installed": 3, "rolled_back": 3}


def test_smoke_failures_trip_their_class_and_the_rest_continues() -> None:
    devs = two_class_fleet(n=4)
    devs[0].outcome, devs[0].code = "rejected", "smoke_crashed"
    spec = make_spec(waves=parse_waves("all"))
    sim = FleetSim(spec, devs)
    state = sim.run()
    trip = sim.kinds(GATE_TRIPPED)
    assert len(trip) == 1 and trip[0].detail["gate"] == "smoke"
    assert "a-000" in trip[0].reason and "smoke test" in trip[0].reason
    # the class's failure is judged by its gate, not by the wave's failure threshold
    assert state.state == "completed"
    assert state.counts() == {"installed": 4, "rejected": 1, "rolled_back": 3}


def test_smoke_failures_within_the_allowance_count_as_plain_failures() -> None:
    devs = fleet(4)
    devs[0].outcome, devs[0].code = "rejected", "smoke_output_mismatch"
    spec = make_spec(waves=parse_waves("all"), gates=GateSpec(max_smoke_failures=1))
    state = FleetSim(spec, devs).run()
    assert state.state == "paused" and "smoke_output_mismatch x1" in state.reason
    assert not state.paused_classes


def test_an_unavailable_smoke_test_is_not_the_releases_fault() -> None:
    devs = fleet(4)
    devs[0].outcome, devs[0].code = "rejected", "smoke_test_unavailable"
    state = FleetSim(make_spec(waves=parse_waves("all")), devs).run()
    assert not state.paused_classes and state.state == "paused"


def test_missing_profiles_trip_the_gate_after_the_timeout() -> None:
    devs = fleet(3, profiles=False)
    sim = FleetSim(make_spec(waves=parse_waves("all")), devs)
    state = sim.run()
    trip = sim.kinds(GATE_TRIPPED)
    assert trip[0].detail["gate"] == "profiles" and "no performance evidence" in trip[0].reason
    assert sim.log.index(trip[0]) > 0 and sim.now >= T0 + 60.0
    assert state.counts() == {"rolled_back": 3}
    relaxed = make_spec(waves=parse_waves("all"), gates=GateSpec(min_profiles=0))
    assert FleetSim(relaxed, fleet(3, profiles=False)).run().counts() == {"installed": 3}


def test_without_a_baseline_only_absolute_limits_apply() -> None:
    devs = fleet(3, p95_ms=500.0)
    spec = make_spec(waves=parse_waves("all"), previous_version=None,
                     gates=GateSpec(max_peak_rss_mb=100.0))
    sim = FleetSim(spec, devs)
    assert sim.run().state == "completed"
    assert "no baseline profiles" in sim.kinds(GATE_PASSED)[0].reason


def test_gates_wait_for_every_profile_of_the_wave() -> None:
    # two profiles come 40 s after their outcomes, and they are the regressed ones: judged on
    # the first profile alone the class would pass; the verdict waits for all three
    devs = fleet(3)
    for dev in devs[1:]:
        dev.profile_delay, dev.p95_ms = 40.0, 30.0
    spec = make_spec(waves=parse_waves("all"))
    sim = FleetSim(spec, devs)
    sim.run()
    trip = sim.kinds(GATE_TRIPPED)
    assert len(trip) == 1 and trip[0].detail["evaluated"] == 3 and not sim.kinds(GATE_PASSED)
    ok = fleet(3)
    ok[2].profile_delay = 40.0
    sim = FleetSim(spec, ok)
    sim.run()
    passed = sim.kinds(GATE_PASSED)
    assert len(passed) == 1 and passed[0].detail["evaluated"] == 3
    assert "3 device(s)" in passed[0].reason


def test_every_class_excluded_aborts_and_says_why() -> None:
    # when every class that got the release refused it, nothing was rolled out: aborted
    sim = FleetSim(make_spec(waves=parse_waves("all")), fleet(2, p95_ms=50.0))
    state = sim.run()
    assert state.state == "aborted"
    assert "no device took the release" in state.reason
    assert "class rpi4 was excluded by the p95_latency gate in wave 1" in state.reason


def test_gate_functions() -> None:
    spec = GateSpec()
    base = gates.baseline([ProfileView("x", "c", "m", 1, 1.0, 10.0, 1.0),
                           ProfileView("x", "c", "m", 1, 3.0, 10.0, 2.0),   # newer wins
                           ProfileView("y", "c", "m", 1, 2.0, 30.0, 1.0),
                           ProfileView("z", "d", "m", 1, 9.0, 90.0, 1.0)], "m", 1, "c")
    assert base == Baseline(1, 2, 2.5, 20.0)
    assert gates.median([3.0, 1.0, 2.0]) == 2.0
    new = [ProfileView("x", "c", "m", 2, 3.0, 10.0, 5.0)]
    assert gates.check_latency(spec, "c", new, base).passed
    new = [ProfileView("x", "c", "m", 2, 3.1, 10.0, 5.0)]
    result = gates.check_latency(spec, "c", new, base)
    assert not result.passed and result.detail["limit_p95_ms"] == 3.0
    assert gates.check_latency(GateSpec(max_p95_regression=None), "c", new, base).passed
    assert gates.check_smoke(spec, "c", []).passed
    assert not gates.check_smoke(spec, "c", ["x"]).passed
    assert gates.check_smoke(GateSpec(max_smoke_failures=None), "c", ["x", "y"]).passed
    assert not gates.check_profiles_present(spec, "c", 2, 0).passed
    assert gates.check_profiles_present(GateSpec(min_profiles=5), "c", 2, 2).passed


def test_profile_view_from_record() -> None:
    record = ProfileRecord(
        device_id="gw-001", ts=5.0, trigger="model_change",
        model=ModelInfo(name=MODEL, sha256="ab" * 32, size_bytes=10, quantization="int8",
                        inputs=[], outputs=[], version=3),
        run=RunParameters(threads=1, backend="tflite-runtime", backend_version="2.14.0",
                          delegate="none", resolver="auto", timing="invoke", inputs="synthetic",
                          warmup_runs=1, warmup_min_seconds=0.5, min_runs=50, max_runs=100,
                          min_seconds=1.0, max_seconds=150.0, isolated=True),
        timings=Timings(init_ms=1.0, first_inference_ms=0.5, warmup_count=1, warmup_mean_ms=0.5,
                        steady=summarize_latencies([1.0, 2.0, 3.0, 4.0]), steady_seconds=1.0),
        memory=MemoryStats(rss_before_load_mb=40.0, peak_rss_load_mb=70.0,
                           rss_after_load_mb=45.0, peak_rss_inference_mb=47.5, method="sampling",
                           load_sample_interval_ms=1.0, inference_sample_interval_ms=10.0),
    )
    view = ProfileView.from_record(record, "rpi4")
    assert view == ProfileView("gw-001", "rpi4", MODEL, 3, record.timings.steady.p95_ms, 47.5, 5.0)


def test_outcome_view_from_status() -> None:
    status = OtaStatus("gw-1", 5.0, RELEASE, MODEL, 3, "done", True, "rejected", "smoke_crashed")
    assert OutcomeView.from_status(status, 7.0) == OutcomeView(
        "gw-1", RELEASE, "rejected", "smoke_crashed", "", 7.0)
    with pytest.raises(RolloutError):
        OutcomeView.from_status(replace(status, final=False), 7.0)


# -- operator requests -----------------------------------------------------------------------


def test_operator_pause_and_resume() -> None:
    sim = FleetSim(make_spec(waves=parse_waves("1,all")), fleet(5))
    sim.step()
    sim.state = request(sim.state, "pause", "change freeze")
    decisions = sim.step()
    assert decisions[0].kind == PAUSE
    assert not [d for d in decisions if d.kind in (START_WAVE, SEND_INSTALL)]
    assert "change freeze" in decisions[0].reason and sim.state.paused_by == "operator"
    for _ in range(10):
        assert not [d for d in sim.step() if d.kind in (START_WAVE, SEND_INSTALL)]
    sim.state = request(sim.state, "resume")
    decisions = sim.step()
    assert [d.kind for d in decisions][:2] == [RESUME, START_WAVE]
    assert sim.state.override_wave == 0
    assert sim.run().state == "completed"


def test_operator_abort_stops_sending() -> None:
    sim = FleetSim(make_spec(waves=parse_waves("1,all")), fleet(5))
    sim.step()
    sim.state = request(sim.state, "abort", "wrong release")
    state = sim.run()
    assert state.state == "aborted" and "wrong release" in state.reason
    assert sum(sim.installs.values()) == 1
    assert state.counts() == {"installed": 1, "pending": 4}


def test_operator_rollback_after_completion_rolls_back_installs_only() -> None:
    devs = fleet(4)
    devs[1].outcome = "no_change"
    sim = FleetSim(make_spec(waves=parse_waves("all")), devs)
    sim.run()
    devs[3].online_until = sim.now   # gone when the rollback is decided
    sim.state = request(sim.state, "rollback")
    sim.run()
    assert sim.state.state == "rolled_back"
    assert set(sim.rollbacks) == {"gw-000", "gw-002"}
    assert sim.state.devices["gw-003"].status == "installed"
    devs[3].online_until = float("inf")     # back: rolled back now
    sim.run()
    assert set(sim.rollbacks) == {"gw-000", "gw-002", "gw-003"}
    assert sim.state.counts() == {"no_change": 1, "rolled_back": 3}


def test_operator_requests_that_do_not_fit_are_refused() -> None:
    sim = FleetSim(make_spec(waves=parse_waves("all")), fleet(2))
    sim.state = request(request(sim.state, "resume"), "pause")
    decisions = sim.step()
    assert [d.kind for d in decisions][:2] == [REFUSE, PAUSE]
    assert "resume refused: the rollout is running" in decisions[0].reason
    sim.state = request(request(sim.state, "abort"), "abort")
    kinds = [d.kind for d in sim.step()]
    assert kinds[:2] == [ABORT, REFUSE]
    assert not sim.state.operator_requests
    with pytest.raises(RolloutError, match="operator action"):
        request(sim.state, "reboot")


@pytest.mark.parametrize("actions", [("pause",), ("resume", "pause"), ("abort", "abort"),
                                     ("pause", "resume"), ("rollback",)])
def test_requests_answered_alone_then_decided_as_one_decide_would(
        actions: tuple[str, ...]) -> None:
    """A controller answers requests from the rollout-level state alone (answer_requests: no
    devices, profiles or outcomes), then decides the rest: the same decisions as one decide."""
    sim = FleetSim(make_spec(waves=parse_waves("1,all")), fleet(5, delay=20.0))
    sim.step()
    state = sim.state
    for action in actions:
        state = request(state, action, "note")
    whole = decide(sim.spec, state, sim.views(), sim.profiles, sim.now, outcomes=sim.outcomes)
    answers = answer_requests(sim.spec, replace(state, devices={}), sim.now)
    assert answers == whole[:len(actions)] and all(d.detail["operator"] for d in answers)
    answered = apply(state, answers, sim.now)
    assert not answered.operator_requests
    rest = decide(sim.spec, answered, sim.views(), sim.profiles, sim.now, outcomes=sim.outcomes)
    assert answers + rest == whole


def test_a_rollback_during_a_wave_also_catches_devices_still_installing() -> None:
    devs = fleet(3, delay=20.0)
    sim = FleetSim(make_spec(waves=parse_waves("all")), devs)
    sim.step()
    sim.state = request(sim.state, "rollback")
    decisions = sim.step()
    assert [d.kind for d in decisions] == [ROLLBACK]   # nothing installed yet
    state = sim.run()
    assert state.counts() == {"rolled_back": 3} and set(sim.installs.values()) == {1}


# -- idempotence and properties --------------------------------------------------------------


def test_deciding_again_without_applying_repeats_the_same_decisions() -> None:
    sim = FleetSim(make_spec(), fleet(20))
    first = sim.decide()
    assert sim.decide() == first
    assert decide(sim.spec, apply(sim.state, first, sim.now), sim.views(), sim.profiles,
                  sim.now, outcomes=[]) == []


def test_apply_refuses_decisions_about_unknown_devices() -> None:
    with pytest.raises(RolloutError, match="not in the rollout"):
        apply(RolloutState(), [Decision(SEND_INSTALL, "x", device_id="nope", wave=1)], T0)
    with pytest.raises(RolloutError, match="unknown decision kind"):
        apply(RolloutState(), [Decision("explode", "x")], T0)


OUTCOMES = st.sampled_from([
    ("installed", ""), ("installed", ""), ("installed", ""), ("no_change", "same_version"),
    ("rejected", "smoke_crashed"), ("rejected", "hash_mismatch"), ("failed", "disk_full"),
    ("rolled_back", "health_check_failed"), (None, ""),
])


@st.composite
def fleets(draw: st.DrawFn) -> tuple[RolloutSpec, list[Dev]]:
    n = draw(st.integers(0, 25))
    devs = []
    for i in range(n):
        outcome, code = draw(OUTCOMES)
        devs.append(Dev(
            f"gw-{i:02d}", draw(st.sampled_from(["a", "b", "c"])), outcome=outcome, code=code,
            delay=draw(st.floats(1.0, 90.0)), p95_ms=draw(st.sampled_from([10.0, 10.5, 25.0])),
            profiles=draw(st.booleans()) or draw(st.booleans()),
            online_from=T0 + draw(st.sampled_from([0.0, 0.0, 50.0, 400.0])),
        ))
    waves = draw(st.lists(st.sampled_from(["1", "2", "5", "1%", "10%", "50%"]), max_size=3))
    waves.append(draw(st.sampled_from(["all", "100%"])))
    spec = make_spec(
        waves=parse_waves(waves),
        success_threshold=draw(st.sampled_from([0.0, 0.5, 0.8, 1.0])),
        failure_threshold=draw(st.sampled_from([0.0, 0.2, 0.5, 1.0])),
        on_failure=draw(st.sampled_from(["pause", "abort", "rollback"])),
        replace_offline=draw(st.booleans()),
        gates=GateSpec(max_smoke_failures=draw(st.sampled_from([0, 1, None]))),
    )
    return spec, devs


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fleets(), st.integers(0, 6))
def test_property_rollouts_terminate_without_double_sends(
        case: tuple[RolloutSpec, list[Dev]], joiners: int) -> None:
    spec, devs = case
    sim = FleetSim(spec, devs, step_s=7.0)
    advanced: list[int] = []

    def check(state: RolloutState, d: Decision) -> None:
        if d.kind != START_WAVE or state.current_wave == 0:
            return
        wave = state.current_wave
        counted = [p for p in state.devices.values()
                   if p.wave == wave and p.device_class not in state.paused_classes
                   and p.status not in ("pending", "waiting_offline", "excluded")]
        assert all(p.status != "sent" for p in counted)
        if counted and state.override_wave != wave:
            ok = sum(p.status in SUCCEEDED_STATUSES for p in counted)
            assert ok / len(counted) >= spec.success_threshold
        assert d.wave is not None and d.wave > wave
        advanced.append(wave)

    sim.on_decision = check
    for i in range(joiners):
        sim.step()
        sim.devs[f"late-{i}"] = Dev(f"late-{i}", "a")
    state = sim.run(max_steps=600)
    assert state.finished or state.state == "paused"
    event(f"ended {state.state}")
    event(f"classes tripped: {len(state.paused_classes)}")
    assert max(sim.installs.values(), default=1) == 1
    assert max(sim.rollbacks.values(), default=1) == 1
    assert advanced == sorted(advanced)
    for p in state.devices.values():
        if p.status == "rolled_back" and sim.rollbacks[p.device_id]:
            assert p.device_class in state.paused_classes or state.state == "rolled_back"


# -- rollback tells the truth (issue 12) ---------------------------------------------------------


def test_a_rollback_of_a_first_version_is_refused_with_the_reason() -> None:
    sim = FleetSim(make_spec(waves=parse_waves("all"), previous_version=None), fleet(2))
    sim.run()
    sim.state = request(sim.state, "rollback")
    decisions = sim.step()
    assert [d.kind for d in decisions] == [REFUSE]
    assert "no earlier version of intent (this rollout installed its first, v3)" in \
        decisions[0].reason
    assert sim.state.state == "completed" and not sim.rollbacks


def test_a_device_that_refuses_the_rollback_is_rollback_failed_at_once() -> None:
    devs = fleet(2)
    sim = FleetSim(make_spec(waves=parse_waves("all")), devs)
    sim.run()
    sim.state = request(sim.state, "rollback")
    sim.step()
    assert {d.status for d in sim.state.devices.values()} == {"rollback_sent"}
    # the device answers the rollback command with an error (the controller turns a refused
    # command into a failure at the time of the answer); long before wave_timeout_s
    sim.outcomes.append(OutcomeView("gw-000", RELEASE, "failed", "failed",
                                    "the device refused the ota_rollback command: no slot",
                                    sim.now + 1.0))
    sim.now += 2.0
    marks = [d for d in sim.decide() if d.kind == MARK and d.device_id == "gw-000"]
    assert [m.detail["status"] for m in marks] == ["rollback_failed"]
    assert "gw-000 refused the rollback (failed)" in marks[0].reason


def test_a_refused_install_fails_the_device_at_once() -> None:
    devs = fleet(1, delay=10_000.0)  # it would never send a final status
    sim = FleetSim(make_spec(waves=parse_waves("all")), devs)
    sim.step()
    sim.outcomes.append(OutcomeView("gw-000", RELEASE, "failed", "bad_args", "refused",
                                    sim.now + 0.5))
    sim.now += 1.0
    marks = [d for d in sim.decide() if d.kind == MARK]
    assert [(m.device_id, m.detail["status"]) for m in marks] == [("gw-000", "failed")]
