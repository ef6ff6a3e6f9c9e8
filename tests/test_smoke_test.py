"""The OTA smoke test: real release bundles, the real interpreter in real subprocesses, one test
per reason code, and the pure budget check as a table."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from fleetlite.agent.smoke_test import (
    INVALID_MODEL,
    OVER_LATENCY_BUDGET,
    OVER_MEMORY_BUDGET,
    REASONS,
    SMOKE_CRASHED,
    SMOKE_OUTPUT_MISMATCH,
    SMOKE_TIMEOUT,
    SMOKE_VECTORS_MISMATCH,
    SmokeMeasures,
    SmokeResult,
    check_budgets,
    run_smoke_test,
)
from fleetlite.fleet.intent_model import intent_classifier
from fleetlite.fleet.release_builder import build_release
from fleetlite.sdk.device_class import Budgets, find_device_class, load_device_classes
from fleetlite.sdk.manifest import Tolerance
from fleetlite.sdk.runtime.errors import RuntimeMissingError
from fleetlite.sdk.smoke import SmokeCase, SmokeVectors, Tensor
from fleetlite.tools.models import crashing_model
from tests.conftest import crash_fixture_crashes

NOW = 1_764_201_600
BUDGETS = find_device_class("raspberry-pi-4").budgets


def _strictest_defaults() -> tuple[Budgets, int]:
    """Every shipped class's budget at its tightest, and the most threads any class uses."""
    classes = list(load_device_classes().values())
    budgets = Budgets(**{
        f.name: min(getattr(dc.budgets, f.name) for dc in classes)
        for f in dataclasses.fields(Budgets)
    })
    return budgets, max(dc.runtime.default_threads for dc in classes)


@dataclasses.dataclass(frozen=True)
class Release:
    model: Path
    smoke: Path
    tolerance: Tolerance


def _release(models_dir: Path, stem: str, out: Path) -> Release:
    bundle = build_release([models_dir / f"{stem}.tflite"], name="smoke", version=1,
                           device_classes=["raspberry-pi-4"], issued=NOW)
    bundle.write_dir(out)
    return Release(out / f"{stem}.tflite", out / bundle.manifest.smoke.file,
                   bundle.manifest.smoke.tolerance)


@pytest.fixture(scope="module")
def releases(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Release]:
    root = tmp_path_factory.mktemp("releases")
    return {stem: _release(models_dir, stem, root / stem)
            for stem in ("intent_classifier", "sensor_autoencoder_int8", "two_in_two_out")}


def _run(release: Release, *, model: Path | None = None, smoke: Path | None = None,
         budgets: Budgets = BUDGETS, **kwargs: object) -> SmokeResult:
    return run_smoke_test(model or release.model, smoke or release.smoke,
                          tolerance=release.tolerance, budgets=budgets, num_threads=1,
                          **kwargs)  # type: ignore[arg-type]


def _failed(result: SmokeResult, reason: str) -> None:
    assert not result.passed, result
    assert result.reason == reason, result
    assert result.reason in REASONS


# --- passing models ---------------------------------------------------------------------------


@pytest.mark.parametrize("stem", ["intent_classifier", "sensor_autoencoder_int8",
                                  "two_in_two_out"])
def test_project_models_pass_every_shipped_device_class(
    releases: dict[str, Release], stem: str
) -> None:
    budgets, threads = _strictest_defaults()
    release = releases[stem]
    result = run_smoke_test(release.model, release.smoke, tolerance=release.tolerance,
                            budgets=budgets, num_threads=threads)
    assert result.passed, result
    assert (result.reason, result.mismatches, result.cases) == ("", [], 3)
    measured = [result.load_ms, result.first_inference_ms, result.p50_ms, result.p95_ms,
                result.peak_rss_mb, result.model_size_mb]
    assert all(value is not None and value > 0 for value in measured), result
    assert result.p50_ms is not None and result.p95_ms is not None
    assert result.p50_ms <= result.p95_ms
    assert result.model_size_mb == pytest.approx(release.model.stat().st_size / 2**20)
    assert result.to_dict()["passed"] is True


