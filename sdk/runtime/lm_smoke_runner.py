"""Run a language model's smoke vectors (:mod:`fleetlite.sdk.lm_smoke`): greedy tokens and the
first step's logits, the same way when the release is built (expected values) and on the device
(the smoke test of an install).

Each case runs greedily for exactly ``len(expected_ids)`` tokens, ignoring stop ids, so a case is
always compared over its whole length.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fleetlite.sdk.lm_smoke import TOP, LmSmokeCase, LmSmokeResult, LmSmokeVectors
from fleetlite.sdk.runtime.interpreter import Array
from fleetlite.sdk.runtime.lm_engine import LmEngine

__all__ = ["greedy_case", "make_vectors", "run_vectors"]


def greedy_case(engine: LmEngine, prompt_ids: Sequence[int], count: int,
                top_ids: Sequence[int] = ()) -> tuple[LmSmokeResult, LmSmokeCase]:
    """``count`` greedy ids after ``prompt_ids`` (stop ids ignored), the first step's logits of
    ``top_ids`` (default: the step's own top ids), as a result and as a smoke case."""
    prompt = [int(t) for t in prompt_ids]
    ids: list[int] = []
    first: Array | None = None
    for step, logits in enumerate(engine.greedy_logits(prompt, count)):
        if step == 0:
            first = np.asarray(logits, dtype=np.float64).reshape(-1)
        ids.append(int(np.argmax(logits)))
    assert first is not None
    top = list(top_ids) or [int(i) for i in np.argsort(-first, kind="stable")[:TOP]]
    values = tuple(float(first[i]) for i in top)
    result = LmSmokeResult(tuple(ids), values, int(np.argmax(first)))
    return result, LmSmokeCase(tuple(prompt), tuple(ids), tuple(top), values)


def make_vectors(engine: LmEngine, prompts: Sequence[Sequence[int]], count: int,
                 min_token_agreement: float = 1.0) -> LmSmokeVectors:
    """The smoke vectors of a release: each prompt's greedy continuation on this model."""
    cases = tuple(greedy_case(engine, prompt, count)[1] for prompt in prompts)
    return LmSmokeVectors(cases, min_token_agreement)


def run_vectors(engine: LmEngine, vectors: LmSmokeVectors) -> list[LmSmokeResult]:
    """What this model produces for each case (to :func:`fleetlite.sdk.lm_smoke.judge`)."""
    return [greedy_case(engine, case.prompt_ids, len(case.expected_ids), case.first_top_ids)[0]
            for case in vectors.cases]
