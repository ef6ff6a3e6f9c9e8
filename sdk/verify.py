"""Release verification: every rule a device applies before it installs anything, over bytes.

Like python-tuf's ``TrustedMetadataSet`` this module does no I/O of its own: it takes untrusted
bytes (or a stream it reads up to a hard stop) plus what the device already trusts, and either
returns the verified :class:`~fleetlite.sdk.manifest.Manifest` or raises an
:class:`~fleetlite.sdk.errors.UpdateRejected` subclass whose ``reason`` the device reports.
Fetching over MQTT, staging files, the anti-rollback state and the install itself are the
caller's job (``agent/``).
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Union

from fleetlite.sdk.envelope import MANIFEST_PAYLOAD_TYPE, Envelope, verify_threshold
from fleetlite.sdk.errors import (
    AGENT_TOO_OLD,
    BAD_SIGNATURE,
    BELOW_THRESHOLD,
    EXPIRED,
    HASH_MISMATCH,
    LENGTH_MISMATCH,
    MALFORMED,
    OVERSIZE,
    PREVIOUSLY_REJECTED,
    REASONS,
    ROLLBACK,
    SAME_VERSION,
    UNSAFE_NAME,
    UNSIGNED,
    UNTRUSTED_SIGNER,
    VERSION_SKIP,
    WRONG_DEVICE_CLASS,
    WRONG_MODEL,
    WRONG_TYPE,
    AgentTooOldError,
    EqualVersion,
    ExpiredError,
    FileMismatchError,
    HashMismatchError,
    LengthMismatchError,
    MalformedError,
    OversizeError,
    PreviouslyRejectedError,
    RollbackError,
    SignatureError,
    UnsafeNameError,
    UpdateRejected,
    VersionSkipError,
    WrongDeviceClassError,
    WrongModelError,
)
from fleetlite.sdk.manifest import (
    DEFAULT_MAX_FILE_BYTES,
    DEFAULT_MAX_FILES,
    FileEntry,
    Manifest,
    parse_manifest,
    parse_version,
)
from fleetlite.sdk.trust import MAX_ROOT_BYTES, Root
from fleetlite.sdk.version import __version__

__all__ = [
    "AGENT_TOO_OLD", "BAD_SIGNATURE", "BELOW_THRESHOLD", "EXPIRED", "HASH_MISMATCH",
    "LENGTH_MISMATCH", "MALFORMED", "OVERSIZE", "PREVIOUSLY_REJECTED", "REASONS", "ROLLBACK",
    "SAME_VERSION", "UNSAFE_NAME", "UNSIGNED", "UNTRUSTED_SIGNER", "VERSION_SKIP",
    "WRONG_DEVICE_CLASS", "WRONG_MODEL", "WRONG_TYPE",
    "DEFAULT_LIMITS",
    "AgentTooOldError",
    "EqualVersion",
    "ExpiredError",
    "FileMismatchError",
    "FileVerifier",
    "HashMismatchError",
    "LengthMismatchError",
    "Limits",
    "MalformedError",
    "OversizeError",
    "PreviouslyRejectedError",
    "RollbackError",
    "SignatureError",
    "TimeFloor",
    "UnsafeNameError",
    "UpdateRejected",
    "VersionSkipError",
    "WrongDeviceClassError",
    "WrongModelError",
    "verify_bytes",
    "verify_file",
    "verify_release",
]

Source = Union[str, "os.PathLike[str]", IO[bytes], Iterable[bytes]]
CHUNK_SIZE = 64 * 1024


@dataclass(frozen=True)
class Limits:
    """Size caps applied to everything a device accepts (cf. python-tuf's ``UpdaterConfig``).

    The defaults fit small models with room to spare; a fleet with bigger models raises
    ``max_file_bytes`` / ``max_total_bytes`` on the devices that can hold them.
    """

    #: the signed envelope (manifest.json) as received
    max_envelope_bytes: int = 512 * 1024
    #: the manifest payload inside the envelope
    max_manifest_bytes: int = 256 * 1024
    #: root.json (python-tuf's default root cap)
    max_root_bytes: int = MAX_ROOT_BYTES
    #: signature entries in one envelope (each costs a verification)
    max_signatures: int = 32
    #: files one release may list
    max_files: int = DEFAULT_MAX_FILES
    #: signed length of any one file
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES
    #: sum of the signed lengths of a release's files
    max_total_bytes: int = 512 * 1024 * 1024


DEFAULT_LIMITS = Limits()


def verify_release(
    envelope_bytes: bytes | Envelope,
    *,
    root: Root,
    installed_version: int | None,
    device_class: str | None,
    time_floor: float,
    rejected_versions: Collection[int] = (),
    agent_version: str = __version__,
    limits: Limits = DEFAULT_LIMITS,
    model_name: str | None = None,
    retry_rejected: bool = False,
    counters: Callable[[str], tuple[int | None, Collection[int]]] | None = None,
) -> Manifest:
    """Verify a release envelope against the trusted ``root`` and the device's state.

    Checks, in this order (each failure raises the class named, with ``reason``):

    1. size caps on the raw bytes: envelope, payload, signature count -> ``oversize``;
       an undecodable envelope -> ``malformed``;
    2. signatures over PAE(payloadType, payload) by a threshold of distinct keys of the root's
       ``release`` role (TUF 5.4.3 / 5.5.3), before the payload is parsed -> ``unsigned``,
       ``bad_signature``, ``untrusted_signer``, ``below_threshold`` (:class:`SignatureError`);
    3. payload type and strict manifest parse -> ``wrong_type``, ``malformed``, ``unsafe_name``,
       and the caps that need the parsed manifest (file count, per-file and total length) ->
       ``oversize``;
    4. ``model_name`` (when given) -> ``wrong_model`` (a valid release of another model);
    5. version against ``installed_version`` (the installed version of this model; None if
       none): lower -> ``rollback``, equal -> ``same_version`` (:class:`EqualVersion`, the normal
       "nothing new" signal); in ``rejected_versions`` -> ``previously_rejected`` unless
       ``retry_rejected`` (an operator's explicit retry);
    6. ``device_class`` in the manifest's targets -> ``wrong_device_class`` (None skips this:
       fleet-side checks only);
    7. expiry: the manifest's ``expires``, then the trusted root's, at or below ``time_floor``
       (see :class:`TimeFloor`; the device's wall clock is not used) -> ``expired``;
    8. ``min_agent_version`` above ``agent_version`` -> ``agent_too_old``.

    The files are checked afterwards, one by one, with :func:`verify_file`.

    ``envelope_bytes`` may also be an :class:`Envelope` already parsed with these limits (a
    device that checked the release id first parses it once). A device that keeps counters per
    model passes ``counters``: called with the manifest's name once it is parsed (step 5), it
    returns that model's installed version and rejected versions, which then replace
    ``installed_version`` and ``rejected_versions``.
    """
    # 1. Size caps before anything is decoded.
    if isinstance(envelope_bytes, Envelope):
        envelope = envelope_bytes
        if (len(envelope.payload) > limits.max_manifest_bytes
                or len(envelope.signatures) > limits.max_signatures):
            raise OversizeError("the manifest envelope exceeds this device's caps")
    else:
        if len(envelope_bytes) > limits.max_envelope_bytes:
            raise OversizeError(f"manifest envelope of {len(envelope_bytes)} bytes exceeds "
                                f"the {limits.max_envelope_bytes}-byte cap")
        envelope = Envelope.from_json(
            envelope_bytes,
            max_bytes=limits.max_envelope_bytes,
            max_payload_bytes=limits.max_manifest_bytes,
            max_signatures=limits.max_signatures,
        )
    # 2. Signatures over the exact payload bytes; the payload is still unparsed.
    release = root.roles["release"]
    verify_threshold(envelope, root.authorised_keys("release"), release.threshold,
                     role="release")
    # 3. Only now is the payload trusted enough to parse.
    if envelope.payload_type != MANIFEST_PAYLOAD_TYPE:
        raise MalformedError(f"payload type {envelope.payload_type!r:.60} is not a release "
                             f"manifest ({MANIFEST_PAYLOAD_TYPE})", reason=WRONG_TYPE)
    manifest = parse_manifest(envelope.payload, max_bytes=limits.max_manifest_bytes,
                              max_files=limits.max_files, max_file_bytes=limits.max_file_bytes)
    if manifest.total_length > limits.max_total_bytes:
        raise OversizeError(f"release files total {manifest.total_length} bytes; the cap is "
                            f"{limits.max_total_bytes}")
    label = f"{manifest.name} v{manifest.version}"
    # 4. Uptane "wrong software": a valid release of a different model.
    if model_name is not None and manifest.name != model_name:
        raise WrongModelError(f"release {label} is for model {manifest.name!r}, not "
                              f"{model_name!r}")
    # 5. Anti-rollback (TUF 5.4.3.1 / Uptane release counters; FreeRTOS refuses equal too).
    if counters is not None:
        installed_version, rejected_versions = counters(manifest.name)
    if installed_version is not None:
        if manifest.version < installed_version:
            raise RollbackError(f"release {label} is older than the installed version "
                                f"{installed_version}; publish a release with a higher version")
        if manifest.version == installed_version:
            raise EqualVersion(f"release {label} is already installed")
    if manifest.version in rejected_versions and not retry_rejected:
        raise PreviouslyRejectedError(
            f"release {label} was rejected or rolled back on this device before; publish a new "
            "version, or retry it explicitly (operator retry)"
        )
    # 6. Uptane hardware identifier check.
    if device_class is not None and device_class not in manifest.device_classes:
        raise WrongDeviceClassError(
            f"release {label} targets {', '.join(manifest.device_classes)}, not {device_class}"
        )
    # 7. Freeze attack (TUF 5.4.4) against a time floor, not the device clock.
    if manifest.expires <= time_floor:
        raise ExpiredError(f"release {label} expired at {manifest.expires} (time floor "
                           f"{int(time_floor)}); re-sign it with a later expiry")
    if root.expires <= time_floor:
        raise ExpiredError(f"the trusted root (version {root.version}) expired at "
                           f"{root.expires}; rotate the root with `fleetlite keys root rotate`")
    # 8. Agent compatibility.
    if parse_version(manifest.min_agent_version) > parse_version(agent_version):
        raise AgentTooOldError(f"release {label} needs agent >= {manifest.min_agent_version}; "
                               f"this agent is {agent_version}: upgrade the agent first")
    return manifest


class FileVerifier:
    """Incremental check of one file against its signed entry, for chunked downloads.

    :meth:`update` refuses the first byte past the signed length (endless-data defence);
    :meth:`finish` checks the length, then the sha256.
    """

    def __init__(self, entry: FileEntry) -> None:
        self.entry = entry
        self.received = 0
        self._hash = hashlib.sha256()

    @property
    def remaining(self) -> int:
        return self.entry.length - self.received

    def update(self, chunk: bytes) -> None:
        if len(chunk) > self.remaining:
            raise LengthMismatchError(
                f"{self.entry.name}: more data than the signed length of {self.entry.length} "
                "bytes; the source is corrupt or hostile"
            )
        self.received += len(chunk)
        self._hash.update(chunk)

    def finish(self) -> None:
        if self.received != self.entry.length:
            raise LengthMismatchError(f"{self.entry.name}: got {self.received} bytes, the "
                                      f"manifest signs {self.entry.length}; download it again")
        if not hmac.compare_digest(self._hash.hexdigest(), self.entry.sha256):
            raise HashMismatchError(f"{self.entry.name}: sha256 does not match the manifest "
                                    "(tampered, corrupt, or a file of another release)")


def verify_bytes(data: bytes, entry: FileEntry) -> None:
    """Check in-memory ``data`` against ``entry`` (length, then sha256)."""
    verifier = FileVerifier(entry)
    verifier.update(data)
    verifier.finish()


def verify_file(source: Source, entry: FileEntry, *, chunk_size: int = CHUNK_SIZE) -> None:
    """Stream-hash ``source`` (a path, a binary stream or an iterable of chunks) against
    ``entry``, never reading more than the signed length plus one byte from a stream.

    Raises :class:`LengthMismatchError` (``length_mismatch``: more or fewer bytes) or
    :class:`HashMismatchError` (``hash_mismatch``).
    """
    verifier = FileVerifier(entry)
    if isinstance(source, (str, os.PathLike)):
        with Path(source).open("rb") as handle:
            _consume_stream(handle, verifier, chunk_size)
    elif hasattr(source, "read"):
        _consume_stream(source, verifier, chunk_size)  # type: ignore[arg-type]
    else:
        for chunk in source:
            verifier.update(bytes(chunk))
    verifier.finish()


def _consume_stream(stream: IO[bytes], verifier: FileVerifier, chunk_size: int) -> None:
    while True:
        # Ask for at most what is still owed; once nothing is, one more byte tells EOF from
        # endless data.
        chunk = stream.read(min(chunk_size, verifier.remaining) or 1)
        if not chunk:
            return
        verifier.update(chunk)


@dataclass(frozen=True)
class TimeFloor:
    """A lower bound on the current time that never goes backwards, for devices whose clock
    cannot be trusted (REFERENCE "Clock-less devices"; Uptane's secure time source idea).

    ``floor`` seconds since the epoch are known to have passed when the monotonic clock read
    ``at_monotonic``. The floor only moves forwards: by monotonic uptime, and by the ``issued``
    time of manifests that VERIFIED. Persist :meth:`now` regularly; on boot :meth:`start` from
    the persisted value, because the monotonic clock restarts at boot.
    """

    floor: float
    at_monotonic: float

    @classmethod
    def start(
        cls,
        *,
        build_time: float,
        persisted: float | None,
        monotonic_now: float,
        issued_seen: float = 0.0,
    ) -> TimeFloor:
        """floor = max(issued-at seen, build time, persisted floor), counted from now."""
        return cls(max(build_time, persisted or 0.0, issued_seen), monotonic_now)

    def now(self, monotonic_now: float) -> float:
        """The floor at ``monotonic_now``: the recorded floor plus the uptime since."""
        return self.floor + max(0.0, monotonic_now - self.at_monotonic)

    def observe(self, issued: float, monotonic_now: float) -> TimeFloor:
        """Advance to a verified manifest's ``issued`` time (never call it with unverified
        data: a forged far-future time would make every release look expired)."""
        return TimeFloor(max(self.now(monotonic_now), issued), monotonic_now)
