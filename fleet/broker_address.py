"""Where and how the fleet side connects to the MQTT broker: address, TLS files, credentials.

One :class:`BrokerAddress` describes it; :func:`resolve_broker` builds one from what the operator
gave (``--broker``, ``--tls-ca``, ``--tls-cert``, ``--tls-key``) and the environment; it is pure
logic (no file is touched). :func:`ssl_context` is the one function here that reads files: it
builds the TLS context for a connection and reports missing or unreadable files.

Addresses::

    host                 port 1883 (8883 with TLS)
    host:port
    [::1]:1883           an IPv6 literal (brackets when a port follows)
    mqtt://host:port     plain TCP, default port 1883
    mqtts://host:port    TLS, default port 8883

Rules, in order:

- ``mqtts://`` turns TLS on. So does any TLS file (``--tls-ca``, ``--tls-cert``, ``--tls-key`` or
  their environment variables) with an address without a scheme (``host:port``).
- ``mqtt://`` means plain TCP: giving a TLS file with it is an error, not a silent downgrade.
- With TLS and no CA file, the system's trusted CAs verify the broker. The broker's certificate
  must name the host of the address (a DNS name or IP address in its subjectAltName).
- A client certificate needs both files: ``--tls-cert`` without ``--tls-key`` (or the reverse) is
  an error. The key file must not be encrypted.
- A password needs a username. Credentials are taken from the environment only
  (``FLEETLITE_MQTT_USERNAME``, ``FLEETLITE_MQTT_PASSWORD``), so they never show up in ``ps``.
- An option given on the command line wins over its environment variable.

Errors are :class:`~fleetlite.fleet.errors.BrokerAddressError` with a message that says how to fix
the input.
"""

from __future__ import annotations

import argparse
import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

from fleetlite.fleet.errors import BrokerAddressError

__all__ = [
    "DEFAULT_BROKER",
    "DEFAULT_PORT",
    "DEFAULT_TLS_PORT",
    "ENV_BROKER",
    "ENV_PASSWORD",
    "ENV_TLS_CA",
    "ENV_TLS_CERT",
    "ENV_TLS_KEY",
    "ENV_USERNAME",
    "BROKER_HELP",
    "BrokerAddress",
    "add_tls_options",
    "resolve_broker",
    "ssl_context",
]

DEFAULT_BROKER = "localhost:1883"
"""The broker when neither ``--broker`` nor ``FLEETLITE_BROKER`` is given."""
DEFAULT_PORT = 1883
DEFAULT_TLS_PORT = 8883

ENV_BROKER = "FLEETLITE_BROKER"
ENV_TLS_CA = "FLEETLITE_TLS_CA"
ENV_TLS_CERT = "FLEETLITE_TLS_CERT"
ENV_TLS_KEY = "FLEETLITE_TLS_KEY"
ENV_USERNAME = "FLEETLITE_MQTT_USERNAME"
ENV_PASSWORD = "FLEETLITE_MQTT_PASSWORD"

# how the operator names each file: in error messages
_SOURCES = {
    "ca": f"--tls-ca / {ENV_TLS_CA}",
    "cert": f"--tls-cert / {ENV_TLS_CERT}",
    "key": f"--tls-key / {ENV_TLS_KEY}",
}
_WRITE = ("write HOST:PORT, mqtt://HOST:PORT or mqtts://HOST:PORT (TLS), "
          "e.g. localhost:1883 or mqtts://broker.example.net:8883")
_SCHEMES = {"mqtt": False, "mqtts": True}

PathArg = Union[str, "os.PathLike[str]"]


