"""bench_ota_transfer at a small scale, through main(): the FleetLite transfer (a real publisher,
a real agent process, a real Mosquitto) and the bare one complete with every byte. No assertion on
time."""

from __future__ import annotations

import json

import pytest

from fleetlite.tools.bench import bench_ota_transfer
from fleetlite.tools.bench.bench_rollout import model_bytes


@pytest.mark.parametrize("serving", [[], ["--request-only"]], ids=["retained", "request-only"])
def test_small_transfer_completes_with_every_byte(capsys: pytest.CaptureFixture[str],
                                                  serving: list[str]) -> None:
    code = bench_ota_transfer.main(["--model-kib", "64", "--chunk-size", "4096", "--json",
                                    "--timeout", "120", *serving])
    out = capsys.readouterr().out
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert code == 0, out
    (row,) = rows
    assert row["ok"]
    assert row["model_bytes"] == len(model_bytes(64))
    assert row["release_bytes"] > row["model_bytes"]  # the model and its smoke vectors
    (fleet,) = row["fleet"]
    assert fleet["completed"] and fleet["outcome"] == "installed", out
    assert fleet["release_bytes"] == row["release_bytes"]
    assert fleet["model_matches"]  # the device serves exactly the model's bytes
    assert fleet["chunks_published"] >= fleet["total_chunks"] >= row["release_bytes"] / 4096
    (bare,) = row["bare"]
    assert bare["completed"]
    assert bare["frames"] == fleet["total_chunks"]
    assert bare["data_bytes"] == row["release_bytes"]
    assert "FleetLite / bare" in out  # the table
