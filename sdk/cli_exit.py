"""How ``fleetlite`` and ``fleetlite-agent`` end on mistakes that are not theirs to explain
in detail: a closed output pipe (``fleetlite devices list -o json | head -1``) ends quietly,
and a file system error names the file and the reason, never as a traceback."""

from __future__ import annotations

import os
import sys
from pathlib import Path

__all__ = ["closed_pipe", "os_error_text"]


def closed_pipe() -> int:
    """The reader of our output went away: send what is left nowhere (so that the exit's
    flush does not fail again) and end with 0, as a reader that had enough is no error."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # no real stdout to replace
        pass
    return 0


def os_error_text(exc: OSError) -> str:
    """``cannot use PATH: REASON``, naming every file the error names."""
    files = [str(f) for f in (exc.filename, exc.filename2) if f is not None]
    reason = exc.strerror or str(exc)
    if isinstance(exc, FileNotFoundError) and len(files) == 1:
        parent = Path(files[0]).parent
        if not parent.is_dir():
            return f"{parent}: no such directory (for {files[0]}); create it first"
    if not files:
        return reason
    return f"{' -> '.join(files)}: {reason}"
