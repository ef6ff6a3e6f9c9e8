"""The Python SDK for scripted rollouts: :class:`Fleet`, the same verbs as the ``fleetlite`` CLI.

A :class:`Fleet` is a thin layer over the fleet store (:mod:`fleetlite.fleet.store`): it reads
devices, releases, rollouts and profiles there, and writes releases, rollouts and operator
requests there. A controller (``fleetlite serve``) does the rest: it drives every rollout it finds
in the store, sends the commands and records its decisions. A script therefore needs the same
``db`` as the controller; ``broker`` is only used to run a controller (:meth:`Fleet.serve`), with
TLS and credentials as :mod:`fleetlite.fleet.broker_address` describes.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Union

from fleetlite.fleet.broker_address import DEFAULT_BROKER, BrokerAddress, resolve_broker
from fleetlite.fleet.device_clock import is_skewed
from fleetlite.fleet.errors import (
    FleetError,
    RecordNotFoundError,
    RolloutError,
    StoreUnavailableError,
)
from fleetlite.fleet.gates import GateSpec
from fleetlite.fleet.profiles_view import Aggregate, Comparison, aggregate, compare
from fleetlite.fleet.profiles_view import ProfileRow as ViewRow
from fleetlite.fleet.rollout import (
    EXCLUDED,
    FAILED_STATUSES,
    FINISHED_STATES,
    INSTALLED,
    NO_CHANGE,
    OPERATOR_ACTIONS,
    ROLLBACK_FAILED,
    SUCCEEDED_STATUSES,
    VARIANT_MODES,
    DeviceProgress,
    DeviceView,
    ProbeProgress,
    RolloutSpec,
    RolloutState,
    Selector,
    ShadowProgress,
    ShadowSpec,
    VariantBudget,
    VariantChoice,
    WaveSpec,
    no_previous_version,
    parse_waves,
    request,
)
from fleetlite.fleet.store import (
    CommandRecord,
    DecisionRow,
    DeviceRecord,
    EventRecord,
    RefusedReports,
    ReleaseInfo,
    RolloutRecord,
    Store,
    open_store,
)
from fleetlite.sdk.chunks import DEFAULT_CHUNK_SIZE
from fleetlite.sdk.errors import BundleError

if TYPE_CHECKING:
    # the release builder (numpy, the interpreter) and the report load only when used: every
    # `fleetlite` command imports this module, and most need neither
    from fleetlite.fleet.controller import Controller
    from fleetlite.fleet.device_commands import CommandOutcome
    from fleetlite.fleet.report import ClassBudget, DeviceSummary, RolloutSummary
    from fleetlite.sdk.bundle import ReleaseBundle
    from fleetlite.sdk.keys import SigningKey
    from fleetlite.sdk.trust import Root

__all__ = [
    "DEFAULT_BROKER",
    "DEFAULT_DB",
    "DEFAULT_WAVES",
    "Fleet",
    "RequestResult",
    "Rollout",
    "WaitTimeoutError",
    "WaveProgress",
    "WrittenReport",
    "decision_dict",
    "device_dict",
    "gate_texts",
    "release_dict",
    "variant_rows",
]

# how often a request waiting for its answer reads the decisions recorded after it (one indexed
# query); the controller answers within its wake_s (0.1 s) of the request
_ANSWER_POLL_S = 0.025

DEFAULT_DB = "sqlite:///fleetlite.db"
"""The store when neither ``db`` nor ``FLEETLITE_DB`` is given: ``fleetlite.db`` in the current
directory."""
DEFAULT_WAVES = "1,10%,100%"
"""Waves of :meth:`Fleet.create_rollout` when none are given: one canary, 10 %, the rest."""

PathArg = Union[str, "os.PathLike[str]"]


class WaitTimeoutError(FleetError, TimeoutError):
    """:meth:`Fleet.watch` or :meth:`Fleet.wait` gave up before the rollout finished; the
    rollout goes on. ``rollout`` is the last snapshot seen."""

    def __init__(self, message: str, rollout: Rollout) -> None:
        super().__init__(message)
        self.rollout = rollout


# -- snapshots -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class WaveProgress:
    """One wave of a rollout: its planned size (``"1"``, ``"10%"``, ``"all"``; ``"extra"`` for a
    wave of late joiners), devices per status, and ``state``: ``waiting``, ``running``,
    ``paused``, ``passed``, ``failed`` (none of its devices succeeded), ``not started`` or the
    rollout's final state."""

    number: int
    planned: str
    counts: Mapping[str, int]
    device_classes: tuple[str, ...]
    state: str

    @property
    def succeeded(self) -> int:
        """Devices that have the version: ``installed`` plus ``unchanged``."""
        return sum(n for s, n in self.counts.items() if s in SUCCEEDED_STATUSES)

    @property
    def installed(self) -> int:
        """Devices that installed the version in this rollout (updated)."""
        return self.counts.get(INSTALLED, 0)

    @property
    def unchanged(self) -> int:
        """Devices that already had the version (``no_change``): never counted as installed."""
        return self.counts.get(NO_CHANGE, 0)

    @property
    def failed(self) -> int:
        return sum(n for s, n in self.counts.items()
                   if s in FAILED_STATUSES or s == "rollback_failed")

    @property
    def in_flight(self) -> int:
        return self.counts.get("sent", 0) + self.counts.get("rollback_sent", 0)

    @property
    def pending(self) -> int:
        return self.counts.get("pending", 0) + self.counts.get("waiting_offline", 0)

    @property
    def excluded(self) -> int:
        return self.counts.get("excluded", 0)

    @property
    def total(self) -> int:
        """Devices of the wave that were or will be sent the release (not the excluded)."""
        return sum(self.counts.values()) - self.excluded

    def to_dict(self) -> dict[str, Any]:
        return {"wave": self.number, "planned": self.planned, "state": self.state,
                "total": self.total, "succeeded": self.succeeded, "installed": self.installed,
                "unchanged": self.unchanged, "failed": self.failed,
                "in_flight": self.in_flight, "pending": self.pending,
                "excluded": self.excluded, "counts": dict(self.counts),
                "device_classes": list(self.device_classes)}


