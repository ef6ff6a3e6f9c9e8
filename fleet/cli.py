"""``fleetlite``: the operator's command (demo, keys, releases, controller, devices, rollouts,
profiles, report, PKI and broker configuration)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from fleetlite.fleet import (
    cli_completion,
    cli_config,
    cli_fleet,
    cli_keys,
    cli_pki,
    cli_release,
)
from fleetlite.sdk.cli_exit import closed_pipe, os_error_text
from fleetlite.sdk.errors import FleetLiteError
from fleetlite.sdk.version import __version__

EXAMPLES = """\
examples:
  fleetlite demo                 the whole product on this machine in about a minute
  fleetlite demo --keep          ... and leave it running to explore with the commands below
  fleetlite keys create --role release --out ~/.fleetlite/keys
                                 create a signing key (see `fleetlite keys --help`)
  fleetlite pki init fleet-pki   the fleet CA for TLS: certificates, enrolment bundles and
                                 the broker's configuration (see `fleetlite pki --help`)
  fleetlite release build model.tflite --name intent --version 2 \\
      --device-class raspberry-pi-4 --key release.key --out intent-v2
                                 build and sign a release (see `fleetlite release --help`)
  fleetlite release verify intent-v2 --root root.json
                                 check a release as a device would
  fleetlite serve                run the fleet controller (store + MQTT broker)
  fleetlite devices list         the devices that reported to the controller
  fleetlite release push intent-v2
                                 store a signed release for rollouts
  fleetlite rollout create 3f9a1c2d --waves 1,10%,100% --max-p95-regression 0.2
  fleetlite rollout watch intent-v2-8c1f0a
                                 roll it out in waves and follow it live
  fleetlite profiles compare intent 1 2
                                 latency and memory of two versions per device class
  fleetlite report --html fleet.html
  fleetlite config use-context plant-a
                                 switch fleets: store, broker and TLS files by name

fleet options (before or after the command):
  --db URL            the fleet store, sqlite:///PATH or postgresql://USER:PW@HOST/DB
                      (env FLEETLITE_DB; default sqlite:///fleetlite.db in the current directory)
  --broker ADDRESS    the MQTT broker: HOST:PORT, mqtt://HOST:PORT, or mqtts://HOST:PORT
                      for TLS (env FLEETLITE_BROKER; default localhost:1883)
  --tls-ca FILE --tls-cert FILE --tls-key FILE
                      TLS: the CA that verifies the broker, and the client certificate
                      and key (env FLEETLITE_TLS_CA, FLEETLITE_TLS_CERT, FLEETLITE_TLS_KEY);
                      MQTT credentials: env FLEETLITE_MQTT_USERNAME, FLEETLITE_MQTT_PASSWORD
                      e.g. fleetlite serve --broker mqtts://mqtt.example.net:8883 \\
                             --tls-ca ca.pem --tls-cert ctl.pem --tls-key ctl.key
  -o table|json|yaml  on every command that prints a result

exit codes: 0 ok, 1 the command failed (the message says why), 2 usage error,
            3 a rollout ended without completing (rollout watch / wait)
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fleetlite",
        description="Operate a FleetLite fleet: build and sign model releases, roll them out, "
        "and read per-device performance profiles.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"fleetlite {__version__}")
    cli_fleet.add_global_options(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser(
        "demo",
        help="run the demo: a signed model rollout to running agents, with profiles shown",
        description="Start a broker (Mosquitto if installed, else an embedded one), keys, four "
        "agent processes of three device classes and a controller; build, sign and roll out a "
        "new release of the text intent model in waves; show the measured profiles; ask an "
        "agent sample commands; roll out a broken release the devices reject; write the HTML "
        "report. About a minute; everything stops at the end unless --keep.",
        epilog="""examples:
  fleetlite demo
  fleetlite demo --keep          (then explore: fleetlite devices list, rollout list, ...)
  fleetlite demo --out demo-run --local-broker embedded

exit codes: 0 the demo ran end to end, 1 a step failed (the message says which), 2 usage
error, 130 interrupted
""", formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument("--out", metavar="DIR",
                      help="work directory (default: a new temp dir; it keeps the report)")
    demo.add_argument("--local-broker", choices=("auto", "mosquitto", "embedded"),
                      default=os.environ.get("FLEETLITE_DEMO_BROKER") or "auto",
                      help="which broker the demo starts: Mosquitto if installed, else the "
                      "embedded one (auto), or either by name; `embedded` shows what a machine "
                      "without Mosquitto sees (env FLEETLITE_DEMO_BROKER; default auto)")
    demo.add_argument("--keep", action="store_true",
                      help="leave broker, agents and controller running to explore with the CLI")
    cli_keys.add_parser(sub)
    cli_pki.add_parsers(sub)
    release = cli_release.add_parser(sub)
    cli_fleet.add_parsers(sub, release)
    cli_release.add_push_root_check(release)  # push verifies against the fleet root
    cli_config.add_parser(sub)
    cli_completion.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if cli_fleet.is_fleet_verb(args):
            return cli_fleet.run(args)
        if args.command == "demo":
            from fleetlite.fleet.demo import run_demo

            return run_demo(out=args.out, keep=args.keep, broker=args.local_broker)
        if args.command == "keys":
            return cli_keys.run(args)
        if args.command == "release":
            return cli_release.run(args)
        if args.command in ("pki", "broker-config"):
            return cli_pki.run(args)
        if args.command == "config":
            return cli_config.run(args)
        if args.command == "completion":
            print(cli_completion.completion_script(parser, args.shell), end="")
            return 0
    except FleetLiteError as exc:
        print(f"fleetlite: error: {exc}", file=sys.stderr)
        return 1
    except ModuleNotFoundError as exc:
        print(
            f"fleetlite: error: {exc.name} is not installed; the operator commands need the "
            "fleet extra: pip install 'fleetlite[fleet]'",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        print("fleetlite: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return closed_pipe()
    except OSError as exc:
        print(f"fleetlite: error: {os_error_text(exc)}", file=sys.stderr)
        return 1
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
