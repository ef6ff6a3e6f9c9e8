"""DSSE signature envelopes: sign and verify the exact payload bytes, before anyone parses them.

The envelope (https://github.com/secure-systems-lab/dsse, protocol v1)::

    {"payloadType": "<media type>", "payload": "<base64 of the payload bytes>",
     "signatures": [{"keyid": "<hex sha256 of the public key>", "sig": "<base64>"}]}

Each signature is Ed25519 over the pre-authentication encoding
``PAE(type, body) = "DSSEv1" SP LEN(type) SP type SP LEN(body) SP body`` (LEN = ASCII decimal
byte count), so the payload type is signed too and nothing is ever re-serialised before
verifying. Threshold rule (TUF 5.3/5.4, tuf-conformance ``test_duplicate_keys``): each authorised
key id counts once, unknown key ids are ignored, bad signatures never count.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fleetlite.sdk.errors import (
    BAD_SIGNATURE,
    BELOW_THRESHOLD,
    UNSIGNED,
    UNTRUSTED_SIGNER,
    MalformedError,
    OversizeError,
    SignatureError,
)
from fleetlite.sdk.keys import PublicKey, SigningKey

__all__ = [
    "DEFAULT_MAX_SIGNATURES",
    "MANIFEST_PAYLOAD_TYPE",
    "ROOT_PAYLOAD_TYPE",
    "Envelope",
    "Signature",
    "pae",
    "strict_json_loads",
    "verify_threshold",
]

MANIFEST_PAYLOAD_TYPE = "application/vnd.fleetlite.manifest+json"
ROOT_PAYLOAD_TYPE = "application/vnd.fleetlite.root+json"
DEFAULT_MAX_SIGNATURES = 32
_MAX_KEYID_LENGTH = 128
_MAX_SIG_B64_LENGTH = 512
_MAX_TYPE_LENGTH = 128
_URLSAFE = str.maketrans("-_", "+/")


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding: the exact bytes every signature covers."""
    kind = payload_type.encode("utf-8")
    return b"DSSEv1 %d %b %d %b" % (len(kind), kind, len(payload), payload)


@dataclass(frozen=True)
class Signature:
    keyid: str
    sig: bytes

    def __repr__(self) -> str:
        return f"Signature(keyid={self.keyid[:16]}...)"


@dataclass(frozen=True)
class Envelope:
    """A payload, its media type and the signatures over ``pae(payload_type, payload)``."""

    payload_type: str
    payload: bytes
    signatures: tuple[Signature, ...] = ()

    def signed_bytes(self) -> bytes:
        return pae(self.payload_type, self.payload)

    def sign(self, key: SigningKey) -> Envelope:
        """A copy with ``key``'s signature added (replacing an earlier one by the same key)."""
        sig = Signature(key.keyid, key.sign(self.signed_bytes()))
        kept = tuple(s for s in self.signatures if s.keyid != key.keyid)
        return Envelope(self.payload_type, self.payload, (*kept, sig))

    @property
    def keyids(self) -> tuple[str, ...]:
        return tuple(s.keyid for s in self.signatures)

    def to_dict(self) -> dict[str, Any]:
        return {
            "payloadType": self.payload_type,
            "payload": base64.b64encode(self.payload).decode("ascii"),
            "signatures": [
                {"keyid": s.keyid, "sig": base64.b64encode(s.sig).decode("ascii")}
                for s in self.signatures
            ],
        }

    def to_json(self) -> bytes:
        """Indented JSON (the envelope wrapper is not signed, only its payload is)."""
        return (json.dumps(self.to_dict(), indent=2) + "\n").encode()

    @classmethod
    def from_json(
        cls,
        data: bytes,
        *,
        max_bytes: int,
        max_payload_bytes: int,
        max_signatures: int = DEFAULT_MAX_SIGNATURES,
    ) -> Envelope:
        """Parse the envelope wrapper (size caps first); the payload stays opaque bytes."""
        if len(data) > max_bytes:
            raise OversizeError(f"envelope of {len(data)} bytes exceeds the {max_bytes}-byte cap")
        try:
            obj = strict_json_loads(data)
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise MalformedError("not a signed envelope (not UTF-8 JSON); pass the bundle's "
                                 "manifest.json") from None
        if not isinstance(obj, dict) or set(obj) != {"payloadType", "payload", "signatures"}:
            raise MalformedError("not a signed envelope: expected exactly the fields "
                                 "payloadType, payload, signatures")
        payload_type, payload_b64, sigs = obj["payloadType"], obj["payload"], obj["signatures"]
        if not isinstance(payload_type, str) or not 0 < len(payload_type) <= _MAX_TYPE_LENGTH:
            raise MalformedError("envelope payloadType must be a short string")
        try:
            payload_type.encode("utf-8")  # the PAE signs its UTF-8 bytes
        except UnicodeEncodeError:
            problem = ("envelope payloadType holds a lone surrogate (a \\ud800-style escape), "
                       "which has no UTF-8 form; pass a real media type")
            raise MalformedError(problem) from None
        if not isinstance(payload_b64, str):
            raise MalformedError("envelope payload must be a base64 string")
        # base64 grows 4/3: refuse before decoding anything larger than the cap allows.
        if len(payload_b64) > (max_payload_bytes + 2) // 3 * 4:
            raise OversizeError(f"payload exceeds the {max_payload_bytes}-byte cap")
        payload = _b64decode(payload_b64, "payload")
        if len(payload) > max_payload_bytes:
            raise OversizeError(f"payload of {len(payload)} bytes exceeds the "
                                f"{max_payload_bytes}-byte cap")
        if not isinstance(sigs, list):
            raise MalformedError("envelope signatures must be a list")
        if len(sigs) > max_signatures:
            raise OversizeError(f"{len(sigs)} signatures exceed the cap of {max_signatures}")
        signatures = []
        for entry in sigs:
            if not isinstance(entry, dict) or set(entry) != {"keyid", "sig"}:
                raise MalformedError("each signature must be an object with keyid and sig")
            keyid, sig = entry["keyid"], entry["sig"]
            if not isinstance(keyid, str) or not 0 < len(keyid) <= _MAX_KEYID_LENGTH:
                raise MalformedError("signature keyid must be a short string")
            if not isinstance(sig, str) or len(sig) > _MAX_SIG_B64_LENGTH:
                raise MalformedError("signature sig must be a short base64 string")
            signatures.append(Signature(keyid, _b64decode(sig, "sig")))
        return cls(payload_type, payload, tuple(signatures))