@dataclass(frozen=True)
class Rollout:
    """A snapshot of one rollout: spec, state, waves with per-status counts, and (from
    :meth:`Fleet.rollout`) the decision log, oldest first. ``pending_requests`` are operator
    requests the controller has not handled yet."""

    rollout_id: str
    release_id: str
    spec: RolloutSpec
    state: str
    reason: str
    current_wave: int
    waves: tuple[WaveProgress, ...]
    devices: tuple[DeviceProgress, ...]
    paused_classes: Mapping[str, str]
    pending_requests: tuple[str, ...]
    decisions: tuple[DecisionRow, ...]
    revision: int
    created: float
    updated: float
    variant_choices: Mapping[str, VariantChoice] = field(default_factory=dict)
    """Per device class, the variant chosen (``variants="auto"``), with the figures behind it."""
    probes: tuple[ProbeProgress, ...] = ()
    shadows: tuple[ShadowProgress, ...] = ()
    """The devices sent a shadow install (``shadow=ShadowSpec(...)``), with their status."""
    shadow_verdicts: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    """Per device class, the shadow verdict with its figures (agreement, samples, p95s)."""

    @property
    def model(self) -> str:
        return self.spec.model

    @property
    def version(self) -> int:
        return self.spec.version

    @property
    def finished(self) -> bool:
        return self.state in FINISHED_STATES

    @property
    def completed(self) -> bool:
        return self.state == "completed"

    @property
    def started(self) -> bool:
        """True once a controller planned the waves."""
        return self.current_wave > 0 or bool(self.devices)

    @property
    def counts(self) -> dict[str, int]:
        """Devices per status over the whole rollout."""
        found: dict[str, int] = {}
        for dev in self.devices:
            found[dev.status] = found.get(dev.status, 0) + 1
        return dict(sorted(found.items()))

    @property
    def total(self) -> int:
        return sum(w.total for w in self.waves)

    @property
    def succeeded(self) -> int:
        return sum(w.succeeded for w in self.waves)

    @property
    def installed(self) -> int:
        return sum(w.installed for w in self.waves)

    @property
    def unchanged(self) -> int:
        return sum(w.unchanged for w in self.waves)

    @property
    def failed(self) -> int:
        return sum(w.failed for w in self.waves)

    def progress_line(self) -> str:
        """One line for logs: state, current wave and counts."""
        if not self.started:
            if self.finished:
                return f"{self.rollout_id}: {self.state}: {self.reason}"
            if self.state == "paused":
                return f"{self.rollout_id}: paused before its first wave ({self.reason})"
            return (f"{self.rollout_id}: waiting for a controller to plan it (is `fleetlite "
                    "serve` running on this store?)")
        counts = ", ".join(f"{n} {s}" for s, n in self.counts.items()) or "no devices"
        line = (f"{self.rollout_id}: {self.state}, wave {self.current_wave} of "
                f"{len(self.waves)}: {counts}")
        if self.current_wave == 0 and self.probes and not self.finished:
            ended = sum(p.status != "sent" for p in self.probes)
            line += (f"; probing variants: {ended} of {len(self.probes)} probe(s) ended, "
                     f"{len(self.variant_choices)} class(es) chosen")
        if self.current_wave == 0 and self.shadows and not self.finished:
            shadowing = sum(p.status == "shadowing" for p in self.shadows)
            line += (f"; shadow evaluation: {shadowing} of {len(self.shadows)} device(s) "
                     f"shadowing, {len(self.shadow_verdicts)} class verdict(s)")
        if self.pending_requests:
            line += f" ({', '.join(self.pending_requests)} requested)"
        return line

    def shadow_rows(self) -> list[dict[str, Any]]:
        """Per device class of a shadow rollout: the verdict (``waiting`` until there is one),
        agreement, samples and the active model's p95 alone vs while shadowed vs its budget
        (p95 alone x the ratio), the candidate's p95, and the devices."""
        if self.spec.shadow is None:
            return []
        ratio = self.spec.shadow.p95_budget_ratio
        classes = sorted({p.device_class for p in self.shadows} | set(self.shadow_verdicts))
        rows = []
        for cls in classes:
            verdict = self.shadow_verdicts.get(cls, {})
            figures = dict(verdict.get("figures", {}))
            alone = figures.get("active_alone_p95_ms")
            shadowed = figures.get("active_shadowed_p95_ms")
            budget = alone * ratio if alone is not None and ratio is not None else None
            members = [p for p in self.shadows if p.device_class == cls]
            rows.append({
                "class": cls, "verdict": verdict.get("verdict", "waiting"),
                "codes": list(verdict.get("codes", ())),
                "agreement": figures.get("agreement"), "samples": figures.get("samples", 0),
                "compared": figures.get("compared", 0),
                "min_agreement": self.spec.shadow.min_agreement,
                "min_samples": self.spec.shadow.min_samples,
                "active_alone_p95_ms": alone, "active_shadowed_p95_ms": shadowed,
                "p95_budget_ratio": ratio, "active_p95_budget_ms": budget,
                # as the gate judged it: None when no device had enough requests of both
                # kinds (min_latency_samples) to judge; a slowdown under the floor is within
                "within_budget": _within_budget(figures, ratio),
                "latency_judged_devices": figures.get("latency_judged_devices", 0),
                "worst_shadow_cost_ratio": figures.get("worst_shadow_cost_ratio"),
                "candidate_p95_ms": figures.get("candidate_p95_ms"),
                "devices": {p.device_id: p.status for p in members},
                "reason": verdict.get("reason", ""),
            })
        return rows

    def to_dict(self) -> dict[str, Any]:
        """A JSON- and YAML-ready description."""
        return {
            "rollout_id": self.rollout_id,
            "release_id": self.release_id,
            "model": self.model,
            "version": self.version,
            "previous_version": self.spec.previous_version,
            "state": self.state,
            "reason": self.reason,
            "current_wave": self.current_wave,
            "total": self.total,
            "succeeded": self.succeeded,
            "installed": self.installed,
            "unchanged": self.unchanged,
            "failed": self.failed,
            "counts": self.counts,
            "waves": [w.to_dict() for w in self.waves],
            "paused_classes": dict(self.paused_classes),
            "pending_requests": list(self.pending_requests),
            "devices": [dict(vars(d)) for d in self.devices],
            "variants": {c: v.to_dict() for c, v in sorted(self.variant_choices.items())},
            "probes": [{**vars(p), "variants": dict(p.variants)} for p in self.probes],
            "shadow": self.shadow_rows(),
            "decisions": [decision_dict(d) for d in self.decisions],
            "spec": self.spec.to_dict(),
            "revision": self.revision,
            "created": self.created,
            "updated": self.updated,
        }


