"""Keys, root of trust, envelopes and release verification: a table of hostile updates, each with
the reason code a device must report, plus root rotation, key files and the documented vectors."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import json
import os
import re
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fleetlite.sdk.envelope import (
    MANIFEST_PAYLOAD_TYPE,
    ROOT_PAYLOAD_TYPE,
    Envelope,
    Signature,
    pae,
)
from fleetlite.sdk.errors import (
    EqualVersion,
    KeyFileError,
    LengthMismatchError,
    MalformedError,
    OversizeError,
    RollbackError,
    SignatureError,
    UnsafeNameError,
    UpdateRejected,
)
from fleetlite.sdk.keys import PublicKey, SigningKey, load_public_key
from fleetlite.sdk.manifest import (
    FileEntry,
    Manifest,
    ModelInfo,
    SmokeSpec,
    TensorInfo,
    Tolerance,
    check_file_name,
    file_entry,
    parse_manifest,
    release_id,
)
from fleetlite.sdk.trust import (
    Root,
    load_trusted_root,
    new_root,
    root_envelope,
    update_root,
)
from fleetlite.sdk.verify import (
    REASONS,
    FileVerifier,
    Limits,
    TimeFloor,
    verify_bytes,
    verify_file,
    verify_release,
)

DOC = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"
BIN = Path(sys.executable).parent

NOW = 1_764_201_600  # the time floor used throughout (2025-11-27)
DAY = 86_400
MODEL = b"TFL3-model-bytes-" * 64
SMOKE = b'{"_type":"fleetlite.smoke"}'
OTHER_MODEL = b"TFL3-model-BYTES-" * 64  # same length as MODEL, different content


def key(n: int, role: str = "") -> SigningKey:
    """Deterministic test keys (fast, reproducible failures)."""
    return SigningKey.from_seed(bytes([n]) * 32, role=role)


ROOT_KEYS = [key(1, "root"), key(2, "root"), key(3, "root")]
RELEASE_KEYS = [key(11, "release"), key(12, "release"), key(13, "release")]
STRANGER = key(99, "release")


def make_root(
    root_keys: list[SigningKey] | None = None,
    release_keys: list[SigningKey] | None = None,
    *,
    root_threshold: int = 1,
    release_threshold: int = 1,
    version: int = 1,
    expires: int = NOW + 365 * DAY,
) -> Root:
    return new_root(
        [k.public_key for k in (root_keys or ROOT_KEYS[:1])],
        [k.public_key for k in (release_keys or RELEASE_KEYS[:1])],
        root_threshold=root_threshold,
        release_threshold=release_threshold,
        version=version,
        expires=expires,
    )


def signed_root(root: Root, *signers: SigningKey) -> bytes:
    envelope = root_envelope(root)
    for signer in signers:
        envelope = envelope.sign(signer)
    return envelope.to_json()


def manifest_dict(**overrides: Any) -> dict[str, Any]:
    manifest = Manifest(
        name="intent",
        version=3,
        files=(file_entry("intent.tflite", MODEL, "model"),
               file_entry("intent.smoke.json", SMOKE, "smoke")),
        model=ModelInfo("intent.tflite", (TensorInfo("tokens", (1, 16), "int32"),),
                        (TensorInfo("probabilities", (1, 11), "float32"),)),
        smoke=SmokeSpec("intent.smoke.json", Tolerance()),
        device_classes=("raspberry-pi-4", "small-arm-gateway"),
        min_agent_version="0.1.0",
        issued=NOW - DAY,
        expires=NOW + 30 * DAY,
    )
    data = manifest.to_dict()
    data.update(overrides)
    return data


def payload_of(data: dict[str, Any]) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()


def envelope_bytes(payload: bytes, *signers: SigningKey,
                   payload_type: str = MANIFEST_PAYLOAD_TYPE) -> bytes:
    envelope = Envelope(payload_type, payload)
    for signer in signers:
        envelope = envelope.sign(signer)
    return envelope.to_json()


def release(*signers: SigningKey, **overrides: Any) -> bytes:
    return envelope_bytes(payload_of(manifest_dict(**overrides)),
                          *(signers or (RELEASE_KEYS[0],)))


def verify(data: bytes, **kwargs: Any) -> Manifest:
    args: dict[str, Any] = {
        "root": make_root(),
        "installed_version": 2,
        "device_class": "raspberry-pi-4",
        "time_floor": float(NOW),
    }
    args.update(kwargs)
    return verify_release(data, **args)


# --- the good path ----------------------------------------------------------------------------


def test_a_valid_release_verifies_and_its_files_match() -> None:
    data = release()
    manifest = verify(data)
    assert (manifest.name, manifest.version) == ("intent", 3)
    assert manifest.release_id == release_id(Envelope.from_json(
        data, max_bytes=10**6, max_payload_bytes=10**6).payload)
    verify_bytes(MODEL, manifest.file("intent.tflite"))
    verify_file(io.BytesIO(SMOKE), manifest.file("intent.smoke.json"))
    assert verify(data, installed_version=None).version == 3


def test_manifest_round_trips_byte_for_byte() -> None:
    payload = payload_of(manifest_dict())
    assert parse_manifest(payload).to_json() == payload


def test_threshold_two_of_three_distinct_release_keys() -> None:
    root = make_root(release_keys=RELEASE_KEYS, release_threshold=2)
    assert verify(release(RELEASE_KEYS[0], RELEASE_KEYS[2]), root=root).version == 3


def test_unknown_and_bad_signatures_do_not_block_a_met_threshold() -> None:
    good = Envelope.from_json(release(STRANGER, RELEASE_KEYS[0]), max_bytes=10**6,
                              max_payload_bytes=10**6)
    forged = Signature(RELEASE_KEYS[1].keyid, bytes(64))
    data = dataclasses.replace(good, signatures=(forged, *good.signatures)).to_json()
    root = make_root(release_keys=RELEASE_KEYS[:2])
    assert verify(data, root=root).version == 3


def test_an_operator_retry_allows_a_previously_rejected_version() -> None:
    assert verify(release(), rejected_versions={3}, retry_rejected=True).version == 3


# --- hostile updates: every case names the reason code a device reports ---------------------

Case = Callable[[], "tuple[bytes, dict[str, Any]]"]


def _duplicated_signature() -> tuple[bytes, dict[str, Any]]:
    env = Envelope.from_json(release(), max_bytes=10**6, max_payload_bytes=10**6)
    twice = dataclasses.replace(env, signatures=env.signatures * 2).to_json()
    return twice, {"root": make_root(release_keys=RELEASE_KEYS, release_threshold=2)}


def _tampered_after_signing() -> tuple[bytes, dict[str, Any]]:
    data = json.loads(release())
    payload = base64.b64decode(data["payload"]).replace(b'"version":3', b'"version":4')
    data["payload"] = base64.b64encode(payload).decode()
    return json.dumps(data).encode(), {}


def _retyped_after_signing() -> tuple[bytes, dict[str, Any]]:
    data = json.loads(release())
    data["payloadType"] = "application/vnd.fleetlite.manifest+json;v=2"
    return json.dumps(data).encode(), {}


def _re_serialised_after_signing() -> tuple[bytes, dict[str, Any]]:
    # Same JSON value, different bytes: the signature covers bytes, so it no longer verifies.
    data = json.loads(release())
    value = json.loads(base64.b64decode(data["payload"]))
    data["payload"] = base64.b64encode(json.dumps(value, indent=1).encode()).decode()
    return json.dumps(data).encode(), {}


def _name(name: str) -> Case:
    def case() -> tuple[bytes, dict[str, Any]]:
        data = manifest_dict()
        data["files"][1]["name"] = name
        data["smoke"]["file"] = name
        return envelope_bytes(payload_of(data), RELEASE_KEYS[0]), {}
    return case


def _payload(raw: bytes) -> Case:
    return lambda: (envelope_bytes(raw, RELEASE_KEYS[0]), {})


def _fields(**overrides: Any) -> Case:
    return lambda: (release(**overrides), {})


def _args(data: Callable[[], bytes], **kwargs: Any) -> Case:
    return lambda: (data(), kwargs)


def _too_many_files() -> tuple[bytes, dict[str, Any]]:
    data = manifest_dict()
    data["files"] += [file_entry(f"extra{i}.bin", b"x", "data").to_dict() for i in range(20)]
    return envelope_bytes(payload_of(data), RELEASE_KEYS[0]), {}


def _huge_file() -> tuple[bytes, dict[str, Any]]:
    data = manifest_dict()
    data["files"][0]["length"] = 2**40
    return envelope_bytes(payload_of(data), RELEASE_KEYS[0]), {}


def _many_signatures() -> tuple[bytes, dict[str, Any]]:
    env = Envelope.from_json(release(), max_bytes=10**6, max_payload_bytes=10**6)
    return dataclasses.replace(env, signatures=env.signatures * 40).to_json(), {}


HOSTILE: list[tuple[str, Case, str]] = [
    # signatures
    ("unsigned", lambda: (envelope_bytes(payload_of(manifest_dict())), {}), "unsigned"),
    ("signed by an unknown key", lambda: (release(STRANGER), {}), "untrusted_signer"),
    ("signed by a root key, not a release key", lambda: (release(ROOT_KEYS[0]), {}),
     "untrusted_signer"),
    ("below threshold", _args(lambda: release(RELEASE_KEYS[0]),
                              root=make_root(release_keys=RELEASE_KEYS, release_threshold=2)),
     "below_threshold"),
    ("the same key counted twice", _duplicated_signature, "below_threshold"),
    ("the same key plus an unknown key", _args(
        lambda: release(RELEASE_KEYS[0], STRANGER),
        root=make_root(release_keys=RELEASE_KEYS, release_threshold=2)), "below_threshold"),
    ("manifest tampered after signing", _tampered_after_signing, "bad_signature"),
    ("payload type changed after signing", _retyped_after_signing, "bad_signature"),
    ("payload re-serialised after signing", _re_serialised_after_signing, "bad_signature"),
    ("root metadata signed by a release key", lambda: (envelope_bytes(
        payload_of(manifest_dict()), RELEASE_KEYS[0], payload_type=ROOT_PAYLOAD_TYPE), {}),
     "wrong_type"),
    # envelope and manifest shape
    ("not JSON", lambda: (b"\x00garbage", {}), "malformed"),
    ("envelope with an extra field", lambda: (
        json.dumps({**json.loads(release()), "x": 1}).encode(), {}), "malformed"),
    ("signed payload that is not JSON", _payload(b"not json"), "malformed"),
    ("signed manifest with duplicate keys", _payload(
        payload_of(manifest_dict())[:-1] + b',"version":99}'), "malformed"),
    ("unknown manifest field", _fields(surprise=True), "malformed"),
    ("version 0", _fields(version=0), "malformed"),
    ("version as a string", _fields(version="4"), "malformed"),
    ("expires before issued", _fields(expires=NOW - 2 * DAY), "malformed"),
    ("a bad sha256", _fields(files=[{**manifest_dict()["files"][0], "sha256": "AB" * 32},
                                    manifest_dict()["files"][1]]), "malformed"),
    ("an unknown file role", _fields(files=[{**manifest_dict()["files"][0], "role": "exe"},
                                            manifest_dict()["files"][1]]), "malformed"),
    ("model file not listed", _fields(model={**manifest_dict()["model"],
                                             "file": "other.tflite"}), "malformed"),
    # path traversal
    ("name ../x", _name("../x"), "unsafe_name"),
    ("name /etc/passwd", _name("/etc/passwd"), "unsafe_name"),
    ("name a/b", _name("a/b"), "unsafe_name"),
    ("name a\\b", _name("a\\b"), "unsafe_name"),
    ("name ..", _name(".."), "unsafe_name"),
    ("name .hidden", _name(".hidden"), "unsafe_name"),
    ("name with NUL", _name("a\x00b"), "unsafe_name"),
    ("name with a newline", _name("a\nb"), "unsafe_name"),
    ("name manifest.json", _name("manifest.json"), "unsafe_name"),
    ("name of 129 characters", _name("a" * 129), "unsafe_name"),
    # size caps
    ("oversize envelope", _args(release, limits=Limits(max_envelope_bytes=1000)), "oversize"),
    ("oversize manifest payload", _args(release, limits=Limits(max_manifest_bytes=300)),
     "oversize"),
    ("too many files", _too_many_files, "oversize"),
    ("a file over the cap", _huge_file, "oversize"),
    ("too many signatures", _many_signatures, "oversize"),
    # version, model, class, time, agent
    ("a release of another model", _args(release, model_name="sensor"), "wrong_model"),
    ("version rollback", _args(release, installed_version=4), "rollback"),
    ("replay of the installed release", _args(release, installed_version=3), "same_version"),
    ("previously rejected version", _args(release, rejected_versions={3}),
     "previously_rejected"),
    ("wrong device class", _args(release, device_class="jetson-orin-nano"),
     "wrong_device_class"),
    ("expired at the floor", _fields(expires=NOW), "expired"),
    ("expired long ago", _fields(issued=NOW - 90 * DAY, expires=NOW - 60 * DAY), "expired"),
    ("expired root", _args(release, root=make_root(expires=NOW - 1)), "expired"),
    ("agent too old", _fields(min_agent_version="99.0"), "agent_too_old"),
]


@pytest.mark.parametrize(("case", "reason"), [(c, r) for _, c, r in HOSTILE],
                         ids=[name for name, _, _ in HOSTILE])
def test_hostile_release_is_refused_with_its_reason(case: Case, reason: str) -> None:
    data, kwargs = case()
    with pytest.raises(UpdateRejected) as info:
        verify(data, **kwargs)
    assert info.value.reason == reason, str(info.value)
    assert reason in REASONS


def test_same_version_is_the_nothing_new_signal() -> None:
    with pytest.raises(EqualVersion) as info:
        verify(release(), installed_version=3)
    assert isinstance(info.value, RollbackError)


def test_expiry_uses_the_floor_not_the_device_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    data = release(issued=NOW - 10 * DAY, expires=NOW - DAY)
    monkeypatch.setattr(time, "time", lambda: 0.0)  # a device whose clock says 1970
    with pytest.raises(UpdateRejected) as info:
        verify(data)
    assert info.value.reason == "expired"
    monkeypatch.setattr(time, "time", lambda: 4e9)  # ... or 2096: irrelevant either way
    assert verify(release()).version == 3


def test_checks_run_in_the_documented_order() -> None:
    # Unsigned AND rolled back AND wrong class: the signature check comes first.
    data = envelope_bytes(payload_of(manifest_dict(version=1)))
    with pytest.raises(SignatureError):
        verify(data, device_class="jetson-orin-nano")
    # Rolled back AND wrong class AND expired: the version check comes first.
    data = release(version=1, issued=NOW - 9 * DAY, expires=NOW - DAY)
    with pytest.raises(RollbackError):
        verify(data, device_class="jetson-orin-nano")


# --- files: hash, length, endless data, mix-and-match ----------------------------------------

ENTRY = file_entry("intent.tflite", MODEL, "model")


class EndlessStream(io.RawIOBase):
    """A source that never ends; counts what it hands out."""

    def __init__(self) -> None:
        self.served = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            raise AssertionError("an unbounded read() of an endless stream")
        self.served += size
        return b"\x00" * size


def test_endless_stream_stops_one_byte_past_the_signed_length() -> None:
    stream = EndlessStream()
    with pytest.raises(LengthMismatchError) as info:
        verify_file(stream, ENTRY)
    assert info.value.reason == "length_mismatch"
    assert stream.served == ENTRY.length + 1


def test_endless_generator_is_not_consumed_past_the_signed_length() -> None:
    pulled = []

    def chunks() -> Iterator[bytes]:
        while True:
            pulled.append(1)
            yield MODEL[:100]

    with pytest.raises(LengthMismatchError):
        verify_file(chunks(), ENTRY)
    assert len(pulled) * 100 <= ENTRY.length + 100


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (MODEL[:-1], "length_mismatch"),
        (MODEL + b"!", "length_mismatch"),
        (b"", "length_mismatch"),
        (MODEL[:-1] + b"X", "hash_mismatch"),
        (OTHER_MODEL, "hash_mismatch"),  # mix-and-match: release A's manifest, release B's file
    ],
    ids=["short", "long", "empty", "flipped byte", "mix-and-match"],
)
def test_file_problems_carry_their_reason(content: bytes, reason: str, tmp_path: Path) -> None:
    path = tmp_path / "intent.tflite"
    path.write_bytes(content)
    for source in (path, str(path), io.BytesIO(content), iter([content])):
        with pytest.raises(UpdateRejected) as info:
            verify_file(source, ENTRY)
        assert info.value.reason == reason
    with pytest.raises(UpdateRejected) as info:
        verify_bytes(content, ENTRY)
    assert info.value.reason == reason


def test_chunked_verifier_accepts_exact_data_in_pieces() -> None:
    verifier = FileVerifier(ENTRY)
    for start in range(0, len(MODEL), 7):
        verifier.update(MODEL[start:start + 7])
    verifier.finish()
    assert verifier.remaining == 0


# --- root of trust ----------------------------------------------------------------------------


def test_pinned_root_must_be_self_signed_by_its_threshold() -> None:
    root = make_root(ROOT_KEYS, root_threshold=2)
    assert load_trusted_root(signed_root(root, ROOT_KEYS[0], ROOT_KEYS[1])) == root
    cases = [((), "unsigned"), ((ROOT_KEYS[0],), "below_threshold"),
             ((STRANGER,), "untrusted_signer"), ((RELEASE_KEYS[0],), "untrusted_signer")]
    for signers, reason in cases:
        with pytest.raises(SignatureError) as info:
            load_trusted_root(signed_root(root, *signers))
        assert info.value.reason == reason


def test_root_listing_one_key_under_two_ids_is_refused() -> None:
    payload = json.loads(make_root().to_payload())
    real_id = ROOT_KEYS[0].keyid
    alias = "0" * 64
    payload["keys"][alias] = payload["keys"][real_id]
    payload["roles"]["root"] = {"keyids": [real_id, alias], "threshold": 2}
    data = envelope_bytes(payload_of(payload), ROOT_KEYS[0], payload_type=ROOT_PAYLOAD_TYPE)
    with pytest.raises(MalformedError, match="sha256"):
        load_trusted_root(data)


def test_impossible_threshold_is_refused_when_building() -> None:
    with pytest.raises(MalformedError, match="threshold"):
        make_root(release_threshold=2)


V1 = make_root(ROOT_KEYS[:2], RELEASE_KEYS[:1], root_threshold=2)
V2 = make_root([ROOT_KEYS[1], ROOT_KEYS[2]], RELEASE_KEYS[1:2], root_threshold=2, version=2)


def test_root_rotation_with_old_and_new_thresholds() -> None:
    trusted = load_trusted_root(signed_root(V1, *ROOT_KEYS[:2]))
    new = update_root(trusted, signed_root(V2, *ROOT_KEYS))
    assert new.version == 2
    # The new release key is trusted, the removed one is not.
    assert verify(release(RELEASE_KEYS[1]), root=new).version == 3
    with pytest.raises(SignatureError) as info:
        verify(release(RELEASE_KEYS[0]), root=new)
    assert info.value.reason == "untrusted_signer"


ROTATIONS: list[tuple[str, Callable[[], bytes], str, str]] = [
    ("not signed by the old keys", lambda: signed_root(V2, ROOT_KEYS[1], ROOT_KEYS[2]),
     "below_threshold", "root"),
    ("signed only by new keys absent from the old root",
     lambda: signed_root(make_root([ROOT_KEYS[2]], version=2), ROOT_KEYS[2]),
     "untrusted_signer", "root"),
    ("not signed by the new keys", lambda: signed_root(V2, ROOT_KEYS[0], ROOT_KEYS[1]),
     "below_threshold", "new root"),
    ("skipping a version", lambda: signed_root(
        dataclasses.replace(V2, version=3), *ROOT_KEYS), "version_skip", ""),
    ("the same version again", lambda: signed_root(V1, *ROOT_KEYS[:2]), "same_version", ""),
    ("tampered after signing", lambda: signed_root(V2, *ROOT_KEYS).replace(
        b'"payload": "ey', b'"payload": "EY'), "bad_signature", "root"),
    ("a manifest instead of a root", lambda: envelope_bytes(
        payload_of(manifest_dict()), *ROOT_KEYS), "wrong_type", ""),
]


@pytest.mark.parametrize(("make", "reason", "role"), [r[1:] for r in ROTATIONS],
                         ids=[r[0] for r in ROTATIONS])
def test_bad_root_rotation_is_refused_and_trust_does_not_move(
    make: Callable[[], bytes], reason: str, role: str
) -> None:
    trusted = load_trusted_root(signed_root(V1, *ROOT_KEYS[:2]))
    before = trusted.to_payload()
    with pytest.raises(UpdateRejected) as info:
        update_root(trusted, make())
    assert info.value.reason == reason, str(info.value)
    if role:
        assert isinstance(info.value, SignatureError) and info.value.role == role
    assert trusted.to_payload() == before and trusted.version == 1


def test_root_rollback_is_refused() -> None:
    v1 = make_root(ROOT_KEYS[:1])
    v2 = make_root(ROOT_KEYS[:1], version=2)
    trusted = update_root(load_trusted_root(signed_root(v1, ROOT_KEYS[0])),
                          signed_root(v2, ROOT_KEYS[0]))
    with pytest.raises(RollbackError) as info:
        update_root(trusted, signed_root(v1, ROOT_KEYS[0]))
    assert info.value.reason == "rollback"


# --- envelope ---------------------------------------------------------------------------------


def test_pae_matches_the_dsse_specification_example() -> None:
    assert pae("http://example.com/HelloWorld", b"hello world") == (
        b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
    )


def test_url_safe_base64_is_accepted_but_not_mixed() -> None:
    data = json.loads(release())
    sig = data["signatures"][0]["sig"]
    data["signatures"][0]["sig"] = base64.urlsafe_b64encode(base64.b64decode(sig)).decode()
    assert verify(json.dumps(data).encode()).version == 3
    data["payload"] = data["payload"][:10] + "-+" + data["payload"][12:]
    with pytest.raises(MalformedError):
        verify(json.dumps(data).encode())


@given(st.binary(max_size=300))
def test_arbitrary_bytes_only_ever_raise_update_rejected(data: bytes) -> None:
    with pytest.raises(UpdateRejected):
        verify(data)


@given(st.text(max_size=40))
def test_every_accepted_file_name_stays_inside_its_directory(name: str) -> None:
    try:
        check_file_name(name)
    except UnsafeNameError:
        return
    base = "/staging/release"
    joined = os.path.normpath(os.path.join(base, name))
    assert os.path.dirname(joined) == base and os.path.basename(joined) == name


# --- time floor -------------------------------------------------------------------------------


def test_time_floor_only_moves_forward() -> None:
    floor = TimeFloor.start(build_time=1000.0, persisted=5000.0, monotonic_now=10.0)
    assert floor.now(10.0) == 5000.0
    assert floor.now(70.0) == 5060.0
    assert floor.now(5.0) == 5000.0  # a monotonic reading from before: never backwards
    later = floor.observe(9000.0, monotonic_now=20.0)
    assert later.now(20.0) == 9000.0 and later.now(30.0) == 9010.0
    assert floor.observe(10.0, monotonic_now=20.0).now(20.0) == 5010.0
    assert TimeFloor.start(build_time=1000.0, persisted=None, monotonic_now=0.0).floor == 1000.0


# --- key files --------------------------------------------------------------------------------


def test_key_id_is_the_sha256_of_the_raw_public_key() -> None:
    k = key(5)
    assert k.keyid == hashlib.sha256(k.public_key.public).hexdigest()
    assert k.public_key.verify(k.sign(b"x"), b"x")
    assert not k.public_key.verify(k.sign(b"x"), b"y")
    assert not k.public_key.verify(b"short", b"x")


def test_private_key_file_is_0600_atomic_and_never_overwritten(tmp_path: Path) -> None:
    old = os.umask(0)  # a permissive umask must not loosen the file
    try:
        k = SigningKey.generate(role="release")
        path = k.save(tmp_path / "release.key")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["release.key"]  # no temp file left
    assert SigningKey.load(path).keyid == k.keyid
    with pytest.raises(KeyFileError, match="already exists"):
        SigningKey.generate().save(path)
    assert SigningKey.load(path).keyid == k.keyid


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660])
def test_loading_a_key_readable_by_others_says_chmod_600(tmp_path: Path, mode: int) -> None:
    path = SigningKey.generate().save(tmp_path / "k.key")
    path.chmod(mode)
    with pytest.raises(KeyFileError, match=r"chmod 600"):
        SigningKey.load(path)


def test_private_key_material_never_appears_in_reprs_or_errors(tmp_path: Path) -> None:
    k = SigningKey.generate(role="root")
    path = k.save(tmp_path / "k.key")
    secret = json.loads(path.read_text())["private"]
    assert secret not in repr(k) and secret not in str(k)
    data = json.loads(path.read_text())
    data["keyid"] = "0" * 64
    corrupt = tmp_path / "corrupt.key"
    corrupt.write_text(json.dumps(data))
    corrupt.chmod(0o600)
    with pytest.raises(KeyFileError) as info:
        SigningKey.load(corrupt)
    assert secret not in str(info.value)
    broken = tmp_path / "broken.key"
    broken.write_text('{"private": "' + secret + '"')  # truncated JSON quoting the secret
    broken.chmod(0o600)
    with pytest.raises(KeyFileError) as info:
        SigningKey.load(broken)
    assert secret not in str(info.value)
    with pytest.raises(TypeError):
        import pickle

        pickle.dumps(k)


def test_public_key_export_and_load(tmp_path: Path) -> None:
    k = SigningKey.generate(role="release")
    pub_path = k.save_public(tmp_path / "r.pub")
    public, role = load_public_key(pub_path)
    assert public == k.public_key and role == "release"
    assert "private" not in pub_path.read_text()
    assert load_public_key(k.save(tmp_path / "r.key"))[0] == k.public_key
    assert PublicKey.from_hex(k.public_key.public.hex()) == k.public_key


# --- CLI: keys --------------------------------------------------------------------------------


def fleetlite(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "fleetlite"), *args], capture_output=True, text=True,
                          timeout=120, cwd=cwd, check=False)


def test_cli_keys_create_prints_only_public_material(tmp_path: Path) -> None:
    result = fleetlite("keys", "create", "--role", "release", "--out", "keys", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    key_files = sorted((tmp_path / "keys").glob("*.key"))
    assert len(key_files) == 1
    data = json.loads(key_files[0].read_text())
    assert stat.S_IMODE(key_files[0].stat().st_mode) == 0o600
    assert data["keyid"] in result.stdout and data["public"] in result.stdout
    assert data["private"] not in result.stdout + result.stderr


def test_cli_root_init_rotate_show(tmp_path: Path) -> None:
    def ok(*args: str) -> str:
        result = fleetlite(*args, cwd=tmp_path)
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout

    for name, role in (("r1", "root"), ("r2", "root"), ("rel", "release")):
        ok("keys", "create", "--role", role, "--out", "k", "--name", name)
    ok("keys", "root", "init", "--root-key", "k/r1.key", "--release-key", "k/rel.pub",
       "--out", "root.json")
    v1 = load_trusted_root((tmp_path / "root.json").read_bytes())
    out = ok("keys", "root", "rotate", "--root", "root.json", "--sign", "k/r1.key",
             "--root-key", "k/r2.key", "--release-key", "k/rel.pub", "--out", "root2.json")
    assert "met" in out
    assert update_root(v1, (tmp_path / "root2.json").read_bytes()).version == 2
    shown = json.loads(ok("keys", "root", "show", "root2.json", "--previous", "root.json",
                          "-o", "json"))
    assert shown["rotation"] == "ok" and shown["version"] == 2
    # A rotation the old key did not sign: written (others may sign later) but refused.
    fleetlite("keys", "root", "rotate", "--root", "root.json", "--root-key", "k/r2.key",
              "--release-key", "k/rel.pub", "--out", "bad.json", cwd=tmp_path)
    refused = fleetlite("keys", "root", "show", "bad.json", "--previous", "root.json",
                        cwd=tmp_path)
    assert refused.returncode == 1 and "untrusted_signer" in refused.stdout
    ok("keys", "root", "sign", "bad.json", "--key", "k/r1.key")
    assert update_root(v1, (tmp_path / "bad.json").read_bytes()).version == 2
    again = fleetlite("keys", "root", "init", "--root-key", "k/r1.key", "--release-key",
                      "k/rel.pub", "--out", "root.json", cwd=tmp_path)
    assert again.returncode == 1 and "already exists" in again.stderr


# --- docs/protocol.md test vectors ------------------------------------------------------------

VECTOR = re.compile(r"<!-- signing-vector: (\w+) -->\s*```\w+\n(.*?)\n```", re.S)


def doc_vectors() -> dict[str, str]:
    return dict(VECTOR.findall(DOC.read_text()))


def test_doc_vectors_verify_with_the_code() -> None:
    v = doc_vectors()
    root_key = SigningKey.from_seed(bytes.fromhex(v["root_seed"]))
    release_key = SigningKey.from_seed(bytes.fromhex(v["release_seed"]))
    assert root_key.public_key.public.hex() == v["root_public"]
    assert release_key.public_key.public.hex() == v["release_public"]
    assert (root_key.keyid, release_key.keyid) == (v["root_keyid"], v["release_keyid"])

    root = load_trusted_root(v["root_envelope"].encode())
    assert root.to_payload() == v["root_payload"].encode()

    payload = v["manifest_payload"].encode()
    signed = json.loads(v["pae_prefix"]).encode() + payload
    assert signed == pae(MANIFEST_PAYLOAD_TYPE, payload)
    assert hashlib.sha256(signed).hexdigest() == v["pae_sha256"]
    assert base64.b64encode(release_key.sign(signed)).decode() == v["manifest_signature"]

    envelope = v["manifest_envelope"].encode()
    manifest = verify_release(envelope, root=root, installed_version=1,
                              device_class="raspberry-pi-4", time_floor=1764201600.0)
    assert manifest.release_id == v["release_id"] == release_id(payload)
    assert manifest.to_json() == payload
    for name in ("model_file", "smoke_file"):
        content = (v[name] + "\n").encode()
        matching = [e for e in manifest.files if e.sha256 == hashlib.sha256(content).hexdigest()]
        assert len(matching) == 1
        verify_bytes(content, matching[0])

    tampered = json.loads(envelope)
    flipped = bytearray(payload)
    flipped[-2] ^= 1
    tampered["payload"] = base64.b64encode(bytes(flipped)).decode()
    with pytest.raises(SignatureError) as info:
        verify_release(json.dumps(tampered).encode(), root=root, installed_version=1,
                       device_class="raspberry-pi-4", time_floor=1764201600.0)
    assert info.value.reason == "bad_signature"


def test_doc_lists_every_reason_code() -> None:
    text = DOC.read_text()
    section = text[text.index("## Signed releases"):]
    for reason in REASONS:
        assert f"`{reason}`" in section, reason


def test_file_entry_matches_its_content() -> None:
    entry = file_entry("x.bin", b"abc", "data")
    assert entry == FileEntry("x.bin", hashlib.sha256(b"abc").hexdigest(), 3, "data")


def test_device_side_modules_import_nothing_fleet_side() -> None:
    code = (
        "import sys\n"
        "import fleetlite.sdk.keys, fleetlite.sdk.envelope, fleetlite.sdk.trust\n"
        "import fleetlite.sdk.manifest, fleetlite.sdk.smoke, fleetlite.sdk.verify\n"
        "bad = {'flatbuffers', 'tflite', 'tflite_runtime', 'ai_edge_litert', 'hypothesis',\n"
        "       'pytest'}\n"
        "side = ('fleetlite.fleet', 'fleetlite.agent', 'fleetlite.tools')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in bad or m.startswith(side)))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60, check=True)
    assert result.stdout.strip() == "[]"


def test_sixteen_files_parse_and_a_seventeenth_is_oversize_before_any_entry_is_read() -> None:
    data = manifest_dict()
    data["files"] += [file_entry(f"extra{i}.bin", b"x", "data").to_dict() for i in range(14)]
    assert len(parse_manifest(payload_of(data)).files) == 16
    data["files"].append({"name": "../not-even-a-plain-name"})
    with pytest.raises(OversizeError):
        parse_manifest(payload_of(data))
    data["files"] = []
    with pytest.raises(MalformedError):
        parse_manifest(payload_of(data))


def test_the_payload_cap_counts_decoded_bytes_not_base64_characters() -> None:
    limits = Limits()
    for size, accepted in ((limits.max_manifest_bytes, True),
                           (limits.max_manifest_bytes + 1, False)):
        wrapper = Envelope(MANIFEST_PAYLOAD_TYPE, b"x" * size).to_json()
        text = json.loads(wrapper)["payload"]
        assert len(text) > limits.max_manifest_bytes  # the base64 text is 4/3 longer
        if accepted:
            envelope = Envelope.from_json(wrapper, max_bytes=limits.max_envelope_bytes,
                                          max_payload_bytes=limits.max_manifest_bytes)
            assert len(envelope.payload) == size
        else:
            with pytest.raises(OversizeError):
                Envelope.from_json(wrapper, max_bytes=limits.max_envelope_bytes,
                                   max_payload_bytes=limits.max_manifest_bytes)
