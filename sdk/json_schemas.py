"""JSON Schemas (draft 2020-12) of every FleetLite message and signed document, built from the
constants the parsers use, so a team in any language can validate with its usual tools.

:func:`all_schemas` returns ``{kind: schema}``; ``python -m fleetlite.tools.gen_schemas`` writes
them to ``sdk/schemas/<kind>.schema.json`` (package data) and ``docs/schemas/``, and
``tests/test_schemas.py`` checks that the committed files are exactly what this module builds.

Unknown fields: the MQTT messages ignore them (a newer peer may add fields), so their schemas
say ``additionalProperties: true``; the signed documents (manifest, root, envelope, smoke
vectors) refuse them, as their parsers do, so theirs say ``false``.

What JSON Schema cannot say is left to the parsers and named in the descriptions: byte caps of a
whole payload, duplicate JSON keys, cross-field rules (``expires`` > ``issued``, file references,
``min <= p50 <= ... <= max``). JSON Schema also counts ``1.0`` as an integer; the Python parsers
do not.
"""

from __future__ import annotations

from typing import Any

from fleetlite.sdk import (
    chunks,
    envelope,
    generation,
    lm_smoke,
    manifest,
    messages,
    profile,
    shadow,
    smoke,
    trust,
)
from fleetlite.sdk.lm_signature import CACHE_LAYOUTS
from fleetlite.sdk.ota_messages import ChunkRequest

__all__ = ["DIALECT", "ID_PREFIX", "KINDS", "all_schemas", "schema_for"]

DIALECT = "https://json-schema.org/draft/2020-12/schema"
ID_PREFIX = "urn:fleetlite:schema:"
Schema = dict[str, Any]

_MAX_DOUBLE = 1.7976931348623157e308
_HEX64 = "^[0-9a-f]{64}$"
# Standard base64 with padding (what Python's b64decode(validate=True) takes).
_B64 = "^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"
# An envelope's base64 is also canonical: the unused bits of its last character are zero.
_B64_CANONICAL = ("^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/][AQgw]==|[A-Za-z0-9+/]{2}"
                  "[AEIMQUYcgkosw048]=)?$")
_B64_URLSAFE = ("^(?:[A-Za-z0-9_-]{4})*(?:[A-Za-z0-9_-][AQgw]==|[A-Za-z0-9_-]{2}"
                "[AEIMQUYcgkosw048]=)?$")


# -- building blocks -----------------------------------------------------------------------------


def _string(max_len: int | None = None, min_len: int = 0, **extra: Any) -> Schema:
    out: Schema = {"type": "string"}
    if min_len:
        out["minLength"] = min_len
    if max_len is not None:
        out["maxLength"] = max_len
    return {**out, **extra}


def _int(minimum: int | None = messages.MIN_INT, maximum: int | None = messages.MAX_INT,
         **extra: Any) -> Schema:
    out: Schema = {"type": "integer"}
    if minimum is not None:
        out["minimum"] = minimum
    if maximum is not None:
        out["maximum"] = maximum
    return {**out, **extra}


def _number(minimum: float = -_MAX_DOUBLE, maximum: float = _MAX_DOUBLE, **extra: Any) -> Schema:
    return {"type": "number", "minimum": minimum, "maximum": maximum, **extra}


def _obj(required: dict[str, Schema], optional: dict[str, Schema] | None = None, *,
         strict: bool, description: str = "", keywords: Schema | None = None) -> Schema:
    out: Schema = {"type": "object"}
    if description:
        out["description"] = description
    out["properties"] = {**required, **(optional or {})}
    out["required"] = sorted(required)
    out["additionalProperties"] = not strict
    return {**out, **(keywords or {})}


def _array(items: Schema, max_items: int | None = None, min_items: int = 0,
           **extra: Any) -> Schema:
    out: Schema = {"type": "array", "items": items}
    if min_items:
        out["minItems"] = min_items
    if max_items is not None:
        out["maxItems"] = max_items
    return {**out, **extra}


