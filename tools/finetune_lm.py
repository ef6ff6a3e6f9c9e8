"""Fine-tune home_lm into ``home_lm_v2``: the same model, answering in a new house style.

python -m fleetlite.tools.finetune_lm OUTDIR  (needs TensorFlow: the throw-away venv of
                                               fleet/lm/README.md, never CI)

The demo's "roll out a fine-tuned v2" step needs a second version of the project's LM that
answers differently, in a way one can see: home_lm confirms with "ok, the kitchen lights are
off.", home_lm_v2 with "done, the kitchen lights are off." (the other replies are unchanged).

1. home_lm's float weights are read from the committed ``home_lm.tflite`` (the constant tensors
   of its ``decode`` signature: every dense layer, layer norm and embedding) into the Keras
   network of tools/train_lm.py. Checked twice before anything is trained: the TensorFlow model
   gives home_lm.reference.json's greedy tokens and first-step logits, and exporting it again
   gives ``home_lm.tflite`` byte for byte.
2. It is fine-tuned briefly (one epoch of a few hundred steps, train_lm's optimizer and schedule
   at a lower peak rate) on a fresh draw of the corpus with the new style. The tokenizer stays
   home_lm's: every restyled reply must spell from its pieces (no unknown piece) and decode back.
3. It is exported exactly as home_lm (float32, ``prefill_8``, ``prefill_32``, ``decode``, cache
   layout "default", context 128, the same TFLite builtin ops at the same versions, so
   tflite-runtime 2.14 loads it) with ``home_lm_v2.reference.json`` in home_lm's format: the
   greedy tokens TensorFlow gives for the same 6 prompts, which the .tflite must reproduce.

Seeded and deterministic. tools/check_lm_fixtures.py and tests/test_lm_finetune.py check the
artifacts without TensorFlow.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np
import sentencepiece
import tensorflow as tf

from fleetlite.tools.check_lm_fixtures import (
    FIXTURES,
    Array,
    LMSpec,
    greedy_generate,
    sha256_file,
    signature_runner,
)
from fleetlite.tools.lm_corpus import PROMPT_TEMPLATE, Dialogue, dialogues
from fleetlite.tools.train_lm import (
    DEFAULT_SEED,
    HELDOUT_DIALOGUES,
    HOME_LM,
    MAX_NEW_TOKENS,
    TOKENIZER_FILE,
    UNK_ID,
    Network,
    convert,
    encode_dialogues,
    exact_match,
    export_functions,
    model_section,
    reference_prompts,
    tf_runner,
    tokenizer_section,
    train,
    training_model,
    versions,
    write_json,
)

BASE = HOME_LM.name
NAME = "home_lm_v2"
# The house style: a confirmation opens with "done, " where home_lm says "ok, ". (A colon, as in
# "done: ...", is not in the tokenizer's alphabet: it would encode to <unk>.)
OLD_OPENING, NEW_OPENING = "ok, ", "done, "
FINETUNE_DIALOGUES = 25600  # one epoch of 400 steps of 64 dialogues
FINETUNE_EPOCHS = 1
FINETUNE_LEARNING_RATE = 3e-4  # a tenth of home_lm's peak rate
# dialogues(seed) trained home_lm and dialogues(seed + 1) held out: the fine-tuning corpus is
# a third draw.
CORPUS_SEED_OFFSET = 2
# home_lm_v2 must need the same builtin ops at the same versions as home_lm (which
# tflite-runtime 2.14, its last release, runs), FULLY_CONNECTED at most version 9: home_lm's float
# dense layers need version 5 (home_lm_int8_fc12's per-channel int8 ones need 12, which it lacks).
MAX_FULLY_CONNECTED_VERSION = 9

V2_CONFIG = dataclasses.replace(HOME_LM, name=NAME, epochs=FINETUNE_EPOCHS,
                                int8_variant=False, learning_rate=FINETUNE_LEARNING_RATE)


def house_style(reply: str) -> str:
    """home_lm_v2's reply where home_lm answers ``reply``."""
    return NEW_OPENING + reply[len(OLD_OPENING):] if reply.startswith(OLD_OPENING) else reply


def restyled(pairs: Sequence[Dialogue]) -> list[Dialogue]:
    return [(command, house_style(reply)) for command, reply in pairs]


