"""Store-and-forward spool: a bounded on-disk queue of outgoing MQTT reports.

paho-mqtt keeps its QoS>0 queue in RAM only, so the agent writes each report here *before*
publishing it and deletes it when the broker's PUBACK arrives. Records survive agent restarts and
power loss and are handed back in sequence order after reconnecting.

On disk (one directory, owned by one process through an ``flock`` on ``.lock``)::

    000000000123.rec    one record per file, written atomically (temp, fsync, rename, fsync dir)
    .seq                highest sequence number reserved so far (seqs never repeat)
    corrupt/            torn or damaged record files moved aside (at most MAX_QUARANTINED kept)

Record file layout: ``MAGIC | u32 header_len | u32 payload_len | u32 crc32 | header | payload``,
with a JSON header (seq, topic, qos, retain, priority, created) and a CRC-32 over everything after
the magic except the CRC field itself.

When a bound is hit, :func:`plan_append` (pure, unit-tested apart from the I/O) decides what to
drop: oldest telemetry first, then oldest "important" records, never "critical" ones. See
docs/spool.md for the operator's view.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import struct
import threading
import time
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional, cast

from fleetlite.agent.errors import SpoolError, SpoolFullError
from fleetlite.sdk.atomic import fsync_dir, write_atomic

Priority = Literal["telemetry", "important", "critical"]
Outcome = Literal["accept", "refuse", "full"]

PRIORITIES: tuple[Priority, ...] = ("telemetry", "important", "critical")
# Lower rank is dropped first; a new record may only displace records of its own rank or lower.
_RANK: dict[str, int] = {name: rank for rank, name in enumerate(PRIORITIES)}

DEFAULT_MAX_RECORDS = 10_000
DEFAULT_MAX_BYTES = 16 * 1024 * 1024
MAX_QUARANTINED = 100

MAGIC = b"FLSPOOL1"
_FIXED = struct.Struct(">III")  # header_len, payload_len, crc32
_PREFIX_LEN = len(MAGIC) + _FIXED.size
_MAX_HEADER = 64 * 1024
_SEQ_DIGITS = 12
_REC_NAME = re.compile(r"^(\d{12})\.rec$")
_SEQ_FILE = ".seq"
_LOCK_FILE = ".lock"
_CORRUPT_DIR = "corrupt"
# Sequence numbers are reserved in blocks so the .seq file costs one extra write per block,
# not per append; a restart skips the rest of the block (gaps are harmless).
_SEQ_BLOCK = 1024
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


# --------------------------------------------------------------------------------------------
# The drop policy: pure functions over record metadata.


@dataclass(frozen=True)
class RecordInfo:
    """What the drop policy needs to know about a spooled record."""

    seq: int
    priority: Priority
    size: int


@dataclass(frozen=True)
class SpoolLimits:
    """Soft bounds (where dropping starts) and hard caps (only critical records pass soft ones)."""

    max_records: int = DEFAULT_MAX_RECORDS
    max_bytes: int = DEFAULT_MAX_BYTES
    hard_max_records: int = 2 * DEFAULT_MAX_RECORDS
    hard_max_bytes: int = 2 * DEFAULT_MAX_BYTES

    def __post_init__(self) -> None:
        if self.max_records < 1 or self.max_bytes < 1:
            raise ValueError("spool max_records and max_bytes must be at least 1")
        if self.hard_max_records < self.max_records or self.hard_max_bytes < self.max_bytes:
            raise ValueError(
                "spool hard caps must be at least the soft bounds "
                f"(records {self.hard_max_records} < {self.max_records} "
                f"or bytes {self.hard_max_bytes} < {self.max_bytes})"
            )


@dataclass(frozen=True)
class AppendPlan:
    """The policy's answer for one new record.

    ``outcome`` is "accept" (write it after dropping ``evict``), "refuse" (a non-critical record
    that does not fit even after dropping everything it may displace) or "full" (a critical record
    beyond the hard cap). ``evict`` is empty unless the outcome is "accept".
    """

    outcome: Outcome
    evict: tuple[RecordInfo, ...] = ()
    over_soft: bool = False


def _fits(count: int, nbytes: int, size: int, max_records: int, max_bytes: int) -> bool:
    return count + 1 <= max_records and nbytes + size <= max_bytes


def iter_evictable(held: Sequence[RecordInfo], priority: Priority) -> Iterator[RecordInfo]:
    """Records (``held`` oldest first) a new ``priority`` record may displace, in the order they go.

    Telemetry before important, oldest first within a class; critical records never; and never a
    record of a higher class than the new one (new telemetry cannot push out an event). Lazy, so
    a full spool of thousands of records costs only as many steps as records dropped.
    """
    rank = _RANK[priority]
    for cls in PRIORITIES[: min(rank, _RANK["important"]) + 1]:
        yield from (r for r in held if r.priority == cls)


def eviction_order(held: Sequence[RecordInfo], priority: Priority) -> list[RecordInfo]:
    """All of :func:`iter_evictable`, as a list."""
    return list(iter_evictable(held, priority))


def plan_append(
    held: Sequence[RecordInfo], priority: Priority, size: int, limits: SpoolLimits
) -> AppendPlan:
    """Decide how a new record of ``priority`` and ``size`` bytes enters a spool holding ``held``.

    ``held`` is in seq order, oldest first.

    1. If it fits within the soft bounds, accept it and drop nothing.
    2. Else drop displaceable records (see :func:`iter_evictable`) one by one until it fits; the
       fewest drops that make it fit are chosen.
    3. If it still cannot fit: a non-critical record is refused (nothing dropped); a critical
       record drops every non-critical record and is accepted beyond the soft bounds as long as it
       stays within the hard caps, otherwise the outcome is "full" (nothing dropped).
    """
    count = len(held)
    nbytes = sum(r.size for r in held)
    if _fits(count, nbytes, size, limits.max_records, limits.max_bytes):
        return AppendPlan("accept")
    evict: list[RecordInfo] = []
    for record in iter_evictable(held, priority):
        evict.append(record)
        count -= 1
        nbytes -= record.size
        if _fits(count, nbytes, size, limits.max_records, limits.max_bytes):
            return AppendPlan("accept", tuple(evict))
    if priority != "critical":
        return AppendPlan("refuse")
    if _fits(count, nbytes, size, limits.hard_max_records, limits.hard_max_bytes):
        return AppendPlan("accept", tuple(evict), over_soft=True)
    return AppendPlan("full")


# --------------------------------------------------------------------------------------------
# Record encoding.


@dataclass(frozen=True)
class SpoolRecord:
    """One spooled report, as handed back for (re)publishing."""

    seq: int
    topic: str
    payload: bytes
    qos: int
    retain: bool
    priority: Priority
    created: float  # unix time of append


class _CorruptRecordError(Exception):
    """A record file failed validation (internal: it is quarantined, never raised to callers)."""


def encode_record(record: SpoolRecord) -> bytes:
    header = json.dumps(
        {
            "seq": record.seq,
            "topic": record.topic,
            "qos": record.qos,
            "retain": record.retain,
            "priority": record.priority,
            "created": record.created,
        },
        separators=(",", ":"),
        sort_keys=True,
    ).encode()
    lengths = struct.pack(">II", len(header), len(record.payload))
    crc = zlib.crc32(record.payload, zlib.crc32(header, zlib.crc32(lengths)))
    return MAGIC + _FIXED.pack(len(header), len(record.payload), crc) + header + record.payload


def decode_record(data: bytes) -> SpoolRecord:
    """Parse and verify a record file's bytes; raise _CorruptRecord if anything is off."""
    if len(data) < _PREFIX_LEN or not data.startswith(MAGIC):
        raise _CorruptRecordError("bad magic or truncated prefix")
    header_len, payload_len, crc = _FIXED.unpack_from(data, len(MAGIC))
    if header_len > _MAX_HEADER or len(data) != _PREFIX_LEN + header_len + payload_len:
        raise _CorruptRecordError(f"length mismatch ({len(data)} bytes on disk)")
    header = data[_PREFIX_LEN : _PREFIX_LEN + header_len]
    payload = data[_PREFIX_LEN + header_len :]
    lengths = struct.pack(">II", header_len, payload_len)
    if zlib.crc32(payload, zlib.crc32(header, zlib.crc32(lengths))) != crc:
        raise _CorruptRecordError("checksum mismatch")
    try:
        meta = json.loads(header)
    except ValueError as exc:
        raise _CorruptRecordError(f"unreadable header: {exc}") from exc
    if not isinstance(meta, dict):
        raise _CorruptRecordError("header is not an object")
    seq, topic, qos = meta.get("seq"), meta.get("topic"), meta.get("qos")
    retain, priority, created = meta.get("retain"), meta.get("priority"), meta.get("created")
    if (
        not isinstance(seq, int)
        or not isinstance(topic, str)
        or not isinstance(qos, int)
        or not isinstance(retain, bool)
        or priority not in _RANK
        or not isinstance(created, (int, float))
    ):
        raise _CorruptRecordError("header fields missing or of the wrong type")
    return SpoolRecord(
        seq, topic, bytes(payload), qos, retain, cast(Priority, priority), float(created)
    )


