"""Shadow evaluation against the real interpreter and the project's models: an identical
candidate agrees 100 %, a retrained or fine-tuned one measurably less; the report carries
figures only (no input, output, prompt or text); slow candidates lose samples instead of
queueing them; the CPU budget and the latency back-off hold; the report parses strictly.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fleetlite.agent.errors import AgentConfigError
from fleetlite.agent.lm_service import LmService
from fleetlite.agent.model_service import ModelService
from fleetlite.agent.shadow_runner import LmShadow, ModelShadow, ShadowConfig, ShadowIdentity
from fleetlite.fleet.intent_model import intent_classifier
from fleetlite.sdk.messages import MessageError, encode
from fleetlite.sdk.runtime.interpreter import Model
from fleetlite.sdk.runtime.lm_engine import GenerateParams, LmEngine
from fleetlite.sdk.shadow import STOP, ShadowReport, ShadowStats
from fleetlite.tools.models import heavy_mlp, sensor_autoencoder, sensor_autoencoder_int8
from tests.fuzz_settings import fuzz, parse_or_refuse
from tests.test_generation import load

IDENTITY = ShadowIdentity(device_id="gw-1", release_id="ab" * 32, model="m", version=2,
                          active_version=1)
#: every request, no budget and no back-off: for the tests of agreement
ALL = ShadowConfig(sample_rate=1.0, cpu_budget=1.0, burst_s=60.0, queue_size=1024,
                   p95_budget_ratio=1000.0)
PROMPTS = ("turn off the kitchen lights", "set the bedroom heating to 20 degrees",
           "is the front door locked")
#: the only fields a shadow report may carry as text
IDENTITY_FIELDS = {"schema", "device_id", "release_id", "model", "kind"}


def write(tmp_path: Path, name: str, content: bytes) -> Path:
    path = tmp_path / f"{name}.tflite"
    path.write_bytes(content)
    return path


def serve(tmp_path: Path, content: bytes) -> ModelService:
    service = ModelService()
    service.activate("m", write(tmp_path, "active", content), version=1)
    return service


def token_inputs(count: int, seed: int = 1) -> list[npt.NDArray[np.int32]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 40, size=(1, 16)).astype(np.int32) for _ in range(count)]


def sensor_inputs(count: int, seed: int = 2) -> list[npt.NDArray[np.float32]]:
    rng = np.random.default_rng(seed)
    return [rng.uniform(-1.5, 1.5, size=(1, 16)).astype(np.float32) for _ in range(count)]


def run_shadowed(runner: ModelShadow, service: ModelService,
                 inputs: list[Any]) -> list[dict[str, Any]]:
    outputs = []
    with runner:
        for x in inputs:
            outputs.append(service.infer("m", x))
        assert runner.wait_idle()
    return outputs


def assert_figures_only(payload: bytes, secrets: list[str]) -> None:
    """A flat object of numbers, nulls and the identity strings; none of ``secrets`` inside."""
    document = json.loads(payload)
    for key, value in document.items():
        assert not isinstance(value, (list, dict)), key
        if isinstance(value, str):
            assert key in IDENTITY_FIELDS, key
    text = payload.decode()
    leaked = [s for s in secrets if s in text]
    assert not leaked, f"the report carries {leaked[:5]}"


# -- agreement statistics (pure) ------------------------------------------------------------------


def test_shadow_stats_count_by_kind_and_merge() -> None:
    classes = ShadowStats("classifier")
    assert classes.agreement is None
    assert classes.add_outputs([np.array([[0.1, 0.9], [0.7, 0.3]])],
                               [np.array([[0.2, 0.8], [0.1, 0.9]])]) is False
    assert (classes.samples, classes.compared, classes.agreed) == (1, 2, 1)
    values = ShadowStats("regressor", error_bound=0.1)
    assert values.add_outputs([np.array([1.0, 2.0])], [np.array([1.05, 2.0])])
    assert not values.add_outputs([np.array([1.0, 2.0])], [np.array([1.0, 2.5])])
    assert values.max_abs_error == pytest.approx(0.5)
    assert values.mean_abs_error == pytest.approx(0.55 / 4)
    tokens = ShadowStats("lm")
    assert tokens.add_tokens([5, 6, 7, STOP], [5, 6, 8]) == 2
    assert (tokens.compared, tokens.agreed, tokens.agreement) == (4, 2, 0.5)
    merged = tokens.merge(ShadowStats("lm", samples=1, compared=4, agreed=4))
    assert (merged.samples, merged.compared, merged.agreed) == (2, 8, 6)
    for bad in (lambda: ShadowStats("detector"), lambda: ShadowStats("regressor"),
                lambda: classes.merge(tokens), lambda: tokens.add_outputs([], []),
                lambda: classes.add_outputs([np.zeros(2)], [np.zeros(3)])):
        with pytest.raises(ValueError):
            bad()


def test_bad_settings_say_what_to_fix() -> None:
    for settings in ({"sample_rate": 0.0}, {"cpu_budget": 1.5}, {"p95_budget_ratio": 0.9},
                     {"queue_size": 0}, {"min_window": 500}):
        with pytest.raises(AgentConfigError, match="shadow options"):
            ShadowConfig(**settings)


# -- classifiers and regressors through the model service ---------------------------------------


def test_an_identical_classifier_agrees_on_every_sample(tmp_path: Path) -> None:
    content = intent_classifier().tflite
    service = serve(tmp_path, content)
    runner = ModelShadow(service, "m", Model(content), kind="classifier", identity=IDENTITY,
                         config=ALL)
    run_shadowed(runner, service, token_inputs(100))
    report = runner.report()
    assert (report.requests, report.samples, report.compared, report.agreed) == (100, 100, 100, 100)
    assert report.agreement == 1.0
    assert report.candidate_count == 100 and report.candidate_p95_ms is not None


def test_a_retrained_classifier_disagrees_measurably(tmp_path: Path) -> None:
    service = serve(tmp_path, intent_classifier().tflite)
    other = Model(intent_classifier(seed=7).tflite)  # same task and data, other initial weights
    runner = ModelShadow(service, "m", other, kind="classifier", identity=IDENTITY, config=ALL)
    run_shadowed(runner, service, token_inputs(200))
    report = runner.report()
    assert report.samples == 200
    assert report.agreement is not None and 0.5 < report.agreement < 0.98


def test_a_regressor_agrees_within_its_error_bound(tmp_path: Path) -> None:
    content = sensor_autoencoder().tflite
    inputs = sensor_inputs(60)
    same = ModelShadow(serve(tmp_path, content), "m", Model(content), kind="regressor",
                       identity=IDENTITY, config=ALL, error_bound=0.0)
    run_shadowed(same, same.service, inputs)
    assert same.report().agreement == 1.0 and same.report().max_abs_error == 0.0

    retrained = ModelShadow(serve(tmp_path, content), "m", Model(sensor_autoencoder(seed=5).tflite),
                            kind="regressor", identity=IDENTITY, config=ALL, error_bound=0.05)
    run_shadowed(retrained, retrained.service, inputs)
    report = retrained.report()
    assert report.samples == 60 and report.candidate_errors == 0
    assert report.max_abs_error is not None and report.max_abs_error > 0.05
    assert report.mean_abs_error is not None and 0 < report.mean_abs_error <= report.max_abs_error
    assert report.agreement is not None and report.agreement < 1.0


def test_a_candidate_with_other_inputs_counts_as_errors_not_agreement(tmp_path: Path) -> None:
    runner = ModelShadow(serve(tmp_path, sensor_autoencoder().tflite), "m",
                         Model(sensor_autoencoder_int8().tflite),  # takes int8, not float32
                         kind="regressor", identity=IDENTITY, config=ALL, error_bound=0.05)
    run_shadowed(runner, runner.service, sensor_inputs(5))
    report = runner.report()
    assert (report.candidate_errors, report.samples, report.compared) == (5, 0, 0)


def test_the_report_carries_no_input_or_output_value(tmp_path: Path) -> None:
    content = sensor_autoencoder().tflite
    service = serve(tmp_path, content)
    runner = ModelShadow(service, "m", Model(sensor_autoencoder(seed=5).tflite),
                         kind="regressor", identity=IDENTITY, config=ALL, error_bound=0.01)
    inputs = sensor_inputs(30)
    outputs = run_shadowed(runner, service, inputs)
    values = [float(v) for x in inputs for v in x.ravel()]
    values += [float(v) for out in outputs for array in out.values() for v in array.ravel()]
    secrets = [repr(v) for v in values] + [f"{v:.6f}" for v in values if abs(v) > 1e-3]
    report = runner.report()
    assert report.samples == 30
    assert_figures_only(report.to_json(), secrets)


def test_requests_answered_by_another_version_are_not_compared(tmp_path: Path) -> None:
    content = intent_classifier().tflite
    service = serve(tmp_path, content)
    runner = ModelShadow(service, "m", Model(content), kind="classifier", identity=IDENTITY,
                         config=ALL)
    inputs = token_inputs(20)
    with runner:
        for x in inputs[:10]:
            service.infer("m", x)
        service.swap("m", write(tmp_path, "promoted", content), version=2)
        for x in inputs[10:]:
            service.infer("m", x)
        assert runner.wait_idle()
    report = runner.report()
    assert (report.requests, report.samples, report.skipped_other) == (20, 10, 10)


def test_the_observer_sees_what_the_caller_got_and_nothing_without_it(tmp_path: Path) -> None:
    service = serve(tmp_path, intent_classifier().tflite)
    seen: list[Any] = []
    service.observe("m", lambda inputs, inference: seen.append((inputs, inference)))
    x = token_inputs(1)[0]
    inference = service.run("m", x)
    assert seen[0][0] is x and seen[0][1].outputs is inference.outputs
    service.observe("m", None)
    service.run("m", x)
    assert len(seen) == 1
    service.observe("m", lambda inputs, inference: 1 / 0)  # a broken watcher never fails a request
    assert "probabilities" in service.infer("m", x)


def test_a_slow_candidate_loses_samples_instead_of_queueing_them(tmp_path: Path) -> None:
    service = serve(tmp_path, heavy_mlp(size=128, layers=1).tflite)
    slow = Model(heavy_mlp(size=128, layers=48, seed=3).tflite)
    config = ShadowConfig(sample_rate=1.0, cpu_budget=1.0, burst_s=60.0, queue_size=2,
                          p95_budget_ratio=1000.0)
    runner = ModelShadow(service, "m", slow, kind="regressor", identity=IDENTITY, config=config,
                         error_bound=0.1)
    x = np.ones((1, 128), dtype=np.float32)
    longest = 0
    with runner:
        for _ in range(300):
            service.infer("m", x)
            longest = max(longest, runner._queue.qsize())
        assert runner.wait_idle()
    report = runner.report()
    assert longest <= 2
    assert report.dropped_queue_full > 0
    assert report.samples + report.dropped_queue_full == 300


def test_the_active_latency_is_measured_alone_and_shadowed(tmp_path: Path) -> None:
    service = serve(tmp_path, heavy_mlp(size=128, layers=1).tflite)
    slow = Model(heavy_mlp(size=128, layers=48, seed=3).tflite)
    runner = ModelShadow(service, "m", slow, kind="regressor", identity=IDENTITY,
                         config=ShadowConfig(sample_rate=0.5, cpu_budget=1.0, burst_s=60.0,
                                             p95_budget_ratio=1000.0),
                         error_bound=0.1)
    x = np.ones((1, 128), dtype=np.float32)
    with runner:
        for _ in range(400):
            service.infer("m", x)
            time.sleep(0.0001)
        assert runner.wait_idle()
    report = runner.report()
    # every request is timed, as shadowed (a candidate run overlapped it) or alone
    assert report.active_alone_count + report.active_shadowed_count == report.requests == 400
    assert report.active_alone_count > 0 and report.active_shadowed_count > 0
    assert report.active_alone_p95_ms is not None and report.active_shadowed_p95_ms is not None


def test_the_cpu_budget_caps_candidate_time(tmp_path: Path) -> None:
    service = serve(tmp_path, heavy_mlp(size=128, layers=1).tflite)
    slow = Model(heavy_mlp(size=128, layers=24, seed=3).tflite)
    config = ShadowConfig(sample_rate=1.0, cpu_budget=0.05, burst_s=0.01, queue_size=64,
                          p95_budget_ratio=1000.0)
    runner = ModelShadow(service, "m", slow, kind="regressor", identity=IDENTITY, config=config,
                         error_bound=0.1)
    x = np.ones((1, 128), dtype=np.float32)
    start = time.perf_counter()
    with runner:
        while time.perf_counter() - start < 1.0:
            service.infer("m", x)
        assert runner.wait_idle()
    elapsed = time.perf_counter() - start
    report = runner.report()
    candidate_s = runner._candidate.sum / 1000.0
    longest_run_s = runner._candidate.max / 1000.0
    assert report.skipped_budget > 0 and report.samples > 0
    assert candidate_s <= config.cpu_budget * elapsed + config.burst_s + 2 * longest_run_s


def test_shadowing_backs_off_when_the_active_p95_passes_its_budget(tmp_path: Path) -> None:
    service = serve(tmp_path, heavy_mlp(size=128, layers=1).tflite)
    slow = Model(heavy_mlp(size=128, layers=48, seed=3).tflite)
    config = ShadowConfig(sample_rate=1.0, cpu_budget=1.0, burst_s=60.0, p95_floor_ms=0.0,
                          min_window=5, backoff_s=60.0)
    # an unshadowed p95 nothing can meet: the first judgement must back off
    runner = ModelShadow(service, "m", slow, kind="regressor", identity=IDENTITY, config=config,
                         error_bound=0.1, baseline_p95_ms=1e-6)
    x = np.ones((1, 128), dtype=np.float32)
    sent = 0
    deadline = time.monotonic() + 120
    with runner:
        # requests until the runner has judged and backed off: how many it takes depends on
        # when the worker's runs overlap them (beside CPU hogs, 400 requests were not enough)
        while runner.report().backoffs == 0 and time.monotonic() < deadline:
            for _ in range(50):
                service.infer("m", x)
                time.sleep(0.0001)  # lets the worker in: live requests come at intervals
            sent += 50
        for _ in range(50):  # and some while backed off
            service.infer("m", x)
        sent += 50
        assert runner.wait_idle()
    report = runner.report()
    assert report.backoffs >= 1, report
    assert report.skipped_budget > 0  # the paused requests
    assert report.samples < sent


# -- language models through the LM service ------------------------------------------------------


@pytest.fixture(scope="module")
def home() -> Iterator[LmService]:
    yield LmService(load("home_lm"))


def generate_all(service: LmService, greedy: bool = True) -> list[list[int]]:
    params = GenerateParams(temperature=0.0 if greedy else 0.9, seed=3, max_tokens=24)
    replies = []
    for prompt in PROMPTS:
        with service.generate(service.engine.encode_prompt(prompt), params) as generation:
            replies.append(list(generation))
    return replies


def lm_shadow(service: LmService, candidate: LmEngine) -> LmShadow:
    return LmShadow(service, candidate, identity=IDENTITY, config=ALL)


def test_an_identical_lm_agrees_on_every_greedy_token(home: LmService) -> None:
    runner = lm_shadow(home, load("home_lm"))
    with runner:
        replies = generate_all(home)
        assert runner.wait_idle()
    report = runner.report()
    assert report.kind == "lm" and report.samples == len(PROMPTS)
    # every generated token and the stop (eos) after it
    assert report.compared == sum(len(r) + 1 for r in replies)
    assert report.agreed == report.compared
    assert report.candidate_p95_ms is not None and report.active_alone_count > 0


def test_a_fine_tuned_lm_disagrees_and_the_report_holds_no_text(home: LmService) -> None:
    runner = lm_shadow(home, load("home_lm_v2"))  # fine-tuned to answer 'done, ' not 'ok, '
    with runner:
        replies = generate_all(home)
        assert runner.wait_idle()
    report = runner.report()
    assert report.samples == len(PROMPTS)
    assert report.agreement is not None and report.agreement < 0.9
    tokenizer = home.engine.tokenizer
    assert tokenizer is not None
    texts = [*PROMPTS, *(tokenizer.decode(r) for r in replies)]
    words = {w.strip(".,?") for text in texts for w in text.split() if len(w.strip(".,?")) > 3}
    ids = [",".join(map(str, r[:3])) for r in replies]
    assert_figures_only(report.to_json(), [*texts, *sorted(words), *ids])


def test_a_sampled_generation_is_skipped_not_compared(home: LmService) -> None:
    runner = lm_shadow(home, load("home_lm"))
    with runner:
        generate_all(home, greedy=False)
        assert runner.wait_idle()
    report = runner.report()
    assert (report.requests, report.samples, report.skipped_other) == (3, 0, 3)


def test_the_lm_observer_sees_the_tokens_the_caller_got(home: LmService) -> None:
    seen: list[Any] = []
    home.observe(lambda prompt, params, ids, stats: seen.append((list(prompt), list(ids))))
    try:
        ids = home.engine.encode_prompt(PROMPTS[0])
        with home.generate(ids, GenerateParams(temperature=0.0, max_tokens=24)) as generation:
            got = list(generation)
    finally:
        home.observe(None)
    assert seen == [(ids, got)]
    generate_all(home)  # no observer any more
    assert len(seen) == 1


# -- the message -------------------------------------------------------------------------------


def valid_report() -> ShadowReport:
    return ShadowReport(device_id="gw-1", ts=20.0, since=10.0, release_id="ab" * 32,
                        model="intent", version=2, active_version=1, kind="classifier",
                        requests=50, samples=10, compared=10, agreed=9, sample_rate=0.2,
                        cpu_budget=0.25, p95_budget_ratio=1.25, active_alone_count=40,
                        active_alone_p50_ms=0.05, active_alone_p95_ms=0.09)


@pytest.mark.parametrize(("edit", "code"), [
    ({"kind": "detector"}, "bad_value"),
    ({"agreed": 11}, "bad_value"),
    ({"samples": 51}, "bad_value"),
    ({"since": 30.0}, "bad_value"),
    ({"active_alone_p50_ms": 0.1}, "bad_value"),  # above its p95
    ({"error_bound": 0.1}, "bad_value"),  # a classifier has none
    ({"kind": "regressor"}, "bad_value"),  # a regressor needs one
    ({"sample_rate": 0}, "bad_value"),
    ({"cpu_budget": "all"}, "bad_type"),
    ({"candidate_p95_ms": -1.0}, "bad_value"),
    ({"requests": 1.0}, "bad_type"),
    ({"schema": "fleetlite.shadow_report/2"}, "wrong_schema"),
])
def test_bad_reports_are_refused_with_a_code(edit: dict[str, Any], code: str) -> None:
    document = {**json.loads(valid_report().to_json()), **edit}
    with pytest.raises(MessageError) as caught:
        ShadowReport.from_json(encode(document))
    assert caught.value.code == code


def test_a_report_round_trips_and_gives_back_its_counts() -> None:
    report = valid_report()
    assert ShadowReport.from_json(report.to_json()) == report
    assert report.agreement == 0.9
    pooled = report.stats().merge(replace(report, device_id="gw-2", agreed=10).stats())
    assert (pooled.samples, pooled.compared, pooled.agreed) == (20, 20, 19)
    assert report.shadow_cost_ratio is None  # nothing shadowed yet


@fuzz(300)
@given(st.binary(max_size=512))
def test_arbitrary_bytes_parse_or_raise_message_error(payload: bytes) -> None:
    parse_or_refuse(lambda: ShadowReport.from_json(payload), MessageError)


@fuzz(300)
@given(st.dictionaries(st.sampled_from(sorted(json.loads(valid_report().to_json()))),
                       st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
                       | st.text(max_size=8), max_size=6))
def test_arbitrary_field_values_parse_or_raise_message_error(edit: dict[str, Any]) -> None:
    document = {**json.loads(valid_report().to_json()), **edit}
    try:
        payload = encode(document)
    except ValueError:
        return  # infinities cannot be JSON
    parse_or_refuse(lambda: ShadowReport.from_json(payload), MessageError)
