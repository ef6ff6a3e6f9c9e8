"""Contexts: named sets of the fleet options (store, broker, TLS files) an operator with several
fleets switches between, as kubectl users do: ``fleetlite config set-context plant-a --db ...``,
``fleetlite config use-context plant-a``; then every command uses plant-a's store and broker.

The file is ``$FLEETLITE_CONFIG``, else ``$XDG_CONFIG_HOME/fleetlite/config.yaml`` (default
``~/.config/fleetlite/config.yaml``)::

    current-context: plant-a
    contexts:
      plant-a: {db: "postgresql://fleet@db-a/fleet", broker: "mqtts://mqtt-a:8883",
                tls-ca: /etc/fleetlite/a/ca.pem}
      lab: {db: "sqlite:////home/me/lab.db"}

A command-line option wins over the environment variable (``FLEETLITE_DB``, ...), which wins over
the current context, which wins over the defaults.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from fleetlite.fleet.errors import FleetError
from fleetlite.sdk.atomic import write_atomic

__all__ = ["FIELDS", "CliConfig", "add_parser", "config_path", "load_config", "pick", "run"]

#: context field -> (environment variable, argparse destination)
FIELDS: Mapping[str, tuple[str, str]] = {
    "db": ("FLEETLITE_DB", "db"),
    "broker": ("FLEETLITE_BROKER", "broker"),
    "tls-ca": ("FLEETLITE_TLS_CA", "tls_ca"),
    "tls-cert": ("FLEETLITE_TLS_CERT", "tls_cert"),
    "tls-key": ("FLEETLITE_TLS_KEY", "tls_key"),
}
_MAX_BYTES = 256 * 1024
_EXIT_CODES = ("exit codes: 0 ok, 1 the config file cannot be read or written, or the context "
               "is unknown, 2 usage error\n")
_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")


@dataclass
class CliConfig:
    """The contexts of one config file and the current one."""

    path: Path
    current: Optional[str] = None
    contexts: dict[str, dict[str, str]] = field(default_factory=dict)

    def context(self) -> dict[str, str]:
        """The current context's settings (empty when none is current)."""
        if self.current is None:
            return {}
        if self.current not in self.contexts:
            raise FleetError(f"{self.path}: the current context {self.current!r} is not defined "
                             f"(contexts: {', '.join(sorted(self.contexts)) or 'none'}); "
                             "`fleetlite config use-context NAME` picks another")
        return self.contexts[self.current]

    def save(self) -> None:
        doc: dict[str, Any] = {"current-context": self.current, "contexts": self.contexts}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # 0600 from its creation: it may hold database URLs with passwords
        write_atomic(self.path, yaml.safe_dump(doc, sort_keys=True).encode("utf-8"),
                     mode=0o600, exact_mode=True)


def config_path(environ: Mapping[str, str] = os.environ) -> Path:
    """Where the config file is (it need not exist)."""
    if environ.get("FLEETLITE_CONFIG"):
        return Path(environ["FLEETLITE_CONFIG"])
    base = environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "fleetlite" / "config.yaml"


def load_config(environ: Mapping[str, str] = os.environ) -> CliConfig:
    """The config file's contexts (none if the file does not exist); :class:`FleetError` naming
    the file and the problem if it cannot be read."""
    path = config_path(environ)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return CliConfig(path)
    except OSError as exc:
        raise FleetError(f"cannot read the fleetlite config {path}: "
                         f"{exc.strerror or exc}") from None
    if len(data) > _MAX_BYTES:
        raise FleetError(f"the fleetlite config {path} is over {_MAX_BYTES // 1024} KiB: is it "
                         "the right file?")
    try:
        doc = yaml.safe_load(data) or {}
    except yaml.YAMLError as exc:
        raise FleetError(f"the fleetlite config {path} is not valid YAML: "
                         f"{str(exc).splitlines()[0]}") from None
    if not isinstance(doc, dict):
        raise FleetError(f"the fleetlite config {path} must be a mapping with current-context "
                         "and contexts")
    unknown = set(doc) - {"current-context", "contexts"}
    if unknown:
        raise FleetError(f"{path}: unknown key {sorted(map(str, unknown))[0]!r}: the file has "
                         "current-context and contexts")
    current = doc.get("current-context")
    if current is not None and not isinstance(current, str):
        raise FleetError(f"{path}: current-context must be a context name")
    raw = doc.get("contexts") or {}
    if not isinstance(raw, dict):
        raise FleetError(f"{path}: contexts must map names to settings")
    contexts: dict[str, dict[str, str]] = {}
    for name, settings in raw.items():
        _check_name(str(name), path)
        if not isinstance(settings, dict):
            raise FleetError(f"{path}: context {name!r} must map settings "
                             f"({', '.join(FIELDS)}) to values")
        for key, value in settings.items():
            if key not in FIELDS:
                raise FleetError(f"{path}: context {name!r}: unknown setting {str(key)!r}; "
                                 f"use {', '.join(FIELDS)}")
            if not isinstance(value, str) or not value:
                raise FleetError(f"{path}: context {name!r}: {key} must be a non-empty text")
        contexts[str(name)] = {str(k): str(v) for k, v in settings.items()}
    return CliConfig(path, current, contexts)


def _check_name(name: str, path: Path) -> None:
    if not name or len(name) > 64 or set(name) - _NAME_CHARS:
        raise FleetError(f"{path}: context name {name[:70]!r}: use 1-64 letters, digits, "
                         "_ . or -")


