"""The JSON Schemas (sdk/schemas/, docs/schemas/) and the code agree.

The committed files are what :mod:`fleetlite.sdk.json_schemas` builds now; they accept every
vector of docs/protocol.md, every message and document the SDK writes, and every message a real
agent publishes through a real Mosquitto (birth, status, its Last Will, telemetry, profiles,
command responses, chunk requests and OTA statuses of a real install); and an invalid message of
each kind is refused by the schema AND by the Python parser.
"""

from __future__ import annotations

import base64
import copy
import json
import re
from collections.abc import Callable, Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import regress

from fleetlite.fleet.intent_model import intent_classifier
from fleetlite.fleet.release_builder import build_release
from fleetlite.sdk import json_schemas, messages, topics
from fleetlite.sdk.bundle import ReleaseBundle
from fleetlite.sdk.envelope import ROOT_PAYLOAD_TYPE, Envelope
from fleetlite.sdk.errors import FleetLiteError
from fleetlite.sdk.lm_smoke import LmSmokeVectors
from fleetlite.sdk.manifest import parse_manifest
from fleetlite.sdk.ota_messages import ChunkRequest
from fleetlite.sdk.profile import ProfileRecord
from fleetlite.sdk.shadow import ShadowReport
from fleetlite.sdk.smoke import SmokeVectors
from fleetlite.sdk.trust import canonical_json, parse_root_envelope
from fleetlite.tools import gen_schemas
from tests.agent_harness import AgentProcess, write_config
from tests.mqtt_harness import Collector, Mosquitto
from tests.ota_harness import ManualRelease
from tests.test_ota_agent import collector, command  # noqa: F401 (the fixture)
from tests.test_ota_install import CLASS, ISSUED, RELEASE_KEY, write_root

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "protocol.md"
LM = REPO / "tests" / "fixtures" / "lm"
DEVICE = "gw-1"
#: the schema of each device topic kind
TOPIC_KINDS = {
    topics.STATUS: "status", topics.BIRTH: "birth", topics.TELEMETRY: "telemetry",
    topics.PROFILE: "profile", topics.OTA_STATUS: "ota_status",
    topics.OTA_REQUEST: "chunk_request", topics.EVENTS: "event", topics.COMMAND: "command",
    topics.COMMAND_RESPONSE: "command_response",
}
MESSAGE_CLASSES: dict[str, type[messages.Message]] = {
    "status": messages.Status, "birth": messages.Birth, "telemetry": messages.Telemetry,
    "event": messages.Event, "command": messages.Command,
    "command_response": messages.CommandResponse, "ota_status": messages.OtaStatus,
    "chunk_request": ChunkRequest, "profile": ProfileRecord, "shadow_report": ShadowReport,
}


def _ecma_pattern(validator: Any, pattern: str, instance: Any, schema: Any) -> Iterator[Any]:
    """``pattern`` as JSON Schema defines it, ECMA-262 (Python's ``$`` also matches before a
    final newline, so jsonschema's default would let ``"intent\\n"`` through)."""
    if validator.is_type(instance, "string") and regress.Regex(pattern, "u").find(instance) is None:
        yield jsonschema.ValidationError(f"{instance!r:.80} does not match {pattern!r}")


EcmaValidator = jsonschema.validators.extend(jsonschema.Draft202012Validator,
                                             {"pattern": _ecma_pattern})


def validator(kind: str) -> Any:
    schema = json.loads((REPO / "sdk" / "schemas" / f"{kind}.schema.json").read_text())
    return EcmaValidator(schema)


def schema_errors(kind: str, document: Any) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
            for e in validator(kind).iter_errors(document)]


def assert_valid(kind: str, document: Any) -> None:
    errors = schema_errors(kind, document)
    assert not errors, f"{kind} schema refuses a valid document: {errors[:3]}"


