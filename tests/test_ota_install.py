"""OTA installs on a real OtaManager (real files, model service, smoke-test subprocess) driven by
an in-process fake fleet: the happy path, and a table of hostile and broken updates, each with
its reason code, the active model still serving and the anti-rollback counter unchanged."""

from __future__ import annotations

import base64
import dataclasses
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

from fleetlite.agent.model_service import ModelService
from fleetlite.agent.ota import OtaManager, OtaSettings
from fleetlite.agent.ota_state import OtaStateStore
from fleetlite.fleet.intent_model import intent_classifier
from fleetlite.fleet.release_builder import build_release
from fleetlite.sdk.bundle import ReleaseBundle
from fleetlite.sdk.device_class import DeviceClass, find_device_class
from fleetlite.sdk.envelope import Envelope
from fleetlite.sdk.keys import SigningKey
from fleetlite.sdk.manifest import release_id
from fleetlite.sdk.trust import new_root, root_envelope
from fleetlite.sdk.version import BUILD_TIME
from fleetlite.tools.models import crashing_model
from tests.conftest import crash_fixture_crashes
from tests.ota_simulator import FleetSimulator, Served

ROOT_KEY = SigningKey.from_seed(b"\x21" * 32)
RELEASE_KEY = SigningKey.from_seed(b"\x22" * 32)
SECOND_KEY = SigningKey.from_seed(b"\x23" * 32)
STRANGER = SigningKey.from_seed(b"\x24" * 32)
CLASS = "industrial-x86-gateway"
ISSUED = BUILD_TIME + 86400
CHUNK = 4096


def write_root(path: Path, threshold: int = 1) -> Path:
    root = new_root([ROOT_KEY.public_key], [RELEASE_KEY.public_key, SECOND_KEY.public_key],
                    release_threshold=threshold, expires=BUILD_TIME + 10 * 365 * 86400)
    path.write_bytes(root_envelope(root).sign(ROOT_KEY).to_json())
    return path


def release(models_dir: Path, tmp_path: Path, version: int, *, model: Path | None = None,
            keys: tuple[SigningKey, ...] = (RELEASE_KEY,), **kwargs: Any) -> ReleaseBundle:
    return build_release([model or models_dir / "intent_classifier.tflite"], name="intent",
                         version=version, device_classes=kwargs.pop("device_classes", [CLASS]),
                         issued=kwargs.pop("issued", ISSUED), keys=list(keys),
                         vocab=models_dir / "intent_classifier.vocab.json", **kwargs)


class Device:
    """One OtaManager with its model service, state dir and fake fleet."""

    def __init__(self, tmp_path: Path, models_dir: Path, *, threshold: int = 1,
                 device_class: DeviceClass | None = None,
                 settings: OtaSettings | None = None,
                 fleet: FleetSimulator | None = None) -> None:
        self.state_dir = tmp_path / "state"
        self.fleet = fleet if fleet is not None else FleetSimulator()
        self.models = ModelService()
        self.changes: list[str] = []
        self.seed = models_dir / "intent_classifier.tflite"
        self.ota = OtaManager(
            device_id="gw-1", device_class=device_class or find_device_class(CLASS),
            state_dir=self.state_dir, models=self.models, link=self.fleet,
            root_path=write_root(tmp_path / "root.json", threshold), threads=1,
            seeds={"intent": (self.seed, 1)}, on_model_change=self.changes.append,
            settings=settings or OtaSettings(manifest_timeout_s=2, chunk_idle_s=0.2,
                                             max_requests_without_progress=3,
                                             health_inferences=5, health_timeout_s=0.2),
        )
        for name, path, version, sha in self.ota.recover():
            self.models.activate(name, path, version=version, sha256=sha or None)
        self.ota.start()

    def install(self, bundle: ReleaseBundle, *, envelope: bytes | None = None,
                files: list[bytes] | None = None, retry: bool = False,
                **served: Any) -> Any:
        envelope = envelope if envelope is not None else bundle.envelope.to_json()
        rid = release_id(Envelope.from_json(envelope, max_bytes=2**30,
                                            max_payload_bytes=2**30).payload)
        contents = files if files is not None else [bundle.files[f.name]
                                                    for f in bundle.manifest.files]
        self.fleet.serve(rid, Served(envelope, contents, CHUNK, **served))
        return self.send_install({"release_id": rid, "chunk_size": CHUNK, "retry": retry})

    def send_install(self, args: dict[str, Any]) -> Any:
        """Send an ``ota_install`` command for a release already served; its final status."""
        count = len(self.fleet.finals()) + 1
        assert self.ota.cmd_install(args)["accepted"]
        return self.fleet.wait_final(count)

    def serving_version(self) -> int:
        (active,) = self.models.describe()
        tokens = np.zeros((1, 16), np.int32)
        assert self.models.infer("intent", tokens)  # still answers
        return int(active["version"])

    def counters(self) -> tuple[Any, ...]:
        state = OtaStateStore(self.state_dir).load()
        ms = state.models.get("intent")
        return (None, ()) if ms is None else (ms.installed_version, tuple(ms.rejected))

    def close(self) -> None:
        self.ota.stop()


