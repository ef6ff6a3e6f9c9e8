"""Errors raised by the fleet side (``fleetlite.fleet``): store, controller, rollouts, CLI.

::

    FleetLiteError (fleetlite.sdk.errors)
    └── FleetError
        ├── MissingExtraError   a fleet-side dependency is not installed
        └── PublishError        the broker could not be reached or did not acknowledge a publish
"""

from __future__ import annotations

from fleetlite.sdk.errors import FleetLiteError


class FleetError(FleetLiteError):
    """Base of every error raised by the fleet side."""


class MissingExtraError(FleetError):
    """A fleet-side dependency is missing: install ``fleetlite[fleet]``."""


class PublishError(FleetError):
    """The publisher could not reach the broker or a publish was not acknowledged in time."""
