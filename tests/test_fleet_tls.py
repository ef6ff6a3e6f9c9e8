"""The fleet side over TLS with client certificates, against a broker set up as
docs/operator-guide.md describes: a real Mosquitto with a TLS listener, ``require_certificate``,
``use_identity_as_username`` and an ACL file; a real agent process (``gw-tls-1``, its own client
certificate) and real ``fleetlite serve`` processes (client certificate CN=fleet-controller).

No mocks on the TLS path: every connection is a real TLS handshake with the real broker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fleetlite.fleet import Fleet
from fleetlite.fleet.intent_model import intent_classifier
from fleetlite.fleet.release_builder import build_release
from tests.agent_harness import AgentProcess, write_config
from tests.mqtt_harness import Mosquitto, TlsFiles
from tests.pki import Issued, TestPki
from tests.test_fleet_cli import CLASS, FLEETLITE, Serve, cli, wait_until
from tests.test_ota_install import RELEASE_KEY, write_root

DEVICE = "gw-tls-1"
CONTROLLER_CN = "fleet-controller"
# Each device reads and writes only its own subtree (the CN of its certificate is its MQTT
# username) and reads the release topics (manifests and chunks are sent once per wave to all
# devices); the controller's certificate gets the whole FleetLite tree.
ACL = f"""\
pattern readwrite fleetlite/v1/dev/%u/#
pattern read fleetlite/v1/rel/#

user {CONTROLLER_CN}
topic readwrite fleetlite/v1/#
"""
TLS_ENV = ("FLEETLITE_BROKER", "FLEETLITE_TLS_CA", "FLEETLITE_TLS_CERT", "FLEETLITE_TLS_KEY",
           "FLEETLITE_MQTT_USERNAME", "FLEETLITE_MQTT_PASSWORD")


@dataclass
class TlsBroker:
    broker: Mosquitto
    pki: TestPki
    controller: Issued

    @property
    def url(self) -> str:
        return f"mqtts://{self.broker.host}:{self.broker.port}"

    def flags(self) -> list[str]:
        return ["--broker", self.url, "--tls-ca", str(self.pki.ca),
                "--tls-cert", str(self.controller.cert), "--tls-key", str(self.controller.key)]


@pytest.fixture
def tls_broker(tmp_path: Path) -> Iterator[TlsBroker]:
    pki = TestPki(tmp_path / "pki")
    server = pki.issue("localhost", server=True)
    acl = tmp_path / "fleetlite.acl"
    acl.write_text(ACL)
    broker = Mosquitto(tmp_path / "broker", tls=TlsFiles(pki.ca, server.cert, server.key),
                       extra_conf=f"acl_file {acl}\n").start()
    try:
        yield TlsBroker(broker, pki, pki.issue(CONTROLLER_CN))
    finally:
        broker.stop()


@pytest.fixture(scope="module")
def bundle_v2(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Path:
    """intent v2 for the x86 class, signed with the key the agent trusts."""
    work = tmp_path_factory.mktemp("bundle-tls")
    model = work / "intent_v2.tflite"
    model.write_bytes(intent_classifier(seed=11).tflite)
    bundle = build_release([model], name="intent", version=2, device_classes=[CLASS],
                           vocab=models_dir / "intent_classifier.vocab.json", keys=[RELEASE_KEY])
    return bundle.write_dir(work / "intent-v2")


def clean_env(**extra: str) -> dict[str, str]:
    """The test's environment without FleetLite broker settings, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in TLS_ENV}
    env.update(extra)
    return env


def start_agent(root: Path, tls: TlsBroker) -> AgentProcess:
    device = tls.pki.issue(DEVICE)
    trust = write_root(root / "root.json")
    config = write_config(
        root / DEVICE, port=tls.broker.port, device_id=DEVICE, socket=False,
        models=[{"name": "intent", "path": Path(__file__).parent / "fixtures" / "models"
                 / "intent_classifier.tflite", "version": 1}],
        profile_on_model_change=True,
        extra={"device_class": CLASS, "trust_root": str(trust),
               "ota": {"health_inferences": 3, "health_timeout_s": 0.5},
               "broker": {"host": "localhost", "port": tls.broker.port, "keepalive_s": 10,
                          "tls": {"ca": str(tls.pki.ca), "cert": str(device.cert),
                                  "key": str(device.key)}}})
    return AgentProcess(config).start()


