"""Check the committed generative-LM fixtures (tests/fixtures/lm/) against their reference JSON.

python -m fleetlite.tools.check_lm_fixtures [DIR]    exit 0 when every check passes, 1 otherwise

No TensorFlow: numpy, the TFLite runtime the agent selects ($FLEETLITE_RUNTIME or the first
installed) and sentencepiece. For each ``*.reference.json`` it checks the sha256 of every
artifact; the signature convention (``prefill_<N>`` and ``decode``, their tensor names, shapes and
dtypes, the recorded cache layout); the tokenizer (special ids, vocabulary size = logits size,
the prompts' token ids); and the greedy tokens: a float model reproduces the TensorFlow tokens
exactly, also when prefill's ``input_pos`` is zero-padded the way LiteRT-LM pads it, and an int8
model reaches its recorded agreement with them. A model whose reference records an
``unsupported_op`` (home_lm_int8_fc12: FULLY_CONNECTED version 12) must instead be refused by the
runtime it names, with an error naming that op and version; other runtimes must load and run it.
:func:`greedy_generate` is also the loop tools/train_lm.py runs over the TensorFlow model to
record those tokens.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import numpy.typing as npt

import fleetlite.fleet

# fleet/lm/ (tests/fixtures/lm links to it): shipped with the package, so `fleetlite demo` has it
FIXTURES = Path(fleetlite.fleet.__file__).resolve().parent / "lm"
REFERENCE_SUFFIX = ".reference.json"
LAYOUTS = ("default", "transposed")
# The additive mask value for a position a query must not see (0.0 where it may).
MASK_VALUE = -1e9

Array = npt.NDArray[Any]
# (signature name, inputs by name) -> outputs by name: a TFLite signature runner or a TF function.
RunFn = Callable[[str, Mapping[str, Array]], Mapping[str, Array]]
Shape = tuple[int, ...]
TensorSpecs = dict[str, tuple[Shape, str]]


@dataclass(frozen=True)
class LMSpec:
    """The shape of one exported decoder, as its reference JSON records it."""

    cache_layout: str
    num_layers: int
    num_heads: int
    head_dim: int
    context_length: int
    prefill_lengths: tuple[int, ...]
    vocab_size: int
    mask_input: bool
    stop_ids: tuple[int, ...]

    @classmethod
    def from_reference(cls, reference: Mapping[str, Any]) -> LMSpec:
        model, tokenizer = reference["model"], reference["tokenizer"]
        return cls(
            cache_layout=str(model["cache_layout"]),
            num_layers=int(model["num_layers"]),
            num_heads=int(model["num_heads"]),
            head_dim=int(model["head_dim"]),
            context_length=int(model["context_length"]),
            prefill_lengths=tuple(int(n) for n in model["prefill_lengths"]),
            vocab_size=int(tokenizer["vocab_size"]),
            mask_input=bool(model["mask_input"]),
            stop_ids=tuple(int(i) for i in tokenizer["stop_ids"]),
        )

    def cache_shapes(self) -> dict[str, Shape]:
        """Cache tensor name -> shape, layer by layer."""
        t, h, d = self.context_length, self.num_heads, self.head_dim
        k_shape, v_shape = (1, t, h, d), (1, t, h, d)
        if self.cache_layout == "transposed":
            k_shape, v_shape = (1, h, t, d), (1, h, d, t)
        shapes: dict[str, Shape] = {}
        for layer in range(self.num_layers):
            shapes[f"kv_cache_k_{layer}"] = k_shape
            shapes[f"kv_cache_v_{layer}"] = v_shape
        return shapes

    def signatures(self) -> dict[str, tuple[TensorSpecs, TensorSpecs]]:
        """Signature name -> (inputs, outputs), each tensor name -> (shape, dtype)."""
        caches = {name: (shape, "float32") for name, shape in self.cache_shapes().items()}
        lengths = [(f"prefill_{n}", n) for n in self.prefill_lengths] + [("decode", 1)]
        result = {}
        for name, n in lengths:
            inputs: TensorSpecs = {"tokens": ((1, n), "int32"), "input_pos": ((n,), "int32")}
            inputs.update(caches)
            if self.mask_input:
                inputs["mask"] = ((1, 1, n, self.context_length), "float32")
            outputs = dict(caches)
            if name == "decode":
                outputs["logits"] = ((1, 1, self.vocab_size), "float32")
            result[name] = (inputs, outputs)
        return result

    def prefill_length(self, prompt_length: int) -> int:
        """The smallest prefill length that holds a prompt's first ``prompt_length - 1`` tokens."""
        fits = [n for n in sorted(self.prefill_lengths) if n >= prompt_length - 1]
        if not fits:
            raise ValueError(f"a prompt of {prompt_length} tokens exceeds every prefill length "
                             f"{self.prefill_lengths}")
        return fits[0]


@dataclass(frozen=True)
class Generation:
    """One greedy run: the prefill signature used, new token ids (with the stop id) and the
    logits of the first decode step."""

    prefill: str
    ids: list[int]
    first_logits: Array


