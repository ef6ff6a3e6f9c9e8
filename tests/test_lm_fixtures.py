"""The committed generative-LM fixtures (tests/fixtures/lm/) match their reference JSON.

Each model must follow the litert-torch / LiteRT-LM signature convention, its tokenizer must fit
its logits, and greedy decoding in the TFLite runtime must give the tokens TensorFlow gave when
the model was trained (exactly for float32, at the recorded agreement for int8).
home_lm_int8_fc12 needs an op version tflite-runtime lacks: that runtime must refuse it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from fleetlite.sdk.runtime.interpreter import select_backend
from fleetlite.tools.check_lm_fixtures import (
    FIXTURES,
    check_directory,
    check_reference,
    sha256_file,
)
from fleetlite.tools.lm_corpus import PROMPT_TEMPLATE, dialogues

pytest.importorskip(
    "sentencepiece",
    reason="sentencepiece is not installed; it is the agent's tokenizer library for language "
    "models: pip install sentencepiece",
)

REFERENCES = sorted(FIXTURES.glob("*.reference.json"))
FC12 = "home_lm_int8_fc12"


def test_every_model_has_a_reference() -> None:
    models = {path.name for path in FIXTURES.glob("*.tflite")}
    recorded = {json.loads(path.read_text())["model"]["file"] for path in REFERENCES}
    assert models == recorded == {"home_lm.tflite", "home_lm_int8.tflite", "alt_lm.tflite",
                                  f"{FC12}.tflite", "home_lm_v2.tflite"}


@pytest.mark.parametrize("reference", REFERENCES, ids=lambda path: path.name)
def test_model_matches_its_reference(reference: Path) -> None:
    problems, notes = check_reference(reference)
    assert problems == [], "\n".join(problems)
    assert notes


def test_the_corpus_is_seeded_and_the_references_use_its_template() -> None:
    assert dialogues(7, 50) == dialogues(7, 50) != dialogues(8, 50)
    assert all(reply.endswith(".") for _, reply in dialogues(7, 50))
    assert {json.loads(path.read_text())["prompt_template"] for path in REFERENCES} == {
        PROMPT_TEMPLATE}


def test_the_two_models_differ_where_engines_must_adapt() -> None:
    home, alt = (json.loads((FIXTURES / f"{name}.reference.json").read_text())["model"]
                 for name in ("home_lm", "alt_lm"))
    assert (home["cache_layout"], alt["cache_layout"]) == ("default", "transposed")
    assert home["num_layers"] != alt["num_layers"]
    assert (home["mask_input"], alt["mask_input"]) == (False, True)


def test_the_fc12_model_needs_an_op_version_tflite_runtime_lacks() -> None:
    """home_lm's weights as TensorFlow quantizes them by default (per-channel dense scales) need
    FULLY_CONNECTED version 12: tflite-runtime 2.14 refuses the file naming the op and version,
    runtimes that have it (ai-edge-litert) load it, and it answers as home_lm does."""
    reference, home = (json.loads((FIXTURES / f"{name}.reference.json").read_text())
                       for name in (FC12, "home_lm"))
    unsupported = reference["unsupported_op"]
    assert (unsupported["op"], unsupported["version"], unsupported["refused_by"]) == (
        "FULLY_CONNECTED", 12, "tflite-runtime")
    assert unsupported["operator_versions"]["FULLY_CONNECTED"] == 12
    assert "per-channel" in reference["int8"]["quantization"]
    assert reference["int8"]["float_reference"] == "home_lm.reference.json"
    assert reference["training"] == home["training"]
    assert [c["int8_ids"] for c in reference["prompts"]] == [
        c["reference_ids"] for c in home["prompts"]]
    backend = select_backend()
    path = FIXTURES / f"{FC12}.tflite"
    if backend.name == "tflite-runtime":
        with pytest.raises(ValueError, match=r"\bFULLY_CONNECTED\b\W+version\W+12\b") as info:
            backend.interpreter_class(model_path=str(path), num_threads=1)
        assert unsupported["error"] in str(info.value)
    else:
        interpreter = backend.interpreter_class(model_path=str(path), num_threads=1)
        assert set(interpreter.get_signature_list()) == {"prefill_8", "prefill_32", "decode"}


def test_a_model_the_runtime_should_refuse_but_loads_is_reported(tmp_path: Path) -> None:
    copy = tmp_path / "lm"
    shutil.copytree(FIXTURES, copy)
    shutil.copyfile(copy / "home_lm_int8.tflite", copy / f"{FC12}.tflite")  # loads everywhere
    path = copy / f"{FC12}.reference.json"
    reference = json.loads(path.read_text())
    reference["sha256"][f"{FC12}.tflite"] = sha256_file(copy / f"{FC12}.tflite")
    backend = select_backend()
    reference["unsupported_op"]["refused_by"] = backend.name
    path.write_text(json.dumps(reference))
    problems, _ = check_reference(path)
    assert problems == [f"{FC12}.tflite on {backend.name} {backend.version}: loaded, but it needs "
                        f"FULLY_CONNECTED version 12, which {backend.name} is recorded to lack"]


def test_a_changed_artifact_is_reported(tmp_path: Path) -> None:
    copy = tmp_path / "lm"
    shutil.copytree(FIXTURES, copy)
    model = copy / "home_lm.tflite"
    content = bytearray(model.read_bytes())
    content[len(content) // 2] ^= 0x01
    model.write_bytes(bytes(content))
    problems, _ = check_directory(copy)
    assert problems == ["home_lm.reference.json: home_lm.tflite: sha256 differs from the "
                        "recorded one"]


def test_a_wrong_recorded_token_is_reported(tmp_path: Path) -> None:
    copy = tmp_path / "lm"
    shutil.copytree(FIXTURES, copy)
    path = copy / "alt_lm.reference.json"
    reference = json.loads(path.read_text())
    reference["prompts"][0]["reference_ids"][0] += 1
    path.write_text(json.dumps(reference))
    problems, _ = check_reference(path)
    assert len(problems) == 1 and "TensorFlow gave" in problems[0]