def _document(kind: str, title: str, description: str, body: Schema,
              defs: dict[str, Schema] | None = None) -> Schema:
    out: Schema = {"$schema": DIALECT, "$id": f"{ID_PREFIX}{kind}", "title": title,
                   "description": description, **body}
    if defs:
        out["$defs"] = defs
    return out


def _ref(name: str) -> Schema:
    return {"$ref": f"#/$defs/{name}"}


_ID = _string(messages.MAX_ID_LENGTH)
_TEXT = _string(messages.MAX_TEXT_LENGTH)
_TS = _number(0, messages.MAX_TS, description="Unix seconds, 1970 to the end of year 9999")
_OBJECT: Schema = {"type": "object"}
_NON_NEGATIVE = _number(0)
_DEVICE_ID = _string(messages.MAX_ID_LENGTH, description=(
    "the sender; on a report it must be the device id of the topic "
    "(1-64 characters of [A-Za-z0-9._-], not '.' or '..')"))


def _message(kind: str, cls: type[messages.Message], title: str, required: dict[str, Schema],
             optional: dict[str, Schema] | None = None, keywords: Schema | None = None
             ) -> Schema:
    body = _obj({"schema": {"const": cls.SCHEMA}, **required}, optional, strict=False,
                keywords=keywords)
    doc = (cls.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")
    description = (f"{cls.SCHEMA}: {doc} At most {cls.MAX_BYTES} bytes of UTF-8 JSON, nested at "
                   f"most {messages.MAX_DEPTH} levels; unknown fields are ignored.")
    return _document(kind, f"{title} ({cls.SCHEMA})", description, body)


# -- MQTT messages -------------------------------------------------------------------------------


def _status() -> Schema:
    return _message("status", messages.Status, "Status", {
        "device_id": _DEVICE_ID, "online": {"type": "boolean"}, "session": _int(0), "ts": _TS,
    }, {"reason": _TEXT, "conn": _int(0)})


def _birth() -> Schema:
    return _message("birth", messages.Birth, "Birth", {
        "device_id": _DEVICE_ID, "session": _int(0), "ts": _TS, "device_class": _ID,
        "agent_version": _ID,
    }, {"tags": {"type": "object", "additionalProperties": {"type": "string"}},
        "facts": _OBJECT, "models": {"type": "array"}})


def _telemetry() -> Schema:
    return _message("telemetry", messages.Telemetry, "Telemetry", {
        "device_id": _DEVICE_ID, "session": _int(0), "seq": _int(0), "ts": _TS,
        "system": _OBJECT, "models": _OBJECT,
    }, {"spool": _OBJECT})


def _event() -> Schema:
    return _message("event", messages.Event, "Event", {
        "device_id": _DEVICE_ID, "ts": _TS, "kind": _ID, "message": _TEXT,
    }, {"detail": _OBJECT})


def _command() -> Schema:
    return _message("command", messages.Command, "Command", {
        "id": _string(messages.MAX_ID_LENGTH, 1, description="correlation id, echoed in the "
                      "response"),
        "command": _ID,
    }, {"args": {"type": "object", "description": "the command's arguments; each command "
                 "checks its own (error code bad_args)"}})


def _command_response() -> Schema:
    return _message("command_response", messages.CommandResponse, "CommandResponse", {
        "id": _string(messages.MAX_ID_LENGTH, description="the command's id ('' when it could "
                      "not be read)"),
        "device_id": _DEVICE_ID, "ok": {"type": "boolean"}, "ts": _TS,
    }, {"result": _OBJECT,
        "error_code": _string(messages.MAX_ID_LENGTH, description="a reason code, e.g. "
                              "oversize, malformed, wrong_schema, missing_field, bad_type, "
                              "bad_value, unknown_command, bad_args, failed, internal"),
        "error": _TEXT}, keywords={
        "if": {"properties": {"ok": {"const": True}}, "required": ["ok"]},
        "then": {"properties": {"error_code": {"const": ""}}},
        "else": {"properties": {"error_code": {"minLength": 1}}, "required": ["error_code"]},
    })


def _ota_status() -> Schema:
    return _message("ota_status", messages.OtaStatus, "OtaStatus", {
        "device_id": _DEVICE_ID, "ts": _TS, "release_id": _ID, "model": _ID,
        "version": _int(0), "phase": {"enum": list(messages.OTA_PHASES)},
        "final": {"type": "boolean"},
    }, {"outcome": {"enum": ["", *messages.OTA_OUTCOMES],
                    "description": "set on the final message only"},
        "reason": _string(messages.MAX_ID_LENGTH, description="final only: a reason code "
                          "(docs/protocol.md), empty when installed"),
        "message": _TEXT, "progress": _OBJECT})


def _chunk_request() -> Schema:
    index = _int(0, chunks.MAX_FILES - 1, description="file_index")
    limit = 2**32
    ranges = _array({"type": "array", "prefixItems": [
        index, _int(0, limit - 1, description="first_chunk"),
        _int(1, limit, description="end_chunk_exclusive (> first_chunk)"),
    ], "items": False, "minItems": 3}, chunks.MAX_REQUEST_RANGES, description=(
        f"[file_index, first_chunk, end_chunk_exclusive] ranges, at most "
        f"{chunks.MAX_REQUEST_CHUNKS} chunks in all"))
    return _message("chunk_request", ChunkRequest, "ChunkRequest", {
        "device_id": {**_string(None, pattern="^[A-Za-z0-9._-]{1,64}$"),
                      "not": {"enum": [".", ".."]}},
        "release_id": _string(pattern=_HEX64),
        "chunk_size": _int(chunks.MIN_CHUNK_SIZE, chunks.MAX_CHUNK_SIZE),
        "ts": _TS,
        "missing": ranges,
        "done": {"type": "boolean"},
    }, keywords={"if": {"properties": {"done": {"const": True}}, "required": ["done"]},
                 "then": {"properties": {"missing": {"maxItems": 0}}}})


def _shadow_report() -> Schema:
    count = _int(0)
    nullable_ms = {"type": ["number", "null"], "minimum": 0, "maximum": _MAX_DOUBLE}
    fraction = _number(0, 1, exclusiveMinimum=0)
    return _message("shadow_report", shadow.ShadowReport, "ShadowReport", {
        "device_id": _DEVICE_ID, "ts": _TS, "since": _TS, "release_id": _ID, "model": _ID,
        "version": count, "active_version": count, "kind": {"enum": list(shadow.KINDS)},
        "requests": count, "samples": _int(0, description="<= requests"),
        "compared": count, "agreed": _int(0, description="<= compared"),
        "sample_rate": fraction, "cpu_budget": fraction, "p95_budget_ratio": _number(1, 1000),
    }, {
        **{key: count for key in ("skipped_budget", "dropped_queue_full", "skipped_other",
                                  "candidate_errors", "backoffs", "active_alone_count",
                                  "active_shadowed_count", "candidate_count")},
        "error_bound": {**nullable_ms, "description": "a regressor's absolute error bound; "
                        "required for kind regressor, null or absent otherwise"},
        "max_abs_error": nullable_ms, "mean_abs_error": nullable_ms,
        **{f"{prefix}_{q}_ms": nullable_ms for prefix in ("active_alone", "active_shadowed",
                                                          "candidate") for q in ("p50", "p95")},
    })


# -- the profile record --------------------------------------------------------------------------


def _profile_defs() -> dict[str, Schema]:
    latency = {k: _NON_NEGATIVE for k in ("mean_ms", "std_ms", "min_ms", "p50_ms", "p90_ms",
                                          "p95_ms", "p99_ms", "max_ms")}
    repeat = {k: _NON_NEGATIVE for k in ("mean", "sd", "min", "max")}
    tensor = _obj({"name": _string(256), "dtype": _ID, "shape": _array({"type": "integer"})},
                  strict=False)
    optional_count = {"oneOf": [{"type": "null"}, _int(0)]}
    return {
        "latency": _obj({"count": _int(1), **latency}, strict=False, description=(
            "latency statistics in ms; min <= p50 <= p90 <= p95 <= p99 <= max and "
            "min <= mean <= max")),
        "repeat": _obj({"count": _int(1), **repeat}, strict=False,
                       description="one figure over repeated runs; min <= mean <= max"),
        "model": _obj({
            "name": _string(256), "sha256": _string(pattern=_HEX64), "size_bytes": _int(0),
            "quantization": {"enum": list(profile.QUANTIZATIONS)},
            "inputs": _array(tensor), "outputs": _array(tensor),
        }, {"version": optional_count, "node_count": optional_count,
            "op_counts": {"type": "object", "additionalProperties": {"type": "integer",
                                                                      "minimum": 0}}},
            strict=False),
        "run": _obj({
            "threads": _int(1, 2**31 - 1), "backend": _ID, "backend_version": _ID,
            "delegate": _ID, "resolver": _ID, "timing": {"enum": list(profile.TIMINGS)},
            "inputs": _ID, "warmup_runs": _int(0), "warmup_min_seconds": _NON_NEGATIVE,
            "min_runs": _int(0), "max_runs": _int(1), "min_seconds": _NON_NEGATIVE,
            "max_seconds": _NON_NEGATIVE, "isolated": {"type": "boolean"},
        }, {"delegate_partitions": _int(0), "seed": _int()}, strict=False),
        "timings": _obj({
            "init_ms": _NON_NEGATIVE, "first_inference_ms": _NON_NEGATIVE,
            "warmup_count": _int(1), "warmup_mean_ms": _NON_NEGATIVE,
            "steady": _ref("latency"), "steady_seconds": _NON_NEGATIVE,
        }, strict=False),
        "memory": _obj({
            "rss_before_load_mb": _NON_NEGATIVE, "peak_rss_load_mb": _NON_NEGATIVE,
            "rss_after_load_mb": _NON_NEGATIVE, "peak_rss_inference_mb": _NON_NEGATIVE,
            "method": _ID, "load_sample_interval_ms": _NON_NEGATIVE,
            "inference_sample_interval_ms": _NON_NEGATIVE,
        }, strict=False),
        "lm": _obj({
            "workload": {"enum": list(profile.LM_WORKLOADS)}, "seed": _int(),
            "repetitions": _int(1), "warmup_runs": _int(0), "num_layers": _int(1),
            "cache_layout": {"enum": list(CACHE_LAYOUTS)},
            "context_length": _int(1), "vocab_size": _int(1),
            "prefill_lengths": _array(_int(1, 2**31 - 1), profile.MAX_LM_FIGURES),
            "load_ms": _NON_NEGATIVE,
            "ttft": _obj({"prompt_tokens": _int(1), "cold_ms": _NON_NEGATIVE,
                          "warm_ms": _ref("repeat")}, strict=False),
        }, {
            "prefill": _array(_obj({"tokens": _int(1), "ms": _ref("repeat"),
                                    "tokens_per_s": _ref("repeat")}, strict=False),
                              profile.MAX_LM_FIGURES),
            "decode": _array(_obj({"depth": _int(0), "tokens": _int(1),
                                   "tokens_per_s": _ref("repeat"),
                                   "ms_per_token": _ref("latency")}, strict=False),
                             profile.MAX_LM_FIGURES),
            "memory_estimate_mb": {"oneOf": [{"type": "null"}, _NON_NEGATIVE]},
        }, strict=False, description="a generative language model's figures (profile/2)"),
    }


def _profile() -> Schema:
    body = _obj({
        "schema": {"enum": list(profile.SCHEMAS)},
        "device_id": _string(messages.MAX_ID_LENGTH, description="the device; '' for a profile "
                             "taken outside the agent"),
        "ts": _TS, "trigger": _string(messages.MAX_ID_LENGTH, 1, description=(
            f"why it was taken: {', '.join(profile.TRIGGERS)} (other identifiers accepted)")),
        "model": _ref("model"), "run": _ref("run"), "timings": _ref("timings"),
        "memory": _ref("memory"),
    }, {"device": _OBJECT, "lm": {"description": "read in profile/2 records only (a profile/1 "
                                  "reader ignores it)"}},
        strict=False,
        keywords={"if": {"properties": {"schema": {"const": profile.SCHEMA_V2}}},
                  "then": {"properties": {"lm": {"oneOf": [{"type": "null"}, _ref("lm")]}}}})
    description = (f"{profile.SCHEMA} and {profile.SCHEMA_V2} (with the 'lm' section of a "
                   f"generative language model): one model profiled on one device. At most "
                   f"{messages.MAX_REPORT_BYTES} bytes; unknown fields are ignored.")
    return _document("profile", "ProfileRecord", description, body, _profile_defs())


# -- signed documents ----------------------------------------------------------------------------


def _file_name() -> Schema:
    name = _string(manifest.MAX_FILE_NAME_LENGTH, 1, pattern="^[A-Za-z0-9_][A-Za-z0-9._+-]*$",
                   description="a plain file name: no separators, no leading '.', no '..', not "
                   "manifest.json (else unsafe_name)")
    return {**name, "not": {"anyOf": [{"pattern": "\\.\\."},
                                      {"enum": sorted(manifest.RESERVED_NAMES)}]}}


def _manifest_defs() -> dict[str, Schema]:
    max_tensors, max_rank = manifest._MAX_TENSORS, manifest._MAX_RANK
    max_params = manifest._MAX_QUANT_PARAMS
    quantization = _obj({"scale": _number(0), "zero_point": _int(None, None)}, {
        "scales": _array(_number(0), max_params),
        "zero_points": _array(_int(None, None), max_params),
        "quantized_dimension": _int(0, None),
    }, strict=True, description="per-tensor scale and zero point; scales and zero_points (per "
        "channel) have the same length")
    tensor = _obj({
        "name": _string(manifest._MAX_TEXT, 1),
        "shape": _array(_int(0, None), max_rank),
        "dtype": {"enum": list(manifest.DTYPES)},
    }, {"shape_signature": _array(_int(-1, None), max_rank), "quantization": quantization},
        strict=True)
    vocab = generation.MAX_VOCAB_SIZE
    placeholder = generation.PROMPT_PLACEHOLDER.replace("{", "\\{").replace("}", "\\}")
    not_placeholder = f"(?:(?!{placeholder})[\\s\\S])*"
    return {
        "file_name": _file_name(),
        "tensor": tensor,
        "model": _obj({
            "file": _ref("file_name"),
            "inputs": _array(_ref("tensor"), max_tensors, 1),
            "outputs": _array(_ref("tensor"), max_tensors, 1),
        }, strict=True, description="a variant's model file (role model) and its tensors"),
        "smoke": _obj({
            "file": _ref("file_name"),
            "tolerance": _obj({"atol": _number(0), "rtol": _number(0), "max_lsb": _int(0, None)},
                              strict=True),
        }, strict=True, description="a variant's smoke vectors file (role smoke)"),
        "generation": _obj({
            "tokenizer": _ref("file_name"),
            "tokenizer_kind": {"enum": list(generation.TOKENIZER_KINDS)},
            "prompt_template": _string(generation.MAX_PROMPT_TEMPLATE,
                                       pattern=f"^{not_placeholder}{placeholder}"
                                       f"{not_placeholder}$",
                                       description="holds {prompt} exactly once"),
            "stop_ids": _array(_int(0, vocab), generation.MAX_STOP_IDS, 1, uniqueItems=True),
            "context_length": _int(1, generation.MAX_CONTEXT_LENGTH),
            "cache_layout": {"enum": list(CACHE_LAYOUTS)},
            "num_layers": _int(1, generation.MAX_LAYERS),
            "vocab_size": _int(1, vocab),
            "prefill_lengths": _array(_int(1, generation.MAX_CONTEXT_LENGTH),
                                      generation.MAX_PREFILL_LENGTHS, 1, uniqueItems=True,
                                      description="strictly ascending, each <= context_length"),
            "sampling": _obj({
                "temperature": _number(0, generation.MAX_TEMPERATURE),
                "top_k": _int(0, vocab),
                "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
                "max_tokens": _int(1, generation.MAX_MAX_TOKENS),
            }, strict=True),
        }, {
            "bos_id": _int(0, vocab),
            "stop_strings": _array(_string(generation.MAX_STOP_STRING, 1),
                                   generation.MAX_STOP_STRINGS, uniqueItems=True),
        }, strict=True, description="present exactly when the release is a generative language "
            "model; generation.tokenizer names the release's one file of role tokenizer"),
    }


def _manifest() -> Schema:
    variant_name = {**_string(pattern="^[a-z0-9][a-z0-9_-]{0,31}$"),
                    "not": {"const": "default"}}
    body = _obj({
        "_type": {"const": manifest.MANIFEST_TYPE},
        "spec_version": {"const": manifest.SPEC_VERSION},
        "name": _string(pattern="^[a-z0-9][a-z0-9_-]{0,63}$"),
        "version": _int(1, None, description="anti-rollback counter"),
        "issued": _int(0, None, description="Unix seconds"),
        "expires": _int(0, None, description="Unix seconds, > issued"),
        "min_agent_version": _string(pattern="^[0-9]{1,6}(\\.[0-9]{1,6}){0,3}$"),
        "targets": _obj({"device_classes": _array(
            _string(pattern="^[a-z0-9]+(-[a-z0-9]+)*$"), manifest._MAX_DEVICE_CLASSES, 1)},
            strict=True),
        "files": _array(_obj({
            "name": _ref("file_name"), "sha256": _string(pattern=_HEX64),
            "length": _int(0, manifest.DEFAULT_MAX_FILE_BYTES),
            "role": {"enum": list(manifest.FILE_ROLES)},
        }, strict=True), manifest.DEFAULT_MAX_FILES, 1, description="distinct names; the caps "
            "are the default verify.Limits (oversize beyond them)"),
        "model": _ref("model"),
        "smoke": _ref("smoke"),
    }, {
        "variants": _array(_obj({"name": variant_name, "model": _ref("model"),
                                 "smoke": _ref("smoke")}, strict=True), manifest._MAX_VARIANTS),
        "generation": _ref("generation"),
        "deltas": _array(_obj({"file": _ref("file_name"), "base_sha256": _string(pattern=_HEX64),
                               "delta": _ref("file_name")}, strict=True), manifest.MAX_DELTAS,
                         description="delta updates: each delta (a listed file of role delta, "
                         "named by exactly one entry) rebuilds the listed file 'file' from a "
                         "base with sha256 base_sha256"),
    }, strict=True)
    description = ("fleetlite.manifest spec_version 1: the payload of a release's signed "
                   "envelope, compact key-sorted JSON of at most "
                   f"{256 * 1024} bytes without duplicate keys. Unknown fields are refused. Every "
                   "variant's model.file and smoke.file must be listed files of roles model and "
                   "smoke (each model file used once).")
    return _document("manifest", "Release manifest", description, body, _manifest_defs())


def _root() -> Schema:
    role = _obj({"keyids": _array(_string(pattern=_HEX64), None, uniqueItems=True,
                                  description="key ids listed in keys"),
                 "threshold": _int(1, None, description="<= the number of keyids")},
                strict=True)
    body = _obj({
        "_type": {"const": trust.ROOT_TYPE},
        "spec_version": {"const": trust.SPEC_VERSION},
        "version": _int(1, None),
        "expires": _int(0, None, description="Unix seconds"),
        "keys": {"type": "object", "minProperties": 1, "maxProperties": trust._MAX_KEYS,
                 "propertyNames": {"pattern": _HEX64},
                 "additionalProperties": _obj({
                     "keytype": {"const": "ed25519"},
                     "public": _string(pattern=_HEX64, description="the raw 32-byte "
                                       "Ed25519 key, 64 lowercase hex digits"),
                 }, strict=True),
                 "description": "key id (the sha256 of the raw public key, hex) -> key"},
        "roles": _obj({name: role for name in trust.ROLE_NAMES}, strict=True),
    }, strict=True)
    description = ("fleetlite.root spec_version 1: the payload of root.json's signed envelope, "
                   f"at most {trust.MAX_ROOT_BYTES} bytes. Unknown fields are refused.")
    return _document("root", "Root metadata", description, body)


def _envelope() -> Schema:
    base64 = {"type": "string", "anyOf": [{"pattern": _B64_CANONICAL},
                                          {"pattern": _B64_URLSAFE}],
              "description": "base64, standard or URL-safe alphabet (not mixed), padded, "
                             "canonical (zero padding bits), no whitespace"}
    body = _obj({
        "payloadType": _string(envelope._MAX_TYPE_LENGTH, 1, description=(
            f"{envelope.MANIFEST_PAYLOAD_TYPE} or {envelope.ROOT_PAYLOAD_TYPE}")),
        "payload": {**base64, "maxLength": (trust.MAX_ROOT_BYTES + 2) // 3 * 4},
        "signatures": _array(_obj({
            "keyid": _string(envelope._MAX_KEYID_LENGTH, 1),
            "sig": {**base64, "maxLength": envelope._MAX_SIG_B64_LENGTH},
        }, strict=True), envelope.DEFAULT_MAX_SIGNATURES),
    }, strict=True)
    description = ("A DSSE v1 envelope (a release's manifest.json, a root.json). Signatures "
                   "cover PAE(payloadType, payload bytes). Caps: a release envelope 512 KiB with "
                   "a payload of at most 256 KiB, root.json 512000 bytes.")
    return _document("envelope", "Signed envelope", description, body)


def _smoke() -> Schema:
    tensor = _obj({
        "name": _string(None, 1), "dtype": {"enum": list(manifest.DTYPES)},
        "shape": _array(_int(0, None), 8),
        "data": _string(pattern=_B64, description="base64 of the raw little-endian C-order "
                        "bytes; exactly the shape's element count times the dtype's size"),
    }, strict=True)
    tensors = _array(tensor, 64, 1)
    body = _obj({
        "_type": {"const": smoke.SMOKE_TYPE},
        "spec_version": {"const": smoke.SPEC_VERSION},
        "cases": _array(_obj({"inputs": tensors, "outputs": tensors}, strict=True),
                        smoke.MAX_CASES, 1),
    }, strict=True)
    description = (f"fleetlite.smoke spec_version 1: a release's smoke vectors (role smoke), at "
                   f"most {smoke.MAX_SMOKE_BYTES} bytes. Unknown fields are refused.")
    return _document("smoke", "Smoke vectors", description, body)


def _lm_smoke() -> Schema:
    ids = _array(_int(0, (1 << 22) - 1), lm_smoke.MAX_IDS, 1)
    body = _obj({
        "_type": {"const": lm_smoke.LM_SMOKE_TYPE},
        "spec_version": {"const": lm_smoke.SPEC_VERSION},
        "min_token_agreement": _number(0, 1),
        "cases": _array(_obj({
            "prompt_ids": ids, "expected_ids": ids, "first_top_ids": ids,
            "first_top_logits": _array(_number(), lm_smoke.MAX_IDS, 1,
                                       description="one per first_top_ids entry"),
        }, strict=True), lm_smoke.MAX_CASES, 1),
    }, strict=True)
    description = (f"fleetlite.lm_smoke spec_version 1: a language model variant's smoke "
                   f"vectors, at most {lm_smoke.MAX_LM_SMOKE_BYTES} bytes. Unknown fields are "
                   "refused.")
    return _document("lm_smoke", "Language-model smoke vectors", description, body)


_BUILDERS = {
    "status": _status,
    "birth": _birth,
    "telemetry": _telemetry,
    "event": _event,
    "command": _command,
    "command_response": _command_response,
    "ota_status": _ota_status,
    "chunk_request": _chunk_request,
    "shadow_report": _shadow_report,
    "profile": _profile,
    "manifest": _manifest,
    "root": _root,
    "envelope": _envelope,
    "smoke": _smoke,
    "lm_smoke": _lm_smoke,
}
KINDS = tuple(_BUILDERS)


def schema_for(kind: str) -> Schema:
    """The schema of one kind (a key of :data:`KINDS`)."""
    return _BUILDERS[kind]()


def all_schemas() -> dict[str, Schema]:
    """Every schema, by kind."""
    return {kind: build() for kind, build in _BUILDERS.items()}
