"""Scale-out (issue 13, deliverable 5): several controllers share one broker and one PostgreSQL.

Real parts only: a Mosquitto 2.0 broker, a PostgreSQL database (skipped without
``FLEETLITE_TEST_PG_URL``), the fleet simulator as a subprocess and two ``fleetlite serve
--group scale --id ctl-N`` processes (persistent MQTT sessions, explicit ids, short leases).

- Shared ingest: every telemetry report and profile the simulator says it sent (its PUBACK
  came) is stored, the two controllers' counters add up to exactly what was sent (a report
  ingested twice would make them exceed it), and each controller ingested a share.
- A controller killed with SIGKILL in the middle of a rollout to every device, restarted with
  the same id (as systemd's ``Restart=`` would): the rollout completes, every device's final
  status and every OTA status the devices sent is stored. What makes that so on Mosquitto:
  a shared subscription hands messages out round-robin over its members *whether or not they
  are connected*; the share of a member whose persistent session is offline is queued in that
  session (up to ``max_queued_messages``) and delivered when the same client id reconnects.
  The test sees it: statuses the devices published while the controller was down are stored
  with a receive time after its restart. (A member that never comes back keeps its share
  until its session expires: docs/scaling.md, "What a killed controller loses".)
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable, Optional

import pytest

from fleetlite.fleet.rollout import RolloutSpec, RolloutState, parse_waves
from fleetlite.fleet.store import Store, open_store
from fleetlite.sdk import topics
from tests.conftest import PG_SKIP, PG_URL, fresh_pg_database
from tests.mqtt_harness import Collector, Mosquitto
from tests.test_ota_install import write_root
from tests.test_sim import store_intent_v2

GROUP = "scale"
PI4 = "raspberry-pi-4"

pytestmark = pytest.mark.skipif(not PG_URL, reason=PG_SKIP)


def wait_until(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll until ``predicate`` holds (returns its value); TimeoutError naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.1)


class Serve:
    """One controller process of the group (``python -m fleetlite.fleet.controller``, what
    ``fleetlite serve`` runs, which prints its counters as JSON when it stops): started,
    killed, restarted, stopped."""

    def __init__(self, controller_id: str, db: str, broker: Mosquitto, log: Path) -> None:
        self.id, self.db, self.broker, self.log = controller_id, db, broker, log
        self.proc: Optional[subprocess.Popen[bytes]] = None
        self.starts = 0

    def start(self) -> Serve:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "fleetlite.fleet.controller", "--db", self.db, "--broker",
                 f"{self.broker.host}:{self.broker.port}", "--group", GROUP, "--id", self.id,
                 "--tick", "0.2", "--lease-ttl", "3"],
                stdout=out, stderr=out)
        self.starts += 1
        return self

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_connected(self, timeout: float = 60) -> None:
        """Until this start's subscriptions are acknowledged (the log line of each start)."""
        marker = f"controller {self.id} connected to"
        assert self.proc is not None
        proc = self.proc
        wait_until(lambda: self.text().count(marker) >= self.starts or proc.poll() is not None,
                   timeout, f"{self.id}'s connection")
        assert proc.poll() is None, self.text()[-3000:]

    def kill(self) -> None:
        """SIGKILL: no flush, no acknowledgement, no lease given back, no DISCONNECT."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> dict[str, Any]:
        """SIGTERM, then the counters the controller prints when it stops."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        lines = [json.loads(line) for line in self.text().splitlines()
                 if line.startswith('{"controller"')]
        assert lines, self.text()[-3000:]
        last: dict[str, Any] = lines[-1]
        return last


def start_sim(broker: Mosquitto, log: Path, devices: int, *extra: str) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "fleetlite.tools.sim", "--broker",
             f"{broker.host}:{broker.port}", "--devices", str(devices), "--classes", "rpi4=1",
             "--seed", "5", "--stats-s", "2", "--connect-rate", "200", *extra],
            stdout=out, stderr=subprocess.STDOUT)


