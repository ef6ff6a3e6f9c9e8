"""``fleetlite pki`` (the fleet CA, certificates, revocation, enrolment bundles) and
``fleetlite broker-config`` (Mosquitto configuration and ACL): thin verbs over
:mod:`fleetlite.fleet.pki` and :mod:`fleetlite.fleet.broker_config`. No verb prints a key."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

from fleetlite.fleet.broker_config import (
    DEFAULT_MAX_INFLIGHT_MESSAGES,
    DEFAULT_MAX_QUEUED_BYTES,
    DEFAULT_MAX_QUEUED_MESSAGES,
    DEFAULT_PORT,
)
from fleetlite.sdk.out_dirs import missing_dirs, say_created

if TYPE_CHECKING:
    from cryptography import x509

    from fleetlite.fleet.pki import Pki, PkiIndex

ENV_PKI = "FLEETLITE_PKI"
DEFAULT_PKI = "pki"
OUTPUTS = ("table", "json", "yaml")
# fleet/pki.py's DEFAULT_VALIDITY_DAYS and REASONS, repeated so that `fleetlite` starts without
# loading cryptography's x509 (tests/test_pki.py checks that they agree)
DEFAULT_VALIDITY_DAYS = {"ca": 3650, "device": 1095, "controller": 365, "operator": 90,
                         "broker": 825, "crl": 365}
REASONS = ("unspecified", "key-compromise", "superseded", "cessation-of-operation",
           "affiliation-changed")
EXIT_CODES = "exit codes: 0 ok, 1 the command failed (the message says why), 2 usage error"
PKI_HELP = (f"the PKI directory that `fleetlite pki init` created (env {ENV_PKI}; default "
            f"./{DEFAULT_PKI})")

EXAMPLES = """\
examples:
  fleetlite pki init fleet-pki --name "Acme fleet CA"
  export FLEETLITE_PKI=fleet-pki          (the PKI of the commands below; or --pki DIR on each)
  fleetlite pki issue broker --dns mqtt.example.net --ip 10.0.0.5
  fleetlite pki issue controller ctl-1
  fleetlite pki issue operator alice --valid-for 30d
  fleetlite pki enrol gw-0001 --class raspberry-pi-4 --broker mqtts://mqtt.example.net:8883 \\
      --root root.json --out gw-0001 --tar
  fleetlite pki issue device gw-0002 --class raspberry-pi-5 --out certs/
  fleetlite pki list
  fleetlite pki list --kind device -o json
  fleetlite pki revoke gw-0001 --reason key-compromise
  fleetlite pki revoke 4f3a9c1e2b7d5a60 --serial
  fleetlite pki crl --valid-for 365d
  fleetlite broker-config --out broker/ --install-dir /etc/mosquitto/fleetlite

Identities: a device certificate's CN is its device id; controllers and operators are
controller:NAME and operator:NAME, which no device id can be (no ':'), so the broker ACL
keeps them apart. Keys are ECDSA P-256, written with mode 0600 and never printed.

""" + EXIT_CODES + "\n"

BROKER_EXAMPLES = """\
examples:
  fleetlite broker-config --out broker/ --pki fleet-pki
  fleetlite broker-config --out broker/ --install-dir /etc/mosquitto/fleetlite
  fleetlite broker-config --out /etc/mosquitto/fleetlite --port 8883 --local-port 1883 \\
      --persistence-dir /var/lib/mosquitto
  mosquitto -c broker/mosquitto.conf              (try it in the foreground)

It writes mosquitto.conf, fleetlite.acl and the broker's TLS files (ca.pem, crl.pem,
broker.pem, broker.key with mode 0600) into --out; mosquitto.conf names them under
--install-dir (default: --out), where Mosquitto will read them. Run it again after
`fleetlite pki issue controller|operator` or `fleetlite pki revoke`, install the files
and reload Mosquitto (systemctl reload mosquitto: the ACL and the CRL are re-read).

