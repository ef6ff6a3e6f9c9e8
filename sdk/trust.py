"""Root metadata: the pinned root of trust naming the root and release keys and thresholds.

A device is provisioned with a root (``root.json``, a DSSE envelope of payload type
``application/vnd.fleetlite.root+json``). Its payload::

    {"_type": "fleetlite.root", "spec_version": 1, "version": 1, "expires": <Unix seconds>,
     "keys": {"<keyid>": {"keytype": "ed25519", "public": "<hex>"}},
     "roles": {"root": {"keyids": [...], "threshold": 1},
               "release": {"keyids": [...], "threshold": 1}}}

Rules follow TUF's client workflow (specification 5.3, "Update the root role"): the first root is
trusted because it is pinned, and must still be signed by its own root threshold; a new root must
be exactly version N+1 and signed by a threshold of the old root keys and of the new root keys.
Pure functions over bytes: reading and writing ``root.json`` is the caller's job.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fleetlite.sdk.envelope import ROOT_PAYLOAD_TYPE, Envelope, strict_json_loads, verify_threshold
from fleetlite.sdk.errors import (
    WRONG_TYPE,
    EqualVersion,
    MalformedError,
    RollbackError,
    VersionSkipError,
)
from fleetlite.sdk.keys import KEYTYPE, PublicKey, key_id

__all__ = [
    "MAX_ROOT_BYTES",
    "ROLE_NAMES",
    "ROOT_TYPE",
    "SPEC_VERSION",
    "Role",
    "Root",
    "canonical_json",
    "load_trusted_root",
    "new_root",
    "parse_root_envelope",
    "root_envelope",
    "update_root",
]

ROOT_TYPE = "fleetlite.root"
SPEC_VERSION = 1
ROLE_NAMES = ("root", "release")
# python-tuf's default root cap (ngclient config.root_max_length).
MAX_ROOT_BYTES = 512_000
_MAX_KEYS = 64
_MAX_KEYID_LENGTH = 64
# A public key is written as 64 lowercase hex digits, nothing else (no spaces, no upper case):
# bytes.fromhex alone would take "D7 5A ...".
_PUBLIC_HEX_RE = re.compile(r"[0-9a-f]{64}\Z")


def canonical_json(data: Mapping[str, Any]) -> bytes:
    """Compact, key-sorted, ASCII JSON: how FleetLite writes every signed payload."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


@dataclass(frozen=True)
class Role:
    """The key ids allowed to sign for a role, and how many distinct ones must."""

    keyids: tuple[str, ...]
    threshold: int

    def to_dict(self) -> dict[str, Any]:
        return {"keyids": list(self.keyids), "threshold": self.threshold}


@dataclass(frozen=True)
class Root:
    """Parsed root metadata. ``envelope`` is the signed envelope it came from (if parsed)."""

    version: int
    expires: int
    keys: Mapping[str, PublicKey]
    roles: Mapping[str, Role]
    spec_version: int = SPEC_VERSION
    envelope: Envelope | None = field(default=None, compare=False, repr=False)

    def role(self, name: str) -> Role:
        return self.roles[name]

    def authorised_keys(self, role: str) -> dict[str, PublicKey]:
        """Key id -> key of the keys allowed to sign for ``role``."""
        return {keyid: self.keys[keyid] for keyid in self.roles[role].keyids}

    def to_dict(self) -> dict[str, Any]:
        return {
            "_type": ROOT_TYPE,
            "spec_version": self.spec_version,
            "version": self.version,
            "expires": self.expires,
            "keys": {keyid: key.to_dict() for keyid, key in sorted(self.keys.items())},
            "roles": {name: self.roles[name].to_dict() for name in ROLE_NAMES},
        }

    def to_payload(self) -> bytes:
        return canonical_json(self.to_dict())


