"""The delta parts of the contract as docs/protocol.md states them: the manifest's ``deltas``
field (parsed, checked against ``files``, serialized only when present) and the delta test
vector, which this reader must apply."""

from __future__ import annotations

import copy
import re
from typing import Any

import pytest

from fleetlite.sdk.delta import apply_delta_bytes, read_header
from fleetlite.sdk.errors import MalformedError, UpdateRejected
from fleetlite.sdk.manifest import DeltaRef, file_entry, parse_manifest, sha256_hex
from tests.test_protocol_docs import DOC
from tests.test_signing import manifest_dict, payload_of

DELTA_VECTOR = r"<!-- delta-vector: {} -->\s*```text\n(.*?)\n```"
BASE_SHA = "ab" * 32


def vector(name: str) -> str:
    found = re.search(DELTA_VECTOR.format(name), DOC.read_text(), re.S)
    assert found, f"no delta vector {name} in docs/protocol.md"
    return found.group(1)


def test_the_documented_delta_rebuilds_the_documented_target() -> None:
    base, target = (vector(n).encode() + b"\n" for n in ("base", "target"))
    delta = bytes.fromhex(vector("delta"))
    assert apply_delta_bytes(base, delta) == target
    import io

    header = read_header(io.BytesIO(delta))
    assert (header.base_sha256, header.target_sha256) == (sha256_hex(base), sha256_hex(target))
    assert (header.kind, header.op_count) == (2, 4)


def with_delta(**entry: Any) -> dict[str, Any]:
    data = manifest_dict()
    data["files"].append(file_entry("intent.delta", b"delta bytes", "delta").to_dict())
    data["deltas"] = [{"file": "intent.tflite", "base_sha256": BASE_SHA, "delta": "intent.delta",
                       **entry}]
    return data


def test_a_release_with_a_delta_parses_and_serializes_the_same_bytes() -> None:
    payload = payload_of(with_delta())
    manifest = parse_manifest(payload)
    assert manifest.deltas == (DeltaRef("intent.tflite", BASE_SHA, "intent.delta"),)
    assert manifest.deltas_for("intent.tflite") == manifest.deltas
    assert manifest.to_json() == payload


def test_a_release_without_deltas_has_no_deltas_field() -> None:
    payload = payload_of(manifest_dict())
    assert b"deltas" not in parse_manifest(payload).to_json()


def _second(data: dict[str, Any]) -> dict[str, Any]:
    data["files"].append(file_entry("intent2.delta", b"other", "delta").to_dict())
    data["deltas"].append({"file": "intent.tflite", "base_sha256": BASE_SHA,
                           "delta": "intent2.delta"})
    return data


def _model_sha(data: dict[str, Any]) -> dict[str, Any]:
    data["deltas"][0]["base_sha256"] = data["files"][0]["sha256"]
    return data


def _orphan(data: dict[str, Any]) -> dict[str, Any]:
    data["files"].append(file_entry("stray.delta", b"x", "delta").to_dict())
    return data


def _shared(data: dict[str, Any]) -> dict[str, Any]:
    data["deltas"].append(dict(data["deltas"][0], base_sha256="cd" * 32))
    return data


def _many(data: dict[str, Any]) -> dict[str, Any]:
    data["deltas"] = [copy.deepcopy(data["deltas"][0]) for _ in range(9)]
    return data


REFUSED = [
    ("the target is not listed", lambda d: with_delta(file="absent.tflite"), "malformed"),
    ("the target is a delta", lambda d: with_delta(file="intent.delta"), "malformed"),
    ("the delta is not listed", lambda d: with_delta(delta="absent.delta"), "malformed"),
    ("the delta file is the model", lambda d: with_delta(delta="intent.tflite"), "malformed"),
    ("the base is not hex", lambda d: with_delta(base_sha256="AB" * 32), "malformed"),
    ("an unknown field", lambda d: with_delta(size=3), "malformed"),
    ("an unsafe delta name", lambda d: with_delta(delta="../x"), "unsafe_name"),
    ("two entries, one base", lambda d: _second(with_delta()), "malformed"),
    ("the base is the target", lambda d: _model_sha(with_delta()), "malformed"),
    ("a delta file no entry names", lambda d: _orphan(with_delta()), "malformed"),
    ("one delta file, two entries", lambda d: _shared(with_delta()), "malformed"),
    ("more than 8 entries", lambda d: _many(with_delta()), "malformed"),
]


@pytest.mark.parametrize("case,make,reason", REFUSED, ids=[c[0] for c in REFUSED])
def test_bad_deltas_entries_are_refused(case: str, make: Any, reason: str) -> None:
    with pytest.raises(UpdateRejected) as caught:
        parse_manifest(payload_of(make(None)))
    assert caught.value.reason == reason
    assert isinstance(caught.value, MalformedError)
