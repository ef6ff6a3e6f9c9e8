"""``fleetlite conformance DEVICE_ID``: check, through the real broker, that a device speaks the
protocol (docs/protocol.md) as a FleetLite fleet expects: a phone app, a C agent or the Python
agent alike. Each check names the protocol section it tests and says what the device did.

The session and command checks always run: the retained status and birth, a command answered
with its correlation id, and the refusals every device must give (an unknown command, bytes that
are not JSON, an oversize command, another schema version, a bad argument).

The OTA checks (:mod:`fleetlite.fleet.conformance_ota`) run when the operator gives the release
key(s) the device's root trusts (``--key``): the hostile releases of "Verification order and
reason codes" must be refused with their reason codes while the active model stays, a valid
signed release must install, an older and the same version must be refused, and the kit's model
(``fleetlite-conformance``) is removed again at the end. Without ``--key`` they are skipped with
one line saying how to run them, not failed.
"""

from __future__ import annotations

import contextlib
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
from fleetlite.sdk.keys import SigningKey
from fleetlite.sdk.messages import (
    MAX_COMMAND_BYTES,
    Birth,
    CommandResponse,
    MessageError,
    OtaStatus,
    Status,
)

__all__ = ["Check", "OtaOptions", "Probe", "run_checks"]


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
        self.ota_statuses: list[OtaStatus] = []
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
        for kind in (topics.STATUS, topics.BIRTH, topics.COMMAND_RESPONSE, topics.OTA_STATUS):
            client.subscribe(topics.device_topic(self.device_id, kind), qos=1)
        self._connected.set()

    def _on_message(self, client: mqtt.Client, userdata: Any, message: Any) -> None:
        kind = topics.parse_device_topic(message.topic).kind
        with self._lock:
            if kind == topics.COMMAND_RESPONSE:
                self.responses.append(bytes(message.payload))
            elif kind == topics.OTA_STATUS:
                # a status that does not parse is never the one a check waits for
                with contextlib.suppress(MessageError):
                    self.ota_statuses.append(OtaStatus.from_json(bytes(message.payload)))
            else:
                self.retained[kind] = bytes(message.payload)
            self._lock.notify_all()

    def wait_retained(self, kind: str, timeout: float) -> Optional[bytes]:
        with self._lock:
            self._lock.wait_for(lambda: kind in self.retained, timeout)
            return self.retained.get(kind)

    def ota_mark(self) -> int:
        """A mark for :meth:`wait_ota`: statuses received from now on."""
        with self._lock:
            return len(self.ota_statuses)

    def wait_ota(self, release_id: str, since: int, timeout: float, *,
                 final_only: bool) -> Optional[OtaStatus]:
        """The first ``ota/status`` of ``release_id`` after the mark ``since`` (with
        ``final_only``, the final one) within ``timeout`` seconds; a final one wins."""

        def found() -> Optional[OtaStatus]:
            mine = [s for s in self.ota_statuses[since:] if s.release_id == release_id]
            finals = [s for s in mine if s.final]
            if finals:
                return finals[0]
            return mine[0] if mine and not final_only else None

        with self._lock:
            self._lock.wait_for(lambda: found() is not None, timeout)
            return found()

    def publish_retained(self, topic: str, payload: bytes, timeout: float = 10.0) -> None:
        self.client.publish(topic, payload, qos=1, retain=True).wait_for_publish(timeout)

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


@dataclass(frozen=True)
class OtaOptions:
    """What the OTA checks need: the release keys the device's root trusts, its class (None:
    from its retained birth) and the bound of a whole install (download, smoke test, health
    window)."""

    keys: tuple[SigningKey, ...]
    device_class: Optional[str] = None
    install_timeout: float = 120.0


OTA_SKIPPED = ("OTA checks skipped: give the release key(s) the device's root trusts with "
               "--key RELEASE.key to run them (they install, then remove, a model named "
               "fleetlite-conformance)")


def run_checks(probe: Probe, timeout: float = 10.0,
               progress: Callable[[Check], None] = lambda check: None,
               ota: Optional[OtaOptions] = None) -> list[Check]:
    """Run every check against the device of ``probe``; ``progress`` sees each as it ends.
    With ``ota``, the OTA checks of :mod:`fleetlite.fleet.conformance_ota` follow."""
    checks: list[Check] = []
    birth_class: Optional[str] = None

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
            birth_class = birth.device_class
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
    done(_refusal_check(probe, "a bad argument is refused", "fleetlite.command/1",
                        _command("ota_install", bad, {"release_id": 7}), bad, "bad_args",
                        timeout))
    if ota is not None:
        device_class = ota.device_class or birth_class
        if not device_class:
            done(Check("the device's class is known", "fleetlite.birth/1", False,
                       "no retained birth names it: pass --device-class"))
        else:
            from fleetlite.fleet.conformance_ota import run_ota_checks

            run_ota_checks(probe, probe.broker, ota.keys, device_class, timeout,
                           ota.install_timeout, done)
    return checks


