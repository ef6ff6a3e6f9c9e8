"""Operator requests (pause, resume, abort, rollback) are never refused because a controller is
busy writing the rollout (issue 13: under CPU load ``pause`` failed with "it kept changing under
us"): the request takes the rollout's lock, waits for the step in progress and is queued. Real
store on both backends, a writer thread standing in for a busy controller. And they tell the
truth (issue 12): a rollback with nothing to go back to is refused up front with the reason
(or, asked with ``remove_model``, removes the model), and a wave in which every device failed
is shown ``failed``, never ``passed``."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from fleetlite.fleet.client import Fleet
from fleetlite.fleet.errors import RolloutError
from fleetlite.fleet.release_builder import build_release
from fleetlite.fleet.rollout import (
    SEND_ROLLBACK,
    DeviceProgress,
    DeviceView,
    RolloutSpec,
    RolloutState,
    Selector,
    apply,
    decide,
    parse_waves,
)
from fleetlite.fleet.store import Store, open_store
from tests.mqtt_harness import Mosquitto
from tests.test_fleet_e2e import wait_until
from tests.test_ota_install import ISSUED, RELEASE_KEY
from tests.test_store import add_release, birth, status

RELEASE = "ab" * 32


@pytest.fixture
def busy(store_url: str) -> Iterator[tuple[Store, threading.Event, list[int]]]:
    """A rollout whose state another connection rewrites as fast as it can."""
    store = open_store(store_url)
    add_release(store, RELEASE)
    spec = RolloutSpec(rollout_id="ro-1", release_id=RELEASE, model="kws", version=4,
                       previous_version=3, selector=Selector(), waves=parse_waves("100%"),
                       wave_timeout_s=600, chunk_size=4096)
    store.create_rollout("ro-1", RELEASE, spec.to_dict())
    writer = open_store(store_url)
    stop = threading.Event()
    writes = [0]

    def keep_writing() -> None:
        while not stop.is_set():
            with writer.rollout_lock("ro-1") as txn:
                txn.touch()  # a controller step: the revision grows
            writes[0] += 1

    thread = threading.Thread(target=keep_writing, daemon=True)
    thread.start()
    try:
        yield store, stop, writes
    finally:
        stop.set()
        thread.join(30)
        writer.close()
        store.close()


def test_requests_are_queued_while_a_controller_rewrites_the_rollout(
        busy: tuple[Store, threading.Event, list[int]], store_url: str) -> None:
    store, _, writes = busy
    wait_until(lambda: writes[0] >= 5, 30, "the busy writer's first steps")
    before = writes[0]
    with Fleet(db=store_url) as fleet:
        for n in range(20):
            action = "pause" if n % 2 == 0 else "resume"
            fleet.request("ro-1", action, note=f"request {n}")
    record = store.get_rollout("ro-1")
    assert record is not None
    queued = RolloutState.from_dict(record.state).operator_requests
    assert [(r.action, r.note) for r in queued] == [
        ("pause" if n % 2 == 0 else "resume", f"request {n}") for n in range(20)]
    # the requests took turns with the writer, which is neither stuck nor broken by them
    wait_until(lambda: writes[0] > before, 30, "the busy writer's next step")


# -- rollback tells the truth (issue 12) ---------------------------------------------------------


def test_a_first_version_cannot_be_rolled_back_and_the_request_says_why(
        store_url: str) -> None:
    with Fleet(db=store_url) as fleet:
        add_release(fleet.store, RELEASE)
        spec = RolloutSpec(rollout_id="ro-first", release_id=RELEASE, model="kws", version=4,
                           previous_version=None, selector=Selector(),
                           waves=parse_waves("100%"), wave_timeout_s=600, chunk_size=4096)
        fleet.store.create_rollout("ro-first", RELEASE, spec.to_dict())
        with pytest.raises(RolloutError, match=re.escape(
                "no earlier version of kws (this rollout installed its first, v4), so there is "
                "nothing to roll back to")):
            fleet.request("ro-first", "rollback")
        record = fleet.store.get_rollout("ro-first")
        assert record is not None and not record.state.get("operator_requests")
        fleet.store.upsert_status(status("gw-1", True, 1, 1.0))
        fleet.store.upsert_birth(birth("gw-1", 1, 1.0, models=[]))
        with pytest.raises(RolloutError, match="--on-failure rollback needs a version"):
            fleet.create_rollout(RELEASE, on_failure="rollback")


def test_a_wave_in_which_every_device_failed_is_shown_failed_not_passed(store_url: str) -> None:
    with Fleet(db=store_url) as fleet:
        add_release(fleet.store, RELEASE)
        spec = RolloutSpec(rollout_id="ro-bad", release_id=RELEASE, model="kws", version=4,
                           previous_version=3, selector=Selector(),
                           waves=parse_waves("1,100%"), wave_timeout_s=600, chunk_size=4096,
                           failure_threshold=1.0)
        state = RolloutState(state="completed", current_wave=2, devices={
            "gw-1": DeviceProgress("gw-1", "rpi4", 1, status="failed", code="disk_full"),
            "gw-2": DeviceProgress("gw-2", "rpi4", 2, status="timed_out"),
            "gw-3": DeviceProgress("gw-3", "rpi4", 2, status="installed")})
        fleet.store.create_rollout("ro-bad", RELEASE, spec.to_dict(), state=state.to_dict())
        waves = fleet.rollout("ro-bad").waves
        assert [(w.number, w.state) for w in waves] == [(1, "failed"), (2, "passed")]
        only_failures = replace(state, devices={**state.devices, "gw-3": replace(
            state.devices["gw-3"], status="failed")})
        fleet.store.create_rollout("ro-worse", RELEASE, {**spec.to_dict(),
                                                         "rollout_id": "ro-worse"},
                                   state=only_failures.to_dict())
        assert [w.state for w in fleet.rollout("ro-worse").waves] == ["failed", "failed"]


def test_a_first_version_rolled_back_with_remove_model_removes_it_from_its_devices(
        store_url: str) -> None:
    """Asked explicitly, the rollback of a model's first version removes the model: the
    request is queued, the engine rolls the rollout back and sends each device that installed
    it an ``ota_rollback`` with ``remove``; a device that had the model before is not
    concerned, and ``--remove-model`` on a rollout with a version to go back to is refused."""
    spec = RolloutSpec(rollout_id="ro-first", release_id=RELEASE, model="kws", version=1,
                       previous_version=None, selector=Selector(), waves=parse_waves("100%"),
                       wave_timeout_s=600, chunk_size=4096)
    state = RolloutState(state="completed", current_wave=1, devices={
        "gw-1": DeviceProgress("gw-1", "rpi4", 1, status="installed"),
        "gw-2": DeviceProgress("gw-2", "rpi4", 1, status="failed", code="disk_full")})
    with Fleet(db=store_url) as fleet:
        add_release(fleet.store, RELEASE)
        fleet.store.create_rollout("ro-first", RELEASE, spec.to_dict(), state=state.to_dict())
        fleet.request("ro-first", "rollback", note="OPS-7", remove_model=True)
        record = fleet.store.get_rollout("ro-first")
        assert record is not None
        queued = RolloutState.from_dict(record.state)
        assert [(r.action, r.remove_model) for r in queued.operator_requests] == [
            ("rollback", True)]
        with pytest.raises(RolloutError, match="--remove-model is for a rollout of a model's "
                                               "first version"):
            with_previous = {**spec.to_dict(), "rollout_id": "ro-second", "previous_version": 1}
            fleet.store.create_rollout("ro-second", RELEASE, with_previous,
                                       state=state.to_dict())
            fleet.request("ro-second", "rollback", remove_model=True)
    views = [DeviceView("gw-1", "rpi4"), DeviceView("gw-2", "rpi4")]
    decisions = decide(spec, queued, views, [], 100.0, outcomes=[])
    after = apply(queued, decisions, 100.0)
    assert (after.state, after.remove_model, after.operator_requests) == ("rolled_back", True, ())
    assert "kws is removed from every device that installed v1" in after.reason
    sends = [d for d in decisions if d.kind == SEND_ROLLBACK]
    assert [(d.device_id, dict(d.detail["args"])) for d in sends] == [
        ("gw-1", {"model": "kws", "remove": True})]
    # the flag survives the store: a device back online later is sent the removal too
    assert RolloutState.from_dict(after.to_dict()).remove_model


def test_a_settled_rollout_is_not_read_again_until_it_changes(
        store_url: str, monkeypatch: pytest.MonkeyPatch, models_dir: Path,
        broker: Mosquitto) -> None:
    """A controller's tick reads a finished rollout's state (which grows with the fleet) once;
    then only its revision, until something changes it: an operator's rollback request is
    still seen and handled on the next tick."""
    from fleetlite.fleet.controller import Controller

    bundle = build_release([models_dir / "intent_classifier.tflite"], name="kws", version=4,
                           device_classes=["rpi4"], issued=ISSUED, keys=[RELEASE_KEY])
    spec = RolloutSpec(rollout_id="ro-done", release_id=bundle.release_id, model="kws",
                       version=4, previous_version=3, selector=Selector(),
                       waves=parse_waves("100%"), wave_timeout_s=600, chunk_size=4096)
    done = RolloutState(state="completed", current_wave=1, devices={
        "gw-1": DeviceProgress("gw-1", "rpi4", 1, status="installed")})
    store = open_store(store_url)
    store.add_release(bundle.release_id, "kws", 4, bundle.envelope.to_json(), dict(bundle.files),
                      bundle.manifest.to_dict())
    store.create_rollout("ro-done", bundle.release_id, spec.to_dict(), state=done.to_dict())
    reads: list[str] = []
    get_rollout = store.get_rollout
    monkeypatch.setattr(store, "get_rollout", lambda rollout_id, devices=True: reads.append(
        rollout_id if devices else f"{rollout_id} (light)") or get_rollout(rollout_id,
                                                                           devices=devices))
    # ticked here, not by its loop: only its release publisher is started
    controller = Controller(store, broker.host, broker.port, tick_s=0.2)
    controller.publisher.start()
    try:
        for n in range(5):
            controller.tick(1000.0 + n)
        assert reads == ["ro-done (light)", "ro-done"]  # new to this controller: once
        with Fleet(db=store_url) as fleet:
            fleet.request("ro-done", "rollback", note="after all")
        controller.tick(1010.0)
        record = get_rollout("ro-done")
        assert record is not None and record.state["state"] == "rolled_back"
        # seen again: the request answered from the rollout-level state, then one full read
        assert reads[2:] == ["ro-done (light)", "ro-done"]
    finally:
        controller.publisher.close()
        store.close()


def one_online_device_and_a_release(store_url: str, models_dir: Path) -> tuple[Store, str]:
    """A store with kws v4 (a real signed release) and one online rpi4 device running v3."""
    store = open_store(store_url)
    bundle = build_release([models_dir / "intent_classifier.tflite"], name="kws", version=4,
                           device_classes=["rpi4"], issued=ISSUED, keys=[RELEASE_KEY])
    store.add_release(bundle.release_id, "kws", 4, bundle.envelope.to_json(), dict(bundle.files),
                      bundle.manifest.to_dict())
    store.upsert_birth(birth("gw-1", 1, 100.0))
    store.upsert_status(status("gw-1", True, 1, 100.0))
    return store, bundle.release_id


def create_rollout(store: Store, rollout_id: str, release_id: str) -> None:
    spec = RolloutSpec(rollout_id=rollout_id, release_id=release_id, model="kws", version=4,
                       previous_version=3, selector=Selector(), waves=parse_waves("100%"),
                       wave_timeout_s=600, chunk_size=4096)
    store.create_rollout(rollout_id, release_id, spec.to_dict())


def test_a_request_is_answered_without_waiting_for_the_next_tick(
        store_url: str, models_dir: Path, broker: Mosquitto) -> None:
    """Between its ticks a controller looks for rollouts someone else changed: with its next
    tick an hour away, a new rollout is still driven and an operator's pause answered."""
    from fleetlite.fleet.controller import Controller

    store, release_id = one_online_device_and_a_release(store_url, models_dir)
    controller = Controller(open_store(store_url), broker.host, broker.port,
                            tick_s=3600).start()
    try:
        assert controller.connected.wait(30)
        create_rollout(store, "ro-wake", release_id)
        wait_until(lambda: any(d.kind == "send_install" for d in store.decisions("ro-wake")),
                   60, "the new rollout's first step")
        with Fleet(db=store_url) as fleet:
            result = fleet.request("ro-wake", "pause", note="hold", wait=60)
        assert result.decision is not None and result.decision.kind == "pause"
        assert result.rollout.state == "paused"
    finally:
        controller.stop()
        controller.store.close()
        store.close()