def test_serve_over_tls_registers_the_device_and_rolls_out_a_signed_release(
        tmp_path: Path, tls_broker: TlsBroker, bundle_v2: Path) -> None:
    db = f"sqlite:///{tmp_path / 'fleet.db'}"
    serve = Serve(["--db", db, *tls_broker.flags()], tmp_path / "serve.log", clean_env())
    serve.wait_connected()  # the agent's first profile is published once, at its start
    agent = start_agent(tmp_path, tls_broker)
    try:
        with Fleet(db) as fleet:
            wait_until(lambda: [d.device_id for d in fleet.devices(online=True)] == [DEVICE], 30,
                       f"{DEVICE} online in the store:\n{serve.read_log()[-2000:]}\n"
                       f"{agent.read_log()[-2000:]}")
            wait_until(lambda: fleet.profile_rows("intent", 1), 30, "the agent's v1 profile")
        assert f"broker {tls_broker.url} (CA {tls_broker.pki.ca}, client certificate " \
            f"{tls_broker.controller.cert})" in serve.read_log()

        env = clean_env(FLEETLITE_DB=db)
        release_id = json.loads(cli("release", "push", str(bundle_v2), "-o", "json",
                                    env=env).stdout)["release_id"]
        cli("rollout", "create", release_id, "--id", "tls-1", "--waves", "100%", env=env)
        watched = cli("rollout", "watch", "tls-1", "--interval", "0.3", "--timeout", "90",
                      "--stop-on-pause", env=env)
        assert "tls-1: completed, wave 1 of 1: 1 installed" in watched.stdout, watched.stdout
        with Fleet(db) as fleet:
            rollout = fleet.rollout("tls-1")
            assert rollout.completed and [(d.device_id, d.status) for d in rollout.devices] \
                == [(DEVICE, "installed")]
            wait_until(lambda: [(m.name, m.version) for m in fleet.device(DEVICE).models]
                       == [("intent", 2)], 30, f"{DEVICE} reporting intent v2")
        # the broker saw the controller authenticate by its certificate
        assert f"u'{CONTROLLER_CN}'" in tls_broker.broker.read_log()
    finally:
        agent.stop()
        assert serve.stop() == 0, serve.read_log()[-3000:]


def test_the_environment_works_like_the_flags_and_a_plain_address_with_tls_files_is_tls(
        tmp_path: Path, tls_broker: TlsBroker) -> None:
    db = f"sqlite:///{tmp_path / 'fleet.db'}"
    agent = start_agent(tmp_path, tls_broker)
    ctl = tls_broker.controller
    env = clean_env(FLEETLITE_DB=db,
                    FLEETLITE_BROKER=f"{tls_broker.broker.host}:{tls_broker.broker.port}",
                    FLEETLITE_TLS_CA=str(tls_broker.pki.ca), FLEETLITE_TLS_CERT=str(ctl.cert),
                    FLEETLITE_TLS_KEY=str(ctl.key))
    serve = Serve([], tmp_path / "serve.log", env)
    try:
        with Fleet(db) as fleet:
            wait_until(lambda: [d.device_id for d in fleet.devices(online=True)] == [DEVICE], 30,
                       f"{DEVICE} online in the store:\n{serve.read_log()[-2000:]}")
        assert f"broker {tls_broker.url} (CA " in serve.read_log()
    finally:
        agent.stop()
        assert serve.stop() == 0, serve.read_log()[-3000:]


def serve_fails(args: list[str], env: dict[str, str], tmp_path: Path) -> str:
    """``fleetlite serve ARGS`` must exit 1 by itself (the timeout only guards against a hang);
    returns its stderr."""
    proc = subprocess.run([FLEETLITE, "serve", "--db", f"sqlite:///{tmp_path / 'f.db'}", *args],
                          capture_output=True, text=True, env=env, timeout=60, check=False)
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.stderr


