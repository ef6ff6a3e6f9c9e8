"""``fleetlite pki`` and ``fleetlite broker-config`` against a real Mosquitto started with the
GENERATED configuration, ACL and certificates (the only line added is ``user root`` when the
tests run as root, as in tests/mqtt_harness.py), and a real agent started from an enrolment
bundle.

Every client verifies the broker the way Python 3.13 does (``VERIFY_X509_STRICT``). Every
negative case waits for a positive event with a deadline, never a guessed sleep: a forbidden
publish is followed by a canary the same subscriber WOULD receive, published after the broker
acknowledged the forbidden one (Mosquitto is single-threaded and keeps per-connection order), so
once the canary is in, the forbidden message can no longer arrive; a refused connection is an
error or a disconnect seen before any CONNACK."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import ssl
import stat
import subprocess
import tarfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import yaml
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from paho.mqtt.enums import CallbackAPIVersion

from fleetlite.fleet import broker_config, cli_pki, pki
from fleetlite.fleet.broker_config import BrokerConfigError, BrokerFiles, BrokerSettings
from fleetlite.fleet.cli import build_parser
from fleetlite.sdk import topics
from fleetlite.sdk.messages import Birth
from tests.agent_harness import AgentProcess
from tests.mqtt_harness import Mosquitto, free_port
from tests.test_fleet_cli import FLEETLITE
from tests.test_ota_install import CLASS, write_root

DEADLINE = 20.0
RELEASE = "ab" * 32
A, B, C = "gw-a", "gw-b", "gw-c"


# -- helpers ---------------------------------------------------------------------------------


def run_cli(*args: str, env: dict[str, str], expect: int = 0,
            outputs: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    """``fleetlite ARGS``; asserts the exit code; stdout and stderr go to ``outputs`` (every
    one of them is checked for keys)."""
    proc = subprocess.run([FLEETLITE, *args], capture_output=True, text=True, env=env,
                          timeout=120, check=False)
    if outputs is not None:
        outputs += [proc.stdout, proc.stderr]
    assert proc.returncode == expect, (
        f"fleetlite {shlex.join(args)} exited {proc.returncode}, expected {expect}\n"
        f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def strict_context(ca: Path, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    """A client context that verifies the broker as Python 3.13+ does by default."""
    context = ssl.create_default_context(cafile=str(ca))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.verify_flags |= ssl.VERIFY_X509_STRICT
    if cert is not None and key is not None:
        context.load_cert_chain(str(cert), str(key))
    return context


@dataclass
class Got:
    topic: str
    payload: bytes


@dataclass
class Client:
    """One paho client over TLS that records what it receives; every call waits for the
    broker's acknowledgement (CONNACK, SUBACK, PUBACK) with a deadline."""

    name: str
    port: int
    context: ssl.SSLContext | None
    client_id: str = ""
    messages: list[Got] = field(default_factory=list)
    disconnected: threading.Event = field(default_factory=threading.Event)
    _cond: threading.Condition = field(default_factory=threading.Condition)
    _client: Any = None

    def connect(self) -> Client:
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id or self.name,
                             reconnect_on_failure=False)
        if self.context is not None:
            client.tls_set_context(self.context)
        outcome: dict[str, str] = {}
        done = threading.Event()

        def on_connect(c: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
            outcome.setdefault("result", "connected" if not reason.is_failure else str(reason))
            done.set()

        def on_disconnect(c: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
            outcome.setdefault("result", f"disconnected: {reason}")
            self.disconnected.set()
            done.set()

        def on_message(c: Any, userdata: Any, msg: Any) -> None:
            with self._cond:
                self.messages.append(Got(msg.topic, bytes(msg.payload)))
                self._cond.notify_all()

        client.on_connect, client.on_disconnect = on_connect, on_disconnect
        client.on_connect_fail = lambda c, u: (outcome.setdefault("result", "connect failed"),
                                               done.set())
        client.on_message = on_message
        self._client = client
        try:
            client.connect("localhost", self.port, keepalive=30)
        except (OSError, ssl.SSLError) as exc:
            raise ConnectionRefusedError(f"{self.name}: {exc!r}") from exc
        client.loop_start()
        if not done.wait(DEADLINE):
            self.close()
            raise TimeoutError(f"{self.name}: neither CONNACK nor a disconnect in {DEADLINE} s")
        if outcome["result"] != "connected":
            self.close()
            raise ConnectionRefusedError(f"{self.name}: {outcome['result']}")
        return self

    def subscribe(self, *filters: str) -> Client:
        acked = threading.Event()
        self._client.on_subscribe = lambda c, u, mid, rcs, p: acked.set()
        self._client.subscribe([(f, 1) for f in filters])
        assert acked.wait(DEADLINE), f"{self.name}: no SUBACK for {filters}"
        return self

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        info = self._client.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(DEADLINE)
        assert info.is_published(), f"{self.name}: no PUBACK for {topic}"

    def wait_for(self, topic: str, payload: bytes) -> None:
        deadline = time.monotonic() + DEADLINE
        with self._cond:
            while Got(topic, payload) not in self.messages:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"{self.name} never received {payload!r} on {topic}; got "
                                       f"{[(m.topic, m.payload) for m in self.messages]}")
                self._cond.wait(remaining)

    def received(self, payload: bytes) -> list[str]:
        with self._cond:
            return [m.topic for m in self.messages if m.payload == payload]

    def close(self) -> None:
        if self._client is not None:
            self._client.disconnect()
            self._client.loop_stop()
            self._client = None


def refused(name: str, port: int, context: ssl.SSLContext | None) -> str:
    """Connect and expect the broker to refuse; returns how (the positive event)."""
    with pytest.raises(ConnectionRefusedError) as caught:
        Client(name, port, context).connect().close()
    return str(caught.value)


def never_delivered(receiver: Client, forbidden: tuple[Client, str, bytes],
                    canary: tuple[Client, str, bytes]) -> None:
    """``forbidden`` is published and acknowledged, then ``canary``; once the receiver has the
    canary it must not have (and can no longer get) the forbidden payload."""
    sender, topic, payload = forbidden
    sender.publish(topic, payload)
    canary_sender, canary_topic, canary_payload = canary
    canary_sender.publish(canary_topic, canary_payload)
    receiver.wait_for(canary_topic, canary_payload)
    assert receiver.received(payload) == [], f"{receiver.name} received {payload!r}"


@dataclass
class Site:
    """A PKI made with the CLI, and a broker running the configuration broker-config wrote."""

    work: Path
    pki: Path
    env: dict[str, str]
    broker: Mosquitto
    outputs: list[str]

    @property
    def port(self) -> int:
        return self.broker.port

    @property
    def ca(self) -> Path:
        return self.pki / "ca.pem"

    def context(self, folder: str, name: str) -> ssl.SSLContext:
        base = self.pki / folder / name
        return strict_context(self.ca, base.with_suffix(".pem"), base.with_suffix(".key"))

    def client(self, folder: str, name: str, client_id: str = "") -> Client:
        return Client(client_id or name, self.port, self.context(folder, name), client_id)

    def cli(self, *args: str, expect: int = 0) -> subprocess.CompletedProcess[str]:
        return run_cli(*args, env=self.env, expect=expect, outputs=self.outputs)

    def configure(self) -> None:
        """broker-config into the broker's directory, as the broker will read it."""
        self.cli("broker-config", "--out", str(self.work / "broker"), "--port", str(self.port),
                 "--bind", "127.0.0.1")
        conf = self.work / "broker" / "mosquitto.conf"
        # as root, mosquitto would drop to the 'mosquitto' user, who cannot read pytest's
        # private temp dirs (see tests/mqtt_harness.py); this is the only line added
        user = "user root\n" if os.geteuid() == 0 else ""
        self.broker.conf.write_text(conf.read_text() + user)


def make_site(work: Path) -> Site:
    env = {**os.environ, "FLEETLITE_PKI": str(work / "pki")}
    env.pop("FLEETLITE_BROKER", None)
    outputs: list[str] = []
    # Mosquitto's working files and log go beside the generated configuration
    broker = Mosquitto(work / "broker", port=free_port())
    site = Site(work, work / "pki", env, broker, outputs)
    site.cli("pki", "init", str(site.pki), "--name", "Test fleet CA")
    site.cli("pki", "issue", "broker", "--dns", "localhost", "--ip", "127.0.0.1")
    site.cli("pki", "issue", "controller", "ctl-1")
    site.cli("pki", "issue", "operator", "alice")
    for device in (A, B, C):
        site.cli("pki", "issue", "device", device, "--class", CLASS)
    site.configure()
    broker.start()
    return site


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    made = make_site(tmp_path_factory.mktemp("pki-site"))
    try:
        yield made
    finally:
        made.broker.stop()


@pytest.fixture
def clients() -> Iterator[list[Client]]:
    """Clients a test opens; closed afterwards."""
    opened: list[Client] = []
    yield opened
    for client in opened:
        client.close()


def key_bodies(directory: Path) -> list[str]:
    """The base64 lines of every PEM private key under ``directory``."""
    bodies = []
    for path in directory.rglob("*.key"):
        bodies += [line for line in path.read_text().splitlines()
                   if line and not line.startswith("-----")]
    return bodies


# -- the broker with the generated configuration ---------------------------------------------


def test_a_device_publishes_its_reports_and_receives_its_commands(
        site: Site, clients: list[Client]) -> None:
    ctl = site.client("controllers", "ctl-1").connect().subscribe(f"{topics.DEVICE_PREFIX}/+/#")
    device = site.client("devices", A).connect().subscribe(topics.device_topic(A, topics.COMMAND))
    clients += [ctl, device]
    for kind in topics.DEVICE_TO_FLEET:
        device.publish(topics.device_topic(A, kind), f"{kind} of {A}".encode())
    for kind in topics.DEVICE_TO_FLEET:
        ctl.wait_for(topics.device_topic(A, kind), f"{kind} of {A}".encode())
    ctl.publish(topics.device_topic(A, topics.COMMAND), b"ping")
    device.wait_for(topics.device_topic(A, topics.COMMAND), b"ping")
    # the broker knows each client by its certificate's CN
    log = site.broker.read_log()
    assert f"u'{A}'" in log and "u'controller:ctl-1'" in log


def test_a_device_cannot_publish_as_another_device(site: Site, clients: list[Client]) -> None:
    ctl = site.client("controllers", "ctl-1").connect().subscribe(f"{topics.DEVICE_PREFIX}/+/#")
    a = site.client("devices", A).connect()
    clients += [ctl, a]
    for kind in topics.DEVICE_TO_FLEET:
        never_delivered(ctl, (a, topics.device_topic(B, kind), f"forged {kind}".encode()),
                        (a, topics.device_topic(A, kind), f"canary {kind}".encode()))


def test_a_device_cannot_read_another_devices_topics(site: Site, clients: list[Client]) -> None:
    ctl = site.client("controllers", "ctl-1").connect().subscribe(f"{topics.DEVICE_PREFIX}/+/#")
    b = site.client("devices", B).connect()
    # A asks for B's subtree, every device's reports and the whole broker
    a = site.client("devices", A).connect().subscribe(
        f"{topics.DEVICE_PREFIX}/{B}/#", f"{topics.DEVICE_PREFIX}/+/telemetry", "#",
        topics.device_topic(A, topics.COMMAND))
    clients += [ctl, b, a]
    b.publish(topics.device_topic(B, topics.TELEMETRY), b"B's telemetry")
    ctl.wait_for(topics.device_topic(B, topics.TELEMETRY), b"B's telemetry")  # it was sent
    ctl.publish(topics.device_topic(B, topics.COMMAND), b"B's command")
    ctl.publish(topics.device_topic(A, topics.COMMAND), b"canary")
    a.wait_for(topics.device_topic(A, topics.COMMAND), b"canary")
    assert a.received(b"B's telemetry") == [] and a.received(b"B's command") == []


def test_a_device_cannot_command_another_device_or_itself(site: Site,
                                                          clients: list[Client]) -> None:
    a = site.client("devices", A).connect().subscribe(topics.device_topic(A, topics.COMMAND))
    b = site.client("devices", B).connect().subscribe(topics.device_topic(B, topics.COMMAND))
    ctl = site.client("controllers", "ctl-1").connect()
    clients += [a, b, ctl]
    never_delivered(b, (a, topics.device_topic(B, topics.COMMAND), b"forged command"),
                    (ctl, topics.device_topic(B, topics.COMMAND), b"canary for B"))
    never_delivered(a, (a, topics.device_topic(A, topics.COMMAND), b"self command"),
                    (ctl, topics.device_topic(A, topics.COMMAND), b"canary for A"))


def test_a_device_reads_the_release_topics_and_cannot_publish_there(
        site: Site, clients: list[Client]) -> None:
    a = site.client("devices", A).connect().subscribe(f"{topics.RELEASE_PREFIX}/#")
    b = site.client("devices", B).connect().subscribe(f"{topics.RELEASE_PREFIX}/#")
    ctl = site.client("controllers", "ctl-1").connect()
    clients += [a, b, ctl]
    for kind in topics.RELEASE_KINDS:
        topic = topics.release_topic(RELEASE, kind)
        never_delivered(b, (a, topic, f"forged {kind}".encode()),
                        (ctl, topic, f"real {kind}".encode()))
        a.wait_for(topic, f"real {kind}".encode())  # A reads releases too
        assert a.received(f"forged {kind}".encode()) == []


def test_a_controller_reaches_everything_also_through_shared_subscriptions(
        site: Site, clients: list[Client]) -> None:
    plain = site.client("controllers", "ctl-1", "ctl-1-plain").connect().subscribe(
        f"{topics.ROOT}/#")
    shared = site.client("controllers", "ctl-1", "ctl-1-shared").connect().subscribe(
        topics.fleet_subscription(topics.TELEMETRY, "ctl"))
    a = site.client("devices", A).connect().subscribe(f"{topics.ROOT}/#")
    clients += [plain, shared, a]
    a.publish(topics.device_topic(A, topics.TELEMETRY), b"telemetry")
    shared.wait_for(topics.device_topic(A, topics.TELEMETRY), b"telemetry")
    plain.wait_for(topics.device_topic(A, topics.TELEMETRY), b"telemetry")
    for topic in (topics.device_topic(A, topics.COMMAND),
                  topics.release_topic(RELEASE, topics.RELEASE_MANIFEST),
                  topics.chunk_topic(RELEASE, 4096, 0, 7)):
        plain.publish(topic, b"from the controller")
        plain.wait_for(topic, b"from the controller")
        a.wait_for(topic, b"from the controller")


def test_an_operator_reads_the_tree_and_writes_nothing(site: Site, clients: list[Client]) -> None:
    operator = site.client("operators", "alice").connect().subscribe(f"{topics.ROOT}/#")
    a = site.client("devices", A).connect().subscribe(topics.device_topic(A, topics.COMMAND))
    ctl = site.client("controllers", "ctl-1").connect().subscribe(f"{topics.ROOT}/#")
    clients += [operator, a, ctl]
    a.publish(topics.device_topic(A, topics.EVENTS), b"event")
    operator.wait_for(topics.device_topic(A, topics.EVENTS), b"event")
    never_delivered(a, (operator, topics.device_topic(A, topics.COMMAND), b"operator command"),
                    (ctl, topics.device_topic(A, topics.COMMAND), b"canary"))
    never_delivered(ctl, (operator, topics.release_topic(RELEASE, topics.RELEASE_MANIFEST),
                          b"operator release"),
                    (ctl, topics.device_topic(A, topics.COMMAND), b"canary 2"))


def test_clients_without_a_fleet_certificate_cannot_connect(site: Site, tmp_path: Path) -> None:
    # no client certificate
    assert refused("anonymous", site.port, strict_context(site.ca))
    # a certificate from another CA, even with a known device id
    other = pki.Pki.init(tmp_path / "other-pki")
    stranger = other.issue("device", A, device_class=CLASS)
    assert refused(A, site.port, strict_context(site.ca, stranger.cert, stranger.key))
    # the broker's own certificate (serverAuth only) is no client certificate
    broker = site.pki / "broker" / "localhost"
    assert refused("broker", site.port, strict_context(
        site.ca, broker.with_suffix(".pem"), broker.with_suffix(".key")))
    # plain MQTT to the TLS listener: no CONNACK, the broker closes the connection
    assert refused(A, site.port, None)
    # and the raw bytes of an MQTT CONNECT get no CONNACK (0x20) back
    with socket.create_connection(("127.0.0.1", site.port), timeout=DEADLINE) as raw:
        raw.sendall(bytes([0x10, 12, 0, 4]) + b"MQTT" + bytes([4, 2, 0, 30, 0, 0]))
        try:
            answer = raw.recv(16)
        except ConnectionResetError:
            answer = b""
        assert not answer.startswith(b"\x20"), answer
    # a device certificate still connects (the broker is not simply refusing everyone)
    site.client("devices", B).connect().close()


def test_a_revoked_certificate_cannot_connect_after_a_reload_or_a_restart(
        tmp_path: Path) -> None:
    own = make_site(tmp_path)
    ctl = own.client("controllers", "ctl-1").connect()
    connected = own.client("devices", C).connect().subscribe(topics.device_topic(C, topics.COMMAND))
    try:
        revoked = json.loads(own.cli("pki", "revoke", C, "--reason", "key-compromise", "-o",
                                     "json").stdout)
        serial = int(revoked["revoked"][0]["serial"], 16)
        crl = x509.load_pem_x509_crl((own.pki / "crl.pem").read_bytes())
        assert crl.get_revoked_certificate_by_serial_number(serial) is not None
        assert revoked["crl"]["number"] == 2 and revoked["crl"]["revoked"] == 1
        own.configure()  # copies the new crl.pem to the broker's directory
        reloads = own.broker.read_log().count("Reloading config.")
        assert own.broker.proc is not None
        own.broker.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + DEADLINE
        while own.broker.read_log().count("Reloading config.") == reloads:
            assert time.monotonic() < deadline, "Mosquitto did not reload"
            time.sleep(0.05)
        assert refused(C, own.port, own.context("devices", C))
        own.client("devices", A).connect().close()
        # the reload checks new connections only: the one made before the revocation stays
        ctl.publish(topics.device_topic(C, topics.COMMAND), b"still connected")
        connected.wait_for(topics.device_topic(C, topics.COMMAND), b"still connected")
        own.broker.restart()  # which cuts it off
        assert connected.disconnected.wait(DEADLINE)
        assert refused(C, own.port, own.context("devices", C))
        own.client("devices", A).connect().close()
        assert "certificate verify failed" in own.broker.read_log()
    finally:
        connected.close()
        ctl.close()
        own.broker.stop()


# -- the agent from an enrolment bundle ------------------------------------------------------


def test_an_enrolled_agent_registers_through_the_tls_listener(site: Site, tmp_path: Path,
                                                              clients: list[Client]) -> None:
    device = "gw-enrolled-1"
    root = write_root(tmp_path / "root.json")
    bundle = tmp_path / "bundle"
    site.cli("pki", "enrol", device, "--class", CLASS, "--broker",
             f"mqtts://localhost:{site.port}", "--root", str(root), "--out", str(bundle),
             "--tag", "site=lab")
    config_path = bundle / "agent.yaml"
    config = yaml.safe_load(config_path.read_text())
    assert config["broker"] == {"host": "localhost", "port": site.port,
                                "tls": {"ca": "ca.pem", "cert": f"{device}.pem",
                                        "key": f"{device}.key"}}
    # test paths only: state and socket in the temp dir
    config.update({"state_dir": str(tmp_path / "state"), "socket": str(tmp_path / "agent.sock")})
    config_path.write_text(yaml.safe_dump(config))
    collector = site.client("controllers", "ctl-1", "collector").connect().subscribe(
        topics.device_topic(device, topics.BIRTH), topics.device_topic(device, topics.STATUS))
    clients.append(collector)
    agent = AgentProcess(config_path).start()
    try:
        deadline = time.monotonic() + 60
        births: list[Got] = []
        while not births:
            assert time.monotonic() < deadline and agent.alive, agent.read_log()[-3000:]
            with collector._cond:
                births = [m for m in collector.messages
                          if m.topic == topics.device_topic(device, topics.BIRTH)]
                if not births:
                    collector._cond.wait(0.5)
        birth = Birth.from_json(births[0].payload)
        assert (birth.device_id, birth.device_class, birth.tags) == (device, CLASS,
                                                                     {"site": "lab"})
        assert f"u'{device}'" in site.broker.read_log()
    finally:
        agent.stop()


# -- files, modes and output -----------------------------------------------------------------


def test_the_enrolment_bundle_has_safe_modes_and_a_valid_agent_yaml(site: Site,
                                                                    tmp_path: Path) -> None:
    from fleetlite.agent.config import load_config

    root = write_root(tmp_path / "root.json")
    out = tmp_path / "gw-0042"
    proc = site.cli("pki", "enrol", "gw-0042", "--class", CLASS, "--broker",
                    "mqtts://localhost:8883", "--root", str(root), "--out", str(out), "--tar")
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(out) == 0o700
    assert mode(out / "gw-0042.key") == 0o600
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["agent.yaml", "ca.pem", "gw-0042.key", "gw-0042.pem", "root.json"])
    assert all(mode(p) & 0o022 == 0 for p in out.iterdir())  # nobody else writes
    tar = tmp_path / "gw-0042.tar"
    assert mode(tar) == 0o600
    with tarfile.open(tar) as archive:
        members = {m.name: m for m in archive.getmembers()}
        assert members["gw-0042"].mode == 0o700 and members["gw-0042/gw-0042.key"].mode == 0o600
        key_member = archive.extractfile("gw-0042/gw-0042.key")
        assert key_member is not None
        assert key_member.read() == (out / "gw-0042.key").read_bytes()
    config = load_config(out / "agent.yaml")  # the agent's own parser accepts it
    assert config.device_id == "gw-0042" and config.device_class == CLASS
    assert config.broker.tls is not None and config.broker.tls.key == out / "gw-0042.key"
    assert config.trust_root == out / "root.json" and config.broker.port == 8883
    cert = x509.load_pem_x509_certificate((out / "gw-0042.pem").read_bytes())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "gw-0042"
    assert "mode 0700" in proc.stdout and "warning" not in proc.stderr
    # a broker host the broker's certificate does not name: the agent would refuse it
    elsewhere = site.cli("pki", "enrol", "gw-0044", "--class", CLASS, "--broker",
                         "mqtts://mqtt.other.example:8883", "--root", str(root), "--out",
                         str(tmp_path / "gw-0044"))
    assert "no broker certificate of this PKI names mqtt.other.example" in elsewhere.stderr
    # an existing, non-empty --out is refused; nothing is overwritten
    again = site.cli("pki", "enrol", "gw-0043", "--class", CLASS, "--broker",
                     "mqtts://localhost:8883", "--root", str(root), "--out", str(out),
                     expect=1)
    assert "already exists and is not empty" in again.stderr