def new_root(
    root_keys: Sequence[PublicKey],
    release_keys: Sequence[PublicKey],
    *,
    expires: int,
    root_threshold: int = 1,
    release_threshold: int = 1,
    version: int = 1,
) -> Root:
    """Build (unsigned) root metadata; sign ``root_envelope(root)`` with root keys."""
    keys = {key.keyid: key for key in (*root_keys, *release_keys)}
    roles = {
        "root": Role(tuple(dict.fromkeys(k.keyid for k in root_keys)), root_threshold),
        "release": Role(tuple(dict.fromkeys(k.keyid for k in release_keys)), release_threshold),
    }
    root = Root(version=version, expires=expires, keys=keys, roles=roles)
    # Round-trip through the parser so an impossible threshold fails here, not on a device.
    return _parse_root_payload(root.to_payload())


def root_envelope(root: Root) -> Envelope:
    """An unsigned envelope over ``root``'s canonical payload."""
    return Envelope(ROOT_PAYLOAD_TYPE, root.to_payload())


def parse_root_envelope(data: bytes, *, max_bytes: int = MAX_ROOT_BYTES) -> tuple[Envelope, Root]:
    """Envelope and root content WITHOUT checking any signature (for display and signing)."""
    envelope = Envelope.from_json(data, max_bytes=max_bytes, max_payload_bytes=max_bytes)
    if envelope.payload_type != ROOT_PAYLOAD_TYPE:
        raise MalformedError(
            f"payload type {envelope.payload_type!r:.60} is not root metadata "
            f"({ROOT_PAYLOAD_TYPE}); pass a root.json", reason=WRONG_TYPE,
        )
    return envelope, _parse_root_payload(envelope.payload, envelope)


def load_trusted_root(data: bytes, *, max_bytes: int = MAX_ROOT_BYTES) -> Root:
    """The pinned root: trusted because it was provisioned, but it must be signed by a threshold
    of its own root keys (TUF 5.2: the trusted root is loaded as the starting point)."""
    envelope = Envelope.from_json(data, max_bytes=max_bytes, max_payload_bytes=max_bytes)
    _check_type(envelope)
    # Verify before parsing: the self-signature check needs the key list, so parse the payload
    # into a candidate, verify over the exact payload bytes, and only then return it.
    candidate = _parse_root_payload(envelope.payload, envelope)
    verify_threshold(envelope, candidate.authorised_keys("root"),
                     candidate.roles["root"].threshold, role="root")
    return candidate


def update_root(trusted: Root, data: bytes, *, max_bytes: int = MAX_ROOT_BYTES) -> Root:
    """Rotate the root N -> N+1 (TUF 5.3.4-5.3.6, in python-tuf's order). Returns the new root.

    Order: size cap and envelope; signed by a threshold of the TRUSTED root's root keys
    (5.3.4); payload type and parse; version exactly N+1 (5.3.5: ``rollback`` below,
    ``same_version`` equal, ``version_skip`` above); signed by a threshold of the NEW root's
    root keys (5.3.4, second half). ``trusted`` is never modified: on any error keep it.
    """
    envelope = Envelope.from_json(data, max_bytes=max_bytes, max_payload_bytes=max_bytes)
    verify_threshold(envelope, trusted.authorised_keys("root"),
                     trusted.roles["root"].threshold, role="root")
    _check_type(envelope)
    new = _parse_root_payload(envelope.payload, envelope)
    if new.version == trusted.version:
        raise EqualVersion(f"root version {new.version} is already trusted")
    if new.version < trusted.version:
        raise RollbackError(f"root version {new.version} is older than the trusted version "
                            f"{trusted.version}: refusing to roll back the root")
    if new.version != trusted.version + 1:
        raise VersionSkipError(
            f"root version {new.version} skips versions: the trusted root is {trusted.version}, "
            f"so the next must be {trusted.version + 1}; apply every intermediate root in order"
        )
    verify_threshold(envelope, new.authorised_keys("root"), new.roles["root"].threshold,
                     role="new root")
    return new


