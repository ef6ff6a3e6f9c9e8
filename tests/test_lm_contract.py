"""The generative-LM contract: signature shapes, generation metadata and the manifest's
``generation`` object. Hostile cases are tables, each with the reason code a device reports."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetlite.sdk.errors import LmFormatError, MalformedError, UnsafeNameError, UpdateRejected
from fleetlite.sdk.generation import GenerationSpec, Sampling, check_generation
from fleetlite.sdk.lm_signature import (
    AMBIGUOUS_LAYOUT,
    BAD_LM_SIGNATURE,
    CACHE_SHAPE_MISMATCH,
    IDS_OUT_OF_RANGE,
    LM_REASONS,
    MISSING_DECODE,
    MISSING_PREFILL,
    VOCAB_MISMATCH,
    LmLayout,
    TensorShape,
    inspect_lm,
    is_lm,
)
from fleetlite.sdk.manifest import (
    Manifest,
    ModelInfo,
    SmokeSpec,
    TensorInfo,
    file_entry,
    parse_manifest,
)

DOC = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"
LM_FIXTURES = Path(__file__).resolve().parent / "fixtures" / "lm"
Shapes = dict[str, tuple[dict[str, TensorShape], dict[str, TensorShape]]]


def lm_shapes(*, layers: int = 2, layout: str = "default", heads: int = 2, head_dim: int = 8,
              context: int = 32, vocab: int = 64, prefills: tuple[int, ...] = (8,),
              mask: bool = False) -> Shapes:
    """Signature shapes of a well-formed LM in the litert-torch convention."""
    if layout == "default":
        key = value = (1, context, heads, head_dim)
    else:
        key, value = (1, heads, context, head_dim), (1, heads, head_dim, context)
    caches = {f"kv_cache_{kv}_{i}": TensorShape(key if kv == "k" else value, "float32")
              for i in range(layers) for kv in "kv"}
    shapes: Shapes = {}
    for name, length in (("decode", 1), *((f"prefill_{n}", n) for n in prefills)):
        inputs = {"tokens": TensorShape((1, length), "int32"),
                  "input_pos": TensorShape((length,), "int32"), **caches}
        if mask:
            inputs["mask"] = TensorShape((1, 1, length, context), "float32")
        outputs = dict(caches)
        if name == "decode":
            outputs["logits"] = TensorShape((1, 1, vocab), "float32")
        shapes[name] = (inputs, outputs)
    return shapes


# --- inspect_lm accepts both layouts ------------------------------------------------------------


@pytest.mark.parametrize(("layout", "layers", "mask", "prefills"), [
    ("default", 1, False, (8,)),
    ("default", 2, True, (4, 16)),
    ("transposed", 3, True, (8,)),
    ("transposed", 4, False, (2, 8, 32)),
])
def test_inspect_lm_reads_the_layout(layout: str, layers: int, mask: bool,
                                     prefills: tuple[int, ...]) -> None:
    shapes = lm_shapes(layout=layout, layers=layers, mask=mask, prefills=prefills)
    expected = LmLayout(num_layers=layers, cache_layout=layout, num_heads=2, head_dim=8,
                        context_length=32, vocab_size=64, prefill_lengths=prefills,
                        has_mask=mask)
    assert inspect_lm(shapes) == expected
    assert inspect_lm(shapes, layout) == expected


def test_prefill_lengths_are_sorted_numerically() -> None:
    shapes = lm_shapes(prefills=(16, 4, 8))
    assert inspect_lm(dict(sorted(shapes.items()))).prefill_lengths == (4, 8, 16)


def test_a_stated_layout_settles_an_ambiguous_shape() -> None:
    # Transposed with T == head_dim: K = V = [1,2,8,8], which also reads as default [1,T,H,D].
    shapes = lm_shapes(layout="transposed", context=8, head_dim=8, prefills=(2,))
    assert inspect_lm(shapes, "transposed").context_length == 8
    assert inspect_lm(shapes, "transposed").num_heads == 2
    assert inspect_lm(shapes, "default").context_length == 2
    assert inspect_lm(shapes, "default").num_heads == 8


def test_is_lm() -> None:
    assert is_lm(["decode"])
    assert is_lm(["prefill_8"])
    assert is_lm({"serving_default", "decode", "prefill_128"})
    assert not is_lm(["serving_default"])
    assert not is_lm(["prefill", "prefill_x", "decoder", "prefill_0"])
    assert not is_lm([])


# --- inspect_lm refuses, with a reason -----------------------------------------------------------

Mutation = Callable[[Shapes], None]


def _unchanged(shapes: Shapes) -> None:
    del shapes


def _drop(signature: str) -> Mutation:
    def mutate(shapes: Shapes) -> None:
        del shapes[signature]
    return mutate


def _set(signature: str, side: int, tensor: str, shape: tuple[int, ...] | None,
         dtype: str = "float32") -> Mutation:
    """Replace (or with shape None, remove) one tensor of one signature."""
    def mutate(shapes: Shapes) -> None:
        tensors = shapes[signature][side]
        if shape is None:
            del tensors[tensor]
        else:
            tensors[tensor] = TensorShape(shape, dtype)
    return mutate


def _rename(old: str, new: str) -> Mutation:
    def mutate(shapes: Shapes) -> None:
        shapes[new] = shapes.pop(old)
    return mutate


def _all_caches(kind: str, shape: tuple[int, ...]) -> Mutation:
    """Give every ``kv_cache_<kind>_<i>`` of every signature (every cache: kind "") ``shape``."""
    def mutate(shapes: Shapes) -> None:
        for tensors in (t for signature in shapes.values() for t in signature):
            for name in tensors:
                if name.startswith(f"kv_cache_{kind}"):
                    tensors[name] = TensorShape(shape, "float32")
    return mutate


def _add_signature(name: str, copy_of: str = "") -> Mutation:
    def mutate(shapes: Shapes) -> None:
        shapes[name] = shapes[copy_of] if copy_of else ({}, {})
    return mutate


def _renumber_layer(signature: str) -> Mutation:
    def mutate(shapes: Shapes) -> None:
        for side in (0, 1):
            tensors = shapes[signature][side]
            for kv in "kv":
                tensors[f"kv_cache_{kv}_2"] = tensors.pop(f"kv_cache_{kv}_1")
    return mutate


IN, OUT = 0, 1
HOSTILE: list[tuple[str, Mutation, dict[str, Any], str]] = [
    ("no decode", _drop("decode"), {}, MISSING_DECODE),
    ("no prefill", _drop("prefill_8"), {}, MISSING_PREFILL),
    ("old single-prefill naming", _rename("prefill_8", "prefill"), {}, MISSING_PREFILL),
    ("unknown signature", _add_signature("serving_default"), {}, BAD_LM_SIGNATURE),
    ("zero-padded prefill name", _add_signature("prefill_08", "prefill_8"), {},
     BAD_LM_SIGNATURE),
    ("prefill lacks a layer's V", _set("prefill_8", IN, "kv_cache_v_1", None), {},
     BAD_LM_SIGNATURE),
    ("decode lacks logits", _set("decode", OUT, "logits", None), {}, BAD_LM_SIGNATURE),
    ("prefill outputs logits", _set("prefill_8", OUT, "logits", (1, 1, 64)), {},
     BAD_LM_SIGNATURE),
    ("extra input", _set("decode", IN, "lora", (1, 4)), {}, BAD_LM_SIGNATURE),
    ("tokens are int64", _set("decode", IN, "tokens", (1, 1), "int64"), {}, BAD_LM_SIGNATURE),
    ("a float16 cache", _set("prefill_8", IN, "kv_cache_k_0", (1, 32, 2, 8), "float16"), {},
     BAD_LM_SIGNATURE),
    ("cache of rank 3", _set("decode", IN, "kv_cache_k_0", (32, 2, 8)), {}, BAD_LM_SIGNATURE),
    ("dynamic dimension", _set("decode", IN, "kv_cache_k_0", (1, 0, 2, 8)), {},
     BAD_LM_SIGNATURE),
    ("layers numbered 0, 2", _renumber_layer("decode"), {}, BAD_LM_SIGNATURE),
    ("logits [1,8,V]", _set("decode", OUT, "logits", (1, 8, 64)), {}, BAD_LM_SIGNATURE),
    ("decode tokens [1,2]", _set("decode", IN, "tokens", (1, 2), "int32"), {},
     BAD_LM_SIGNATURE),
    ("prefill input_pos [4]", _set("prefill_8", IN, "input_pos", (4,), "int32"), {},
     BAD_LM_SIGNATURE),
    ("mask only in decode", _set("decode", IN, "mask", (1, 1, 1, 32)), {}, BAD_LM_SIGNATURE),
    ("batch of 2", _all_caches("", (2, 32, 2, 8)), {}, BAD_LM_SIGNATURE),
    ("layers disagree", _set("decode", IN, "kv_cache_k_1", (1, 32, 4, 8)), {},
     CACHE_SHAPE_MISMATCH),
    ("signatures disagree", _set("prefill_8", IN, "kv_cache_v_0", (1, 64, 2, 8)), {},
     CACHE_SHAPE_MISMATCH),
    ("prefill returns another shape", _set("prefill_8", OUT, "kv_cache_k_1", (1, 16, 2, 8)), {},
     CACHE_SHAPE_MISMATCH),
    ("stated layout is wrong", _unchanged, {"cache_layout": "transposed"},
     CACHE_SHAPE_MISMATCH),
    ("K and V fit no layout", _all_caches("v", (1, 32, 2, 4)), {}, CACHE_SHAPE_MISMATCH),
]


@pytest.mark.parametrize(("mutate", "kwargs", "reason"), [c[1:] for c in HOSTILE],
                         ids=[c[0] for c in HOSTILE])
def test_hostile_signatures_are_refused_with_their_reason(mutate: Mutation,
                                                          kwargs: dict[str, Any],
                                                          reason: str) -> None:
    shapes = lm_shapes()
    mutate(shapes)
    with pytest.raises(LmFormatError) as info:
        inspect_lm(shapes, **kwargs)
    assert info.value.reason == reason, str(info.value)


MASKED: list[tuple[str, Mutation, str]] = [
    ("mask covers another context", _set("prefill_8", IN, "mask", (1, 1, 8, 64)),
     CACHE_SHAPE_MISMATCH),
    ("mask rows are not N", _set("prefill_8", IN, "mask", (1, 1, 4, 32)), BAD_LM_SIGNATURE),
    ("mask is int32", _set("decode", IN, "mask", (1, 1, 1, 32), "int32"), BAD_LM_SIGNATURE),
    ("mask only in prefill", _set("decode", IN, "mask", None), BAD_LM_SIGNATURE),
]


@pytest.mark.parametrize(("mutate", "reason"), [c[1:] for c in MASKED],
                         ids=[c[0] for c in MASKED])
def test_hostile_masks_are_refused(mutate: Mutation, reason: str) -> None:
    shapes = lm_shapes(mask=True)
    mutate(shapes)
    with pytest.raises(LmFormatError) as info:
        inspect_lm(shapes)
    assert info.value.reason == reason, str(info.value)


def test_a_prefill_longer_than_the_context_is_a_cache_mismatch() -> None:
    with pytest.raises(LmFormatError) as info:
        inspect_lm(lm_shapes(prefills=(8, 64)))
    assert info.value.reason == CACHE_SHAPE_MISMATCH
    assert "prefill_64" in str(info.value) and "32" in str(info.value)


@pytest.mark.parametrize("shapes", [
    lm_shapes(layout="transposed", context=8, head_dim=8, prefills=(2,)),
    lm_shapes(heads=4, head_dim=4),
], ids=["transposed, T == head_dim", "default, heads == head_dim"])
def test_ambiguous_layout_is_refused_without_a_stated_layout(shapes: Shapes) -> None:
    with pytest.raises(LmFormatError) as info:
        inspect_lm(shapes)
    assert info.value.reason == AMBIGUOUS_LAYOUT
    assert "generation.cache_layout" in str(info.value)


def test_messages_name_the_signature_and_tensor() -> None:
    shapes = lm_shapes(layers=3)
    _set("prefill_8", IN, "kv_cache_k_2", (1, 32, 2, 16))(shapes)
    with pytest.raises(LmFormatError, match=r"prefill_8 input kv_cache_k_2 is \[1, 32, 2, 16\] "
                       r"but decode's input kv_cache_k_0 is \[1, 32, 2, 8\]"):
        inspect_lm(shapes)


def interpreter_shapes(model_path: Path) -> Shapes:
    """A real model's signatures as ``SignatureShapes``, read through tflite-runtime."""
    import numpy as np
    from tflite_runtime.interpreter import Interpreter

    def shapes(details: dict[str, dict[str, Any]]) -> dict[str, TensorShape]:
        return {name: TensorShape(tuple(int(d) for d in detail["shape"]),
                                  np.dtype(detail["dtype"]).name)
                for name, detail in details.items()}

    interpreter = Interpreter(model_path=str(model_path))
    result: Shapes = {}
    for name in interpreter.get_signature_list():
        runner = interpreter.get_signature_runner(name)
        result[name] = (shapes(runner.get_input_details()), shapes(runner.get_output_details()))
    return result


