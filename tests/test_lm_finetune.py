"""home_lm_v2 (tests/fixtures/lm/, made by tools/finetune_lm.py): home_lm fine-tuned to confirm in a
new house style, for the demo's "roll out a fine-tuned v2" step.

No TensorFlow: the committed files only. The model must load in the agent's runtime
(tflite-runtime 2.14 included: the same ops at the same versions as home_lm), its greedy replies
must be the TensorFlow references recorded beside it, and those replies must be home_lm's with
"ok, " turned into "done, ".
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fleetlite.tools.check_lm_fixtures import FIXTURES, check_reference, sha256_file
from tests.test_generation import load, reference, with_stop

pytest.importorskip(
    "sentencepiece",
    reason="sentencepiece is not installed; it is the agent's tokenizer library for language "
    "models: pip install sentencepiece",
)

V2 = "home_lm_v2"
REPLIES = {
    "turn off the kitchen lights": "done, the kitchen lights are off.",
    "set the thermostat to 21 degrees": "done, the thermostat is set to 21 degrees.",
    "lock the front door": "done, the front door is locked.",
    "dim the bedroom lights to 40 percent": "done, the bedroom lights are dimmed to 40 percent.",
    "open the living room blinds": "done, the living room blinds are open.",
    "what is the temperature in the office": "checking the temperature in the office now.",
}
MAX_BYTES = 2_300_000


def operator_versions(path: Path) -> dict[str, int]:
    """Builtin op name -> the highest version of it the .tflite needs."""
    from fleetlite.fleet.tflite_builder import schema_module

    names = {code: name for name, code in vars(schema_module("BuiltinOperator").BuiltinOperator)
             .items() if not name.startswith("_")}
    model: Any = schema_module("Model").Model.GetRootAs(path.read_bytes(), 0)
    found: dict[str, int] = {}
    for i in range(model.OperatorCodesLength()):
        code = model.OperatorCodes(i)
        name = names[max(code.BuiltinCode(), code.DeprecatedBuiltinCode())]
        found[name] = max(found.get(name, 0), int(code.Version()))
    return dict(sorted(found.items()))


def test_the_files_are_the_recorded_ones() -> None:
    ref = reference(V2)
    model = FIXTURES / ref["model"]["file"]
    assert model.name == f"{V2}.tflite"
    assert set(ref["sha256"]) == {model.name, ref["tokenizer"]["file"]}
    for name, digest in ref["sha256"].items():
        assert sha256_file(FIXTURES / name) == digest, name
    assert model.stat().st_size < MAX_BYTES


def test_it_is_home_lm_fine_tuned_to_the_new_house_style() -> None:
    v2, home = reference(V2), reference("home_lm")
    base = v2["fine_tuned_from"]
    assert base["model"] == home["model"]["file"] == "home_lm.tflite"
    assert base["sha256"] == home["sha256"]["home_lm.tflite"] == sha256_file(
        FIXTURES / "home_lm.tflite")
    assert v2["sha256"]["home_lm_v2.tflite"] != home["sha256"]["home_lm.tflite"]
    # the same architecture, tokenizer, prompt and prompts; only the weights and replies differ
    assert {**v2["model"], "file": None} == {**home["model"], "file": None}
    for key in ("tokenizer", "prompt_template", "prompt_ids", "max_new_tokens", "versions"):
        assert v2[key] == home[key], key
    assert v2["training"]["seed"] == home["training"]["seed"]
    assert v2["training"]["steps"] < home["training"]["steps"]
    assert v2["training"]["heldout_exact_match"] == 1.0
    old, new = base["reply_style"]["old"], base["reply_style"]["new"]
    assert (old, new) == ("ok, ", "done, ")
    assert [(c["prompt"], c["prompt_ids"]) for c in v2["prompts"]] == [
        (c["prompt"], c["prompt_ids"]) for c in home["prompts"]]
    assert {c["prompt"]: c["reply"] for c in v2["prompts"]} == REPLIES
    for mine, theirs in zip(v2["prompts"], home["prompts"]):
        restyled = new + theirs["reply"][len(old):] if theirs["reply"].startswith(old) else (
            theirs["reply"])
        assert mine["reply"] == restyled


def test_it_needs_the_ops_home_lm_needs() -> None:
    """The same builtin ops at the same versions as home_lm (FULLY_CONNECTED 5 for float
    weights): what tflite-runtime 2.14 runs, unlike home_lm_int8_fc12's version 12."""
    pytest.importorskip("tflite", reason="the fleet extra's flatbuffer schema: pip install tflite")
    recorded = reference(V2)["operator_versions"]
    assert operator_versions(FIXTURES / f"{V2}.tflite") == recorded == operator_versions(
        FIXTURES / "home_lm.tflite")
    assert recorded["FULLY_CONNECTED"] <= 9


def test_the_runtime_reproduces_the_tensorflow_references() -> None:
    """The plain reference loop over signature runners, also with zero-padded input_pos."""
    problems, notes = check_reference(FIXTURES / f"{V2}.reference.json")
    assert problems == [], "\n".join(problems)
    assert notes


def test_the_engine_answers_in_the_new_house_style() -> None:
    engine = load(V2)
    ref = reference(V2)
    for case in ref["prompts"]:
        assert engine.encode_prompt(case["prompt"]) == case["prompt_ids"]
        assert with_stop(engine, case["prompt_ids"]) == case["reference_ids"], case["prompt"]
        stream = engine.stream(case["prompt"])
        assert "".join(chunk.text for chunk in stream) == case["reply"] == REPLIES[case["prompt"]]


def test_the_reference_is_json_the_other_fixtures_share() -> None:
    v2 = json.loads((FIXTURES / f"{V2}.reference.json").read_text())
    home = json.loads((FIXTURES / "home_lm.reference.json").read_text())
    assert set(home) <= set(v2)
    assert set(v2["prompts"][0]) == set(home["prompts"][0])
