"""The device's chunk store on real files (out of order, duplicates, resume, SIGKILL, a full
disk, hostile frames) and the request timing of DownloadTracker with a fake clock."""

from __future__ import annotations

import contextlib
import os
import pickle
import random
import resource
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from fleetlite.agent import ota_download
from fleetlite.agent.errors import DiskFullError, DownloadIncompleteError
from fleetlite.agent.ota_download import (
    BITMAP_NAME,
    DONE,
    DUPLICATE,
    NEW,
    REFUSED,
    REQUEST,
    RESUBSCRIBE,
    STALLED,
    TIMED_OUT,
    WAIT,
    ChunkStore,
    DownloadTracker,
    part_name,
)
from fleetlite.sdk.chunks import ChunkBitmap, ChunkLayout, encode_frame, expand_ranges
from fleetlite.sdk.errors import HashMismatchError
from fleetlite.sdk.manifest import (
    Manifest,
    ModelInfo,
    SmokeSpec,
    TensorInfo,
    file_entry,
    release_id,
)
from fleetlite.sdk.ota_messages import ChunkRequest

CS = 1024


def make_manifest(files: dict[str, bytes]) -> Manifest:
    """A manifest over ``files`` (not signed: the store trusts what it is given)."""
    tensor = TensorInfo("x", (1, 4), "float32")
    names = list(files)
    manifest = Manifest(
        name="test", version=1,
        files=tuple(file_entry(n, c, "model" if i == 0 else "data")
                    for i, (n, c) in enumerate(files.items())),
        model=ModelInfo(names[0], (tensor,), (tensor,)), smoke=SmokeSpec(names[-1]),
        device_classes=("raspberry-pi-4",), min_agent_version="0.1.0", issued=1, expires=2)
    return replace(manifest, release_id=release_id(manifest.to_json()))


