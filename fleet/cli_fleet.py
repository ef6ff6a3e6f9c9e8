"""``fleetlite`` verbs over the fleet store: ``serve``, ``devices``, ``release push/list``,
``rollout``, ``profiles`` and ``report``, each a thin layer over the SDK
(:class:`fleetlite.fleet.client.Fleet`)."""

from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import shutil
import signal
import sys
import textwrap
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Callable, Optional

from fleetlite.fleet.broker_address import add_tls_options
from fleetlite.fleet.errors import RolloutError
from fleetlite.fleet.rollout import (
    ON_FAILURE_ACTIONS,
    OPERATOR_ACTIONS,
    VARIANT_MODES,
    ShadowSpec,
)

if TYPE_CHECKING:
    from fleetlite.fleet.client import Fleet, Rollout, WaveProgress
    from fleetlite.fleet.store import DeviceRecord

OUTPUTS = ("table", "json", "yaml")
TABLE_PAGE = 500
"""Devices a ``devices list`` table shows without ``--limit`` (json and yaml: all)."""
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NOT_COMPLETED = 0, 1, 2, 3
EXIT_CODES = ("exit codes: 0 ok, 1 the command failed (the message says why), 2 usage error")
WATCH_EXIT_CODES = ("exit codes: 0 ok (watch/wait: the rollout completed), 1 the command failed "
                    "or timed out,\n  2 usage error, 3 the rollout ended without completing "
                    "(or, with --stop-on-pause, paused)")
DB_HELP = ("the fleet store: sqlite:///PATH, sqlite:////ABS/PATH or "
           "postgresql://USER:PW@HOST/DB (env FLEETLITE_DB; default sqlite:///fleetlite.db, "
           "i.e. fleetlite.db in the current directory)")
BROKER_HELP = ("the MQTT broker: HOST:PORT, mqtt://HOST:PORT, or mqtts://HOST:PORT for TLS "
               "(default port 8883), e.g. mqtts://mqtt.example.net:8883 (env FLEETLITE_BROKER; "
               "default localhost:1883); used by `serve`")
FLEET_OPTIONS = """\
fleet options (before or after the command):
  --db URL            the store the controller uses (env FLEETLITE_DB, default
                      sqlite:///fleetlite.db in the current directory)
  --broker ADDRESS    the MQTT broker: HOST:PORT, mqtt://HOST:PORT or mqtts://HOST:PORT
                      (TLS) (env FLEETLITE_BROKER, default localhost:1883)
  --tls-ca FILE, --tls-cert FILE, --tls-key FILE
                      TLS with a client certificate (env FLEETLITE_TLS_CA, _CERT, _KEY);
                      MQTT credentials: env FLEETLITE_MQTT_USERNAME, FLEETLITE_MQTT_PASSWORD
"""

Handler = Callable[["Fleet", argparse.Namespace], int]


# -- parsers ---------------------------------------------------------------------------------------


def add_global_options(parser: argparse.ArgumentParser) -> None:
    """``--db``, ``--broker`` and ``--tls-ca/-cert/-key``; also accepted after the command (see
    :func:`add_parsers`)."""
    parser.add_argument("--db", metavar="URL", default=argparse.SUPPRESS, help=DB_HELP)
    parser.add_argument("--broker", metavar="ADDRESS", default=argparse.SUPPRESS,
                        help=BROKER_HELP)
    add_tls_options(parser, default=argparse.SUPPRESS)


def _common() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("fleet options")
    group.add_argument("--db", metavar="URL", default=argparse.SUPPRESS, help=DB_HELP)
    group.add_argument("--broker", metavar="ADDRESS", default=argparse.SUPPRESS,
                       help=BROKER_HELP)
    add_tls_options(group, default=argparse.SUPPRESS)
    return parent


def _output(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-o", "--output", choices=OUTPUTS, default="table",
                        help="output format (default table; json and yaml for scripts)")


