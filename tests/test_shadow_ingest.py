"""Shadow reports on the fleet side: the store keeps them per release (newest per device for the
gate), and the controller ingests ``fleetlite/v1/dev/{id}/shadow`` through a real Mosquitto,
refusing a report that speaks for another device, an oversize one and a malformed one."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from fleetlite.fleet.controller import Controller
from fleetlite.fleet.store import Store, open_store
from fleetlite.sdk import topics
from fleetlite.sdk.shadow import MAX_SHADOW_REPORT_BYTES, ShadowReport
from tests.mqtt_harness import Collector, Mosquitto
from tests.test_fleet_e2e import wait_until
from tests.test_shadow_gate import report as gate_report
from tests.test_store import add_release, birth

RELEASE = "ab" * 32
OTHER = "cd" * 32


def report(device: str = "gw-1", **fields: Any) -> ShadowReport:
    """test_shadow_gate's report (release ``RELEASE``), with one sample in 150 disagreeing."""
    return gate_report(device, **{"agreed": 149, **fields})


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    s = open_store(store_url)
    s.migrate()
    try:
        yield s
    finally:
        s.close()


def test_the_store_keeps_shadow_reports_newest_per_device(store: Store) -> None:
    stored = store.add_shadow_reports([
        (report("gw-1", ts=100.0, samples=10, compared=10, agreed=10), 1000.0),
        (report("gw-2", ts=100.0), 1001.0),
        (report("gw-1", ts=130.0, samples=40, compared=40, agreed=39), 1030.0),
        (report("gw-1", release_id=OTHER), 1031.0),
    ])
    assert stored == 4
    newest = store.shadow_reports(RELEASE)
    assert [(r.device_id, r.samples, received) for r, received in newest] == [
        ("gw-1", 40, 1030.0), ("gw-2", 150, 1001.0)]
    assert newest[0][0] == report("gw-1", ts=130.0, samples=40, compared=40, agreed=39)
    assert len(store.shadow_reports(RELEASE, newest_per_device=False)) == 3
    assert [r.release_id for r, _ in store.shadow_reports(OTHER)] == [OTHER]
    assert store.shadow_reports("ef" * 32) == []


def test_a_device_keeps_a_bounded_number_of_reports(store: Store) -> None:
    for i in range(30):
        store.add_shadow_report(report(ts=100.0 + i, samples=i, compared=i, agreed=i),
                                received_at=1000.0 + i, keep_per_device=10)
    kept = store.shadow_reports(RELEASE, newest_per_device=False)
    assert 10 <= len(kept) <= 11
    assert kept[-1][0].samples == 29


def test_the_controller_ingests_shadow_reports_bound_to_their_sender(
        broker: Mosquitto, store_url: str) -> None:
    controller_store = open_store(store_url)
    controller = Controller(controller_store, broker.host, broker.port, tick_s=0.2).start()
    devices = Collector(broker.host, broker.port, [f"{topics.DEVICE_PREFIX}/+/{topics.COMMAND}"],
                        client_id="test-devices").start()
    try:
        def send(topic_device: str, payload: bytes) -> None:
            devices.publish(topics.device_topic(topic_device, topics.SHADOW), payload)

        send("gw-1", report("gw-1").to_json())
        # gw-1 forges a report for gw-2 (an agreement of 0%: it would stop gw-2's class)
        send("gw-1", report("gw-2", agreed=0).to_json())
        send("gw-1", report("gw-1", release_id=OTHER).to_json()[:-1])  # malformed
        send("gw-3", b"{" + b" " * MAX_SHADOW_REPORT_BYTES + b"}")  # oversize
        wait_until(lambda: {(r.device_id, r.reason) for r in controller_store.refusals()} >= {
            ("gw-1", "device_mismatch"), ("gw-1", "malformed"), ("gw-3", "oversize")}
            and len(controller_store.shadow_reports(RELEASE)) == 1, timeout=30,
            what="the report stored and the forgery, the oversize one refused")
        stored = controller_store.shadow_reports(RELEASE)
        assert [(r.device_id, r.agreed) for r, _ in stored] == [("gw-1", 149)]
        kinds = {(r.device_id, r.kind) for r in controller_store.refusals()}
        assert ("gw-1", topics.SHADOW) in kinds
        assert controller.ingested_by_kind[topics.SHADOW] == 1
    finally:
        devices.stop()
        controller.stop()
        controller_store.close()


def test_rollout_create_shadow_and_status_show_the_options_and_the_verdict_table(
        store: Store, store_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    from fleetlite.fleet.cli import main

    add_release(store)
    store.upsert_birth(birth("gw-1", 1, 100.0), received_at=100.0)
    assert main(["rollout", "create", "r" * 64, "--id", "shadowed", "--shadow",
                 "--shadow-min-samples", "50", "--shadow-kind", "regressor",
                 "--shadow-error-bound", "0.5", "--db", store_url, "-o", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["spec"]["shadow"] == {
        "min_agreement": 0.98, "min_samples": 50, "p95_budget_ratio": 1.25,
        "sample_rate": 0.2, "cpu_budget": 0.25, "kind": "regressor", "error_bound": 0.5,
        "timeout_s": 3600.0}
    assert doc["shadow"] == []
    assert main(["rollout", "status", "shadowed", "--db", store_url]) == 0
    text = capsys.readouterr().out
    assert "shadow    min agreement 98.0% over >= 50 samples" in text
    # an error bound without --shadow is a usage mistake, said so
    assert main(["rollout", "create", "r" * 64, "--shadow-kind", "regressor",
                 "--db", store_url]) != 0
    assert "--shadow-kind goes with --shadow" in capsys.readouterr().err
