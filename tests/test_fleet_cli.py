"""The SDK (:class:`fleetlite.fleet.Fleet`) and the ``fleetlite`` fleet verbs as an operator runs
them: real subprocesses of the console script against a real store (SQLite, and PostgreSQL when
FLEETLITE_TEST_PG_URL is set), a real Mosquitto, a real ``fleetlite serve`` controller and two
real agent processes. docs/sdk.md's scripted rollout runs verbatim."""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

import fleetlite.fleet
from fleetlite.fleet import Fleet, GateSpec, Selector
from fleetlite.fleet.broker_address import BrokerAddress
from fleetlite.fleet.cli import build_parser
from fleetlite.fleet.cli_fleet import ProgressBoard
from fleetlite.fleet.client import WaitTimeoutError
from fleetlite.fleet.errors import FleetError, RecordNotFoundError, RolloutError
from fleetlite.fleet.intent_model import intent_classifier
from fleetlite.fleet.release_builder import build_release
from fleetlite.sdk.bundle import ReleaseBundle, load_bundle
from fleetlite.sdk.messages import Birth, Status
from tests.agent_harness import AgentProcess, write_config
from tests.mqtt_harness import Collector, Mosquitto
from tests.test_ota_install import RELEASE_KEY, write_root

BIN = Path(sys.executable).parent
FLEETLITE = str(BIN / "fleetlite")
REPO = Path(__file__).resolve().parent.parent
CLASS = "industrial-x86-gateway"


# -- fixtures and helpers --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bundle_v2(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Path:
    """intent v2 for the x86 class, signed with the key the agents trust, as a bundle dir."""
    work = tmp_path_factory.mktemp("bundle")
    model = work / "intent_v2.tflite"
    model.write_bytes(intent_classifier(seed=11).tflite)
    bundle = build_release([model], name="intent", version=2, device_classes=[CLASS],
                           vocab=models_dir / "intent_classifier.vocab.json", keys=[RELEASE_KEY])
    return bundle.write_dir(work / "intent-v2")