def test_the_committed_lm_fixtures_follow_the_convention() -> None:
    home = inspect_lm(interpreter_shapes(LM_FIXTURES / "home_lm.tflite"))
    assert (home.cache_layout, home.num_layers, home.has_mask) == ("default", 2, False)
    alt = inspect_lm(interpreter_shapes(LM_FIXTURES / "alt_lm.tflite"))
    assert (alt.cache_layout, alt.num_layers, alt.has_mask) == ("transposed", 3, True)
    assert inspect_lm(interpreter_shapes(LM_FIXTURES / "alt_lm.tflite"), "transposed") == alt
    with pytest.raises(LmFormatError) as info:
        inspect_lm(interpreter_shapes(LM_FIXTURES / "alt_lm.tflite"), "default")
    assert info.value.reason == CACHE_SHAPE_MISMATCH


def test_the_home_lm_fixture_and_its_tokenizer_pass_check_generation() -> None:
    import sentencepiece

    layout = inspect_lm(interpreter_shapes(LM_FIXTURES / "home_lm.tflite"))
    tokenizer = sentencepiece.SentencePieceProcessor(
        model_file=str(LM_FIXTURES / "home_lm.spm.model"))
    generation = GenerationSpec(
        tokenizer="home_lm.spm.model", tokenizer_kind="sentencepiece",
        prompt_template="<user> {prompt} <bot>", bos_id=tokenizer.bos_id(),
        stop_ids=(tokenizer.eos_id(),), context_length=layout.context_length,
        cache_layout=layout.cache_layout, num_layers=layout.num_layers,
        vocab_size=layout.vocab_size, prefill_lengths=layout.prefill_lengths)
    check_generation(generation, layout, tokenizer_vocab_size=tokenizer.get_piece_size())
    with pytest.raises(LmFormatError) as info:
        check_generation(generation, layout, tokenizer_vocab_size=tokenizer.get_piece_size() - 1)
    assert info.value.reason == VOCAB_MISMATCH