@pytest.fixture
def device(tmp_path: Path, models_dir: Path) -> Iterator[Device]:
    d = Device(tmp_path, models_dir)
    yield d
    d.close()


def test_install_switches_commits_and_reports(device: Device, models_dir: Path,
                                              tmp_path: Path) -> None:
    bundle = release(models_dir, tmp_path, 2)
    final = device.install(bundle)
    assert (final.outcome, final.reason) == ("installed", "")
    phases = [s.phase for s in device.fleet.statuses]
    for phase in ("downloading", "verifying", "smoke_testing", "switching", "health_check"):
        assert phase in phases
    assert device.serving_version() == 2
    assert device.counters() == (2, ())
    assert device.changes == ["intent"]
    slots = device.ota.cmd_slots({})["models"]["intent"]
    assert slots["active"] == "a" and slots["slots"]["a"]["version"] == 2
    # replaying the same release is the normal "nothing new" signal; an older one is rollback
    again = device.install(bundle)
    assert (again.outcome, again.reason) == ("no_change", "same_version")
    old = device.install(release(models_dir, tmp_path, 1, issued=ISSUED + 5))
    assert (old.outcome, old.reason) == ("rejected", "rollback")
    assert device.serving_version() == 2 and device.counters() == (2, ())


def _resign(bundle: ReleaseBundle, payload: bytes, *keys: SigningKey) -> bytes:
    env = Envelope(bundle.envelope.payload_type, payload, ())
    for key in keys:
        env = env.sign(key)
    return env.to_json()


def _payload_with(bundle: ReleaseBundle, edit: Callable[[dict[str, Any]], None]) -> bytes:
    doc = json.loads(bundle.envelope.payload)
    edit(doc)
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def _traversal(doc: dict[str, Any]) -> None:
    doc["files"][0]["name"] = "../../etc/evil.tflite"


