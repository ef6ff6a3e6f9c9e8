"""Errors raised by the fleet side (``fleetlite.fleet``): store, controller, rollouts, CLI.

::

    FleetLiteError (fleetlite.sdk.errors)
    └── FleetError
        └── MissingExtraError   a fleet-side dependency is not installed
"""

from __future__ import annotations

from fleetlite.sdk.errors import FleetLiteError


class FleetError(FleetLiteError):
    """Base of every error raised by the fleet side."""


class MissingExtraError(FleetError):
    """A fleet-side dependency is missing: install ``fleetlite[fleet]``."""