def test_quantized_outputs_are_compared_in_lsb(
    releases: dict[str, Release], tmp_path: Path
) -> None:
    release = releases["sensor_autoencoder_int8"]
    vectors = SmokeVectors.from_json(release.smoke.read_bytes())
    first = vectors.cases[0]
    out = first.outputs[0].array.copy()
    out.flat[0] = out.flat[0] - 1 if out.flat[0] > -128 else out.flat[0] + 1
    shifted = SmokeCase(first.inputs, (Tensor(first.outputs[0].name, out),))
    smoke = tmp_path / "shifted.smoke.json"
    smoke.write_bytes(SmokeVectors((shifted, *vectors.cases[1:])).to_json())

    assert _run(release, smoke=smoke).passed  # the default tolerance allows 1 LSB
    strict = dataclasses.replace(release, tolerance=Tolerance(max_lsb=0))
    result = _run(strict, smoke=smoke)
    _failed(result, SMOKE_OUTPUT_MISMATCH)
    assert "max_lsb=0" in result.message and "worst difference 1 in case 0" in result.message


# --- failing models ---------------------------------------------------------------------------


def test_wrong_outputs_are_an_output_mismatch(
    releases: dict[str, Release], tmp_path: Path
) -> None:
    bad = tmp_path / "intent_classifier.tflite"
    bad.write_bytes(intent_classifier(scramble_labels=True).tflite)
    result = _run(releases["intent_classifier"], model=bad)
    _failed(result, SMOKE_OUTPUT_MISMATCH)
    assert "3 of 3 smoke case(s) differ" in result.message
    assert "worst difference" in result.message and "'probabilities'" in result.message
    assert len(result.mismatches) == 3 and result.mismatches[0].startswith("case 0: ")
    assert result.cases == 3 and result.load_ms is not None
    assert result.p95_ms is None  # no latency runs for a model that computes the wrong thing


def _crash_vectors(path: Path) -> Path:
    case = SmokeCase((Tensor("x", np.zeros((1, 4, 4), np.float32)),),
                     (Tensor("y", np.zeros((1, 4), np.float32)),))
    path.write_bytes(SmokeVectors((case,)).to_json())
    return path


def test_a_crashing_model_is_reported_with_its_signal(tmp_path: Path) -> None:
    model = tmp_path / "crash.tflite"
    model.write_bytes(crashing_model())
    result = run_smoke_test(model, _crash_vectors(tmp_path / "crash.smoke.json"),
                            tolerance=Tolerance(), budgets=BUDGETS, num_threads=1)
    if crash_fixture_crashes():
        _failed(result, SMOKE_CRASHED)
        assert "SIGSEGV" in result.message
    else:  # ai-edge-litert refuses the model instead of crashing
        _failed(result, INVALID_MODEL)
    assert result.load_ms is None and result.cases == 0


def test_a_crash_is_decided_before_bad_vectors(tmp_path: Path) -> None:
    model = tmp_path / "crash.tflite"
    model.write_bytes(crashing_model())
    smoke = tmp_path / "bad.smoke.json"
    smoke.write_bytes(b"not json")
    result = run_smoke_test(model, smoke, tolerance=Tolerance(), budgets=BUDGETS, num_threads=1)
    _failed(result, SMOKE_CRASHED if crash_fixture_crashes() else INVALID_MODEL)


