"""The fleet store against real databases: every test runs on SQLite (a file in tmp_path) and on
PostgreSQL (a fresh database on the server named by FLEETLITE_TEST_PG_URL; start one with
``export FLEETLITE_TEST_PG_URL="$(bash tools/postgres.sh)"``)."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fleetlite.fleet.errors import (
    RecordNotFoundError,
    SchemaVersionError,
    StoreConstraintError,
    StoreError,
    StoreUnavailableError,
)
from fleetlite.fleet.migrations import MIGRATIONS, latest_version
from fleetlite.fleet.store import (
    DecisionEntry,
    DeviceModel,
    ProgressUpdate,
    Store,
    open_store,
)
from fleetlite.sdk.messages import Birth, OtaStatus, Status, Telemetry
from fleetlite.sdk.profile import (
    MemoryStats,
    ModelInfo,
    ProfileRecord,
    RunParameters,
    Timings,
    summarize_latencies,
)

REPO = Path(__file__).resolve().parent.parent
SHA_A = "a" * 64
SHA_B = "b" * 64


# -- fixtures ----------------------------------------------------------------------------------


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    with open_store(store_url) as opened:
        yield opened


# -- builders ----------------------------------------------------------------------------------


def status(device: str, online: bool, session: int, ts: float, reason: str = "") -> Status:
    return Status(device_id=device, online=online, session=session, ts=ts,
                  reason=reason or ("connected" if online else "lost"))


def birth(device: str, session: int, ts: float, **changes: Any) -> Birth:
    fields: dict[str, Any] = {
        "device_class": "rpi4", "agent_version": "0.3.0",
        "tags": {"site": "berlin", "line": "1"},
        "facts": {"arch": "aarch64", "cores": 4, "temperature_c": None},
        "models": [{"name": "kws", "version": 3, "sha256": SHA_A, "path": "/x/kws.tflite"}],
    }
    fields.update(changes)
    return Birth(device_id=device, session=session, ts=ts, **fields)


def telemetry(device: str, session: int, seq: int, ts: float) -> Telemetry:
    return Telemetry(device_id=device, session=session, seq=seq, ts=ts,
                     system={"cpu_percent": 12.5, "rss_mb": 80.1},
                     models={"kws": {"version": 3, "count": seq * 10}}, spool={"pending": 0})


def profile(device: str = "gw-1", ts: float = 1_700_000_000.5, sha256: str = SHA_A,
            version: int = 3, p95: float = 0.01, device_facts: Any = None) -> ProfileRecord:
    return ProfileRecord(
        device_id=device, ts=ts, trigger="install",
        model=ModelInfo(name="kws", version=version, sha256=sha256, size_bytes=3024,
                        quantization="int8",
                        inputs=[{"name": "x", "shape": [1, 16], "dtype": "int8"}],
                        outputs=[{"name": "y", "shape": [1, 4], "dtype": "int8"}]),
        run=RunParameters(threads=2, backend="tflite-runtime", backend_version="2.14.0",
                          delegate="xnnpack", resolver="auto", timing="invoke",
                          inputs="synthetic", warmup_runs=1, warmup_min_seconds=0.5,
                          min_runs=50, max_runs=1000, min_seconds=1.0, max_seconds=150.0,
                          isolated=True),
        timings=Timings(init_ms=1.5, first_inference_ms=0.05, warmup_count=10,
                        warmup_mean_ms=0.004,
                        steady=summarize_latencies([0.002, 0.003, 0.0025, p95]),
                        steady_seconds=1.0),
        memory=MemoryStats(rss_before_load_mb=40.0, peak_rss_load_mb=44.0,
                           rss_after_load_mb=43.5, peak_rss_inference_mb=45.25,
                           method="sampling", load_sample_interval_ms=1.0,
                           inference_sample_interval_ms=10.0),
        device=device_facts if device_facts is not None else {"device_class": "rpi4"},
    )


def ota(device: str, release: str, ts: float, phase: str, **changes: Any) -> OtaStatus:
    return OtaStatus(device_id=device, ts=ts, release_id=release, model="kws", version=4,
                     phase=phase, **changes)


RELEASE = "r" * 64


def add_release(store: Store, release_id: str = RELEASE, name: str = "kws",
                version: int = 4) -> None:
    store.add_release(release_id, name, version, b"envelope", {"kws.tflite": b"\x00model"},
                      {"name": name, "version": version})


# -- schema ------------------------------------------------------------------------------------


def test_migrations_are_applied_once_and_rerunning_is_a_no_op(store_url: str) -> None:
    with open_store(store_url, migrate=False) as store:
        assert store.schema_version() == 0
        assert store.migrate() == [m.version for m in MIGRATIONS]
        assert store.migrate() == []
        assert store.schema_version() == latest_version()
    with open_store(store_url) as store:  # migrate=True on an up-to-date store: nothing to do
        assert store.migrate() == []
        with store._transaction(write=False) as db:
            rows = db.execute("SELECT version, name FROM schema_migrations ORDER BY version").rows
        assert [(int(v), n) for v, n in rows] == [(m.version, m.name) for m in MIGRATIONS]


def test_an_older_schema_is_upgraded_with_its_data_kept(store_url: str) -> None:
    with open_store(store_url, migrate=False) as store:
        assert store.migrate(target=1) == [1]
        with store._transaction(write=True) as db:  # as a fleetlite of schema 1 wrote it
            db.execute("INSERT INTO devices (device_id, device_class, birth_session, birth_ts, "
                       "last_seen) VALUES (?, ?, ?, ?, ?)", ("gw-1", "rpi4", 1, 100.0, 100.0))
        for needs_a_newer_schema in (store.list_releases,  # a table of migration 2
                                     lambda: store.upsert_status(status("gw-1", True, 1, 101.0)),
                                     lambda: store.upsert_birth(birth("gw-1", 1, 102.0))):
            with pytest.raises(SchemaVersionError, match="migrate"):
                needs_a_newer_schema()
        assert store.migrate() == [m.version for m in MIGRATIONS[1:]]
        assert store.upsert_status(status("gw-1", True, 1, 101.0))
        device = store.get_device("gw-1")
        assert device is not None and device.online and device.device_class == "rpi4"
        assert store.list_releases() == []


def test_a_schema_from_a_newer_fleetlite_is_refused(store_url: str) -> None:
    with open_store(store_url) as store, store._transaction(write=True) as db:
        db.execute("INSERT INTO schema_migrations (version, name, applied) VALUES (?, ?, ?)",
                   (999, "from the future", 0.0))
    with pytest.raises(SchemaVersionError, match="upgrade fleetlite"):
        open_store(store_url)


CHILD = r"""
import json, sys, time
from fleetlite.fleet.store import DecisionEntry, open_store
url, start, action = sys.argv[1], float(sys.argv[2]), sys.argv[3]
if action == "create":
    time.sleep(max(0.0, start - time.time()))
