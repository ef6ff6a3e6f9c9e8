"""``fleetlite devices ping|info|profile|reload-config|ota-slots|retry|update-root|history`` and
``fleetlite events``: commands to devices and what devices reported, from the operator's
terminal. Commands go through the store (:mod:`fleetlite.fleet.device_commands`): the controller
running on it publishes them and stores the answers."""

from __future__ import annotations

import argparse
import base64
import json
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Optional

from fleetlite.fleet.cli_keys import duration_arg
from fleetlite.fleet.client import Fleet
from fleetlite.fleet.device_commands import CommandOutcome
from fleetlite.fleet.errors import FleetError
from fleetlite.fleet.store import CommandRecord, EventRecord
from fleetlite.fleet.terminal_text import one_line

__all__ = ["add_device_commands", "add_events", "add_root_distribute"]

EXIT_OK, EXIT_FAILED = 0, 1

COMMAND_EXIT_CODES = """\
exit codes:
  0  every device answered ok
  1  a device refused the command, did not answer in time, is offline or unknown, or the
     command was not sent (no controller runs on this store); also a store or file error
  2  usage error (no device named, an unknown option)"""

# (CLI name, agent command, help, description)
_SIMPLE = (
    ("ping", "ping", "check that devices answer",
     "Ask each device for a pong (its session, uptime and agent version)."),
    ("info", "info", "ask devices for their facts, models, spool, link and OTA state",
     "Ask each device to describe itself: facts, active models, spool, MQTT link, OTA state "
     "and command counters."),
    ("reload-config", "reload_config", "make devices re-read agent.yaml",
     "Ask each agent to re-read its agent.yaml (tags, models, intervals; a change to the "
     "device id, class, broker, state or socket needs a restart, and the answer says so)."),
    ("ota-slots", "ota_slots", "show devices' installed versions and A/B slots",
     "Ask each device for its OTA state: per model the active, installed, pending and "
     "rejected versions, and the install in progress."),
)


