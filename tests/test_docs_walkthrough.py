"""Every command shown in README.md and docs/ runs as written, on real parts: a real Mosquitto, a
real store, real `fleetlite serve` controllers and real agent processes started with the documented
`fleetlite-agent run`. Each walkthrough ends by proving it ran all of its document's commands; the
few it does not run are listed with the test that runs them, or the reason (they change the host:
`sudo`, systemd).

Placeholders a reader fills in are the only substitutions: `RELEASE_ID`, `ROLLOUT_ID`, `XXXX`,
`DIR`, the example hosts and database, the installed certificate files under `/etc/` (the files
`fleetlite pki` wrote), `/opt/fleetlite/venv` (the venv running these tests), and a gateway's
installed paths in the language-model guide (`/run/fleetlite/agent.sock`,
`/etc/fleetlite/agent.yaml`, `/var/lib/fleetlite/seed`: the test gateway's files). The operator
guide's Mosquitto runs the configuration and ACL its `fleetlite broker-config` wrote, on this
machine's port.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from fleetlite.fleet import Fleet
from fleetlite.fleet.intent_model import intent_classifier
from tests.conftest import PG_URL, fresh_pg_database
from tests.doc_commands import DOCS, REPO, Walkthrough, shell_commands
from tests.mqtt_harness import Mosquitto
from tests.test_fleet_cli import wait_until

DEMO = "test_readme_demo.py runs `bash tools/demo.sh` verbatim in a fresh venv (it runs " \
       "`fleetlite demo`)"
KEEP = "test_cli_basics.py::test_demo_keep_then_explore_with_the_cli_then_ctrl_c"
TESTS = "CI runs it: .ci/run ends with `bash tools/test.sh`"
HOST = "changes the host (root, /etc, systemd): shown for a real gateway, not run by tests"


def names_the_runtime(info: str) -> bool:
    """Whether ``fleetlite-agent info`` names the TFLite runtime this Python has selected."""
    from fleetlite.sdk.runtime.interpreter import select_backend

    return re.search(rf"^backend\s+{re.escape(select_backend().name)}$", info, re.M) is not None


def agent_config(directory: Path, device_id: str, *, port: int, trust_root: Path,
                 seed: Path, base: dict[str, Any] | None = None,
                 tls: dict[str, str] | None = None) -> Path:
    """agent.yaml for one gateway of class raspberry-pi-4 on the test broker: ``base`` (the
    operator guide's agent.yaml) with this machine's paths, and its TLS files (else no TLS)."""
    directory.mkdir(parents=True, exist_ok=True)
    config = dict(base or {})
    broker = dict(config.get("broker", {}))
    for key in ("tls", "username", "password"):
        broker.pop(key, None)
    if tls:
        broker["tls"] = tls
    config.update({
        "device_id": device_id, "device_class": "raspberry-pi-4",
        "tags": {**config.get("tags", {}), "site": "docs"},
        "broker": {**broker, "host": "localhost" if tls else "127.0.0.1", "port": port},
        "state_dir": str(directory / "state"), "socket": str(directory / "agent.sock"),
        "trust_root": str(trust_root),
        "intervals": {"telemetry_s": 60, "reconnect_min_s": 0.2, "reconnect_max_s": 1},
        "ota": {"health_inferences": 3, "health_timeout_s": 0.5, "chunk_idle_s": 5},
        "threads": 1, "profile_on_model_change": True,
        "models": [{"name": "intent", "path": str(seed), "version": 1}],
    })
    path = directory / "agent.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def wait_connected(log: Path) -> None:
    """Until the controller writing ``log`` has its subscriptions acknowledged: an agent's one
    start-up profile published before that would not reach it."""
    wait_until(lambda: log.is_file() and " connected to " in log.read_text(errors="replace"),
               60, f"the controller's connection ({log.name})")


def found(pattern: str, text: str) -> str:
    match = re.search(pattern, text, re.S)
    assert match, f"no {pattern!r} in:\n{text}"
    return match.group(1)


def versions(db: str) -> dict[str, int | None]:
    with Fleet(db) as fleet:
        return {d.device_id: next((m.version for m in d.models if m.name == "intent"), None)
                for d in fleet.devices()}


def state(db: str, rollout_id: str) -> str:
    with Fleet(db) as fleet:
        return fleet.rollout(rollout_id).state


def operator_decisions(db: str, rollout_id: str) -> list[str]:
    with Fleet(db) as fleet:
        return [d.reason for d in fleet.rollout(rollout_id).decisions if d.detail.get("operator")]


def guide_broker(wt: Walkthrough, broker: Mosquitto) -> None:
    """The operator guide's CA, broker and controller certificates and broker configuration, made
    by its `fleetlite pki` and `fleetlite broker-config` commands as written; Mosquitto runs the
    generated mosquitto.conf with this machine's port (and `user root` as in mqtt_harness)."""
    assert "created the fleet CA" in wt.run("fleetlite pki init").stdout
    wt.export("export FLEETLITE_PKI=")
    issued = wt.run("fleetlite pki issue broker").stdout
    assert "broker:localhost" in issued, issued
    for name in ("ctl-1", "ctl-2"):
        assert f"controller:{name}" in wt.run(f"fleetlite pki issue controller {name}").stdout
    wt.run("fleetlite broker-config")
    conf = (wt.cwd / "broker" / "mosquitto.conf").read_text()
    assert "\nlistener 8883\n" in conf and "require_certificate true" in conf
    user = ["user root"] if os.geteuid() == 0 else []  # see Mosquitto in mqtt_harness
    listener = f"\nlistener {broker.port} 127.0.0.1\n"
    broker.conf.write_text(conf.replace("\nlistener 8883\n", listener)
                           + "\n".join([*user, "log_type all", ""]))
    broker.start()


def enrol(wt: Walkthrough, device_id: str, documented: dict[str, Any], seed: Path) -> Path:
    """A gateway provisioned from `fleetlite pki enrol` output alone: its bundle's agent.yaml
    (with the guide's optional settings and this machine's paths), started in the bundle."""
    command = wt.command("fleetlite pki enrol gw-0001").replace("gw-0001", device_id)
    if device_id == "gw-0001":
        wt.run("fleetlite pki enrol gw-0001")
    else:
        wt.run_plain(wt.resolve(command))
    bundle = wt.cwd / device_id
    assert (bundle / f"{device_id}.key").stat().st_mode & 0o077 == 0
    made = yaml.safe_load((bundle / "agent.yaml").read_text())
    agent_config(bundle, device_id, port=int(made["broker"]["port"]),
                 trust_root=bundle / made["trust_root"], seed=seed,
                 base={**documented, **made}, tls=made["broker"]["tls"])
    wt.start_plain(f"{sys.prefix}/bin/fleetlite-agent run --config agent.yaml", cwd=bundle,
                   log=bundle / "agent.log")
    return bundle


@pytest.fixture
def store_db(tmp_path: Path) -> Iterator[str]:
    """PostgreSQL when the suite has one (CI does), else SQLite."""
    if PG_URL:
        yield from fresh_pg_database()
    else:
        yield f"sqlite:///{tmp_path / 'fleet.db'}"


def commands_to_devices(wt: Walkthrough, work: Path, devices: list[str]) -> None:
    """The guide's commands to devices, against its running gateways."""
    wt.start("fleetlite events --follow", log=work / "events.log")
    assert f"{len(devices)} of {len(devices)} answered ok" in wt.run(
        "fleetlite devices ping --all").stdout
    info = json.loads(wt.run("fleetlite devices info gw-0001").stdout)
    assert info["ok"] and info["outcomes"][0]["result"]["models"], info
    slots = wt.run("fleetlite devices ota-slots --class raspberry-pi-4").stdout
    assert all(d in slots for d in devices) and "answered ok" in slots
    assert "1 of 1 answered ok" in wt.run("fleetlite devices profile gw-0001").stdout
    assert "answered ok" in wt.run("fleetlite devices reload-config --all").stdout
    history = wt.run("fleetlite devices history gw-0001").stdout
    assert all(c in history for c in ("ping", "info", "profile", "reload_config")), history


def operate_rollout(wt: Walkthrough, db: str, devices: list[str]) -> None:
    """The rollout verbs as a doc shows them: create, pause, resume, watch, compare, report,
    rollback, and abort of a second rollout (of v3)."""
    pushed = wt.run("fleetlite release push").stdout
    wt.subst["RELEASE_ID"] = found(r"release id ([0-9a-f]{64})", pushed)
    created = wt.run("fleetlite rollout create").stdout
    rollout_id = found(r"created rollout (\S+):", created)
    wt.subst["ROLLOUT_ID"] = rollout_id
    wt.run("fleetlite rollout pause")
    wait_until(lambda: state(db, rollout_id) == "paused", 30, "the pause")
    wt.run("fleetlite rollout resume")
    watched = wt.run("fleetlite rollout watch").stdout
    assert re.search(rf"{rollout_id}: completed, wave \d+ of \d+: {len(devices)} installed",
                     watched), watched
    assert wait_until(lambda: set(versions(db).values()) == {2}, 30, "births with v2")
    compared = wt.run("fleetlite profiles compare intent 1 2").stdout
    assert "intent: v2 (B) against v1 (A)" in compared
    assert re.search(r"^raspberry-pi-4\s", compared, re.M), compared
    reported = wt.run("fleetlite report --html fleet.html").stdout
    assert f"{len(devices)} device(s)" in reported
    html = (wt.cwd / "fleet.html").read_text()
    assert all(device in html for device in devices) and rollout_id in html

    wt.run("fleetlite rollout rollback")
    wait_until(lambda: state(db, rollout_id) == "rolled_back", 60, "the operator's rollback")
    assert wait_until(lambda: set(versions(db).values()) == {1}, 60, "births with v1 again")

    # abort needs a rollout still in flight: one of a v3, built and pushed as set-up
    wt.run_plain("fleetlite release build model.tflite --name intent --version 3 "
                 "--device-class raspberry-pi-4 --key keys/release-*.key --out intent-v3\n"
                 "fleetlite release push intent-v3")
    with Fleet(db) as fleet:
        wt.subst["RELEASE_ID"] = next(r.release_id for r in fleet.releases() if r.version == 3)
    second = wt.run("fleetlite rollout create").stdout
    wt.subst["ROLLOUT_ID"] = found(r"created rollout (\S+):", second)
    wt.run("fleetlite rollout abort")
    wait_until(lambda: state(db, wt.subst["ROLLOUT_ID"]) == "aborted", 30, "the abort")
    reasons = operator_decisions(db, rollout_id) + operator_decisions(db, wt.subst["ROLLOUT_ID"])
    assert [r.split(" by the operator")[0] for r in reasons] == \
        ["paused", "resumed", "rolled back", "aborted"], reasons


def test_readme_cli_tour(tmp_path: Path, broker: Mosquitto, models_dir: Path,
                         store_db: str) -> None:
    work = tmp_path / "tour"
    work.mkdir()
    (work / "model.tflite").write_bytes(intent_classifier(seed=11).tflite)
    wt = Walkthrough(REPO / "README.md", work, {
        "FLEETLITE_DB": store_db, "FLEETLITE_BROKER": f"{broker.host}:{broker.port}"},
        exempt={"bash tools/demo.sh": DEMO, "bash tools/test.sh": TESTS,
                "fleetlite demo": DEMO, "fleetlite demo --keep": KEEP,
                **{c: why for c, why in lm_guide_commands().items()
                   if c in shell_commands(REPO / "README.md")}})
    wt.subst["DIR"] = "models"

    info = wt.run("fleetlite-agent info").stdout
    assert re.search(r"^cores\s+\d+", info, re.M) and names_the_runtime(info)
    checked = wt.run("fleetlite-agent check model.tflite").stdout
    assert "model.tflite: OK" in checked and "tokens" in checked
    profiled = wt.run("fleetlite-agent profile model.tflite").stdout
    assert "p95" in profiled and "peak" in profiled.lower()
    built = wt.run("python -m fleetlite.tools.build_models").stdout
    assert (work / "models" / "intent_classifier.tflite").read_bytes() == \
        (models_dir / "intent_classifier.tflite").read_bytes(), built

    created = wt.run("fleetlite keys create --role release").stdout
    wt.subst["XXXX"] = found(r"keys/release-(\w+)\.key", created)
    # the root of trust (the README leaves `root init` to the operator guide)
    wt.run_plain("fleetlite keys create --role root --out root-keys/")
    wt.run_plain("fleetlite keys root init --root-key root-keys/root-*.key "
                 "--release-key keys/release-*.pub --out root.json")
    built = wt.run("fleetlite release build model.tflite").stdout
    assert "intent v2 for raspberry-pi-4" in built and (work / "intent-v2").is_dir()
    verified = wt.run("fleetlite release verify intent-v2").stdout
    assert "intent v2" in verified

    wt.start("fleetlite serve", log=work / "serve.log")
    wait_connected(work / "serve.log")
    devices = ["gw-tour-1", "gw-tour-2"]
    for device_id in devices:
        home = work / device_id
        agent_config(home, device_id, port=broker.port, trust_root=work / "root.json",
                     seed=models_dir / "intent_classifier.tflite")
        wt.start("fleetlite-agent run --config agent.yaml", cwd=home, log=home / "agent.log")
    with Fleet(store_db) as fleet:
        wait_until(lambda: len(fleet.devices(online=True)) == 2, 30, "two agents online")
        wait_until(lambda: len(fleet.profile_rows("intent", 1)) >= 2, 60, "their v1 profiles")
    listed = wt.run("fleetlite devices list").stdout
    for device_id in devices:
        assert re.search(rf"^{device_id}\s+raspberry-pi-4\s+online\s+intent v1\s", listed, re.M)
    wt.start("fleetlite events --follow", log=work / "events.log")
    assert "2 of 2 answered ok" in wt.run("fleetlite devices ping --all").stdout

    operate_rollout(wt, store_db, devices)
    codes = wt.stop()
    assert all(code == 0 for group in codes.values() for code in group), codes
    wt.assert_all_run()


def test_operator_guide_walkthrough(tmp_path: Path, models_dir: Path, store_db: str) -> None:
    """The guide from gateway to rollout, on a Mosquitto configured by the guide's
    `fleetlite broker-config`: gateways provisioned from `fleetlite pki enrol` bundles alone,
    two controllers of one group with their own `fleetlite pki` certificates, then a revocation."""
    guide = REPO / "docs" / "operator-guide.md"
    text = guide.read_text()
    work = tmp_path / "ops"
    work.mkdir()
    for name in ("intent_classifier.tflite", "intent_classifier.vocab.json"):
        shutil.copy(models_dir / name, work / name)
    (work / "model.tflite").write_bytes(intent_classifier(seed=11).tflite)
    broker = Mosquitto(tmp_path / "broker")
    hosts = [c for c in shell_commands(guide) if c.startswith("sudo ")] + \
        ["journalctl -u fleetlite-agent -f"]
    wt = Walkthrough(guide, work, {}, exempt={
        **{command: HOST for command in hosts},
        "pip install 'fleetlite[fleet,postgres]'": "the venv running these tests is that "
                                                   "install (tools/bootstrap.sh)"})
    controllers = work / "fleet-pki" / "controllers"
    wt.subst.update({"/opt/fleetlite/venv": sys.prefix,
                     "postgresql://fleet:secret@db.example.net/fleet": store_db,
                     "mqtt.example.net:8883": f"localhost:{broker.port}",
                     "--dns mqtt.example.net": "--dns localhost",
                     "/etc/mosquitto/fleetlite": str(work / "broker"),
                     "/etc/fleetlite/ca.pem": str(work / "fleet-pki" / "ca.pem"),
                     "/etc/fleetlite/ctl-1.pem": str(controllers / "ctl-1.pem"),
                     "/etc/fleetlite/ctl-1.key": str(controllers / "ctl-1.key"),
                     "/etc/fleetlite/ctl-2.pem": str(controllers / "ctl-2.pem"),
                     "/etc/fleetlite/ctl-2.key": str(controllers / "ctl-2.key")})
    try:
        walk_the_operator_guide(wt, text, broker, store_db)
    finally:
        wt.stop()
        broker.stop()


def walk_the_operator_guide(wt: Walkthrough, text: str, broker: Mosquitto,
                            store_db: str) -> None:
    work = wt.cwd
    # 1. provisioning: the installed agent, and where its systemd unit is
    info = wt.run("/opt/fleetlite/venv/bin/fleetlite-agent info").stdout
    assert names_the_runtime(info)
    unit = wt.run("unit=$(", then='cat "$unit"').stdout  # the file the next lines install
    assert "ExecStart=/opt/fleetlite/venv/bin/fleetlite-agent run --config" in unit
    documented = yaml.safe_load(found(r"### agent.yaml\n\n```yaml\n(.*?)```", text))

    # 4. profiles by hand
    table = wt.run("fleetlite-agent profile model.tflite --device-class").stdout
    assert re.search(r"^budget p95 latency .* ms <= 150 ms\s+ok$", table, re.M), table
    record = json.loads(wt.run("fleetlite-agent profile model.tflite --json").stdout)
    assert record["schema"] == "fleetlite.profile/1" and len(record["model"]["sha256"]) == 64
    assert record["memory"]["peak_rss_inference_mb"] > 0

    # 5. keys and a release (root.json goes into every enrolment bundle)
    assert "created root key" in wt.run("fleetlite keys create --role root").stdout
    assert "created release key" in wt.run("fleetlite keys create --role release").stdout
    assert "wrote root.json" in wt.run("fleetlite keys root init").stdout
    built = wt.run("fleetlite release build intent_classifier.tflite").stdout
    assert "intent v2 for raspberry-pi-4" in built
    wt.run("fleetlite release sign rel-v2/")
    verified = wt.run("fleetlite release verify rel-v2/").stdout
    assert "verifies against root.json and its smoke test passes here" in verified
    shown = wt.run("fleetlite release show rel-v2/").stdout
    assert "intent" in shown and "raspberry-pi-4" in shown

    # 1. the CA, the broker and its configuration
    guide_broker(wt, broker)

    # 6. the fleet side over TLS: two controllers of one group, then the enrolled gateways
    for name in ("DB", "BROKER", "TLS_CA", "TLS_CERT", "TLS_KEY"):
        wt.export(f"export FLEETLITE_{name}=")
    wt.start("fleetlite serve --id ctl-1", log=work / "ctl-1.log")
    wt.start("fleetlite serve --id ctl-2", log=work / "ctl-2.log")
    wait_connected(work / "ctl-1.log")
    wait_connected(work / "ctl-2.log")
    devices = ["gw-0001", "gw-0002"]
    for device_id in devices:
        enrol(wt, device_id, documented, work / "intent_classifier.tflite")
    with Fleet(store_db) as fleet:
        wait_until(lambda: len(fleet.devices(online=True)) == 2, 30,
                   "two gateways online:\n" + broker.read_log()[-3000:])
        wait_until(lambda: len(fleet.profile_rows("intent", 1)) >= 2, 60, "their v1 profiles")
    listed = wt.run("fleetlite devices list -o table").stdout
    for device_id in devices:
        assert re.search(rf"^{device_id}\s+raspberry-pi-4\s+online\s+intent v1\s", listed, re.M)
    commands_to_devices(wt, work, devices)

    operate_rollout(wt, store_db, devices)

    # revocation: gw-0001 is refused after the broker re-reads the CRL; gw-0002 carries on
    wt.run("fleetlite pki revoke")
    assert re.search(r"^device\s+gw-0001\s+\S+\s+revoked", wt.run("fleetlite pki list").stdout,
                     re.M)
    wt.run_plain(wt.resolve(wt.command("fleetlite broker-config")))
    refused = broker.read_log().count("certificate verify failed")
    broker.restart()
    with Fleet(store_db) as fleet:
        wait_until(lambda: broker.read_log().count("certificate verify failed") > refused, 30,
                   "the broker refusing gw-0001's certificate")
        wait_until(lambda: {d.device_id for d in fleet.devices(online=True)} == {"gw-0002"}, 30,
                   "gw-0002 back online, gw-0001 not")
    codes = wt.stop()
    assert all(code == 0 for group in codes.values() for code in group), codes
    # every connection was a certificate: each controller's and each device's own
    log = broker.read_log()
    assert all(f"u'{user}'" in log for user in
               ("controller:ctl-1", "controller:ctl-2", *devices)), log[-3000:]
    wt.assert_all_run()


@pytest.mark.parametrize("doc", ["benchmarks.md", "models.md"])
def test_tool_commands(doc: str, tmp_path: Path) -> None:
    """The benchmark and model-building commands, in a copy of the checkout's fixtures."""
    fixtures = tmp_path / "tests" / "fixtures" / "models"
    shutil.copytree(REPO / "tests" / "fixtures" / "models", fixtures)
    exempt = {"python -m fleetlite.tools.bench.bench_wire_delta":
              "a minute of 16 agent processes; tests/test_bench_wire_delta.py runs it with one "
              "device"} if doc == "benchmarks.md" else {
              "python -m fleetlite.tools.build_models --check tests/fixtures/models":
              "tests/test_models.py runs this very command on the fixtures, unchanged (exit 0) "
              "and with one changed (exit 1): two more full builds here took a minute"}
    wt = Walkthrough(REPO / "docs" / doc, tmp_path, {}, exempt=exempt)
    if doc == "benchmarks.md":
        inference = wt.run("python -m fleetlite.tools.bench.bench_inference").stdout
        assert "2000 runs" in inference and "local socket API" in inference
        # the breakdown accounts for the agent's imports step by step, numpy the largest
        added = dict(re.findall(r"^\| ([^|]+?) \| ([\d.]+) \| [\d.]+ \|$", inference, re.M))
        assert {"numpy", "cryptography (Ed25519 signature checks)"} <= set(added), inference
        assert float(added["numpy"]) == max(float(v) for k, v in added.items()
                                            if k != "python + psutil"), inference
        profiler = wt.run("python -m fleetlite.tools.bench.bench_profiler").stdout
        assert "intent_classifier" in profiler
        cli = wt.run("python -m fleetlite.tools.bench.bench_cli").stdout
        assert re.search(r"^\| fleetlite devices list \| \d+ \| [\d.]+x \|", cli, re.M), cli
        generate = wt.run("python -m fleetlite.tools.bench.bench_generate").stdout
        for model in ("home_lm.tflite", "home_lm_int8.tflite"):
            assert re.search(rf"^\| {re.escape(model)} \| 32 \+ 64 \| [\d.]+ \| [\d.]+ \| "
                             r"[\d.]+x \|", generate, re.M), generate
        delta = wt.run("python -m fleetlite.tools.bench.bench_delta").stdout
        # a 10% fine-tune travels in at most 15% of the full file, LM and int8 classifier alike
        for model in ("home_lm (float32 LM)", "int8_classifier"):
            rows = re.findall(rf"^\| {re.escape(model)} \| 10% \w+ \|.*$", delta, re.M)
            assert len(rows) == 2, delta
            for row in rows:  # percentages of the full file: xz, tensor delta, binary delta
                _xz, tensors, binary = (float(p) for p in re.findall(r"\(([\d.]+)%\)", row))
                assert min(tensors, binary) <= 15, row
        shadow = wt.run("python -m fleetlite.tools.bench.bench_shadow").stdout
        assert re.search(r"^\| alone \(baseline\) \| \d+ \|", shadow, re.M), shadow
        assert "100.0%" in shadow  # an identical candidate agrees on every sample
    else:
        before = {p.name: p.read_bytes() for p in fixtures.iterdir()}
        wt.run("python -m fleetlite.tools.build_models tests/fixtures/models")
        assert {p.name: p.read_bytes() for p in fixtures.iterdir()} == before  # bit for bit
    wt.assert_all_run()


def test_sdk_guide_ci_script(tmp_path: Path, broker: Mosquitto, models_dir: Path) -> None:
    """docs/sdk.md's shell version of the scripted rollout, as one script (it sets $ID)."""
    from tests.test_fleet_cli import Site
    from tests.test_ota_install import RELEASE_KEY

    work = tmp_path / "ci"
    work.mkdir()
    (work / "intent_v3.tflite").write_bytes(intent_classifier(seed=12).tflite)
    shutil.copy(models_dir / "intent_classifier.vocab.json", work / "intent.vocab.json")
    (work / "keys").mkdir()
    RELEASE_KEY.save(work / "keys" / "release.key")
    db = f"sqlite:///{tmp_path / 'fleet.db'}"
    site = Site(tmp_path, db, broker, models_dir,
                {"gw-a": {"site": "plant-a"}, "gw-b": {"site": "plant-a"},
                 "gw-c": {"site": "plant-b"}})
    try:
        site.wait_ready()
        wt = Walkthrough(REPO / "docs" / "sdk.md", work, site.env, exempt={
            "pip install 'fleetlite[fleet]'": "the venv running these tests is that install "
                                             "(tools/bootstrap.sh)"})
        script = wt.run("fleetlite release build", "fleetlite release push", "ID=$(",
                        "fleetlite rollout wait", then='echo "rollout $ID"')
        rollout_id = found(r"rollout (\S+)\s*$", script.stdout)
        assert state(db, rollout_id) == "completed"
        assert wait_until(lambda: versions(db) == {"gw-a": 3, "gw-b": 3, "gw-c": 1}, 20,
                          "births with v3 at site plant-a only")
        wt.assert_all_run()
    finally:
        site.close()


def test_every_document_with_commands_has_a_walkthrough() -> None:
    """A new document with shell commands needs a walkthrough here (or in the tests named)."""
    walked = {"README.md", "operator-guide.md", "benchmarks.md", "models.md",
              # quickstart.md: test_cli_basics.py (the --keep commands) + test_readme_demo.py
              "quickstart.md",
              "sdk.md", "language-models.md", "protocol.md"}
    with_commands = {doc.name for doc in DOCS if shell_commands(doc)}
    assert with_commands == walked


# --- docs/language-models.md ------------------------------------------------------------------

LM_GUIDE = REPO / "docs" / "language-models.md"
LM_FILES = ("home_lm.tflite", "home_lm_int8.tflite", "home_lm.spm.model")
TENSORFLOW = "needs TensorFlow, which is never a FleetLite dependency and is not in CI; " \
             "tests/test_lm_fixtures.py checks the files it made"


def lm_guide_commands() -> dict[str, str]:
    """Commands other documents share with the language-model guide, which its walkthrough runs
    (an exemption reason for those documents' walkthroughs)."""
    reason = "test_language_models_walkthrough runs it (docs/language-models.md shows it too)"
    return {command: reason for command in shell_commands(LM_GUIDE)
            if not command.startswith("python -m fleetlite.tools.train_lm")}


def python_block(doc: Path, marker: str) -> str:
    """The ```python block of ``doc`` that contains ``marker``."""
    blocks = [b for b in re.findall(r"```python\n(.*?)```", doc.read_text(), re.S) if marker in b]
    assert len(blocks) == 1, f"{doc.name}: {len(blocks)} python blocks contain {marker!r}"
    return blocks[0]


def run_exact(wt: Walkthrough, command: str, *, stdin: str | None = None,
              expect: tuple[int, ...] = (0,), timeout: float = 180) -> Any:
    """Run one documented command given whole (when it is the prefix of another, or is run
    twice), optionally with ``stdin`` (a conversation for `chat`); its exit code in ``expect``."""
    assert command in wt.commands, f"{wt.doc.name} shows no {command!r}"
    proc = subprocess.run(["bash", "-c", "set -eo pipefail\n" + wt.resolve(command)],
                          cwd=wt.cwd, env=wt.env, input=stdin, capture_output=True, text=True,
                          timeout=timeout, check=False)
    assert proc.returncode in expect, (
        f"{wt.doc.name}: {command} exited {proc.returncode}, expected {expect}\n"
        f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}")
    wt.ran.append(command)
    return proc


def lm_reply(prompt: str) -> str:
    """The project LM's reply to ``prompt`` as TensorFlow computed it (its reference file)."""
    from tests.test_generation import reference

    return str(next(c["reply"] for c in reference("home_lm")["prompts"] if c["prompt"] == prompt))


def lm_gateway(wt: Walkthrough, device_id: str, *, port: int, trust_root: Path,
               models_dir: Path) -> Path:
    """A gateway whose agent.yaml is the guide's (its LM files and socket at this machine's
    paths) on the test broker; its agent is started as `fleetlite-agent run` would be."""
    home = wt.cwd / device_id
    path = agent_config(home, device_id, port=port, trust_root=trust_root,
                        seed=models_dir / "intent_classifier.tflite")
    shown = found(r"```yaml\n(socket: .*?)```", LM_GUIDE.read_text())
    documented = yaml.safe_load(shown.replace("/var/lib/fleetlite/seed", str(wt.cwd))
                                .replace("/run/fleetlite/agent.sock", str(home / "agent.sock")))
    config = yaml.safe_load(path.read_text())
    config.update(documented)
    path.write_text(yaml.safe_dump(config))
    wt.start_plain(f"{sys.prefix}/bin/fleetlite-agent run --config agent.yaml", cwd=home,
                   log=home / "agent.log")
    return home


def test_language_models_walkthrough(tmp_path: Path, broker: Mosquitto, models_dir: Path) -> None:
    """The guide on the project's LM: check it locally, build and sign float + int8 with the
    tokenizer, one refused build, push and roll it out to two gateways (real agents, Mosquitto,
    a controller) whose agent.yaml also serves a local LM, then serve it: the CLI on the socket,
    `chat`, and the guide's and the local API doc's Python examples."""
    work = tmp_path / "lm"
    work.mkdir()
    for name in LM_FILES:
        shutil.copy(REPO / "tests" / "fixtures" / "lm" / name, work / name)
    db = f"sqlite:///{tmp_path / 'fleet.db'}"
    wt = Walkthrough(LM_GUIDE, work, {"FLEETLITE_DB": db,
                                      "FLEETLITE_BROKER": f"{broker.host}:{broker.port}"},
                     exempt={"python -m fleetlite.tools.train_lm OUTDIR": TENSORFLOW})
    try:
        walk_the_lm_guide(wt, db, broker, models_dir)
    finally:
        wt.stop()


def walk_the_lm_guide(wt: Walkthrough, db: str, broker: Mosquitto, models_dir: Path) -> None:
    work = wt.cwd
    kitchen, door = "turn off the kitchen lights", "lock the front door"

    # 2. check it on one machine: the file, its tokenizer and template
    local = wt.run("fleetlite-agent generate home_lm.tflite")
    assert local.stdout.strip() == lm_reply(kitchen), local.stdout
    assert "time to first token" in local.stderr and "stop: stop_token" in local.stderr
    piped = json.loads(wt.run('echo "lock the front door" |').stdout)
    assert piped["text"] == lm_reply(door) and piped["stop_reason"] == "stop_token", piped

    # 8. profiles (any time; they need only the file)
    table = run_exact(wt, "fleetlite-agent profile home_lm.tflite").stdout
    for shown in ("TTFT", "cold", "warm", "pp8 ", "pp32 ", "tg32 @ d16", "tg32 @ d64", "peak"):
        assert shown in table, f"{shown!r} not in:\n{table}"
    record = json.loads(run_exact(wt, "fleetlite-agent profile home_lm.tflite --json").stdout)
    assert record["schema"] == "fleetlite.profile/2", record["schema"]
    lm = record["lm"]
    assert (lm["num_layers"], lm["context_length"], lm["cache_layout"]) == (2, 128, "default")
    assert lm["ttft"]["warm_ms"]["mean"] > 0 and [p["tokens"] for p in lm["prefill"]] == [8, 32]
    assert record["memory"]["peak_rss_inference_mb"] > 0

    # 4. build and sign (the keys and root.json as the operator guide makes them: set-up)
    created = wt.run_plain("fleetlite keys create --role release --out keys/").stdout
    wt.subst["XXXX"] = found(r"keys/release-(\w+)\.key", created)
    wt.run_plain("fleetlite keys create --role root --out root-keys/\n"
                 "fleetlite keys root init --root-key root-keys/root-*.key "
                 "--release-key keys/release-*.pub --out root.json")
    built = wt.run("fleetlite release build home_lm.tflite home_lm_int8.tflite").stdout
    assert "built home-lm-v1: home-lm v1 for raspberry-pi-4" in built, built
    assert "home_lm.spm.model (tokenizer" in built and "stop ids [3]" in built, built
    assert "signed by" in built
    refused = wt.run("fleetlite release build home_lm.tflite --tokenizer", expect=1)
    assert "[ids_out_of_range]" in refused.stderr, refused.stderr
    assert not (work / "refused").exists()
    verified = wt.run("fleetlite release verify home-lm-v1").stdout
    assert verified.startswith("OK: home-lm v1 verifies against root.json"), verified
    shown_release = wt.run("fleetlite release show home-lm-v1").stdout
    assert re.search(r"home_lm\.spm\.model\s+tokenizer", shown_release), shown_release
    assert "variant home_lm_int8 (home_lm_int8.tflite)" in shown_release

    # 5. push and roll out to two gateways whose agent.yaml (7.) also serves a local LM
    wt.start_plain("fleetlite serve", log=work / "serve.log")
    gateways = ["gw-lm-1", "gw-lm-2"]
    homes = [lm_gateway(wt, device_id, port=broker.port, trust_root=work / "root.json",
                        models_dir=models_dir) for device_id in gateways]
    with Fleet(db) as fleet:
        wait_until(lambda: len(fleet.devices(online=True)) == 2, 120, "two gateways online")
    pushed = wt.run("fleetlite release push home-lm-v1").stdout
    wt.subst["RELEASE_ID"] = found(r"release id ([0-9a-f]{64})", pushed)
    created_rollout = wt.run("fleetlite rollout create RELEASE_ID --waves 1,100%").stdout
    wt.subst["ROLLOUT_ID"] = found(r"created rollout (\S+):", created_rollout)
    watch = wt.command("fleetlite rollout watch")
    watched = run_exact(wt, watch, timeout=240).stdout
    assert re.search(rf"{wt.subst['ROLLOUT_ID']}: completed, wave \d+ of \d+: 2 installed",
                     watched), watched
    assert "TTFT on class raspberry-pi-4: no baseline" in watched, watched
    with Fleet(db) as fleet:
        def lm_versions() -> dict[str, Any]:
            return {d.device_id: {m.name: m.version for m in d.models} for d in fleet.devices()}
        wait_until(lambda: all(v.get("home-lm") == 1 for v in lm_versions().values()), 120,
                   "births with home-lm v1")
        wait_until(lambda: len(fleet.profile_rows("home-lm", 1)) >= 2, 180, "both v1 profiles")
    shown_profiles = wt.run("fleetlite profiles show --model home-lm").stdout
    assert re.search(r"^raspberry-pi-4\s+home-lm\s+1\s+2\s+[\d.]+\s+[\d.]+\s+[\d.]+",
                     shown_profiles, re.M), shown_profiles

    # the next version with the LM gates (built as section 4 says: --version 2, set-up)
    build = wt.command("fleetlite release build home_lm.tflite home_lm_int8.tflite")
    wt.run_plain(wt.resolve(build.replace("--version 1", "--version 2")
                            .replace("--out home-lm-v1", "--out home-lm-v2")))
    pushed = wt.run("fleetlite release push home-lm-v2").stdout
    wt.subst["RELEASE_ID"] = found(r"release id ([0-9a-f]{64})", pushed)
    created_rollout = wt.run("fleetlite rollout create RELEASE_ID --waves 1,10%").stdout
    assert "home-lm v2 (baseline v1)" in created_rollout, created_rollout
    wt.subst["ROLLOUT_ID"] = found(r"created rollout (\S+):", created_rollout)
    gated = run_exact(wt, watch, expect=(0, 3), timeout=240)
    # the same model again: it completes, unless this busy machine's noise trips a gate
    if gated.returncode == 0:
        assert re.search(r"decode rate within limits on class raspberry-pi-4: .* for version 1",
                         gated.stdout), gated.stdout
    else:
        # its one class excluded by the gate, no device left on v2: rolled back or aborted
        assert state(db, wt.subst["ROLLOUT_ID"]) in ("rolled_back", "aborted"), gated.stdout
        assert re.search(r"(time to first token|decode rate) regressed on class raspberry-pi-4",
                         gated.stdout), gated.stdout
    compared = wt.run("fleetlite profiles compare home-lm 1 2").stdout
    assert "home-lm: v2 (B) against v1 (A)" in compared, compared
    assert re.search(r"^raspberry-pi-4\s", compared, re.M), compared

    # 7. serve it: the rolled-out release and the agent.yaml model, side by side on the socket
    wt.subst["/run/fleetlite/agent.sock"] = str(homes[0] / "agent.sock")
    wt.subst["/etc/fleetlite/agent.yaml"] = str(homes[0] / "agent.yaml")
    released = wt.run("fleetlite-agent generate home-lm --socket").stdout
    assert released.strip() == lm_reply(kitchen), released
    served_local = wt.run("fleetlite-agent generate home-lm-local --socket")
    assert served_local.stdout.strip() == lm_reply(door), served_local.stdout
    assert "time to first token" in served_local.stderr
    chat = wt.command("fleetlite-agent chat home-lm --config")
    chatted = run_exact(wt, chat, stdin=f"{kitchen}\n{door}\n").stdout.splitlines()
    assert len(chatted) == 2 and chatted[0] == lm_reply(kitchen), chatted
    for doc, marker in ((LM_GUIDE, "client.generate("),
                        (REPO / "docs" / "local-api.md", "client.generate(")):
        script = python_block(doc, marker).replace("/run/fleetlite/agent.sock",
                                                   str(homes[0] / "agent.sock"))
        printed = wt.run_plain(f"{sys.executable} - <<'PYTHON'\n{script}PYTHON").stdout
        expected = lm_reply(kitchen) if doc == LM_GUIDE else lm_reply(door)
        assert printed.splitlines()[0] == expected and "stop_token" in printed, printed
    codes = wt.stop()
    assert all(code == 0 for group in codes.values() for code in group), codes
    wt.assert_all_run()


# --- docs/protocol.md -------------------------------------------------------------------------


def test_protocol_json_schemas_walkthrough(tmp_path: Path) -> None:
    """The JSON Schemas section: the schemas are valid draft 2020-12, the doc's status vector
    passes and a broken one fails, the committed schemas are the generated ones."""
    protocol = REPO / "docs" / "protocol.md"
    shutil.copytree(REPO / "docs" / "schemas", tmp_path / "docs" / "schemas")
    vector = re.search(r"<!-- vector: Status -->\s*```json\n(.*?)\n```", protocol.read_text(),
                       re.S)
    assert vector is not None
    status = json.loads(vector.group(1))
    (tmp_path / "status.json").write_text(json.dumps(status))
    wt = Walkthrough(protocol, tmp_path, {})
    wt.run("check-jsonschema --check-metaschema")
    wt.run("check-jsonschema --schemafile")
    (tmp_path / "status.json").write_text(json.dumps({**status, "online": "yes"}))
    failed = wt.run_plain(wt.command("check-jsonschema --schemafile"), expect=1)
    assert "online" in failed.stdout + failed.stderr
    wt.run("python -m fleetlite.tools.gen_schemas --check")
    wt.assert_all_run()
