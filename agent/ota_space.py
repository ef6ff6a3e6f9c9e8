"""Disk space of an install: what it needs before it starts, and freeing what it wrote.

An install writes the release twice on the device: the downloaded staging copy, then the copy in
the free A/B slot (the staging copy is removed only after the switch). Both live under the
agent's state directory. The OTA worker adds them up from the verified manifest, minus what is
already on disk (a resumed download) and what the install frees itself (the free slot's old
contents), and :func:`shortfall` compares that with the free space of each file system, so a full
disk is reported before the first chunk, not in the middle of a copy.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("fleetlite.agent.ota")

#: errno values that mean "the disk is full" (or a size limit said the same)
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})

#: room kept for the state file, the bitmap and the manifest copies written along the way
HEADROOM = 64 * 1024


def is_disk_full(exc: BaseException) -> bool:
    """True for an OSError (or an error caused by one) that says the disk is full."""
    seen: BaseException | None = exc
    for _ in range(8):  # a short cause chain is enough; never loop on a cycle
        if seen is None:
            return False
        if isinstance(seen, OSError) and seen.errno in DISK_FULL_ERRNOS:
            return True
        if getattr(seen, "reason", None) == "disk_full":
            return True
        seen = seen.__cause__ or seen.__context__
    return False


@dataclass(frozen=True)
class SpaceNeed:
    """Bytes an install still has to write, and bytes free where it writes them."""

    needed: int
    free: int

    @property
    def fits(self) -> bool:
        return self.needed <= self.free

    @property
    def missing(self) -> int:
        return max(0, self.needed - self.free)


def allocated(path: Path) -> int:
    """Bytes a file or directory tree occupies on disk (0 if it is gone)."""
    try:
        if path.is_symlink() or not path.is_dir():
            st = path.lstat()
            return min(st.st_size, st.st_blocks * 512) if st.st_blocks else st.st_size
    except OSError:
        return 0
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            total += allocated(Path(root) / name)
    return total


def shortfall(needs: Mapping[Path, int]) -> tuple[Path, SpaceNeed] | None:
    """Add up byte needs per file system (directories that exist, keyed by ``st_dev``) and
    return the first file system with less free space than its total need, or None."""
    totals: dict[int, tuple[Path, int]] = {}
    for path, need in needs.items():
        dev = os.stat(path).st_dev
        first, total = totals.get(dev, (path, 0))
        totals[dev] = (first, total + need)
    for path, total in totals.values():
        space = SpaceNeed(needed=max(0, total), free=free_bytes(path))
        if not space.fits:
            return path, space
    return None


def free_bytes(directory: Path) -> int:
    """Free bytes for the agent (not root's reserve) on the file system of ``directory``."""
    return shutil.disk_usage(directory).free


def remove_tree(path: Path) -> int:
    """Delete a file or directory tree, never raising; returns the bytes it occupied.

    Used while an install ends, possibly on a full or failing disk: whatever cannot be removed is
    logged (the next install's start removes it again), the final status is still sent.
    """
    size = allocated(path)
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
    except OSError as exc:
        log.error("could not remove %s: %s", path, exc)
    if path.exists():
        log.error("could not remove all of %s; it is removed again when the next install "
                  "ends or the agent starts", path)
    return size - allocated(path)


def describe_bytes(count: int) -> str:
    """``1536`` -> ``'1.5 KiB (1536 bytes)'``: short for people, exact for scripts."""
    value = float(count)
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            if unit == "bytes":
                return f"{count} bytes"
            return f"{value:.1f} {unit} ({count} bytes)"
        value /= 1024
    return f"{count} bytes"