def checks_table(checks: list[Check], note: str = "") -> str:
    width = max(len(c.name) for c in checks)
    section = max(len(c.section) for c in checks)
    lines = [f"{'CHECK':<{width}}  {'RESULT':<6}  {'SECTION':<{section}}  DETAIL"]
    lines += [f"{c.name:<{width}}  {'pass' if c.passed else 'FAIL':<6}  "
              f"{c.section:<{section}}  {c.detail}" for c in checks]
    passed = sum(c.passed for c in checks)
    lines.append(f"{passed} of {len(checks)} checks passed")
    if note:
        lines.append(note)
    return "\n".join(lines)


def add_parser(sub: Any, common: Any) -> None:
    """Add ``fleetlite conformance`` (``common``: the parent parser of the fleet options)."""
    import argparse

    parser = sub.add_parser(
        "conformance", help="check that a device speaks the protocol (session, commands, OTA)",
        description="Drive one device through the broker and check its answers against "
        "docs/protocol.md: the retained status and birth, a command answered with its "
        "correlation id, and the refusals every device must give (an unknown command, bytes "
        "that are not JSON, a command over 16 KiB, another schema version, a bad argument). "
        "With --key, the OTA checks follow: the kit builds a tiny model of its own under the "
        "name fleetlite-conformance, signs its releases with the given release key(s) (keys "
        "the device's root trusts) and serves them itself; the hostile releases (unsigned, an "
        "unknown signer, changed after signing, expired, another device class, a newer agent, "
        "a file over the size cap, bytes not matching the signed hash) must be refused with "
        "their reason codes while the active model stays, a valid one must install, an older "
        "and the same version must be refused, and the model is removed again at the end "
        "(remove_model), leaving the device as found. "
        "Use the fleet's broker options (a controller's certificate: the device's topics "
        "are read, its command topic and the release topics written).",
        parents=[common], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="""examples:
  fleetlite conformance gw-berlin-01
  fleetlite conformance gw-berlin-01 --key keys/release.key
  fleetlite conformance phone-7 --key rel-a.key --key rel-b.key --device-class android-arm64 \\
      --broker mqtts://mqtt.example.net:8883 --tls-ca ca.pem --tls-cert ctl.pem \\
      --tls-key ctl.key -o json

Without --key the OTA checks are skipped (not failed). A device whose root asks for a
threshold of several release keys needs that many (--key per key). The OTA checks install and
then remove a model named fleetlite-conformance; the device's own models are not touched.

exit codes: 0 every check passed, 1 a check failed or the broker cannot be reached, 2 usage
error (also: a key file that cannot be read)
""")
    parser.add_argument("device_id", metavar="DEVICE_ID")
    parser.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS",
                        help="how long to wait for each answer (default 10)")
    parser.add_argument("--key", action="append", default=[], metavar="RELEASE.key",
                        help="a release signing key the device's root trusts (repeatable); "
                        "runs the OTA checks")
    parser.add_argument("--device-class", metavar="CLASS",
                        help="the device's class for the OTA releases (default: from its "
                        "retained birth)")
    parser.add_argument("--install-timeout", type=float, default=120.0, metavar="SECONDS",
                        help="how long a release the device took may take to end: download, "
                        "smoke test and health window (default 120)")
    parser.add_argument("-o", "--output", choices=("table", "json", "yaml"), default="table",
                        help="output format (default table)")
    parser.set_defaults(fleet_verb=True, fleet_handler=None, standalone=_run)


def _run(broker: BrokerAddress, args: Any) -> int:
    import sys

    from fleetlite.fleet.cli_fleet import _emit
    from fleetlite.sdk.errors import KeyFileError
    from fleetlite.sdk.keys import require_role

    ota: Optional[OtaOptions] = None
    if args.key:
        try:
            keys = tuple(SigningKey.load(path) for path in args.key)
            for path, key in zip(args.key, keys):
                require_role(key.role, "release", str(path), option="--key")
        except KeyFileError as exc:
            print(f"fleetlite conformance: {exc}", file=sys.stderr)
            return 2
        ota = OtaOptions(keys, args.device_class, args.install_timeout)
    with Probe(broker, args.device_id) as probe:
        checks = run_checks(probe, args.timeout, ota=ota)
    note = "" if ota is not None else OTA_SKIPPED
    document: dict[str, Any] = {"device_id": args.device_id,
                                "passed": all(c.passed for c in checks),
                                "checks": [c.to_dict() for c in checks]}
    if note:
        document["ota_skipped"] = note
    _emit(args, document, lambda: checks_table(checks, note))
    sys.stdout.flush()
    return 0 if all(c.passed for c in checks) else 1
