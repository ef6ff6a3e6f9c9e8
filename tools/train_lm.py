"""Train FleetLite's tiny generative LMs from scratch and export them as TFLite fixtures.

python -m fleetlite.tools.train_lm OUTDIR     (needs TensorFlow: a throw-away venv, never CI)

Writes the SentencePiece tokenizer, ``home_lm`` (2 layers, cache layout [1, T, heads, head_dim]),
its int8 variant, ``home_lm_int8_fc12`` (the same weights as TensorFlow quantizes them by default:
an op version tflite-runtime lacks, for tests that such a release is refused) and ``alt_lm``
(3 layers, "transposed" caches, a ``mask`` input) in the signature convention litert-torch
exports and LiteRT-LM loads (``prefill_<N>`` and ``decode`` over ``tokens``, ``input_pos`` and
``kv_cache_k_<i>``/``kv_cache_v_<i>``), each with a reference JSON whose greedy tokens come from
the TensorFlow model itself. Seeded and deterministic.
tools/check_lm_fixtures.py checks the artifacts without TensorFlow.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import platform
import re
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import sentencepiece
import tensorflow as tf
from tensorflow.compiler.tf2xla.python import xla
from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

from fleetlite.tools.check_lm_fixtures import (
    MASK_VALUE,
    Array,
    LMSpec,
    RunFn,
    agreement,
    greedy_generate,
    sha256_file,
    signature_runner,
)
from fleetlite.tools.lm_corpus import (
    BOT_MARKER,
    PROMPT_TEMPLATE,
    USER_MARKER,
    dialogues,
    prompt_text,
)

DEFAULT_SEED = 20261204
TOKENIZER_FILE = "home_lm.spm.model"
VOCAB_SIZE = 512
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
MAX_NEW_TOKENS = 24
TRAIN_DIALOGUES = 24000
HELDOUT_DIALOGUES = 400
TEST_PROMPTS = (
    "turn off the kitchen lights",
    "set the thermostat to 21 degrees",
    "lock the front door",
    "dim the bedroom lights to 40 percent",
    "open the living room blinds",
    "what is the temperature in the office",
)
# The builtin op (and version) of TensorFlow's default int8 conversion of a dense layer, with
# per-channel weight scales, that tflite-runtime (2.14, its last release) does not provide.
UNSUPPORTED_OP, UNSUPPORTED_OP_VERSION = "FULLY_CONNECTED", 12
UNSUPPORTED_OP_SUFFIX = "_int8_fc12"

keras = tf.keras
ops = keras.ops
Tensor = Any
# (query, key, value) of the new tokens, each [batch, N, heads, head_dim] -> attended values.
AttendFn = Callable[[Tensor, Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class ModelConfig:
    """Architecture and training budget of one exported decoder."""

    name: str
    num_layers: int
    d_model: int
    num_heads: int
    head_dim: int
    context_length: int
    cache_layout: str
    mask_input: bool
    prefill_lengths: tuple[int, ...]
    epochs: int
    int8_variant: bool
    # also export the int8 weights with per-channel dense scales (UNSUPPORTED_OP's version)
    unsupported_op_variant: bool = False
    batch_size: int = 64
    learning_rate: float = 3e-3

    def spec(self, vocab_size: int) -> LMSpec:
        return LMSpec(self.cache_layout, self.num_layers, self.num_heads, self.head_dim,
                      self.context_length, self.prefill_lengths, vocab_size, self.mask_input,
                      (EOS_ID,))


HOME_LM = ModelConfig("home_lm", num_layers=2, d_model=128, num_heads=4, head_dim=32,
                      context_length=128, cache_layout="default", mask_input=False,
                      prefill_lengths=(8, 32), epochs=6, int8_variant=True,
                      unsupported_op_variant=True)
ALT_LM = ModelConfig("alt_lm", num_layers=3, d_model=96, num_heads=3, head_dim=32,
                     context_length=64, cache_layout="transposed", mask_input=True,
                     prefill_lengths=(8, 32), epochs=2, int8_variant=False)


def train_tokenizer(texts: Sequence[str]) -> bytes:
    """A BPE SentencePiece model with fixed special ids and the prompt markers as symbols."""
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, model_type="bpe",
        vocab_size=VOCAB_SIZE, pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
        user_defined_symbols=[USER_MARKER, BOT_MARKER], character_coverage=1.0,
        normalization_rule_name="identity", num_threads=1, minloglevel=2,
    )
    return model.getvalue()


def prompt_ids(tokenizer: Any, command: str) -> list[int]:
    return [BOS_ID, *tokenizer.encode(prompt_text(command))]


# ----------------------------------------------------------------------------- the network

@dataclass
class Block:
    """One pre-norm transformer layer."""

    norm1: Any
    qkv: Any
    proj: Any
    norm2: Any
    up: Any
    down: Any


@dataclass
class Network:
    """The decoder's Keras layers, shared by the training model and the exported signatures."""

    config: ModelConfig
    embed: Any
    position: Any
    blocks: list[Block]
    final_norm: Any
    head: Any

    @classmethod
    def create(cls, config: ModelConfig, vocab_size: int, seed: int) -> Network:
        # One seed generator for all: an initializer with a fixed seed (or none) would give
        # every layer the same weights.
        seeds = keras.random.SeedGenerator(seed)

        def init() -> Any:
            return keras.initializers.RandomNormal(stddev=0.02, seed=seeds)

        def dense(units: int, activation: Optional[str] = None) -> Any:
            return keras.layers.Dense(units, activation=activation, kernel_initializer=init())

        width, inner = config.d_model, config.num_heads * config.head_dim

        blocks = [Block(keras.layers.LayerNormalization(epsilon=1e-5), dense(3 * inner),
                        dense(width), keras.layers.LayerNormalization(epsilon=1e-5),
                        dense(4 * width, "gelu"), dense(width))
                  for _ in range(config.num_layers)]
        return cls(config, keras.layers.Embedding(vocab_size, width, embeddings_initializer=init()),
                   keras.layers.Embedding(config.context_length, width,
                                          embeddings_initializer=init()),
                   blocks, keras.layers.LayerNormalization(epsilon=1e-5),
                   dense(vocab_size))

    def forward(self, tokens: Tensor, positions: Tensor, attends: Sequence[AttendFn]) -> Tensor:
        """Logits for ``tokens`` at ``positions``; ``attends[i]`` is layer i's attention."""
        cfg = self.config
        x = self.embed(tokens) + self.position(positions)
        for block, attend in zip(self.blocks, attends):
            q, k, v = ops.split(block.qkv(block.norm1(x)), 3, axis=-1)
            split = keras.layers.Reshape((-1, cfg.num_heads, cfg.head_dim))
            attended = attend(split(q * cfg.head_dim**-0.5), split(k), split(v))
            merge = keras.layers.Reshape((-1, cfg.num_heads * cfg.head_dim))
            x = x + block.proj(merge(attended))
            x = x + block.down(block.up(block.norm2(x)))
        return self.head(self.final_norm(x))

    def parameters(self) -> int:
        layers = [self.embed, self.position, self.final_norm, self.head]
        for block in self.blocks:
            layers += [block.norm1, block.qkv, block.proj, block.norm2, block.up, block.down]
        return sum(int(np.prod(w.shape)) for layer in layers for w in layer.weights)