def parse(kind: str, document: Any) -> None:
    """The Python parser of ``kind``; raises when it refuses ``document``."""
    if kind in MESSAGE_CLASSES:
        MESSAGE_CLASSES[kind].from_json(messages.encode(document))
    elif kind == "manifest":
        parse_manifest(canonical_json(document))
    elif kind == "root":
        parse_root_envelope(Envelope(ROOT_PAYLOAD_TYPE, canonical_json(document)).to_json())
    elif kind == "envelope":
        Envelope.from_json(json.dumps(document).encode(), max_bytes=512 * 1024,
                           max_payload_bytes=256 * 1024)
    elif kind == "smoke":
        SmokeVectors.from_json(json.dumps(document).encode())
    elif kind == "lm_smoke":
        LmSmokeVectors.from_json(canonical_json(document))
    else:
        raise AssertionError(kind)


# -- the files -----------------------------------------------------------------------------------


def test_committed_schemas_are_what_the_code_generates() -> None:
    for target in gen_schemas.TARGETS:
        assert not gen_schemas.differences(target), (
            "regenerate with: python -m fleetlite.tools.gen_schemas")
    assert gen_schemas.main(["--check"]) == 0


def test_every_schema_is_draft_2020_12_with_id_title_and_description() -> None:
    ids = set()
    for kind in json_schemas.KINDS:
        schema = validator(kind).schema
        jsonschema.Draft202012Validator.check_schema(schema)
        assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
        assert schema["title"] and schema["description"]
        assert "additionalProperties" in schema  # an explicit decision on unknown fields
        ids.add(schema["$id"])
    assert len(ids) == len(json_schemas.KINDS)


def test_schemas_ship_as_package_data() -> None:
    shipped = resources.files("fleetlite.sdk") / "schemas"
    names = {entry.name for entry in shipped.iterdir()}
    assert names >= {f"{kind}.schema.json" for kind in json_schemas.KINDS}
    setup = (REPO / "setup.cfg").read_text()
    assert re.search(r"^fleetlite\.sdk\.schemas = \*\.schema\.json$", setup, re.M)
    assert "jsonschema" in setup.split("dev =", 1)[1].split("\n\n", 1)[0]


def test_strict_documents_refuse_unknown_fields_and_messages_ignore_them() -> None:
    strict = {"manifest", "root", "envelope", "smoke", "lm_smoke"}
    for kind in json_schemas.KINDS:
        assert validator(kind).schema["additionalProperties"] is (kind not in strict), kind


# -- the vectors of docs/protocol.md -------------------------------------------------------------

VECTOR = re.compile(r"<!-- vector: (\w+) -->\s*```json\n(.*?)\n```", re.S)
OTA_VECTOR = re.compile(r"<!-- ota-vector: (\w+) -->\s*```json\n(.*?)\n```", re.S)
SIGNING_VECTOR = re.compile(r"<!-- signing-vector: (\w+) -->\s*```json\n(.*?)\n```", re.S)
SIGNING_KINDS = {"root_payload": "root", "manifest_payload": "manifest",
                 "root_envelope": "envelope", "manifest_envelope": "envelope"}


def doc_vectors() -> list[tuple[str, str, Any]]:
    text = DOC.read_text()
    found = []
    for name, body in VECTOR.findall(text):
        kind = next(k for k, c in MESSAGE_CLASSES.items() if c.__name__ == name)
        found.append((name, kind, json.loads(body)))
    found += [(name, name, json.loads(body)) for name, body in OTA_VECTOR.findall(text)]
    found += [(name, SIGNING_KINDS[name], json.loads(body))
              for name, body in SIGNING_VECTOR.findall(text) if name in SIGNING_KINDS]
    for body in re.findall(r"```json\n(.*?)\n```", text, re.S):
        if '"fleetlite.lm_smoke"' in body:
            found.append(("lm_smoke example", "lm_smoke", json.loads(body)))
    return found