def cli(*args: str, env: dict[str, str] | None = None, expect: int = 0,
        cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``fleetlite ARGS`` as a subprocess; asserts the exit code."""
    proc = subprocess.run([FLEETLITE, *args], check=False, capture_output=True, text=True,
                          timeout=120, env={**os.environ, **(env or {})}, cwd=cwd)
    assert proc.returncode == expect, (
        f"fleetlite {' '.join(args)} exited {proc.returncode}, expected {expect}\n"
        f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def cli_all(*calls: tuple[Any, ...], env: dict[str, str]
            ) -> list[subprocess.CompletedProcess[str]]:
    """Independent ``fleetlite`` calls at once; a call ending in an int expects that exit code."""
    def one(call: tuple[Any, ...]) -> subprocess.CompletedProcess[str]:
        if isinstance(call[-1], int):
            return cli(*call[:-1], env=env, expect=call[-1])
        return cli(*call, env=env)

    with ThreadPoolExecutor(max_workers=4) as pool:
        return list(pool.map(one, calls))


def wait_until(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise TimeoutError(f"timed out waiting for {what}")


class Serve:
    """``fleetlite serve ARGS`` as a subprocess (stopped with SIGTERM, like systemd does)."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.log = log
        with log.open("ab") as out:
            self.proc = subprocess.Popen([FLEETLITE, "serve", *args, "--tick", "0.2"],
                                         stdout=out, stderr=out, env=env)

    @classmethod
    def on(cls, db: str, broker: Mosquitto, log: Path) -> Serve:
        """A controller on store ``db`` and the plain listener of ``broker``."""
        return cls(["--db", db, "--broker", f"{broker.host}:{broker.port}"], log)

    def read_log(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_connected(self, timeout: float = 60) -> None:
        """Until the controller's subscriptions are acknowledged: what a device publishes after
        that reaches it (before it, a clean session would miss it)."""
        wait_until(lambda: " connected to " in self.read_log() or self.proc.poll() is not None,
                   timeout, "the controller's connection")
        assert self.proc.poll() is None, self.read_log()[-2000:]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)


class Site:
    """A fleet on one store: a controller and two agents (intent v1, class x86) on a broker."""

    def __init__(self, root: Path, db: str, broker: Mosquitto, models_dir: Path,
                 tags: dict[str, dict[str, str]]) -> None:
        self.db = db
        self.env = {"FLEETLITE_DB": db, "FLEETLITE_BROKER": f"{broker.host}:{broker.port}"}
        # the controller first: it then also stores the agents' first (v1) profiles
        self.serve = Serve.on(db, broker, root / "serve.log")
        self.serve.wait_connected()
        trust = write_root(root / "root.json")
        self.agents = []
        for device_id, device_tags in tags.items():
            config = write_config(
                root / device_id, port=broker.port, device_id=device_id, socket=False,
                models=[{"name": "intent", "path": models_dir / "intent_classifier.tflite",
                         "version": 1}],
                profile_on_model_change=True,
                extra={"device_class": CLASS, "tags": device_tags, "trust_root": str(trust),
                       "ota": {"health_inferences": 3, "health_timeout_s": 0.5}})
            self.agents.append(AgentProcess(config).start())

    def wait_ready(self, profiles: bool = True) -> None:
        with Fleet(self.db) as fleet:
            wait_until(lambda: len(fleet.devices(online=True)) == len(self.agents), 30,
                       f"births of {len(self.agents)} agents:\n{self.serve.read_log()[-2000:]}")
            if profiles:
                wait_until(lambda: len({r.device_id for r in fleet.profile_rows("intent", 1)})
                           == len(self.agents), 30, "the agents' v1 profiles")

    def close(self) -> int:
        for agent in self.agents:
            agent.stop()
        return self.serve.stop()


@pytest.fixture
def site(tmp_path: Path, store_url: str, broker: Mosquitto, models_dir: Path
         ) -> Iterator[Site]:
    fleet_site = Site(tmp_path, store_url, broker, models_dir,
                      {"gw-cli-1": {"site": "test-lab", "line": "1"},
                       "gw-cli-2": {"site": "test-lab", "line": "2"}})
    try:
        yield fleet_site
    finally:
        fleet_site.close()


# -- the verbs against a live fleet ----------------------------------------------------------------


def test_operator_verbs_against_a_live_fleet(site: Site, bundle_v2: Path,
                                             tmp_path: Path) -> None:
    env = site.env
    full = site.db.startswith("sqlite")  # the PostgreSQL run stops at the abort (see below)
    site.wait_ready()

    # devices: all three formats, filters, show, an unknown id
    table, listed, as_yaml, line2, offline, shown, shown_json, unknown = cli_all(
        ("devices", "list"), ("devices", "list", "-o", "json"),
        ("devices", "list", "-o", "yaml"),
        ("devices", "list", "--tag", "line=2", "--online", "-o", "json"),
        ("devices", "list", "--offline"), ("devices", "show", "gw-cli-1"),
        ("devices", "show", "gw-cli-1", "-o", "json"), ("devices", "show", "gw-nope", 1),
        env=env)
    assert table.stdout.splitlines()[0].split() == ["DEVICE", "CLASS", "STATUS", "MODELS",
                                                    "AGENT", "LAST", "SEEN", "TAGS"]
    for device_id in ("gw-cli-1", "gw-cli-2"):
        assert re.search(rf"^{device_id}\s+{CLASS}\s+online\s+intent v1\s", table.stdout, re.M)
    devices = json.loads(listed.stdout)
    assert [d["device_id"] for d in devices["devices"]] == ["gw-cli-1", "gw-cli-2"]
    assert devices["devices"][0]["models"][0]["version"] == 1
    assert yaml.safe_load(as_yaml.stdout) == devices
    assert [d["device_id"] for d in json.loads(line2.stdout)["devices"]] == ["gw-cli-2"]
    assert "gw-cli" not in offline.stdout
    assert "gw-cli-1" in shown.stdout and "line=1, site=test-lab" in shown.stdout
    assert "intent v1" in shown.stdout
    device = json.loads(shown_json.stdout)
    assert device["device_class"] == CLASS and device["online"] is True
    assert device == devices["devices"][0] | {"last_seen": device["last_seen"],
                                              "telemetry": device["telemetry"]}
    assert "fleetlite devices list" in unknown.stderr

    # release push / list; --db after the command and before it
    pushed = json.loads(cli("release", "push", str(bundle_v2), "--db", site.db, "-o",
                            "json").stdout)
    assert pushed["new"] is True and pushed["version"] == 2
    release_id = pushed["release_id"]
    again, releases_json, releases_table, releases_yaml = cli_all(
        ("--db", site.db, "release", "push", str(bundle_v2)),
        ("release", "list", "-o", "json"), ("release", "list"), ("release", "list", "-o", "yaml"),
        env=env)
    assert "already stored" in again.stdout
    releases = json.loads(releases_json.stdout)["releases"]
    assert [(r["name"], r["version"], r["release_id"]) for r in releases] == \
        [("intent", 2, release_id)]
    assert re.search(rf"^{release_id[:16]}\s+intent\s+2\s+{CLASS}\s+3\s", releases_table.stdout,
                     re.M), releases_table.stdout
    assert yaml.safe_load(releases_yaml.stdout)["releases"] == releases

    # a rollout created paused; the controller answers every operator request in its log
    created = json.loads(cli("rollout", "create", release_id[:10], "--waves", "1,100%",
                             "--id", "ops-1", "--paused", "--timeout", "60",
                             "--max-p95-regression", "0.5", "-o", "json", env=env).stdout)
    assert created["rollout_id"] == "ops-1" and created["previous_version"] == 1
    assert created["spec"]["selector"]["device_classes"] == [CLASS]
    with Fleet(site.db) as fleet:
        wait_until(lambda: fleet.rollout("ops-1").state == "paused", 20, "the created pause")
    status = cli("rollout", "status", "ops-1", env=env).stdout
    assert "paused by the operator (created paused)" in status
    assert re.search(r"^\s+1\s+1\s+0\s+0\s+0\s+0\s+0\s+0\s+0\s+waiting$", status, re.M), status

    resumed = cli("rollout", "resume", "ops-1", "--wait", "20", env=env).stdout
    assert "resumed by the operator" in resumed
    paused = cli("rollout", "pause", "ops-1", "--note", "looking at wave 1", "--wait", "20",
                 env=env).stdout
    assert "paused by the operator (looking at wave 1)" in paused
    refused = cli("rollout", "pause", "ops-1", "--wait", "20", env=env, expect=1)
    assert "operator pause refused: the rollout is paused" in refused.stderr
    status_doc = json.loads(cli("rollout", "status", "ops-1", "-o", "json", env=env).stdout)
    assert status_doc["state"] == "paused" and status_doc["current_wave"] == 1
    assert [w["planned"] for w in status_doc["waves"]] == ["1", "100%"]
    assert [w["total"] for w in status_doc["waves"]] == [1, 1]

    if not full:
        # PostgreSQL: the same verbs end here, on an abort; the rest is backend-independent
        aborted = cli("rollout", "abort", "ops-1", "--note", "enough", "--wait", "20", env=env)
        assert "aborted by the operator (enough)" in aborted.stdout
        watched, listed_rollouts = cli_all(("rollout", "watch", "ops-1", 3),
                                           ("rollout", "list", "-o", "json"), env=env)
        assert "ops-1 is aborted" in watched.stderr
        assert [(r["rollout_id"], r["state"]) for r in
                json.loads(listed_rollouts.stdout)["rollouts"]] == [("ops-1", "aborted")]
        with Fleet(site.db) as fleet:
            kinds = [d.kind for d in fleet.rollout("ops-1").decisions if d.detail.get("operator")]
        assert kinds == ["pause", "resume", "pause", "refuse", "abort"]
        assert site.close() == 0
        return

    cli("rollout", "resume", "ops-1", "--wait", "20", env=env)
    watched = cli("rollout", "watch", "ops-1", "--interval", "0.3", "--timeout", "120", env=env)
    assert "ops-1: completed, wave 2 of 2: 2 installed" in watched.stdout
    assert "start_wave:" in watched.stdout and "complete:" in watched.stdout
    with Fleet(site.db) as fleet:
        log = fleet.rollout("ops-1").decisions
    operator = [(d.kind, d.reason) for d in log if d.detail.get("operator")]
    assert [kind for kind, _ in operator] == ["pause", "resume", "pause", "refuse", "resume"]
    assert all(reason for _, reason in operator)
    assert [d.kind for d in log].count("send_install") == 2

    # a second rollout of the same release, aborted: watch and wait exit with 3
    cli("rollout", "create", release_id, "--id", "ops-2", "--paused", env=env)
    aborted = cli("rollout", "abort", "ops-2", "--note", "not needed", "--wait", "20", env=env)
    assert "aborted by the operator (not needed)" in aborted.stdout
    report = tmp_path / "fleet.html"
    (ended, final, rollouts_yaml, rollouts_table, missing, profiles_table, profiles_json,
     compared_yaml, compared_table, reported) = cli_all(
        ("rollout", "watch", "ops-2", 3), ("rollout", "wait", "ops-2", "-o", "json", 3),
        ("rollout", "list", "-o", "yaml"), ("rollout", "list"), ("rollout", "status", "ops-9", 1),
        ("profiles", "show", "--model", "intent"),
        ("profiles", "show", "--model", "intent", "--version", "2", "-o", "json"),
        ("profiles", "compare", "intent", "1", "2", "-o", "yaml"),
        ("profiles", "compare", "intent", "1", "2"), ("report", "--html", str(report)),
        env=env)
    assert "ops-2 is aborted" in ended.stderr
    assert json.loads(final.stdout)["state"] == "aborted"
    assert [(r["rollout_id"], r["state"]) for r in
            yaml.safe_load(rollouts_yaml.stdout)["rollouts"]] == \
        [("ops-1", "completed"), ("ops-2", "aborted")]
    assert re.search(r"^ops-1\s+intent\s+2\s+completed\s+2/2\s+2/2\s+0\s",
                     rollouts_table.stdout, re.M), rollouts_table.stdout
    assert "fleetlite rollout list" in missing.stderr and "ops-2" in missing.stderr

    # profiles: v1 from the agents' start, v2 from the installs
    assert re.search(rf"^{CLASS}\s+intent\s+1\s+2\s", profiles_table.stdout, re.M)
    assert re.search(rf"^{CLASS}\s+intent\s+2\s+2\s", profiles_table.stdout, re.M)
    aggs = json.loads(profiles_json.stdout)["aggregates"]
    assert [(a["version"], a["count"]) for a in aggs] == [(2, 2)]
    row = yaml.safe_load(compared_yaml.stdout)["device_classes"][0]
    assert row["device_class"] == CLASS and row["a"]["count"] == 2 and row["b"]["count"] == 2
    assert row["ratios"]["p95_ms_median"] > 0
    assert "intent: v2 (B) against v1 (A)" in compared_table.stdout

    # the report holds the devices and the rollouts
    assert re.search(r"2 device\(s\), \d+ profile\(s\), 2 rollout\(s\)", reported.stdout)
    html = report.read_text()
    assert "gw-cli-1" in html and "gw-cli-2" in html and "ops-1" in html

    assert site.close() == 0  # serve stops cleanly on SIGTERM
    assert "stopped" in site.serve.read_log()


def test_the_docs_scripted_rollout_runs_verbatim(tmp_path: Path, broker: Mosquitto,
                                                 models_dir: Path) -> None:
    text = (REPO / "docs" / "sdk.md").read_text()
    section = text.split("## A scripted rollout", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    work = tmp_path / "ci"
    work.mkdir()
    (work / "intent_v3.tflite").write_bytes(intent_classifier(seed=12).tflite)
    shutil.copy(models_dir / "intent_classifier.vocab.json", work / "intent.vocab.json")
    (work / "keys").mkdir()
    RELEASE_KEY.save(work / "keys" / "release.key")
    (work / "rollout.py").write_text(code)
    db = f"sqlite:///{tmp_path / 'fleet.db'}"
    fleet_site = Site(tmp_path, db, broker, models_dir,
                      {"gw-a": {"site": "plant-a"}, "gw-b": {"site": "plant-a"},
                       "gw-c": {"site": "plant-b"}})
    try:
        fleet_site.wait_ready()
        run = subprocess.run([sys.executable, "rollout.py"], cwd=work, capture_output=True,
                             check=False, text=True, timeout=180,
                             env={**os.environ, **fleet_site.env})
        assert run.returncode == 0, f"{run.stdout}\n{run.stderr}"
        assert "3 gateway(s) online" in run.stdout
        assert "against baseline v1" in run.stdout
        assert re.search(r": completed, wave 2 of 2: 2 installed", run.stdout), run.stdout
        assert "gate_passed: class industrial-x86-gateway passed the gates in wave 1" \
            in run.stdout
        wait_until(lambda: _versions(db) == {"gw-a": 3, "gw-b": 3, "gw-c": 1}, 20,
                   "births with v3 at site plant-a only")
    finally:
        fleet_site.close()


def test_a_late_will_of_an_earlier_connection_leaves_the_device_online(
        tmp_path: Path, broker: Mosquitto, models_dir: Path) -> None:
    """The agent reconnects (a broker restart); the Will of its first connection then reaches
    the controller late, as through another controller of a shared subscription. The device
    stays online; its current connection's Will does take it offline."""
    db = f"sqlite:///{tmp_path / 'fleet.db'}"
    site = Site(tmp_path, db, broker, models_dir, {"gw-late": {"site": "x"}})
    statuses = Collector(broker.host, broker.port, ["fleetlite/v1/dev/+/status"]).start()
    try:
        site.wait_ready(profiles=False)
        first = Status.from_json(statuses.wait_for("status", predicate=lambda m: (
            Status.from_json(m.payload).online))[0].payload)
        broker.restart()
        statuses.wait_for("status", timeout=30, predicate=lambda m: (
            Status.from_json(m.payload).conn == first.conn + 1))

        def deliver(will: Status, marker: str) -> None:
            """Publish ``will``, then a status of ``marker``: once the marker is stored, the
            controller has handled the will (one connection delivers in order)."""
            statuses.publish(f"fleetlite/v1/dev/{will.device_id}/status", will.to_json())
            statuses.publish(f"fleetlite/v1/dev/{marker}/status", Status(
                device_id=marker, online=True, session=1, ts=time.time()).to_json())
            with Fleet(db) as fleet:
                wait_until(lambda: any(d.device_id == marker for d in fleet.devices()), 20,
                           f"the controller storing {marker}")

        late = dataclasses.replace(first, online=False, reason="lost")
        deliver(late, "gw-marker-1")
        with Fleet(db) as fleet:
            assert fleet.device("gw-late").online
        current = dataclasses.replace(late, conn=first.conn + 1)
        deliver(current, "gw-marker-2")
        with Fleet(db) as fleet:
            assert not fleet.device("gw-late").online
    finally:
        statuses.stop()
        site.close()


def _versions(db: str) -> dict[str, int | None]:
    with Fleet(db) as fleet:
        return {d.device_id: d.models[0].version for d in fleet.devices()}


# -- the SDK on a store without agents -------------------------------------------------------------


def _register(fleet: Fleet, device_id: str, version: int = 1, device_class: str = CLASS,
              **tags: str) -> None:
    now = time.time()
    fleet.store.upsert_birth(Birth(
        device_id=device_id, session=1, ts=now, device_class=device_class,
        agent_version="0.1.0", tags=tags or {"site": "lab"},
        models=[{"name": "intent", "version": version, "sha256": "a" * 64}]))
    fleet.store.upsert_status(Status(device_id=device_id, online=True, session=1, ts=now,
                                     reason="connected"))


@pytest.fixture
def fleet(store_url: str) -> Iterator[Fleet]:
    with Fleet(store_url, "127.0.0.1:1") as opened:
        yield opened


def test_create_rollout_defaults_and_refusals(fleet: Fleet, bundle_v2: Path) -> None:
    release_id = fleet.push_release(bundle_v2)
    assert fleet.push_release(bundle_v2) == release_id  # pushing again is harmless
    with pytest.raises(RolloutError, match="no registered device matches"):
        fleet.create_rollout(release_id)
    _register(fleet, "gw-1", version=1)
    _register(fleet, "gw-2", version=2)  # already has the release's version
    _register(fleet, "pi-1", version=1, device_class="raspberry-pi-4")
    rollout = fleet.create_rollout(release_id[:8], waves=["1", "all"])
    assert re.fullmatch(r"intent-v2-[0-9a-f]{6}", rollout.rollout_id)
    assert rollout.spec.selector.device_classes == (CLASS,)  # the release's classes
    assert rollout.spec.previous_version == 1  # below v2, on the selected devices
    assert rollout.state == "running" and not rollout.started
    assert "is `fleetlite serve` running" in rollout.progress_line()
    with pytest.raises(RolloutError, match="targets industrial-x86-gateway, not raspberry-pi-4"):
        fleet.create_rollout(release_id, selector=Selector(device_classes=("raspberry-pi-4",)))
    with pytest.raises(RolloutError, match="end the waves with 100% or all"):
        fleet.create_rollout(release_id, waves="1,50%")
    with pytest.raises(RecordNotFoundError, match="fleetlite release list"):
        fleet.create_rollout("0" * 64)
    with pytest.raises(FleetError, match="already exists"):
        fleet.create_rollout(release_id, rollout_id=rollout.rollout_id)
    explicit = fleet.create_rollout(release_id, selector=Selector(tags={"site": "lab"}),
                                    gates=GateSpec(max_peak_rss_mb=300), previous_version=0,
                                    rollout_id="r-explicit", paused=True)
    assert explicit.spec.previous_version == 0 and explicit.pending_requests == ("pause",)
    assert [r.rollout_id for r in fleet.rollouts()] == [rollout.rollout_id, "r-explicit"]
    assert fleet.rollouts(release_id)[1].spec.gates.max_peak_rss_mb == 300
    with pytest.raises(RecordNotFoundError, match="fleetlite rollout list"):
        fleet.rollout("nope")


def test_push_refuses_unsigned_and_tampered_bundles(fleet: Fleet, bundle_v2: Path,
                                                    tmp_path: Path) -> None:
    from fleetlite.sdk.bundle import load_bundle
    from fleetlite.sdk.errors import BundleError

    signed = load_bundle(bundle_v2)
    unsigned = ReleaseBundle(dataclasses.replace(signed.envelope, signatures=()),
                             signed.manifest, signed.files)
    with pytest.raises(BundleError, match="unsigned: sign it with `fleetlite release sign"):
        fleet.push_release(unsigned)
    model = next(name for name in signed.files if name.endswith(".tflite"))
    tampered = ReleaseBundle(signed.envelope, signed.manifest,
                             {**signed.files, model: signed.files[model] + b"\x00"})
    with pytest.raises(BundleError, match="do not match the manifest"):
        fleet.push_release(tampered)
    assert fleet.releases() == []
    root = write_root(tmp_path / "root.json")
    assert fleet.push_release(signed, root=root) == signed.release_id


def test_push_refuses_a_second_release_of_a_version_with_other_files(
        fleet: Fleet, bundle_v2: Path, tmp_path: Path, models_dir: Path) -> None:
    from fleetlite.fleet.errors import StoreConstraintError

    first = fleet.push_release(bundle_v2)
    vocab = models_dir / "intent_classifier.vocab.json"
    other = tmp_path / "intent_other.tflite"
    other.write_bytes(intent_classifier(seed=12).tflite)
    different = build_release([other], name="intent", version=2, device_classes=[CLASS],
                              vocab=vocab, keys=[RELEASE_KEY])
    with pytest.raises(StoreConstraintError, match="--version 3 or higher"):
        fleet.push_release(different)
    # through the CLI: a clear error and a non-zero exit, nothing stored
    refused = cli("release", "push", str(different.write_dir(tmp_path / "other")),
                  "--db", fleet.db, expect=1)
    assert "already stored as release" in refused.stderr, refused.stderr
    assert [r.release_id for r in fleet.releases()] == [first]
    # the same files built again (a new manifest: another issue time) are the same model
    same = tmp_path / "intent_v2.tflite"
    same.write_bytes(intent_classifier(seed=11).tflite)
    # issued a second before the first build (an issue time of its own, whenever the module's
    # bundle was built: "now - 60" matched it when the bundle was 60 s old)
    issued = load_bundle(bundle_v2).manifest.issued - 1
    rebuilt = build_release([same], name="intent", version=2, device_classes=[CLASS],
                            vocab=vocab, keys=[RELEASE_KEY], issued=issued)
    assert rebuilt.release_id != first
    fleet.push_release(rebuilt)
    assert len(fleet.releases()) == 2


def test_operator_requests_survive_a_concurrent_writer(fleet: Fleet, bundle_v2: Path) -> None:
    release_id = fleet.push_release(bundle_v2)
    _register(fleet, "gw-1")
    rollout = fleet.create_rollout(release_id, rollout_id="r-race")
    stop = threading.Event()

    def controller_like() -> None:  # rewrites the state it read, as a controller's batch does
        while not stop.is_set():
            record = fleet.store.get_rollout("r-race")
            assert record is not None
            fleet.store.update_rollout_state("r-race", record.revision, record.state or {})

    writer = threading.Thread(target=controller_like)
    writer.start()
    try:
        for action in ("pause", "resume", "pause"):
            result = fleet.request(rollout.rollout_id, action, note=action)
            assert not result.handled  # no controller here
    finally:
        stop.set()
        writer.join()
    assert fleet.rollout("r-race").pending_requests == ("pause", "resume", "pause")
    with pytest.raises(RolloutError, match="operator action must be one of"):
        fleet.request("r-race", "restart")
    with pytest.raises(RecordNotFoundError):
        fleet.pause("r-missing")


def test_requests_on_a_finished_rollout_and_watch_timeouts(fleet: Fleet,
                                                           bundle_v2: Path) -> None:
    from fleetlite.fleet.rollout import RolloutState, request

    release_id = fleet.push_release(bundle_v2)
    _register(fleet, "gw-1")
    fleet.create_rollout(release_id, rollout_id="r-1")
    with pytest.raises(WaitTimeoutError, match=r"still running after 0\.3 s") as caught:
        list(fleet.watch("r-1", interval=0.1, timeout=0.3))
    assert caught.value.rollout.rollout_id == "r-1"
    assert isinstance(caught.value, TimeoutError)
    record = fleet.store.get_rollout("r-1")
    assert record is not None
    done = RolloutState(state="aborted", reason="aborted by the operator")
    assert fleet.store.update_rollout_state("r-1", record.revision, done.to_dict())
    with pytest.raises(RolloutError, match="already aborted"):
        fleet.pause("r-1")
    # the engine accepts a rollback of an aborted rollout
    assert fleet.rollback("r-1").rollout.pending_requests == ("rollback",)
    seen: list[str] = []
    final = fleet.wait("r-1", callback=lambda r: seen.append(r.state), timeout=5)
    assert final.finished and not final.completed and seen == ["aborted"]
    assert request(done, "rollback").operator_requests  # (the same rule, in the engine)


def test_report_and_profiles_of_an_empty_fleet(fleet: Fleet, tmp_path: Path) -> None:
    _register(fleet, "gw-report-1")
    path = fleet.report(tmp_path / "r.html", title="Plant A")
    html = path.read_text()
    assert "gw-report-1" in html and "Plant A" in html
    assert fleet.profiles() == [] and fleet.compare("intent", 1, 2).rows == ()


# -- the CLI without a fleet -----------------------------------------------------------------------


def _parsers(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
             ) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from _parsers(child, (*path, name))


FLEET_VERBS = {("serve",), ("devices",), ("devices", "list"), ("devices", "show"),
               ("release", "push"), ("release", "list"), ("rollout",), ("profiles",),
               ("report",), ("profiles", "show"), ("profiles", "compare"),
               *(("rollout", v) for v in ("create", "status", "watch", "wait", "pause",
                                          "resume", "abort", "rollback", "list"))}


def test_every_fleet_verb_has_help_with_examples_and_exit_codes() -> None:
    found = dict(_parsers(build_parser()))
    assert set(found) >= FLEET_VERBS
    for path in FLEET_VERBS:
        text = found[path].format_help()
        assert "examples:" in text and "exit codes" in text, path
        assert "\n  fleetlite " in text.split("examples:", 1)[1], path
    # as an operator sees it
    out = cli("rollout", "create", "--help").stdout
    assert "examples:" in out and "3 the rollout ended" in cli("rollout", "watch",
                                                                "--help").stdout
    assert "default sqlite:///fleetlite.db" in " ".join(cli("--help").stdout.split())
    assert "release push" in cli("release", "--help").stdout


def test_usage_errors_and_a_missing_store(tmp_path: Path) -> None:
    assert "usage:" in cli("rollout", "create", expect=2).stderr
    assert "usage:" in cli("devices", cwd=tmp_path, expect=2).stderr
    bad = cli("rollout", "create", "abc", "--failure-threshold", "2", expect=2)
    assert "a fraction is within 0.0..1.0" in bad.stderr
    assert "KEY=VALUE" in cli("devices", "list", "--tag", "site", expect=2).stderr
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FLEETLITE_")}
    proc = subprocess.run([FLEETLITE, "devices", "list"], capture_output=True, text=True,
                          check=False, cwd=tmp_path, env=clean, timeout=60)
    assert proc.returncode == 1
    assert "no fleet store at fleetlite.db" in proc.stderr and "fleetlite serve" in proc.stderr
    assert not (tmp_path / "fleetlite.db").exists()  # a read verb never creates a store
    down = cli("serve", "--db", f"sqlite:///{tmp_path / 'f.db'}", "--broker", "127.0.0.1:1",
               expect=1)
    assert "cannot reach the MQTT broker at 127.0.0.1:1" in down.stderr


@pytest.mark.parametrize(("text", "expected"), [
    ("localhost:1883", ("localhost", 1883)), ("broker.lan", ("broker.lan", 1883)),
    ("mqtt://10.0.0.2:8883", ("10.0.0.2", 8883)), ("[::1]:1884", ("::1", 1884)),
])
def test_broker_addresses(text: str, expected: tuple[str, int]) -> None:
    address = BrokerAddress.parse(text)
    assert (address.host, address.port, address.tls) == (*expected, False)


@pytest.mark.parametrize("text", ["host:port", "host:0", ":1883", "host:99999"])
def test_bad_broker_addresses_say_how_to_write_one(text: str) -> None:
    with pytest.raises(FleetError, match="HOST:PORT"):
        BrokerAddress.parse(text)


def test_progress_board_draws_in_place_on_a_terminal_and_lines_elsewhere(
        tmp_path: Path, bundle_v2: Path) -> None:
    with Fleet(f"sqlite:///{tmp_path / 'f.db'}") as fleet:
        release_id = fleet.push_release(bundle_v2)
        _register(fleet, "gw-1")
        fleet.create_rollout(release_id, rollout_id="r-board", waves="1,100%")
        snapshot = fleet.rollout("r-board")
    tty = io.StringIO()
    board = ProgressBoard(tty, tty=True)
    board.draw(snapshot)
    board.draw(snapshot)
    drawn = tty.getvalue()
    assert "\x1b[2K" in drawn and re.search(r"\x1b\[\d+F", drawn)  # redrawn over itself
    assert "wave  1" in drawn and "wave  2" in drawn
    plain = io.StringIO()
    ProgressBoard(plain, tty=False).draw(snapshot)
    assert "\x1b" not in plain.getvalue()
    assert "r-board: waiting for a controller" in plain.getvalue()


def test_the_public_sdk_surface_is_complete() -> None:
    for name in fleetlite.fleet.__all__:
        assert getattr(fleetlite.fleet, name) is not None, name
    from fleetlite.fleet import client

    assert set(client.__all__) <= set(dir(client))
    assert {"Fleet", "Rollout", "GateSpec", "Selector", "WaitTimeoutError"} <= \
        set(fleetlite.fleet.__all__)
