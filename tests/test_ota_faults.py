"""Every install ends in exactly one final status, whatever fails (issue 15).

A full disk (ENOSPC injected at each phase, and for real on a small tmpfs as the agent's state
directory), a bug in a phase, a failing clean-up and a dead worker thread: each ends the install
with ONE final status with a specific reason, removes what the install wrote, keeps the active
model serving, and a re-sent install is answered with the true final state. The last tests run a
real agent process through a real Mosquitto.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fleetlite.agent import ota as ota_module
from fleetlite.agent.ota import OtaManager
from fleetlite.agent.ota_download import ChunkStore
from fleetlite.agent.ota_state import OtaState, OtaStateStore
from fleetlite.sdk import topics
from fleetlite.sdk.bundle import ReleaseBundle
from fleetlite.sdk.local_client import LocalClient
from fleetlite.sdk.messages import OtaStatus
from fleetlite.sdk.text import Tokenizer
from tests.agent_harness import AgentProcess
from tests.mqtt_harness import Collector, Mosquitto
from tests.ota_harness import ManualRelease
from tests.ota_simulator import FleetSimulator
from tests.test_ota_agent import agent_config, command
from tests.test_ota_install import CHUNK, Device, release

DEADLINE_S = 60.0


def enospc(*_args: Any, **_kwargs: Any) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


class Fleet(FleetSimulator):
    """The simulator, plus events and a hook that runs in the worker thread on each status."""

    def __init__(self) -> None:
        super().__init__()
        self.on_phase: Callable[[OtaStatus], None] = lambda status: None

    def report(self, kind: str, payload: bytes, *, priority: str = "telemetry") -> int:
        count = super().report(kind, payload, priority=priority)
        if kind != topics.EVENTS:
            self.on_phase(self.statuses[-1])
        return count


def make_device(tmp_path: Path, models_dir: Path) -> Device:
    return Device(tmp_path, models_dir, fleet=Fleet())


@pytest.fixture
def device(tmp_path: Path, models_dir: Path) -> Iterator[Device]:
    d = make_device(tmp_path, models_dir)
    yield d
    d.close()


@pytest.fixture
def small_state_dir(tmp_path: Path) -> Iterator[Callable[[int], Path]]:
    """Mounts a tmpfs of the given size as ``tmp_path/state`` (the device's state dir)."""
    mounted: list[Path] = []

    def mount(kib: int) -> Path:
        state = tmp_path / "state"
        state.mkdir(exist_ok=True)
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs",
                                 str(state)], capture_output=True, check=False)
        if result.returncode != 0:
            pytest.skip("mounting a small tmpfs as the state dir needs root (CI runs as root): "
                        f"{result.stderr.decode().strip()}")
        mounted.append(state)
        return state

    yield mount
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(directory: Path, leave: int) -> Path:
    """Fill the file system of ``directory`` up to ``leave`` free bytes."""
    filler = directory / "filler.bin"
    size = shutil.disk_usage(directory).free - leave
    with filler.open("wb") as handle:
        handle.write(b"\0" * max(0, size))
    return filler


def start_install(device: Device, bundle: ReleaseBundle) -> str:
    """Serve ``bundle`` and send the install without waiting for its outcome."""
    from fleetlite.sdk.manifest import release_id
    from tests.ota_simulator import Served

    rid = release_id(bundle.envelope.payload)
    device.fleet.serve(rid, Served(bundle.envelope.to_json(),
                                   [bundle.files[f.name] for f in bundle.manifest.files], CHUNK))
    assert device.ota.cmd_install({"release_id": rid, "chunk_size": CHUNK})["accepted"]
    return rid


def settle(device: Device) -> None:
    """Wait (with a deadline) until the worker holds no job: every status is then sent."""
    deadline = time.monotonic() + DEADLINE_S
    while device.ota.state.job is not None or device.ota._busy.locked():
        assert time.monotonic() < deadline, "the install never ended"
        time.sleep(0.02)


