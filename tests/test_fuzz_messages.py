"""Fuzzing of the JSON messages both sides accept: everything the controller ingests (status,
birth, telemetry, profile, OTA status, events, command responses, chunk requests, device topics)
and the commands the agent executes. Each parser either accepts a message that re-encodes to an
equal one, or raises :class:`MessageError` with a documented reason code; nothing else escapes.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fleetlite.agent.commands import (
    BAD_ARGS,
    FAILED,
    UNKNOWN_COMMAND,
    CommandDispatcher,
    arg,
)
from fleetlite.sdk import messages, topics
from fleetlite.sdk.messages import Message, MessageError
from fleetlite.sdk.ota_messages import ChunkRequest
from fleetlite.sdk.profile import (
    LatencyStats,
    MemoryStats,
    ModelInfo,
    ProfileRecord,
    RunParameters,
    Timings,
)
from tests.fuzz_settings import (
    encode,
    fuzz,
    hostile_bytes,
    json_values,
    no_hang,
    parse_or_refuse,
    sweep,
)

DOC = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"
MESSAGE_CODES = {messages.OVERSIZE, messages.MALFORMED, messages.WRONG_SCHEMA,
                 messages.MISSING_FIELD, messages.BAD_TYPE, messages.BAD_VALUE}


def doc_vectors() -> dict[str, bytes]:
    """The message test vectors of docs/protocol.md, by name (``Status``, ``chunk_request``)."""
    found = re.findall(r"<!-- (?:ota-)?vector: (\w+) -->\s*```json\n(.*?)\n```", DOC.read_text(),
                       re.S)
    return {name: body.encode() for name, body in found}


VECTORS = doc_vectors()


def profile_vector() -> bytes:
    steady = LatencyStats(count=4, mean_ms=0.5, std_ms=0.1, min_ms=0.4, p50_ms=0.5, p90_ms=0.6,
                          p95_ms=0.65, p99_ms=0.7, max_ms=0.7)
    record = ProfileRecord(
        device_id="gw-1", ts=1_764_201_600.5, trigger="install",
        model=ModelInfo(name="kws", version=3, sha256="ab" * 32, size_bytes=3024,
                        quantization="int8", inputs=[{"name": "x", "shape": [1, 16],
                                                      "dtype": "int8"}],
                        outputs=[{"name": "y", "shape": [1, 4], "dtype": "int8"}],
                        node_count=5, op_counts={"FULLY_CONNECTED": 2}),
        run=RunParameters(threads=2, backend="tflite-runtime", backend_version="2.14.0",
                          delegate="xnnpack", resolver="auto", timing="invoke",
                          inputs="synthetic", warmup_runs=1, warmup_min_seconds=0.5,
                          min_runs=50, max_runs=1000, min_seconds=1.0, max_seconds=150.0,
                          isolated=True),
        timings=Timings(init_ms=1.5, first_inference_ms=0.05, warmup_count=10,
                        warmup_mean_ms=0.004, steady=steady, steady_seconds=1.0),
        memory=MemoryStats(rss_before_load_mb=40.0, peak_rss_load_mb=44.0,
                           rss_after_load_mb=43.5, peak_rss_inference_mb=45.25,
                           method="sampling", load_sample_interval_ms=1.0,
                           inference_sample_interval_ms=10.0),
        device={"device_class": "raspberry-pi-4", "cores": 4},
    )
    return record.to_json()


# (message class, valid encoding): every kind the controller and the OTA publisher ingest, the
# command responses and events the fleet client reads, and the command the agent reads.
INGESTED: list[tuple[type[Message], bytes]] = [
    (messages.Status, VECTORS["Status"]),
    (messages.Birth, VECTORS["Birth"]),
    (messages.Telemetry, VECTORS["Telemetry"]),
    (messages.Event, VECTORS["Event"]),
    (messages.CommandResponse, VECTORS["CommandResponse"]),
    (messages.OtaStatus, VECTORS["OtaStatus"]),
    (messages.Command, VECTORS["Command"]),
    (ChunkRequest, VECTORS["chunk_request"]),
    (ProfileRecord, profile_vector()),
]


def test_every_ingested_kind_has_a_valid_seed() -> None:
    for cls, valid in INGESTED:
        assert cls.from_json(valid).to_json() == valid, cls.__name__


def _check_code(exc: MessageError) -> None:
    assert exc.code in MESSAGE_CODES, exc.code


def _accepted_is_sound(message: Message) -> None:
    """An accepted message re-encodes (strict JSON, no NaN/Infinity) to an equal message."""
    again = type(message).from_json(message.to_json())
    assert again == message


@pytest.mark.parametrize(("cls", "valid"), INGESTED, ids=[c.__name__ for c, _ in INGESTED])
@fuzz(150)
@given(data=st.data())
def test_message_parsers_accept_or_refuse_with_a_code(cls: type[Message], valid: bytes,
                                                      data: st.DataObject) -> None:
    payload = data.draw(hostile_bytes(valid, json.loads(valid), deep=3000), label="payload")
    message = parse_or_refuse(lambda: cls.from_json(payload), MessageError, _check_code)
    if message is not None:
        _accepted_is_sound(message)


@pytest.mark.parametrize(("cls", "valid"), INGESTED, ids=[c.__name__ for c, _ in INGESTED])
def test_every_field_with_every_hostile_value(cls: type[Message], valid: bytes) -> None:
    def check(doc: Any) -> None:
        message = parse_or_refuse(lambda: cls.from_json(encode(doc)), MessageError, _check_code)
        if message is not None:
            _accepted_is_sound(message)

    sweep(json.loads(valid), check, deep=3000)


@pytest.mark.parametrize(("cls", "valid"), INGESTED, ids=[c.__name__ for c, _ in INGESTED])
@fuzz(60)
@given(doc=st.dictionaries(st.text(max_size=12), json_values(), max_size=8))
def test_message_parsers_refuse_arbitrary_objects(cls: type[Message], valid: bytes,
                                                  doc: dict[str, Any]) -> None:
    doc["schema"] = cls.SCHEMA
    message = parse_or_refuse(lambda: cls.from_json(encode(doc)), MessageError, _check_code)
    if message is not None:
        _accepted_is_sound(message)


def test_oversize_and_deep_messages_are_refused_by_code() -> None:
    for cls, valid in INGESTED:
        huge = valid[:-1] + b',"pad":"' + b"x" * cls.MAX_BYTES + b'"}'
        deep = b'{"schema":"%s","x":%s%s}' % (cls.SCHEMA.encode(), b"[" * 2000, b"]" * 2000)
        for payload, code in ((huge, messages.OVERSIZE), (deep, messages.MALFORMED)):
            with no_hang(), pytest.raises(MessageError) as info:
                cls.from_json(payload)
            assert info.value.code == code, (cls.__name__, info.value)


@fuzz(300)
@given(topic=st.one_of(
    st.text(max_size=80),
    st.builds(lambda device, kind: f"fleetlite/v1/dev/{device}/{kind}",
              st.text(max_size=70) | st.sampled_from(["gw-1", "", "..", "+", "#", "a/b"]),
              st.sampled_from([*topics.ALL_KINDS, "", "status/x", "ota", "cmd/resp/x"])),
))
def test_device_topics_parse_or_raise_topic_error(topic: str) -> None:
    parsed = parse_or_refuse(lambda: topics.parse_device_topic(topic), topics.TopicError)
    if parsed is not None:
        assert topics.validate_device_id(parsed.device_id) == parsed.device_id
        assert parsed.kind in topics.ALL_KINDS


# --- commands, as the agent's dispatcher receives them -----------------------------------------


def _echo(args: Any) -> dict[str, Any]:
    return {"n": arg(args, "n", int, 0), "name": arg(args, "name", str, ""),
            "ratio": arg(args, "ratio", (int, float), 1.0), "flag": arg(args, "flag", bool)}


def _fails(args: Any) -> dict[str, Any]:
    from fleetlite.agent.errors import ModelNotFoundError

    raise ModelNotFoundError(f"no model {arg(args, 'model', str, required=True)!r}")


COMMAND_SEEDS = [
    json.loads(VECTORS["Command"]),
    {"schema": "fleetlite.command/1", "id": "c-2", "command": "echo",
     "args": {"n": 3, "name": "x", "ratio": 0.5, "flag": True}},
    {"schema": "fleetlite.command/1", "id": "c-3", "command": "fails", "args": {"model": "m"}},
]


@fuzz(400)
@given(data=st.data())
def test_command_dispatcher_always_answers_with_a_code(data: st.DataObject) -> None:
    seed = data.draw(st.sampled_from(COMMAND_SEEDS), label="seed")
    payload = data.draw(hostile_bytes(encode(seed), seed, deep=3000), label="payload")
    dispatcher = CommandDispatcher("gw-1", {"ping": lambda args: {"pong": True},
                                            "echo": _echo, "fails": _fails})
    with no_hang():
        response = dispatcher.handle(payload)
    assert response.device_id == "gw-1"
    if not response.ok:
        assert response.error_code in MESSAGE_CODES | {UNKNOWN_COMMAND, BAD_ARGS, FAILED}, \
            response.error
        assert response.error
    # the response itself must always be publishable and readable by the fleet
    assert messages.CommandResponse.from_json(response.to_json()) == response
