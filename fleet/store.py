"""The fleet store: devices, profiles, releases, OTA status and rollouts, in SQLite or PostgreSQL.

``open_store("fleet.db")`` (or ``sqlite:///fleet.db``, ``sqlite:////abs/fleet.db``) opens a SQLite
file in WAL mode; ``open_store("postgresql://user:pw@host/db")`` uses PostgreSQL through psycopg 3
(the ``postgres`` extra, imported only then). Both run the same SQL and the same migrations
(:mod:`fleetlite.fleet.migrations`); ``?`` placeholders are rewritten for psycopg.

Threads: every operation borrows a connection from a small pool and runs in its own transaction,
so one Store can serve a controller's threads.

Several controllers on one PostgreSQL: device upserts are single conditional statements (a late,
duplicated or out-of-order message changes nothing); a batch of rollout decisions is applied under
a row lock (``SELECT ... FOR NO KEY UPDATE``; SQLite: ``BEGIN IMMEDIATE``) and only while the
rollout's ``revision`` is the one the batch was computed from (:meth:`Store.apply_decisions`);
:meth:`Store.claim` leases let one controller drive a rollout at a time.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sqlite3
import threading
import time
import urllib.parse
import uuid
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Optional, Protocol, Union

from fleetlite.fleet.device_clock import clock_offset
from fleetlite.fleet.errors import (
    MissingExtraError,
    RecordNotFoundError,
    SchemaVersionError,
    StoreConstraintError,
    StoreError,
    StoreGoneError,
    StoreUnavailableError,
)
from fleetlite.fleet.migrations import MIGRATIONS, SCHEMA_MIGRATIONS_DDL, latest_version, render
from fleetlite.fleet.sender_check import SentRelease
from fleetlite.sdk.messages import (
    MAX_INT,
    MIN_INT,
    Birth,
    CommandResponse,
    Event,
    OtaStatus,
    Status,
    Telemetry,
    encode,
)
from fleetlite.sdk.profile import ProfileRecord
from fleetlite.sdk.shadow import ShadowReport

if TYPE_CHECKING:
    import psycopg

__all__ = [
    "CommandRecord",
    "DecisionEntry",
    "DecisionLike",
    "DecisionRow",
    "DeviceModel",
    "DeviceRecord",
    "EventRecord",
    "Lease",
    "OtaRecord",
    "ProfileRow",
    "ProgressLike",
    "ProgressRow",
    "ProgressUpdate",
    "RefusalCountLike",
    "RefusedReports",
    "RegistryEntry",
    "ReleaseInfo",
    "RolloutRecord",
    "RolloutTransaction",
    "Store",
    "StoredRelease",
    "open_store",
]

JsonText = Union[str, bytes, Mapping[str, Any]]
"""JSON given as text, UTF-8 bytes or a JSON-ready mapping (stored as compact sorted JSON)."""

log = logging.getLogger("fleetlite.fleet.store")

_MIGRATION_LOCK_KEY = 0x666C746C69746501  # pg_advisory_xact_lock key: "fltlite" + 0x01
_MAX_IDLE_CONNECTIONS = 4
_Row = tuple[Any, ...]


# -- records -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceModel:
    """A model active on a device, from its birth message."""

    name: str
    version: Optional[int]
    sha256: str


@dataclass(frozen=True)
class DeviceRecord:
    """What the fleet knows about one device, merged from its status, birth and telemetry.

    ``session`` is the newest agent session seen in any of them (-1: none yet); ``online`` and
    ``status_reason`` come from the newest applicable status; ``telemetry`` is the latest report
    (by session, then seq). ``last_seen`` is when the controller received the device's last report
    (the controller's clock; 0: none heard live yet), never a time the device wrote; its
    timestamps are kept as sent. ``clock_offset`` is the device's clock minus the controller's
    from that report, in seconds (positive: ahead; None: unknown); see
    :mod:`fleetlite.fleet.device_clock`. ``decommissioned``: when an operator took it out of
    service (None: in service).
    """

    device_id: str
    device_class: str
    tags: dict[str, str]
    online: bool
    status_reason: str
    session: int
    last_seen: float
    agent_version: str
    models: tuple[DeviceModel, ...]
    facts: dict[str, Any]
    telemetry: Optional[Telemetry]
    clock_offset: Optional[float] = None
    decommissioned: Optional[float] = None


@dataclass(frozen=True)
class ProfileRow:
    """One stored profile: the columns reports filter and sort on, and the whole record."""

    id: int
    device_id: str
    ts: float
    model: str
    version: Optional[int]
    sha256: str
    device_class: str
    trigger: str
    quantization: str
    threads: int
    mean_ms: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    init_ms: float
    first_inference_ms: float
    peak_rss_mb: float
    record_json: str

    def record(self) -> ProfileRecord:
        """The full profile record, parsed and validated."""
        return ProfileRecord.from_json(self.record_json.encode())


@dataclass(frozen=True)
class ReleaseInfo:
    """A stored release without its bytes; ``files`` maps file names to sizes."""

    release_id: str
    name: str
    version: int
    created: float
    manifest_json: str
    files: dict[str, int]

    @property
    def manifest(self) -> dict[str, Any]:
        return _load_object(self.manifest_json)


@dataclass(frozen=True)
class StoredRelease:
    """A stored release with its signed envelope and file contents."""

    info: ReleaseInfo
    envelope: bytes
    files: dict[str, bytes]


@dataclass(frozen=True)
class OtaRecord:
    """A stored OTA status and when the fleet first received it (the controller's clock)."""

    status: OtaStatus
    received_at: float


class RegistryEntry(NamedTuple):
    """A device in service as a rollout selects it (:meth:`Store.registry`)."""

    device_id: str
    device_class: str
    tags: dict[str, str]
    online: bool


@dataclass(frozen=True)
class RolloutRecord:
    """A rollout: its spec, its state document and the ``revision`` of that state.

    ``revision`` grows by one with every change made through :meth:`Store.update_rollout_state`
    or a :meth:`Store.rollout_lock` transaction that wrote something. The state's ``devices``
    map (one entry per device, ``fleetlite.fleet.rollout.DeviceProgress`` fields) is stored as
    one ``rollout_devices`` row each, not in the document: present when the record was read
    with ``devices=True``, absent otherwise.
    """

    rollout_id: str
    release_id: str
    spec: dict[str, Any]
    state: dict[str, Any]
    revision: int
    created: float
    updated: float


class ProgressLike(Protocol):
    """One device's progress in a rollout, as :meth:`Store.apply_decisions` reads it
    (``fleetlite.fleet.rollout.DeviceProgress`` fits)."""

    @property
    def device_id(self) -> str: ...
    @property
    def device_class(self) -> str: ...
    @property
    def wave(self) -> int: ...
    @property
    def status(self) -> str: ...
    @property
    def reason(self) -> str: ...
    @property
    def code(self) -> str: ...
    @property
    def sent_at(self) -> Optional[float]: ...


@dataclass(frozen=True)
class ProgressUpdate:
    """A :class:`ProgressLike` for callers without the rollout engine.
    ``sent_at=None`` keeps the stored time the install was sent."""

    device_id: str
    wave: int
    status: str
    reason: str = ""
    code: str = ""
    device_class: str = ""
    sent_at: Optional[float] = None


@dataclass(frozen=True)
class ProgressRow:
    """One device's progress in a rollout, as stored."""

    rollout_id: str
    device_id: str
    device_class: str
    wave: int
    status: str
    reason: str
    code: str
    sent_at: Optional[float]
    updated: float


class DecisionLike(Protocol):
    """A decision as :meth:`Store.apply_decisions` reads it
    (``fleetlite.fleet.rollout.Decision`` fits)."""

    @property
    def kind(self) -> str: ...
    @property
    def reason(self) -> str: ...
    @property
    def device_id(self) -> Optional[str]: ...
    @property
    def wave(self) -> Optional[int]: ...
    @property
    def device_class(self) -> Optional[str]: ...
    @property
    def detail(self) -> Mapping[str, Any]: ...


@dataclass(frozen=True)
class DecisionEntry:
    """A :class:`DecisionLike` for callers without the rollout engine."""

    kind: str
    reason: str = ""
    device_id: Optional[str] = None
    wave: Optional[int] = None
    device_class: Optional[str] = None
    detail: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DecisionRow:
    """A recorded decision; ``revision`` is the rollout revision it was decided from."""

    id: int
    rollout_id: str
    revision: int
    kind: str
    reason: str
    device_id: Optional[str]
    wave: Optional[int]
    device_class: Optional[str]
    detail: dict[str, Any]
    ts: float


@dataclass(frozen=True)
class RefusedReports:
    """Reports of one kind refused from one sender for one reason (fleet/sender_check.py)."""

    device_id: str
    kind: str
    reason: str
    count: int
    first_at: float
    last_at: float
    last_message: str


class RefusalCountLike(Protocol):
    """Refusals of one (sender, kind, reason) counted since the last flush, as
    :meth:`Store.record_refusals` reads them (``fleetlite.fleet.ingest_limits.RefusalCount``
    and :class:`RefusedReports` fit)."""

    @property
    def device_id(self) -> str: ...
    @property
    def kind(self) -> str: ...
    @property
    def reason(self) -> str: ...
    @property
    def count(self) -> int: ...
    @property
    def first_at(self) -> float: ...
    @property
    def last_at(self) -> float: ...
    @property
    def last_message(self) -> str: ...


@dataclass(frozen=True)
class CommandRecord:
    """A command to one device and its answer. ``sent`` is None while no controller has
    published it; ``answered`` None while the device has not answered; then ``ok`` with
    ``result``, or ``error_code`` and ``error``. ``origin``: who sent it (``cli``, ``sdk``,
    ``rollout ID``). Times are the fleet's clock (Unix seconds)."""

    command_id: str
    device_id: str
    command: str
    args: dict[str, Any]
    origin: str
    created: float
    expires: float
    sent: Optional[float] = None
    answered: Optional[float] = None
    ok: Optional[bool] = None
    result: Optional[dict[str, Any]] = None
    error_code: str = ""
    error: str = ""


@dataclass(frozen=True)
class EventRecord:
    """An event a device reported (``fleetlite.event/1``); ``id`` grows with each stored event,
    ``received`` is the controller's receive time and ``ts`` the device's."""

    id: int
    device_id: str
    ts: float
    received: float
    kind: str
    message: str
    detail: dict[str, Any]


@dataclass(frozen=True)
class Lease:
    """A named lease; times are Unix seconds by the database's clock."""

    name: str
    owner: str
    acquired: float
    expires: float
    active: bool


# -- connections -------------------------------------------------------------------------------


class _Result(NamedTuple):
    rows: list[_Row]
    rowcount: int


class _Db:
    """One connection of either dialect, taking ``?`` placeholders; errors become StoreErrors."""

    dialect = ""
    broken = False

    def execute(self, sql: str, params: Sequence[Any] = ()) -> _Result:
        raise NotImplementedError

    def begin(self, write: bool) -> None:
        raise NotImplementedError

    def commit(self) -> None:
        try:
            self.execute("COMMIT")
        except BaseException:
            self.rollback()
            raise

    def rollback(self) -> None:
        try:
            self.execute("ROLLBACK")
        except StoreError:
            self.broken = True

    def close(self) -> None:
        raise NotImplementedError


def _sqlite_advice(error: str) -> str:
    """What to do about a SQLite operational error, by its text."""
    if "locked" in error or "busy" in error:
        return "another process holds a long write transaction: retry"
    if "full" in error:
        return "free space on its file system"
    if "readonly" in error or "read-only" in error or "I/O" in error:
        return ("make the file and its directory writable again (permissions, a read-only "
                "or immutable file system, a failing disk)")
    return "check the file and its directory"


def _params(params: Sequence[Any]) -> tuple[Any, ...]:
    # Booleans are INTEGER 0/1 in both schemas; psycopg would send them as SQL booleans.
    return tuple(int(p) if isinstance(p, bool) else p for p in params)


# how often a SQLite writer tries again for the write lock while another holds it
_WRITE_LOCK_POLL_S = 0.002


class _SqliteDb(_Db):
    dialect = "sqlite"

    def __init__(self, path: Path, busy_timeout_s: float, *, create: bool = True) -> None:
        self.path = path
        self.busy_timeout_s = busy_timeout_s
        # ``create`` False (every connection after a store's first): a store file deleted
        # while in use is not silently created again, empty, by a thread's new connection
        target = str(path) if create else f"{path.resolve().as_uri()}?mode=rw"
        try:
            self.raw = sqlite3.connect(target, timeout=busy_timeout_s, isolation_level=None,
                                       check_same_thread=False, uri=not create)
        except sqlite3.Error as exc:
            raise StoreUnavailableError(
                f"cannot open the SQLite store {path}: {exc}; check that the directory exists "
                "and is writable") from exc
        try:
            self.execute("PRAGMA foreign_keys = ON")
            mode = self._enable_wal(busy_timeout_s)
            if mode != "wal":
                log.warning("SQLite store %s runs in %s journal mode, not WAL (is it on a network "
                            "file system?): readers will block writers", path, mode)
            # In WAL mode NORMAL survives application crashes; a power cut may lose the last
            # commits, which the devices' retained and spooled messages restore.
            self.execute("PRAGMA synchronous = NORMAL")
        except BaseException:
            self.raw.close()
            raise

    def _enable_wal(self, busy_timeout_s: float) -> str:
        """Switch the database to WAL (a no-op once it is) and return the journal mode in force.

        SQLite answers "database is locked" to a journal-mode change at once, without waiting
        out the busy timeout, while another connection is opening the same new database, so two
        controllers started together would fail here. The switch is retried for as long as any
        other statement would wait.
        """
        deadline = time.monotonic() + busy_timeout_s
        delay = 0.01
        while True:
            try:
                return str(self.execute("PRAGMA journal_mode = WAL").rows[0][0])
            except StoreUnavailableError as exc:
                if "locked" not in str(exc.__cause__) or time.monotonic() + delay > deadline:
                    raise
            time.sleep(delay)
            delay = min(delay * 2, 0.2)

    def execute(self, sql: str, params: Sequence[Any] = ()) -> _Result:
        try:
            cursor = self.raw.execute(sql, _params(params))
            return _Result(cursor.fetchall(), cursor.rowcount)
        except sqlite3.IntegrityError as exc:
            raise StoreConstraintError(f"SQLite store {self.path}: {exc}") from exc
        except sqlite3.OperationalError as exc:
            if any(text in str(exc) for text in ("no such table", "no such column",
                                                 "has no column named")):
                raise SchemaVersionError(
                    f"SQLite store {self.path} is not migrated ({exc}): run Store.migrate() or "
                    "open it with open_store(..., migrate=True)") from exc
            if "locked" not in str(exc):
                # e.g. a connection opened while the file was not writable is read-only for
                # good: the pool must not hand it out again once the file is writable
                self.broken = True
            raise StoreUnavailableError(
                f"SQLite store {self.path}: {exc}; {_sqlite_advice(str(exc))}") from exc
        except sqlite3.Error as exc:
            raise StoreError(f"SQLite store {self.path}: {exc}") from exc

    def begin(self, write: bool) -> None:
        # IMMEDIATE takes the write lock up front: a deferred transaction that later writes
        # fails at once with SQLITE_BUSY when another writer got in between.
        if not write:
            self.execute("BEGIN")
            return
        # SQLite's own busy handler sleeps up to 100 ms between tries, so a writer waiting
        # behind others that commit every few ms (the ingest worker, a rollout step) can wait
        # seconds while they keep getting in: an operator's request waited 1.7 s that way
        # (tools/bench/bench_operator_requests.py). Try again every 2 ms instead.
        deadline = time.monotonic() + self.busy_timeout_s
        self.raw.execute("PRAGMA busy_timeout = 0")
        try:
            while True:
                try:
                    self.raw.execute("BEGIN IMMEDIATE")
                    return
                except sqlite3.OperationalError as exc:
                    if "locked" not in str(exc) or time.monotonic() >= deadline:
                        self.execute("BEGIN IMMEDIATE")  # once more, for its error
                        return
                time.sleep(_WRITE_LOCK_POLL_S)
        finally:
            self.raw.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_s * 1000)}")

    def close(self) -> None:
        self.raw.close()


