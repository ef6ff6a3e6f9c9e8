"""Ed25519 signing keys: generate, save (mode 0600, never overwriting), load, export public keys.

A key id is the hex sha256 of the raw 32-byte public key, so two different key ids can never name
the same key (a threshold of distinct key ids is a threshold of distinct keys).

Key files are JSON. A private key file (``*.key``)::

    {"_type": "fleetlite.private_key", "keytype": "ed25519", "keyid": "<hex>",
     "public": "<hex, 32 bytes>", "private": "<hex, 32-byte seed>", "role": "release"}

and a public key file (``*.pub``) is the same without ``private`` and with
``_type: fleetlite.public_key``. Private key material never appears in reprs, messages or output.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fleetlite.sdk.errors import KeyFileError

__all__ = [
    "KEYTYPE",
    "MAX_KEY_FILE_BYTES",
    "PRIVATE_KEY_TYPE",
    "PUBLIC_KEY_TYPE",
    "ROLES",
    "PublicKey",
    "SigningKey",
    "key_id",
    "load_public_key",
    "require_role",
]

PathArg = Union[str, "os.PathLike[str]"]

KEYTYPE = "ed25519"
PRIVATE_KEY_TYPE = "fleetlite.private_key"
PUBLIC_KEY_TYPE = "fleetlite.public_key"
ROLES = ("root", "release")
MAX_KEY_FILE_BYTES = 4096
_RAW_KEY_BYTES = 32
SIGNATURE_BYTES = 64


def key_id(public: bytes) -> str:
    """The key id of a raw Ed25519 public key: hex sha256 of its 32 bytes."""
    return hashlib.sha256(public).hexdigest()


@dataclass(frozen=True)
class PublicKey:
    """An Ed25519 public key (32 raw bytes)."""

    public: bytes

    def __post_init__(self) -> None:
        if len(self.public) != _RAW_KEY_BYTES:
            raise ValueError(f"an Ed25519 public key is 32 bytes, got {len(self.public)}")

    @property
    def keytype(self) -> str:
        return KEYTYPE

    @property
    def keyid(self) -> str:
        return key_id(self.public)

    def verify(self, signature: bytes, data: bytes) -> bool:
        """True if ``signature`` is this key's Ed25519 signature over ``data``."""
        if len(signature) != SIGNATURE_BYTES:
            return False
        try:
            Ed25519PublicKey.from_public_bytes(self.public).verify(signature, data)
        except (InvalidSignature, ValueError):
            return False
        return True

    def to_dict(self) -> dict[str, str]:
        """The form used inside root metadata: ``{"keytype", "public"}``."""
        return {"keytype": KEYTYPE, "public": self.public.hex()}

    def to_file_json(self, role: str = "") -> bytes:
        """The content of a ``.pub`` file."""
        data: dict[str, Any] = {
            "_type": PUBLIC_KEY_TYPE, "keyid": self.keyid, **self.to_dict()
        }
        if role:
            data["role"] = role
        return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()

    def save(self, path: PathArg, role: str = "") -> Path:
        """Write a ``.pub`` file (mode 0644), refusing to overwrite."""
        target = Path(path)
        _write_new_file(target, self.to_file_json(role), mode=0o644)
        return target

    @classmethod
    def from_hex(cls, text: str) -> PublicKey:
        try:
            raw = bytes.fromhex(text)
        except ValueError:
            raise ValueError("a public key must be 64 hex digits") from None
        return cls(raw)

    def __repr__(self) -> str:
        return f"PublicKey(keyid={self.keyid[:16]}...)"


class SigningKey:
    """An Ed25519 private key. Its repr and str show the key id only."""

    def __init__(self, private: Ed25519PrivateKey, *, role: str = "") -> None:
        self._private = private
        raw = private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.public_key = PublicKey(raw)
        self.role = role

    @classmethod
    def generate(cls, role: str = "") -> SigningKey:
        return cls(Ed25519PrivateKey.generate(), role=role)

    @classmethod
    def from_seed(cls, seed: bytes, role: str = "") -> SigningKey:
        """The key of a 32-byte Ed25519 seed (test vectors; real keys come from ``generate``)."""
        if len(seed) != _RAW_KEY_BYTES:
            raise ValueError("an Ed25519 private key seed is 32 bytes")
        return cls(Ed25519PrivateKey.from_private_bytes(seed), role=role)

    @property
    def keyid(self) -> str:
        return self.public_key.keyid

    def sign(self, data: bytes) -> bytes:
        return self._private.sign(data)

    def __repr__(self) -> str:
        return f"SigningKey(keyid={self.keyid[:16]}..., role={self.role!r})"

    __str__ = __repr__

    def __reduce__(self) -> Any:
        raise TypeError("signing keys cannot be pickled; save them with SigningKey.save()")

    def _seed(self) -> bytes:
        return self._private.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )

    def save(self, path: PathArg) -> Path:
        """Write the private key file with mode 0600, atomically; refuse to overwrite."""
        data: dict[str, Any] = {
            "_type": PRIVATE_KEY_TYPE,
            "keytype": KEYTYPE,
            "keyid": self.keyid,
            "public": self.public_key.public.hex(),
            "private": self._seed().hex(),
        }
        if self.role:
            data["role"] = self.role
        target = Path(path)
        _write_new_file(target, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode(),
                        mode=0o600)
        return target

    def save_public(self, path: PathArg) -> Path:
        """Write the ``.pub`` file (mode 0644), refusing to overwrite."""
        return self.public_key.save(path, self.role)

    @classmethod
    def load(cls, path: PathArg) -> SigningKey:
        """Load a private key file; refuse one that group or others can read or write."""
        target = Path(path)
        try:
            info = target.stat()
        except FileNotFoundError:
            raise KeyFileError(f"{target}: no such key file; create one with "
                               "`fleetlite keys create --role release --out DIR`") from None
        except OSError as exc:
            raise KeyFileError(f"{target}: cannot read key file ({exc.strerror})") from None
        if not stat.S_ISREG(info.st_mode):
            raise KeyFileError(f"{target}: not a regular file; pass a .key file")
        if info.st_mode & 0o077:
            raise KeyFileError(
                f"{target}: private key file is accessible by group/others "
                f"(mode {stat.S_IMODE(info.st_mode):04o}); run: chmod 600 {target}"
            )
        data = _read_key_json(target)
        if data.get("_type") != PRIVATE_KEY_TYPE:
            raise KeyFileError(f"{target}: not a FleetLite private key file (a .pub file?); "
                               "pass the .key file written by `fleetlite keys create`")
        _check_keytype(target, data)
        try:
            seed = bytes.fromhex(str(data.get("private", "")))
            key = cls.from_seed(seed, role=str(data.get("role", "")))
        except ValueError:
            raise KeyFileError(f"{target}: the private key is not 32 bytes of hex; "
                               "restore the file from your backup") from None
        if data.get("keyid") != key.keyid or data.get("public") != key.public_key.public.hex():
            raise KeyFileError(f"{target}: the key id or public key does not match the private "
                               "key; the file is corrupt, restore it from your backup")
        return key


