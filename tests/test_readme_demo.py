"""The README's first command, verbatim, on a copy of the repository with no virtual environment:
it must set up a fresh venv by itself, run the demo and leave a report. Packages come from the
wheelhouse tools/test.sh fills (the test itself downloads nothing)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
WHEELHOUSE = REPO / ".wheelhouse"
SKIP = {".git", ".venv", ".venv-litert", ".wheelhouse", ".mypy_tree", ".mypy_cache",
        ".pytest_cache", ".ruff_cache", ".hypothesis", "__pycache__", "build", "dist"}


def readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    block = re.search(r"## Quick start.*?```sh\n(.*?)```", text, re.S)
    assert block, "README.md has no quick start block"
    return [line.split("#")[0].strip() for line in block.group(1).splitlines() if line.strip()]


def test_readme_gives_exactly_two_commands_demo_then_tests() -> None:
    assert readme_commands() == ["bash tools/demo.sh", "bash tools/test.sh"]
    ci = (REPO / ".ci" / "run").read_text()
    assert "bash tools/test.sh" in ci  # CI runs the README's test command


def test_readme_demo_command_in_a_fresh_venv(tmp_path: Path) -> None:
    if not (WHEELHOUSE / ".stamp").exists():
        pytest.skip("no .wheelhouse: run the suite with `bash tools/test.sh`, which fills it")
    copy = tmp_path / "fleetlite"
    shutil.copytree(REPO, copy, ignore=lambda d, names: [n for n in names if n in SKIP
                                                         or n.endswith(".egg-info")])
    command = readme_commands()[0]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHON"))}
    # the system Python, not the test suite's venv
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                  if not p.startswith(str(REPO / ".venv")))
    env.update(PIP_NO_INDEX="1", PIP_FIND_LINKS=str(WHEELHOUSE),
               PIP_DISABLE_PIP_VERSION_CHECK="1",
               # the broker a newcomer's machine without Mosquitto gets (CI has Mosquitto,
               # which test_cli_basics' demo run uses)
               FLEETLITE_DEMO_BROKER="embedded")
    result = subprocess.run(["bash", "-c", command], cwd=copy, env=env, capture_output=True,
                            text=True, timeout=900, check=False)
    out = result.stdout
    assert result.returncode == 0, out[-4000:] + result.stderr[-4000:]
    assert (copy / ".venv" / "bin" / "fleetlite").exists()  # it made its own venv
    assert "broker: embedded (amqtt)" in out and "state: completed" in out
    assert "lights_off" in out and "smoke_output_mismatch" in out
    match = re.search(r"Report: (\S+)", out)
    assert match, out[-2000:]
    report = Path(match.group(1))
    html = report.read_text()
    assert "<svg" in html and "gw-x86-01" in html
    shutil.rmtree(report.parent, ignore_errors=True)