def test_an_unknown_stated_layout_is_a_callers_bug() -> None:
    with pytest.raises(ValueError, match="cache_layout"):
        inspect_lm(lm_shapes(), "paged")


def test_lm_format_error_is_an_update_rejection() -> None:
    error = LmFormatError("x", reason=VOCAB_MISMATCH)
    assert isinstance(error, UpdateRejected)
    assert error.reason == VOCAB_MISMATCH


# --- generation metadata -------------------------------------------------------------------------


def spec(**changes: Any) -> GenerationSpec:
    base = GenerationSpec(
        tokenizer="home.spm.model", tokenizer_kind="sentencepiece",
        prompt_template="<user> {prompt} <bot>", bos_id=1, stop_ids=(2,), context_length=32,
        cache_layout="default", num_layers=2, vocab_size=64, prefill_lengths=(8,),
        stop_strings=("\n\n",), sampling=Sampling(temperature=0.7, top_k=40, top_p=0.9),
    )
    return dataclasses.replace(base, **changes)


def test_generation_round_trips() -> None:
    for value in (spec(), spec(bos_id=None, stop_strings=(), sampling=Sampling())):
        data = json.loads(json.dumps(value.to_dict()))
        assert GenerationSpec.from_dict(data) == value
        assert GenerationSpec.from_dict(data).to_dict() == value.to_dict()
    assert "bos_id" not in spec(bos_id=None).to_dict()
    assert "stop_strings" not in spec(stop_strings=()).to_dict()