def random_bytes(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


FILES = {"model.tflite": random_bytes(20 * CS + 300, 1), "model.smoke.json": random_bytes(3000, 2),
         "empty.bin": b"", "model.tflite.part": random_bytes(CS, 3)}
MANIFEST = make_manifest(FILES)
LAYOUT = ChunkLayout.from_manifest(MANIFEST, CS)


def all_frames(files: dict[str, bytes] = FILES, chunk_size: int = CS) -> list[bytes]:
    layout = ChunkLayout(tuple(len(c) for c in files.values()), chunk_size)
    return [frame for _, _, frame in layout.frames(list(files.values()))]


def assert_claims_are_on_disk(staging: Path, manifest: Manifest, files: dict[str, bytes],
                              chunk_size: int = CS) -> int:
    """Every chunk the persisted bitmap claims holds the right bytes; returns the claim count."""
    bitmap = ChunkStore.read_persisted(staging, manifest, chunk_size)
    if bitmap is None:
        return 0
    layout = ChunkLayout.from_manifest(manifest, chunk_size)
    for index, entry in enumerate(manifest.files):
        part = (staging / part_name(entry.name)).read_bytes()
        for chunk in range(layout.counts[index]):
            if bitmap.have(index, chunk):
                start = chunk * chunk_size
                end = start + layout.chunk_length(index, chunk)
                assert part[start:end] == files[entry.name][start:end], (entry.name, chunk)
    return bitmap.received


# --- receiving, resuming, finalizing ----------------------------------------------------------


def test_out_of_order_duplicates_resume_and_finalize(tmp_path: Path) -> None:
    frames = all_frames()
    assert len(frames) == LAYOUT.total_chunks == 21 + 3 + 0 + 1
    order = frames + frames[:10]  # every frame, plus duplicates
    random.Random(7).shuffle(order)
    staging = tmp_path / "staging"
    store = ChunkStore(staging, MANIFEST, CS, persist_every=4)
    first, rest = order[:15], order[15:]
    outcomes = [store.accept(f) for f in first]
    new = outcomes.count(NEW)
    assert outcomes.count(DUPLICATE) == 15 - new == store.duplicates
    assert store.progress().received_chunks == new
    store.close()
    assert (staging / BITMAP_NAME).exists()
    assert sorted(p.name for p in staging.iterdir()) == sorted(
        [BITMAP_NAME] + [part_name(n) for n in FILES])

    # "restart": a new store on the same directory resumes where the old one stopped
    store = ChunkStore(staging, MANIFEST, CS, persist_every=4)
    progress = store.progress()
    assert progress.received_chunks == progress.persisted_chunks == new
    request = store.missing_request("gw-1", ts=5.0)
    assert request is not None and not request.done
    missing = set(expand_ranges(request.missing))
    assert len(missing) == LAYOUT.total_chunks - new
    assert all(not store.have(*key) for key in missing)
    for frame in rest:
        store.accept(frame)
    assert store.complete() and store.request_satisfied
    assert store.missing_request("gw-1") is None
    done = store.done_request("gw-1", ts=6.0)
    assert done.done and done.missing == () and done.release_id == MANIFEST.release_id
    progress = store.progress()
    assert progress.received_bytes == progress.total_bytes == sum(map(len, FILES.values()))
    paths = store.finalize()
    assert {n: p.read_bytes() for n, p in paths.items()} == FILES
    assert all(p.parent == staging for p in paths.values())
    # no part files, no bitmap left; the finalize is idempotent from the files alone
    assert sorted(p.name for p in staging.iterdir()) == sorted(FILES)
    again = ChunkStore(staging, MANIFEST, CS)
    assert again.complete()
    assert {n: p.read_bytes() for n, p in again.finalize().items()} == FILES


def test_missing_request_follows_the_bitmap_and_caps(tmp_path: Path) -> None:
    big = {"big.bin": random_bytes(3000 * CS, 4)}
    manifest = make_manifest(big)
    store = ChunkStore(tmp_path / "s", manifest, CS, preallocate=False)
    frames = all_frames(big)
    for i in range(0, 3000, 3):
        store.accept(frames[i])
    request = store.missing_request("gw-1", ts=1.0)
    assert request is not None
    assert len(request.missing) == 64 and request.chunk_total == 128  # 64 holes of 2
    assert ChunkRequest.from_json(request.to_json()) == request
    assert not store.request_satisfied
    for file_index, chunk in expand_ranges(request.missing):
        assert store.accept(frames[chunk]) == NEW and file_index == 0
    assert store.request_satisfied
    request = store.missing_request("gw-1", ts=2.0, limit_chunks=10)
    assert request is not None and request.chunk_total == 10
    store.discard()
    assert not (tmp_path / "s").exists()


def test_hostile_frames_are_refused_and_never_written(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path / "s", MANIFEST, CS)
    model_len = len(FILES["model.tflite"])
    hostile = {
        "beyond_signed_length": encode_frame(0, 21 * CS, bytes(CS)),  # past the end
        "bad_length": encode_frame(0, 20 * CS, bytes(299)),  # the last chunk is 300 bytes
        "bad_offset": encode_frame(0, 10, bytes(CS)),
        "unknown_file": encode_frame(9, 0, bytes(CS)),
        "bad_magic": b"XXXX" + encode_frame(0, 0, bytes(CS))[4:],
        "truncated": encode_frame(0, 0, bytes(CS))[:100],
    }
    for code, frame in hostile.items():
        assert store.accept(frame) == REFUSED
        assert store.last_refusal is not None and store.last_refusal.code == code
    # "endless data": thousands of frames past the signed length or duplicates change nothing
    for _ in range(2000):
        assert store.accept(hostile["beyond_signed_length"]) == REFUSED
    for frame in all_frames():
        assert store.accept(frame) == NEW
    for frame in all_frames() * 40:
        assert store.accept(frame) == DUPLICATE
    assert store.refused["beyond_signed_length"] == 2001
    assert store.duplicates == 40 * LAYOUT.total_chunks
    assert store.progress().refused == {**dict.fromkeys(hostile, 1), "beyond_signed_length": 2001}
    assert (tmp_path / "s" / part_name("model.tflite")).stat().st_size == model_len
    assert {n: p.read_bytes() for n, p in store.finalize().items()} == FILES


def test_a_bad_chunk_is_a_hash_mismatch_and_can_be_fetched_again(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path / "s", MANIFEST, CS)
    frames = all_frames()
    store.accept(encode_frame(1, CS, bytes(CS)))  # wrong bytes, right shape: accepted
    for frame in frames:
        store.accept(frame)
    assert store.complete()
    with pytest.raises(HashMismatchError) as info:
        store.finalize()
    assert info.value.reason == "hash_mismatch" and "model.smoke.json" in str(info.value)
    assert (tmp_path / "s" / part_name("model.smoke.json")).exists()  # nothing renamed
    store.restart_file("model.smoke.json")
    request = store.missing_request("gw-1")
    assert request is not None and request.missing == ((1, 0, 3),)
    for frame in frames:
        store.accept(frame)
    assert {n: p.read_bytes() for n, p in store.finalize().items()} == FILES


def test_finalize_before_complete_says_so(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path / "s", MANIFEST, CS)
    store.accept(all_frames()[0])
    with pytest.raises(DownloadIncompleteError) as info:
        store.finalize()
    assert info.value.reason == "download_incomplete"
    store.close()


def test_a_bitmap_of_another_chunk_size_or_damaged_starts_over(tmp_path: Path) -> None:
    staging = tmp_path / "s"
    with ChunkStore(staging, MANIFEST, CS) as store:
        for frame in all_frames()[:5]:
            store.accept(frame)
    assert ChunkStore.read_persisted(staging, MANIFEST, CS) is not None
    assert ChunkStore.read_persisted(staging, MANIFEST, 2 * CS) is None
    with ChunkStore(staging, MANIFEST, 2 * CS) as other:
        assert other.progress().received_chunks == 0
    # the stale bitmap was replaced at once: the old chunk size does not see its claims any more
    assert ChunkStore.read_persisted(staging, MANIFEST, CS) is None
    with ChunkStore(staging, MANIFEST, CS) as store:
        for frame in all_frames()[:5]:
            store.accept(frame)
    data = bytearray((staging / BITMAP_NAME).read_bytes())
    data[-6] ^= 0xFF
    (staging / BITMAP_NAME).write_bytes(bytes(data))
    with ChunkStore(staging, MANIFEST, CS) as store:
        assert store.progress().received_chunks == 0


def test_a_deleted_part_file_drops_its_claims(tmp_path: Path) -> None:
    staging = tmp_path / "s"
    with ChunkStore(staging, MANIFEST, CS) as store:
        for frame in all_frames():
            store.accept(frame)
    (staging / part_name("model.smoke.json")).unlink()
    with ChunkStore(staging, MANIFEST, CS) as store:
        request = store.missing_request("gw-1")
        assert request is not None and request.missing == ((1, 0, 3),)
    assert assert_claims_are_on_disk(staging, MANIFEST, FILES) == LAYOUT.total_chunks - 3


# --- durability -------------------------------------------------------------------------------


def test_a_saved_bitmap_only_names_fsynced_chunks(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Power-loss rule, checked on every bitmap write: each claimed chunk was written and its
    file fsynced before the bitmap was saved."""
    dirty: dict[int, set[int]] = {}
    durable: set[tuple[int, int]] = set()
    saves: list[int] = []
    holder: dict[str, ChunkStore] = {}
    real_pwrite, real_fsync, real_write_atomic = os.pwrite, os.fsync, ota_download.write_atomic

    def pwrite(fd: int, data: Any, offset: int) -> int:
        dirty.setdefault(fd, set()).add(offset)
        return real_pwrite(fd, data, offset)

    def fsync(fd: int) -> None:
        real_fsync(fd)
        durable.update((fd, offset) for offset in dirty.pop(fd, set()))

    def write_atomic(path: Path, data: bytes, **kw: Any) -> None:
        if path.name == BITMAP_NAME and "store" in holder:
            store = holder["store"]
            bitmap = ChunkBitmap.from_bytes(data[41:-4], LAYOUT.counts)  # header 41, crc 4
            for index, count in enumerate(LAYOUT.counts):
                for chunk in range(count):
                    if bitmap.have(index, chunk):
                        assert (store._fds[index], chunk * CS) in durable
            saves.append(bitmap.received)
        real_write_atomic(path, data, **kw)

    monkeypatch.setattr(os, "pwrite", pwrite)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(ota_download, "write_atomic", write_atomic)
    store = ChunkStore(tmp_path / "s", MANIFEST, CS, persist_every=3)
    holder["store"] = store
    frames = all_frames()
    random.Random(3).shuffle(frames)
    for frame in frames:
        store.accept(frame)
    store.close()
    assert saves == sorted(saves) and saves[-1] == LAYOUT.total_chunks and len(saves) >= 8


WRITER = textwrap.dedent("""
    import pickle, random, sys, time
    from pathlib import Path
    from fleetlite.agent.ota_download import ChunkStore

    manifest, frames, seed = pickle.loads(Path(sys.argv[1]).read_bytes())
    store = ChunkStore(Path(sys.argv[2]), manifest, 1024, persist_every=2,
                       persist_interval_s=0.0)
    random.Random(seed).shuffle(frames)
    print("ready", flush=True)
    for frame in frames:
        store.accept(frame)
    print("done", flush=True)
    time.sleep(60)
""")


def test_sigkilled_writer_never_leaves_claims_without_data(tmp_path: Path) -> None:
    files = {"big.bin": random_bytes(1500 * CS + 17, 9), "small.bin": random_bytes(5 * CS, 10)}
    manifest = make_manifest(files)
    staging = tmp_path / "staging"
    frames = all_frames(files)
    # The writers never see every 25th frame, so however fast the machine, a download is left
    # to resume: what is asserted is that the next start asks for exactly what is missing.
    sent = [frame for n, frame in enumerate(frames) if n % 25]
    claimed = []
    for round_no, delay in enumerate([0.05, 0.15, 0.3, 0.2]):
        job = tmp_path / f"job{round_no}.pickle"
        job.write_bytes(pickle.dumps((manifest, sent, round_no)))
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(job), str(staging)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert proc.stdout is not None and proc.stderr is not None
        try:
            line = proc.stdout.readline()
            assert line == b"ready\n", proc.stderr.read().decode()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(delay)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            proc.stdout.close()
            proc.stderr.close()
        claimed.append(assert_claims_are_on_disk(staging, manifest, files))
    assert claimed == sorted(claimed) and claimed[-1] > 0
    with ChunkStore(staging, manifest, CS) as store:
        before = store.progress().received_chunks
        request = store.missing_request("gw-1")
        assert request is not None
        assert not any(store.have(*key) for key in expand_ranges(request.missing))
        for frame in frames:
            store.accept(frame)
        assert store.duplicates == before
        assert {n: p.read_bytes() for n, p in store.finalize().items()} == files


# --- a full disk ------------------------------------------------------------------------------


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs (needs root); skipped if it cannot be mounted."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs",
                             str(mount_point)], capture_output=True, check=False)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {result.stderr.decode().strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_preallocation_reports_a_full_disk_before_downloading(small_fs: Path) -> None:
    files = {"big.bin": random_bytes(400 * CS, 5)}
    with pytest.raises(DiskFullError) as info:
        ChunkStore(small_fs / "s", make_manifest(files), CS)
    assert info.value.reason == "disk_full" and "free space" in str(info.value)


def test_disk_full_mid_download_keeps_earlier_chunks(small_fs: Path) -> None:
    files = {"big.bin": random_bytes(400 * CS, 6)}
    manifest = make_manifest(files)
    staging = small_fs / "s"
    frames = all_frames(files)
    store = ChunkStore(staging, manifest, CS, persist_every=16, preallocate=False)
    written = 0
    with pytest.raises(DiskFullError) as info:
        for frame in frames:
            store.accept(frame)
            written += 1
    assert info.value.reason == "disk_full"
    assert 100 < written < 256
    with contextlib.suppress(DiskFullError):
        store.close()  # saving the bitmap may itself fail on the full disk
    claimed = assert_claims_are_on_disk(staging, manifest, files)
    assert claimed >= written - 32
    # free space: the download resumes and completes
    subprocess.run(["mount", "-o", "remount,size=2m", str(small_fs)], check=True)
    with ChunkStore(staging, manifest, CS) as resumed:
        request = resumed.missing_request("gw-1")
        assert request is not None and request.chunk_total == 400 - claimed
        for frame in frames:
            resumed.accept(frame)
        assert resumed.duplicates == claimed
        assert resumed.finalize()["big.bin"].read_bytes() == files["big.bin"]


FSIZE_WRITER = textwrap.dedent("""
    import pickle, resource, sys
    from pathlib import Path
    from fleetlite.agent.errors import DiskFullError
    from fleetlite.agent.ota_download import ChunkStore

    manifest = pickle.loads(Path(sys.argv[1]).read_bytes())
    resource.setrlimit(resource.RLIMIT_FSIZE, (100 * 1024, 100 * 1024))
    try:
        ChunkStore(Path(sys.argv[2]), manifest, 1024)
    except DiskFullError as exc:
        print(exc.reason)
""")


def test_file_size_limit_is_disk_full_too(tmp_path: Path) -> None:
    """EFBIG (RLIMIT_FSIZE, also the fallback where no tmpfs can be mounted)."""
    if not hasattr(resource, "RLIMIT_FSIZE"):
        pytest.skip("no RLIMIT_FSIZE here")
    job = tmp_path / "m.pickle"
    job.write_bytes(pickle.dumps(make_manifest({"big.bin": random_bytes(400 * CS, 5)})))
    result = subprocess.run([sys.executable, "-c", FSIZE_WRITER, str(job), str(tmp_path / "s")],
                            capture_output=True, check=False, timeout=60)
    assert result.stdout.decode().strip() == "disk_full", result.stderr.decode()


# --- request timing ---------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


# (time, chunks received, batch_done, expected action)
Step = tuple[float, int, bool, str]

TRACKER_CASES: dict[str, list[Step]] = {
    "the broker's retained chunks complete most of a download with no request": [
        (0.0, 0, False, WAIT), (0.5, 10, True, WAIT), (4.0, 40, True, WAIT),
        (8.9, 40, True, WAIT), (9.0, 40, True, REQUEST),  # the flow stopped with gaps
        (9.5, 60, True, REQUEST),  # that request's chunks came: the next batch at once
    ],
    "nothing retained: asks after first_request_s, backs off to 6 idle_s, stalls after 10": [
        (0.0, 0, False, WAIT), (0.9, 0, False, WAIT), (1.0, 0, False, REQUEST),
        (5.9, 0, False, WAIT), (6.0, 0, False, REQUEST),
        (15.9, 0, False, WAIT), (16.0, 0, False, REQUEST), (35.9, 0, False, WAIT),
        (36.0, 0, False, REQUEST), (65.9, 0, False, WAIT), (66.0, 0, False, REQUEST),
        (96.0, 0, False, REQUEST), (126.0, 0, False, REQUEST), (156.0, 0, False, REQUEST),
        (186.0, 0, False, REQUEST), (216.0, 0, False, REQUEST),  # the 10th request
        (245.9, 0, False, WAIT), (246.0, 0, False, STALLED),
    ],
    "a publisher paused for a minute is waited for, not called a failure": [
        (0.0, 0, False, WAIT), (1.0, 3, False, WAIT),  # then the controller is stopped
        *[(t, 3, False, REQUEST) for t in (6.0, 11.0, 21.0, 41.0)], (61.0, 3, False, WAIT),
        (71.0, 3, False, REQUEST), (71.5, 40, True, REQUEST),  # resumed: chunks, next batch
    ],
    "new chunks restart the idle timer and the unanswered count": [
        (0.0, 0, False, WAIT), (3.0, 4, False, WAIT), (7.9, 4, False, WAIT),
        (8.0, 4, False, REQUEST), (13.0, 4, False, REQUEST), (14.0, 9, False, WAIT),
        (19.0, 9, False, REQUEST),
    ],
    "chunks that keep coming never trigger a request": [
        (0.0, 0, False, WAIT), (4.0, 1, True, WAIT), (8.0, 2, True, WAIT),
        (12.0, 3, True, WAIT), (16.0, 4, True, WAIT), (20.9, 4, True, WAIT),
        (21.0, 4, False, REQUEST),
    ],
    "a satisfied request asks for the next batch at once, once": [
        (0.0, 0, False, WAIT), (1.0, 0, False, REQUEST), (2.0, 50, True, REQUEST),
        (2.1, 50, True, WAIT), (3.0, 90, False, WAIT), (3.5, 100, True, REQUEST),
    ],
    "after 10 requests without progress, one chunk resets the count and the backoff": [
        (0.0, 0, False, WAIT),
        *[(t, 0, False, REQUEST) for t in (1.0, 6.0, 16.0, 36.0, 66.0, 96.0, 126.0, 156.0,
                                           186.0, 216.0)],
        (219.0, 1, False, WAIT), (224.0, 1, False, REQUEST), (229.0, 1, False, REQUEST),
    ],
    "the deadline ends a download that is still moving": [
        (0.0, 0, False, WAIT), (500.0, 10, False, WAIT), (999.0, 20, False, WAIT),
        (1000.0, 30, False, TIMED_OUT),
    ],
}


@pytest.mark.parametrize("steps", list(TRACKER_CASES.values()), ids=list(TRACKER_CASES))
def test_tracker_timing(steps: list[Step]) -> None:
    clock = FakeClock()
    tracker = DownloadTracker(idle_s=5.0, max_requests_without_progress=10, deadline_s=1000.0,
                              first_request_s=1.0, clock=clock)
    for t, received, batch_done, expected in steps:
        clock.t = t
        decision = tracker.poll(received, batch_done=batch_done)
        assert decision.action == expected, f"at t={t}: {decision}"
        if expected == STALLED:
            assert decision.reason == "download_stalled"
        if expected == TIMED_OUT:
            assert decision.reason == "download_timeout"


def test_tracker_wait_hint_and_done() -> None:
    clock = FakeClock()
    tracker = DownloadTracker(idle_s=5.0, deadline_s=12.0, first_request_s=1.0, clock=clock)
    first = tracker.poll(0)
    assert first.action == WAIT and first.wait_s == pytest.approx(1.0)  # first_request_s
    clock.t = 1.0
    assert tracker.poll(0).action == REQUEST
    clock.t = 3.0
    assert tracker.poll(0).wait_s == pytest.approx(3.0)
    clock.t = 9.0
    assert tracker.poll(1).wait_s == pytest.approx(3.0)  # the deadline comes before idle
    assert tracker.poll(5, complete=True).action == DONE
    assert tracker.requests == 1 and tracker.unanswered == 0


def test_by_default_the_first_request_waits_idle_s_for_the_retained_chunks() -> None:
    clock = FakeClock()
    tracker = DownloadTracker(idle_s=5.0, clock=clock)
    assert tracker.poll(0).wait_s == pytest.approx(5.0)
    clock.t = 4.9
    assert tracker.poll(0).action == WAIT
    clock.t = 5.0
    assert tracker.poll(0).action == REQUEST



# --- re-subscription rounds: the broker's retained copies before the fleet ----------------------


class FakeMissing:
    """The missing chunks of a 300-chunk file, as ``DownloadTracker.poll`` asks for them."""

    def __init__(self, total: int = 300) -> None:
        self.missing = [(0, i) for i in range(total)]
        self.limits: list[int] = []

    def __call__(self, limit: int) -> list[tuple[int, int]]:
        self.limits.append(limit)
        return self.missing[:limit]

    def arrive(self, count: int) -> int:
        """``count`` of the first missing chunks arrive; returns how many were received."""
        del self.missing[:count]
        return 300 - len(self.missing)


def resubscribing_tracker(clock: FakeClock, **kwargs: Any) -> DownloadTracker:
    return DownloadTracker(idle_s=5.0, max_requests_without_progress=10, deadline_s=1000.0,
                           clock=clock, **kwargs)


def test_a_device_re_subscribes_to_missing_chunks_before_it_asks_the_fleet() -> None:
    clock, missing = FakeClock(), FakeMissing()
    tracker = resubscribing_tracker(clock, resubscribe_chunks=64)
    assert tracker.poll(0, missing=missing).action == WAIT
    clock.t = 1.0
    received = missing.arrive(200)  # the broker's first delivery, with a gap at the end
    assert tracker.poll(received, missing=missing).action == WAIT
    clock.t = 5.9
    assert tracker.poll(received, missing=missing).action == WAIT
    clock.t = 6.0  # idle_s of silence: the first 64 missing chunks, in order, not a request
    decision = tracker.poll(received, missing=missing)
    assert decision.action == RESUBSCRIBE
    assert decision.chunks == tuple((0, i) for i in range(200, 264))
    assert tracker.requests == 0 and tracker.unanswered == 0 and tracker.resubscribes == 1
    clock.t = 6.2  # the round's chunks all came: the next round at once, the rest
    received = missing.arrive(64)
    decision = tracker.poll(received, batch_done=True, missing=missing)
    assert decision.action == RESUBSCRIBE
    assert decision.chunks == tuple((0, i) for i in range(264, 300))
    clock.t = 6.3
    received = missing.arrive(36)
    assert tracker.poll(received, complete=True, missing=missing).action == DONE
    assert tracker.requests == 0 and tracker.resubscribes == 2


def test_a_round_that_brings_nothing_is_followed_by_a_request_and_the_old_backoff() -> None:
    clock, missing = FakeClock(), FakeMissing()
    tracker = resubscribing_tracker(clock, first_request_s=1.0)
    tracker.poll(0, missing=missing)
    steps = [(0.9, WAIT), (1.0, RESUBSCRIBE),  # nothing at all after first_request_s
             (5.9, WAIT), (6.0, REQUEST),  # the round brought nothing in idle_s: the fleet
             (10.9, WAIT), (11.0, REQUEST), (21.0, REQUEST), (41.0, REQUEST), (71.0, REQUEST),
             (101.0, REQUEST), (131.0, REQUEST), (161.0, REQUEST), (191.0, REQUEST),
             (221.0, REQUEST),  # the 10th request
             (250.9, WAIT), (251.0, STALLED)]
    for t, expected in steps:
        clock.t = t
        decision = tracker.poll(0, missing=missing)
        assert decision.action == expected, f"at t={t}: {decision}"
    assert tracker.resubscribes == 1 and tracker.requests == 10


def test_by_default_a_silent_broker_stalls_after_255_s() -> None:
    clock, missing = FakeClock(), FakeMissing()
    tracker = DownloadTracker(clock=clock)
    actions = []
    while (decision := tracker.poll(0, missing=missing)).action not in (STALLED, TIMED_OUT):
        if decision.action != WAIT:
            actions.append((clock.t, decision.action))
        clock.t += decision.wait_s
    assert decision.action == STALLED and clock.t == pytest.approx(255.0)
    assert actions[:3] == [(5.0, RESUBSCRIBE), (10.0, REQUEST), (15.0, REQUEST)]


def test_a_new_chunk_earns_a_new_round_before_the_next_request() -> None:
    clock, missing = FakeClock(), FakeMissing()
    tracker = resubscribing_tracker(clock)
    received = missing.arrive(100)
    tracker.poll(received, missing=missing)
    clock.t = 5.0
    assert tracker.poll(received, missing=missing).action == RESUBSCRIBE
    clock.t = 6.0
    received = missing.arrive(10)  # part of the round came (the rest was dropped again)
    assert tracker.poll(received, missing=missing).action == WAIT
    clock.t = 11.0  # silence: a new round from the first missing chunk, still no request
    decision = tracker.poll(received, missing=missing)
    assert decision.action == RESUBSCRIBE and decision.chunks[0] == (0, 110)
    clock.t = 16.0  # that round brought nothing: now the fleet
    assert tracker.poll(received, missing=missing).action == REQUEST
    clock.t = 17.0
    received = missing.arrive(150)  # the fleet's answer
    # a request's answer came: the next request at once, as before
    assert tracker.poll(received, batch_done=True, missing=missing).action == REQUEST
    clock.t = 22.5  # the next answer never came; a round comes first again, then the fleet
    assert tracker.poll(received, missing=missing).action == RESUBSCRIBE
    clock.t = 27.5
    assert tracker.poll(received, missing=missing).action == REQUEST
    assert tracker.resubscribes == 3 and tracker.requests == 3


def test_without_missing_the_tracker_never_re_subscribes() -> None:
    clock = FakeClock()
    tracker = resubscribing_tracker(clock)
    tracker.poll(0)
    clock.t = 5.0
    assert tracker.poll(0).action == REQUEST and tracker.resubscribes == 0


def test_store_missing_chunks_and_expect(tmp_path: Path) -> None:
    frames = all_frames()
    with ChunkStore(tmp_path / "s", MANIFEST, CS) as store:
        for frame in frames[:5] + frames[7:21]:
            store.accept(frame)
        everything = [(f, i) for f, n in enumerate(LAYOUT.counts) for i in range(n)]
        missing = [key for key in everything if not store.have(*key)]
        assert missing[:2] == [(0, 5), (0, 6)] and len(missing) == LAYOUT.total_chunks - 19
        assert store.missing_chunks(3) == missing[:3]
        assert store.missing_chunks(100) == missing
        store.expect(missing[:3])
        assert not store.request_satisfied
        store.accept(frames[5])
        store.accept(frames[6])
        assert not store.request_satisfied
        store.accept(frames[21])  # (1, 0): the third of the round
        assert store.request_satisfied
        assert store.missing_chunks(1) == [missing[3]]
