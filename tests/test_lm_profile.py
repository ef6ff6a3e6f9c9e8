"""Language-model profiles end to end: the workload plan, the ``fleetlite.profile/2`` record (read
beside ``/1``), the measurement on the real test LMs in process and isolated, the CLI, the fleet
views and report, and the TTFT and decode-rate gates of a rollout."""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fleetlite.agent import profile_cli
from fleetlite.agent.lm_profiler import (
    LmPlan,
    LmWorkload,
    _generate,
    plan_workload,
    profile_lm,
    profile_lm_isolated,
    workload_ids,
)
from fleetlite.agent.profiler import profile_model, profile_model_isolated
from fleetlite.fleet import gates
from fleetlite.fleet import profiles_view as pv
from fleetlite.fleet.gates import GateSpec, ProfileView
from fleetlite.fleet.report import DeviceSummary, ReportData, render_report
from fleetlite.fleet.rollout import GATE_PASSED, GATE_TRIPPED, RolloutSpec, parse_waves
from fleetlite.fleet.store import open_store
from fleetlite.sdk.device_class import find_device_class
from fleetlite.sdk.lm_signature import LmLayout
from fleetlite.sdk.messages import (
    BAD_TYPE,
    BAD_VALUE,
    MALFORMED,
    MISSING_FIELD,
    OVERSIZE,
    WRONG_SCHEMA,
    MessageError,
    encode,
)
from fleetlite.sdk.profile import (
    MAX_LM_FIGURES,
    SCHEMA,
    SCHEMA_V2,
    DecodeFigure,
    LmProfile,
    PrefillFigure,
    ProfileRecord,
    TtftFigure,
    check_budgets,
    render_text,
    summarize_latencies,
    summarize_runs,
)
from fleetlite.sdk.runtime.errors import InferenceError, InputMismatchError
from fleetlite.sdk.runtime.lm_detect import is_language_model, signature_keys
from tests.fuzz_settings import encode as hostile_encode
from tests.fuzz_settings import fuzz, hostile_bytes, parse_or_refuse, sweep
from tests.test_generation import LM, load, reference
from tests.test_profiler import sample_record
from tests.test_rollout_engine import MODEL, Dev, FleetSim, make_spec

HOME = LM / "home_lm.tflite"
HOME_INT8 = LM / "home_lm_int8.tflite"
ALT = LM / "alt_lm.tflite"
# Few, short runs keep the suite quick; the shape of the record is what is checked here.
QUICK: dict[str, Any] = {"repetitions": 2, "decode_tokens": 4}


def layout(context: int = 128, prefill: tuple[int, ...] = (8, 32)) -> LmLayout:
    return LmLayout(num_layers=2, cache_layout="default", num_heads=4, head_dim=32,
                    context_length=context, vocab_size=512, prefill_lengths=prefill,
                    has_mask=False)


# -- the plan --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "workload", "plan"),
    [
        (layout(), LmWorkload(), LmPlan(16, (8, 32), ((16, 32), (64, 32)))),
        # alt_lm's context of 64: half of it is 32, and 32 + 32 tokens just fit
        (layout(64), LmWorkload(), LmPlan(16, (8, 32), ((16, 32), (32, 32)))),
        # a prefill length equal to the context leaves no token to decode: pp of context - 1
        (layout(32, (8, 32)), LmWorkload(), LmPlan(16, (8, 31), ((16, 16),))),
        # a tiny context: depth 16 does not fit, the TTFT prompt is shortened
        (layout(12, (4,)), LmWorkload(), LmPlan(12, (4,), ((6, 6),))),
        (layout(), LmWorkload(prefill_tokens=(100, 8, 8), depths=(0, 120), decode_tokens=16,
                              prompt_tokens=9),
         LmPlan(9, (8, 100), ((0, 16), (120, 8)))),
    ],
)
def test_plan_fits_the_workload_to_the_model(model: LmLayout, workload: LmWorkload,
                                             plan: LmPlan) -> None:
    assert plan_workload(model, workload) == plan


@pytest.mark.parametrize(("workload", "message"), [
    (LmWorkload(prefill_tokens=(128,)), "pp128 needs 129 tokens of context"),
    (LmWorkload(depths=(16, 128)), "depth 128 leaves no room to decode"),
])
def test_explicit_tests_that_do_not_fit_are_refused(workload: LmWorkload, message: str) -> None:
    with pytest.raises(InputMismatchError, match=message):
        plan_workload(layout(), workload)