def causal_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """Attention within one sequence; ``mask`` [batch, 1, L, L] is additive."""
    weights = ops.softmax(ops.einsum("bqhd,bkhd->bhqk", q, k) + mask, axis=-1)
    return ops.einsum("bhqk,bkhd->bqhd", weights, v)


def training_model(net: Network) -> Any:
    """tokens [batch, L] -> next-token logits [batch, L, vocab], causal (any L <= context)."""
    tokens = keras.Input((None,), dtype="int32")
    positions = ops.cumsum(ops.ones_like(tokens), axis=1) - 1
    visible = ops.expand_dims(positions, 1) <= ops.expand_dims(positions, 2)
    mask = ops.expand_dims(ops.where(visible, 0.0, MASK_VALUE), 1)
    attends = [lambda q, k, v: causal_attention(q, k, v, mask)] * net.config.num_layers
    return keras.Model(tokens, net.forward(tokens, positions, attends), name=net.config.name)


# ----------------------------------------------------------------------------- export

def cached_attention(config: ModelConfig, caches: list[Tensor], layer: int, start: Tensor,
                     mask: Tensor) -> AttendFn:
    """Layer ``layer``'s attention over its KV cache: the N new rows are written at ``start``
    (DYNAMIC_UPDATE_SLICE), then the queries attend over the whole cache under ``mask``."""

    def attend(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        k_cache, v_cache = caches[2 * layer], caches[2 * layer + 1]
        zero = tf.zeros_like(start)
        if config.cache_layout == "default":  # K and V [1, T, heads, head_dim]
            k_cache = xla.dynamic_update_slice(k_cache, k, tf.stack([zero, start, zero, zero]))
            v_cache = xla.dynamic_update_slice(v_cache, v, tf.stack([zero, start, zero, zero]))
            weights = tf.nn.softmax(tf.einsum("bnhd,bthd->bhnt", q, k_cache) + mask)
            out = tf.einsum("bhnt,bthd->bnhd", weights, v_cache)
        else:  # K [1, heads, T, head_dim], V [1, heads, head_dim, T]
            k_cache = xla.dynamic_update_slice(k_cache, tf.transpose(k, [0, 2, 1, 3]),
                                               tf.stack([zero, zero, start, zero]))
            v_cache = xla.dynamic_update_slice(v_cache, tf.transpose(v, [0, 2, 3, 1]),
                                               tf.stack([zero, zero, zero, start]))
            scores = tf.matmul(tf.transpose(q, [0, 2, 1, 3]), k_cache, transpose_b=True)
            weights = tf.nn.softmax(scores + mask)
            out = tf.transpose(tf.matmul(weights, v_cache, transpose_b=True), [0, 2, 1, 3])
        caches[2 * layer], caches[2 * layer + 1] = k_cache, v_cache
        return out

    return attend


def signature_function(net: Network, spec: LMSpec, length: int, decode: bool) -> Any:
    """The tf.function of ``prefill_<length>`` or ``decode`` with the convention's tensor names."""
    cache_names = list(spec.cache_shapes())
    inputs = [tf.TensorSpec([1, length], tf.int32, name="tokens"),
              tf.TensorSpec([length], tf.int32, name="input_pos")]
    inputs += [tf.TensorSpec(shape, tf.float32, name=name)
               for name, shape in spec.cache_shapes().items()]
    if spec.mask_input:
        inputs.append(tf.TensorSpec([1, 1, length, spec.context_length], tf.float32, name="mask"))

    def run(*args: Tensor) -> dict[str, Tensor]:
        tokens, input_pos = args[0], args[1]
        caches = list(args[2:2 + len(cache_names)])
        if spec.mask_input:
            mask = args[-1]
        else:
            visible = tf.range(spec.context_length)[None, :] <= input_pos[:, None]
            mask = tf.where(visible, 0.0, MASK_VALUE)[None, None]
        attends = [cached_attention(net.config, caches, layer, input_pos[0], mask)
                   for layer in range(spec.num_layers)]
        logits = net.forward(tokens, input_pos[None], attends)
        outputs = dict(zip(cache_names, caches))
        if decode:
            outputs["logits"] = logits
        return outputs

    return tf.function(run, input_signature=inputs)


def export_functions(net: Network, spec: LMSpec) -> dict[str, Any]:
    functions = {f"prefill_{n}": signature_function(net, spec, n, decode=False)
                 for n in spec.prefill_lengths}
    functions["decode"] = signature_function(net, spec, 1, decode=True)
    return functions


def tf_runner(functions: Mapping[str, Any]) -> RunFn:
    """The reference loop's runner over the TensorFlow functions themselves."""

    def run(name: str, inputs: Mapping[str, Array]) -> Mapping[str, Array]:
        function = functions[name]
        args = [inputs[s.name] for s in function.input_signature]
        return {key: value.numpy() for key, value in function(*args).items()}

    return run


def frozen_functions(net: Network, spec: LMSpec) -> dict[str, Any]:
    """The signatures with every weight folded into a constant.

    The converter keeps Keras 3 variables as uninitialised TFLite resource variables (NaN
    logits), so the weights are frozen first; freezing loses the output names, so each frozen
    graph is wrapped again in a function that returns them by name.
    """
    result = {}
    for name, function in export_functions(net, spec).items():
        concrete = function.get_concrete_function()
        frozen = convert_variables_to_constants_v2(concrete)
        names = sorted(concrete.structured_outputs)  # the order tf.nest flattens a dict in

        def run(*args: Tensor, frozen: Any = frozen, names: list[str] = names) -> dict[str, Tensor]:
            return dict(zip(names, frozen(*args)))

        result[name] = tf.function(run, input_signature=function.input_signature)
    return result


def convert(net: Network, spec: LMSpec, workdir: Path, int8: bool,
            per_channel_dense: bool = False) -> bytes:
    """The .tflite bytes (TFLite builtin ops only) of every signature, via a SavedModel.

    ``per_channel_dense`` keeps the converter's default for int8 dense weights (a scale per
    output channel, FULLY_CONNECTED version 12) instead of one scale per tensor."""
    functions = frozen_functions(net, spec)
    saved = workdir / f"{net.config.name}_saved_model"
    tf.saved_model.save(tf.Module(), str(saved),
                        signatures={k: f.get_concrete_function() for k, f in functions.items()})
    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved), signature_keys=list(functions))
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if int8:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        # Per-channel dense weights need FULLY_CONNECTED version 12, which tflite-runtime 2.14
        # refuses; per-tensor scales keep it at a version 2.14 loads.
        if not per_channel_dense:
            converter._experimental_disable_per_channel_quantization_for_dense_layers = True
    content: bytes = converter.convert()
    return content