def causal_mask(input_pos: Array, context_length: int) -> Array:
    """The additive mask [1, 1, N, T]: 0.0 where cache position <= the query's position."""
    visible = np.arange(context_length)[None, :] <= np.asarray(input_pos)[:, None]
    mask: Array = np.where(visible, 0.0, MASK_VALUE).astype(np.float32)
    return mask[None, None]


def greedy_generate(
    run: RunFn,
    spec: LMSpec,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    *,
    zero_pad_positions: bool = False,
) -> Generation:
    """The reference loop: prefill ``prompt_ids[:-1]`` zero-padded to N, the smallest prefill
    length that holds it, with input_pos = arange(N) (with ``zero_pad_positions``, the padded
    rows' positions are 0, as LiteRT-LM sends them); then decode from the last prompt token at
    position len-1, feeding each argmax back at the next position until a stop id or
    ``max_new_tokens`` new tokens.
    """
    caches: dict[str, Array] = {
        name: np.zeros(shape, np.float32) for name, shape in spec.cache_shapes().items()
    }
    head = list(prompt_ids[:-1])
    n = spec.prefill_length(len(prompt_ids))
    tokens = np.zeros((1, n), np.int32)
    tokens[0, : len(head)] = head
    positions = np.arange(n, dtype=np.int32)
    if zero_pad_positions:
        positions[len(head):] = 0
    inputs: dict[str, Array] = {"tokens": tokens, "input_pos": positions}
    if spec.mask_input:
        inputs["mask"] = causal_mask(positions, spec.context_length)
    prefill = f"prefill_{n}"
    outputs = run(prefill, {**inputs, **caches})
    caches = {name: outputs[name] for name in caches}
    token, position = int(prompt_ids[-1]), len(prompt_ids) - 1
    ids: list[int] = []
    first_logits: Optional[Array] = None
    while len(ids) < max_new_tokens and position < spec.context_length:
        inputs = {"tokens": np.array([[token]], np.int32),
                  "input_pos": np.array([position], np.int32)}
        if spec.mask_input:
            inputs["mask"] = causal_mask(inputs["input_pos"], spec.context_length)
        outputs = run("decode", {**inputs, **caches})
        caches = {name: outputs[name] for name in caches}
        logits = np.asarray(outputs["logits"])[0, 0]
        if first_logits is None:
            first_logits = logits.copy()
        token, position = int(np.argmax(logits)), position + 1
        ids.append(token)
        if token in spec.stop_ids:
            break
    if first_logits is None:
        raise ValueError("the prompt leaves no room in the context to decode")
    return Generation(prefill, ids, first_logits)


def agreement(reference: Sequence[int], candidate: Sequence[int]) -> float:
    """Greedy-token agreement: the common prefix over the longer of the two sequences."""
    longest = max(len(reference), len(candidate))
    if longest == 0:
        return 1.0
    same = 0
    for a, b in zip(reference, candidate):
        if a != b:
            break
        same += 1
    return same / longest


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def signature_problems(interpreter: Any, spec: LMSpec) -> list[str]:
    """How ``interpreter``'s signatures depart from the convention ``spec`` describes."""
    expected = spec.signatures()
    found = interpreter.get_signature_list()
    if set(found) != set(expected):
        return [f"signatures {sorted(found)}, expected {sorted(expected)}"]
    problems = []
    for name, (inputs, outputs) in expected.items():
        runner = interpreter.get_signature_runner(name)
        for kind, want, details in (("inputs", inputs, runner.get_input_details()),
                                    ("outputs", outputs, runner.get_output_details())):
            got = {key: (tuple(int(d) for d in value["shape"]), np.dtype(value["dtype"]).name)
                   for key, value in details.items()}
            if got != want:
                problems.append(f"{name} {kind} {got}, expected {want}")
    return problems


def signature_runner(interpreter: Any) -> RunFn:
    """A :data:`RunFn` over ``interpreter``'s signature runners."""
    runners: dict[str, Any] = {}

    def run(name: str, inputs: Mapping[str, Array]) -> Mapping[str, Array]:
        if name not in runners:
            runners[name] = interpreter.get_signature_runner(name)
        outputs: Mapping[str, Array] = runners[name](**inputs)
        return outputs

    return run