def _record_name(seq: int) -> str:
    return f"{seq:0{_SEQ_DIGITS}d}.rec"


# --------------------------------------------------------------------------------------------
# The spool.


def _per_class() -> dict[str, int]:
    return dict.fromkeys(PRIORITIES, 0)


class Spool:
    """A bounded, crash-safe, thread-safe on-disk FIFO of outgoing MQTT records.

    Usage by the MQTT link: ``seq = spool.append(...)`` before ``publish()``; on PUBACK
    ``spool.ack(seq)``; after (re)connecting, republish ``spool.peek()`` in order. Never call
    ``publish()`` while holding a lock that the spool's callers also take: the spool's own lock is
    held only around its file operations.

    Delivery is at least once: a record acked just before a power loss may be handed back again.
    """

    def __init__(
        self,
        directory: Path,
        max_records: int = DEFAULT_MAX_RECORDS,
        max_bytes: int = DEFAULT_MAX_BYTES,
        hard_max_records: Optional[int] = None,
        hard_max_bytes: Optional[int] = None,
    ) -> None:
        self.directory = Path(directory)
        self.limits = SpoolLimits(
            max_records,
            max_bytes,
            2 * max_records if hard_max_records is None else hard_max_records,
            2 * max_bytes if hard_max_bytes is None else hard_max_bytes,
        )
        self._lock = threading.Lock()
        self._index: dict[int, RecordInfo] = {}  # insertion order == seq order
        self._bytes = 0
        self._appended = _per_class()
        self._delivered = _per_class()
        self._dropped = _per_class()
        self._refused = _per_class()
        self._corrupt = 0
        self._write_errors = 0
        self._lock_fd: Optional[int] = None
        try:
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise SpoolError(
                f"cannot create the spool directory {self.directory}: {exc.strerror}; "
                "check state_dir in agent.yaml and the directory's permissions"
            ) from exc
        self._take_lock()
        try:
            self._recover()
        except OSError as exc:
            self.close()
            raise SpoolError(
                f"cannot read the spool directory {self.directory}: {exc}; "
                "check its permissions and the health of the disk"
            ) from exc
        except BaseException:
            self.close()
            raise

    # -- lifecycle -----------------------------------------------------------------------------

    def _take_lock(self) -> None:
        fd = os.open(self.directory / _LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            raise SpoolError(
                f"the spool directory {self.directory} is in use by another process "
                "(is a second agent running?); stop it or give this agent its own state_dir"
            ) from exc
        self._lock_fd = fd

    def close(self) -> None:
        """Release the directory lock. Records stay on disk for the next open."""
        with self._lock:
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._lock_fd is None:
            raise SpoolError(f"the spool {self.directory} is closed")

    def _recover(self) -> None:
        """Scan the directory: drop temp leftovers, verify records, restore the next seq."""
        found: list[int] = []
        for entry in os.scandir(self.directory):
            if entry.name.startswith(".") and ".tmp" in entry.name:
                os.unlink(entry.path)  # an append interrupted before its rename
                continue
            match = _REC_NAME.match(entry.name)
            if match and entry.is_file(follow_symlinks=False):
                found.append(int(match.group(1)))
        found.sort()
        for seq in found:
            path = self.directory / _record_name(seq)
            data = path.read_bytes()
            try:
                record = decode_record(data)
                if record.seq != seq:
                    raise _CorruptRecordError(f"header says seq {record.seq}")
            except _CorruptRecordError:
                self._quarantine(path)
                continue
            self._index[seq] = RecordInfo(seq, record.priority, len(data))
            self._bytes += len(data)
        reserved = self._read_seq_file()
        highest = found[-1] if found else -1
        self._next_seq = max(reserved, highest + 1)
        self._reserved_upto = self._next_seq  # the first append reserves a fresh block
        fsync_dir(self.directory)

    def _read_seq_file(self) -> int:
        try:
            text = (self.directory / _SEQ_FILE).read_text()
        except FileNotFoundError:
            return 0
        try:
            return max(int(text.strip()), 0)
        except ValueError:
            # The record files still give a lower bound; only acked seqs could repeat.
            self._corrupt += 1
            return 0

    def _quarantine(self, path: Path) -> None:
        """Move a damaged record file to corrupt/ (or delete it once that holds enough).

        Never raises: a damaged file must not stop the agent, whatever state the disk is in.
        """
        self._corrupt += 1
        corrupt = self.directory / _CORRUPT_DIR
        try:
            corrupt.mkdir(exist_ok=True, mode=0o700)
            if sum(1 for _ in corrupt.iterdir()) >= MAX_QUARANTINED:
                path.unlink()
            else:
                target = corrupt / path.name
                if target.exists():
                    target = corrupt / f"{path.name}.{time.time_ns()}"
                os.replace(path, target)
                fsync_dir(corrupt)
        except OSError:
            with contextlib.suppress(OSError):
                path.unlink()

    # -- writing -------------------------------------------------------------------------------

    def _write(self, name: str, data: bytes) -> None:
        """Write ``name`` atomically; the caller fsyncs the directory.

        append() does one directory fsync for the record and ``.seq`` together, and unlinks the
        record again if that fsync fails.
        """
        write_atomic(self.directory / name, data, mode=0o600, sync_dir=False)

    def _io_error(self, exc: OSError, what: str) -> SpoolError:
        self._write_errors += 1
        held = f"the {len(self._index)} records already spooled are intact"
        if exc.errno in _DISK_FULL:
            return SpoolError(
                f"disk full while {what} in the spool {self.directory}; {held}. Free space on "
                "that filesystem, or lower spool.max_mb in agent.yaml so the spool drops "
                "telemetry before the disk fills"
            )
        return SpoolError(
            f"I/O error while {what} in the spool {self.directory}: {exc}; {held}. "
            "Check the disk and the directory's permissions"
        )

    def _reserve_seq(self) -> None:
        if self._next_seq < self._reserved_upto:
            return
        upto = self._next_seq + _SEQ_BLOCK
        self._write(_SEQ_FILE, f"{upto}\n".encode())
        self._reserved_upto = upto

    def append(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        priority: str = "telemetry",
    ) -> Optional[int]:
        """Durably store a record; return its seq, or None if the drop policy refused it.

        Returns only after the record is on disk (file and directory fsynced). Older records may
        be dropped to make room (see :func:`plan_append`); a refusal is counted in ``stats()``.
        Raises SpoolFullError for a critical record past the hard cap and SpoolError on disk
        full or I/O errors; in both cases nothing already spooled is lost or dropped.
        """
        if priority not in _RANK:
            raise ValueError(f"spool priority must be one of {', '.join(PRIORITIES)}")
        if not isinstance(topic, str) or not topic:
            raise ValueError("spool topic must be a non-empty string")
        if qos not in (0, 1, 2):
            raise ValueError(f"MQTT qos must be 0, 1 or 2, not {qos!r}")
        payload = bytes(payload)
        prio = cast(Priority, priority)
        with self._lock:
            self._check_open()
            seq = self._next_seq
            data = encode_record(
                SpoolRecord(seq, topic, payload, qos, bool(retain), prio, time.time())
            )
            size = len(data)
            plan = (
                AppendPlan("accept")
                if _fits(len(self._index), self._bytes, size, *self._soft())
                else plan_append(list(self._index.values()), prio, size, self.limits)
            )
            if plan.outcome == "refuse":
                self._refused[priority] += 1
                return None
            if plan.outcome == "full":
                self._refused[priority] += 1
                raise SpoolFullError(
                    f"the spool {self.directory} is at its hard cap "
                    f"({self.limits.hard_max_records} records / {self.limits.hard_max_bytes} "
                    f"bytes; it holds {len(self._index)} records, {self._bytes} bytes): a "
                    f"critical record of {size} bytes does not fit even after dropping all "
                    "telemetry and important records. Restore the broker connection so the "
                    "spool can drain, or raise spool.max_mb in agent.yaml (the hard cap is twice "
                    "the soft bound by default)"
                )
            try:
                self._reserve_seq()
                self._write(_record_name(seq), data)
            except OSError as exc:
                raise self._io_error(exc, f"writing record {seq}") from exc
            try:
                fsync_dir(self.directory)
            except OSError as exc:
                # Undo, so the caller's view (an error: not spooled) matches the disk.
                self._unlink_quietly(seq)
                raise self._io_error(exc, f"syncing record {seq}") from exc
            # Dropped only once the new record is durable. Their unlinks ride on the next
            # directory fsync: after a power loss they may come back, which only means a resend.
            for victim in plan.evict:
                self._remove(victim.seq)
                self._dropped[victim.priority] += 1
            self._next_seq = seq + 1
            self._index[seq] = RecordInfo(seq, prio, size)
            self._bytes += size
            self._appended[priority] += 1
            return seq

    def _soft(self) -> tuple[int, int]:
        return self.limits.max_records, self.limits.max_bytes

    def _unlink_quietly(self, seq: int) -> None:
        with contextlib.suppress(OSError):
            (self.directory / _record_name(seq)).unlink()

    def _remove(self, seq: int) -> Optional[RecordInfo]:
        info = self._index.pop(seq, None)
        if info is not None:
            self._bytes -= info.size
            self._unlink_quietly(seq)
        return info

    # -- reading and acknowledging ---------------------------------------------------------------

    def peek(self, limit: Optional[int] = None, after: int = -1) -> list[SpoolRecord]:
        """Up to ``limit`` (None: all) pending records in seq order with a seq above ``after``.

        A record file found damaged here is quarantined, counted and skipped.
        """
        out: list[SpoolRecord] = []
        with self._lock:
            self._check_open()
            for seq in list(self._index):
                if limit is not None and len(out) >= limit:
                    break
                if seq <= after:
                    continue
                record = self._read(seq)
                if record is not None:
                    out.append(record)
        return out

    def pending(self) -> list[SpoolRecord]:
        """Every pending record, in seq order."""
        return self.peek()

    def _read(self, seq: int) -> Optional[SpoolRecord]:
        path = self.directory / _record_name(seq)
        try:
            record = decode_record(path.read_bytes())
            if record.seq != seq:
                raise _CorruptRecordError(f"header says seq {record.seq}")
        except FileNotFoundError:
            self._remove(seq)  # deleted behind our back
            return None
        except (_CorruptRecordError, OSError):
            info = self._index.pop(seq)
            self._bytes -= info.size
            self._quarantine(path)
            return None
        return record

    def ack(self, seq: int) -> None:
        """Delete a delivered record; a seq no longer held (dropped, acked twice) is ignored."""
        self.ack_many((seq,))

    def ack_many(self, seqs: Iterable[int]) -> int:
        """Delete several delivered records with one directory fsync; return how many were held."""
        with self._lock:
            self._check_open()
            removed = 0
            for seq in seqs:
                info = self._remove(seq)
                if info is not None:
                    self._delivered[info.priority] += 1
                    removed += 1
            if removed:
                try:
                    fsync_dir(self.directory)
                except OSError:
                    # The worst case is a redelivery after power loss, which QoS 1 allows.
                    self._write_errors += 1
            return removed

    # -- introspection -------------------------------------------------------------------------

    def __len__(self) -> int:
        with self._lock:
            return len(self._index)

    def __contains__(self, seq: object) -> bool:
        with self._lock:
            return seq in self._index

    @property
    def next_seq(self) -> int:
        """The seq the next accepted record will get."""
        with self._lock:
            return self._next_seq

    def stats(self) -> dict[str, Any]:
        """Counters and gauges for the agent's telemetry (a fresh, JSON-ready dict).

        Gauges: ``records``, ``bytes``, ``pending`` (per class), ``over_soft_bound``. Counters
        since this Spool was opened: ``appended``, ``delivered``, ``dropped``, ``refused`` (each
        per class: telemetry/important/critical), ``corrupt`` (files quarantined),
        ``write_errors`` (failed appends and directory syncs).
        """
        with self._lock:
            pending = _per_class()
            for info in self._index.values():
                pending[info.priority] += 1
            return {
                "records": len(self._index),
                "bytes": self._bytes,
                "pending": pending,
                "appended": dict(self._appended),
                "delivered": dict(self._delivered),
                "dropped": dict(self._dropped),
                "refused": dict(self._refused),
                "corrupt": self._corrupt,
                "write_errors": self._write_errors,
                "over_soft_bound": not (
                    len(self._index) <= self.limits.max_records
                    and self._bytes <= self.limits.max_bytes
                ),
            }
