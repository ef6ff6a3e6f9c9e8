"""bench_ingest_cpu at a tiny scale: every report of every kind goes through a real controller's
checks and store (the bench exits non-zero if one is not queued or not stored), and the
figures add up. No assertion on time."""

from __future__ import annotations

import json

import pytest

from fleetlite.tools.bench import bench_ingest_cpu


def test_every_kind_is_measured_through_the_controller(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert bench_ingest_cpu.main(["--devices", "3", "--messages", "10", "--repeat", "1",
                                  "--json"]) == 0
    out = capsys.readouterr().out
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [r["kind"] for r in rows] == ["telemetry", "profile", "ota"]
    for row in rows:
        assert row["reports"] == 30
        assert row["parse_us"] > 0 and row["checks_us"] > 0 and row["store_us"] > 0
        assert row["own_us"] == pytest.approx(
            row["checks_us"] + row["store_us"] - row["parse_us"], abs=0.2)
    assert "| telemetry | 30 |" in out


def test_an_unknown_kind_is_refused_with_the_choices(
        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        bench_ingest_cpu.main(["--kinds", "telemetry,bogus"])
    assert "unknown kind(s) bogus: choose from telemetry, profile, ota" in capsys.readouterr().err