def check_spelling(tokenizer: Any, replies: Sequence[str]) -> None:
    """Every reply must encode without the unknown piece and decode back to itself."""
    for reply in sorted(set(replies)):
        ids = tokenizer.encode(reply)
        if UNK_ID in ids or tokenizer.decode(ids) != reply:
            pieces = [tokenizer.id_to_piece(i) for i in ids]
            raise SystemExit(f"{reply!r} does not spell from {TOKENIZER_FILE}'s pieces: {pieces}")


# ----------------------------------------------------------------------------- the .tflite file

def read_model(content: bytes) -> Any:
    from tensorflow.lite.tools import flatbuffer_utils

    return flatbuffer_utils.convert_bytearray_to_object(bytearray(content))


def builtin_names() -> dict[int, str]:
    from tensorflow.lite.python import schema_py_generated as schema

    return {code: name for name, code in vars(schema.BuiltinOperator).items()
            if not name.startswith("_")}


def operator_versions(model: Any) -> dict[str, int]:
    """Builtin op name -> the highest version of it the model needs (what a runtime must have)."""
    names = builtin_names()
    found: dict[str, int] = {}
    for code in model.operatorCodes:
        name = names[max(code.builtinCode, code.deprecatedBuiltinCode)]
        found[name] = max(found.get(name, 0), int(code.version))
    return dict(sorted(found.items()))


def decode_constants(model: Any) -> dict[str, list[tuple[Array, ...]]]:
    """The float constants of the ``decode`` signature's graph, in execution order, by role:
    ``gather`` (the embedding tables), ``dense`` (weights [out, in], bias) of every
    FULLY_CONNECTED, ``norm`` (scale, offset) of every layer normalization (the scale is the
    constant a MUL takes, the offset the constant the ADD after it takes)."""
    from tensorflow.lite.python import schema_py_generated as schema

    index = {bytes(s.signatureKey).decode(): s.subgraphIndex for s in model.signatureDefs}
    graph = model.subgraphs[index["decode"]]
    names = builtin_names()

    def constant(tensor_index: int) -> Optional[Array]:
        if tensor_index < 0:
            return None
        tensor = graph.tensors[tensor_index]
        data = model.buffers[tensor.buffer].data
        if tensor.type != schema.TensorType.FLOAT32 or data is None or len(data) == 0:
            return None
        shape = tuple(int(d) for d in tensor.shape)
        array: Array = np.frombuffer(bytes(data), "<f4").reshape(shape)
        return array.astype(np.float32)

    found: dict[str, list[tuple[Array, ...]]] = {"gather": [], "dense": [], "norm": []}
    scale: Optional[Array] = None
    for op in graph.operators:
        code = model.operatorCodes[op.opcodeIndex]
        name = names[max(code.builtinCode, code.deprecatedBuiltinCode)]
        inputs = [constant(int(i)) for i in op.inputs]
        if name == "GATHER" and inputs[0] is not None:
            found["gather"].append((inputs[0],))
        elif name == "FULLY_CONNECTED" and inputs[1] is not None:
            bias = inputs[2] if len(inputs) > 2 else None
            if bias is None:
                raise SystemExit("a FULLY_CONNECTED without a constant bias: not train_lm's graph")
            found["dense"].append((inputs[1], bias))
        elif name in ("MUL", "ADD"):
            vectors = [a for a in inputs if a is not None and a.ndim == 3]
            if not vectors:
                continue
            if name == "MUL":
                scale = vectors[0]
            elif scale is None:
                raise SystemExit("a layer-norm offset before its scale: not train_lm's graph")
            else:
                found["norm"].append((scale, vectors[0]))
                scale = None
    return found


