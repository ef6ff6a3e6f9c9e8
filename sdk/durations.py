"""Durations as operators write them ('30d', '12h', '90m', '3600'), and the default release
lifetime. Kept apart from the release builder so the CLI can parse its options without loading
numpy and the interpreter."""

from __future__ import annotations

import re

__all__ = ["DEFAULT_EXPIRES_IN", "parse_duration"]

DEFAULT_EXPIRES_IN = 30 * 86400
"""Seconds a release stays valid when the builder is not told otherwise (30 days)."""

_DURATION = re.compile(r"([0-9]+)([smhdw]?)\Z")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> int:
    """'30d', '12h', '90m', '3600' (seconds) -> seconds."""
    match = _DURATION.match(text.strip())
    if not match or int(match.group(1)) <= 0:
        raise ValueError(f"{text!r} is not a duration; use e.g. 30d, 12h, 90m or 3600")
    return int(match.group(1)) * _UNITS[match.group(2)]
