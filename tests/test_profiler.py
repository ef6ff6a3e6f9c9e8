"""The profiler: statistics, loop rule and record (pure), then real profiles of our models."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetlite.agent import profile_cli, profiler
from fleetlite.agent.profiler import (
    profile_model,
    profile_model_isolated,
    synthetic_inputs,
)
from fleetlite.sdk.device_class import find_device_class
from fleetlite.sdk.messages import (
    BAD_TYPE,
    BAD_VALUE,
    MISSING_FIELD,
    WRONG_SCHEMA,
    MessageError,
    encode,
)
from fleetlite.sdk.profile import (
    DEFAULT_MAX_RUNS,
    LatencyStats,
    MemoryStats,
    ModelInfo,
    ProfileRecord,
    ProfileSettings,
    RunParameters,
    Timings,
    check_budgets,
    percentile,
    render_text,
    resolve_settings,
    should_continue,
    summarize_latencies,
)
from fleetlite.sdk.runtime.errors import InputMismatchError, InvalidModelError, ModelCrashedError
from fleetlite.sdk.runtime.interpreter import load_model

PROJECT_MODELS = (
    "intent_classifier",
    "sensor_autoencoder",
    "sensor_autoencoder_int8",
    "two_in_two_out",
)
# Short loops keep the suite quick; the bounds they set are what the tests check.
FAST: dict[str, Any] = {
    "warmup_runs": 2,
    "warmup_min_seconds": 0.0,
    "min_runs": 20,
    "max_runs": 2000,
    "min_seconds": 0.05,
    "max_seconds": 10.0,
}


def ordered(stats: LatencyStats) -> bool:
    values = (stats.min_ms, stats.p50_ms, stats.p90_ms, stats.p95_ms, stats.p99_ms, stats.max_ms)
    return all(a <= b for a, b in zip(values, values[1:]))


# -- summarize_latencies ---------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3, 7, 100, 1001])
@pytest.mark.parametrize("distribution", ["uniform", "lognormal", "ties"])
def test_summary_matches_numpy(n: int, distribution: str) -> None:
    rng = np.random.default_rng(n)
    if distribution == "uniform":
        samples = rng.uniform(0.1, 5.0, size=n)
    elif distribution == "lognormal":
        samples = rng.lognormal(0.0, 1.0, size=n)
    else:
        samples = rng.integers(1, 4, size=n).astype(float)
    stats = summarize_latencies(samples.tolist())
    assert stats.count == n
    expected = np.percentile(samples, [50, 90, 95, 99])  # numpy's default method is 'linear'
    got = [stats.p50_ms, stats.p90_ms, stats.p95_ms, stats.p99_ms]
    assert got == pytest.approx(expected.tolist(), rel=1e-12, abs=1e-12)
    assert stats.mean_ms == pytest.approx(float(np.mean(samples)), rel=1e-12)
    assert stats.std_ms == pytest.approx(float(np.std(samples)), rel=1e-9, abs=1e-12)
    assert stats.min_ms == samples.min() and stats.max_ms == samples.max()


@settings(max_examples=300, deadline=None)
@given(st.lists(st.floats(min_value=0.0, max_value=1e6, allow_nan=False), min_size=1,
                max_size=300))
def test_summary_is_ordered_for_any_samples(samples: list[float]) -> None:
    stats = summarize_latencies(samples)
    assert stats.count == len(samples)
    assert ordered(stats)
    assert stats.min_ms <= stats.mean_ms <= stats.max_ms
    assert stats.std_ms >= 0.0
    assert stats.p50_ms == pytest.approx(float(np.percentile(samples, 50)), rel=1e-9, abs=1e-9)


def test_summary_of_one_sample_is_that_sample() -> None:
    stats = summarize_latencies([2.5])
    assert stats == LatencyStats(1, 2.5, 0.0, 2.5, 2.5, 2.5, 2.5, 2.5, 2.5)


@pytest.mark.parametrize("bad", [[], [1.0, -0.5], [float("nan")], [float("inf")]])
def test_summary_rejects_bad_samples(bad: list[float]) -> None:
    with pytest.raises(ValueError):
        summarize_latencies(bad)


def test_percentile_endpoints_and_range() -> None:
    values = [1.0, 2.0, 4.0, 8.0]
    assert percentile(values, 0) == 1.0 and percentile(values, 100) == 8.0
    assert percentile(values, 50) == 3.0
    with pytest.raises(ValueError):
        percentile(values, 101)


# -- should_continue and settings --------------------------------------------------------------


@pytest.mark.parametrize(
    ("runs", "elapsed", "min_runs", "max_runs", "min_s", "max_s", "expected"),
    [
        (0, 0.0, 50, 1000, 1.0, 150.0, True),  # start
        (49, 5.0, 50, 1000, 1.0, 150.0, True),  # min time done, too few runs
        (50, 0.5, 50, 1000, 1.0, 150.0, True),  # enough runs, too little time
        (50, 1.0, 50, 1000, 1.0, 150.0, False),  # both minimums met (elapsed < min_secs fails)
        (10, 150.0, 50, 1000, 1.0, 150.0, True),  # elapsed <= max_secs still runs
        (10, 150.001, 50, 1000, 1.0, 150.0, False),  # past max_secs, minimums or not
        (1000, 0.1, 50, 1000, 1.0, 150.0, False),  # run cap
        (5, 0.0, 50, 5, 1.0, 150.0, False),  # the cap wins over min_runs
        (0, 0.0, 0, 10, 0.0, 1.0, False),  # no minimums: nothing to do
        (3, 0.2, 1, 10, 0.5, 1.0, True),  # time minimum alone
    ],
)
def test_should_continue_follows_benchmark_model(
    runs: int, elapsed: float, min_runs: int, max_runs: int, min_s: float, max_s: float,
    expected: bool,
) -> None:
    assert should_continue(runs, elapsed, min_runs, max_runs, min_s, max_s) is expected


def test_settings_default_to_benchmark_model() -> None:
    s = resolve_settings()
    assert (s.warmup_runs, s.warmup_min_seconds, s.min_runs, s.min_seconds, s.max_seconds) == (
        1, 0.5, 50, 1.0, 150.0)
    assert s.max_runs == DEFAULT_MAX_RUNS


def test_settings_device_class_then_explicit() -> None:
    defaults = find_device_class("raspberry-pi-4").profiler
    s = resolve_settings(defaults)
    assert (s.warmup_runs, s.min_runs, s.max_runs, s.min_seconds, s.max_seconds) == (
        defaults.warmup_runs, defaults.min_runs, defaults.max_runs, defaults.min_seconds,
        defaults.max_seconds)
    assert resolve_settings(defaults, min_runs=7, max_seconds=3).min_runs == 7
    assert resolve_settings(defaults, min_runs=7, max_seconds=3).max_seconds == 3


@pytest.mark.parametrize(
    "override",
    [{"min_runs": 0}, {"max_runs": 0}, {"warmup_runs": -1}, {"min_seconds": -1.0},
     {"max_seconds": 0.0}, {"max_seconds": float("nan")}, {"max_runs": 10**9}],
)
def test_settings_reject_bad_values(override: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        resolve_settings(**override)


# -- the record --------------------------------------------------------------------------------


def sample_record(**changes: Any) -> ProfileRecord:
    record = ProfileRecord(
        device_id="gw-001",
        ts=1_700_000_000.5,
        trigger="command",
        model=ModelInfo(
            name="sensor_autoencoder",
            version=3,
            sha256="ab" * 32,
            size_bytes=3024,
            quantization="float32",
            inputs=[{"name": "window", "shape": [1, 16], "dtype": "float32"}],
            outputs=[{"name": "reconstruction", "shape": [1, 16], "dtype": "float32"}],
            node_count=4,
            op_counts={"FULLY_CONNECTED": 4},
        ),
        run=RunParameters(
            threads=2, backend="tflite-runtime", backend_version="2.14.0", delegate="xnnpack",
            resolver="auto", timing="invoke", inputs="synthetic", warmup_runs=1,
            warmup_min_seconds=0.5, min_runs=50, max_runs=1000, min_seconds=1.0,
            max_seconds=150.0, isolated=True, delegate_partitions=1,
        ),
        timings=Timings(
            init_ms=1.5, first_inference_ms=0.05, warmup_count=10, warmup_mean_ms=0.004,
            steady=summarize_latencies([0.002, 0.003, 0.0025, 0.01]), steady_seconds=1.0,
        ),
        memory=MemoryStats(
            rss_before_load_mb=40.0, peak_rss_load_mb=44.0, rss_after_load_mb=43.5,
            peak_rss_inference_mb=43.6, method="sampling+vmhwm",
            load_sample_interval_ms=1.0, inference_sample_interval_ms=10.0,
        ),
        device={"arch": "aarch64", "cores": 4, "temperature_c": None},
    )
    return dataclasses.replace(record, **changes)


def test_record_round_trips_through_json() -> None:
    record = sample_record()
    data = json.loads(record.to_json())
    assert data["schema"] == "fleetlite.profile/1"
    assert data["timings"]["steady"]["p99_ms"] == record.timings.steady.p99_ms
    assert ProfileRecord.from_json(record.to_json()) == record


def test_record_accepts_a_model_without_version_or_node_count() -> None:
    model = dataclasses.replace(sample_record().model, version=None, node_count=None)
    record = sample_record(model=model)
    assert ProfileRecord.from_json(record.to_json()) == record


def mutate(path: str, value: Any) -> bytes:
    """The sample record's JSON with ``path`` (dotted) set to ``value``, deleted if ``...``."""
    data = sample_record().to_dict()
    *parents, last = path.split(".")
    target = data
    for key in parents:
        target = target[key]
    if value is ...:
        del target[last]
    else:
        target[last] = value
    return encode(data)