def test_the_doc_has_a_vector_of_each_kind_it_shows() -> None:
    kinds = {kind for _, kind, _ in doc_vectors()}
    assert kinds >= {"status", "birth", "telemetry", "event", "command", "command_response",
                     "ota_status", "chunk_request", "profile", "root", "manifest", "envelope",
                     "lm_smoke"}


@pytest.mark.parametrize(("name", "kind", "document"), doc_vectors(),
                         ids=[v[0] for v in doc_vectors()])
def test_every_doc_vector_is_valid(name: str, kind: str, document: Any) -> None:
    assert_valid(kind, document)
    parse(kind, document)


# -- what the SDK writes -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def intent_release(tmp_path_factory: pytest.TempPathFactory) -> ReleaseBundle:
    tmp = tmp_path_factory.mktemp("intent")
    (tmp / "intent.tflite").write_bytes(intent_classifier(seed=7).tflite)
    return build_release([tmp / "intent.tflite"], name="intent", version=2,
                         device_classes=[CLASS], issued=ISSUED, keys=[RELEASE_KEY],
                         vocab=REPO / "tests" / "fixtures" / "models"
                         / "intent_classifier.vocab.json")


@pytest.fixture(scope="module")
def lm_release() -> ReleaseBundle:
    """A language model with an int8 variant: generation, variants and LM smoke vectors."""
    return build_release([LM / "home_lm.tflite", LM / "home_lm_int8.tflite"], name="home-lm",
                         version=1, device_classes=[CLASS], issued=ISSUED, keys=[RELEASE_KEY],
                         tokenizer=LM / "home_lm.spm.model",
                         prompt_template="<user> {prompt} <bot>", stop_strings=["<user>"],
                         smoke_prompts=["turn off the kitchen lights"], smoke_tokens=4)


def release_documents(bundle: ReleaseBundle) -> list[tuple[str, Any]]:
    found: list[tuple[str, Any]] = [("envelope", json.loads(bundle.envelope.to_json())),
                                    ("manifest", json.loads(bundle.envelope.payload))]
    for entry in bundle.manifest.files:
        if entry.role == "smoke":
            content = json.loads(bundle.files[entry.name])
            found.append(("lm_smoke" if content["_type"] == "fleetlite.lm_smoke" else "smoke",
                          content))
    return found


def sdk_messages() -> list[tuple[str, messages.Message]]:
    request = ChunkRequest(device_id=DEVICE, release_id="ab" * 32, chunk_size=16384, ts=1.5,
                           missing=((0, 3, 5), (1, 0, 1)))
    return [
        ("status", messages.Status(DEVICE, online=False, session=3, ts=1.0, reason="lost",
                                   conn=2)),
        ("birth", messages.Birth(DEVICE, 1, 2.0, CLASS, "0.1.0", tags={"site": "lab"},
                                 facts={"cores": 4}, models=[{"name": "intent"}])),
        ("telemetry", messages.Telemetry(DEVICE, 1, 7, 3.0, {"cpu": 1.5}, {"intent": {}},
                                         spool={"queued": 0})),
        ("event", messages.Event(DEVICE, 4.0, "model_error", "it broke", {"x": 1})),
        ("command", messages.Command("c1", "ota_install", {"release_id": "ab" * 32})),
        ("command_response", messages.CommandResponse("c1", DEVICE, False, 5.0,
                                                      error_code="bad_args", error="no")),
        ("ota_status", messages.OtaStatus(DEVICE, 6.0, "ab" * 32, "intent", 2, "downloading",
                                          progress={"received_bytes": 10})),
        ("shadow_report", ShadowReport(
            device_id=DEVICE, ts=8.0, since=2.0, release_id="ab" * 32, model="sensor",
            version=2, active_version=1, kind="regressor", requests=40, samples=8,
            compared=8, agreed=7, sample_rate=0.2, cpu_budget=0.25, p95_budget_ratio=1.2,
            skipped_budget=1, error_bound=0.05, max_abs_error=0.07, mean_abs_error=0.01,
            active_alone_count=30, active_alone_p50_ms=0.1, active_alone_p95_ms=0.2,
            active_shadowed_count=10, active_shadowed_p50_ms=0.11,
            active_shadowed_p95_ms=0.21, candidate_count=8, candidate_p50_ms=0.12,
            candidate_p95_ms=0.3)),
        ("chunk_request", request),
        ("chunk_request", ChunkRequest(DEVICE, "ab" * 32, 1024, 2.0, (), done=True)),
    ]