def _check_type(envelope: Envelope) -> None:
    if envelope.payload_type != ROOT_PAYLOAD_TYPE:
        raise MalformedError(f"payload type {envelope.payload_type!r:.60} is not root metadata; "
                             "pass a root.json", reason=WRONG_TYPE)


def _bad(message: str) -> MalformedError:
    return MalformedError(f"root metadata: {message}; regenerate it with `fleetlite keys root`")


def _int_field(data: Mapping[str, Any], key: str, minimum: int) -> int:
    value = data.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _bad(f"{key!r} must be an integer >= {minimum}")
    return value


def _parse_root_payload(payload: bytes, envelope: Envelope | None = None) -> Root:
    try:
        data = strict_json_loads(payload)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise _bad("not UTF-8 JSON") from None
    if not isinstance(data, dict):
        raise _bad("must be a JSON object")
    expected = {"_type", "spec_version", "version", "expires", "keys", "roles"}
    if set(data) != expected:
        raise _bad(f"expected exactly the fields {sorted(expected)}")
    if data["_type"] != ROOT_TYPE:
        raise _bad(f"_type must be {ROOT_TYPE!r}")
    if _int_field(data, "spec_version", 1) != SPEC_VERSION:
        raise _bad(f"spec_version {data['spec_version']} is not supported (this side speaks "
                   f"{SPEC_VERSION}); upgrade the agent")
    version = _int_field(data, "version", 1)
    expires = _int_field(data, "expires", 0)
    raw_keys = data["keys"]
    if not isinstance(raw_keys, dict) or not 0 < len(raw_keys) <= _MAX_KEYS:
        raise _bad(f"'keys' must be an object of 1-{_MAX_KEYS} keys")
    keys: dict[str, PublicKey] = {}
    for keyid, entry in raw_keys.items():
        if not isinstance(entry, dict) or set(entry) != {"keytype", "public"}:
            raise _bad("each key must be an object with keytype and public")
        if entry["keytype"] != KEYTYPE:
            raise _bad(f"unsupported keytype {entry['keytype']!r:.40}")
        raw_public = entry["public"]
        if not isinstance(raw_public, str) or not _PUBLIC_HEX_RE.match(raw_public):
            raise _bad("a public key must be 64 lowercase hex digits (32 bytes)")
        try:
            public = PublicKey.from_hex(raw_public)
        except ValueError:
            raise _bad("a public key is not 32 bytes of hex") from None
        # A key id must be the hash of its key, or one key could appear under two ids and
        # count twice towards a threshold (tuf-conformance test_duplicate_keys).
        if keyid != key_id(public.public):
            raise _bad(f"key id {keyid[:16]!r} is not the sha256 of its public key")
        keys[keyid] = public
    raw_roles = data["roles"]
    if not isinstance(raw_roles, dict) or set(raw_roles) != set(ROLE_NAMES):
        raise _bad(f"'roles' must name exactly {list(ROLE_NAMES)}")
    roles: dict[str, Role] = {}
    for name in ROLE_NAMES:
        entry = raw_roles[name]
        if not isinstance(entry, dict) or set(entry) != {"keyids", "threshold"}:
            raise _bad(f"role {name!r} must be an object with keyids and threshold")
        keyids = entry["keyids"]
        if not isinstance(keyids, list) or not all(isinstance(k, str) for k in keyids):
            raise _bad(f"role {name!r} keyids must be a list of strings")
        if len(set(keyids)) != len(keyids):
            raise _bad(f"role {name!r} lists a key id twice")
        missing = [k for k in keyids if k not in keys]
        if missing:
            raise _bad(f"role {name!r} names key {missing[0][:16]!r}, which is not in 'keys'")
        threshold = _int_field(entry, "threshold", 1)
        if threshold > len(keyids):
            raise _bad(f"role {name!r} threshold {threshold} exceeds its {len(keyids)} key(s)")
        roles[name] = Role(tuple(keyids), threshold)
    return Root(version=version, expires=expires, keys=keys, roles=roles, envelope=envelope)