HOSTILE: list[tuple[str, str, Callable[[ReleaseBundle, Path, Path], dict[str, Any]]]] = [
    ("unsigned", "unsigned",
     lambda b, m, t: {"envelope": _resign(b, b.envelope.payload)}),
    ("unknown key", "untrusted_signer",
     lambda b, m, t: {"envelope": _resign(b, b.envelope.payload, STRANGER)}),
    ("tampered after signing", "bad_signature",
     lambda b, m, t: {"envelope": Envelope(
         b.envelope.payload_type,
         b.envelope.payload.replace(b'"version":2', b'"version":9'),
         b.envelope.signatures).to_json()}),
    ("model bytes not matching the hash", "hash_mismatch",
     lambda b, m, t: {"files": [bytes([x ^ 1 for x in b.files[f.name][:64]])
                                + b.files[f.name][64:] for f in b.manifest.files]}),
    ("file of another release (mix-and-match)", "hash_mismatch",
     lambda b, m, t: {"files": [release(m, t, 2, model=m / "sensor_autoencoder.tflite")
                                .files["sensor_autoencoder.tflite"][:len(b.files[f.name])]
                                .ljust(len(b.files[f.name]), b"\0")
                                if f.role == "model" else b.files[f.name]
                                for f in b.manifest.files]}),
    ("short file (data never arrives)", "download_stalled",
     lambda b, m, t: {"files": [b.files[f.name][:len(b.files[f.name]) // 2]
                                for f in b.manifest.files]}),
    ("expired manifest", "expired",
     lambda b, m, t: {"envelope": release(m, t, 2, issued=BUILD_TIME - 90 * 86400,
                                          expires_in=86400).envelope.to_json()}),
    ("wrong device class", "wrong_device_class",
     lambda b, m, t: {"envelope": release(m, t, 2, device_classes=["raspberry-pi-4"])
                      .envelope.to_json()}),
    ("path traversal in a file name", "unsafe_name",
     lambda b, m, t: {"envelope": _resign(b, _payload_with(b, _traversal), RELEASE_KEY)}),
    ("oversize manifest", "oversize",
     lambda b, m, t: {"envelope": _resign(b, b.envelope.payload + b" " * (600 * 1024),
                                          RELEASE_KEY)}),
]


@pytest.mark.parametrize(("case", "reason", "make"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_update_is_refused_and_the_model_keeps_serving(
    device: Device, models_dir: Path, tmp_path: Path, case: str, reason: str,
    make: Callable[[ReleaseBundle, Path, Path], dict[str, Any]],
) -> None:
    before = device.counters()
    bundle = release(models_dir, tmp_path, 2)
    final = device.install(bundle, **make(bundle, models_dir, tmp_path))
    assert final.final and final.outcome in ("rejected", "failed"), final
    assert final.reason == reason, final.message
    assert device.serving_version() == 1
    assert device.counters() == before
    assert device.ota.state.job is None  # nothing stuck in progress
    staging = device.state_dir / "ota" / "staging"
    assert not staging.exists() or not any(staging.iterdir())


def test_threshold_counts_each_key_once(tmp_path: Path, models_dir: Path) -> None:
    device = Device(tmp_path, models_dir, threshold=2)
    try:
        one = release(models_dir, tmp_path, 2)
        final = device.install(one)
        assert final.reason == "below_threshold"
        sig = one.envelope.signatures[0]
        doubled = Envelope(one.envelope.payload_type, one.envelope.payload, (sig, sig))
        final = device.install(one, envelope=doubled.to_json())
        assert final.reason == "below_threshold"
        both = release(models_dir, tmp_path, 2, keys=(RELEASE_KEY, SECOND_KEY))
        assert device.install(both).outcome == "installed"
        assert device.serving_version() == 2
    finally:
        device.close()


def test_endless_data_is_refused_beyond_the_signed_length(device: Device, models_dir: Path,
                                                          tmp_path: Path) -> None:
    from fleetlite.sdk.chunks import encode_frame

    bundle = release(models_dir, tmp_path, 2)
    model = bundle.manifest.files[0]
    beyond = ((model.length + CHUNK - 1) // CHUNK) * CHUNK
    junk = [encode_frame(0, beyond + i * CHUNK, b"x" * CHUNK) for i in range(50)]
    final = device.install(bundle, extra_frames=junk)
    assert final.outcome == "installed"
    slot = device.state_dir / "models" / "intent" / "a" / model.name
    assert slot.stat().st_size == model.length  # not one byte more than was signed


def test_crashing_model_is_caught_by_the_isolated_smoke_test(
    device: Device, models_dir: Path, tmp_path: Path
) -> None:
    from fleetlite.sdk.smoke import SmokeCase, SmokeVectors, Tensor

    path = tmp_path / "crash.tflite"
    path.write_bytes(crashing_model())
    good = release(models_dir, tmp_path, 2)
    # a release whose signatures are fine: the crash only shows when the model is prepared
    vectors = SmokeVectors((SmokeCase((Tensor("x", np.zeros((1, 4, 4), np.float32)),),
                                      (Tensor("y", np.zeros((1, 4), np.float32)),)),))
    from fleetlite.sdk.manifest import file_entry

    doc = json.loads(good.envelope.payload)
    files = {"intent_classifier.tflite": path.read_bytes(),
             "intent_classifier.smoke.json": vectors.to_json(),
             "intent_classifier.vocab.json": good.files["intent_classifier.vocab.json"]}
    doc["files"] = [file_entry(f["name"], files[f["name"]], f["role"]).to_dict()
                    for f in doc["files"]]
    payload = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    final = device.install(good, envelope=_resign(good, payload, RELEASE_KEY),
                           files=[files[f["name"]] for f in doc["files"]])
    if crash_fixture_crashes():
        assert (final.outcome, final.reason) == ("rejected", "smoke_crashed"), final.message
        assert "SIGSEGV" in final.message
    else:  # ai-edge-litert refuses the model instead of crashing
        assert (final.outcome, final.reason) == ("rejected", "invalid_model"), final.message
    assert device.serving_version() == 1
    # the version is remembered: not installed again unless an operator retries
    assert device.counters() == (None, (2,)) or device.counters()[1] == (2,)


def test_wrong_outputs_are_rejected_and_not_retried_without_the_operator(
    device: Device, models_dir: Path, tmp_path: Path
) -> None:
    good = release(models_dir, tmp_path, 2)
    wrong = intent_classifier(scramble_labels=True).tflite
    files = [wrong if f.role == "model" else good.files[f.name] for f in good.manifest.files]
    from fleetlite.sdk.manifest import file_entry

    doc = json.loads(good.envelope.payload)
    by_name = dict(zip([f.name for f in good.manifest.files], files))
    doc["files"] = [file_entry(f["name"], by_name[f["name"]], f["role"]).to_dict()
                    for f in doc["files"]]
    envelope = _resign(good, json.dumps(doc, sort_keys=True, separators=(",", ":")).encode(),
                       RELEASE_KEY)
    final = device.install(good, envelope=envelope, files=files)
    assert (final.outcome, final.reason) == ("rejected", "smoke_output_mismatch")
    again = device.install(good, envelope=envelope, files=files)
    assert (again.outcome, again.reason) == ("rejected", "previously_rejected")
    retried = device.install(good, envelope=envelope, files=files, retry=True)
    assert retried.reason == "smoke_output_mismatch"  # the operator's retry ran it again
    assert device.serving_version() == 1


@pytest.mark.parametrize(("budget", "reason"), [("max_p95_latency_ms", "over_latency_budget"),
                                                 ("max_peak_rss_mb", "over_memory_budget")])
def test_over_budget_for_the_device_class(tmp_path: Path, models_dir: Path, budget: str,
                                          reason: str) -> None:
    base = find_device_class(CLASS)
    tight = dataclasses.replace(base, budgets=dataclasses.replace(base.budgets,
                                                                  **{budget: 1e-6}))
    device = Device(tmp_path, models_dir, device_class=tight)
    try:
        final = device.install(release(models_dir, tmp_path, 2))
        assert (final.outcome, final.reason) == ("rejected", reason)
        assert device.serving_version() == 1
    finally:
        device.close()


def test_disk_full_during_download(tmp_path: Path, models_dir: Path) -> None:
    device = Device(tmp_path, models_dir)
    staging = device.state_dir / "ota" / "staging"
    staging.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8k", "tmpfs", str(staging)],
                             capture_output=True, check=False).returncode == 0
    if not mounted:
        device.close()
        pytest.skip("needs root to mount a small tmpfs (CI runs as root)")
    try:
        final = device.install(release(models_dir, tmp_path, 2))
        assert (final.outcome, final.reason) == ("failed", "disk_full"), final.message
        assert device.serving_version() == 1 and device.counters()[0] is None
    finally:
        device.close()
        subprocess.run(["umount", str(staging)], check=False)


def test_operator_rollback_and_slots(device: Device, models_dir: Path, tmp_path: Path) -> None:
    assert device.install(release(models_dir, tmp_path, 2)).outcome == "installed"
    assert device.install(release(models_dir, tmp_path, 3)).outcome == "installed"
    slots = device.ota.cmd_slots({})["models"]["intent"]
    assert {slots["slots"]["a"]["version"], slots["slots"]["b"]["version"]} == {2, 3}
    result = device.ota.cmd_rollback({"model": "intent", "from_version": 3})
    assert result["rolled_back"] == 3
    assert device.serving_version() == 2
    # the same command delivered again (QoS 1 is at-least-once) changes nothing
    again_cmd = device.ota.cmd_rollback({"model": "intent", "from_version": 3})
    assert again_cmd["rolled_back"] is None and device.serving_version() == 2
    final = device.fleet.finals()[-1]
    assert (final.outcome, final.reason) == ("rolled_back", "operator_rollback")
    # version 3 is not reinstalled unless retried
    again = device.install(release(models_dir, tmp_path, 3))
    assert again.reason == "previously_rejected"


def test_root_rotation_must_be_signed_by_the_old_keys(device: Device) -> None:
    from fleetlite.sdk.errors import SignatureError

    new_key = SigningKey.from_seed(b"\x31" * 32)
    rotated = new_root([new_key.public_key], [RELEASE_KEY.public_key],
                       expires=BUILD_TIME + 10**8, version=2)
    only_new = root_envelope(rotated).sign(new_key).to_json()
    with pytest.raises(SignatureError):
        device.ota.cmd_update_root({"root": base64.b64encode(only_new).decode()})
    assert device.ota.root is not None and device.ota.root.version == 1
    both = root_envelope(rotated).sign(new_key).sign(ROOT_KEY).to_json()
    assert device.ota.cmd_update_root({"root": base64.b64encode(both).decode()}) == {
        "root_version": 2}
