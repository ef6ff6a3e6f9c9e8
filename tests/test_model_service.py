"""The model service against the real interpreter: serving, hot swap, rollback and statistics."""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetlite.agent.errors import ModelNotFoundError
from fleetlite.agent.model_service import BUCKET_BOUNDS_MS, LatencyHistogram, ModelService
from fleetlite.sdk.runtime.errors import InputMismatchError, InvalidModelError
from fleetlite.sdk.runtime.interpreter import Model, load_model
from fleetlite.tools.models import two_in_two_out

MODEL_FILES = (
    "intent_classifier.tflite",
    "sensor_autoencoder.tflite",
    "sensor_autoencoder_int8.tflite",
    "two_in_two_out.tflite",
)
# One bucket spans a factor of 10**0.1; allow for the 6-digit rounding of the bounds.
BUCKET_RATIO = 10 ** (1 / 10) * (1 + 1e-5)


def sample_inputs(model: Model, seed: int) -> dict[str, npt.NDArray[Any]]:
    """Valid random inputs for every input tensor of ``model``."""
    rng = np.random.default_rng(seed)
    inputs = {}
    for spec in model.inputs:
        dtype = spec.numpy_dtype
        if dtype == np.int32:  # token ids: stay inside the intent classifier's vocabulary
            inputs[spec.name] = rng.integers(0, 100, spec.shape).astype(dtype)
        elif np.issubdtype(dtype, np.integer):
            info = np.iinfo(dtype)
            inputs[spec.name] = rng.integers(info.min, info.max, spec.shape, endpoint=True).astype(
                dtype
            )
        else:
            inputs[spec.name] = rng.normal(size=spec.shape).astype(dtype)
    return inputs


Scorer = Callable[[], npt.NDArray[Any]]


def hammer_through_swaps(
    connect: Callable[[], AbstractContextManager[Scorer]],
    references: Sequence[npt.NDArray[Any]],
    swap: Callable[[int], None],
    *,
    responses: int,
    join_timeout: float,
) -> list[int]:
    """Six threads score without pause while ``swap(n)`` runs for n = 1..6; fails on any error.

    Each thread enters ``connect()`` once and calls the scorer it yields in a loop. Swap n must
    make ``references[n % 2]`` the answer; each phase waits for ``responses`` answers equal to it.
    Returns, per answer, the index of the reference it equals (-1: neither).
    """
    stop = threading.Event()
    lock = threading.Lock()
    served: list[int] = []
    failures: list[BaseException] = []

    def hammer() -> None:
        with connect() as score:
            while not stop.is_set():
                try:
                    result = score()
                except BaseException as exc:
                    failures.append(exc)
                    return
                which = [i for i, ref in enumerate(references) if np.array_equal(result, ref)]
                with lock:
                    served.append(which[0] if which else -1)

    def wait_for_responses_from(index: int, count: int) -> None:
        start = len(served)
        for _ in range(120_000):  # a hang guard (about 2 minutes), not a timing assertion
            with lock:
                if failures or served[start:].count(index) >= count:
                    return
            time.sleep(0.001)
        raise AssertionError(f"no {count} responses from model {index} arrived")

    threads = [threading.Thread(target=hammer) for _ in range(6)]
    for thread in threads:
        thread.start()
    try:
        wait_for_responses_from(0, responses)
        for n in range(1, 7):
            swap(n)
            wait_for_responses_from(n % 2, responses)
    finally:
        stop.set()
        for thread in threads:
            thread.join(join_timeout)
    assert failures == []
    return served


@pytest.fixture
def second_two_in_two_out(tmp_path: Path) -> Path:
    """A model with the same interface as two_in_two_out.tflite but other weights."""
    path = tmp_path / "two_in_two_out_v2.tflite"
    path.write_bytes(two_in_two_out(seed=7).tflite)
    return path


class BlockingInput:
    """An input array whose conversion waits: holds a request inside the model until released."""

    def __init__(self, array: npt.NDArray[Any]) -> None:
        self.array = array
        self.entered = threading.Event()
        self.release = threading.Event()

    def __array__(self, dtype: Any = None) -> npt.NDArray[Any]:
        self.entered.set()
        assert self.release.wait(30)
        return self.array


# -- serving ---------------------------------------------------------------------------------


@pytest.mark.parametrize("filename", MODEL_FILES)
def test_infer_matches_the_runtime_bit_for_bit(models_dir: Path, filename: str) -> None:
    path = models_dir / filename
    direct = load_model(path)
    service = ModelService()
    service.activate("m", path)
    for seed in range(5):
        inputs = sample_inputs(direct, seed)
        expected = direct.run(inputs)
        got = service.infer("m", inputs)
        assert list(got) == direct.output_names
        for name in expected:
            assert got[name].dtype == expected[name].dtype
            np.testing.assert_array_equal(got[name], expected[name])
    positional = service.infer("m", list(sample_inputs(direct, 9).values()))
    assert list(positional) == direct.output_names