def test_serve_refused_by_the_broker_says_why_and_exits(tmp_path: Path,
                                                        tls_broker: TlsBroker) -> None:
    url, ca = tls_broker.url, str(tls_broker.pki.ca)
    ctl = tls_broker.controller
    # no client certificate: the broker closes the TLS connection
    err = serve_fails(["--broker", url, "--tls-ca", ca], clean_env(), tmp_path)
    assert f"fleetlite: error: the MQTT broker at {url} closed the connection" in err
    assert "requires a client certificate: give --tls-cert and --tls-key" in err
    # the same through the environment
    err = serve_fails([], clean_env(FLEETLITE_BROKER=url, FLEETLITE_TLS_CA=ca), tmp_path)
    assert "requires a client certificate" in err
    # a client certificate from a CA the broker does not trust
    stranger = TestPki(tmp_path / "other-pki").issue(CONTROLLER_CN)
    err = serve_fails(["--broker", url, "--tls-ca", ca, "--tls-cert", str(stranger.cert),
                       "--tls-key", str(stranger.key)], clean_env(), tmp_path)
    assert f"may not trust the client certificate {stranger.cert}" in err
    # no CA: the system's CAs do not know the broker's certificate
    err = serve_fails(["--broker", url, "--tls-cert", str(ctl.cert), "--tls-key", str(ctl.key)],
                      clean_env(), tmp_path)
    assert "presented a certificate that does not verify" in err and "--tls-ca" in err
    # plain MQTT to the TLS listener
    plain = f"mqtt://{tls_broker.broker.host}:{tls_broker.broker.port}"
    err = serve_fails(["--broker", plain], clean_env(), tmp_path)
    assert f"the MQTT broker at {plain} closed the connection" in err and "mqtts://" in err
    # python -m fleetlite.fleet.controller checks the same way
    proc = subprocess.run([sys.executable, "-m", "fleetlite.fleet.controller", "--db",
                           f"sqlite:///{tmp_path / 'f.db'}", "--broker", url, "--tls-ca", ca],
                          capture_output=True, text=True, env=clean_env(), timeout=60,
                          check=False)
    assert proc.returncode == 1 and "requires a client certificate" in proc.stderr, proc.stderr


def test_serve_reports_tls_configuration_mistakes(tmp_path: Path, tls_broker: TlsBroker) -> None:
    url, ca = tls_broker.url, str(tls_broker.pki.ca)
    ctl = tls_broker.controller
    err = serve_fails(["--broker", url, "--tls-ca", ca, "--tls-cert", str(ctl.cert)],
                      clean_env(), tmp_path)
    assert "--tls-cert / FLEETLITE_TLS_CERT is set but --tls-key / FLEETLITE_TLS_KEY is not" \
        in err
    missing = tmp_path / "nope" / "ca.pem"
    err = serve_fails(["--broker", url, "--tls-ca", str(missing)], clean_env(), tmp_path)
    assert f"the TLS CA file {missing} (--tls-ca / FLEETLITE_TLS_CA) does not exist" in err
    err = serve_fails([], clean_env(FLEETLITE_BROKER=url, FLEETLITE_TLS_CA=ca,
                                    FLEETLITE_TLS_CERT=str(ctl.cert),
                                    FLEETLITE_TLS_KEY=str(missing)), tmp_path)
    assert f"the TLS client key {missing} (--tls-key / FLEETLITE_TLS_KEY) does not exist" in err
    err = serve_fails(["--broker", f"mqtt://127.0.0.1:{tls_broker.broker.port}",
                       "--tls-ca", ca], clean_env(), tmp_path)
    assert "says mqtt:// (plain TCP) but a TLS file is set (--tls-ca / FLEETLITE_TLS_CA)" in err


def test_serve_with_mqtt_credentials_from_the_environment(tmp_path: Path) -> None:
    passwords = tmp_path / "passwords"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwords), "fleet", "s3cret"],
                   check=True, capture_output=True, timeout=30)
    broker = Mosquitto(tmp_path / "broker", extra_conf=f"allow_anonymous false\n"
                       f"password_file {passwords}\n").start()
    address = f"{broker.host}:{broker.port}"
    try:
        err = serve_fails([], clean_env(FLEETLITE_BROKER=address,
                                        FLEETLITE_MQTT_USERNAME="fleet",
                                        FLEETLITE_MQTT_PASSWORD="wrong"), tmp_path)
        assert f"the MQTT broker at mqtt://{address} refused the connection: Not authorized" \
            in err and "FLEETLITE_MQTT_PASSWORD" in err
        assert "wrong" not in err
        err = serve_fails(["--broker", address], clean_env(), tmp_path)
        assert "refused the connection: Not authorized" in err
        # TLS to this plain listener
        err = serve_fails(["--broker", f"mqtts://{address}"], clean_env(), tmp_path)
        assert f"the MQTT broker at mqtts://{address} reset the connection" in err
        assert "use mqtt://HOST:PORT" in err
        serve = Serve(["--db", f"sqlite:///{tmp_path / 'fleet.db'}"], tmp_path / "serve.log",
                      clean_env(FLEETLITE_BROKER=address, FLEETLITE_MQTT_USERNAME="fleet",
                                FLEETLITE_MQTT_PASSWORD="s3cret"))
        try:
            wait_until(lambda: "connected to mqtt://" in serve.read_log(), 30,
                       f"the controller connected:\n{serve.read_log()[-2000:]}")
            assert f"broker mqtt://{address} (user fleet)" in serve.read_log()
            assert "s3cret" not in serve.read_log()
        finally:
            assert serve.stop() == 0, serve.read_log()[-3000:]
        assert "u'fleet'" in broker.read_log()
    finally:
        broker.stop()