@dataclass(frozen=True)
class BrokerAddress:
    """An MQTT broker and how to connect to it.

    ``tls``: connect with TLS; ``ca``: the CA file that verifies the broker (None: the system's
    trusted CAs); ``cert``/``key``: the client certificate and its key (both or neither);
    ``username``/``password``: MQTT credentials (the password never shows in ``repr``).
    Build one with :func:`resolve_broker` (or :meth:`parse`), which checks these rules.
    """

    host: str
    port: int
    tls: bool = False
    ca: Optional[Path] = None
    cert: Optional[Path] = None
    key: Optional[Path] = None
    username: Optional[str] = None
    password: Optional[str] = field(default=None, repr=False)

    @classmethod
    def parse(cls, text: str, *, ca: Optional[PathArg] = None, cert: Optional[PathArg] = None,
              key: Optional[PathArg] = None, username: Optional[str] = None,
              password: Optional[str] = None) -> BrokerAddress:
        """The address ``text`` with these TLS files and credentials (no environment read);
        see the module's rules. Raises :class:`BrokerAddressError`."""
        scheme, host, port = _split(text)
        files = {"ca": _path(ca), "cert": _path(cert), "key": _path(key)}
        given = [name for name, value in files.items() if value is not None]
        if scheme == "mqtt" and given:
            raise BrokerAddressError(
                f"the broker address {text.strip()!r} says mqtt:// (plain TCP) but a TLS file is "
                f"set ({', '.join(_SOURCES[n] for n in given)}): write "
                "mqtts://HOST:PORT to connect with TLS, or unset the TLS options")
        if (files["cert"] is None) != (files["key"] is None):
            have, missing = ("cert", "key") if files["key"] is None else ("key", "cert")
            raise BrokerAddressError(
                f"a client certificate needs both files: {_SOURCES[have]} is set but "
                f"{_SOURCES[missing]} is not; give both (the PEM certificate and its "
                "unencrypted PEM key) or neither")
        if password is not None and not username:
            raise BrokerAddressError(
                f"{ENV_PASSWORD} is set without {ENV_USERNAME}: set the MQTT username too, "
                "or unset the password")
        tls = _SCHEMES[scheme] if scheme is not None else bool(given)
        if port is None:
            port = DEFAULT_TLS_PORT if tls else DEFAULT_PORT
        return cls(host, port, tls, files["ca"], files["cert"], files["key"],
                   username or None, password)

    @property
    def url(self) -> str:
        """``mqtt://host:port`` or ``mqtts://host:port`` (IPv6 hosts in brackets); no
        credentials."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'mqtts' if self.tls else 'mqtt'}://{host}:{self.port}"

    def describe(self) -> str:
        """The URL and how the client authenticates, for logs (never the password)."""
        parts = []
        if self.tls:
            parts.append(f"CA {self.ca}" if self.ca else "system CAs")
            if self.cert is not None:
                parts.append(f"client certificate {self.cert}")
        if self.username:
            parts.append(f"user {self.username}")
        return f"{self.url} ({', '.join(parts)})" if parts else self.url

    def __str__(self) -> str:
        return self.url


BROKER_HELP = ("the MQTT broker: HOST:PORT, mqtt://HOST:PORT, or mqtts://HOST:PORT for TLS "
               "(default port 8883), e.g. mqtts://mqtt.example.net:8883 --tls-ca ca.pem "
               "--tls-cert fleet-controller.pem --tls-key fleet-controller.key "
               "(env FLEETLITE_BROKER; default localhost:1883)")
TLS_HELP = {
    "ca": "the CA certificate (PEM) that verifies the broker's certificate; turns TLS on "
          "(env FLEETLITE_TLS_CA; default with mqtts://: the system's trusted CAs)",
    "cert": "the client certificate (PEM) to present to the broker; turns TLS on, needs "
            "--tls-key (env FLEETLITE_TLS_CERT)",
    "key": "the unencrypted key (PEM) of --tls-cert (env FLEETLITE_TLS_KEY)",
}


def add_tls_options(parser: argparse._ActionsContainer, *, default: object = None) -> None:
    """Add ``--tls-ca``, ``--tls-cert`` and ``--tls-key`` (dests ``tls_ca``, ``tls_cert``,
    ``tls_key``) to a parser or argument group. MQTT credentials have no options: they come
    from ``FLEETLITE_MQTT_USERNAME`` / ``FLEETLITE_MQTT_PASSWORD`` only."""
    for name in ("ca", "cert", "key"):
        parser.add_argument(f"--tls-{name}", dest=f"tls_{name}", metavar="FILE",
                            default=default, help=TLS_HELP[name])


def resolve_broker(address: Optional[str] = None, *, ca: Optional[PathArg] = None,
                   cert: Optional[PathArg] = None, key: Optional[PathArg] = None,
                   username: Optional[str] = None, password: Optional[str] = None,
                   env: Optional[Mapping[str, str]] = None) -> BrokerAddress:
    """The broker the operator means: each argument given (a CLI option), else its environment
    variable in ``env`` (default ``os.environ``): ``FLEETLITE_BROKER`` (else
    :data:`DEFAULT_BROKER`), ``FLEETLITE_TLS_CA``, ``FLEETLITE_TLS_CERT``, ``FLEETLITE_TLS_KEY``,
    ``FLEETLITE_MQTT_USERNAME``, ``FLEETLITE_MQTT_PASSWORD``. Empty values count as unset.
    Nothing is read from disk: :func:`ssl_context` checks the files when connecting."""
    environ: Mapping[str, str] = os.environ if env is None else env

    def pick(value: Optional[PathArg], name: str) -> Optional[PathArg]:
        if value is not None and os.fspath(value) != "":
            return value
        return environ.get(name) or None

    text = pick(address, ENV_BROKER) or DEFAULT_BROKER
    return BrokerAddress.parse(
        os.fspath(text), ca=pick(ca, ENV_TLS_CA), cert=pick(cert, ENV_TLS_CERT),
        key=pick(key, ENV_TLS_KEY), username=_text(pick(username, ENV_USERNAME)),
        password=_text(pick(password, ENV_PASSWORD)))


def ssl_context(address: BrokerAddress) -> Optional[ssl.SSLContext]:
    """The TLS context to connect to ``address`` (None without TLS): verifies the broker with
    ``address.ca`` (else the system's CAs) and its host name, and presents the client
    certificate if one is given. Raises :class:`BrokerAddressError` naming the file and the
    option or environment variable when a file is missing, unreadable or not PEM."""
    if not address.tls:
        return None
    for name in ("ca", "cert", "key"):
        path: Optional[Path] = getattr(address, name)
        if path is not None and not path.is_file():
            what = "does not exist" if not path.exists() else "is not a file"
            raise BrokerAddressError(
                f"the TLS {_LABELS[name]} {path} ({_SOURCES[name]}) {what}: check the path")
    try:
        context = ssl.create_default_context(
            cafile=os.fspath(address.ca) if address.ca is not None else None)
    except (ssl.SSLError, OSError) as exc:
        raise BrokerAddressError(
            f"cannot load the TLS CA file {address.ca} ({_SOURCES['ca']}): {_reason(exc)}; it "
            "must be a PEM file holding the CA certificate that signed the broker's "
            "certificate") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2  # Python 3.9's default still allows 1.0
    if address.cert is not None and address.key is not None:
        try:
            context.load_cert_chain(os.fspath(address.cert), os.fspath(address.key),
                                    password=_no_passphrase)
        except (ssl.SSLError, OSError) as exc:
            raise BrokerAddressError(
                f"cannot load the TLS client certificate {address.cert} ({_SOURCES['cert']}) "
                f"with the key {address.key} ({_SOURCES['key']}): {_reason(exc)}; both must be "
                "PEM files, the key unencrypted and matching the certificate") from None
    return context


_LABELS = {"ca": "CA file", "cert": "client certificate", "key": "client key"}


def _no_passphrase() -> str:
    raise OSError("the key is encrypted (FleetLite needs an unencrypted key file)")


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason).replace("_", " ").lower()
    if isinstance(exc, OSError) and exc.strerror:
        return str(exc.strerror)
    return str(exc)


def _text(value: Optional[PathArg]) -> Optional[str]:
    return None if value is None else os.fspath(value)


def _path(value: Optional[PathArg]) -> Optional[Path]:
    if value is None or os.fspath(value) == "":
        return None
    return Path(os.fspath(value)).expanduser()


def _split(text: str) -> tuple[Optional[str], str, Optional[int]]:
    """(scheme or None, host, port or None) of an address; pure syntax."""
    value = text.strip()
    if not value:
        raise BrokerAddressError(f"the broker address is empty: {_WRITE}")
    scheme: Optional[str] = None
    if "://" in value:
        given, value = value.split("://", 1)
        scheme = given.lower()
        if scheme not in _SCHEMES:
            raise BrokerAddressError(
                f"cannot read the broker address {text!r}: unknown scheme {given}://; {_WRITE}")
        if value.endswith("/"):
            value = value[:-1]
    if "@" in value:
        # not echoed: the address may hold a password
        raise BrokerAddressError(
            f"cannot read the broker address: no credentials in the address (USER:PASSWORD@); "
            f"write HOST:PORT and set {ENV_USERNAME} and {ENV_PASSWORD} instead")
    if "/" in value:
        raise BrokerAddressError(
            f"cannot read the broker address {text!r}: nothing may follow HOST:PORT; {_WRITE}")
    port_text: Optional[str] = None
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            raise BrokerAddressError(
                f"cannot read the broker address {text!r}: unclosed [ (write [IPV6]:PORT, "
                "e.g. [::1]:1883)")
        host, rest = value[1:end], value[end + 1:]
        if rest:
            if not rest.startswith(":"):
                raise BrokerAddressError(
                    f"cannot read the broker address {text!r}: write [IPV6]:PORT, e.g. "
                    "[::1]:1883")
            port_text = rest[1:]
    elif value.count(":") == 1:
        host, port_text = value.split(":")
    else:
        host = value  # a name, or an IPv6 literal without a port
    if not host or any(c.isspace() for c in host):
        raise BrokerAddressError(f"cannot read the broker address {text!r}: no host; {_WRITE}")
    port: Optional[int] = None
    if port_text is not None:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise BrokerAddressError(
                f"cannot read the broker address {text!r}: the port must be a number "
                f"1..65535; {_WRITE}")
        port = int(port_text)
    return scheme, host, port