def _leaf(sub: Any, name: str, handler: Handler, *, help: str, description: str,
          examples: str, exit_codes: str = EXIT_CODES,
          output: bool = True) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = sub.add_parser(
        name, help=help, description=description, parents=[_common()],
        epilog=f"examples:\n{examples}\n{exit_codes}\n",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    if output:
        _output(parser)
    parser.set_defaults(fleet_verb=True, fleet_handler=handler, creates_store=False)
    return parser


def _group(sub: Any, name: str, *, help: str, description: str, examples: str,
           dest: str, exit_codes: str = EXIT_CODES) -> Any:
    parser: argparse.ArgumentParser = sub.add_parser(
        name, help=help, description=description,
        epilog=f"examples:\n{examples}\n{FLEET_OPTIONS}\n{exit_codes}\n",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.set_defaults(fleet_verb=True, fleet_handler=None, fleet_usage=parser)
    return parser.add_subparsers(dest=dest, metavar="COMMAND")


def add_parsers(subparsers: Any, release_parser: Optional[argparse.ArgumentParser] = None) -> None:
    """Add the fleet verbs to ``fleetlite``'s subparsers, and ``push``/``list`` to the existing
    ``release`` group when its parser is given."""
    serve = _leaf(
        subparsers, "serve", _serve, output=False,
        help="run a fleet controller in the foreground (ingest, releases, rollouts)",
        description="Run a controller until SIGINT/SIGTERM: it stores what devices report, "
        "serves releases over MQTT and drives every rollout in the store. Several controllers "
        "can share one PostgreSQL store and a clustered broker (--group).",
        examples="""\
  fleetlite serve                                   (sqlite:///fleetlite.db, localhost:1883)
  fleetlite serve --broker mqtts://mqtt.example.net:8883 --tls-ca /etc/fleetlite/ca.pem \\
      --tls-cert /etc/fleetlite/fleet-controller.pem \\
      --tls-key /etc/fleetlite/fleet-controller.key  (TLS with a client certificate)
  fleetlite serve --db postgresql://fleet:pw@db/fleet --broker emqx.lan:1883 \\
      --group ctl --id ctl-a                        (one of several controllers)
  FLEETLITE_DB=sqlite:////var/lib/fleetlite/fleet.db fleetlite serve --log-level DEBUG
  fleetlite serve --health 9108 &  curl -fsS http://127.0.0.1:9108/healthz

exit codes: 0 stopped by SIGINT/SIGTERM; 1 the broker or store cannot be used, or the
controller stopped by itself (its SQLite file was deleted or replaced); 2 a usage error
""")
    serve.set_defaults(creates_store=True)
    serve.add_argument("--group", metavar="NAME",
                       help="share device messages with the other controllers of this group "
                       "(MQTT shared subscriptions)")
    serve.add_argument("--id", dest="controller_id", metavar="ID",
                       help="a stable controller id (MQTT client id and lease owner); give "
                       "every running controller its own (default: a random id)")
    serve.add_argument("--tick", type=_positive, default=0.5, metavar="SECONDS",
                       help="how often rollouts are driven (default 0.5 s)")
    serve.add_argument("--lease-ttl", type=_positive, default=10.0, metavar="SECONDS",
                       help="how long before another controller may take over a rollout of "
                       "this one when it stops renewing (default 10 s)")
    serve.add_argument("--health", metavar="[HOST:]PORT",
                       help="serve GET /healthz on this address: 200 while the controller "
                       "ingests, drives rollouts and serves releases, 503 with the reason "
                       "when not (a bare port listens on 127.0.0.1)")
    serve.add_argument("--log-level", default="INFO",
                       choices=("DEBUG", "INFO", "WARNING", "ERROR"), help="default INFO")

    devices = _group(
        subparsers, "devices", dest="devices_command",
        help="list, show and send commands to devices",
        description="Devices as the controller last heard from them: class, tags, online "
        "status, active models, agent version, facts and the latest telemetry; and commands "
        "to them (ping, info, profile, reload-config, ota-slots, retry, update-root) with "
        "their answers (history).",
        examples="""\
  fleetlite devices list
  fleetlite devices list --class raspberry-pi-4 --tag site=berlin --online -o json
  fleetlite devices show gw-berlin-01 -o yaml
  fleetlite devices ping --all
  fleetlite devices history gw-berlin-01
""")
    listing = _leaf(
        devices, "list", _devices_list, help="list devices",
        description="List registered devices, filtered by class, tags and online status, by "
        f"id. On a large fleet the table shows {TABLE_PAGE} devices and ends (on stderr) with "
        "the command for the next page; pages are keyset pages by device id, so devices "
        "registered while you page neither repeat nor shift the others. -o json/yaml list "
        "every device unless --limit is given (scripts written before paging still get the "
        "whole fleet), and carry the next page's token as \"continue\" (null on the last).",
        examples="""\
  fleetlite devices list
  fleetlite devices list --class industrial-x86-gateway --tag site=plant-a
  fleetlite devices list --offline -o json | jq -r '.devices[].device_id'
  fleetlite devices list --limit 0 | wc -l          (every device, and the header line)
  fleetlite devices list --limit 100 -o json         (a page; then, until "continue" is null:)
  fleetlite devices list --limit 100 --continue TOKEN -o json
""", exit_codes=EXIT_CODES + " (also: a --continue token no page gave)")
    listing.add_argument("--class", dest="device_class", metavar="CLASS",
                         help="only devices of this class")
    listing.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE",
                         type=_tag, help="only devices with this tag (repeat: all must match)")
    state = listing.add_mutually_exclusive_group()
    state.add_argument("--online", dest="online", action="store_const", const=True,
                       help="only online devices")
    state.add_argument("--offline", dest="online", action="store_const", const=False,
                       help="only offline devices")
    listing.add_argument("--decommissioned", action="store_true",
                         help="only decommissioned devices (`devices decommission`)")
    listing.add_argument("--limit", type=_page_size, metavar="N",
                         help=f"at most N devices, then the command for the next page; 0: "
                         f"all (default: {TABLE_PAGE} in the table, all with -o json/yaml)")
    listing.add_argument("--continue", dest="after", type=_continue_token, metavar="TOKEN",
                         help="the next page: the token the previous page ended with (the "
                         "table's last line on stderr, or \"continue\" in -o json/yaml)")
    show = _leaf(devices, "show", _devices_show, help="show one device",
                 description="Everything the fleet knows about one device.",
                 examples="""\
  fleetlite devices show gw-berlin-01
  fleetlite devices show gw-berlin-01 -o json | jq .telemetry.system
""")
    show.add_argument("device_id", metavar="ID")
    from fleetlite.fleet.cli_commands import add_device_commands, add_events

    add_device_commands(devices, _leaf)
    add_events(subparsers, _leaf)
    from fleetlite.fleet.conformance import add_parser as add_conformance

    add_conformance(subparsers, _common())

    if release_parser is not None:
        _add_release_verbs(release_parser)

    rollout = _group(
        subparsers, "rollout", dest="rollout_command",
        help="create, follow and steer rollouts",
        description="Roll a stored release out in waves, gated on install success and on the "
        "new model's measured latency and memory (docs/rollouts.md). A running `fleetlite "
        "serve` drives every rollout; these commands write the store it reads.",
        exit_codes=WATCH_EXIT_CODES,
        examples="""\
  fleetlite rollout create 3f9a1c2d --waves 1,10%,100% --class raspberry-pi-4
  fleetlite rollout watch intent-v2-8c1f0a
  fleetlite rollout pause intent-v2-8c1f0a --note "investigating" --wait 10
  fleetlite rollout list -o json
""")
    create = _leaf(
        rollout, "create", _rollout_create, help="create a rollout of a stored release",
        description="Create a rollout of RELEASE_ID (a release id or a unique prefix of 6+ "
        "characters, see `fleetlite release list`). The selector defaults to every device of "
        "the release's device classes; --class, --tag and --device narrow it (all must "
        "match). The gates' baseline is the highest older version active on the selected "
        "devices unless --previous-version is given.",
        examples="""\
  fleetlite rollout create 3f9a1c2d --waves 1,10%,100%
  fleetlite rollout create 3f9a1c2d --class raspberry-pi-4 --tag site=berlin \\
      --max-p95-regression 0.2 --max-peak-rss-mb 300 --on-failure rollback --timeout 900
  fleetlite rollout create 9c41d7e0 --max-decode-regression 0.1 --max-ttft-regression 0.3
                                    (a language model: decode tokens/s -10%, TTFT +30%)
  fleetlite rollout create 3f9a1c2d --device gw-1 --device gw-2 --waves all --id hotfix-7
  fleetlite rollout create 3f9a1c2d --paused        (review `rollout status`, then resume)
  fleetlite rollout create 7d20b9e4 --variants auto --pin jetson-orin-nano=default
                  (probe every variant on 2 devices per class, give each class the variant
                   that fits its budgets with the best fidelity; the Jetsons get the default)
  fleetlite rollout create 9c41d7e0 --shadow --shadow-min-samples 500
                  (every targeted online device first runs v2 beside its active model on
                   live requests; a class whose greedy tokens agree less than 98% is stopped
                   before any of its devices switches, one that agrees installs it)
  ID=$(fleetlite rollout create 3f9a1c2d -o json | jq -r .rollout_id) && \\
      fleetlite rollout wait "$ID" --timeout 3600
""")
    create.add_argument("release_id", metavar="RELEASE_ID")
    create.add_argument("--id", dest="rollout_id", metavar="ROLLOUT_ID",
                        help="rollout id (default MODEL-vVERSION-RANDOM)")
    create.add_argument("--waves", default=None, metavar="SIZES",
                        help="wave sizes: 10%% (cumulative share), 5 (this many more), all; "
                        "the last must be 100%% or all (default 1,10%%,100%%)")
    create.add_argument("--class", dest="classes", action="append", default=[],
                        metavar="CLASS", help="select devices of this class (repeat)")
    create.add_argument("--tag", dest="tags", action="append", default=[], type=_tag,
                        metavar="KEY=VALUE", help="select devices with this tag (repeat)")
    create.add_argument("--device", dest="device_ids", action="append", default=[],
                        metavar="ID", help="select this device (repeat)")
    create.add_argument("--max-p95-regression", type=_limit(float), default=0.2,
                        metavar="FRACTION|off",
                        help="trip when the median p95 latency of a class grows by more than "
                        "this fraction (default 0.2 = +20%%)")
    create.add_argument("--max-peak-rss-mb", type=_limit(float), default=None,
                        metavar="MB|off", help="trip when a device peaks above this (default off)")
    create.add_argument("--max-rss-regression", type=_limit(float), default=None,
                        metavar="FRACTION|off",
                        help="trip when the median peak RSS grows by more (default off)")
    create.add_argument("--max-ttft-regression", type=_limit(float), default=0.2,
                        metavar="FRACTION|off",
                        help="language models: trip when the median time to first token of a "
                        "class grows by more than this fraction (default 0.2 = +20%%)")
    create.add_argument("--max-decode-regression", type=_limit(float), default=0.2,
                        metavar="FRACTION|off",
                        help="language models: trip when the median decode tokens/s of a class "
                        "falls by more than this fraction (default 0.2 = -20%%)")
    create.add_argument("--max-smoke-failures", type=_limit(int), default=0,
                        metavar="N|off", help="smoke-test failures a class may have (default 0)")
    create.add_argument("--min-profiles", type=int, default=1, metavar="N",
                        help="profiles of the new version needed per class and wave (default 1)")
    create.add_argument("--success-threshold", type=_fraction, default=1.0, metavar="FRACTION",
                        help="share of a wave that must succeed before the next (default 1.0)")
    create.add_argument("--failure-threshold", type=_fraction, default=0.0, metavar="FRACTION",
                        help="share of failures above which --on-failure happens (default 0.0)")
    create.add_argument("--on-failure", choices=ON_FAILURE_ACTIONS, default="pause",
                        help="what a failed wave does (default pause)")
    create.add_argument("--timeout", type=_positive, default=600.0, metavar="SECONDS",
                        help="per device: time from the install to its final status and "
                        "profile (default 600)")
    create.add_argument("--max-in-flight", type=_devices, default=0, metavar="N",
                        help="at most N devices installing at once; the rest of a wave wait "
                        "their turn and a failing release stops early (default 0: no limit; "
                        "for large waves of large models: the broker holds about 1 MiB per "
                        "downloading device)")
    create.add_argument("--previous-version", type=int, default=None, metavar="N",
                        help="the baseline version for the regression gates")
    create.add_argument("--variants", choices=VARIANT_MODES, default="off",
                        help="auto: for a release with several variants (fp32, int8, ...), "
                        "first probe every variant on a few devices of each class, then give "
                        "each class the variant that passed there and fits its latency and "
                        "memory budgets (device_profiles/CLASS.yaml) with the best fidelity; "
                        "`rollout status` shows the choice and its figures (default off: every "
                        "device installs the release's default variant)")
    create.add_argument("--pin", dest="pins", action="append", default=[], type=_pin,
                        metavar="CLASS=VARIANT",
                        help="give CLASS this variant whatever the probe measures (repeat; "
                        "implies --variants auto)")
    create.add_argument("--probe-devices", type=_probe_devices, default=2, metavar="N",
                        help="with --variants auto: devices of each class that probe the "
                        "variants before the first wave (default 2)")
    shadow = create.add_argument_group(
        "shadow evaluation", textwrap.fill(
        "With --shadow, before the first wave every targeted online device runs the release "
        "beside its active model on live requests and switches nothing; only agreement and "
        "latency figures leave the device. Per device class, from the devices' newest reports: "
        "fail (agreement below --shadow-min-agreement over at least --shadow-min-samples "
        "sampled requests, or the active model's p95 while shadowed above its p95 alone x "
        "--shadow-p95-budget) stops the class (shadow_stop; none of its devices switches); "
        "pass lets its devices install in their waves (promoted from the kept files, no "
        "download); no verdict within --shadow-timeout stops it too. Every class stopped: "
        "the rollout aborts. `rollout status` shows each class's verdict and figures.",
        width=86))
    shadow.add_argument("--shadow", action="store_true",
                        help="evaluate the release in shadow before any device switches")
    shadow.add_argument("--shadow-min-agreement", type=_fraction, default=0.98,
                        metavar="FRACTION",
                        help="pooled agreement a class needs (default 0.98: top-1 for a "
                        "classifier, within the error bound for a regressor, greedy tokens "
                        "for a language model)")
    shadow.add_argument("--shadow-min-samples", type=_whole_number_min1, default=200, metavar="N",
                        help="sampled requests per class before a verdict (default 200)")
    shadow.add_argument("--shadow-kind", choices=("classifier", "regressor", "lm"),
                        default=None,
                        help="how outputs are compared (default: lm for a language-model "
                        "release, else classifier)")
    shadow.add_argument("--shadow-error-bound", type=float, default=None, metavar="X",
                        help="with --shadow-kind regressor: the largest absolute output "
                        "difference that still agrees")
    shadow.add_argument("--shadow-sample-rate", type=_fraction, default=0.2,
                        metavar="FRACTION",
                        help="share of live requests the candidate also runs (default 0.2)")
    shadow.add_argument("--shadow-cpu-budget", type=_fraction, default=0.25,
                        metavar="FRACTION",
                        help="share of one core the candidate may use (default 0.25)")
    shadow.add_argument("--shadow-p95-budget", type=float, default=1.25, metavar="RATIO",
                        help="the active model's p95 while shadowed may be at most its p95 "
                        "alone times this (default 1.25; devices back off above it)")
    shadow.add_argument("--shadow-timeout", type=_positive, default=3600.0,
                        metavar="SECONDS",
                        help="time for a class's verdict from its first shadow install "
                        "(default 3600)")
    create.add_argument("--paused", action="store_true",
                        help="create it paused; start it with `fleetlite rollout resume`")
    create.add_argument("--allow-empty", action="store_true",
                        help="create it even if no registered device matches yet")

    status = _leaf(rollout, "status", _rollout_status, help="show a rollout",
                   description="State, waves with per-status device counts, and the latest "
                   "decisions with their reasons (all of them with -o json/yaml).",
                   examples="""\
  fleetlite rollout status intent-v2-8c1f0a
  fleetlite rollout status intent-v2-8c1f0a --decisions 50
  fleetlite rollout status intent-v2-8c1f0a -o json | jq '.waves[] | {wave, succeeded, total}'
""")
    status.add_argument("rollout_id", metavar="ROLLOUT_ID")
    status.add_argument("--decisions", type=int, default=10, metavar="N",
                        help="how many of the latest decisions to show (default 10)")

    for name, handler, what in (
            ("watch", _rollout_watch, "follow a rollout live until it finishes"),
            ("wait", _rollout_wait, "wait quietly until a rollout finishes")):
        follow = _leaf(
            rollout, name, handler, help=what, output=(name == "wait"),
            exit_codes=WATCH_EXIT_CODES,
            description=(
                "Draw a progress bar per wave, redrawn in place on a terminal (plain lines, one "
                "per change, when the output is not a terminal), until the rollout finishes."
                if name == "watch" else
                "Wait until the rollout finishes, then print its status; the exit code says "
                "how it ended (for CI)."),
            examples=f"""\
  fleetlite rollout {name} intent-v2-8c1f0a
  fleetlite rollout {name} intent-v2-8c1f0a --timeout 3600 --stop-on-pause
""")
        follow.add_argument("rollout_id", metavar="ROLLOUT_ID")
        follow.add_argument("--interval", type=_positive, default=1.0, metavar="SECONDS",
                            help="how often to read the store (default 1)")
        follow.add_argument("--timeout", type=_positive, default=None, metavar="SECONDS",
                            help="give up after this long (exit code 1; the rollout goes on)")
        follow.add_argument("--stop-on-pause", action="store_true",
                            help="also stop when the rollout pauses (exit code 3)")

    for action in OPERATOR_ACTIONS:
        verb = _leaf(
            rollout, action, _rollout_request, help=_REQUEST_HELP[action],
            description=f"{_REQUEST_HELP[action].capitalize()}. The request is queued in the "
            "store; the controller handles it on its next tick and logs its answer (or a "
            "`refuse` with the reason) in the rollout's decisions.",
            examples=f"""\
  fleetlite rollout {action} intent-v2-8c1f0a
  fleetlite rollout {action} intent-v2-8c1f0a --note "ticket OPS-12" --wait 10
""" + ("""  fleetlite rollout rollback detector-v1-2b7e --remove-model --wait 10
                                 (a model's first version: remove it from the devices)
""" if action == "rollback" else ""))
        verb.add_argument("rollout_id", metavar="ROLLOUT_ID")
        verb.add_argument("--note", default="", help="a note logged with the decision")
        verb.add_argument("--wait", type=_positive, default=None, metavar="SECONDS",
                          help="wait this long for the controller's answer (exit 1 if it "
                          "refuses or does not answer in time)")
        verb.set_defaults(action=action, remove_model=False)
        if action == "rollback":
            verb.add_argument(
                "--remove-model", action="store_true",
                help="for a rollout of a model's first version (nothing to go back to): "
                "remove the model from every device that installed it; without it, such a "
                "rollback is refused")

    rollouts = _leaf(rollout, "list", _rollout_list, help="list rollouts",
                     description="Every rollout in the store, oldest first.",
                     examples="""\
  fleetlite rollout list
  fleetlite rollout list --release 3f9a1c2d -o yaml
""")
    rollouts.add_argument("--release", metavar="RELEASE_ID", help="only rollouts of a release")

    profiles = _group(
        subparsers, "profiles", dest="profiles_command",
        help="per-class performance profiles of model versions",
        description="Latency and memory of each model version per device class, aggregated "
        "over devices (each device's newest profile counts once).",
        examples="""\
  fleetlite profiles show --model intent
  fleetlite profiles compare intent 1 2
""")
    pshow = _leaf(profiles, "show", _profiles_show, help="aggregates per class and version",
                  description="Medians over devices of p50/p95/p99, the worst p95 and the "
                  "worst peak RSS, per (device class, model, version); language models in a "
                  "table of their own: time to first token, prefill and decode tokens/s.",
                  examples="""\
  fleetlite profiles show
  fleetlite profiles show --model intent --version 2 --class raspberry-pi-4 -o json
""")
    pshow.add_argument("--model", help="only this model")
    pshow.add_argument("--version", type=int, help="only this version")
    pshow.add_argument("--class", dest="device_class", metavar="CLASS", help="only this class")
    pcompare = _leaf(profiles, "compare", _profiles_compare,
                     help="compare two versions of a model per class",
                     description="Version B against version A per device class, with B/A "
                     "ratios (1.25 = B is 25 % slower or bigger; for a language model's "
                     "tokens/s, 0.8 = B is 20 % slower).",
                     examples="""\
  fleetlite profiles compare intent 1 2
  fleetlite profiles compare intent 1 2 -o yaml
""")
    pcompare.add_argument("model", metavar="MODEL")
    pcompare.add_argument("a", metavar="A", type=int, help="the baseline version")
    pcompare.add_argument("b", metavar="B", type=int, help="the version to judge")

    report = _leaf(subparsers, "report", _report,
                   help="write the fleet's HTML report",
                   description="One self-contained HTML file (no external resources): devices, "
                   "latency and memory per class and version, rollouts with their decisions. "
                   "On a large fleet the devices table lists --max-devices rows, those needing "
                   "attention first (offline, failed or rejected installs, rolled back, stale), "
                   "then the rest by id, and says how many it left out and how to list them; "
                   "the counts, aggregates and plots cover every device.",
                   examples="""\
  fleetlite report --html fleet.html
  fleetlite --db postgresql://fleet:pw@db/fleet report --html /srv/www/fleet.html
  fleetlite report --html fleet.html --max-devices 0     (every device in the table)
""")
    report.add_argument("--html", required=True, metavar="FILE", help="the file to write")
    report.add_argument("--title", default="FleetLite fleet report")
    report.add_argument("--max-devices", type=_page_size, default=1000, metavar="N",
                        help="rows of the devices table at most (default 1000; 0: every "
                        "device; each 1,000 rows add about 0.3 MB to the page)")


_REQUEST_HELP = {
    "pause": "pause a rollout: no installs are sent and no wave starts",
    "resume": "resume a paused rollout (after a threshold pause: accept that wave)",
    "abort": "abort a rollout: no more installs; installed devices keep the release",
    "rollback": "roll back every device that installed the rollout's release",
}


def _add_release_verbs(release_parser: argparse.ArgumentParser) -> None:
    sub = next(a for a in release_parser._actions
               if isinstance(a, argparse._SubParsersAction))
    push = _leaf(
        sub, "push", _release_push,
        help="store a signed release so that rollouts can use it",
        description="Store a signed bundle (directory or .flb) in the fleet store; the "
        "controller serves it to the devices of a rollout. Unsigned, expired or tampered "
        "bundles are refused; with --root, it must also verify as on a device.",
        examples="""\
  fleetlite release push intent-v2
  fleetlite release push intent-v2.flb --root root.json -o json
""")
    push.set_defaults(creates_store=True)
    push.add_argument("bundle", metavar="BUNDLE", help="bundle directory or .flb file")
    push.add_argument("--root", metavar="ROOT.json",
                      help="also verify it against the root of trust devices use")
    listing = _leaf(sub, "list", _release_list, help="list stored releases",
                    description="Releases in the fleet store, by name and version.",
                    examples="""\
  fleetlite release list
  fleetlite release list --name intent -o json
""")
    listing.add_argument("--name", help="only releases of this model name")
    release_parser.epilog = (release_parser.epilog or "").replace(
        "\nA bundle is", "  fleetlite release push intent-v2        (store it in the fleet)\n"
        "  fleetlite release list\n\nA bundle is", 1)


# -- argument types --------------------------------------------------------------------------------


def _tag(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r}: write a tag as KEY=VALUE, e.g. site=berlin")
    return key, value


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give a number > 0")
    return value


def _devices(text: str) -> int:
    if not text.isascii() or not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of devices (0: no limit)")
    return int(text)


def _probe_devices(text: str) -> int:
    if not text.isascii() or not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of devices >= 1 (how many "
                                         "devices of each class probe the variants)")
    return int(text)


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a fraction (0.0..1.0)") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r}: a fraction is within 0.0..1.0 "
                                         "(0.05 = 5 %)")
    return value