def test_no_pki_command_prints_a_key(site: Site, tmp_path: Path) -> None:
    root = write_root(tmp_path / "root.json")
    for output in ("table", "json", "yaml"):
        site.cli("pki", "list", "-o", output)
        site.cli("pki", "issue", "operator", f"op-{output}", "-o", output)
        site.cli("pki", "enrol", f"gw-print-{output}", "--class", CLASS, "--broker",
                 "mqtts://localhost:8883", "--root", str(root), "--out",
                 str(tmp_path / output), "--tar", "-o", output)
    site.cli("pki", "crl")
    site.cli("pki", "revoke", "operator:op-json")
    site.cli("broker-config", "--out", str(tmp_path / "broker"), "-o", "json")
    text = "\n".join(site.outputs)
    assert "PRIVATE KEY" not in text
    bodies = key_bodies(site.pki) + key_bodies(tmp_path)
    assert len(bodies) > 20
    leaked = [body for body in bodies if body in text]
    assert leaked == []


def test_keys_are_0600_and_private_directories_0700(site: Site) -> None:
    keys = list(site.pki.rglob("*.key")) + list((site.work / "broker").glob("*.key"))
    assert len(keys) >= 7  # CA, broker (twice), controller, operator, 3 devices
    assert all(stat.S_IMODE(k.stat().st_mode) == 0o600 for k in keys)
    for folder in (site.pki, site.pki / "devices", site.pki / "controllers", site.work / "broker"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder


# -- certificates ----------------------------------------------------------------------------


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_the_certificates_carry_the_identities_and_extensions(site: Site) -> None:
    ca = load(site.ca)
    constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage)
    assert constraints.critical and constraints.value.ca and constraints.value.path_length == 0
    assert usage.critical and usage.value.key_cert_sign and usage.value.crl_sign
    ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    expected = {"devices/gw-a.pem": ("gw-a", ExtendedKeyUsageOID.CLIENT_AUTH),
                "controllers/ctl-1.pem": ("controller:ctl-1", ExtendedKeyUsageOID.CLIENT_AUTH),
                "operators/alice.pem": ("operator:alice", ExtendedKeyUsageOID.CLIENT_AUTH),
                "broker/localhost.pem": ("broker:localhost", ExtendedKeyUsageOID.SERVER_AUTH)}
    for name, (cn, purpose) in expected.items():
        cert = load(site.pki / name)
        assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == cn
        assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) \
            == [purpose]
        leaf = cert.extensions.get_extension_for_class(x509.BasicConstraints)
        assert leaf.critical and not leaf.value.ca
        aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
        ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        assert aki.key_identifier == ski.digest
        assert cert.issuer == ca.subject
    san = load(site.pki / "broker/localhost.pem").extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    # a controller or operator CN can never be a device id (so never a %u device subtree)
    for cn in ("controller:ctl-1", "operator:alice", "broker:localhost"):
        with pytest.raises(topics.TopicError):
            topics.validate_device_id(cn)


