"""What the fleet CLI prints never shows internal values (issue 12): no ``None``, no empty
names, no raw epoch seconds, whatever the store holds -- a device that never sent its birth, a
rollout never driven, a command never answered, an event with an empty message. Each reading
command runs through the real ``fleetlite`` on a real SQLite store in its table output (JSON
output is for programs and keeps the values)."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fleetlite.fleet.gates import GateSpec
from fleetlite.fleet.rollout import SENT, RolloutSpec, Selector, parse_waves
from fleetlite.fleet.store import open_store
from fleetlite.fleet.terminal_text import for_terminal, one_line
from fleetlite.sdk.messages import CommandResponse, Event
from tests.conftest import REPO
from tests.test_store import add_release, birth, profile, status, telemetry

FLEETLITE = shutil.which("fleetlite") or str(REPO / ".venv" / "bin" / "fleetlite")
RELEASE = "a" * 64
HOSTILE = "\x1b]0;owned\x07\x1b[31mred\nFAKE LINE\r\x9b2J\u2028end"

#: a number of seconds since 1970 between 2001 and 2286, printed as is
RAW_EPOCH = re.compile(r"(?<![\d.])[1-9]\d{9}(\.\d+)?(?![\d])")
#: what a terminal acts on: C0 controls but tab and newline, DEL, C1 controls
TERMINAL_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
#: an empty name: quotes or brackets with nothing between them
EMPTY_NAME = re.compile(r"''|\"\"|\(\)|\[\]|\{\}|``")


@pytest.fixture(scope="module")
def store_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("wording") / "fleet.db"
    now = time.time()
    with open_store(path) as store:
        store.upsert_status(status("gw-bare", True, 1, now))  # never sent a birth
        store.upsert_status(status("gw-full", False, 2, now - 60, reason="lost"))
        store.upsert_birth(birth("gw-full", 2, now - 120))
        store.record_telemetry(telemetry("gw-full", 2, 1, now - 100))
        store.add_profile(profile("gw-full", ts=now - 90, version=3))
        add_release(store, RELEASE, "kws", 4)
        for rollout_id in ("ro-new", "ro-going"):
            spec = RolloutSpec(rollout_id=rollout_id, release_id=RELEASE, model="kws", version=4,
                               previous_version=None, selector=Selector(),
                               waves=parse_waves("1,100%"), wave_timeout_s=600,
                               gates=GateSpec(), chunk_size=4096)
            store.create_rollout(rollout_id, RELEASE, spec.to_dict())  # never driven: no state
        store.set_device_progress("ro-going", "gw-full", wave=0, status=SENT)
        store.queue_command("gw-bare", "ping", {}, timeout_s=30, now=now)  # never answered
        store.add_event(Event(device_id="gw-full", ts=now - 30, kind="command_rejected",
                              message=""), received_at=now - 30)
        store.add_event(Event(device_id="gw-bare", ts=now - 10, kind="model_error",
                              message="the model failed", detail={"model": "kws"}),
                        received_at=now - 10)
        # a hostile device: a terminal title, a colour, a fake line and a one-byte CSI
        store.upsert_status(status("gw-evil", True, 1, now, reason=HOSTILE))
        store.upsert_birth(birth("gw-evil", 1, now, facts={"os": HOSTILE}))
        store.add_event(Event(device_id="gw-evil", ts=now, kind="model_error",
                              message=HOSTILE), received_at=now)
        for ok in (True, False):
            command_id = store.queue_command("gw-evil", "info", {}, timeout_s=30, sent=now,
                                             now=now)
            store.record_command_response("gw-evil", CommandResponse(
                id=command_id, device_id="gw-evil", ok=ok, ts=now,
                result={"agent": HOSTILE, "model": None} if ok else {},
                error_code="" if ok else "bad_args", error="" if ok else HOSTILE),
                received_at=now)
    return path


READING_COMMANDS = [
    "devices list",
    "devices list --offline",
    "devices show gw-bare",
    "devices show gw-full",
    "devices history gw-bare",
    "devices history gw-full",
    "rollout list",
    "rollout status ro-new",
    "rollout status ro-going",
    "events",
    "events --device gw-bare",
    "devices show gw-evil",
    "events --device gw-evil",
    "devices history gw-evil",
    "release list",
    "profiles show",
    "profiles show --model kws",
]


@pytest.mark.parametrize("command", READING_COMMANDS)
def test_table_output_shows_no_internal_values(command: str, store_file: Path) -> None:
    done = subprocess.run([FLEETLITE, *command.split(), "--db", str(store_file)],
                          capture_output=True, text=True, timeout=120, check=False)
    said = done.stdout + done.stderr
    assert done.returncode == 0, (command, said)
    assert done.stdout.strip(), command
    assert "None" not in said and "null" not in said, (command, said)
    assert not RAW_EPOCH.search(said), (command, said)
    assert not EMPTY_NAME.search(said), (command, said)
    # what a device sent cannot drive the operator's terminal or fake a line of the table
    assert not TERMINAL_CONTROL.search(done.stdout), (command, done.stdout)
    assert not [line for line in done.stdout.splitlines() if line.startswith("FAKE")]
    assert "\u2028" not in done.stdout
    if "gw-evil" in command:
        assert "\\x1b]0;owned\\x07\\x1b[31mred\\nFAKE LINE" in done.stdout, done.stdout


@given(st.text())
def test_text_made_for_the_terminal_has_no_control_characters(text: str) -> None:
    assert not TERMINAL_CONTROL.search(one_line(text))
    assert "\n" not in one_line(text) and "\u2028" not in one_line(text)
    assert not TERMINAL_CONTROL.search(for_terminal(text).replace("\n", ""))
    assert for_terminal("a\tb\nc") == "a\tb\nc" and one_line("a\nb") == "a\\nb"
