"""The controller's re-send of an unanswered install, through a real Mosquitto and store: a
device that said nothing for ``resend_after_s`` is sent the install once more, once the other
devices of the release have been quiet that long too (a busy fleet's silent device is behind in
a queue, not missing its command: issue 13's 10,000-device rollout re-sent thousands); after the
controller itself was stalled (SIGSTOP, a suspended VM, a hung store call) the re-send waits
``resend_after_s`` so the reports the broker queued meanwhile are ingested first (issue 15: a
frozen controller re-sent an install to a device whose failure it had not read yet)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from fleetlite.fleet.controller import Controller
from fleetlite.fleet.ingest_backlog import BacklogItem
from fleetlite.fleet.release_builder import build_release
from fleetlite.fleet.rollout import (
    SENT,
    RolloutSpec,
    RolloutState,
    Selector,
    ShadowSpec,
    parse_waves,
)
from fleetlite.fleet.store import Store, open_store
from fleetlite.sdk import topics
from fleetlite.sdk.messages import Status
from tests.mqtt_harness import Collector, Mosquitto
from tests.test_ota_install import ISSUED, RELEASE_KEY
from tests.test_store import birth, ota

DEVICE = "gw-1"
RESEND_S = 15.0


@pytest.fixture
def fleet(models_dir: Path, broker: Mosquitto,
          store_url: str) -> Iterator[tuple[Store, Controller, Collector]]:
    store = open_store(store_url)
    controller_store = open_store(store_url)
    commands = Collector(broker.host, broker.port, [topics.device_topic(DEVICE, topics.COMMAND)],
                         client_id="test-device").start()
    # a tick far away: the test drives the rollout itself, on its own clock
    controller = Controller(controller_store, broker.host, broker.port, tick_s=3600, wake_s=0,
                            resend_after_s=RESEND_S).start()
    try:
        assert controller.connected.wait(20)
        now = time.time()
        store.upsert_birth(birth(DEVICE, 1, now, device_class="cls-a"))
        store.upsert_status(Status(device_id=DEVICE, online=True, session=1, ts=now,
                                   reason="connected"))
        bundle = build_release([models_dir / "intent_classifier.tflite"], name="kws", version=4,
                               device_classes=["cls-a"], issued=ISSUED, keys=[RELEASE_KEY])
        store.add_release(bundle.release_id, "kws", 4, bundle.envelope.to_json(),
                          dict(bundle.files), bundle.manifest.to_dict())
        spec = RolloutSpec(rollout_id="ro-1", release_id=bundle.release_id, model="kws",
                           version=4, previous_version=None, selector=Selector(),
                           waves=parse_waves("100%"), wave_timeout_s=600, chunk_size=4096)
        store.create_rollout("ro-1", bundle.release_id, spec.to_dict())
        yield store, controller, commands
    finally:
        controller.stop()
        commands.stop()
        controller_store.close()
        store.close()


def installs(commands: Collector, count: int) -> None:
    """Wait for ``count`` install commands in all (QoS 1 from one publisher: in order)."""
    commands.wait_for(f"{DEVICE}/{topics.COMMAND}", count=count, timeout=30)


def device_status(store: Store) -> str:
    record = store.get_rollout("ro-1")
    assert record is not None and record.state
    return RolloutState.from_dict(record.state).devices[DEVICE].status


def test_an_unanswered_install_is_sent_once_more(
        fleet: tuple[Store, Controller, Collector]) -> None:
    store, controller, commands = fleet
    t0 = time.time()
    controller.drive("ro-1", t0)
    installs(commands, 1)
    assert device_status(store) == SENT
    controller.drive("ro-1", t0 + RESEND_S - 1)
    controller.drive("ro-1", t0 + RESEND_S + 1)
    installs(commands, 2)
    controller.drive("ro-1", t0 + 3 * RESEND_S)  # once per controller process
    assert controller.counters["commands_resent"] == 1
    assert controller.counters["commands_sent"] == 2


def test_after_a_stall_the_resend_waits_for_the_queued_reports(
        fleet: tuple[Store, Controller, Collector]) -> None:
    _, controller, commands = fleet
    t0 = time.time()
    controller.drive("ro-1", t0)
    installs(commands, 1)
    # the controller was stopped for 100 s: the device's silence is the controller's own
    controller.note_gap(100.0, t0 + 100)
    controller.drive("ro-1", t0 + 101)
    controller.drive("ro-1", t0 + 100 + RESEND_S - 1)
    assert controller.counters["commands_resent"] == 0
    # still nothing from the device once the queued reports had their time: sent again
    controller.drive("ro-1", t0 + 100 + RESEND_S + 1)
    installs(commands, 2)
    assert controller.counters["commands_resent"] == 1


def test_an_ordinary_tick_gap_holds_nothing(
        fleet: tuple[Store, Controller, Collector]) -> None:
    _, controller, commands = fleet
    t0 = time.time()
    controller.drive("ro-1", t0)
    installs(commands, 1)
    controller.note_gap(2.0, t0 + 1)
    controller.drive("ro-1", t0 + RESEND_S + 1)
    installs(commands, 2)


def test_no_resend_while_the_other_devices_are_still_answering(
        fleet: tuple[Store, Controller, Collector]) -> None:
    store, controller, commands = fleet
    t0 = time.time()
    store.upsert_birth(birth("gw-2", 1, t0, device_class="cls-a"))
    store.upsert_status(Status(device_id="gw-2", online=True, session=1, ts=t0,
                               reason="connected"))
    controller.drive("ro-1", t0)
    installs(commands, 1)
    record = store.get_rollout("ro-1")
    assert record is not None
    release_id = str(record.spec["release_id"])
    # gw-2 is downloading, and says so every few seconds; gw-1 has said nothing
    for seconds in (3.0, 9.0, 14.0):
        store.add_ota_status(ota("gw-2", release_id, t0 + seconds, "downloading"),
                             received_at=t0 + seconds)
    controller.drive("ro-1", t0 + RESEND_S + 1)
    controller.drive("ro-1", t0 + 14 + RESEND_S - 1)
    assert controller.counters["commands_resent"] == 0
    # the release has been quiet for resend_after_s: both are sent it again (gw-2 has been
    # quiet as long, and is still ``sent``)
    controller.drive("ro-1", t0 + 14 + RESEND_S + 1)
    installs(commands, 2)
    assert controller.counters["commands_resent"] == 2


def test_no_resend_while_the_controller_holds_reports_it_has_not_stored(
        fleet: tuple[Store, Controller, Collector]) -> None:
    """The store was down: the device's answer may be among the reports kept meanwhile."""
    _, controller, commands = fleet
    t0 = time.time()
    controller.drive("ro-1", t0)
    installs(commands, 1)
    kept = BacklogItem("gw-other", topics.TELEMETRY, b"", None)
    assert controller.backlog.append(kept)
    controller.drive("ro-1", t0 + RESEND_S + 1)
    assert controller.counters["commands_resent"] == 0
    controller.backlog.done(kept)  # stored: from now on, resend_after_s for the rest to come
    controller.drive("ro-1", t0 + 2 * RESEND_S)
    assert controller.counters["commands_resent"] == 0
    controller.drive("ro-1", t0 + 2 * RESEND_S + 2)
    installs(commands, 2)
    assert controller.counters["commands_resent"] == 1



