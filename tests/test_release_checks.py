"""Keys and releases are checked where the mistake is made (issue 12.5): through the real
``fleetlite`` command (its ``main()``), with real key files, bundles and a real SQLite store.

Each refusal is one line on stderr that says what to do, exit code 1 (or 2 for a usage error),
no traceback, and nothing written."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from fleetlite.fleet.cli import main
from fleetlite.fleet.release_builder import build_release
from fleetlite.fleet.store import open_store
from fleetlite.sdk.keys import SigningKey

CLASS = "raspberry-pi-4"


class Run:
    """``fleetlite ARGS`` in-process, in a work directory with its own CLI config."""

    def __init__(self, work: Path, capsys: pytest.CaptureFixture[str]) -> None:
        self.work = work
        self.capsys = capsys
        self.db = f"sqlite:///{work / 'fleet.db'}"

    def __call__(self, *args: str, code: int = 0) -> tuple[str, str]:
        self.capsys.readouterr()
        try:
            result = main(list(args))
        except SystemExit as exc:  # argparse usage errors
            result = int(exc.code or 0)
        out, err = self.capsys.readouterr()
        assert result == code, f"exit {result}\nstdout: {out}\nstderr: {err}"
        assert "Traceback" not in out + err
        return out, err

    def refused(self, *args: str, code: int = 1) -> str:
        """Run a command that must fail; return its one-line message."""
        _, err = self(*args, code=code)
        lines = err.strip().splitlines()
        assert lines, "no message"
        if code == 1:  # one line, after at most a note that a new store was created
            assert all(line.startswith("note:") for line in lines[:-1]), err
        return lines[-1]

    def stored_releases(self) -> list[str]:
        store = open_store(self.db)
        try:
            return [r.release_id for r in store.list_releases()]
        finally:
            store.close()


@pytest.fixture
def run(tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> Iterator[Run]:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FLEETLITE_CONFIG", str(tmp_path / "config" / "config.yaml"))
    for name in ("FLEETLITE_ROOT", "FLEETLITE_DB", "FLEETLITE_DEVICE_PROFILES"):
        monkeypatch.delenv(name, raising=False)
    cli = Run(tmp_path, capsys)
    for name, role in (("root", "root"), ("rel", "release"), ("stranger", "release"),
                       ("root2", "root")):
        cli("keys", "create", "--role", role, "--out", "k", "--name", name)
    cli("keys", "root", "init", "--root-key", "k/root.key", "--release-key", "k/rel.pub",
        "--out", "root.json")
    yield cli


def _bundle(run: Run, models_dir: Path, name: str, key: str, *, version: int = 2,
            issued: int | None = None, expires_in: int = 86400) -> Path:
    bundle = build_release([models_dir / "two_in_two_out.tflite"], name="pair", version=version,
                           device_classes=[CLASS], keys=[SigningKey.load(run.work / key)],
                           issued=issued, expires_in=expires_in)
    return bundle.write_dir(run.work / name)


def test_a_release_signed_with_a_root_key_is_refused(run: Run, models_dir: Path) -> None:
    model = str(models_dir / "two_in_two_out.tflite")
    message = run.refused("release", "build", model, "--name", "pair", "--version", "1",
                          "--device-class", CLASS, "--key", "k/root.key", "--out", "pair-v1")
    assert message == ("fleetlite: error: k/root.key: a root key given as --key, not a release "
                       "key; sign releases with a release key; create one with `fleetlite keys "
                       "create --role release --out DIR`")
    assert not (run.work / "pair-v1").exists()

    bundle = _bundle(run, models_dir, "pair-v2", "k/rel.key")
    before = (bundle / "manifest.json").read_bytes()
    message = run.refused("release", "sign", str(bundle), "--key", "k/root.key")
    assert "k/root.key: a root key given as --key, not a release key" in message
    assert (bundle / "manifest.json").read_bytes() == before


def test_a_root_with_roles_swapped_is_refused(run: Run) -> None:
    message = run.refused("keys", "root", "init", "--root-key", "k/rel.key", "--release-key",
                          "k/root.pub", "--out", "swapped.json")
    assert message == ("fleetlite: error: k/rel.key: a release key given as --root-key, not a "
                       "root key; pass release keys as --release-key and root keys as --root-key "
                       "(were the two swapped?)")
    assert not (run.work / "swapped.json").exists()
    message = run.refused("keys", "root", "init", "--root-key", "k/root.key", "--release-key",
                          "k/root2.pub", "--out", "swapped.json")
    assert "k/root2.pub: a root key given as --release-key, not a release key" in message
    assert not (run.work / "swapped.json").exists()


def test_build_refuses_a_device_class_no_profile_defines(run: Run, models_dir: Path) -> None:
    model = str(models_dir / "two_in_two_out.tflite")
    message = run.refused("release", "build", model, "--name", "pair", "--version", "1",
                          "--device-class", "raspbery-pi-4", "--key", "k/rel.key",
                          "--out", "pair-v1")
    assert "no device profile defines the device class 'raspbery-pi-4'" in message
    assert "did you mean 'raspberry-pi-4'?" in message
    assert not (run.work / "pair-v1").exists()


@pytest.mark.parametrize(("args", "text"), [
    (("release", "build", "m.tflite", "--name", "pair", "--version", "1", "--device-class",
      CLASS, "--expires-in", "30", "--out", "o"), "'30' has no unit; write e.g. 30d (days)"),
    (("keys", "root", "init", "--root-key", "k/root.key", "--release-key", "k/rel.pub",
      "--expires-in", "365", "--out", "r.json"), "'365' has no unit; write e.g. 365d"),
])
def test_expiry_flags_need_a_unit(run: Run, args: tuple[str, ...], text: str) -> None:
    message = run.refused(*args, code=2)
    assert text in message and "--expires-in" in message
    assert not (run.work / "o").exists() and not (run.work / "r.json").exists()


def test_push_checks_against_the_fleet_root(run: Run, models_dir: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    stranger = _bundle(run, models_dir, "stranger-v3", "k/stranger.key", version=3)
    good = _bundle(run, models_dir, "pair-v2", "k/rel.key")

    message = run.refused("release", "verify", str(good))
    assert message == ("fleetlite: error: no root to verify against: give --root root.json, or "
                       "set the fleet's root once with `fleetlite keys root use root.json`")
    message = run.refused("keys", "root", "current")
    assert "no fleet root is configured" in message and "keys root use root.json" in message
    out, _ = run("keys", "root", "use", "root.json")
    assert out.startswith("the fleet's root is now root.json: version 1, expires 20")
    stored = run.work / "config" / "fleet-root.json"
    assert stored.read_bytes() == (run.work / "root.json").read_bytes()

    message = run.refused("--db", run.db, "release", "push", str(stranger))
    assert message.startswith("fleetlite release push: REFUSED [untrusted_signer]: ")
    assert f"devices with the fleet root {stored}" in message
    assert run.stored_releases() == []

    out, _ = run("--db", run.db, "release", "push", str(good))
    assert out.startswith("pushed: pair v2")
    assert len(run.stored_releases()) == 1
    out, _ = run("release", "verify", str(good))  # verify too defaults to the fleet root
    assert out.startswith(f"OK: pair v2 verifies against {stored}")

    # --root and $FLEETLITE_ROOT override the stored choice
    run("keys", "root", "init", "--root-key", "k/root2.key", "--release-key",
        "k/stranger.pub", "--out", "other.json")
    monkeypatch.setenv("FLEETLITE_ROOT", "other.json")
    _, err = run("keys", "root", "use", "root.json")
    assert err == "note: FLEETLITE_ROOT=other.json is set and overrides it in this shell\n"
    out, _ = run("keys", "root", "current")
    assert out.startswith("fleet root other.json ($FLEETLITE_ROOT): version 1")
    out, _ = run("--db", run.db, "release", "push", str(stranger))
    assert out.startswith("pushed: pair v3")
    monkeypatch.delenv("FLEETLITE_ROOT")
    message = run.refused("--db", run.db, "release", "push", str(good), "--root", "other.json")
    assert message.startswith("fleetlite release push: REFUSED [untrusted_signer]: ")
    assert "the fleet root other.json, --root" in message


def test_the_fleet_root_changes_only_as_devices_accept(run: Run) -> None:
    run("keys", "root", "use", "root.json")
    run("keys", "root", "init", "--root-key", "k/root2.key", "--release-key", "k/rel.pub",
        "--out", "other.json")
    message = run.refused("keys", "root", "use", "other.json")
    assert "other.json: devices provisioned with the current fleet root (v1" in message
    assert "pass --force" in message
    run("keys", "root", "rotate", "--root", "root.json", "--sign", "k/root.key", "--root-key",
        "k/root2.key", "--release-key", "k/rel.pub", "--out", "root-v2.json")
    out, _ = run("keys", "root", "use", "root-v2.json")
    assert "version 2 (was v1)" in out
    shown = json.loads(run("keys", "root", "current", "-o", "json")[0])
    assert shown["version"] == 2 and shown["expired"] is False


def test_push_without_a_fleet_root_warns(run: Run, models_dir: Path) -> None:
    good = _bundle(run, models_dir, "pair-v2", "k/rel.key")
    out, err = run("--db", run.db, "release", "push", str(good))
    assert "warning: no fleet root is configured" in err and out.startswith("pushed: pair v2")


def test_show_a_stored_release_with_dates(run: Run, models_dir: Path) -> None:
    good = _bundle(run, models_dir, "pair-v2", "k/rel.key")
    run("--db", run.db, "release", "push", str(good))
    release_id = run.stored_releases()[0]
    out, _ = run("release", "show", release_id[:8], "--db", run.db)
    assert out.startswith("pair v2")
    assert f"release id      {release_id}" in out and "stored in" in out
    expires = next(line for line in out.splitlines() if "expires" in line).split()[-1]
    assert time.strptime(expires, "%Y-%m-%dT%H:%M:%SZ") and "EXPIRED" not in out
    doc = json.loads(run("--db", run.db, "release", "show", release_id, "-o", "json")[0])
    assert doc["release_id"] == release_id and doc["expired"] is False
    as_yaml = yaml.safe_load(run("release", "show", release_id, "--db", run.db, "-o", "yaml")[0])
    assert as_yaml == doc

    message = run.refused("release", "show", "abcdef12", "--db", run.db)
    assert "no release 'abcdef12' in the store" in message

    old = _bundle(run, models_dir, "pair-old", "k/rel.key", version=3,
                  issued=int(time.time()) - 7200, expires_in=3600)
    out, _ = run("release", "show", str(old))
    assert next(line for line in out.splitlines() if "expires" in line).endswith(" EXPIRED")
    run("keys", "root", "use", "root.json")
    message = run.refused("--db", run.db, "release", "push", str(old))
    assert message.startswith("fleetlite release push: REFUSED [expired]: ")