@dataclass(frozen=True)
class WrittenReport:
    """The HTML report :meth:`Fleet.write_report` wrote, and how much it shows."""

    path: Path
    devices: int
    profiles: int
    rollouts: int
    devices_listed: int = 0
    """Rows of its devices table (at most ``max_devices``; the rest are left out)."""
    devices_needing_attention: int = 0


@dataclass(frozen=True)
class RequestResult:
    """An operator request: the rollout after it was queued (or handled, if waited for;
    without its decision log, which :meth:`Fleet.rollout` reads) and the controller's answer,
    ``None`` until the controller handled it."""

    action: str
    rollout: Rollout
    decision: Optional[DecisionRow] = None

    @property
    def handled(self) -> bool:
        return self.decision is not None

    @property
    def refused(self) -> bool:
        return self.decision is not None and self.decision.kind == "refuse"


def variant_rows(rollout: Rollout) -> list[dict[str, str]]:
    """Per class and candidate variant, the figures its choice was made from, as text cells
    (``rollout status`` and the report): the chosen variant is marked ``yes`` (``pinned`` when
    an operator pinned it); a class excluded because no variant fits has none marked."""
    def num(value: Optional[float], spec: str = ".1f") -> str:
        return "-" if value is None else f"{value:{spec}}"

    rows = []
    for cls, choice in sorted(rollout.variant_choices.items()):
        for fig in choice.figures:
            chosen = fig.variant == choice.variant
            rows.append({
                "class": cls, "variant": fig.variant,
                "chosen": ("pinned" if choice.pinned else "yes") if chosen else "",
                "probed": str(fig.devices_probed), "passed": str(fig.devices_passed),
                "p95_ms": num(fig.median_p95_ms),
                "budget_p95_ms": num(choice.budget.max_p95_latency_ms, "g"),
                "peak_rss_mb": num(fig.max_peak_rss_mb),
                "budget_rss_mb": num(choice.budget.max_peak_rss_mb, "g"),
                "fidelity": num(fig.min_fidelity, ".3f"), "why": fig.why})
    return rows


def _variant_inputs(name: str, version: int, manifest: Mapping[str, Any], selector: Selector,
                    variants: str, pins: Mapping[str, str],
                    ) -> tuple[tuple[str, ...], dict[str, VariantBudget]]:
    """The release's variant names and, for ``variants="auto"``, the latency and memory budgets
    of the selected classes (device_profiles/<class>.yaml), as the rollout spec records them."""
    if variants not in VARIANT_MODES:
        raise RolloutError(f"--variants must be one of {', '.join(VARIANT_MODES)}, got "
                           f"{variants!r}")
    if variants == "off":
        return (), {}
    names = ("default", *(str(v.get("name")) for v in manifest.get("variants", ())
                          if isinstance(v, Mapping)))
    unknown = sorted(c for c in pins if c not in selector.device_classes)
    if unknown:
        raise RolloutError(f"--pin names class(es) {', '.join(unknown)}, which this rollout "
                           f"does not select ({', '.join(selector.device_classes)}): pin a "
                           "selected class, or select that class with --class")
    wrong = sorted(f"{c}={v}" for c, v in pins.items() if v not in names)
    if wrong:
        raise RolloutError(f"--pin {', '.join(wrong)}: {name} v{version} has the variants "
                           f"{', '.join(names)} (see `fleetlite release show`); pin one of them")
    from fleetlite.sdk.device_class import find_device_class
    from fleetlite.sdk.errors import DeviceClassError

    budgets: dict[str, VariantBudget] = {}
    for cls in selector.device_classes:
        try:
            found = find_device_class(cls).budgets
        except DeviceClassError as exc:
            raise RolloutError(f"--variants auto chooses by the class's budgets, and class "
                               f"{cls} has none: {exc}") from exc
        budgets[cls] = VariantBudget(found.max_p95_latency_ms, found.max_peak_rss_mb)
    return names, budgets


def _snapshot(record: RolloutRecord, decisions: Sequence[DecisionRow]) -> Rollout:
    spec = RolloutSpec.from_dict(record.spec)
    state = RolloutState.from_stored(record.state)
    devices = tuple(sorted(state.devices.values(), key=lambda d: (d.wave, d.device_id)))
    count = max([len(spec.waves), *(d.wave for d in devices)])
    waves = []
    for number in range(1, count + 1):
        members = [d for d in devices if d.wave == number]
        counts: dict[str, int] = {}
        for dev in members:
            counts[dev.status] = counts.get(dev.status, 0) + 1
        waves.append(WaveProgress(
            number=number,
            planned=str(spec.waves[number - 1]) if number <= len(spec.waves) else "extra",
            counts=dict(sorted(counts.items())),
            device_classes=tuple(sorted({d.device_class for d in members})),
            state=_wave_state(state, number, counts)))
    return Rollout(
        rollout_id=record.rollout_id, release_id=record.release_id, spec=spec,
        state=state.state, reason=state.reason, current_wave=state.current_wave,
        waves=tuple(waves), devices=devices,
        paused_classes={c: g.reason for c, g in sorted(state.paused_classes.items())},
        pending_requests=tuple(r.action for r in state.operator_requests),
        decisions=tuple(decisions), revision=record.revision, created=record.created,
        updated=record.updated, variant_choices=dict(sorted(state.variant_choices.items())),
        probes=tuple(sorted(state.probes.values(), key=lambda p: p.device_id)),
        shadows=tuple(sorted(state.shadows.values(), key=lambda p: p.device_id)),
        shadow_verdicts={c: dict(v) for c, v in sorted(state.shadow_verdicts.items())})


def _wave_state(state: RolloutState, number: int, counts: Mapping[str, int]) -> str:
    """``passed`` for a wave behind the rollout (or the last of a completed one) in which a
    device succeeded; ``failed`` when devices were sent the release and none succeeded (the
    operator resumed past it, or it ended the rollout): never ``passed``."""
    if number < state.current_wave or (number == state.current_wave
                                       and state.state == "completed"):
        succeeded = sum(counts.get(s, 0) for s in SUCCEEDED_STATUSES)
        failed = sum(counts.get(s, 0) for s in (*FAILED_STATUSES, ROLLBACK_FAILED))
        return "failed" if failed and not succeeded else "passed"
    if number == state.current_wave:
        return state.state
    return "not started" if state.finished else "waiting"


# -- JSON-ready records --------------------------------------------------------------------------


