"""Releases that carry deltas (``fleet/delta_builder.py``, ``fleetlite release build
--delta-from``): built from real models through the real builder and CLI, the report gives the
delta's size against the full file, the bundle verifies, and the device-side rebuild turns the base
release's model and the shipped delta into the new release's signed file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from fleetlite.agent.delta_rebuild import rebuild, usable_deltas
from fleetlite.fleet.delta_builder import load_base, plan_deltas
from fleetlite.fleet.release_builder import build_release
from fleetlite.sdk.bundle import load_bundle
from fleetlite.sdk.keys import SigningKey
from fleetlite.sdk.trust import new_root
from fleetlite.tools.models import heavy_mlp
from tests.delta_fixtures import int8_pair

BIN = Path(sys.executable).parent
KEY = SigningKey.from_seed(b"\x14" * 32)
ROOT_KEY = SigningKey.from_seed(b"\x15" * 32)


def _models(tmp_path: Path) -> tuple[Path, Path]:
    base, target = int8_pair()
    (tmp_path / "v1").mkdir()
    (tmp_path / "v2").mkdir()
    (tmp_path / "v1" / "classifier.tflite").write_bytes(base)
    (tmp_path / "v2" / "classifier.tflite").write_bytes(target)
    return tmp_path / "v1" / "classifier.tflite", tmp_path / "v2" / "classifier.tflite"


def test_a_release_ships_a_delta_that_rebuilds_its_signed_model(tmp_path: Path) -> None:
    old, new = _models(tmp_path)
    build_release([old], name="classifier", version=1, device_classes=["raspberry-pi-4"],
                  keys=[KEY]).write_flb(tmp_path / "v1.flb")
    built, skipped = plan_deltas(load_base(tmp_path / "v1.flb"),
                                 [(new.name, new.read_bytes())])
    assert skipped == [] and len(built) == 1
    assert built[0].ratio <= 0.15
    assert built[0].report().startswith("classifier.tflite: delta ")
    assert " from v1 (" in built[0].report()
    bundle = build_release([new], name="classifier", version=2,
                           device_classes=["raspberry-pi-4"], keys=[KEY], deltas=built)
    bundle.write_flb(tmp_path / "v2.flb")
    loaded = load_bundle(tmp_path / "v2.flb")
    root = new_root([ROOT_KEY.public_key], [KEY.public_key], expires=2_000_000_000)
    # verified as a device verifies it: signature, then every file (the delta too) by its hash
    assert loaded.verify(root, device_class="raspberry-pi-4").deltas == loaded.manifest.deltas
    (ref,) = loaded.manifest.deltas
    assert (ref.file, ref.delta) == ("classifier.tflite", "classifier.tflite.from-v1.delta")
    assert loaded.manifest.file(ref.delta).role == "delta"
    assert usable_deltas(loaded.manifest, "classifier.tflite", {}) == []
    assert usable_deltas(loaded.manifest, "classifier.tflite",
                         {ref.base_sha256: old}) == [(ref, old)]
    (tmp_path / "staged.delta").write_bytes(loaded.files[ref.delta])
    out = tmp_path / "device" / "classifier.tflite"
    out.parent.mkdir()
    rebuild(old, tmp_path / "staged.delta", loaded.manifest.file(ref.file), out)
    assert out.read_bytes() == new.read_bytes()


def test_an_unrelated_base_gets_no_delta_and_the_report_says_why(tmp_path: Path) -> None:
    _, new = _models(tmp_path)
    other = tmp_path / "other.tflite"
    other.write_bytes(heavy_mlp().tflite)
    built, skipped = plan_deltas(load_base(other), [(new.name, new.read_bytes())])
    assert built == []
    assert "over the 50% limit; devices fetch the full file" in skipped[0].report()


def test_the_cli_reports_the_delta_size_against_the_full_size(tmp_path: Path) -> None:
    old, new = _models(tmp_path)
    build_release([old], name="classifier", version=1, device_classes=["raspberry-pi-4"],
                  keys=[KEY]).write_flb(tmp_path / "v1.flb")
    result = subprocess.run(
        [str(BIN / "fleetlite"), "release", "build", str(new), "--name", "classifier",
         "--version", "2", "--device-class", "raspberry-pi-4", "--delta-from",
         str(tmp_path / "v1.flb"), "--out", str(tmp_path / "v2.flb")],
        capture_output=True, text=True, timeout=180, cwd=tmp_path, check=False)
    assert result.returncode == 0, result.stderr
    line = next(x for x in result.stdout.splitlines() if "delta" in x and "KiB" in x)
    assert line.strip().startswith("classifier.tflite: delta ")
    assert "% of 146.4 KiB" in line
    assert load_bundle(tmp_path / "v2.flb").manifest.deltas


def test_an_agent_that_ignores_deltas_installs_the_full_file(tmp_path: Path,
                                                             models_dir: Path) -> None:
    """Until the OTA receiver fetches deltas, a device downloads every listed file: a release
    that carries a delta installs exactly as one without (today's fallback path)."""
    from fleetlite.tools.finetune_weights import finetune_weights
    from tests.test_ota_install import RELEASE_KEY, Device, release

    seed = models_dir / "intent_classifier.tflite"
    tuned = tmp_path / "intent_classifier.tflite"
    tuned.write_bytes(finetune_weights(seed.read_bytes(), seed=14))
    built, _ = plan_deltas(load_base(seed), [(tuned.name, tuned.read_bytes())])
    assert len(built) == 1
    bundle = release(models_dir, tmp_path, 2, model=tuned, keys=(RELEASE_KEY,), deltas=built)
    assert bundle.manifest.deltas
    device = Device(tmp_path, models_dir)
    try:
        final = device.install(bundle)
        assert (final.outcome, final.reason) == ("installed", "")
        assert device.serving_version() == 2
    finally:
        device.close()
