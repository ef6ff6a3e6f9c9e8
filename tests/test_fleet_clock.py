"""Time from the fleet's clock (issue 15): a device's last seen is when the controller received
its last report, never a time the device wrote, and a device clock far from the controller's is
flagged (fleet/device_clock.py, docs/operator-guide.md "Last seen and device clocks").

- the pure rules: which reports count as hearing a device, the skew limit and its wording;
- the store on SQLite and PostgreSQL: receive times, clock offsets, reports not heard live,
  freshness queries with an explicit ``now``, and migration 6 on a store written before it;
- end to end through a real Mosquitto and a running controller: a device whose reports carry
  times two years ahead is not fresh once the controller's time passes its real last report, a
  retained snapshot and the Last Will do not count as hearing it, and `fleetlite devices show`
  and `devices list` report the skew.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from fleetlite.fleet.controller import Controller
from fleetlite.fleet.device_clock import (
    CLOCK_SKEW_LIMIT_S,
    describe_offset,
    heard_from_device,
    is_skewed,
    offset_marker,
)
from fleetlite.fleet.store import Store, open_store
from fleetlite.sdk import topics
from fleetlite.sdk.messages import Status
from tests.mqtt_harness import Collector, Mosquitto
from tests.test_fleet_cli import cli
from tests.test_fleet_e2e import wait_until
from tests.test_store import birth, status, telemetry

DAY = 86400.0
AHEAD = 731 * DAY  # two years (one of them a leap year)


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    with open_store(store_url) as opened:
        yield opened


# -- the rules ---------------------------------------------------------------------------------


def test_only_a_report_the_device_just_sent_counts_as_hearing_it() -> None:
    online = status("gw-1", True, 1, 10.0)
    will = status("gw-1", False, 1, 10.0)  # reason "lost": what the broker publishes
    goodbye = status("gw-1", False, 1, 20.0, reason="shutdown")
    assert heard_from_device(online, retained=False)
    assert heard_from_device(goodbye, retained=False)
    assert heard_from_device(telemetry("gw-1", 1, 1, 10.0), retained=False)
    assert not heard_from_device(will, retained=False)
    assert not heard_from_device(online, retained=True)
    assert not heard_from_device(birth("gw-1", 1, 10.0), retained=True)


def test_the_skew_limit_and_its_wording() -> None:
    assert not is_skewed(None)
    assert not is_skewed(CLOCK_SKEW_LIMIT_S) and not is_skewed(-CLOCK_SKEW_LIMIT_S)
    assert is_skewed(CLOCK_SKEW_LIMIT_S + 0.5) and is_skewed(-CLOCK_SKEW_LIMIT_S - 0.5)
    assert describe_offset(0.4) == "0.4 s ahead of the controller's (within 60 s)"
    assert describe_offset(-3.0) == "3.0 s behind the controller's (within 60 s)"
    ahead = describe_offset(AHEAD + 5.0)
    assert ahead.startswith("731 days ahead of the controller's: more than 60 s off "
                            "(device timestamps are kept as sent; last seen uses the "
                            "controller's clock)")
    assert "NTP" in ahead and "spooled" not in ahead
    behind = describe_offset(-600.0)  # a delay can look like this: the line says so
    assert behind.startswith("10 minutes behind") and "spooled while it was offline" in behind
    assert describe_offset(None).startswith("- (no report")
    assert offset_marker(AHEAD) == "clock +731d" and offset_marker(-7200.0) == "clock -2h"
    assert offset_marker(30.0) == "" and offset_marker(None) == ""


# -- the store ---------------------------------------------------------------------------------


def test_last_seen_is_the_receive_time_and_the_offset_that_of_the_last_report(
        store: Store) -> None:
    sent = 1_000_000.0 + AHEAD  # what the device's clock says
    assert store.upsert_status(status("gw-1", True, 1, sent), received_at=1_000_000.0)
    assert store.upsert_birth(birth("gw-1", 1, sent + 0.5), received_at=1_000_000.0)
    assert store.record_telemetry(telemetry("gw-1", 1, 1, sent + 61.0), received_at=1_000_060.0)
    device = store.get_device("gw-1")
    assert device is not None
    assert device.last_seen == 1_000_060.0
    assert device.clock_offset == pytest.approx(AHEAD + 1.0)
    assert device.telemetry is not None and device.telemetry.ts == sent + 61.0  # kept as sent
    # the device's clock is corrected: the next report says so
    assert store.record_telemetry(telemetry("gw-1", 1, 2, 1_000_119.5), received_at=1_000_120.0)
    device = store.get_device("gw-1")
    assert device is not None and device.last_seen == 1_000_120.0
    assert device.clock_offset == pytest.approx(-0.5)


def test_a_report_not_heard_live_changes_neither_last_seen_nor_the_offset(
        store: Store) -> None:
    # a retained snapshot on a fresh store: the device is known, but not seen
    assert store.upsert_birth(birth("gw-1", 1, 500.0))
    assert store.upsert_status(status("gw-1", True, 1, 500.0), received_at=None)
    device = store.get_device("gw-1")
    assert device is not None and device.device_class == "rpi4" and device.online
    assert device.last_seen == 0.0 and device.clock_offset is None
    assert store.record_telemetry(telemetry("gw-1", 1, 1, 1003.0), received_at=1000.0)
    # the Last Will (the ts of the connect, published by the broker) applies, seen stays
    assert store.upsert_status(status("gw-1", False, 1, 500.0))
    device = store.get_device("gw-1")
    assert device is not None and not device.online
    assert device.last_seen == 1000.0 and device.clock_offset == pytest.approx(3.0)


def test_a_report_received_earlier_does_not_move_last_seen_back(store: Store) -> None:
    # two controllers of a shared subscription store one device's reports in either order
    assert store.upsert_birth(birth("gw-1", 1, 1990.0), received_at=2000.0)
    assert store.record_telemetry(telemetry("gw-1", 1, 1, 1989.0), received_at=1990.0)
    device = store.get_device("gw-1")
    assert device is not None and device.last_seen == 2000.0
    assert device.clock_offset == pytest.approx(-10.0)  # from the report that set last seen


def test_a_device_ahead_is_not_fresh_once_the_controllers_time_passes_its_last_report(
        store: Store) -> None:
    received = 1_700_000_000.0
    store.upsert_status(status("gw-ahead", True, 1, received + AHEAD), received_at=received)
    store.record_telemetry(telemetry("gw-ahead", 1, 1, received + AHEAD), received_at=received)
    store.record_telemetry(telemetry("gw-ok", 1, 1, received + 290.2), received_at=received + 290.0)

    def fresh(now: float) -> list[str]:
        return [d.device_id for d in store.list_devices(seen_since=now - 300.0)]

    assert fresh(received + 60.0) == ["gw-ahead", "gw-ok"]
    assert fresh(received + 301.0) == ["gw-ok"]  # two years "ahead" buys nothing
    assert fresh(received + AHEAD) == []
    assert [d.device_id for d in store.list_devices(online=True, seen_since=received)] == [
        "gw-ahead"]


def test_migration_6_forgets_device_written_times_in_the_future(store_url: str) -> None:
    now = time.time()
    with open_store(store_url, migrate=False) as store:
        assert store.migrate(target=5) == [1, 2, 3, 4, 5]
        with store._transaction(write=True) as db:  # as a fleetlite of schema 5 wrote them
            for device_id, last_seen in (("gw-ahead", now + AHEAD), ("gw-ok", now - 120.0)):
                db.execute("INSERT INTO devices (device_id, device_class, birth_session, "
                           "birth_ts, last_seen) VALUES (?, ?, ?, ?, ?)",
                           (device_id, "rpi4", 1, last_seen, last_seen))
        assert store.migrate(target=6) == [6]
        store.migrate()
        devices = {d.device_id: d for d in store.list_devices()}
    assert devices["gw-ahead"].last_seen == 0.0  # a time its clock made up: never seen since
    assert devices["gw-ok"].last_seen == pytest.approx(now - 120.0)
    assert devices["gw-ahead"].clock_offset is None and devices["gw-ok"].clock_offset is None


# -- end to end ------------------------------------------------------------------------------


def publish_retained(broker: Mosquitto, topic: str, payload: bytes) -> None:
    """Publish a retained message and disconnect, as a device that then went away."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="test-retained")
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        client.publish(topic, payload, qos=1, retain=True).wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()