@pytest.mark.parametrize("changes", [
    {"repetitions": 0}, {"warmup_runs": -1}, {"prompt_tokens": 0}, {"decode_tokens": 5000},
    {"seed": -1}, {"prefill_tokens": (0,)}, {"depths": (-1,)}, {"depths": tuple(range(17))},
    {"max_seconds": 0}, {"max_seconds": float("inf")}, {"repetitions": True},
])
def test_bad_workloads_are_value_errors(changes: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=next(iter(changes))):
        LmWorkload(**changes)


def test_workload_ids_are_deterministic_and_in_the_vocabulary() -> None:
    ids = workload_ids(128, 512, 7)
    assert ids == workload_ids(128, 512, 7) != workload_ids(128, 512, 8)
    assert len(ids) == 128 and all(0 <= i < 512 for i in ids)


def test_repeated_figures_use_the_sample_standard_deviation() -> None:
    stats = summarize_runs([10.0, 12.0, 17.0])
    assert stats.mean == pytest.approx(13.0) and stats.sd == pytest.approx(
        statistics.stdev([10.0, 12.0, 17.0]))
    assert (stats.count, stats.min, stats.max) == (3, 10.0, 17.0)
    assert summarize_runs([4.0]).sd == 0.0
    assert stats.text(1) == "13.0 ± 3.6"
    for bad in ([], [-1.0], [float("nan")]):
        with pytest.raises(ValueError):
            summarize_runs(bad)


# -- the record ------------------------------------------------------------------------------


def lm_section(**changes: Any) -> LmProfile:
    section = LmProfile(
        workload="token_ids", seed=0, repetitions=5, warmup_runs=1, num_layers=2,
        cache_layout="default", context_length=128, vocab_size=512, prefill_lengths=(8, 32),
        load_ms=55.0,
        ttft=TtftFigure(prompt_tokens=16, cold_ms=17.0, warm_ms=summarize_runs([1.5, 1.6, 1.4])),
        prefill=(PrefillFigure(8, summarize_runs([0.4, 0.5]), summarize_runs([20000, 16000])),
                 PrefillFigure(32, summarize_runs([1.1]), summarize_runs([29000.0]))),
        decode=(DecodeFigure(16, 32, summarize_runs([5000.0, 4000.0]),
                             summarize_latencies([0.2, 0.25, 0.19, 0.3])),
                DecodeFigure(64, 32, summarize_runs([4800.0]),
                             summarize_latencies([0.21, 0.22]))),
        memory_estimate_mb=4.4,
    )
    return dataclasses.replace(section, **changes)


def lm_record(**changes: Any) -> ProfileRecord:
    run = dataclasses.replace(sample_record().run, timing="decode")
    return sample_record(lm=lm_section(), run=run, **changes)


def test_an_lm_record_is_profile_2_and_round_trips() -> None:
    record = lm_record()
    data = json.loads(record.to_json())
    assert data["schema"] == SCHEMA_V2 == record.schema
    assert data["lm"]["decode"][0]["tokens_per_s"]["sd"] == record.lm.decode[0].tokens_per_s.sd
    assert ProfileRecord.from_json(record.to_json()) == record
    assert ProfileRecord.from_dict(record.to_dict()) == record
    assert record.lm is not None
    assert (record.lm.ttft_ms, record.lm.prefill_tokens_per_s,
            record.lm.decode_tokens_per_s) == (pytest.approx(1.5), 29000.0, 4500.0)


def test_a_record_without_lm_is_still_written_and_read_as_profile_1() -> None:
    record = sample_record()
    data = json.loads(record.to_json())
    assert data["schema"] == SCHEMA and "lm" not in data
    assert ProfileRecord.from_json(record.to_json()) == record
    # a /1 writer's unknown "lm" key is ignored, as any unknown key
    data["lm"] = {"nonsense": True}
    assert ProfileRecord.from_json(encode(data)) == record
    # a /2 record without its optional section reads, and is written back as /1
    data = {**record.to_dict(), "schema": SCHEMA_V2}
    assert ProfileRecord.from_json(encode(data)).to_dict()["schema"] == SCHEMA