def test_a_truncated_model_is_invalid(releases: dict[str, Release], tmp_path: Path) -> None:
    release = releases["intent_classifier"]
    content = release.model.read_bytes()
    truncated = tmp_path / "truncated.tflite"
    truncated.write_bytes(content[: len(content) // 2])
    result = _run(release, model=truncated)
    _failed(result, INVALID_MODEL)
    assert "truncated" in result.message


def test_vectors_of_another_model_do_not_fit(releases: dict[str, Release]) -> None:
    result = _run(releases["intent_classifier"], smoke=releases["two_in_two_out"].smoke)
    _failed(result, SMOKE_VECTORS_MISMATCH)
    assert "2 inputs, the model has 1" in result.message
    assert result.mismatches and result.load_ms is not None and result.cases == 0


def test_malformed_vectors_are_a_vectors_mismatch(
    releases: dict[str, Release], tmp_path: Path
) -> None:
    smoke = tmp_path / "bad.smoke.json"
    smoke.write_bytes(b'{"_type": "fleetlite.smoke", "spec_version": 1, "cases": []}')
    result = _run(releases["two_in_two_out"], smoke=smoke)
    _failed(result, SMOKE_VECTORS_MISMATCH)
    assert "cases must be a list" in result.message


# --- budgets and limits -----------------------------------------------------------------------


def test_over_latency_budget(releases: dict[str, Release]) -> None:
    tight = dataclasses.replace(BUDGETS, max_p95_latency_ms=0.0001)
    result = _run(releases["two_in_two_out"], budgets=tight)
    _failed(result, OVER_LATENCY_BUDGET)
    assert "p95 latency" in result.message and "0.0001 ms" in result.message
    assert result.p95_ms is not None and result.cases == 3


def test_over_memory_budget(releases: dict[str, Release]) -> None:
    tight = dataclasses.replace(BUDGETS, max_peak_rss_mb=1)
    result = _run(releases["two_in_two_out"], budgets=tight)
    _failed(result, OVER_MEMORY_BUDGET)
    assert "peak RSS" in result.message
    assert result.peak_rss_mb is not None and result.peak_rss_mb > 1


def test_an_oversized_model_is_refused_before_it_is_loaded(
    releases: dict[str, Release]
) -> None:
    tight = dataclasses.replace(BUDGETS, max_model_size_mb=0.0001)
    result = _run(releases["intent_classifier"], budgets=tight)
    _failed(result, OVER_MEMORY_BUDGET)
    assert "model size" in result.message and "not loaded" in result.message
    assert result.load_ms is None and result.model_size_mb is not None


def test_timeout(releases: dict[str, Release]) -> None:
    result = _run(releases["two_in_two_out"], timeout_s=0.001)
    _failed(result, SMOKE_TIMEOUT)
    assert "0.001 s" in result.message


def test_a_missing_runtime_raises_instead_of_rejecting(releases: dict[str, Release]) -> None:
    with pytest.raises(RuntimeMissingError):
        _run(releases["two_in_two_out"], backend="no-such-runtime")


@pytest.mark.parametrize("kwargs", [{"num_threads": 0}, {"latency_runs": 0},
                                    {"timeout_s": 0.0}])
def test_bad_arguments_raise(releases: dict[str, Release], kwargs: dict[str, object]) -> None:
    release = releases["two_in_two_out"]
    args: dict[str, object] = {"tolerance": release.tolerance, "budgets": BUDGETS,
                               "num_threads": 1, **kwargs}
    with pytest.raises(ValueError):
        run_smoke_test(release.model, release.smoke, **args)  # type: ignore[arg-type]


# --- check_budgets ----------------------------------------------------------------------------

LIMITS = Budgets(max_p95_latency_ms=10, max_first_inference_ms=50, max_model_load_ms=100,
                 max_peak_rss_mb=200, max_model_size_mb=20)
OK = SmokeMeasures(load_ms=5, first_inference_ms=2, p95_ms=1, peak_rss_mb=60, model_size_mb=1)


@pytest.mark.parametrize(
    ("changes", "reason", "words"),
    [
        ({}, None, []),
        ({"p95_ms": 10}, None, []),  # at the budget is within it
        ({"peak_rss_mb": 200, "model_size_mb": 20, "load_ms": 100}, None, []),
        ({"p95_ms": 10.5}, OVER_LATENCY_BUDGET, ["p95 latency 10.5 ms", "budget of 10 ms"]),
        ({"first_inference_ms": 51}, OVER_LATENCY_BUDGET, ["first inference 51 ms"]),
        ({"load_ms": 101}, OVER_LATENCY_BUDGET, ["model load 101 ms"]),
        ({"peak_rss_mb": 201}, OVER_MEMORY_BUDGET, ["peak RSS 201 MB", "budget of 200 MB"]),
        ({"model_size_mb": 21}, OVER_MEMORY_BUDGET, ["model size 21 MB"]),
        ({"p95_ms": 11, "peak_rss_mb": 300}, OVER_LATENCY_BUDGET,
         ["p95 latency 11 ms", "peak RSS 300 MB"]),  # latency wins; both are listed
        ({"p95_ms": float("nan")}, OVER_LATENCY_BUDGET, ["p95 latency nan"]),
    ],
)
def test_check_budgets(changes: dict[str, float], reason: str | None, words: list[str]) -> None:
    verdict = check_budgets(dataclasses.replace(OK, **changes), LIMITS)
    if reason is None:
        assert verdict is None
        return
    assert verdict is not None and verdict[0] == reason
    for word in words:
        assert word in verdict[1]
