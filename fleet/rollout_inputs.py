"""What a rollout step reads from the store, parsed once per record instead of once per tick.

A rollout step reads every stored profile of its model (the gates) and every outcome of its
release (the final OTA statuses), twice a second. At fleet scale that is tens of thousands of
records, and parsing and validating each again on every tick was most of the controller's work
in a rollout (tools/bench/bench_rollout_step.py: 2.5 s per tick at 10,000 devices). Each cache
here keeps the parsed view of a record by its id: a tick reads the ids (one indexed query, no
JSON), parses only the records it has not seen, and forgets those the store pruned. Set
differences, not "ids above the last one", so a record committed late (PostgreSQL hands out ids
before commit) is still read.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from typing import Generic, Protocol, TypeVar

from fleetlite.fleet.gates import ProfileView
from fleetlite.fleet.rollout import OutcomeView
from fleetlite.fleet.store import OtaRecord, ProfileRow

__all__ = ["OutcomeViews", "ProfileViews"]

V = TypeVar("V")
R = TypeVar("R")


class _Source(Protocol):
    def profile_ids(self, model: str) -> list[int]: ...

    def profiles_by_id(self, ids: Collection[int]) -> dict[int, ProfileRow]: ...

    def ota_outcome_ids(self, release_id: str) -> list[int]: ...

    def ota_records_by_id(self, ids: Collection[int]) -> dict[int, OtaRecord]: ...


class _ById(Generic[R, V]):
    """Parsed views by record id, per key (a model, a release)."""

    def __init__(self, view: Callable[[R], V], order: Callable[[V], float]) -> None:
        self._view = view
        self._order = order
        self._cached: dict[str, dict[int, V]] = {}
        self.parsed = 0  # records parsed so far (a figure for benchmarks and tests)

    def refresh(self, key: str, ids: Collection[int],
                load: Callable[[list[int]], Mapping[int, R]]) -> list[V]:
        cached = self._cached.setdefault(key, {})
        present = set(ids)
        for gone in cached.keys() - present:
            del cached[gone]
        new = sorted(present - cached.keys())
        if new:
            for record_id, record in load(new).items():
                cached[record_id] = self._view(record)
                self.parsed += 1
        return [view for record_id, view in
                sorted(cached.items(), key=lambda item: (self._order(item[1]), item[0]))]

    def retain(self, keys: Collection[str]) -> None:
        for key in self._cached.keys() - set(keys):
            del self._cached[key]


class ProfileViews:
    """Every stored profile of a model as the gates read it, oldest first."""

    def __init__(self) -> None:
        self._classes: Mapping[str, str] = {}
        self._cache: _ById[ProfileRow, ProfileView] = _ById(self._view, lambda v: v.ts)

    @property
    def parsed(self) -> int:
        return self._cache.parsed

    def _view(self, row: ProfileRow) -> ProfileView:
        return ProfileView.from_record(row.record(),
                                       row.device_class or self._classes.get(row.device_id, ""))

    def views(self, store: _Source, model: str,
              classes: Mapping[str, str]) -> list[ProfileView]:
        """A profile stored without a device class takes the device's class in ``classes``
        when it is first read."""
        self._classes = classes
        return self._cache.refresh(model, store.profile_ids(model), store.profiles_by_id)

    def retain(self, models: Collection[str]) -> None:
        """Forget every model but these (no rollout of the others is being driven)."""
        self._cache.retain(models)


class OutcomeViews:
    """Every outcome (final OTA status) of a release, on the controller's clock, oldest first."""

    def __init__(self) -> None:
        self._cache: _ById[OtaRecord, OutcomeView] = _ById(
            lambda r: OutcomeView.from_status(r.status, r.received_at), lambda v: v.ts)

    @property
    def parsed(self) -> int:
        return self._cache.parsed

    def views(self, store: _Source, release_id: str) -> list[OutcomeView]:
        return self._cache.refresh(release_id, store.ota_outcome_ids(release_id),
                                   store.ota_records_by_id)

    def retain(self, release_ids: Collection[str]) -> None:
        """Forget every release but these (no rollout of the others is being driven)."""
        self._cache.retain(release_ids)