def _page_size(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give a number of devices >= 0 "
                                         "(0: all)") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give a number of devices >= 0 (0: all)")
    return value


_TOKEN_PREFIX = b"d1:"


def continue_token(last_device_id: str) -> str:
    """The ``--continue`` token of the page after the one that ended with this device: opaque
    to the user (base64url, no padding), the last id shown inside."""
    raw = _TOKEN_PREFIX + last_device_id.encode("utf-8")
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def _continue_token(text: str) -> str:
    """The device id a ``--continue`` token carries; a usage error if no page gave it."""
    import binascii
    import re

    wrong = argparse.ArgumentTypeError(
        f"{text!r} is not a token a page of `fleetlite devices list` gave: copy the one the "
        "last page ended with (the table's last line on stderr, or \"continue\" in "
        "-o json), or leave --continue out to start from the first device")
    if not re.fullmatch(r"[A-Za-z0-9_-]+", text):
        raise wrong
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        device_id = raw[len(_TOKEN_PREFIX):].decode("utf-8") \
            if raw.startswith(_TOKEN_PREFIX) else ""
    except (binascii.Error, ValueError):
        raise wrong from None
    from fleetlite.sdk.topics import TopicError, validate_device_id

    try:  # a device id a page can end with (a cut or edited token decodes to anything)
        return validate_device_id(device_id)
    except TopicError:
        raise wrong from None


