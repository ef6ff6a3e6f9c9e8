"""The reports a controller received while its store could not take them, kept to store later.

When a store write fails because the store is unavailable (read-only, full, locked too long,
PostgreSQL down), the controller keeps the report here instead of dropping it, and so does every
report after it until the backlog is drained (in arrival order) once the store answers again.
The broker has acknowledged these reports already: the backlog is the only copy, bounded by a
message count and a byte count; what does not fit is counted as dropped. A controller that is
killed while it holds a backlog loses it (docs/operator-guide.md, "When the store fails").
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass
from typing import Optional

__all__ = ["BacklogItem", "IngestBacklog"]


@dataclass(frozen=True)
class BacklogItem:
    """One admitted device report not stored yet; ``received_at`` is the controller's receive
    time (None for a retained snapshot), kept so that it is stored as when it arrived."""

    device_id: str
    kind: str
    payload: bytes
    received_at: Optional[float]


class IngestBacklog:
    """A bounded FIFO of reports, filled by the network thread, drained by the loop thread."""

    def __init__(self, max_messages: int, max_bytes: int) -> None:
        if max_messages < 1 or max_bytes < 1:
            raise ValueError("the backlog needs room for at least one message and one byte")
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self._items: deque[BacklogItem] = deque()
        self._bytes = 0
        self._lock = threading.Lock()
        self.dropped = 0  # reports that did not fit, since the controller started
        self.kept = 0  # reports that went through the backlog, since the controller started

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    @property
    def bytes(self) -> int:
        with self._lock:
            return self._bytes

    def append(self, item: BacklogItem) -> bool:
        """Keep ``item`` at the end; False (and counted as dropped) if it does not fit."""
        size = len(item.payload)
        with self._lock:
            if len(self._items) >= self.max_messages or self._bytes + size > self.max_bytes:
                self.dropped += 1
                return False
            self._items.append(item)
            self._bytes += size
            self.kept += 1
            return True

    def first(self) -> Optional[BacklogItem]:
        """The oldest report, left in place (it is removed by :meth:`done` once stored)."""
        with self._lock:
            return self._items[0] if self._items else None

    def done(self, item: BacklogItem) -> None:
        """Remove ``item``, the oldest report, now that it has been stored (or refused)."""
        with self._lock:
            if not self._items or self._items[0] is not item:
                raise ValueError("only the oldest report of the backlog can be done")
            self._items.popleft()
            self._bytes -= len(item.payload)
