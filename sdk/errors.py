"""Errors of the shared contract (``fleetlite.sdk``).

Every FleetLite error derives from :class:`FleetLiteError`; each package adds its own subtree::

    FleetLiteError
    ├── DeviceClassError          a device profile YAML file is missing or invalid
    ├── LocalApiError             the agent's local socket API refused or failed a request
    ├── KeyFileError              a signing key file is missing, malformed or too open
    ├── BundleError               a release bundle on disk is incomplete or has unsafe members
    ├── UpdateRejected            signed metadata or a file failed verification (``reason``)
    │   ├── OversizeError             oversize
    │   ├── MalformedError            malformed, wrong_type
    │   │   └── UnsafeNameError       unsafe_name
    │   ├── SignatureError            unsigned, untrusted_signer, below_threshold, bad_signature
    │   ├── WrongModelError           wrong_model
    │   ├── RollbackError             rollback
    │   │   └── EqualVersion          same_version (the normal "nothing new" signal)
    │   ├── VersionSkipError          version_skip (root rotation N -> N+2 or later)
    │   ├── PreviouslyRejectedError   previously_rejected
    │   ├── WrongDeviceClassError     wrong_device_class
    │   ├── ExpiredError              expired
    │   ├── AgentTooOldError          agent_too_old
    │   ├── LmFormatError             missing_decode, missing_prefill, bad_lm_signature,
    │   │                             cache_shape_mismatch, ambiguous_layout, vocab_mismatch,
    │   │                             ids_out_of_range (a generative LM breaks its contract)
    │   ├── FileMismatchError
    │   │   ├── LengthMismatchError   length_mismatch
    │   │   └── HashMismatchError     hash_mismatch
    │   └── DeltaError            delta_base_mismatch, delta_corrupt, delta_target_mismatch,
    │                             delta_too_large (a delta update cannot rebuild the signed file)
    ├── runtime.errors.ModelRuntimeError  the model runtime both sides run (interpreter, isolated
    │                             check, language-model engine, tokenizer)
    ├── agent.errors.AgentError   the device agent (model service, link, OTA, spool)
    └── fleet.errors.FleetError   the fleet side (store, controller, rollouts, CLI)

Messages say what went wrong and what to do next.
"""

from __future__ import annotations

from typing import Optional


class FleetLiteError(Exception):
    """Base of every error FleetLite raises on purpose."""


class DeviceClassError(FleetLiteError):
    """A device class profile (``device_profiles/<class>.yaml``) is missing or invalid.

    ``path``, ``key`` (dotted, e.g. ``budgets.max_p95_latency_ms``) and ``line`` locate the problem
    when known; the message already contains them.
    """

    def __init__(
        self,
        message: str,
        *,
        path: Optional[str] = None,
        key: Optional[str] = None,
        line: Optional[int] = None,
    ) -> None:
        super().__init__(message)
        self.path = path
        self.key = key
        self.line = line