@pytest.mark.parametrize(
    ("path", "value", "code"),
    [
        ("timings", ..., MISSING_FIELD),
        ("device_id", ..., MISSING_FIELD),
        ("timings.steady.p95_ms", ..., MISSING_FIELD),
        ("memory.peak_rss_inference_mb", ..., MISSING_FIELD),
        ("model.sha256", ..., MISSING_FIELD),
        ("device_id", 7, BAD_TYPE),
        ("ts", "yesterday", BAD_TYPE),
        ("model", [], BAD_TYPE),
        ("model.version", "3", BAD_TYPE),
        ("model.size_bytes", 1.5, BAD_TYPE),
        ("model.inputs", [{"name": "x", "shape": ["1"], "dtype": "float32"}], BAD_TYPE),
        ("run.threads", True, BAD_TYPE),
        ("run.isolated", "yes", BAD_TYPE),
        ("timings.steady.count", "50", BAD_TYPE),
        ("timings.steady", 3.0, BAD_TYPE),
        ("device", "pi", BAD_TYPE),
        ("model.sha256", "AB" * 32, BAD_VALUE),
        ("model.quantization", "int4", BAD_VALUE),
        ("run.threads", 0, BAD_VALUE),
        ("run.timing", "wall", BAD_VALUE),
        ("timings.steady.count", 0, BAD_VALUE),
        ("timings.steady.p50_ms", 1.0, BAD_VALUE),  # above p90: unordered
        ("timings.init_ms", -1.0, BAD_VALUE),
        ("trigger", "", BAD_VALUE),
        ("device_id", "x" * 65, BAD_VALUE),
    ],
)
def test_record_rejects_bad_fields(path: str, value: Any, code: str) -> None:
    with pytest.raises(MessageError) as info:
        ProfileRecord.from_json(mutate(path, value))
    assert info.value.code == code
    assert path.rsplit(".", maxsplit=1)[-1] in str(info.value) or code == BAD_VALUE


