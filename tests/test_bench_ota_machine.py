"""bench_ota_machine through main() on a small release: the machine reaches the end of its
download from the frames alone, asking for nothing it was given, and the figures are printed
for both the machine and its baseline. No assertion on time."""

from __future__ import annotations

import json

import pytest

from fleetlite.tools.bench import bench_ota_machine


def test_the_machine_ends_its_download_on_every_frame(capsys: pytest.CaptureFixture[str]) -> None:
    code = bench_ota_machine.main(["--model-kib", "64", "--chunk-size", "1024", "--repeat", "1",
                                   "--json"])
    figures = json.loads(capsys.readouterr().out)
    assert code == 0
    assert figures["ok"] is True
    assert figures["frames"] >= 64  # 64 KiB of model in 1 KiB chunks, and the release's others
    assert figures["machine_us_per_frame"] > 0 and figures["baseline_us_per_frame"] > 0


def test_evolve_refuses_a_field_the_object_does_not_have() -> None:
    from fleetlite.agent.ota_machine import Receiver, _evolve

    state = Receiver("gw-1")
    moved = _evolve(state, wake_at=5.0)
    assert moved.wake_at == 5.0 and state.wake_at == 0.0  # a copy; the original is unchanged
    with pytest.raises(TypeError, match="wake_time"):
        _evolve(state, wake_time=5.0)
