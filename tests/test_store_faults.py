"""The controller when its store fails (issue 15): a store that cannot be written (a SQLite file
made immutable, a PostgreSQL server restarted) loses no report, counted by telemetry sequence
numbers, says so once in the log and in ``/healthz``, and recovers by itself; a SQLite file
deleted under ``fleetlite serve`` stops it with the reason, and the CLI then does not silently
create an empty store in its place.

The faults are real: ``chattr +i`` on the database files (skipped where the file system has no
immutable flag), ``tools/postgres.sh --stop`` and a restart of the test cluster. Outages last
``FLEETLITE_FAULT_OUTAGE_S`` seconds (default 4; the issue's 30-second run sets 30).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from fleetlite.fleet.controller import Controller
from fleetlite.fleet.errors import FleetError, StoreGoneError
from fleetlite.fleet.health_endpoint import HealthEndpoint, parse_listen_address
from fleetlite.fleet.ingest_backlog import BacklogItem, IngestBacklog
from fleetlite.fleet.ingest_limits import IngestLimits
from fleetlite.fleet.store import Store, open_store
from fleetlite.fleet.store_health import StoreHealth
from fleetlite.sdk import topics
from fleetlite.sdk.messages import Telemetry
from tests.conftest import PG_SKIP, PG_URL, REPO
from tests.mqtt_harness import Mosquitto, free_port, wait_for_port
from tests.test_fleet_e2e import wait_until
from tests.test_store import birth, status, telemetry

OUTAGE_S = float(os.environ.get("FLEETLITE_FAULT_OUTAGE_S", "4"))
FLEETLITE = str(Path(shutil.which("fleetlite") or REPO / ".venv" / "bin" / "fleetlite"))
DEVICES = ("gw-a", "gw-b", "gw-c")


# -- the parts, alone --------------------------------------------------------------------------


def item(n: int, size: int = 10) -> BacklogItem:
    return BacklogItem(f"gw-{n}", topics.TELEMETRY, b"x" * size, float(n))


def test_the_backlog_keeps_order_and_its_bounds_and_counts_what_does_not_fit() -> None:
    backlog = IngestBacklog(max_messages=3, max_bytes=25)
    assert backlog.append(item(1)) and backlog.append(item(2))
    assert not backlog.append(item(3, size=6))  # 26 bytes > 25
    assert backlog.append(item(4, size=5))
    assert not backlog.append(item(5, size=1))  # 3 messages already
    assert (len(backlog), backlog.bytes, backlog.dropped, backlog.kept) == (3, 25, 2, 3)
    first = backlog.first()
    assert first is not None and first.device_id == "gw-1"
    with pytest.raises(ValueError, match="oldest"):
        backlog.done(item(2))
    backlog.done(first)
    assert [backlog.first() and backlog.first().device_id] == ["gw-2"]  # type: ignore[union-attr]
    assert backlog.bytes == 15 and backlog.append(item(6))


def test_store_health_says_once_when_the_store_fails_and_once_when_it_is_back() -> None:
    health = StoreHealth("sqlite:///fleet.db")
    assert health.recovered(1.0, 0) is None  # nothing to say while it works
    line = health.failed("SQLite store fleet.db: disk I/O error; make the file ...", 100.0)
    assert line is not None and "disk I/O error" in line and "keeps the reports" in line
    assert health.failed("another error", 101.0) is None and health.error == "another error"
    assert not health.ok and health.down_since == 100.0
    back = health.recovered(130.0, 1)
    assert back == ("the store sqlite:///fleet.db takes writes again after 30 s; storing the 1 "
                    "report kept meanwhile")
    assert health.ok and health.recovered(131.0, 0) is None and health.outages == 1


@pytest.mark.parametrize("text, expected", [
    ("9108", ("127.0.0.1", 9108)), ("0.0.0.0:80", ("0.0.0.0", 80)),
    ("[::1]:9108", ("::1", 9108)), (":9108", ("127.0.0.1", 9108)),
])
def test_health_addresses(text: str, expected: tuple[str, int]) -> None:
    assert parse_listen_address(text) == expected


@pytest.mark.parametrize("text", ["", "http", "host:", "host:99999", "1.2.3.4:-1"])
def test_a_health_address_that_does_not_read_is_refused_with_the_forms_accepted(
        text: str) -> None:
    with pytest.raises(FleetError, match="give PORT or HOST:PORT"):
        parse_listen_address(text)


def test_a_sqlite_store_replaced_or_deleted_under_it_is_noticed(tmp_path: Path) -> None:
    db = tmp_path / "fleet.db"
    with open_store(db) as store:
        store.check_file()
        moved = tmp_path / "old.db"
        db.rename(moved)
        with pytest.raises(StoreGoneError, match=f"{db} was deleted while in use"):
            store.check_file()
        shutil.copy(moved, db)  # a restored backup: another file at the same path
        with pytest.raises(StoreGoneError, match="replaced by another file"):
            store.check_file()


# -- outages through a real broker, store and controller ------------------------------------


class StoredTelemetry:
    """The (device, seq) of every telemetry report the controller's store call returned for."""

    def __init__(self, store: Store) -> None:
        self.seen: dict[str, set[int]] = {}
        self.lock = threading.Lock()
        record = store.record_telemetry

        def recording(report: Telemetry, **kwargs: Any) -> bool:
            kept = record(report, **kwargs)
            with self.lock:
                self.seen.setdefault(report.device_id, set()).add(report.seq)
            return kept

        store.record_telemetry = recording  # type: ignore[method-assign]

    def of(self, device: str) -> set[int]:
        with self.lock:
            return set(self.seen.get(device, ()))