@pytest.mark.parametrize(("kind", "message"), sdk_messages(),
                         ids=[kind for kind, _ in sdk_messages()])
def test_messages_the_sdk_writes_are_valid(kind: str, message: messages.Message) -> None:
    assert_valid(kind, json.loads(message.to_json()))


def test_releases_the_sdk_builds_are_valid(intent_release: ReleaseBundle,
                                           lm_release: ReleaseBundle) -> None:
    kinds = []
    for bundle in (intent_release, lm_release):
        for kind, document in release_documents(bundle):
            assert_valid(kind, document)
            kinds.append(kind)
    assert sorted(set(kinds)) == ["envelope", "lm_smoke", "manifest", "smoke"]
    assert "generation" in json.loads(lm_release.envelope.payload)
    assert json.loads(lm_release.envelope.payload)["variants"]


def test_roots_the_sdk_writes_are_valid(tmp_path: Path) -> None:
    envelope = json.loads(write_root(tmp_path / "root.json").read_bytes())
    assert_valid("envelope", envelope)
    assert_valid("root", json.loads(base64.b64decode(envelope["payload"])))


def test_profiles_of_both_versions_are_valid() -> None:
    from fleetlite.agent.lm_profiler import profile_lm
    from fleetlite.agent.profiler import profile_model

    classic = profile_model(REPO / "tests" / "fixtures" / "models" / "intent_classifier.tflite",
                            min_runs=5, min_seconds=0, max_seconds=2, device_id=DEVICE)
    lm = profile_lm(LM / "home_lm.tflite", repetitions=2, decode_tokens=4, device_id=DEVICE)
    for record, schema in ((classic, "fleetlite.profile/1"), (lm, "fleetlite.profile/2")):
        document = json.loads(record.to_json())
        assert document["schema"] == schema
        assert_valid("profile", document)
    # an LM profile's cache layout is one of the manifest's, in schema and parser alike
    document["lm"]["cache_layout"] = "diagonal"
    assert schema_errors("profile", document)
    with pytest.raises(messages.MessageError) as info:
        ProfileRecord.from_json(json.dumps(document).encode())
    assert info.value.code == "bad_value"


# -- what a real agent publishes -----------------------------------------------------------------