""" + EXIT_CODES + "\n"


# -- parsers ---------------------------------------------------------------------------------


def _parent() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--pki", metavar="DIR", help=PKI_HELP)
    parent.add_argument("-o", "--output", choices=OUTPUTS, default="table",
                        help="output format (default table; json and yaml for scripts)")
    return parent


def _days(text: str) -> float:
    """argparse type: a duration (365d, 52w, 12h) in days."""
    from fleetlite.sdk.durations import parse_duration

    try:
        return parse_duration(text) / 86400
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _port(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number 1..65535")
    return int(text)


def _count(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1")
    return int(text)


def _tag(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r}: write KEY=VALUE, e.g. site=plant-7")
    return key, value


def _validity(parser: argparse.ArgumentParser, kind: str) -> None:
    parser.add_argument("--valid-for", type=_days, metavar="DURATION",
                        help=f"how long the certificate is valid, e.g. 365d or 52w (default "
                        f"{DEFAULT_VALIDITY_DAYS[kind]}d; never beyond the CA's own end)")


def add_parsers(subparsers: Any) -> None:
    """Add ``pki`` and ``broker-config`` to ``fleetlite``'s subparsers."""
    common = _parent()
    pki = subparsers.add_parser(
        "pki", help="the fleet CA: certificates for devices, controllers, operators and the "
        "broker; revocation; enrolment bundles",
        description="A fleet certificate authority for TLS between gateways, controllers and "
        "the MQTT broker. Every client certificate's CN is its MQTT username, which the "
        "broker ACL of `fleetlite broker-config` is written for.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    pki.set_defaults(pki_usage=pki, pki_handler=None)
    sub = pki.add_subparsers(dest="pki_command", metavar="COMMAND")

    init = sub.add_parser("init", parents=[common], help="create the fleet CA in a new directory",
                          description="Create a CA (ECDSA P-256, self-signed, path length 0) "
                          "in DIR, created with mode 0700: ca.pem, ca.key (0600), index.json "
                          "and an empty crl.pem. Keep DIR off the broker and the gateways, and "
                          "back it up: whoever holds ca.key can enrol devices.",
                          epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    init.add_argument("directory", metavar="DIR", help="the new PKI directory")
    init.add_argument("--name", default="FleetLite fleet CA",
                      help="the CA's common name (default 'FleetLite fleet CA')")
    _validity(init, "ca")
    init.set_defaults(pki_handler=_init)

    issue = sub.add_parser("issue", help="issue a certificate and key (device, controller, "
                           "operator, broker)", epilog=EXAMPLES,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    issue.set_defaults(pki_usage=issue)
    kinds = issue.add_subparsers(dest="kind", metavar="KIND")
    described = {
        "device": ("a gateway; NAME is its device id (letters, digits, - _ .), the CN and "
                   "MQTT username", "ID"),
        "controller": ("a fleet controller (`fleetlite serve`); CN controller:NAME", "NAME"),
        "operator": ("an operator's read-only client (mosquitto_sub); CN operator:NAME",
                     "NAME"),
    }
    for kind, (text, metavar) in described.items():
        leaf = kinds.add_parser(kind, parents=[common], help=text,
                                description=f"Issue a TLS client certificate for {text}. "
                                "Writes NAME.pem and NAME.key (mode 0600) into --out.",
                                epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
        leaf.add_argument("name", metavar=metavar)
        if kind == "device":
            leaf.add_argument("--class", dest="device_class", required=True, metavar="CLASS",
                              help="the device class (a profile in device_profiles/), e.g. "
                              "raspberry-pi-4")
        _issue_options(leaf, kind)
    broker = kinds.add_parser(
        "broker", parents=[common], help="the MQTT broker's TLS server certificate",
        description="Issue the broker's server certificate (serverAuth) naming every host name "
        "and address clients connect to; Python 3.13+ verifies it strictly (RFC 5280).",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    broker.add_argument("--dns", action="append", default=[], metavar="HOST",
                        help="a DNS name clients connect to (repeat for more)")
    broker.add_argument("--ip", action="append", default=[], metavar="ADDRESS",
                        help="an IP address clients connect to (repeat for more)")
    _issue_options(broker, "broker")

    revoke = sub.add_parser(
        "revoke", parents=[common], help="revoke certificates and re-sign crl.pem",
        description="Revoke every valid certificate of an identity (a device id, "
        "controller:NAME, operator:NAME, broker:HOST), or one by serial number (a unique "
        "prefix of 8+ hex digits will do), and re-sign crl.pem listing all revoked serials. "
        "Then run `fleetlite broker-config` and reload the broker.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    revoke.add_argument("target", metavar="ID|SERIAL")
    revoke.add_argument("--serial", action="store_true",
                        help="TARGET is a serial number, even if an identity has that name")
    revoke.add_argument("--reason", choices=REASONS, default="unspecified",
                        help="the CRL reason code (default unspecified)")
    revoke.set_defaults(pki_handler=_revoke)

    crl = sub.add_parser(
        "crl", parents=[common], help="re-sign crl.pem (before it expires)",
        description="Re-sign the CRL with the same revocations and a new next-update time. "
        "A broker whose CRL is past its next update refuses every client: re-sign it in time "
        "(`fleetlite pki list` shows when it expires).",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    crl.add_argument("--valid-for", type=_days, metavar="DURATION",
                     default=float(DEFAULT_VALIDITY_DAYS["crl"]),
                     help=f"until the next update (default {DEFAULT_VALIDITY_DAYS['crl']}d)")
    crl.set_defaults(pki_handler=_crl)

    listing = sub.add_parser("list", parents=[common], help="the certificates issued and the CRL",
                             epilog=EXAMPLES,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    listing.add_argument("--kind", choices=("device", "controller", "operator", "broker"),
                         help="only certificates of this kind")
    listing.set_defaults(pki_handler=_list)

    enrol = sub.add_parser(
        "enrol", parents=[common], help="a ready-to-install bundle for a new gateway",
        description="Issue the gateway's certificate and write, into a new directory (mode "
        "0700): ID.key (0600), ID.pem, ca.pem, the fleet's root.json and an agent.yaml naming "
        "them relative to itself. Copy the directory to the gateway as /etc/fleetlite (see "
        "docs/operator-guide.md); --tar also writes OUT.tar (mode 0600) to carry it.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    enrol.add_argument("name", metavar="ID", help="the gateway's device id")
    enrol.add_argument("--class", dest="device_class", required=True, metavar="CLASS",
                       help="the device class, e.g. raspberry-pi-4")
    enrol.add_argument("--broker", dest="enrol_broker", required=True, metavar="URL",
                       help="where the agent connects: mqtts://HOST:PORT (TLS; port 8883 by "
                       "default); HOST must be named by the broker's certificate")
    enrol.add_argument("--root", required=True, metavar="FILE",
                       help="the fleet's root.json (fleetlite keys root init)")
    enrol.add_argument("--out", required=True, metavar="DIR",
                       help="the bundle directory to create (must not exist, or be empty)")
    enrol.add_argument("--tar", action="store_true", help="also write OUT.tar (mode 0600)")
    enrol.add_argument("--state-dir", default="/var/lib/fleetlite", metavar="DIR",
                       help="agent.yaml state_dir (default /var/lib/fleetlite)")
    enrol.add_argument("--socket", default="/run/fleetlite/agent.sock", metavar="PATH",
                       help="agent.yaml socket, the local inference API (default "
                       "/run/fleetlite/agent.sock; 'none' to leave it out)")
    enrol.add_argument("--tag", action="append", type=_tag, default=[], metavar="KEY=VALUE",
                       help="agent.yaml tags, e.g. --tag site=plant-7 (repeat for more)")
    enrol.add_argument("--renew", action="store_true",
                       help="issue even though the device has a valid certificate")
    _validity(enrol, "device")
    enrol.set_defaults(pki_handler=_enrol)

    config = subparsers.add_parser(
        "broker-config", parents=[common],
        help="write a Mosquitto configuration and ACL for the fleet",
        description="Write a Mosquitto 2.0 configuration: a TLS listener that requires a "
        "client certificate from the fleet CA and uses its CN as the MQTT username, the CRL, "
        "an ACL that keeps each device in its own topics, and message, queue and in-flight "
        "limits sized for the protocol's largest message and a controller's backlog.",
        epilog=BROKER_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    config.add_argument("--out", required=True, metavar="DIR",
                        help="where to write the files (created with mode 0700)")
    config.add_argument("--install-dir", metavar="DIR",
                        help="where Mosquitto will read them (default: --out, absolute)")
    config.add_argument("--port", type=_port, default=DEFAULT_PORT,
                        help=f"the TLS listener's port (default {DEFAULT_PORT})")
    config.add_argument("--bind", metavar="ADDRESS",
                        help="the TLS listener's address (default: every interface)")
    config.add_argument("--local-port", type=_port, metavar="PORT",
                        help="also a plain listener on 127.0.0.1:PORT without ACL, for tools "
                        "on the broker's host (default: none)")
    config.add_argument("--persistence-dir", metavar="DIR",
                        help="keep sessions and retained messages across restarts there")
    config.add_argument("--max-packet-size", type=_count, metavar="BYTES",
                        help="largest MQTT packet (default: the protocol's largest message, a "
                        "512 KiB release manifest envelope, + 64 KiB)")
    config.add_argument("--max-queued-messages", type=_count,
                        default=DEFAULT_MAX_QUEUED_MESSAGES, metavar="N",
                        help=f"QoS 1 messages queued per client (default "
                        f"{DEFAULT_MAX_QUEUED_MESSAGES})")
    config.add_argument("--max-queued-bytes", type=_count, default=DEFAULT_MAX_QUEUED_BYTES,
                        metavar="BYTES", help=f"bytes queued per client (default "
                        f"{DEFAULT_MAX_QUEUED_BYTES}, 128 MiB)")
    config.add_argument("--max-inflight-messages", type=_count,
                        default=DEFAULT_MAX_INFLIGHT_MESSAGES, metavar="N",
                        help=f"QoS 1 messages in flight per client (default "
                        f"{DEFAULT_MAX_INFLIGHT_MESSAGES})")
    config.add_argument("--broker-cert", metavar="FILE",
                        help="the broker certificate (default: the newest valid one this PKI "
                        "issued, from its broker/ directory)")
    config.add_argument("--broker-key", metavar="FILE", help="the key of --broker-cert")
    config.set_defaults(pki_handler=_broker_config, pki_usage=config)


def _issue_options(parser: argparse.ArgumentParser, kind: str) -> None:
    parser.add_argument("--out", metavar="DIR",
                        help=f"where to write the files (default: the PKI's "
                        f"{'broker' if kind == 'broker' else kind + 's'}/ directory; created "
                        "with mode 0700)")
    parser.add_argument("--renew", action="store_true",
                        help="issue even though this identity has a valid certificate (to "
                        "replace one before it expires; revoke the old one afterwards)")
    _validity(parser, kind)
    parser.set_defaults(pki_handler=_issue, kind=kind)


# -- running ---------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    """Run the ``pki`` or ``broker-config`` verb ``args`` were parsed for."""
    handler: Optional[Callable[[argparse.Namespace], int]] = getattr(args, "pki_handler", None)
    if handler is None:
        args.pki_usage.print_help(sys.stderr)
        return 2
    try:
        return handler(args)
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"fleetlite: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 1


def _pki_dir(args: argparse.Namespace) -> Path:
    return Path(args.pki or os.environ.get(ENV_PKI) or DEFAULT_PKI).expanduser()


def _open(args: argparse.Namespace) -> Pki:
    from fleetlite.fleet.pki import Pki

    return Pki.open(_pki_dir(args))


def _emit(args: argparse.Namespace, doc: Any, text: Callable[[], str]) -> None:
    if args.output == "json":
        print(json.dumps(doc, indent=2))
    elif args.output == "yaml":
        import yaml

        print(str(yaml.safe_dump(doc, sort_keys=False, default_flow_style=False)).rstrip("\n"))
    else:
        print(text())


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0)


def _init(args: argparse.Namespace) -> int:
    from fleetlite.fleet.pki import Pki, cert_not_after, iso_time

    days = args.valid_for or DEFAULT_VALIDITY_DAYS["ca"]
    pki = Pki.init(args.directory, name=args.name, days=days)
    cert = pki.ca_cert
    doc = {"directory": str(pki.dir), "ca": str(pki.ca_path), "ca_key": str(pki.dir / "ca.key"),
           "crl": str(pki.crl_path), "subject": cert.subject.rfc4514_string(),
           "not_after": iso_time(cert_not_after(cert)),
           "sha256": cert.fingerprint(_sha256()).hex()}

    def text() -> str:
        return "\n".join([
            f"created the fleet CA in {pki.dir} (mode 0700)",
            f"  subject:     {doc['subject']}",
            f"  valid until: {doc['not_after']}",
            f"  sha256:      {doc['sha256']}",
            f"  certificate: {doc['ca']}  (give it to the broker and every client)",
            f"  key:         {doc['ca_key']}  (mode 0600: keep it secret, back it up offline)",
            f"  CRL:         {doc['crl']}  (empty)",
            f"next: fleetlite pki issue broker --dns HOST --pki {pki.dir}",
        ])

    _emit(args, doc, text)
    return 0


def _sha256() -> Any:
    from cryptography.hazmat.primitives import hashes

    return hashes.SHA256()


def _issue(args: argparse.Namespace) -> int:
    pki = _open(args)
    kind = args.kind
    created = missing_dirs(Path(args.out).expanduser()) if args.out else []
    issued = pki.issue(kind, getattr(args, "name", ""), days=args.valid_for,
                       device_class=getattr(args, "device_class", None),
                       dns=getattr(args, "dns", ()), ips=getattr(args, "ip", ()), out=args.out,
                       renew=args.renew)
    say_created(created)
    record = issued.record
    doc = {**record.to_json(), "cert_file": str(issued.cert), "key_file": str(issued.key)}

    def text() -> str:
        lines = [f"issued {kind} certificate {record.cn}"
                 + (f" (class {record.device_class})" if record.device_class else ""),
                 f"  serial:      {record.serial_hex}",
                 f"  valid until: {record.not_after}"]
        if kind == "broker":
            lines.append(f"  names:       {', '.join((*record.dns, *record.ips))}")
        lines += [f"  certificate: {issued.cert}",
                  f"  key:         {issued.key}  (mode 0600: never share it)"]
        if kind in ("controller", "operator", "broker"):
            lines.append("next: fleetlite broker-config --out DIR (the ACL and the broker "
                         "files), then reload the broker")
        return "\n".join(lines)

    _emit(args, doc, text)
    return 0


def _revoke(args: argparse.Namespace) -> int:
    pki = _open(args)
    revoked = pki.revoke(args.target, reason=args.reason, serial_only=args.serial)
    info = _crl_doc(pki, pki.crl())
    doc = {"revoked": [r.to_json() for r in revoked], "crl": info}

    def text() -> str:
        lines = [f"revoked {r.kind} {r.cn} (serial {r.serial_hex}, reason {args.reason})"
                 for r in revoked]
        lines += [f"{pki.crl_path}: {info['revoked']} revoked certificate(s), CRL number "
                  f"{info['number']}, next update {info['next_update']}",
                  "next: fleetlite broker-config --out DIR, install the files on the broker and "
                  "reload it (systemctl reload mosquitto); restart it to also cut off a client "
                  "connected right now"]
        return "\n".join(lines)

    _emit(args, doc, text)
    return 0


def _crl(args: argparse.Namespace) -> int:
    pki = _open(args)
    crl = pki.refresh_crl(days=args.valid_for)
    doc = _crl_doc(pki, crl)
    _emit(args, doc, lambda: f"re-signed {pki.crl_path}: {doc['revoked']} revoked "
          f"certificate(s), CRL number {doc['number']}, next update {doc['next_update']}")
    return 0


def _crl_doc(pki: Pki, crl: Optional[x509.CertificateRevocationList]) -> dict[str, Any]:
    from fleetlite.fleet.pki import crl_next_update, iso_time

    if crl is None:
        return {"file": None, "revoked": 0, "number": None, "next_update": None}
    from cryptography import x509

    number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    until = crl_next_update(crl)
    return {"file": str(pki.crl_path), "revoked": len(list(crl)), "number": number,
            "next_update": iso_time(until) if until else None}


def _list(args: argparse.Namespace) -> int:
    pki = _open(args)
    now = _now()
    records = [r for r in pki.records() if args.kind is None or r.kind == args.kind]
    crl = _crl_doc(pki, pki.crl())
    doc = {"ca": str(pki.ca_path),
           "certificates": [{**r.to_json(), "status": r.status(now)} for r in records],
           "crl": crl}

    def text() -> str:
        from fleetlite.fleet.pki import parse_time

        rows = [("KIND", "IDENTITY", "SERIAL", "STATUS", "VALID UNTIL", "DETAIL")]
        for r in records:
            status = r.status(now)
            if status == "valid" and parse_time(r.not_after) - now < dt.timedelta(days=30):
                status = f"expires in {(parse_time(r.not_after) - now).days}d"
            if r.revoked_at is not None:
                status = f"revoked {r.revoked_at[:10]}"
            detail = (f"class {r.device_class}" if r.device_class
                      else ", ".join((*r.dns, *r.ips)))
            rows.append((r.kind, r.cn, r.serial_hex[:16], status, r.not_after[:10], detail))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1]
                 for row in rows]
        if not records:
            lines.append("(no certificates issued yet: fleetlite pki issue --help)")
        if crl["file"]:
            lines.append(f"CRL: {crl['revoked']} revoked, number {crl['number']}, next update "
                         f"{crl['next_update']}")
            ends = crl["next_update"]
            if ends and parse_time(ends) - now < dt.timedelta(days=30):
                lines.append(f"warning: the CRL expires on {ends}; a broker with an expired "
                             "CRL refuses every client: run fleetlite pki crl")
        return "\n".join(line.rstrip() for line in lines)

    _emit(args, doc, text)
    return 0


def _enrol(args: argparse.Namespace) -> int:
    from fleetlite.fleet.broker_address import BrokerAddress
    from fleetlite.fleet.errors import BrokerAddressError

    pki = _open(args)
    address = BrokerAddress.parse(args.enrol_broker)
    if not address.tls:
        raise BrokerAddressError(
            f"--broker {args.enrol_broker} is plain MQTT; a gateway connects with its "
            "certificate over TLS: write mqtts://HOST:PORT")
    socket = None if args.socket in ("", "none") else args.socket
    created = missing_dirs(Path(args.out).expanduser())
    enrolment = pki.enrol(args.name, device_class=args.device_class, host=address.host,
                          port=address.port, root=args.root, out=args.out, tar=args.tar,
                          days=args.valid_for, state_dir=args.state_dir, socket=socket,
                          tags=dict(args.tag), renew=args.renew)
    say_created(created)
    record = enrolment.record
    notes = _broker_name_notes(pki, address.host)
    doc = {**record.to_json(), "broker": address.url, "directory": str(enrolment.directory),
           "files": [str(f) for f in enrolment.files],
           "tar": str(enrolment.tar) if enrolment.tar else None, "notes": notes}

    def text() -> str:
        lines = [f"enrolled {record.cn} (class {record.device_class}) in {enrolment.directory} "
                 "(mode 0700)",
                 f"  serial {record.serial_hex}, valid until {record.not_after}",
                 f"  broker {address.url}, state_dir {args.state_dir}"]
        for path in enrolment.files:
            mode = " (mode 0600)" if path.suffix == ".key" else ""
            lines.append(f"  {path}{mode}")
        if enrolment.tar:
            lines.append(f"  {enrolment.tar} (mode 0600)")
        lines.append("next: copy it to the gateway and install it as /etc/fleetlite "
                     "(docs/operator-guide.md)")
        return "\n".join(lines)

    _emit(args, doc, text)
    for note in notes:
        print(f"fleetlite: warning: {note}", file=sys.stderr)
    return 0


def _broker_name_notes(pki: Pki, host: str) -> list[str]:
    """Warn when no valid broker certificate of this PKI names ``host``: the agent would refuse
    the broker."""
    brokers = pki.index().valid("broker", _now())
    if not brokers:
        return [f"this PKI has no broker certificate yet: fleetlite pki issue broker --dns "
                f"{host}"]
    if not any(_names_host(b.dns, b.ips, host) for b in brokers):
        return [f"no broker certificate of this PKI names {host}; the agent will refuse the "
                f"broker: fleetlite pki issue broker --dns {host}"]
    return []


def _names_host(dns: Sequence[str], ips: Sequence[str], host: str) -> bool:
    import ipaddress

    try:
        return str(ipaddress.ip_address(host)) in ips
    except ValueError:
        pass
    name = host.lower().rstrip(".")
    for entry in (d.lower() for d in dns):
        if entry == name or (entry.startswith("*.") and name.endswith(entry[1:])
                             and name.count(".") == entry.count(".")):
            return True
    return False


def _broker_config(args: argparse.Namespace) -> int:
    from fleetlite.fleet.broker_config import BrokerFiles, BrokerSettings, generate
    from fleetlite.fleet.pki import PkiError, private_dir, write_file

    pki = _open(args)
    now = _now()
    index = pki.index()
    cert_file, key_file = _broker_files(args, pki, index, now)
    created = missing_dirs(Path(args.out).expanduser())
    out = private_dir(Path(args.out).expanduser())
    say_created(created)
    install = Path(args.install_dir).expanduser() if args.install_dir else out.resolve()
    has_crl = pki.crl_path.is_file()
    files = BrokerFiles(ca=str(install / "ca.pem"), cert=str(install / "broker.pem"),
                        key=str(install / "broker.key"), acl=str(install / "fleetlite.acl"),
                        crl=str(install / "crl.pem") if has_crl else None)
    settings = BrokerSettings(
        port=args.port, bind=args.bind, local_port=args.local_port,
        max_packet_size=args.max_packet_size, max_queued_messages=args.max_queued_messages,
        max_queued_bytes=args.max_queued_bytes,
        max_inflight_messages=args.max_inflight_messages,
        persistence_dir=args.persistence_dir)
    generated = generate(files, settings,
                         controllers=[c.cn for c in index.valid("controller", now)],
                         operators=[o.cn for o in index.valid("operator", now)])
    try:
        key_bytes = key_file.read_bytes()
        cert_bytes = cert_file.read_bytes()
    except FileNotFoundError as exc:
        raise PkiError(f"{exc.filename} is missing: give --broker-cert and --broker-key, or "
                       "issue a broker certificate: fleetlite pki issue broker --dns HOST") \
            from None
    written = [
        write_file(out / "mosquitto.conf", generated.mosquitto_conf.encode(), mode=0o644),
        write_file(out / "fleetlite.acl", generated.acl.encode(), mode=0o644),
        write_file(out / "ca.pem", pki.ca_path.read_bytes(), mode=0o644),
        write_file(out / "broker.pem", cert_bytes, mode=0o644),
        write_file(out / "broker.key", key_bytes, mode=0o600),
    ]
    if has_crl:
        written.append(write_file(out / "crl.pem", pki.crl_path.read_bytes(), mode=0o644))
    doc = {"out": str(out), "install_dir": str(install), "files": [str(p) for p in written],
           "port": args.port, "local_port": args.local_port,
           "controllers": [c.cn for c in index.valid("controller", now)],
           "operators": [o.cn for o in index.valid("operator", now)],
           "notes": list(generated.notes)}

    def text() -> str:
        lines = [f"wrote the Mosquitto configuration for {install} into {out}:"]
        lines += [f"  {p}{' (mode 0600)' if p.suffix == '.key' else ''}" for p in written]
        users = ", ".join([*doc["controllers"], *doc["operators"]]) or "none"
        lines += [f"  TLS listener on port {args.port}"
                  + (f", plain listener on 127.0.0.1:{args.local_port}" if args.local_port
                     else ""),
                  f"  ACL: every device in its own subtree; controllers/operators: {users}",
                  f"next: install them in {install} (owned by the mosquitto user) and run "
                  f"mosquitto -c {install / 'mosquitto.conf'}, or reload a running broker"]
        return "\n".join(lines)

    _emit(args, doc, text)
    for note in generated.notes:
        print(f"fleetlite: warning: {note}", file=sys.stderr)
    return 0


def _broker_files(args: argparse.Namespace, pki: Pki, index: PkiIndex,
                  now: dt.datetime) -> tuple[Path, Path]:
    from fleetlite.fleet.pki import PkiError

    if (args.broker_cert is None) != (args.broker_key is None):
        raise PkiError("give both --broker-cert and --broker-key, or neither")
    if args.broker_cert is not None:
        return Path(args.broker_cert).expanduser(), Path(args.broker_key).expanduser()
    brokers = index.valid("broker", now)
    if not brokers:
        raise PkiError(f"the PKI {pki.dir} has no valid broker certificate: issue one with "
                       "fleetlite pki issue broker --dns HOST (the name clients connect to)")
    newest = brokers[-1]
    base = newest.name.replace("*", "wildcard")
    return pki.dir / "broker" / f"{base}.pem", pki.dir / "broker" / f"{base}.key"