class Devices:
    """Three devices reporting telemetry (QoS 1, as the agent does) every 0.25 s over one
    connection; ``sent[device]`` is the last sequence number the broker acknowledged."""

    def __init__(self, broker: Mosquitto) -> None:
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="fault-devices")
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        self.sent = dict.fromkeys(DEVICES, 0)
        self._stop = threading.Event()
        now = time.time()
        for device in DEVICES:
            for kind, message in ((topics.STATUS, status(device, True, 1, now)),
                                  (topics.BIRTH, birth(device, 1, now))):
                self.client.publish(topics.device_topic(device, kind), message.to_json(), qos=1,
                                    retain=True).wait_for_publish(10)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        seq = 0
        while not self._stop.wait(0.25):  # within the default telemetry rate (5/s)
            seq += 1
            for device in DEVICES:
                report = telemetry(device, 1, seq, time.time())
                info = self.client.publish(topics.device_topic(device, topics.TELEMETRY),
                                           report.to_json(), qos=1)
                info.wait_for_publish(10)
                self.sent[device] = seq

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(20)
        self.client.disconnect()
        self.client.loop_stop()


def healthz(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=10) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def outage(broker: Mosquitto, url: str, caplog: pytest.LogCaptureFixture,
           fault: Callable[[], None], repair: Callable[[], None], error: str) -> None:
    """Devices report all along; the store fails for OUTAGE_S seconds in the middle. Asserts
    that ``/healthz`` tells, that the log says it once each way, and that every report sent
    was stored once the store was back."""
    caplog.set_level(logging.INFO, logger="fleetlite.fleet.controller")
    controller_store = open_store(url)
    stored = StoredTelemetry(controller_store)
    controller = Controller(controller_store, broker.host, broker.port, tick_s=0.2,
                            resend_after_s=60.0, limits=IngestLimits()).start()
    health = HealthEndpoint("127.0.0.1", 0, controller.health).start()
    devices = Devices(broker)
    repaired = False
    try:
        assert controller.connected.wait(20)
        wait_until(lambda: all(len(stored.of(d)) >= 5 for d in DEVICES), 30,
                   "telemetry stored before the fault")
        wait_until(lambda: healthz(health.url)[0] == 200, 30, "healthy before the fault")
        fault()
        wait_until(lambda: controller.backlog.kept > 0, 30, "reports kept for the store")
        code, body = healthz(health.url)
        assert code == 503 and not body["ok"] and not body["store"]["ok"], body
        assert error in body["store"]["error"] and body["ingest"]["backlog"] > 0, body
        assert body["broker"]["ok"] and body["releases"]["ok"], body
        time.sleep(OUTAGE_S)  # the fault's length, not a wait for an event
        repair()
        repaired = True
        wait_until(lambda: healthz(health.url)[0] == 200, 60, "healthy after the fault")
        wait_until(lambda: len(controller.backlog) == 0, 60, "backlog stored")
        devices.stop()

        def missing(device: str) -> set[int]:
            return set(range(1, devices.sent[device] + 1)) - stored.of(device)

        wait_until(lambda: not any(missing(d) for d in DEVICES), 60, "every report stored")
        assert all(devices.sent[d] > 10 for d in DEVICES), devices.sent
        assert controller.counters["lost_store_down"] == 0
        assert controller.counters["kept_for_store"] >= 3  # at least one per device
    finally:
        if not repaired:
            repair()
        devices.stop()
        health.close()
        controller.stop()
        controller_store.close()
    with open_store(url) as store:
        for device in DEVICES:
            record = store.get_device(device)
            assert record is not None and record.telemetry is not None
            assert record.telemetry.seq == devices.sent[device]  # the newest, as sent last
    failed = [r for r in caplog.records if "cannot be written" in r.getMessage()]
    back = [r for r in caplog.records if "takes writes again" in r.getMessage()]
    assert len(failed) == 1 and len(back) == 1, [r.getMessage() for r in caplog.records]
    assert not [r for r in caplog.records if r.exc_info], "no traceback for a store outage"


