"""Commands from the fleet to devices, device events and the device lifecycle (issue 12): the
store's command log and event log on SQLite and PostgreSQL, the outcome of a command as the
operator sees it, the agent's fleet tag layer, and the whole path through a real broker, a
controller and real agent processes with the CLI (``fleetlite devices ping|info|profile|
ota-slots|tag|remove-model|decommission|history``, ``fleetlite events [--follow]``)."""

from __future__ import annotations

import json
import select
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from fleetlite.agent.commands import CommandArgumentError
from fleetlite.agent.fleet_tags import FleetTags
from fleetlite.fleet.device_commands import (
    ANSWERED,
    NO_ANSWER,
    NOT_SENT,
    OFFLINE,
    REFUSED,
    outcome_of,
    send_and_wait,
)
from fleetlite.fleet.errors import FleetError
from fleetlite.fleet.release_builder import build_release
from fleetlite.fleet.store import CommandRecord, Store, open_store
from fleetlite.sdk.messages import CommandResponse, Event
from fleetlite.sdk.trust import new_root, root_envelope
from tests.test_fleet_cli import FLEETLITE, cli
from tests.test_fleet_e2e import (  # noqa: F401 (site: the imported fixture)
    INTENT_DEVICES,
    Site,
    intent_v2,
    site,
    wait_until,
)
from tests.test_ota_install import ISSUED, RELEASE_KEY, ROOT_KEY
from tests.test_store import status


@pytest.fixture
def store(store_url: str) -> Any:
    with open_store(store_url) as s:
        yield s


def answer(device: str, command_id: str, ok: bool = True, **fields: Any) -> CommandResponse:
    return CommandResponse(id=command_id, device_id=device, ok=ok, ts=1.0, **fields)


# -- the store ---------------------------------------------------------------------------------


def test_a_queued_command_is_claimed_once_and_answered_only_by_its_device(store: Store) -> None:
    first = store.queue_command("gw-1", "ping", {}, timeout_s=30, origin="cli", now=100.0)
    second = store.queue_command("gw-2", "info", {"x": 1}, timeout_s=5, origin="cli", now=101.0)
    assert [c.command_id for c in store.commands_to_send(102.0)] == [first, second]
    assert [c.command_id for c in store.commands_to_send(106.5)] == [first]  # second expired
    assert store.mark_command_sent(first, 103.0)
    assert not store.mark_command_sent(first, 103.5)  # another controller claimed it first
    assert [c.command_id for c in store.commands_to_send(104.0)] == [second]
    # gw-2 cannot answer gw-1's command; gw-1 answers once
    assert not store.record_command_response("gw-2", answer("gw-2", first), received_at=104.0)
    assert store.record_command_response("gw-1", answer("gw-1", first, result={"pong": True}),
                                         received_at=104.25)
    assert not store.record_command_response("gw-1", answer("gw-1", first, ok=False,
                                                            error_code="failed"),
                                             received_at=105.0)
    assert not store.record_command_response("gw-1", answer("gw-1", "f" * 16),
                                             received_at=105.0)
    done, waiting = store.get_commands([first, second])
    assert (done.sent, done.answered, done.ok, done.result) == (103.0, 104.25, True,
                                                                {"pong": True})
    assert (waiting.sent, waiting.answered, waiting.args) == (None, None, {"x": 1})
    sent_by_rollout = store.queue_command("gw-1", "ota_install", {"release_id": "r"},
                                          timeout_s=60, origin="rollout r-1", sent=110.0,
                                          now=110.0)
    assert [c.command_id for c in store.command_history("gw-1")] == [sent_by_rollout, first]
    assert store.commands_to_send(111.0) == []  # already sent by its controller; gw-2's expired