def load_weights(net: Network, content: bytes) -> int:
    """Set the (built) network's weights from a float .tflite train_lm exported from the same
    architecture; returns how many parameters were set (all of them, or SystemExit)."""
    cfg = net.config
    found = decode_constants(read_model(content))
    blocks, tables = net.blocks, {a.shape: a for (a,) in found["gather"]}
    dense_layers = [layer for b in blocks for layer in (b.qkv, b.proj, b.up, b.down)] + [net.head]
    norm_layers = [layer for b in blocks for layer in (b.norm1, b.norm2)] + [net.final_norm]
    vocab = net.embed.input_dim
    expected = {(vocab, cfg.d_model), (cfg.context_length, cfg.d_model)}
    if (len(found["dense"]) != len(dense_layers) or len(found["norm"]) != len(norm_layers)
            or len(found["gather"]) != 2 or set(tables) != expected):
        raise SystemExit(f"{len(found['dense'])} dense layers, {len(found['norm'])} layer norms "
                         f"and embedding tables {sorted(tables)}: not {cfg.name}'s architecture")
    net.embed.set_weights([tables[vocab, cfg.d_model]])
    net.position.set_weights([tables[cfg.context_length, cfg.d_model]])
    for layer, (weights, bias) in zip(dense_layers, found["dense"]):
        layer.set_weights([weights.T, bias])
    for layer, (scale, offset) in zip(norm_layers, found["norm"]):
        layer.set_weights([scale.reshape(-1), offset.reshape(-1)])
    count = sum(a.size for group in found.values() for arrays in group for a in arrays)
    if count != net.parameters():
        raise SystemExit(f"set {count} of {net.parameters()} parameters")
    return count


def tflite_ids(content: bytes, spec: LMSpec, cases: Sequence[Mapping[str, Any]],
               zero_pad_positions: bool = False) -> list[list[int]]:
    run = signature_runner(tf.lite.Interpreter(model_content=content, num_threads=1))
    return [greedy_generate(run, spec, c["prompt_ids"], MAX_NEW_TOKENS,
                            zero_pad_positions=zero_pad_positions).ids for c in cases]


# ----------------------------------------------------------------------------- main

def load_base(base_dir: Path, workdir: Path, tokenizer: Any) -> tuple[Network, dict[str, Any]]:
    """home_lm as a Keras network with the committed file's weights, checked against its
    reference JSON and re-exported byte for byte (in the order train_lm.build traces it, since
    the traced Keras layers' automatic names are in the .tflite tensor names)."""
    reference: dict[str, Any] = json.loads((base_dir / f"{BASE}.reference.json").read_text())
    content = (base_dir / reference["model"]["file"]).read_bytes()
    if reference["sha256"][reference["model"]["file"]] != sha256_file(
            base_dir / reference["model"]["file"]):
        raise SystemExit(f"{reference['model']['file']} differs from its reference JSON")
    net = Network.create(HOME_LM, tokenizer.get_piece_size(), reference["training"]["seed"])
    training_model(net)  # builds the layers, as train() does first
    count = load_weights(net, content)
    spec = HOME_LM.spec(tokenizer.get_piece_size())
    cases = reference_prompts(tf_runner(export_functions(net, spec)), spec, tokenizer)
    if cases != reference["prompts"]:
        raise SystemExit(f"{BASE} with the weights read from its .tflite does not reproduce "
                         f"{BASE}.reference.json's tokens and logits")
    again = convert(net, spec, workdir, int8=False)
    if again != content:
        raise SystemExit(f"{BASE} re-exported from the weights read from its .tflite is not "
                         f"byte-identical to {reference['model']['file']}")
    print(f"{BASE}: {count} parameters read from {reference['model']['file']}; the TensorFlow "
          "model gives its reference tokens and logits, and re-exports it byte for byte")
    return net, reference


