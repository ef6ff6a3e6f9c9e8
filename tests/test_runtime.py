"""The runtime layer against the real interpreter: describe, run, quantize, and refuse bad input."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from fleetlite.sdk.runtime.errors import (
    InputMismatchError,
    InvalidModelError,
    ModelCrashedError,
    RuntimeMissingError,
    UnsupportedOpError,
)
from fleetlite.sdk.runtime.interpreter import dequantize, load_model, quantize, select_backend
from fleetlite.sdk.runtime.isolated import check_model
from tests.conftest import crash_fixture_crashes


def test_backend_reports_name_and_version() -> None:
    backend = select_backend()
    assert backend.name in ("tflite-runtime", "ai-edge-litert", "tensorflow")
    assert backend.version[0].isdigit()


def test_unknown_backend_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEETLITE_RUNTIME", "no-such-runtime")
    with pytest.raises(RuntimeMissingError, match="choose one of"):
        select_backend()


def test_missing_backend_says_how_to_install() -> None:
    try:
        import ai_edge_litert  # noqa: F401
    except ImportError:
        with pytest.raises(RuntimeMissingError, match=r"fleetlite\[litert\]"):
            select_backend("ai-edge-litert")
    else:
        assert select_backend("ai-edge-litert").name == "ai-edge-litert"


def test_load_from_path_and_bytes_agree(models_dir: Path) -> None:
    path = models_dir / "sensor_autoencoder.tflite"
    from_path = load_model(path)
    from_bytes = load_model(path.read_bytes())
    assert from_path.describe() == from_bytes.describe()
    x = np.random.default_rng(1).normal(size=from_path.inputs[0].shape).astype(np.float32)
    a = from_path.run(x)
    b = from_bytes.run({from_bytes.input_names[0]: x})
    assert list(a) == from_path.output_names
    np.testing.assert_array_equal(a[from_path.output_names[0]], b[from_bytes.output_names[0]])


def test_describe_float_model(models_dir: Path) -> None:
    model = load_model(models_dir / "sensor_autoencoder.tflite", num_threads=2)
    (spec,) = model.inputs
    assert spec.dtype == "float32" and spec.shape == (1, 16) and not spec.quantized
    desc = model.describe()
    assert desc["num_threads"] == 2
    assert desc["backend"] == select_backend().name
    assert desc["outputs"][0]["shape"] == [1, 16]


def test_describe_int8_model_has_quantization(models_dir: Path) -> None:
    model = load_model(models_dir / "sensor_autoencoder_int8.tflite")
    (spec,) = model.inputs
    assert spec.dtype == "int8" and spec.quantized and spec.scale > 0
    assert -128 <= spec.zero_point <= 127
    assert model.describe()["inputs"][0]["quantization"]["scale"] == spec.scale


def test_quantize_round_trip_within_half_a_step(models_dir: Path) -> None:
    spec = load_model(models_dir / "sensor_autoencoder_int8.tflite").inputs[0]
    lo = (-128 - spec.zero_point) * spec.scale
    hi = (127 - spec.zero_point) * spec.scale
    real = np.linspace(lo, hi, 64, dtype=np.float32).reshape(4, 16)
    q = quantize(real, spec)
    assert q.dtype == np.int8
    assert np.max(np.abs(dequantize(q, spec) - real)) <= spec.scale / 2 + 1e-6
    # out-of-range values clamp instead of wrapping around
    assert quantize(np.array([hi * 10]), spec)[0] == 127


def test_int8_model_runs_on_quantized_inputs(models_dir: Path) -> None:
    model = load_model(models_dir / "sensor_autoencoder_int8.tflite")
    spec = model.inputs[0]
    x = np.random.default_rng(3).normal(size=spec.shape)
    out = model.run(quantize(x, spec))[model.output_names[0]]
    assert out.dtype == np.int8 and out.shape == model.outputs[0].shape


def test_two_inputs_two_outputs_by_name_and_position(models_dir: Path) -> None:
    model = load_model(models_dir / "two_in_two_out.tflite")
    assert len(model.inputs) == 2 and len(model.outputs) == 2
    rng = np.random.default_rng(7)
    arrays = [rng.normal(size=s.shape).astype(np.float32) for s in model.inputs]
    by_position = model.run(arrays)
    by_name = model.run(dict(zip(reversed(model.input_names), reversed(arrays))))
    assert list(by_position) == model.output_names
    for name in model.output_names:
        np.testing.assert_array_equal(by_position[name], by_name[name])


def test_wrong_inputs_are_named_in_the_error(models_dir: Path) -> None:
    model = load_model(models_dir / "two_in_two_out.tflite")
    a, b = (np.zeros(s.shape, np.float32) for s in model.inputs)
    with pytest.raises(InputMismatchError, match="takes 2 input"):
        model.run([a])
    with pytest.raises(InputMismatchError, match="missing"):
        model.run({model.input_names[0]: a})
    with pytest.raises(InputMismatchError, match=r"expects dtype float32, got float64"):
        model.run([a.astype(np.float64), b])
    with pytest.raises(InputMismatchError, match="expects shape"):
        model.run([np.zeros((3, 3), np.float32), b])


def test_int8_input_given_floats_suggests_quantize(models_dir: Path) -> None:
    model = load_model(models_dir / "sensor_autoencoder_int8.tflite")
    with pytest.raises(InputMismatchError, match="quantize"):
        model.run(np.zeros(model.inputs[0].shape, np.float32))


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.tflite"
    path.write_bytes(b"")
    with pytest.raises(InvalidModelError, match="empty"):
        load_model(path)


def test_random_bytes(tmp_path: Path) -> None:
    path = tmp_path / "random.tflite"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(InvalidModelError, match="not a TFLite model"):
        load_model(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InvalidModelError, match="no such model file"):
        load_model(tmp_path / "nope.tflite")


def test_random_bytes_with_a_valid_identifier_are_refused(tmp_path: Path) -> None:
    rng = np.random.default_rng(11)
    for _ in range(5):
        blob = bytearray(rng.integers(0, 256, size=2048, dtype=np.uint8).tobytes())
        blob[0:4] = (16).to_bytes(4, "little")
        blob[4:8] = b"TFL3"
        path = tmp_path / "forged.tflite"
        path.write_bytes(bytes(blob))
        # the interpreter may refuse it or crash: isolate it, as callers must for untrusted files
        with pytest.raises(InvalidModelError):
            check_model(path, timeout=30)


@pytest.mark.parametrize("model", ["intent_classifier", "sensor_autoencoder_int8", "heavy_mlp"])
def test_truncated_models_are_refused_before_the_interpreter_sees_them(
    models_dir: Path, tmp_path: Path, model: str
) -> None:
    # tflite-runtime does not verify flatbuffers: cut off in the weights, a model loads and runs
    # on whatever memory follows; cut off in the tables, it can segfault. The bounds check
    # refuses every cut.
    content = (models_dir / f"{model}.tflite").read_bytes()
    step = max(1, len(content) // 200)
    for cut in [*range(8, len(content), step), len(content) - 1]:
        with pytest.raises(InvalidModelError, match=r"truncated or corrupt|not a TFLite"):
            load_model(content[:cut])


def test_truncated_model_in_the_isolated_check(models_dir: Path, tmp_path: Path) -> None:
    content = (models_dir / "intent_classifier.tflite").read_bytes()
    path = tmp_path / "truncated.tflite"
    path.write_bytes(content[: len(content) // 2])
    with pytest.raises(InvalidModelError, match="truncated or corrupt"):
        check_model(path, timeout=30)


def test_interpreter_crash_is_reported_not_suffered(tmp_path: Path) -> None:
    from fleetlite.tools.models import crashing_model

    path = tmp_path / "crashing.tflite"
    path.write_bytes(crashing_model())
    # the file is structurally valid: only running it reveals the crash
    if crash_fixture_crashes():
        with pytest.raises(ModelCrashedError, match=r"crashed \(SIGSEGV\)"):
            check_model(path, timeout=30)
    else:  # ai-edge-litert refuses it instead of crashing
        with pytest.raises(InvalidModelError, match="not a loadable TFLite model"):
            check_model(path, timeout=30)


def test_isolated_check_describes_a_good_model(models_dir: Path) -> None:
    result = check_model(models_dir / "two_in_two_out.tflite")
    assert len(result.description["inputs"]) == 2
    assert result.load_ms > 0


def test_unsupported_op_is_named(tmp_path: Path) -> None:
    from fleetlite.tools.models import unsupported_op_model

    path = tmp_path / "custom.tflite"
    path.write_bytes(unsupported_op_model())
    with pytest.raises(UnsupportedOpError, match="FleetLiteNoSuchOp"):
        load_model(path)
