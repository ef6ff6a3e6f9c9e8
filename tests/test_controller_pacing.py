"""The controller's loop paces its rollout steps by their cost: a step that reads every device
of a 10,000-device rollout takes ~0.35 s, and stepping every ``tick_s`` (0.5 s) after it left
little CPU for ingest (issue 13: py-spy on a 10,000-device wave, 76 % of the controller's
samples in the loop). After a step of d seconds the next starts at least 3d later; a cheap step
still waits only ``tick_s``; waiting longer by design is not taken for a stall."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from fleetlite.fleet.controller import Controller
from fleetlite.fleet.store import open_store
from tests.mqtt_harness import Mosquitto

STEP_S = 0.2


def test_a_slow_step_spaces_the_next_and_a_fast_one_does_not(
        broker: Mosquitto, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'fleet.db'}")
    controller = Controller(store, broker.host, broker.port, tick_s=0.05, wake_s=0)
    starts: list[float] = []
    enough = threading.Event()

    def slow_tick(now: float) -> None:
        starts.append(time.monotonic())
        time.sleep(STEP_S)
        if len(starts) >= 4:
            enough.set()

    controller.tick = slow_tick  # type: ignore[method-assign]
    controller.start()
    try:
        assert enough.wait(60), f"only {len(starts)} steps in 60 s"
    finally:
        controller.stop()
        store.close()
    # each step took >= STEP_S, so the next one began >= STEP_S + 3 * STEP_S after it
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    assert all(gap >= 4 * STEP_S - 0.01 for gap in gaps), gaps
    assert controller.tick_cost_s >= STEP_S
    assert "stalled" not in caplog.text  # the longer wait is by design

    controller.tick_cost_s = 0.001
    assert controller.next_tick_in() == controller.tick_s
    controller.tick_cost_s = 0.5
    assert controller.next_tick_in() == pytest.approx(1.5)
