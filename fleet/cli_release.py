"""``fleetlite release``: build, sign, verify and show signed model releases."""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path
from typing import Any

from fleetlite.fleet.cli_keys import add_output, duration_arg, emit, help_text
from fleetlite.fleet.lm_release_builder import (
    DEFAULT_SMOKE_PROMPTS,
    DEFAULT_SMOKE_TOKENS,
    DEFAULT_VARIANT_AGREEMENT,
)
from fleetlite.sdk.durations import DEFAULT_EXPIRES_IN
from fleetlite.sdk.errors import BundleError, UpdateRejected
from fleetlite.sdk.generation import Sampling
from fleetlite.sdk.keys import SigningKey, require_role
from fleetlite.sdk.manifest import Tolerance
from fleetlite.sdk.out_dirs import missing_dirs, say_created
from fleetlite.sdk.version import __version__

EXAMPLES = """\
examples:
  fleetlite release build intent.tflite --vocab intent.vocab.json --name intent --version 2 \\
      --device-class raspberry-pi-4 --device-class small-arm-gateway \\
      --expires-in 30d --key keys/release-1a2b.key --out intent-v2
  fleetlite release build sensor.tflite sensor_int8.tflite --name sensor --version 1 \\
      --device-class raspberry-pi-4 --out sensor-v1.flb      (two variants, one file)
  fleetlite release build home_lm.tflite home_lm_int8.tflite --tokenizer home_lm.spm.model \
      --prompt-template "<user> {prompt} <bot>" --smoke-prompt "turn off the kitchen lights" \
      --name home-lm --version 1 --device-class raspberry-pi-4 --key keys/release-1a2b.key \
      --out home-lm-v1      (a language model: its tokenizer and generation metadata travel
                             with it; the int8 variant must agree with the float one on 90%
                             of the greedy tokens, --min-token-agreement)
  fleetlite release sign intent-v2 --key keys/release-3c4d.key   (a second signer)
  fleetlite release verify intent-v2 --root root.json --device-class raspberry-pi-4
  fleetlite release verify intent-v2 --root root.json --smoke    (also rerun the smoke test)
  fleetlite release show intent-v2 -o json

A bundle is a directory (manifest.json + files) or, when --out ends in .flb, one file.
`verify` applies the device's checks in the device's order and prints the reason code of the
first that fails.

exit codes: 0 ok, 1 the command failed or the release was rejected, 2 usage error
"""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "release",
        help="build, sign, verify and show signed model releases",
        description="Signed model releases: a manifest (name, version, file hashes, targets, "
        "expiry, smoke-test vectors) in a DSSE envelope, plus the files.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="release_command", metavar="COMMAND")

    build = sub.add_parser(
        "build", help="build a release bundle from .tflite files",
        description="Describe each model with the TFLite runtime, compute smoke-test vectors by "
        "running it on deterministic inputs, write the manifest and sign it with --key.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    build.add_argument("models", nargs="+", metavar="MODEL.tflite",
                       help="model file(s); the first is the default variant")
    build.add_argument("--name", required=True, help="model name ([a-z0-9_-], e.g. intent)")
    build.add_argument("--version", required=True, type=int,
                       help="release version, an integer higher than any released before")
    build.add_argument("--device-class", required=True, action="append", dest="device_classes",
                       metavar="CLASS", help="target device class (repeat for several)")
    build.add_argument("--vocab", help="vocabulary file shipped with the model")
    lm = build.add_argument_group(
        "generative language models (detected by their prefill_<N> and decode signatures)")
    lm.add_argument("--tokenizer", metavar="FILE",
                    help="the LM's tokenizer: a SentencePiece .model or a tokenizer.json")
    lm.add_argument("--prompt-template", default="{prompt}",
                    help="the text around a prompt, with {prompt} once, e.g. "
                    "'<start_of_turn>user\\n{prompt}<end_of_turn>\\n<start_of_turn>model\\n' "
                    "(default: the prompt alone)")
    lm.add_argument("--stop-id", type=int, action="append", default=[], metavar="ID",
                    help="a token id that ends a reply (default: the tokenizer's "
                    "end-of-sequence id); repeatable")
    lm.add_argument("--stop-string", action="append", default=[], metavar="TEXT",
                    help="a text that ends a reply; repeatable")
    lm.add_argument("--max-tokens", type=int, default=Sampling.max_tokens,
                    help="default reply length limit (%(default)s)")
    lm.add_argument("--temperature", type=float, default=Sampling.temperature,
                    help="default sampling temperature, 0 = greedy (%(default)s)")
    lm.add_argument("--top-k", type=int, default=Sampling.top_k,
                    help="default top-k, 0 = off (%(default)s)")
    lm.add_argument("--top-p", type=float, default=Sampling.top_p,
                    help="default nucleus mass, 1 = off (%(default)s)")
    lm.add_argument("--smoke-prompt", action="append", default=[], metavar="TEXT",
                    help="a prompt whose greedy reply every device must reproduce in its "
                    "smoke test; repeatable (default: a few generic prompts)")
    lm.add_argument("--smoke-tokens", type=int, default=DEFAULT_SMOKE_TOKENS,
                    help="greedy tokens compared per smoke prompt (%(default)s)")
    lm.add_argument("--min-token-agreement", type=float, default=DEFAULT_VARIANT_AGREEMENT,
                    help="share of the default variant's greedy tokens the other variants "
                    "(e.g. int8) must reproduce (%(default)s)")
    build.add_argument("--expires-in", type=duration_arg, default=DEFAULT_EXPIRES_IN,
                       metavar="DURATION", help="manifest lifetime, e.g. 30d, 12h (default 30d)")
    build.add_argument("--min-agent-version", default=__version__,
                       help=f"oldest agent that may install it (default {__version__})")
    build.add_argument("--atol", type=float, default=Tolerance.atol,
                       help=f"smoke test absolute tolerance, float outputs (default "
                       f"{Tolerance.atol:g})")
    build.add_argument("--rtol", type=float, default=Tolerance.rtol,
                       help=f"smoke test relative tolerance (default {Tolerance.rtol:g})")
    build.add_argument("--max-lsb", type=int, default=Tolerance.max_lsb,
                       help=f"smoke test tolerance for int8/uint8 outputs, in quantization steps "
                       f"(default {Tolerance.max_lsb})")
    build.add_argument("--key", action="append", default=[], metavar="KEY.key",
                       help="release key to sign with (repeat; none: sign later)")
    build.add_argument("--delta-from", action="append", default=[], metavar="OLD.flb|OLD.tflite",
                       help="also ship deltas against this installed release (bundle, or its "
                            ".tflite); a delta is kept when under --max-delta-ratio of the full "
                            "file; repeat for several bases")
    build.add_argument("--max-delta-ratio", type=float, default=0.5, metavar="R",
                       help="largest delta kept, as a fraction of the full file (%(default)s)")
    build.add_argument("--out", required=True, metavar="DIR|FILE.flb",
                       help="bundle directory to create, or a .flb file")

    sign = sub.add_parser("sign", help="add a signature to a bundle (threshold signing)",
                          **help_text("""\
  fleetlite release sign intent-v2 --key keys/release-3c4d.key
  fleetlite release sign intent-v2.flb --key a.key --key b.key
"""))
    sign.add_argument("bundle", help="bundle directory or .flb file")
    sign.add_argument("--key", required=True, action="append", metavar="KEY.key",
                      help="release key to sign with (repeat for several)")

    verify = sub.add_parser("verify", help="verify a bundle as a device would",
                            epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    verify.add_argument("bundle", help="bundle directory or .flb file")
    verify.add_argument("--root", help="the root.json devices are provisioned with (default: "
                        "$FLEETLITE_ROOT, else the fleet's root set with `fleetlite keys root "
                        "use`)")
    verify.add_argument("--device-class", help="check that the release targets this class")
    verify.add_argument("--installed-version", type=int,
                        help="check as a device that has this version installed")
    verify.add_argument("--agent-version", default=__version__,
                        help=f"check as this agent version (default {__version__})")
    verify.add_argument("--smoke", action="store_true",
                        help="also run the smoke vectors through this machine's TFLite runtime")
    add_output(verify)

    show = sub.add_parser(
        "show", help="summarise a bundle or a stored release (not a verification)",
        description="Summarise a bundle (directory or .flb), or a release in the fleet store by "
        "its id or a unique prefix of 6+ characters (see `fleetlite release list`). Times are "
        "UTC; a passed expiry is marked EXPIRED.",
        epilog="""examples:
  fleetlite release show intent-v2
  fleetlite release show 3f9a1c2d -o json
  fleetlite release show 3f9a1c2d --db sqlite:////var/lib/fleetlite/fleet.db

exit codes: 0 ok, 1 no such bundle or release (the message says why), 2 usage error
""", formatter_class=argparse.RawDescriptionHelpFormatter)
    show.add_argument("bundle", metavar="BUNDLE|RELEASE_ID",
                      help="bundle directory or .flb file, or a stored release's id")
    show.add_argument("--db", metavar="URL", default=argparse.SUPPRESS,
                      help="the fleet store to read a RELEASE_ID from (env FLEETLITE_DB; "
                      "default sqlite:///fleetlite.db)")
    add_output(show)
    return parser


def add_push_root_check(release_parser: argparse.ArgumentParser) -> None:
    """Make `release push` (registered by cli_fleet) check every release against the fleet's
    root first: --root, else $FLEETLITE_ROOT, else the root set with `keys root use`."""
    sub = next(a for a in release_parser._actions
               if isinstance(a, argparse._SubParsersAction))
    push = sub.choices.get("push")
    if push is None:
        return
    for action in push._actions:
        if action.dest == "root":
            action.help = ("the root of trust devices use (default: $FLEETLITE_ROOT, else the "
                           "fleet's root set with `fleetlite keys root use root.json`)")
    push.description = (
        "Store a signed bundle (directory or .flb) in the fleet store; the controller serves it "
        "to the devices of a rollout. It is first verified as the fleet's devices will verify "
        "it, against the fleet's root (--root, $FLEETLITE_ROOT, or `fleetlite keys root use`): "
        "what they would refuse is refused here, with their reason code. Unsigned, expired or "
        "tampered bundles are always refused.")
    handler = push.get_default("fleet_handler")
    if handler is not None:
        push.set_defaults(fleet_handler=_checked_push(handler))


def _checked_push(handler: Any) -> Any:
    def push(fleet: Any, args: argparse.Namespace) -> int:
        from fleetlite.fleet.fleet_root import resolve_fleet_root
        from fleetlite.sdk.bundle import load_bundle

        bundle = load_bundle(args.bundle)
        chosen = resolve_fleet_root(getattr(args, "root", None))
        if chosen is None:
            print("warning: no fleet root is configured, so this release is not checked as the "
                  "devices will check it; set it once with `fleetlite keys root use root.json`",
                  file=sys.stderr)
            return int(handler(fleet, args))
        try:
            bundle.verify(chosen.root, time_floor=time.time())
        except UpdateRejected as exc:
            print(f"fleetlite release push: REFUSED [{exc.reason}]: {args.bundle}: {exc} "
                  f"(devices with the fleet root {chosen.path}, {chosen.source}, would refuse "
                  "it)", file=sys.stderr)
            return 1
        args.root = None  # verified above; the store's own checks still run
        return int(handler(fleet, args))

    return push


def run(args: argparse.Namespace) -> int:
    try:
        return _dispatch(args)
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"fleetlite release: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 1


def _dispatch(args: argparse.Namespace) -> int:
    command = args.release_command
    if command == "build":
        return _build(args)
    if command == "sign":
        return _sign(args)
    if command == "verify":
        return _verify(args)
    if command == "show":
        return _show(args)
    print("fleetlite release: give a command; see `fleetlite release --help`", file=sys.stderr)
    return 2


def _build(args: argparse.Namespace) -> int:
    from fleetlite.fleet.release_builder import build_release
    from fleetlite.sdk.bundle import BUNDLE_SUFFIX

    out = Path(args.out)
    if out.exists() and (out.suffix == BUNDLE_SUFFIX or not out.is_dir() or any(out.iterdir())):
        raise BundleError(f"{out}: already exists; choose a new --out")
    _check_device_classes(args.device_classes)
    keys = [_release_key(path) for path in args.key]
    deltas, skipped = _plan_deltas(args)
    bundle = build_release(
        args.models,
        name=args.name,
        version=args.version,
        device_classes=args.device_classes,
        vocab=args.vocab,
        expires_in=args.expires_in,
        min_agent_version=args.min_agent_version,
        tolerance=Tolerance(atol=args.atol, rtol=args.rtol, max_lsb=args.max_lsb),
        keys=keys,
        tokenizer=args.tokenizer,
        prompt_template=args.prompt_template,
        stop_ids=args.stop_id,
        stop_strings=args.stop_string,
        sampling=Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                          max_tokens=args.max_tokens),
        smoke_prompts=args.smoke_prompt or DEFAULT_SMOKE_PROMPTS,
        smoke_tokens=args.smoke_tokens,
        min_token_agreement=args.min_token_agreement,
        deltas=deltas,
    )
    if out.suffix == BUNDLE_SUFFIX:
        if not out.parent.is_dir():
            raise BundleError(f"{out.parent}: no such directory; create it first, or choose "
                              "another --out")
        bundle.write_flb(out)
    else:
        created = missing_dirs(out)
        bundle.write_dir(out)
        say_created(created)
    m = bundle.manifest
    print(f"built {out}: {m.name} v{m.version} for {', '.join(m.device_classes)}")
    print(f"  release id {m.release_id}")
    print(f"  expires {_utc(m.expires)}")
    print(f"  files: {', '.join(f'{e.name} ({e.role}, {e.length} B)' for e in m.files)}")
    if m.generation is not None:
        g = m.generation
        print(f"  language model: {g.num_layers} layers, context {g.context_length}, vocab "
              f"{g.vocab_size}, {g.cache_layout} cache layout, stop ids {list(g.stop_ids)}")
    for line in [d.report() for d in deltas] + [s.report() for s in skipped]:
        print(f"  {line}")
    if keys:
        print(f"  signed by {', '.join(k.keyid[:12] for k in keys)}")
    else:
        print(f"  unsigned: sign it with `fleetlite release sign {out} --key KEY.key`")
    return 0