def chattr(flag: str, *paths: Path) -> None:
    subprocess.run(["chattr", flag, *map(str, paths)], check=True, capture_output=True)


def test_a_sqlite_store_made_read_only_loses_no_report(broker: Mosquitto, tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    db = tmp_path / "fleet.db"
    open_store(db).close()
    files = (db, db.with_name("fleet.db-wal"))  # not -shm: it is mapped, and SIGBUS follows
    files[1].touch()
    try:
        chattr("+i", *files)
        chattr("-i", *files)
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"cannot make files immutable here (chattr: {exc}); the fault needs it")
    outage(broker, f"sqlite:///{db}", caplog, lambda: chattr("+i", *files),
           lambda: chattr("-i", *files), f"SQLite store {db}: ")


@pytest.fixture
def own_cluster() -> Iterator[Path]:
    """A PostgreSQL cluster of this test's own (tools/postgres.sh in its own directory): the
    test stops and restarts it, which the suite's shared cluster must not see, as other tests
    may be using it at the same time. Not under pytest's temporary directory: as root, the
    server runs as ``postgres``, which may not enter that one."""
    if not PG_URL:
        pytest.skip(PG_SKIP)
    directory = Path(tempfile.mkdtemp(prefix="fleetlite-pg-restart-"))
    os.chmod(directory, 0o755)
    cluster = directory / "cluster"
    try:
        yield cluster
    finally:
        postgres(cluster, "--stop")
        shutil.rmtree(directory, ignore_errors=True)


def postgres(cluster: Path, *args: str) -> str:
    done = subprocess.run(["bash", str(REPO / "tools" / "postgres.sh"), *args], check=True,
                          capture_output=True, text=True, timeout=180,
                          env={**os.environ, "FLEETLITE_PG_DIR": str(cluster)})
    return done.stdout.strip()


def test_a_postgresql_restart_loses_no_report(broker: Mosquitto, own_cluster: Path,
                                              caplog: pytest.LogCaptureFixture) -> None:
    url = postgres(own_cluster)

    def start_again() -> None:
        assert postgres(own_cluster) == url, "the restarted server must answer at the same URL"

    outage(broker, url, caplog, lambda: postgres(own_cluster, "--stop"), start_again,
           "PostgreSQL store")


def test_serve_stops_on_a_deleted_store_and_the_cli_creates_none_in_its_place(
        broker: Mosquitto, tmp_path: Path) -> None:
    db = tmp_path / "fleet.db"
    port = free_port()
    env = {**os.environ, "FLEETLITE_DB": str(db),
           "FLEETLITE_BROKER": f"{broker.host}:{broker.port}"}
    serve = subprocess.Popen([FLEETLITE, "serve", "--health", str(port), "--tick", "0.2"],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_port(port, 60)
        url = f"http://127.0.0.1:{port}/healthz"
        wait_until(lambda: healthz(url)[0] == 200, 60, "the controller healthy")
        for path in tmp_path.glob("fleet.db*"):
            path.unlink()
        _, stderr = serve.communicate(timeout=60)
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.communicate()
    assert serve.returncode == 1, stderr
    assert f"error: the SQLite store {db} was deleted while in use" in stderr, stderr
    assert "Traceback" not in stderr, stderr
    assert not db.exists()
    listing = subprocess.run([FLEETLITE, "rollout", "list"], check=False, env=env,
                             capture_output=True, text=True, timeout=60)
    assert listing.returncode == 1 and f"no fleet store at {db}" in listing.stderr, listing
    assert not db.exists(), "a read-only command created a store"