def assert_left_nothing(device: Device) -> None:
    """No staging copy, no slot but the active/previous ones, the old model serving."""
    staging = device.state_dir / "ota" / "staging"
    assert not staging.exists() or not any(staging.iterdir()), list(staging.iterdir())
    ms = OtaStateStore(device.state_dir).load().models.get("intent")
    keep = {ms.active, ms.previous} if ms is not None else set()
    slots = device.state_dir / "models" / "intent"
    on_disk = {p.name for p in slots.iterdir()} if slots.exists() else set()
    assert on_disk <= keep, (on_disk, keep)
    assert device.serving_version() == 1
    assert device.ota.state.job is None
    assert device.ota._thread is not None and device.ota._thread.is_alive()


def assert_resend_answered(device: Device, rid: str, final: OtaStatus) -> None:
    """A re-sent install is answered with the job's final state, and its status re-published."""
    count = len(device.fleet.finals())
    answer = device.ota.cmd_install({"release_id": rid, "chunk_size": CHUNK})
    assert answer["accepted"] is False and answer["ended"] is True, answer
    assert (answer["outcome"], answer["reason"]) == (final.outcome, final.reason)
    again = device.fleet.wait_final(count + 1)
    assert (again.outcome, again.reason, again.message) == (final.outcome, final.reason,
                                                           final.message)
    assert device.ota.state.job is None  # nothing was started


def one_final(device: Device) -> OtaStatus:
    final = device.fleet.wait_final(1, timeout=DEADLINE_S)
    settle(device)
    finals = device.fleet.finals()
    assert len(finals) == 1, finals
    return final


# -- ENOSPC injected at each phase ----------------------------------------------------------------


