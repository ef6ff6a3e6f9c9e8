"""Device class profiles: the shipped files load, and broken files fail naming file, key and fix."""

from __future__ import annotations

import copy
import importlib.resources
import importlib.util
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetlite.sdk.device_class import (
    PROFILES_ENV,
    DeviceClass,
    default_profiles_dir,
    find_device_class,
    load_device_class,
    load_device_classes,
)
from fleetlite.sdk.errors import DeviceClassError, FleetLiteError

REPO_PROFILES = Path(__file__).resolve().parent.parent / "device_profiles"
REQUIRED_CLASSES = {
    "raspberry-pi-4",
    "raspberry-pi-5",
    "jetson-orin-nano",
    "industrial-x86-gateway",
    "small-arm-gateway",
}

VALID: dict[str, Any] = {
    "schema_version": 1,
    "device_class": "test-board",
    "description": "A board for tests.",
    "hardware": {
        "arch": "aarch64",
        "cpu": "4x Cortex-A72",
        "cores": 4,
        "ram_mb": 4096,
        "accelerator": None,
    },
    "runtime": {"prefer": "tflite-runtime", "delegate": "xnnpack", "default_threads": 2},
    "budgets": {
        "max_p95_latency_ms": 150,
        "max_first_inference_ms": 500,
        "max_model_load_ms": 5000,
        "max_peak_rss_mb": 1024,
        "max_model_size_mb": 256,
    },
    "profiler": {
        "warmup_runs": 5,
        "min_runs": 50,
        "max_runs": 1000,
        "min_seconds": 1.0,
        "max_seconds": 30,
    },
}


def write_profile(directory: Path, data: object, name: str = "test-board") -> Path:
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def setting(key_path: str, value: object) -> Callable[[dict[str, Any]], None]:
    *parents, last = key_path.split(".")

    def mutate(data: dict[str, Any]) -> None:
        for parent in parents:
            data = data[parent]
        data[last] = value

    return mutate


def dropping(key_path: str) -> Callable[[dict[str, Any]], None]:
    *parents, last = key_path.split(".")

    def mutate(data: dict[str, Any]) -> None:
        for parent in parents:
            data = data[parent]
        del data[last]

    return mutate


# --- the shipped profiles -------------------------------------------------------------------------


def test_repo_profiles_dir_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PROFILES_ENV, raising=False)
    assert default_profiles_dir() == REPO_PROFILES


def test_every_required_class_ships_and_validates() -> None:
    classes = load_device_classes()
    assert set(classes) >= REQUIRED_CLASSES
    for name, device_class in classes.items():
        assert device_class.name == name
        assert device_class.source is not None
        assert Path(device_class.source).stem == name


@pytest.mark.parametrize("name", sorted(REQUIRED_CLASSES))
def test_each_profile_says_where_its_numbers_come_from(name: str) -> None:
    first_line = (REPO_PROFILES / f"{name}.yaml").read_text(encoding="utf-8").splitlines()[0]
    assert first_line.startswith("# Numbers: ")


@pytest.mark.parametrize("name", sorted(REQUIRED_CLASSES))
def test_budgets_let_tiny_test_models_pass_on_an_x86_ci_runner(name: str) -> None:
    # Tiny MLP/embedding models run in microseconds; a Python process with numpy and the
    # runtime peaks at ~60-120 MB RSS; loading includes interpreter creation on a busy runner.
    budgets = find_device_class(name).budgets
    assert budgets.max_p95_latency_ms >= 50
    assert budgets.max_first_inference_ms >= 200
    assert budgets.max_model_load_ms >= 2000
    assert budgets.max_peak_rss_mb >= 256
    assert budgets.max_model_size_mb >= 16


def test_to_dict_round_trips_every_shipped_profile() -> None:
    for device_class in load_device_classes().values():
        assert DeviceClass.from_dict(device_class.to_dict()) == device_class


def test_profiles_dir_can_be_moved_with_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_profile(tmp_path, VALID)
    monkeypatch.setenv(PROFILES_ENV, str(tmp_path))
    assert default_profiles_dir() == tmp_path
    assert list(load_device_classes()) == ["test-board"]
    assert find_device_class("test-board").hardware.cores == 4


