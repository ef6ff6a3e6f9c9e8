"""tools/bench/bench_wire_delta.py through real agents and a real Mosquitto, at its smallest:
the delta rollout puts a fraction of the full rollout's bytes on the wire to the devices."""

from __future__ import annotations

import pytest

from fleetlite.tools.bench.bench_wire_delta import main


def test_a_delta_rollout_sends_the_devices_a_fraction_of_the_bytes(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--devices", "1", "--model", "int8", "--json"]) == 0
    import json

    rows = {r["mode"]: r for r in (json.loads(line) for line in capsys.readouterr().out
                                   .splitlines() if line.startswith("{"))}
    full, delta = rows["full"], rows["delta"]
    assert full["installed"] == delta["installed"] == 1
    # the full rollout sends at least the model; the delta one about the delta and the rest
    assert full["broker_sent"] >= full["model_bytes"]
    assert delta["broker_sent"] <= 0.25 * full["broker_sent"]