@pytest.mark.parametrize(("args", "message"), [
    (("issue", "device", "gw/1", "--class", CLASS), "may only use letters, digits"),
    (("issue", "device", "gw-x", "--class", "no-such-class"), "no device class 'no-such-class'"),
    (("issue", "controller", "ctl 1"), "must be 1-64 letters, digits"),
    (("issue", "device", A, "--class", CLASS), "already has a valid certificate"),
    (("issue", "broker"), "needs at least one --dns NAME or --ip ADDRESS"),
    (("issue", "broker", "--dns", "bad_host!"), "is not a DNS name or an IP address"),
    (("revoke", "gw-nobody"), "no certificate of this PKI is 'gw-nobody'"),
    (("enrol", "gw-x", "--class", CLASS, "--broker", "mqtt://localhost:1883", "--root",
      "root.json", "--out", "x"), "is plain MQTT"),
])
def test_mistakes_are_refused_with_what_to_do(site: Site, args: tuple[str, ...],
                                              message: str) -> None:
    proc = site.cli("pki", *args, expect=1)
    assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_a_missing_pki_directory_says_how_to_create_one(tmp_path: Path) -> None:
    env = {**os.environ, "FLEETLITE_PKI": str(tmp_path / "nowhere")}
    proc = run_cli("pki", "list", env=env, expect=1)
    assert "holds no fleet CA" in proc.stderr and "fleetlite pki init" in proc.stderr