@pytest.mark.slow
def test_every_message_a_real_agent_publishes_is_valid(
    tmp_path: Path, broker: Mosquitto, collector: Collector,  # noqa: F811
    models_dir: Path,
    intent_release: ReleaseBundle,
) -> None:
    config = write_config(
        tmp_path / "agent", port=broker.port, telemetry_s=0.3, profile_on_model_change=True,
        models=[{"name": "intent", "path": models_dir / "intent_classifier.tflite",
                 "version": 1}],
        extra={"trust_root": str(write_root(tmp_path / "root.json")),
               "ota": {"chunk_idle_s": 0.5, "health_inferences": 5, "health_timeout_s": 0.5}})
    release = ManualRelease(broker.host, broker.port, intent_release, 1024)
    release.answer = True
    agent = AgentProcess(config).start()
    try:
        collector.wait_for(topics.BIRTH)
        collector.wait_for(topics.PROFILE, timeout=60)
        assert command(collector, "ping", {}, timeout=60)["ok"]
        refused = command(collector, "self_destruct", {}, timeout=60)
        assert refused["error_code"] == "unknown_command"
        assert command(collector, "profile", {"min_runs": 5, "min_seconds": 0,
                                              "max_seconds": 2}, timeout=60)["ok"]
        release.publish_manifest()
        assert command(collector, "ota_install", {"release_id": release.rid,
                                                  "chunk_size": 1024}, timeout=60)["ok"]
        final = collector.wait_for(topics.OTA_STATUS, timeout=120, predicate=lambda m: json.loads(
            m.payload)["final"])[-1]
        assert json.loads(final.payload)["outcome"] == "installed", final.payload
        collector.wait_for(topics.TELEMETRY, count=3)
        agent.kill9()  # the broker publishes the Last Will
        collector.wait_for(topics.STATUS, predicate=lambda m: m.topic.endswith("/dev/gw-1/status")
                           and not json.loads(m.payload)["online"])
    finally:
        agent.stop()
        release.close()
    seen: dict[str, int] = {}
    for message in collector.messages:
        if not message.payload:
            continue  # a cleared retained message
        kind = TOPIC_KINDS[topics.parse_device_topic(message.topic).kind]
        document = json.loads(message.payload)
        assert_valid(kind, document)
        parse(kind, document)
        seen[kind] = seen.get(kind, 0) + 1
    assert set(seen) >= {"status", "birth", "telemetry", "profile", "command",
                         "command_response", "ota_status", "chunk_request"}, seen
    phases = {json.loads(m.payload)["phase"] for m in collector.on_topic(topics.OTA_STATUS)}
    assert phases >= {"downloading", "smoke_testing", "switching", "health_check", "done"}


# -- invalid documents: refused by the schema and by the parser ----------------------------------

Edit = Callable[[Any], None]


def put(path: str, value: Any) -> Edit:
    """Set ``a.b.0.c`` to ``value``."""
    *parents, last = path.split(".")

    def edit(document: Any) -> None:
        target = document
        for key in parents:
            target = target[int(key)] if isinstance(target, list) else target[key]
        if isinstance(target, list):
            target[int(last)] = value
        else:
            target[last] = value
    return edit


def drop(path: str) -> Edit:
    *parents, last = path.split(".")

    def edit(document: Any) -> None:
        target = document
        for key in parents:
            target = target[int(key)] if isinstance(target, list) else target[key]
        del target[last]
    return edit


