"""A Mosquitto 2.0 configuration and ACL for a FleetLite fleet, generated as text (no I/O:
``fleetlite broker-config`` writes the files).

The TLS listener admits only clients with a certificate from the fleet CA; the certificate's CN
becomes the MQTT username, and the ACL gives each identity (see fleet/pki.py) its rights on the
topic layout of sdk/topics.py:

- a device (CN = device id) publishes its reports under ``fleetlite/v1/dev/<its id>/...`` and
  reads only its own ``cmd``; it reads the release topics ``fleetlite/v1/rel/#`` and publishes
  none of them;
- a controller (CN ``controller:NAME``) reads and writes the whole ``fleetlite/v1/`` tree, also
  through shared subscriptions ``$share/GROUP/...``;
- an operator (CN ``operator:NAME``) reads the tree and the broker's ``$SYS`` statistics and
  writes nothing: commands and releases go through a controller, which records them.

What this relies on, from mosquitto.conf(5) of Mosquitto 2.0
(https://mosquitto.org/man/mosquitto-conf-5.html):

- ``require_certificate true``: "a client connecting to this listener must provide a valid
  certificate in order for the network connection to proceed"; ``crlfile``: revoked client
  certificates are refused; ``tls_version``: the minimum TLS version of the listener.
- ``use_identity_as_username true``: "the Common Name (CN) from the client certificate [is]
  used instead of the MQTT username for access control purposes" and "the password_file
  option will not be used for this listener".
- ``acl_file``: "only the topics listed will have access"; ``topic`` lines after
  ``user <username>`` apply to that username ("It is not the clientid"); ``pattern`` lines
  "apply to all users", ``%u`` is replaced by the username and "must be the only text for that
  level of hierarchy" -- hence the device id has its own topic level; the access types are
  ``read``, ``write``, ``readwrite`` and ``deny``.
- ``per_listener_settings true``: ``acl_file`` and ``allow_anonymous`` then apply to the
  listener they follow, so an optional loopback listener for local tools has settings of its
  own and the TLS listener's cannot leak to it (or the reverse).
- ``max_packet_size`` "applies to the full MQTT packet, not just the payload" and a client
  sending a larger packet "will be disconnected"; ``max_queued_messages`` and
  ``max_queued_bytes`` bound the QoS 1/2 messages queued per client ("subsequent messages will
  be silently dropped"); ``max_inflight_messages`` bounds the messages in flight per client.
  These four apply to every client.
- ``acl_file`` is "Reloaded on reload signal" (SIGHUP), and so is ``crlfile`` (Mosquitto's
  ChangeLog: "Fix CRL file not being reloaded on HUP", #35; tests/test_pki.py checks it); a
  reload checks new connections only, a restart also drops the connected ones.
- Mosquitto 2.0 grants every SUBSCRIBE and applies ``read`` to each message it would deliver
  (tests/test_pki.py shows a device subscribed to ``#`` receiving only what it may read). The
  ``$share/+/...`` line serves brokers and plugins that check a shared subscription's filter
  as written.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Optional

from fleetlite.fleet.errors import FleetError
from fleetlite.sdk import topics

__all__ = [
    "DEFAULT_MAX_INFLIGHT_MESSAGES",
    "DEFAULT_MAX_QUEUED_BYTES",
    "DEFAULT_MAX_QUEUED_MESSAGES",
    "PACKET_HEADROOM",
    "BrokerConfigError",
    "BrokerFiles",
    "BrokerSettings",
    "GeneratedConfig",
    "acl_text",
    "default_max_packet_size",
    "generate",
    "largest_messages",
    "mosquitto_conf",
]

#: room above the largest payload for the MQTT fixed header, the topic and MQTT 5 properties,
#: and for a protocol cap that grows a little before this generator is rerun
PACKET_HEADROOM = 64 * 1024


def largest_messages() -> dict[str, int]:
    """The largest payload of each message the protocol sends, in bytes, from the caps in
    sdk/ (imported here: sdk.verify is slow to import and the CLI parser does not need it)."""
    from fleetlite.sdk.chunks import HEADER_SIZE, MAX_CHUNK_SIZE
    from fleetlite.sdk.messages import MAX_COMMAND_BYTES, MAX_REPORT_BYTES
    from fleetlite.sdk.ota_messages import MAX_CHUNK_REQUEST_BYTES
    from fleetlite.sdk.verify import DEFAULT_LIMITS

    return {
        "release manifest envelope (sdk/verify.py Limits.max_envelope_bytes)":
            DEFAULT_LIMITS.max_envelope_bytes,
        "chunk frame (sdk/chunks.py: header + MAX_CHUNK_SIZE)": HEADER_SIZE + MAX_CHUNK_SIZE,
        "device report (sdk/messages.py MAX_REPORT_BYTES)": MAX_REPORT_BYTES,
        "command (sdk/messages.py MAX_COMMAND_BYTES)": MAX_COMMAND_BYTES,
        "chunk request (sdk/ota_messages.py MAX_CHUNK_REQUEST_BYTES)": MAX_CHUNK_REQUEST_BYTES,
    }


def default_max_packet_size() -> int:
    """The largest protocol message plus :data:`PACKET_HEADROOM`."""
    return max(largest_messages().values()) + PACKET_HEADROOM


#: A controller's persistent session queues every device message while it is away: 1,000
#: devices reporting twice a minute fill 50,000 slots in 25 minutes (10,000 devices in 2.5).
#: Mosquitto's default of 1,000 dropped reports of well-behaved devices while one device
#: flooded. The byte cap bounds what one client can pin in the broker's memory (a slow device
#: fed release chunks, or a controller away for long).
DEFAULT_MAX_QUEUED_MESSAGES = 50_000
DEFAULT_MAX_QUEUED_BYTES = 128 * 1024 * 1024
#: QoS 1 messages in flight to one client: 20 (the default) caps a controller draining its
#: backlog over a 50 ms link at 400 messages/s; 100 allows 2,000.
DEFAULT_MAX_INFLIGHT_MESSAGES = 100
DEFAULT_PORT = 8883
DEVICE_TREE = f"{topics.DEVICE_PREFIX}/%u"
RELEASE_TREE = f"{topics.RELEASE_PREFIX}/#"
FLEET_TREE = f"{topics.ROOT}/#"


class BrokerConfigError(FleetError):
    """A broker configuration cannot be generated from these settings; the message says
    which setting to fix."""


@dataclass(frozen=True)
class BrokerFiles:
    """Where the broker will find its files (paths as Mosquitto sees them)."""

    ca: str
    cert: str
    key: str
    acl: str
    crl: Optional[str] = None


@dataclass(frozen=True)
class BrokerSettings:
    """The listeners and limits of the generated configuration."""

    port: int = DEFAULT_PORT
    #: the address the TLS listener binds to (None: every interface)
    bind: Optional[str] = None
    #: a plain MQTT listener on 127.0.0.1 for local tools (None: none). Anyone who can open a
    #: socket on the broker's host has a controller's rights on it.
    local_port: Optional[int] = None
    #: None: :func:`default_max_packet_size`
    max_packet_size: Optional[int] = None
    max_queued_messages: int = DEFAULT_MAX_QUEUED_MESSAGES
    max_queued_bytes: int = DEFAULT_MAX_QUEUED_BYTES
    max_inflight_messages: int = DEFAULT_MAX_INFLIGHT_MESSAGES
    #: keep sessions and retained messages across broker restarts in this directory
    persistence_dir: Optional[str] = None


@dataclass(frozen=True)
class GeneratedConfig:
    """The texts of ``mosquitto.conf`` and of the ACL file it names."""

    mosquitto_conf: str
    acl: str
    notes: tuple[str, ...] = field(default=())


def _check(settings: BrokerSettings) -> int:
    """Raise on a setting Mosquitto or the protocol cannot work with; returns the
    max_packet_size to write."""
    for name in ("port", "local_port"):
        value = getattr(settings, name)
        if value is not None and not 0 < value < 65536:
            flag = "--port" if name == "port" else "--local-port"
            raise BrokerConfigError(f"{flag} must be 1..65535, got {value}")
    if settings.local_port is not None and settings.local_port == settings.port:
        raise BrokerConfigError(f"--local-port {settings.local_port} is the TLS listener's "
                                "port; choose another, e.g. 1883")
    largest = max(largest_messages().values())
    packet = settings.max_packet_size or largest + PACKET_HEADROOM
    if packet < largest:
        raise BrokerConfigError(
            f"--max-packet-size {packet} is below the protocol's largest message ({largest} "
            "bytes, a release manifest envelope): the broker would disconnect the controller "
            f"sending it; use at least {largest + PACKET_HEADROOM}")
    for name in ("max_queued_messages", "max_queued_bytes", "max_inflight_messages"):
        if getattr(settings, name) < 1:
            raise BrokerConfigError(f"--{name.replace('_', '-')} must be at least 1 (0 would "
                                    "mean no limit in Mosquitto)")
    if settings.max_queued_bytes < packet:
        raise BrokerConfigError(
            f"--max-queued-bytes {settings.max_queued_bytes} cannot hold one message of "
            f"--max-packet-size {packet}; raise it")
    for text, flag in ((settings.bind, "--bind"), (settings.persistence_dir, "--persistence-dir")):
        if text is not None and (not text or any(c.isspace() for c in text)):
            raise BrokerConfigError(f"{flag} {text!r} must be non-empty, without spaces")
    return packet


def acl_text(controllers: Sequence[str] = (), operators: Sequence[str] = ()) -> str:
    """The ACL file: device rules as ``pattern`` lines, then one ``user`` block per controller
    and operator CN (``controller:NAME``, ``operator:NAME``), each listed once, sorted."""
    for cn, prefix in [*((c, "controller:") for c in controllers),
                       *((o, "operator:") for o in operators)]:
        if not cn.startswith(prefix) or len(cn) == len(prefix) or any(
                ch.isspace() or ch in "+#/" for ch in cn):
            raise BrokerConfigError(f"{cn!r} is not a {prefix[:-1]} identity ({prefix}NAME)")
    lines = [
        "# FleetLite broker ACL, written by `fleetlite broker-config`. Regenerate it (do not",
        "# edit it) after issuing or revoking a controller or operator certificate.",
        "#",
        "# Usernames are certificate CNs (use_identity_as_username): a device id, which never",
        "# holds ':' (sdk/topics.py), controller:NAME or operator:NAME. Mosquitto grants only",
        "# what is listed; 'pattern' lines apply to every client with %u replaced by its",
        "# username, which fills a whole topic level; 'topic' lines apply to the 'user' above",
        "# them. read = subscribe and receive, write = publish (the Will included).",
        "",
        "# Devices: their own subtree, each message kind in its direction only.",
    ]
    for kind in topics.DEVICE_TO_FLEET:
        lines.append(f"pattern write {DEVICE_TREE}/{kind}")
    for kind in topics.FLEET_TO_DEVICE:
        lines.append(f"pattern read {DEVICE_TREE}/{kind}")
    lines += [
        "# Devices read every release's manifest and chunks (sent once per wave to all of",
        "# them); only controllers publish there.",
        f"pattern read {RELEASE_TREE}",
    ]
    for cn in sorted(set(controllers)):
        lines += ["", "# a fleet controller: the whole tree, also through shared subscriptions",
                  f"user {cn}", f"topic readwrite {FLEET_TREE}",
                  f"topic readwrite $share/+/{FLEET_TREE}"]
    for cn in sorted(set(operators)):
        lines += ["", "# an operator: reads the tree and the broker statistics, writes nothing",
                  f"user {cn}", f"topic read {FLEET_TREE}", "topic read $SYS/#"]
    if not controllers:
        lines += ["", "# No controller certificate is issued yet: issue one with",
                  "# `fleetlite pki issue controller NAME` and run broker-config again."]
    return "\n".join(lines) + "\n"


def _limit_lines(settings: BrokerSettings) -> list[str]:
    """The message size and per-client queue limits, with why (shared with the demo's broker)."""
    packet = _check(settings)
    sizes = largest_messages()
    largest = max(sizes, key=lambda k: sizes[k])
    return [
        f"# the protocol's largest message is the {largest}:",
        f"# {sizes[largest]} bytes; {PACKET_HEADROOM} bytes of headroom on top",
        f"max_packet_size {packet}",
        "# per client: a controller's backlog while it restarts, bounded in bytes",
        f"max_queued_messages {settings.max_queued_messages}",
        f"max_queued_bytes {settings.max_queued_bytes}",
        f"max_inflight_messages {settings.max_inflight_messages}",
        "# small packets (a chunk request, a command) leave at once, not after Nagle's delay:",
        "# 30-55 ms per request window of a download, 2-10 ms with it (bench_ota_transfer)",
        "set_tcp_nodelay true",
    ]


def local_mosquitto_conf(port: int) -> str:
    """A loopback-only, anonymous Mosquitto with the generated limits: the zero-setup broker of
    ``fleetlite demo`` (no TLS and no ACL: every local user has a controller's rights)."""
    lines = ["# FleetLite's local demo broker: the limits of `fleetlite broker-config`, plain",
             "# MQTT on the loopback only", *_limit_lines(BrokerSettings()),
             f"listener {port} 127.0.0.1", "allow_anonymous true", "persistence false"]
    return "\n".join(lines) + "\n"


def mosquitto_conf(files: BrokerFiles, settings: BrokerSettings = BrokerSettings()) -> str:
    """The ``mosquitto.conf`` text (Mosquitto 2.0)."""
    lines = [
        "# FleetLite broker configuration for Mosquitto 2.0, written by",
        "# `fleetlite broker-config`; see docs/operator-guide.md.",
        "",
        "# authentication and ACL per listener (TLS for the fleet, optional loopback for tools)",
        "per_listener_settings true",
        "",
        *_limit_lines(settings),
    ]
    if settings.persistence_dir is not None:
        lines += ["persistence true", f"persistence_location {settings.persistence_dir}/"]
    listen = f"listener {settings.port}" + (f" {settings.bind}" if settings.bind else "")
    lines += [
        "",
        "# devices, controllers and operators: TLS with a client certificate from the fleet CA;",
        "# its CN is the MQTT username the ACL knows",
        listen,
        "tls_version tlsv1.2",
        f"cafile {files.ca}",
        f"certfile {files.cert}",
        f"keyfile {files.key}",
    ]
    if files.crl is not None:
        lines.append(f"crlfile {files.crl}")
    lines += [
        "require_certificate true",
        "use_identity_as_username true",
        "allow_anonymous false",
        f"acl_file {files.acl}",
    ]
    if settings.local_port is not None:
        lines += [
            "",
            "# local tools on this host only (plain MQTT, loopback, no ACL): every local user",
            "# has a controller's rights here",
            f"listener {settings.local_port} 127.0.0.1",
            "allow_anonymous true",
        ]
    return "\n".join(lines) + "\n"


def generate(files: BrokerFiles, settings: BrokerSettings = BrokerSettings(), *,
             controllers: Sequence[str] = (), operators: Sequence[str] = ()) -> GeneratedConfig:
    """Both texts, and notes for the operator (e.g. no controller certificate yet)."""
    notes = []
    if not controllers:
        notes.append("no controller certificate is issued: `fleetlite serve` cannot reach the "
                     "devices until you run `fleetlite pki issue controller NAME` and "
                     "broker-config again")
    if files.crl is None:
        notes.append("no crl.pem in the PKI: revoked certificates would still connect; run "
                     "`fleetlite pki crl` and broker-config again")
    return GeneratedConfig(mosquitto_conf(files, settings), acl_text(controllers, operators),
                           tuple(notes))
