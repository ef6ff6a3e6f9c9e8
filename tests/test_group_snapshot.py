"""Controllers of a group (MQTT shared subscriptions) take the retained status and birth
snapshot when they connect, and then store each live status once for the whole group: the
plain subscription the snapshot needs is dropped at once, so it does not hand every status to
every member as well (docs/scaling.md, "Scale-out"). Real Mosquitto, real stores."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from fleetlite.fleet.controller import Controller
from fleetlite.fleet.store import Store, open_store
from fleetlite.sdk import topics
from fleetlite.sdk.messages import Status
from tests.mqtt_harness import Collector, Mosquitto
from tests.test_fleet_e2e import wait_until
from tests.test_store import birth

SNAPSHOT_DEVICES = 5
LIVE = 200


def status(device_id: str, session: int) -> Status:
    return Status(device_id=device_id, online=True, session=session, ts=1000.0 + session,
                  reason="connected")


@pytest.fixture
def publisher(broker: Mosquitto) -> Iterator[Collector]:
    client = Collector(broker.host, broker.port, ["fleetlite/v1/test/nothing"],
                       client_id="test-devices").start()
    try:
        yield client
    finally:
        client.stop()


def test_a_group_takes_the_snapshot_and_stores_each_live_status_once(
        store_url: str, broker: Mosquitto, publisher: Collector) -> None:
    for n in range(SNAPSHOT_DEVICES):  # published before any controller runs: retained only
        device = f"gw-r{n}"
        publisher.publish(topics.device_topic(device, topics.BIRTH),
                          birth(device, 1, 1000.0).to_json(), retain=True)
        publisher.publish(topics.device_topic(device, topics.STATUS),
                          status(device, 1).to_json(), retain=True)
    stores: list[Store] = [open_store(store_url) for _ in range(3)]
    stored: list[list[tuple[str, int]]] = [[], []]  # (device, session) each member stored

    def recording(n: int) -> Callable[..., bool]:
        upsert = stores[n].upsert_status

        def upsert_status(report: Status, *args: Any, **kwargs: Any) -> bool:
            stored[n].append((report.device_id, report.session))
            return upsert(report, *args, **kwargs)
        return upsert_status

    for n in (0, 1):
        stores[n].upsert_status = recording(n)  # type: ignore[method-assign]
    members = [Controller(stores[n], broker.host, broker.port, group="ctl",
                          controller_id=f"ctl-{n}", tick_s=0.2) for n in (0, 1)]

    def live() -> list[tuple[str, int]]:  # the statuses published after the snapshot
        return [entry for entry in stored[0] + stored[1] if entry[1] >= 2 or
                entry[0] == "gw-sentinel"]

    try:
        for member in members:
            member.start()
            assert member.connected.wait(30)
        store = stores[2]
        # each member takes the snapshot for itself (brokers that follow MQTT 5 send a shared
        # subscription no retained message)
        wait_until(lambda: all({d for d, _ in stored[n]} >= {f"gw-r{k}" for k in range(
            SNAPSHOT_DEVICES)} for n in (0, 1)), 60, "both members' snapshots")

        # live statuses, the last one a sentinel: a member that stored it has stored every
        # status the broker handed it before (one publisher, delivered in order)
        for k in range(LIVE):
            device = f"gw-r{k % SNAPSHOT_DEVICES}"
            publisher.publish(topics.device_topic(device, topics.STATUS),
                              status(device, 2 + k).to_json(), retain=True)
        publisher.publish(topics.device_topic("gw-sentinel", topics.STATUS),
                          status("gw-sentinel", 1).to_json(), retain=True)
        wait_until(lambda: store.get_device("gw-sentinel") is not None, 60, "the sentinel")
        assert len(live()) <= LIVE + 1, f"{len(live())} statuses stored for {LIVE + 1} published"
        wait_until(lambda: len(live()) == LIVE + 1, 60, "every live status stored once")
        assert len(set(live())) == LIVE + 1  # each once, shared between the members
        assert all(any(s >= 2 for _, s in stored[n]) for n in (0, 1))
        latest = store.get_device("gw-r0")
        assert latest is not None and latest.session == 2 + LIVE - SNAPSHOT_DEVICES
    finally:
        for member in members:
            member.stop()
        for s in stores:
            s.close()