def _limit(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        if text.lower() in ("off", "none"):
            return None
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: give a number >= 0, or off") from None
        if value < 0:
            raise argparse.ArgumentTypeError(f"{text!r}: give a number >= 0, or off")
        return value
    parse.__name__ = kind.__name__
    return parse


# -- running ---------------------------------------------------------------------------------------


def is_fleet_verb(args: argparse.Namespace) -> bool:
    """True if ``args`` were parsed for one of this module's verbs (or groups)."""
    return bool(getattr(args, "fleet_verb", False))


def run(args: argparse.Namespace) -> int:
    """Run the verb ``args`` were parsed for; returns the exit code."""
    from fleetlite.fleet.broker_address import resolve_broker
    from fleetlite.fleet.client import Fleet

    handler: Optional[Handler] = args.fleet_handler
    if handler is None and getattr(args, "standalone", None) is None:
        args.fleet_usage.print_help(sys.stderr)
        return EXIT_USAGE
    from fleetlite.fleet.cli_config import pick

    for dest, value in pick(args).items():  # the current context fills what is not given
        setattr(args, dest, value)
    broker = resolve_broker(getattr(args, "broker", None), ca=getattr(args, "tls_ca", None),
                            cert=getattr(args, "tls_cert", None),
                            key=getattr(args, "tls_key", None))
    standalone = getattr(args, "standalone", None)
    if standalone is not None:  # a verb that talks to the broker only, not to a store
        code: int = standalone(broker, args)
        return code
    assert handler is not None
    fleet = Fleet(getattr(args, "db", None), broker, create=args.creates_store)
    created = fleet.created
    # `serve` says so before it runs; `release push` once it has stored something
    if created is not None and handler is _serve:
        _note_created(created)
    code = 1
    try:
        code = handler(fleet, args)
        return code
    finally:
        # a command that failed before storing anything leaves no empty store behind
        if created is not None and code != 0:
            fleet.discard_created()
        else:
            fleet.close()
            if created is not None and handler is not _serve:
                _note_created(created)


def _note_created(path: Path) -> None:
    _note(f"note: there was no fleet store at {path}: created a new one (the controller, "
          "`fleetlite serve`, must use this same store: --db / FLEETLITE_DB)")


def _emit(args: argparse.Namespace, doc: Any, table: Callable[[], str]) -> None:
    output = getattr(args, "output", "table")
    if output == "json":
        print(json.dumps(doc, indent=2))
    elif output == "yaml":
        import yaml

        print(str(yaml.safe_dump(doc, sort_keys=False, default_flow_style=False)).rstrip("\n"))
    else:
        from fleetlite.fleet.terminal_text import for_terminal

        text = table()
        if text:
            print(for_terminal(text))


def _note(text: str) -> None:
    print(text, file=sys.stderr)


def _ago(ts: Optional[float], now: Optional[float] = None) -> str:
    if not ts:
        return "-"
    seconds = max(0.0, (time.time() if now is None else now) - ts)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit} ago"
    return f"{int(seconds)}s ago"