def test_revoke_by_serial_prefix_renew_and_list(tmp_path: Path) -> None:
    store = pki.Pki.init(tmp_path / "p")
    first = store.issue("device", "gw-1", device_class=CLASS)
    with pytest.raises(pki.PkiError, match="pass --renew"):
        store.issue("device", "gw-1", device_class=CLASS)
    second = store.issue("device", "gw-1", device_class=CLASS, renew=True)
    revoked = store.revoke(first.record.serial_hex[:10], reason="superseded")
    assert [r.serial for r in revoked] == [first.record.serial]
    with pytest.raises(pki.PkiError, match="already revoked"):
        store.revoke(first.record.serial_hex)
    crl = store.crl()
    assert crl is not None and [r.serial_number for r in crl] == [first.record.serial]
    assert store.index().valid("device", pki.parse_time("2000-01-01T00:00:00Z")) \
        == [r for r in store.records() if r.serial == second.record.serial]
    env = {**os.environ, "FLEETLITE_PKI": str(tmp_path / "p")}
    listed = json.loads(run_cli("pki", "list", "-o", "json", env=env).stdout)
    assert [c["status"] for c in listed["certificates"]] == ["revoked", "valid"]
    assert listed["certificates"][0]["reason"] == "superseded"
    table = run_cli("pki", "list", env=env).stdout
    assert re.search(r"^device\s+gw-1\s+\S+\s+revoked \d{4}-\d\d-\d\d\s", table, re.M), table


