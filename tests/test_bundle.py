"""Release bundles built from the project's real models: smoke vectors, directory and .flb forms,
hostile bundle members, threshold signing, and the ``fleetlite release`` commands."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from fleetlite.fleet.release_builder import build_release, smoke_inputs
from fleetlite.fleet.release_smoke import run_bundle_smoke
from fleetlite.sdk.bundle import ENVELOPE_NAME, ReleaseBundle, load_bundle, sign_bundle
from fleetlite.sdk.durations import parse_duration
from fleetlite.sdk.errors import BundleError, MalformedError, SignatureError, UpdateRejected
from fleetlite.sdk.keys import SigningKey
from fleetlite.sdk.manifest import Tolerance
from fleetlite.sdk.runtime.errors import InvalidModelError, ModelCrashedError
from fleetlite.sdk.runtime.interpreter import load_model
from fleetlite.sdk.smoke import SmokeCase, SmokeVectors, Tensor, compare_outputs
from fleetlite.sdk.trust import Root, new_root
from fleetlite.tools.models import crashing_model, two_in_two_out
from tests.conftest import crash_fixture_crashes

BIN = Path(sys.executable).parent
ROOT_KEY = SigningKey.from_seed(b"\x01" * 32)
KEY_A = SigningKey.from_seed(b"\x0b" * 32)
KEY_B = SigningKey.from_seed(b"\x0c" * 32)
NOW = 1_764_201_600


def make_root(threshold: int = 1) -> Root:
    return new_root([ROOT_KEY.public_key], [KEY_A.public_key, KEY_B.public_key],
                    release_threshold=threshold, expires=NOW + 10**8)


@pytest.fixture(scope="module")
def intent(models_dir: Path) -> ReleaseBundle:
    return build_release([models_dir / "intent_classifier.tflite"], name="intent", version=2,
                         device_classes=["raspberry-pi-4"], issued=NOW,
                         vocab=models_dir / "intent_classifier.vocab.json", keys=[KEY_A])


@pytest.fixture(scope="module")
def sensor(models_dir: Path) -> ReleaseBundle:
    return build_release(
        [models_dir / "sensor_autoencoder.tflite", models_dir / "sensor_autoencoder_int8.tflite"],
        name="sensor", version=1, device_classes=["raspberry-pi-4", "small-arm-gateway"],
        issued=NOW, keys=[KEY_A])


# --- building ---------------------------------------------------------------------------------


def test_built_release_describes_the_model_and_verifies(intent: ReleaseBundle) -> None:
    m = intent.verify(make_root(), device_class="raspberry-pi-4", time_floor=NOW)
    assert [f.role for f in m.files] == ["model", "smoke", "vocab"]
    assert m.model.inputs[0].to_dict() == {"name": "tokens", "shape": [1, 16], "dtype": "int32"}
    assert m.model.outputs[0].name == "probabilities"
    assert (m.issued, m.expires) == (NOW, NOW + 30 * 86400)
    assert m.release_id == intent.release_id


def test_token_inputs_are_small_valid_ids(intent: ReleaseBundle) -> None:
    vectors = SmokeVectors.from_json(intent.files["intent_classifier.smoke.json"])
    assert len(vectors.cases) == 3
    for case in vectors.cases:
        tokens = case.inputs[0].array
        assert tokens.dtype == np.int32 and tokens.shape == (1, 16)
        assert tokens.min() >= 0 and tokens.max() <= 7
        probabilities = case.outputs[0].array
        assert abs(float(probabilities.sum()) - 1.0) < 1e-5


def test_int8_variant_gets_quantized_inputs_and_both_variants_pass(
    sensor: ReleaseBundle, models_dir: Path
) -> None:
    m = sensor.manifest
    assert [v.name for v in m.all_variants()] == ["default", "sensor_autoencoder_int8"]
    int8 = m.variant("sensor_autoencoder_int8")
    assert int8.model.inputs[0].quantization is not None
    vectors = SmokeVectors.from_json(sensor.files[int8.smoke.file])
    window = vectors.cases[0].inputs[0].array
    assert window.dtype == np.int8 and len(np.unique(window)) > 4
    assert run_bundle_smoke(sensor) == []
    # The vectors are what the real interpreter computes.
    model = load_model(models_dir / "sensor_autoencoder_int8.tflite")
    out = model.run([window])
    assert compare_outputs(vectors.cases[0].outputs, out, Tolerance(max_lsb=0)) == []


def test_two_input_model_vectors_are_in_model_order(models_dir: Path) -> None:
    bundle = build_release([models_dir / "two_in_two_out.tflite"], name="pair", version=1,
                           device_classes=["raspberry-pi-4"], issued=NOW)
    vectors = SmokeVectors.from_json(bundle.files["two_in_two_out.smoke.json"])
    assert [t.name for t in vectors.cases[0].inputs] == ["a", "b"]
    assert [t.name for t in vectors.cases[0].outputs] == ["out_sum", "out_score"]
    assert run_bundle_smoke(bundle) == []
    assert bundle.envelope.signatures == ()


def test_smoke_inputs_are_deterministic(models_dir: Path) -> None:
    model = load_model(models_dir / "two_in_two_out.tflite")
    first, again = smoke_inputs(model.inputs, 1), smoke_inputs(model.inputs, 1)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not np.array_equal(smoke_inputs(model.inputs, 0)[0], first[0])


def test_build_refuses_a_crashing_model_without_crashing(tmp_path: Path) -> None:
    path = tmp_path / "crash.tflite"
    path.write_bytes(crashing_model())
    refusal = ModelCrashedError if crash_fixture_crashes() else InvalidModelError
    with pytest.raises(refusal):
        build_release([path], name="crash", version=1, device_classes=["raspberry-pi-4"])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"name": "Bad Name"}, "release name"), ({"device_classes": ["Not A Class"]}, "device")],
)
def test_build_refuses_bad_metadata(models_dir: Path, kwargs: dict[str, object],
                                    message: str) -> None:
    args: dict[str, object] = {"name": "ok", "version": 1, "device_classes": ["raspberry-pi-4"]}
    args.update(kwargs)
    with pytest.raises(BundleError, match=message):
        build_release([models_dir / "two_in_two_out.tflite"], **args)  # type: ignore[arg-type]


def test_build_refuses_an_unsafe_file_name(models_dir: Path, tmp_path: Path) -> None:
    hidden = tmp_path / ".hidden.tflite"
    hidden.write_bytes((models_dir / "two_in_two_out.tflite").read_bytes())
    with pytest.raises(BundleError, match="plain file name"):
        build_release([hidden], name="x", version=1, device_classes=["raspberry-pi-4"])


def test_parse_duration() -> None:
    assert parse_duration("30d") == 30 * 86400
    assert parse_duration("12h") == 43200
    assert parse_duration("90s") == 90
    for bad in ("", "0d", "-1d", "3y", "d"):
        with pytest.raises(ValueError):
            parse_duration(bad)
    with pytest.raises(ValueError, match=r"'30' has no unit; write e\.g\. 30d"):
        parse_duration("30")


# --- smoke comparison -------------------------------------------------------------------------


def _expected(array: np.ndarray) -> list[Tensor]:  # type: ignore[type-arg]
    return [Tensor("y", array)]


@pytest.mark.parametrize(
    ("expected", "actual", "ok"),
    [
        (np.array([1.0, 2.0], np.float32), np.array([1.00005, 2.001], np.float32), True),
        (np.array([1.0, 2.0], np.float32), np.array([1.0, 2.01], np.float32), False),
        (np.array([1.0], np.float32), np.array([np.nan], np.float32), False),
        (np.array([10, -3], np.int8), np.array([11, -4], np.int8), True),
        (np.array([10, -3], np.int8), np.array([12, -3], np.int8), False),
        (np.array([255, 0], np.uint8), np.array([254, 1], np.uint8), True),
        (np.array([255], np.uint8), np.array([0], np.uint8), False),  # no wrap-around
        (np.array([3], np.int32), np.array([4], np.int32), False),  # indices are exact
        (np.array([1.0], np.float32), np.array([1], np.int8), False),  # dtype
        (np.array([1.0, 2.0], np.float32), np.array([[1.0, 2.0]], np.float32), False),  # shape
    ],
)
def test_compare_outputs(expected: np.ndarray, actual: np.ndarray,  # type: ignore[type-arg]
                         ok: bool) -> None:
    problems = compare_outputs(_expected(expected), {"y": actual}, Tolerance())
    assert (problems == []) is ok, problems
    assert compare_outputs(_expected(expected), [actual], Tolerance()) == problems


def test_compare_outputs_reports_missing_outputs() -> None:
    problems = compare_outputs(_expected(np.zeros(2, np.float32)), {"z": np.zeros(2)},
                               Tolerance())
    assert problems and "missing" in problems[0]


def test_smoke_file_round_trip_and_refusals() -> None:
    case = SmokeCase((Tensor("x", np.arange(6, dtype=np.int16).reshape(2, 3)),),
                     (Tensor("y", np.array([[0.5, -1.25]], np.float32)),))
    data = SmokeVectors((case,)).to_json()
    back = SmokeVectors.from_json(data)
    assert np.array_equal(back.cases[0].inputs[0].array, case.inputs[0].array)
    assert back.cases[0].outputs[0].array.dtype == np.float32
    broken = json.loads(data)
    broken["cases"][0]["inputs"][0]["shape"] = [2, 4]
    with pytest.raises(MalformedError, match="needs"):
        SmokeVectors.from_json(json.dumps(broken).encode())
    with pytest.raises(UpdateRejected) as info:
        SmokeVectors.from_json(data, max_bytes=10)
    assert info.value.reason == "oversize"


# --- directory and .flb bundles ---------------------------------------------------------------


def test_directory_and_flb_round_trip(intent: ReleaseBundle, tmp_path: Path) -> None:
    intent.write_dir(tmp_path / "dir")
    intent.write_flb(tmp_path / "r.flb")
    for path in (tmp_path / "dir", tmp_path / "r.flb"):
        loaded = load_bundle(path)
        assert loaded.release_id == intent.release_id
        assert loaded.verify(make_root(), time_floor=NOW).name == "intent"
    assert intent.flb_bytes() == load_bundle(tmp_path / "r.flb").flb_bytes()  # deterministic
    with pytest.raises(BundleError, match="not an empty directory"):
        intent.write_dir(tmp_path / "dir")


def test_threshold_signing_by_a_second_person(intent: ReleaseBundle, tmp_path: Path) -> None:
    root = make_root(threshold=2)
    for path in (tmp_path / "dir", tmp_path / "r.flb"):
        if path.suffix == ".flb":
            intent.write_flb(path)
        else:
            intent.write_dir(path)
        with pytest.raises(SignatureError) as info:
            load_bundle(path).verify(root, time_floor=NOW)
        assert info.value.reason == "below_threshold"
        sign_bundle(path, KEY_A)  # the same person again does not help
        with pytest.raises(SignatureError):
            load_bundle(path).verify(root, time_floor=NOW)
        sign_bundle(path, KEY_B)
        signed = load_bundle(path)
        assert signed.verify(root, time_floor=NOW).version == 2
        assert signed.envelope.payload == intent.envelope.payload  # never re-serialised


def test_tampered_files_in_a_directory_bundle(intent: ReleaseBundle, tmp_path: Path) -> None:
    directory = intent.write_dir(tmp_path / "dir")
    model = directory / "intent_classifier.tflite"
    content = bytearray(model.read_bytes())
    content[-100] ^= 0xFF
    model.write_bytes(bytes(content))
    with pytest.raises(UpdateRejected) as info:
        load_bundle(directory).verify(make_root(), time_floor=NOW)
    assert info.value.reason == "hash_mismatch"
    model.write_bytes(bytes(content) + b"\x00" * 10_000)
    loaded = load_bundle(directory)
    assert len(loaded.files[model.name]) == len(content) + 1  # read stops past the signed length
    with pytest.raises(UpdateRejected) as info:
        loaded.verify(make_root(), time_floor=NOW)
    assert info.value.reason == "length_mismatch"


def test_mix_and_match_of_two_releases(tmp_path: Path, models_dir: Path) -> None:
    other = tmp_path / "other" / "two_in_two_out.tflite"
    other.parent.mkdir()
    other.write_bytes(two_in_two_out(seed=7).tflite)
    a = build_release([models_dir / "two_in_two_out.tflite"], name="pair", version=1,
                      device_classes=["raspberry-pi-4"], issued=NOW, keys=[KEY_A])
    b = build_release([other], name="pair", version=2, device_classes=["raspberry-pi-4"],
                      issued=NOW, keys=[KEY_A])
    assert len(a.files[other.name]) == len(b.files[other.name])
    mixed = ReleaseBundle(a.envelope, a.manifest, {**a.files, other.name: b.files[other.name]})
    with pytest.raises(UpdateRejected) as info:
        mixed.verify(make_root(), time_floor=NOW)
    assert info.value.reason == "hash_mismatch"


def test_directory_bundle_refuses_extra_files_and_links(intent: ReleaseBundle,
                                                        tmp_path: Path) -> None:
    directory = intent.write_dir(tmp_path / "dir")
    (directory / "extra.sh").write_text("#!/bin/sh\n")
    with pytest.raises(BundleError, match="not listed"):
        load_bundle(directory)
    (directory / "extra.sh").unlink()
    vocab = directory / "intent_classifier.vocab.json"
    vocab.unlink()
    vocab.symlink_to("/etc/passwd")
    with pytest.raises(BundleError, match="not a regular file"):
        load_bundle(directory)


def _hostile_flb(bundle: ReleaseBundle, path: Path, extra: list[tarfile.TarInfo],
                 *, skip: str = "", first: str = ENVELOPE_NAME) -> Path:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        members = [(ENVELOPE_NAME, bundle.envelope_bytes())]
        members += [(e.name, bundle.files[e.name]) for e in bundle.manifest.files
                    if e.name != skip]
        if first != ENVELOPE_NAME:
            members.sort(key=lambda m: m[0] != first)
        for name, content in members:
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
        for info in extra:
            tar.addfile(info, io.BytesIO(b"x" * info.size) if info.isreg() else None)
    return path


def _member(name: str, kind: bytes = tarfile.REGTYPE, size: int = 1,
            link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = size if kind == tarfile.REGTYPE else 0
    info.linkname = link
    return info


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([_member("../escape.tflite")], "unsafe member name"),
        ([_member("/etc/cron.d/x")], "unsafe member name"),
        ([_member("sub/intent_classifier.tflite")], "unsafe member name"),
        ([_member(".hidden")], "unsafe member name"),
        ([_member("notes.txt")], "not listed"),
        ([_member("intent_classifier.tflite")], "appears twice"),
        ([_member("link.tflite", tarfile.SYMTYPE, link="/etc/passwd")], "not a regular file"),
        ([_member("hard.tflite", tarfile.LNKTYPE, link="manifest.json")], "not a regular file"),
        ([_member("dir", tarfile.DIRTYPE)], "not a regular file"),
        ([_member("dev", tarfile.CHRTYPE)], "not a regular file"),
    ],
    ids=["traversal", "absolute", "subdir", "hidden", "unlisted", "duplicate", "symlink",
         "hardlink", "directory", "device"],
)
def test_flb_refuses_hostile_members(intent: ReleaseBundle, tmp_path: Path,
                                     extra: list[tarfile.TarInfo], message: str) -> None:
    path = _hostile_flb(intent, tmp_path / "evil.flb", extra)
    with pytest.raises(BundleError, match=message):
        load_bundle(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.flb"]  # nothing extracted


def test_flb_refuses_missing_members_order_and_compression(intent: ReleaseBundle,
                                                           tmp_path: Path) -> None:
    missing = _hostile_flb(intent, tmp_path / "missing.flb", [],
                           skip="intent_classifier.vocab.json")
    with pytest.raises(BundleError, match="missing"):
        load_bundle(missing)
    late = _hostile_flb(intent, tmp_path / "late.flb", [], first="intent_classifier.tflite")
    with pytest.raises(BundleError, match="first member"):
        load_bundle(late)
    compressed = tmp_path / "c.flb"
    with tarfile.open(compressed, "w:gz") as tar:
        info = tarfile.TarInfo(ENVELOPE_NAME)
        info.size = 2
        tar.addfile(info, io.BytesIO(b"{}"))
    with pytest.raises(BundleError, match="uncompressed tar"):
        load_bundle(compressed)
    with pytest.raises(BundleError, match="no such bundle"):
        load_bundle(tmp_path / "nothing")


def test_summary_shows_file_status(intent: ReleaseBundle) -> None:
    summary = intent.summary()
    assert summary["name"] == "intent" and summary["version"] == 2
    assert {f["status"] for f in summary["files"]} == {"ok"}
    tampered = ReleaseBundle(intent.envelope, intent.manifest,
                             {**intent.files, "intent_classifier.vocab.json": b"{}"})
    statuses = {f["name"]: f["status"] for f in tampered.summary()["files"]}
    assert statuses["intent_classifier.vocab.json"] == "length_mismatch"


# --- CLI --------------------------------------------------------------------------------------


def fleetlite(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "fleetlite"), *args], capture_output=True, text=True,
                          timeout=180, cwd=cwd, check=False)


def test_cli_release_build_sign_verify_show(tmp_path: Path, models_dir: Path) -> None:
    def ok(*args: str) -> str:
        result = fleetlite(*args, cwd=tmp_path)
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout

    for name, role in (("root", "root"), ("a", "release"), ("b", "release")):
        ok("keys", "create", "--role", role, "--out", "k", "--name", name)
    ok("keys", "root", "init", "--root-key", "k/root.key", "--release-key", "k/a.pub",
       "k/b.pub", "--release-threshold", "2", "--out", "root.json")
    model = str(models_dir / "intent_classifier.tflite")
    vocab = str(models_dir / "intent_classifier.vocab.json")
    out = ok("release", "build", model, "--vocab", vocab, "--name", "intent", "--version", "2",
             "--device-class", "raspberry-pi-4", "--expires-in", "7d", "--key", "k/a.key",
             "--out", "intent-v2")
    assert "release id" in out
    private = {json.loads((tmp_path / "k" / f"{n}.key").read_text())["private"]
               for n in ("root", "a", "b")}

    below = fleetlite("release", "verify", "intent-v2", "--root", "root.json", cwd=tmp_path)
    assert below.returncode == 1 and "REJECTED [below_threshold]" in below.stderr
    ok("release", "sign", "intent-v2", "--key", "k/b.key")
    verified = ok("release", "verify", "intent-v2", "--root", "root.json", "--device-class",
                  "raspberry-pi-4", "--smoke")
    assert verified.startswith("OK: intent v2")
    wrong = fleetlite("release", "verify", "intent-v2", "--root", "root.json",
                      "--device-class", "jetson-orin-nano", "-o", "json", cwd=tmp_path)
    assert wrong.returncode == 1
    assert json.loads(wrong.stdout)["reason"] == "wrong_device_class"
    replay = fleetlite("release", "verify", "intent-v2", "--root", "root.json",
                       "--installed-version", "2", cwd=tmp_path)
    assert replay.returncode == 1 and "[same_version]" in replay.stderr

    shown = json.loads(ok("release", "show", "intent-v2", "-o", "json"))
    assert shown["name"] == "intent" and len(shown["signatures"]) == 2
    assert "NOT verified" in ok("release", "show", "intent-v2")

    ok("release", "build", model, "--name", "intent", "--version", "3", "--device-class",
       "raspberry-pi-4", "--key", "k/a.key", "--key", "k/b.key", "--out", "intent-v3.flb")
    ok("release", "verify", "intent-v3.flb", "--root", "root.json")

    everything = out + verified + wrong.stdout + wrong.stderr + below.stderr
    assert not any(secret in everything for secret in private)


@pytest.mark.parametrize(
    ("args", "code", "text"),
    [
        (("release", "--help"), 0, "examples:"),
        (("keys", "--help"), 0, "examples:"),
        (("release", "build", "--help"), 0, "exit codes"),
        (("release", "build", "x.tflite"), 2, "required"),
        (("release", "build", "x.tflite", "--name", "n", "--version", "1", "--device-class",
          "raspberry-pi-4", "--expires-in", "soon", "--out", "o"), 2, "duration"),
        (("release", "verify", "nope", "--root", "nope.json"), 1, "nope.json"),
        (("release", "sign", "nope", "--key", "nope.key"), 1, "no such"),
        (("release",), 2, "fleetlite release --help"),
    ],
)
def test_cli_usage_and_errors(tmp_path: Path, args: tuple[str, ...], code: int,
                              text: str) -> None:
    result = fleetlite(*args, cwd=tmp_path)
    assert result.returncode == code, result.stdout + result.stderr
    assert text in result.stdout + result.stderr