def test_events_are_kept_per_device_up_to_a_bound_and_can_be_followed(store: Store) -> None:
    ids = [store.add_event(Event(device_id="gw-1", ts=float(n), kind="profile_failed",
                                 message=f"n={n}"), received_at=1000.0 + n, keep_per_device=10)
           for n in range(12)]
    assert ids == sorted(ids)
    other = store.add_event(Event(device_id="gw-2", ts=5.0, kind="command_rejected",
                                  message="refused", detail={"error_code": "bad_args"}),
                            received_at=1005.5)
    mine = store.events(device_ids=["gw-1"], limit=100)
    # pruned to the newest 10 once the bound was passed by more than a tenth (the 12th)
    assert [e.message for e in mine] == [f"n={n}" for n in range(2, 12)]
    store.add_event(Event(device_id="gw-1", ts=12.0, kind="k", message="n=12"),
                    received_at=1012.0, keep_per_device=10)
    assert [e.message for e in store.events(device_ids=["gw-1"])] == \
        [f"n={n}" for n in range(2, 13)]  # 11: within the bound and its tenth
    assert next(e.id for e in store.events(after_id=other)) > other  # following
    since = store.events(since=1005.5)  # in the order stored
    assert [e.message for e in since] == [f"n={n}" for n in range(6, 12)] + ["refused", "n=12"]
    assert since[-2].device_id == "gw-2" and since[-2].detail == {"error_code": "bad_args"}
    assert [e.message for e in store.events(limit=2)] == ["refused", "n=12"]  # the newest two
    assert store.events(device_ids=[]) == []


# -- outcomes ----------------------------------------------------------------------------------


def record(**fields: Any) -> CommandRecord:
    base: dict[str, Any] = {"command_id": "c1", "device_id": "gw-1", "command": "ping",
                            "args": {}, "origin": "cli", "created": 10.0, "expires": 40.0}
    return CommandRecord(**{**base, **fields})


@pytest.mark.parametrize("fields, online, state, text", [
    ({"sent": 10.5, "answered": 10.75, "ok": True, "result": {"pong": True}}, True, ANSWERED,
     "answered"),
    ({"sent": 10.5, "answered": 11.0, "ok": False, "error_code": "unknown_command",
      "error": "no such command"}, True, REFUSED, "refused (unknown_command): no such command"),
    ({"sent": 10.5}, True, NO_ANSWER, "online but no answer"),
    ({"sent": 10.5}, False, OFFLINE, "offline: not delivered"),
    ({}, True, NOT_SENT, "no controller picked it up"),
    ({}, None, OFFLINE, "the fleet never heard of it"),
])
def test_the_outcome_says_what_happened(fields: dict[str, Any], online: Any, state: str,
                                        text: str) -> None:
    got = outcome_of(record(**fields), online)
    assert got.state == state and text in got.text and got.ok == (state == ANSWERED)
    if state == ANSWERED:
        assert got.latency_s == 0.25 and got.to_dict()["result"] == {"pong": True}


def test_without_a_controller_a_command_is_reported_not_sent(store: Store) -> None:
    store.upsert_status(status("gw-1", True, 1, 1.0))
    [outcome] = send_and_wait(store, ["gw-1"], "ping", timeout_s=0.3, poll_s=0.05)
    assert outcome.state == NOT_SENT, outcome
    with pytest.raises(FleetError, match="unknown command 'reboot'"):
        send_and_wait(store, ["gw-1"], "reboot")
    with pytest.raises(FleetError, match="named twice"):
        send_and_wait(store, ["gw-1", "gw-1"], "ping")


# -- through a broker, a controller and real agents --------------------------------------------


