"""Pure parts of the agent without a broker: config validation, command dispatch, backoff."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetlite.agent.commands import CommandArgumentError, CommandDispatcher, arg
from fleetlite.agent.config import load_config, parse_config
from fleetlite.agent.errors import AgentConfigError, AgentError
from fleetlite.agent.link import backoff_delay

BASE: dict[str, Any] = {"device_id": "gw-1", "device_class": "raspberry-pi-4", "state_dir": "/s"}


def test_minimal_config_gets_documented_defaults() -> None:
    config = parse_config(BASE)
    assert config.broker.host == "localhost" and config.broker.port == 1883
    assert config.telemetry_interval_s == 60.0 and config.socket is None
    assert config.spool_dir == Path("/s/spool")


@pytest.mark.parametrize(
    ("change", "key", "problem"),
    [
        ({"device_id": None}, "device_id", "is required"),
        ({"device_id": "gw/1"}, "device_id", "may only use"),
        ({"broker": {"port": "abc"}}, "broker.port", "integer from 1 to 65535"),
        ({"broker": {"port": 70000}}, "broker.port", "integer from 1 to 65535"),
        ({"broker": {"hots": "x"}}, "broker.hots", "unknown key"),
        ({"broker": {"tls": {"ca": "/nope/ca.pem"}}}, "broker.tls.ca", "does not exist"),
        ({"intervals": {"telemetry_s": -1}}, "intervals.telemetry_s", "number > 0"),
        ({"intervals": {"reconnect_min_s": 10, "reconnect_max_s": 1}},
         "intervals.reconnect_max_s", "must be >="),
        ({"models": [{"name": "m"}]}, "models[0].path", "is required"),
        ({"models": {"name": "m"}}, "models", "expected a list"),
        ({"threads": 0}, "threads", "integer from 1"),
        ({"surprise": 1}, "surprise", "unknown key"),
    ],
)
def test_config_errors_name_the_key_and_problem(change: dict[str, Any], key: str,
                                                problem: str) -> None:
    data = {**BASE, **change}
    data = {k: v for k, v in data.items() if v is not None}
    with pytest.raises(AgentConfigError) as info:
        parse_config(data, origin="/etc/fleetlite/agent.yaml")
    message = str(info.value)
    assert message.startswith(f"/etc/fleetlite/agent.yaml: {key}:"), message
    assert problem in message


def test_config_file_errors(tmp_path: Path) -> None:
    with pytest.raises(AgentConfigError, match="no such config file; create one"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("device_id: gw-1\nbroker: [unclosed\n")
    with pytest.raises(AgentConfigError, match="invalid YAML at line"):
        load_config(bad)
    relative = tmp_path / "agent.yaml"
    relative.write_text("device_id: gw-1\ndevice_class: raspberry-pi-4\nstate_dir: state\n")
    assert load_config(relative).state_dir == tmp_path.resolve() / "state"


def make_dispatcher() -> CommandDispatcher:
    def echo(args: Any) -> dict[str, Any]:
        return {"n": arg(args, "n", int, 0)}

    def fails(args: Any) -> dict[str, Any]:
        raise AgentError("it failed; do X")

    def crashes(args: Any) -> dict[str, Any]:
        raise ZeroDivisionError("bug")

    return CommandDispatcher("gw-1", {"echo": echo, "fails": fails, "crashes": crashes})


def command(name: str, args: Any = None, command_id: str = "c1") -> bytes:
    return json.dumps({"schema": "fleetlite.command/1", "id": command_id, "command": name,
                       "args": args or {}}).encode()


def test_dispatcher_outcomes_and_counters() -> None:
    d = make_dispatcher()
    ok = d.handle(command("echo", {"n": 3}))
    assert ok.ok and ok.result == {"n": 3} and ok.id == "c1"
    assert d.handle(command("echo", {"n": "3"})).error_code == "bad_args"
    assert d.handle(command("nope")).error_code == "unknown_command"
    assert d.handle(command("fails")).error == "it failed; do X"
    assert d.handle(command("crashes")).error_code == "internal"
    assert d.handle(b"{").error_code == "malformed"
    salvaged = d.handle(b'{"id": "keep-me", "command": 5}')
    assert salvaged.id == "keep-me" and salvaged.error_code == "wrong_schema"
    stats = d.stats()
    assert stats["received"] == 7 and stats["succeeded"] == 1
    assert sum(stats["rejected"].values()) == 6


@settings(max_examples=300, deadline=None)
@given(st.one_of(
    st.binary(max_size=2048),
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
        lambda children: st.lists(children, max_size=4)
        | st.dictionaries(st.text(max_size=8), children, max_size=4),
        max_leaves=20,
    ).map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries(
        {"schema": st.just("fleetlite.command/1")},
        optional={"id": st.one_of(st.text(max_size=80), st.integers()),
                  "command": st.one_of(st.sampled_from(["echo", "fails", "x"]), st.integers()),
                  "args": st.one_of(st.dictionaries(st.text(max_size=5), st.integers()),
                                    st.lists(st.integers()), st.text())},
    ).map(lambda v: json.dumps(v).encode()),
))
def test_dispatcher_never_raises(payload: bytes) -> None:
    response = make_dispatcher().handle(payload)
    assert response.ok or response.error_code
    response.to_json()  # always encodable


def test_arg_helper_rejects_bool_as_int() -> None:
    with pytest.raises(CommandArgumentError, match="wrong type"):
        arg({"n": True}, "n", int)


def test_backoff_grows_is_capped_and_jittered() -> None:
    rng = random.Random(1)
    delays = [backoff_delay(a, 1.0, 60.0, rng) for a in range(12)]
    for attempt, delay in enumerate(delays):
        ceiling = min(60.0, 2.0**attempt)
        assert ceiling / 2 <= delay <= ceiling
    assert max(delays) <= 60.0
    # two devices with different random streams do not reconnect in lock-step
    other = [backoff_delay(a, 1.0, 60.0, random.Random(2)) for a in range(12)]
    assert delays != other


def test_tls_context_verifies_the_broker_with_tls_1_2_or_newer(tmp_path: Path) -> None:
    import ssl

    from fleetlite.agent.config import TlsConfig
    from fleetlite.agent.link import tls_context
    from tests.pki import TestPki

    pki = TestPki(tmp_path / "pki")
    device = pki.issue("gw-1")
    context = tls_context(TlsConfig(ca=pki.ca, cert=device.cert, key=device.key))
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    # set explicitly: on Python 3.9 the default context's minimum is MINIMUM_SUPPORTED
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert [c["subject"] for c in context.get_ca_certs()] == [
        ((("commonName", "FleetLite test CA"),),)]
    skip = tls_context(TlsConfig(ca=pki.ca, insecure_skip_hostname=True))
    assert skip.verify_mode == ssl.CERT_REQUIRED and not skip.check_hostname
