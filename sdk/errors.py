"""Errors of the shared contract (``fleetlite.sdk``).

Every FleetLite error derives from :class:`FleetLiteError`; each package adds its own subtree::

    FleetLiteError
    ├── DeviceClassError          a device profile YAML file is missing or invalid
    ├── agent.errors.AgentError   the device agent (runtime, model service, link, OTA)
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