def test_installed_package_data_holds_the_profiles() -> None:
    if importlib.util.find_spec("fleetlite.device_profiles") is None:
        pytest.skip("fleetlite.device_profiles is not mapped as a package in this install")
    installed = Path(str(importlib.resources.files("fleetlite.device_profiles")))
    assert set(load_device_classes(installed)) >= REQUIRED_CLASSES


# --- broken profiles: one table row per problem ---------------------------------------------------

BROKEN = [
    # (case id, change to VALID, key named in the message, problem named in the message)
    ("missing-section", dropping("budgets"), "budgets", "missing key"),
    ("missing-nested", dropping("budgets.max_model_load_ms"), "budgets.max_model_load_ms",
     "missing key"),
    ("unknown-top", setting("colour", "red"), "colour", "unknown key"),
    ("typo-suggests", setting("budgets.max_p95_latency", 5), "budgets.max_p95_latency",
     "Did you mean 'max_p95_latency_ms'"),
    ("text-for-number", setting("budgets.max_p95_latency_ms", "fast"),
     "budgets.max_p95_latency_ms", "expected a positive number, got 'fast'"),
    ("zero-budget", setting("budgets.max_first_inference_ms", 0),
     "budgets.max_first_inference_ms", "expected a positive number, got 0"),
    ("negative-budget", setting("budgets.max_peak_rss_mb", -5), "budgets.max_peak_rss_mb",
     "expected a positive number, got -5"),
    ("nan-budget", setting("budgets.max_model_size_mb", float("nan")),
     "budgets.max_model_size_mb", "expected a positive number, got nan"),
    ("infinite-budget", setting("budgets.max_model_load_ms", float("inf")),
     "budgets.max_model_load_ms", "expected a positive number, got inf"),
    ("bool-for-number", setting("budgets.max_p95_latency_ms", True),
     "budgets.max_p95_latency_ms", "got True (a boolean)"),
    ("null-budget", setting("budgets.max_p95_latency_ms", None), "budgets.max_p95_latency_ms",
     "got null"),
    ("float-for-int", setting("hardware.cores", 2.5), "hardware.cores",
     "expected a positive integer, got 2.5"),
    ("bool-for-int", setting("hardware.ram_mb", True), "hardware.ram_mb",
     "expected a positive integer"),
    ("zero-cores", setting("hardware.cores", 0), "hardware.cores", "expected a positive integer"),
    ("negative-warmup", setting("profiler.warmup_runs", -1), "profiler.warmup_runs",
     "expected an integer >= 0, got -1"),
    ("negative-min-seconds", setting("profiler.min_seconds", -0.5), "profiler.min_seconds",
     "expected a number >= 0"),
    ("bad-arch", setting("hardware.arch", "arm64"), "hardware.arch",
     "expected one of aarch64, armv7l, x86_64, got 'arm64'"),
    ("bad-runtime", setting("runtime.prefer", "tensorflow"), "runtime.prefer",
     "expected one of tflite-runtime, ai-edge-litert"),
    ("bad-delegate", setting("runtime.delegate", "XNNPACK"), "runtime.delegate",
     "expected one of xnnpack, none, gpu"),
    ("number-accelerator", setting("hardware.accelerator", 7), "hardware.accelerator",
     "expected non-empty text or null"),
    ("missing-accelerator", dropping("hardware.accelerator"), "hardware.accelerator",
     "missing key"),
    ("empty-description", setting("description", "  "), "description",
     "expected non-empty text"),
    ("section-not-mapping", setting("runtime", "tflite-runtime"), "runtime",
     "expected a mapping of prefer, delegate, default_threads"),
    ("non-text-key", lambda d: d["budgets"].update({5: 1}), "budgets.5", "keys must be text"),
    ("name-mismatch", setting("device_class", "other-board"), "device_class",
     "'other-board' does not match the file name 'test-board'"),
    ("bad-name", setting("device_class", "Test_Board"), "device_class",
     "lower-case letters, digits and single hyphens"),
    ("future-schema", setting("schema_version", 2), "schema_version",
     "unsupported schema version 2"),
    ("missing-schema", dropping("schema_version"), "schema_version", "missing key"),
    ("threads-over-cores", setting("runtime.default_threads", 8), "runtime.default_threads",
     "more than hardware.cores (4)"),
    ("litert-on-armv7l", lambda d: d["hardware"].update(arch="armv7l")
     or d["runtime"].update(prefer="ai-edge-litert"), "runtime.prefer", "no wheels for armv7l"),
    ("gpu-without-accelerator", setting("runtime.delegate", "gpu"), "runtime.delegate",
     "hardware.accelerator is null"),
    ("rss-over-ram", setting("budgets.max_peak_rss_mb", 8192), "budgets.max_peak_rss_mb",
     "more than hardware.ram_mb (4096)"),
    ("model-over-rss", setting("budgets.max_model_size_mb", 2048), "budgets.max_model_size_mb",
     "more than budgets.max_peak_rss_mb (1024)"),
    ("min-runs-over-max", setting("profiler.min_runs", 5000), "profiler.min_runs",
     "more than profiler.max_runs (1000)"),
    ("min-seconds-over-max", setting("profiler.min_seconds", 60), "profiler.min_seconds",
     "more than profiler.max_seconds (30)"),
]


