"""The two console scripts as a user runs them (real subprocesses)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / args[0]), *args[1:]], capture_output=True, text=True,
                          timeout=120, check=check)


def test_agent_info_json_reports_device_and_runtime() -> None:
    facts = json.loads(run("fleetlite-agent", "info", "--json").stdout)
    assert facts["cores"] >= 1 and facts["ram_mb"] > 0
    assert facts["backend"] in ("tflite-runtime", "ai-edge-litert", "tensorflow")
    assert facts["python"].count(".") == 2


def test_agent_check_good_and_bad_models(models_dir: Path, tmp_path: Path) -> None:
    ok = run("fleetlite-agent", "check", str(models_dir / "two_in_two_out.tflite"), "--json")
    desc = json.loads(ok.stdout)
    assert [s["name"] for s in desc["inputs"]] == ["a", "b"]
    bad = tmp_path / "bad.tflite"
    bad.write_bytes(b"\x00" * 100)
    failed = run("fleetlite-agent", "check", str(bad), check=False)
    assert failed.returncode == 1
    assert "not a TFLite model" in failed.stderr


def test_help_teaches_with_examples() -> None:
    for tool in ("fleetlite-agent", "fleetlite"):
        out = run(tool, "--help").stdout
        assert "examples:" in out and "exit codes" in out


def test_demo_rolls_out_shows_profiles_rejects_the_broken_release(tmp_path: Path) -> None:
    result = run("fleetlite", "demo", "--out", str(tmp_path), check=False)
    out = result.stdout
    assert result.returncode == 0, out[-3000:] + result.stderr[-3000:]
    assert "broker: " in out
    assert "'turn off the kitchen lights'" in out and "lights_off" in out
    assert "state: completed" in out  # v2 rolled out in waves
    for device_class in ("raspberry-pi-4", "jetson-orin-nano", "industrial-x86-gateway"):
        assert device_class in out  # agents and the profile table per class
    assert "smoke_output_mismatch" in out and "state: aborted" in out  # the broken release
    assert "serve intent version(s) 2:" in out
    report = (tmp_path / "report.html").read_text()
    assert "gw-pi4-01" in report and "intent-v3" in report
