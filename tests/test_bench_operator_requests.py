"""bench_operator_requests at a small scale, through main(): a real controller, a real Mosquitto
and the one responder process drive a rollout to 50 seeded devices; every operator request of
both phases (idle and under load) is applied and leaves the rollout in the state asked for, and
the loaded rollout ends aborted with every device's outcome recorded. No assertion on time."""

from __future__ import annotations

import json
import os

import pytest

from fleetlite.tools.bench import bench_operator_requests


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_small_run_applies_every_request(backend: str,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    if backend == "postgresql" and not os.environ.get("FLEETLITE_TEST_PG_URL"):
        pytest.skip("FLEETLITE_TEST_PG_URL is not set")
    code = bench_operator_requests.main(["--devices", "50", "--store", backend, "--requests",
                                         "10", "--json", "--timeout", "300"])
    out = capsys.readouterr().out
    assert code == 0, out
    (row,) = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert row["store"] == backend and row["devices"] == 50
    for name in ("idle", "load"):
        phase = row[name]
        assert [r["action"] for r in phase["requests"]] == ["pause", "resume"] * 4 + [
            "pause", "abort"]
        assert phase["all_applied"], phase["requests"]
        assert phase["final_state"] == "aborted"
    load = row["load"]
    # every device got the install and its outcome is recorded: nothing left in flight
    assert sum(load["outcomes"].values()) == 50
    assert set(load["outcomes"]) <= {"installed", "failed"}, load["outcomes"]
    assert load["device_decisions"] >= 100  # at least a send and an outcome per device
    assert row["responder"]["commands"] >= 50 and row["responder"]["held"] >= 1
    assert "| load | all | 10 |" in out  # the table
