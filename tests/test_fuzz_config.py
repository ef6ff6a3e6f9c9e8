"""Fuzzing of the YAML files a gateway reads: ``agent.yaml`` (:mod:`fleetlite.agent.config`)
and the device class profiles (:mod:`fleetlite.sdk.device_class`), as parsed documents and as
files. YAML adds its own hazards to JSON's: alias bombs, tags, timestamps, sets, binary, base-60
and hex numbers, ``.nan``/``.inf``, ``~user`` paths. Every input is accepted or refused with
:class:`AgentConfigError` / :class:`DeviceClassError`, with a message of bounded length.
"""

from __future__ import annotations

import copy
import datetime
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from fleetlite.agent.config import AgentConfig, load_config, parse_config
from fleetlite.agent.errors import AgentConfigError
from fleetlite.sdk.device_class import DeviceClass, load_device_class
from fleetlite.sdk.errors import DeviceClassError
from tests.fuzz_settings import (
    corrupted,
    fuzz,
    json_values,
    mutated,
    parse_or_refuse,
    sweep,
    value_slots,
)

PROFILES = Path(__file__).resolve().parent.parent / "device_profiles"
#: error messages may echo a long value once, but never grow with what aliases expand to
MAX_MESSAGE = 50_000
PLACEHOLDER = "FUZZ-PLACEHOLDER-VALUE"