def test_record_errors_name_the_section() -> None:
    with pytest.raises(MessageError, match=r"in 'timings': in 'steady': field 'p95_ms'"):
        ProfileRecord.from_json(mutate("timings.steady.p95_ms", ...))


def test_record_rejects_other_schema_versions() -> None:
    data = sample_record().to_dict()
    data["schema"] = "fleetlite.profile/3"  # /2 is read too: tests/test_lm_profile.py
    with pytest.raises(MessageError) as info:
        ProfileRecord.from_json(encode(data))
    assert info.value.code == WRONG_SCHEMA


def test_budgets_and_text() -> None:
    record = sample_record()
    budgets = find_device_class("raspberry-pi-4").budgets
    checks = {c.name: c for c in check_budgets(record, budgets)}
    assert checks["p95 latency"].measured == record.timings.steady.p95_ms
    assert checks["peak RSS"].measured == 44.0 and all(c.ok for c in checks.values())
    text = render_text(record, budgets)
    for word in ("p50", "p90", "p95", "p99", "first inference", "xnnpack", "budget"):
        assert word in text


# -- real profiles -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", PROJECT_MODELS)
def test_profile_of_project_model(models_dir: Path, name: str) -> None:
    path = models_dir / f"{name}.tflite"
    record = profile_model(path, num_threads=1, model_version=4, trigger="cli", **FAST)
    model = load_model(path)
    steady = record.timings.steady
    assert FAST["min_runs"] <= steady.count <= FAST["max_runs"]
    assert ordered(steady) and steady.min_ms > 0
    assert record.timings.warmup_count >= FAST["warmup_runs"]
    assert record.timings.init_ms > 0 and record.timings.first_inference_ms > 0
    assert record.model.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert record.model.size_bytes == path.stat().st_size
    assert record.model.name == name and record.model.version == 4
    assert record.model.quantization == ("int8" if name.endswith("_int8") else "float32")
    assert record.model.inputs == model.describe()["inputs"]
    assert record.model.outputs == model.describe()["outputs"]
    assert record.model.node_count == sum(record.model.op_counts.values()) > 0
    assert record.run.threads == 1 and record.run.timing == "invoke"
    assert record.run.inputs == "synthetic" and not record.run.isolated
    assert record.run.backend == model.backend.name
    assert record.run.delegate in ("xnnpack", "none")
    mem = record.memory
    assert mem.peak_rss_inference_mb >= mem.rss_after_load_mb > 0
    assert mem.peak_rss_load_mb >= max(mem.rss_before_load_mb, mem.rss_after_load_mb)
    assert "temperature_c_end" in record.device and record.device["cores"]
    assert ProfileRecord.from_json(record.to_json()) == record