def load_public_key(path: PathArg) -> tuple[PublicKey, str]:
    """Load the public key (and role, '' if unknown) of a ``.pub`` or ``.key`` file.

    A private key file is checked for permissions like :meth:`SigningKey.load`.
    """
    target = Path(path)
    data = _read_key_json(target)
    kind = data.get("_type")
    if kind == PRIVATE_KEY_TYPE:
        key = SigningKey.load(target)
        return key.public_key, key.role
    if kind != PUBLIC_KEY_TYPE:
        raise KeyFileError(f"{target}: not a FleetLite key file; pass a .pub or .key file "
                           "written by `fleetlite keys create`")
    _check_keytype(target, data)
    try:
        public = PublicKey.from_hex(str(data.get("public", "")))
    except ValueError:
        raise KeyFileError(f"{target}: the public key is not 32 bytes of hex") from None
    if data.get("keyid") != public.keyid:
        raise KeyFileError(f"{target}: the key id does not match the public key; the file is "
                           "corrupt, export it again with `fleetlite keys public`")
    return public, str(data.get("role", ""))


def require_role(role: str, wanted: str, where: str, *, option: str = "") -> None:
    """Refuse a key whose file says it is for another role (a key with no role is accepted:
    keys made by scripts and tests may have none).

    ``where`` names the key file (or key id) in the message; ``option`` the command-line option
    it was given as, if any."""
    if not role or role == wanted:
        return
    given = f" given as {option}" if option else ""
    if wanted == "release":
        fix = ("sign releases with a release key; create one with `fleetlite keys create "
               "--role release --out DIR`")
    else:
        fix = (f"pass {role} keys as --{role}-key and {wanted} keys as --{wanted}-key "
               "(were the two swapped?)")
    raise KeyFileError(f"{where}: a {role} key{given}, not a {wanted} key; {fix}")


def _check_keytype(path: Path, data: dict[str, Any]) -> None:
    if data.get("keytype") != KEYTYPE:
        raise KeyFileError(f"{path}: unsupported key type {data.get('keytype')!r:.40}; "
                           f"FleetLite uses {KEYTYPE}")


def _read_key_json(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            content = handle.read(MAX_KEY_FILE_BYTES + 1)
    except FileNotFoundError:
        raise KeyFileError(f"{path}: no such key file") from None
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read key file ({exc.strerror})") from None
    if len(content) > MAX_KEY_FILE_BYTES:
        raise KeyFileError(f"{path}: too large for a key file; pass a .key or .pub file")
    try:
        data = json.loads(content.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        # Deliberately without the parser's message: it may quote the file's content.
        raise KeyFileError(f"{path}: not a JSON key file") from None
    if not isinstance(data, dict):
        raise KeyFileError(f"{path}: not a JSON key file")
    return data


def _write_new_file(path: Path, content: bytes, *, mode: int) -> None:
    """Write ``content`` to a new file with exactly ``mode``, atomically, never overwriting
    (:func:`fleetlite.sdk.atomic.write_atomic`)."""
    from fleetlite.sdk.atomic import write_atomic

    if path.exists() or path.is_symlink():
        raise KeyFileError(f"{path}: already exists; refusing to overwrite a key file. "
                           "Choose another --out directory or name")
    if not path.parent.is_dir():
        raise KeyFileError(f"{path.parent}: no such directory; create it first")
    try:
        write_atomic(path, content, mode=mode, overwrite=False, exact_mode=True)
    except FileExistsError:
        raise KeyFileError(f"{path}: already exists; refusing to overwrite a key file") \
            from None