def test_describe_lists_every_active_model(models_dir: Path) -> None:
    service = ModelService()
    service.activate(
        "intent", models_dir / "intent_classifier.tflite", version=4, sha256="ab" * 32
    )
    service.activate("pair", models_dir / "two_in_two_out.tflite", num_threads=2)
    intent, pair = service.describe()
    assert intent["name"] == "intent" and intent["version"] == 4 and intent["sha256"] == "ab" * 32
    assert intent["path"] == str(models_dir / "intent_classifier.tflite")
    assert intent["inputs"] == [{"name": "tokens", "shape": [1, 16], "dtype": "int32"}]
    assert [o["name"] for o in pair["outputs"]] == ["out_sum", "out_score"]
    assert pair["num_threads"] == 2 and pair["version"] is None
    assert service.names() == ["intent", "pair"]


def test_unknown_model_names_the_active_ones(models_dir: Path) -> None:
    service = ModelService()
    with pytest.raises(ModelNotFoundError, match="none"):
        service.infer("intent", np.zeros((1, 16), np.int32))
    service.activate("intent", models_dir / "intent_classifier.tflite")
    with pytest.raises(ModelNotFoundError, match=r"\['intent'\]"):
        service.get("intnet")


@pytest.mark.parametrize("name", ["", " intent", "a" * 129, "bad\nname"])
def test_model_names_are_checked(models_dir: Path, name: str) -> None:
    with pytest.raises(ValueError, match="model name"):
        ModelService().activate(name, models_dir / "intent_classifier.tflite")


def test_stats_count_inferences_errors_and_latency(models_dir: Path) -> None:
    ticks = iter(np.arange(0.0, 100.0, 0.0005))  # every clock read advances 0.5 ms
    service = ModelService(clock=lambda: float(next(ticks)))
    service.activate("intent", models_dir / "intent_classifier.tflite", version=2)
    tokens = np.zeros((1, 16), np.int32)
    for _ in range(10):
        service.infer("intent", tokens)
    with pytest.raises(InputMismatchError):
        service.infer("intent", tokens.astype(np.int64))
    stats = service.stats()["intent"]
    assert stats["version"] == 2
    assert stats["inferences"] == 10 and stats["errors"] == 1 and stats["rejected_inputs"] == 1
    latency = stats["latency_ms"]
    assert latency["count"] == 10
    assert latency["min_ms"] == latency["max_ms"] == pytest.approx(0.5)
    assert latency["sum_ms"] == pytest.approx(5.0)
    assert latency["p99_ms"] == pytest.approx(0.5)
    assert sum(count for _, count in latency["buckets"]) == 10


def test_a_model_the_runtime_refuses_leaves_the_old_one_active(
    models_dir: Path, tmp_path: Path
) -> None:
    service = ModelService()
    first = service.activate("m", models_dir / "two_in_two_out.tflite", version=1)
    broken = tmp_path / "broken.tflite"
    broken.write_bytes(b"not a model at all")
    with pytest.raises(InvalidModelError):
        service.swap("m", broken, version=2)
    assert service.get("m") is first
    with pytest.raises(InvalidModelError, match="no such model file"):
        service.swap("m", tmp_path / "missing.tflite")
    with pytest.raises(ModelNotFoundError):
        service.swap("other", models_dir / "two_in_two_out.tflite")


# -- hot swap --------------------------------------------------------------------------------


def test_swap_keeps_the_previous_model_for_rollback(
    models_dir: Path, second_two_in_two_out: Path
) -> None:
    service = ModelService()
    v1 = service.activate("m", models_dir / "two_in_two_out.tflite", version=1, num_threads=2)
    assert service.previous("m") is None
    v2 = service.swap("m", second_two_in_two_out, version=2)
    assert service.get("m") is v2 and service.previous("m") is v1
    assert v2.num_threads == 2  # inherited from the model it replaced
    assert service.rollback("m") is v1
    assert service.get("m") is v1 and service.previous("m") is v2
    service.deactivate("m")
    with pytest.raises(ModelNotFoundError):
        service.rollback("m")
    lean = ModelService(keep_previous=False)
    lean.activate("m", models_dir / "two_in_two_out.tflite")
    lean.swap("m", second_two_in_two_out)
    assert lean.previous("m") is None


def test_a_request_running_during_a_swap_finishes_on_the_old_model(
    models_dir: Path, second_two_in_two_out: Path
) -> None:
    old_direct = load_model(models_dir / "two_in_two_out.tflite")
    new_direct = load_model(second_two_in_two_out)
    inputs = sample_inputs(old_direct, 3)
    service = ModelService()
    old = service.activate("m", models_dir / "two_in_two_out.tflite", version=1)
    blocking = BlockingInput(inputs["a"])
    results: list[Any] = []
    worker = threading.Thread(
        target=lambda: results.append(service.run("m", {"a": blocking, "b": inputs["b"]}))
    )
    worker.start()
    assert blocking.entered.wait(30)
    # The request is inside the old model; the swap must neither wait for it nor disturb it.
    new = service.swap("m", second_two_in_two_out, version=2)
    after_swap = service.run("m", inputs)
    blocking.release.set()
    worker.join(30)
    (during,) = results
    assert during.model is old and after_swap.model is new
    np.testing.assert_array_equal(during.outputs["out_score"], old_direct.run(inputs)["out_score"])
    np.testing.assert_array_equal(
        after_swap.outputs["out_score"], new_direct.run(inputs)["out_score"]
    )
    assert service.stats()["m"]["version"] == 2