@pytest.mark.parametrize(
    ("mutate", "key", "problem"), [row[1:] for row in BROKEN], ids=[row[0] for row in BROKEN]
)
def test_broken_profile_names_file_key_and_problem(
    tmp_path: Path, mutate: Callable[[dict[str, Any]], None], key: str, problem: str
) -> None:
    data = copy.deepcopy(VALID)
    mutate(data)
    path = write_profile(tmp_path, data)
    with pytest.raises(DeviceClassError) as caught:
        load_device_class(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: {key}: ")
    assert problem in message
    assert caught.value.path == str(path)
    assert caught.value.key == key
    assert message.rstrip().endswith(".")  # ends with what to do, as a sentence


def test_the_message_reads_as_in_the_docs(tmp_path: Path) -> None:
    data = copy.deepcopy(VALID)
    data["budgets"]["max_p95_latency_ms"] = "fast"
    path = write_profile(tmp_path, data, name="test-board")
    with pytest.raises(DeviceClassError) as caught:
        load_device_class(path)
    assert str(caught.value) == (
        f"{path}: budgets.max_p95_latency_ms: expected a positive number, got 'fast' (text). "
        "Fix the value in the file."
    )


def test_device_class_error_is_a_fleetlite_error() -> None:
    assert issubclass(DeviceClassError, FleetLiteError)


# --- broken files --------------------------------------------------------------------------------

SYNTAX_ERROR = """\
schema_version: 1
device_class: test-board
hardware:
  arch: aarch64
  cpu: [unclosed
  cores: 4
"""


def test_yaml_syntax_error_reports_the_line(tmp_path: Path) -> None:
    path = tmp_path / "test-board.yaml"
    path.write_text(SYNTAX_ERROR, encoding="utf-8")
    with pytest.raises(DeviceClassError) as caught:
        load_device_class(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: line ")
    assert "invalid YAML" in message
    assert "Fix the YAML syntax" in message
    assert caught.value.line is not None
    assert f"line {caught.value.line}," in message
    assert 5 <= caught.value.line <= 7  # the unclosed flow sequence starts on line 5


def test_bad_indentation_reports_its_line(tmp_path: Path) -> None:
    path = tmp_path / "test-board.yaml"
    path.write_text("schema_version: 1\nhardware:\n  arch: aarch64\n cores: 4\n", encoding="utf-8")
    expected = r"test-board\.yaml: line 4, column \d+: invalid YAML"
    with pytest.raises(DeviceClassError, match=expected):
        load_device_class(path)


def test_duplicate_key_is_refused_with_its_line(tmp_path: Path) -> None:
    text = yaml.safe_dump(VALID, sort_keys=False).replace(
        "  max_p95_latency_ms: 150\n", "  max_p95_latency_ms: 150\n  max_p95_latency_ms: 9000\n"
    )
    path = tmp_path / "test-board.yaml"
    path.write_text(text, encoding="utf-8")
    line = text.splitlines().index("  max_p95_latency_ms: 9000") + 1
    with pytest.raises(DeviceClassError) as caught:
        load_device_class(path)
    assert str(caught.value).startswith(
        f"{path}: line {line}: budgets.max_p95_latency_ms: duplicate key."
    )


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"", "the file is empty"),
        (b"# only a comment\n\n", "the file is empty"),
        (b"- raspberry-pi-4\n- raspberry-pi-5\n", "expected a mapping"),
        (b"just some text\n", "got 'just some text' (text)"),
        (b"schema_version: 1\ndescription: caf\xe9\n", "not UTF-8 text"),
        (b"a: 1\n---\nb: 2\n", "invalid YAML"),
    ],
    ids=["empty", "comments-only", "list", "scalar", "latin-1", "two-documents"],
)
def test_unusable_file_names_file_and_problem(tmp_path: Path, content: bytes, problem: str) -> None:
    path = tmp_path / "test-board.yaml"
    path.write_bytes(content)
    with pytest.raises(DeviceClassError) as caught:
        load_device_class(path)
    assert str(caught.value).startswith(f"{path}: ")
    assert problem in str(caught.value)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.yaml"
    with pytest.raises(DeviceClassError, match=r"nowhere\.yaml: file not found\. Check"):
        load_device_class(path)