def _clock(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[int] = ()) -> str:
    from fleetlite.fleet.profiles_view import format_table

    return format_table(headers, rows, right=right)


# -- serve -----------------------------------------------------------------------------------------


def _serve(fleet: Fleet, args: argparse.Namespace) -> int:
    from fleetlite.fleet.controller import check_broker, run_until_stopped
    from fleetlite.fleet.health_endpoint import HealthEndpoint, parse_listen_address

    health_address = parse_listen_address(args.health) if args.health else None
    # one trial connection first: a wrong address, certificate or credential is an error now,
    # not a controller that retries in the background forever
    check_broker(fleet.broker)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        controller = fleet.serve(group=args.group, tick_s=args.tick,
                                 controller_id=args.controller_id, lease_ttl_s=args.lease_ttl)
        try:
            health = (HealthEndpoint(*health_address, controller.health)
                      if health_address else None)
        except BaseException:
            controller.stop()
            raise
        group = f", group {args.group}" if args.group else ""
        _note(f"fleetlite serve: controller {controller.id} on store {fleet.store.url}, broker "
              f"{fleet.broker.describe()}{group}"
              f"{f', health {health.url}' if health else ''}; Ctrl-C or SIGTERM stops it")
        code = run_until_stopped(controller, stop, health)
        counters = ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in controller.counters.items())
        _note(f"fleetlite serve: stopped ({counters})")
        if controller.fatal:
            _note(f"error: {controller.fatal}")
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return code


# -- devices ---------------------------------------------------------------------------------------


def _models_text(device: DeviceRecord) -> str:
    return ", ".join(f"{m.name} v{m.version}" if m.version is not None else m.name
                     for m in device.models) or "-"


def _seen_text(device: DeviceRecord, now: Optional[float] = None) -> str:
    """When the controller last heard the device, with a marker if its clock is skewed."""
    from fleetlite.fleet.device_clock import offset_marker

    marker = offset_marker(device.clock_offset)
    return f"{_ago(device.last_seen, now)}, {marker}" if marker else _ago(device.last_seen, now)


def _devices_list(fleet: Fleet, args: argparse.Namespace) -> int:
    from fleetlite.fleet.client import device_dict

    tags = dict(args.tag) if args.tag else None
    limit = args.limit
    if limit is None:
        limit = TABLE_PAGE if args.output == "table" else 0
    # one device more than the page: whether another page follows, known now
    found = fleet.devices(device_class=args.device_class, tags=tags, online=args.online,
                          decommissioned=args.decommissioned,
                          limit=limit + 1 if limit else None, after=args.after)
    token = None
    if limit and len(found) > limit:
        found = found[:limit]
        token = continue_token(found[-1].device_id)
    if (not found and args.after is None
            and not fleet.devices(decommissioned=None, limit=1)):
        _note(f"no devices in the store {fleet.store.url} yet: is `fleetlite serve` running "
              "with this --db, and are the agents connected to its broker?")
    now = time.time()
    rows = [[d.device_id, d.device_class or "-", "online" if d.online else "offline",
             _models_text(d), d.agent_version or "-", _seen_text(d, now),
             ",".join(f"{k}={v}" for k, v in sorted(d.tags.items())) or "-"] for d in found]
    _emit(args, {"devices": [device_dict(d) for d in found], "continue": token},
          lambda: _table(["DEVICE", "CLASS", "STATUS", "MODELS", "AGENT", "LAST SEEN", "TAGS"],
                         rows))
    if token is not None and args.output == "table":
        sys.stdout.flush()  # the rows first, then the hint, on a terminal that shows both
        _note(f"{len(found)} devices shown, more follow; the next page: "
              f"{_next_page_command(args, token)}  (--limit 0: every device)")
    return EXIT_OK


def _next_page_command(args: argparse.Namespace, token: str) -> str:
    """The ``devices list`` command line of the next page: the same filters and page size."""
    import shlex

    words = ["fleetlite", "devices", "list"]
    if args.device_class:
        words += ["--class", args.device_class]
    for key, value in args.tag:
        words += ["--tag", f"{key}={value}"]
    if args.online is not None:
        words.append("--online" if args.online else "--offline")
    if args.decommissioned:
        words.append("--decommissioned")
    if args.limit is not None:
        words += ["--limit", str(args.limit)]
    words += ["--continue", token]
    db = _db_words(args)
    # a password is not echoed: the operator adds the --db they used
    suffix = " (with your --db)" if getattr(args, "db", None) and not db else ""
    from fleetlite.fleet.terminal_text import one_line

    return one_line(" ".join(shlex.quote(w) for w in [*words, *db])) + suffix


def _db_words(args: argparse.Namespace) -> list[str]:
    """``--db URL`` for a command line this one prints, if this one was given a store (on
    the command line or by the context; FLEETLITE_DB stays set) without a password in it."""
    from urllib.parse import urlsplit

    db = getattr(args, "db", None)
    if not db:
        return []
    try:
        secret = urlsplit(db).password
    except ValueError:
        secret = None
    return [] if secret else ["--db", db]


def _fact(value: object) -> str:
    """A device's fact or telemetry value in a table: what it did not measure shows as "-"."""
    from fleetlite.fleet.terminal_text import one_line

    if value is None or value == "":
        return "-"
    if isinstance(value, float):
        return f"{value:g}"
    return one_line(str(value))


