"""bench_rollout with a killed controller, at a small scale, through main(): a real Mosquitto, a
real controller child killed with SIGKILL in the middle of the last wave and restarted with the
same store, broker and id, and the simulator with 20 devices. The rollout completes and the
report check holds (every final OTA status the devices sent is stored once). The check itself
is unit-tested on made-up mismatches: a lost report, a report counted twice, a device the
rollout counts without its status. No assertion on time."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import pytest

from fleetlite.fleet.rollout import DeviceProgress, RolloutState
from fleetlite.fleet.store import OtaRecord
from fleetlite.sdk.messages import OtaStatus
from fleetlite.tools.bench import bench_rollout
from fleetlite.tools.bench.bench_rollout import KillPlan, check_reports


def test_killed_controller_loses_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    code = bench_rollout.main(["--devices", "20", "--model-kib", "16", "--report-s", "5",
                               "--step-s", "1", "--kill-controller-at", "3:0.2", "--down-s", "3",
                               "--timeout", "240", "--register-timeout", "60"])
    out = capsys.readouterr().out
    (row,) = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert code == 0, out
    assert row["killed"] and row["completed"] and row["state"] == "completed", out
    check = row["check"]
    assert check["ok"] and check["lost"] == 0 and check["double_counted"] == 0, check
    assert check["devices_with_final"] == 20
    assert sum(check["sent_finals"].values()) >= 20
    kill = row["kill"]
    assert kill["down_s"] >= 3
    assert kill["ended_in_wave_at_kill"] < 18  # the last wave (18 devices) was still running
    assert kill["published_while_down"] > 0  # and went on reporting while the controller was down
    assert kill["first_stored_s"] is not None and kill["outage_stored_s"] is not None
    assert "# report check: OK" in out and "controller down" in out


# -- the check on made-up data ------------------------------------------------------------------

RELEASE = "a" * 64


def record(device: str, ts: float, phase: str = "done", outcome: str = "", reason: str = ""
           ) -> OtaRecord:
    status = OtaStatus(device_id=device, ts=ts, release_id=RELEASE, model="intent", version=2,
                       phase=phase, final=bool(outcome), outcome=outcome, reason=reason)
    return OtaRecord(status, ts + 0.1)


def summary(outcomes: dict[str, int], statuses: int, devices: int = 3) -> dict[str, Any]:
    return {"event": "summary", "devices": devices,
            "counts": {"ota_statuses": statuses}, "outcomes": outcomes}


def state(wave: int = 1, **statuses: str) -> RolloutState:
    return RolloutState(devices={d: DeviceProgress(device_id=d, device_class="raspberry-pi-4",
                                                   wave=wave, status=s, sent_at=1.0)
                                 for d, s in statuses.items()})


def fleet_records() -> list[OtaRecord]:
    now = time.time()
    return [record("d1", now, "accepted"), record("d1", now + 1, outcome="installed"),
            record("d2", now, "accepted"), record("d2", now + 1, outcome="installed"),
            record("d3", now, "accepted"),
            record("d3", now + 1, outcome="failed", reason="download_stalled")]


def test_check_holds_when_every_final_is_stored_once() -> None:
    check = check_reports(summary({"installed": 2, "failed:download_stalled": 1}, 6),
                          fleet_records(), state(d1="installed", d2="installed", d3="failed"), 3)
    assert check.ok and check.lost == 0 and check.double_counted == 0, check.problems
    assert check.devices_with_final == 3


def test_check_fails_on_a_lost_report() -> None:
    records = [r for r in fleet_records() if not (r.status.device_id == "d2" and r.status.final)]
    check = check_reports(summary({"installed": 2, "failed:download_stalled": 1}, 6), records,
                          state(d1="installed", d2="sent", d3="failed"), 3)
    assert not check.ok and check.lost == 1 and check.double_counted == 0


def test_check_fails_on_a_double_count() -> None:
    # a second installed final stored for d1 that the device never sent (the simulator says 2)
    records = [*fleet_records(), record("d1", time.time() + 5, outcome="installed")]
    check = check_reports(summary({"installed": 2, "failed:download_stalled": 1}, 7), records,
                          state(d1="installed", d2="installed", d3="failed"), 3)
    assert not check.ok and check.double_counted == 1 and check.lost == 0


def test_check_fails_on_a_rollout_outcome_without_its_status() -> None:
    # the rollout records d3 as installed, the store holds its failure: counted wrongly
    check = check_reports(summary({"installed": 2, "failed:download_stalled": 1}, 6),
                          fleet_records(), state(d1="installed", d2="installed", d3="installed"),
                          3)
    assert not check.ok and check.rollout_without_final == ["d3"]


def test_check_fails_when_more_statuses_are_stored_than_sent_or_a_summary_is_partial() -> None:
    assert not check_reports(summary({"installed": 2, "failed:download_stalled": 1}, 5),
                             fleet_records(), None, 3).ok
    assert not check_reports(summary({"installed": 2, "failed:download_stalled": 1}, 6,
                                     devices=2), fleet_records(), None, 3).ok


def test_kill_plan() -> None:
    plan = KillPlan.parse("3:0.5")
    assert (plan.wave, plan.fraction) == (3, 0.5)
    assert KillPlan.parse("2").fraction == 0.25
    assert not plan.due(state(3, a="installed", b="sent", c="sent", d="sent"))
    assert not plan.due(state(2, a="installed", b="failed", c="sent", d="sent"))
    assert plan.due(state(3, a="installed", b="failed", c="sent", d="sent"))
    with pytest.raises(argparse.ArgumentTypeError):
        KillPlan.parse("0:2")
