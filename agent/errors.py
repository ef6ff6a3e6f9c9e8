"""Errors raised by the device agent (``fleetlite.agent``).

::

    FleetLiteError (fleetlite.sdk.errors)
    └── AgentError
        ├── ModelNotFoundError       no model of that name is active in the model service
        ├── LocalApiSetupError       the local API socket cannot be created
        ├── SmokeTestError           the OTA smoke test could not run at all (no verdict)
        ├── AgentConfigError         agent.yaml is missing a key or has a bad value
        ├── SpoolError               the on-disk report spool cannot store a record
        │   └── SpoolFullError       a critical record would pass the spool's hard cap
        └── DownloadError            a chunked release download cannot go on (``reason``)
            ├── DiskFullError        disk_full: the staging file system is full (or too small)
            ├── DownloadStalledError download_stalled: requests went unanswered too often
            ├── DownloadTimeoutError download_timeout: the overall download deadline passed
            ├── DownloadIncompleteError download_incomplete: finalize before every chunk came
            └── StagingIOError       staging_io_error: another I/O error in the staging dir

The model runtime the agent runs (interpreter, isolated check, language-model engine, tokenizer)
raises its own :class:`~fleetlite.sdk.runtime.errors.ModelRuntimeError` subtree, shared with the
fleet's release builder; the agent catches both where it reports a failure.
"""

from __future__ import annotations

from fleetlite.sdk.errors import FleetLiteError


class AgentError(FleetLiteError):
    """Base of every error raised by the device agent."""


class ModelNotFoundError(AgentError):
    """No model of the requested name is active in the model service."""


class LocalApiSetupError(AgentError):
    """The local API's Unix socket cannot be created (missing directory, permissions, in use)."""


class SmokeTestError(AgentError):
    """The OTA smoke-test subprocess ended without a verdict (a bug or a broken install, not a
    bad model: bad models give a failed ``SmokeResult``)."""


class AgentConfigError(AgentError):
    """The agent configuration is missing a key or holds an invalid value."""


class SpoolError(AgentError):
    """The store-and-forward spool cannot store or read a record (disk full, I/O error, locked)."""


class SpoolFullError(SpoolError):
    """A critical record would take the spool past its hard cap; nothing was written or dropped."""


class DownloadError(AgentError):
    """A chunked release download cannot go on; ``reason`` is the code the device reports."""

    default_reason = "download_failed"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason or self.default_reason


class DiskFullError(DownloadError):
    """The staging file system is full (ENOSPC) or the file size limit was hit (EFBIG).

    The chunks received before stay on disk and in the persisted bitmap, so a store opened again
    resumes; the OTA worker, though, ends the install and removes its staging copy.
    """

    default_reason = "disk_full"


class DownloadStalledError(DownloadError):
    """Too many chunk requests in a row went unanswered (the fleet stopped serving?)."""

    default_reason = "download_stalled"


class DownloadTimeoutError(DownloadError):
    """The download's overall deadline passed while it was still making progress."""

    default_reason = "download_timeout"


class DownloadIncompleteError(DownloadError):
    """Finalize was called before every chunk was received."""

    default_reason = "download_incomplete"


class StagingIOError(DownloadError):
    """An I/O error other than a full disk in the staging directory (permissions, EIO)."""

    default_reason = "staging_io_error"