LONG_ID = "x" * 65
INVALID: list[tuple[str, str, Edit]] = [
    ("status", "missing online", drop("online")),
    ("status", "session is a string", put("session", "1")),
    ("status", "ts before 1970", put("ts", -1)),
    ("status", "device_id over 64", put("device_id", LONG_ID)),
    ("birth", "a tag that is not a string", put("tags", {"site": 1})),
    ("birth", "missing device_class", drop("device_class")),
    ("telemetry", "negative seq", put("seq", -1)),
    ("telemetry", "system is a list", put("system", [])),
    ("event", "missing message", drop("message")),
    ("event", "kind over 64", put("kind", LONG_ID)),
    ("command", "empty id", put("id", "")),
    ("command", "args is a list", put("args", [])),
    ("command", "wrong version", put("schema", "fleetlite.command/2")),
    ("command_response", "ok is a string", put("ok", "yes")),
    ("command_response", "error_code over 64", put("error_code", LONG_ID)),
    ("command_response", "ts beyond year 9999", put("ts", 1e12)),
    ("command_response", "ok with an error_code", put("ok", True)),
    ("command_response", "failed without an error_code", drop("error_code")),
    ("ota_status", "unknown phase", put("phase", "exploding")),
    ("ota_status", "unknown outcome", put("outcome", "maybe")),
    ("ota_status", "negative version", put("version", -1)),
    ("ota_status", "version beyond 64 bits", put("version", 2**63)),
    ("chunk_request", "chunk size below 1024", put("chunk_size", 512)),
    ("chunk_request", "ts before 1970", put("ts", -1)),
    ("chunk_request", "ts beyond year 9999", put("ts", 1e12)),
    ("chunk_request", "upper-case release id", put("release_id", "AB" * 32)),
    ("chunk_request", "done with chunks missing", put("done", True)),
    ("chunk_request", "a range of two numbers", put("missing", [[0, 1]])),
    ("chunk_request", "65 ranges", put("missing", [[0, i, i + 1] for i in range(65)])),
    ("chunk_request", "device id '..'", put("device_id", "..")),
    ("chunk_request", "a release id with a final newline", put("release_id", "ab" * 32 + "\n")),
    ("shadow_report", "unknown kind", put("kind", "detector")),
    ("shadow_report", "negative samples", put("samples", -1)),
    ("shadow_report", "sample rate 0", put("sample_rate", 0)),
    ("shadow_report", "cpu budget above 1", put("cpu_budget", 1.5)),
    ("shadow_report", "budget ratio below 1", put("p95_budget_ratio", 0.5)),
    ("shadow_report", "a negative latency", put("candidate_p95_ms", -1.0)),
    ("shadow_report", "a text latency", put("active_alone_p50_ms", "fast")),
    ("shadow_report", "missing agreed", drop("agreed")),
    ("profile", "empty trigger", put("trigger", "")),
    ("profile", "unknown quantization", put("model.quantization", "int4")),
    ("profile", "unknown timing", put("run.timing", "wall")),
    ("profile", "missing memory", drop("memory")),
    ("profile", "negative latency", put("timings.steady.min_ms", -1.0)),
    ("profile", "unknown schema version", put("schema", "fleetlite.profile/3")),
    ("manifest", "an unknown field", put("extra", 1)),
    ("manifest", "a path as file name", put("files.0.name", "../x")),
    ("manifest", "no files", put("files", [])),
    ("manifest", "65 device classes", put("targets.device_classes",
                                                   [f"c{i}" for i in range(65)])),
    ("manifest", "an unknown dtype", put("model.inputs.0.dtype", "int4")),
    ("manifest", "a tolerance field too many", put("smoke.tolerance.extra", 1)),
    ("manifest", "upper-case name", put("name", "Intent")),
    ("manifest", "a name with a final newline", put("name", "intent\n")),
    ("manifest", "version 0", put("version", 0)),
    ("manifest", "a short sha256", put("files.0.sha256", "ab" * 31)),
    ("root", "an unknown field", put("extra", 1)),
    ("root", "threshold 0", put("roles.root.threshold", 0)),
    ("root", "a third role", put("roles.admin", {"keyids": [], "threshold": 1})),
    ("root", "no keys", put("keys", {})),
    ("root", "an upper-case public key",
     lambda d: [key.update(public=key["public"].upper()) for key in d["keys"].values()]),
    ("root", "a public key with spaces",
     lambda d: [key.update(public=key["public"][:62] + " " + key["public"][62:])
                for key in d["keys"].values()]),
    ("envelope", "an unknown field", put("extra", 1)),
    ("envelope", "a signature without sig", drop("signatures.0.sig")),
    ("envelope", "payload not base64", put("payload", "***")),
    ("envelope", "a signature with non-zero padding bits",
     # a 64-byte signature ends "x==", x one of AQgw; "B" differs in the unused bits only
     lambda d: d["signatures"][0].update(sig=d["signatures"][0]["sig"][:-3] + "B==")),
    ("envelope", "a signature without padding",
     lambda d: d["signatures"][0].update(sig=d["signatures"][0]["sig"].rstrip("="))),
    ("envelope", "33 signatures", lambda d: d["signatures"].extend(d["signatures"] * 32)),
    ("smoke", "an unknown field", put("extra", 1)),
    ("smoke", "an unknown dtype", put("cases.0.inputs.0.dtype", "int4")),
    ("smoke", "no cases", put("cases", [])),
    ("smoke", "data not base64", put("cases.0.outputs.0.data", "***")),
    ("lm_smoke", "agreement above 1", put("min_token_agreement", 1.5)),
    ("lm_smoke", "no prompt ids", put("cases.0.prompt_ids", [])),
    ("lm_smoke", "an id beyond 2**22", put("cases.0.expected_ids.0", 2**22)),
    ("lm_smoke", "an unknown field", put("cases.0.extra", 1)),
]
LM_INVALID: list[tuple[str, Edit]] = [
    ("bos_id null", put("generation.bos_id", None)),
    ("top_p 0", put("generation.sampling.top_p", 0)),
    ("a sampling field too many", put("generation.sampling.seed", 1)),
    ("a template without {prompt}", put("generation.prompt_template", "no placeholder")),
    ("{prompt} twice", put("generation.prompt_template", "{prompt} {prompt}")),
    ("a variant named default", put("variants.0.name", "default")),
    ("an unknown tokenizer kind", put("generation.tokenizer_kind", "bpe")),
    ("a stop id twice", put("generation.stop_ids", [1, 1])),
    ("17 prefill lengths", put("generation.prefill_lengths", list(range(1, 18)))),
]


