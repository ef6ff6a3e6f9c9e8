"""When a downloading device sends a ``downloading`` progress status (docs/protocol.md,
"OTA status").

Pure: the caller passes the time and counts (the agent and the simulator count chunks). A
progress status goes out when something new came since the last one and either ``every_s``
passed (a sign of life: the fleet side re-sends an install to a device silent for 15 s) or the
download crossed another ``step`` of its total and ``min_gap_s`` passed. With the defaults a
download of under 100 s sends about ten, a slower one one every 10 s (36 an install in the
10,000-device 16 MiB run of docs/benchmarks.md, against 105 with a status every 2 s).
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["PROGRESS_EVERY_S", "PROGRESS_MIN_GAP_S", "PROGRESS_STEP", "ProgressPacer"]

PROGRESS_EVERY_S = 10.0
PROGRESS_MIN_GAP_S = 2.0
PROGRESS_STEP = 0.10


@dataclass
class ProgressPacer:
    """Decides, chunk by chunk, whether a progress status is due. ``start(now)`` when the
    download begins (its ``downloading`` status was sent then)."""

    every_s: float = PROGRESS_EVERY_S
    min_gap_s: float = PROGRESS_MIN_GAP_S
    step: float = PROGRESS_STEP
    _last_at: float = field(default=0.0, init=False)
    _last_received: int = field(default=0, init=False)
    _last_steps: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if not 0 < self.step <= 1:
            raise ValueError(f"step must be in (0, 1], not {self.step}")
        if self.min_gap_s < 0 or self.every_s < self.min_gap_s:
            raise ValueError(f"need 0 <= min_gap_s <= every_s, not {self.min_gap_s} and "
                             f"{self.every_s}")

    def start(self, now: float, received: int = 0, total: int = 0) -> None:
        """The download began (or resumed with ``received`` of ``total``) at ``now``."""
        self._last_at = now
        self._last_received = received
        self._last_steps = self._steps(received, total)

    def due(self, now: float, received: int, total: int) -> bool:
        """Whether to send a progress status now, with ``received`` of ``total``; when it says
        yes it counts the status as sent."""
        if received == self._last_received:
            return False
        elapsed = now - self._last_at
        steps = self._steps(received, total)
        if elapsed < self.every_s and (elapsed < self.min_gap_s or steps <= self._last_steps):
            return False
        self._last_at, self._last_received, self._last_steps = now, received, steps
        return True

    def _steps(self, received: int, total: int) -> int:
        if total <= 0:
            return 0
        # exact in integers: floor((received / total) / step) without float drift at 10 %, 20 %
        return received * 1_000_000 // total // max(1, round(self.step * 1_000_000))