def test_threads_are_recorded(models_dir: Path) -> None:
    record = profile_model(models_dir / "sensor_autoencoder.tflite", num_threads=2, **FAST)
    assert record.run.threads == 2


def test_memory_sampling_interval(models_dir: Path) -> None:
    path = models_dir / "sensor_autoencoder.tflite"
    auto = profile_model(path, **FAST).memory
    assert auto.load_sample_interval_ms == 1.0
    assert auto.inference_sample_interval_ms == (10.0 if auto.method == "sampling+vmhwm" else 1.0)
    fixed = profile_model(path, memory_sample_interval_s=0.002, **FAST).memory
    assert fixed.inference_sample_interval_ms == 2.0
    with pytest.raises(ValueError, match="memory_sample_interval_s"):
        profile_model(path, memory_sample_interval_s=0.0, **FAST)


def test_device_class_supplies_threads_and_loop(models_dir: Path) -> None:
    device_class = find_device_class("raspberry-pi-4")
    record = profile_model(models_dir / "two_in_two_out.tflite", device_class="raspberry-pi-4",
                           warmup_min_seconds=0.0, min_seconds=0.0)
    assert record.run.threads == device_class.runtime.default_threads
    assert record.run.min_runs == device_class.profiler.min_runs
    assert record.run.max_runs == device_class.profiler.max_runs
    assert device_class.profiler.min_runs <= record.timings.steady.count
    assert record.timings.steady.count <= device_class.profiler.max_runs
    assert record.device["device_class"] == "raspberry-pi-4"


