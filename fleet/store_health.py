"""Whether the controller's store is taking writes, and what to tell the operator when that
changes: one line when it fails (with the store's own advice) and one when it is back, however
many writes fail in between. Pure state; the controller logs the lines it returns."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

__all__ = ["StoreHealth"]


@dataclass
class StoreHealth:
    """The store's state as the controller saw it last. ``store``: its display name."""

    store: str
    ok: bool = True
    error: str = ""
    down_since: Optional[float] = None
    outages: int = 0

    def failed(self, error: object, now: float) -> Optional[str]:
        """A store call failed because the store is unavailable; the line to log if it was
        working until now, else None (the error is remembered either way)."""
        self.error = str(error)
        if not self.ok:
            return None
        self.ok, self.down_since = False, now
        self.outages += 1
        return (f"the store cannot be written: {self.error} -- until it can, the controller keeps "
                "the reports it receives and stores them once the store answers, and rollouts "
                "wait; releases already being served are still served")

    def recovered(self, now: float, kept: int) -> Optional[str]:
        """A store write succeeded; the line to log if the store was failing until now, else
        None. ``kept``: how many reports the controller holds to store now."""
        if self.ok:
            return None
        down_s = now - (self.down_since if self.down_since is not None else now)
        self.ok, self.error, self.down_since = True, "", None
        return (f"the store {self.store} takes writes again after {down_s:.0f} s; storing the "
                f"{kept} report{'' if kept == 1 else 's'} kept meanwhile")
