"""FleetLite's fleet side: the Python SDK for scripted rollouts (:class:`Fleet`), the controller,
the store, the rollout engine, the ``fleetlite`` CLI and reports (see docs/sdk.md).

The SDK names below are imported on first use, so importing one fleet module (the store, the
engine) does not pull in the others.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fleetlite.fleet.broker_address import BrokerAddress, resolve_broker
    from fleetlite.fleet.client import (
        DEFAULT_BROKER,
        DEFAULT_DB,
        DEFAULT_WAVES,
        Fleet,
        RequestResult,
        Rollout,
        WaitTimeoutError,
        WaveProgress,
    )
    from fleetlite.fleet.errors import FleetError, RecordNotFoundError, RolloutError
    from fleetlite.fleet.gates import GateSpec
    from fleetlite.fleet.profiles_view import Aggregate, Comparison
    from fleetlite.fleet.rollout import Selector
    from fleetlite.fleet.store import DecisionRow, DeviceRecord, ReleaseInfo
    from fleetlite.sdk.bundle import ReleaseBundle

__all__ = [
    "DEFAULT_BROKER",
    "DEFAULT_DB",
    "DEFAULT_WAVES",
    "Aggregate",
    "BrokerAddress",
    "Comparison",
    "DecisionRow",
    "DeviceRecord",
    "Fleet",
    "FleetError",
    "GateSpec",
    "RecordNotFoundError",
    "ReleaseBundle",
    "ReleaseInfo",
    "RequestResult",
    "Rollout",
    "RolloutError",
    "Selector",
    "WaitTimeoutError",
    "WaveProgress",
    "resolve_broker",
]

_HOMES = {
    "Aggregate": "fleetlite.fleet.profiles_view",
    "Comparison": "fleetlite.fleet.profiles_view",
    "BrokerAddress": "fleetlite.fleet.broker_address",
    "resolve_broker": "fleetlite.fleet.broker_address",
    "DecisionRow": "fleetlite.fleet.store",
    "DeviceRecord": "fleetlite.fleet.store",
    "ReleaseInfo": "fleetlite.fleet.store",
    "FleetError": "fleetlite.fleet.errors",
    "RecordNotFoundError": "fleetlite.fleet.errors",
    "RolloutError": "fleetlite.fleet.errors",
    "GateSpec": "fleetlite.fleet.gates",
    "Selector": "fleetlite.fleet.rollout",
    "ReleaseBundle": "fleetlite.sdk.bundle",
}


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module 'fleetlite.fleet' has no attribute {name!r}")
    module = importlib.import_module(_HOMES.get(name, "fleetlite.fleet.client"))
    value = getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
