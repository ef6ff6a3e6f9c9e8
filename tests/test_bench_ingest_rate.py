"""bench_ingest_rate at a tiny scale, through main(): the bare subscriber and the controller
(SQLite, and PostgreSQL when FLEETLITE_TEST_PG_URL is set) each get every report of every kind,
and the controller stores each once, refusing none. No assertion on time."""

from __future__ import annotations

import json

import pytest

from fleetlite.tools.bench import bench_ingest_rate


def test_every_report_of_every_kind_is_counted(capsys: pytest.CaptureFixture[str]) -> None:
    code = bench_ingest_rate.main(["--devices", "3", "--messages", "20", "--json",
                                   "--timeout", "60"])
    out = capsys.readouterr().out
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert code == 0, out
    assert {r["kind"] for r in rows} == {"telemetry", "profile", "ota"}
    for kind in ("telemetry", "profile", "ota"):
        receivers = {r["receiver"] for r in rows if r["kind"] == kind}
        assert "bare" in receivers and "sqlite" in receivers
    for row in rows:
        assert row["sent"] == 3 * 20, row
        assert row["received"] == row["sent"], row
        assert row["refused"] == 0, row
        assert row["checked"], row
    assert "| telemetry | sqlite |" in out  # the table