def test_render_prompt_replaces_the_placeholder_only() -> None:
    template = spec(prompt_template='{"q": "{prompt}"}')
    assert template.render_prompt("a {prompt} b") == '{"q": "a {prompt} b"}'
    assert spec().render_prompt("lights on") == "<user> lights on <bot>"


def test_check_generation_accepts_a_matching_model() -> None:
    check_generation(spec(), inspect_lm(lm_shapes()), tokenizer_vocab_size=64)
    check_generation(spec(), inspect_lm(lm_shapes()))


GENERATION_HOSTILE: list[tuple[str, GenerationSpec, int | None, str]] = [
    ("tokenizer vocab smaller than the logits", spec(), 60, VOCAB_MISMATCH),
    ("tokenizer vocab larger than the logits", spec(), 65, VOCAB_MISMATCH),
    ("metadata vocab is not the logits' size", spec(vocab_size=60), 60, VOCAB_MISMATCH),
    ("stop id out of range", spec(stop_ids=(2, 64)), 64, IDS_OUT_OF_RANGE),
    ("bos id out of range", spec(bos_id=1000), 64, IDS_OUT_OF_RANGE),
    ("context length differs", spec(context_length=64), 64, CACHE_SHAPE_MISMATCH),
    ("layer count differs", spec(num_layers=3), 64, CACHE_SHAPE_MISMATCH),
    ("layout differs", spec(cache_layout="transposed"), 64, CACHE_SHAPE_MISMATCH),
    ("prefill lengths differ", spec(prefill_lengths=(4, 8)), 64, CACHE_SHAPE_MISMATCH),
]