def _devices_show(fleet: Fleet, args: argparse.Namespace) -> int:
    from fleetlite.fleet.client import device_dict
    from fleetlite.fleet.device_clock import describe_offset, is_skewed

    device = fleet.device(args.device_id)
    refused = fleet.refused_reports(device.device_id)

    def table() -> str:
        status = "online" if device.online else "offline"
        if device.status_reason:
            status += f" ({_fact(device.status_reason)})"
        if device.decommissioned is not None:
            status = f"DECOMMISSIONED since {_clock(device.decommissioned)}; {status}"
        lines = [
            f"device    {device.device_id}",
            f"class     {device.device_class or '-'}",
            f"status    {status}, " + (f"last seen {_ago(device.last_seen)} (the controller's "
                                          "clock)" if device.last_seen
                                          else "not heard from since the controller started"),
            f"clock     {describe_offset(device.clock_offset)}",
            f"agent     {device.agent_version or '-'} (session {device.session})",
            "tags      " + (", ".join(f"{k}={v}" for k, v in sorted(device.tags.items()))
                            or "-"),
            "models    " + (", ".join(f"{m.name} v{m.version} (sha256 {m.sha256[:12]})"
                                      for m in device.models) or "-"),
        ]
        if device.facts:
            lines.append("facts")
        for key, value in sorted(device.facts.items()):
            lines.append(f"  {key:<22} {_fact(value)}")
        if device.telemetry is not None:
            sent = (f"sent at {_clock(device.telemetry.ts)} by the device's clock"
                    if is_skewed(device.clock_offset) else _ago(device.telemetry.ts))
            lines.append(f"telemetry seq {device.telemetry.seq}, {sent}")
            for key, value in sorted(device.telemetry.system.items()):
                lines.append(f"  {key:<22} {_fact(value)}")
        if refused:
            lines.append("refused reports (oversize, over the rate, malformed, or speaking for "
                         "another device or a release it was never sent)")
        for r in refused:
            lines.append(f"  {r.kind:<12} {r.reason:<16} {r.count:>7}  last {_ago(r.last_at)}: "
                         f"{r.last_message}")
        return "\n".join(lines)

    _emit(args, device_dict(device, refused), table)
    return EXIT_OK


# -- releases --------------------------------------------------------------------------------------


def _release_push(fleet: Fleet, args: argparse.Namespace) -> int:
    from fleetlite.sdk.bundle import load_bundle

    bundle = load_bundle(args.bundle)
    known = any(r.release_id == bundle.release_id for r in fleet.releases(bundle.manifest.name))
    release_id = fleet.push_release(bundle, root=args.root)
    m = bundle.manifest
    doc = {"release_id": release_id, "name": m.name, "version": m.version, "new": not known,
           "device_classes": list(m.device_classes), "store": fleet.store.url}
    what = "already stored (signatures updated)" if known else "pushed"
    _emit(args, doc, lambda: (
        f"{what}: {m.name} v{m.version} for {', '.join(m.device_classes)}\n"
        f"  release id {release_id}\n"
        f"  roll it out with: fleetlite rollout create {release_id[:12]} --waves 1,10%,100%"))
    return EXIT_OK


def _release_list(fleet: Fleet, args: argparse.Namespace) -> int:
    from fleetlite.fleet.client import release_dict

    found = fleet.releases(args.name)
    if not found:
        _note(f"no releases in the store {fleet.store.url}: store one with `fleetlite release "
              "push BUNDLE`")
    docs = [release_dict(r) for r in found]
    _emit(args, {"releases": docs}, lambda: _table(
        ["RELEASE ID", "NAME", "VERSION", "DEVICE CLASSES", "FILES", "SIZE", "PUSHED"],
        [[d["release_id"][:16], d["name"], str(d["version"]), ",".join(d["device_classes"]),
          str(len(d["files"])), _size(d["size"]), _clock(d["created"])] for d in docs],
        right=(2, 4, 5)))
    return EXIT_OK


def _size(n: int) -> str:
    if n >= 2**20:
        return f"{n / 2**20:.1f} MiB"
    if n >= 2**10:
        return f"{n / 2**10:.1f} KiB"
    return f"{n} B"


# -- rollouts --------------------------------------------------------------------------------------


def _rollout_create(fleet: Fleet, args: argparse.Namespace) -> int:
    from fleetlite.fleet.client import DEFAULT_WAVES
    from fleetlite.fleet.gates import GateSpec
    from fleetlite.fleet.rollout import Selector

    gates = GateSpec(max_p95_regression=args.max_p95_regression,
                     max_peak_rss_mb=args.max_peak_rss_mb,
                     max_rss_regression=args.max_rss_regression,
                     max_smoke_failures=args.max_smoke_failures,
                     min_profiles=args.min_profiles,
                     max_ttft_regression=args.max_ttft_regression,
                     max_decode_regression=args.max_decode_regression)
    selector = Selector(tuple(args.classes), dict(args.tags), tuple(args.device_ids))
    rollout = fleet.create_rollout(
        args.release_id, selector=selector, waves=args.waves or DEFAULT_WAVES, gates=gates,
        success_threshold=args.success_threshold, failure_threshold=args.failure_threshold,
        on_failure=args.on_failure, wave_timeout_s=args.timeout, rollout_id=args.rollout_id,
        previous_version=args.previous_version, paused=args.paused,
        allow_empty=args.allow_empty, max_in_flight=args.max_in_flight,
        variants=args.variants, pins=dict(args.pins),
        probe_devices_per_class=args.probe_devices, shadow=_shadow_spec(fleet, args))
    paused = " (paused: start it with `fleetlite rollout resume " + rollout.rollout_id + "`)"
    _emit(args, rollout.to_dict(), lambda: (
        f"created rollout {rollout.rollout_id}: {rollout.model} v{rollout.version} "
        f"(baseline {_version(rollout.spec.previous_version)}) to {rollout.spec.selector}, "
        f"waves {','.join(str(w) for w in rollout.spec.waves)}"
        f"{paused if args.paused else ''}\n"
        f"  follow it with: fleetlite rollout watch {rollout.rollout_id}"))
    return EXIT_OK


def _shadow_spec(fleet: Fleet, args: argparse.Namespace) -> Optional[ShadowSpec]:
    """The --shadow options as a ShadowSpec (None without --shadow)."""
    if not args.shadow:
        given = [f for f in ("shadow_kind", "shadow_error_bound") if getattr(args, f) is not None]
        if given:
            raise RolloutError(f"--{given[0].replace('_', '-')} goes with --shadow")
        return None
    kind = args.shadow_kind
    if kind is None:
        generation = fleet.release(args.release_id).manifest.get("generation")
        kind = "lm" if generation else "classifier"
    return ShadowSpec(min_agreement=args.shadow_min_agreement,
                      min_samples=args.shadow_min_samples,
                      p95_budget_ratio=args.shadow_p95_budget,
                      sample_rate=args.shadow_sample_rate, cpu_budget=args.shadow_cpu_budget,
                      kind=kind, error_bound=args.shadow_error_bound,
                      timeout_s=args.shadow_timeout)