def refusal_dict(refused: RefusedReports) -> dict[str, Any]:
    """A JSON- and YAML-ready description of reports refused from one sender."""
    return {"kind": refused.kind, "reason": refused.reason, "count": refused.count,
            "first_at": refused.first_at, "last_at": refused.last_at,
            "last_message": refused.last_message}


def device_dict(device: DeviceRecord,
                refused: Sequence[RefusedReports] = ()) -> dict[str, Any]:
    """A JSON- and YAML-ready description of a device and the reports refused from it."""
    return {
        "device_id": device.device_id,
        "device_class": device.device_class,
        "online": device.online,
        "status_reason": device.status_reason,
        "tags": dict(device.tags),
        "models": [{"name": m.name, "version": m.version, "sha256": m.sha256}
                   for m in device.models],
        "agent_version": device.agent_version,
        "last_seen": device.last_seen,
        "clock_offset_s": device.clock_offset,
        "clock_skewed": is_skewed(device.clock_offset),
        "session": device.session,
        "decommissioned": device.decommissioned,
        "facts": dict(device.facts),
        "telemetry": device.telemetry.to_dict() if device.telemetry is not None else None,
        "refused_reports": [refusal_dict(r) for r in refused],
    }


def release_dict(info: ReleaseInfo) -> dict[str, Any]:
    """A JSON- and YAML-ready description of a stored release (without its bytes)."""
    manifest = info.manifest
    targets = manifest.get("targets", {})
    return {
        "release_id": info.release_id,
        "name": info.name,
        "version": info.version,
        "device_classes": list(targets.get("device_classes", [])),
        "created": info.created,
        "issued": manifest.get("issued"),
        "expires": manifest.get("expires"),
        "files": dict(info.files),
        "size": sum(info.files.values()),
    }


def decision_dict(decision: DecisionRow) -> dict[str, Any]:
    return {"id": decision.id, "ts": decision.ts, "kind": decision.kind,
            "reason": decision.reason, "device_id": decision.device_id, "wave": decision.wave,
            "device_class": decision.device_class, "detail": decision.detail,
            "revision": decision.revision}


def _sqlite_file(url: str) -> Optional[Path]:
    """The file a SQLite store URL names, or None for other URLs."""
    if url.startswith(("postgresql://", "postgres://")):
        return None
    if url.startswith("sqlite:///"):
        return Path(url[len("sqlite:///"):])
    if "://" in url:
        return None
    return Path(url)


# -- the fleet -----------------------------------------------------------------------------------