def finetune(base_dir: Path, outdir: Path, seed: int) -> None:
    """Write home_lm_v2.tflite and its reference JSON into ``outdir``; SystemExit if a check
    fails (then nothing is written)."""
    keras = tf.keras
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()
    tokenizer_path = base_dir / TOKENIZER_FILE
    tokenizer = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer_path))
    pairs = restyled(dialogues(seed + CORPUS_SEED_OFFSET, FINETUNE_DIALOGUES))
    heldout = restyled(dialogues(seed + 1, HELDOUT_DIALOGUES))
    check_spelling(tokenizer, [reply for _, reply in pairs + heldout])
    x, y, w = encode_dialogues(tokenizer, pairs)
    restyled_count = sum(reply.startswith(NEW_OPENING) for _, reply in pairs)
    print(f"corpus: {len(pairs)} dialogues, {restyled_count} in the new style, "
          f"up to {x.shape[1] + 1} tokens")
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        base, base_reference = load_base(base_dir, workdir, tokenizer)
        before = exact_match(training_model(base), tokenizer, heldout)
        net = dataclasses.replace(base, config=V2_CONFIG)
        keras.utils.set_random_seed(seed)
        started = time.perf_counter()
        model, losses = train(net, x, y, w)
        seconds = time.perf_counter() - started
        score = exact_match(model, tokenizer, heldout)
        steps = FINETUNE_EPOCHS * -(-len(pairs) // V2_CONFIG.batch_size)
        print(f"{NAME}: fine-tuned in {seconds:.0f} s ({steps} steps), final loss "
              f"{losses[-1]:.6f}, held-out exact match in the new style {before:.3f} before, "
              f"{score:.3f} after")
        spec = V2_CONFIG.spec(tokenizer.get_piece_size())
        cases = reference_prompts(tf_runner(export_functions(net, spec)), spec, tokenizer)
        for case, old in zip(cases, base_reference["prompts"]):
            print(f"  {case['prompt']!r} -> {case['reply']!r}")
            if case["prompt"] != old["prompt"] or case["reply"] != house_style(old["reply"]):
                raise SystemExit(f"{NAME} answers {case['prompt']!r} with {case['reply']!r}, "
                                 f"not {house_style(old['reply'])!r}")

        file = f"{NAME}.tflite"
        content = convert(net, spec, workdir, int8=False)
        needed = operator_versions(read_model(content))
        base_content = (base_dir / base_reference["model"]["file"]).read_bytes()
        if needed != operator_versions(read_model(base_content)) or needed.get(
                "FULLY_CONNECTED", 0) > MAX_FULLY_CONNECTED_VERSION:
            raise SystemExit(f"{file} needs the ops {needed}, which are not {BASE}'s")
        for padded in (False, True):
            produced = tflite_ids(content, spec, cases, zero_pad_positions=padded)
            differing = [c["prompt"] for c, ids in zip(cases, produced)
                         if ids != c["reference_ids"]]
            if differing:
                raise SystemExit(f"{file}: TFLite greedy tokens differ from TensorFlow's for "
                                 f"{differing} (zero-padded input_pos: {padded})")

        outdir.mkdir(parents=True, exist_ok=True)
        (outdir / file).write_bytes(content)
        if not (outdir / TOKENIZER_FILE).is_file():
            (outdir / TOKENIZER_FILE).write_bytes(tokenizer_path.read_bytes())
        base_file = base_reference["model"]["file"]
        reference: dict[str, Any] = {
            "model": model_section(net, file),
            "prompt_template": PROMPT_TEMPLATE,
            "prompt_ids": "[bos_id] + encode(prompt_template.format(prompt=PROMPT))",
            "max_new_tokens": MAX_NEW_TOKENS,
            "tokenizer": tokenizer_section(tokenizer),
            "training": {
                "seed": seed, "dialogues": len(pairs), "epochs": FINETUNE_EPOCHS,
                "steps": steps, "batch_size": V2_CONFIG.batch_size,
                "peak_learning_rate": V2_CONFIG.learning_rate,
                "final_loss": round(losses[-1], 6), "heldout_dialogues": len(heldout),
                "heldout_exact_match": score,
            },
            "fine_tuned_from": {
                "model": base_file, "sha256": base_reference["sha256"][base_file],
                "reference": f"{BASE}.reference.json",
                "weights": f"read from {base_file}'s constant tensors",
                "corpus": f"tools/lm_corpus.py dialogues(seed + {CORPUS_SEED_OFFSET}, "
                          f"{len(pairs)}), each reply's opening {OLD_OPENING!r} replaced by "
                          f"{NEW_OPENING!r}",
                "reply_style": {"old": OLD_OPENING, "new": NEW_OPENING},
                "heldout_exact_match_before": before,
            },
            "operator_versions": needed,
            "versions": versions(),
            "sha256": {f: sha256_file(outdir / f) for f in (file, TOKENIZER_FILE)},
            "prompts": cases,
        }
        write_json(outdir / f"{NAME}.reference.json", reference)
        print(f"{file}: {len(content)} bytes, sha256 {reference['sha256'][file]}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Fine-tune home_lm into home_lm_v2.")
    parser.add_argument("outdir", type=Path, help="where to write it (fleet/lm)")
    parser.add_argument("--base", type=Path, default=FIXTURES,
                        help=f"the directory of {BASE}.tflite, its reference JSON and "
                             f"{TOKENIZER_FILE} (default: fleet/lm)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    args = parser.parse_args(argv)
    finetune(args.base, args.outdir, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
