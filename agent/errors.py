"""Errors raised by the device agent (``fleetlite.agent``).

::

    FleetLiteError (fleetlite.sdk.errors)
    └── AgentError
        ├── RuntimeMissingError      no TFLite interpreter package is installed
        ├── InvalidModelError        the bytes are not a loadable .tflite model
        │   └── UnsupportedOpError   the model uses an op this runtime does not have
        ├── InputMismatchError       inputs of the wrong name, count, shape or dtype
        ├── InferenceError           the interpreter failed while invoking
        ├── ModelNotFoundError       no model of that name is active in the model service
        ├── LocalApiSetupError       the local API socket cannot be created
        ├── ModelCrashedError        an isolated check saw the interpreter process die
        ├── AgentConfigError         agent.yaml is missing a key or has a bad value
        └── SpoolError               the on-disk report spool cannot store a record
            └── SpoolFullError       a critical record would pass the spool's hard cap

Third-party exceptions (tflite-runtime's ``ValueError``/``RuntimeError``) are translated into
these where they enter, so callers only catch FleetLite errors.
"""

from __future__ import annotations

from fleetlite.sdk.errors import FleetLiteError


class AgentError(FleetLiteError):
    """Base of every error raised by the device agent."""


class RuntimeMissingError(AgentError):
    """No usable TFLite interpreter package is installed."""


class InvalidModelError(AgentError):
    """The model bytes cannot be loaded by the interpreter."""


class UnsupportedOpError(InvalidModelError):
    """The model uses an operator the installed runtime does not provide."""


class InputMismatchError(AgentError):
    """Inputs given to a model do not match its input tensors."""


class InferenceError(AgentError):
    """The interpreter raised while running a model."""


class ModelNotFoundError(AgentError):
    """No model of the requested name is active in the model service."""


class LocalApiSetupError(AgentError):
    """The local API's Unix socket cannot be created (missing directory, permissions, in use)."""


class ModelCrashedError(InvalidModelError):
    """Loading or running the model killed the (isolated) interpreter process."""


class AgentConfigError(AgentError):
    """The agent configuration is missing a key or holds an invalid value."""


class SpoolError(AgentError):
    """The store-and-forward spool cannot store or read a record (disk full, I/O error, locked)."""


class SpoolFullError(SpoolError):
    """A critical record would take the spool past its hard cap; nothing was written or dropped."""
