"""Faults of the controller in the middle of a rollout (issue 15), with a real Mosquitto, a
``fleetlite serve`` process (``python -m fleetlite.fleet.controller``), a SQLite store and real
agent processes; each ends with what the operator sees in ``rollout status`` and ``devices
list`` (the CLI), the devices' own answers and their published statuses agreeing:

- the controller stopped (SIGSTOP) for 15 s as its install commands go out: the devices take
  the release from the broker (its chunks are retained) or, for chunks not published yet, wait
  for the release publisher rather than fail, and each installs once;
- the store made unwritable (``chattr +i``) as the install commands go out, for the whole
  install: the devices' statuses are kept and stored once it is writable, and the rollout
  completes instead of showing devices in flight;
- a device whose disk (its state directory on a small tmpfs) cannot hold the release: it says
  ``disk_full`` up front, keeps serving version 1 and keeps no file of the release, and the
  rollout shows it failed with that reason while the other devices install; once it has room,
  ``fleetlite devices retry`` installs it and every view follows the device to version 2.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any, Optional

import pytest

from fleetlite.sdk import topics
from fleetlite.sdk.messages import OtaStatus
from fleetlite.sdk.ota_messages import ChunkRequest
from tests.mqtt_harness import Collector, Received
from tests.test_fleet_cli import cli
from tests.test_fleet_e2e import (  # noqa: F401 (site: the imported fixture)
    INTENT_DEVICES,
    ControllerProcess,
    Site,
    intent_v2,
    site,
    wait_until,
    wave_spec,
)

# The controller is stopped for longer than a download waited before a device gave up with
# download_stalled (10 unanswered requests 1 s apart), and well within what it waits now: the
# agents' default stall rule, with a 1 s idle time instead of 5 s to keep this short.
# FLEETLITE_FAULT_PAUSE_S=60 runs the one-minute freeze with the default 5 s.
PAUSE_S = float(os.environ.get("FLEETLITE_FAULT_PAUSE_S", "15"))
OTA = {"health_inferences": 3, "health_timeout_s": 0.5,
       "chunk_idle_s": 1.0 if PAUSE_S < 30 else 5.0}


def start_rollout(fleet: Site, store_url: str, models_dir: Path, rollout_id: str,
                  small_disk: Optional[str] = None) -> tuple[ControllerProcess, str]:
    """Agents, a controller process and a one-wave rollout of intent v2 to every device;
    returns once the controller published every install command. ``small_disk``: a device
    whose state directory is a 96 KiB tmpfs (skips where mounting is not allowed)."""
    if small_disk is not None:
        state = fleet.tmp_path / small_disk / "state"
        state.mkdir(parents=True)
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(state)],
                                 capture_output=True, check=False)
        if mounted.returncode != 0:
            pytest.skip("mounting a small tmpfs as a device's state dir needs root (CI runs as "
                        f"root): {mounted.stderr.decode().strip()}")
    fleet.start_agents(INTENT_DEVICES, "intent", models_dir / "intent_classifier.tflite", ota=OTA)
    controller = ControllerProcess(
        fleet.tmp_path, "controller", ["--db", store_url, "--broker",
                                      f"{fleet.broker.host}:{fleet.broker.port}", "--id",
                                      "ctl-main", "--tick", "0.2"])
    try:
        fleet.wait_for_fleet("intent", INTENT_DEVICES)
        bundle = fleet.add_release(intent_v2(fleet.tmp_path), "intent", INTENT_DEVICES)
        spec = wave_spec(rollout_id, bundle, "intent", "100%")
        fleet.store.create_rollout(rollout_id, bundle.release_id, spec.to_dict())

        def install_command(m: Received) -> bool:
            return json.loads(m.payload).get("command") == "ota_install"

        assert fleet.collector is not None
        fleet.collector.wait_for("/" + topics.COMMAND, count=len(INTENT_DEVICES), timeout=60,
                                predicate=install_command)
    except BaseException:
        controller.stop()
        raise
    return controller, bundle.release_id


def check_views_agree(fleet: Site, store_url: str, rollout_id: str, release_id: str) -> None:
    """The rollout completed with every device installed once, as the CLI, the store, the
    devices' statuses and the devices themselves say."""
    wait_until(lambda: set(fleet.model_versions("intent").values()) == {2}, 30,
               "births with version 2")
    status = json.loads(cli("rollout", "status", rollout_id, "--db", store_url,
                            "-o", "json").stdout)
    assert status["state"] == "completed", status
    assert {d["device_id"]: d["status"] for d in status["devices"]} == \
        dict.fromkeys(INTENT_DEVICES, "installed")
    assert [(w["installed"], w["failed"], w["in_flight"]) for w in status["waves"]] == \
        [(len(INTENT_DEVICES), 0, 0)]
    listed = json.loads(cli("devices", "list", "--db", store_url, "-o", "json").stdout)
    versions = {d["device_id"]: [m["version"] for m in d["models"] if m["name"] == "intent"]
                for d in listed["devices"]}
    assert versions == {d: [2] for d in INTENT_DEVICES}
    assert fleet.installs_sent() == Counter(dict.fromkeys(INTENT_DEVICES, 1))
    assert fleet.final_statuses(release_id) == {d: ["installed"] for d in INTENT_DEVICES}
    for device in INTENT_DEVICES:
        slots = fleet.ask(device, "ota_slots")
        assert slots["job"] is None and slots["models"]["intent"]["installed_version"] == 2, \
            slots


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
def test_a_controller_stopped_mid_download_is_waited_for_and_every_view_agrees(
        site: Site, store_url: str, models_dir: Path,  # noqa: F811 (the imported fixture)
) -> None:
    requests = Collector(site.broker.host, site.broker.port,
                         [topics.fleet_subscription(topics.OTA_REQUEST)],
                         client_id=f"requests-{uuid.uuid4().hex[:6]}").start()
    controller: Optional[ControllerProcess] = None
    try:
        # stopped as its install commands go out: the manifest is on the broker (published
        # before the command), and the chunks the publisher got out before the stop
        controller, release_id = start_rollout(site, store_url, models_dir, "r-stop")
        controller.proc.send_signal(signal.SIGSTOP)
        stopped_at = time.time()
        time.sleep(PAUSE_S)  # the fault's length, not a wait for an event
        assert site.collector is not None
        during = [OtaStatus.from_json(m.payload)
                  for m in site.collector.on_topic("/" + topics.OTA_STATUS)]
        asked = [ChunkRequest.from_json(m.payload)
                 for m in requests.on_topic("/" + topics.OTA_REQUEST) if m.at > stopped_at]
        controller.proc.send_signal(signal.SIGCONT)
        # each device had the whole release from the broker, or asked again and again for
        # what it lacked while the controller was stopped; none gave up
        for device_id in INTENT_DEVICES:
            mine = [r for r in asked if r.device_id == device_id]
            assert any(r.done for r in mine) or len(mine) >= 3, (device_id, mine)
        assert not [s for s in during if s.final and s.outcome != "installed"], \
            [(s.device_id, s.reason) for s in during]
        wait_until(lambda: site.settled("r-stop"), 120, "the rollout to settle after SIGCONT")
        result = controller.terminate()
    finally:
        if controller is not None:
            controller.proc.send_signal(signal.SIGCONT)
            controller.stop()
        requests.stop()
    assert result["counters"]["commands_resent"] == 0, result
    check_views_agree(site, store_url, "r-stop", release_id)


