"""Errors raised by the model runtime (``fleetlite.sdk.runtime``), on the device and wherever a
release is built.

::

    FleetLiteError (fleetlite.sdk.errors)
    └── ModelRuntimeError
        ├── RuntimeMissingError      no TFLite interpreter package is installed
        ├── InvalidModelError        the bytes are not a loadable .tflite model
        │   ├── UnsupportedOpError   the model uses an op this runtime does not have
        │   └── ModelCrashedError    an isolated check saw the interpreter process die
        ├── InputMismatchError       inputs of the wrong name, count, shape or dtype
        │   └── GenerationInputError a prompt or generation parameter the LM cannot take
        │                            (sdk/runtime/lm_engine.py)
        ├── InferenceError           the interpreter failed while invoking
        ├── BusyError                a language model's wait queue is full
        │                            (sdk/runtime/lm_engine.py)
        ├── MemoryBudgetError        an LM and its caches exceed the device class's memory
        │                            budget (sdk/runtime/lm_engine.py)
        └── TokenizerError           a tokenizer file is unusable or its library is missing
                                     (sdk/runtime/tokenizer.py)

Third-party exceptions (tflite-runtime's ``ValueError``/``RuntimeError``) are translated into
these where they enter, so callers only catch FleetLite errors.
"""

from __future__ import annotations

from fleetlite.sdk.errors import FleetLiteError


class ModelRuntimeError(FleetLiteError):
    """Base of every error raised by the model runtime."""


class RuntimeMissingError(ModelRuntimeError):
    """No usable TFLite interpreter package is installed."""


class InvalidModelError(ModelRuntimeError):
    """The model bytes cannot be loaded by the interpreter."""


class UnsupportedOpError(InvalidModelError):
    """The model uses an operator the installed runtime does not provide."""


class ModelCrashedError(InvalidModelError):
    """Loading or running the model killed the (isolated) interpreter process."""


class InputMismatchError(ModelRuntimeError):
    """Inputs given to a model do not match its input tensors."""


class InferenceError(ModelRuntimeError):
    """The interpreter raised while running a model."""