class LocalApiError(FleetLiteError):
    """A request to the agent's local socket API failed.

    ``code`` is the machine-readable reason (the server's ``error_code``, or a client-side code
    such as ``unavailable`` or ``timeout``); the message says what to do next.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{message} [{code}]")
        self.code = code
        self.detail = message


class KeyFileError(FleetLiteError):
    """A signing key file cannot be used (missing, malformed, already exists, or too open).

    Messages never contain key material.
    """


class BundleError(FleetLiteError):
    """A release bundle (directory or ``.flb``) is incomplete or holds an unsafe member."""


# Reason codes of UpdateRejected: part of the protocol (docs/protocol.md, "Signed releases").
OVERSIZE = "oversize"
MALFORMED = "malformed"
WRONG_TYPE = "wrong_type"
UNSAFE_NAME = "unsafe_name"
UNSIGNED = "unsigned"
UNTRUSTED_SIGNER = "untrusted_signer"
BELOW_THRESHOLD = "below_threshold"
BAD_SIGNATURE = "bad_signature"
WRONG_MODEL = "wrong_model"
ROLLBACK = "rollback"
SAME_VERSION = "same_version"
VERSION_SKIP = "version_skip"
PREVIOUSLY_REJECTED = "previously_rejected"
WRONG_DEVICE_CLASS = "wrong_device_class"
EXPIRED = "expired"
AGENT_TOO_OLD = "agent_too_old"
LENGTH_MISMATCH = "length_mismatch"
HASH_MISMATCH = "hash_mismatch"

# Reason codes of DeltaError (docs/protocol.md, "Delta updates"): the device falls back to the
# full file on any of them.
DELTA_BASE_MISMATCH = "delta_base_mismatch"
DELTA_CORRUPT = "delta_corrupt"
DELTA_TARGET_MISMATCH = "delta_target_mismatch"
DELTA_TOO_LARGE = "delta_too_large"
DELTA_REASONS = (DELTA_BASE_MISMATCH, DELTA_CORRUPT, DELTA_TARGET_MISMATCH, DELTA_TOO_LARGE)

REASONS = (
    OVERSIZE, MALFORMED, WRONG_TYPE, UNSAFE_NAME, UNSIGNED, UNTRUSTED_SIGNER, BELOW_THRESHOLD,
    BAD_SIGNATURE, WRONG_MODEL, ROLLBACK, SAME_VERSION, VERSION_SKIP, PREVIOUSLY_REJECTED,
    WRONG_DEVICE_CLASS, EXPIRED, AGENT_TOO_OLD, LENGTH_MISMATCH, HASH_MISMATCH,
)


class UpdateRejected(FleetLiteError):  # noqa: N818 - the name says what happened
    """Signed metadata (a release manifest or root) or a release file failed verification.

    ``reason`` is the machine-readable code (one of ``REASONS``) a device reports to the fleet;
    the message says what was wrong and what to do.
    """

    default_reason = MALFORMED

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason or self.default_reason


class OversizeError(UpdateRejected):
    """Larger than a :class:`~fleetlite.sdk.verify.Limits` cap (bytes, files, signatures)."""

    default_reason = OVERSIZE


class MalformedError(UpdateRejected):
    """Not a well-formed envelope, manifest or root (or the wrong payload type)."""

    default_reason = MALFORMED


class UnsafeNameError(MalformedError):
    """A file name in a manifest is not a plain, safe file name (path traversal defence)."""

    default_reason = UNSAFE_NAME


class SignatureError(UpdateRejected):
    """Too few distinct authorised keys signed. ``role`` names the role that was checked
    (``release``, ``root``, or ``new root`` during a rotation)."""

    default_reason = UNSIGNED

    def __init__(self, message: str, *, reason: str | None = None, role: str = "release") -> None:
        super().__init__(message, reason=reason)
        self.role = role


class WrongModelError(UpdateRejected):
    """The release is for a different model than the one the caller is updating."""

    default_reason = WRONG_MODEL


class RollbackError(UpdateRejected):
    """The version is lower than the one already trusted or installed."""

    default_reason = ROLLBACK


class EqualVersion(RollbackError):  # noqa: N818 - a signal, like python-tuf EqualVersionNumberError
    """The version equals the installed one: nothing new (not an attack, not an error to log)."""

    default_reason = SAME_VERSION


class VersionSkipError(UpdateRejected):
    """A new root is not exactly version N+1 of the trusted root."""

    default_reason = VERSION_SKIP


class PreviouslyRejectedError(UpdateRejected):
    """This device already rejected or rolled back this version; needs an operator retry."""

    default_reason = PREVIOUSLY_REJECTED


class WrongDeviceClassError(UpdateRejected):
    """The release does not target this device's class."""

    default_reason = WRONG_DEVICE_CLASS


class ExpiredError(UpdateRejected):
    """The manifest (or the trusted root) expires at or before the device's time floor."""

    default_reason = EXPIRED


class AgentTooOldError(UpdateRejected):
    """The release needs a newer agent than this one."""

    default_reason = AGENT_TOO_OLD


class LmFormatError(UpdateRejected):
    """A generative language model, its tokenizer or its ``generation`` metadata break the LM
    contract (signatures, cache layout, vocabulary, token ids).

    ``reason`` is one of :data:`fleetlite.sdk.lm_signature.LM_REASONS`; the message names the
    signature or tensor and both disagreeing values.
    """

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message, reason=reason)


class FileMismatchError(UpdateRejected):
    """A file's bytes do not match its signed manifest entry."""


class LengthMismatchError(FileMismatchError):
    """More or fewer bytes than the signed length (endless-data defence)."""

    default_reason = LENGTH_MISMATCH


class HashMismatchError(FileMismatchError):
    """The bytes' sha256 is not the signed one (tampering or mix-and-match)."""

    default_reason = HASH_MISMATCH


class DeltaError(UpdateRejected):
    """A delta cannot rebuild the signed file: made from another base, corrupt, over a cap, or
    rebuilding other bytes than the signed ones. ``reason`` is one of :data:`DELTA_REASONS`;
    the remedy is always the same: fetch the full file.
    """

    default_reason = DELTA_CORRUPT
