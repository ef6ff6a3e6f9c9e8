"""``fleetlite conformance DEVICE_ID`` (issue 16): through a real Mosquitto, the Python agent
passes every check (the OTA ones included, with the release key its root trusts), an agent
with one broken verification rule fails exactly that rule's row, and a device that answers
wrongly (a plain MQTT client playing one) fails the checks it breaks, with the protocol section
of each and exit code 1."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from fleetlite.sdk import topics
from fleetlite.sdk.keys import SigningKey
from tests.agent_harness import AgentProcess, write_config
from tests.mqtt_harness import Mosquitto
from tests.test_fleet_e2e import OTA_SETTINGS, wait_until
from tests.test_operator_mistakes import FLEETLITE
from tests.test_ota_install import RELEASE_KEY, write_root

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs" / "protocol.md"
OTA_ROWS = 12  # 8 hostile releases, the valid one, an older and the same version, clean-up


def conformance(broker: Mosquitto, device_id: str, expect: int, timeout: float = 15.0,
                extra: tuple[str, ...] = ()) -> dict[str, object]:
    done = subprocess.run([FLEETLITE, "conformance", device_id, "--broker",
                           f"{broker.host}:{broker.port}", "--timeout", str(timeout), "-o",
                           "json", *extra],
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == expect, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    result: dict[str, object] = json.loads(done.stdout)
    return result


class FaultAgent(AgentProcess):
    """``python -m tests.fault_agent --break FAULT run --config ...``: the agent with one rule
    broken in its own process."""

    def __init__(self, config: Path, fault: str) -> None:
        super().__init__(config)
        self.fault = fault

    def start(self) -> FaultAgent:
        out = self.log.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.fault_agent", "--break", self.fault, "run",
             "--config", str(self.config), "--log-level", "DEBUG"],
            stdout=out, stderr=out, cwd=REPO, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        out.close()
        return self


def ota_device(tmp_path: Path, broker: Mosquitto, device_id: str) -> tuple[Path, Path]:
    """An agent config trusting the root of tests/test_ota_install.py, and the release key
    file (that root's RELEASE_KEY) the kit signs with."""
    root = write_root(tmp_path / "root.json")
    key = SigningKey.from_seed(RELEASE_KEY._seed(), role="release").save(
        tmp_path / "release.key")
    config = write_config(tmp_path / device_id, port=broker.port, device_id=device_id,
                          extra={"trust_root": str(root), "ota": OTA_SETTINGS})
    return config, key


def headings() -> set[str]:
    return {re.sub(r"[`]", "", line.lstrip("#").strip())
            for line in DOCS.read_text().splitlines() if line.startswith("#")}


def test_the_python_agent_passes_every_check(tmp_path: Path, broker: Mosquitto) -> None:
    config, key = ota_device(tmp_path, broker, "gw-conf")
    agent = AgentProcess(config).start()
    try:
        agent.wait_for_log("connected", 30)
        started = time.monotonic()
        result = conformance(broker, "gw-conf", expect=0, extra=("--key", str(key)))
        took = time.monotonic() - started
    finally:
        agent.stop()
    checks = result["checks"]
    assert isinstance(checks, list) and len(checks) == 8 + OTA_ROWS, checks
    assert all(c["passed"] for c in checks), checks
    assert "ota_skipped" not in result
    assert {c["section"] for c in checks} >= {"Session lifecycle", "Encoding",
                                              "fleetlite.command/1", "OTA install",
                                              "Verification order and reason codes"}
    known = headings()
    for c in checks:  # every row names a heading of docs/protocol.md (or starts with one)
        assert any(c["section"] == h or h.startswith(c["section"] + " ") for h in known), c
    verdicts = {c["check"]: c["detail"] for c in checks}
    assert "installed and active" in verdicts["a signed release installs"]
    assert "removed with remove_model" in verdicts["clean-up: fleetlite-conformance removed"]
    print(f"conformance with OTA took {took:.1f} s")


def test_an_agent_with_a_broken_rule_fails_exactly_that_row(tmp_path: Path,
                                                             broker: Mosquitto) -> None:
    config, key = ota_device(tmp_path, broker, "gw-fault")
    agent = FaultAgent(config, "accept_expired").start()
    try:
        agent.wait_for_log("connected", 30)
        result = conformance(broker, "gw-fault", expect=1, extra=("--key", str(key)))
    finally:
        agent.stop()
    checks = result["checks"]
    assert isinstance(checks, list) and len(checks) == 8 + OTA_ROWS, checks
    failed = [c for c in checks if not c["passed"]]
    assert [c["check"] for c in failed] == ["an expired release is refused"], failed
    (row,) = failed
    assert row["section"] == "Verification order and reason codes"
    # what the device did: it installed the expired release and made it active
    assert "expected rejected/expired, got final installed" in row["detail"], row
    assert "changed from none to v" in row["detail"], row


class SloppyDevice:
    """A device that publishes its status but no birth, and answers every command ok with the
    id it was given (so it never refuses anything)."""

    def __init__(self, broker: Mosquitto, device_id: str) -> None:
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=device_id)
        self.device_id = device_id
        self.client.on_message = self._on_message
        self.ready = threading.Event()
        self.client.on_subscribe = lambda *a: self.ready.set()
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        status = {"schema": "fleetlite.status/1", "device_id": device_id, "online": True,
                  "session": 1, "conn": 1, "ts": 1764201600.0, "reason": "connected"}
        self.client.publish(topics.device_topic(device_id, topics.STATUS),
                            json.dumps(status), qos=1, retain=True).wait_for_publish(10)
        self.client.subscribe(topics.device_topic(device_id, topics.COMMAND), qos=1)

    def _on_message(self, client: mqtt.Client, userdata: object, message: object) -> None:
        try:
            command_id = json.loads(message.payload).get("id", "")  # type: ignore[attr-defined]
        except ValueError:
            command_id = ""
        answer = {"schema": "fleetlite.command_response/1", "id": command_id,
                  "device_id": self.device_id, "ok": True, "ts": 1764201601.0, "result": {},
                  "error_code": "", "error": ""}
        client.publish(topics.device_topic(self.device_id, topics.COMMAND_RESPONSE),
                       json.dumps(answer), qos=1)

    def stop(self) -> None:
        self.client.publish(topics.device_topic(self.device_id, topics.STATUS), b"", qos=1,
                            retain=True).wait_for_publish(10)
        self.client.disconnect()
        self.client.loop_stop()


def test_a_device_that_answers_wrongly_fails_the_checks_it_breaks(broker: Mosquitto) -> None:
    device = SloppyDevice(broker, "phone-7")
    try:
        wait_until(device.ready.is_set, 20, "the sloppy device subscribed")
        # it publishes no birth: the wait for one is the timeout, kept short
        result = conformance(broker, "phone-7", expect=1, timeout=3.0)
    finally:
        device.stop()
    assert "--key RELEASE.key" in str(result["ota_skipped"])  # skipped, not failed
    verdicts = {c["check"]: c for c in result["checks"]}  # type: ignore[union-attr]
    assert verdicts["retained online status"]["passed"]
    assert verdicts["ping answered with its id"]["passed"]
    assert not verdicts["retained birth"]["passed"]
    for name in ("an unknown command is refused", "another schema version is refused",
                 "a bad argument is refused"):
        assert not verdicts[name]["passed"], name
        assert "expected error_code" in verdicts[name]["detail"] and "got ok" in \
            verdicts[name]["detail"]