def chattr(flag: str, *paths: Path) -> None:
    subprocess.run(["chattr", flag, *map(str, paths)], check=True, capture_output=True)


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
def test_a_store_unwritable_during_the_installs_loses_no_outcome(
        site: Site, store_url: str, models_dir: Path,  # noqa: F811 (the imported fixture)
) -> None:
    db = Path(store_url.removeprefix("sqlite:///"))
    files = (db, db.with_name(db.name + "-wal"))  # not -shm: it is mapped (SIGBUS)
    try:
        chattr("+i", *files)
        chattr("-i", *files)
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"cannot make files immutable here (chattr: {exc}); the fault needs it")
    controller: Optional[ControllerProcess] = None
    result: dict[str, Any] = {}
    try:
        controller, release_id = start_rollout(site, store_url, models_dir, "r-ro")
        chattr("+i", *files)
        try:
            assert site.collector is not None
            # every device installs while the store cannot record it
            site.collector.wait_for("/" + topics.OTA_STATUS, count=len(INTENT_DEVICES),
                                    timeout=120, predicate=lambda m: OtaStatus.from_json(
                                        m.payload).final)
        finally:
            chattr("-i", *files)
        wait_until(lambda: site.settled("r-ro"), 120, "the rollout to settle once writable")
        result = controller.terminate()
    finally:
        chattr("-i", *files)
        if controller is not None:
            controller.stop()
    log = (site.tmp_path / "controller.log").read_text()
    assert log.count("the store cannot be written") == 1, log[-3000:]
    assert log.count("takes writes again") == 1, log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    assert result["counters"]["kept_for_store"] >= len(INTENT_DEVICES), result
    assert result["counters"]["lost_store_down"] == 0, result
    check_views_agree(site, store_url, "r-ro", release_id)


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
def test_a_device_without_room_for_the_release_fails_it_truthfully(
        site: Site, store_url: str, models_dir: Path,  # noqa: F811 (the imported fixture)
) -> None:
    full, others = "gw-pi-1", sorted(set(INTENT_DEVICES) - {"gw-pi-1"})
    state = site.tmp_path / full / "state"
    controller: Optional[ControllerProcess] = None
    try:
        controller, release_id = start_rollout(site, store_url, models_dir, "r-full",
                                               small_disk=full)
        wait_until(lambda: all(d.status in ("installed", "failed")
                               for d in site.state("r-full").devices.values()), 120,
                   "every device's outcome")
        controller.terminate()
        status = json.loads(cli("rollout", "status", "r-full", "--db", store_url,
                                "-o", "json").stdout)
        # a failure over the threshold (0 %) pauses the rollout for the operator to decide
        assert status["state"] == "paused" and "disk_full x1" in status["reason"], status
        by_device = {d["device_id"]: (d["status"], d["code"]) for d in status["devices"]}
        assert by_device == {full: ("failed", "disk_full"),
                             **{d: ("installed", "") for d in others}}, by_device
        listed = json.loads(cli("devices", "list", "--db", store_url, "-o", "json").stdout)
        assert {d["device_id"]: [m["version"] for m in d["models"]]
                for d in listed["devices"]} == {full: [1], **{d: [2] for d in others}}
        finals = site.final_statuses(release_id)
        assert finals == {full: ["failed"], **{d: ["installed"] for d in others}}, finals
        slots = site.ask(full, "ota_slots")
        assert slots["job"] is None and slots["models"]["intent"]["active"] is None, slots
        staging = state / "ota" / "staging"
        assert not staging.exists() or not any(staging.iterdir())
        assert not (state / "models" / "intent").exists() or not any(
            (state / "models" / "intent").iterdir())

        # room made, `devices retry` runs the install again (a plain re-send would answer
        # with the remembered disk_full), and every view follows the device to version 2
        subprocess.run(["mount", "-o", "remount,size=16m", str(state)], check=True)
        controller = ControllerProcess(
            site.tmp_path, "controller-2", ["--db", store_url, "--broker",
                                            f"{site.broker.host}:{site.broker.port}", "--id",
                                            "ctl-main", "--tick", "0.2"])
        retried = json.loads(cli("devices", "retry", full, "--release", release_id[:12],
                                 "--db", store_url, "-o", "json").stdout)
        assert [(o["device_id"], o["state"], o["result"]) for o in retried["outcomes"]] == \
            [(full, "answered", {"accepted": True})], retried
        wait_until(lambda: site.final_statuses(release_id).get(full) == ["failed", "installed"],
                   120, f"{full}'s install after the retry")
        wait_until(lambda: set(site.model_versions("intent").values()) == {2}, 30,
                   "births with version 2")
        wait_until(lambda: device_status(store_url, "r-full", full) == ("installed", ""), 30,
                   "the rollout to show the retried install")
        listed = json.loads(cli("devices", "list", "--db", store_url, "-o", "json").stdout)
        assert {d["device_id"]: [m["version"] for m in d["models"]]
                for d in listed["devices"]} == {d: [2] for d in INTENT_DEVICES}
    finally:
        if controller is not None:
            controller.stop()
        site.close()  # the agent first: its state directory is about to be unmounted
        subprocess.run(["umount", "-l", str(state)], check=False)


def device_status(store_url: str, rollout_id: str, device_id: str) -> tuple[str, str]:
    """A device's (status, code) in ``fleetlite rollout status``."""
    status = json.loads(cli("rollout", "status", rollout_id, "--db", store_url,
                            "-o", "json").stdout)
    by_device = {d["device_id"]: (d["status"], d["code"]) for d in status["devices"]}
    return by_device.get(device_id, ("-", ""))