def operator_versions(content: bytes) -> dict[str, int]:
    """Builtin op name -> the highest version of it a .tflite needs (what a runtime must have)."""
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    names = {code: name for name, code in vars(schema.BuiltinOperator).items()
             if not name.startswith("_")}
    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(content))
    found: dict[str, int] = {}
    for code in model.operatorCodes:
        name = names[max(code.builtinCode, code.deprecatedBuiltinCode)]
        found[name] = max(found.get(name, 0), int(code.version))
    return dict(sorted(found.items()))


# ----------------------------------------------------------------------------- training

def encode_dialogues(tokenizer: Any, pairs: Sequence[tuple[str, str]]) -> tuple[Array, ...]:
    """Inputs, next-token targets and loss weights (1 on reply tokens only), right-padded."""
    sequences = [(prompt_ids(tokenizer, command), [*tokenizer.encode(reply), EOS_ID])
                 for command, reply in pairs]
    width = max(len(p) + len(r) for p, r in sequences) - 1
    x = np.full((len(sequences), width), PAD_ID, np.int32)
    y = np.full((len(sequences), width), PAD_ID, np.int32)
    w = np.zeros((len(sequences), width), np.float32)
    for row, (prompt, answer) in enumerate(sequences):
        sequence = prompt + answer
        x[row, : len(sequence) - 1] = sequence[:-1]
        y[row, : len(sequence) - 1] = sequence[1:]
        w[row, len(prompt) - 1 : len(sequence) - 1] = 1.0
    return x, y, w