def add_device_commands(devices: Any, leaf: Callable[..., argparse.ArgumentParser]) -> None:
    """Add the command verbs and ``history`` to the ``devices`` group; ``leaf`` makes one
    subcommand (fleet options and ``-o`` included)."""
    for name, command, help_text, description in _SIMPLE:
        parser = leaf(devices, name, _sender(command), help=help_text,
                      description=description + _HOW, examples=_examples(name),
                      exit_codes=COMMAND_EXIT_CODES)
        _targets(parser)
    profile = leaf(devices, "profile", _profile, help="make devices profile a model now",
                   description="Ask each device to profile one of its active models now; the "
                   "answer is the profile record (also stored as the device's latest)." + _HOW,
                   examples=_examples("profile", "--model intent"),
                   exit_codes=COMMAND_EXIT_CODES)
    _targets(profile, default_timeout=120.0)
    profile.add_argument("--model", metavar="NAME",
                         help="the model to profile (needed when a device serves several)")
    retry = leaf(devices, "retry", _retry, help="send a failed install again",
                 description="Send the install of a release again with retry set, so a device "
                 "re-runs an install that ended in a failure it remembers (disk_full, a "
                 "download that stalled) instead of answering with that failure. The "
                 "release must belong to a rollout that is not finished: the controller "
                 "serves a release's chunks for its rollouts." + _HOW,
                 examples=_examples("retry", "--release 3f9a1c2d...", one=True),
                 exit_codes=COMMAND_EXIT_CODES)
    _targets(retry)
    retry.add_argument("--release", required=True, metavar="RELEASE_ID",
                       help="the release to install (a stored release's id, or a unique "
                       "prefix of 6 or more characters)")
    retry.add_argument("--chunk-size", type=int, default=None, metavar="BYTES",
                       help="chunk size of the download (default: the one the release's "
                       "rollout serves it with; another is refused)")
    root = leaf(devices, "update-root", _update_root, help="rotate devices' root of trust",
                description="Send a new root.json (signed by the current root's keys) to "
                "devices; each verifies it against the root it trusts and answers with the "
                "new root version, or refuses it with the reason." + _HOW,
                examples=_examples("update-root", "--root root-v2.json"),
                exit_codes=COMMAND_EXIT_CODES)
    _targets(root)
    root.add_argument("--root", required=True, metavar="ROOT.json", type=Path,
                      help="the new root metadata")
    tag = leaf(devices, "tag", _tag_devices, help="set or remove devices' tags",
               description="Set and remove tags on devices from the fleet: each device keeps "
               "them (over its agent.yaml's tags, across restarts), answers with its tags now "
               "and publishes its birth again, so `devices list` shows them." + _HOW,
               examples=_examples("tag", "--set line=2 --remove temp"),
               exit_codes=COMMAND_EXIT_CODES)
    _targets(tag)
    tag.add_argument("--set", dest="set_tags", action="append", default=[],
                     metavar="KEY=VALUE", help="set a tag (repeat for several)")
    tag.add_argument("--remove", dest="remove_tags", action="append", default=[],
                     metavar="KEY", help="remove a tag, agent.yaml's included (repeat)")
    remove = leaf(devices, "remove-model", _remove_model, help="remove a model from devices",
                  description="Stop serving a model on devices and delete its installed "
                  "releases; a model from agent.yaml is not served again, even after a "
                  "restart, until a release of it is installed. The device publishes its birth "
                  "again without it." + _HOW,
                  examples=_examples("remove-model", "--model intent"),
                  exit_codes=COMMAND_EXIT_CODES)
    _targets(remove)
    remove.add_argument("--model", required=True, metavar="NAME", help="the model to remove")
    decommission = leaf(
        devices, "decommission", _decommission, help="take devices out of service",
        description="Take devices out of service: they leave `devices list`, rollouts and "
        "--all selections; their history (profiles, OTA statuses, commands, events) stays, "
        "`devices show` and `devices list --decommissioned` still show them. --undo puts them "
        "back. Nothing is sent to the devices.",
        examples="""\
  fleetlite devices decommission gw-berlin-07
  fleetlite devices decommission gw-berlin-07 --undo
  fleetlite devices list --decommissioned
""")
    decommission.add_argument("device_ids", nargs="+", metavar="ID", help="devices by id")
    decommission.add_argument("--undo", action="store_true", help="put them back in service")
    history = leaf(devices, "history", _history, help="commands sent to a device and answers",
                   description="The commands sent to one device (by operators and rollouts), "
                   "newest first, with their answers.",
                   examples="""\
  fleetlite devices history gw-berlin-01
  fleetlite devices history gw-berlin-01 --limit 5 -o json | jq '.commands[0].result'
""")
    history.add_argument("device_id", metavar="ID")
    history.add_argument("--limit", type=_positive_int, default=20, metavar="N",
                         help="how many (default 20)")


def add_root_distribute(root_sub: Any, leaf: Callable[..., argparse.ArgumentParser]) -> None:
    """Add ``fleetlite keys root distribute ROOT.json``: ``devices update-root`` for the fleet."""
    distribute = leaf(root_sub, "distribute", _distribute,
                      help="send the next root of trust to the fleet's devices",
                      description="Send ROOT.json (the next root, from `keys root rotate`) to "
                      "every registered device, or to those named, and show which accepted it: "
                      "each checks it against the root it trusts (signed by a threshold of the "
                      "old and the new root keys, exactly one version newer)." + _HOW,
                      examples="""\
  fleetlite keys root distribute root-v2.json
  fleetlite keys root distribute root-v2.json --class raspberry-pi-4 -o json
  fleetlite keys root distribute root-v2.json gw-berlin-01 gw-berlin-02
""", exit_codes=COMMAND_EXIT_CODES)
    distribute.add_argument("root", metavar="ROOT.json", type=Path, help="the new root")
    _targets(distribute)


def _distribute(fleet: Fleet, args: argparse.Namespace) -> int:
    if not (args.device_ids or args.device_class or args.tag):
        args.all = True  # the fleet, unless told which devices
    return _update_root(fleet, args)