def refusal_check(backend: Any, path: Path,
                  unsupported: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """``backend`` must refuse to load ``path``, which needs an op version it lacks, with an
    error naming the op and the version: (problems, notes)."""
    op, version = str(unsupported["op"]), int(unsupported["version"])
    label = f"{path.name} on {backend.name} {backend.version}"
    try:
        backend.interpreter_class(model_path=str(path), num_threads=1)
    except (ValueError, RuntimeError) as exc:
        text = str(exc).strip()
        first_line = text.splitlines()[0] if text else type(exc).__name__
        if re.search(rf"\b{re.escape(op)}\b\W+version\W+{version}\b", text):
            return [], [f"{label}: refused as recorded ({first_line})"]
        return [f"{label}: refused, but the error does not name {op} version {version}: "
                f"{first_line}"], []
    return [f"{label}: loaded, but it needs {op} version {version}, which "
            f"{unsupported['refused_by']} is recorded to lack"], []


def _tokenizer_problems(tokenizer: Any, recorded: Mapping[str, Any]) -> list[str]:
    found = {"vocab_size": tokenizer.get_piece_size(), "bos_id": tokenizer.bos_id(),
             "eos_id": tokenizer.eos_id(), "pad_id": tokenizer.pad_id(),
             "unk_id": tokenizer.unk_id()}
    return [f"tokenizer {key} is {value}, recorded {recorded[key]}"
            for key, value in found.items() if value != recorded[key]]


def check_reference(path: Path) -> tuple[list[str], list[str]]:
    """Check one ``<model>.reference.json`` and its artifacts: (problems, notes)."""
    import sentencepiece

    from fleetlite.sdk.runtime.interpreter import select_backend

    directory = path.parent
    reference = json.loads(path.read_text())
    problems = []
    for name, digest in reference["sha256"].items():
        if not (directory / name).is_file():
            problems.append(f"{name} is missing")
        elif sha256_file(directory / name) != digest:
            problems.append(f"{name}: sha256 differs from the recorded one")
    if problems:
        return problems, []
    spec = LMSpec.from_reference(reference)
    if spec.cache_layout not in LAYOUTS:
        return [f"unknown cache layout {spec.cache_layout!r}, expected one of {LAYOUTS}"], []
    tokenizer = sentencepiece.SentencePieceProcessor(
        model_file=str(directory / reference["tokenizer"]["file"]))
    problems += _tokenizer_problems(tokenizer, reference["tokenizer"])
    model_file = reference["model"]["file"]
    backend = select_backend()
    unsupported = reference.get("unsupported_op")
    if unsupported is not None and backend.name == unsupported["refused_by"]:
        refused, notes = refusal_check(backend, directory / model_file, unsupported)
        return problems + refused, notes
    interpreter = backend.interpreter_class(model_path=str(directory / model_file), num_threads=1)
    problems += signature_problems(interpreter, spec)
    if problems:
        return problems, []
    run = signature_runner(interpreter)
    int8 = reference.get("int8")
    rates = []
    generated, started = 0, time.perf_counter()
    for case in reference["prompts"]:
        prompt = case["prompt"]
        ids = [tokenizer.bos_id(), *tokenizer.encode(reference["prompt_template"].format(
            prompt=prompt))]
        if ids != case["prompt_ids"]:
            problems.append(f"{prompt!r} encodes to {ids}, recorded {case['prompt_ids']}")
            continue
        produced = greedy_generate(run, spec, ids, reference["max_new_tokens"]).ids
        generated += len(produced)
        if int8 is not None:
            rates.append(agreement(case["reference_ids"], produced))
            continue
        if produced != case["reference_ids"]:
            problems.append(f"{prompt!r} gives {produced}, TensorFlow gave {case['reference_ids']}")
        padded = greedy_generate(run, spec, ids, reference["max_new_tokens"],
                                 zero_pad_positions=True).ids
        generated += len(padded)
        if padded != produced:
            problems.append(f"{prompt!r} gives {padded} when prefill's input_pos is zero-padded, "
                            f"{produced} otherwise: cache writes must start at input_pos[0]")
    per_token = 1000 * (time.perf_counter() - started) / max(generated, 1)
    notes = [f"{model_file} on {backend.name} {backend.version}: {generated} tokens generated, "
             f"{per_token:.2f} ms/token (prefill included)"]
    if unsupported is not None:
        notes.append(f"{model_file} loads in {backend.name} {backend.version}, which has "
                     f"{unsupported['op']} version {unsupported['version']} "
                     f"({unsupported['refused_by']} refuses it)")
    if int8 is not None and rates:
        rate, required = sum(rates) / len(rates), float(int8["required_agreement"])
        notes.append(f"{model_file}: greedy agreement {rate:.3f} with the float reference "
                     f"(required {required:.3f})")
        if rate < required:
            problems.append(f"greedy agreement {rate:.3f} < required {required:.3f}")
    return problems, notes


def check_directory(directory: Path) -> tuple[list[str], list[str]]:
    """Check every ``*.reference.json`` in ``directory``: (problems, notes)."""
    references = sorted(directory.glob("*" + REFERENCE_SUFFIX))
    if not references:
        return [f"no *{REFERENCE_SUFFIX} in {directory}"], []
    problems, notes = [], []
    for path in references:
        found, said = check_reference(path)
        problems += [f"{path.name}: {problem}" for problem in found]
        notes += said
    return problems, notes


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Check the generative-LM fixtures.")
    parser.add_argument("directory", nargs="?", type=Path, default=FIXTURES,
                        help="the fixture directory (default: fleet/lm, also tests/fixtures/lm)")
    args = parser.parse_args(argv)
    problems, notes = check_directory(args.directory)
    for note in notes:
        print(note)
    for problem in problems:
        print(f"FAIL {problem}", file=sys.stderr)
    print("ok" if not problems else f"{len(problems)} problem(s); regenerate the fixtures with "
          "tools/train_lm.py (see tests/fixtures/lm/README.md) if the models changed on purpose")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