store = open_store(url, migrate=False)
time.sleep(max(0.0, start - time.time()))
if action in ("migrate", "create"):
    result = store.migrate()
else:
    batch = [DecisionEntry("send_install", "wave 1", device_id=f"gw-{i}", wave=1)
             for i in range(5)]
    result = store.apply_decisions("ro-1", 0, batch, new_state={"wave": 1})
store.close()
print(json.dumps(result))
"""


def run_controllers(url: str, action: str, count: int = 2) -> list[Any]:
    """Start ``count`` controller processes that do ``action`` at the same instant.

    ``create`` opens the store at that instant and migrates it; ``migrate`` opens it first.
    """
    start = time.time() + 2.0
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, url, str(start), action],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              cwd=REPO)
             for _ in range(count)]
    # Every child is waited for before any is judged, so a failure leaves no process behind.
    outputs = [proc.communicate(timeout=120) for proc in procs]
    for proc, (_, err) in zip(procs, outputs):
        assert proc.returncode == 0, err
    return [json.loads(out) for out, _ in outputs]


@pytest.mark.parametrize("round_", range(4))
def test_controllers_creating_a_new_sqlite_store_at_once_all_succeed(
        tmp_path: Path, round_: int) -> None:
    # SQLite refuses the switch to WAL at once, without the busy timeout, while another
    # connection is creating the same file: several controllers started together on a new
    # store used to fail with "database is locked".
    results = run_controllers(f"sqlite:///{tmp_path}/fleet.db", "create", count=5)
    assert sorted(results, key=len) == [[]] * 4 + [[m.version for m in MIGRATIONS]]


def test_two_controllers_migrating_at_once_both_succeed(store_url: str) -> None:
    results = run_controllers(store_url, "migrate")
    # One applied everything, the other found nothing left to do.
    assert sorted(results, key=len) == [[], [m.version for m in MIGRATIONS]]
    with open_store(store_url, migrate=False) as store:
        assert store.schema_version() == latest_version()
        assert store.migrate() == []


def test_sqlite_store_uses_wal_and_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / "state" / "fleet.db"  # the directory is created
    with open_store(path) as store:
        store.upsert_birth(birth("gw-1", 1, 10.0))
        add_release(store)
    raw = sqlite3.connect(path)
    try:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        raw.close()
    with open_store(f"sqlite:///{path}") as store:
        assert store.migrate() == []
        device = store.get_device("gw-1")
        assert device is not None and device.tags == {"site": "berlin", "line": "1"}
        release = store.get_release(RELEASE)
        assert release is not None and release.files == {"kws.tflite": b"\x00model"}


def test_store_survives_reopen(store_url: str) -> None:
    with open_store(store_url) as store:
        store.upsert_status(status("gw-1", True, 2, 50.0))
        store.record_telemetry(telemetry("gw-1", 2, 7, 51.0))
        add_release(store)
        store.create_rollout("ro-1", RELEASE, {"waves": ["1%", "100%"]})
    with open_store(store_url) as store:
        device = store.get_device("gw-1")
        assert device is not None and device.online and device.telemetry is not None
        assert device.telemetry.seq == 7
        rollout = store.get_rollout("ro-1")
        assert rollout is not None and rollout.spec == {"waves": ["1%", "100%"]}


@pytest.mark.parametrize("url, error", [
    ("sqlite://fleet.db", "sqlite:///relative/path"),
    (":memory:", "in-memory"),
    ("sqlite:///:memory:", "in-memory"),
    ("mysql://u:p@h/db", "unsupported store URL scheme 'mysql'"),
])
def test_unusable_store_urls_are_refused(url: str, error: str) -> None:
    with pytest.raises(StoreError, match=error):
        open_store(url)


def test_store_url_forms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with open_store("sqlite:///rel/fleet.db") as store:
        assert store.url == "rel/fleet.db"
    assert (tmp_path / "rel" / "fleet.db").is_file()
    with open_store(str(tmp_path / "plain.db")) as store:
        assert store.dialect == "sqlite"


def test_unreachable_postgres_is_reported_without_the_password() -> None:
    pytest.importorskip("psycopg")
    with pytest.raises(StoreUnavailableError) as info:
        open_store("postgresql://fleet:s3cret@127.0.0.1:1/fleet", connect_timeout_s=2)
    assert "s3cret" not in str(info.value)
    assert "postgresql://fleet:***@127.0.0.1:1/fleet" in str(info.value)


def test_a_closed_store_says_so(store: Store) -> None:
    store.close()
    with pytest.raises(StoreError, match="closed"):
        store.list_devices()


# -- devices -----------------------------------------------------------------------------------


def test_device_round_trip(store: Store) -> None:
    assert store.get_device("gw-1") is None
    assert store.upsert_status(status("gw-1", True, 3, 100.0))
    assert store.upsert_birth(birth("gw-1", 3, 100.5))
    report = telemetry("gw-1", 3, 1, 130.0)
    assert store.record_telemetry(report, received_at=1000.0)  # the controller's clock
    device = store.get_device("gw-1")
    assert device is not None
    assert device.device_id == "gw-1"
    assert device.device_class == "rpi4"
    assert device.tags == {"line": "1", "site": "berlin"}
    assert device.online and device.status_reason == "connected"
    assert device.session == 3
    assert device.last_seen == 1000.0 and device.clock_offset == 130.0 - 1000.0
    assert device.agent_version == "0.3.0"
    assert device.models == (DeviceModel("kws", 3, SHA_A),)
    assert device.facts == {"arch": "aarch64", "cores": 4, "temperature_c": None}
    assert device.telemetry == report


def test_a_late_last_will_does_not_overwrite_a_newer_online_status(store: Store) -> None:
    assert store.upsert_status(status("gw-1", True, 5, 200.0))
    # The Will of session 4 arrives late (e.g. via another controller of a shared subscription).
    assert not store.upsert_status(status("gw-1", False, 4, 150.0))
    device = store.get_device("gw-1")
    assert device is not None and device.online and device.session == 5
    # The Will of the current session applies although it carries the (older) connect time.
    assert store.upsert_status(status("gw-1", False, 5, 199.0))
    device = store.get_device("gw-1")
    assert device is not None and not device.online and device.status_reason == "lost"
    # A redelivered online status of that session does not bring the device back ...
    assert not store.upsert_status(status("gw-1", True, 5, 200.0))
    assert not store.get_device("gw-1").online  # type: ignore[union-attr]
    # ... a reconnect in the same session (newer online status) and a new session do.
    assert store.upsert_status(status("gw-1", True, 5, 260.0))
    assert store.upsert_status(status("gw-1", False, 5, 270.0, reason="shutdown"))
    assert store.upsert_status(status("gw-1", True, 6, 300.0), received_at=310.0)
    device = store.get_device("gw-1")
    assert device is not None and device.online and device.session == 6
    assert device.last_seen == 310.0


def test_a_late_will_of_an_earlier_connection_is_stale(store: Store) -> None:
    def conn_status(online: bool, conn: int, ts: float) -> Status:
        return Status(device_id="gw-1", online=online, session=7, ts=ts, conn=conn,
                      reason="connected" if online else "lost")

    assert store.upsert_status(conn_status(True, 1, 100.0))
    assert store.upsert_status(conn_status(True, 2, 160.0))  # reconnected, same session
    # connection 1's Will arrives after connection 2's online status (another controller)
    assert not store.upsert_status(conn_status(False, 1, 100.0))
    device = store.get_device("gw-1")
    assert device is not None and device.online and device.status_reason == "connected"
    # connection 2's own Will applies, though it carries the older connect time
    assert store.upsert_status(conn_status(False, 2, 160.0))
    assert not store.get_device("gw-1").online  # type: ignore[union-attr]
    # a new connection brings it back; an old agent's status (conn 0) of that session does not
    assert store.upsert_status(conn_status(True, 3, 200.0))
    assert not store.upsert_status(conn_status(False, 0, 210.0))
    assert store.get_device("gw-1").online  # type: ignore[union-attr]


def test_stale_births_and_telemetry_are_ignored(store: Store) -> None:
    assert store.upsert_birth(birth("gw-1", 2, 20.0))
    assert not store.upsert_birth(birth("gw-1", 2, 20.0))  # duplicate
    assert not store.upsert_birth(birth("gw-1", 1, 30.0, device_class="old"))
    newer = birth("gw-1", 2, 25.0, tags={"site": "paris"},
                  models=[{"name": "kws", "version": 4, "sha256": SHA_B},
                          {"name": "vad", "version": None, "sha256": SHA_A}, "junk"])
    assert store.upsert_birth(newer)
    device = store.get_device("gw-1")
    assert device is not None
    assert device.tags == {"site": "paris"}
    assert device.models == (DeviceModel("kws", 4, SHA_B), DeviceModel("vad", None, SHA_A))

    assert store.record_telemetry(telemetry("gw-1", 2, 5, 40.0))
    assert not store.record_telemetry(telemetry("gw-1", 2, 4, 41.0))
    assert not store.record_telemetry(telemetry("gw-1", 2, 5, 40.0))
    assert not store.record_telemetry(telemetry("gw-1", 1, 99, 42.0))
    assert store.record_telemetry(telemetry("gw-1", 3, 1, 43.0))  # a new session restarts seq
    device = store.get_device("gw-1")
    assert device is not None and device.telemetry is not None
    assert (device.telemetry.session, device.telemetry.seq) == (3, 1)
    assert device.session == 3


def test_list_devices_filters(store: Store) -> None:
    store.upsert_birth(birth("gw-1", 1, 1.0))
    store.upsert_birth(birth("gw-2", 1, 1.0, device_class="jetson", tags={"site": "paris"}))
    store.upsert_birth(birth("gw-3", 1, 1.0, tags={"site": "berlin", "line": "2"},
                             models=[{"name": "kws", "version": 4, "sha256": SHA_B}]))
    store.upsert_status(status("gw-1", True, 1, 2.0))
    store.upsert_status(status("gw-3", True, 1, 2.0))
    store.upsert_status(status("gw-4", False, 1, 2.0))  # known only by its status

    def ids(**filters: Any) -> list[str]:
        return [d.device_id for d in store.list_devices(**filters)]

    assert ids() == ["gw-1", "gw-2", "gw-3", "gw-4"]
    assert ids(device_class="rpi4") == ["gw-1", "gw-3"]
    assert ids(device_class={"jetson", "rpi4"}) == ["gw-1", "gw-2", "gw-3"]
    assert ids(device_class=set()) == []
    assert ids(tags={"site": "berlin"}) == ["gw-1", "gw-3"]
    assert ids(tags={"site": "berlin", "line": "2"}) == ["gw-3"]
    assert ids(tags={"site": {"paris", "berlin"}, "line": ["1", "2"]}) == ["gw-1", "gw-3"]
    assert ids(online=True) == ["gw-1", "gw-3"]
    assert ids(online=False) == ["gw-2", "gw-4"]
    assert ids(model="kws") == ["gw-1", "gw-2", "gw-3"]
    assert ids(model="kws", model_version=4) == ["gw-3"]
    assert ids(device_ids=["gw-4", "gw-2", "nope"]) == ["gw-2", "gw-4"]
    assert ids(device_class="rpi4", online=True, tags={"line": "1"}) == ["gw-1"]
    unknown = store.get_device("gw-4")
    assert unknown is not None
    assert (unknown.device_class, unknown.tags, unknown.models, unknown.telemetry) == (
        "", {}, (), None)


def test_many_threads_share_one_store(store: Store) -> None:
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for seq in range(1, 21):
                store.record_telemetry(telemetry(f"gw-{n}", 1, seq, float(seq)))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    devices = store.list_devices()
    assert len(devices) == 8
    assert all(d.telemetry is not None and d.telemetry.seq == 20 for d in devices)


# -- profiles ----------------------------------------------------------------------------------


def test_profile_round_trip_dedupe_and_filters(store: Store) -> None:
    record = profile()
    assert store.add_profile(record)
    assert not store.add_profile(record)  # same device, ts and model sha256
    store.upsert_birth(birth("gw-2", 1, 1.0, device_class="jetson"))
    assert store.add_profile(profile(device="gw-2", ts=5.0, device_facts={}))  # class from birth
    assert store.add_profile(profile(ts=9.0, sha256=SHA_B, version=4, p95=0.02),
                             device_class="rpi4-lowmem")
    rows = store.profiles()
    assert [(r.device_id, r.ts) for r in rows] == [
        ("gw-2", 5.0), ("gw-1", 9.0), ("gw-1", 1_700_000_000.5)]
    row = store.profiles(model="kws", version=3, device_class="rpi4")[0]
    steady = record.timings.steady
    assert (row.device_id, row.model, row.version, row.sha256) == ("gw-1", "kws", 3, SHA_A)
    assert (row.p50_ms, row.p95_ms, row.p99_ms, row.mean_ms) == (
        steady.p50_ms, steady.p95_ms, steady.p99_ms, steady.mean_ms)
    assert row.peak_rss_mb == 45.25
    assert (row.trigger, row.quantization, row.threads) == ("install", "int8", 2)
    assert row.record() == record
    assert [r.device_class for r in store.profiles(device_id="gw-2")] == ["jetson"]
    assert [r.version for r in store.profiles(sha256=SHA_B)] == [4]
    assert [r.ts for r in store.profiles(since=6.0)] == [9.0, 1_700_000_000.5]
    assert store.profiles(model="other") == []


# -- releases ----------------------------------------------------------------------------------


def test_release_round_trip(store: Store) -> None:
    files = {"kws.tflite": bytes(range(256)) * 100, "kws-int8.tflite": b"\x00\xff" * 7}
    manifest = {"name": "kws", "version": 4, "files": sorted(files)}
    assert store.add_release(RELEASE, "kws", 4, b"\x00env\xff", files, manifest, created=5.0)
    assert store.add_release("s" * 64, "kws", 5, b"e2", {}, json.dumps({"version": 5}))
    assert store.add_release("t" * 64, "vad", 1, b"e3", {"v": b"1"}, b'{"name": "vad"}')
    stored = store.get_release(RELEASE)
    assert stored is not None
    assert stored.envelope == b"\x00env\xff"
    assert stored.files == files
    assert stored.info.manifest == manifest
    assert (stored.info.name, stored.info.version, stored.info.created) == ("kws", 4, 5.0)
    assert stored.info.files == {name: len(data) for name, data in files.items()}
    assert [(r.name, r.version) for r in store.list_releases()] == [
        ("kws", 4), ("kws", 5), ("vad", 1)]
    assert [r.release_id for r in store.list_releases("vad")] == ["t" * 64]
    assert store.list_releases("kws")[0].files == stored.info.files
    # Storing the same release again keeps it and takes the new envelope (more signatures).
    assert not store.add_release(RELEASE, "kws", 4, b"env+sig2", {}, manifest)
    again = store.get_release(RELEASE)
    assert again is not None and again.envelope == b"env+sig2" and again.files == files
    assert store.get_release("u" * 64) is None


# -- OTA status --------------------------------------------------------------------------------


def test_ota_status_history_is_idempotent_and_latest_wins(store: Store) -> None:
    accepted = ota("gw-1", RELEASE, 10.0, "accepted")
    downloading = ota("gw-1", RELEASE, 11.0, "downloading", progress={"chunks": 3, "of": 9})
    done = ota("gw-1", RELEASE, 12.0, "done", final=True, outcome="installed")
    assert store.add_ota_status(accepted, received_at=100.0)
    assert store.add_ota_status(done, received_at=101.0)  # out of order: final before progress
    assert store.add_ota_status(downloading, received_at=102.0)
    for message in (accepted, downloading, done):  # QoS 1 redelivery
        assert not store.add_ota_status(message, received_at=200.0)
    assert store.ota_history(device_id="gw-1") == [accepted, downloading, done]
    assert store.latest_ota_status("gw-1", RELEASE) == done
    assert store.latest_ota_status("gw-1", "other") is None
    # At equal ts the final status wins.
    rejected = ota("gw-2", RELEASE, 20.0, "done", final=True, outcome="rejected",
                   reason="bad_signature")
    store.add_ota_status(rejected)
    store.add_ota_status(ota("gw-2", RELEASE, 20.0, "verifying"))
    assert store.latest_ota_status("gw-2", RELEASE) == rejected
    assert store.latest_ota_statuses(RELEASE) == {"gw-1": done, "gw-2": rejected}
    latest = store.latest_ota_records(RELEASE)["gw-1"]
    assert (latest.status, latest.received_at) == (done, 101.0)
    assert [r.received_at for r in store.ota_records(device_id="gw-1")] == [100.0, 102.0, 101.0]


# -- rollouts ----------------------------------------------------------------------------------


def test_rollout_round_trip(store: Store) -> None:
    with pytest.raises(RecordNotFoundError, match="add_release"):
        store.create_rollout("ro-1", RELEASE, {})
    add_release(store)
    created = store.create_rollout("ro-1", RELEASE, {"waves": ["10%", "100%"]},
                                   state={"state": "running", "current_wave": 0}, now=100.0)
    assert created.revision == 0
    assert store.get_rollout("ro-1") == created
    with pytest.raises(StoreConstraintError, match="already exists"):
        store.create_rollout("ro-1", RELEASE, {})
    store.create_rollout("ro-2", RELEASE, '{"waves": ["all"]}', now=200.0)
    assert [r.rollout_id for r in store.list_rollouts()] == ["ro-1", "ro-2"]
    assert [r.rollout_id for r in store.list_rollouts(release_id=RELEASE)] == ["ro-1", "ro-2"]
    assert store.list_rollouts(release_id="other") == []
    assert store.get_rollout("nope") is None

    new_state = {"state": "running", "current_wave": 1, "paused_classes": {},
                 "operator_requests": [{"action": "pause", "note": ""}]}
    assert store.update_rollout_state("ro-1", 0, new_state, now=110.0)
    assert not store.update_rollout_state("ro-1", 0, {"state": "stale"})
    rollout = store.get_rollout("ro-1")
    assert rollout is not None
    assert (rollout.state, rollout.revision, rollout.updated) == (
        {**new_state, "devices": {}}, 1, 110.0)
    with pytest.raises(RecordNotFoundError):
        store.update_rollout_state("nope", 0, {})

    store.set_device_progress("ro-1", "gw-2", wave=1, status="sent", sent_at=111.0, now=111.0,
                              device_class="rpi4")
    store.set_device_progress("ro-1", "gw-1", wave=1, status="pending", now=111.0)
    store.set_device_progress("ro-1", "gw-2", wave=1, status="failed", reason="smoke failed",
                              code="smoke_failed", device_class="rpi4", now=120.0)
    rows = store.device_progress("ro-1")
    assert [(r.device_id, r.status, r.sent_at, r.updated) for r in rows] == [
        ("gw-1", "pending", None, 111.0), ("gw-2", "failed", 111.0, 120.0)]
    assert (rows[1].reason, rows[1].code, rows[1].device_class) == (
        "smoke failed", "smoke_failed", "rpi4")
    assert store.device_progress("ro-1", wave=2) == []

    store.add_decision("ro-1", "start_wave", None, 1, "wave 1 of 2", {"devices": 2}, 112.0)
    store.add_decision("ro-1", "pause", reason="p95 gate", device_class="rpi4")
    decisions = store.decisions("ro-1")
    assert [(d.kind, d.device_id, d.wave, d.device_class, d.revision) for d in decisions] == [
        ("start_wave", None, 1, None, 1), ("pause", None, None, "rpi4", 1)]
    assert decisions[0].detail == {"devices": 2} and decisions[0].ts == 112.0
    with pytest.raises(RecordNotFoundError):
        store.add_decision("nope", "pause")


def test_a_rollouts_devices_are_rows_and_its_document_stays_small(store: Store) -> None:
    add_release(store)
    pending = {"device_class": "rpi4", "wave": 1, "status": "pending", "reason": "assigned",
               "code": "assigned", "sent_at": None, "updated_at": 100.0}
    devices = {f"gw-{n}": {"device_id": f"gw-{n}", **pending} for n in range(3)}
    store.create_rollout("ro-1", RELEASE, {}, state={"state": "running", "devices": devices},
                         now=100.0)
    assert store.get_rollout("ro-1").state["devices"] == devices  # type: ignore[union-attr]
    assert [r.device_id for r in store.device_progress("ro-1")] == ["gw-0", "gw-1", "gw-2"]
    # the document itself holds no device: a step rewrites only what changed
    with store._transaction(write=False) as db:
        (document,), = db.execute("SELECT state_json FROM rollouts").rows
    assert "gw-" not in document and "devices" not in document

    # a state without a devices map leaves the rows alone; one with a map replaces them
    assert store.update_rollout_state("ro-1", 0, {"state": "paused"}, now=110.0)
    after = store.get_rollout("ro-1")
    assert after is not None and after.state == {"state": "paused", "devices": devices}
    sent = {**devices["gw-1"], "status": "sent", "sent_at": 120.0, "updated_at": 120.0}
    assert store.update_rollout_state("ro-1", 1, {"state": "running", "devices": {"gw-1": sent}})
    assert store.get_rollout("ro-1").state["devices"] == {"gw-1": sent}  # type: ignore[union-attr]

    # readers that do not need the devices leave them out; the lock's record never has them
    light = store.get_rollout("ro-1", devices=False)
    assert light is not None and light.state == {"state": "running"}
    assert [r.state for r in store.list_rollouts(devices=False)] == [{"state": "running"}]
    assert store.list_rollouts()[0].state["devices"] == {"gw-1": sent}
    with store.rollout_lock("ro-1") as txn:
        assert "devices" not in txn.rollout.state
        txn.set_state({"state": "paused"})
    assert store.get_rollout("ro-1").state["devices"] == {"gw-1": sent}  # type: ignore[union-attr]
    with pytest.raises(StoreError, match="devices must be an object"):
        store.update_rollout_state("ro-1", 2, {"state": "running", "devices": []})


def test_rollout_lock_commits_together_or_not_at_all(store: Store) -> None:
    add_release(store)
    store.create_rollout("ro-1", RELEASE, {})
    with pytest.raises(RuntimeError), store.rollout_lock("ro-1") as txn:
        txn.add_decision("send_install", device_id="gw-1", wave=1)
        txn.set_device_progress("gw-1", wave=1, status="sent", sent_at=1.0)
        txn.set_state({"state": "running"})
        raise RuntimeError("the controller crashed mid-batch")
    assert store.decisions("ro-1") == [] and store.device_progress("ro-1") == []
    assert store.get_rollout("ro-1").revision == 0  # type: ignore[union-attr]

    with store.rollout_lock("ro-1") as txn:
        assert txn.rollout.revision == 0
        txn.add_decision("send_install", device_id="gw-1", wave=1)
        txn.set_device_progress("gw-1", wave=1, status="sent", sent_at=1.0)
        txn.set_state({"state": "running", "current_wave": 1})
        store.add_decision("ro-1", "note")  # the store on the same thread joins the transaction
    rollout = store.get_rollout("ro-1")
    assert rollout is not None
    devices = rollout.state.pop("devices")
    assert (rollout.revision, rollout.state) == (1, {"state": "running", "current_wave": 1})
    assert (devices["gw-1"]["status"], devices["gw-1"]["sent_at"]) == ("sent", 1.0)
    assert [d.kind for d in store.decisions("ro-1")] == ["send_install", "note"]
    first, last = (d.id for d in store.decisions("ro-1"))
    assert store.last_decision_id("ro-1") == last and store.last_decision_id("other") == 0
    assert [d.kind for d in store.decisions("ro-1", after=first)] == ["note"]
    assert store.decisions("ro-1", after=last) == []
    with store.rollout_lock("ro-1"):  # nothing written: the revision stays
        pass
    assert store.get_rollout("ro-1").revision == 1  # type: ignore[union-attr]
    with pytest.raises(RecordNotFoundError):
        store.rollout_lock("nope").__enter__()
    with pytest.raises(StoreError, match="inside another"), store.rollout_lock("ro-1"), \
            store.rollout_lock("ro-1"):
        pass


def test_a_sqlite_writer_waits_for_the_write_lock_up_to_its_busy_timeout(
        tmp_path: Path) -> None:
    """The store polls for SQLite's write lock itself (every 2 ms, not SQLite's sleeps of up to
    100 ms): a write waits while another holds the lock, gets in once it is free, and gives up
    with the store's error after busy_timeout_s."""
    url = f"sqlite:///{tmp_path}/fleet.db"
    with open_store(url) as holder, open_store(url, busy_timeout_s=30.0) as patient, \
            open_store(url, busy_timeout_s=0.2) as hasty:
        add_release(holder)
        holder.create_rollout("ro-1", RELEASE, {})
        locked, free = threading.Event(), threading.Event()

        def hold() -> None:
            with holder.batch():
                holder.add_decision("ro-1", "note")
                locked.set()
                free.wait(30)

        thread = threading.Thread(target=hold, daemon=True)
        thread.start()
        assert locked.wait(30)
        with pytest.raises(StoreUnavailableError, match="locked"):
            hasty.set_device_progress("ro-1", "gw-1", wave=1, status="pending")
        waiter = threading.Thread(target=lambda: patient.set_device_progress(
            "ro-1", "gw-2", wave=1, status="pending"), daemon=True)
        waiter.start()
        waiter.join(0.3)
        assert waiter.is_alive()  # still waiting for the lock
        free.set()
        waiter.join(30)
        thread.join(30)
        assert [r.device_id for r in patient.device_progress("ro-1")] == ["gw-2"]
        assert [d.kind for d in patient.decisions("ro-1")] == ["note"]