def add_events(subparsers: Any, leaf: Callable[..., argparse.ArgumentParser]) -> None:
    """Add ``fleetlite events``."""
    events = leaf(subparsers, "events", _events, help="what devices reported (rejected "
                  "commands, failed profiles, ...)",
                  description="Events devices reported (fleetlite.event/1), oldest first, as "
                  "the controller stored them: a rejected command, a profile that failed. "
                  "With --follow, new ones are printed as they are stored (like `kubectl get "
                  "events -w`) until Ctrl-C.",
                  examples="""\
  fleetlite events
  fleetlite events --device gw-berlin-01 --since 1h
  fleetlite events --follow
  fleetlite events --since 30m -o json | jq -r '.events[].kind'
""")
    events.add_argument("--device", dest="devices", action="append", metavar="ID",
                        help="only this device's events (repeat for several)")
    events.add_argument("--since", type=duration_arg, metavar="DURATION",
                        help="only events stored within this long, e.g. 30m, 2h, 7d")
    events.add_argument("--limit", type=_positive_int, default=100, metavar="N",
                        help="at most this many, the newest (default 100)")
    events.add_argument("--follow", "-f", action="store_true",
                        help="keep printing new events until Ctrl-C (table output: one line "
                        "each; json: one JSON object per line)")


_HOW = (" The command goes through the store: the controller (`fleetlite serve`) on it "
        "publishes it and stores the answer (`fleetlite devices history ID`).")


def _examples(name: str, extra: str = "", one: bool = False) -> str:
    tail = f" {extra}" if extra else ""
    lines = [f"  fleetlite devices {name} gw-berlin-01{tail}"]
    if not one:
        lines += [f"  fleetlite devices {name} gw-1 gw-2 --timeout 10{tail}",
                  f"  fleetlite devices {name} --class raspberry-pi-4 --tag site=berlin{tail}",
                  f"  fleetlite devices {name} --all{tail} -o json"]
    return "\n".join(lines) + "\n"


def _targets(parser: argparse.ArgumentParser, default_timeout: float = 30.0) -> None:
    parser.add_argument("device_ids", nargs="*", metavar="ID", help="devices by id")
    parser.add_argument("--class", dest="device_class", metavar="CLASS",
                        help="every device of this class")
    parser.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE",
                        help="every device with this tag (repeat: all must match)")
    parser.add_argument("--all", action="store_true", help="every registered device")
    parser.add_argument("--timeout", type=_seconds, default=default_timeout, metavar="SECONDS",
                        help=f"how long to wait for the answers (default {default_timeout:g})")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of 1 or more, got {text!r}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 86400:
        raise argparse.ArgumentTypeError(f"expected seconds between 0 and 86400, got {text!r}")
    return value


def _select(fleet: Fleet, args: argparse.Namespace) -> list[str]:
    """The devices ``args`` name: ids, or by class/tag, or all."""
    chosen: list[str] = list(dict.fromkeys(args.device_ids))
    tags: dict[str, str] = {}
    for item in args.tag:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise FleetError(f"--tag {item!r}: write KEY=VALUE, e.g. --tag site=berlin")
        tags[key] = value
    if args.device_class or tags or args.all:
        found = fleet.devices(device_class=args.device_class, tags=tags or None)
        chosen += [d.device_id for d in found if d.device_id not in chosen]
        if not found and not args.device_ids:
            raise FleetError("no registered device matches --class/--tag: list them with "
                             "`fleetlite devices list`")
    if not chosen:
        raise _UsageError("name the devices: IDs, --class CLASS, --tag KEY=VALUE or --all")
    return chosen


class _UsageError(FleetError):
    """No device named: exit 2 with the usage."""


def _send(fleet: Fleet, args: argparse.Namespace, command: str,
          command_args: dict[str, Any]) -> int:
    from fleetlite.fleet.cli_fleet import EXIT_USAGE, _emit

    try:
        device_ids = _select(fleet, args)
    except _UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    outcomes = fleet.send_command(device_ids, command, command_args, timeout_s=args.timeout,
                                  origin="cli")
    _emit(args, {"command": command, "outcomes": [o.to_dict() for o in outcomes],
                 "ok": all(o.ok for o in outcomes)}, lambda: _outcomes_table(outcomes))
    return EXIT_OK if all(o.ok for o in outcomes) else EXIT_FAILED


def _sender(command: str) -> Callable[[Fleet, argparse.Namespace], int]:
    def handler(fleet: Fleet, args: argparse.Namespace) -> int:
        return _send(fleet, args, command, {})

    return handler