def sim_summary(sim: subprocess.Popen[bytes], log: Path, timeout: float = 60) -> dict[str, Any]:
    """Wait for the simulator to end (SIGTERM if it still runs); its summary line."""
    if sim.poll() is None and timeout <= 0:
        sim.send_signal(signal.SIGTERM)
    try:
        sim.wait(max(timeout, 60))
    except subprocess.TimeoutExpired:
        sim.send_signal(signal.SIGTERM)
        sim.wait(60)
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    summaries = [line for line in lines if line.get("event") == "summary"]
    assert summaries, log.read_text()[-3000:]
    summary: dict[str, Any] = summaries[-1]
    return summary


@pytest.fixture
def pg_url() -> Iterator[str]:
    yield from fresh_pg_database()


def scalar(url: str, sql: str, params: tuple[Any, ...] = ()) -> Any:
    import psycopg

    with psycopg.connect(url, autocommit=True) as db:
        row = db.execute(sql, params).fetchone()
    return row[0] if row else None


def stored_telemetry(url: str) -> int:
    """Reports stored, as the devices count them: a device's latest ``seq`` is how many
    telemetry reports it sent in its (only) session, and the store keeps the latest."""
    return int(scalar(url, "SELECT COALESCE(SUM(GREATEST(telemetry_seq, 0)), 0) FROM devices"))


def test_two_controllers_share_the_ingest_and_store_every_report_once(
        tmp_path: Path, broker: Mosquitto, pg_url: str) -> None:
    devices = 300
    controllers = [Serve(f"ctl-{n}", pg_url, broker, tmp_path / f"ctl-{n}.log").start()
                   for n in (1, 2)]
    try:
        for controller in controllers:
            controller.wait_connected()
        log = tmp_path / "sim.log"
        summary = sim_summary(start_sim(broker, log, devices, "--report-s", "1",
                                        "--duration-s", "12"), log)
        counts = summary["counts"]
        assert summary["peak_online"] == devices, summary
        sent = {topics.TELEMETRY: counts["telemetry"], topics.PROFILE: counts["profiles"]}
        assert sent[topics.TELEMETRY] > devices * 3, summary  # several reports per device
        # every report sent is stored: profiles are rows, telemetry the latest seq per device
        def stored() -> dict[str, int]:
            return {topics.TELEMETRY: stored_telemetry(pg_url),
                    topics.PROFILE: int(scalar(pg_url, "SELECT COUNT(*) FROM profiles"))}

        try:
            wait_until(lambda: stored() == sent, 60, "every report the simulator sent stored")
        except TimeoutError as exc:
            raise AssertionError(f"{exc}: sent {sent}, stored {stored()}") from None
        assert scalar(pg_url, "SELECT COUNT(DISTINCT device_id) FROM profiles") == devices
    finally:
        results = [controller.stop() for controller in controllers]
    for kind, count in sent.items():
        shares = [r["ingested"].get(kind, 0) for r in results]
        # each report ingested exactly once over the group: two deliveries would exceed it
        assert sum(shares) == count, (kind, shares, count)
        if kind == topics.TELEMETRY:  # Mosquitto hands the group's messages out in turn
            assert min(shares) >= count * 0.3, (kind, shares)
    for r in results:
        counters = r["counters"]
        assert counters["refused"] == counters["malformed"] == counters["lost_store_down"] == 0, r