def test_other_profile_versions_are_refused_naming_both_known() -> None:
    data = {**lm_record().to_dict(), "schema": "fleetlite.profile/3"}
    with pytest.raises(MessageError, match=r"profile/1.*profile/2") as info:
        ProfileRecord.from_json(encode(data))
    assert info.value.code == WRONG_SCHEMA


def mutate_lm(path: str, value: Any) -> bytes:
    data = lm_record().to_dict()
    *parents, last = path.split(".")
    target = data["lm"]
    for key in parents:
        target = target[int(key)] if isinstance(target, list) else target[key]
    if value is ...:
        del target[last]
    else:
        target[last] = value
    return encode(data)


@pytest.mark.parametrize(("path", "value", "code"), [
    ("workload", "text", BAD_VALUE),
    ("repetitions", 0, BAD_VALUE),
    ("prefill_lengths", [8, 0], BAD_VALUE),
    ("prefill_lengths", list(range(1, MAX_LM_FIGURES + 2)), BAD_VALUE),
    ("prefill", [{"tokens": 8}] * (MAX_LM_FIGURES + 1), BAD_VALUE),
    ("decode", "fast", BAD_TYPE),
    ("decode", [3], BAD_TYPE),
    ("ttft.warm_ms.mean", 99.0, BAD_VALUE),         # above max
    ("ttft.cold_ms", -1.0, BAD_VALUE),
    ("decode.0.tokens_per_s.sd", -0.5, BAD_VALUE),
    ("decode.0.ms_per_token.p50_ms", 9.0, BAD_VALUE),  # unordered percentiles
    ("prefill.1.tokens", "32", BAD_TYPE),
    ("memory_estimate_mb", "4", BAD_TYPE),
])
def test_hostile_lm_sections_are_refused(path: str, value: Any, code: str) -> None:
    with pytest.raises(MessageError) as info:
        ProfileRecord.from_json(mutate_lm(path, value))
    assert info.value.code == code
    assert str(info.value).startswith("in 'lm':")


def test_lm_records_with_every_hostile_value_are_refused_by_code() -> None:
    codes = {BAD_TYPE, BAD_VALUE, WRONG_SCHEMA, MISSING_FIELD, MALFORMED, OVERSIZE}

    def check(doc: Any) -> None:
        record = parse_or_refuse(lambda: ProfileRecord.from_json(hostile_encode(doc)),
                                 MessageError,
                                 lambda exc: assert_code(exc, codes))
        if record is not None:
            assert ProfileRecord.from_json(record.to_json()) == record

    sweep(json.loads(lm_record().to_json()), check, deep=3000)


@fuzz(150)
@given(data=st.data())
def test_lm_record_parser_accepts_or_refuses_with_a_code(data: st.DataObject) -> None:
    valid = lm_record().to_json()
    payload = data.draw(hostile_bytes(valid, json.loads(valid), deep=3000), label="payload")
    record = parse_or_refuse(lambda: ProfileRecord.from_json(payload), MessageError,
                             lambda exc: assert_code(exc, {BAD_TYPE, BAD_VALUE, WRONG_SCHEMA,
                                                           MISSING_FIELD, MALFORMED, OVERSIZE}))
    if record is not None:
        assert ProfileRecord.from_json(record.to_json()) == record


def assert_code(exc: MessageError, codes: set[str]) -> None:
    assert exc.code in codes, exc.code


def test_errors_inside_a_figure_name_the_list_and_index() -> None:
    with pytest.raises(MessageError, match=r"in 'lm': in 'decode'\[0\]: in 'ms_per_token'"):
        ProfileRecord.from_json(mutate_lm("decode.0.ms_per_token.p50_ms", ...))


def test_lm_text_and_budgets() -> None:
    record = lm_record()
    budgets = find_device_class("raspberry-pi-4").budgets
    names = [c.name for c in check_budgets(record, budgets)]
    assert names[:2] == ["p95 decode step", "cold TTFT"]
    text = render_text(record, budgets)
    for word in ("language model   2 layers, context 128", "pp8", "pp32", "tg32 @ d16",
                 "tg32 @ d64", "TTFT             cold 17.000 ms", "tokens/s", "p99 ms/tok",
                 "budget cold TTFT", "engine estimate 4.4"):
        assert word in text, word


# -- measuring the real models ---------------------------------------------------------------


