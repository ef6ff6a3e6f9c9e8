"""The device side of a delta update: rebuild a release file from the installed base and a delta,
and put it in place only once it is the signed file.

:func:`rebuild` applies a delta (:mod:`fleetlite.sdk.delta`) into a temporary file next to
``out_path``, fsyncs it, reads it back to check its length and sha256 against the signed
:class:`~fleetlite.sdk.manifest.FileEntry`, then renames it over ``out_path`` and fsyncs the
directory. So ``out_path`` is either absent (or its previous content) or the whole, checked file,
even after a kill -9 or a power loss; the base file is only ever opened for reading. A refusal is a
:class:`~fleetlite.sdk.errors.DeltaError` whose ``reason`` the OTA receiver reports before it falls
back to downloading the full file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
from collections.abc import Mapping
from pathlib import Path

from fleetlite.sdk.atomic import fsync_dir
from fleetlite.sdk.delta import DEFAULT_DELTA_LIMITS, DeltaHeader, DeltaLimits, apply_delta
from fleetlite.sdk.errors import (
    DELTA_BASE_MISMATCH,
    DELTA_CORRUPT,
    DELTA_TARGET_MISMATCH,
    DeltaError,
)
from fleetlite.sdk.manifest import DeltaRef, FileEntry, Manifest

__all__ = ["TEMP_MARKER", "rebuild", "remove_leftovers", "usable_deltas"]

#: temporary files are named ``.<out name><TEMP_MARKER><pid>`` next to the output
TEMP_MARKER = ".rebuild-"
_CHUNK = 1024 * 1024


def usable_deltas(manifest: Manifest, file_name: str,
                  have: Mapping[str, Path]) -> list[tuple[DeltaRef, Path]]:
    """The (verified) manifest's deltas for ``file_name`` whose base this device holds, smallest
    delta first, each with the base's path. ``have`` maps the sha256 of files the device keeps
    (its active and previous models) to their paths. Empty: fetch the full file."""
    found = [(ref, Path(have[ref.base_sha256])) for ref in manifest.deltas_for(file_name)
             if ref.base_sha256 in have]
    return sorted(found, key=lambda item: manifest.file(item[0].delta).length)


def remove_leftovers(out_path: Path) -> list[Path]:
    """Delete temporary files a killed rebuild of ``out_path`` left behind; returns them."""
    out_path = Path(out_path)
    removed = []
    for stale in out_path.parent.glob(f".{out_path.name}{TEMP_MARKER}*"):
        with contextlib.suppress(FileNotFoundError):
            stale.unlink()
            removed.append(stale)
    return removed


def _file_digest(fd: int) -> tuple[str, int]:
    os.lseek(fd, 0, os.SEEK_SET)
    digest, length = hashlib.sha256(), 0
    while True:
        block = os.read(fd, _CHUNK)
        if not block:
            return digest.hexdigest(), length
        digest.update(block)
        length += len(block)


def rebuild(base_path: Path, delta_path: Path, target_entry: FileEntry, out_path: Path, *,
            limits: DeltaLimits = DEFAULT_DELTA_LIMITS) -> DeltaHeader:
    """Rebuild ``target_entry``'s file at ``out_path`` from ``base_path`` and ``delta_path``.

    Raises :class:`DeltaError` (``delta_base_mismatch`` when the base is missing or is not the
    delta's base, ``delta_corrupt`` when the delta is missing or damaged, ``delta_too_large``,
    ``delta_target_mismatch`` when the result is not the signed file) and leaves nothing behind:
    no temporary file, ``out_path`` untouched. Disk errors (:class:`OSError`, e.g. ENOSPC)
    propagate, with the same cleanup. Returns the delta's header (its kind and sizes, for logs).
    """
    base_path, delta_path, out_path = Path(base_path), Path(delta_path), Path(out_path)
    if out_path.resolve() == base_path.resolve():
        raise ValueError("rebuild writes a new file: out_path must not be the base file")
    remove_leftovers(out_path)
    tmp = out_path.with_name(f".{out_path.name}{TEMP_MARKER}{os.getpid()}")
    limits = dataclasses.replace(
        limits, max_target_bytes=min(limits.max_target_bytes, target_entry.length))
    try:
        base = open(base_path, "rb")  # noqa: SIM115 - closed below, with the delta
    except FileNotFoundError:
        raise DeltaError(f"the base file {base_path.name} is not on this device; fetch the full "
                         "file instead", reason=DELTA_BASE_MISMATCH) from None
    try:
        try:
            delta = open(delta_path, "rb")  # noqa: SIM115
        except FileNotFoundError:
            raise DeltaError(f"the delta file {delta_path.name} is missing; fetch it again or "
                             "the full file", reason=DELTA_CORRUPT) from None
        with delta:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
                         | getattr(os, "O_NOFOLLOW", 0), 0o644)
            try:
                with os.fdopen(os.dup(fd), "wb") as out:
                    header = apply_delta(base, delta, out, expected_sha256=target_entry.sha256,
                                         expected_length=target_entry.length, limits=limits)
                os.fsync(fd)
                # Read back what is on disk: the check is against the signed entry, not the
                # delta's own promise.
                if _file_digest(fd) != (target_entry.sha256, target_entry.length):
                    raise DeltaError(f"the file rebuilt for {target_entry.name} is not the signed "
                                     "one; fetch the full file instead",
                                     reason=DELTA_TARGET_MISMATCH)
            finally:
                os.close(fd)
        os.replace(tmp, out_path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    finally:
        base.close()
    fsync_dir(out_path.parent)
    return header