def test_rollout_lock_makes_other_controllers_wait(store_url: str) -> None:
    with open_store(store_url) as first, open_store(store_url) as second:
        add_release(first)
        first.create_rollout("ro-1", RELEASE, {})
        order: list[str] = []
        locked = threading.Event()

        def other() -> None:
            locked.wait()
            with second.rollout_lock("ro-1") as txn:
                order.append(f"second saw revision {txn.rollout.revision}")

        thread = threading.Thread(target=other)
        thread.start()
        with first.rollout_lock("ro-1") as txn:
            locked.set()
            time.sleep(0.5)
            order.append("first writes")
            txn.add_decision("start_wave", wave=1)
        thread.join()
        assert order == ["first writes", "second saw revision 1"]


def race(controllers: list[Store], attempt: Any) -> list[Any]:
    """Run ``attempt(store)`` on every controller in its own thread, released at once."""
    barrier = threading.Barrier(len(controllers))
    results: list[Any] = []
    errors: list[BaseException] = []

    def run(store: Store) -> None:
        try:
            barrier.wait()
            results.append(attempt(store))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(store,)) for store in controllers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    return results


def test_racing_controllers_apply_a_decision_batch_exactly_once(store_url: str) -> None:
    controllers = [open_store(store_url) for _ in range(4)]
    try:
        add_release(controllers[0])
        controllers[0].create_rollout("ro-1", RELEASE, {})
        for wave in (1, 2, 3):
            # Every controller read revision wave-1 and computed the same batch.
            batch = [DecisionEntry("send_install", f"wave {wave}", device_id=f"gw-{i}",
                                   wave=wave) for i in range(4)]
            progress = [ProgressUpdate(f"gw-{i}", wave, "sent", sent_at=float(wave))
                        for i in range(4)]
            results = race(controllers, lambda store, w=wave, b=batch, p=progress:
                           store.apply_decisions("ro-1", w - 1, b, progress=p,
                                                 new_state={"current_wave": w}))
            assert sorted(results) == [False, False, False, True]
        store = controllers[0]
        rollout = store.get_rollout("ro-1")
        assert rollout is not None
        devices = rollout.state.pop("devices")
        assert (rollout.revision, rollout.state) == (3, {"current_wave": 3})
        assert {d: (p["wave"], p["sent_at"]) for d, p in devices.items()} == {
            f"gw-{i}": (3, 3.0) for i in range(4)}
        recorded = [(d.kind, d.device_id, d.wave, d.revision) for d in store.decisions("ro-1")]
        assert len(recorded) == 12
        assert Counter(recorded).most_common(1)[0][1] == 1  # no duplicates
        assert all(d.revision == (d.wave or 0) - 1 for d in store.decisions("ro-1"))
        assert [p.sent_at for p in store.device_progress("ro-1")] == [3.0] * 4
    finally:
        for controller in controllers:
            controller.close()


