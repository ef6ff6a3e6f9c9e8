"""Contexts (issue 12): ``fleetlite config set-context|use-context|get-contexts|...`` through the
real CLI on real files, the precedence option > environment > context > default, and a broken
config file named with its problem."""

from __future__ import annotations

import argparse
import os
import stat
import subprocess
from pathlib import Path

import pytest
import yaml

from fleetlite.fleet.cli_config import load_config, pick
from fleetlite.fleet.errors import FleetError
from fleetlite.fleet.store import open_store
from tests.test_operator_mistakes import FLEETLITE
from tests.test_store import birth, status


def fleetlite(config: Path, *args: str, expect: int = 0,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FLEETLITE_")}
    done = subprocess.run([FLEETLITE, *args], capture_output=True, text=True, timeout=60,
                          check=False, env={**clean, "FLEETLITE_CONFIG": str(config),
                                            **(env or {})})
    assert done.returncode == expect, (args, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    return done


def store_with(path: Path, device_id: str) -> str:
    with open_store(path) as store:
        store.upsert_status(status(device_id, True, 1, 1.0))
        store.upsert_birth(birth(device_id, 1, 1.0))
    return f"sqlite:///{path}"


def test_contexts_switch_fleets_and_options_still_win(tmp_path: Path) -> None:
    config = tmp_path / "conf" / "config.yaml"
    plant = store_with(tmp_path / "plant.db", "gw-plant")
    lab = store_with(tmp_path / "lab.db", "gw-lab")
    made = fleetlite(config, "config", "set-context", "plant-a", "--db", plant, "--broker",
                     "mqtts://mqtt-a.example.net:8883").stdout
    assert "created context plant-a" in made and "use-context plant-a" in made
    fleetlite(config, "config", "set-context", "lab", "--db", lab)
    assert stat.S_IMODE(config.stat().st_mode) == 0o600  # it may hold passwords
    fleetlite(config, "config", "current-context", expect=1)
    assert "switched to context lab" in fleetlite(config, "config", "use-context", "lab").stdout
    assert "gw-lab" in fleetlite(config, "devices", "list").stdout
    listed = fleetlite(config, "config", "get-contexts").stdout.splitlines()
    assert listed[0].startswith("* lab ") and listed[1].startswith("  plant-a ")
    fleetlite(config, "config", "use-context", "plant-a")
    assert fleetlite(config, "config", "current-context").stdout.strip() == "plant-a"
    assert "gw-plant" in fleetlite(config, "devices", "list").stdout
    # an environment variable wins over the context, an option over both
    assert "gw-lab" in fleetlite(config, "devices", "list", env={"FLEETLITE_DB": lab}).stdout
    assert "gw-lab" in fleetlite(config, "--db", lab, "devices", "list").stdout
    # changing and removing settings, deleting the current context
    fleetlite(config, "config", "set-context", "plant-a", "--unset", "broker")
    assert yaml.safe_load(config.read_text())["contexts"]["plant-a"] == {"db": plant}
    assert "deleted context plant-a" in fleetlite(config, "config", "delete-context",
                                                  "plant-a").stdout
    assert load_config({"FLEETLITE_CONFIG": str(config)}).current is None
    unknown = fleetlite(config, "config", "use-context", "plant-b", expect=1).stderr
    assert "no context 'plant-b'" in unknown and "(contexts: lab)" in unknown


def test_pick_fills_only_what_neither_an_option_nor_the_environment_gives(
        tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"current-context": "a", "contexts": {"a": {
        "db": "sqlite:///a.db", "broker": "mqtts://a:8883", "tls-ca": "/a/ca.pem"}}}))
    env = {"FLEETLITE_CONFIG": str(config), "FLEETLITE_BROKER": "b:1883"}
    chosen = pick(argparse.Namespace(db=None, tls_ca="/given/ca.pem"), env)
    assert chosen == {"db": "sqlite:///a.db"}
    assert pick(argparse.Namespace(), {"FLEETLITE_CONFIG": str(tmp_path / "none.yaml")}) == {}


@pytest.mark.parametrize("text, words", [
    ("contexts: [", "is not valid YAML"),
    ("- a\n- b\n", "must be a mapping"),
    ("current-context: a\ncontexts: {}\n", "the current context 'a' is not defined"),
    ("contexts: {a: {database: x}}\n", "unknown setting 'database'"),
    ("contexts: {a: {db: 7}}\n", "db must be a non-empty text"),
    ("contexts: {'a b': {db: x}}\n", "context name 'a b'"),
    ("context: {}\n", "unknown key 'context'"),
    ("a: &a [*a, *a]\ncontexts: {}\n", "unknown key 'a'"),
])
def test_a_broken_config_file_is_named_with_its_problem(tmp_path: Path, text: str,
                                                        words: str) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(text)
    with pytest.raises(FleetError, match=str(config)) as info:
        pick(argparse.Namespace(), {"FLEETLITE_CONFIG": str(config)})
    assert words in str(info.value)
    said = fleetlite(config, "devices", "list", "--db", str(tmp_path / "x.db"), expect=1).stderr
    assert words in said and str(config) in said