def _profile(fleet: Fleet, args: argparse.Namespace) -> int:
    return _send(fleet, args, "profile", {"model": args.model} if args.model else {})


def _retry(fleet: Fleet, args: argparse.Namespace) -> int:
    from fleetlite.fleet.rollout import FINISHED_STATES

    release = fleet.release(args.release)  # a full id or a unique prefix; else says which
    # a controller serves a release's chunks, in its rollout's chunk size, only while one of
    # its rollouts is not finished: anything else would download nothing
    serving = [r for r in fleet.rollouts(release.release_id) if r.state not in FINISHED_STATES]
    if not serving:
        raise FleetError(f"release {release.release_id[:12]} ({release.name} v{release.version})"
                         " is in no running or paused rollout, so no controller serves it: "
                         "create a rollout of it for the device (`fleetlite rollout create "
                         f"{release.release_id[:12]} --device DEVICE`)")
    sizes = sorted({r.spec.chunk_size for r in serving})
    chunk_size = args.chunk_size if args.chunk_size is not None else sizes[0]
    if chunk_size not in sizes:
        raise FleetError(f"--chunk-size {chunk_size}: rollout {serving[0].rollout_id} serves "
                         f"release {release.release_id[:12]} in chunks of "
                         f"{' or '.join(map(str, sizes))} bytes; leave --chunk-size out")
    return _send(fleet, args, "ota_install", {"release_id": release.release_id,
                                              "chunk_size": chunk_size, "retry": True})


def _update_root(fleet: Fleet, args: argparse.Namespace) -> int:
    from fleetlite.sdk.trust import load_trusted_root

    path: Path = args.root
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise FleetError(f"cannot read the root {path}: {exc.strerror or exc}") from None
    try:  # each device also checks it against the root it trusts now
        load_trusted_root(data)
    except Exception as exc:  # not even a root signed by its own keys: say so before sending
        raise FleetError(f"{path} is not a signed root.json ({exc}); make the next root with "
                         "`fleetlite keys root rotate`") from None
    return _send(fleet, args, "update_root", {"root": base64.b64encode(data).decode()})


def _tag_devices(fleet: Fleet, args: argparse.Namespace) -> int:
    from fleetlite.fleet.cli_fleet import EXIT_USAGE

    to_set: dict[str, str] = {}
    for item in args.set_tags:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise FleetError(f"--set {item!r}: write KEY=VALUE, e.g. --set line=2")
        to_set[key] = value
    if not to_set and not args.remove_tags:
        print("error: say what to change: --set KEY=VALUE and/or --remove KEY", file=sys.stderr)
        return EXIT_USAGE
    return _send(fleet, args, "set_tags", {"set": to_set, "remove": list(args.remove_tags)})


def _remove_model(fleet: Fleet, args: argparse.Namespace) -> int:
    return _send(fleet, args, "remove_model", {"model": args.model})


def _decommission(fleet: Fleet, args: argparse.Namespace) -> int:
    from fleetlite.fleet.cli_fleet import _emit

    changed = fleet.decommission(args.device_ids, undo=args.undo)
    unchanged = [d for d in args.device_ids if d not in changed]
    state = "back in service" if args.undo else "decommissioned"

    def table() -> str:
        lines = [f"{d}: {state}" for d in changed]
        lines += [f"{d}: already {state}" for d in unchanged]
        return "\n".join(lines)

    _emit(args, {"changed": changed, "unchanged": unchanged, "state": state}, table)
    return EXIT_OK


def _summary(result: Optional[dict[str, Any]]) -> str:
    """A short line of a command's result: its scalar fields, the rest by name."""
    if not result:
        return ""
    parts = []
    for key, value in result.items():
        if value is None or value == "":
            parts.append(f"{one_line(str(key))}=-")
        elif isinstance(value, (str, int, float, bool)):
            parts.append(f"{one_line(str(key))}={one_line(str(value))}")
        else:
            parts.append(f"{one_line(str(key))}=...")
    text = ", ".join(parts)
    return text if len(text) <= 70 else text[:67] + "..."