def test_racing_controller_processes_apply_a_batch_exactly_once(store_url: str) -> None:
    with open_store(store_url) as store:
        add_release(store)
        store.create_rollout("ro-1", RELEASE, {})
    results = run_controllers(store_url, "apply", count=3)
    assert sorted(results) == [False, False, True]
    with open_store(store_url) as store:
        assert len(store.decisions("ro-1")) == 5
        assert store.get_rollout("ro-1").revision == 1  # type: ignore[union-attr]


def test_engine_types_fit_apply_decisions(store: Store) -> None:
    from fleetlite.fleet import rollout as engine

    add_release(store)
    store.create_rollout("ro-1", RELEASE, {})
    decision = engine.Decision(kind="send_install", reason="wave 1", device_id="gw-1", wave=1,
                               device_class="rpi4", detail={"command": "ota_install"})
    progress = engine.DeviceProgress(device_id="gw-1", device_class="rpi4", wave=1,
                                     status="sent", code="", sent_at=5.0)
    assert store.apply_decisions("ro-1", 0, [decision], progress=[progress], now=5.0)
    row = store.decisions("ro-1")[0]
    assert (row.kind, row.device_class, row.detail, row.ts) == (
        "send_install", "rpi4", {"command": "ota_install"}, 5.0)
    assert store.device_progress("ro-1")[0].sent_at == 5.0


