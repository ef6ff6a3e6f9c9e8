"""The fleet's root of trust on the operator's side: the root.json the fleet's devices are
provisioned with, configured once (``fleetlite keys root use root.json``) so that ``fleetlite
release push`` checks every release as those devices will.

Where the root comes from, first match wins:

1. ``--root FILE`` on the command;
2. ``$FLEETLITE_ROOT`` (a root.json path);
3. the copy ``keys root use`` keeps beside the CLI config file (see
   :func:`fleetlite.fleet.cli_config.config_path`): ``fleet-root.json``, or
   ``fleet-root.<CONTEXT>.json`` while a context is current, so that each fleet of a
   multi-fleet operator has its own.

The stored file is a byte-for-byte copy of the root envelope: it can be passed to ``--root``
anywhere, and moving or editing the original does not change what the fleet trusts.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from fleetlite.fleet.cli_config import load_config
from fleetlite.fleet.errors import FleetError
from fleetlite.sdk.errors import UpdateRejected
from fleetlite.sdk.trust import Root, load_trusted_root, update_root

__all__ = ["ROOT_ENV", "FleetRoot", "resolve_fleet_root", "stored_root_path", "use_root"]

ROOT_ENV = "FLEETLITE_ROOT"


@dataclass(frozen=True)
class FleetRoot:
    """A loaded root and where it came from (for messages)."""

    root: Root
    path: Path
    source: str


def stored_root_path(environ: Mapping[str, str] = os.environ) -> Path:
    """Where ``keys root use`` keeps the fleet's root (it need not exist)."""
    config = load_config(environ)
    name = f"fleet-root.{config.current}.json" if config.current else "fleet-root.json"
    return config.path.parent / name


def _load(path: Path, source: str) -> FleetRoot:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FleetError(f"{path}: no such root file ({source}); give the root.json your "
                         "devices are provisioned with") from None
    except OSError as exc:
        raise FleetError(f"{path}: cannot read the root file ({source}): "
                         f"{exc.strerror or exc}") from None
    try:
        root = load_trusted_root(data)
    except UpdateRejected as exc:
        raise FleetError(f"{path}: not a usable root ({source}): {exc} [{exc.reason}]; "
                         "check it with `fleetlite keys root show FILE`") from None
    return FleetRoot(root, path, source)


def resolve_fleet_root(flag: Optional[str],
                       environ: Mapping[str, str] = os.environ) -> Optional[FleetRoot]:
    """The root to check releases against: ``--root``, else ``$FLEETLITE_ROOT``, else the stored
    fleet root; None when none is configured."""
    if flag:
        return _load(Path(flag), "--root")
    if environ.get(ROOT_ENV):
        return _load(Path(environ[ROOT_ENV]), f"${ROOT_ENV}")
    stored = stored_root_path(environ)
    if stored.exists():
        return _load(stored, "set with `fleetlite keys root use`")
    return None


def use_root(source: Path, *, force: bool = False,
             environ: Mapping[str, str] = os.environ) -> tuple[Root, Path, Optional[Root]]:
    """Make ``source`` the fleet's root: returns (new root, stored path, replaced root or None).

    The file must be a root a device would load (signed by a threshold of its own root keys).
    Replacing a stored root with a newer version must be a rotation devices accept (signed by
    old and new root keys, version N+1); an older version is refused, as devices refuse it.
    ``force`` replaces it anyway (a fleet re-provisioned from scratch)."""
    new = _load(source, "the root to use").root
    data = source.read_bytes()
    target = stored_root_path(environ)
    previous: Optional[Root] = None
    if target.exists():
        previous = _load(target, "the current fleet root").root
        if not force and target.read_bytes() != data:
            try:
                update_root(previous, data)
            except UpdateRejected as exc:
                raise FleetError(
                    f"{source}: devices provisioned with the current fleet root (v"
                    f"{previous.version}, {target}) would refuse it: {exc} [{exc.reason}]; make "
                    "it with `fleetlite keys root rotate`, or pass --force if the fleet's "
                    "devices were provisioned with it") from None
    from fleetlite.sdk.atomic import write_atomic

    target.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(target, data, mode=0o644, exact_mode=True)  # a crash leaves old or new
    return new, target, previous
