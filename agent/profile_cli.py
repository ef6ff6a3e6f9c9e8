"""``fleetlite-agent profile MODEL.tflite``: a benchmark_model-style profile with percentiles,
or for a generative language model (detected from its signatures) a llama-bench-style one.

Wired into :mod:`fleetlite.agent.cli` by :func:`add_parser` and :func:`run`; also runnable alone as
``python -m fleetlite.agent.profile_cli MODEL.tflite``. Heavy imports wait until :func:`run`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from fleetlite.agent.cli_output import add_output, emit, structured
from fleetlite.sdk.errors import FleetLiteError

if TYPE_CHECKING:
    from fleetlite.sdk.device_class import DeviceClass
    from fleetlite.sdk.profile import ProfileRecord

EXAMPLES = """\
examples:
  fleetlite-agent profile model.tflite                     profile in a fresh process (default)
  fleetlite-agent profile model.tflite --threads 2 --json  the record as JSON
  fleetlite-agent profile model.tflite --device-class raspberry-pi-4
                                  use the class's threads and run counts; show its budgets

  fleetlite-agent profile home_lm.tflite                   a language model: load, TTFT, pp, tg
  fleetlite-agent profile home_lm.tflite --pp 32 --tg 64 --depth 0 --depth 48 --repetitions 10

The loop follows TFLite benchmark_model: warm up, then run while (runs < --min-runs or
elapsed < --min-seconds) and elapsed <= --max-seconds, at most --max-runs times. Unset values come
from --device-class, else benchmark_model's defaults (warm-up 1 run / 0.5 s, 50 runs, 1 s, 150 s).
Only interpreter.invoke() is timed.