def train(net: Network, x: Array, y: Array, w: Array) -> tuple[Any, list[float]]:
    """Fit the training model; returns it and the per-epoch losses."""
    cfg = net.config
    model = training_model(net)
    steps = cfg.epochs * -(-len(x) // cfg.batch_size)
    warmup = steps // 20
    schedule = keras.optimizers.schedules.CosineDecay(
        0.0, steps - warmup, alpha=0.02, warmup_target=cfg.learning_rate, warmup_steps=warmup)
    model.compile(optimizer=keras.optimizers.AdamW(schedule, weight_decay=0.01, clipnorm=1.0),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    history = model.fit(x, y, sample_weight=w, batch_size=cfg.batch_size, epochs=cfg.epochs,
                        shuffle=True, verbose=2)
    return model, [float(v) for v in history.history["loss"]]


def batch_greedy(model: Any, prompts: Sequence[Sequence[int]]) -> list[list[int]]:
    """Greedy replies of the training model for many prompts at once (right padding is safe:
    the model is causal, so a row's logits at its last token ignore the padding after it)."""
    width = max(len(p) for p in prompts) + MAX_NEW_TOKENS
    buffer = np.full((len(prompts), width), PAD_ID, np.int32)
    lengths = np.array([len(p) for p in prompts])
    for row, prompt in enumerate(prompts):
        buffer[row, : len(prompt)] = prompt
    replies: list[list[int]] = [[] for _ in prompts]
    done = np.zeros(len(prompts), bool)
    for _ in range(MAX_NEW_TOKENS):
        logits = np.asarray(model(buffer, training=False))
        chosen = logits[np.arange(len(prompts)), lengths - 1].argmax(-1)
        for row in np.flatnonzero(~done):
            replies[row].append(int(chosen[row]))
            done[row] = chosen[row] == EOS_ID
            buffer[row, lengths[row]] = chosen[row]
        lengths += 1
        if done.all():
            break
    return replies


def exact_match(model: Any, tokenizer: Any, pairs: Sequence[tuple[str, str]]) -> float:
    replies = batch_greedy(model, [prompt_ids(tokenizer, command) for command, _ in pairs])
    hits = sum(ids[-1:] == [EOS_ID] and reply_text(tokenizer, ids) == reply
               for ids, (_, reply) in zip(replies, pairs))
    return hits / len(pairs)


# ----------------------------------------------------------------------------- references

def versions() -> dict[str, str]:
    return {"python": platform.python_version(), "tensorflow": tf.__version__,
            "keras": keras.__version__, "sentencepiece": sentencepiece.__version__,
            "numpy": np.__version__}


def reference_prompts(run: RunFn, spec: LMSpec, tokenizer: Any) -> list[dict[str, Any]]:
    """The test prompts through the reference loop over the TensorFlow model."""
    cases = []
    for command in TEST_PROMPTS:
        ids = prompt_ids(tokenizer, command)
        generation = greedy_generate(run, spec, ids, MAX_NEW_TOKENS)
        top5 = np.argsort(-generation.first_logits, kind="stable")[:5]
        cases.append({
            "prompt": command, "prompt_ids": ids, "prefill": generation.prefill,
            "reference_ids": generation.ids, "reply": reply_text(tokenizer, generation.ids),
            "first_step_top5": {"ids": [int(i) for i in top5],
                                "logits": [round(float(generation.first_logits[i]), 5)
                                           for i in top5]},
        })
    return cases


def reply_text(tokenizer: Any, ids: Sequence[int]) -> str:
    text: str = tokenizer.decode([t for t in ids if t != EOS_ID])
    return text


def model_section(net: Network, file: str) -> dict[str, Any]:
    cfg = net.config
    return {"file": file, "cache_layout": cfg.cache_layout, "num_layers": cfg.num_layers,
            "num_heads": cfg.num_heads, "head_dim": cfg.head_dim, "d_model": cfg.d_model,
            "context_length": cfg.context_length, "prefill_lengths": list(cfg.prefill_lengths),
            "mask_input": cfg.mask_input, "mask_value": MASK_VALUE if cfg.mask_input else None,
            "parameters": net.parameters()}


def tokenizer_section(tokenizer: Any) -> dict[str, Any]:
    return {"file": TOKENIZER_FILE, "type": "sentencepiece-bpe",
            "vocab_size": tokenizer.get_piece_size(), "bos_id": BOS_ID, "eos_id": EOS_ID,
            "pad_id": PAD_ID, "unk_id": UNK_ID, "stop_ids": [EOS_ID],
            "user_defined_symbols": [USER_MARKER, BOT_MARKER]}


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    """Indented JSON with every list of numbers on one line."""
    text = json.dumps(data, indent=1)
    text = re.sub(r"\[\s*([-0-9.e,\s]+?)\s*\]",
                  lambda m: "[" + ", ".join(m.group(1).replace(",", " ").split()) + "]", text)
    path.write_text(text + "\n")


def export_variant(net: Network, spec: LMSpec, tokenizer: Any, cases: list[dict[str, Any]],
                   header: dict[str, Any], outdir: Path, workdir: Path, int8: bool,
                   per_channel_dense: bool = False) -> None:
    """Write ``<name>[_int8].tflite`` and its reference JSON, after running it in TFLite: a
    float model must give the TensorFlow tokens exactly; for int8 the agreement is recorded.

    With ``per_channel_dense``, ``<name>_int8_fc12.tflite``: int8 as TensorFlow converts by
    default, which needs UNSUPPORTED_OP at UNSUPPORTED_OP_VERSION; its reference JSON records
    that, and that tflite-runtime refuses it (check_lm_fixtures.py checks the refusal there and
    the agreement in runtimes that have the op)."""
    name = net.config.name + (UNSUPPORTED_OP_SUFFIX if per_channel_dense else
                              "_int8" if int8 else "")
    file = f"{name}.tflite"
    content = convert(net, spec, workdir, int8, per_channel_dense)
    needed = operator_versions(content)
    if per_channel_dense and needed.get(UNSUPPORTED_OP) != UNSUPPORTED_OP_VERSION:
        raise SystemExit(f"{file}: needs {UNSUPPORTED_OP} version {needed.get(UNSUPPORTED_OP)}, "
                         f"expected {UNSUPPORTED_OP_VERSION}: this TensorFlow converts "
                         "differently, so the file would not test what it is for")
    (outdir / file).write_bytes(content)
    run = signature_runner(tf.lite.Interpreter(model_content=content, num_threads=1))
    produced = [greedy_generate(run, spec, c["prompt_ids"], MAX_NEW_TOKENS).ids for c in cases]
    reference = {"model": model_section(net, file), **header,
                 "sha256": {f: sha256_file(outdir / f) for f in (file, TOKENIZER_FILE)}}
    if int8:
        rates = [agreement(c["reference_ids"], ids) for c, ids in zip(cases, produced)]
        rate = sum(rates) / len(rates)
        reference["int8"] = {
            "quantization": "dynamic-range: int8 weights (per-"
                            f"{'channel' if per_channel_dense else 'tensor'} for dense layers), "
                            "float activations",
            "float_reference": f"{net.config.name}.reference.json",
            "measured_with": f"tf.lite.Interpreter {tf.__version__}",
            "agreement": rate, "required_agreement": rate,
        }
        if per_channel_dense:
            reference["unsupported_op"] = {
                "purpose": "a release whose model needs an op version the target runtime lacks: "
                           "refused at build time naming the op, and on the device",
                "op": UNSUPPORTED_OP, "version": UNSUPPORTED_OP_VERSION,
                "refused_by": "tflite-runtime",
                "error": f"Didn't find op for builtin opcode '{UNSUPPORTED_OP}' version "
                         f"'{UNSUPPORTED_OP_VERSION}'",
                "loads_in": ["ai-edge-litert", "tensorflow"],
                "operator_versions": needed,
            }
        reference["prompts"] = [
            {**c, "int8_ids": ids, "int8_reply": reply_text(tokenizer, ids),
             "agreement": r} for c, ids, r in zip(cases, produced, rates)]
        print(f"{file}: greedy agreement {rate:.3f} with the float reference")
    else:
        differing = [c["prompt"] for c, ids in zip(cases, produced) if ids != c["reference_ids"]]
        if differing:
            raise SystemExit(f"{file}: TFLite greedy tokens differ from TensorFlow's for "
                             f"{differing}")
        reference["prompts"] = cases
    write_json(outdir / f"{name}.reference.json", reference)
    print(f"{file}: {len(content)} bytes")


# ----------------------------------------------------------------------------- main

def build(outdir: Path, seed: int) -> None:
    """Train and export everything into ``outdir``; raises SystemExit if a check fails."""
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()
    outdir.mkdir(parents=True, exist_ok=True)
    pairs = dialogues(seed, TRAIN_DIALOGUES)
    heldout = dialogues(seed + 1, HELDOUT_DIALOGUES)
    tokenizer_bytes = train_tokenizer([prompt_text(c) + " " + r for c, r in pairs])
    (outdir / TOKENIZER_FILE).write_bytes(tokenizer_bytes)
    tokenizer = sentencepiece.SentencePieceProcessor(model_proto=tokenizer_bytes)
    x, y, w = encode_dialogues(tokenizer, pairs)
    print(f"corpus: {len(pairs)} dialogues ({len(set(pairs))} distinct), "
          f"up to {x.shape[1] + 1} tokens")
    # Exported after every other model: each export traces new Keras layers, whose automatic
    # names (reshape_<n>) end up in the .tflite tensor names, so an export run earlier would
    # change the bytes of the models exported after it.
    last: list[Callable[[], None]] = []
    with tempfile.TemporaryDirectory() as workdir:
        for config in (HOME_LM, ALT_LM):
            keras.utils.set_random_seed(seed)
            net = Network.create(config, tokenizer.get_piece_size(), seed)
            started = time.perf_counter()
            model, losses = train(net, x, y, w)
            seconds = time.perf_counter() - started
            score = exact_match(model, tokenizer, heldout)
            print(f"{config.name}: {net.parameters()} parameters, trained in {seconds:.0f} s, "
                  f"final loss {losses[-1]:.6f}, held-out exact match {score:.3f}")
            spec = config.spec(tokenizer.get_piece_size())
            cases = reference_prompts(tf_runner(export_functions(net, spec)), spec, tokenizer)
            for case in cases:
                print(f"  {case['prompt']!r} -> {case['reply']!r}")
            header = {
                "prompt_template": PROMPT_TEMPLATE,
                "prompt_ids": "[bos_id] + encode(prompt_template.format(prompt=PROMPT))",
                "max_new_tokens": MAX_NEW_TOKENS,
                "tokenizer": tokenizer_section(tokenizer),
                "training": {"seed": seed, "dialogues": len(pairs), "epochs": config.epochs,
                             "steps": config.epochs * -(-len(pairs) // config.batch_size),
                             "batch_size": config.batch_size,
                             "peak_learning_rate": config.learning_rate,
                             "final_loss": round(losses[-1], 6), "heldout_dialogues": len(heldout),
                             "heldout_exact_match": score},
                "versions": versions(),
            }
            for int8 in (False, True) if config.int8_variant else (False,):
                export_variant(net, spec, tokenizer, cases, header, outdir, Path(workdir), int8)
            if config.unsupported_op_variant:
                last.append(functools.partial(export_variant, net, spec, tokenizer, cases, header,
                                              outdir, Path(workdir), int8=True,
                                              per_channel_dense=True))
        for export in last:
            export()


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Train and export the generative-LM fixtures.")
    parser.add_argument("outdir", type=Path, help="where to write them (tests/fixtures/lm)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    args = parser.parse_args(argv)
    build(args.outdir, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