def _plan_deltas(args: argparse.Namespace) -> tuple[list[Any], list[Any]]:
    """The deltas ``--delta-from`` asks for (none without it), and the files that get none."""
    if not args.delta_from:
        return [], []
    from fleetlite.fleet.delta_builder import load_base, plan_deltas

    if not 0 < args.max_delta_ratio <= 1:
        raise BundleError("--max-delta-ratio must be in (0, 1], e.g. 0.5")
    models = []
    for source in args.models:
        path = Path(source)
        try:
            models.append((path.name, path.read_bytes()))
        except OSError as exc:
            raise BundleError(f"{path}: cannot read the model ({exc.strerror})") from None
    deltas, skipped = [], []
    for base in args.delta_from:
        built, passed = plan_deltas(load_base(base), models, max_ratio=args.max_delta_ratio)
        deltas += built
        skipped += passed
    return deltas, skipped


def _check_device_classes(names: list[str]) -> None:
    """Refuse a --device-class no device profile defines: no device would ever install it."""
    import difflib

    from fleetlite.sdk.device_class import PROFILES_ENV, default_profiles_dir, load_device_classes

    folder = default_profiles_dir()
    known = sorted(load_device_classes(folder))
    for name in names:
        if name in known:
            continue
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise BundleError(
            f"no device profile defines the device class {name!r} ({folder}); {hint}known: "
            f"{', '.join(known) or 'none'}. Use one of these, or add {name}.yaml there "
            f"(or point {PROFILES_ENV} at your profiles)")