def test_a_controller_killed_mid_rollout_loses_nothing(
        tmp_path: Path, broker: Mosquitto, pg_url: str, models_dir: Path) -> None:
    devices = 300
    store: Store = open_store(pg_url)
    store.migrate()
    controllers = {n: Serve(f"ctl-{n}", pg_url, broker, tmp_path / f"ctl-{n}.log").start()
                   for n in (1, 2)}
    collector = Collector(broker.host, broker.port, [topics.fleet_subscription(topics.OTA_STATUS)],
                          client_id="ota-observer").start()
    log = tmp_path / "sim.log"
    sim: Optional[subprocess.Popen[bytes]] = None
    summary: dict[str, Any] = {}
    try:
        for controller in controllers.values():
            controller.wait_connected()
        root = write_root(tmp_path / "root.json")
        sim = start_sim(broker, log, devices, "--root", str(root), "--report-s", "5",
                        "--step-s", "0.4")
        wait_until(lambda: scalar(pg_url, "SELECT COUNT(DISTINCT device_id) FROM profiles")
                   == devices, 60, "a version-1 profile from every device")

        bundle = store_intent_v2(store, models_dir, [PI4])
        spec = RolloutSpec(rollout_id="r-scale", release_id=bundle.release_id, model="intent",
                           version=2, previous_version=1, waves=parse_waves("100%"),
                           success_threshold=0.9, failure_threshold=0.1, wave_timeout_s=300,
                           chunk_size=4096)
        store.create_rollout("r-scale", bundle.release_id, spec.to_dict())

        # mid-rollout: the install commands went out and some devices are answering
        lease = wait_until(lambda: store.get_lease("rollout:r-scale"), 60, "a rollout lease")
        wait_until(lambda: scalar(pg_url, "SELECT COUNT(*) FROM ota_status") >= 100, 60,
                   "the devices answering the install")
        victim = next(c for c in controllers.values() if c.id == lease.owner)
        survivor = next(c for c in controllers.values() if c.id != lease.owner)
        killed_at = time.time()
        victim.kill()
        finals_at_kill = sum(1 for m in list(collector.messages)
                             if json.loads(m.payload).get("final"))
        assert finals_at_kill < devices, "the rollout ended before the kill: slow the devices"

        # the survivor takes the rollout over once the lease expires; meanwhile the devices
        # go on reporting, and the dead member's share queues in its session
        def taken_over() -> bool:
            lease = store.get_lease("rollout:r-scale")
            return lease is not None and lease.owner == survivor.id

        wait_until(taken_over, 30, "the survivor taking the lease over")
        wait_until(lambda: sum(1 for m in collector.messages if m.at > killed_at + 0.5)
                   >= 20, 30, "statuses published while the controller is down")
        restarted_at = time.time()
        victim.start()  # as systemd's Restart= would, with the same id
        victim.wait_connected()

        def settled() -> bool:
            record = store.get_rollout("r-scale")
            assert record is not None
            state = RolloutState.from_stored(record.state)
            return state.finished and not any(d.status in ("sent", "rollback_sent")
                                              for d in state.devices.values())

        wait_until(settled, 120, "the rollout to finish")
        record = store.get_rollout("r-scale")
        assert record is not None
        state = RolloutState.from_dict(record.state)
        assert state.state == "completed", state.reason
        assert {d.status for d in state.devices.values()} == {"installed"}
        assert len(state.devices) == devices
    finally:
        if sim is not None:
            summary = sim_summary(sim, log, timeout=0)
        results = {c.id: c.stop() for c in controllers.values()}
        collector.stop()
    # nothing lost: every OTA status a device sent (and the broker acknowledged) is a row,
    # and every device's final status of the release is stored
    sent = summary["counts"]["ota_statuses"]
    assert summary["outcomes"].get("installed") == devices, summary
    wait_until(lambda: scalar(pg_url, "SELECT COUNT(*) FROM ota_status") >= sent, 10,
               "every OTA status stored")
    assert scalar(pg_url, "SELECT COUNT(*) FROM ota_status") == sent
    assert scalar(pg_url, "SELECT COUNT(DISTINCT device_id) FROM ota_status WHERE release_id = "
                  "%s AND is_final = 1 AND outcome = 'installed'", (bundle.release_id,)) == devices
    # the killed member's share of what the devices published while it was down waited in its
    # persistent session and was stored only after it came back with the same id
    queued = scalar(pg_url, "SELECT COUNT(*) FROM ota_status WHERE ts > %s AND ts < %s AND "
                    "received >= %s", (killed_at + 0.5, restarted_at, restarted_at))
    assert queued > 0, "no status published during the outage was delivered after the restart"
    assert results[victim.id]["ingested"].get(topics.OTA_STATUS, 0) >= queued, results
    store.close()