# -- the generator ---------------------------------------------------------------------------


FILES = BrokerFiles(ca="/etc/mosquitto/fleetlite/ca.pem", cert="/x/broker.pem",
                    key="/x/broker.key", acl="/x/fleetlite.acl", crl="/x/crl.pem")


def test_the_acl_follows_the_topic_layout() -> None:
    acl = broker_config.acl_text(["controller:ctl-1", "controller:ctl-1"], ["operator:alice"])
    rules = [line for line in acl.splitlines() if line and not line.startswith("#")]
    device = [f"pattern write fleetlite/v1/dev/%u/{kind}" for kind in topics.DEVICE_TO_FLEET]
    device += [f"pattern read fleetlite/v1/dev/%u/{kind}" for kind in topics.FLEET_TO_DEVICE]
    assert rules == [*device, "pattern read fleetlite/v1/rel/#",
                     "user controller:ctl-1", "topic readwrite fleetlite/v1/#",
                     "topic readwrite $share/+/fleetlite/v1/#",
                     "user operator:alice", "topic read fleetlite/v1/#", "topic read $SYS/#"]
    with pytest.raises(BrokerConfigError):
        broker_config.acl_text(["ctl-1"])  # a bare name could be a device id
    with pytest.raises(BrokerConfigError):
        broker_config.acl_text(["controller:a b"])


