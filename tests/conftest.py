"""Shared pytest fixtures: the project-made models and their directory."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.mqtt_harness import Mosquitto

REPO = Path(__file__).resolve().parent.parent
MODELS = REPO / "tests" / "fixtures" / "models"


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