class _PgDb(_Db):
    dialect = "postgresql"

    def __init__(self, url: str, display: str, connect_timeout_s: float) -> None:
        psycopg_module = _import_psycopg()
        self.display = display
        options: dict[str, Any] = {"application_name": "fleetlite"}
        try:
            if "connect_timeout" not in psycopg_module.conninfo.conninfo_to_dict(url):
                options["connect_timeout"] = max(1, round(connect_timeout_s))
            self.raw: psycopg.Connection[tuple[Any, ...]] = psycopg_module.connect(
                url, autocommit=True, **options)
        except psycopg_module.Error as exc:
            raise StoreUnavailableError(
                f"cannot connect to the PostgreSQL store {display}: {exc}; check the URL and "
                "that the server runs") from exc

    def execute(self, sql: str, params: Sequence[Any] = ()) -> _Result:
        import psycopg
        from psycopg import errors

        try:
            cursor = self.raw.execute(sql.replace("?", "%s"), _params(params))
            rows = cursor.fetchall() if cursor.description is not None else []
            return _Result(rows, cursor.rowcount)
        except (errors.UndefinedTable, errors.UndefinedColumn) as exc:
            raise SchemaVersionError(
                f"PostgreSQL store {self.display} is not migrated ({exc}): run Store.migrate() "
                "or open it with open_store(..., migrate=True)") from exc
        except psycopg.IntegrityError as exc:
            raise StoreConstraintError(f"PostgreSQL store {self.display}: {exc}") from exc
        except errors.ReadOnlySqlTransaction as exc:
            raise StoreUnavailableError(
                f"PostgreSQL store {self.display} is read-only ({exc}): point the store at the "
                "primary server, or make the database writable again "
                "(default_transaction_read_only)") from exc
        except psycopg.OperationalError as exc:
            self.broken = self.broken or self.raw.broken
            raise StoreUnavailableError(
                f"PostgreSQL store {self.display}: {exc}; check that the server runs, "
                "then retry") from exc
        except psycopg.Error as exc:
            self.broken = self.broken or self.raw.broken
            raise StoreError(f"PostgreSQL store {self.display}: {exc}") from exc

    def begin(self, write: bool) -> None:
        # Reads see one snapshot (a device with its tags and models); writes stay READ COMMITTED
        # and rely on ON CONFLICT and row locks.
        self.execute("BEGIN" if write else "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")

    def close(self) -> None:
        self.raw.close()


def _import_psycopg() -> Any:
    try:
        import psycopg
    except ImportError as exc:
        raise MissingExtraError(
            "a postgresql:// store needs psycopg 3: pip install 'fleetlite[postgres]'") from exc
    return psycopg


# The database's clock, in Unix seconds, for leases: controllers' clocks need not agree.
_NOW_SQL = {
    "sqlite": "((julianday('now') - 2440587.5) * 86400.0)",
    "postgresql": "CAST(EXTRACT(EPOCH FROM statement_timestamp()) AS DOUBLE PRECISION)",
}


# -- opening -----------------------------------------------------------------------------------


def open_store(
    url: Union[str, os.PathLike[str]],
    *,
    migrate: bool = True,
    busy_timeout_s: float = 30.0,
    connect_timeout_s: float = 10.0,
) -> Store:
    """Open (and by default migrate) the store at ``url``.

    ``url``: a file path or ``sqlite:///relative/path`` / ``sqlite:////absolute/path`` (SQLite,
    created if missing), or ``postgresql://user:password@host:port/database``. ``busy_timeout_s``
    is how long SQLite waits for another writer. Raises :class:`StoreUnavailableError` when the
    database cannot be opened, :class:`SchemaVersionError` when it was migrated by a newer
    fleetlite.
    """
    text = os.fspath(url)
    connect: Callable[[], _Db]
    if text.startswith(("postgresql://", "postgres://")):
        display = _redact(text)

        def connect() -> _Db:
            return _PgDb(text, display, connect_timeout_s)

        dialect = "postgresql"
    else:
        path = _sqlite_path(text)
        path.parent.mkdir(parents=True, exist_ok=True)
        display = str(path)

        opened: list[bool] = []

        def connect() -> _Db:
            db = _SqliteDb(path, busy_timeout_s, create=not opened)
            opened.append(True)
            return db

        dialect = "sqlite"
    store = Store(connect, dialect, display)
    try:
        if migrate:
            store.migrate()
        else:
            with store._transaction(write=False):
                pass
        if dialect == "sqlite":
            store._watch_file(path)
    except BaseException:
        store.close()
        raise
    return store


def _sqlite_path(text: str) -> Path:
    if text.startswith("sqlite:"):
        if not text.startswith("sqlite:///"):
            raise StoreError(f"cannot read the store URL {text!r}: write sqlite:///relative/path "
                             "or sqlite:////absolute/path")
        text = text[len("sqlite:///"):]
    elif "://" in text:
        scheme = text.split("://", 1)[0]
        raise StoreError(f"unsupported store URL scheme {scheme!r}: use a file path, sqlite:///"
                         "path or postgresql://user:password@host/database")
    if text in ("", ":memory:") or text.startswith("file:"):
        raise StoreError("the store must be a SQLite file (an in-memory database is not shared "
                         "between connections): give a path, e.g. a temporary file")
    return Path(text)