A language model (signatures decode and prefill_<N>) is profiled as llama-bench does, with
token-id prompts (no tokenizer needed): load time, cold and warm time to first token of a
--prompt-tokens prompt, pp<N> (N prompt tokens prefilled; default: the model's prefill lengths)
and tg<n> @ d<depth> (n decode steps from context position depth; default n 32 at depths 16 and
half the context), each --repetitions times (mean ± sd) after --warmup-runs untimed runs.

exit codes: 0 profiled, 1 the model or device class could not be used, 2 usage error
"""


def _whole_number(minimum: int) -> Callable[[str], int]:
    """An argument type: a whole number of at least ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected a number >= {minimum}, got {value}")
        return value

    return parse


_positive_int = _whole_number(1)
_count = _whole_number(0)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected seconds >= 0, got {text}")
    return value


def add_parser(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    """Add the ``profile`` subcommand to ``subparsers`` and return its parser."""
    parser = subparsers.add_parser(
        "profile",
        help="measure a model's latency (p50..p99) and memory on this device, "
        "like TFLite benchmark_model",
        description="Profile a .tflite model on this device: init time, first inference, "
        "warm-up, steady-state latency percentiles and peak memory.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", help="path to a .tflite file")
    parser.add_argument("--threads", type=_positive_int, metavar="N",
                        help="interpreter threads (default: the device class's, else 1)")
    parser.add_argument("--backend", choices=("tflite-runtime", "ai-edge-litert", "tensorflow"),
                        help="TFLite runtime to use (default: $FLEETLITE_RUNTIME or the first "
                        "installed)")
    parser.add_argument("--warmup-runs", type=_count, metavar="N",
                        help="minimum warm-up runs (default 1); for a language model the "
                        "untimed runs before each test")
    parser.add_argument("--warmup-min-seconds", type=_seconds, metavar="S",
                        help="minimum warm-up time (default 0.5)")
    parser.add_argument("--min-runs", type=_positive_int, metavar="N",
                        help="minimum measured runs (default 50)")
    parser.add_argument("--max-runs", type=_positive_int, metavar="N",
                        help="maximum measured runs; wins over the minimums (default 100000)")
    parser.add_argument("--min-seconds", type=_seconds, metavar="S",
                        help="minimum measuring time (default 1)")
    parser.add_argument("--max-seconds", type=_seconds, metavar="S",
                        help="stop warm-up or measuring after this long (default 150); for a "
                        "language model the time after which each test runs once (default 300)")
    parser.add_argument("--device-class", metavar="NAME",
                        help="device class whose profiler defaults, threads and budgets apply "
                        "(e.g. raspberry-pi-4)")
    parser.add_argument("--device-id", default="", help="device id to put in the record")
    parser.add_argument("--name", help="model name in the record (default: the file name)")
    parser.add_argument("--model-version", type=_count, metavar="N",
                        help="model version in the record")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the synthetic inputs (a language model's token ids)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--isolated", dest="isolated", action="store_true", default=True,
                       help="profile in a fresh subprocess: clean load memory, and a crashing "
                       "model cannot take this command down (default)")
    where.add_argument("--in-process", dest="isolated", action="store_false",
                       help="profile in this process")
    parser.add_argument("--timeout", type=_seconds, metavar="S",
                        help="isolated only: give up after this long "
                        "(default 2 x max-seconds + 60)")
    add_output(parser, "the profile record (fleetlite.profile/1, or /2 for a language "
               "model)")
    lm = parser.add_argument_group("language models")
    lm.add_argument("--repetitions", type=_positive_int, metavar="N",
                    help="runs of each test (default 5)")
    lm.add_argument("--prompt-tokens", type=_positive_int, metavar="N",
                    help="prompt length of the time-to-first-token test (default 16)")
    lm.add_argument("--pp", type=_positive_int, action="append", metavar="N",
                    help="a prefill test of N prompt tokens (repeat; default: the model's "
                    "prefill lengths)")
    lm.add_argument("--tg", type=_positive_int, metavar="N",
                    help="decode steps of each decode test (default 32)")
    lm.add_argument("--depth", type=_count, action="append", metavar="D",
                    help="context position a decode test starts at (repeat; default 16 and "
                    "half the context)")
    lm.add_argument("--cache-layout", choices=("default", "transposed"),
                    help="the model's key/value cache layout, when its shapes fit both")
    return parser


_CLASSIFIER_ONLY = ("warmup_min_seconds", "min_runs", "max_runs", "min_seconds")
_LM_ONLY = ("repetitions", "prompt_tokens", "pp", "tg", "depth", "cache_layout")


def _option(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _lm_options(args: argparse.Namespace, device_class: DeviceClass | None) -> dict[str, Any]:
    """The options of :func:`~fleetlite.agent.lm_profiler.profile_lm` ``args`` give; ValueError
    for a benchmark_model loop option, which does not apply to a language model."""
    given = [dest for dest in _CLASSIFIER_ONLY if getattr(args, dest) is not None]
    if given:
        raise ValueError(f"{_option(given[0])} does not apply to a language model: each of its "
                         "tests runs --repetitions times (default 5) within --max-seconds")
    chosen = {
        "repetitions": args.repetitions,
        "warmup_runs": args.warmup_runs,
        "prompt_tokens": args.prompt_tokens,
        "prefill_tokens": args.pp,
        "decode_tokens": args.tg,
        "depths": args.depth,
    }
    return {
        "num_threads": args.threads,
        "backend": args.backend,
        "cache_layout": args.cache_layout,
        "max_seconds": args.max_seconds,
        "device_id": args.device_id,
        "device_class": device_class,
        "model_name": args.name,
        "model_version": args.model_version,
        "trigger": "cli",
        "seed": args.seed,
        **{key: value for key, value in chosen.items() if value is not None},
    }


def run(args: argparse.Namespace) -> int:
    """Profile as ``args`` say; print the summary (or JSON); return the exit code."""
    from fleetlite.agent.lm_profiler import profile_lm, profile_lm_isolated
    from fleetlite.agent.profiler import profile_model, profile_model_isolated
    from fleetlite.sdk.runtime.lm_detect import is_language_model

    device_class: DeviceClass | None = None
    try:
        if args.device_class:
            from fleetlite.sdk.device_class import find_device_class

            device_class = find_device_class(args.device_class)
        if is_language_model(args.model):
            lm = _lm_options(args, device_class)
            if args.isolated:
                record = profile_lm_isolated(args.model, timeout=args.timeout, **lm)
            else:
                record = profile_lm(args.model, **lm)
            return _print(record, args, device_class)
        given = [dest for dest in _LM_ONLY if getattr(args, dest) is not None]
        if given:
            raise ValueError(f"{_option(given[0])} applies to language models only; "
                             f"{args.model} has no decode and prefill_<N> signatures")
        options: dict[str, Any] = {
            "num_threads": args.threads,
            "backend": args.backend,
            "warmup_runs": args.warmup_runs,
            "warmup_min_seconds": args.warmup_min_seconds,
            "min_runs": args.min_runs,
            "max_runs": args.max_runs,
            "min_seconds": args.min_seconds,
            "max_seconds": args.max_seconds,
            "device_id": args.device_id,
            "device_class": device_class,
            "model_name": args.name,
            "model_version": args.model_version,
            "trigger": "cli",
            "seed": args.seed,
        }
        if args.isolated:
            record = profile_model_isolated(args.model, timeout=args.timeout, **options)
        else:
            record = profile_model(args.model, **options)
    except FleetLiteError as exc:
        print(f"fleetlite-agent: error: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"fleetlite-agent profile: error: {exc}", file=sys.stderr)
        return 2
    return _print(record, args, device_class)


def _print(record: ProfileRecord, args: argparse.Namespace,
           device_class: DeviceClass | None) -> int:
    from fleetlite.sdk.profile import render_text

    if structured(args):
        emit(args, record.to_dict())
    else:
        print(render_text(record, device_class.budgets if device_class is not None else None))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Standalone entry point: ``python -m fleetlite.agent.profile_cli MODEL.tflite [...]``."""
    parser = argparse.ArgumentParser(prog="fleetlite-agent")
    add_parser(parser.add_subparsers(dest="command", required=True))
    return run(parser.parse_args(["profile", *(sys.argv[1:] if argv is None else argv)]))


if __name__ == "__main__":
    sys.exit(main())