@pytest.mark.parametrize(("value", "tokenizer_vocab", "reason"),
                         [c[1:] for c in GENERATION_HOSTILE],
                         ids=[c[0] for c in GENERATION_HOSTILE])
def test_generation_disagreeing_with_the_model_is_refused(value: GenerationSpec,
                                                          tokenizer_vocab: int | None,
                                                          reason: str) -> None:
    with pytest.raises(LmFormatError) as info:
        check_generation(value, inspect_lm(lm_shapes()), tokenizer_vocab_size=tokenizer_vocab)
    assert info.value.reason == reason, str(info.value)


def test_vocab_mismatch_names_both_sizes() -> None:
    with pytest.raises(LmFormatError, match="has 60 tokens but the model's vocabulary has 64"):
        check_generation(spec(), inspect_lm(lm_shapes()), tokenizer_vocab_size=60)


def _with(path: str, value: Any) -> dict[str, Any]:
    data = spec().to_dict()
    *parents, last = path.split(".")
    target = data
    for part in parents:
        target = target[part]
    if value is _DELETE:
        del target[last]
    else:
        target[last] = value
    return data


_DELETE = object()
MALFORMED: list[tuple[str, Any, str]] = [
    ("not an object", [], "generation must be an object"),
    ("unknown field", _with("temperature", 0.5), "unknown field"),
    ("unknown sampling field", _with("sampling.seed", 1), "unknown field"),
    ("missing field", _with("vocab_size", _DELETE), "missing"),
    ("missing sampling field", _with("sampling.max_tokens", _DELETE), "missing"),
    ("unknown tokenizer kind", _with("tokenizer_kind", "tiktoken"), "tokenizer_kind"),
    ("no placeholder", _with("prompt_template", "hello"), "prompt_template"),
    ("two placeholders", _with("prompt_template", "{prompt}{prompt}"), "prompt_template"),
    ("long template", _with("prompt_template", "{prompt}" + "x" * 1017), "prompt_template"),
    ("bos null", _with("bos_id", None), "generation.bos_id"),
    ("bos negative", _with("bos_id", -1), "generation.bos_id"),
    ("bos a bool", _with("bos_id", True), "generation.bos_id"),
    ("no stop ids", _with("stop_ids", []), "generation.stop_ids"),
    ("17 stop ids", _with("stop_ids", list(range(17))), "generation.stop_ids"),
    ("stop id a string", _with("stop_ids", ["2"]), "generation.stop_ids[0]"),
    ("stop id twice", _with("stop_ids", [2, 2]), "generation.stop_ids"),
    ("9 stop strings", _with("stop_strings", list("abcdefghi")), "generation.stop_strings"),
    ("empty stop string", _with("stop_strings", [""]), "generation.stop_strings"),
    ("long stop string", _with("stop_strings", ["x" * 65]), "generation.stop_strings"),
    ("context 0", _with("context_length", 0), "generation.context_length"),
    ("context a float", _with("context_length", 32.0), "generation.context_length"),
    ("unknown layout", _with("cache_layout", "paged"), "generation.cache_layout"),
    ("layers 0", _with("num_layers", 0), "generation.num_layers"),
    ("huge vocab", _with("vocab_size", 10**400), "generation.vocab_size"),
    ("no prefill", _with("prefill_lengths", []), "generation.prefill_lengths"),
    ("prefill over context", _with("prefill_lengths", [8, 64]), "generation.prefill_lengths"),
    ("prefill descending", _with("prefill_lengths", [16, 8]), "strictly ascending"),
    ("temperature 11", _with("sampling.temperature", 11), "generation.sampling.temperature"),
    ("temperature -0.1", _with("sampling.temperature", -0.1), "sampling.temperature"),
    ("temperature huge", _with("sampling.temperature", 10**400), "sampling.temperature"),
    ("temperature NaN", _with("sampling.temperature", float("nan")), "sampling.temperature"),
    ("top_k negative", _with("sampling.top_k", -1), "generation.sampling.top_k"),
    ("top_p 0", _with("sampling.top_p", 0), "generation.sampling.top_p"),
    ("top_p 1.5", _with("sampling.top_p", 1.5), "generation.sampling.top_p"),
    ("max_tokens 0", _with("sampling.max_tokens", 0), "generation.sampling.max_tokens"),
    ("max_tokens 4097", _with("sampling.max_tokens", 4097), "generation.sampling.max_tokens"),
    ("tokenizer not a string", _with("tokenizer", 5), "generation.tokenizer"),
]