@pytest.mark.parametrize("kind", ["shadow", "probe"])
def test_an_unanswered_shadow_install_or_probe_is_sent_once_more_with_its_args(
        fleet: tuple[Store, Controller, Collector], kind: str) -> None:
    """A shadow install or a probe (variants) lost on its way is re-sent too: before, the
    device was only left out of the verdict, or of the choice, once the wave timeout passed."""
    store, controller, commands = fleet
    record = store.get_rollout("ro-1")
    assert record is not None
    spec = RolloutSpec.from_dict(record.spec)
    spec = (replace(spec, rollout_id="ro-2", shadow=ShadowSpec(min_samples=10, kind="classifier"))
            if kind == "shadow" else
            replace(spec, rollout_id="ro-2", variants="auto", variant_names=("float32", "int8")))
    store.create_rollout("ro-2", spec.release_id, spec.to_dict())
    t0 = time.time()
    controller.drive("ro-2", t0)
    installs(commands, 1)
    state = store.get_rollout("ro-2")
    assert state is not None
    entries = RolloutState.from_dict(state.state)
    sent = entries.shadows if kind == "shadow" else entries.probes
    assert sent[DEVICE].status == SENT
    controller.drive("ro-2", t0 + RESEND_S + 1)
    installs(commands, 2)
    controller.drive("ro-2", t0 + 3 * RESEND_S)  # once per controller process
    assert controller.counters["commands_resent"] == 1
    first, again = (json.loads(m.payload)["args"] for m in commands.messages
                    if m.topic.endswith(f"{DEVICE}/{topics.COMMAND}"))
    assert first == again and again[kind] is True
    if kind == "shadow":
        assert again["shadow_kind"] == "classifier"