def test_the_configuration_sizes_and_listeners() -> None:
    conf = broker_config.mosquitto_conf(FILES)
    largest = max(broker_config.largest_messages().values())
    packet = int(re.search(r"^max_packet_size (\d+)$", conf, re.M).group(1))  # type: ignore[union-attr]
    assert largest == 512 * 1024 and largest < packet <= 2 * largest
    for line in ("per_listener_settings true", "listener 8883", "tls_version tlsv1.2",
                 "require_certificate true", "use_identity_as_username true",
                 "allow_anonymous false", "crlfile /x/crl.pem", "acl_file /x/fleetlite.acl",
                 f"max_queued_messages {broker_config.DEFAULT_MAX_QUEUED_MESSAGES}",
                 f"max_inflight_messages {broker_config.DEFAULT_MAX_INFLIGHT_MESSAGES}",
                 "set_tcp_nodelay true"):
        assert re.search(rf"^{re.escape(line)}$", conf, re.M), line
    assert "allow_anonymous true" not in conf and len(re.findall("^listener ", conf, re.M)) == 1
    local = broker_config.mosquitto_conf(
        BrokerFiles("ca", "c", "k", "a"), BrokerSettings(local_port=1883, bind="10.0.0.5"))
    assert "listener 8883 10.0.0.5" in local and "crlfile" not in local
    assert local.split("listener 1883 127.0.0.1\n")[1].strip() == "allow_anonymous true"
    for bad in (BrokerSettings(max_packet_size=1024), BrokerSettings(local_port=8883),
                BrokerSettings(max_queued_bytes=1000), BrokerSettings(port=0)):
        with pytest.raises(BrokerConfigError):
            broker_config.mosquitto_conf(FILES, bad)


