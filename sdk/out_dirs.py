"""The directories an ``--out DIR`` creates, said on stderr: a command may make the directory it
was told to write into, and its missing parents, but never silently (a typo in a path should be
seen, not turned into a new tree)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TextIO

__all__ = ["missing_dirs", "say_created"]


def missing_dirs(path: Path) -> list[Path]:
    """The directories that do not exist yet among ``path`` and its parents, outermost first
    (call it before the command creates them)."""
    missing = []
    for candidate in (path, *path.parents):
        if candidate.exists():
            break
        missing.append(candidate)
    return missing[::-1]


def say_created(created: list[Path], stream: TextIO | None = None) -> None:
    """One line naming the directories made: ``created directory a/b/keys (with a, a/b)``."""
    if not created:
        return
    *parents, last = created
    line = f"created directory {last}"
    if parents:
        line += f" (and its missing parent{'s' if len(parents) > 1 else ''} "
        line += ", ".join(str(p) for p in parents) + ")"
    print(line, file=stream or sys.stderr)