def pick(args: argparse.Namespace, environ: Mapping[str, str] = os.environ) -> dict[str, Any]:
    """The fleet options the command line did not give and no environment variable sets,
    from the current context: a mapping of argparse destinations to values."""
    context = load_config(environ).context()
    chosen: dict[str, Any] = {}
    for key, (env, dest) in FIELDS.items():
        if getattr(args, dest, None) or environ.get(env) or key not in context:
            continue
        chosen[dest] = context[key]
    return chosen


# -- the `fleetlite config` commands -----------------------------------------------------------


def add_parser(sub: Any) -> None:
    """Add ``fleetlite config`` and its verbs."""
    config = sub.add_parser(
        "config", help="contexts: switch between fleets (store, broker, TLS files)",
        description="Name the fleet options of each fleet you operate once, then switch with "
        "use-context. A command-line option wins over its environment variable (FLEETLITE_DB, "
        "FLEETLITE_BROKER, FLEETLITE_TLS_CA/_CERT/_KEY), which wins over the current context. "
        "The file: $FLEETLITE_CONFIG, else $XDG_CONFIG_HOME/fleetlite/config.yaml "
        "(~/.config/fleetlite/config.yaml).",
        epilog="""examples:
  fleetlite config set-context plant-a --db postgresql://fleet:pw@db-a/fleet \\
      --broker mqtts://mqtt-a.example.net:8883 --tls-ca /etc/fleetlite/a/ca.pem
  fleetlite config set-context lab --db sqlite:////home/me/lab.db
  fleetlite config use-context plant-a
  fleetlite config get-contexts
  fleetlite devices list               (plant-a's store)
  fleetlite --db sqlite:///other.db devices list   (an option still wins)

exit codes: 0 ok, 1 the config file cannot be read or the context is unknown, 2 usage error
""", formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = config.add_subparsers(dest="config_command", metavar="COMMAND")
    config.set_defaults(config_usage=config)

    def verb(name: str, help: str, example: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = verbs.add_parser(
            name, help=help, description=help[0].upper() + help[1:] + ".",
            epilog=f"examples:\n  {example}\n\n{_EXIT_CODES}",
            formatter_class=argparse.RawDescriptionHelpFormatter)
        return parser

    verb("get-contexts", "list the contexts, the current one marked",
         "fleetlite config get-contexts")
    verb("current-context", "print the current context's name",
         "fleetlite config current-context")
    verb("view", "print the config file's contents", "fleetlite config view")
    use = verb("use-context", "make a context the current one",
               "fleetlite config use-context plant-a")
    use.add_argument("name", metavar="NAME")
    setter = verb("set-context", "create a context, or change the settings given (--unset "
                  "SETTING removes one)",
                  "fleetlite config set-context lab --db sqlite:////home/me/lab.db\n"
                  "  fleetlite config set-context plant-a --unset tls-ca")
    setter.add_argument("name", metavar="NAME")
    for key in FIELDS:
        setter.add_argument(f"--{key}", dest=key.replace("-", "_"), metavar="VALUE")
    setter.add_argument("--unset", action="append", default=[], choices=list(FIELDS),
                        metavar="SETTING", help=f"remove a setting ({', '.join(FIELDS)})")
    delete = verb("delete-context", "remove a context", "fleetlite config delete-context lab")
    delete.add_argument("name", metavar="NAME")


def run(args: argparse.Namespace) -> int:
    """Run a ``fleetlite config`` verb; returns the exit code."""
    command = getattr(args, "config_command", None)
    if command is None:
        args.config_usage.print_help(sys.stderr)
        return 2
    config = load_config()
    if command == "get-contexts":
        if not config.contexts:
            print(f"no contexts in {config.path}: add one with `fleetlite config set-context`")
        for name in sorted(config.contexts):
            shown = " ".join(f"{k}={v}" for k, v in sorted(config.contexts[name].items()))
            print(f"{'*' if name == config.current else ' '} {name:<20} {shown}")
        return 0
    if command == "current-context":
        if config.current is None:
            print(f"no current context (in {config.path})", file=sys.stderr)
            return 1
        print(config.current)
        return 0
    if command == "view":
        print(f"# {config.path}")
        print(yaml.safe_dump({"current-context": config.current, "contexts": config.contexts},
                             sort_keys=True), end="")
        return 0
    name = args.name
    _check_name(name, config.path)
    if command == "use-context":
        if name not in config.contexts:
            raise FleetError(f"no context {name!r} in {config.path} (contexts: "
                             f"{', '.join(sorted(config.contexts)) or 'none'}): create it with "
                             f"`fleetlite config set-context {name} --db ...`")
        config.current = name
        config.save()
        print(f"switched to context {name}")
        return 0
    if command == "set-context":
        settings = dict(config.contexts.get(name, {}))
        for key in FIELDS:
            value = getattr(args, key.replace("-", "_"))
            if value is not None:
                if not value:
                    raise FleetError(f"--{key} needs a value (use --unset {key} to remove it)")
                settings[key] = value
        for key in args.unset:
            settings.pop(key, None)
        created = name not in config.contexts
        config.contexts[name] = settings
        config.save()
        print(f"{'created' if created else 'changed'} context {name} in {config.path}"
              + ("" if config.current == name else
                 f"; `fleetlite config use-context {name}` makes it current"))
        return 0
    if command == "delete-context":
        if name not in config.contexts:
            raise FleetError(f"no context {name!r} in {config.path}")
        del config.contexts[name]
        if config.current == name:
            config.current = None
        config.save()
        print(f"deleted context {name}")
        return 0
    raise FleetError(f"unknown config command {command!r}")
