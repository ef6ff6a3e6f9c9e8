"""``fleetlite conformance DEVICE_ID``: check, through the real broker, that a device speaks the
protocol (docs/protocol.md) as a FleetLite fleet expects: a phone app, a C agent or the Python
agent alike. Each check names the protocol section it tests and says what the device did.

This first part of the kit covers the session and the commands: the retained status and birth,
a command answered with its correlation id, and the refusals every device must give (an unknown
command, bytes that are not JSON, an oversize command, another schema version, a bad argument).
The OTA checks (a signed release and the hostile-release table) are the next part.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from fleetlite.fleet.broker_address import BrokerAddress, ssl_context
from fleetlite.fleet.errors import BrokerConnectionError
from fleetlite.sdk import topics
from fleetlite.sdk.messages import (
    MAX_COMMAND_BYTES,
    Birth,
    CommandResponse,
    MessageError,
    Status,
)

__all__ = ["Check", "Probe", "run_checks"]


@dataclass(frozen=True)
class Check:
    """One conformance check: what was checked, the protocol section, and the verdict."""

    name: str
    section: str
    passed: bool
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return {"check": self.name, "section": self.section, "passed": self.passed,
                "detail": self.detail}


class Probe:
    """A fleet-side MQTT client watching one device: its retained status and birth, and the
    responses to the commands it is sent."""

    def __init__(self, broker: BrokerAddress, device_id: str) -> None:
        self.device_id = topics.validate_device_id(device_id)
        self._lock = threading.Condition()
        self.retained: dict[str, bytes] = {}
        self.responses: list[bytes] = []
        self._connected = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2,
                                  client_id=f"fleetlite-conformance-{uuid.uuid4().hex[:8]}")
        tls = ssl_context(broker)
        if tls is not None:
            self.client.tls_set_context(tls)
        if broker.username:
            self.client.username_pw_set(broker.username, broker.password)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.broker = broker

    def __enter__(self) -> Probe:
        try:
            self.client.connect(self.broker.host, self.broker.port, keepalive=30)
        except OSError as exc:
            raise BrokerConnectionError(
                f"cannot reach the MQTT broker at {self.broker.url} ({exc.strerror or exc}): "
                "point --broker at the broker the device uses") from None
        self.client.loop_start()
        if not self._connected.wait(15):
            self.client.loop_stop()
            raise BrokerConnectionError(f"the MQTT broker at {self.broker.url} did not accept "
                                        "the connection within 15 s")
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any,
                    properties: Any) -> None:
        if reason.is_failure:
            return
        for kind in (topics.STATUS, topics.BIRTH, topics.COMMAND_RESPONSE):
            client.subscribe(topics.device_topic(self.device_id, kind), qos=1)
        self._connected.set()

    def _on_message(self, client: mqtt.Client, userdata: Any, message: Any) -> None:
        kind = topics.parse_device_topic(message.topic).kind
        with self._lock:
            if kind == topics.COMMAND_RESPONSE:
                self.responses.append(bytes(message.payload))
            else:
                self.retained[kind] = bytes(message.payload)
            self._lock.notify_all()

    def wait_retained(self, kind: str, timeout: float) -> Optional[bytes]:
        with self._lock:
            self._lock.wait_for(lambda: kind in self.retained, timeout)
            return self.retained.get(kind)

    def command(self, payload: bytes, answer_id: str, timeout: float) -> Optional[bytes]:
        """Publish ``payload`` on the device's command topic and wait for a response whose id
        is ``answer_id`` ("" for a command whose id cannot be read)."""
        with self._lock:
            seen = len(self.responses)
        self.client.publish(topics.device_topic(self.device_id, topics.COMMAND), payload, qos=1)

        def answered() -> Optional[bytes]:
            for raw in self.responses[seen:]:
                try:
                    if json.loads(raw).get("id") == answer_id:
                        return raw
                except (ValueError, AttributeError):
                    continue
            return None

        with self._lock:
            self._lock.wait_for(lambda: answered() is not None, timeout)
            return answered()


def _command(command: str, command_id: str, args: Optional[dict[str, Any]] = None,
             schema: str = "fleetlite.command/1") -> bytes:
    return json.dumps({"schema": schema, "id": command_id, "command": command,
                       "args": args or {}}).encode()


def _refusal_check(probe: Probe, name: str, section: str, payload: bytes, answer_id: str,
                   code: str, timeout: float) -> Check:
    raw = probe.command(payload, answer_id, timeout)
    if raw is None:
        return Check(name, section, False, f"no response with id {answer_id!r} within "
                     f"{timeout:g} s")
    try:
        response = CommandResponse.from_json(raw)
    except MessageError as exc:
        return Check(name, section, False, f"the response does not parse ({exc.code}: {exc})")
    if response.ok or response.error_code != code:
        got = "ok" if response.ok else f"error_code {response.error_code!r}"
        return Check(name, section, False, f"expected error_code {code!r}, got {got}")
    if response.device_id != probe.device_id:
        return Check(name, section, False, f"the response names device {response.device_id!r}")
    return Check(name, section, True, f"refused with {code}")


def run_checks(probe: Probe, timeout: float = 10.0,
               progress: Callable[[Check], None] = lambda check: None) -> list[Check]:
    """Run every check against the device of ``probe``; ``progress`` sees each as it ends."""
    checks: list[Check] = []

    def done(check: Check) -> None:
        checks.append(check)
        progress(check)

    device = probe.device_id
    status_raw = probe.wait_retained(topics.STATUS, timeout)
    session = None
    if status_raw is None:
        done(Check("retained online status", "Session lifecycle", False,
                   f"no retained message on {topics.device_topic(device, topics.STATUS)}"))
    else:
        try:
            status = Status.from_json(status_raw)
            session = status.session
            done(Check("retained online status", "Session lifecycle",
                       status.online and status.device_id == device,
                       f"online={status.online}, session {status.session}, device "
                       f"{status.device_id!r}"))
        except MessageError as exc:
            done(Check("retained online status", "Session lifecycle", False,
                       f"does not parse ({exc.code}: {exc})"))
    birth_raw = probe.wait_retained(topics.BIRTH, timeout)
    if birth_raw is None:
        done(Check("retained birth", "fleetlite.birth/1", False, "no retained birth"))
    else:
        try:
            birth = Birth.from_json(birth_raw)
            same = session is None or birth.session == session
            done(Check("retained birth", "fleetlite.birth/1",
                       birth.device_id == device and same,
                       f"class {birth.device_class!r}, {len(birth.models)} model(s), session "
                       f"{birth.session}{'' if same else ' (not the status session)'}"))
        except MessageError as exc:
            done(Check("retained birth", "fleetlite.birth/1", False,
                       f"does not parse ({exc.code}: {exc})"))
    ping_id = f"conf-{uuid.uuid4().hex[:8]}"
    raw = probe.command(_command("ping", ping_id), ping_id, timeout)
    if raw is None:
        done(Check("ping answered with its id", "fleetlite.command/1", False,
                   f"no response with id {ping_id} within {timeout:g} s"))
    else:
        try:
            response = CommandResponse.from_json(raw)
            good = response.ok and response.device_id == device
            done(Check("ping answered with its id", "fleetlite.command_response/1", good,
                       "ok" if good else f"ok={response.ok}, device {response.device_id!r}, "
                       f"error {response.error_code!r}"))
        except MessageError as exc:
            done(Check("ping answered with its id", "fleetlite.command_response/1", False,
                       f"the response does not parse ({exc.code}: {exc})"))
    unknown = f"conf-{uuid.uuid4().hex[:8]}"
    done(_refusal_check(probe, "an unknown command is refused", "fleetlite.command/1",
                        _command("no_such_command", unknown), unknown, "unknown_command",
                        timeout))
    done(_refusal_check(probe, "bytes that are not JSON are refused", "Encoding",
                        b"{not json", "", "malformed", timeout))
    big = f"conf-{uuid.uuid4().hex[:8]}"
    oversize = _command("ping", big, {"pad": "x" * (MAX_COMMAND_BYTES + 1)})
    done(_refusal_check(probe, "a command over 16 KiB is refused", "fleetlite.command/1",
                        oversize, "", "oversize", timeout))
    later = f"conf-{uuid.uuid4().hex[:8]}"
    done(_refusal_check(probe, "another schema version is refused", "Encoding",
                        _command("ping", later, schema="fleetlite.command/2"), later,
                        "wrong_schema", timeout))
    bad = f"conf-{uuid.uuid4().hex[:8]}"
    done(_refusal_check(probe, "a bad argument is refused", "fleetlite.command/1 (commands)",
                        _command("ota_install", bad, {"release_id": 7}), bad, "bad_args",
                        timeout))
    return checks


def checks_table(checks: list[Check]) -> str:
    width = max(len(c.name) for c in checks)
    lines = [f"{'CHECK':<{width}}  {'RESULT':<6}  {'SECTION':<30}  DETAIL"]
    lines += [f"{c.name:<{width}}  {'pass' if c.passed else 'FAIL':<6}  {c.section:<30}  "
              f"{c.detail}" for c in checks]
    passed = sum(c.passed for c in checks)
    lines.append(f"{passed} of {len(checks)} checks passed")
    return "\n".join(lines)


def add_parser(sub: Any, common: Any) -> None:
    """Add ``fleetlite conformance`` (``common``: the parent parser of the fleet options)."""
    import argparse

    parser = sub.add_parser(
        "conformance", help="check that a device speaks the protocol (session, commands)",
        description="Drive one device through the broker and check its answers against "
        "docs/protocol.md: the retained status and birth, a command answered with its "
        "correlation id, and the refusals every device must give (an unknown command, bytes "
        "that are not JSON, a command over 16 KiB, another schema version, a bad argument). "
        "Use the fleet's broker options (a controller's certificate: the device's topics "
        "are read and its command topic written). The OTA checks come next.",
        parents=[common], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="""examples:
  fleetlite conformance gw-berlin-01
  fleetlite conformance phone-7 --broker mqtts://mqtt.example.net:8883 --tls-ca ca.pem \\
      --tls-cert ctl.pem --tls-key ctl.key -o json

exit codes: 0 every check passed, 1 a check failed or the broker cannot be reached, 2 usage
error
""")
    parser.add_argument("device_id", metavar="DEVICE_ID")
    parser.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS",
                        help="how long to wait for each answer (default 10)")
    parser.add_argument("-o", "--output", choices=("table", "json", "yaml"), default="table",
                        help="output format (default table)")
    parser.set_defaults(fleet_verb=True, fleet_handler=None, standalone=_run)


def _run(broker: BrokerAddress, args: Any) -> int:
    import sys

    from fleetlite.fleet.cli_fleet import _emit

    with Probe(broker, args.device_id) as probe:
        checks = run_checks(probe, args.timeout)
    _emit(args, {"device_id": args.device_id, "passed": all(c.passed for c in checks),
                 "checks": [c.to_dict() for c in checks]}, lambda: checks_table(checks))
    sys.stdout.flush()
    return 0 if all(c.passed for c in checks) else 1
