"""The device end of chunked release delivery: a resumable on-disk chunk store and the request
timing logic.

:class:`ChunkStore` is the disk adapter: it writes accepted chunks into ``.<name>.part`` files of
the staging directory and keeps a bitmap of received chunks that survives restarts and power
loss. The persisted bitmap never claims a chunk whose data is not on disk: data is fsynced
before the bitmap naming it is (atomically) replaced.

:class:`DownloadTracker` is pure logic over an injected clock, modelled on FreeRTOS OTA. The
broker holds every chunk of a served release retained, so subscribing brings them all and most
downloads send no request. After ``idle_s`` without a new chunk (counted from the subscription)
a device that lost some of them (a broker drops messages for a client whose queue is full)
first subscribes to the exact topics of the next missing chunks (RESUBSCRIBE), which makes the
broker send their retained copies to this device alone; only when such a round brings nothing
within ``idle_s`` does it ask the fleet for them (REQUEST: a re-publish to every subscribed
device), backing off to ``BACKOFF_CAP`` times ``idle_s`` while nothing comes, and declare the
download stalled after ``max_requests_without_progress`` unanswered requests: about four
minutes of silence with the defaults, so a release publisher that is merely late (its
controller paused, restarting or failing over) is waited for rather than called a failure.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import shutil
import struct
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fleetlite.agent.errors import (
    DiskFullError,
    DownloadError,
    DownloadIncompleteError,
    StagingIOError,
)
from fleetlite.sdk.atomic import fsync_dir, write_atomic
from fleetlite.sdk.chunks import (
    MAX_REQUEST_CHUNKS,
    MAX_REQUEST_RANGES,
    Chunk,
    ChunkBitmap,
    ChunkError,
    ChunkLayout,
    expand_ranges,
)
from fleetlite.sdk.manifest import Manifest
from fleetlite.sdk.ota_messages import ChunkRequest
from fleetlite.sdk.verify import FileVerifier

__all__ = [
    "DONE",
    "DUPLICATE",
    "NEW",
    "REFUSED",
    "REQUEST",
    "RESUBSCRIBE",
    "RESUBSCRIBE_CHUNKS",
    "STALLED",
    "TIMED_OUT",
    "WAIT",
    "BITMAP_NAME",
    "ChunkStore",
    "DownloadProgress",
    "DownloadTracker",
    "TrackerDecision",
    "part_name",
]

log = logging.getLogger("fleetlite.agent.ota_download")

# What ChunkStore.accept did with a frame.
NEW = "new"
DUPLICATE = "duplicate"
REFUSED = "refused"

#: the persisted bitmap; manifest file names never start with '.', so it cannot collide
BITMAP_NAME = ".chunks.bitmap"
_STATE = struct.Struct(">4sBI32s")  # magic, version, chunk size, release id (raw sha256)
_STATE_MAGIC = b"FLDL"
_STATE_VERSION = 1
_CRC = struct.Struct(">I")
_READ_BLOCK = 256 * 1024


def part_name(name: str) -> str:
    """The staging name of a file being downloaded: ``.<name>.part``.

    The leading dot keeps it apart from every final name (manifest names cannot start with a
    dot), so finalizing never renames a part onto another file's part.
    """
    return f".{name}.part"


@dataclass(frozen=True)
class DownloadProgress:
    """A snapshot of a download, for OTA status messages."""

    received_bytes: int
    total_bytes: int
    received_chunks: int
    total_chunks: int
    persisted_chunks: int
    duplicates: int
    refused: dict[str, int] = field(default_factory=dict)

    @property
    def fraction(self) -> float:
        return self.received_bytes / self.total_bytes if self.total_bytes else 1.0

    def to_dict(self) -> dict[str, Any]:
        return {"received_bytes": self.received_bytes, "total_bytes": self.total_bytes,
                "received_chunks": self.received_chunks, "total_chunks": self.total_chunks,
                "persisted_chunks": self.persisted_chunks, "duplicates": self.duplicates,
                "refused": dict(self.refused)}


def _disk_error(exc: OSError, what: str) -> DownloadError:
    """Translate an OSError from the staging directory into a DownloadError subclass."""
    if exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        # no promise about the chunks: whether they are kept is the store owner's decision
        return DiskFullError(f"{what}: {exc.strerror}; free space on the device")
    return StagingIOError(f"{what}: {exc.strerror or exc}; check the agent's state directory")


def _state_header(manifest: Manifest, chunk_size: int,
                  fetch: Collection[str] | None = None) -> bytes:
    rid = bytes.fromhex(manifest.release_id) if manifest.release_id else b""
    if fetch is not None:  # a download of some files: its bitmap fits no other choice of them
        rid = hashlib.sha256(rid + b"\0".join(sorted(n.encode() for n in fetch))).digest()
    return _STATE.pack(_STATE_MAGIC, _STATE_VERSION, chunk_size, rid.ljust(32, b"\0"))


def _parse_state(data: bytes, manifest: Manifest, layout: ChunkLayout,
                 fetch: Collection[str] | None = None) -> ChunkBitmap | None:
    """The persisted bitmap if it is intact and was written for this release, chunk size and
    choice of files."""
    header = _state_header(manifest, layout.chunk_size, fetch)
    body, crc = data[:-_CRC.size], data[-_CRC.size:]
    if (len(data) < len(header) + _CRC.size or _CRC.unpack(crc)[0] != zlib.crc32(body)
            or not body.startswith(header)):
        return None
    try:
        return ChunkBitmap.from_bytes(body[len(header):], layout.counts)
    except ChunkError:
        return None


class ChunkStore:
    """Received chunks of one release, on disk under ``staging_dir``; resumes after restarts.

    ``manifest`` must be the VERIFIED manifest: frames are checked against its signed lengths.
    Thread-safe (an internal lock, never held around anything but this store's own file I/O),
    so frames may come from the network thread while another thread polls.

    The bitmap is persisted every ``persist_every`` new chunks or ``persist_interval_s``
    seconds (when ``auto_persist``), on :meth:`persist` and on :meth:`close`; with
    ``auto_persist=False`` the owner calls :meth:`persist_if_due` from its own thread, which
    keeps fsync off the network thread.

    With ``fetch``, only the files named there are downloaded (a device that installs one
    variant, or fetches a delta instead of a full file); the others count as empty and are
    neither created nor touched.
    """

    def __init__(
        self,
        staging_dir: Path,
        manifest: Manifest,
        chunk_size: int,
        *,
        persist_every: int = 64,
        persist_interval_s: float = 1.0,
        auto_persist: bool = True,
        preallocate: bool = True,
        clock: Callable[[], float] = time.monotonic,
        fetch: Collection[str] | None = None,
    ) -> None:
        self.dir = Path(staging_dir)
        self.manifest = manifest
        self.fetch = None if fetch is None else frozenset(fetch)
        self.layout = ChunkLayout.from_manifest(manifest, chunk_size, self.fetch)
        self.chunk_size = chunk_size
        self.persist_every = max(1, persist_every)
        self.persist_interval_s = persist_interval_s
        self.auto_persist = auto_persist
        self._clock = clock
        self._lock = threading.RLock()
        self._fds: dict[int, int] = {}
        self._unsynced: set[int] = set()
        self._since_persist = 0
        self._last_persist = clock()
        self._outstanding: set[tuple[int, int]] = set()
        self.duplicates = 0
        self.refused: Counter[str] = Counter()
        self.last_refusal: ChunkError | None = None
        self.bitmap_path = self.dir / BITMAP_NAME
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            for leftover in self.dir.glob(f".{BITMAP_NAME}.tmp*"):  # a write_atomic cut short
                leftover.unlink()
        except OSError as exc:
            raise _disk_error(exc, f"cannot create the staging directory {self.dir}") from exc
        self._stale = False
        self._bitmap = self._load_bitmap()
        self._persisted = self._bitmap.copy()
        try:
            self._open_files(preallocate)
        except BaseException:
            self._close_fds()
            raise

    # -- opening -----------------------------------------------------------------------------

    def _load_bitmap(self) -> ChunkBitmap:
        try:
            data = self.bitmap_path.read_bytes()
        except FileNotFoundError:
            return ChunkBitmap(self.layout.counts)
        except OSError as exc:
            raise _disk_error(exc, f"cannot read {self.bitmap_path}") from exc
        bitmap = _parse_state(data, self.manifest, self.layout, self.fetch)
        if bitmap is None:
            log.warning("%s belongs to another release or chunk size, or is damaged; "
                        "starting the download over", self.bitmap_path)
            self._stale = True
            return ChunkBitmap(self.layout.counts)
        return bitmap

    @staticmethod
    def read_persisted(staging_dir: Path, manifest: Manifest, chunk_size: int,
                       fetch: Collection[str] | None = None) -> ChunkBitmap | None:
        """The bitmap a store would resume from (None if there is none or it does not fit),
        read without opening or changing anything."""
        try:
            data = (Path(staging_dir) / BITMAP_NAME).read_bytes()
        except OSError:
            return None
        return _parse_state(data, manifest, ChunkLayout.from_manifest(manifest, chunk_size, fetch),
                            fetch)

    def _open_files(self, preallocate: bool) -> None:
        """Open (or create) each part file and drop bitmap bits its content cannot back."""
        plan: list[tuple[int, Path]] = []
        for index, entry in enumerate(self.manifest.files):
            if not self._fetched(entry.name):
                continue
            part = self.dir / part_name(entry.name)
            final = self.dir / entry.name
            if part.exists():
                if part.stat().st_size < entry.length:
                    # never sized: a crash right after it was created, nothing in it is ours
                    self._bitmap.clear_file(index)
                plan.append((index, part))
            elif final.exists() and final.stat().st_size == entry.length:
                # a finalize renamed it before a restart: finalize checks its hash again
                self._bitmap.fill_file(index)
            else:
                self._bitmap.clear_file(index)
                plan.append((index, part))
        if self._stale or self._bitmap != self._persisted:
            # persist the smaller claim BEFORE new, zero-filled part files exist
            self._write_bitmap(self._bitmap)
            self._persisted = self._bitmap.copy()
        for index, part in plan:
            length = self.layout.lengths[index]
            try:
                fd = os.open(part, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise _disk_error(exc, f"cannot open {part}") from exc
            self._fds[index] = fd
            try:
                if os.fstat(fd).st_size != length:
                    os.ftruncate(fd, length)
                if preallocate and length:
                    self._preallocate(fd, length)
            except OSError as exc:
                raise _disk_error(exc, f"cannot reserve {length} bytes for {part}") from exc
        try:
            fsync_dir(self.dir)
        except OSError as exc:
            raise _disk_error(exc, f"cannot sync {self.dir}") from exc

    def _fetched(self, name: str) -> bool:
        return self.fetch is None or name in self.fetch

    @staticmethod
    def _preallocate(fd: int, length: int) -> None:
        allocate = getattr(os, "posix_fallocate", None)
        if allocate is None:
            return
        try:
            allocate(fd, 0, length)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise

    # -- receiving ---------------------------------------------------------------------------

    def accept(self, frame: bytes) -> str:
        """Validate a chunk frame and write it: NEW, DUPLICATE (already have it) or REFUSED
        (invalid; counted by code in :attr:`refused`, kept in :attr:`last_refusal`).

        Raises :class:`DiskFullError` / :class:`StagingIOError` when the chunk cannot be
        written; the chunks before it stay intact.
        """
        try:
            chunk = self.layout.decode(frame)
        except ChunkError as exc:
            with self._lock:
                self.refused[exc.code] += 1
                self.last_refusal = exc
            return REFUSED
        return self.write(chunk)

    def write(self, chunk: Chunk) -> str:
        """Write a chunk decoded (and so checked) against this store's layout: NEW or
        DUPLICATE. Raises as :meth:`accept` does when it cannot be written."""
        key = (chunk.file_index, chunk.index)
        with self._lock:
            if self._bitmap.have(*key):
                self.duplicates += 1
                return DUPLICATE
            fd = self._fds.get(chunk.file_index)
            if fd is None:
                raise StagingIOError("the chunk store is closed; open a new one to resume")
            self._pwrite(fd, chunk.data, chunk.offset, chunk.file_index)
            self._bitmap.set(*key)
            self._outstanding.discard(key)
            self._unsynced.add(chunk.file_index)
            self._since_persist += 1
            if self.auto_persist:
                self._persist_if_due_locked()
        return NEW

    def _pwrite(self, fd: int, data: bytes, offset: int, file_index: int) -> None:
        view = memoryview(data)
        try:
            while view:
                written = os.pwrite(fd, view, offset)
                view = view[written:]
                offset += written
        except OSError as exc:
            name = self.manifest.files[file_index].name
            raise _disk_error(exc, f"cannot write a chunk of {name}") from exc

    # -- persisting --------------------------------------------------------------------------

    def persist_if_due(self) -> bool:
        """Persist when ``persist_every`` chunks or ``persist_interval_s`` have passed."""
        with self._lock:
            return self._persist_if_due_locked()

    def _persist_if_due_locked(self) -> bool:
        if not self._since_persist:
            return False
        if (self._since_persist >= self.persist_every
                or self._clock() - self._last_persist >= self.persist_interval_s):
            self._persist_locked()
            return True
        return False

    def persist(self) -> None:
        """fsync the written chunks, then atomically replace the bitmap that names them."""
        with self._lock:
            self._persist_locked()

    def _persist_locked(self) -> None:
        snapshot = self._bitmap.copy()
        for index in sorted(self._unsynced):
            try:
                os.fsync(self._fds[index])
            except OSError as exc:
                raise _disk_error(exc, "cannot flush a staged file") from exc
        self._unsynced.clear()
        if snapshot != self._persisted:
            self._write_bitmap(snapshot)
            self._persisted = snapshot
        self._since_persist = 0
        self._last_persist = self._clock()

    def _write_bitmap(self, bitmap: ChunkBitmap) -> None:
        body = _state_header(self.manifest, self.chunk_size, self.fetch) + bitmap.to_bytes()
        try:
            write_atomic(self.bitmap_path, body + _CRC.pack(zlib.crc32(body)))
        except OSError as exc:
            raise _disk_error(exc, f"cannot save {self.bitmap_path}") from exc

    # -- asking ------------------------------------------------------------------------------

    def missing_request(self, device_id: str, *, ts: float | None = None,
                        limit_ranges: int = MAX_REQUEST_RANGES,
                        limit_chunks: int = MAX_REQUEST_CHUNKS,
                        below: int | None = None) -> ChunkRequest | None:
        """The request for the first missing chunks (None when complete; with ``below``, only
        chunks whose index is below it: those of the blocks subscribed); remembers them, so
        :attr:`request_satisfied` tells when they have all arrived."""
        with self._lock:
            if self._bitmap.complete():
                return None
            ranges = self._bitmap.missing_ranges(limit_ranges, limit_chunks, below)
            if not ranges:
                return None
            self._outstanding = set(expand_ranges(ranges))
        return ChunkRequest(device_id=device_id, release_id=self.manifest.release_id,
                            chunk_size=self.chunk_size,
                            ts=time.time() if ts is None else ts, missing=tuple(ranges))

    def missing_chunks(self, limit: int, below: int | None = None) -> list[tuple[int, int]]:
        """The first ``limit`` missing chunks as ``(file_index, index)``, in order (with
        ``below``, only those whose index is below it)."""
        with self._lock:  # the bitmap's runs of missing chunks, as a request names them
            return list(expand_ranges(self._bitmap.missing_ranges(limit, limit, below)))

    def wanted_blocks(self, chunks_per_block: int) -> range:
        """The blocks to be subscribed to now (:meth:`ChunkBitmap.wanted_blocks`)."""
        with self._lock:
            return self._bitmap.wanted_blocks(chunks_per_block)

    def expect(self, chunks: Iterable[tuple[int, int]]) -> None:
        """Remember ``chunks`` as the outstanding ones (a re-subscription round's), so
        :attr:`request_satisfied` tells when they have all arrived."""
        with self._lock:
            self._outstanding = {key for key in chunks if not self._bitmap.have(*key)}

    def done_request(self, device_id: str, *, ts: float | None = None) -> ChunkRequest:
        """The ``done: true`` message that tells the fleet this device has everything."""
        return ChunkRequest(device_id=device_id, release_id=self.manifest.release_id,
                            chunk_size=self.chunk_size, ts=time.time() if ts is None else ts,
                            done=True)

    @property
    def request_satisfied(self) -> bool:
        """Every chunk of the last :meth:`missing_request` (or :meth:`expect`) has arrived
        (ask for the next)."""
        with self._lock:
            return not self._outstanding

    # -- state -------------------------------------------------------------------------------

    def complete(self) -> bool:
        with self._lock:
            return self._bitmap.complete()

    def bitmap(self) -> ChunkBitmap:
        """A copy of the received-chunk bitmap (what a resumed download already holds)."""
        with self._lock:
            return self._bitmap.copy()

    def have(self, file_index: int, index: int) -> bool:
        with self._lock:
            return self._bitmap.have(file_index, index)

    @property
    def received_chunks(self) -> int:
        with self._lock:
            return self._bitmap.received

    def progress(self) -> DownloadProgress:
        with self._lock:
            received_bytes = 0
            for index, count in enumerate(self.layout.counts):
                have = self._bitmap.received_in(index)
                received_bytes += have * self.chunk_size
                if count and self._bitmap.have(index, count - 1):
                    # the last chunk is usually short
                    received_bytes -= self.chunk_size - self.layout.chunk_length(index, count - 1)
            return DownloadProgress(
                received_bytes=received_bytes, total_bytes=self.layout.total_bytes,
                received_chunks=self._bitmap.received, total_chunks=self.layout.total_chunks,
                persisted_chunks=self._persisted.received, duplicates=self.duplicates,
                refused=dict(self.refused))

    # -- ending ------------------------------------------------------------------------------

    def restart_file(self, name: str) -> None:
        """Forget every chunk of one file (after a hash mismatch, to fetch it again)."""
        names = [entry.name for entry in self.manifest.files]
        if name not in names:
            raise KeyError(f"{name!r} is not a file of release {self.manifest.release_id[:12]}")
        index = names.index(name)
        with self._lock:
            self._bitmap.clear_file(index)
            self._outstanding = {k for k in self._outstanding if k[0] != index}
            self._write_bitmap(self._bitmap)
            self._persisted = self._bitmap.copy()
            if index not in self._fds:  # it had been finalized
                final = self.dir / name
                part = self.dir / part_name(name)
                try:
                    os.replace(final, part)
                    self._fds[index] = os.open(part, os.O_RDWR)
                except OSError as exc:
                    raise _disk_error(exc, f"cannot reopen {part}") from exc

    def finalize(self) -> dict[str, Path]:
        """Check every file against the manifest and give it its final name in the staging
        directory; returns ``{name: path}``.

        Raises :class:`DownloadIncompleteError` if chunks are missing, and the manifest
        verification errors :class:`~fleetlite.sdk.errors.HashMismatchError` /
        :class:`~fleetlite.sdk.errors.LengthMismatchError` (``reason`` hash_mismatch /
        length_mismatch) naming the first bad file; nothing is renamed or deleted then
        (:meth:`restart_file` re-fetches one file, :meth:`discard` drops everything).
        """
        with self._lock:
            if not self._bitmap.complete():
                raise DownloadIncompleteError(
                    f"{self._bitmap.missing} of {self._bitmap.total} chunks are still missing")
            self._persist_locked()
            fetched = [(i, e) for i, e in enumerate(self.manifest.files) if self._fetched(e.name)]
            for index, entry in fetched:
                self._verify(index, entry.name)
            self._close_fds()
            paths: dict[str, Path] = {}
            try:
                for _, entry in fetched:
                    part = self.dir / part_name(entry.name)
                    final = self.dir / entry.name
                    if part.exists():
                        os.replace(part, final)
                    paths[entry.name] = final
                fsync_dir(self.dir)
                self.bitmap_path.unlink(missing_ok=True)
                fsync_dir(self.dir)
            except OSError as exc:
                raise _disk_error(exc, "cannot rename the staged files") from exc
            return paths

    def _verify(self, index: int, name: str) -> None:
        fd = self._fds.get(index)
        verifier = FileVerifier(self.manifest.files[index])
        try:
            if fd is None:
                with (self.dir / name).open("rb") as handle:
                    while block := handle.read(min(_READ_BLOCK, verifier.remaining) or 1):
                        verifier.update(block)
            else:
                offset = 0
                while block := os.pread(fd, min(_READ_BLOCK, verifier.remaining) or 1, offset):
                    verifier.update(block)
                    offset += len(block)
        except OSError as exc:
            raise _disk_error(exc, f"cannot read back {name}") from exc
        verifier.finish()

    def close(self) -> None:
        """Persist the bitmap and close the files (the download resumes with a new store)."""
        with self._lock:
            if not self._fds:
                return
            try:
                self._persist_locked()
            finally:
                self._close_fds()

    def discard(self) -> None:
        """Close without persisting and delete the staging directory."""
        with self._lock:
            self._close_fds()
            shutil.rmtree(self.dir, ignore_errors=True)

    def _close_fds(self) -> None:
        for fd in self._fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()

    def __enter__(self) -> ChunkStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- request timing -----------------------------------------------------------------------------

# TrackerDecision actions.
WAIT = "wait"
RESUBSCRIBE = "resubscribe"
REQUEST = "request"
DONE = "done"
STALLED = "stalled"
TIMED_OUT = "timed_out"
# unanswered requests are spaced idle_s, 2 idle_s, 4 idle_s, ... up to this many idle_s
BACKOFF_CAP = 6
#: a re-subscription round names at most this many chunks (one SUBSCRIBE of as many topics)
RESUBSCRIBE_CHUNKS = 64

MissingChunks = Callable[[int], Sequence[tuple[int, int]]]


@dataclass(frozen=True)
class TrackerDecision:
    """What to do now: ``action``; ``reason`` for STALLED/TIMED_OUT; ``wait_s`` until the next
    poll is useful (for WAIT); ``chunks`` for RESUBSCRIBE: the ``(file_index, index)`` whose
    exact chunk topics to subscribe to."""

    action: str
    reason: str = ""
    wait_s: float = 0.0
    chunks: tuple[tuple[int, int], ...] = ()


class DownloadTracker:
    """When to re-subscribe to missing chunks, when to (re)send a chunk request, and when to
    give up (FreeRTOS OTA's rules, plus the broker's retained copies first).

    - the first :meth:`poll` starts the clock (call it once subscribed to the chunks): the
      broker delivers the retained chunks, so nothing is asked before ``first_request_s``
      (``idle_s`` unless given) without a chunk: on a busy broker the first of them can take
      seconds, and a request then only adds a re-publish to every device;
    - when an ask is due (``idle_s`` without a new chunk, counted from the later of the last
      ask and the last new chunk) and :meth:`poll` was given ``missing``, the first ask since
      the last new chunk is a RESUBSCRIBE round: the next ``resubscribe_chunks`` missing
      chunks, whose exact topics the caller subscribes to (the broker re-sends their retained
      copies to this device only). Only when a round brings no new chunk within ``idle_s`` is
      the next ask a REQUEST to the fleet. A round whose chunks have all arrived
      (``batch_done``) is followed at once by the next round while more are missing;
    - a request whose chunks have all arrived (``batch_done``) is followed at once by the next
      request while more are missing; while requests go unanswered the wait doubles, up to
      ``BACKOFF_CAP * idle_s`` (5, 10, 20, 30, 30, ... s by default);
    - after ``max_requests_without_progress`` requests in a row without a new chunk, the next
      due request becomes STALLED (``download_stalled``): 255 s of silence by default (one
      round, then requests);
    - ``deadline_s`` after the first poll the download is TIMED_OUT (``download_timeout``),
      progress or not.

    Pure: the caller passes the received-chunk count and the missing chunks; time comes from
    the injected clock.
    """

    def __init__(
        self,
        *,
        idle_s: float = 5.0,
        max_requests_without_progress: int = 10,
        deadline_s: float = 3600.0,
        first_request_s: float | None = None,
        resubscribe_chunks: int = RESUBSCRIBE_CHUNKS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.idle_s = idle_s
        self.first_request_s = idle_s if first_request_s is None else first_request_s
        self.max_requests_without_progress = max_requests_without_progress
        self.deadline_s = deadline_s
        self.resubscribe_chunks = max(1, resubscribe_chunks)
        self._clock = clock
        self.started: float | None = None
        self.last_request = 0.0
        self.last_resubscribe: float | None = None
        self.last_ask = ""  # RESUBSCRIBE or REQUEST: what batch_done refers to
        self.last_progress = 0.0
        self.received = -1
        self.received_at_start = -1
        self.unanswered = 0
        self.requests = 0
        self.resubscribes = 0

    def poll(self, received: int, *, complete: bool = False, batch_done: bool = False,
             missing: MissingChunks | None = None) -> TrackerDecision:
        """Decide, given the number of chunks received so far and (to allow re-subscription
        rounds) ``missing(limit)``, the first ``limit`` missing chunks in order. A REQUEST or
        RESUBSCRIBE is counted as done."""
        now = self._clock()
        if complete:
            return TrackerDecision(DONE)
        if self.started is None:
            self.started = self.last_progress = now
            self.received = self.received_at_start = received
        if received > self.received:
            self.received = received
            self.last_progress = now
            self.unanswered = 0
        if now - self.started >= self.deadline_s:
            return TrackerDecision(TIMED_OUT, "download_timeout")
        if batch_done and self.unanswered == 0:
            if self.last_ask == RESUBSCRIBE and missing is not None:
                round_ = self._resubscribe(now, missing)
                if round_ is not None:
                    return round_
            elif self.last_ask == REQUEST:
                return self._request(now)
        quiet_since = max(self.last_request, self.last_progress, self.last_resubscribe or 0.0)
        idle = self.idle_s * min(2 ** max(0, self.unanswered - 1), BACKOFF_CAP)
        if not self.last_ask and received == self.received_at_start:
            idle = self.first_request_s  # nothing retained has come: ask soon
        if now - quiet_since >= idle:
            if missing is not None and (self.last_resubscribe is None
                                        or self.last_resubscribe < self.last_progress):
                round_ = self._resubscribe(now, missing)
                if round_ is not None:
                    return round_
            if self.unanswered >= self.max_requests_without_progress:
                return TrackerDecision(STALLED, "download_stalled")
            return self._request(now)
        wait = min(quiet_since + idle, self.started + self.deadline_s) - now
        return TrackerDecision(WAIT, wait_s=max(0.0, wait))

    def _resubscribe(self, now: float, missing: MissingChunks) -> TrackerDecision | None:
        chunks = tuple(missing(self.resubscribe_chunks))[:self.resubscribe_chunks]
        if not chunks:
            return None
        self.resubscribes += 1
        self.last_resubscribe = now
        self.last_ask = RESUBSCRIBE
        return TrackerDecision(RESUBSCRIBE, chunks=chunks)

    def _request(self, now: float) -> TrackerDecision:
        self.requests += 1
        self.unanswered += 1
        self.last_request = now
        self.last_ask = REQUEST
        return TrackerDecision(REQUEST)
