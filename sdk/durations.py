"""Durations as operators write them ('30d', '12h', '90m', '3600s'), and the default release
lifetime. Kept apart from the release builder so the CLI can parse its options without loading
numpy and the interpreter."""

from __future__ import annotations

import re

__all__ = ["DEFAULT_EXPIRES_IN", "parse_duration"]

DEFAULT_EXPIRES_IN = 30 * 86400
"""Seconds a release stays valid when the builder is not told otherwise (30 days)."""

_DURATION = re.compile(r"([0-9]+)([smhdw])\Z")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> int:
    """'30d', '12h', '90m', '3600s', '52w' -> seconds.

    A bare number is refused: '30' could mean seconds or days, and an expiry 86,400 times too
    short (or long) is the mistake this guards against."""
    stripped = text.strip()
    if stripped.isdigit():
        raise ValueError(f"{text!r} has no unit; write e.g. {stripped}d (days), {stripped}h "
                         f"(hours), {stripped}m (minutes) or {stripped}s (seconds)")
    match = _DURATION.match(stripped)
    if not match or int(match.group(1)) <= 0:
        raise ValueError(f"{text!r} is not a duration; use e.g. 30d, 12h, 90m, 3600s or 52w")
    return int(match.group(1)) * _UNITS[match.group(2)]