def check_lm_record(record: ProfileRecord, name: str) -> None:
    """The record of a QUICK profile of tests/fixtures/lm/``name``, against its reference."""
    facts = reference(name)["model"]
    context, lengths = facts["context_length"], tuple(facts["prefill_lengths"])
    lm = record.lm
    assert lm is not None and record.schema == SCHEMA_V2
    assert lm.context_length == context and lm.prefill_lengths == lengths
    assert lm.num_layers == facts["num_layers"] and lm.cache_layout == facts["cache_layout"]
    assert [f.tokens for f in lm.prefill] == [min(n, context - 1) for n in lengths]
    depths = sorted({d for d in (16, context // 2) if d < context})
    assert [(f.depth, f.tokens) for f in lm.decode] == [(d, 4) for d in depths]
    assert all(f.tokens_per_s.count == 2 and f.ms_per_token.count == 8 for f in lm.decode)
    assert lm.ttft.warm_ms.count == 2 and lm.ttft.prompt_tokens == 16
    assert lm.load_ms == record.timings.init_ms > 0
    assert record.timings.first_inference_ms == lm.ttft.cold_ms
    assert record.timings.steady.count == 8  # the first tg test's steps
    assert record.run.timing == "decode" and record.run.min_runs == 2
    assert record.memory.peak_rss_mb >= record.memory.rss_before_load_mb > 0
    assert {i["name"] for i in record.model.inputs} >= {"tokens", "input_pos", "kv_cache_k_0"}
    assert "logits" in {o["name"] for o in record.model.outputs}
    assert ProfileRecord.from_json(record.to_json()) == record


def test_profile_of_the_home_lm() -> None:
    record = profile_lm(HOME, model_name="home", model_version=3, **QUICK)
    check_lm_record(record, "home_lm")
    assert record.model.quantization == "float32" and record.model.name == "home"
    assert not record.run.isolated and record.run.threads == 1


def test_profile_of_a_model_in_the_other_layout_with_a_mask() -> None:
    record = profile_lm(ALT, **QUICK)
    check_lm_record(record, "alt_lm")
    assert record.lm is not None and record.lm.cache_layout == "transposed"
    assert "mask" in {i["name"] for i in record.model.inputs}


def test_isolated_profile_of_the_int8_lm_from_bytes() -> None:
    record = profile_lm_isolated(HOME_INT8.read_bytes(), device_class="raspberry-pi-4",
                                 **QUICK)
    check_lm_record(record, "home_lm_int8")
    assert record.run.isolated and record.model.quantization in ("int8", "mixed")
    assert record.run.threads == find_device_class("raspberry-pi-4").runtime.default_threads


def test_profile_model_hands_an_lm_to_the_lm_profiler() -> None:
    # what the agent's profile-on-model-change path calls: no LM-specific arguments
    record = profile_model_isolated(HOME, max_seconds=1.0, min_runs=999, model_version=2)
    assert record.lm is not None and record.model.version == 2
    assert record.run.max_seconds == 1.0
    with pytest.raises(InputMismatchError, match="inputs= does not apply"):
        profile_model(HOME, inputs=[])


def test_a_stop_id_cutting_a_run_short_is_an_error() -> None:
    engine = load("home_lm")  # with the release's stop id 3
    prompt = reference("home_lm")["prompts"][0]["prompt_ids"]
    with pytest.raises(InferenceError, match=r"stopped after .* of 64 decode steps"):
        _generate(engine, prompt, 64)


def test_lm_detection_reads_the_flatbuffer(models_dir: Path, tmp_path: Path) -> None:
    lengths = reference("home_lm")["model"]["prefill_lengths"]
    assert set(signature_keys(HOME.read_bytes())) == {"decode", *(f"prefill_{n}" for n in lengths)}
    assert is_language_model(HOME) and is_language_model(ALT.read_bytes())
    assert not is_language_model(models_dir / "intent_classifier.tflite")
    (tmp_path / "empty.tflite").write_bytes(b"")
    cut = HOME.read_bytes()[:64]
    for source in (tmp_path / "missing.tflite", tmp_path / "empty.tflite", cut, b"\xff" * 16,
                   tmp_path):
        assert not is_language_model(source)


# -- the CLI ---------------------------------------------------------------------------------


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fleetlite-agent")
    profile_cli.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["profile", *argv])


def test_cli_prints_the_lm_table(capsys: pytest.CaptureFixture[str]) -> None:
    args = parse([str(HOME), "--in-process", "--repetitions", "2", "--tg", "4", "--depth", "0",
                  "--pp", "5", "--device-class", "raspberry-pi-4"])
    assert profile_cli.run(args) == 0
    out = capsys.readouterr().out
    for word in ("pp5", "tg4 @ d0", "TTFT", "2 runs per test", "budget cold TTFT"):
        assert word in out, word
    assert "@ d16" not in out


def test_cli_json_isolated(capsys: pytest.CaptureFixture[str]) -> None:
    assert profile_cli.run(parse([str(ALT), "--json", "--repetitions", "2", "--tg", "4"])) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["schema"] == SCHEMA_V2 and data["run"]["isolated"]
    assert ProfileRecord.from_dict(data).lm is not None


def test_cli_refuses_options_of_the_other_kind(models_dir: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    assert profile_cli.run(parse([str(HOME), "--min-runs", "5"])) == 2
    assert "--min-runs does not apply to a language model" in capsys.readouterr().err
    classifier = str(models_dir / "intent_classifier.tflite")
    assert profile_cli.run(parse([classifier, "--pp", "8"])) == 2
    assert "--pp applies to language models only" in capsys.readouterr().err
    assert profile_cli.run(parse([str(HOME), "--depth", "500", "--repetitions", "1"])) == 1
    assert "depth 500 leaves no room" in capsys.readouterr().err


# -- the fleet side --------------------------------------------------------------------------


def with_lm(record: ProfileRecord, device: str, version: int, ttft: float, decode: float,
            ts: float) -> ProfileRecord:
    """``record`` as ``device``'s profile of ``version`` with those headline LM figures."""
    lm = lm_section(
        ttft=TtftFigure(16, ttft * 2, summarize_runs([ttft])),
        decode=(DecodeFigure(16, 32, summarize_runs([decode]), summarize_latencies([0.2])),))
    model = dataclasses.replace(record.model, name="home", version=version)
    return dataclasses.replace(record, device_id=device, ts=ts, model=model, lm=lm)


def test_the_store_keeps_an_lm_record_and_the_views_read_its_figures(tmp_path: Path) -> None:
    base = lm_record()
    with open_store(f"sqlite:///{tmp_path / 'fleet.db'}") as store:
        for i, (version, ttft, decode) in enumerate([(1, 2.0, 5000.0), (2, 2.4, 3500.0)]):
            for device in ("gw-1", "gw-2"):
                store.add_profile(with_lm(base, device, version, ttft, decode, 100.0 + i),
                                  device_class="rpi4")
        store.add_profile(sample_record(device_id="gw-9"), device_class="rpi4")
        stored = store.profiles()
    assert stored[0].record() == with_lm(base, "gw-1", 1, 2.0, 5000.0, 100.0)
    rows = [pv.ProfileRow.from_stored(s) for s in stored]
    assert [r.is_lm for r in rows] == [True] * 4 + [False]
    assert rows[0].ttft_ms == 2.0 and rows[0].decode_tokens_per_s == 5000.0
    assert rows[0].prefill_tokens_per_s == 29000.0
    assert pv.ProfileRow.from_mapping(rows[0].to_dict()) == rows[0]
    assert "ttft_ms" not in rows[4].to_dict()

    aggs = pv.aggregate(rows)
    lm_aggs = [a for a in aggs if a.is_lm]
    assert [(a.version, a.ttft_ms_median, a.decode_tokens_per_s_median) for a in lm_aggs] == [
        (1, 2.0, 5000.0), (2, 2.4, 3500.0)]
    table = pv.render(aggs)
    assert "TTFT MS" in table and "DECODE TOK/S" in table and "P50 MS" in table  # both kinds
    assert json.loads(pv.render(lm_aggs, "json"))["aggregates"][0]["ttft_ms_median"] == 2.0

    comparison = pv.compare(rows, "home", 1, 2)
    row = comparison.rows[0]
    assert row.decode_ratio == pytest.approx(0.7) and row.ttft_ratio == pytest.approx(1.2)
    assert comparison.to_dict()["device_classes"][0]["ratios"]["decode_tokens_per_s_median"] \
        == pytest.approx(0.7)
    text = pv.render(comparison)
    assert "DECODE TOK/S v1" in text and "x0.70 (-30%)" in text and "x1.20 (+20%)" in text

    html = render_report(ReportData(
        generated_at=200.0, profiles=rows,
        devices=[DeviceSummary("gw-1", "rpi4", True, "home", 2)]))
    for part in ('data-plot="ttft"', 'data-plot="decode"', 'data-lm="1"', "decode tok/s",
                 "-30% vs v1", 'data-plot="latency"'):
        assert part in html, part


def test_profile_view_of_an_lm_record() -> None:
    view = ProfileView.from_record(lm_record(), "rpi4")
    assert view.ttft_ms == pytest.approx(1.5) and view.decode_tokens_per_s == 4500.0
    assert ProfileView.from_record(sample_record(), "rpi4").ttft_ms is None


# -- the gates -------------------------------------------------------------------------------


def lm_view(device: str, cls: str, version: int, ttft: float, rate: float,
            ts: float = 1.0) -> ProfileView:
    return ProfileView(device, cls, MODEL, version, 0.3, 50.0, ts, ttft, rate)


def test_ttft_and_decode_rate_gate_functions() -> None:
    spec = GateSpec()
    base = gates.baseline([lm_view("x", "c", 1, 2.0, 1000.0), lm_view("y", "c", 1, 4.0, 800.0),
                           ProfileView("z", "c", MODEL, 1, 0.3, 50.0, 1.0)], MODEL, 1, "c")
    assert (base.ttft_ms, base.decode_tokens_per_s, base.devices) == (3.0, 900.0, 3)
    fine = [lm_view("x", "c", 2, 3.5, 760.0)]         # +17 %, -16 %
    assert gates.check_ttft(spec, "c", fine, base).passed
    assert gates.check_decode_rate(spec, "c", fine, base).passed
    slow = [lm_view("x", "c", 2, 4.5, 700.0)]         # +50 %, -22 %
    ttft = gates.check_ttft(spec, "c", slow, base)
    assert not ttft.passed and ttft.detail["limit_ttft_ms"] == pytest.approx(3.6)
    decode = gates.check_decode_rate(spec, "c", slow, base)
    assert not decode.passed and decode.detail["limit_decode_tokens_per_s"] == pytest.approx(720)
    assert "700.0 tokens/s" in decode.reason and "-22%" in decode.reason
    # the floors: 1.5 ms more TTFT and 0.32 ms more per token called noise
    assert gates.check_ttft(GateSpec(ttft_floor_ms=2.0), "c", slow, base).passed
    assert gates.check_decode_rate(GateSpec(decode_floor_ms=0.5), "c", slow, base).passed
    off = GateSpec(max_ttft_regression=None, max_decode_regression=None)
    assert gates.check_ttft(off, "c", slow, base).passed
    assert gates.check_decode_rate(off, "c", slow, base).passed
    # no language-model figures on one side: not compared
    assert "not compared" in gates.check_decode_rate(spec, "c", slow, gates.Baseline(1)).reason
    plain = [ProfileView("x", "c", MODEL, 2, 0.3, 50.0, 1.0)]
    assert "no language-model profiles" in gates.check_ttft(spec, "c", plain, base).reason
    results = gates.evaluate_class(spec, "c", MODEL, 2, 1, {"x"}, [*slow, lm_view("x", "c", 1,
                                                                                   3.0, 900.0)])
    assert [r.gate for r in results if not r.passed] == ["ttft", "decode_rate"]
    assert "ttft" not in {r.gate for r in gates.evaluate_class(spec, "c", MODEL, 2, 1, {"x"},
                                                                 plain)}


@pytest.mark.parametrize("changes", [{"max_ttft_regression": -0.1}, {"ttft_floor_ms": -1.0},
                                     {"max_decode_regression": 1.0},
                                     {"decode_floor_ms": float("nan")}])
def test_invalid_lm_gate_specs(changes: dict[str, Any]) -> None:
    from fleetlite.fleet.errors import RolloutError

    with pytest.raises(RolloutError, match=next(iter(changes))):
        GateSpec(**changes)


def test_lm_gates_round_trip_through_the_rollout_spec() -> None:
    spec = make_spec(gates=GateSpec(max_ttft_regression=0.3, ttft_floor_ms=2.0,
                                    max_decode_regression=None, decode_floor_ms=0.1))
    stored = json.loads(json.dumps(spec.to_dict()))
    assert stored["gates"]["max_ttft_regression"] == 0.3
    assert RolloutSpec.from_dict(stored) == spec
    # a spec stored before these gates existed gets their defaults
    del stored["gates"]["max_decode_regression"], stored["gates"]["max_ttft_regression"]
    assert RolloutSpec.from_dict(stored).gates.max_decode_regression == 0.2


@dataclasses.dataclass
class LmDev(Dev):
    """A simulated gateway whose profiles are a language model's."""

    ttft_ms: float = 2.0
    decode_tps: float = 1000.0
    base_ttft_ms: float = 2.0
    base_decode_tps: float = 1000.0


class LmFleetSim(FleetSim):
    """:class:`FleetSim` publishing language-model profiles (baseline and new version)."""

    def __init__(self, spec: RolloutSpec, devs: list[LmDev]) -> None:
        super().__init__(spec, devs)
        assert spec.previous_version is not None
        self.profiles = [lm_view(d.device_id, d.device_class, spec.previous_version,
                                 d.base_ttft_ms, d.base_decode_tps) for d in devs]

    def profile(self, dev: Dev, at: float) -> None:
        assert isinstance(dev, LmDev)
        self.profiles.append(lm_view(dev.device_id, dev.device_class, self.spec.version,
                                     dev.ttft_ms, dev.decode_tps, at))


def lm_fleet(n: int, cls: str, prefix: str, **kw: Any) -> list[LmDev]:
    return [LmDev(f"{prefix}-{i:03d}", cls, **kw) for i in range(n)]


def test_a_decode_rate_regression_rolls_back_one_class_and_the_other_completes() -> None:
    # v3 decodes 35 % slower on the Pi class (its p95 and TTFT are unchanged), as fast on Jetson
    devs = (lm_fleet(6, "rpi4", "a", decode_tps=650.0)
            + lm_fleet(6, "jetson", "b", base_decode_tps=2000.0, decode_tps=1980.0))
    sim = LmFleetSim(make_spec(waves=parse_waves("50%,100%")), devs)
    state = sim.run()
    assert state.state == "completed"
    trips = sim.kinds(GATE_TRIPPED)
    assert [(t.device_class, t.wave, t.detail["gate"]) for t in trips] == [
        ("rpi4", 1, "decode_rate")]
    why = state.paused_classes["rpi4"].reason
    assert "decode rate regressed on class rpi4" in why and "650.0 tokens/s" in why
    assert "1000.0 tokens/s" in why and "-35%" in why
    a_wave1 = {k for k, d in state.devices.items() if k.startswith("a-") and d.wave == 1}
    assert a_wave1 and set(sim.rollbacks) == a_wave1
    assert {state.devices[k].status for k in a_wave1} == {"rolled_back"}
    assert {d.status for k, d in state.devices.items()
            if k.startswith("a-") and k not in a_wave1} == {"excluded"}
    assert {d.status for k, d in state.devices.items() if k.startswith("b-")} == {"installed"}
    passed = [d for d in sim.kinds(GATE_PASSED) if d.device_class == "jetson"]
    assert len(passed) == 2 and all("decode rate within limits" in d.reason for d in passed)
    # the decode gate switched off: both classes complete
    relaxed = make_spec(waves=parse_waves("50%,100%"),
                        gates=GateSpec(max_decode_regression=None))
    devs = (lm_fleet(6, "rpi4", "a", decode_tps=650.0)
            + lm_fleet(6, "jetson", "b", base_decode_tps=2000.0, decode_tps=1980.0))
    assert LmFleetSim(relaxed, devs).run().counts() == {"installed": 12}


def test_a_ttft_regression_trips_its_gate() -> None:
    devs = lm_fleet(3, "rpi4", "a", ttft_ms=4.0)  # 2 ms -> 4 ms
    sim = LmFleetSim(make_spec(waves=parse_waves("all")), devs)
    state = sim.run()
    assert [t.detail["gate"] for t in sim.kinds(GATE_TRIPPED)] == ["ttft"]
    assert "time to first token regressed" in state.paused_classes["rpi4"].reason
    assert state.counts() == {"rolled_back": 3}
