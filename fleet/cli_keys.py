"""``fleetlite keys``: create signing keys; init, rotate, sign and show the root of trust."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from fleetlite.sdk.durations import parse_duration
from fleetlite.sdk.envelope import Envelope, verify_threshold
from fleetlite.sdk.errors import KeyFileError, SignatureError, UpdateRejected
from fleetlite.sdk.keys import (
    PRIVATE_KEY_TYPE,
    ROLES,
    PublicKey,
    SigningKey,
    load_public_key,
    require_role,
)
from fleetlite.sdk.out_dirs import missing_dirs, say_created
from fleetlite.sdk.trust import (
    Root,
    load_trusted_root,
    new_root,
    parse_root_envelope,
    root_envelope,
    update_root,
)

EXAMPLES = """\
examples:
  fleetlite keys create --role root --out ~/.fleetlite/keys
  fleetlite keys create --role release --out ~/.fleetlite/keys
  fleetlite keys public ~/.fleetlite/keys/release-1a2b3c4d5e6f.key
  fleetlite keys root init --root-key keys/root-aaaa.key --release-key keys/release-bbbb.pub \\
      --out root.json
  fleetlite keys root init --root-key r1.key r2.pub r3.pub --threshold 2 \\
      --release-key a.pub b.pub --release-threshold 2 --out root.json
  fleetlite keys root sign root.json --key r2.key
  fleetlite keys root rotate --root root.json --sign r1.key r2.key \\
      --root-key r2.key r4.key --release-key a.pub c.pub --out root-v2.json
  fleetlite keys root show root-v2.json --previous root.json
  fleetlite keys root use root.json      (the fleet's root: `release push` checks against it)
  fleetlite keys root use root-v2.json   (after a rotation: accepted if devices accept it)
  fleetlite keys root current

A .key file is private (mode 0600, never printed); a .pub file may be shared. Where a command
takes keys, a .key file both names the key and signs with it, a .pub file only names it.

exit codes: 0 ok, 1 the command failed (the message says why), 2 usage error
"""

ROOT_EXPIRES_DEFAULT = "365d"
OUTPUTS = ("table", "json", "yaml")
EXIT_CODES = "exit codes: 0 ok, 1 the command failed (the message says why), 2 usage error"


def help_text(examples: str, exit_codes: str = EXIT_CODES) -> dict[str, Any]:
    """``add_parser`` keywords for a leaf command: its examples and exit codes as the epilog."""
    return {"epilog": f"examples:\n{examples}\n{exit_codes}\n",
            "formatter_class": argparse.RawDescriptionHelpFormatter}


def add_output(parser: argparse.ArgumentParser) -> None:
    """``-o table|json|yaml`` (shared by the keys and release verbs)."""
    parser.add_argument("-o", "--output", choices=OUTPUTS, default="table",
                        help="output format (default table; json and yaml for scripts)")


def emit(args: argparse.Namespace, doc: Any) -> bool:
    """Print ``doc`` as JSON or YAML if ``-o`` asks for it; False: print the table yourself."""
    if args.output == "json":
        print(json.dumps(doc, indent=2))
        return True
    if args.output == "yaml":
        import yaml

        print(str(yaml.safe_dump(doc, sort_keys=False, default_flow_style=False)).rstrip("\n"))
        return True
    return False


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "keys",
        help="create signing keys; create, rotate and sign the root of trust",
        description="Ed25519 signing keys and the root metadata devices are provisioned with.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="keys_command", metavar="COMMAND")

    create = sub.add_parser("create", help="create a key pair (.key private, .pub public)",
                            description="Create an Ed25519 key pair. Prints the key id and the "
                            "public key; the private key goes only into the 0600 .key file.",
                            **help_text("""\
  fleetlite keys create --role root --out ~/.fleetlite/keys
  fleetlite keys create --role release --out keys --name release-ci
"""))
    create.add_argument("--role", required=True, choices=ROLES, help="what the key will sign")
    create.add_argument("--out", required=True, metavar="DIR",
                        help="directory for the key files (created with mode 0700 if missing)")
    create.add_argument("--name", help="base file name (default: ROLE-KEYID12)")

    public = sub.add_parser("public", help="print (or write) the public key of a key file",
                            **help_text("""\
  fleetlite keys public keys/release-1a2b3c4d5e6f.key
  fleetlite keys public keys/release-1a2b3c4d5e6f.key --out release-ci.pub
"""))
    public.add_argument("key", help="a .key or .pub file")
    public.add_argument("--out", help="write a .pub file here instead of printing it")

    root = sub.add_parser("root", help="root metadata: init, rotate, sign, show, use, current, "
                          "distribute",
                          epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    root_sub = root.add_subparsers(dest="root_command", metavar="COMMAND")

    init = root_sub.add_parser("init", help="create root metadata version 1", **help_text("""\
  fleetlite keys root init --root-key keys/root-aaaa.key --release-key keys/release-bbbb.pub \\
      --out root.json
  fleetlite keys root init --root-key r1.key r2.pub r3.pub --threshold 2 \\
      --release-key a.pub b.pub --release-threshold 2 --expires-in 52w --out root.json
"""))
    _add_role_arguments(init)
    init.add_argument("--out", required=True, help="root.json to write (must not exist)")

    rotate = root_sub.add_parser(
        "rotate", help="create root version N+1, signed by old and new root keys",
        description="Create the next root version. It must be signed by a threshold of the "
        "CURRENT root keys (--sign) and of the NEW root keys (.key files among --root-key); "
        "missing signatures can be added later with `fleetlite keys root sign`.",
        **help_text("""\
  fleetlite keys root rotate --root root.json --sign r1.key r2.key \\
      --root-key r2.key r4.key --release-key a.pub c.pub --out root-v2.json
"""))
    rotate.add_argument("--root", required=True, help="the current root.json")
    _add_role_arguments(rotate)
    rotate.add_argument("--sign", nargs="+", action="extend", default=[], metavar="KEY",
                        help="current root .key files to sign with")
    rotate.add_argument("--out", required=True, help="new root file to write (must not exist)")

    sign = root_sub.add_parser("sign", help="add a signature to a root file (in place)",
                               **help_text("""\
  fleetlite keys root sign root-v2.json --key r4.key
"""))
    sign.add_argument("root", help="root file")
    sign.add_argument("--key", required=True, nargs="+", action="extend", help=".key file(s)")

    show = root_sub.add_parser(
        "show", help="describe a root file and check its signatures", **help_text("""\
  fleetlite keys root show root.json
  fleetlite keys root show root-v2.json --previous root.json -o json
""", "exit codes: 0 ok, 1 the signatures or the rotation do not verify (or the file cannot be "
     "read), 2 usage error"))
    show.add_argument("root", help="root file")
    show.add_argument("--previous", help="the root it rotates from: also check the rotation")
    add_output(show)

    use = root_sub.add_parser(
        "use", help="make a root file the fleet's root (release push checks against it)",
        description="Keep a copy of ROOT as the fleet's root of trust: `fleetlite release push` "
        "then refuses, with the device's reason, any release the fleet's devices would refuse. "
        "The copy is fleet-root.json beside the CLI config file ($FLEETLITE_CONFIG, else "
        "$XDG_CONFIG_HOME/fleetlite/, default ~/.config/fleetlite/), or fleet-root.CONTEXT.json "
        "while a context is current (`fleetlite config use-context`). --root on a command and "
        "$FLEETLITE_ROOT override it. Replacing it with a newer root must be a rotation devices "
        "accept (N+1, signed by old and new root keys).",
        epilog="""examples:
  fleetlite keys root use root.json
  fleetlite keys root use root-v2.json
  fleetlite keys root use other-root.json --force   (a fleet re-provisioned with another root)

exit codes: 0 ok, 1 the root is unusable or devices would refuse the change, 2 usage error
""", formatter_class=argparse.RawDescriptionHelpFormatter)
    use.add_argument("root", help="the root.json the fleet's devices are provisioned with")
    use.add_argument("--force", action="store_true",
                     help="replace the stored root even if it is not a rotation from it")
    add_output(use)

    current = root_sub.add_parser(
        "current", help="show the fleet's root (`keys root use`) and where it comes from",
        epilog="""examples:
  fleetlite keys root current
  FLEETLITE_ROOT=root.json fleetlite keys root current -o json

exit codes: 0 ok, 1 no fleet root is configured or it is unusable, 2 usage error
""", formatter_class=argparse.RawDescriptionHelpFormatter)
    add_output(current)
    from fleetlite.fleet.cli_commands import add_root_distribute
    from fleetlite.fleet.cli_fleet import _leaf

    add_root_distribute(root_sub, _leaf)
    return parser


def _add_role_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root-key", required=True, nargs="+", action="extend", metavar="KEY",
                        help="root key files (.key also signs, .pub only names the key)")
    parser.add_argument("--release-key", required=True, nargs="+", action="extend",
                        metavar="KEY", help="release key files (.pub or .key)")
    parser.add_argument("--threshold", type=int, default=1,
                        help="distinct root keys that must sign a root (default 1)")
    parser.add_argument("--release-threshold", type=int, default=1,
                        help="distinct release keys that must sign a release (default 1)")
    parser.add_argument("--expires-in", type=duration_arg, default=ROOT_EXPIRES_DEFAULT,
                        metavar="DURATION",
                        help=f"root expiry, e.g. 365d or 52w (default {ROOT_EXPIRES_DEFAULT})")


def duration_arg(text: str) -> int:
    """argparse type for durations such as 30d or 12h (shared by the keys and release verbs)."""
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def run(args: argparse.Namespace) -> int:
    try:
        return _dispatch(args)
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"fleetlite keys: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 1


def _dispatch(args: argparse.Namespace) -> int:
    command = args.keys_command
    if command == "create":
        return _create(args)
    if command == "public":
        return _public(args)
    if command == "root":
        sub = args.root_command
        if sub == "init":
            return _root_init(args)
        if sub == "rotate":
            return _root_rotate(args)
        if sub == "sign":
            return _root_sign(args)
        if sub == "show":
            return _root_show(args)
        if sub == "use":
            return _root_use(args)
        if sub == "current":
            return _root_current(args)
    print("fleetlite keys: give a command; see `fleetlite keys --help`", file=sys.stderr)
    return 2


def _create(args: argparse.Namespace) -> int:
    out = Path(args.out).expanduser()
    created = missing_dirs(out)
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    say_created(created)
    key = SigningKey.generate(role=args.role)
    base = args.name or f"{args.role}-{key.keyid[:12]}"
    private = key.save(out / f"{base}.key")
    public = key.save_public(out / f"{base}.pub")
    print(f"created {args.role} key")
    print(f"  key id:       {key.keyid}")
    print(f"  public key:   {key.public_key.public.hex()}")
    print(f"  private file: {private}  (mode 0600: keep it secret, back it up offline)")
    print(f"  public file:  {public}")
    return 0


def _public(args: argparse.Namespace) -> int:
    public, role = load_public_key(args.key)
    if args.out:
        public.save(args.out, role)
        print(f"wrote {args.out} (key id {public.keyid})")
    else:
        sys.stdout.write(public.to_file_json(role).decode())
    return 0


def _load_keys(paths: list[str], role: str,
               option: str = "") -> tuple[list[PublicKey], list[SigningKey]]:
    """Public keys in order (deduplicated) and the private ones among them; a key file made for
    another role than ``role`` is refused (``option``: the option it was given as)."""
    publics: dict[str, PublicKey] = {}
    signers: list[SigningKey] = []
    for path in paths:
        if _is_private(Path(path)):
            key = SigningKey.load(path)
            require_role(key.role, role, path, option=option)
            signers.append(key)
            publics.setdefault(key.keyid, key.public_key)
        else:
            public, file_role = load_public_key(path)
            require_role(file_role, role, path, option=option)
            publics.setdefault(public.keyid, public)
    return list(publics.values()), signers


def _is_private(path: Path) -> bool:
    try:
        with path.open("rb") as handle:
            head = handle.read(4096)
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read key file ({exc.strerror})") from None
    return PRIVATE_KEY_TYPE.encode() in head


def _write_root(path: Path, envelope: Envelope) -> None:
    from fleetlite.sdk.atomic import write_atomic

    if path.exists():
        raise KeyFileError(f"{path}: already exists; choose another --out file")
    if not path.parent.is_dir():
        raise KeyFileError(f"{path.parent}: no such directory; create it first, or choose "
                           "another --out file")
    write_atomic(path, envelope.to_json())


def _new_root_from_args(args: argparse.Namespace, version: int) -> tuple[Root, list[SigningKey]]:
    root_keys, root_signers = _load_keys(args.root_key, "root", "--root-key")
    release_keys, _ = _load_keys(args.release_key, "release", "--release-key")
    root = new_root(root_keys, release_keys, expires=int(time.time()) + args.expires_in,
                    root_threshold=args.threshold, release_threshold=args.release_threshold,
                    version=version)
    return root, root_signers


def _threshold_status(envelope: Envelope, root: Root, role: str, label: str) -> tuple[bool, str]:
    wanted = root.roles[role].threshold
    try:
        valid = verify_threshold(envelope, root.authorised_keys(role), wanted, role=label)
    except SignatureError as exc:
        return False, f"{label}: NOT MET ({exc.reason}: {exc})"
    return True, f"{label}: met ({len(valid)} of {len(root.roles[role].keyids)} keys signed, " \
                 f"threshold {wanted})"


def _root_init(args: argparse.Namespace) -> int:
    root, signers = _new_root_from_args(args, 1)
    envelope = root_envelope(root)
    for key in signers:
        envelope = envelope.sign(key)
    _write_root(Path(args.out), envelope)
    met, status = _threshold_status(envelope, root, "root", "root signatures")
    print(f"wrote {args.out}: root version 1, expires {_expiry(root.expires)}")
    _print_roles(root)
    print(f"  {status}")
    if not met:
        print(f"add signatures with: fleetlite keys root sign {args.out} --key ROOT.key",
              file=sys.stderr)
    return 0


def _root_rotate(args: argparse.Namespace) -> int:
    current = load_trusted_root(Path(args.root).read_bytes())
    root, new_signers = _new_root_from_args(args, current.version + 1)
    _, old_signers = _load_keys(args.sign, "root", "--sign")
    envelope = root_envelope(root)
    for key in {k.keyid: k for k in (*old_signers, *new_signers)}.values():
        envelope = envelope.sign(key)
    _write_root(Path(args.out), envelope)
    old_ok, old_status = _threshold_status(envelope, current, "root",
                                           f"current root (v{current.version}) keys")
    new_ok, new_status = _threshold_status(envelope, root, "root",
                                           f"new root (v{root.version}) keys")
    print(f"wrote {args.out}: root version {root.version}, expires {_expiry(root.expires)}")
    _print_roles(root)
    print(f"  {old_status}\n  {new_status}")
    if not (old_ok and new_ok):
        print(f"devices will refuse it until both thresholds are met; add signatures with: "
              f"fleetlite keys root sign {args.out} --key KEY.key", file=sys.stderr)
    return 0


def _root_sign(args: argparse.Namespace) -> int:
    from fleetlite.sdk.atomic import write_atomic

    path = Path(args.root)
    envelope, root = parse_root_envelope(path.read_bytes())
    for key_path in args.key:
        key = SigningKey.load(key_path)
        require_role(key.role, "root", key_path, option="--key")
        if key.keyid not in root.keys:
            print(f"note: key {key.keyid[:12]} is not listed in this root; its signature only "
                  "counts for the previous root during a rotation", file=sys.stderr)
        envelope = envelope.sign(key)
    write_atomic(path, envelope.to_json())
    _, status = _threshold_status(envelope, root, "root", "root signatures")
    print(f"signed {path} (now {len(envelope.signatures)} signature(s))\n  {status}")
    return 0


def _root_show(args: argparse.Namespace) -> int:
    data = Path(args.root).read_bytes()
    envelope, root = parse_root_envelope(data)
    self_ok, self_status = _threshold_status(envelope, root, "root", "root signatures")
    result: dict[str, Any] = {
        "version": root.version,
        "expires": _iso(root.expires),
        "expired": root.expires <= time.time(),
        "roles": {name: {"threshold": role.threshold, "keyids": list(role.keyids)}
                  for name, role in root.roles.items()},
        "signatures": list(envelope.keyids),
        "self_signed": self_ok,
    }
    rotation_ok = True
    if args.previous:
        previous = load_trusted_root(Path(args.previous).read_bytes())
        try:
            update_root(previous, data)
            result["rotation"] = "ok"
        except UpdateRejected as exc:
            rotation_ok = False
            result["rotation"] = {"reason": exc.reason, "message": str(exc)}
    if not emit(args, result):
        print(f"root version {root.version}, expires {_expiry(root.expires)}")
        _print_roles(root)
        print(f"  {self_status}")
        if args.previous:
            rotation = result["rotation"]
            verdict = ("ok" if rotation == "ok"
                       else f"REFUSED [{rotation['reason']}] {rotation['message']}")
            print(f"  rotation from {args.previous}: {verdict}")
    return 0 if self_ok and rotation_ok else 1


def _root_use(args: argparse.Namespace) -> int:
    from fleetlite.fleet.fleet_root import ROOT_ENV, use_root

    root, stored, previous = use_root(Path(args.root), force=args.force)
    if emit(args, {"root": args.root, "stored": str(stored), "version": root.version,
                   "previous_version": previous.version if previous is not None else None,
                   "expires": _iso(root.expires), "expired": root.expires <= time.time()}):
        return 0
    change = f" (was v{previous.version})" if previous is not None else ""
    print(f"the fleet's root is now {args.root}: version {root.version}{change}, expires "
          f"{_expiry(root.expires)}")
    _print_roles(root)
    print(f"  stored as {stored}; `fleetlite release push` checks releases against it")
    if os.environ.get(ROOT_ENV):
        print(f"note: {ROOT_ENV}={os.environ[ROOT_ENV]} is set and overrides it in this shell",
              file=sys.stderr)
    return 0


def _root_current(args: argparse.Namespace) -> int:
    from fleetlite.fleet.errors import FleetError
    from fleetlite.fleet.fleet_root import resolve_fleet_root, stored_root_path

    chosen = resolve_fleet_root(None)
    if chosen is None:
        raise FleetError(f"no fleet root is configured (none at {stored_root_path()}): set it "
                         "with `fleetlite keys root use root.json`")
    root = chosen.root
    doc = {"path": str(chosen.path), "source": chosen.source, "version": root.version,
           "expires": _iso(root.expires), "expired": root.expires <= time.time(),
           "roles": {name: {"threshold": role.threshold, "keyids": list(role.keyids)}
                     for name, role in root.roles.items()}}
    if emit(args, doc):
        return 0
    print(f"fleet root {chosen.path} ({chosen.source}): version {root.version}, expires "
          f"{_expiry(root.expires)}")
    _print_roles(root)
    return 0


def _expiry(ts: int) -> str:
    """A UTC ISO time, marked EXPIRED once it has passed."""
    return f"{_iso(ts)} EXPIRED" if ts <= time.time() else _iso(ts)


def _print_roles(root: Root) -> None:
    for name, role in root.roles.items():
        ids = ", ".join(k[:12] for k in role.keyids)
        print(f"  {name:<8} threshold {role.threshold} of {len(role.keyids)}: {ids}")


def _iso(ts: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))
