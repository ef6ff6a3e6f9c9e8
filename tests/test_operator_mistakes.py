"""Operator mistakes (issue 12): each ends with a message that names the problem and the file,
exit code 1 or 2, and no traceback. Table-driven through the real ``fleetlite`` and
``fleetlite-agent`` commands on real files and a real SQLite store; add a row for each mistake
found."""

from __future__ import annotations

import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from fleetlite.fleet.release_builder import build_release
from fleetlite.fleet.store import open_store
from fleetlite.sdk.keys import SigningKey
from tests.conftest import MODELS, REPO
from tests.test_store import birth, status

BIN = REPO / ".venv" / "bin"
FLEETLITE = shutil.which("fleetlite") or str(BIN / "fleetlite")
AGENT = shutil.which("fleetlite-agent") or str(BIN / "fleetlite-agent")


@dataclass(frozen=True)
class Mistake:
    command: str  # a shell line; {store} is a SQLite store with a device, {dir} a directory
    code: int
    says: tuple[str, ...]  # in stderr (or stdout for usage), file names resolved
    leaves_out: str = ""  # a path that must not exist afterwards


MISTAKES = {
    "a directory as the store": Mistake(
        "fleetlite devices list --db {dir}", 1, ("cannot open the SQLite store {dir}",)),
    "a store that does not exist": Mistake(
        "fleetlite rollout list --db {dir}/typo.db", 1, ("no fleet store at {dir}/typo.db",),
        leaves_out="{dir}/typo.db"),
    "the report written to a directory": Mistake(
        "fleetlite report --html {dir} --db {store}", 1,
        ("{dir} is a directory: give the report a file name",)),
    "the report in a directory that does not exist": Mistake(
        "fleetlite report --html {dir}/nope/fleet.html --db {store}", 1,
        ("the directory {dir}/nope does not exist",), leaves_out="{dir}/nope"),
    "a bundle that does not exist": Mistake(
        "fleetlite release push {dir}/missing.flb --db {store}", 1, ("{dir}/missing.flb",)),
    "a directory as the root to distribute": Mistake(
        "fleetlite devices update-root gw-1 --root {dir} --db {store}", 1,
        ("cannot read the root {dir}: Is a directory",)),
    "a bare number as a duration": Mistake(
        "fleetlite events --since 10 --db {store}", 2, ("'10' has no unit; write e.g. 10d",)),
    "a command to no device": Mistake(
        "fleetlite devices ping --db {store}", 2, ("name the devices",)),
    "a tag change without a change": Mistake(
        "fleetlite devices tag gw-1 --db {store}", 2, ("--set KEY=VALUE and/or --remove KEY",)),
    "a rollout that does not exist": Mistake(
        "fleetlite rollout status nope --db {store}", 1, ("no rollout 'nope'",)),
    "decommissioning an unknown device": Mistake(
        "fleetlite devices decommission gw-nowhere --db {store}", 1, ("no device 'gw-nowhere'",)),
    "an unknown health address": Mistake(
        "fleetlite serve --health nowhere --db {store}", 1, ("cannot read the health address",)),
    "a model file that does not exist": Mistake(
        "fleetlite-agent profile {dir}/missing.tflite", 1,
        ("{dir}/missing.tflite: no such model file",)),
    "a directory as a model": Mistake(
        "fleetlite-agent check {dir}", 1, ("{dir}: is a directory",)),
    "a public key into a directory that does not exist": Mistake(
        "fleetlite keys public {key} --out {dir}/nope/release.pub", 1,
        ("{dir}/nope: no such directory",), leaves_out="{dir}/nope"),
    "a root into a directory that does not exist": Mistake(
        "fleetlite keys root init --root-key {root_key} --release-key {key} "
        "--out {dir}/nope/root.json", 1, ("{dir}/nope: no such directory",),
        leaves_out="{dir}/nope"),
    "a bundle file into a directory that does not exist": Mistake(
        "fleetlite release build {model} --name kws --version 1 --device-class raspberry-pi-4 "
        "--out {dir}/nope/kws.flb", 1, ("{dir}/nope: no such directory",),
        leaves_out="{dir}/nope"),
    "a release signed with a root key": Mistake(
        "fleetlite release build {model} --name kws --version 1 --device-class raspberry-pi-4 "
        "--key {root_key} --out {dir}/signed-by-root", 1,
        ("{root_key}: a root key given as --key, not a release key",),
        leaves_out="{dir}/signed-by-root"),
    "a root made with the roles swapped": Mistake(
        "fleetlite keys root init --root-key {key} --release-key {root_key} "
        "--out {dir}/swapped.json", 1, ("{key}: a release key given as --root-key",
                                         "were the two swapped?"),
        leaves_out="{dir}/swapped.json"),
    "a device class no profile defines": Mistake(
        "fleetlite release build {model} --name kws --version 1 --device-class raspbery-pi-4 "
        "--out {dir}/typo", 1, ("'raspbery-pi-4'", "did you mean 'raspberry-pi-4'?"),
        leaves_out="{dir}/typo"),
    "an expiry without a unit": Mistake(
        "fleetlite release build {model} --name kws --version 1 --device-class raspberry-pi-4 "
        "--expires-in 30 --out {dir}/no-unit", 2, ("'30' has no unit; write e.g. 30d",),
        leaves_out="{dir}/no-unit"),
    "a refused push into a store that does not exist yet": Mistake(
        "fleetlite release push {unsigned} --db {dir}/new.db", 1,
        ("is unsigned: sign it with `fleetlite release sign",), leaves_out="{dir}/new.db"),
    "output cut short by a closed pipe": Mistake(
        "fleetlite devices list -o json --db {store} | head -c 10 >/dev/null; "
        "exit ${{PIPESTATUS[0]}}", 0, ()),
}


