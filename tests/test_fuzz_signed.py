"""Fuzzing of the signed metadata a device parses: DSSE envelopes, release manifests (alone and
through :func:`verify_release`, re-signed so the parser behind the signature check is reached),
root metadata (pinned and rotated) and smoke-test vectors, seeded with the test vectors of
docs/protocol.md. Every input is accepted or refused with an :class:`UpdateRejected` subclass
carrying a documented reason code; nothing else escapes.
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fleetlite.sdk.envelope import MANIFEST_PAYLOAD_TYPE, ROOT_PAYLOAD_TYPE, Envelope
from fleetlite.sdk.errors import REASONS, MalformedError, UpdateRejected
from fleetlite.sdk.generation import GenerationSpec, Sampling
from fleetlite.sdk.keys import SigningKey
from fleetlite.sdk.manifest import Manifest, file_entry, parse_manifest
from fleetlite.sdk.smoke import SmokeCase, SmokeVectors, Tensor
from fleetlite.sdk.trust import load_trusted_root, parse_root_envelope, update_root
from fleetlite.sdk.verify import verify_release
from tests.fuzz_settings import (
    corrupted,
    encode,
    fuzz,
    hostile_bytes,
    mutated,
    parse_or_refuse,
    sweep,
)

DOC = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"
NOW = 1_764_201_600


def signing_vectors() -> dict[str, str]:
    found = re.findall(r"<!-- signing-vector: (\w+) -->\s*```\w+\n(.*?)\n```", DOC.read_text(),
                       re.S)
    return dict(found)


VECTORS = signing_vectors()
ROOT_KEY = SigningKey.from_seed(bytes.fromhex(VECTORS["root_seed"]))
RELEASE_KEY = SigningKey.from_seed(bytes.fromhex(VECTORS["release_seed"]))
ROOT_ENVELOPE = VECTORS["root_envelope"].encode()
ROOT_PAYLOAD = VECTORS["root_payload"].encode()
MANIFEST_ENVELOPE = VECTORS["manifest_envelope"].encode()
MANIFEST_PAYLOAD = VECTORS["manifest_payload"].encode()
TRUSTED = load_trusted_root(ROOT_ENVELOPE)


def rich_manifest() -> dict[str, Any]:
    """A valid manifest using every optional part: variants, quantization, shape signatures,
    a vocabulary and the generation metadata of a language model with its tokenizer."""
    doc = json.loads(MANIFEST_PAYLOAD)
    tokens = {"name": "tokens", "shape": [1, 16], "dtype": "int8", "shape_signature": [-1, 16],
              "quantization": {"scale": 0.5, "zero_point": -3, "scales": [0.5, 0.25],
                               "zero_points": [0, 1], "quantized_dimension": 1}}
    doc["files"] += [file_entry("intent_int8.tflite", b"int8 model", "model").to_dict(),
                     file_entry("intent_int8.smoke.json", b"int8 smoke", "smoke").to_dict(),
                     file_entry("vocab.json", b"{}", "vocab").to_dict(),
                     file_entry("lm.spm.model", b"spm", "tokenizer").to_dict()]
    doc["variants"] = [{"name": "int8",
                        "model": {"file": "intent_int8.tflite", "inputs": [tokens],
                                  "outputs": doc["model"]["outputs"]},
                        "smoke": {"file": "intent_int8.smoke.json",
                                  "tolerance": {"atol": 0.0, "rtol": 0.0, "max_lsb": 2}}}]
    doc["generation"] = GenerationSpec(
        tokenizer="lm.spm.model", tokenizer_kind="sentencepiece",
        prompt_template="<user> {prompt} <bot>", bos_id=1, stop_ids=(2,), context_length=32,
        cache_layout="default", num_layers=2, vocab_size=64, prefill_lengths=(8, 16),
        stop_strings=("\n\n",), sampling=Sampling(temperature=0.7, top_k=40, top_p=0.9),
    ).to_dict()
    return doc


RICH = rich_manifest()
MANIFESTS = [json.loads(MANIFEST_PAYLOAD), RICH]


def test_seeds_are_valid() -> None:
    for doc in MANIFESTS:
        parse_manifest(encode(doc))
    assert verify_release(MANIFEST_ENVELOPE, root=TRUSTED, installed_version=1,
                          device_class="raspberry-pi-4", time_floor=NOW).version == 2
    assert parse_root_envelope(ROOT_ENVELOPE)[1] == TRUSTED


def _check_reason(exc: UpdateRejected) -> None:
    assert exc.reason in REASONS, exc.reason


def _manifest_is_sound(manifest: Manifest) -> None:
    """An accepted manifest re-serialises (canonical JSON) to one that parses equal."""
    assert parse_manifest(manifest.to_json()) == manifest


def _parse(payload: bytes) -> Manifest | None:
    return parse_or_refuse(lambda: parse_manifest(payload), UpdateRejected, _check_reason)


# --- envelopes --------------------------------------------------------------------------------


def _envelope(data: bytes) -> Envelope | None:
    return parse_or_refuse(
        lambda: Envelope.from_json(data, max_bytes=64 * 1024, max_payload_bytes=16 * 1024),
        UpdateRejected, _check_reason)


@fuzz(300)
@given(data=hostile_bytes(MANIFEST_ENVELOPE, json.loads(MANIFEST_ENVELOPE)))
def test_envelope_parser_accepts_or_refuses_with_a_reason(data: bytes) -> None:
    envelope = _envelope(data)
    if envelope is not None:
        assert _envelope(envelope.to_json()) == envelope


def test_envelope_every_field_with_every_hostile_value() -> None:
    sweep(json.loads(MANIFEST_ENVELOPE), lambda doc: _envelope(encode(doc)))


def test_verified_envelope_every_field_with_every_hostile_value() -> None:
    # found by the long run: a payloadType with a lone surrogate broke the PAE's UTF-8 encoding
    sweep(json.loads(MANIFEST_ENVELOPE), lambda doc: _verify(encode(doc)))


# --- manifests --------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", MANIFESTS, ids=["vector", "rich"])
def test_manifest_every_field_with_every_hostile_value(seed: dict[str, Any]) -> None:
    def check(doc: Any) -> None:
        manifest = _parse(encode(doc))
        if manifest is not None:
            _manifest_is_sound(manifest)

    sweep(seed, check)


@fuzz(400)
@given(data=st.data())
def test_manifest_parser_accepts_or_refuses_with_a_reason(data: st.DataObject) -> None:
    seed = data.draw(st.sampled_from(MANIFESTS), label="seed")
    payload = data.draw(hostile_bytes(encode(seed), seed), label="payload")
    manifest = _parse(payload)
    if manifest is not None:
        _manifest_is_sound(manifest)


def _signed(payload: bytes, payload_type: str = MANIFEST_PAYLOAD_TYPE,
            key: SigningKey = RELEASE_KEY) -> bytes:
    return Envelope(payload_type, payload).sign(key).to_json()


def _verify(envelope: bytes) -> Manifest | None:
    return parse_or_refuse(
        lambda: verify_release(envelope, root=TRUSTED, installed_version=1,
                               device_class="raspberry-pi-4", time_floor=NOW),
        UpdateRejected, _check_reason)


@fuzz(250)
@given(data=st.data())
def test_verify_release_of_resigned_hostile_manifests(data: st.DataObject) -> None:
    seed = data.draw(st.sampled_from(MANIFESTS), label="seed")
    payload = data.draw(hostile_bytes(encode(seed), seed), label="payload")
    payload_type = data.draw(st.sampled_from([MANIFEST_PAYLOAD_TYPE, ROOT_PAYLOAD_TYPE, "x"]))
    manifest = _verify(_signed(payload, payload_type))
    if manifest is not None:
        assert payload_type == MANIFEST_PAYLOAD_TYPE
        assert manifest.version > 1 and "raspberry-pi-4" in manifest.device_classes


@fuzz(250)
@given(envelope=corrupted(MANIFEST_ENVELOPE)
       | mutated(json.loads(MANIFEST_ENVELOPE)).map(encode))
def test_verify_release_of_damaged_envelopes(envelope: bytes) -> None:
    manifest = _verify(envelope)
    if manifest is not None:  # whitespace or key order changed: the signed bytes did not
        assert manifest.release_id == VECTORS["release_id"]


# --- root metadata ----------------------------------------------------------------------------


def _root_check(data: bytes) -> None:
    for parse in (lambda: load_trusted_root(data), lambda: parse_root_envelope(data),
                  lambda: update_root(TRUSTED, data)):
        parse_or_refuse(parse, UpdateRejected, _check_reason)


def test_root_every_field_with_every_hostile_value() -> None:
    sweep(json.loads(ROOT_PAYLOAD), lambda doc: _root_check(_signed(encode(doc),
                                                                    ROOT_PAYLOAD_TYPE, ROOT_KEY)))


@fuzz(300)
@given(data=st.data())
def test_root_parsers_accept_or_refuse_with_a_reason(data: st.DataObject) -> None:
    seed = json.loads(ROOT_PAYLOAD)
    seed["version"] = data.draw(st.sampled_from([1, 2]), label="version")
    payload = data.draw(hostile_bytes(encode(seed), seed), label="payload")
    signer = data.draw(st.sampled_from([ROOT_KEY, RELEASE_KEY]), label="signer")
    _root_check(_signed(payload, ROOT_PAYLOAD_TYPE, signer))


@fuzz(200)
@given(data=corrupted(ROOT_ENVELOPE) | mutated(json.loads(ROOT_ENVELOPE)).map(encode))
def test_root_envelopes_damaged(data: bytes) -> None:
    _root_check(data)


# --- smoke vectors ----------------------------------------------------------------------------


def smoke_seed() -> dict[str, Any]:
    case = SmokeCase(
        inputs=(Tensor("tokens", np.arange(16, dtype=np.int32).reshape(1, 16)),
                Tensor("flag", np.array([True, False])),
                Tensor("scalar", np.array(1.5, dtype=np.float16))),
        outputs=(Tensor("probabilities", np.linspace(0, 1, 11, dtype=np.float32)[None]),
                 Tensor("q", np.array([[-128, 0, 127]], dtype=np.int8))),
    )
    doc: dict[str, Any] = json.loads(SmokeVectors((case,)).to_json())
    return doc


SMOKE = smoke_seed()


def _smoke(payload: bytes) -> None:
    vectors = parse_or_refuse(lambda: SmokeVectors.from_json(payload), UpdateRejected,
                              _check_reason)
    if vectors is not None:
        again = SmokeVectors.from_json(vectors.to_json())
        assert len(again.cases) == len(vectors.cases)


def test_smoke_every_field_with_every_hostile_value() -> None:
    sweep(SMOKE, lambda doc: _smoke(encode(doc)))


@fuzz(250)
@given(data=st.data())
def test_smoke_vectors_accept_or_refuse_with_a_reason(data: st.DataObject) -> None:
    payload = data.draw(hostile_bytes(encode(SMOKE), SMOKE), label="payload")
    _smoke(payload)


@fuzz(150)
@given(shape=st.lists(st.integers(0, 2**70) | st.sampled_from([0, 0, 1, 2**31, 2**63]),
                      max_size=9),
       dtype=st.sampled_from(["float32", "int8", "bool", "float64", "complex64", "object"]),
       data=st.binary(max_size=64))
def test_smoke_tensor_descriptions(shape: list[int], dtype: str, data: bytes) -> None:
    doc = {"_type": "fleetlite.smoke", "spec_version": 1, "cases": [{
        "inputs": [{"name": "x", "dtype": dtype, "shape": shape,
                    "data": base64.b64encode(data).decode()}],
        "outputs": SMOKE["cases"][0]["outputs"]}]}
    _smoke(encode(doc))


def test_malformed_is_the_reason_of_a_garbled_manifest() -> None:
    with pytest.raises(MalformedError) as info:
        parse_manifest(b"\xff" * 10)
    assert info.value.reason == "malformed"