def _whole_number_min1(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a whole number >= 1")
    return value


def _version(version: Optional[int]) -> str:
    return "none" if version is None else f"v{version}"


def _pin(text: str) -> tuple[str, str]:
    cls, sep, variant = text.partition("=")
    if not sep or not cls.strip() or not variant.strip():
        raise argparse.ArgumentTypeError(f"a pin is written CLASS=VARIANT (e.g. "
                                         f"raspberry-pi-4=int8), got {text!r}")
    return cls.strip(), variant.strip()


def _rollout_status(fleet: Fleet, args: argparse.Namespace) -> int:
    rollout = fleet.rollout(args.rollout_id)
    _emit(args, rollout.to_dict(), lambda: _status_text(rollout, args.decisions))
    return EXIT_OK


def _status_text(rollout: Rollout, decisions: int) -> str:
    spec = rollout.spec
    state = rollout.state + (f": {rollout.reason}" if rollout.reason else "")
    if not rollout.started and not rollout.finished and rollout.state == "running":
        state = "waiting for a controller to plan it (is `fleetlite serve` running?)"
    lines = [
        f"rollout   {rollout.rollout_id}: {spec.model} v{spec.version} (baseline "
        f"{_version(spec.previous_version)}), release {rollout.release_id[:16]}",
        f"state     {state}",
        f"selector  {spec.selector}",
        f"waves     {','.join(str(w) for w in spec.waves)}; success >= "
        f"{spec.success_threshold:.0%}, failures > {spec.failure_threshold:.0%} -> "
        f"{spec.on_failure}; timeout {spec.wave_timeout_s:g} s per device"
        + (f"; at most {spec.max_in_flight} installing at once" if spec.max_in_flight else ""),
        f"gates     {'; '.join(_gates(rollout)) or 'none'}",
    ]
    if rollout.pending_requests:
        lines.append(f"requests  {', '.join(rollout.pending_requests)} (waiting for the "
                     "controller)")
    if spec.probing:
        lines.append(f"variants  auto: {', '.join(spec.variant_names)}; probe "
                     f"{spec.probe_devices_per_class} device(s) per class"
                     + (f"; pinned {', '.join(f'{c}={v}' for c, v in sorted(spec.pins.items()))}"
                        if spec.pins else ""))
    for cls, why in rollout.paused_classes.items():
        lines.append(f"excluded  class {cls}: {why}")
    if spec.probing:
        lines.append("")
        lines.extend(_variant_table(rollout))
    if spec.shadow is not None:
        lines.append("")
        lines.extend(_shadow_table(rollout))
    lines.append("")
    lines.append(_table(
        ["WAVE", "PLANNED", "DEVICES", "UPDATED", "UNCHANGED", "FAILED", "IN FLIGHT", "PENDING",
         "EXCLUDED", "STATE"],
        [[str(w.number), w.planned, str(w.total), str(w.installed), str(w.unchanged),
          str(w.failed), str(w.in_flight), str(w.pending), str(w.excluded), w.state]
         for w in rollout.waves],
        right=(0, 2, 3, 4, 5, 6, 7, 8)))
    if decisions > 0 and rollout.decisions:
        shown = rollout.decisions[-decisions:]
        lines.append("")
        lines.append(f"latest {len(shown)} of {len(rollout.decisions)} decisions "
                     "(all: -o json):")
        for d in shown:
            lines.append(f"  {_clock(d.ts)}  {d.kind:<13} {d.reason}")
    return "\n".join(lines)


def _variant_table(rollout: Rollout) -> list[str]:
    """Per class and candidate variant, the figures the choice was made from."""
    from fleetlite.fleet.client import variant_rows

    probing = sum(p.status == "sent" for p in rollout.probes)
    rows = variant_rows(rollout)
    if not rows:
        return [f"variants  probing: {probing} device(s) still measuring" if probing
                else "variants  not chosen yet (the controller probes before the first wave)"]
    return [_table(["CLASS", "VARIANT", "CHOSEN", "PROBED", "PASSED", "P95 MS", "BUDGET MS",
                    "PEAK RSS MB", "BUDGET MB", "FIDELITY", "WHY NOT"],
                   [[r["class"], r["variant"], r["chosen"], r["probed"], r["passed"],
                     r["p95_ms"], r["budget_p95_ms"], r["peak_rss_mb"], r["budget_rss_mb"],
                     r["fidelity"], r["why"]] for r in rows],
                   right=(3, 4, 5, 6, 7, 8, 9))]


def _shadow_table(rollout: Rollout) -> list[str]:
    """Per class of a shadow rollout: verdict, agreement, samples, the active model's p95 alone
    vs shadowed vs its budget, and the candidate's p95."""
    shadow = rollout.spec.shadow
    assert shadow is not None
    head = (f"shadow    min agreement {shadow.min_agreement:.1%} over >= {shadow.min_samples} "
            f"samples; active p95 shadowed <= alone x {shadow.p95_budget_ratio}; sample rate "
            f"{shadow.sample_rate:g}, cpu budget {shadow.cpu_budget:g}, timeout "
            f"{shadow.timeout_s:g} s")
    rows = rollout.shadow_rows()
    if not rows:
        return [head, "          no shadow install sent yet"]

    def ms(value: Optional[float]) -> str:
        return "-" if value is None else f"{value:.3f}"

    return [head, _table(
        ["CLASS", "VERDICT", "AGREEMENT", "SAMPLES", "ACTIVE P95 ALONE", "SHADOWED",
         "BUDGET", "WITHIN", "CANDIDATE P95", "DEVICES"],
        [[r["class"], r["verdict"] + (f" ({','.join(r['codes'])})" if r["codes"] else ""),
          "-" if r["agreement"] is None else f"{r['agreement']:.1%}", str(r["samples"]),
          ms(r["active_alone_p95_ms"]), ms(r["active_shadowed_p95_ms"]),
          ms(r["active_p95_budget_ms"]),
          {True: "yes", False: "no"}.get(r["within_budget"], "not judged"),
          ms(r["candidate_p95_ms"]),
          ", ".join(f"{d} {s}" for d, s in sorted(r["devices"].items()))] for r in rows],
        right=(2, 3, 4, 5, 6, 8))]


def _gates(rollout: Rollout) -> list[str]:
    from fleetlite.fleet.client import gate_texts

    return gate_texts(rollout.spec.gates)


def _rollout_list(fleet: Fleet, args: argparse.Namespace) -> int:
    release = fleet.release(args.release).release_id if args.release else None
    found = fleet.rollouts(release)
    if not found:
        _note(f"no rollouts in the store {fleet.store.url}: create one with `fleetlite rollout "
              "create RELEASE_ID`")
    docs = [{k: v for k, v in r.to_dict().items() if k not in ("devices", "decisions")}
            for r in found]
    _emit(args, {"rollouts": docs}, lambda: _table(
        ["ROLLOUT", "MODEL", "VERSION", "STATE", "WAVE", "UPDATED", "FAILED", "CREATED"],
        [[r.rollout_id, r.model, str(r.version), r.state,
          f"{r.current_wave}/{len(r.waves)}", f"{r.installed}/{r.total}", str(r.failed),
          _clock(r.created)] for r in found], right=(2, 5, 6)))
    return EXIT_OK


def _rollout_request(fleet: Fleet, args: argparse.Namespace) -> int:
    result = fleet.request(args.rollout_id, args.action, note=args.note, wait=args.wait,
                           remove_model=args.remove_model)
    decision = result.decision
    doc = {"action": args.action, "rollout_id": args.rollout_id, "handled": result.handled,
           "refused": result.refused, "state": result.rollout.state,
           "decision": None if decision is None else {
               "kind": decision.kind, "reason": decision.reason, "ts": decision.ts}}
    if decision is not None:
        text = f"{args.rollout_id}: {decision.reason}"
    elif args.wait:
        text = (f"{args.action} is queued for {args.rollout_id}, but no controller answered "
                f"within {args.wait:g} s: is `fleetlite serve` running with this --db?")
    else:
        text = (f"{args.action} requested for {args.rollout_id}; the controller handles it on "
                f"its next tick (see `fleetlite rollout status {args.rollout_id}`)")
    if result.refused or (args.wait and not result.handled):
        if args.output != "table":
            _emit(args, doc, lambda: text)
        _note(f"fleetlite: {text}")
        return EXIT_FAILED
    _emit(args, doc, lambda: text)
    return EXIT_OK


def _follow(fleet: Fleet, args: argparse.Namespace, draw: Callable[[Rollout], None]) -> Rollout:
    from fleetlite.fleet.client import WaitTimeoutError

    try:
        return fleet.wait(args.rollout_id, callback=draw, timeout=args.timeout,
                          interval=args.interval, stop_on_pause=args.stop_on_pause)
    except WaitTimeoutError as exc:
        raise RolloutError(str(exc)) from None


def _ended(rollout: Rollout) -> int:
    return EXIT_OK if rollout.completed else EXIT_NOT_COMPLETED


def _rollout_watch(fleet: Fleet, args: argparse.Namespace) -> int:
    board = ProgressBoard(sys.stdout)
    final = _follow(fleet, args, board.draw)
    board.close()
    if not final.completed:
        _note(f"fleetlite: rollout {final.rollout_id} is {final.state}: {final.reason}")
    return _ended(final)


def _rollout_wait(fleet: Fleet, args: argparse.Namespace) -> int:
    final = _follow(fleet, args, lambda r: None)
    _emit(args, final.to_dict(), lambda: final.progress_line() + (
        f"\n  {final.reason}" if final.reason else ""))
    return _ended(final)


class ProgressBoard:
    """Draws a rollout's waves as progress bars: redrawn in place on a terminal; elsewhere one
    plain line per change plus the notable decisions (CI logs)."""

    NOTABLE = frozenset({"start_wave", "gate_passed", "gate_tripped", "pause", "resume",
                         "abort", "rollback", "complete", "refuse"})

    def __init__(self, stream: IO[str], *, tty: Optional[bool] = None) -> None:
        self.stream = stream
        self.tty = stream.isatty() if tty is None else tty
        self.color = self.tty and "NO_COLOR" not in os.environ
        encoding = (getattr(stream, "encoding", None) or "").lower()
        self.glyphs = "█▓▒░" if "utf" in encoding else "#x>."
        self.drawn = 0
        self.last_decision = 0

    def draw(self, rollout: Rollout) -> None:
        if self.tty:
            self._redraw(self.board(rollout))
        else:
            self._log(rollout)
        self.stream.flush()

    def close(self) -> None:
        self.stream.flush()

    def _log(self, rollout: Rollout) -> None:
        for d in rollout.decisions:
            if d.id > self.last_decision and d.kind in self.NOTABLE:
                self.stream.write(f"{time.strftime('%H:%M:%S', time.localtime(d.ts))} "
                                  f"{d.kind}: {d.reason}\n")
        self.last_decision = max([self.last_decision, *(d.id for d in rollout.decisions)])
        self.stream.write(f"{time.strftime('%H:%M:%S')} {rollout.progress_line()}\n")

    def _redraw(self, lines: list[str]) -> None:
        width = max(20, shutil.get_terminal_size((100, 20)).columns - 1)
        out = []
        if self.drawn:
            out.append(f"\x1b[{self.drawn}F")  # to the start of the first line drawn
        for line in lines:
            out.append("\x1b[2K" + _clip(line, width) + "\n")
        for _ in range(self.drawn - len(lines)):
            out.append("\x1b[2K\n")
        self.stream.write("".join(out))
        self.drawn = max(self.drawn, len(lines))

    def board(self, rollout: Rollout) -> list[str]:
        """The lines of the live view."""
        head = f"{rollout.rollout_id}: {rollout.model} v{rollout.version}  {rollout.state}"
        lines = [self._paint(head, "1")]
        if not rollout.started:
            lines.append("  " + rollout.progress_line())
        for wave in rollout.waves:
            lines.append(self.wave_line(wave, wave.number == rollout.current_wave))
        notable = [d for d in rollout.decisions if d.kind in self.NOTABLE][-3:]
        for d in notable:
            lines.append(f"  {time.strftime('%H:%M:%S', time.localtime(d.ts))} {d.kind}: "
                         f"{d.reason}")
        if rollout.pending_requests:
            lines.append(f"  requested: {', '.join(rollout.pending_requests)}")
        return lines

    def wave_line(self, wave: WaveProgress, current: bool, width: int = 30) -> str:
        parts = [(wave.succeeded, 0, "32"), (wave.failed, 1, "31"), (wave.in_flight, 2, "34"),
                 (wave.pending, 3, "2")]
        bar = ""
        if wave.total:
            done = 0
            cells = 0
            for count, glyph, color in parts:
                done += count
                end = round(width * done / wave.total)
                bar += self._paint(self.glyphs[glyph] * (end - cells), color)
                cells = end
        else:
            bar = " " * width
        extra = f", {wave.failed} failed" if wave.failed else ""
        extra += f", {wave.in_flight} in flight" if wave.in_flight else ""
        extra += f", {wave.excluded} excluded" if wave.excluded else ""
        marker = ">" if current else " "
        return (f"{marker} wave {wave.number:>2} {wave.planned:>5} [{bar}] "
                f"{wave.succeeded:>3}/{wave.total:<3} {wave.state}{extra}")

    def _paint(self, text: str, code: str) -> str:
        return f"\x1b[{code}m{text}\x1b[0m" if self.color and text else text


def _clip(line: str, width: int) -> str:
    """Clip to ``width`` visible characters, keeping ANSI color codes intact."""
    out, visible, i = [], 0, 0
    while i < len(line):
        if line[i] == "\x1b":
            end = line.find("m", i)
            if end == -1:
                break
            out.append(line[i:end + 1])
            i = end + 1
            continue
        if visible >= width:
            i += 1
            continue
        out.append(line[i])
        visible += 1
        i += 1
    return "".join(out)


# -- profiles and report ---------------------------------------------------------------------------


def _profiles_show(fleet: Fleet, args: argparse.Namespace) -> int:
    from fleetlite.fleet.profiles_view import render

    aggs = fleet.profiles(model=args.model, version=args.version, device_class=args.device_class)
    if not aggs:
        _note(f"no profiles match in the store {fleet.store.url}: devices publish one after "
              "every model change (profile_on_model_change) and on a `profile` command")
    print(render(aggs, args.output))
    return EXIT_OK


def _profiles_compare(fleet: Fleet, args: argparse.Namespace) -> int:
    from fleetlite.fleet.profiles_view import render

    comparison = fleet.compare(args.model, args.a, args.b)
    if not comparison.rows:
        _note(f"no profiles of {args.model} v{args.a} or v{args.b} in the store "
              f"{fleet.store.url}: see `fleetlite profiles show --model {args.model}`")
    print(render(comparison, args.output))
    return EXIT_OK


def _report(fleet: Fleet, args: argparse.Namespace) -> int:
    import shlex

    list_command = " ".join(shlex.quote(w) for w in
                            ["fleetlite", "devices", "list", "--limit", "0", *_db_words(args)])
    written = fleet.write_report(args.html, title=args.title, max_devices=args.max_devices,
                                 list_command=list_command)
    path = written.path
    doc = {"path": str(path), "devices": written.devices, "rollouts": written.rollouts,
           "profiles": written.profiles, "devices_listed": written.devices_listed,
           "devices_needing_attention": written.devices_needing_attention}
    left_out = written.devices - written.devices_listed
    listed = (f" ({written.devices_listed} in its table, those needing attention first; "
              f"--max-devices 0 for all)" if left_out else "")
    _emit(args, doc, lambda: (
        f"wrote {path}: {doc['devices']} device(s){listed}, {doc['profiles']} profile(s), "
        f"{doc['rollouts']} rollout(s); open it in a browser (it needs nothing else)"))
    return EXIT_OK
