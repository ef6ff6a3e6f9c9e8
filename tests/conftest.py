"""Shared pytest fixtures: the project-made models and their directory."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.mqtt_harness import Mosquitto

REPO = Path(__file__).resolve().parent.parent
MODELS = REPO / "tests" / "fixtures" / "models"


def crash_fixture_crashes() -> bool:
    """Whether tools/models.crashing_model() really crashes this run's TFLite runtime.

    tflite-runtime 2.14 segfaults on it; ai-edge-litert checks the missing tensor and refuses the
    model instead. Either way the caller must survive with a clear error; the tests say which.
    """
    from fleetlite.agent.runtime import select_backend

    return select_backend().name == "tflite-runtime"


@pytest.fixture(scope="session")
def models_dir() -> Path:
    """The committed, project-made models (regenerate with tools/build_models.py)."""
    return MODELS


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    """A real Mosquitto broker on a free loopback port, stopped after the test."""
    instance = Mosquitto(tmp_path / "broker").start()
    try:
        yield instance
    finally:
        instance.stop()