def _release_key(path: str) -> SigningKey:
    """Load a --key file, refusing one made for another role before any work is done."""
    key = SigningKey.load(path)
    require_role(key.role, "release", path, option="--key")
    return key


def _sign(args: argparse.Namespace) -> int:
    from fleetlite.sdk.bundle import sign_bundle

    keys = [_release_key(path) for path in args.key]
    for key in keys:
        envelope = sign_bundle(args.bundle, key)
    print(f"signed {args.bundle}: {len(envelope.signatures)} signature(s) "
          f"({', '.join(k[:12] for k in envelope.keyids)})")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from fleetlite.fleet.errors import FleetError
    from fleetlite.fleet.fleet_root import resolve_fleet_root
    from fleetlite.fleet.release_smoke import run_bundle_smoke
    from fleetlite.sdk.bundle import load_bundle

    chosen = resolve_fleet_root(args.root)
    if chosen is None:
        raise FleetError("no root to verify against: give --root root.json, or set the fleet's "
                         "root once with `fleetlite keys root use root.json`")
    root = chosen.root
    args.root = str(chosen.path)
    bundle = load_bundle(args.bundle)
    result: dict[str, Any] = {"bundle": args.bundle, "release_id": bundle.release_id}
    try:
        manifest = bundle.verify(root, device_class=args.device_class,
                                 installed_version=args.installed_version,
                                 agent_version=args.agent_version, time_floor=time.time())
    except UpdateRejected as exc:
        result.update(ok=False, reason=exc.reason, message=str(exc))
        return _report(args, result)
    result.update(ok=True, name=manifest.name, version=manifest.version)
    if args.smoke:
        problems = run_bundle_smoke(bundle)
        result["smoke"] = problems or "ok"
        if problems:
            result.update(ok=False, reason="smoke_failed", message="; ".join(problems))
    return _report(args, result)


