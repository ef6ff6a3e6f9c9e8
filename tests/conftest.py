"""Shared pytest fixtures: the project-made models and their directory."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MODELS = REPO / "tests" / "fixtures" / "models"


@pytest.fixture(scope="session")
def models_dir() -> Path:
    """The committed, project-made models (regenerate with tools/build_models.py)."""
    return MODELS