@pytest.mark.parametrize(("data", "message"), [c[1:] for c in MALFORMED],
                         ids=[c[0] for c in MALFORMED])
def test_malformed_generation_is_refused_with_its_field(data: Any, message: str) -> None:
    with pytest.raises(MalformedError, match=message.replace("[", r"\[").replace("]", r"\]")):
        GenerationSpec.from_dict(data)


@pytest.mark.parametrize("name", ["../tok.model", "a/b", ".hidden", "manifest.json"])
def test_unsafe_tokenizer_names_are_refused(name: str) -> None:
    with pytest.raises(UnsafeNameError, match=r"generation\.tokenizer") as info:
        GenerationSpec.from_dict(_with("tokenizer", name))
    assert info.value.reason == "unsafe_name"


def test_sampling_validates_when_built_in_code() -> None:
    assert Sampling() == Sampling(temperature=0, top_k=0, top_p=1, max_tokens=64)
    assert isinstance(Sampling(temperature=0).temperature, float)
    with pytest.raises(MalformedError, match="top_p"):
        Sampling(top_p=0.0)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                max_size=4),
    max_leaves=12,
)
FIELDS = [*spec().to_dict(), *(f"sampling.{k}" for k in Sampling().to_dict()), "extra",
          "sampling.extra"]


