"""Crash-safe file writes: temp file, fsync, rename, fsync the directory.

After a power loss the target holds either the old or the new content, never a mix.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from pathlib import Path
from typing import Any


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, *, mode: int = 0o644, sync_dir: bool = True,
                 overwrite: bool = True, exact_mode: bool = False) -> None:
    """Replace ``path`` with ``data`` atomically and durably.

    ``sync_dir=False`` leaves the directory fsync (which makes the rename durable) to the caller:
    the spool does one for several files and handles its failure apart from the write's.
    ``overwrite=False`` puts the file in place with a hard link, which fails with
    :class:`FileExistsError` if ``path`` exists (nothing is overwritten, even by a race).
    ``exact_mode``: the file gets exactly ``mode``, whatever the umask (keys, certificates).
    """
    path = Path(path)
    # one temporary per process and thread: two writers never share one
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}-{threading.get_ident()}")
    try:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()  # left by a crashed process that had the same pid and thread id
        fd = os.open(tmp, flags, mode)
        try:
            if exact_mode:
                os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        if overwrite:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
            tmp.unlink()
    except BaseException as exc:
        # Suppressed, so the caller sees the original error (e.g. ENOSPC), not the cleanup's.
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, OSError) and exc.filename == str(tmp):
            # name the file the caller asked for, not our temporary one
            raise type(exc)(exc.errno, exc.strerror, str(path)) from exc
        raise
    if sync_dir:
        fsync_dir(path.parent)


def write_json_atomic(path: Path, value: Any) -> None:
    write_atomic(path, json.dumps(value, indent=2, sort_keys=True).encode() + b"\n")


def read_json(path: Path, default: Any = None) -> Any:
    """Read a JSON state file; a missing file gives ``default``."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return default
