"""Token choice (greedy, temperature, top-k, top-p) and stop strings over streamed text."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from fleetlite.sdk.runtime.errors import InferenceError
from fleetlite.sdk.runtime.sampling import StopMatcher, choose_token

DRAWS = 4000


def draw(
    logits: list[float],
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 7,
    draws: int = DRAWS,
) -> Counter[int]:
    """How often each id is chosen in ``draws`` draws from one seeded generator."""
    rng = np.random.default_rng(seed)
    row = np.asarray(logits, dtype=np.float32)
    return Counter(
        choose_token(row, temperature=temperature, top_k=top_k, top_p=top_p, rng=rng)
        for _ in range(draws)
    )


def log_probs(*probs: float) -> list[float]:
    return [float(np.log(p)) for p in probs]


# -- greedy ------------------------------------------------------------------------------------


def test_greedy_is_argmax_and_takes_the_lowest_id_on_ties() -> None:
    rng = np.random.default_rng(0)
    logits = np.array([[[0.1, 2.0, -1.0, 2.0, 1.9]]], dtype=np.float32)  # decode's [1, 1, V]
    assert choose_token(logits, temperature=0.0, top_k=0, top_p=1.0, rng=rng) == 1
    # Greedy ignores top-k/top-p and never touches the generator.
    state = rng.bit_generator.state
    assert choose_token(logits, temperature=0.0, top_k=3, top_p=0.1, rng=rng) == 1
    assert rng.bit_generator.state == state


@pytest.mark.parametrize(
    "logits",
    [[np.nan, 1.0, 2.0], [1.0, np.nan], [-np.inf, -np.inf], [np.nan]],
    ids=["nan-first", "nan-later", "all-minus-inf", "only-nan"],
)
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_logits_without_a_usable_value_are_an_inference_error(
    logits: list[float], temperature: float
) -> None:
    with pytest.raises(InferenceError, match="roll back"):
        choose_token(
            np.asarray(logits, dtype=np.float32),
            temperature=temperature,
            top_k=0,
            top_p=1.0,
            rng=np.random.default_rng(0),
        )


def test_minus_infinity_marks_a_token_never_chosen() -> None:
    counts = draw([0.0, -np.inf, 0.0], temperature=1.0)
    assert set(counts) == {0, 2}


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"),
    [(-0.1, 0, 1.0), (1.0, -1, 1.0), (1.0, 0, 0.0), (1.0, 0, 1.5)],
)
def test_out_of_range_parameters_are_refused(temperature: float, top_k: int, top_p: float) -> None:
    with pytest.raises(ValueError, match="need temperature >= 0"):
        choose_token(
            np.zeros(4, dtype=np.float32),
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            rng=np.random.default_rng(0),
        )


# -- sampling, statistically with fixed seeds ---------------------------------------------------


def test_sampling_follows_the_softmax_at_temperature_one() -> None:
    probs = [0.5, 0.3, 0.15, 0.05]
    counts = draw(log_probs(*probs))
    for token, p in enumerate(probs):
        sd = np.sqrt(p * (1 - p) / DRAWS)
        assert abs(counts[token] / DRAWS - p) < 4 * sd


def test_temperature_sharpens_and_flattens() -> None:
    logits = log_probs(0.6, 0.4)
    hot, cold = draw(logits, temperature=4.0), draw(logits, temperature=0.25)
    # p0 = 0.6**(1/T) / (0.6**(1/T) + 0.4**(1/T)): T=4 -> 0.525, T=0.25 -> 0.835
    assert abs(hot[0] / DRAWS - 0.525) < 0.04
    assert abs(cold[0] / DRAWS - 0.835) < 0.04


def test_temperature_towards_zero_becomes_greedy() -> None:
    logits = [1.0, 1.001, 0.5, -3.0]
    assert draw(logits, temperature=1e-6, draws=500) == Counter({1: 500})


def test_top_k_one_is_greedy_at_any_temperature() -> None:
    logits = log_probs(0.2, 0.3, 0.25, 0.25)
    assert draw(logits, temperature=5.0, top_k=1, draws=500) == Counter({1: 500})


def test_top_k_ties_at_the_cut_go_to_the_lower_ids() -> None:
    counts = draw([1.0, 3.0, 3.0, 3.0, 0.0], top_k=2)
    assert set(counts) == {1, 2}
    assert abs(counts[1] / DRAWS - 0.5) < 0.05


@pytest.mark.parametrize(
    ("top_p", "nucleus"),
    [(0.4, {0}), (0.49, {0}), (0.74, {0, 1}), (0.76, {0, 1, 2}), (0.99, {0, 1, 2, 3}),
     (1.0, {0, 1, 2, 3})],
)
def test_top_p_keeps_exactly_the_nucleus_and_renormalises(top_p: float, nucleus: set[int]) -> None:
    probs = [0.5, 0.25, 0.15, 0.1]
    counts = draw(log_probs(*probs), top_p=top_p)
    assert set(counts) == nucleus
    total = sum(probs[i] for i in nucleus)
    for token in nucleus:
        p = probs[token] / total
        assert abs(counts[token] / DRAWS - p) < 4 * np.sqrt(p * (1 - p) / DRAWS) + 1e-9


def test_top_k_applies_before_top_p() -> None:
    # top_k=2 leaves {0: 0.6/0.9, 1: 0.3/0.9}; the nucleus of 0.6 of those is {0} alone.
    counts = draw(log_probs(0.6, 0.3, 0.1), top_k=2, top_p=0.6)
    assert counts == Counter({0: DRAWS})


def test_the_same_seed_gives_the_same_tokens() -> None:
    logits = np.random.default_rng(3).normal(size=50).astype(np.float32)

    def run(seed: int) -> list[int]:
        rng = np.random.default_rng(seed)
        return [
            choose_token(logits, temperature=0.9, top_k=20, top_p=0.9, rng=rng) for _ in range(40)
        ]

    assert run(11) == run(11)
    assert run(11) != run(12)


@settings(derandomize=True, deadline=None, max_examples=300)
@given(
    logits=arrays(np.float32, st.integers(1, 40), elements=st.floats(-30, 30, width=32)),
    temperature=st.floats(0.01, 5.0),
    top_k=st.integers(0, 45),
    top_p=st.floats(0.01, 1.0),
    seed=st.integers(0, 2**32 - 1),
)
def test_the_chosen_token_is_always_in_the_allowed_set(
    logits: np.ndarray, temperature: float, top_k: int, top_p: float, seed: int
) -> None:
    token = choose_token(
        logits, temperature=temperature, top_k=top_k, top_p=top_p, rng=np.random.default_rng(seed)
    )
    # The allowed set, computed the slow way: rank by (-logit, id), cut to top_k, then to the
    # nucleus (with a little slack for rounding at the nucleus edge).
    ranked = sorted(range(logits.size), key=lambda i: (-float(logits[i]), i))
    if 0 < top_k < logits.size:
        ranked = ranked[:top_k]
    scaled = np.array([float(logits[i]) for i in ranked]) / temperature
    probs = np.exp(scaled - scaled.max())
    cumulative = np.cumsum(probs / probs.sum())
    keep = int(np.searchsorted(cumulative, top_p - 1e-9)) + 2
    assert token in ranked[:keep]
    assert token in ranked


@settings(derandomize=True, deadline=None)
@given(logits=arrays(np.float32, st.integers(1, 40), elements=st.floats(-30, 30, width=32)))
def test_greedy_matches_numpy_argmax(logits: np.ndarray) -> None:
    rng = np.random.default_rng(0)
    assert choose_token(logits, temperature=0.0, top_k=0, top_p=1.0, rng=rng) == int(
        np.argmax(logits)
    )


# -- stop strings --------------------------------------------------------------------------------


def feed_all(matcher: StopMatcher, pieces: list[str]) -> str:
    out = "".join(matcher.feed(piece) for piece in pieces)
    return out if matcher.stopped else out + matcher.flush()


def test_a_stop_string_spanning_pieces_is_cut_and_never_emitted() -> None:
    matcher = StopMatcher(["<|end|>"])
    assert matcher.feed("Lights on. <") == "Lights on. "
    assert matcher.feed("|end") == ""
    assert not matcher.stopped
    assert matcher.feed("|> and more") == ""
    assert matcher.stopped
    assert matcher.feed("later text") == ""


def test_text_that_only_looked_like_a_stop_string_is_released() -> None:
    matcher = StopMatcher(["<|end|>"])
    assert matcher.feed("a <|") == "a "
    assert matcher.feed("en") == ""
    assert matcher.feed("try") == "<|entry"
    assert matcher.feed(" <") == " "
    assert matcher.flush() == "<"


def test_the_stop_string_that_ends_first_wins() -> None:
    assert feed_all(StopMatcher(["\n\n", "User:"]), ["Sure.\nUs", "er: hi\n\n"]) == "Sure.\n"
    # "c" completes before "abcd" could: the reply stops at "c".
    assert feed_all(StopMatcher(["abcd", "c"]), ["xab", "cd"]) == "xab"


def test_empty_stop_strings_are_refused() -> None:
    with pytest.raises(ValueError, match="must not be empty"):
        StopMatcher(["ok", ""])


def cut_at_first_stop(text: str, stops: list[str]) -> str:
    """The text before the first stop string, reading one character at a time."""
    for end in range(1, len(text) + 1):
        starts = [end - len(stop) for stop in stops if text[:end].endswith(stop)]
        if starts:
            return text[: min(starts)]
    return text


@settings(derandomize=True, deadline=None, max_examples=300)
@given(
    text=st.text(alphabet="ab<|>\n", max_size=30),
    stops=st.lists(st.text(alphabet="ab<|>\n", min_size=1, max_size=4), min_size=1, max_size=3),
    cuts=st.lists(st.integers(0, 30), max_size=8),
)
def test_stop_matching_does_not_depend_on_how_text_is_cut(
    text: str, stops: list[str], cuts: list[int]
) -> None:
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    pieces = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    assert feed_all(StopMatcher(stops), pieces) == cut_at_first_stop(text, stops)
