"""The device agent as a real process against a real Mosquitto broker.

Independent clients (``mosquitto_sub`` and plain paho) check what the agent publishes.
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fleetlite.sdk import topics
from fleetlite.sdk.local_client import LocalClient
from fleetlite.sdk.messages import Birth, CommandResponse, Status, Telemetry
from fleetlite.sdk.runtime.interpreter import load_model
from fleetlite.sdk.text import Tokenizer
from tests.agent_harness import AgentProcess, write_config
from tests.mqtt_harness import Collector, Mosquitto

DEVICE = "gw-1"


def mosquitto_sub(broker: Mosquitto, topic: str, count: int = 1, wait_s: int = 20) -> list[bytes]:
    """Read ``count`` messages (retained ones included) with the Mosquitto command-line client."""
    out = subprocess.run(
        ["mosquitto_sub", "-h", broker.host, "-p", str(broker.port), "-t", topic,
         "-C", str(count), "-W", str(wait_s), "-q", "1"],
        capture_output=True, timeout=wait_s + 10, check=True,
    )
    # one payload per line: our payloads are compact JSON without newlines
    return [line for line in out.stdout.split(b"\n") if line.strip()]


@pytest.fixture
def intent_model(models_dir: Path) -> dict[str, Any]:
    return {"name": "intent", "path": models_dir / "intent_classifier.tflite", "version": 1}


@pytest.fixture
def collector(broker: Mosquitto) -> Iterator[Collector]:
    c = Collector(broker.host, broker.port, [f"{topics.DEVICE_PREFIX}/#"]).start()
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture
def agent(
    tmp_path: Path, broker: Mosquitto, intent_model: dict[str, Any]
) -> Iterator[AgentProcess]:
    process = AgentProcess(write_config(tmp_path / "agent", port=broker.port,
                                        models=[intent_model])).start()
    try:
        yield process
    finally:
        process.stop()


def send_command(collector: Collector, command: str, args: dict[str, Any] | None = None,
                 timeout: float = 30.0) -> CommandResponse:
    command_id = uuid.uuid4().hex[:12]
    payload = json.dumps({"schema": "fleetlite.command/1", "id": command_id, "command": command,
                          "args": args or {}}).encode()
    collector.publish(topics.device_topic(DEVICE, topics.COMMAND), payload)
    (message,) = collector.wait_for(
        topics.COMMAND_RESPONSE, timeout=timeout,
        predicate=lambda m: json.loads(m.payload).get("id") == command_id,
    )[:1]
    return CommandResponse.from_json(message.payload)


def test_birth_and_retained_online_status_seen_by_mosquitto_sub(
    broker: Mosquitto, agent: AgentProcess, collector: Collector
) -> None:
    collector.wait_for(topics.BIRTH)
    (status_raw,) = mosquitto_sub(broker, topics.device_topic(DEVICE, topics.STATUS))
    status = Status.from_json(status_raw)
    assert status.online and status.device_id == DEVICE and status.session >= 1
    (birth_raw,) = mosquitto_sub(broker, topics.device_topic(DEVICE, topics.BIRTH))
    birth = Birth.from_json(birth_raw)
    assert birth.device_class == "industrial-x86-gateway"
    assert birth.tags == {"site": "test-lab"}
    assert [m["name"] for m in birth.models] == ["intent"]
    assert birth.models[0]["version"] == 1 and len(birth.models[0]["sha256"]) == 64
    assert birth.facts["backend"] in ("tflite-runtime", "ai-edge-litert", "tensorflow")


def test_kill_9_turns_status_offline_via_last_will(
    broker: Mosquitto, agent: AgentProcess, collector: Collector
) -> None:
    online = collector.wait_for(
        topics.STATUS, predicate=lambda m: Status.from_json(m.payload).online
    )
    session = Status.from_json(online[0].payload).session
    agent.kill9()
    collector.wait_for(topics.STATUS,
                       predicate=lambda m: not Status.from_json(m.payload).online)
    (retained,) = mosquitto_sub(broker, topics.device_topic(DEVICE, topics.STATUS))
    status = Status.from_json(retained)
    assert not status.online and status.reason == "lost" and status.session == session


def test_each_connection_is_numbered_and_its_will_carries_the_number(
    broker: Mosquitto, agent: AgentProcess, collector: Collector
) -> None:
    def online(conn: int) -> list[Any]:
        return collector.wait_for(topics.STATUS, timeout=30, predicate=lambda m: (
            Status.from_json(m.payload).online and Status.from_json(m.payload).conn == conn))

    first = Status.from_json(online(1)[0].payload)
    broker.restart()  # the agent reconnects within its session
    second = Status.from_json(online(2)[0].payload)
    assert second.session == first.session and second.ts > first.ts
    agent.kill9()
    (retained,) = mosquitto_sub(broker, topics.device_topic(DEVICE, topics.STATUS))
    will = Status.from_json(retained)
    assert (will.online, will.reason, will.session, will.conn) == \
        (False, "lost", first.session, 2)


def test_sigterm_shuts_down_cleanly(
    broker: Mosquitto, agent: AgentProcess, collector: Collector, tmp_path: Path
) -> None:
    collector.wait_for(topics.BIRTH)
    assert (tmp_path / "agent" / "agent.sock").exists()
    assert agent.terminate() == 0
    (retained,) = mosquitto_sub(broker, topics.device_topic(DEVICE, topics.STATUS))
    status = Status.from_json(retained)
    assert not status.online and status.reason == "shutdown"
    assert not (tmp_path / "agent" / "agent.sock").exists()


def test_commands_ping_info_unknown_and_profile(
    agent: AgentProcess, collector: Collector
) -> None:
    collector.wait_for(topics.BIRTH)
    pong = send_command(collector, "ping")
    assert pong.ok and pong.result["pong"] is True
    info = send_command(collector, "info")
    assert info.ok and info.result["models"][0]["name"] == "intent"
    unknown = send_command(collector, "self_destruct")
    assert not unknown.ok and unknown.error_code == "unknown_command"
    bad = send_command(collector, "profile", {"min_runs": "many"})
    assert not bad.ok and bad.error_code == "bad_args"
    profiled = send_command(collector, "profile",
                            {"min_runs": 20, "min_seconds": 0.1, "max_seconds": 5})
    assert profiled.ok, profiled.error
    (record_msg,) = collector.wait_for(topics.PROFILE)
    record = json.loads(record_msg.payload)
    assert record["schema"] == "fleetlite.profile/1"
    assert record["device_id"] == DEVICE and record["trigger"] == "command"
    assert record == profiled.result["profile"] | {"schema": record["schema"]}
    assert agent.alive


def test_reload_config_republishes_birth_with_new_tags(
    agent: AgentProcess, collector: Collector
) -> None:
    collector.wait_for(topics.BIRTH)
    import yaml

    config = yaml.safe_load(agent.config.read_text())
    config["tags"] = {"site": "plant-7", "line": "3"}
    agent.config.write_text(yaml.safe_dump(config))
    response = send_command(collector, "reload_config")
    assert response.ok and response.result["changed"] == ["tags"]
    births = collector.wait_for(
        topics.BIRTH, predicate=lambda m: Birth.from_json(m.payload).tags.get("line") == "3"
    )
    assert Birth.from_json(births[-1].payload).tags == {"site": "plant-7", "line": "3"}
    config["broker"]["port"] = 1
    agent.config.write_text(yaml.safe_dump(config))
    refused = send_command(collector, "reload_config")
    assert not refused.ok and "restart" in refused.error


def test_local_socket_api_matches_the_runtime(
    agent: AgentProcess, collector: Collector, tmp_path: Path, models_dir: Path
) -> None:
    collector.wait_for(topics.BIRTH)
    tokenizer = Tokenizer.from_file(models_dir / "intent_classifier.vocab.json")
    direct = load_model(models_dir / "intent_classifier.tflite")
    with LocalClient(tmp_path / "agent" / "agent.sock") as client:
        for text in ("turn off the kitchen lights", "lock the front door", "what's the weather"):
            tokens = tokenizer.encode(text)
            via_socket = client.infer("intent", tokens)
            via_runtime = direct.run(tokens)
            assert list(via_socket) == list(via_runtime)
            for name in via_runtime:
                np.testing.assert_array_equal(via_socket[name], via_runtime[name])
    # only counts and latency statistics leave the device
    telemetry_models = send_command(collector, "info").result["models"]
    assert telemetry_models[0]["name"] == "intent"


def telemetry_order(collector: Collector) -> list[tuple[int, int]]:
    return [(t.session, t.seq) for t in
            (Telemetry.from_json(m.payload) for m in collector.on_topic(topics.TELEMETRY))]


def assert_no_gaps(seen: list[tuple[int, int]]) -> None:
    """Reports arrive in order (duplicates allowed: QoS 1 is at-least-once) without gaps."""
    unique: list[tuple[int, int]] = []
    for item in seen:
        if not unique or item > unique[-1]:
            unique.append(item)
        else:
            assert item in unique, f"{item} arrived out of order after {unique[-1]}"
    by_session: dict[int, list[int]] = {}
    for session, seq in unique:
        by_session.setdefault(session, []).append(seq)
    for session, seqs in by_session.items():
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), (session, seqs)
        assert seqs[0] == 1, f"session {session} lost its first reports: {seqs[:5]}"


def test_broker_outage_and_agent_restart_lose_no_report(
    tmp_path: Path, intent_model: dict[str, Any]
) -> None:
    # The fleet-side observer holds a persistent session on a broker with persistence, so what
    # the agent delivers while the observer is still reconnecting is queued for it, not lost.
    broker = Mosquitto(tmp_path / "broker", persistent=True).start()
    config = write_config(tmp_path / "agent", port=broker.port, models=[intent_model],
                          telemetry_s=0.2, socket=False)
    collector = Collector(broker.host, broker.port, [topics.fleet_subscription(topics.TELEMETRY)],
                          client_id="fleet-observer").start(clean_session=False)
    agent = AgentProcess(config).start()
    try:
        collector.wait_for(topics.TELEMETRY, count=3)
        broker.stop()
        time.sleep(1.5)  # reports pile up in the spool
        assert agent.terminate() == 0  # agent restart while the broker is away
        spooled = list((tmp_path / "agent" / "state" / "spool").glob("*.rec"))
        assert len(spooled) >= 3, "reports made while offline should be on disk"
        agent = AgentProcess(config).start()
        agent.wait_for_log("agent gw-1 running")
        time.sleep(1.0)
        broker.start()
        collector.wait_for(topics.TELEMETRY, timeout=30,
                           predicate=lambda m: Telemetry.from_json(m.payload).session == 2
                           and Telemetry.from_json(m.payload).seq >= 8)
        seen = telemetry_order(collector)
        assert {s for s, _ in seen} == {1, 2}
        assert_no_gaps(seen)
    finally:
        agent.stop()
        collector.stop()
        broker.stop()


def test_agent_with_tls_client_certificate(tmp_path: Path, intent_model: dict[str, Any]) -> None:
    from tests.mqtt_harness import TlsFiles
    from tests.pki import TestPki

    pki = TestPki(tmp_path / "pki")
    server = pki.issue("localhost", server=True)
    device = pki.issue(DEVICE)
    broker = Mosquitto(tmp_path / "tls-broker",
                       tls=TlsFiles(pki.ca, server.cert, server.key)).start()
    try:
        config = write_config(
            tmp_path / "agent", port=broker.port, models=[intent_model], socket=False,
            extra={"broker": {"host": "localhost", "port": broker.port,
                              "tls": {"ca": str(pki.ca), "cert": str(device.cert),
                                      "key": str(device.key)}}},
        )
        agent = AgentProcess(config).start()
        try:
            # an independent TLS client (mosquitto_sub with its own certificate) sees the birth
            observer = pki.issue("observer")
            out = subprocess.run(
                ["mosquitto_sub", "-h", "localhost", "-p", str(broker.port), "--cafile",
                 str(pki.ca), "--cert", str(observer.cert), "--key", str(observer.key),
                 "-t", topics.device_topic(DEVICE, topics.BIRTH), "-C", "1", "-W", "20"],
                capture_output=True, timeout=30, check=True,
            )
            assert Birth.from_json(out.stdout.strip()).device_id == DEVICE
        finally:
            agent.stop()
    finally:
        broker.stop()


def test_fuzzed_commands_never_crash_the_agent(
    agent: AgentProcess, collector: Collector
) -> None:
    collector.wait_for(topics.BIRTH)
    rng = np.random.default_rng(1234)
    cases = list(malformed_commands(rng, 1000))
    topic = topics.device_topic(DEVICE, topics.COMMAND)
    for payload in cases:
        collector._client.publish(topic, payload, qos=1)
    # every case was answered (an error response each) and the agent still works
    info = send_command(collector, "info", timeout=120)
    assert agent.alive and info.ok
    stats = info.result["commands"]
    assert stats["received"] >= len(cases) + 1
    assert sum(stats["rejected"].values()) >= len(cases)
    assert send_command(collector, "ping").ok


def malformed_commands(rng: np.random.Generator, count: int) -> Iterator[bytes]:
    """Generated hostile commands: noise, wrong JSON shapes, wrong types, oversize, unknown."""
    good = {"schema": "fleetlite.command/1", "id": "x", "command": "ping", "args": {}}
    values: list[Any] = [None, True, 1, -1, 1.5, "", "a" * 70, [], {}, [1, 2], {"a": 1},
                         "ping", 2**70]
    for i in range(count):
        kind = i % 8
        if kind == 0:
            yield rng.integers(0, 256, size=int(rng.integers(0, 300)), dtype=np.uint8).tobytes()
        elif kind == 1:
            yield json.dumps(values[int(rng.integers(len(values)))]).encode()
        elif kind == 2:  # a field of the wrong type or value
            wrong: dict[str, list[Any]] = {
                "schema": [v for v in values if v != "ping"] + ["fleetlite.status/1"],
                "id": [v for v in values if not isinstance(v, str)] + ["", "a" * 70],
                "command": [v for v in values if not isinstance(v, str)],
                "args": [v for v in values if not isinstance(v, dict)],
            }
            key = str(rng.choice(list(wrong)))
            yield json.dumps({**good, key: wrong[key][int(rng.integers(len(wrong[key])))]}).encode()
        elif kind == 3:  # missing fields
            doc = {k: v for k, v in good.items() if rng.random() < 0.5 and k != "schema"}
            yield json.dumps(doc).encode()
        elif kind == 4:  # oversize
            yield json.dumps({**good, "args": {"pad": "x" * 20000}}).encode()
        elif kind == 5:  # unknown command
            yield json.dumps({**good, "command": f"cmd{i}"}).encode()
        elif kind == 6:  # wrong schema version
            yield json.dumps({**good, "schema": "fleetlite.command/9"}).encode()
        else:  # bad arguments to a real command / truncated JSON / deep nesting
            choice = int(rng.integers(3))
            if choice == 0:
                yield json.dumps({**good, "command": "profile",
                                  "args": {"min_runs": "many"}}).encode()
            elif choice == 1:
                yield json.dumps(good).encode()[: int(rng.integers(1, 40))]
            else:
                yield b"[" * 5000 + b"]" * 5000


def test_telemetry_and_profile_after_model_change(
    tmp_path: Path, broker: Mosquitto, intent_model: dict[str, Any], models_dir: Path
) -> None:
    config = write_config(tmp_path / "agent", port=broker.port, models=[intent_model],
                          telemetry_s=0.3, profile_on_model_change=True)
    collector = Collector(broker.host, broker.port, [f"{topics.DEVICE_PREFIX}/#"]).start()
    agent = AgentProcess(config).start()
    try:
        # a profile is published by itself after the model is activated
        (profile_msg,) = collector.wait_for(topics.PROFILE, timeout=60)[:1]
        profile = json.loads(profile_msg.payload)
        assert profile["trigger"] == "model_change"
        assert profile["model"]["name"] == "intent" and profile["model"]["version"] == 1
        steady = profile["timings"]["steady"]
        assert 0 < steady["min_ms"] <= steady["p50_ms"] <= steady["p95_ms"] <= steady["max_ms"]
        assert profile["memory"]["peak_rss_inference_mb"] > 0

        tokenizer = Tokenizer.from_file(models_dir / "intent_classifier.vocab.json")
        with LocalClient(tmp_path / "agent" / "agent.sock") as client:
            for _ in range(5):
                client.infer("intent", tokenizer.encode("turn on the porch light"))
        reports = collector.wait_for(
            topics.TELEMETRY, timeout=20,
            predicate=lambda m: Telemetry.from_json(m.payload).models.get("intent", {})
            .get("inferences", 0) >= 5,
        )
        telemetry = Telemetry.from_json(reports[-1].payload)
        for key in ("cpu_percent", "mem_available_mb", "agent_rss_mb", "disk_free_mb"):
            assert telemetry.system[key] is not None and telemetry.system[key] >= 0
        assert "temperature_c" in telemetry.system  # None where the machine has no sensor
        stats = telemetry.models["intent"]
        assert stats["errors"] == 0 and stats["latency_ms"]["count"] >= 5
        assert telemetry.spool["records"] >= 0
    finally:
        agent.stop()
        collector.stop()
