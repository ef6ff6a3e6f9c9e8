"""``fleetlite conformance DEVICE_ID`` (issue 16): through a real Mosquitto, the Python agent
passes every check, and a device that answers wrongly (a plain MQTT client playing one) fails
the checks it breaks, with the protocol section of each and exit code 1."""

from __future__ import annotations

import json
import subprocess
import threading
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from fleetlite.sdk import topics
from tests.agent_harness import AgentProcess, write_config
from tests.mqtt_harness import Mosquitto
from tests.test_fleet_e2e import wait_until
from tests.test_operator_mistakes import FLEETLITE


def conformance(broker: Mosquitto, device_id: str, expect: int,
                timeout: float = 15.0) -> dict[str, object]:
    done = subprocess.run([FLEETLITE, "conformance", device_id, "--broker",
                           f"{broker.host}:{broker.port}", "--timeout", str(timeout), "-o",
                           "json"],
                          capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == expect, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    result: dict[str, object] = json.loads(done.stdout)
    return result


def test_the_python_agent_passes_every_check(tmp_path: Path, broker: Mosquitto) -> None:
    agent = AgentProcess(write_config(tmp_path / "agent", port=broker.port,
                                      device_id="gw-conf")).start()
    try:
        agent.wait_for_log("connected", 30)
        result = conformance(broker, "gw-conf", expect=0)
    finally:
        agent.stop()
    checks = result["checks"]
    assert isinstance(checks, list) and len(checks) == 8
    assert all(c["passed"] for c in checks), checks
    assert {c["section"] for c in checks} >= {"Session lifecycle", "Encoding",
                                              "fleetlite.command/1"}


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
    verdicts = {c["check"]: c for c in result["checks"]}  # type: ignore[union-attr]
    assert verdicts["retained online status"]["passed"]
    assert verdicts["ping answered with its id"]["passed"]
    assert not verdicts["retained birth"]["passed"]
    for name in ("an unknown command is refused", "another schema version is refused",
                 "a bad argument is refused"):
        assert not verdicts[name]["passed"], name
        assert "expected error_code" in verdicts[name]["detail"] and "got ok" in \
            verdicts[name]["detail"]