# --- directories and lookup ----------------------------------------------------------------------


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(DeviceClassError, match=f"directory not found.*{PROFILES_ENV}"):
        load_device_classes(tmp_path / "absent")


def test_one_broken_profile_fails_the_directory_load_naming_it(tmp_path: Path) -> None:
    write_profile(tmp_path, VALID)
    broken = copy.deepcopy(VALID)
    broken["device_class"] = "second-board"
    broken["hardware"]["cores"] = "four"
    write_profile(tmp_path, broken, name="second-board")
    with pytest.raises(DeviceClassError, match=r"second-board\.yaml: hardware\.cores: "):
        load_device_classes(tmp_path)


def test_yml_suffix_is_refused_not_skipped(tmp_path: Path) -> None:
    (tmp_path / "test-board.yml").write_text(yaml.safe_dump(VALID), encoding="utf-8")
    with pytest.raises(DeviceClassError, match=r"Rename it to test-board\.yaml"):
        load_device_classes(tmp_path)


def test_other_files_are_ignored(tmp_path: Path) -> None:
    write_profile(tmp_path, VALID)
    (tmp_path / "__init__.py").write_text('"""x"""\n', encoding="utf-8")
    (tmp_path / ".#test-board.yaml").write_text("editor lock", encoding="utf-8")
    assert list(load_device_classes(tmp_path)) == ["test-board"]


def test_unknown_class_lists_the_known_ones(tmp_path: Path) -> None:
    write_profile(tmp_path, VALID)
    with pytest.raises(DeviceClassError, match=r"no device class 'rpi4'; known: test-board\."):
        find_device_class("rpi4", tmp_path)


@pytest.mark.parametrize("name", ["../etc/passwd", "Raspberry-Pi-4", "", "a--b", "x" * 65])
def test_find_refuses_names_that_are_not_class_names(tmp_path: Path, name: str) -> None:
    with pytest.raises(DeviceClassError, match="is not a device class name"):
        find_device_class(name, tmp_path)


# --- no input makes validation crash with anything but DeviceClassError --------------------------

LEAF_PATHS = [
    f"{section}.{key}" if isinstance(VALID[section], dict) else section
    for section in VALID
    for key in (VALID[section] if isinstance(VALID[section], dict) else [""])
]
ANY_VALUE = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                 max_size=3),
    max_leaves=5,
)


@settings(max_examples=300, deadline=None)
@given(key_path=st.sampled_from(LEAF_PATHS), value=ANY_VALUE)
def test_any_single_bad_value_gives_a_device_class_error(key_path: str, value: object) -> None:
    data = copy.deepcopy(VALID)
    setting(key_path, value)(data)
    try:
        device_class = DeviceClass.from_dict(data, source="fuzz.yaml")
    except DeviceClassError as exc:
        assert str(exc).startswith("fuzz.yaml: ")
    else:
        assert DeviceClass.from_dict(device_class.to_dict()) == device_class