def test_bytes_source_and_given_inputs(models_dir: Path) -> None:
    content = (models_dir / "two_in_two_out.tflite").read_bytes()
    inputs = {"a": np.ones((1, 8), np.float32), "b": np.zeros((1, 8), np.float32)}
    record = profile_model(content, inputs=inputs, **FAST)
    assert record.model.name == "model"
    assert record.model.sha256 == hashlib.sha256(content).hexdigest()
    assert record.run.inputs == "given"


def test_given_inputs_must_match(models_dir: Path) -> None:
    with pytest.raises(InputMismatchError):
        profile_model(models_dir / "two_in_two_out.tflite",
                      inputs={"a": np.ones((1, 8), np.float32)}, **FAST)


def test_synthetic_inputs_are_in_range_and_deterministic(models_dir: Path) -> None:
    classifier = load_model(models_dir / "intent_classifier.tflite")
    vocab = json.loads((models_dir / "intent_classifier.vocab.json").read_text())["vocab"]
    (tokens,) = synthetic_inputs(classifier, seed=5)
    assert tokens.dtype == np.int32 and tokens.shape == classifier.inputs[0].shape
    assert tokens.min() >= 0 and tokens.max() < len(vocab)
    np.testing.assert_array_equal(tokens, synthetic_inputs(classifier, seed=5)[0])
    int8 = load_model(models_dir / "sensor_autoencoder_int8.tflite")
    (window,) = synthetic_inputs(int8)
    assert window.dtype == np.int8 and window.shape == (1, 16)
    floats = synthetic_inputs(load_model(models_dir / "two_in_two_out.tflite"))
    assert all(a.dtype == np.float32 and a.min() >= -1 and a.max() < 1 for a in floats)


def test_bad_parameters_are_value_errors(models_dir: Path) -> None:
    with pytest.raises(ValueError, match="num_threads"):
        profile_model(models_dir / "two_in_two_out.tflite", num_threads=0)
    with pytest.raises(ValueError, match="max_seconds"):
        profile_model(models_dir / "two_in_two_out.tflite", max_seconds=0)


# -- isolated ----------------------------------------------------------------------------------


def test_isolated_profile(models_dir: Path) -> None:
    path = models_dir / "sensor_autoencoder_int8.tflite"
    record = profile_model_isolated(path, device_id="gw-7", trigger="model_change", **FAST)
    assert record.run.isolated and record.device_id == "gw-7"
    assert record.trigger == "model_change" and record.model.quantization == "int8"
    assert FAST["min_runs"] <= record.timings.steady.count <= FAST["max_runs"]
    assert record.model.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert record.memory.peak_rss_inference_mb >= record.memory.rss_after_load_mb > 0


def test_isolated_profile_with_bytes_and_inputs(models_dir: Path) -> None:
    content = (models_dir / "two_in_two_out.tflite").read_bytes()
    inputs = [np.ones((1, 8), np.float32), np.ones((1, 8), np.float32)]
    record = profile_model_isolated(content, inputs=inputs, model_name="pair", **FAST)
    assert record.model.name == "pair" and record.run.inputs == "given"


def test_isolated_profile_refuses_a_bad_model(tmp_path: Path) -> None:
    path = tmp_path / "garbage.tflite"
    path.write_bytes(b"\x10\x00\x00\x00TFL3" + bytes(range(256)) * 4)
    with pytest.raises(InvalidModelError):
        profile_model_isolated(path, **FAST)