def test_the_operator_guide_shows_what_broker_config_writes() -> None:
    guide = (Path(__file__).resolve().parent.parent / "docs" / "operator-guide.md").read_text()
    conf = re.search(r"```\n(per_listener_settings true\n.*?)```", guide, re.S)
    acl = re.search(r"```\n(pattern write .*?)```", guide, re.S)
    assert conf and acl
    where = "/etc/mosquitto/fleetlite"
    files = BrokerFiles(f"{where}/ca.pem", f"{where}/broker.pem", f"{where}/broker.key",
                        f"{where}/fleetlite.acl", f"{where}/crl.pem")
    written = set(broker_config.mosquitto_conf(files).splitlines())
    assert [line for line in conf.group(1).splitlines() if line not in written] == []
    rules = [line for line in broker_config.acl_text(["controller:ctl-1", "controller:ctl-2"])
             .splitlines() if not line.startswith("#")]
    assert acl.group(1).splitlines() == rules[1:]  # the generated text opens with a blank line


def test_the_cli_repeats_the_pki_defaults() -> None:
    assert cli_pki.DEFAULT_VALIDITY_DAYS == pki.DEFAULT_VALIDITY_DAYS
    assert tuple(pki.REASONS) == cli_pki.REASONS


def help_commands(text: str) -> list[str]:
    return [" ".join(line.split()) for line in text.replace("\\\n", " ").splitlines()
            if line.strip().startswith("fleetlite ")]


@pytest.mark.parametrize("command", ["pki", "broker-config"])
def test_help_examples_parse(command: str) -> None:
    help_text = subprocess.run([FLEETLITE, command, "--help"], capture_output=True, text=True,
                               check=True, timeout=60).stdout
    examples = help_commands(help_text)
    assert len(examples) >= (10 if command == "pki" else 3), help_text
    for example in examples:
        # "(try it ...)" notes after a command are prose, not arguments
        words = shlex.split(example.split("  (")[0])
        try:
            build_parser().parse_args(words[1:])
        except SystemExit as exc:
            pytest.fail(f"`{example}` from `fleetlite {command} --help` does not parse "
                        f"(exit {exc.code})")
