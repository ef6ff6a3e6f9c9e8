"""``fleetlite-agent``: the device-side command (run the agent, show device facts, check models)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from fleetlite.agent import generate_cli, profile_cli
from fleetlite.agent.cli_output import add_output, emit, structured
from fleetlite.agent.errors import AgentError
from fleetlite.sdk.cli_exit import closed_pipe, os_error_text
from fleetlite.sdk.runtime.errors import ModelRuntimeError
from fleetlite.sdk.version import __version__

EXAMPLES = """\
examples:
  fleetlite-agent run --config /etc/fleetlite/agent.yaml
                                            run the agent (as the systemd unit does)
  fleetlite-agent info                      facts about this device and its TFLite runtime
  fleetlite-agent info -o json              the same, as JSON (or yaml)
  fleetlite-agent check model.tflite        load and run a model in an isolated process
  fleetlite-agent profile model.tflite --device-class raspberry-pi-4
                                            benchmark it (p50/p95/p99, peak memory) vs budgets
  fleetlite-agent generate home-lm --prompt "turn off the kitchen lights"
                                            stream a language model's reply
  fleetlite-agent chat home-lm              a conversation with it, turn by turn

exit codes: 0 ok, 1 the command failed (the message says why), 2 usage error
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fleetlite-agent",
        description="The FleetLite device agent: runs TFLite models on this gateway and reports "
        "to the fleet over MQTT.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"fleetlite-agent {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser(
        "run",
        help="run the agent: serve models, report to the fleet, accept commands",
        description="Run the device agent in the foreground until SIGTERM/SIGINT.",
        epilog="""examples:
  fleetlite-agent run --config /etc/fleetlite/agent.yaml     (what the systemd unit runs)
  fleetlite-agent run -c agent.yaml --log-level DEBUG

exit codes: 0 stopped by SIGTERM/SIGINT, 1 the configuration or state cannot be used (the
message says why), 2 usage error
""", formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("--config", "-c", required=True, help="path to agent.yaml")
    run.add_argument(
        "--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        help="log verbosity on stderr (default INFO)",
    )

    info = sub.add_parser(
        "info", help="print facts about this device and its TFLite runtime",
        description="Facts about this device (CPU, memory, OS, runtime) as the agent reports "
        "them in its birth.",
        epilog="""examples:
  fleetlite-agent info
  fleetlite-agent info --device-class raspberry-pi-4 -o json

exit codes: 0 ok, 1 failed (the message says why), 2 usage error
""", formatter_class=argparse.RawDescriptionHelpFormatter)
    add_output(info, "the facts")
    info.add_argument("--device-class", help="device class to report (e.g. raspberry-pi-4)")

    check = sub.add_parser(
        "check",
        help="load and run a .tflite model in an isolated process (safe on hostile files)",
        description="Load a model and run it once in a child process: a broken or hostile file "
        "can crash that process, not this one. Prints its inputs and outputs.",
        epilog="""examples:
  fleetlite-agent check model.tflite
  fleetlite-agent check model.tflite --threads 2 -o json

exit codes: 0 the model loads and runs, 1 it does not (the message says why), 2 usage error
""", formatter_class=argparse.RawDescriptionHelpFormatter)
    check.add_argument("model", help="path to a .tflite file")
    add_output(check, "the load and first-inference times and the tensors")
    check.add_argument("--threads", type=int, default=1, help="interpreter threads (default 1)")
    check.add_argument("--timeout", type=float, default=60.0, help="seconds before giving up")
    profile_cli.add_parser(sub)
    generate_cli.add_parsers(sub)
    return parser


def _print_table(rows: dict[str, object]) -> None:
    width = max(len(key) for key in rows)
    for key, value in rows.items():
        print(f"{key:<{width}}  {'-' if value is None else value}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "run":
            import logging

            logging.basicConfig(
                level=args.log_level,
                format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            )
            from fleetlite.agent.daemon import run

            run(args.config)
            return 0
        if args.command == "info":
            from fleetlite.agent import device_facts

            facts = device_facts.collect(args.device_class)
            if structured(args):
                emit(args, facts)
            else:
                _print_table(facts)
            return 0
        if args.command == "profile":
            return profile_cli.run(args)
        if args.command in ("generate", "chat"):
            return generate_cli.run(args)
        if args.command == "check":
            from fleetlite.sdk.runtime.isolated import check_model

            result = check_model(args.model, timeout=args.timeout, num_threads=args.threads)
            if structured(args):
                emit(args, {"model": args.model, "load_ms": result.load_ms,
                            "first_inference_ms": result.first_inference_ms,
                            **result.description})
            else:
                print(f"{args.model}: OK (loaded in {result.load_ms:.1f} ms, "
                      f"first inference {result.first_inference_ms:.2f} ms)")
                for kind in ("inputs", "outputs"):
                    for spec in result.description[kind]:
                        print(f"  {kind[:-1]:<6} {spec['name']:<24} {spec['dtype']:<8} "
                              f"{spec['shape']}")
            return 0
    except (AgentError, ModelRuntimeError) as exc:
        print(f"fleetlite-agent: error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return closed_pipe()
    except OSError as exc:
        print(f"fleetlite-agent: error: {os_error_text(exc)}", file=sys.stderr)
        return 1
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