def _outcomes_table(outcomes: Sequence[CommandOutcome]) -> str:
    width = max([len("DEVICE")] + [len(o.device_id) for o in outcomes])
    lines = [f"{'DEVICE':<{width}}  {'STATE':<9}  {'TIME':>7}  DETAIL"]
    for o in outcomes:
        took = f"{o.latency_s:.2f} s" if o.latency_s is not None else "-"
        detail = _summary(o.result) if o.ok else one_line(o.text)
        lines.append(f"{o.device_id:<{width}}  {o.state:<9}  {took:>7}  {detail}")
    answered = sum(o.ok for o in outcomes)
    lines.append(f"{answered} of {len(outcomes)} answered ok (full answers: -o json)")
    return "\n".join(lines)


def _history(fleet: Fleet, args: argparse.Namespace) -> int:
    from fleetlite.fleet.cli_fleet import _clock, _emit

    fleet.device(args.device_id)  # an unknown device is an error, not an empty history
    records = fleet.command_history(args.device_id, limit=args.limit)

    def table() -> str:
        if not records:
            return f"no command was sent to {args.device_id} yet"
        lines = [f"{'SENT':<19}  {'COMMAND':<13}  {'BY':<18}  ANSWER"]
        for r in records:
            when = _clock(r.sent if r.sent is not None else r.created)
            by = one_line(r.origin[:18]) or "-"
            lines.append(f"{when:<19}  {r.command:<13}  {by:<18}  {_answer(r)}")
        return "\n".join(lines)

    _emit(args, {"device_id": args.device_id, "commands": [_command_dict(r) for r in records]},
          table)
    return EXIT_OK


def _answer(record: CommandRecord) -> str:
    if record.answered is None:
        return "not sent" if record.sent is None else "no answer"
    if record.ok:
        return "ok " + _summary(record.result)
    return (f"refused ({one_line(record.error_code) or 'error'}): "
            f"{one_line(record.error) or 'no reason given'}")


def _command_dict(record: CommandRecord) -> dict[str, Any]:
    return {"command_id": record.command_id, "command": record.command, "args": record.args,
            "origin": record.origin, "created": record.created, "sent": record.sent,
            "answered": record.answered, "ok": record.ok, "result": record.result,
            "error_code": record.error_code or None, "error": record.error or None}


def _event_dict(event: EventRecord) -> dict[str, Any]:
    return {"id": event.id, "device_id": event.device_id, "received": event.received,
            "ts": event.ts, "kind": event.kind, "message": event.message,
            "detail": event.detail}


def _event_line(event: EventRecord) -> str:
    from fleetlite.fleet.cli_fleet import _clock

    return (f"{_clock(event.received):<19}  {one_line(event.device_id):<20}  "
            f"{one_line(event.kind):<20}  {one_line(event.message) or '-'}")


def _events(fleet: Fleet, args: argparse.Namespace) -> int:
    from fleetlite.fleet.cli_fleet import _emit

    since = time.time() - args.since if args.since else None
    found = fleet.events(device_ids=args.devices, since=since, limit=args.limit)
    if not args.follow:
        def table() -> str:
            if not found:
                return "no events" + (" in that time" if since else "")
            header = f"{'RECEIVED':<19}  {'DEVICE':<20}  {'KIND':<20}  MESSAGE"
            return "\n".join([header] + [_event_line(e) for e in found])

        _emit(args, {"events": [_event_dict(e) for e in found]}, table)
        return EXIT_OK
    last = found[-1].id if found else _newest_id(fleet)
    out = sys.stdout
    signal.signal(signal.SIGTERM, _interrupt)  # stopped like Ctrl-C, exit 0
    try:
        for event in found:
            _print_event(out, args.output, event)
        while True:
            time.sleep(0.2)
            for event in fleet.events(device_ids=args.devices, after_id=last, limit=1000):
                _print_event(out, args.output, event)
                last = event.id
    except KeyboardInterrupt:
        return EXIT_OK


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _newest_id(fleet: Fleet) -> int:
    newest = fleet.events(limit=1)
    return newest[-1].id if newest else 0


def _print_event(out: Any, output: str, event: EventRecord) -> None:
    if output == "table":
        out.write(_event_line(event) + "\n")
    else:  # one object per line, in json and yaml alike: a stream a script can read
        out.write(json.dumps(_event_dict(event), sort_keys=True) + "\n")
    out.flush()
