"""Shared pytest fixtures: the project-made models and their directory."""

from __future__ import annotations

import os
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.mqtt_harness import Mosquitto

REPO = Path(__file__).resolve().parent.parent
MODELS = REPO / "tests" / "fixtures" / "models"
PG_URL = os.environ.get("FLEETLITE_TEST_PG_URL", "")
PG_SKIP = ("PostgreSQL variant skipped: FLEETLITE_TEST_PG_URL is not set. Run "
           'export FLEETLITE_TEST_PG_URL="$(bash tools/postgres.sh)" and pytest again '
           "(CI sets it).")


_CONFIG_HOME: list[Path] = []


def pytest_configure(config: pytest.Config) -> None:
    """Keep the developer's own fleetlite configuration (contexts, the fleet root) out of the
    suite: every command a test runs reads an empty config in a directory of its own."""
    import tempfile

    home = Path(tempfile.mkdtemp(prefix="fleetlite-test-config-"))
    _CONFIG_HOME.append(home)
    os.environ["FLEETLITE_CONFIG"] = str(home / "config.yaml")
    os.environ.pop("FLEETLITE_ROOT", None)


def pytest_unconfigure(config: pytest.Config) -> None:
    import shutil

    for home in _CONFIG_HOME:
        shutil.rmtree(home, ignore_errors=True)


def crash_fixture_crashes() -> bool:
    """Whether tools/models.crashing_model() really crashes this run's TFLite runtime.

    tflite-runtime 2.14 segfaults on it; ai-edge-litert checks the missing tensor and refuses the
    model instead. Either way the caller must survive with a clear error; the tests say which.
    """
    from fleetlite.sdk.runtime.interpreter import select_backend

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


def fresh_pg_database() -> Iterator[str]:
    """A new, empty database on the test server for one test, dropped afterwards."""
    import psycopg

    name = f"fleetlite_t_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(PG_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    parts = urllib.parse.urlsplit(PG_URL)
    try:
        yield urllib.parse.urlunsplit(parts._replace(path=f"/{name}"))
    finally:
        drop_pg_database(name)


def drop_pg_database(name: str, timeout: float = 30.0) -> None:
    """Drop a test database. FORCE may not end every session on it (an autovacuum worker:
    "permission denied to terminate process"): then wait for them to end, and drop it then."""
    import psycopg

    with psycopg.connect(PG_URL, autocommit=True) as admin:
        try:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            return
        except psycopg.errors.InsufficientPrivilege:
            pass
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            row = admin.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s",
                                (name,)).fetchone()
            if not row or not row[0]:
                break
            time.sleep(0.1)
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The URL of an empty store, on each backend (PostgreSQL when FLEETLITE_TEST_PG_URL names a
    server: a fresh database, dropped afterwards)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'fleet.db'}"
    else:
        if not PG_URL:
            pytest.skip(PG_SKIP)
        yield from fresh_pg_database()