def alias_bomb(levels: int = 8) -> str:
    """One flow-style YAML value that expands to 10**levels strings through aliases."""
    anchors = ["&a0 [x, x, x, x, x, x, x, x, x, x]"]
    anchors += [f"&a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, levels)]
    return f"[{', '.join(anchors)}]"


# Single-line YAML values that parse to something a JSON document cannot hold, or fail to parse.
YAML_VALUES = [
    # PyYAML's scanner is quadratic in flow nesting: 600 levels pass its recursion limit quickly
    alias_bomb(), "[" * 600 + "]" * 600, "{a: " * 600 + "1" + "}" * 600,
    "2024-13-01", "2024-02-29 12:00:00", "!!int '0x'", "!!float 'x'", "!!timestamp 2001-02-30",
    "!!python/object/apply:os.system ['true']", "!!python/name:os.system", "!!binary '@@'",
    "!!set {1, 2}", "!!omap [a: 1]", ".nan", ".inf", "-.inf", "1.0e+400",
    "0x7fffffffffffffffffffffffff", "-0b1", "0o17", "12:30:00", "1_000", "~", "*undefined",
    "&x", "!<tag:yaml.org,2002:str> 5", "{a: 1, a: 2}", "[1, {b: 2}]", '"\\0"', '"\\ud800"',
    "'~nosuchuser/x'", "'~'", "\"~\\0\"", "'a\tb'", "|", "> x", "'unterminated", "@x", "`x",
    "%x", "!x 1", "y", "off", "0", "-1", "999999999999999999999999999999", "''",
]
YAML_DOCUMENTS = [
    "", "\n", "---\n---\n", "null", "[]", "42", "'text'", "\ufeff", "\x00", "\t- x", "? [a]\n: 1",
    "%YAML 9.9\n---\na: 1", "a: &x 1\n<<: {b: 2}", "<<: *nope", "a: 1\na: 2",
    f"device_id: {alias_bomb()}\n", "- " * 2000 + "x", "a:\n" + "  " * 500 + "b: 1",
]
# What PyYAML's safe_load can produce beyond JSON values.
YAML_SCALARS = st.sampled_from([datetime.date(2024, 2, 29), datetime.datetime(1, 1, 1),
                                b"\x00\xff", {1, 2}, -0.0, float("nan"), float("inf")])


def yaml_values() -> st.SearchStrategy[Any]:
    return json_values() | YAML_SCALARS


@st.composite
def yaml_texts(draw: st.DrawFn, seed: dict[str, Any]) -> str:
    """The seed dumped as YAML with one value replaced by a raw YAML fragment, a whole hostile
    document, or the dump corrupted at the byte level."""
    kind = draw(st.sampled_from(["fragment", "fragment", "document", "corrupted"]))
    if kind == "document":
        return draw(st.sampled_from(YAML_DOCUMENTS))
    text = yaml.safe_dump(seed, sort_keys=False)
    if kind == "corrupted":
        return draw(corrupted(text.encode())).decode("utf-8", "surrogateescape")
    return with_fragment(seed, draw(st.integers(0, 10**6)), draw(st.sampled_from(YAML_VALUES)))


def with_fragment(seed: dict[str, Any], slot: int, fragment: str) -> str:
    """The seed as YAML text with value number ``slot`` (modulo their count) written as
    ``fragment``."""
    doc = copy.deepcopy(seed)
    slots = list(value_slots(doc))
    container, key = slots[slot % len(slots)]
    container[key] = PLACEHOLDER
    return yaml.safe_dump(doc, sort_keys=False).replace(PLACEHOLDER, fragment)


def every_fragment(seed: dict[str, Any], spread: int = 3) -> Iterator[tuple[str, str]]:
    """Each YAML fragment at every ``spread``-th value of the seed (rotating, so every value
    gets a share of the fragments), then each hostile document."""
    for slot in range(len(list(value_slots(seed)))):
        for index, fragment in enumerate(YAML_VALUES):
            if (slot + index) % spread == 0:
                yield f"slot {slot}: {fragment[:30]}", with_fragment(seed, slot, fragment)
    for document in YAML_DOCUMENTS:
        yield f"document {document[:30]!r}", document


def _bounded(exc: Exception) -> None:
    assert len(str(exc)) <= MAX_MESSAGE, f"a {len(str(exc))}-character error message"


def write(path: Path, text: str) -> Path:
    path.write_bytes(text.encode("utf-8", "surrogateescape"))
    return path


# --- agent.yaml -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("fuzz-config")
    for name in ("ca.pem", "device.pem", "device.key", "root.json"):
        (directory / name).write_text("x")
    return directory


# Every setting used; paths are relative to the file's directory (the workdir), so the seed does
# not depend on a fixture (a fixture's value in a strategy confuses hypothesis' shrinker).
AGENT_SEED: dict[str, Any] = {
    "device_id": "gw-0001", "device_class": "raspberry-pi-4", "tags": {"site": "plant-7"},
    "broker": {"host": "mqtt.example.net", "port": 8883, "keepalive_s": 30,
               "username": "u", "password": "p",
               "tls": {"ca": "ca.pem", "cert": "device.pem", "key": "device.key",
                       "insecure_skip_hostname": False}},
    "state_dir": "state", "socket": "agent.sock", "trust_root": "root.json",
    "intervals": {"telemetry_s": 60, "reconnect_min_s": 1, "reconnect_max_s": 60},
    "threads": 2, "models": [{"name": "intent", "path": "m.tflite", "version": 3}],
    "spool": {"max_records": 100, "max_mb": 1.5}, "profile_on_model_change": True,
    "ota": {"chunk_idle_s": 5, "health_inferences": 3},
}


def _parsed(data: Any, directory: Path) -> AgentConfig | None:
    return parse_or_refuse(lambda: parse_config(data, origin="agent.yaml", base=directory),
                           AgentConfigError, _bounded)


def _loaded(text: str, directory: Path) -> AgentConfig | None:
    path = write(directory / "agent.yaml", text)
    return parse_or_refuse(lambda: load_config(path), AgentConfigError, _bounded)


def test_the_agent_seed_is_valid(workdir: Path) -> None:
    config = load_config(write(workdir / "agent.yaml", yaml.safe_dump(AGENT_SEED)))
    assert config.broker.tls is not None and config.models[0].version == 3


def test_agent_config_every_field_with_every_hostile_value(workdir: Path) -> None:
    sweep(AGENT_SEED, lambda doc: _parsed(doc, workdir))


def test_agent_yaml_every_field_with_every_yaml_hazard(workdir: Path) -> None:
    failures = []
    for label, text in every_fragment(AGENT_SEED):
        try:
            _loaded(text, workdir)
        except Exception as exc:
            failures.append(f"{label}: {type(exc).__name__}: {str(exc)[:160]}")
    assert not failures, "\n".join(failures[:40])


@fuzz(200)
@given(data=st.data())
def test_agent_config_documents(workdir: Path, data: st.DataObject) -> None:
    doc = data.draw(mutated(AGENT_SEED) | st.dictionaries(st.text(max_size=10) | st.integers(),
                                                    yaml_values(), max_size=6), label="doc")
    _parsed(doc, workdir)


@fuzz(200)
@given(data=st.data())
def test_agent_yaml_files(workdir: Path, data: st.DataObject) -> None:
    _loaded(data.draw(yaml_texts(AGENT_SEED), label="text"), workdir)


# --- device class profiles --------------------------------------------------------------------

PROFILE_SEED: dict[str, Any] = yaml.safe_load((PROFILES / "raspberry-pi-4.yaml").read_text())


def _profile_from_dict(doc: Any) -> DeviceClass | None:
    return parse_or_refuse(lambda: DeviceClass.from_dict(doc, source="fuzz.yaml",
                                                         expected_name="raspberry-pi-4"),
                           DeviceClassError, _bounded)


def _profile_file(text: str, directory: Path) -> DeviceClass | None:
    path = write(directory / "raspberry-pi-4.yaml", text)
    return parse_or_refuse(lambda: load_device_class(path), DeviceClassError, _bounded)


def test_the_shipped_profiles_are_valid_seeds() -> None:
    for path in sorted(PROFILES.glob("*.yaml")):
        assert load_device_class(path).name == path.stem


def test_profile_every_field_with_every_hostile_value() -> None:
    sweep(PROFILE_SEED, _profile_from_dict)


def test_profile_yaml_every_field_with_every_yaml_hazard(workdir: Path) -> None:
    failures = []
    for label, text in every_fragment(PROFILE_SEED):
        try:
            _profile_file(text, workdir)
        except Exception as exc:
            failures.append(f"{label}: {type(exc).__name__}: {str(exc)[:160]}")
    assert not failures, "\n".join(failures[:40])


@fuzz(200)
@given(doc=mutated(PROFILE_SEED) | st.dictionaries(st.text(max_size=10) | st.integers(),
                                                    yaml_values(), max_size=6))
def test_profile_documents(doc: Any) -> None:
    _profile_from_dict(doc)


@fuzz(200)
@given(data=st.data())
def test_profile_yaml_files(workdir: Path, data: st.DataObject) -> None:
    _profile_file(data.draw(yaml_texts(PROFILE_SEED), label="text"), workdir)