def verify_threshold(
    envelope: Envelope,
    authorised: Mapping[str, PublicKey],
    threshold: int,
    *,
    role: str = "release",
) -> frozenset[str]:
    """Check that ``threshold`` distinct keys of ``authorised`` (key id -> key) signed.

    Returns the key ids whose signatures verified. Raises :class:`SignatureError` with reason
    ``unsigned`` (no signatures), ``bad_signature`` (an authorised key's signature did not
    verify), ``untrusted_signer`` (no authorised key signed) or ``below_threshold``.
    """
    if threshold < 1:
        raise ValueError("threshold must be >= 1")
    message = envelope.signed_bytes()
    valid: set[str] = set()
    bad: set[str] = set()
    for signature in envelope.signatures:
        key = authorised.get(signature.keyid)
        if key is None or signature.keyid in valid:
            continue  # unknown keys are ignored; a repeated key id counts once
        if key.keyid != signature.keyid:
            continue  # defence in depth: a key id must be the hash of its key
        if key.verify(signature.sig, message):
            valid.add(signature.keyid)
        else:
            bad.add(signature.keyid)
    if len(valid) >= threshold:
        return frozenset(valid)
    counted = f"{len(valid)} of the {threshold} required {role} signature(s) verified"
    if not envelope.signatures:
        raise SignatureError(f"unsigned: no signatures; sign it with `fleetlite release sign` "
                             f"({counted})", reason=UNSIGNED, role=role)
    if bad - valid:
        raise SignatureError(f"bad signature from authorised {role} key(s) "
                             f"{', '.join(sorted(k[:12] for k in bad - valid))}: the content was "
                             f"changed after signing or the signature is corrupt ({counted})",
                             reason=BAD_SIGNATURE, role=role)
    if not valid:
        raise SignatureError(f"no authorised {role} key signed it (signed by "
                             f"{', '.join(sorted({k[:12] for k in envelope.keyids}))}); sign it "
                             f"with a key the device's root lists for the {role} role",
                             reason=UNTRUSTED_SIGNER, role=role)
    raise SignatureError(f"below threshold: {counted}; distinct keys count once, add signatures "
                         "by other authorised keys", reason=BELOW_THRESHOLD, role=role)


def _b64decode(text: str, what: str) -> bytes:
    # DSSE allows the standard or the URL-safe alphabet, but not a mix of both.
    if ("-" in text or "_" in text) and ("+" in text or "/" in text):
        raise MalformedError(f"envelope {what} is not base64")
    # Padded, no whitespace, and canonical (unused bits of the last character zero, RFC 4648
    # 3.5): exactly one text per byte string, as every standard encoder writes it.
    standard = text.translate(_URLSAFE)
    try:
        decoded = base64.b64decode(standard.encode("ascii"), validate=True)
    except (binascii.Error, ValueError):
        raise MalformedError(f"envelope {what} is not base64") from None
    if base64.b64encode(decoded).decode("ascii") != standard:
        raise MalformedError(f"envelope {what} is not canonical base64 (non-zero padding bits)")
    return decoded


def strict_json_loads(data: bytes) -> Any:
    """UTF-8 JSON that refuses duplicate object keys and NaN/Infinity (also as a number too
    large for a double, such as ``1e400``).

    Duplicate keys are refused because parsers disagree on which one wins, and a signed document
    must mean the same thing to every implementation that verifies it.
    """
    return json.loads(data.decode("utf-8"), parse_constant=_reject_constant,
                      parse_float=_finite_float, object_pairs_hook=_no_duplicates)


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (math.inf, -math.inf):
        raise ValueError(f"number {text[:40]} is out of the range of a double")
    return value


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("duplicate key in JSON object")
    return result


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")