@pytest.fixture(scope="module")
def places(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("mistakes")
    directory = root / "adir"
    directory.mkdir()
    db = root / "fleet.db"
    with open_store(db) as store:
        now = time.time()
        # enough devices that `devices list -o json` outgrows a pipe's buffer (64 KiB)
        with store.batch():
            for n in range(600):
                store.upsert_status(status(f"gw-{n}", True, 1, now))
                store.upsert_birth(birth(f"gw-{n}", 1, now))
    keys = root / "keys"
    keys.mkdir()
    release_key = SigningKey.generate(role="release").save(keys / "release.key")
    root_key = SigningKey.generate(role="root").save(keys / "root.key")
    unsigned = root / "unsigned-bundle"
    build_release([MODELS / "intent_classifier.tflite"], name="kws", version=1,
                  device_classes=["raspberry-pi-4"]).write_dir(unsigned)
    return {"dir": str(directory), "store": str(db), "key": str(release_key),
            "unsigned": str(unsigned),
            "root_key": str(root_key), "model": str(MODELS / "intent_classifier.tflite")}


@pytest.mark.parametrize("name", list(MISTAKES))
def test_an_operator_mistake_is_one_clear_message(name: str, places: dict[str, str]) -> None:
    mistake = MISTAKES[name]
    line = mistake.command.format(**places).replace("fleetlite-agent ", f"{AGENT} ", 1)
    if line.startswith("fleetlite "):
        line = FLEETLITE + line[len("fleetlite"):]
    done = subprocess.run(["bash", "-c", line], capture_output=True, text=True, timeout=120,
                          check=False)
    said = done.stderr + done.stdout
    assert done.returncode == mistake.code, (name, done.returncode, said)
    assert "Traceback" not in said and "Exception ignored" not in said, (name, said)
    for words in mistake.says:
        assert words.format(**places) in said, (name, said)
    if mistake.code:
        errors = [x for x in done.stderr.splitlines() if "error" in x]
        assert len(errors) == 1, (name, done.stderr)  # one message, not a cascade
    if mistake.leaves_out:
        assert not Path(mistake.leaves_out.format(**places)).exists(), name


def test_an_out_directory_the_command_creates_is_said(tmp_path: Path) -> None:
    """``--out DIR`` may make DIR and its missing parents, never silently."""
    out = tmp_path / "fleet" / "keys"
    done = subprocess.run([FLEETLITE, "keys", "create", "--role", "release", "--out", str(out)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == (f"created directory {out} (and its missing parent "
                                   f"{tmp_path / 'fleet'})")
    assert len(list(out.glob("release-*.key"))) == 1
    again = subprocess.run([FLEETLITE, "keys", "create", "--role", "release", "--out", str(out)],
                           capture_output=True, text=True, timeout=120, check=False)
    assert again.returncode == 0 and again.stderr == "", again.stderr