def _partial_copy_then_enospc(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
    Path(dst).write_bytes(Path(src).read_bytes()[:1000])
    enospc()


def _fail_save_in(phase: str) -> Callable[[OtaStateStore, OtaState], None]:
    real = OtaStateStore.save

    def save(self: OtaStateStore, state: OtaState) -> None:
        if state.job is not None and state.job.phase == phase:
            enospc()
        real(self, state)
    return save


INJECTIONS: dict[str, Callable[[pytest.MonkeyPatch], None]] = {
    "staging the manifest": lambda mp: mp.setattr(ota_module, "write_atomic", enospc),
    "downloading": lambda mp: mp.setattr(ChunkStore, "write", enospc),
    "preallocating the staging files": lambda mp: mp.setattr(ChunkStore, "_open_files",
                                                             enospc),
    "saving the state (verifying)": lambda mp: mp.setattr(OtaStateStore, "save",
                                                          _fail_save_in("verifying")),
    "copying into the slot": lambda mp: mp.setattr(shutil, "copyfile",
                                                   _partial_copy_then_enospc),
    "syncing the slot": lambda mp: mp.setattr(ota_module, "fsync_dir", enospc),
}


@pytest.mark.parametrize("phase", list(INJECTIONS))
def test_enospc_in_each_phase_ends_in_one_disk_full(
    device: Device, models_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    phase: str,
) -> None:
    bundle = release(models_dir, tmp_path, 2)
    with monkeypatch.context() as mp:
        INJECTIONS[phase](mp)
        rid = start_install(device, bundle)
        final = one_final(device)
    assert (final.outcome, final.reason) == ("failed", "disk_full"), final.message
    assert "resume" not in final.message and "send the install again" in final.message
    assert_left_nothing(device)
    assert device.counters()[1] == ()  # not the release's fault: not rejected
    assert_resend_answered(device, rid, final)
    # the worker lives on: with room again, the install (an operator's retry) succeeds
    count = len(device.fleet.finals())
    device.ota.cmd_install({"release_id": rid, "chunk_size": CHUNK, "retry": True})
    assert device.fleet.wait_final(count + 1).outcome == "installed"


def test_enospc_when_committing_rolls_back_without_rejecting(
    device: Device, models_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = OtaStateStore.save

    def save(self: OtaStateStore, state: OtaState) -> None:
        ms = state.models.get("intent")
        if state.job is None and ms is not None and ms.installed_version == 2:
            enospc()  # the commit's save
        real(self, state)

    with monkeypatch.context() as mp:
        mp.setattr(OtaStateStore, "save", save)
        start_install(device, release(models_dir, tmp_path, 2))
        final = one_final(device)
    assert (final.outcome, final.reason) == ("rolled_back", "disk_full"), final.message
    assert_left_nothing(device)
    assert device.counters()[1] == ()
    assert not (device.state_dir / "models" / "intent" / "a").exists()


def test_failing_clean_up_does_not_escape(
    device: Device, models_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken_remove(path: Path) -> int:
        raise OSError(errno.EIO, "clean-up exploded")

    real = OtaStateStore.save
    broken = {"on": False}

    def save(self: OtaStateStore, state: OtaState) -> None:
        if broken["on"]:
            enospc()
        real(self, state)

    def copy_then_break(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        broken["on"] = True  # from the slot copy on, nothing can be written or removed
        _partial_copy_then_enospc(src, dst)

    with monkeypatch.context() as mp:
        mp.setattr(shutil, "copyfile", copy_then_break)
        mp.setattr(ota_module, "remove_tree", broken_remove)
        mp.setattr(OtaStateStore, "save", save)
        start_install(device, release(models_dir, tmp_path, 2))
        final = one_final(device)
    assert (final.outcome, final.reason) == ("failed", "disk_full"), final.message
    assert device.ota._thread is not None and device.ota._thread.is_alive()
    assert device.ota.state.job is None
    assert device.serving_version() == 1
    # the worker goes on: the next install runs (and removes what the broken clean-up left)
    assert device.install(release(models_dir, tmp_path, 3)).outcome == "installed"
    assert device.serving_version() == 3


# -- bugs and a dead worker -----------------------------------------------------------------------


def test_a_bug_in_a_phase_ends_as_internal_and_the_worker_goes_on(
    device: Device, models_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    def boom(*_args: Any, **_kwargs: Any) -> None:
        raise KeyError("no such thing")

    with monkeypatch.context() as mp:
        mp.setattr(OtaManager, "_smoke", boom)
        rid = start_install(device, release(models_dir, tmp_path, 2))
        final = one_final(device)
    assert (final.outcome, final.reason) == ("failed", "internal")
    assert "KeyError" in final.message and "smoke testing" in final.message
    assert_left_nothing(device)
    assert_resend_answered(device, rid, final)
    assert device.install(release(models_dir, tmp_path, 3)).outcome == "installed"


class _Killed(BaseException):
    """Gets past every ``except Exception``: kills the worker thread."""


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


@pytest.mark.parametrize("noticed_by", ["tick", "next command"])
def test_a_dead_worker_is_noticed_reported_and_restarted(
    device: Device, models_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    noticed_by: str,
) -> None:
    def die(self: OtaManager, job: Any) -> None:
        raise _Killed("the thread is gone")

    with monkeypatch.context() as mp:
        mp.setattr(OtaManager, "_run_job", die)
        start_install(device, release(models_dir, tmp_path, 2))
        thread = device.ota._thread
        assert thread is not None
        wait_until(lambda: not thread.is_alive(), "the worker thread to die")
    assert device.fleet.finals() == [] and device.ota.state.job is not None
    if noticed_by == "tick":
        assert device.ota.check_worker() is True
        final = device.fleet.wait_final(1)
        assert device.ota.check_worker() is False  # once
        after = device.install(release(models_dir, tmp_path, 3))
    else:  # the next ota_install finds the dead worker itself
        start_install(device, release(models_dir, tmp_path, 3))
        after = device.fleet.wait_final(2)
        final = device.fleet.finals()[0]
    assert (final.outcome, final.reason) == ("failed", "internal")
    assert "_Killed" in final.message
    assert isinstance(device.fleet, Fleet)
    assert [e.kind for e in device.fleet.events] == ["ota_worker_restarted"]
    assert after.outcome == "installed" and device.serving_version() == 3
    assert len(device.fleet.finals()) == 2


# -- a real full disk: the agent's state dir on a small tmpfs -------------------------------------


def test_download_that_cannot_fit_is_refused_up_front(
    tmp_path: Path, models_dir: Path, small_state_dir: Callable[[int], Path],
) -> None:
    small_state_dir(64)
    device = make_device(tmp_path, models_dir)
    try:
        rid = start_install(device, release(models_dir, tmp_path, 2))
        final = one_final(device)
        assert (final.outcome, final.reason) == ("failed", "disk_full"), final.message
        assert "Nothing was downloaded" in final.message and "short" in final.message
        assert "resume" not in final.message
        assert device.fleet.frames_sent == 0 and device.fleet.requests == []
        assert_left_nothing(device)
        assert_resend_answered(device, rid, final)
    finally:
        device.close()


@pytest.mark.parametrize(("fill_at", "what"), [("downloading", "the download"),
                                               ("smoke_testing", "the slot copy")])
def test_disk_filling_up_mid_install(
    tmp_path: Path, models_dir: Path, small_state_dir: Callable[[int], Path], fill_at: str,
    what: str,
) -> None:
    """The up-front check passes; then something else fills the disk, so that ``what`` does not
    fit any more (the staged files fit; a 20 KiB model copy into the slot does not)."""
    state = small_state_dir(384)
    fleet = Fleet()
    device = Device(tmp_path, models_dir, fleet=fleet)
    filled: list[Path] = []

    def on_phase(status: OtaStatus) -> None:
        if status.phase == fill_at and not filled:
            filled.append(fill(state, 12 * 1024))

    fleet.on_phase = on_phase
    try:
        rid = start_install(device, release(models_dir, tmp_path, 2))
        final = one_final(device)
        assert filled, "the install never reached " + fill_at
        assert (final.outcome, final.reason) == ("failed", "disk_full"), final.message
        assert "resume" not in final.message and "freed" in final.message
        assert ("into the free A/B slot" if fill_at == "smoke_testing"
                else "staging") in final.message, final.message
        assert_left_nothing(device)
        assert not (state / "models" / "intent" / "a").exists()  # no partial slot file
        assert_resend_answered(device, rid, final)
        # room again: an operator's retry installs it
        filled[0].unlink()
        count = len(device.fleet.finals())
        device.ota.cmd_install({"release_id": rid, "chunk_size": CHUNK, "retry": True})
        assert device.fleet.wait_final(count + 1).outcome == "installed"
    finally:
        device.close()


# -- through a real agent process and Mosquitto ---------------------------------------------------


def _finals(collector: Collector) -> list[OtaStatus]:
    return [s for s in (OtaStatus.from_json(m.payload)
                        for m in collector.on_topic(topics.OTA_STATUS)) if s.final]


@pytest.mark.parametrize("case", ["download does not fit", "slot copy does not fit"])
def test_real_agent_on_a_full_disk(
    tmp_path: Path, broker: Mosquitto, models_dir: Path, v2_bundle: ReleaseBundle, case: str,
) -> None:
    config = agent_config(tmp_path, broker, models_dir)
    state = tmp_path / "agent" / "state"
    state.mkdir(parents=True)
    size = 96 if case == "download does not fit" else 512
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}k", "tmpfs",
                              str(state)], capture_output=True, check=False)
    if mounted.returncode != 0:
        pytest.skip("mounting a small tmpfs as the agent's state dir needs root (CI runs as "
                    f"root): {mounted.stderr.decode().strip()}")
    collector = Collector(broker.host, broker.port, [f"{topics.DEVICE_PREFIX}/#"]).start()
    rel = ManualRelease(broker.host, broker.port, v2_bundle, 1024)
    rel.answer = True
    agent = AgentProcess(config).start()
    filled: list[Path] = []
    watcher_stop = threading.Event()

    def fill_at_smoke_test() -> None:
        # the smoke test runs in a subprocess for a second or more: room to fill the disk
        # before the slot copy that follows it
        while not watcher_stop.is_set():
            if any(OtaStatus.from_json(m.payload).phase == "smoke_testing"
                   for m in collector.on_topic(topics.OTA_STATUS)):
                filled.append(fill(state, 20 * 1024))
                return
            time.sleep(0.005)

    watcher = threading.Thread(target=fill_at_smoke_test, daemon=True)
    try:
        collector.wait_for(topics.BIRTH)
        rel.publish_manifest()
        if case == "slot copy does not fit":
            watcher.start()
        assert command(collector, "ota_install", {"release_id": rel.rid,
                                                   "chunk_size": 1024})["ok"]
        collector.wait_for(topics.OTA_STATUS, timeout=DEADLINE_S,
                           predicate=lambda m: OtaStatus.from_json(m.payload).final)
        if case == "slot copy does not fit":
            assert filled, "the disk was not filled before the install ended"
        # a re-send, as the controller does for an install it heard nothing final about
        answer = command(collector, "ota_install", {"release_id": rel.rid,
                                                     "chunk_size": 1024})
        assert answer["ok"] and answer["result"]["ended"] is True, answer
        assert answer["result"]["reason"] == "disk_full"
        collector.wait_for(topics.OTA_STATUS, count=2, timeout=DEADLINE_S,
                           predicate=lambda m: OtaStatus.from_json(m.payload).final)
        finals = _finals(collector)
        assert len(finals) == 2, finals  # the install's one, and the re-sent answer
        assert all((f.outcome, f.reason) == ("failed", "disk_full") for f in finals), finals
        assert "resume" not in finals[0].message
        assert ("Nothing was downloaded" if case == "download does not fit"
                else "into the free A/B slot") in finals[0].message, finals[0].message
        # nothing left behind, and the old model still serves
        staging = state / "ota" / "staging"
        assert not staging.exists() or not any(staging.iterdir())
        assert not (state / "models" / "intent").exists() or not any(
            (state / "models" / "intent").iterdir())
        tokenizer = Tokenizer.from_file(models_dir / "intent_classifier.vocab.json")
        with LocalClient(tmp_path / "agent" / "agent.sock") as client:
            assert client.infer("intent", tokenizer.encode("turn off the kitchen lights"))
        slots = command(collector, "ota_slots", {})["result"]
        assert slots["job"] is None and slots["models"]["intent"]["active"] is None
        assert agent.alive
    finally:
        watcher_stop.set()
        agent.stop()
        rel.close()
        collector.stop()
        subprocess.run(["umount", "-l", str(state)], check=False)


@pytest.fixture
def v2_bundle(tmp_path: Path, models_dir: Path) -> ReleaseBundle:
    return release(models_dir, tmp_path, 2)


def test_a_failed_atomic_write_names_the_file_asked_for_and_leaves_no_temporary(
        tmp_path: Path) -> None:
    from fleetlite.sdk.atomic import write_atomic

    target = tmp_path / "missing" / "state.json"
    with pytest.raises(FileNotFoundError) as info:
        write_atomic(target, b"{}")
    assert info.value.filename == str(target)
    (tmp_path / "full").mkdir()
    blocked = tmp_path / "full" / "state.json"
    blocked.mkdir()  # a directory where the file goes: the rename fails after the write
    with pytest.raises(IsADirectoryError) as rename_error:
        write_atomic(blocked, b"{}")
    assert rename_error.value.filename == str(blocked)
    assert sorted(p.name for p in (tmp_path / "full").iterdir()) == ["state.json"]