@pytest.fixture(scope="module")
def valid_documents(intent_release: ReleaseBundle, lm_release: ReleaseBundle,
                    tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    documents: dict[str, Any] = {kind: json.loads(message.to_json())
                                 for kind, message in sdk_messages()}
    documents["chunk_request"] = json.loads(sdk_messages()[-2][1].to_json())
    documents.update(release_documents(intent_release))
    documents["lm_smoke"] = dict(release_documents(lm_release))["lm_smoke"]
    documents["lm_manifest"] = json.loads(lm_release.envelope.payload)
    root = json.loads(write_root(tmp_path_factory.mktemp("root") / "root.json").read_bytes())
    documents["root"] = json.loads(base64.b64decode(root["payload"]))
    from fleetlite.agent.profiler import profile_model

    documents["profile"] = json.loads(profile_model(
        REPO / "tests" / "fixtures" / "models" / "intent_classifier.tflite", min_runs=3,
        min_seconds=0, max_seconds=1).to_json())
    return documents


def test_every_kind_has_invalid_examples() -> None:
    assert {kind for kind, _, _ in INVALID} == set(json_schemas.KINDS)


@pytest.mark.parametrize(("kind", "what", "edit"), INVALID, ids=[f"{k}: {w}" for k, w, _ in
                                                                 INVALID])
def test_an_invalid_document_is_refused_by_schema_and_parser(
    valid_documents: dict[str, Any], kind: str, what: str, edit: Edit,
) -> None:
    document = copy.deepcopy(valid_documents[kind])
    assert_valid(kind, document)
    parse(kind, document)
    edit(document)
    assert schema_errors(kind, document), f"the {kind} schema accepts {what}"
    with pytest.raises((messages.MessageError, FleetLiteError)):
        parse(kind, document)


@pytest.mark.parametrize(("what", "edit"), LM_INVALID, ids=[w for w, _ in LM_INVALID])
def test_an_invalid_lm_manifest_is_refused_by_schema_and_parser(
    valid_documents: dict[str, Any], what: str, edit: Edit,
) -> None:
    document = copy.deepcopy(valid_documents["lm_manifest"])
    assert_valid("manifest", document)
    parse("manifest", document)
    edit(document)
    assert schema_errors("manifest", document), f"the manifest schema accepts {what}"
    with pytest.raises(FleetLiteError):
        parse("manifest", document)


@pytest.mark.parametrize("kind", sorted(MESSAGE_CLASSES))
def test_messages_accept_unknown_fields_like_their_parsers(
    valid_documents: dict[str, Any], kind: str,
) -> None:
    document = {**valid_documents[kind], "added_by_a_newer_peer": {"x": [1]}}
    assert_valid(kind, document)
    parse(kind, document)


def test_smoke_parsers_refuse_what_their_schemas_refuse(valid_documents: dict[str, Any]) -> None:
    """Found by the sweep below: each raised another error than MalformedError, or accepted."""
    from fleetlite.sdk.errors import MalformedError

    for data in (b"not json", b'{"cases":1,"cases":2}', b"\xff"):
        with pytest.raises(MalformedError):
            LmSmokeVectors.from_json(data)
    huge_logit = copy.deepcopy(valid_documents["lm_smoke"])
    huge_logit["cases"][0]["first_top_logits"][0] = 10**400
    with pytest.raises(MalformedError):
        LmSmokeVectors.from_json(canonical_json(huge_logit))
    for kind in ("smoke", "lm_smoke"):
        for version in (True, 1.0):
            document = {**valid_documents[kind], "spec_version": version}
            with pytest.raises(MalformedError):
                parse(kind, document)


# -- schema and parser agree on every single mutation of a valid document ------------------------


def _depth(value: Any) -> int:
    if isinstance(value, (dict, list)):
        children = value.values() if isinstance(value, dict) else value
        return 1 + max((_depth(child) for child in children), default=0)
    return 0


def _integral_float(value: Any) -> bool:
    if isinstance(value, float):
        return value == int(value)
    children = (value.values() if isinstance(value, dict)
                else value if isinstance(value, list) else ())
    return any(_integral_float(child) for child in children)


def _accepted(kind: str, document: Any) -> bool:
    try:
        parse(kind, document)
    except (messages.MessageError, FleetLiteError):
        return False
    return True


#: where a valid document's single mutation may pass its schema yet fail its parser: the rules
#: between fields that JSON Schema cannot state (keys as single_mutations labels them)
CROSS_FIELD = {
    "chunk_request": r"[12]",  # first_chunk < end_chunk_exclusive
    "manifest": r"'(issued|expires|name|file)'",  # expires > issued; files named by variants
    "lm_manifest": r"'generation'",  # a tokenizer file needs generation
    "root": r"'(threshold|keyids|[0-9a-f]{64})'",  # threshold <= key ids, all listed in keys
    "smoke": r"'data'|'shape'|[01]",  # data holds the shape's elements (at most 2**22)
    # agreed <= compared, samples <= requests, since <= ts, p50 <= p95, error bound by kind
    "shadow_report": r"'(agreed|compared|samples|requests|since|ts|kind|error_bound|"
                     r"\w+_p(50|95)_ms)'",
}


@pytest.mark.slow
@pytest.mark.parametrize("kind", [*json_schemas.KINDS, "lm_manifest"])
def test_schema_and_parser_agree_on_every_single_mutation(
    valid_documents: dict[str, Any], kind: str,
) -> None:
    from fleetlite.sdk.envelope import strict_json_loads
    from tests.fuzz_settings import encode, single_mutations

    schema_kind = "manifest" if kind == "lm_manifest" else kind
    disagree = []
    for label, mutated in single_mutations(valid_documents[kind], deep=40):
        text = encode(mutated)
        try:
            document = strict_json_loads(text)
        except (UnicodeError, ValueError, RecursionError):
            continue  # not JSON a schema could see (NaN, 1e400, a duplicate key, ...)
        if _depth(document) > messages.MAX_DEPTH or _integral_float(document):
            continue  # what a schema cannot say (docs/protocol.md, "JSON Schemas")
        if len(text) > 256 * 1024 or "\\ud800" in text.decode("ascii", "replace"):
            continue  # the smaller caps are the parsers'; a lone surrogate is no Unicode text
        valid = not schema_errors(schema_kind, document)
        if valid == _accepted(schema_kind, document):
            continue
        key = label.split("=", 1)[0]
        if not (valid and re.fullmatch(CROSS_FIELD.get(kind, "(?!)"), key)):
            disagree.append(f"{label}: schema {'accepts' if valid else 'refuses'}")
    assert not disagree, f"{len(disagree)} disagreements:\n" + "\n".join(disagree[:40])
