"""``fleetlite.sdk.atomic.write_atomic``, the one crash-safe write of agent and fleet: never
overwrites when told not to (even a file made in between), gives the exact mode asked for
whatever the umask, and leaves no temporary behind, also with writers in several threads."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from fleetlite.sdk.atomic import write_atomic


def test_a_new_file_is_never_written_over(tmp_path: Path) -> None:
    target = tmp_path / "release.key"
    write_atomic(target, b"first", overwrite=False)
    with pytest.raises(FileExistsError):
        write_atomic(target, b"second", overwrite=False)
    assert target.read_bytes() == b"first"
    assert [p.name for p in tmp_path.iterdir()] == ["release.key"]


def test_the_mode_is_exact_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        write_atomic(tmp_path / "exact.pem", b"x", mode=0o644, exact_mode=True)
        write_atomic(tmp_path / "masked.json", b"x", mode=0o644)
        write_atomic(tmp_path / "secret.yaml", b"x", mode=0o600, exact_mode=True)
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert modes == {"exact.pem": 0o644, "masked.json": 0o600, "secret.yaml": 0o600}


def test_writers_in_several_threads_leave_one_whole_file(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    payloads = [bytes([n]) * 65536 for n in range(8)]
    errors: list[BaseException] = []

    def write(payload: bytes) -> None:
        try:
            for _ in range(20):
                write_atomic(target, payload)
        except BaseException as exc:  # collected: the test fails on any
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(p,)) for p in payloads]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors
    assert target.read_bytes() in payloads  # one writer's bytes, whole
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]
