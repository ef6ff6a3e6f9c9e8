"""docs/protocol.md and the code agree: every test vector decodes and re-encodes byte for byte."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest

from fleetlite.sdk import messages, ota_messages, profile, shadow, topics
from fleetlite.sdk.envelope import ROOT_PAYLOAD_TYPE, Envelope
from fleetlite.sdk.errors import UpdateRejected
from fleetlite.sdk.manifest import parse_manifest
from fleetlite.sdk.messages import MessageError
from fleetlite.sdk.trust import canonical_json, parse_root_envelope
from fleetlite.sdk.verify import Limits

DOC = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"
VECTOR = re.compile(r"<!-- vector: (\w+) -->\s*```json\n(.*?)\n```", re.S)
# A table after a marker: rows of backquoted cells, up to the first line that is not a row.
URLSAFE = str.maketrans("-_", "+/")
TABLE = r"<!-- {} -->\n\| .*?\n\| --- .*?\n((?:\|.*\n)+)"


def vectors() -> list[tuple[str, bytes]]:
    return [(name, body.encode()) for name, body in VECTOR.findall(DOC.read_text())]


def table(marker: str) -> list[list[str]]:
    """The rows of the table after ``<!-- marker -->``: each cell, backquotes stripped."""
    found = re.search(TABLE.format(re.escape(marker)), DOC.read_text())
    assert found, f"no table after <!-- {marker} --> in docs/protocol.md"
    rows = []
    for line in found.group(1).splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split(" | ")]
        rows.append([c[1:-1] if c.startswith("`") and c.endswith("`") and c.count("`") == 2
                     else c for c in cells])
    return rows


def message_class(name: str) -> type[messages.Message]:
    for module in (messages, ota_messages, profile, shadow):
        if hasattr(module, name):
            cls: type[messages.Message] = getattr(module, name)
            return cls
    raise AssertionError(f"no message class {name}")


def test_the_doc_has_a_vector_per_message_type() -> None:
    assert {name for name, _ in vectors()} >= {
        "Status", "Birth", "Telemetry", "Event", "Command", "CommandResponse", "OtaStatus",
        "ProfileRecord",
    }
    profiles = [payload for name, payload in vectors() if name == "ProfileRecord"]
    assert {profile.ProfileRecord.from_json(p).schema for p in profiles} == set(profile.SCHEMAS)


@pytest.mark.parametrize(("name", "payload"), vectors())
def test_vector_round_trips_exactly(name: str, payload: bytes) -> None:
    cls = message_class(name)
    decoded = cls.from_json(payload)
    assert decoded.to_json() == payload


@pytest.mark.parametrize(("name", "payload", "result"), table("decode-cases"))
def test_decoding_edge_cases_get_the_documented_code(name: str, payload: str,
                                                     result: str) -> None:
    cls = message_class(name)
    if result == "ok":
        cls.from_json(payload.encode())
        return
    with pytest.raises(MessageError) as info:
        cls.from_json(payload.encode())
    assert info.value.code == result


@pytest.mark.parametrize(("text", "result"), table("base64-cases"))
def test_envelope_base64_rules_are_the_documented_ones(text: str, result: str) -> None:
    text = "" if text == "(empty)" else text.replace("\\n", "\n")
    wrapper = json.dumps({"payloadType": "t", "payload": text, "signatures": []}).encode()
    if result == "ok":
        envelope = Envelope.from_json(wrapper, max_bytes=1024, max_payload_bytes=1024)
        assert base64.b64encode(envelope.payload).decode() == text.translate(URLSAFE)
        return
    with pytest.raises(UpdateRejected) as info:
        Envelope.from_json(wrapper, max_bytes=1024, max_payload_bytes=1024)
    assert info.value.reason == result


@pytest.mark.parametrize(("wrapper", "result"), table("envelope-cases"))
def test_envelope_edge_cases_get_the_documented_code(wrapper: str, result: str) -> None:
    limits = Limits()
    caps = {"max_bytes": limits.max_envelope_bytes,
            "max_payload_bytes": limits.max_manifest_bytes,
            "max_signatures": limits.max_signatures}
    if result == "ok":
        Envelope.from_json(wrapper.encode(), **caps)
        return
    with pytest.raises(UpdateRejected) as info:
        Envelope.from_json(wrapper.encode(), **caps)
    assert info.value.reason == result


EDIT = re.compile(r"`([^`]+)` (?:= `(.*)`|absent)")
SIGNING_VECTOR = r"<!-- signing-vector: {} -->\s*```json\n(.*?)\n```"


def edited(vector: str, edit: str) -> bytes:
    """The doc's signing vector ``vector`` with ``edit`` (`a.b.0` = `json`, `a.b` absent)
    applied, written as compact key-sorted JSON like every signed payload."""
    found = re.search(SIGNING_VECTOR.format(vector), DOC.read_text(), re.S)
    assert found, f"no signing vector {vector}"
    document = json.loads(found.group(1))
    match = EDIT.fullmatch(edit)
    assert match, f"not an edit: {edit}"
    *parents, last = match.group(1).split(".")
    target = document
    for key in parents:
        target = target[int(key)] if isinstance(target, list) else target[key]
    index: int | str = int(last) if isinstance(target, list) else last
    if match.group(2) is None:
        del target[index]
    else:
        target[index] = json.loads(match.group(2))
    return canonical_json(document)


@pytest.mark.parametrize(("edit", "result"), table("root-cases"))
def test_root_payload_edge_cases_get_the_documented_code(edit: str, result: str) -> None:
    payload = edited("root_payload", edit)
    wrapper = Envelope(ROOT_PAYLOAD_TYPE, payload).to_json()
    if result == "ok":
        parse_root_envelope(wrapper)
        return
    with pytest.raises(UpdateRejected) as info:
        parse_root_envelope(wrapper)
    assert info.value.reason == result


@pytest.mark.parametrize(("edit", "result"), table("manifest-cases"))
def test_manifest_edge_cases_get_the_documented_code(edit: str, result: str) -> None:
    payload = edited("manifest_payload", edit)
    if result == "ok":
        parse_manifest(payload)
        return
    with pytest.raises(UpdateRejected) as info:
        parse_manifest(payload)
    assert info.value.reason == result


def test_topic_table_matches_code() -> None:
    text = DOC.read_text()
    for kind in topics.ALL_KINDS:
        assert f"`fleetlite/v1/dev/{{id}}/{kind}`" in text


def test_reason_codes_in_doc_match_code() -> None:
    text = DOC.read_text()
    from fleetlite.agent import commands

    for code in (messages.OVERSIZE, messages.MALFORMED, messages.WRONG_SCHEMA,
                 messages.MISSING_FIELD, messages.BAD_TYPE, messages.BAD_VALUE,
                 commands.UNKNOWN_COMMAND, commands.BAD_ARGS, commands.FAILED, commands.INTERNAL):
        assert f"| `{code}` |" in text


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (b"x" * 20000, "oversize"),
        (b"\xff\xfe", "malformed"),
        (b"[1]", "malformed"),
        (b'{"schema":"fleetlite.command/2","id":"a","command":"ping"}', "wrong_schema"),
        (b'{"schema":"fleetlite.status/1"}', "wrong_schema"),
        (b'{"schema":"fleetlite.command/1","command":"ping"}', "missing_field"),
        (b'{"schema":"fleetlite.command/1","id":5,"command":"ping"}', "bad_type"),
        (b'{"schema":"fleetlite.command/1","id":"","command":"ping"}', "bad_value"),
        (b'{"schema":"fleetlite.command/1","id":"a","command":"ping","args":[]}', "bad_type"),
        (b'{"schema":"fleetlite.command/1","id":"a","command":"ping","x":NaN}', "malformed"),
    ],
)
def test_refused_commands_carry_the_documented_code(payload: bytes, code: str) -> None:
    with pytest.raises(MessageError) as info:
        messages.Command.from_json(payload)
    assert info.value.code == code


def test_topics_parse_and_refuse() -> None:
    topic = topics.device_topic("gw-1", topics.OTA_STATUS)
    assert topics.parse_device_topic(topic) == topics.DeviceTopic("gw-1", "ota/status")
    for bad in ("gw/1", "", "a" * 65, "gw+1", "#", ".."):
        with pytest.raises(topics.TopicError):
            topics.device_topic(bad, topics.STATUS)
    with pytest.raises(topics.TopicError):
        topics.parse_device_topic("other/v1/dev/gw-1/status")
    assert topics.fleet_subscription(topics.TELEMETRY, "ctl") == (
        "$share/ctl/fleetlite/v1/dev/+/telemetry"
    )


def test_every_ota_reason_code_is_documented() -> None:
    from fleetlite.agent import ota, smoke_test
    from fleetlite.agent.ota_download import DownloadError

    text = DOC.read_text()
    codes = {ota.MANIFEST_TIMEOUT, ota.DOWNLOAD_STALLED, ota.DISK_FULL, ota.HEALTH_FAILED,
             ota.CRASHED_IN_HEALTH_WINDOW, ota.OPERATOR_ROLLBACK, ota.MODEL_REMOVED,
             ota.SMOKE_UNAVAILABLE, ota.UNKNOWN_VARIANT, ota.SHADOW_UNAVAILABLE,
             ota.INTERNAL, *smoke_test.REASONS}
    codes |= {cls.reason for cls in DownloadError.__subclasses__() if isinstance(
        getattr(cls, "reason", None), str)}
    missing = sorted(code for code in codes if f"`{code}`" not in text)
    assert not missing, f"reason codes missing from docs/protocol.md: {missing}"
