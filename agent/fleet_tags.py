"""Tags the fleet set on this device (``fleetlite devices tag``), layered over agent.yaml's.

The ``set_tags`` command changes this layer: a tag set here overrides agent.yaml's of the same
key, and a removed key hides agent.yaml's (kept as ``null``). The layer is stored in
``<state_dir>/fleet_tags.json`` (written atomically), so it survives restarts and config
reloads; the device's tags, in its birth and ``info``, are agent.yaml's with the layer applied.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

from fleetlite.agent.commands import CommandArgumentError
from fleetlite.sdk.atomic import write_atomic

__all__ = ["MAX_FLEET_TAGS", "FleetTags"]

MAX_FLEET_TAGS = 64
MAX_KEY = 64
MAX_VALUE = 256
_KEY = re.compile(r"[A-Za-z0-9_.:/-]{1,64}")
_FILE = "fleet_tags.json"

Layer = dict[str, Optional[str]]


class FleetTags:
    """The fleet's tag layer of one device (key -> value, or None for a removed key)."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / _FILE
        self.layer: Layer = _load(self.path)

    def effective(self, configured: Mapping[str, str]) -> dict[str, str]:
        """agent.yaml's tags with the fleet's layer applied."""
        merged = dict(configured)
        for key, value in self.layer.items():
            if value is None:
                merged.pop(key, None)
            else:
                merged[key] = value
        return dict(sorted(merged.items()))

    def apply(self, to_set: Mapping[str, Any], to_remove: Sequence[Any]) -> None:
        """Set and remove keys (checked first: nothing changes on a bad argument) and save."""
        for key, value in to_set.items():
            _check_key(key)
            if not isinstance(value, str) or len(value) > MAX_VALUE:
                raise CommandArgumentError(f"tag {key!r}: the value must be a string of at most "
                                           f"{MAX_VALUE} characters")
        for key in to_remove:
            _check_key(key)
        overlap = set(to_set) & set(to_remove)
        if overlap:
            raise CommandArgumentError(f"tag {sorted(overlap)[0]!r} is both set and removed")
        layer = {**self.layer, **{k: str(v) for k, v in to_set.items()},
                 **dict.fromkeys(to_remove)}
        if len(layer) > MAX_FLEET_TAGS:
            raise CommandArgumentError(f"at most {MAX_FLEET_TAGS} tags can be set from the "
                                       "fleet; remove some first")
        write_atomic(self.path, json.dumps(layer, sort_keys=True).encode())
        self.layer = layer


def _check_key(key: Any) -> None:
    if not isinstance(key, str) or not _KEY.fullmatch(key):
        raise CommandArgumentError(f"tag key {str(key)[:70]!r}: use 1-{MAX_KEY} letters, digits "
                                   "or _ . : / -")


def _load(path: Path) -> Layer:
    """The stored layer; an unreadable or damaged file counts as none (logged by the caller's
    next save replacing it)."""
    try:
        data = json.loads(path.read_bytes()[:64 * 1024])
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {str(k): (v if isinstance(v, str) else None) for k, v in data.items()
            if isinstance(k, str) and _KEY.fullmatch(k)}