def test_isolated_crash_is_model_crashed(monkeypatch: pytest.MonkeyPatch,
                                         models_dir: Path) -> None:
    # A child that dies from SIGSEGV, as tflite-runtime does on some corrupt files.
    monkeypatch.setattr(profiler, "_child_command", lambda: ["/bin/sh", "-c", "kill -SEGV $$"])
    with pytest.raises(ModelCrashedError, match="SIGSEGV"):
        profile_model_isolated(models_dir / "two_in_two_out.tflite", **FAST)


def test_isolated_hang_is_model_crashed(monkeypatch: pytest.MonkeyPatch,
                                        models_dir: Path) -> None:
    monkeypatch.setattr(profiler, "_child_command", lambda: ["/bin/sh", "-c", "sleep 30"])
    with pytest.raises(ModelCrashedError, match="did not finish"):
        profile_model_isolated(models_dir / "two_in_two_out.tflite", timeout=0.5, **FAST)


# -- CLI ---------------------------------------------------------------------------------------

CLI_FAST = ["--warmup-min-seconds", "0", "--min-runs", "20", "--max-runs", "500",
            "--min-seconds", "0.05"]


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fleetlite-agent")
    profile_cli.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["profile", *argv])


def test_cli_prints_a_table(models_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = str(models_dir / "sensor_autoencoder.tflite")
    args = parse([model, "--in-process", "--device-class", "raspberry-pi-4", *CLI_FAST])
    assert profile_cli.run(args) == 0
    out = capsys.readouterr().out
    for word in ("p50", "p99", "first inference", "budget p95 latency", "2 threads"):
        assert word in out


def test_cli_json_in_process(models_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = parse([str(models_dir / "two_in_two_out.tflite"), "--in-process", "--json",
                  "--threads", "1", *CLI_FAST])
    assert profile_cli.run(args) == 0
    record = ProfileRecord.from_dict(json.loads(capsys.readouterr().out))
    assert not record.run.isolated and record.trigger == "cli"


def test_cli_errors_exit_nonzero(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert profile_cli.run(parse([str(tmp_path / "missing.tflite"), "--in-process"])) == 1
    assert "no such model file" in capsys.readouterr().err
    assert profile_cli.run(parse([str(tmp_path / "m.tflite"), "--device-class", "nope"])) == 1
    assert profile_cli.run(parse([str(tmp_path / "m.tflite"), "--max-seconds", "0"])) == 2


def run_cli(module: str, argv: list[str]) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-m", module, *argv], capture_output=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr.decode()
    data: dict[str, Any] = json.loads(proc.stdout)
    return data


def test_cli_subprocess_json(models_dir: Path) -> None:
    model = str(models_dir / "intent_classifier.tflite")
    data = run_cli("fleetlite.agent.profile_cli", [model, "--json", *CLI_FAST])
    record = ProfileRecord.from_dict(data)
    assert record.run.isolated and record.model.name == "intent_classifier"


def test_fleetlite_agent_profile_json(models_dir: Path) -> None:
    from fleetlite.agent.cli import build_parser

    commands = next(action.choices for action in build_parser()._actions
                    if isinstance(action, argparse._SubParsersAction))
    if "profile" not in commands:
        pytest.skip("'profile' is not wired into fleetlite-agent (agent/cli.py) yet")
    model = str(models_dir / "sensor_autoencoder.tflite")
    data = run_cli("fleetlite.agent.cli", ["profile", model, "--json", *CLI_FAST])
    assert ProfileRecord.from_dict(data).model.name == "sensor_autoencoder"


def test_profile_settings_is_what_the_record_holds() -> None:
    names = {f.name for f in dataclasses.fields(ProfileSettings)}
    assert names <= {f.name for f in dataclasses.fields(RunParameters)}