@settings(derandomize=True, max_examples=200, deadline=None)
@given(st.one_of(JSON, st.builds(_with, st.sampled_from(FIELDS), JSON)))
def test_random_generation_objects_raise_only_malformed(data: Any) -> None:
    try:
        parsed = GenerationSpec.from_dict(data)
    except MalformedError:
        return
    assert GenerationSpec.from_dict(parsed.to_dict()) == parsed


# --- the manifest's generation object ----------------------------------------------------------

MODEL, SMOKE, TOKENIZER = b"TFL3-lm" * 32, b'{"_type":"fleetlite.smoke"}', b"spm-model" * 8


def lm_manifest(generation: GenerationSpec | None = None, tokenizer_role: str = "tokenizer",
                tokenizer_name: str = "home.spm.model") -> Manifest:
    tokens = TensorInfo("tokens", (1, 1), "int32")
    return Manifest(
        name="home-lm", version=1,
        files=(file_entry("home_lm.tflite", MODEL, "model"),
               file_entry("home_lm.smoke.json", SMOKE, "smoke"),
               file_entry(tokenizer_name, TOKENIZER, tokenizer_role)),
        model=ModelInfo("home_lm.tflite", (tokens,),
                        (TensorInfo("logits", (1, 1, 64), "float32"),)),
        smoke=SmokeSpec("home_lm.smoke.json"),
        device_classes=("raspberry-pi-4",), min_agent_version="0.1.0",
        issued=1_764_201_600, expires=1_764_201_600 + 86_400,
        generation=generation,
    )


def test_manifest_round_trips_with_generation() -> None:
    manifest = lm_manifest(spec())
    payload = manifest.to_json()
    parsed = parse_manifest(payload)
    assert parsed == manifest
    assert parsed.generation == spec()
    assert parsed.to_json() == payload
    assert json.loads(payload)["generation"]["tokenizer"] == "home.spm.model"


def test_a_manifest_without_generation_has_no_generation_key() -> None:
    manifest = lm_manifest(None, tokenizer_role="data")
    assert "generation" not in manifest.to_dict()
    assert parse_manifest(manifest.to_json()).generation is None


@pytest.mark.parametrize(("manifest", "message"), [
    (lm_manifest(spec(tokenizer="missing.model")), "not a listed file of role 'tokenizer'"),
    (lm_manifest(spec(), tokenizer_role="vocab"), "not a listed file of role 'tokenizer'"),
    (lm_manifest(spec(tokenizer="home_lm.tflite")), "not a listed file of role 'tokenizer'"),
    (lm_manifest(None), "not referenced by generation.tokenizer"),
    (lm_manifest(spec(), tokenizer_name="other.model"), "not a listed file"),
    (dataclasses.replace(lm_manifest(spec()), files=(
        *lm_manifest(spec()).files, file_entry("spare.model", TOKENIZER, "tokenizer"))),
     "tokenizer file 'spare.model' is not referenced"),
], ids=["missing file", "vocab role", "model file", "tokenizer without generation",
        "renamed tokenizer", "second tokenizer"])
def test_manifest_generation_must_match_its_files(manifest: Manifest, message: str) -> None:
    with pytest.raises(MalformedError, match=message) as info:
        parse_manifest(manifest.to_json())
    assert info.value.reason == "malformed"


def test_manifest_refuses_unknown_generation_fields() -> None:
    data = lm_manifest(spec()).to_dict()
    data["generation"]["chat_template"] = "x"
    with pytest.raises(MalformedError, match=r"generation has unknown field\(s\)"):
        parse_manifest(json.dumps(data).encode())


def test_doc_lists_every_lm_reason_code() -> None:
    text = DOC.read_text()
    section = text[text.index("### Release manifest"):text.index("### Bundles")]
    for reason in LM_REASONS:
        assert f"| `{reason}` |" in section, reason
    assert "`tokenizer`" in section and "`generation`" in section