_RELEASE_ID = re.compile(r"[0-9a-f]{6,64}")


def _stored_release(args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    """The release RELEASE_ID (or a unique prefix of 6+ characters) from the fleet store
    (--db, $FLEETLITE_DB, the current context, or sqlite:///fleetlite.db)."""
    from fleetlite.fleet.cli_config import pick
    from fleetlite.fleet.client import Fleet
    from fleetlite.fleet.errors import RecordNotFoundError
    from fleetlite.sdk.bundle import bundle_from_bytes

    for dest, value in pick(args).items():
        setattr(args, dest, value)
    with Fleet(getattr(args, "db", None), create=False) as fleet:
        info = fleet.release(args.bundle)
        stored = fleet.store.get_release(info.release_id)
        if stored is None:
            raise RecordNotFoundError(f"release {info.release_id[:16]} left the store "
                                      f"{fleet.store.url} while it was read; try again")
        bundle = bundle_from_bytes(stored.envelope, stored.files,
                                   origin=f"release {info.release_id[:16]} in {fleet.store.url}")
        return bundle, {"store": fleet.store.url, "pushed": _utc(info.created)}


def _utc(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def _report(args: argparse.Namespace, result: dict[str, Any]) -> int:
    if emit(args, result):
        pass
    elif result["ok"]:
        smoke = " and its smoke test passes here" if args.smoke else ""
        print(f"OK: {result['name']} v{result['version']} verifies against {args.root}{smoke} "
              f"(release id {result['release_id'][:16]})")
    else:
        print(f"REJECTED [{result['reason']}]: {result['message']}", file=sys.stderr)
    return 0 if result["ok"] else 1


def _show(args: argparse.Namespace) -> int:
    from fleetlite.sdk.bundle import load_bundle

    source = Path(args.bundle)
    where: dict[str, Any] = {}
    if source.exists() or not _RELEASE_ID.fullmatch(args.bundle):
        bundle = load_bundle(source)
    else:
        bundle, where = _stored_release(args)
    summary = bundle.summary()
    summary.update(where)
    if emit(args, summary):
        return 0
    print(f"{summary['name']} v{summary['version']}  (NOT verified: use `fleetlite release "
          "verify --root root.json`)")
    expires = summary["expires"] + (" EXPIRED" if summary["expired"] else "")
    rows = [
        ("release id", summary["release_id"]),
        ("issued", summary["issued"]),
        ("expires", expires),
        ("device classes", ", ".join(summary["device_classes"])),
        ("min agent", summary["min_agent_version"]),
        ("signatures", ", ".join(k[:12] for k in summary["signatures"]) or "none"),
    ]
    if where:
        rows += [("stored in", where["store"]), ("pushed", where["pushed"])]
    for key, value in rows:
        print(f"  {key:<15} {value}")
    print("  files:")
    for entry in summary["files"]:
        print(f"    {entry['name']:<36} {entry['role']:<6} {entry['length']:>10} B  "
              f"sha256 {entry['sha256'][:12]}  {entry['status']}")
    for variant in summary["variants"]:
        print(f"  variant {variant['name']} ({variant['file']}):")
        for kind in ("inputs", "outputs"):
            for tensor in variant[kind]:
                quant = " quantized" if "quantization" in tensor else ""
                print(f"    {kind[:-1]:<6} {tensor['name']:<24} {tensor['dtype']:<8} "
                      f"{tensor['shape']}{quant}")
    return 0
