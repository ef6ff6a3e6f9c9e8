"""The device-side rebuild (``agent/delta_rebuild.py``) on real files: the output appears only
whole and checked against the signed entry, a refusal leaves nothing behind, and a rebuild killed
with SIGKILL (a real subprocess, stopped while it waits for the rest of the delta) leaves the
output absent and the base untouched; the next rebuild succeeds."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fleetlite.agent.delta_rebuild import TEMP_MARKER, rebuild
from fleetlite.fleet.delta_diff import binary_ops, tensor_ops
from fleetlite.sdk.delta import KIND_BINARY, KIND_TENSORS, encode_delta
from fleetlite.sdk.errors import DeltaError
from fleetlite.sdk.manifest import FileEntry, file_entry
from tests.delta_fixtures import lm_pair, small_pair


def _files(tmp_path: Path, pair: tuple[bytes, bytes], kind: int = KIND_TENSORS
           ) -> tuple[Path, Path, FileEntry, bytes]:
    base, target = pair
    find = tensor_ops if kind == KIND_TENSORS else binary_ops
    (tmp_path / "active.tflite").write_bytes(base)
    (tmp_path / "model.tflite.delta").write_bytes(encode_delta(kind, base, target,
                                                               find(base, target)))
    return (tmp_path / "active.tflite", tmp_path / "model.tflite.delta",
            file_entry("model.tflite", target, "model"), target)


def _left(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if TEMP_MARKER in p.name)


@pytest.mark.parametrize("kind", [KIND_TENSORS, KIND_BINARY])
def test_the_rebuilt_file_is_the_signed_target(tmp_path: Path, kind: int) -> None:
    base_path, delta_path, entry, target = _files(tmp_path, lm_pair(), kind)
    before = base_path.read_bytes()
    out = tmp_path / "new" / "model.tflite"
    out.parent.mkdir()
    header = rebuild(base_path, delta_path, entry, out)
    assert out.read_bytes() == target
    assert header.target_sha256 == entry.sha256
    assert base_path.read_bytes() == before
    assert _left(out.parent) == []


def _refused(tmp_path: Path, base_path: Path, delta_path: Path, entry: FileEntry) -> str:
    out = tmp_path / "model.tflite"
    with pytest.raises(DeltaError) as caught:
        rebuild(base_path, delta_path, entry, out)
    assert not out.exists()
    assert _left(tmp_path) == []
    return caught.value.reason


def test_refusals_leave_nothing_behind(tmp_path: Path) -> None:
    base_path, delta_path, entry, target = _files(tmp_path, small_pair())
    delta = delta_path.read_bytes()
    assert _refused(tmp_path, tmp_path / "absent", delta_path, entry) == "delta_base_mismatch"
    assert _refused(tmp_path, base_path, tmp_path / "absent", entry) == "delta_corrupt"
    other = tmp_path / "other.tflite"
    other.write_bytes(target)  # the target itself is not the delta's base
    assert _refused(tmp_path, other, delta_path, entry) == "delta_base_mismatch"
    delta_path.write_bytes(delta[:-7])
    assert _refused(tmp_path, base_path, delta_path, entry) == "delta_corrupt"
    delta_path.write_bytes(delta)
    for wrong in (FileEntry(entry.name, "0" * 64, entry.length, "model"),
                  FileEntry(entry.name, entry.sha256, entry.length + 1, "model")):
        assert _refused(tmp_path, base_path, delta_path, wrong) == "delta_target_mismatch"
    shorter = FileEntry(entry.name, entry.sha256, entry.length - 1, "model")
    assert _refused(tmp_path, base_path, delta_path, shorter) == "delta_too_large"


def test_a_failed_rebuild_keeps_the_previous_output(tmp_path: Path) -> None:
    base_path, delta_path, entry, _ = _files(tmp_path, small_pair())
    out = tmp_path / "model.tflite"
    out.write_bytes(b"previous")
    delta_path.write_bytes(delta_path.read_bytes()[:-3])
    with pytest.raises(DeltaError):
        rebuild(base_path, delta_path, entry, out)
    assert out.read_bytes() == b"previous"


CHILD = """
import sys
from pathlib import Path
from fleetlite.agent.delta_rebuild import rebuild
from fleetlite.sdk.manifest import FileEntry
base, delta, out, sha, length = sys.argv[1:]
rebuild(Path(base), Path(delta), FileEntry("model.tflite", sha, int(length), "model"), Path(out))
print("done", flush=True)
"""


def test_sigkill_mid_rebuild_leaves_no_output_and_the_base_untouched(tmp_path: Path) -> None:
    base_path, delta_file, entry, target = _files(tmp_path, lm_pair(), KIND_BINARY)
    delta = delta_file.read_bytes()
    before = base_path.read_bytes()
    fifo = tmp_path / "delta.fifo"
    os.mkfifo(fifo)
    out = tmp_path / "model.tflite"
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(base_path), str(fifo), str(out),
                              entry.sha256, str(entry.length)], stdout=subprocess.DEVNULL)
    try:
        # The child blocks opening the FIFO until this side opens it; it then reads half the
        # delta, writes what it can rebuild from it, and waits for the rest: mid-rebuild.
        with open(fifo, "wb") as feed:
            feed.write(delta[:len(delta) // 2])
            feed.flush()
            deadline = time.monotonic() + 30
            while not any(p.stat().st_size > 0 for p in tmp_path.glob(f"*{TEMP_MARKER}*")):
                assert time.monotonic() < deadline, "the child never started writing"
                assert child.poll() is None
                time.sleep(0.01)
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=30)
    except BrokenPipeError:
        pass
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == -signal.SIGKILL
    assert not out.exists()
    assert len(_left(tmp_path)) == 1  # the half-written temporary file a kill cannot remove
    assert base_path.read_bytes() == before
    # The next attempt (here the full delta) clears the leftover and succeeds.
    rebuild(base_path, delta_file, entry, out)
    assert out.read_bytes() == target
    assert _left(tmp_path) == []


def test_sigkill_at_any_moment_leaves_no_output_or_the_whole_file(tmp_path: Path) -> None:
    base_path, delta_path, entry, target = _files(tmp_path, lm_pair("scattered"), KIND_BINARY)
    before = base_path.read_bytes()
    out = tmp_path / "model.tflite"
    argv = [sys.executable, "-c", CHILD, str(base_path), str(delta_path), str(out),
            entry.sha256, str(entry.length)]
    started = time.monotonic()
    subprocess.run(argv, check=True, capture_output=True, timeout=120)
    whole = time.monotonic() - started
    out.unlink()
    outcomes = set()
    for step in range(6):
        child = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
        time.sleep(whole * step / 5)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        assert not out.exists() or out.read_bytes() == target
        outcomes.add(out.exists())
        assert base_path.read_bytes() == before
        if out.exists():
            out.unlink()
    assert False in outcomes