def read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, f"no line within {timeout} s"
    return proc.stdout.readline()


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
def test_commands_and_events_through_a_real_fleet(
        site: Site, store_url: str, models_dir: Path,  # noqa: F811 (the imported fixture)
) -> None:
    site.start_agents(INTENT_DEVICES, "intent", models_dir / "intent_classifier.tflite")
    site.start_controllers(store_url, 1)
    wait_until(lambda: {d.device_id for d in site.store.list_devices(online=True)} ==
               set(INTENT_DEVICES), 40, "every device online")
    db = ["--db", store_url]
    pinged = json.loads(cli("devices", "ping", "--all", "-o", "json", *db).stdout)
    assert pinged["ok"] and [o["device_id"] for o in pinged["outcomes"]] == sorted(INTENT_DEVICES)
    assert all(o["state"] == "answered" and o["result"]["pong"] is True
               for o in pinged["outcomes"]), pinged
    slots = json.loads(cli("devices", "ota-slots", "--class", "raspberry-pi-4", "-o", "json",
                           *db).stdout)
    assert [(o["device_id"], o["result"]["models"]["intent"]["installed_version"])
            for o in slots["outcomes"]] == [("gw-pi-1", 1)]
    table = cli("devices", "info", "gw-x86-1", *db).stdout
    assert "gw-x86-1" in table and "answered" in table and "1 of 1 answered ok" in table
    # the agent's own file changed on the device: reload-config applies what it can live
    config = site.agents["gw-x86-1"].config
    written = yaml.safe_load(config.read_text())
    written["intervals"]["telemetry_s"] = 7
    config.write_text(yaml.safe_dump(written))
    reloaded = json.loads(cli("devices", "reload-config", "gw-x86-1", "-o", "json",
                              *db).stdout)
    assert reloaded["outcomes"][0]["result"] == {"reloaded": True,
                                                 "changed": ["telemetry_interval_s"]}, reloaded

    follow = subprocess.Popen([FLEETLITE, "events", "--follow", *db], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        # a refused command: exit 1, the device's reason, and an event
        refused = cli("devices", "profile", "gw-x86-2", "--model", "nope", *db, expect=1)
        assert "refused (failed): no active model named 'nope'" in refused.stdout, refused.stdout
        line = read_line(follow, 30)
        assert "gw-x86-2" in line and "command_rejected" in line and "nope" in line, line
    finally:
        follow.terminate()
        follow.communicate(timeout=10)
    events = json.loads(cli("events", "--device", "gw-x86-2", "--since", "10m", "-o", "json",
                            *db).stdout)["events"]
    assert [(e["kind"], e["detail"]["command"], e["detail"]["error_code"])
            for e in events] == [("command_rejected", "profile", "failed")]

    # a root rotation distributed to the fleet: each device's acceptance shown, once
    rotated = new_root([ROOT_KEY.public_key], [RELEASE_KEY.public_key],
                       expires=ISSUED + 10 * 365 * 86400, version=2)
    root_v2 = site.tmp_path / "root-v2.json"
    root_v2.write_bytes(root_envelope(rotated).sign(ROOT_KEY).to_json())
    distributed = json.loads(cli("keys", "root", "distribute", str(root_v2), "-o", "json",
                                 *db).stdout)
    assert {o["device_id"]: o["result"]["root_version"] for o in distributed["outcomes"]} == \
        dict.fromkeys(INTENT_DEVICES, 2)
    again = cli("devices", "update-root", "gw-x86-1", "--root", str(root_v2), *db, expect=1)
    assert "refused (failed)" in again.stdout and "gw-x86-1" in again.stdout

    # an unknown device and an offline one: exit 1, each said so
    site.agents["gw-pi-1"].stop()
    wait_until(lambda: not site.store.get_device("gw-pi-1").online,  # type: ignore[union-attr]
               30, "gw-pi-1 offline")
    mixed = cli("devices", "ping", "gw-x86-1", "gw-pi-1", "gw-nowhere", "--timeout", "2",
                "-o", "json", *db, expect=1)
    states = {o["device_id"]: o["state"] for o in json.loads(mixed.stdout)["outcomes"]}
    assert states == {"gw-x86-1": "answered", "gw-pi-1": "offline", "gw-nowhere": "offline"}
    history = json.loads(cli("devices", "history", "gw-x86-2", "-o", "json", *db).stdout)
    assert [(c["command"], c["origin"], c["ok"]) for c in history["commands"]] == [
        ("update_root", "cli", True), ("profile", "cli", False), ("ping", "cli", True)]
    # a device online but silent (its agent frozen): no answer within the timeout, exit 1
    frozen = site.agents["gw-x86-2"]
    assert frozen.proc is not None
    frozen.proc.send_signal(signal.SIGSTOP)
    try:
        silent = cli("devices", "ping", "gw-x86-2", "--timeout", "2", *db, expect=1)
    finally:
        frozen.proc.send_signal(signal.SIGCONT)
    assert "no answer" in silent.stdout and "0 of 1 answered ok" in silent.stdout, silent.stdout
    usage = cli("devices", "ping", *db, expect=2)
    assert "name the devices" in usage.stderr and "Traceback" not in usage.stderr


# -- device lifecycle: tags from the fleet, model removal, decommissioning ----------------------


def test_the_fleet_tag_layer_overrides_and_hides_agent_yaml_tags(tmp_path: Path) -> None:
    tags = FleetTags(tmp_path)
    configured = {"site": "berlin", "line": "1"}
    assert tags.effective(configured) == configured
    tags.apply({"line": "2", "owner": "ops"}, ["site"])
    assert tags.effective(configured) == {"line": "2", "owner": "ops"}
    assert FleetTags(tmp_path).effective(configured) == {"line": "2", "owner": "ops"}  # kept
    tags.apply({"site": "hamburg"}, [])
    assert tags.effective(configured) == {"line": "2", "owner": "ops", "site": "hamburg"}
    for bad_set, bad_remove, words in [
            ({"bad key": "x"}, [], "tag key 'bad key'"), ({"k": 7}, [], "must be a string"),
            ({"k": "x" * 257}, [], "at most 256"), ({}, [""], "tag key ''"),
            ({"k": "v"}, ["k"], "both set and removed"),
            ({f"k{n}": "v" for n in range(70)}, [], "at most 64 tags")]:
        with pytest.raises(CommandArgumentError, match=words):
            tags.apply(bad_set, bad_remove)
    assert tags.effective(configured)["site"] == "hamburg"  # nothing changed by a refusal
    (tmp_path / "fleet_tags.json").write_text("[not a layer")
    assert FleetTags(tmp_path).effective(configured) == configured  # damaged: agent.yaml's


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
def test_tags_model_removal_and_decommissioning_through_a_real_fleet(
        site: Site, store_url: str, models_dir: Path,  # noqa: F811 (the imported fixture)
) -> None:
    site.start_agents(INTENT_DEVICES, "intent", models_dir / "intent_classifier.tflite")
    site.start_controllers(store_url, 1)
    wait_until(lambda: len(site.store.list_devices(online=True)) == len(INTENT_DEVICES), 40,
               "every device online")
    db = ["--db", store_url]

    def device(device_id: str) -> Any:
        return site.store.get_device(device_id)

    # tags: set and removed from the fleet, learnt by the device, shown by the fleet
    tagged = json.loads(cli("devices", "tag", "gw-x86-1", "--set", "line=2", "--remove", "site",
                            "-o", "json", *db).stdout)
    assert tagged["outcomes"][0]["result"]["tags"] == {"line": "2"}
    wait_until(lambda: device("gw-x86-1").tags == {"line": "2"}, 20, "the new birth's tags")
    assert cli("devices", "list", "--tag", "line=2", "-o", "json", *db).stdout.count(
        '"device_id"') == 1
    refused = cli("devices", "tag", "gw-x86-1", "--set", "bad key=1", *db, expect=1)
    assert "refused (bad_args): tag key 'bad key'" in refused.stdout

    # a model removed: not served, gone from the birth, and not back after a restart
    removed = json.loads(cli("devices", "remove-model", "gw-x86-2", "--model", "intent", "-o",
                             "json", *db).stdout)
    assert removed["outcomes"][0]["result"]["removed"] == "intent"
    wait_until(lambda: device("gw-x86-2").models == (), 20, "a birth without the model")
    agent = site.agents["gw-x86-2"]
    agent.stop()
    agent.start()
    wait_until(lambda: device("gw-x86-2").online and device("gw-x86-2").session > 1, 40,
               "gw-x86-2 back")
    slots = site.ask("gw-x86-2", "ota_slots")
    assert slots["models"]["intent"]["removed"] is True and device("gw-x86-2").models == ()
    again = cli("devices", "remove-model", "gw-x86-2", "--model", "intent", *db, expect=1)
    assert "serves no model 'intent'" in again.stdout

    # decommissioned: out of lists and --all, history kept, back with --undo
    assert "gw-pi-1: decommissioned" in cli("devices", "decommission", "gw-pi-1", *db).stdout
    listed = json.loads(cli("devices", "list", "-o", "json", *db).stdout)["devices"]
    assert [d["device_id"] for d in listed] == ["gw-x86-1", "gw-x86-2"]
    gone = json.loads(cli("devices", "list", "--decommissioned", "-o", "json", *db).stdout)
    assert [d["device_id"] for d in gone["devices"]] == ["gw-pi-1"]
    assert "DECOMMISSIONED since" in cli("devices", "show", "gw-pi-1", *db).stdout
    pinged = json.loads(cli("devices", "ping", "--all", "-o", "json", *db).stdout)
    assert [o["device_id"] for o in pinged["outcomes"]] == ["gw-x86-1", "gw-x86-2"]
    assert [c["command"] for c in json.loads(cli(
        "devices", "history", "gw-x86-2", "-o", "json", *db).stdout)["commands"]] == \
        ["ping", "remove_model", "remove_model"]
    cli("devices", "decommission", "gw-pi-1", "--undo", *db)
    assert len(site.store.list_devices()) == len(INTENT_DEVICES)
    unknown = cli("devices", "decommission", "gw-nowhere", *db, expect=1)
    assert "no device 'gw-nowhere'" in unknown.stderr


def test_rolling_back_a_first_version_is_refused_or_removes_the_model(
        site: Site, store_url: str, models_dir: Path,  # noqa: F811 (the imported fixture)
) -> None:
    """A rollout of a model no device had (detector v1): its rollback is refused with the
    reason, and with ``--remove-model`` removes the model; either way ``devices list``,
    ``rollout list`` and ``rollout status`` agree, within a few seconds of the devices."""
    site.start_agents(INTENT_DEVICES, "intent", models_dir / "intent_classifier.tflite")
    site.start_controllers(store_url, 1)
    site.wait_for_fleet("intent", INTENT_DEVICES)
    db = ["--db", store_url]
    bundle = build_release([intent_v2(site.tmp_path)], name="detector", version=1,
                           device_classes=sorted(set(INTENT_DEVICES.values())), issued=ISSUED,
                           keys=[RELEASE_KEY])
    site.store.add_release(bundle.release_id, "detector", 1, bundle.envelope.to_json(),
                           dict(bundle.files), bundle.manifest.to_dict())
    cli("rollout", "create", bundle.release_id[:12], "--id", "ro-det", "--waves", "100%", *db)
    wait_until(lambda: site.settled("ro-det"), 120, "the detector rollout to complete")
    assert site.state("ro-det").state == "completed"

    def views() -> tuple[str, set[str], dict[str, list[int]]]:
        """The rollout's state in `rollout list`, its devices' statuses in `rollout status`,
        and each device's detector versions in `devices list`."""
        listed = json.loads(cli("rollout", "list", "-o", "json", *db).stdout)["rollouts"]
        status = json.loads(cli("rollout", "status", "ro-det", "-o", "json", *db).stdout)
        devices = json.loads(cli("devices", "list", "-o", "json", *db).stdout)["devices"]
        return (next(r["state"] for r in listed if r["rollout_id"] == "ro-det"),
                {d["status"] for d in status["devices"]},
                {d["device_id"]: [m["version"] for m in d["models"] if m["name"] == "detector"]
                 for d in devices})

    refused = cli("rollout", "rollback", "ro-det", *db, expect=1)
    assert "nothing to roll back to" in refused.stderr and "--remove-model" in refused.stderr
    assert views() == ("completed", {"installed"}, {d: [1] for d in INTENT_DEVICES})

    removed = cli("rollout", "rollback", "ro-det", "--remove-model", "--wait", "30", *db)
    assert "detector is removed from every device that installed v1" in removed.stdout
    wait_until(lambda: site.settled("ro-det"), 60, "every device's removal")
    wait_until(lambda: views() == ("rolled_back", {"rolled_back"},
                                   {d: [] for d in INTENT_DEVICES}), 30,
               "the three views to agree on the removal")
    assert site.final_statuses(bundle.release_id) == {
        d: ["installed", "rolled_back"] for d in INTENT_DEVICES}
    # the model the devices had before is untouched
    assert set(site.model_versions("intent").values()) == {1}


def test_the_command_history_is_kept_per_device_up_to_a_bound(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    from fleetlite.fleet import store as store_module

    monkeypatch.setattr(store_module, "_COMMANDS_PER_DEVICE", 10)
    ids = [store.queue_command("gw-1", "ping", {}, timeout_s=30, now=100.0 + n)
           for n in range(12)]
    other = store.queue_command("gw-2", "ping", {}, timeout_s=30, now=50.0)
    kept = [c.command_id for c in store.command_history("gw-1", limit=100)]
    assert kept == list(reversed(ids[2:]))  # the newest 10, once 12 passed 10 and a tenth
    assert [c.command_id for c in store.command_history("gw-2")] == [other]