class Fleet:
    """The fleet as a script sees it. Use it as a context manager, or call :meth:`close`.

    ``db``: the store URL (``sqlite:///fleet.db``, ``postgresql://user:pw@host/db``); default
    ``$FLEETLITE_DB``, else :data:`DEFAULT_DB`. ``broker``: a
    :class:`~fleetlite.fleet.broker_address.BrokerAddress`, or an address (``HOST:PORT``,
    ``mqtt://HOST:PORT``, ``mqtts://HOST:PORT``; default ``$FLEETLITE_BROKER``, else
    :data:`DEFAULT_BROKER`) completed from the environment: ``FLEETLITE_TLS_CA``,
    ``FLEETLITE_TLS_CERT``, ``FLEETLITE_TLS_KEY``, ``FLEETLITE_MQTT_USERNAME``,
    ``FLEETLITE_MQTT_PASSWORD`` (see :func:`~fleetlite.fleet.broker_address.resolve_broker`).
    ``create=False`` refuses to create a SQLite store that does not exist yet (read-only verbs:
    a typo in the path would otherwise show an empty fleet).
    """

    def __init__(self, db: Optional[PathArg] = None,
                 broker: Union[str, BrokerAddress, None] = None, *, create: bool = True) -> None:
        self.db = os.fspath(db) if db else (os.environ.get("FLEETLITE_DB") or DEFAULT_DB)
        self.broker = broker if isinstance(broker, BrokerAddress) else resolve_broker(broker)
        self.host, self.port = self.broker.host, self.broker.port
        path = _sqlite_file(self.db)
        if not create and path is not None and not path.exists():
            raise StoreUnavailableError(
                f"no fleet store at {path}: start the controller with `fleetlite serve --db "
                f"{self.db}` (it creates the store), or point --db / FLEETLITE_DB at the store "
                "your controller uses")
        #: the SQLite file this Fleet created because none was there (None: it existed, or
        #: the store is PostgreSQL); the CLI says so, so that a new store is never a surprise
        self.created: Optional[Path] = (path if path is not None and not path.exists()
                                        else None)
        self.store: Store = open_store(self.db)

    def __repr__(self) -> str:
        return f"<Fleet {self.store.url} broker {self.broker.url}>"

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self.store.close()

    def discard_created(self) -> bool:
        """Close, and delete the SQLite store this Fleet created if nothing was stored in it
        (a command that failed leaves no empty store behind); True if it was deleted."""
        path = self.created
        if path is None:
            return False
        empty = (not self.store.list_releases() and not self.store.list_rollouts()
                 and not self.store.list_devices(decommissioned=None))
        self.close()
        if not empty:
            return False
        for leftover in (path, path.with_name(path.name + "-wal"),
                         path.with_name(path.name + "-shm")):
            leftover.unlink(missing_ok=True)
        return True

    # -- devices -----------------------------------------------------------------------------

    def devices(self, device_class: Optional[str] = None,
                tags: Optional[Mapping[str, str]] = None,
                online: Optional[bool] = None,
                seen_since: Optional[float] = None,
                decommissioned: Optional[bool] = False, *,
                limit: Optional[int] = None,
                after: Optional[str] = None) -> list[DeviceRecord]:
        """Registered devices matching every given filter, by id; ``seen_since``: heard from
        at or after this Unix time (the controller's clock, see ``DeviceRecord.last_seen``);
        by default those in service (``decommissioned=True``: only the decommissioned).

        A page at a time on a large fleet: ``limit`` devices at most (None or 0: all), those
        whose id sorts ``after`` the given one; pass the last id of a page as ``after`` for the
        next (a device added meanwhile shows on a later page if its id sorts after it)::

            page = fleet.devices(limit=500)
            while page:
                ...
                page = fleet.devices(limit=500, after=page[-1].device_id)
        """
        return self.store.list_devices(device_class=device_class, tags=tags, online=online,
                                       seen_since=seen_since, decommissioned=decommissioned,
                                       limit=limit, after=after)

    def decommission(self, device_ids: Sequence[str], *, undo: bool = False) -> list[str]:
        """Take devices out of service (``undo``: back in): they leave lists, rollouts and
        selections such as ``--all``; their history stays. Unknown ids are refused; returns
        the ids that changed."""
        for device_id in device_ids:
            self.device(device_id)
        return self.store.decommission(device_ids, undo=undo)

    def device(self, device_id: str) -> DeviceRecord:
        """One device; :class:`RecordNotFoundError` if the fleet never heard of it."""
        found = self.store.get_device(device_id)
        if found is None:
            raise RecordNotFoundError(
                f"no device {device_id!r} in the store {self.store.url}: list them with "
                "`fleetlite devices list`; a device appears once its agent connects to the "
                "broker while `fleetlite serve` runs")
        return found

    def send_command(self, device_ids: Sequence[str], command: str,
                     args: Optional[Mapping[str, Any]] = None, *, timeout_s: float = 30.0,
                     origin: str = "sdk") -> list[CommandOutcome]:
        """Send an agent command (``ping``, ``info``, ``profile``, ``reload_config``,
        ``ota_slots``, ``ota_install``, ``update_root``) to devices and wait up to
        ``timeout_s`` for their answers: one :class:`~fleetlite.fleet.device_commands.
        CommandOutcome` per device, in order (``.ok``, ``.result``, ``.state``, ``.text``). A
        controller must run on this store: it publishes the commands and stores the answers
        (:mod:`fleetlite.fleet.device_commands`)."""
        from fleetlite.fleet.device_commands import send_and_wait

        return send_and_wait(self.store, device_ids, command, args, timeout_s=timeout_s,
                             origin=origin)

    def command_history(self, device_id: str, limit: int = 50) -> list[CommandRecord]:
        """The newest commands sent to ``device_id`` (by operators and rollouts), newest first,
        with their answers."""
        return self.store.command_history(device_id, limit)

    def events(self, device_ids: Optional[Collection[str]] = None,
               since: Optional[float] = None, after_id: int = 0,
               limit: int = 100) -> list[EventRecord]:
        """Events devices reported (``fleetlite.event/1``), oldest first: the newest ``limit``
        of ``device_ids`` (default all) stored at or after ``since``, with an id above
        ``after_id`` (pass the last id seen to follow new ones)."""
        return self.store.events(device_ids=device_ids, since=since, after_id=after_id,
                                 limit=limit)

    def refused_reports(self, device_id: Optional[str] = None) -> list[RefusedReports]:
        """Reports the controller refused from a device (or every device) because they spoke
        for another device or claimed a release it was never sent, counted per kind and
        reason (see docs/protocol.md, "Reports are bound to their sender")."""
        return self.store.refusals(device_id)

    # -- releases ----------------------------------------------------------------------------

    def build_release(self, models: Sequence[PathArg], *, name: str, version: int,
                      device_classes: Sequence[str],
                      keys: Sequence[Union[SigningKey, PathArg]] = (),
                      vocab: Optional[PathArg] = None, **options: Any) -> ReleaseBundle:
        """Build (and sign with ``keys``: key objects or ``.key`` files) a release bundle;
        ``options`` go to :func:`fleetlite.fleet.release_builder.build_release` (``expires_in``,
        ``tolerance``, ...). Nothing is stored: :meth:`push_release` does that."""
        from fleetlite.fleet.release_builder import build_release
        from fleetlite.sdk.keys import SigningKey

        loaded = [k if isinstance(k, SigningKey) else SigningKey.load(k) for k in keys]
        return build_release(models, name=name, version=version,
                             device_classes=device_classes, vocab=vocab, keys=loaded, **options)

    def push_release(self, bundle: Union[ReleaseBundle, PathArg], *,
                     root: Union[Root, PathArg, None] = None) -> str:
        """Store a release (a bundle, or a bundle directory / ``.flb`` file) and return its id;
        the controller serves it to the devices of a rollout. Refuses unsigned or expired
        releases and files that do not match the manifest; with ``root`` (a root of trust or
        its ``root.json``), the release must also verify against it as on a device. Pushing a
        stored release again only updates its signatures."""
        from fleetlite.sdk.bundle import ReleaseBundle, load_bundle

        loaded = bundle if isinstance(bundle, ReleaseBundle) else load_bundle(bundle)
        manifest = loaded.manifest
        origin = "the bundle" if isinstance(bundle, ReleaseBundle) else str(bundle)
        if not loaded.envelope.signatures:
            raise BundleError(f"{origin} is unsigned: sign it with `fleetlite release sign "
                              "BUNDLE --key KEY.key` first; devices refuse unsigned releases")
        bad = [f"{f['name']} ({f['status']})" for f in loaded.summary()["files"]
               if f["status"] != "ok"]
        if bad:
            raise BundleError(f"{origin}: files do not match the manifest: {', '.join(bad)}; "
                              "rebuild the bundle")
        if manifest.expires <= time.time():
            raise BundleError(f"{origin}: {manifest.name} v{manifest.version} has expired; "
                              "build it again (`--expires-in`)")
        if root is not None:
            from fleetlite.sdk import trust

            trusted = root if isinstance(root, trust.Root) else trust.load_trusted_root(
                Path(root).read_bytes())
            loaded.verify(trusted, time_floor=time.time())
        self.store.add_release(loaded.release_id, manifest.name, manifest.version,
                               loaded.envelope_bytes(), dict(loaded.files), manifest.to_dict())
        return loaded.release_id

    def releases(self, name: Optional[str] = None) -> list[ReleaseInfo]:
        """Stored releases (of one model name, if given), by name and version."""
        return self.store.list_releases(name)

    def release(self, release_id: str) -> ReleaseInfo:
        """A stored release by id or by a unique prefix of at least 6 characters."""
        releases = self.store.list_releases()
        exact = [r for r in releases if r.release_id == release_id]
        if exact:
            return exact[0]
        matches = ([r for r in releases if r.release_id.startswith(release_id)]
                   if len(release_id) >= 6 else [])
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise RecordNotFoundError(f"release id prefix {release_id!r} is ambiguous "
                                      f"({len(matches)} releases): give more characters")
        raise RecordNotFoundError(
            f"no release {release_id!r} in the store {self.store.url}: list them with "
            "`fleetlite release list`, store one with `fleetlite release push BUNDLE`")

    # -- rollouts ----------------------------------------------------------------------------

    def create_rollout(
        self,
        release_id: str,
        *,
        selector: Optional[Selector] = None,
        waves: Union[str, Iterable[Union[str, int, WaveSpec]]] = DEFAULT_WAVES,
        gates: Optional[GateSpec] = None,
        success_threshold: float = 1.0,
        failure_threshold: float = 0.0,
        on_failure: str = "pause",
        wave_timeout_s: float = 600.0,
        rollout_id: Optional[str] = None,
        previous_version: Optional[int] = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        replace_offline: bool = True,
        max_in_flight: int = 0,
        paused: bool = False,
        allow_empty: bool = False,
        variants: str = "off",
        pins: Optional[Mapping[str, str]] = None,
        probe_devices_per_class: int = 2,
        shadow: Optional[ShadowSpec] = None,
    ) -> Rollout:
        """Create a rollout of a stored release; the controller starts it on its next tick.

        ``selector`` defaults to every device of the release's device classes; naming a class
        the release does not target is refused (the devices would reject it). ``previous_version``
        (the gates' baseline) defaults to the highest version of the model below the release's
        that is active on the selected devices. ``paused=True`` creates it paused: review it,
        then :meth:`resume`. Refused when no registered device matches, unless ``allow_empty``
        (devices that register later join only a rollout that has started).

        ``variants="auto"`` (a release with several variants): ``probe_devices_per_class``
        devices of each class first probe every variant, then each class gets the one that fits
        its budgets (device_profiles/<class>.yaml) with the best fidelity; ``pins`` (device class
        -> variant name; they imply ``variants="auto"``) choose it for a class instead.
        ``shadow`` (:class:`~fleetlite.fleet.rollout.ShadowSpec`): before the first wave, the
        targeted online devices run the release beside their active model; a class whose
        verdict fails (agreement, latency cost, or no verdict in time) is stopped before any of
        its devices switches, one that passes installs it (promoted, no download). Other
        arguments: see :class:`fleetlite.fleet.rollout.RolloutSpec` and docs/rollouts.md.
        """
        info = self.release(release_id)
        targets = tuple(info.manifest.get("targets", {}).get("device_classes", []))
        chosen = selector or Selector()
        wrong = [c for c in chosen.device_classes if c not in targets]
        if wrong:
            raise RolloutError(
                f"release {info.name} v{info.version} targets {', '.join(targets)}, not "
                f"{', '.join(wrong)}: devices of another class refuse it (wrong_device_class); "
                "build the release for that class or select its classes")
        if not chosen.device_classes:
            chosen = Selector(targets, dict(chosen.tags), tuple(chosen.device_ids))
        selected = [d for d in self.store.list_devices()
                    if chosen.matches(DeviceView(d.device_id, d.device_class, d.tags, d.online))]
        if not selected and not allow_empty:
            raise RolloutError(
                f"no registered device matches the selector ({chosen}): check `fleetlite "
                "devices list`; devices register when their agent connects while `fleetlite "
                "serve` runs")
        if previous_version is None:
            active = [m.version for d in selected for m in d.models
                      if m.name == info.name and m.version is not None
                      and m.version < info.version]
            previous_version = max(active) if active else None
        if on_failure == "rollback" and previous_version is None:
            raise RolloutError(
                f"--on-failure rollback needs a version to go back to, and the selected devices "
                f"run no earlier version of {info.name}: use --on-failure pause or abort")
        pins = dict(pins or {})
        if pins:
            variants = "auto"
        names, budgets = _variant_inputs(info.name, info.version, info.manifest, chosen,
                                         variants, pins)
        spec = RolloutSpec(
            rollout_id=rollout_id or f"{info.name}-v{info.version}-{uuid.uuid4().hex[:6]}",
            release_id=info.release_id, model=info.name, version=info.version,
            previous_version=previous_version, selector=chosen, waves=parse_waves(waves),
            success_threshold=success_threshold, failure_threshold=failure_threshold,
            on_failure=on_failure, wave_timeout_s=wave_timeout_s, gates=gates or GateSpec(),
            chunk_size=chunk_size, replace_offline=replace_offline,
            max_in_flight=max_in_flight, variants=variants, variant_names=names,
            probe_devices_per_class=probe_devices_per_class, pins=pins, budgets=budgets,
            shadow=shadow)
        state = RolloutState()
        if paused:
            state = request(state, "pause", "created paused")
        record = self.store.create_rollout(spec.rollout_id, info.release_id, spec.to_dict(),
                                           state=state.to_dict())
        return _snapshot(record, ())

    def rollout(self, rollout_id: str) -> Rollout:
        """A rollout with its waves and its decision log."""
        record = self.store.get_rollout(rollout_id)
        if record is None:
            raise self._no_rollout(rollout_id)
        return _snapshot(record, self.store.decisions(rollout_id))

    def rollouts(self, release_id: Optional[str] = None) -> list[Rollout]:
        """Every rollout (of one release, if given), oldest first, without decision logs."""
        return [_snapshot(r, ()) for r in self.store.list_rollouts(release_id)]

    def _no_rollout(self, rollout_id: str) -> RecordNotFoundError:
        known = [r.rollout_id for r in self.store.list_rollouts()][-5:]
        hint = f" (latest: {', '.join(known)})" if known else ""
        return RecordNotFoundError(
            f"no rollout {rollout_id!r} in the store {self.store.url}{hint}: list them with "
            "`fleetlite rollout list`")

    # -- operator requests -------------------------------------------------------------------

    def pause(self, rollout_id: str, note: str = "", *,
              wait: Optional[float] = None) -> RequestResult:
        """Stop sending installs and starting waves; outcomes, gates and rollbacks go on."""
        return self.request(rollout_id, "pause", note=note, wait=wait)

    def resume(self, rollout_id: str, note: str = "", *,
               wait: Optional[float] = None) -> RequestResult:
        """Run a paused rollout again; after a threshold pause this accepts that wave."""
        return self.request(rollout_id, "resume", note=note, wait=wait)

    def abort(self, rollout_id: str, note: str = "", *,
              wait: Optional[float] = None) -> RequestResult:
        """Finish the rollout: no more installs; installed devices keep the release."""
        return self.request(rollout_id, "abort", note=note, wait=wait)

    def rollback(self, rollout_id: str, note: str = "", *, wait: Optional[float] = None,
                 remove_model: bool = False) -> RequestResult:
        """Roll back every device that installed the release in this rollout. A rollout of a
        model's first version has nothing to go back to: it is refused, unless
        ``remove_model`` asks to remove the model from those devices instead."""
        return self.request(rollout_id, "rollback", note=note, wait=wait,
                            remove_model=remove_model)

    def request(self, rollout_id: str, action: str, *, note: str = "",
                wait: Optional[float] = None, remove_model: bool = False) -> RequestResult:
        """Queue an operator request (``pause``, ``resume``, ``abort``, ``rollback``); the
        controller handles it on its next tick and logs the answer (the action, or ``refuse``
        with the reason). With ``wait`` (seconds), wait for that answer.

        The request is written under the rollout's lock, the one a controller takes for each
        step: it waits for a step in progress to end (never refused because the controller is
        busy), and the controller's next step sees it.
        """
        if action not in OPERATOR_ACTIONS:
            raise RolloutError(f"operator action must be one of {', '.join(OPERATOR_ACTIONS)}, "
                               f"got {action!r}")
        # the controller answers after it read the request: its answer's id is greater
        before = self.store.last_decision_id(rollout_id)
        try:
            with self.store.rollout_lock(rollout_id) as txn:
                record = txn.rollout
                state = RolloutState.from_stored(record.state)
                if state.finished and (action != "rollback" or state.state == "rolled_back"):
                    raise RolloutError(f"rollout {rollout_id} is already {state.state} "
                                       f"({state.reason}): there is nothing to {action}")
                spec = RolloutSpec.from_dict(record.spec)
                if action == "rollback" and spec.previous_version is None and not remove_model:
                    raise RolloutError(no_previous_version(spec, f"cannot roll {rollout_id} "
                                                                 "back"))
                if remove_model and spec.previous_version is not None:
                    raise RolloutError(
                        f"--remove-model is for a rollout of a model's first version; "
                        f"{rollout_id}'s devices had {spec.model} "
                        f"v{spec.previous_version}, and a rollback returns them to it")
                # the locked record has no per-device map: the request leaves the rows alone
                txn.set_state(request(state, action, note,
                                      remove_model=remove_model).to_dict(devices=False))
        except RecordNotFoundError:
            raise self._no_rollout(rollout_id) from None
        deadline = time.monotonic() + (wait or 0.0)
        while True:
            answer = self._answer(rollout_id, action, before)
            if answer is not None or time.monotonic() >= deadline:
                # the decision log of a large rollout is tens of thousands of rows: not here
                latest = self.store.get_rollout(rollout_id)
                if latest is None:
                    raise self._no_rollout(rollout_id)
                return RequestResult(action, _snapshot(latest, ()), answer)
            time.sleep(_ANSWER_POLL_S)

    def _answer(self, rollout_id: str, action: str, after: int) -> Optional[DecisionRow]:
        for decision in self.store.decisions(rollout_id, after=after):
            if decision.detail.get("operator") and decision.detail.get("action") == action:
                return decision
        return None

    # -- following a rollout -----------------------------------------------------------------

    def watch(self, rollout_id: str, interval: float = 1.0, timeout: Optional[float] = None, *,
              stop_on_pause: bool = False) -> Iterator[Rollout]:
        """Snapshots of a rollout: the current one at once, then each change, until it is
        finished (the last snapshot yielded is the finished one) or, with ``stop_on_pause``,
        paused. Raises :class:`WaitTimeoutError` after ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        current: Optional[Rollout] = None
        while True:
            record = self.store.get_rollout(rollout_id)
            if record is None:
                raise self._no_rollout(rollout_id)
            if current is None or record.revision != current.revision:
                # the decision log is read only when the rollout changed
                current = _snapshot(record, self.store.decisions(rollout_id))
                yield current
            if current.finished or (stop_on_pause and current.state == "paused"):
                return
            if deadline is not None and time.monotonic() >= deadline:
                raise WaitTimeoutError(
                    f"rollout {rollout_id} is still {current.state} after {timeout:g} s "
                    f"({current.progress_line()}); it goes on: watch it again with "
                    f"`fleetlite rollout watch {rollout_id}`", current)
            time.sleep(interval if deadline is None
                       else max(0.0, min(interval, deadline - time.monotonic())))

    def wait(self, rollout_id: str, callback: Optional[Callable[[Rollout], Any]] = None,
             timeout: Optional[float] = None, *, interval: float = 1.0,
             stop_on_pause: bool = False) -> Rollout:
        """Block until the rollout is finished (or paused, with ``stop_on_pause``) and return
        its last snapshot; ``callback`` gets every snapshot :meth:`watch` yields. Check
        ``.completed`` on the result: aborted and rolled back rollouts are finished too."""
        last: Optional[Rollout] = None
        for snapshot in self.watch(rollout_id, interval, timeout, stop_on_pause=stop_on_pause):
            last = snapshot
            if callback is not None:
                callback(snapshot)
        assert last is not None  # watch yields at least once
        return last

    # -- profiles and reports ----------------------------------------------------------------

    def profile_rows(self, model: Optional[str] = None, version: Optional[int] = None,
                     device_class: Optional[str] = None) -> list[ViewRow]:
        """Every stored profile matching the filters, flattened, oldest first (a language
        model's TTFT and tokens/s come from its record)."""
        return [ViewRow.from_stored(r) for r in self.store.profiles(model, version, device_class)]

    def profiles(self, model: Optional[str] = None, version: Optional[int] = None,
                 device_class: Optional[str] = None) -> list[Aggregate]:
        """Per (device class, model, version): medians over devices of their newest profile."""
        return aggregate(self.profile_rows(model, version, device_class))

    def compare(self, model: str, a: int, b: int) -> Comparison:
        """Version ``b`` of ``model`` against version ``a``, per device class."""
        return compare(self.profile_rows(model), model, a, b)

    def report(self, path: PathArg, *, title: str = "FleetLite fleet report",
               max_devices: Optional[int] = 1000) -> Path:
        """Write the self-contained HTML report of the store: devices, profiles, rollouts.
        Its devices table lists ``max_devices`` at most (None or 0: all), those needing
        attention first (offline, failed or rejected installs, rolled back, stale); its
        counts, aggregates and plots cover every device."""
        return self.write_report(path, title=title, max_devices=max_devices).path

    def write_report(self, path: PathArg, *, title: str = "FleetLite fleet report",
                     max_devices: Optional[int] = 1000,
                     list_command: str = "fleetlite devices list --limit 0") -> WrittenReport:
        """:meth:`report`, also saying how many devices, profiles and rollouts it shows;
        ``list_command``: what the report tells to run for the devices its table leaves out."""
        from fleetlite.fleet.report import ReportData, table_devices, write_report

        devices = self.store.list_devices()
        rollouts = [self.rollout(r.rollout_id) for r in self.store.list_rollouts()]
        installs: dict[str, str] = {}  # each device's status in the newest rollout to it
        for rollout in sorted(rollouts, key=lambda r: r.created):
            for progress in rollout.devices:
                if progress.status != EXCLUDED:
                    installs[progress.device_id] = progress.status
        data = ReportData(generated_at=time.time(),
                          devices=[_device_summary(d, installs.get(d.device_id))
                                   for d in devices],
                          profiles=self.profile_rows(),
                          rollouts=[_rollout_summary(r) for r in rollouts],
                          budgets=_budgets({d.device_class for d in devices}), title=title,
                          max_devices=max_devices, list_command=list_command)
        shown, needing = table_devices(data)
        return WrittenReport(write_report(path, data), len(data.devices), len(data.profiles),
                             len(data.rollouts), len(shown), needing)

    # -- running a controller ----------------------------------------------------------------

    def serve(self, *, group: Optional[str] = None, tick_s: float = 0.5,
              controller_id: Optional[str] = None, lease_ttl_s: float = 10.0) -> Controller:
        """Start a controller on this store and broker (what ``fleetlite serve`` runs); stop it
        with ``.stop()``. ``group`` shares the ingest with other controllers of that group;
        ``controller_id`` is its MQTT client id and lease owner (default: a random id)."""
        from fleetlite.fleet.controller import Controller

        return Controller(self.store, self.broker, group=group, tick_s=tick_s,
                          controller_id=controller_id, lease_ttl_s=lease_ttl_s).start()


# -- report adapters -------------------------------------------------------------------------------


def _device_summary(device: DeviceRecord, install: Optional[str] = None) -> DeviceSummary:
    from fleetlite.fleet.report import DeviceSummary

    model = device.models[0] if device.models else None
    return DeviceSummary(device_id=device.device_id, device_class=device.device_class,
                         online=device.online, model=model.name if model else None,
                         version=model.version if model else None,
                         last_seen=device.last_seen or None,  # 0: not heard live yet
                         tags=dict(device.tags), agent_version=device.agent_version,
                         install=install)


def gate_texts(gates: GateSpec) -> list[str]:
    """The limits of a gate spec as short phrases (``"p95 latency +20%"``)."""
    texts = []
    if gates.max_p95_regression is not None:
        texts.append(f"p95 latency +{gates.max_p95_regression:.0%}")
    if gates.max_peak_rss_mb is not None:
        texts.append(f"peak RSS <= {gates.max_peak_rss_mb:g} MiB")
    if gates.max_rss_regression is not None:
        texts.append(f"peak RSS +{gates.max_rss_regression:.0%}")
    if gates.max_smoke_failures is not None:
        texts.append(f"smoke failures <= {gates.max_smoke_failures}")
    if gates.max_ttft_regression is not None:
        texts.append(f"LM time to first token +{gates.max_ttft_regression:.0%}")
    if gates.max_decode_regression is not None:
        texts.append(f"LM decode rate -{gates.max_decode_regression:.0%}")
    if gates.min_profiles:
        texts.append(f"profiles >= {gates.min_profiles} per class and wave")
    return texts


def _rollout_summary(rollout: Rollout) -> RolloutSummary:
    from fleetlite.fleet.report import (
        DecisionEntry,
        RolloutSummary,
        VariantSummary,
        WaveSummary,
    )

    waves = [WaveSummary.from_statuses(
        f"wave {w.number} ({w.planned})",
        [d.status for d in rollout.devices if d.wave == w.number],
        state=w.state, device_classes=w.device_classes) for w in rollout.waves]
    decisions = [DecisionEntry(ts=d.ts, action=d.kind, reason=d.reason,
                               wave=f"wave {d.wave}" if d.wave else "",
                               device_class=d.device_class or "") for d in rollout.decisions]
    return RolloutSummary(rollout_id=rollout.rollout_id, model=rollout.model,
                          version=rollout.version, state=rollout.state, waves=waves,
                          decisions=decisions, from_version=rollout.spec.previous_version,
                          created_at=rollout.created, gates=gate_texts(rollout.spec.gates),
                          variants=[VariantSummary(c, v.variant or "", v.pinned, v.reason,
                                                   [r for r in rows if r["class"] == c])
                                    for rows in [variant_rows(rollout)]
                                    for c, v in sorted(rollout.variant_choices.items())],
                          shadow=[_shadow_cells(r) for r in rollout.shadow_rows()])


def _within_budget(figures: Mapping[str, Any], ratio: Optional[float]) -> Optional[bool]:
    """Whether shadowing kept the active model's p95 within its budget, as the shadow gate
    judged it (None: not judged, too few requests overlapped a candidate run)."""
    if ratio is None or not figures.get("latency_judged_devices"):
        return None
    worst = figures.get("worst_shadow_cost_ratio")
    return worst is None or float(worst) <= ratio


def _shadow_cells(row: Mapping[str, Any]) -> dict[str, str]:
    """A shadow row (:meth:`Rollout.shadow_rows`) as the report's text cells."""
    def ms(key: str) -> str:
        value = row.get(key)
        return "" if value is None else f"{value:.3f}"

    agreement = row.get("agreement")
    return {"class": str(row["class"]),
            "verdict": str(row["verdict"]) + (f" ({', '.join(row['codes'])})"
                                              if row.get("codes") else ""),
            "agreement": "" if agreement is None else f"{agreement:.1%}",
            "samples": str(row.get("samples", 0)),
            "active_alone_p95_ms": ms("active_alone_p95_ms"),
            "active_shadowed_p95_ms": ms("active_shadowed_p95_ms"),
            "budget_p95_ms": ms("active_p95_budget_ms"),
            "candidate_p95_ms": ms("candidate_p95_ms"), "reason": str(row.get("reason", ""))}


def _budgets(classes: Iterable[str]) -> dict[str, ClassBudget]:
    from fleetlite.fleet.report import ClassBudget
    from fleetlite.sdk.device_class import find_device_class
    from fleetlite.sdk.errors import FleetLiteError

    budgets: dict[str, ClassBudget] = {}
    for name in sorted(classes):
        try:
            budgets[name] = ClassBudget.from_budgets(find_device_class(name).budgets)
        except FleetLiteError:
            continue  # a class without a profile in device_profiles/: no budget line
    return budgets

