"""The device's persistent OTA state: model slots, anti-rollback counters, rejections, the job.

One JSON document, ``<state_dir>/ota/state.json``, written atomically (temp file, fsync, rename,
fsync dir) after every transition, so after a crash or power loss it holds either the state
before or the state after a step, never a mix. The transitions are plain methods on dataclasses;
:class:`OtaStateStore` adds the file I/O.

Per model there are two slots, ``a`` and ``b`` (A/B): the active slot serves; an install writes
the other one, switches, and keeps the old one as ``previous`` for rollback. ``pending`` is set
between the switch and the commit (the health window): finding it set at start-up means the agent
died while the new model was on probation, and the device rolls back.

``ended`` remembers the last few installs that failed, so a re-sent ``ota_install`` of one is
answered with its final status instead of being taken for a new install.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fleetlite.sdk.atomic import write_json_atomic

SLOTS = ("a", "b")
STATE_VERSION = 1
MAX_ENDED = 16


@dataclass
class SlotInfo:
    """What one slot holds."""

    version: int
    release_id: str
    model_file: str  # file name inside the slot directory
    variant: str = ""
    sha256: str = ""
    installed_at: float = 0.0


@dataclass
class Pending:
    """A switched-to model on probation (the post-switch health window)."""

    slot: str
    version: int
    release_id: str
    since: float


@dataclass
class ModelState:
    """Anti-rollback counter, slots and rejections of one model name."""

    installed_version: int | None = None
    active: str | None = None
    previous: str | None = None
    slots: dict[str, SlotInfo] = field(default_factory=dict)
    pending: Pending | None = None
    rejected: list[int] = field(default_factory=list)
    # removed by the fleet (remove_model): not served, agent.yaml's copy included, until a
    # release of it is installed again; installed_version stays the anti-rollback floor
    removed: bool = False

    def free_slot(self) -> str:
        """The slot an install may overwrite: never the active one."""
        return "b" if self.active == "a" else "a"

    def reject(self, version: int) -> None:
        if version not in self.rejected:
            self.rejected.append(version)

    def switch_to(self, slot: str, info: SlotInfo, *, now: float) -> None:
        self.removed = False
        self.slots[slot] = info
        self.previous, self.active = self.active, slot
        self.pending = Pending(slot, info.version, info.release_id, now)

    def commit(self) -> None:
        """The health window passed: the version becomes the anti-rollback floor."""
        assert self.pending is not None
        self.installed_version = max(self.installed_version or 0, self.pending.version)
        self.pending = None

    def revert(self) -> int | None:
        """Undo the last switch (health failure or operator rollback); returns the bad version."""
        bad = self.slots[self.active].version if self.active in self.slots else None
        self.active, self.previous = self.previous, None
        self.pending = None
        if bad is not None:
            self.reject(bad)
        # the counter follows the model now serving: the bad version stays refused through
        # ``rejected``, and anything older than the served model is still a rollback
        self.installed_version = self.slots[self.active].version if self.active else None
        return bad


@dataclass
class Job:
    """The install in progress (survives restarts so a download resumes)."""

    release_id: str
    model: str
    chunk_size: int
    phase: str
    retry: bool = False
    variant: str = ""
    started: float = 0.0
    version: int = 0  # known once the manifest verified
    probe: bool = False  # smoke-test every variant and report, install nothing
    shadow: dict[str, Any] = field(default_factory=dict)  # shadow options; empty: install


@dataclass
class EndedJob:
    """The final status of an install that ended without installing (kept for re-sends)."""

    release_id: str
    model: str
    version: int
    outcome: str
    reason: str
    message: str
    ended: float  # wall-clock time


@dataclass
class OtaState:
    models: dict[str, ModelState] = field(default_factory=dict)
    job: Job | None = None
    time_floor: float = 0.0
    ended: list[EndedJob] = field(default_factory=list)

    def model(self, name: str) -> ModelState:
        return self.models.setdefault(name, ModelState())

    def remember_ended(self, ended: EndedJob) -> None:
        self.ended = [e for e in self.ended if e.release_id != ended.release_id]
        self.ended = [*self.ended, ended][-MAX_ENDED:]

    def forget_ended(self, release_id: str) -> None:
        self.ended = [e for e in self.ended if e.release_id != release_id]

    def ended_job(self, release_id: str) -> EndedJob | None:
        return next((e for e in self.ended if e.release_id == release_id), None)

    def to_dict(self) -> dict[str, Any]:
        return {"state_version": STATE_VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OtaState:
        models = {}
        for name, raw in data.get("models", {}).items():
            pending = raw.get("pending")
            models[name] = ModelState(
                installed_version=raw.get("installed_version"),
                active=raw.get("active"),
                previous=raw.get("previous"),
                slots={k: SlotInfo(**v) for k, v in raw.get("slots", {}).items()},
                pending=Pending(**pending) if pending else None,
                rejected=list(raw.get("rejected", [])),
                removed=bool(raw.get("removed", False)),
            )
        job = data.get("job")
        return cls(models=models, job=Job(**job) if job else None,
                   time_floor=float(data.get("time_floor", 0.0)),
                   ended=[EndedJob(**e) for e in data.get("ended", [])])


class OtaStateStore:
    """Loads and atomically saves :class:`OtaState` under ``<state_dir>/ota``."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir / "ota"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "state.json"

    def load(self) -> OtaState:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return OtaState()
        return OtaState.from_dict(data)

    def save(self, state: OtaState) -> None:
        write_json_atomic(self.path, state.to_dict())

    def slot_dir(self, model: str, slot: str) -> Path:
        return self.dir.parent / "models" / model / slot

    def staging_dir(self, release_id: str) -> Path:
        return self.dir / "staging" / release_id