def test_a_request_is_answered_while_the_controller_is_in_a_long_step(
        store_url: str, models_dir: Path, broker: Mosquitto) -> None:
    """The answers come from a thread of their own: a step that takes long (a 10,000-device
    wave under load) does not hold an operator's pause back."""
    from fleetlite.fleet.controller import Controller

    store, release_id = one_online_device_and_a_release(store_url, models_dir)
    controller = Controller(open_store(store_url), broker.host, broker.port, tick_s=0.2)
    in_step, release = threading.Event(), threading.Event()
    drive = controller.drive

    def slow_drive(*args: object, **kwargs: object) -> int:
        in_step.set()
        release.wait(120)
        return drive(*args, **kwargs)  # type: ignore[arg-type]

    controller.drive = slow_drive  # type: ignore[method-assign]
    controller.start()
    try:
        assert controller.connected.wait(30)
        create_rollout(store, "ro-busy", release_id)
        assert in_step.wait(60)  # the loop is in a step, and stays there
        with Fleet(db=store_url) as fleet:
            result = fleet.request("ro-busy", "pause", wait=60)
        assert result.decision is not None and result.decision.kind == "pause"
        assert result.rollout.state == "paused" and not release.is_set()
        release.set()
        # the step decided on the rollout before the pause: its batch is refused, nothing
        # is sent, and the next step starts nothing (paused)
        wait_until(lambda: controller.counters["stale_batches"] >= 1, 60, "the stale step")
        assert not any(d.kind == "send_install" for d in store.decisions("ro-busy"))
    finally:
        release.set()
        controller.stop()
        controller.store.close()
        store.close()
