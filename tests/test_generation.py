"""The generation engine on the real test LMs of tests/fixtures/lm/ (trained with TensorFlow,
greedy references recorded from TensorFlow): exact greedy tokens, stop conditions,
cancellation, the busy answer, concurrency, sampling, long prompts and the memory budget."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fleetlite.agent.lm_service import LmService
from fleetlite.sdk.errors import LmFormatError
from fleetlite.sdk.generation import GenerationSpec, Sampling
from fleetlite.sdk.lm_signature import LmLayout
from fleetlite.sdk.runtime.errors import ModelRuntimeError
from fleetlite.sdk.runtime.interpreter import select_backend
from fleetlite.sdk.runtime.lm_engine import (
    MASKED,
    BusyError,
    GenerateParams,
    GenerationInputError,
    LmEngine,
    MemoryBudgetError,
    PrefillStep,
    causal_mask,
    estimate_memory_bytes,
    plan_prefill,
)
from fleetlite.sdk.runtime.tokenizer import SentencePieceTokenizer

REPO = Path(__file__).resolve().parent.parent
LM = REPO / "tests" / "fixtures" / "lm"
MODELS = REPO / "tests" / "fixtures" / "models"


# -- pure parts --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("count", "lengths", "context", "plan"),
    [
        (0, (8, 32), 128, []),
        (5, (8, 32), 128, [("prefill_8", 0, 8, 5)]),
        (8, (8, 32), 128, [("prefill_8", 0, 8, 8)]),
        (9, (8, 32), 128, [("prefill_32", 0, 32, 9)]),
        (40, (8, 32), 128, [("prefill_32", 0, 32, 32), ("prefill_8", 32, 8, 8)]),
        (70, (8, 32), 128, [("prefill_32", 0, 32, 32), ("prefill_32", 32, 32, 32),
                            ("prefill_8", 64, 8, 6)]),
        (62, (8, 32), 64, [("prefill_32", 0, 32, 32), ("prefill_32", 32, 32, 30)]),
        # The second call of prefill_48 would reach past the context (its cache write would be
        # clamped onto earlier positions): the rest goes through decode, one token at a time.
        (51, (48,), 64, [("prefill_48", 0, 48, 48), ("decode", 48, 1, 1), ("decode", 49, 1, 1),
                         ("decode", 50, 1, 1)]),
    ],
)
def test_prefill_plan(
    count: int, lengths: tuple[int, ...], context: int, plan: list[tuple[str, int, int, int]]
) -> None:
    steps = plan_prefill(count, lengths, context)
    assert steps == [PrefillStep(*step) for step in plan]
    assert all(step.start + step.size <= context for step in steps)
    assert sum(step.filled for step in steps) == count


def test_causal_mask_rows_are_views_of_one_line() -> None:
    mask = causal_mask(6)
    expected = np.where(np.arange(6)[None, :] <= np.arange(6)[:, None], 0.0, MASKED)
    np.testing.assert_array_equal(mask, expected.astype(np.float32))
    low, high = np.byte_bounds(mask)
    assert high - low == (2 * 6 - 1) * 4  # the whole matrix spans 2T-1 floats, not T*T
    row = mask[3].reshape(1, 1, 1, -1)  # what decode at position 3 gets: no copy
    assert row.flags.c_contiguous and np.shares_memory(row, mask)
    assert not mask.flags.writeable


def test_memory_estimate_counts_model_caches_and_logits() -> None:
    layout = LmLayout(num_layers=2, cache_layout="default", num_heads=4, head_dim=32,
                      context_length=128, vocab_size=512, prefill_lengths=(8, 32),
                      has_mask=False)
    one_set = 2 * 2 * 128 * 4 * 32 * 4  # K and V of 2 layers, float32
    # decode + 2 prefills, inputs and outputs each; zero, current and next caches; logits
    assert estimate_memory_bytes(1000, layout) == 1000 + 9 * one_set + 4 * 512


@pytest.mark.parametrize(
    ("field", "value", "problem"),
    [("temperature", -0.5, "temperature"), ("top_k", -1, "top_k"), ("top_p", 0.0, "top_p"),
     ("top_p", 1.5, "top_p"), ("max_tokens", 0, "max_tokens"), ("seed", -3, "seed"),
     ("stop_ids", (-1,), "stop_ids"), ("stop_strings", ("",), "stop_strings")],
)
def test_bad_generation_parameters_are_refused(field: str, value: Any, problem: str) -> None:
    with pytest.raises(GenerationInputError, match=f"invalid generation parameters: {problem}"):
        GenerateParams(**{field: value})


def test_parameters_default_to_the_release_sampling() -> None:
    sampling = Sampling(temperature=0.7, top_k=40, top_p=0.9, max_tokens=12)
    params = GenerateParams.from_sampling(sampling)
    assert (params.temperature, params.top_k, params.top_p, params.max_tokens) == (
        0.7, 40, 0.9, 12
    )
    assert GenerateParams() == GenerateParams.from_sampling(Sampling())


# -- the real models -----------------------------------------------------------------------------


def reference(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((LM / f"{name}.reference.json").read_text())
    return data


def spec_of(ref: dict[str, Any], **overrides: Any) -> GenerationSpec:
    model, tokenizer = ref["model"], ref["tokenizer"]
    fields: dict[str, Any] = {
        "tokenizer": tokenizer["file"],
        "tokenizer_kind": "sentencepiece",
        "prompt_template": ref["prompt_template"],
        "bos_id": tokenizer["bos_id"],
        "stop_ids": tuple(tokenizer["stop_ids"]),
        "context_length": model["context_length"],
        "cache_layout": model["cache_layout"],
        "num_layers": model["num_layers"],
        "vocab_size": tokenizer["vocab_size"],
        "prefill_lengths": tuple(model["prefill_lengths"]),
        "sampling": Sampling(max_tokens=ref["max_new_tokens"]),
    }
    return GenerationSpec(**{**fields, **overrides})


def load(name: str, **kwargs: Any) -> LmEngine:
    ref = reference(name)
    tokenizer = SentencePieceTokenizer(LM / ref["tokenizer"]["file"])
    return LmEngine(LM / ref["model"]["file"], spec=spec_of(ref), tokenizer=tokenizer, **kwargs)


@pytest.fixture(scope="module")
def home() -> LmEngine:
    return load("home_lm")


@pytest.fixture(scope="module")
def alt() -> LmEngine:
    return load("alt_lm")


def with_stop(engine: LmEngine, prompt_ids: Sequence[int]) -> list[int]:
    """Greedy ids as the reference loop records them: the stop id that ended it included."""
    generation = engine.generate(prompt_ids)
    ids = list(generation)
    if generation.stats.stop_reason == "stop_token":
        assert engine.spec is not None and len(engine.spec.stop_ids) == 1
        ids.append(engine.spec.stop_ids[0])
    return ids


def decode_only_greedy(engine: LmEngine, prompt_ids: Sequence[int], count: int) -> list[int]:
    """``count`` greedy ids from a fresh decode runner and no engine code: the prompt goes in
    one position at a time, so no prefill signature and no chunking is involved."""
    interpreter = select_backend().interpreter_class(
        model_path=str(engine.origin), num_threads=1
    )
    layout = engine.layout
    t = layout.context_length
    decode = interpreter.get_signature_runner("decode")
    details = decode.get_input_details()
    caches = {name: np.zeros(d["shape"], np.float32)
              for name, d in details.items() if name.startswith("kv_cache_")}

    def mask(positions: np.ndarray) -> dict[str, np.ndarray]:
        if not layout.has_mask:
            return {}
        rows = np.where(np.arange(t)[None, :] <= positions[:, None], 0.0, -1e9)
        return {"mask": rows.astype(np.float32)[None, None]}

    for position, token in enumerate(prompt_ids[:-1]):
        positions = np.array([position], np.int32)
        out = decode(tokens=np.array([[token]], np.int32), input_pos=positions,
                     **mask(positions), **caches)
        caches = {name: out[name] for name in caches}
    ids: list[int] = []
    token, position = prompt_ids[-1], len(prompt_ids) - 1
    while len(ids) < count and position < t:
        positions = np.array([position], np.int32)
        out = decode(tokens=np.array([[token]], np.int32), input_pos=positions,
                     **mask(positions), **caches)
        caches = {name: out[name] for name in caches}
        token, position = int(np.argmax(out["logits"])), position + 1
        ids.append(token)
    return ids


@pytest.mark.parametrize("name", ["home_lm", "alt_lm"])
def test_float_greedy_tokens_equal_the_tensorflow_reference(name: str) -> None:
    engine = load(name)
    ref = reference(name)
    assert engine.layout.cache_layout == ref["model"]["cache_layout"]
    assert engine.layout.has_mask == ref["model"]["mask_input"]
    assert engine.layout.num_layers == ref["model"]["num_layers"]
    for case in ref["prompts"]:
        assert engine.encode_prompt(case["prompt"]) == case["prompt_ids"]
        assert with_stop(engine, case["prompt_ids"]) == case["reference_ids"], case["prompt"]


@pytest.mark.parametrize("name", ["home_lm", "alt_lm"])
def test_streamed_text_is_the_reference_reply(name: str) -> None:
    engine = load(name)
    ref = reference(name)
    for case in ref["prompts"]:
        stream = engine.stream(case["prompt"])
        assert "".join(chunk.text for chunk in stream) == case["reply"]
        replied = [t for t in case["reference_ids"] if t not in ref["tokenizer"]["stop_ids"]]
        assert stream.stats.generated_tokens == len(replied)


def agreement(reference_ids: Sequence[int], ids: Sequence[int]) -> float:
    """The common prefix over the longer sequence (as the fixture's reference defines it)."""
    same = 0
    for a, b in zip(reference_ids, ids):
        if a != b:
            break
        same += 1
    return same / max(len(reference_ids), len(ids), 1)


def test_int8_reaches_its_recorded_agreement() -> None:
    engine = load("home_lm_int8")
    ref = reference("home_lm_int8")
    rates = [agreement(case["reference_ids"], with_stop(engine, case["prompt_ids"]))
             for case in ref["prompts"]]
    assert sum(rates) / len(rates) >= ref["int8"]["required_agreement"]


# -- stop conditions, cancellation -------------------------------------------------------------


def first_case(name: str = "home_lm") -> dict[str, Any]:
    case: dict[str, Any] = reference(name)["prompts"][0]
    return case


def test_stop_id_ends_the_generation_without_being_yielded(home: LmEngine) -> None:
    case = first_case()
    expected = case["reference_ids"]
    cut = next(i for i in range(2, len(expected)) if expected[i] not in expected[:i])
    generation = home.generate(case["prompt_ids"], GenerateParams(stop_ids=(expected[cut],)))
    assert list(generation) == expected[:cut]
    assert generation.stats.stop_reason == "stop_token"
    assert generation.stats.generated_tokens == cut


def test_stop_string_cuts_the_text_before_it(home: LmEngine) -> None:
    case = first_case()
    reply = case["reply"]
    stop = reply[len(reply) // 2 : len(reply) // 2 + 3]
    stream = home.stream(case["prompt"], GenerateParams(stop_strings=(stop,)))
    text = "".join(chunk.text for chunk in stream)
    assert text == reply[: reply.index(stop)]
    assert stream.stats.stop_reason == "stop_string"
    assert stream.stats.generated_tokens < len(case["reference_ids"]) - 1


def test_max_tokens_limits_the_reply(home: LmEngine) -> None:
    case = first_case()
    generation = home.generate(case["prompt_ids"], GenerateParams(max_tokens=3))
    assert list(generation) == case["reference_ids"][:3]
    assert generation.stats.stop_reason == "max_tokens"


def test_cancel_after_the_second_token_stops_the_generation(home: LmEngine) -> None:
    case = first_case()
    cancel = threading.Event()
    generation = home.generate(case["prompt_ids"], cancel=cancel)
    received = []
    for token in generation:
        received.append(token)
        if len(received) == 2:
            cancel.set()
    assert received == case["reference_ids"][:2]
    assert generation.stats.stop_reason == "cancelled"
    assert generation.stats.generated_tokens == 2


def test_stats_describe_the_generation(home: LmEngine) -> None:
    case = first_case()
    generation = home.generate(case["prompt_ids"])
    ids = list(generation)
    stats = generation.stats
    assert stats.prompt_tokens == len(case["prompt_ids"])
    assert stats.generated_tokens == len(ids)
    assert len(stats.decode_ms) == len(ids) + (stats.stop_reason == "stop_token")
    assert stats.time_to_first_token_ms is not None and stats.time_to_first_token_ms > 0
    assert stats.prefill_tokens_per_s is not None and stats.prefill_tokens_per_s > 0
    assert stats.decode_tokens_per_s is not None and stats.decode_tokens_per_s > 0


# -- prompts and context ------------------------------------------------------------------------


def long_prompt(engine: LmEngine, words: int) -> list[int]:
    text = " and ".join(case["prompt"] for case in reference("home_lm")["prompts"] * 4)
    ids = engine.encode_prompt(" ".join(text.split()[:words]))
    return ids


@pytest.mark.parametrize(("name", "words"), [("home_lm", 30), ("home_lm", 60), ("alt_lm", 30)])
def test_prompts_longer_than_a_prefill_length_are_prefilled_in_chunks(
    name: str, words: int
) -> None:
    engine = load(name)
    prompt = long_prompt(engine, words)
    assert len(prompt) - 1 > max(engine.layout.prefill_lengths)
    ids = list(engine.generate(prompt, GenerateParams(max_tokens=8)))
    # Against the same model driven one position at a time through decode, without the engine.
    assert ids and ids == decode_only_greedy(engine, prompt, 8)[: len(ids)]


@pytest.mark.parametrize(("name", "lengths"), [("alt_lm", ()), ("home_lm", (8,))])
def test_an_engine_may_use_fewer_prefill_signatures(name: str, lengths: tuple[int, ...]) -> None:
    engine = load(name, prefill_lengths=lengths)
    prompt = long_prompt(engine, 30)
    ids = list(engine.generate(prompt, GenerateParams(max_tokens=8)))
    assert ids and ids == decode_only_greedy(engine, prompt, 8)[: len(ids)]
    assert engine.memory_estimate < load(name).memory_estimate  # fewer arenas hold caches


def test_a_prefill_length_the_model_lacks_is_refused() -> None:
    with pytest.raises(ModelRuntimeError, match=r"no prefill signature of length 16; choose "
                       r"prefill lengths among \[8, 32\]"):
        load("home_lm", prefill_lengths=(8, 16))


def test_a_prompt_that_fills_the_context_gets_one_token(alt: LmEngine) -> None:
    prompt = long_prompt(alt, 200)[: alt.layout.context_length]
    generation = alt.generate(prompt)
    ids = list(generation)
    assert (len(ids), generation.stats.stop_reason) in ((1, "context_full"), (0, "stop_token"))


def test_a_prompt_longer_than_the_context_is_refused(alt: LmEngine) -> None:
    prompt = long_prompt(alt, 200)[: alt.layout.context_length + 1]
    with pytest.raises(GenerationInputError, match=r"the prompt is 65 tokens but the model's "
                       r"context holds 64 .*shorten the prompt"):
        alt.generate(prompt)


@pytest.mark.parametrize(
    ("prompt", "match"),
    [([], "the prompt has no tokens"), ([2, 512], "prompt token id 512 is outside")],
)
def test_bad_prompt_ids_are_refused(home: LmEngine, prompt: list[int], match: str) -> None:
    with pytest.raises(GenerationInputError, match=match):
        home.generate(prompt)


# -- sampling --------------------------------------------------------------------------------


def test_seeded_sampling_is_reproducible(home: LmEngine) -> None:
    # A request unlike the training data, so the model is unsure and the draws differ.
    prompt = home.encode_prompt("purple monkey dishwasher")

    def sample(seed: int) -> list[int]:
        params = GenerateParams(temperature=1.0, top_k=50, top_p=0.95, seed=seed, max_tokens=16)
        return list(home.generate(prompt, params))

    runs = {seed: sample(seed) for seed in range(6)}
    assert sample(3) == runs[3]
    assert len({tuple(ids) for ids in runs.values()}) > 1  # the seed matters


# -- one generation at a time ------------------------------------------------------------------


def test_an_engine_runs_one_generation_at_a_time(home: LmEngine) -> None:
    case = first_case()
    with home.generate(case["prompt_ids"]) as first:
        next(first)
        second = home.generate(case["prompt_ids"])
        with pytest.raises(BusyError, match="LmService"):
            next(second)
    assert list(home.generate(case["prompt_ids"], GenerateParams(max_tokens=2))) == (
        case["reference_ids"][:2]
    )


def wait_until(condition: Any, polls: int = 12000) -> None:
    """Poll ``condition`` every 5 ms; fail instead of hanging if it never holds."""
    pause = threading.Event()
    for _ in range(polls):
        if condition():
            return
        pause.wait(0.005)
    raise AssertionError("the condition never held")


def test_the_service_answers_busy_when_its_queue_is_full(home: LmEngine) -> None:
    case = first_case()
    service = LmService(home, max_queue=1)
    results: list[list[int]] = []
    with service.generate(case["prompt_ids"]) as running:
        next(running)  # the engine is taken
        waiter = threading.Thread(
            target=lambda: results.append(list(service.generate(case["prompt_ids"])))
        )
        waiter.start()
        wait_until(lambda: service.waiting == 1)
        with pytest.raises(BusyError, match=r"busy: one generation running and 1 waiting"):
            service.generate(case["prompt_ids"])
        with pytest.raises(GenerationInputError):  # a bad prompt is refused before any queue
            service.generate([])
    waiter.join(timeout=60)
    assert results == [list(case["reference_ids"][:-1])]


def test_a_caller_cancelled_while_waiting_leaves_the_queue(home: LmEngine) -> None:
    case = first_case()
    service = LmService(home, max_queue=2)
    cancel = threading.Event()
    outcome: list[Any] = []
    with service.generate(case["prompt_ids"]) as running:
        next(running)

        def wait_then_give_up() -> None:
            generation = service.generate(case["prompt_ids"], cancel=cancel)
            outcome.append((list(generation), generation.stats.stop_reason))

        waiter = threading.Thread(target=wait_then_give_up)
        waiter.start()
        wait_until(lambda: service.waiting == 1)
        cancel.set()
        waiter.join(timeout=60)
    assert outcome == [([], "cancelled")]
    assert service.waiting == 0
    assert list(service.generate(case["prompt_ids"], GenerateParams(max_tokens=2))) == (
        case["reference_ids"][:2]
    )


def test_an_abandoned_generation_frees_the_service(home: LmEngine) -> None:
    case = first_case()
    service = LmService(home, max_queue=0)
    generation = service.generate(case["prompt_ids"])
    next(generation)
    del generation  # dropped mid-way without close(): the service must not stay taken
    assert list(service.generate(case["prompt_ids"], GenerateParams(max_tokens=2))) == (
        case["reference_ids"][:2]
    )


def test_ten_concurrent_callers_all_get_the_greedy_reply(home: LmEngine) -> None:
    case = first_case()
    service = LmService(home, max_queue=9)
    start = threading.Barrier(10)
    replies: list[str] = []
    errors: list[BaseException] = []

    def ask() -> None:
        start.wait()
        try:
            replies.append("".join(chunk.text for chunk in service.stream(case["prompt"])))
        except BaseException as exc:  # reported below, with the others' results
            errors.append(exc)

    threads = [threading.Thread(target=ask) for _ in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert errors == []
    assert replies == [case["reply"]] * 10


# -- loading ---------------------------------------------------------------------------------------


def test_memory_budget_refusal_names_both_numbers() -> None:
    size_mib = (LM / "home_lm.tflite").stat().st_size / 2**20
    with pytest.raises(MemoryBudgetError, match=r"need about [\d.]+ MiB, more than the memory "
                       r"budget of 0\.5 MiB"):
        load("home_lm", memory_budget_mib=0.5)
    engine = load("home_lm", memory_budget_mib=size_mib + 8)
    assert size_mib * 2**20 < engine.memory_estimate < (size_mib + 8) * 2**20


def test_a_spec_that_disagrees_with_the_model_is_refused() -> None:
    ref = reference("home_lm")
    tokenizer = SentencePieceTokenizer(LM / ref["tokenizer"]["file"])
    with pytest.raises(LmFormatError, match="context_length is 256 but the model has 128"):
        LmEngine(LM / "home_lm.tflite", spec=spec_of(ref, context_length=256),
                 tokenizer=tokenizer)


def test_a_classifier_is_not_a_language_model() -> None:
    with pytest.raises(LmFormatError) as caught:
        LmEngine(MODELS / "intent_classifier.tflite")
    assert caught.value.reason == "missing_decode"


def test_token_level_engine_has_no_text_stream() -> None:
    engine = LmEngine(LM / "home_lm.tflite")
    case = first_case()
    ids: Iterator[int] = engine.generate(case["prompt_ids"], GenerateParams(max_tokens=4))
    assert list(ids) == case["reference_ids"][:4]
    with pytest.raises(ModelRuntimeError, match="needs the release's generation metadata"):
        engine.stream("turn off the kitchen lights")