def test_a_device_two_years_ahead_through_a_running_controller(
        broker: Mosquitto, store_url: str) -> None:
    # a device gone long ago left its birth retained: the controller learns of it on subscribing
    publish_retained(broker, topics.device_topic("gw-gone", topics.BIRTH),
                     birth("gw-gone", 1, time.time() - 90 * DAY).to_json())
    devices = Collector(broker.host, broker.port, [f"{topics.DEVICE_PREFIX}/+/{topics.COMMAND}"],
                        client_id="test-devices").start()
    controller_store = open_store(store_url)
    controller = Controller(controller_store, broker.host, broker.port, tick_s=0.2).start()
    store = open_store(store_url)
    try:
        wait_until(lambda: store.get_device("gw-gone"), 30, "the retained birth of gw-gone")
        gone = store.get_device("gw-gone")
        assert gone is not None and gone.last_seen == 0.0 and gone.clock_offset is None

        def send(kind: str, message: Any) -> None:
            devices.publish(topics.device_topic("gw-ahead", kind), message.to_json())

        before = time.time()
        ahead = before + AHEAD
        send(topics.STATUS, Status(device_id="gw-ahead", online=True, session=1, ts=ahead,
                                   reason="connected", conn=1))
        send(topics.BIRTH, birth("gw-ahead", 1, ahead + 0.1))
        send(topics.TELEMETRY, telemetry("gw-ahead", 1, 1, ahead + 0.2))

        def has_telemetry() -> bool:
            device = store.get_device("gw-ahead")
            return device is not None and device.telemetry is not None
        wait_until(has_telemetry, 30, "gw-ahead's telemetry in the store")
        after = time.time()
        device = store.get_device("gw-ahead")
        assert device is not None and device.online and device.telemetry is not None
        assert before <= device.last_seen <= after  # the controller's clock
        assert device.telemetry.ts == ahead + 0.2  # the device's, kept as sent
        assert device.clock_offset is not None
        assert AHEAD - 1.0 <= device.clock_offset <= AHEAD + 1.0

        # fresh now; not once the controller's time is past its last report (no sleeping)
        def fresh(now: float) -> set[str]:
            return {d.device_id for d in store.list_devices(seen_since=now - 300.0)}
        assert "gw-ahead" in fresh(after)
        assert "gw-ahead" not in fresh(device.last_seen + 301.0)
        assert "gw-gone" not in fresh(after)

        # its Last Will (the connect's ts, published by the broker) does not count as hearing it
        send(topics.STATUS, Status(device_id="gw-ahead", online=False, session=1, ts=ahead,
                                   reason="lost", conn=1))
        wait_until(lambda: not store.get_device("gw-ahead").online,  # type: ignore[union-attr]
                   30, "gw-ahead's Last Will in the store")
        after_will = store.get_device("gw-ahead")
        assert after_will is not None and after_will.last_seen == device.last_seen
        assert after_will.clock_offset == device.clock_offset

        env = {"FLEETLITE_DB": store_url}
        table = cli("devices", "show", "gw-ahead", env=env).stdout
        assert ("clock     731 days ahead of the controller's: more than 60 s off (device "
                "timestamps are kept as sent; last seen uses the controller's clock)") in table
        assert "last seen" in table and "(the controller's clock)" in table
        shown = json.loads(cli("devices", "show", "gw-ahead", "-o", "json", env=env).stdout)
        assert shown["clock_skewed"] is True
        assert AHEAD - 1.0 <= shown["clock_offset_s"] <= AHEAD + 1.0
        assert shown["last_seen"] == device.last_seen
        listed = cli("devices", "list", env=env).stdout
        row = next(line for line in listed.splitlines() if line.startswith("gw-ahead"))
        assert "clock +731d" in row
        gone_row = next(line for line in listed.splitlines() if line.startswith("gw-gone"))
        assert "clock" not in gone_row
    finally:
        controller.stop()
        devices.stop()
        store.close()
        controller_store.close()