# -- leases ------------------------------------------------------------------------------------


def test_leases(store: Store) -> None:
    assert store.get_lease("rollout/ro-1") is None
    assert store.claim("rollout/ro-1", "ctl-a", ttl_s=0.6)
    assert not store.claim("rollout/ro-1", "ctl-b", ttl_s=0.6)
    lease = store.get_lease("rollout/ro-1")
    assert lease is not None and lease.owner == "ctl-a" and lease.active
    time.sleep(0.05)
    assert store.claim("rollout/ro-1", "ctl-a", ttl_s=0.6)  # renewal keeps the acquired time
    renewed = store.get_lease("rollout/ro-1")
    assert renewed is not None
    assert renewed.acquired == lease.acquired and renewed.expires > lease.expires
    time.sleep(0.8)  # ctl-a died: its lease expires
    expired = store.get_lease("rollout/ro-1")
    assert expired is not None and not expired.active
    assert store.claim("rollout/ro-1", "ctl-b", ttl_s=5)
    assert not store.claim("rollout/ro-1", "ctl-a", ttl_s=5)
    assert not store.release_lease("rollout/ro-1", "ctl-a")
    assert store.release_lease("rollout/ro-1", "ctl-b")
    assert store.claim("rollout/ro-1", "ctl-a", ttl_s=5)
    with pytest.raises(ValueError, match="ttl_s"):
        store.claim("x", "ctl-a", ttl_s=0)
