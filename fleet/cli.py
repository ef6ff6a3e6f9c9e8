"""``fleetlite``: the operator's command (demo, releases, rollouts, devices, profiles)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from fleetlite.fleet import cli_keys, cli_release
from fleetlite.sdk.errors import FleetLiteError
from fleetlite.sdk.version import __version__

EXAMPLES = """\
examples:
  fleetlite demo                 build the project's models, check them and show what they do
  fleetlite demo --out DIR       keep the built models in DIR
  fleetlite keys create --role release --out ~/.fleetlite/keys
                                 create a signing key (see `fleetlite keys --help`)
  fleetlite release build model.tflite --name intent --version 2 \\
      --device-class raspberry-pi-4 --key release.key --out intent-v2
                                 build and sign a release (see `fleetlite release --help`)
  fleetlite release verify intent-v2 --root root.json
                                 check a release as a device would

exit codes: 0 ok, 1 the command failed (the message says why), 2 usage error
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
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser(
        "demo",
        help="run the demo (builds models, checks and runs them in the real interpreter)",
        description="Build the project-made models, check each in an isolated interpreter "
        "process, run sample commands through the text intent classifier and show the device "
        "classes' budgets.",
    )
    demo.add_argument("--out", help="directory for the built models (default: a temp dir)")
    cli_keys.add_parser(sub)
    cli_release.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            from fleetlite.tools.demo import run_demo

            return run_demo(out=args.out)
        if args.command == "keys":
            return cli_keys.run(args)
        if args.command == "release":
            return cli_release.run(args)
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
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
