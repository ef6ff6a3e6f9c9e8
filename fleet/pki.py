"""The fleet's X.509 PKI: a CA, certificates for devices, controllers, operators and the broker,
revocation (a CRL the broker loads), and enrolment bundles for new gateways.

Identities. The common name (CN) of a client certificate is its MQTT username (the broker runs
with ``use_identity_as_username``), and the broker ACL is keyed on it:

==============  ======================  =================================================
kind            CN                      name rule
==============  ======================  =================================================
device          ``gw-0001``             the protocol's device-id rule (sdk/topics.py)
controller      ``controller:ctl-1``    same characters; the ``:`` is never in a device id,
operator        ``operator:alice``      so no ACL ``pattern .../dev/%u/...`` line can
broker          ``broker:mqtt.lan``     ever give these a device's subtree
==============  ======================  =================================================

Extensions follow RFC 5280 as OpenSSL's ``X509_V_FLAG_X509_STRICT`` checks them (Python 3.13+
sets it by default): the CA has critical basicConstraints CA:TRUE and keyUsage
keyCertSign/cRLSign and a subject key identifier; every leaf has critical basicConstraints
CA:FALSE, critical keyUsage digitalSignature, an extended key usage (clientAuth for clients,
serverAuth for the broker, so neither can stand in for the other), subject and authority key
identifiers; the broker's carries its DNS names and IP addresses in subjectAltName.

The ``build_*`` functions are pure (keys, names and times in, certificates out); :class:`Pki`
keeps a PKI directory::

    ca.pem ca.key index.json crl.pem   the CA, every certificate issued, the revocation list
    certs/SERIAL.pem                   a copy of each certificate issued
    devices/ controllers/ operators/ broker/   keys and certificates of ``issue`` (0700)

Every private key file is written with mode 0600 through a temp file created 0600 and renamed
into place, and no key is ever returned as text to print.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import ipaddress
import json
import os
import re
import stat
import tarfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional, Union

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fleetlite.fleet.errors import FleetError
from fleetlite.sdk.atomic import write_atomic
from fleetlite.sdk.topics import MAX_DEVICE_ID_LENGTH, TopicError, validate_device_id

__all__ = [
    "CLIENT_KINDS",
    "DEFAULT_VALIDITY_DAYS",
    "KINDS",
    "REASONS",
    "CertificateRecord",
    "Enrolment",
    "IssuedFiles",
    "Pki",
    "PkiError",
    "PkiIndex",
    "agent_yaml",
    "build_broker_certificate",
    "build_ca",
    "build_client_certificate",
    "build_crl",
    "cert_not_after",
    "crl_next_update",
    "iso_time",
    "parse_time",
    "identity",
    "new_key",
]

PathArg = Union[str, "os.PathLike[str]"]

KINDS = ("device", "controller", "operator", "broker")
CLIENT_KINDS = ("device", "controller", "operator")
#: days of validity when the operator does not say otherwise
DEFAULT_VALIDITY_DAYS = {"ca": 3650, "device": 1095, "controller": 365, "operator": 90,
                         "broker": 825, "crl": 365}
#: CRL reason codes an operator may give (RFC 5280 5.3.1), by their CLI spelling
REASONS = {
    "unspecified": x509.ReasonFlags.unspecified,
    "key-compromise": x509.ReasonFlags.key_compromise,
    "superseded": x509.ReasonFlags.superseded,
    "cessation-of-operation": x509.ReasonFlags.cessation_of_operation,
    "affiliation-changed": x509.ReasonFlags.affiliation_changed,
}
INDEX_FORMAT = "fleetlite.pki-index/1"
CA_CERT, CA_KEY, INDEX, CRL = "ca.pem", "ca.key", "index.json", "crl.pem"
_DIRS = {"device": "devices", "controller": "controllers", "operator": "operators",
         "broker": "broker"}
_PREFIX = {"controller": "controller:", "operator": "operator:", "broker": "broker:"}
_NAME_CHARS = re.compile(r"[A-Za-z0-9_.-]{1,64}\Z")
_DNS_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)\Z")
# a few minutes of clock skew between the CA machine and the broker must not matter
_BACKDATE = dt.timedelta(minutes=5)


class PkiError(FleetError):
    """A PKI operation cannot be done: the directory, a name, a certificate or a request is
    wrong; the message says what to fix."""


# -- identities ------------------------------------------------------------------------------


def identity(kind: str, name: str) -> str:
    """The CN (and MQTT username) of certificate ``kind`` for ``name``; validates the name."""
    if kind == "device":
        try:
            return validate_device_id(name)
        except TopicError as exc:
            raise PkiError(f"{exc}: a device certificate's name is the agent's device_id") \
                from None
    if kind == "broker":
        return _PREFIX[kind] + _host_name(name)
    if kind not in _PREFIX:
        raise PkiError(f"unknown certificate kind {kind!r}; expected one of {', '.join(KINDS)}")
    if not _NAME_CHARS.match(name) or name in (".", ".."):
        raise PkiError(f"{kind} name {name!r} must be 1-{MAX_DEVICE_ID_LENGTH} letters, digits, "
                       "'-', '_' or '.', e.g. ctl-1 or alice")
    return _PREFIX[kind] + name


def _host_name(text: str) -> str:
    """A DNS name (``*.`` allowed as the first label) or an IP address, as written."""
    with contextlib.suppress(ValueError):
        return str(ipaddress.ip_address(text))
    labels = text.rstrip(".").split(".")
    if labels and labels[0] == "*" and len(labels) > 2:
        labels = labels[1:]
    if not text or len(text) > 253 or not all(_DNS_LABEL.match(label) for label in labels):
        raise PkiError(f"{text!r} is not a DNS name or an IP address; give the host name the "
                       "devices connect to, e.g. --dns mqtt.example.net or --ip 10.0.0.5")
    return text.rstrip(".").lower()


# -- pure builders ---------------------------------------------------------------------------


def new_key() -> ec.EllipticCurvePrivateKey:
    """A new TLS key. ECDSA P-256, not Ed25519: every TLS stack an MQTT client may use (OpenSSL
    1.1 and 3, mbedTLS, wolfSSL, BearSSL, Java, .NET, the ESP-IDF and the AWS IoT SDKs) signs
    and verifies P-256 in TLS 1.2 and 1.3, while Ed25519 certificates are still refused by
    several of them."""
    return ec.generate_private_key(ec.SECP256R1())


def _name(cn: str, organization: Optional[str] = None) -> x509.Name:
    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if organization:
        attributes.insert(0, x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    return x509.Name(attributes)


def _key_usage(*, sign: bool, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=sign, content_commitment=False,
                         key_encipherment=False, data_encipherment=False, key_agreement=False,
                         key_cert_sign=ca, crl_sign=ca, encipher_only=False, decipher_only=False)


def build_ca(key: ec.EllipticCurvePrivateKey, name: str, *, now: dt.datetime,
             days: float = DEFAULT_VALIDITY_DAYS["ca"]) -> x509.Certificate:
    """A self-signed fleet CA certificate (no intermediates below it: path length 0)."""
    public = key.public_key()
    subject = _name(name)
    return (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(sign=False, ca=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public),
                       critical=False)
        .sign(key, hashes.SHA256())
    )


def _leaf(ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey,
          public: ec.EllipticCurvePublicKey, cn: str, usage: x509.ObjectIdentifier,
          now: dt.datetime, days: float) -> x509.CertificateBuilder:
    ca_end = cert_not_after(ca_cert)
    end = min(now + dt.timedelta(days=days), ca_end)  # never outlive the CA
    if end <= now:
        raise PkiError(f"the fleet CA expired on {iso_time(ca_end)}: no certificate can be issued; "
                       "create a new PKI with `fleetlite pki init` and re-enrol the fleet")
    return (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca_cert.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(sign=True, ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
    )


def build_client_certificate(ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey,
                             public: ec.EllipticCurvePublicKey, cn: str, *, now: dt.datetime,
                             days: float) -> x509.Certificate:
    """A TLS client certificate (clientAuth) for a device, controller or operator CN."""
    return _leaf(ca_cert, ca_key, public, cn, ExtendedKeyUsageOID.CLIENT_AUTH, now, days) \
        .sign(ca_key, hashes.SHA256())


def build_broker_certificate(ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey,
                             public: ec.EllipticCurvePublicKey, *, dns: Sequence[str],
                             ips: Sequence[str], now: dt.datetime,
                             days: float = DEFAULT_VALIDITY_DAYS["broker"]) -> x509.Certificate:
    """The broker's TLS server certificate (serverAuth); clients verify the host they connect
    to against its subjectAltName, so it lists every name and address they use."""
    names: list[x509.GeneralName] = [x509.DNSName(_host_name(d)) for d in dns]
    for text in ips:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(text)))
        except ValueError:
            raise PkiError(f"--ip {text!r} is not an IP address, e.g. 10.0.0.5 or ::1") from None
    if not names:
        raise PkiError("the broker certificate needs at least one --dns NAME or --ip ADDRESS: "
                       "the host name (or address) devices and controllers connect to")
    first = next(iter(dns), None) or next(iter(ips))
    return (
        _leaf(ca_cert, ca_key, public, identity("broker", first),
              ExtendedKeyUsageOID.SERVER_AUTH, now, days)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .sign(ca_key, hashes.SHA256())
    )


def build_crl(ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey,
              revoked: Sequence[CertificateRecord], *, number: int, now: dt.datetime,
              days: float = DEFAULT_VALIDITY_DAYS["crl"]) -> x509.CertificateRevocationList:
    """The CRL listing every record of ``revoked``, number ``number``. OpenSSL refuses every
    client while the broker's CRL is past its next update, so it is re-signed on every change
    (and by ``fleetlite pki crl``)."""
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now - _BACKDATE)
        .next_update(now + dt.timedelta(days=days))
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
    )
    for record in revoked:
        assert record.revoked_at is not None
        entry = (x509.RevokedCertificateBuilder()
                 .serial_number(record.serial)
                 .revocation_date(parse_time(record.revoked_at)))
        reason = REASONS.get(record.reason or "unspecified", x509.ReasonFlags.unspecified)
        if reason is not x509.ReasonFlags.unspecified:
            entry = entry.add_extension(x509.CRLReason(reason), critical=False)
        builder = builder.add_revoked_certificate(entry.build())
    return builder.sign(ca_key, hashes.SHA256())


def agent_yaml(*, device_id: str, device_class: str, host: str, port: int, ca: str, cert: str,
               key: str, trust_root: str, state_dir: str, socket: Optional[str],
               tags: Mapping[str, str]) -> str:
    """The text of a gateway's agent.yaml (see agent/config.py); relative paths resolve against
    the directory holding it."""
    import yaml

    config: dict[str, Any] = {
        "device_id": device_id,
        "device_class": device_class,
        "broker": {"host": host, "port": port,
                   "tls": {"ca": ca, "cert": cert, "key": key}},
        "trust_root": trust_root,
        "state_dir": state_dir,
    }
    if socket:
        config["socket"] = socket
    if tags:
        config["tags"] = dict(tags)
    head = (f"# agent.yaml of {device_id}, written by `fleetlite pki enrol`. The TLS files and\n"
            "# root.json are named relative to this file: install them in its directory.\n")
    return head + str(yaml.safe_dump(config, sort_keys=False, default_flow_style=False))


# -- the index -------------------------------------------------------------------------------


@dataclass(frozen=True)
class CertificateRecord:
    """One certificate the CA issued, as index.json keeps it."""

    serial: int
    kind: str
    name: str
    cn: str
    not_before: str
    not_after: str
    sha256: str
    device_class: Optional[str] = None
    dns: tuple[str, ...] = ()
    ips: tuple[str, ...] = ()
    revoked_at: Optional[str] = None
    reason: Optional[str] = None

    @property
    def serial_hex(self) -> str:
        return f"{self.serial:x}"

    def status(self, now: dt.datetime) -> str:
        """``valid``, ``revoked`` or ``expired``."""
        if self.revoked_at is not None:
            return "revoked"
        return "expired" if parse_time(self.not_after) <= now else "valid"

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "serial": self.serial_hex, "kind": self.kind, "name": self.name, "cn": self.cn,
            "not_before": self.not_before, "not_after": self.not_after, "sha256": self.sha256,
        }
        if self.device_class is not None:
            doc["device_class"] = self.device_class
        if self.kind == "broker":
            doc["dns"], doc["ips"] = list(self.dns), list(self.ips)
        doc["revoked_at"] = self.revoked_at
        if self.revoked_at is not None:
            doc["reason"] = self.reason or "unspecified"
        return doc

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> CertificateRecord:
        return cls(serial=int(str(doc["serial"]), 16), kind=str(doc["kind"]),
                   name=str(doc["name"]), cn=str(doc["cn"]),
                   not_before=str(doc["not_before"]), not_after=str(doc["not_after"]),
                   sha256=str(doc["sha256"]),
                   device_class=None if doc.get("device_class") is None
                   else str(doc["device_class"]),
                   dns=tuple(str(d) for d in doc.get("dns", ())),
                   ips=tuple(str(i) for i in doc.get("ips", ())),
                   revoked_at=None if doc.get("revoked_at") is None else str(doc["revoked_at"]),
                   reason=None if doc.get("reason") is None else str(doc["reason"]))

    @classmethod
    def of(cls, cert: x509.Certificate, kind: str, name: str,
           device_class: Optional[str] = None) -> CertificateRecord:
        dns: tuple[str, ...] = ()
        ips: tuple[str, ...] = ()
        with contextlib.suppress(x509.ExtensionNotFound):
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            dns = tuple(san.get_values_for_type(x509.DNSName))
            ips = tuple(str(ip) for ip in san.get_values_for_type(x509.IPAddress))
        cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
        return cls(serial=cert.serial_number, kind=kind, name=name, cn=str(cn),
                   not_before=iso_time(cert_not_before(cert)),
                   not_after=iso_time(cert_not_after(cert)),
                   sha256=cert.fingerprint(hashes.SHA256()).hex(), device_class=device_class,
                   dns=dns, ips=ips)


@dataclass(frozen=True)
class PkiIndex:
    """Every certificate issued (revoked ones stay, marked) and the last CRL number."""

    certificates: tuple[CertificateRecord, ...] = ()
    crl_number: int = 0

    def to_bytes(self) -> bytes:
        doc = {"format": INDEX_FORMAT, "crl_number": self.crl_number,
               "certificates": [c.to_json() for c in self.certificates]}
        return (json.dumps(doc, indent=2) + "\n").encode()

    @classmethod
    def from_bytes(cls, data: bytes, origin: str) -> PkiIndex:
        try:
            doc = json.loads(data)
            if doc.get("format") != INDEX_FORMAT:
                raise ValueError(f"format is {doc.get('format')!r}, expected {INDEX_FORMAT!r}")
            return cls(tuple(CertificateRecord.from_json(c) for c in doc["certificates"]),
                       int(doc["crl_number"]))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise PkiError(f"{origin}: not a FleetLite PKI index ({exc}); restore it from your "
                           "backup of the PKI directory") from None

    def with_record(self, record: CertificateRecord) -> PkiIndex:
        return replace(self, certificates=(*self.certificates, record))

    def valid(self, kind: str, now: dt.datetime) -> list[CertificateRecord]:
        """The unrevoked, unexpired certificates of ``kind``, oldest first."""
        return [c for c in self.certificates if c.kind == kind and c.status(now) == "valid"]

    def revoked(self) -> list[CertificateRecord]:
        return [c for c in self.certificates if c.revoked_at is not None]

    def select(self, target: str, *, serial_only: bool = False) -> list[CertificateRecord]:
        """The certificates ``target`` names: an identity (a device id, ``controller:NAME``,
        ...) or a serial number in hex (``:`` separators and a ``0x`` prefix allowed; a unique
        prefix of at least 8 digits will do). Raises when it names none, or names both."""
        by_cn = [] if serial_only else [c for c in self.certificates if c.cn == target]
        digits = target.lower().replace(":", "")
        digits = digits[2:] if digits.startswith("0x") else digits
        by_serial: list[CertificateRecord] = []
        if len(digits) >= 8 and all(ch in "0123456789abcdef" for ch in digits):
            exact = [c for c in self.certificates if c.serial_hex == digits.lstrip("0")]
            by_serial = exact or [c for c in self.certificates
                                  if c.serial_hex.startswith(digits)]
        if by_cn and by_serial:
            raise PkiError(f"{target!r} is both an identity and a serial number here; add "
                           "--serial to mean the serial number")
        if len(by_serial) > 1:
            raise PkiError(f"serial prefix {target!r} matches {len(by_serial)} certificates; "
                           "give more digits (see `fleetlite pki list`)")
        found = by_cn or by_serial
        if not found:
            raise PkiError(f"no certificate of this PKI is {target!r}; give a device id, "
                           "controller:NAME, operator:NAME, broker:HOST or a serial number "
                           "from `fleetlite pki list`")
        return found


# -- files -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class IssuedFiles:
    """A certificate issued and where its files went (the key's path, never the key)."""

    record: CertificateRecord
    cert: Path
    key: Path


@dataclass(frozen=True)
class Enrolment:
    """What ``pki enrol`` wrote for a new gateway."""

    record: CertificateRecord
    directory: Path
    files: tuple[Path, ...]
    tar: Optional[Path] = None


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def write_file(path: Path, data: bytes, *, mode: int, overwrite: bool = True) -> Path:
    """Write ``path`` atomically with exactly ``mode`` (never wider, whatever the umask);
    with ``overwrite`` false an existing file is refused, even one made by a race
    (:func:`fleetlite.sdk.atomic.write_atomic`)."""
    if not overwrite and (path.exists() or path.is_symlink()):
        raise PkiError(f"{path} already exists; refusing to overwrite it (choose another --out, "
                       "or move the old file away)")
    try:
        write_atomic(path, data, mode=mode, overwrite=overwrite, exact_mode=True)
    except FileExistsError:
        raise PkiError(f"{path} already exists; refusing to overwrite it") from None
    return path


def private_dir(path: Path) -> Path:
    """Create ``path`` with mode 0700 (its parents as usual), or tighten an existing one to
    0700; it must be a directory owned by us."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        info = path.lstat()
        if not stat.S_ISDIR(info.st_mode):
            raise PkiError(f"{path} exists and is not a directory; choose another path") \
                from None
        if hasattr(os, "getuid") and info.st_uid != os.getuid():
            raise PkiError(f"{path} belongs to another user; choose a directory of your own") \
                from None
    os.chmod(path, 0o700)
    return path


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """An exclusive lock on the PKI directory, so two commands cannot both update the index."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: one operator at a time
        yield
        return
    fd = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


class Pki:
    """A PKI directory: the CA, its index and CRL, and the files of what it issued."""

    def __init__(self, directory: Path, ca_cert: x509.Certificate) -> None:
        self.dir = directory
        self.ca_cert = ca_cert

    # -- opening ---------------------------------------------------------------------------

    @classmethod
    def init(cls, directory: PathArg, *, name: str = "FleetLite fleet CA",
             days: float = DEFAULT_VALIDITY_DAYS["ca"], now: Optional[dt.datetime] = None) -> Pki:
        """Create a new CA in ``directory`` (created 0700; it must not hold a PKI yet), with an
        empty CRL so the broker can load one from the start."""
        path = Path(directory).expanduser()
        if (path / CA_CERT).exists() or (path / CA_KEY).exists():
            raise PkiError(f"{path} already holds a fleet CA; use it (--pki {path}) or choose "
                           "another directory")
        if not name.strip():
            raise PkiError("the CA name must not be empty, e.g. --name 'Acme fleet CA'")
        private_dir(path)
        now = now or _now()
        key = new_key()
        cert = build_ca(key, name, now=now, days=days)
        with _locked(path):
            write_file(path / CA_KEY, _key_pem(key), mode=0o600, overwrite=False)
            write_file(path / CA_CERT, _pem(cert), mode=0o644, overwrite=False)
            write_file(path / INDEX, PkiIndex().to_bytes(), mode=0o600)
            pki = cls(path, cert)
            pki._write_crl(PkiIndex(), now)
        return pki

    @classmethod
    def open(cls, directory: PathArg) -> Pki:
        """The PKI in ``directory``; raises :class:`PkiError` saying how to create one."""
        path = Path(directory).expanduser()
        try:
            cert = x509.load_pem_x509_certificate((path / CA_CERT).read_bytes())
        except FileNotFoundError:
            raise PkiError(f"{path} holds no fleet CA ({CA_CERT} is missing): create one with "
                           f"`fleetlite pki init {path}`, or point --pki (env FLEETLITE_PKI) at "
                           "your PKI directory") from None
        except ValueError:
            raise PkiError(f"{path / CA_CERT} is not a PEM certificate; restore it from your "
                           "backup of the PKI directory") from None
        return cls(path, cert)

    @property
    def ca_path(self) -> Path:
        return self.dir / CA_CERT

    @property
    def crl_path(self) -> Path:
        return self.dir / CRL

    def index(self) -> PkiIndex:
        path = self.dir / INDEX
        try:
            return PkiIndex.from_bytes(path.read_bytes(), str(path))
        except FileNotFoundError:
            raise PkiError(f"{path} is missing; restore it from your backup of the PKI "
                           "directory") from None

    def crl(self) -> Optional[x509.CertificateRevocationList]:
        try:
            return x509.load_pem_x509_crl(self.crl_path.read_bytes())
        except FileNotFoundError:
            return None

    def _ca_key(self) -> ec.EllipticCurvePrivateKey:
        path = self.dir / CA_KEY
        try:
            info = path.stat()
            if info.st_mode & 0o077:
                raise PkiError(f"{path}: the CA key is accessible by group/others (mode "
                               f"{stat.S_IMODE(info.st_mode):04o}); run: chmod 600 {path}, "
                               "and consider the CA compromised if others could read it")
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except FileNotFoundError:
            raise PkiError(f"{path} is missing: this PKI directory cannot issue or revoke; "
                           "restore the CA key from your backup") from None
        except (ValueError, TypeError):
            raise PkiError(f"{path} is not an unencrypted PEM EC key; restore it from your "
                           "backup") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise PkiError(f"{path} is not an EC key; this is not a FleetLite CA key")
        return key

    # -- issuing ---------------------------------------------------------------------------

    def issue(self, kind: str, name: str, *, days: Optional[float] = None,
              device_class: Optional[str] = None, dns: Sequence[str] = (),
              ips: Sequence[str] = (), out: Optional[PathArg] = None, renew: bool = False,
              now: Optional[dt.datetime] = None) -> IssuedFiles:
        """Issue a certificate and write ``NAME.pem`` and ``NAME.key`` (0600) into ``out``
        (default: the PKI's ``devices/``, ``controllers/``, ``operators/`` or ``broker/``).
        A second valid certificate for one identity needs ``renew``."""
        now = now or _now()
        if kind not in KINDS:
            raise PkiError(f"unknown certificate kind {kind!r}; expected one of "
                           f"{', '.join(KINDS)}")
        directory = private_dir(Path(out).expanduser() if out else self.dir / _DIRS[kind])
        key = new_key()
        cert, record = self._issue(kind, name, key.public_key(), days=days,
                                   device_class=device_class, dns=dns, ips=ips, renew=renew,
                                   now=now)
        base = record.name.replace("*", "wildcard")
        key_path = write_file(directory / f"{base}.key", _key_pem(key), mode=0o600)
        cert_path = write_file(directory / f"{base}.pem", _pem(cert), mode=0o644)
        return IssuedFiles(record, cert_path, key_path)

    def _issue(self, kind: str, name: str, public: ec.EllipticCurvePublicKey, *,
               days: Optional[float], device_class: Optional[str], dns: Sequence[str],
               ips: Sequence[str], renew: bool,
               now: dt.datetime) -> tuple[x509.Certificate, CertificateRecord]:
        if kind == "device":
            _check_device_class(device_class)
        if kind == "broker":
            name = next(iter(dns), None) or next(iter(ips), "")
            if not name:
                raise PkiError("the broker certificate needs at least one --dns NAME or --ip "
                               "ADDRESS: the host name (or address) clients connect to")
        cn = identity(kind, name)
        days = DEFAULT_VALIDITY_DAYS[kind] if days is None else days
        if days <= 0:
            raise PkiError(f"the validity must be positive, got {days} days; e.g. --valid-for "
                           "365d")
        with _locked(self.dir):
            index = self.index()
            current = [c for c in index.certificates
                       if c.cn == cn and c.status(now) == "valid"]
            if current and not renew:
                raise PkiError(
                    f"{cn} already has a valid certificate (serial {current[-1].serial_hex}, "
                    f"until {current[-1].not_after}); pass --renew to issue another beside it, "
                    f"or revoke it first: fleetlite pki revoke {cn}")
            ca_key = self._ca_key()
            if kind == "broker":
                cert = build_broker_certificate(self.ca_cert, ca_key, public, dns=dns, ips=ips,
                                                now=now, days=days)
            else:
                cert = build_client_certificate(self.ca_cert, ca_key, public, cn, now=now,
                                                days=days)
            record = CertificateRecord.of(cert, kind, cn.split(":", 1)[-1]
                                          if kind != "device" else cn, device_class)
            certs = private_dir(self.dir / "certs")
            write_file(certs / f"{record.serial_hex}.pem", _pem(cert), mode=0o644)
            write_file(self.dir / INDEX, index.with_record(record).to_bytes(), mode=0o600)
        return cert, record

    # -- revocation ------------------------------------------------------------------------

    def revoke(self, target: str, *, reason: str = "unspecified", serial_only: bool = False,
               now: Optional[dt.datetime] = None) -> list[CertificateRecord]:
        """Revoke every unrevoked certificate ``target`` names (see :meth:`PkiIndex.select`)
        and re-sign the CRL with all revoked serials. Returns the records revoked now."""
        if reason not in REASONS:
            raise PkiError(f"unknown revocation reason {reason!r}; use one of "
                           f"{', '.join(REASONS)}")
        now = now or _now()
        with _locked(self.dir):
            index = self.index()
            chosen = index.select(target, serial_only=serial_only)
            fresh = [c for c in chosen if c.revoked_at is None]
            if not fresh:
                listed = ", ".join(c.serial_hex for c in chosen)
                raise PkiError(f"{target!r} is already revoked (serial {listed}); nothing to "
                               "do. `fleetlite pki crl` re-signs the CRL if the broker needs "
                               "a fresh one")
            serials = {c.serial for c in fresh}
            stamped = [replace(c, revoked_at=iso_time(now), reason=reason) for c in fresh]
            updated = replace(index, certificates=tuple(
                replace(c, revoked_at=iso_time(now), reason=reason) if c.serial in serials else c
                for c in index.certificates))
            self._write_crl(updated, now)
        return stamped

    def refresh_crl(self, *, days: float = DEFAULT_VALIDITY_DAYS["crl"],
                    now: Optional[dt.datetime] = None) -> x509.CertificateRevocationList:
        """Re-sign the CRL (same revocations, new number and next update)."""
        with _locked(self.dir):
            return self._write_crl(self.index(), now or _now(), days=days)

    def _write_crl(self, index: PkiIndex, now: dt.datetime,
                   days: float = DEFAULT_VALIDITY_DAYS["crl"]) -> x509.CertificateRevocationList:
        number = index.crl_number + 1
        crl = build_crl(self.ca_cert, self._ca_key(), index.revoked(), number=number, now=now,
                        days=days)
        # the index first: a crash between the two leaves a revocation recorded but not yet
        # in crl.pem, which the next revoke or `pki crl` writes, never the reverse
        write_file(self.dir / INDEX, replace(index, crl_number=number).to_bytes(), mode=0o600)
        write_file(self.crl_path, crl.public_bytes(serialization.Encoding.PEM), mode=0o644)
        return crl

    # -- enrolment -------------------------------------------------------------------------

    def enrol(self, device_id: str, *, device_class: str, host: str, port: int,
              root: PathArg, out: PathArg, tar: bool = False, days: Optional[float] = None,
              state_dir: str = "/var/lib/fleetlite",
              socket: Optional[str] = "/run/fleetlite/agent.sock",
              tags: Optional[Mapping[str, str]] = None, renew: bool = False,
              now: Optional[dt.datetime] = None) -> Enrolment:
        """Everything a new gateway needs, in ``out`` (created 0700; must not exist or be
        empty): its key (0600) and certificate, the CA, the fleet's root.json and an
        agent.yaml; with ``tar`` also ``OUT.tar`` (0600) holding the same directory."""
        from fleetlite.sdk.errors import FleetLiteError
        from fleetlite.sdk.trust import load_trusted_root

        identity("device", device_id)
        root_path = Path(root).expanduser()
        try:
            root_bytes = root_path.read_bytes()
            load_trusted_root(root_bytes)
        except OSError as exc:
            raise PkiError(f"cannot read the root of trust {root_path} ({exc.strerror}); "
                           "give the fleet's root.json (fleetlite keys root init makes one)") \
                from None
        except FleetLiteError as exc:
            raise PkiError(f"{root_path} is not a valid root of trust: {exc}; give the fleet's "
                           "current root.json") from None
        target = Path(out).expanduser()
        if target.exists() and (not target.is_dir() or any(target.iterdir())):
            raise PkiError(f"{target} already exists and is not empty; give a new --out "
                           "directory for the enrolment bundle")
        tar_path = target.with_name(target.name + ".tar") if tar else None
        if tar_path is not None and tar_path.exists():
            raise PkiError(f"{tar_path} already exists; move it away or choose another --out")
        _check_device_class(device_class)
        now = now or _now()
        key = new_key()
        directory = private_dir(target)  # 0700 before any secret is written into it
        try:
            cert, record = self._issue("device", device_id, key.public_key(), days=days,
                                       device_class=device_class, dns=(), ips=(), renew=renew,
                                       now=now)
        except BaseException:
            with contextlib.suppress(OSError):
                directory.rmdir()  # only if still empty
            raise
        contents = {
            f"{device_id}.key": (_key_pem(key), 0o600),
            f"{device_id}.pem": (_pem(cert), 0o644),
            "ca.pem": (_pem(self.ca_cert), 0o644),
            "root.json": (root_bytes, 0o644),
            "agent.yaml": (agent_yaml(
                device_id=device_id, device_class=device_class, host=host, port=port,
                ca="ca.pem", cert=f"{device_id}.pem", key=f"{device_id}.key",
                trust_root="root.json", state_dir=state_dir, socket=socket,
                tags=tags or {}).encode(), 0o644),
        }
        files = tuple(write_file(directory / name, data, mode=mode, overwrite=False)
                      for name, (data, mode) in contents.items())
        if tar_path is not None:
            write_file(tar_path, _tar(target.name, contents, now), mode=0o600, overwrite=False)
        return Enrolment(record, directory, files, tar_path)

    def records(self) -> list[CertificateRecord]:
        return list(self.index().certificates)


def _check_device_class(device_class: Optional[str]) -> None:
    if not device_class:
        raise PkiError("a device certificate needs the device's class: --class CLASS, "
                       "e.g. --class raspberry-pi-4")
    from fleetlite.sdk.device_class import find_device_class

    find_device_class(device_class)  # raises DeviceClassError naming the known classes


def _tar(top: str, contents: Mapping[str, tuple[bytes, int]], now: dt.datetime) -> bytes:
    """An uncompressed tar of the bundle directory, modes as on disk (directory 0700, key
    0600), owned by uid/gid 0 so an extraction as root does not hand it to a stranger."""
    buffer = io.BytesIO()
    mtime = int(now.timestamp())
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        folder = tarfile.TarInfo(top)
        folder.type, folder.mode, folder.mtime = tarfile.DIRTYPE, 0o700, mtime
        archive.addfile(folder)
        for name, (data, mode) in contents.items():
            member = tarfile.TarInfo(f"{top}/{name}")
            member.size, member.mode, member.mtime = len(data), mode, mtime
            archive.addfile(member, io.BytesIO(data))
    return buffer.getvalue()


# -- time ------------------------------------------------------------------------------------


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0)


def iso_time(when: dt.datetime) -> str:
    return when.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str) -> dt.datetime:
    return dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.timezone.utc)


def cert_not_after(cert: x509.Certificate) -> dt.datetime:
    # cryptography >= 42 has the aware *_utc properties and warns on the naive ones
    if hasattr(cert, "not_valid_after_utc"):
        return cert.not_valid_after_utc
    return cert.not_valid_after.replace(tzinfo=dt.timezone.utc)  # pragma: no cover


def cert_not_before(cert: x509.Certificate) -> dt.datetime:
    if hasattr(cert, "not_valid_before_utc"):
        return cert.not_valid_before_utc
    return cert.not_valid_before.replace(tzinfo=dt.timezone.utc)  # pragma: no cover


def crl_next_update(crl: x509.CertificateRevocationList) -> Optional[dt.datetime]:
    """When ``crl`` expires (aware, UTC), or None if it names no next update."""
    if hasattr(crl, "next_update_utc"):
        return crl.next_update_utc
    value = crl.next_update  # pragma: no cover
    return None if value is None else value.replace(tzinfo=dt.timezone.utc)  # pragma: no cover