@pytest.mark.parametrize("pool_size", [1, 3])
def test_hot_swap_under_load_fails_no_request(
    models_dir: Path, second_two_in_two_out: Path, pool_size: int
) -> None:
    paths = [models_dir / "two_in_two_out.tflite", second_two_in_two_out]
    inputs = sample_inputs(load_model(paths[0]), 11)
    references = [load_model(p).run(inputs)["out_score"] for p in paths]
    assert not np.array_equal(references[0], references[1])
    service = ModelService(pool_size=pool_size)
    service.activate("m", paths[0])
    served = hammer_through_swaps(
        lambda: contextlib.nullcontext(lambda: service.infer("m", inputs)["out_score"]),
        references,
        lambda n: service.swap("m", paths[n % 2], version=n),
        responses=50,
        join_timeout=30,
    )
    assert -1 not in served
    assert service.get("m").pool_size == pool_size
    assert service.stats()["m"]["errors"] == 0


# -- latency histogram -----------------------------------------------------------------------


def test_bucket_bounds_are_log_spaced_from_0_05_to_5000_ms() -> None:
    assert BUCKET_BOUNDS_MS[0] <= 0.05 * 1.01 and BUCKET_BOUNDS_MS[-1] >= 5000
    assert {0.1, 1.0, 10.0, 100.0, 1000.0} <= set(BUCKET_BOUNDS_MS)
    ratios = np.diff(np.log10(BUCKET_BOUNDS_MS))
    np.testing.assert_allclose(ratios, 0.1, atol=1e-5)


def neighbours(data: npt.NDArray[np.float64], q: float) -> tuple[float, float]:
    """The samples either side of numpy's (linear) ``q``-th percentile."""
    ordered = np.sort(data)
    position = q / 100 * (len(ordered) - 1)
    return float(ordered[math.floor(position)]), float(ordered[math.ceil(position)])


def assert_within_a_bucket(hist: LatencyHistogram, data: npt.NDArray[np.float64], q: float) -> None:
    estimate = hist.percentile(q)
    assert estimate is not None
    low, high = neighbours(data, q)
    assert low <= np.percentile(data, q) <= high
    assert low / BUCKET_RATIO <= estimate <= high * BUCKET_RATIO, (q, low, estimate, high)


@pytest.mark.parametrize("seed", range(5))
def test_percentiles_match_numpy_within_bucket_resolution(seed: int) -> None:
    rng = np.random.default_rng(seed)
    # Interior percentiles fall between the lowest and highest bounds; 0 and 100 are exact.
    data = rng.lognormal(mean=1.0, sigma=1.5, size=5000)
    hist = LatencyHistogram()
    for value in data:
        hist.observe(float(value))
    for q in (0, 1, 5, 25, 50, 75, 90, 95, 99, 99.9, 100):
        assert_within_a_bucket(hist, data, q)
    assert hist.count == data.size
    assert hist.sum == pytest.approx(data.sum())
    assert hist.percentile(0) == data.min() and hist.percentile(100) == data.max()


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.floats(min_value=0.0, max_value=5000.0), min_size=1, max_size=300),
    st.floats(min_value=0.0, max_value=100.0),
)
def test_percentile_property(values: list[float], q: float) -> None:
    hist = LatencyHistogram()
    for value in values:
        hist.observe(value)
    data = np.asarray(values)
    estimate = hist.percentile(q)
    assert estimate is not None
    assert data.min() <= estimate <= data.max()
    low, high = neighbours(data, q)
    if low > BUCKET_BOUNDS_MS[0]:
        assert low / BUCKET_RATIO <= estimate <= high * BUCKET_RATIO
    else:  # everything below the lowest bound shares one bucket
        assert estimate <= max(high * BUCKET_RATIO, BUCKET_BOUNDS_MS[0])


def test_histogram_snapshot_round_trips_and_rejects_bad_values() -> None:
    hist = LatencyHistogram()
    assert hist.percentile(50) is None
    assert hist.snapshot()["p50_ms"] is None and hist.snapshot()["min_ms"] is None
    for value in (0.0, 0.01, 0.3, 0.31, 7.5, 7.5, 120.0, 6000.0):
        hist.observe(value)
    snapshot = hist.snapshot()
    assert snapshot["count"] == 8 and snapshot["min_ms"] == 0.0 and snapshot["max_ms"] == 6000.0
    assert snapshot["buckets"][-1] == [None, 1]  # above the highest bound
    again = LatencyHistogram.from_snapshot(snapshot)
    assert again.counts == hist.counts
    assert again.snapshot() == snapshot
    for bad in (-1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="latency"):
            hist.observe(bad)
    with pytest.raises(ValueError, match="percentile"):
        hist.percentile(101)
    with pytest.raises(ValueError, match="bucket bounds"):
        LatencyHistogram.from_snapshot({"count": 1, "buckets": [[0.33, 1]]})