def _redact(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


# -- the store ---------------------------------------------------------------------------------


_PROFILE_COLUMNS = (
    "id, device_id, ts, model, model_version, model_sha256, device_class, trigger_kind, "
    "quantization, threads, mean_ms, p50_ms, p95_ms, p99_ms, init_ms, first_inference_ms, "
    "peak_rss_mb, record_json")


def _profile_row(r: Sequence[Any]) -> ProfileRow:
    return ProfileRow(
        id=int(r[0]), device_id=str(r[1]), ts=float(r[2]), model=str(r[3]),
        version=None if r[4] is None else int(r[4]), sha256=str(r[5]),
        device_class=str(r[6]), trigger=str(r[7]), quantization=str(r[8]),
        threads=int(r[9]), mean_ms=float(r[10]), p50_ms=float(r[11]),
        p95_ms=float(r[12]), p99_ms=float(r[13]), init_ms=float(r[14]),
        first_inference_ms=float(r[15]), peak_rss_mb=float(r[16]),
        record_json=str(r[17]),
    )


class Store:
    """The fleet's database. Make one with :func:`open_store`; close it (or use ``with``)."""

    def __init__(self, connect: Callable[[], _Db], dialect: str, display: str) -> None:
        self._connect = connect
        self.dialect = dialect
        self.url = display
        self._lock = threading.Lock()
        self._idle: list[_Db] = []
        self._closed = False
        self._local = threading.local()
        self._file: Optional[Path] = None
        self._file_id: Optional[tuple[int, int]] = None

    def __repr__(self) -> str:
        return f"<Store {self.dialect} {self.url}>"

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close idle connections now, busy ones when their operation ends."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for db in idle:
            db.close()

    # -- the SQLite file ----------------------------------------------------------------------

    def _watch_file(self, path: Path) -> None:
        info = path.stat()
        self._file, self._file_id = path, (info.st_dev, info.st_ino)

    def check_file(self) -> None:
        """Raise :class:`StoreGoneError` if this SQLite store's file was deleted or replaced by
        another file since it was opened (connections still open would go on writing into the
        old one, which nobody else can open). Does nothing for PostgreSQL."""
        if self._file is None:
            return
        try:
            info = self._file.stat()
        except FileNotFoundError:
            raise StoreGoneError(
                f"the SQLite store {self._file} was deleted while in use: nothing written now "
                "would be kept. Restore it from a backup, or start `fleetlite serve` again to "
                "begin a new, empty store there") from None
        except OSError as exc:
            raise StoreUnavailableError(
                f"SQLite store {self._file}: cannot check the file ({exc.strerror or exc}); "
                f"{_sqlite_advice('I/O')}") from exc
        if (info.st_dev, info.st_ino) != self._file_id:
            raise StoreGoneError(
                f"the SQLite store {self._file} was replaced by another file while in use: "
                "stop writing into the old one. Start `fleetlite serve` again to use the new "
                "file (restoring a backup is done with the controller stopped)")

    # -- connections and transactions --------------------------------------------------------

    def _take(self) -> _Db:
        with self._lock:
            if self._closed:
                raise StoreError(f"the store {self.url} is closed: open it again with open_store()")
            if self._idle:
                return self._idle.pop()
        return self._connect()

    def _give_back(self, db: _Db) -> None:
        with self._lock:
            keep = not self._closed and not db.broken and len(self._idle) < _MAX_IDLE_CONNECTIONS
            if keep:
                self._idle.append(db)
        if not keep:
            db.close()

    @contextlib.contextmanager
    def _transaction(self, write: bool) -> Iterator[_Db]:
        """One transaction on a pooled connection; joins the thread's open one if any."""
        joined: Optional[_Db] = getattr(self._local, "db", None)
        if joined is not None:
            yield joined
            return
        db = self._take()
        self._local.db = db
        try:
            db.begin(write)
            try:
                yield db
            except BaseException:
                db.rollback()
                raise
            db.commit()
        finally:
            self._local.db = None
            self._give_back(db)

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Run this thread's store calls inside the block in one write transaction: they commit
        together (one commit instead of one each), or not at all if the block raises."""
        with self._transaction(write=True):
            yield

    # -- schema ------------------------------------------------------------------------------

    def migrate(self, target: Optional[int] = None) -> list[int]:
        """Apply the migrations this database lacks (up to ``target``), in one transaction.

        Returns the versions applied now (empty when up to date). Safe when several controllers
        start at once: PostgreSQL serialises them on an advisory lock, SQLite on its write lock.
        Raises :class:`SchemaVersionError` if the database has versions this fleetlite does not
        know (it was migrated by a newer one).
        """
        applied: list[int] = []
        with self._transaction(write=True) as db:
            if db.dialect == "postgresql":
                db.execute("SELECT pg_advisory_xact_lock(?)", (_MIGRATION_LOCK_KEY,))
            db.execute(SCHEMA_MIGRATIONS_DDL)
            done = {int(row[0]) for row in db.execute("SELECT version FROM schema_migrations").rows}
            unknown = done - {m.version for m in MIGRATIONS}
            if unknown:
                raise SchemaVersionError(
                    f"the store {self.url} has schema version {max(unknown)}, newer than this "
                    f"fleetlite knows ({latest_version()}): upgrade fleetlite")
            for migration in MIGRATIONS:
                if migration.version in done or (target is not None and migration.version > target):
                    continue
                for statement in render(migration, db.dialect):
                    db.execute(statement)
                db.execute("INSERT INTO schema_migrations (version, name, applied) "
                           "VALUES (?, ?, ?)", (migration.version, migration.name, time.time()))
                applied.append(migration.version)
        return applied

    def schema_version(self) -> int:
        """The highest migration applied (0 for an empty database)."""
        with self._transaction(write=False) as db:
            if db.dialect == "postgresql":
                exists = db.execute("SELECT to_regclass('schema_migrations') IS NOT NULL").rows
            else:
                exists = db.execute("SELECT count(*) > 0 FROM sqlite_master WHERE type = 'table' "
                                    "AND name = 'schema_migrations'").rows
            if not exists[0][0]:
                return 0
            row = db.execute("SELECT max(version) FROM schema_migrations").rows[0]
            return int(row[0] or 0)

    # -- devices -----------------------------------------------------------------------------

    def upsert_status(self, status: Status, *, received_at: Optional[float] = None) -> bool:
        """Apply an online/offline status unless it is stale; True if it changed the device.

        Statuses are ordered by (session, connection): one of an older session or an earlier
        connection (a late Last Will) is ignored. Within the current connection an offline
        status always applies (the Will carries the time of the connect, not of the loss) and an
        online one only if newer than the newest status seen.

        ``received_at``, when the controller received it (its clock), becomes the device's last
        seen if later and gives its clock offset; None (a retained snapshot, the Last Will:
        :func:`fleetlite.fleet.device_clock.heard_from_device`) changes neither.
        """
        with self._transaction(write=True) as db:
            result = db.execute(
                f"""INSERT INTO devices (device_id, online, status_session, status_conn,
                                        status_ts, status_reason, last_seen, clock_offset)
                VALUES (?, ?, ?, ?, ?, ?, ?, ?)
                ON CONFLICT (device_id) DO UPDATE SET
                    online = excluded.online,
                    status_session = excluded.status_session,
                    status_conn = excluded.status_conn,
                    status_ts = CASE WHEN excluded.status_session = devices.status_session
                                          AND excluded.status_conn = devices.status_conn
                                          AND devices.status_ts > excluded.status_ts
                                     THEN devices.status_ts ELSE excluded.status_ts END,
                    status_reason = excluded.status_reason,
                    {_SEEN}
                WHERE excluded.status_session > devices.status_session
                   OR (excluded.status_session = devices.status_session
                       AND excluded.status_conn > devices.status_conn)
                   OR (excluded.status_session = devices.status_session
                       AND excluded.status_conn = devices.status_conn
                       AND (excluded.online = 0 OR excluded.status_ts > devices.status_ts))""",
                (status.device_id, status.online, status.session, status.conn, status.ts,
                 status.reason, *_seen(status.ts, received_at)),
            )
            return result.rowcount > 0

    def upsert_birth(self, birth: Birth, *, received_at: Optional[float] = None) -> bool:
        """Apply a birth (class, agent version, tags, facts, active models) unless an equal or
        newer one (by session, then ts) is stored; True if applied.
        ``received_at``, when the controller received it (its clock), becomes the device's last
        seen if later and gives its clock offset; None (a retained snapshot, the Last Will:
        :func:`fleetlite.fleet.device_clock.heard_from_device`) changes neither."""
        with self._transaction(write=True) as db:
            result = db.execute(
                f"""INSERT INTO devices (device_id, device_class, agent_version, facts_json,
                                        birth_session, birth_ts, last_seen, clock_offset)
                VALUES (?, ?, ?, ?, ?, ?, ?, ?)
                ON CONFLICT (device_id) DO UPDATE SET
                    device_class = excluded.device_class,
                    agent_version = excluded.agent_version,
                    facts_json = excluded.facts_json,
                    birth_session = excluded.birth_session,
                    birth_ts = excluded.birth_ts,
                    {_SEEN}
                WHERE excluded.birth_session > devices.birth_session
                   OR (excluded.birth_session = devices.birth_session
                       AND excluded.birth_ts > devices.birth_ts)""",
                (birth.device_id, birth.device_class, birth.agent_version, _dump(birth.facts),
                 birth.session, birth.ts, *_seen(birth.ts, received_at)),
            )
            if result.rowcount == 0:
                return False
            db.execute("DELETE FROM device_tags WHERE device_id = ?", (birth.device_id,))
            for key, value in sorted(birth.tags.items()):
                db.execute("INSERT INTO device_tags (device_id, tag_key, tag_value) "
                           "VALUES (?, ?, ?)", (birth.device_id, key, value))
            db.execute("DELETE FROM device_models WHERE device_id = ?", (birth.device_id,))
            for model in _birth_models(birth.models):
                db.execute("INSERT INTO device_models (device_id, name, version, sha256) "
                           "VALUES (?, ?, ?, ?)",
                           (birth.device_id, model.name, model.version, model.sha256))
            return True

    def record_telemetry(self, telemetry: Telemetry, *, received_at: Optional[float] = None,
                         raw: Optional[bytes] = None) -> bool:
        """Keep the report if it is the device's latest (by session, then seq); True if kept.
        ``received_at``, when the controller received it (its clock), becomes the device's last
        seen if later and gives its clock offset; None (a retained snapshot, the Last Will:
        :func:`fleetlite.fleet.device_clock.heard_from_device`) changes neither. ``raw``: the
        bytes ``telemetry`` was parsed from, stored as they are (serialising the report again
        was 40 % of the controller's cost of storing it)."""
        with self._transaction(write=True) as db:
            result = db.execute(
                f"""INSERT INTO devices (device_id, telemetry_json, telemetry_session,
                                        telemetry_seq, last_seen, clock_offset)
                VALUES (?, ?, ?, ?, ?, ?)
                ON CONFLICT (device_id) DO UPDATE SET
                    telemetry_json = excluded.telemetry_json,
                    telemetry_session = excluded.telemetry_session,
                    telemetry_seq = excluded.telemetry_seq,
                    {_SEEN}
                WHERE excluded.telemetry_session > devices.telemetry_session
                   OR (excluded.telemetry_session = devices.telemetry_session
                       AND excluded.telemetry_seq > devices.telemetry_seq)""",
                (telemetry.device_id, (raw or telemetry.to_json()).decode(), telemetry.session,
                 telemetry.seq, *_seen(telemetry.ts, received_at)),
            )
            return result.rowcount > 0

    def get_device(self, device_id: str) -> Optional[DeviceRecord]:
        """One device (decommissioned or not), or None if the store has never heard of it."""
        devices = self.list_devices(device_ids=[device_id], decommissioned=None)
        return devices[0] if devices else None

    def list_devices(
        self,
        *,
        device_class: Union[str, Collection[str], None] = None,
        tags: Optional[Mapping[str, Union[str, Collection[str]]]] = None,
        online: Optional[bool] = None,
        model: Optional[str] = None,
        model_version: Optional[int] = None,
        device_ids: Optional[Collection[str]] = None,
        seen_since: Optional[float] = None,
        decommissioned: Optional[bool] = False,
        limit: Optional[int] = None,
        after: Optional[str] = None,
    ) -> list[DeviceRecord]:
        """Devices matching every given filter, by id: by default those in service
        (``decommissioned=True``: only the decommissioned; None: both).

        Paging (keyset, by device id): ``after``, only devices whose id sorts after it;
        ``limit``, at most that many (None or 0: all). The next page starts after the last id
        of this one, so a device added or removed between pages neither repeats nor shifts
        another: each device that stays is listed exactly once.

        ``device_class``: one class or a set; ``tags``: per key, the value or set of values
        allowed (``{"site": "berlin", "line": {"1", "2"}}``); ``model``/``model_version``: an
        active model of that name (and version); ``seen_since``: last seen at or after this
        time on the controller's clock (``now - 300``: heard from in the last five minutes).
        """
        where: list[str] = []
        params: list[Any] = []
        if device_class is not None:
            _add_in(where, params, "device_class", device_class)
        for key, values in (tags or {}).items():
            params.append(key)
            clause: list[str] = []
            _add_in(clause, params, "t.tag_value", values)
            where.append("EXISTS (SELECT 1 FROM device_tags t WHERE t.device_id = "
                         f"devices.device_id AND t.tag_key = ? AND {clause[0]})")
        if online is not None:
            where.append("online = ?")
            params.append(online)
        if model is not None:
            sub = "m.name = ?"
            params.append(model)
            if model_version is not None:
                sub += " AND m.version = ?"
                params.append(model_version)
            where.append("EXISTS (SELECT 1 FROM device_models m WHERE m.device_id = "
                         f"devices.device_id AND {sub})")
        if device_ids is not None:
            _add_in(where, params, "device_id", device_ids)
        if seen_since is not None:
            where.append("last_seen >= ?")
            params.append(seen_since)
        if decommissioned is not None:
            where.append(f"decommissioned IS {'NOT ' if decommissioned else ''}NULL")
        if after is not None:
            where.append("device_id > ?")
            params.append(after)
        if limit is not None and limit < 0:
            raise ValueError(f"limit {limit}: give a number >= 0 (0 or None: no limit)")
        condition = " AND ".join(where) or "1 = 1"
        page = " LIMIT ?" if limit else ""
        with self._transaction(write=False) as db:
            rows = db.execute(
                "SELECT device_id, device_class, agent_version, facts_json, online, "
                "status_reason, status_session, birth_session, telemetry_session, last_seen, "
                "telemetry_json, clock_offset, decommissioned "
                f"FROM devices WHERE {condition} ORDER BY device_id{page}",
                [*params, limit] if limit else params).rows
            if limit and rows:  # the tags and models of this page's devices only
                condition += " AND device_id <= ?"
                params.append(rows[-1][0])
            selected = f"SELECT device_id FROM devices WHERE {condition}"
            tag_rows = db.execute(
                "SELECT device_id, tag_key, tag_value FROM device_tags "
                f"WHERE device_id IN ({selected}) ORDER BY device_id, tag_key", params).rows
            model_rows = db.execute(
                "SELECT device_id, name, version, sha256 FROM device_models "
                f"WHERE device_id IN ({selected}) ORDER BY device_id, name", params).rows
        device_tags: dict[str, dict[str, str]] = {}
        for device_id, key, value in tag_rows:
            device_tags.setdefault(device_id, {})[key] = value
        device_models: dict[str, list[DeviceModel]] = {}
        for device_id, name, version, sha256 in model_rows:
            device_models.setdefault(device_id, []).append(
                DeviceModel(str(name), None if version is None else int(version), str(sha256)))
        return [
            DeviceRecord(
                device_id=str(row[0]),
                device_class=str(row[1]),
                tags=device_tags.get(row[0], {}),
                online=bool(row[4]),
                status_reason=str(row[5]),
                session=max(int(row[6]), int(row[7]), int(row[8])),
                last_seen=float(row[9]),
                agent_version=str(row[2]),
                models=tuple(device_models.get(row[0], ())),
                facts=_load_object(row[3]),
                telemetry=None if row[10] is None else Telemetry.from_dict(_load_object(row[10])),
                clock_offset=None if row[11] is None else float(row[11]),
                decommissioned=None if row[12] is None else float(row[12]),
            )
            for row in rows
        ]

    def registry(self) -> list[RegistryEntry]:
        """Every device in service, by id, with only what a rollout selects on (class, tags,
        online): a rollout step's read, without the facts, models and telemetry that
        :meth:`list_devices` also parses for every device."""
        with self._transaction(write=False) as db:
            rows = db.execute("SELECT device_id, device_class, online FROM devices "
                              "WHERE decommissioned IS NULL ORDER BY device_id").rows
            tag_rows = db.execute(
                "SELECT t.device_id, t.tag_key, t.tag_value FROM device_tags t JOIN devices d "
                "ON d.device_id = t.device_id WHERE d.decommissioned IS NULL").rows
        tags: dict[str, dict[str, str]] = {}
        for device_id, key, value in tag_rows:
            tags.setdefault(str(device_id), {})[str(key)] = str(value)
        return [RegistryEntry(str(r[0]), str(r[1]), tags.get(str(r[0]), {}), bool(r[2]))
                for r in rows]

    def decommission(self, device_ids: Collection[str], *, undo: bool = False,
                     now: Optional[float] = None) -> list[str]:
        """Take devices out of service (or back in, with ``undo``): out of lists, rollouts
        and selections, their history kept. Returns the ids that changed."""
        when = time.time() if now is None else now
        changed = []
        with self._transaction(write=True) as db:
            for device_id in sorted(set(device_ids)):
                result = db.execute(
                    f"UPDATE devices SET decommissioned = ? WHERE device_id = ? AND "
                    f"decommissioned IS {'NOT ' if undo else ''}NULL",
                    (None if undo else when, device_id))
                if result.rowcount > 0:
                    changed.append(device_id)
        return changed

    # -- profiles ----------------------------------------------------------------------------

    def add_profile(self, record: ProfileRecord, *, device_class: Optional[str] = None,
                    keep_per_device: Optional[int] = None, raw: Optional[bytes] = None) -> bool:
        """Store a profile; False if the same (device, ts, model sha256) is already stored.
        ``raw``: the bytes ``record`` was parsed from, stored as they are.

        The device class is ``device_class``, else the record's ``device.device_class`` fact,
        else the stored device's class. ``keep_per_device``: keep about that many of the
        device's profiles, the newest (by ``ts``), and beyond them the newest of every model
        version a rollout names (its ``version`` and ``previous_version``: what the gates
        compare). The count is read from the (device, ts) index at each insert; the oldest are
        deleted once it exceeds the bound by a tenth, so pruning runs once per that many
        inserts.
        """
        with self._transaction(write=True) as db:
            if device_class is None:
                fact = record.device.get("device_class")
                if isinstance(fact, str) and fact:
                    device_class = fact
                else:
                    rows = db.execute("SELECT device_class FROM devices WHERE device_id = ?",
                                      (record.device_id,)).rows
                    device_class = str(rows[0][0]) if rows else ""
            steady = record.timings.steady
            result = db.execute(
                """INSERT INTO profiles (device_id, ts, model, model_version, model_sha256,
                    device_class, trigger_kind, quantization, threads, mean_ms, p50_ms, p95_ms,
                    p99_ms, init_ms, first_inference_ms, peak_rss_mb, record_json)
                VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
                ON CONFLICT (device_id, ts, model_sha256) DO NOTHING""",
                (record.device_id, record.ts, record.model.name, record.model.version,
                 record.model.sha256, device_class, record.trigger, record.model.quantization,
                 record.run.threads, steady.mean_ms, steady.p50_ms, steady.p95_ms,
                 steady.p99_ms, record.timings.init_ms, record.timings.first_inference_ms,
                 record.memory.peak_rss_mb, (raw or record.to_json()).decode()),
            )
            if result.rowcount > 0 and keep_per_device is not None:
                _prune_profiles(db, record.device_id, keep_per_device)
            return result.rowcount > 0

    def profile_ids(self, model: str) -> list[int]:
        """The ids of every stored profile of ``model`` (a cache of parsed profiles keeps itself
        in step with these: new ids to read, pruned ones to drop)."""
        with self._transaction(write=False) as db:
            rows = db.execute("SELECT id FROM profiles WHERE model = ?", (model,)).rows
        return [int(row[0]) for row in rows]

    def profiles_by_id(self, ids: Collection[int]) -> dict[int, ProfileRow]:
        """The stored profiles with these ids (those still stored), by id."""
        return {int(r[0]): _profile_row(r)
                for r in self._rows_by_id(f"SELECT {_PROFILE_COLUMNS} FROM profiles", ids)}

    def _rows_by_id(self, select: str, ids: Collection[int]) -> list[Sequence[Any]]:
        """``select`` (whose table has an ``id`` column) for these ids, 500 to a query."""
        return self._rows_in(f"{select} WHERE", "id", ids)

    def _rows_in(self, select: str, column: str, values: Collection[Any], *,
                 params: Sequence[Any] = (), tail: str = "") -> list[Sequence[Any]]:
        """``{select} {column} IN (...) {tail}`` for these values, 500 to a query; ``select``
        ends where the condition goes (``... WHERE`` or ``... AND``), ``params`` are its own."""
        wanted = sorted(set(values))
        rows: list[Sequence[Any]] = []
        for start in range(0, len(wanted), 500):
            part = wanted[start:start + 500]
            with self._transaction(write=False) as db:
                rows += db.execute(f"{select} {column} IN ({', '.join('?' * len(part))}) {tail}",
                                   (*params, *part)).rows
        return rows

    def profiles(
        self,
        model: Optional[str] = None,
        version: Optional[int] = None,
        device_class: Optional[str] = None,
        *,
        device_id: Optional[str] = None,
        sha256: Optional[str] = None,
        since: Optional[float] = None,
    ) -> list[ProfileRow]:
        """Stored profiles matching every given filter, oldest first."""
        where: list[str] = []
        params: list[Any] = []
        for column, value in (("model", model), ("model_version", version),
                              ("device_class", device_class), ("device_id", device_id),
                              ("model_sha256", sha256)):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        if since is not None:
            where.append("ts >= ?")
            params.append(since)
        condition = " AND ".join(where) or "1 = 1"
        with self._transaction(write=False) as db:
            rows = db.execute(f"SELECT {_PROFILE_COLUMNS} FROM profiles WHERE {condition} "
                              "ORDER BY ts, id", params).rows
        return [_profile_row(r) for r in rows]

    # -- releases ----------------------------------------------------------------------------

    def add_release(
        self,
        release_id: str,
        name: str,
        version: int,
        envelope: bytes,
        files: Mapping[str, bytes],
        manifest_json: JsonText,
        *,
        created: Optional[float] = None,
    ) -> bool:
        """Store a signed release and its files; True if new.

        The release id is the manifest's hash, so a stored id already has these files; storing
        it again only replaces the envelope (e.g. one with more signatures) and returns False.
        Raises :class:`StoreConstraintError` when another release of the same model and version
        holds different files: a device that has one answers ``no_change`` to the other and
        keeps what it has, so the two could never be told apart in a rollout.
        """
        with self._transaction(write=True) as db:
            _refuse_same_version_other_files(db, release_id, name, version, files)
            result = db.execute(
                """INSERT INTO releases (release_id, name, version, envelope, manifest_json,
                                         created)
                VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (release_id) DO NOTHING""",
                (release_id, name, version, bytes(envelope), _json_text(manifest_json),
                 time.time() if created is None else created),
            )
            if result.rowcount == 0:
                db.execute("UPDATE releases SET envelope = ? WHERE release_id = ?",
                           (bytes(envelope), release_id))
                return False
            for path, data in sorted(files.items()):
                db.execute("INSERT INTO release_files (release_id, path, size, data) "
                           "VALUES (?, ?, ?, ?)", (release_id, path, len(data), bytes(data)))
            return True

    def get_release(self, release_id: str) -> Optional[StoredRelease]:
        """A release with its envelope and file contents, or None."""
        with self._transaction(write=False) as db:
            rows = db.execute(
                "SELECT release_id, name, version, created, manifest_json, envelope "
                "FROM releases WHERE release_id = ?", (release_id,)).rows
            if not rows:
                return None
            files = db.execute("SELECT path, data FROM release_files WHERE release_id = ? "
                               "ORDER BY path", (release_id,)).rows
        row = rows[0]
        contents = {str(path): bytes(data) for path, data in files}
        info = ReleaseInfo(
            release_id=str(row[0]), name=str(row[1]), version=int(row[2]), created=float(row[3]),
            manifest_json=str(row[4]), files={p: len(d) for p, d in contents.items()},
        )
        return StoredRelease(info=info, envelope=bytes(row[5]), files=contents)

    def list_releases(self, name: Optional[str] = None) -> list[ReleaseInfo]:
        """Stored releases (without bytes), by name and version."""
        condition, params = ("WHERE r.name = ?", [name]) if name is not None else ("", [])
        with self._transaction(write=False) as db:
            rows = db.execute(
                "SELECT release_id, name, version, created, manifest_json FROM releases r "
                f"{condition} ORDER BY name, version, release_id", params).rows
            sizes = db.execute(
                "SELECT f.release_id, f.path, f.size FROM release_files f JOIN releases r ON "
                f"r.release_id = f.release_id {condition} ORDER BY f.path", params).rows
        files: dict[str, dict[str, int]] = {}
        for release_id, path, size in sizes:
            files.setdefault(release_id, {})[str(path)] = int(size)
        return [
            ReleaseInfo(release_id=str(r[0]), name=str(r[1]), version=int(r[2]),
                        created=float(r[3]), manifest_json=str(r[4]), files=files.get(r[0], {}))
            for r in rows
        ]

    # -- OTA status --------------------------------------------------------------------------

    def add_ota_status(self, status: OtaStatus, *, received_at: Optional[float] = None,
                       keep_per_release: Optional[int] = None) -> bool:
        """Record an OTA status message received at ``received_at`` (default: now); False for a
        redelivered duplicate (QoS 1), which keeps the first receipt time.

        ``keep_per_release``: keep about that many statuses of the device's install of this
        release, the newest, and beyond them its newest final status (the outcome a rollout
        reads). Pruned like profiles: counted on the (release, device) index at each insert,
        deleted once the count exceeds the bound by a tenth. A pruned status that is delivered
        again is stored again (and pruned again).
        """
        payload = status.to_json()
        with self._transaction(write=True) as db:
            result = db.execute(
                """INSERT INTO ota_status (device_id, release_id, ts, model, version, phase,
                    is_final, outcome, reason, message_json, received, digest)
                VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (digest) DO NOTHING""",
                (status.device_id, status.release_id, status.ts, status.model, status.version,
                 status.phase, status.final, status.outcome, status.reason, payload.decode(),
                 time.time() if received_at is None else received_at,
                 hashlib.sha256(payload).hexdigest()),
            )
            if result.rowcount > 0 and keep_per_release is not None:
                _prune_ota_statuses(db, status.device_id, status.release_id, keep_per_release)
            return result.rowcount > 0

    def latest_ota_status(self, device_id: str, release_id: str) -> Optional[OtaStatus]:
        """The newest status of one device's install of a release (a final one wins a tie)."""
        records = self.ota_records(device_id=device_id, release_id=release_id)
        return records[-1].status if records else None

    def latest_ota_statuses(self, release_id: str) -> dict[str, OtaStatus]:
        """Per device, the newest status of its install of ``release_id``."""
        return {d: r.status for d, r in self.latest_ota_records(release_id).items()}

    def latest_ota_records(self, release_id: str) -> dict[str, OtaRecord]:
        """Per device, the newest status of its install of ``release_id`` with its receipt
        time."""
        return {r.status.device_id: r for r in self.ota_records(release_id=release_id)}

    def ota_history(self, *, device_id: Optional[str] = None,
                    release_id: Optional[str] = None) -> list[OtaStatus]:
        """OTA status messages, oldest first (by ts; at equal ts non-final before final)."""
        return [r.status for r in self.ota_records(device_id=device_id, release_id=release_id)]

    def ota_records(self, *, device_id: Optional[str] = None,
                    release_id: Optional[str] = None) -> list[OtaRecord]:
        """Like :meth:`ota_history`, with each message's receipt time."""
        where: list[str] = []
        params: list[Any] = []
        for column, value in (("device_id", device_id), ("release_id", release_id)):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        condition = " AND ".join(where) or "1 = 1"
        with self._transaction(write=False) as db:
            rows = db.execute(f"SELECT message_json, received FROM ota_status WHERE {condition} "
                              "ORDER BY ts, is_final, id", params).rows
        return [OtaRecord(OtaStatus.from_json(str(row[0]).encode()), float(row[1]))
                for row in rows]

    def ota_outcome_ids(self, release_id: str) -> list[int]:
        """The ids of the final statuses (outcomes) of a release's installs: what a rollout
        step needs of them, without the progress statuses that outnumber them."""
        with self._transaction(write=False) as db:
            rows = db.execute("SELECT id FROM ota_status WHERE release_id = ? AND is_final = 1",
                              (release_id,)).rows
        return [int(row[0]) for row in rows]

    def ota_records_by_id(self, ids: Collection[int]) -> dict[int, OtaRecord]:
        """The stored OTA statuses with these ids (those still stored), by id."""
        rows = self._rows_by_id("SELECT id, message_json, received FROM ota_status", ids)
        return {int(row[0]): OtaRecord(OtaStatus.from_json(str(row[1]).encode()), float(row[2]))
                for row in rows}

    def ota_heard_latest(self, release_id: str) -> Optional[float]:
        """When the fleet last received any status of the release (None: never); one index
        lookup, however many statuses the release has."""
        with self._transaction(write=False) as db:
            rows = db.execute("SELECT MAX(received) FROM ota_status WHERE release_id = ?",
                              (release_id,)).rows
        return None if not rows or rows[0][0] is None else float(rows[0][0])

    def ota_last_heard(self, release_id: str,
                       device_ids: Optional[Collection[str]] = None) -> dict[str, float]:
        """Per device (of ``device_ids``, or every device), when the fleet last received any
        status of its install of a release."""
        select = "SELECT device_id, MAX(received) FROM ota_status WHERE release_id = ?"
        rows: Sequence[Sequence[Any]]
        if device_ids is None:
            with self._transaction(write=False) as db:
                rows = db.execute(f"{select} GROUP BY device_id", (release_id,)).rows
        else:
            rows = self._rows_in(f"{select} AND", "device_id", device_ids,
                                 params=(release_id,), tail="GROUP BY device_id")
        return {str(row[0]): float(row[1]) for row in rows}

    # -- reports refused from their sender ----------------------------------------------------

    def record_refusal(self, device_id: str, kind: str, reason: str, message: str, *,
                       now: Optional[float] = None) -> None:
        """Count one report of ``kind`` refused from ``device_id`` (the sender) for ``reason``."""
        ts = time.time() if now is None else now
        self.record_refusals([RefusedReports(device_id, kind, reason, 1, ts, ts, message)])

    def record_refusals(self, batch: Sequence[RefusalCountLike]) -> None:
        """Add counts of refused reports, in one transaction: the controller counts refusals in
        memory and writes them once per tick (fleet/ingest_limits.py ``RefusalTally``), so a
        flood of refused messages is not a store write each."""
        if not batch:
            return
        with self._transaction(write=True) as db:
            for c in batch:
                db.execute(
                    """INSERT INTO refused_reports (device_id, kind, reason, count, first_at,
                        last_at, last_message) VALUES (?, ?, ?, ?, ?, ?, ?)
                    ON CONFLICT (device_id, kind, reason) DO UPDATE SET
                        count = refused_reports.count + excluded.count,
                        first_at = CASE WHEN excluded.first_at < refused_reports.first_at
                                        THEN excluded.first_at ELSE refused_reports.first_at END,
                        last_message = CASE WHEN excluded.last_at >= refused_reports.last_at
                                            THEN excluded.last_message
                                            ELSE refused_reports.last_message END,
                        last_at = CASE WHEN excluded.last_at > refused_reports.last_at
                                       THEN excluded.last_at ELSE refused_reports.last_at END""",
                    (c.device_id, c.kind, c.reason, c.count, c.first_at, c.last_at,
                     c.last_message[:500]))

    def refusals(self, device_id: Optional[str] = None) -> list[RefusedReports]:
        """Refused reports counted per sender, kind and reason (of one sender, or all)."""
        condition, params = ("WHERE device_id = ?", [device_id]) if device_id else ("", [])
        with self._transaction(write=False) as db:
            rows = db.execute(
                "SELECT device_id, kind, reason, count, first_at, last_at, last_message "
                f"FROM refused_reports {condition} ORDER BY device_id, kind, reason",
                params).rows
        return [RefusedReports(str(r[0]), str(r[1]), str(r[2]), int(r[3]), float(r[4]),
                               float(r[5]), str(r[6])) for r in rows]

    def releases_sent_to(self, device_id: str) -> list[SentRelease]:
        """The releases that rollouts sent (or decided to send) to ``device_id``."""
        with self._transaction(write=False) as db:
            rows = db.execute(
                """SELECT DISTINCT r.release_id, r.name, r.version FROM rollout_devices d
                JOIN rollouts o ON o.rollout_id = d.rollout_id
                JOIN releases r ON r.release_id = o.release_id
                WHERE d.device_id = ? ORDER BY r.release_id""", (device_id,)).rows
        return [SentRelease(str(r[0]), str(r[1]), int(r[2])) for r in rows]

    # -- commands to devices and device events ----------------------------------------------

    def queue_command(self, device_id: str, command: str, args: Mapping[str, Any], *,
                      timeout_s: float, origin: str = "", sent: Optional[float] = None,
                      now: Optional[float] = None) -> str:
        """Record a command for ``device_id`` and return its id. With ``sent`` it was already
        published (a controller's own command); otherwise a controller publishes it at its next
        tick, unless ``timeout_s`` passes first."""
        created = time.time() if now is None else now
        command_id = uuid.uuid4().hex[:16]
        with self._transaction(write=True) as db:
            db.execute(
                """INSERT INTO device_commands (command_id, device_id, command, args_json, origin,
                    created, expires, sent) VALUES (?, ?, ?, ?, ?, ?, ?, ?)""",
                (command_id, device_id, command, _dump(args), origin[:200], created,
                 created + timeout_s, sent))
            _prune_per_device(db, "device_commands", "created", device_id,
                              _COMMANDS_PER_DEVICE)
        return command_id

    def commands_to_send(self, now: float, limit: int = 500) -> list[CommandRecord]:
        """Commands no controller has published yet and whose time has not run out, oldest
        first."""
        with self._transaction(write=False) as db:
            rows = db.execute(
                f"SELECT {_COMMAND_COLUMNS} FROM device_commands WHERE sent IS NULL "
                "AND expires > ? ORDER BY created LIMIT ?", (now, limit)).rows
        return [_command(r) for r in rows]

    def mark_command_sent(self, command_id: str, now: float) -> bool:
        """Claim a queued command for publishing; False if another controller has (so each
        command is published once however many controllers share the store)."""
        with self._transaction(write=True) as db:
            result = db.execute("UPDATE device_commands SET sent = ? WHERE command_id = ? "
                                "AND sent IS NULL", (now, command_id))
            return result.rowcount > 0

    def record_command_response(self, device_id: str, response: CommandResponse, *,
                                received_at: float) -> bool:
        """Store ``device_id``'s answer to a command sent to it; False (nothing stored) when no
        command of that id was sent to that device, or it was answered already: a device
        answers only its own commands, once."""
        with self._transaction(write=True) as db:
            result = db.execute(
                """UPDATE device_commands SET answered = ?, ok = ?, result_json = ?,
                    error_code = ?, error = ?
                WHERE command_id = ? AND device_id = ? AND answered IS NULL""",
                (received_at, response.ok, _dump(response.result) if response.ok else None,
                 response.error_code, response.error[:2000], response.id, device_id))
            return result.rowcount > 0

    def get_commands(self, command_ids: Sequence[str]) -> list[CommandRecord]:
        """The commands of these ids that are stored, in the order given."""
        if not command_ids:
            return []
        marks = ", ".join("?" for _ in command_ids)
        with self._transaction(write=False) as db:
            rows = db.execute(f"SELECT {_COMMAND_COLUMNS} FROM device_commands "
                              f"WHERE command_id IN ({marks})", tuple(command_ids)).rows
        found = {str(r[0]): _command(r) for r in rows}
        return [found[i] for i in command_ids if i in found]

    def refused_commands(self, origins: Collection[str]) -> list[CommandRecord]:
        """Commands sent with one of ``origins`` (e.g. ``rollout r-1``) that their device
        answered with an error, oldest answer first."""
        if not origins:
            return []
        marks = ", ".join("?" for _ in origins)
        with self._transaction(write=False) as db:
            rows = db.execute(f"SELECT {_COMMAND_COLUMNS} FROM device_commands WHERE origin IN "
                              f"({marks}) AND answered IS NOT NULL AND ok = 0 ORDER BY answered",
                              tuple(sorted(origins))).rows
        return [_command(r) for r in rows]

    def command_history(self, device_id: str, limit: int = 50) -> list[CommandRecord]:
        """The newest ``limit`` commands to ``device_id``, newest first."""
        with self._transaction(write=False) as db:
            rows = db.execute(f"SELECT {_COMMAND_COLUMNS} FROM device_commands WHERE "
                              "device_id = ? ORDER BY created DESC LIMIT ?",
                              (device_id, limit)).rows
        return [_command(r) for r in rows]

    def add_event(self, event: Event, *, received_at: float,
                  keep_per_device: Optional[int] = None) -> int:
        """Store a device's event; returns its id. ``keep_per_device``: keep about that many
        of the device's events, the newest (pruned once the bound is passed by a tenth)."""
        with self._transaction(write=True) as db:
            rows = db.execute(
                """INSERT INTO device_events (device_id, ts, received, kind, message, detail_json)
                VALUES (?, ?, ?, ?, ?, ?) RETURNING id""",
                (event.device_id, event.ts, received_at, event.kind, event.message[:2000],
                 _dump(event.detail))).rows
            new_id = int(rows[0][0])
            if keep_per_device is not None:
                _prune_per_device(db, "device_events", "id", event.device_id, keep_per_device)
            return new_id

    def events(self, *, device_ids: Optional[Collection[str]] = None,
               since: Optional[float] = None, after_id: int = 0,
               limit: int = 100) -> list[EventRecord]:
        """Stored device events, oldest first: of ``device_ids`` (default all), received at or
        after ``since``, with an id above ``after_id`` (to follow new ones); the newest
        ``limit`` of those."""
        conditions: list[str] = ["id > ?"]
        params: list[Any] = [after_id]
        if device_ids is not None:
            if not device_ids:
                return []
            conditions.append(f"device_id IN ({', '.join('?' for _ in device_ids)})")
            params.extend(sorted(device_ids))
        if since is not None:
            conditions.append("received >= ?")
            params.append(since)
        with self._transaction(write=False) as db:
            rows = db.execute(
                "SELECT id, device_id, ts, received, kind, message, detail_json "
                f"FROM device_events WHERE {' AND '.join(conditions)} "
                "ORDER BY id DESC LIMIT ?", (*params, limit)).rows
        return [EventRecord(int(r[0]), str(r[1]), float(r[2]), float(r[3]), str(r[4]),
                            str(r[5]), _load_object(r[6])) for r in reversed(rows)]

    # -- shadow reports ----------------------------------------------------------------------

    def add_shadow_report(self, report: ShadowReport, *, received_at: float,
                          keep_per_device: Optional[int] = 50) -> int:
        """Store a device's ``fleetlite.shadow_report/1``; returns its id. Counts in a report
        are cumulative, so only the newest matter: ``keep_per_device`` keeps about that many of
        the device's reports of this release (pruned once the bound is passed by a tenth).
        Inside :meth:`batch`, many reports share one transaction."""
        with self._transaction(write=True) as db:
            rows = db.execute(
                """INSERT INTO shadow_reports (device_id, release_id, model, version, ts,
                    received, report_json) VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING id""",
                (report.device_id, report.release_id, report.model, report.version, report.ts,
                 received_at, report.to_json().decode())).rows
            if keep_per_device is not None:
                _prune_per_device(db, "shadow_reports", "id", report.device_id, keep_per_device,
                                  release_id=report.release_id)
            return int(rows[0][0])

    def add_shadow_reports(self, reports: Iterable[tuple[ShadowReport, float]]) -> int:
        """Store ``(report, received_at)`` pairs in one transaction; returns how many."""
        stored = 0
        with self.batch():
            for report, received_at in reports:
                self.add_shadow_report(report, received_at=received_at)
                stored += 1
        return stored

    def shadow_reports(self, release_id: str, *, newest_per_device: bool = True
                       ) -> list[tuple[ShadowReport, float]]:
        """``(report, received)`` of a release's shadow reports, by device then arrival: the
        newest per device only (what the shadow gate reads), or all that are kept."""
        with self._transaction(write=False) as db:
            rows = db.execute(
                "SELECT device_id, report_json, received FROM shadow_reports "
                "WHERE release_id = ? ORDER BY device_id, id", (release_id,)).rows
        found: list[tuple[ShadowReport, float]] = []
        for row in rows:
            item = (ShadowReport.from_json(str(row[1]).encode()), float(row[2]))
            if newest_per_device and found and found[-1][0].device_id == str(row[0]):
                found[-1] = item
            else:
                found.append(item)
        return found

    # -- rollouts ----------------------------------------------------------------------------

    def create_rollout(
        self,
        rollout_id: str,
        release_id: str,
        spec: JsonText,
        *,
        state: Optional[JsonText] = None,
        now: Optional[float] = None,
    ) -> RolloutRecord:
        """Create a rollout of a stored release at revision 0.

        Raises :class:`RecordNotFoundError` if the release is not stored and
        :class:`StoreConstraintError` if the rollout id is taken.
        """
        ts = time.time() if now is None else now
        spec_text = _json_text(spec)
        state_text, devices = _split_state({} if state is None else state)
        with self._transaction(write=True) as db:
            if not db.execute("SELECT 1 FROM releases WHERE release_id = ?", (release_id,)).rows:
                raise RecordNotFoundError(f"release {release_id!r} is not in the store "
                                          f"{self.url}: add it with add_release() first")
            result = db.execute(
                """INSERT INTO rollouts (rollout_id, release_id, spec_json, state_json, revision,
                                         created, updated)
                VALUES (?, ?, ?, ?, 0, ?, ?) ON CONFLICT (rollout_id) DO NOTHING""",
                (rollout_id, release_id, spec_text, state_text, ts, ts),
            )
            if result.rowcount == 0:
                raise StoreConstraintError(f"a rollout {rollout_id!r} already exists: choose "
                                           "another id, or resume that rollout")
            if devices is not None:
                _replace_progress(db, rollout_id, devices, ts)
        state_doc = _load_object(state_text)
        state_doc["devices"] = {} if devices is None else _progress_docs(devices, ts)
        return RolloutRecord(rollout_id, release_id, _load_object(spec_text), state_doc, 0, ts,
                             ts)

    def get_rollout(self, rollout_id: str, *, devices: bool = True) -> Optional[RolloutRecord]:
        """One rollout, or None; ``devices=False`` leaves out the state's per-device map (one
        row per device: the bulk of a large rollout)."""
        with self._transaction(write=False) as db:
            rows = db.execute(f"{_SELECT_ROLLOUT} WHERE rollout_id = ?", (rollout_id,)).rows
            if not rows:
                return None
            return _rollout(rows[0], _read_progress(db, [rollout_id]) if devices else None)

    def rollout_revisions(self) -> list[tuple[str, int]]:
        """Every rollout's id and revision, oldest first: what a controller's tick reads to
        find the rollouts that changed, without their (possibly large) state."""
        with self._transaction(write=False) as db:
            rows = db.execute("SELECT rollout_id, revision FROM rollouts "
                              "ORDER BY created, rollout_id").rows
        return [(str(row[0]), int(row[1])) for row in rows]

    def list_rollouts(self, release_id: Optional[str] = None, *,
                      devices: bool = True) -> list[RolloutRecord]:
        """Rollouts (of one release, if given), oldest first; ``devices=False``: without the
        states' per-device maps."""
        condition, params = (("WHERE release_id = ?", [release_id]) if release_id is not None
                             else ("", []))
        with self._transaction(write=False) as db:
            rows = db.execute(f"{_SELECT_ROLLOUT} {condition} ORDER BY created, rollout_id",
                              params).rows
            progress = _read_progress(db, [str(row[0]) for row in rows]) if devices else None
        return [_rollout(row, progress) for row in rows]

    def update_rollout_state(self, rollout_id: str, expected_revision: int,
                             new_state: JsonText, *, now: Optional[float] = None) -> bool:
        """Replace the state if the revision is still ``expected_revision`` (then bump it).

        A state with a ``devices`` map replaces the rollout's per-device rows; one without
        leaves them as they are. False when another writer changed the rollout since it was
        read: re-read and decide again. Raises :class:`RecordNotFoundError` for an unknown
        rollout.
        """
        ts = time.time() if now is None else now
        state_text, devices = _split_state(new_state)
        with self._transaction(write=True) as db:
            result = db.execute(
                "UPDATE rollouts SET state_json = ?, revision = revision + 1, updated = ? "
                "WHERE rollout_id = ? AND revision = ?",
                (state_text, ts, rollout_id, expected_revision))
            if result.rowcount == 0:
                self._require_rollout(db, rollout_id)
            elif devices is not None:
                _replace_progress(db, rollout_id, devices, ts)
            return result.rowcount > 0

    @contextlib.contextmanager
    def rollout_lock(self, rollout_id: str) -> Iterator[RolloutTransaction]:
        """Lock one rollout for a read-decide-write step; everything done through the yielded
        transaction commits together when the block ends, or not at all if it raises.

        Other writers of the same rollout wait (PostgreSQL: its row is locked; SQLite: the whole
        database, so keep the block short). If anything was written, ``revision`` grows by one
        at commit. The locked record is read without the state's per-device map (see
        :meth:`get_rollout`). Raises :class:`RecordNotFoundError` for an unknown rollout.
        """
        if getattr(self._local, "db", None) is not None:
            raise StoreError("rollout_lock() cannot run inside another store transaction of the "
                             "same thread: finish that one first")
        with self._transaction(write=True) as db:
            lock = " FOR NO KEY UPDATE" if db.dialect == "postgresql" else ""
            rows = db.execute(f"{_SELECT_ROLLOUT} WHERE rollout_id = ?{lock}", (rollout_id,)).rows
            if not rows:
                raise RecordNotFoundError(f"no rollout {rollout_id!r} in the store {self.url}: "
                                          "list them with list_rollouts()")
            txn = RolloutTransaction(db, _rollout(rows[0]))
            yield txn
            txn._finish()

    def apply_decisions(
        self,
        rollout_id: str,
        expected_revision: int,
        decisions: Sequence[DecisionLike],
        *,
        progress: Sequence[ProgressLike] = (),
        new_state: Optional[JsonText] = None,
        now: Optional[float] = None,
    ) -> bool:
        """Apply one batch of decisions exactly once.

        Under :meth:`rollout_lock`: if the rollout's revision is still ``expected_revision`` (the
        revision the batch was computed from), record the decisions, the progress updates and
        the new state, bump the revision and return True; otherwise change nothing and return
        False (another controller applied a batch first: re-read and decide again). Every
        decision is recorded with ts ``now`` (default: the current time). Give the devices
        that changed as ``progress`` and ``new_state`` without its ``devices`` map: a map
        there replaces every device's row.
        """
        with self.rollout_lock(rollout_id) as txn:
            if txn.rollout.revision != expected_revision:
                return False
            for decision in decisions:
                txn.add_decision(decision.kind, reason=decision.reason,
                                 device_id=decision.device_id, wave=decision.wave,
                                 device_class=decision.device_class, detail=decision.detail,
                                 ts=now)
            for update in progress:
                txn.set_device_progress(update.device_id, wave=update.wave, status=update.status,
                                        reason=update.reason, code=update.code,
                                        device_class=update.device_class, sent_at=update.sent_at,
                                        now=now)
            if new_state is not None:
                txn.set_state(new_state)
            txn.touch(now)
        return True

    def set_device_progress(self, rollout_id: str, device_id: str, *, wave: int, status: str,
                            reason: str = "", code: str = "", device_class: str = "",
                            sent_at: Optional[float] = None, now: Optional[float] = None) -> None:
        """Insert or update one device's progress (``sent_at=None`` keeps the stored one).

        Does not change the rollout's revision; use :meth:`rollout_lock` or
        :meth:`apply_decisions` when other controllers may decide on the same rollout.
        """
        with self._transaction(write=True) as db:
            _set_progress(db, rollout_id, device_id, wave, status, reason, code, device_class,
                          sent_at, now)

    def device_progress(self, rollout_id: str, *,
                        wave: Optional[int] = None) -> list[ProgressRow]:
        """Per-device progress of a rollout, by wave and device id."""
        condition = "rollout_id = ?"
        params: list[Any] = [rollout_id]
        if wave is not None:
            condition += " AND wave = ?"
            params.append(wave)
        with self._transaction(write=False) as db:
            rows = db.execute(
                "SELECT rollout_id, device_id, device_class, wave, status, reason, code, sent_at, "
                f"updated FROM rollout_devices WHERE {condition} ORDER BY wave, device_id",
                params).rows
        return [
            ProgressRow(rollout_id=str(r[0]), device_id=str(r[1]), device_class=str(r[2]),
                        wave=int(r[3]), status=str(r[4]), reason=str(r[5]), code=str(r[6]),
                        sent_at=None if r[7] is None else float(r[7]), updated=float(r[8]))
            for r in rows
        ]

    def add_decision(self, rollout_id: str, kind: str, device_id: Optional[str] = None,
                     wave: Optional[int] = None, reason: str = "",
                     detail: Optional[Mapping[str, Any]] = None, ts: Optional[float] = None,
                     *, device_class: Optional[str] = None) -> None:
        """Append one decision to a rollout's log, at the rollout's current revision.

        Does not change the revision; see :meth:`apply_decisions` for controllers that share a
        rollout.
        """
        with self._transaction(write=True) as db:
            result = db.execute(
                """INSERT INTO rollout_decisions (rollout_id, revision, kind, reason, device_id,
                                                  wave, device_class, detail_json, ts)
                SELECT rollout_id, revision, ?, ?, ?, ?, ?, ?, ? FROM rollouts
                WHERE rollout_id = ?""",
                (kind, reason, device_id, wave, device_class, _dump(detail or {}),
                 time.time() if ts is None else ts, rollout_id))
            if result.rowcount == 0:
                self._require_rollout(db, rollout_id)

    def decisions(self, rollout_id: str, *, after: int = 0) -> list[DecisionRow]:
        """A rollout's decision log, in the order recorded; ``after``: only the decisions
        recorded after the one with that id (:meth:`last_decision_id`)."""
        with self._transaction(write=False) as db:
            rows = db.execute(
                "SELECT id, rollout_id, revision, kind, reason, device_id, wave, device_class, "
                "detail_json, ts FROM rollout_decisions WHERE rollout_id = ? AND id > ? "
                "ORDER BY id", (rollout_id, after)).rows
        return [
            DecisionRow(id=int(r[0]), rollout_id=str(r[1]), revision=int(r[2]), kind=str(r[3]),
                        reason=str(r[4]), device_id=None if r[5] is None else str(r[5]),
                        wave=None if r[6] is None else int(r[6]),
                        device_class=None if r[7] is None else str(r[7]),
                        detail=_load_object(r[8]), ts=float(r[9]))
            for r in rows
        ]

    def last_decision_id(self, rollout_id: str) -> int:
        """The id of a rollout's latest decision (0 when it has none): a decision recorded
        later has a greater id."""
        with self._transaction(write=False) as db:
            rows = db.execute("SELECT MAX(id) FROM rollout_decisions WHERE rollout_id = ?",
                              (rollout_id,)).rows
        return int(rows[0][0]) if rows and rows[0][0] is not None else 0

    def _require_rollout(self, db: _Db, rollout_id: str) -> None:
        if not db.execute("SELECT 1 FROM rollouts WHERE rollout_id = ?", (rollout_id,)).rows:
            raise RecordNotFoundError(f"no rollout {rollout_id!r} in the store {self.url}: "
                                      "list them with list_rollouts()")

    # -- leases ------------------------------------------------------------------------------

    def claim(self, name: str, owner: str, ttl_s: float) -> bool:
        """Take or renew the lease ``name`` for ``ttl_s`` seconds; False if another owner holds
        it. Renew well within the ttl; a controller that stops renewing loses it on expiry.
        Times are the database's clock (PostgreSQL: the server's), not the callers'."""
        if not ttl_s > 0:
            raise ValueError(f"ttl_s must be > 0, got {ttl_s}")
        now = _NOW_SQL[self.dialect]
        with self._transaction(write=True) as db:
            result = db.execute(
                f"""INSERT INTO leases (name, owner, acquired, expires)
                VALUES (?, ?, {now}, {now} + ?)
                ON CONFLICT (name) DO UPDATE SET
                    owner = excluded.owner,
                    expires = excluded.expires,
                    acquired = CASE WHEN leases.owner = excluded.owner
                                         AND leases.expires > excluded.acquired
                                    THEN leases.acquired ELSE excluded.acquired END
                WHERE leases.owner = excluded.owner OR leases.expires <= excluded.acquired""",
                (name, owner, float(ttl_s)))
            return result.rowcount > 0

    def release_lease(self, name: str, owner: str) -> bool:
        """Give up a lease held by ``owner``; False if it does not hold it."""
        with self._transaction(write=True) as db:
            result = db.execute("DELETE FROM leases WHERE name = ? AND owner = ?", (name, owner))
            return result.rowcount > 0

    def get_lease(self, name: str) -> Optional[Lease]:
        """The lease ``name`` (possibly expired: see ``active``), or None."""
        now = _NOW_SQL[self.dialect]
        with self._transaction(write=False) as db:
            rows = db.execute(f"SELECT name, owner, acquired, expires, expires > {now} "
                              "FROM leases WHERE name = ?", (name,)).rows
        if not rows:
            return None
        r = rows[0]
        return Lease(str(r[0]), str(r[1]), float(r[2]), float(r[3]), bool(r[4]))


class RolloutTransaction:
    """The writes of one :meth:`Store.rollout_lock` block; ``rollout`` is the locked rollout
    as it was when the lock was taken."""

    def __init__(self, db: _Db, rollout: RolloutRecord) -> None:
        self._db = db
        self.rollout = rollout
        self._new_state: Optional[str] = None
        self._new_devices: Optional[Mapping[str, Any]] = None
        self._dirty = False
        self._now: Optional[float] = None

    def add_decision(self, kind: str, *, reason: str = "", device_id: Optional[str] = None,
                     wave: Optional[int] = None, device_class: Optional[str] = None,
                     detail: Optional[Mapping[str, Any]] = None,
                     ts: Optional[float] = None) -> None:
        """Append a decision, recorded at the revision the lock read."""
        self._db.execute(
            """INSERT INTO rollout_decisions (rollout_id, revision, kind, reason, device_id, wave,
                                              device_class, detail_json, ts)
            VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)""",
            (self.rollout.rollout_id, self.rollout.revision, kind, reason, device_id, wave,
             device_class, _dump(detail or {}), time.time() if ts is None else ts))
        self._dirty = True

    def set_device_progress(self, device_id: str, *, wave: int, status: str, reason: str = "",
                            code: str = "", device_class: str = "",
                            sent_at: Optional[float] = None, now: Optional[float] = None) -> None:
        """Insert or update one device's progress (``sent_at=None`` keeps the stored one)."""
        _set_progress(self._db, self.rollout.rollout_id, device_id, wave, status, reason, code,
                      device_class, sent_at, now)
        self._dirty = True

    def set_state(self, new_state: JsonText) -> None:
        """Replace the rollout's state document (written at commit); with a ``devices`` map,
        the per-device rows too (without one, they stay as they are)."""
        self._new_state, self._new_devices = _split_state(new_state)
        self._dirty = True

    def touch(self, now: Optional[float] = None) -> None:
        """Mark the rollout changed, so its revision grows at commit even if nothing else was
        written."""
        self._dirty = True
        self._now = now

    def _finish(self) -> None:
        if not self._dirty:
            return
        updated = time.time() if self._now is None else self._now
        if self._new_state is None:
            self._db.execute("UPDATE rollouts SET revision = revision + 1, updated = ? "
                             "WHERE rollout_id = ?", (updated, self.rollout.rollout_id))
        else:
            self._db.execute("UPDATE rollouts SET state_json = ?, revision = revision + 1, "
                             "updated = ? WHERE rollout_id = ?",
                             (self._new_state, updated, self.rollout.rollout_id))
        if self._new_devices is not None:
            _replace_progress(self._db, self.rollout.rollout_id, self._new_devices, updated)


# -- helpers -----------------------------------------------------------------------------------

_SELECT_ROLLOUT = ("SELECT rollout_id, release_id, spec_json, state_json, revision, created, "
                   "updated FROM rollouts")


def _refuse_same_version_other_files(db: _Db, release_id: str, name: str, version: int,
                                     files: Mapping[str, bytes]) -> None:
    digests = {path: hashlib.sha256(data).hexdigest() for path, data in files.items()}
    others = db.execute("SELECT release_id FROM releases WHERE name = ? AND version = ? AND "
                        "release_id <> ?", (name, version, release_id)).rows
    for (other,) in others:
        stored = {str(path): hashlib.sha256(bytes(data)).hexdigest() for path, data in db.execute(
            "SELECT path, data FROM release_files WHERE release_id = ?", (other,)).rows}
        if stored != digests:
            raise StoreConstraintError(
                f"{name} v{version} is already stored as release {str(other)[:12]} with other "
                "files; devices that have one would keep it and answer no_change to the other. "
                f"Build this one as a new version (--version {version + 1} or higher)")


def _rollout(row: _Row,
             progress: Optional[Mapping[str, dict[str, dict[str, Any]]]] = None) -> RolloutRecord:
    state = _load_object(row[3])
    # a document written before the per-device rows were authoritative may still hold a copy
    state.pop("devices", None)
    if progress is not None:
        state["devices"] = progress.get(str(row[0]), {})
    return RolloutRecord(rollout_id=str(row[0]), release_id=str(row[1]),
                         spec=_load_object(row[2]), state=state,
                         revision=int(row[4]), created=float(row[5]), updated=float(row[6]))


_PROGRESS_FIELDS = ("device_class", "wave", "status", "reason", "code", "sent_at", "updated_at")


def _split_state(state: JsonText) -> tuple[str, Optional[Mapping[str, Any]]]:
    """A state document's text without its ``devices`` map, and that map (None: absent)."""
    doc = _load_object(_json_text(state)) if not isinstance(state, Mapping) else dict(state)
    devices = doc.pop("devices", None)
    if devices is not None and not isinstance(devices, Mapping):
        raise StoreError(f"a rollout state's devices must be an object, got "
                         f"{type(devices).__name__}")
    return _dump(doc), devices


def _progress_docs(devices: Mapping[str, Any], now: float) -> dict[str, dict[str, Any]]:
    """The ``devices`` map as :func:`_read_progress` would read it back."""
    return {str(device_id): {"device_id": str(device_id),
                             **{k: entry.get(k) for k in _PROGRESS_FIELDS},
                             "updated_at": entry.get("updated_at") or now}
            for device_id, entry in devices.items()}


def _replace_progress(db: _Db, rollout_id: str, devices: Mapping[str, Any], now: float) -> None:
    """Make a rollout's per-device rows exactly ``devices`` (a state document's map)."""
    db.execute("DELETE FROM rollout_devices WHERE rollout_id = ?", (rollout_id,))
    for device_id, entry in sorted(_progress_docs(devices, now).items()):
        try:
            _set_progress(db, rollout_id, device_id, int(entry["wave"]), str(entry["status"]),
                          str(entry["reason"] or ""), str(entry["code"] or ""),
                          str(entry["device_class"] or ""),
                          None if entry["sent_at"] is None else float(entry["sent_at"]),
                          float(entry["updated_at"]))
        except (TypeError, ValueError) as exc:
            raise StoreError(f"rollout {rollout_id}: device {device_id}'s progress is malformed "
                             f"({exc})") from exc


def _read_progress(db: _Db, rollout_ids: Sequence[str]) -> dict[str, dict[str, dict[str, Any]]]:
    """The per-device maps of these rollouts, by rollout id then device id."""
    found: dict[str, dict[str, dict[str, Any]]] = {rollout_id: {} for rollout_id in rollout_ids}
    for start in range(0, len(rollout_ids), 500):
        ids = rollout_ids[start:start + 500]
        rows = db.execute(
            "SELECT rollout_id, device_id, device_class, wave, status, reason, code, sent_at, "
            f"updated FROM rollout_devices WHERE rollout_id IN ({', '.join('?' * len(ids))}) "
            "ORDER BY rollout_id, device_id", ids).rows
        for r in rows:
            found[str(r[0])][str(r[1])] = {
                "device_id": str(r[1]), "device_class": str(r[2]), "wave": int(r[3]),
                "status": str(r[4]), "reason": str(r[5]), "code": str(r[6]),
                "sent_at": None if r[7] is None else float(r[7]), "updated_at": float(r[8])}
    return found


def _set_progress(db: _Db, rollout_id: str, device_id: str, wave: int, status: str,
                  reason: str, code: str, device_class: str, sent_at: Optional[float],
                  now: Optional[float]) -> None:
    db.execute(
        """INSERT INTO rollout_devices (rollout_id, device_id, device_class, wave, status,
                                        reason, code, sent_at, updated)
        VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
        ON CONFLICT (rollout_id, device_id) DO UPDATE SET
            device_class = excluded.device_class,
            wave = excluded.wave,
            status = excluded.status,
            reason = excluded.reason,
            code = excluded.code,
            sent_at = COALESCE(excluded.sent_at, rollout_devices.sent_at),
            updated = excluded.updated""",
        (rollout_id, device_id, device_class, wave, status, reason, code, sent_at,
         time.time() if now is None else now))


def _slack(keep: int) -> int:
    """How far a bounded set may grow past its bound before it is pruned back to it."""
    return max(1, keep // 10)


def _delete_ids(db: _Db, table: str, ids: Sequence[int]) -> None:
    for start in range(0, len(ids), 500):
        chunk = ids[start:start + 500]
        db.execute(f"DELETE FROM {table} WHERE id IN ({', '.join('?' * len(chunk))})", chunk)


def _rollout_versions(db: _Db) -> set[tuple[str, Optional[int]]]:
    """(model, version) of every rollout's new and previous version: the profiles its gates
    compare."""
    pairs: set[tuple[str, Optional[int]]] = set()
    for (text,) in db.execute("SELECT spec_json FROM rollouts").rows:
        try:
            spec = json.loads(str(text))
        except ValueError:
            continue
        model = spec.get("model") if isinstance(spec, dict) else None
        if not isinstance(model, str):
            continue
        for key in ("version", "previous_version"):
            version = spec.get(key)
            if isinstance(version, int) and not isinstance(version, bool):
                pairs.add((model, version))
    return pairs


def _prune_profiles(db: _Db, device_id: str, keep: int) -> None:
    """Keep the device's newest ``keep`` profiles and the newest of each model version a
    rollout names, once the device has more than ``keep`` plus a tenth."""
    count = int(db.execute("SELECT count(*) FROM profiles WHERE device_id = ?",
                           (device_id,)).rows[0][0])
    if count <= keep + _slack(keep):
        return
    rows = db.execute("SELECT id, model, model_version FROM profiles WHERE device_id = ? "
                      "ORDER BY ts DESC, id DESC", (device_id,)).rows
    protected = _rollout_versions(db)
    kept = {int(row[0]) for row in rows[:keep]}
    seen: set[tuple[str, Optional[int]]] = set()
    for row_id, model, version in rows:
        pair = (str(model), None if version is None else int(version))
        if pair in protected and pair not in seen:
            seen.add(pair)
            kept.add(int(row_id))
    _delete_ids(db, "profiles", [int(row[0]) for row in rows if int(row[0]) not in kept])


def _prune_ota_statuses(db: _Db, device_id: str, release_id: str, keep: int) -> None:
    """Keep the newest ``keep`` statuses of one device's install of a release and its newest
    final status, once there are more than ``keep`` plus a tenth."""
    where = "release_id = ? AND device_id = ?"
    params = (release_id, device_id)
    count = int(db.execute(f"SELECT count(*) FROM ota_status WHERE {where}", params).rows[0][0])
    if count <= keep + _slack(keep):
        return
    rows = db.execute(f"SELECT id, is_final, received FROM ota_status WHERE {where} "
                      "ORDER BY ts DESC, is_final DESC, id DESC", params).rows
    kept = {int(row[0]) for row in rows[:keep]}
    finals = [row for row in rows if row[1]]
    if finals:
        kept.add(int(max(finals, key=lambda row: (float(row[2]), int(row[0])))[0]))
    _delete_ids(db, "ota_status", [int(row[0]) for row in rows if int(row[0]) not in kept])


def _add_in(where: list[str], params: list[Any], column: str,
            values: Union[str, Collection[str]]) -> None:
    """Append ``column = ?`` or ``column IN (?, ...)`` (an empty set matches nothing)."""
    if isinstance(values, str):
        where.append(f"{column} = ?")
        params.append(values)
        return
    items = sorted(values)
    if not items:
        where.append("1 = 0")
        return
    where.append(f"{column} IN ({', '.join('?' * len(items))})")
    params.extend(items)


# Last seen is the newest receive time; the clock offset is that of the report that set it. A
# report not heard live (no receive time) inserts 0 and NULL, which change neither.
_SEEN = """last_seen = CASE WHEN devices.last_seen > excluded.last_seen
                                     THEN devices.last_seen ELSE excluded.last_seen END,
                    clock_offset = CASE WHEN excluded.clock_offset IS NOT NULL
                                             AND excluded.last_seen >= devices.last_seen
                                        THEN excluded.clock_offset ELSE devices.clock_offset END"""


def _seen(device_ts: float, received_at: Optional[float]) -> tuple[float, Optional[float]]:
    """The (last_seen, clock_offset) a report received at ``received_at`` gives its device."""
    if received_at is None:
        return 0.0, None
    return received_at, clock_offset(device_ts, received_at)


def _birth_models(models: Sequence[Any]) -> list[DeviceModel]:
    out: dict[str, DeviceModel] = {}
    for entry in models:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            continue
        version = entry.get("version")
        sha256 = entry.get("sha256")
        # the entries are not schema-checked (sdk/messages.py Birth): a version that is not an
        # integer the BIGINT column holds is unknown
        known = (isinstance(version, int) and not isinstance(version, bool)
                 and MIN_INT <= version <= MAX_INT)
        out[entry["name"]] = DeviceModel(
            name=entry["name"],
            version=version if known else None,
            sha256=sha256 if isinstance(sha256, str) else "",
        )
    return list(out.values())


# commands kept per device in the history (the newest), operators' and rollouts' together
_COMMANDS_PER_DEVICE = 500


def _prune_per_device(db: _Db, table: str, order: str, device_id: str, keep: int, *,
                      release_id: Optional[str] = None) -> None:
    """Keep about ``keep`` rows of ``device_id`` in ``table`` (of ``release_id`` only, when
    given), the newest by ``order``: pruned once the bound is passed by a tenth, so a delete
    runs once per that many inserts."""
    where, params = "device_id = ?", [device_id]
    if release_id is not None:
        where, params = "device_id = ? AND release_id = ?", [device_id, release_id]
    count = int(db.execute(f"SELECT count(*) FROM {table} WHERE {where}", params).rows[0][0])
    if count <= keep + _slack(keep):
        return
    db.execute(f"""DELETE FROM {table} WHERE {where} AND {order} <= (
                      SELECT {order} FROM {table} WHERE {where}
                      ORDER BY {order} DESC LIMIT 1 OFFSET ?)""", (*params, *params, keep))


_COMMAND_COLUMNS = ("command_id, device_id, command, args_json, origin, created, expires, sent, "
                    "answered, ok, result_json, error_code, error")


def _command(row: _Row) -> CommandRecord:
    return CommandRecord(
        command_id=str(row[0]), device_id=str(row[1]), command=str(row[2]),
        args=_load_object(row[3]), origin=str(row[4]), created=float(row[5]),
        expires=float(row[6]), sent=None if row[7] is None else float(row[7]),
        answered=None if row[8] is None else float(row[8]),
        ok=None if row[9] is None else bool(row[9]),
        result=None if row[10] is None else _load_object(row[10]),
        error_code=str(row[11] or ""), error=str(row[12] or ""))


def _dump(data: Mapping[str, Any]) -> str:
    return encode(data).decode()


def _json_text(value: JsonText) -> str:
    """JSON text of a mapping, or given text/bytes checked to be a JSON object."""
    if isinstance(value, Mapping):
        return _dump(value)
    text = value.decode() if isinstance(value, bytes) else value
    _load_object(text)
    return text


def _load_object(text: Any) -> dict[str, Any]:
    data = json.loads(str(text))
    if not isinstance(data, dict):
        raise StoreError(f"expected a JSON object, got {type(data).__name__}")
    return data
