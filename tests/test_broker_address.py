"""The broker address parser (:mod:`fleetlite.fleet.broker_address`): every address form, every
rule about TLS files and credentials, and the TLS context built from real PEM files."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from fleetlite.fleet import BrokerAddress, resolve_broker
from fleetlite.fleet.broker_address import ssl_context
from fleetlite.fleet.controller import Controller
from fleetlite.fleet.errors import BrokerAddressError, FleetError
from fleetlite.fleet.store import open_store
from tests.pki import Issued, TestPki

NO_ENV: dict[str, str] = {}


@pytest.mark.parametrize(("text", "host", "port", "tls"), [
    ("localhost", "localhost", 1883, False),
    ("broker.lan:1884", "broker.lan", 1884, False),
    ("  10.0.0.2:1883 ", "10.0.0.2", 1883, False),
    ("[::1]:1884", "::1", 1884, False),
    ("[::1]", "::1", 1883, False),
    ("::1", "::1", 1883, False),
    ("mqtt://broker.lan", "broker.lan", 1883, False),
    ("mqtt://broker.lan:2883", "broker.lan", 2883, False),
    ("MQTT://broker.lan:2883/", "broker.lan", 2883, False),
    ("mqtts://broker.lan", "broker.lan", 8883, True),
    ("mqtts://broker.lan:9883", "broker.lan", 9883, True),
    ("mqtts://[fd00::5]", "fd00::5", 8883, True),
    ("mqtts://[fd00::5]:8884", "fd00::5", 8884, True),
])
def test_every_address_form(text: str, host: str, port: int, tls: bool) -> None:
    address = BrokerAddress.parse(text)
    assert (address.host, address.port, address.tls) == (host, port, tls)
    assert (address.ca, address.cert, address.key, address.username) == (None,) * 4


@pytest.mark.parametrize(("text", "message"), [
    ("", "the broker address is empty: write HOST:PORT"),
    ("   ", "the broker address is empty"),
    ("host:port", "the port must be a number 1..65535; write HOST:PORT"),
    ("host:0", "the port must be a number 1..65535"),
    ("host:65536", "the port must be a number 1..65535"),
    ("host:", "the port must be a number 1..65535"),
    ("host:-1", "the port must be a number 1..65535"),
    (":1883", "no host; write HOST:PORT"),
    ("mqtt://", "no host"),
    ("mqtts://:8883", "no host"),
    ("bro ker:1883", "no host"),
    ("tcp://host:1883", "unknown scheme tcp://; write HOST:PORT, mqtt://HOST:PORT or "
                        "mqtts://HOST:PORT (TLS)"),
    ("ssl://host:8883", "unknown scheme ssl://"),
    ("ws://host:9001", "unknown scheme ws://"),
    ("[::1:1883", "unclosed [ (write [IPV6]:PORT"),
    ("[::1]1883", "write [IPV6]:PORT, e.g. [::1]:1883"),
    ("[]:1883", "no host"),
    ("mqtt://host:1883/topic", "nothing may follow HOST:PORT"),
    ("host:1883/x", "nothing may follow HOST:PORT"),
    ("mqtts://user:pw@host:8883", "no credentials in the address (USER:PASSWORD@); write "
                                  "HOST:PORT and set FLEETLITE_MQTT_USERNAME and "
                                  "FLEETLITE_MQTT_PASSWORD instead"),
])
def test_every_address_error_says_how_to_write_one(text: str, message: str) -> None:
    with pytest.raises(BrokerAddressError) as raised:
        BrokerAddress.parse(text)
    assert message in str(raised.value)
    assert isinstance(raised.value, FleetError)


def test_a_password_in_the_address_is_not_echoed() -> None:
    with pytest.raises(BrokerAddressError) as raised:
        BrokerAddress.parse("mqtts://fleet:s3cret@broker.lan:8883")
    assert "s3cret" not in str(raised.value)


def test_tls_files_turn_tls_on_unless_the_address_says_mqtt() -> None:
    with_ca = BrokerAddress.parse("broker.lan", ca="ca.pem")
    assert (with_ca.tls, with_ca.port, with_ca.ca) == (True, 8883, Path("ca.pem"))
    assert BrokerAddress.parse("broker.lan:1883", ca="ca.pem").port == 1883  # a port is a port
    client = BrokerAddress.parse("broker.lan", cert="c.pem", key="c.key")
    assert (client.tls, client.cert, client.key, client.ca) == (
        True, Path("c.pem"), Path("c.key"), None)
    assert BrokerAddress.parse("mqtts://h", ca="").ca is None  # empty is unset
    with pytest.raises(BrokerAddressError, match=(
            r"'mqtt://h:1883' says mqtt:// \(plain TCP\) but a TLS file is set \(--tls-ca / "
            r"FLEETLITE_TLS_CA, --tls-cert / FLEETLITE_TLS_CERT, --tls-key / FLEETLITE_TLS_KEY\)"
            r": write mqtts://HOST:PORT")):
        BrokerAddress.parse("mqtt://h:1883", ca="ca.pem", cert="c.pem", key="c.key")


@pytest.mark.parametrize(("files", "message"), [
    ({"cert": "c.pem"}, "--tls-cert / FLEETLITE_TLS_CERT is set but --tls-key / "
                        "FLEETLITE_TLS_KEY is not; give both"),
    ({"key": "c.key", "ca": "ca.pem"}, "--tls-key / FLEETLITE_TLS_KEY is set but --tls-cert / "
                                       "FLEETLITE_TLS_CERT is not"),
])
def test_a_client_certificate_needs_both_files(files: dict[str, str], message: str) -> None:
    with pytest.raises(BrokerAddressError, match="a client certificate needs both files") as e:
        BrokerAddress.parse("mqtts://h", **files)
    assert message in str(e.value)


def test_credentials() -> None:
    address = BrokerAddress.parse("h", username="fleet", password="s3cret")
    assert (address.username, address.password, address.tls) == ("fleet", "s3cret", False)
    assert "s3cret" not in repr(address) and "s3cret" not in address.describe()
    assert address.describe() == "mqtt://h:1883 (user fleet)"
    assert BrokerAddress.parse("h", username="fleet").password is None
    with pytest.raises(BrokerAddressError, match="FLEETLITE_MQTT_PASSWORD is set without "
                       "FLEETLITE_MQTT_USERNAME: set the MQTT username too"):
        BrokerAddress.parse("h", password="s3cret")


def test_url_and_describe() -> None:
    assert BrokerAddress.parse("[::1]").url == "mqtt://[::1]:1883"
    assert str(BrokerAddress.parse("mqtts://b")) == "mqtts://b:8883"
    assert BrokerAddress.parse("mqtts://b").describe() == "mqtts://b:8883 (system CAs)"
    assert BrokerAddress.parse("b", ca="/ca.pem", cert="/c.pem", key="/c.key").describe() == (
        "mqtts://b:8883 (CA /ca.pem, client certificate /c.pem)")
    # frozen, comparable, hashable
    assert BrokerAddress.parse("b:1") == BrokerAddress("b", 1)
    assert len({BrokerAddress.parse("b:1"), BrokerAddress("b", 1)}) == 1


def test_resolve_takes_options_over_the_environment_over_the_default() -> None:
    assert resolve_broker(env=NO_ENV) == BrokerAddress("localhost", 1883)
    env = {"FLEETLITE_BROKER": "mqtts://env-broker", "FLEETLITE_TLS_CA": "/env/ca.pem",
           "FLEETLITE_TLS_CERT": "/env/c.pem", "FLEETLITE_TLS_KEY": "/env/c.key",
           "FLEETLITE_MQTT_USERNAME": "env-user", "FLEETLITE_MQTT_PASSWORD": "env-pw"}
    from_env = resolve_broker(env=env)
    assert from_env == BrokerAddress("env-broker", 8883, True, Path("/env/ca.pem"),
                                     Path("/env/c.pem"), Path("/env/c.key"), "env-user", "env-pw")
    given = resolve_broker("opt-broker:9", ca="/opt/ca.pem", cert="/opt/c.pem",
                           key="/opt/c.key", env=env)
    assert (given.host, given.port, given.tls, given.ca, given.cert, given.key) == (
        "opt-broker", 9, True, Path("/opt/ca.pem"), Path("/opt/c.pem"), Path("/opt/c.key"))
    assert given.username == "env-user"  # credentials come from the environment
    # empty variables count as unset
    assert resolve_broker(env={"FLEETLITE_BROKER": "", "FLEETLITE_TLS_CA": ""}) == \
        BrokerAddress("localhost", 1883)
    # a TLS file from the environment with a host:port address turns TLS on
    assert resolve_broker("b:8883", env={"FLEETLITE_TLS_CA": "/ca.pem"}).tls
    with pytest.raises(BrokerAddressError, match="--tls-cert / FLEETLITE_TLS_CERT is set but"):
        resolve_broker("mqtts://b", env={"FLEETLITE_TLS_CERT": "/c.pem"})


# -- the TLS context from real files ------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPki:
    return TestPki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def client(pki: TestPki) -> Issued:
    return pki.issue("fleet-controller")


def test_ssl_context_verifies_the_broker_and_presents_the_client_certificate(
        pki: TestPki, client: Issued) -> None:
    assert ssl_context(BrokerAddress.parse("b:1883")) is None
    context = ssl_context(BrokerAddress.parse("b", ca=pki.ca, cert=client.cert, key=client.key))
    assert context is not None
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert context.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert [c["subject"] for c in context.get_ca_certs()] == [
        ((("commonName", "FleetLite test CA"),),)]
    system = ssl_context(BrokerAddress.parse("mqtts://b"))
    assert system is not None and system.verify_mode == ssl.CERT_REQUIRED


def test_ssl_context_names_missing_and_unreadable_files(tmp_path: Path, pki: TestPki,
                                                        client: Issued) -> None:
    missing = tmp_path / "missing.pem"
    for kwargs, label in (({"ca": missing}, "CA file"),
                          ({"ca": pki.ca, "cert": missing, "key": client.key},
                           "client certificate"),
                          ({"ca": pki.ca, "cert": client.cert, "key": missing}, "client key")):
        option = {"CA file": "--tls-ca / FLEETLITE_TLS_CA",
                  "client certificate": "--tls-cert / FLEETLITE_TLS_CERT",
                  "client key": "--tls-key / FLEETLITE_TLS_KEY"}[label]
        with pytest.raises(BrokerAddressError) as raised:
            ssl_context(BrokerAddress.parse("mqtts://b", **kwargs))
        assert str(raised.value) == (
            f"the TLS {label} {missing} ({option}) does not exist: check the path")
    with pytest.raises(BrokerAddressError, match=f"the TLS CA file {tmp_path} .* is not a file"):
        ssl_context(BrokerAddress.parse("mqtts://b", ca=tmp_path))
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(BrokerAddressError, match=f"cannot load the TLS CA file {junk} "
                       r"\(--tls-ca / FLEETLITE_TLS_CA\): .*it must be a PEM file"):
        ssl_context(BrokerAddress.parse("mqtts://b", ca=junk))
    other = pki.issue("someone-else")
    with pytest.raises(BrokerAddressError, match=(
            f"cannot load the TLS client certificate {client.cert} .* with the key "
            f"{other.key} .*: .*the key unencrypted and matching the certificate")):
        ssl_context(BrokerAddress.parse("mqtts://b", cert=client.cert, key=other.key))
    with pytest.raises(BrokerAddressError, match="cannot load the TLS client certificate"):
        ssl_context(BrokerAddress.parse("mqtts://b", cert=junk, key=client.key))


def test_an_encrypted_key_is_refused_without_a_prompt(tmp_path: Path, pki: TestPki,
                                                      client: Issued) -> None:
    key = serialization.load_pem_private_key(client.key.read_bytes(), password=None)
    locked = tmp_path / "locked.key"
    locked.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"passphrase")))
    with pytest.raises(BrokerAddressError, match=r"cannot load the TLS client certificate .*"
                       r"the key unencrypted"):
        ssl_context(BrokerAddress.parse("mqtts://b", cert=client.cert, key=locked))


def test_the_controller_takes_an_address_or_a_host_and_port(tmp_path: Path) -> None:
    with open_store(f"sqlite:///{tmp_path / 'f.db'}") as store:
        plain = Controller(store, "127.0.0.1", 1883)
        assert plain.broker == BrokerAddress("127.0.0.1", 1883)
        assert (plain.host, plain.port) == ("127.0.0.1", 1883)
        with pytest.raises(TypeError, match="a host and a port"):
            Controller(store, "127.0.0.1")
        with pytest.raises(TypeError, match="inside the BrokerAddress"):
            Controller(store, BrokerAddress("h", 1), 1883)
        with pytest.raises(BrokerAddressError, match="does not exist"):
            Controller(store, BrokerAddress.parse("mqtts://h", ca=tmp_path / "none.pem"))
