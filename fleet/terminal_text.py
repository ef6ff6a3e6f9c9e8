"""Text that devices sent, made safe for the operator's terminal: a device may put escape
sequences (colours, cursor moves, a terminal title, a hyperlink) or line breaks into an event's
message, a fact or a status reason, and the tables print them. Control characters are shown
escaped (``\\x1b``), so what reaches the terminal is exactly what is on the screen."""

from __future__ import annotations

import re

__all__ = ["one_line", "for_terminal"]

# C0 controls but tab and newline, DEL, and the C1 controls (0x9b is a one-byte CSI)
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_CONTROL_OR_BREAK = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    return {"\n": "\\n", "\t": "\\t", "\r": "\\r"}.get(char, f"\\x{ord(char):02x}"
                                                      if ord(char) < 0x100
                                                      else f"\\u{ord(char):04x}")


def for_terminal(text: str) -> str:
    """``text`` with its control characters escaped; its lines and tabs kept."""
    return _CONTROL.sub(_escape, text)


def one_line(text: str) -> str:
    """``text`` as one table cell: every control character escaped, line breaks included."""
    return _CONTROL_OR_BREAK.sub(_escape, text)
