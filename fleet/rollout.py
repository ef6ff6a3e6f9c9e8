"""The rollout engine: a pure function from (rollout spec, rollout state, devices, OTA outcomes,
profiles, now) to decisions, and a pure function that applies decisions to the state.

No I/O and no clock: the controller reads the store and the registry, calls :func:`decide`, sends
the commands the decisions name, persists ``apply(state, decisions, now)`` and records every
decision with its reason. ``decide`` runs its rules to a fixed point over its own decisions, so
calling it again on the applied state with the same inputs returns nothing: nothing is decided
twice. How waves, thresholds, gates, timeouts, operator requests and late joiners behave is
described in docs/rollouts.md. A release with several variants can be rolled out with
``variants="auto"``: a probe wave first measures every variant on a few devices of each class,
then each class installs the variant :func:`fleet.variant_choice.choose_variant` picks for it.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Optional, TypeVar, Union

from fleetlite.fleet.errors import RolloutError
from fleetlite.fleet.gates import (
    GateResult,
    GateSpec,
    ProfileView,
    check_smoke,
    evaluate_class,
    latest_profiles,
)
from fleetlite.fleet.shadow_gate import FAIL, ShadowVerdict, shadow_verdict
from fleetlite.fleet.shadow_gate import PASS as SHADOW_PASS
from fleetlite.fleet.variant_choice import (
    VariantBudget,
    VariantChoice,
    choose_variant,
    probes_from_progress,
)
from fleetlite.sdk.chunks import DEFAULT_CHUNK_SIZE, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE
from fleetlite.sdk.messages import OTA_OUTCOMES, OtaStatus
from fleetlite.sdk.shadow import ShadowReport

__all__ = [
    "ABORT",
    "ASSIGN",
    "CHOOSE_VARIANT",
    "COMPLETE",
    "DECISION_KINDS",
    "DEFAULT_WAVES",
    "DEVICE_STATUSES",
    "FAILED_STATUSES",
    "GATE_PASSED",
    "GATE_TRIPPED",
    "MARK",
    "OPERATOR_ACTIONS",
    "PAUSE",
    "PROBE_RESULT",
    "REFUSE",
    "RESUME",
    "ROLLBACK",
    "ROLLBACK_FAILED",
    "ROLLOUT_STATES",
    "SEND_INSTALL",
    "SEND_PROBE",
    "SEND_ROLLBACK",
    "SEND_SHADOW",
    "SHADOW_RESULT",
    "SHADOW_VERDICT",
    "START_WAVE",
    "SUCCEEDED_STATUSES",
    "VARIANT_MODES",
    "ClassGate",
    "Decision",
    "DeviceProgress",
    "DeviceView",
    "GateSpec",
    "OperatorRequest",
    "OutcomeView",
    "ProbeProgress",
    "ProfileView",
    "RolloutSpec",
    "RolloutState",
    "Selector",
    "ShadowProgress",
    "ShadowSpec",
    "VariantBudget",
    "VariantChoice",
    "WaveSpec",
    "answer_requests",
    "apply",
    "assignment_key",
    "decide",
    "install_args",
    "no_previous_version",
    "parse_waves",
    "plan",
    "request",
    "wave_bounds",
]

# -- vocabulary ------------------------------------------------------------------------------

# Device statuses within a rollout.
PENDING = "pending"                  # assigned to a wave that has not started
WAITING_OFFLINE = "waiting_offline"  # offline when its wave started: not sent, not counted
SENT = "sent"                        # ota_install sent, no final status yet
INSTALLED = "installed"
NO_CHANGE = "no_change"              # already had the version
REJECTED = "rejected"
FAILED = "failed"
ROLLED_BACK = "rolled_back"
TIMED_OUT = "timed_out"              # no final status within wave_timeout_s of the send
ROLLBACK_SENT = "rollback_sent"
ROLLBACK_FAILED = "rollback_failed"  # no rolled_back status within wave_timeout_s of the rollback
EXCLUDED = "excluded"                # left the selector or the fleet, or its class is paused
DEVICE_STATUSES = (PENDING, WAITING_OFFLINE, SENT, INSTALLED, NO_CHANGE, REJECTED, FAILED,
                   ROLLED_BACK, TIMED_OUT, ROLLBACK_SENT, ROLLBACK_FAILED, EXCLUDED)
SUCCEEDED_STATUSES = frozenset({INSTALLED, NO_CHANGE})
FAILED_STATUSES = frozenset({REJECTED, FAILED, ROLLED_BACK, TIMED_OUT})

# Rollout states. ROLLED_BACK is spelled like the device status.
RUNNING = "running"
PAUSED = "paused"
ABORTED = "aborted"
COMPLETED = "completed"
ROLLOUT_STATES = (RUNNING, PAUSED, ABORTED, COMPLETED, ROLLED_BACK)
FINISHED_STATES = frozenset({ABORTED, COMPLETED, ROLLED_BACK})

OPERATOR_ACTIONS = ("pause", "resume", "abort", "rollback")
ON_FAILURE_ACTIONS = ("pause", "abort", "rollback")

# Decision kinds (docs/rollouts.md, "Decisions").
ASSIGN = "assign"
SEND_INSTALL = "send_install"
SEND_ROLLBACK = "send_rollback"
MARK = "mark"
START_WAVE = "start_wave"
GATE_PASSED = "gate_passed"
GATE_TRIPPED = "gate_tripped"
PAUSE = "pause"
RESUME = "resume"
ABORT = "abort"
ROLLBACK = "rollback"
COMPLETE = "complete"
REFUSE = "refuse"
SEND_PROBE = "send_probe"            # ota_install with probe: true (variants="auto")
PROBE_RESULT = "probe_result"        # a probe's end: probed, failed or timed out
CHOOSE_VARIANT = "choose_variant"    # a class's variant, or its exclusion, with the figures
SEND_SHADOW = "send_shadow"          # ota_install with shadow: true (spec.shadow)
SHADOW_RESULT = "shadow_result"      # a shadow install's end: shadowing, failed or timed out
SHADOW_VERDICT = "shadow_verdict"    # a class's shadow verdict (pass, or stopped), the figures
DECISION_KINDS = (ASSIGN, SEND_INSTALL, SEND_ROLLBACK, MARK, START_WAVE, GATE_PASSED,
                  GATE_TRIPPED, PAUSE, RESUME, ABORT, ROLLBACK, COMPLETE, REFUSE, SEND_PROBE,
                  PROBE_RESULT, CHOOSE_VARIANT, SEND_SHADOW, SHADOW_RESULT, SHADOW_VERDICT)

# Variant selection (docs/rollouts.md, "Variants per device class").
VARIANT_MODES = ("off", "auto")
PROBED = "probed"                    # the OTA outcome of a probe install
VARIANT_GATE = "variant"             # ClassGate.gate of a class no variant fits

# Shadow evaluation (docs/rollouts.md, "Shadow evaluation").
SHADOWING = "shadowing"              # the OTA outcome of a shadow install
SHADOW_STOPPED = "stopped"           # a shadow the rollout ended with shadow_stop
SHADOW_GATE = "shadow"               # ClassGate.gate of a class the shadow verdict stopped
SHADOW_KINDS = ("classifier", "regressor", "lm")


# -- the spec --------------------------------------------------------------------------------


def _is_number(value: object) -> bool:
    return (not isinstance(value, bool) and isinstance(value, (int, float))
            and math.isfinite(value))


@dataclass(frozen=True)
class WaveSpec:
    """One wave: ``percent`` (cumulative share of the targeted devices, ``size`` in 0..100],
    ``count`` (this many more devices) or ``all`` (every device left)."""

    kind: str
    size: float = 0.0

    def __post_init__(self) -> None:
        if self.kind == "percent":
            if not (_is_number(self.size) and 0.0 < self.size <= 100.0):
                raise RolloutError(f"a percent wave must be within (0, 100], got {self.size!r}")
        elif self.kind == "count":
            if (not _is_number(self.size) or self.size < 1
                    or float(self.size) != int(self.size)):
                raise RolloutError(f"a count wave must be a whole number >= 1, got {self.size!r}")
        elif self.kind != "all":
            raise RolloutError(f"wave kind must be percent, count or all, got {self.kind!r}")

    @classmethod
    def percent(cls, share: float) -> WaveSpec:
        return cls("percent", float(share))

    @classmethod
    def count(cls, devices: int) -> WaveSpec:
        return cls("count", float(devices))

    @classmethod
    def all(cls) -> WaveSpec:
        return cls("all")

    @classmethod
    def parse(cls, text: Union[str, int, WaveSpec]) -> WaveSpec:
        """``"10%"`` -> percent, ``"5"`` or ``5`` -> count, ``"all"`` -> all."""
        if isinstance(text, WaveSpec):
            return text
        if isinstance(text, int) and not isinstance(text, bool):
            return cls.count(text)
        if not isinstance(text, str):
            raise RolloutError(f"a wave is written 10%, 5 or all, got {text!r}")
        value = text.strip().lower()
        try:
            if value == "all":
                return cls.all()
            if value.endswith("%"):
                return cls.percent(float(value[:-1]))
            return cls.count(int(value))
        except ValueError:
            raise RolloutError(f"a wave is written 10%, 5 or all, got {text!r}") from None

    def __str__(self) -> str:
        if self.kind == "percent":
            return f"{self.size:g}%"
        if self.kind == "count":
            return str(int(self.size))
        return "all"


def parse_waves(spec: Union[str, Iterable[Union[str, int, WaveSpec]]]) -> tuple[WaveSpec, ...]:
    """``"1%,10%,50%,100%"`` or ``["1", "5", "all"]`` -> wave specs."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    return tuple(WaveSpec.parse(item) for item in items)


DEFAULT_WAVES = parse_waves("1%,10%,50%,100%")


@dataclass(frozen=True)
class DeviceView:
    """What the engine needs to know about a registered device, from the controller's registry."""

    device_id: str
    device_class: str
    tags: Mapping[str, str] = field(default_factory=dict)
    online: bool = True


@dataclass(frozen=True)
class Selector:
    """The targeted devices. Every kind that is given must match: the class is one of
    ``device_classes``, every pair of ``tags`` is among the device's tags, the id is one of
    ``device_ids``. An empty selector targets every device."""

    device_classes: tuple[str, ...] = ()
    tags: Mapping[str, str] = field(default_factory=dict)
    device_ids: tuple[str, ...] = ()

    def matches(self, device: DeviceView) -> bool:
        if self.device_classes and device.device_class not in self.device_classes:
            return False
        if any(device.tags.get(k) != v for k, v in self.tags.items()):
            return False
        return not self.device_ids or device.device_id in self.device_ids

    def __str__(self) -> str:
        parts = []
        if self.device_classes:
            parts.append("class in " + ",".join(self.device_classes))
        parts.extend(f"{k}={v}" for k, v in sorted(self.tags.items()))
        if self.device_ids:
            parts.append("id in " + ",".join(self.device_ids))
        return " and ".join(parts) or "every device"


@dataclass(frozen=True)
class RolloutSpec:
    """What to roll out, to whom, in which waves and under which limits.

    ``success_threshold``: share of a wave's counted devices that must end ``installed`` or
    ``no_change`` before the next wave starts. ``failure_threshold``: when the share of failed
    devices (rejected, failed, rolled back, timed out) goes *above* it, ``on_failure`` happens
    (``pause``, ``abort`` or ``rollback``); 0.0 reacts to the first failure. ``wave_timeout_s``:
    how long a device has, after the install is sent, for its final status (and its profile).
    ``replace_offline``: a device offline at the start of its wave is replaced in that wave by the
    next online device of a later wave, so that a canary wave is not passed by absent devices.
    ``max_in_flight``: at most this many devices have the install and no final status at once
    (0: no limit); the rest of a wave wait their turn, and the failure threshold is judged on
    the devices sent so far, so a bad release stops before the whole wave has it. It bounds
    what a large wave costs the broker (about two 512 KiB blocks per downloading device) and
    the fleet side (progress statuses).

    ``variants="auto"`` (a release with more than one variant, named in ``variant_names``):
    before the first wave, ``probe_devices_per_class`` online devices of each class probe every
    variant (``ota_install`` with ``probe: true``); each class then gets the variant that passed
    on all of them and fits its ``budgets`` (device class -> :class:`VariantBudget`) with the best
    fidelity, or the variant ``pins`` names for it; every install names its class's variant.
    """

    rollout_id: str
    release_id: str
    model: str
    version: int
    previous_version: Optional[int] = None
    selector: Selector = field(default_factory=Selector)
    waves: tuple[WaveSpec, ...] = DEFAULT_WAVES
    success_threshold: float = 1.0
    failure_threshold: float = 0.0
    on_failure: str = "pause"
    wave_timeout_s: float = 600.0
    gates: GateSpec = field(default_factory=GateSpec)
    chunk_size: int = DEFAULT_CHUNK_SIZE
    replace_offline: bool = True
    max_in_flight: int = 0
    variants: str = "off"
    variant_names: tuple[str, ...] = ()
    probe_devices_per_class: int = 2
    pins: Mapping[str, str] = field(default_factory=dict)
    budgets: Mapping[str, VariantBudget] = field(default_factory=dict)
    shadow: Optional[ShadowSpec] = None

    @property
    def probing(self) -> bool:
        """Whether the rollout probes variants and chooses one per class (else nothing about
        variants changes: a release with one variant, or the option off)."""
        return self.variants == "auto" and len(self.variant_names) > 1

    def __post_init__(self) -> None:
        for name in ("rollout_id", "release_id", "model"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise RolloutError(f"{name} must be a non-empty string")
        for name in ("version", "previous_version"):
            value = getattr(self, name)
            if value is None and name == "previous_version":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise RolloutError(f"{name} must be an integer >= 0, got {value!r}")
        if not self.waves or not all(isinstance(w, WaveSpec) for w in self.waves):
            raise RolloutError("waves must be a non-empty tuple of WaveSpec (see parse_waves)")
        last = self.waves[-1]
        if not (last.kind == "all" or (last.kind == "percent" and last.size == 100.0)):
            raise RolloutError(f"the last wave is {last}: end the waves with 100% or all so that "
                               "every targeted device is covered")
        if any(w.kind == "all" for w in self.waves[:-1]):
            raise RolloutError("only the last wave can be 'all'")
        for name in ("success_threshold", "failure_threshold"):
            value = getattr(self, name)
            if not (_is_number(value) and 0.0 <= value <= 1.0):
                raise RolloutError(f"{name} must be a fraction within 0..1, got {value!r}")
        if self.on_failure not in ON_FAILURE_ACTIONS:
            raise RolloutError(f"on_failure must be one of {', '.join(ON_FAILURE_ACTIONS)}, "
                               f"got {self.on_failure!r}")
        if not (_is_number(self.wave_timeout_s) and 0.0 < self.wave_timeout_s < math.inf):
            raise RolloutError(f"wave_timeout_s must be a number > 0, got {self.wave_timeout_s!r}")
        if (isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, int)
                or not MIN_CHUNK_SIZE <= self.chunk_size <= MAX_CHUNK_SIZE):
            raise RolloutError(f"chunk_size must be {MIN_CHUNK_SIZE}..{MAX_CHUNK_SIZE} bytes")
        if (isinstance(self.max_in_flight, bool) or not isinstance(self.max_in_flight, int)
                or self.max_in_flight < 0):
            raise RolloutError(f"max_in_flight must be an integer >= 0 (0: no limit), got "
                               f"{self.max_in_flight!r}")
        if self.variants not in VARIANT_MODES:
            raise RolloutError(f"variants must be one of {', '.join(VARIANT_MODES)}, got "
                               f"{self.variants!r}")
        if (isinstance(self.probe_devices_per_class, bool)
                or not isinstance(self.probe_devices_per_class, int)
                or self.probe_devices_per_class < 1):
            raise RolloutError(f"probe_devices_per_class must be an integer >= 1, got "
                               f"{self.probe_devices_per_class!r}")
        if self.pins and self.variants != "auto":
            raise RolloutError("pins choose a variant per class and go with variants=\"auto\" "
                               "(--variants auto)")
        unknown = sorted(v for v in self.pins.values() if v not in self.variant_names)
        if unknown and self.variant_names:
            raise RolloutError(f"pinned variant(s) {', '.join(unknown)} are not in the release "
                               f"(its variants: {', '.join(self.variant_names)}): pin one of "
                               "those")
        if self.shadow is not None and not isinstance(self.shadow, ShadowSpec):
            raise RolloutError("shadow must be a ShadowSpec (or None)")
        if self.shadow is not None and self.probing:
            raise RolloutError("shadow evaluation and variants=\"auto\" do not go together "
                               "yet: roll out one variant in shadow, or probe without shadow")

    def to_dict(self) -> dict[str, Any]:
        return {
            "rollout_id": self.rollout_id,
            "release_id": self.release_id,
            "model": self.model,
            "version": self.version,
            "previous_version": self.previous_version,
            "selector": {"device_classes": list(self.selector.device_classes),
                         "tags": dict(self.selector.tags),
                         "device_ids": list(self.selector.device_ids)},
            "waves": [str(w) for w in self.waves],
            "success_threshold": self.success_threshold,
            "failure_threshold": self.failure_threshold,
            "on_failure": self.on_failure,
            "wave_timeout_s": self.wave_timeout_s,
            "gates": self.gates.to_dict(),
            "chunk_size": self.chunk_size,
            "replace_offline": self.replace_offline,
            "max_in_flight": self.max_in_flight,
            # only when set, so that a spec without variants is stored as before
            **({"variants": self.variants, "variant_names": list(self.variant_names),
                "probe_devices_per_class": self.probe_devices_per_class,
                "pins": dict(sorted(self.pins.items())),
                "budgets": {c: b.to_dict() for c, b in sorted(self.budgets.items())}}
               if self.variants != "off" or self.variant_names else {}),
            # only when set, so that a spec without shadow is stored as before
            **({"shadow": self.shadow.to_dict()} if self.shadow is not None else {}),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RolloutSpec:
        try:
            return cls._from_dict(data)
        except (KeyError, TypeError, AttributeError) as exc:
            raise RolloutError(f"stored rollout spec is malformed ({exc!r})") from exc

    @classmethod
    def _from_dict(cls, data: Mapping[str, Any]) -> RolloutSpec:
        sel = data.get("selector", {})
        return cls(
            rollout_id=data["rollout_id"],
            release_id=data["release_id"],
            model=data["model"],
            version=data["version"],
            previous_version=data.get("previous_version"),
            selector=Selector(tuple(sel.get("device_classes", ())), dict(sel.get("tags", {})),
                              tuple(sel.get("device_ids", ()))),
            waves=parse_waves(data.get("waves", [str(w) for w in DEFAULT_WAVES])),
            success_threshold=data.get("success_threshold", 1.0),
            failure_threshold=data.get("failure_threshold", 0.0),
            on_failure=data.get("on_failure", "pause"),
            wave_timeout_s=data.get("wave_timeout_s", 600.0),
            gates=GateSpec.from_dict(data.get("gates", {})),
            chunk_size=data.get("chunk_size", DEFAULT_CHUNK_SIZE),
            replace_offline=data.get("replace_offline", True),
            max_in_flight=data.get("max_in_flight", 0),
            variants=data.get("variants", "off"),
            variant_names=tuple(data.get("variant_names", ())),
            probe_devices_per_class=data.get("probe_devices_per_class", 2),
            pins=dict(data.get("pins", {})),
            budgets={str(c): VariantBudget.from_dict(b)
                     for c, b in data.get("budgets", {}).items()},
            shadow=(ShadowSpec.from_dict(data["shadow"]) if data.get("shadow") is not None
                    else None),
        )


@dataclass(frozen=True)
class ShadowSpec:
    """Shadow evaluation before any device switches: every targeted online device first runs
    the release beside its active model (``ota_install`` with ``shadow: true``), and each
    class's verdict from :func:`fleet.shadow_gate.shadow_verdict` decides whether its devices
    install it (pass) or the class is stopped (fail, or no verdict within ``timeout_s``).

    ``min_agreement``, ``min_samples`` and ``p95_budget_ratio`` are the gate's limits (``None``
    switches the latency check off); ``sample_rate``, ``cpu_budget`` and the ratio are also
    sent to the devices (``shadow_sample_rate``, ``shadow_cpu_budget``, ``shadow_p95_ratio``).
    ``kind``: how outputs are compared, ``classifier`` (top-1), ``regressor`` (within
    ``error_bound``) or ``lm`` (greedy tokens: a language model needs no kind, none is sent).
    """

    min_agreement: float = 0.98
    min_samples: int = 200
    p95_budget_ratio: Optional[float] = 1.25
    sample_rate: float = 0.2
    cpu_budget: float = 0.25
    kind: str = "classifier"
    error_bound: Optional[float] = None
    timeout_s: float = 3600.0

    def __post_init__(self) -> None:
        if not (_is_number(self.min_agreement) and 0.0 <= self.min_agreement <= 1.0):
            raise RolloutError(f"shadow min_agreement must be a fraction within 0..1, got "
                               f"{self.min_agreement!r}")
        if (isinstance(self.min_samples, bool) or not isinstance(self.min_samples, int)
                or self.min_samples < 1):
            raise RolloutError(f"shadow min_samples must be an integer >= 1, got "
                               f"{self.min_samples!r}")
        if self.p95_budget_ratio is not None and not (
                _is_number(self.p95_budget_ratio) and 1.0 <= self.p95_budget_ratio <= 100.0):
            raise RolloutError(f"shadow p95_budget_ratio must be within 1..100 (or None), got "
                               f"{self.p95_budget_ratio!r}")
        for name in ("sample_rate", "cpu_budget"):
            value = getattr(self, name)
            if not (_is_number(value) and 0.0 < value <= 1.0):
                raise RolloutError(f"shadow {name} must be above 0 and at most 1, got "
                                   f"{value!r}")
        if self.kind not in SHADOW_KINDS:
            raise RolloutError(f"shadow kind must be one of {', '.join(SHADOW_KINDS)}, got "
                               f"{self.kind!r}")
        if self.kind == "regressor" and not (_is_number(self.error_bound)
                                             and self.error_bound is not None
                                             and self.error_bound > 0):
            raise RolloutError("a regressor shadow needs error_bound > 0: the largest absolute "
                               "output difference that still agrees (--shadow-error-bound)")
        if self.kind != "regressor" and self.error_bound is not None:
            raise RolloutError("error_bound goes with the regressor kind only")
        if not (_is_number(self.timeout_s) and self.timeout_s > 0):
            raise RolloutError(f"shadow timeout_s must be a number > 0, got "
                               f"{self.timeout_s!r}")

    def install_args(self) -> dict[str, Any]:
        """The shadow options of the ``ota_install`` (besides ``release_id``, ``chunk_size``)."""
        args: dict[str, Any] = {"shadow": True, "shadow_sample_rate": self.sample_rate,
                                "shadow_cpu_budget": self.cpu_budget}
        if self.p95_budget_ratio is not None:
            args["shadow_p95_ratio"] = self.p95_budget_ratio
        if self.kind != "lm":
            args["shadow_kind"] = self.kind
        if self.error_bound is not None:
            args["shadow_error_bound"] = self.error_bound
        return args

    def to_dict(self) -> dict[str, Any]:
        return {"min_agreement": self.min_agreement, "min_samples": self.min_samples,
                "p95_budget_ratio": self.p95_budget_ratio, "sample_rate": self.sample_rate,
                "cpu_budget": self.cpu_budget, "kind": self.kind,
                "error_bound": self.error_bound, "timeout_s": self.timeout_s}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ShadowSpec:
        known = {k: data[k] for k in cls().to_dict() if k in data}
        return cls(**known)


# -- inputs ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class OutcomeView:
    """The final OTA status of one install (``fleetlite.ota_status/1`` with ``final: true``).

    ``ts`` must be on the controller's clock (when the status was received), because it is
    compared with the time the install was sent: a status older than the send is ignored.
    """

    device_id: str
    release_id: str
    outcome: str
    reason: str = ""
    message: str = ""
    ts: float = 0.0
    progress: Mapping[str, Any] = field(default_factory=dict)  # a probe's figures (probed)

    @classmethod
    def from_status(cls, status: OtaStatus, received_at: float) -> OutcomeView:
        if not status.final:
            raise RolloutError("only final OTA statuses are outcomes")
        return cls(status.device_id, status.release_id, status.outcome, status.reason,
                   status.message, received_at,
                   status.progress if status.outcome == PROBED else {})


# -- the state -------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceProgress:
    """One device within the rollout. ``reason`` is the last decision's sentence, ``code`` a
    machine-readable reason (the device's OTA reason code, or the engine's)."""

    device_id: str
    device_class: str
    wave: int
    status: str = PENDING
    reason: str = ""
    code: str = ""
    sent_at: Optional[float] = None
    updated_at: Optional[float] = None


@dataclass(frozen=True)
class ProbeProgress:
    """One device's probe of the release's variants: ``status`` is ``sent``, ``probed``,
    ``failed`` (any other final status, ``code`` its reason) or ``timed_out``; ``variants`` the
    figures of a ``probed`` answer (its ``progress.variants``)."""

    device_id: str
    device_class: str
    status: str = SENT
    reason: str = ""
    code: str = ""
    sent_at: Optional[float] = None
    updated_at: Optional[float] = None
    variants: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ShadowProgress:
    """One device's shadow of the release: ``status`` is ``sent``, ``shadowing`` (its final
    OTA status said so), ``failed`` (any other final status, ``code`` its reason, e.g.
    ``shadow_unavailable``), ``timed_out`` or ``stopped`` (the rollout sent ``shadow_stop``)."""

    device_id: str
    device_class: str
    status: str = SENT
    reason: str = ""
    code: str = ""
    sent_at: Optional[float] = None
    updated_at: Optional[float] = None


@dataclass(frozen=True)
class ClassGate:
    """The gate verdict for one device class in one wave. ``evaluated`` counts the installed
    devices it judged (the class is judged again if more install in the same wave)."""

    wave: int
    device_class: str
    passed: bool
    evaluated: int
    gate: str = ""
    reason: str = ""


@dataclass(frozen=True)
class OperatorRequest:
    """An operator's ``pause``, ``resume``, ``abort`` or ``rollback``, with an optional note.
    ``remove_model``: a rollback of a rollout that installed the model's first version removes
    the model from the devices (without it, such a rollback is refused)."""

    action: str
    note: str = ""
    remove_model: bool = False


@dataclass(frozen=True)
class RolloutState:
    """What the controller persists for a rollout between calls to :func:`decide`.

    ``current_wave`` is 0 before the first wave starts; waves are numbered from 1.
    ``paused_classes`` maps a device class to the gate verdict that excluded it.
    ``override_wave``: the wave whose thresholds an operator overrode by resuming after a
    threshold pause. ``operator_requests`` are handled in order, one decision each.
    """

    state: str = RUNNING
    current_wave: int = 0
    devices: Mapping[str, DeviceProgress] = field(default_factory=dict)
    paused_classes: Mapping[str, ClassGate] = field(default_factory=dict)
    gates: Mapping[str, ClassGate] = field(default_factory=dict)
    operator_requests: tuple[OperatorRequest, ...] = ()
    paused_by: str = ""
    override_wave: int = 0
    reason: str = ""
    remove_model: bool = False  # rolled back by removing the model (it was the first version)
    probes: Mapping[str, ProbeProgress] = field(default_factory=dict)
    variant_choices: Mapping[str, VariantChoice] = field(default_factory=dict)
    shadows: Mapping[str, ShadowProgress] = field(default_factory=dict)
    # device class -> the shadow verdict: verdict, codes, reasons, figures, stopped devices
    shadow_verdicts: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return self.state in FINISHED_STATES

    def counts(self, wave: Optional[int] = None) -> dict[str, int]:
        """Devices per status, of one wave or of the whole rollout."""
        found = Counter(d.status for d in self.devices.values() if wave in (None, d.wave))
        return dict(sorted(found.items()))

    def to_dict(self, *, devices: bool = True) -> dict[str, Any]:
        """The state as JSON data; ``devices=False`` leaves out the per-device map (the store
        keeps it as one row per device, written apart: ``Store.apply_decisions``)."""
        return {
            "state": self.state,
            "current_wave": self.current_wave,
            **({"devices": {k: vars(v).copy() for k, v in sorted(self.devices.items())}}
               if devices else {}),
            "paused_classes": {k: vars(v).copy() for k, v in sorted(self.paused_classes.items())},
            "gates": {k: vars(v).copy() for k, v in sorted(self.gates.items())},
            "operator_requests": [vars(r).copy() for r in self.operator_requests],
            "paused_by": self.paused_by,
            "override_wave": self.override_wave,
            "reason": self.reason,
            "remove_model": self.remove_model,
            **({"probes": {k: {**vars(v), "variants": dict(v.variants)}
                           for k, v in sorted(self.probes.items())}} if self.probes else {}),
            **({"variant_choices": {k: v.to_dict()
                                    for k, v in sorted(self.variant_choices.items())}}
               if self.variant_choices else {}),
            **({"shadows": {k: vars(v).copy() for k, v in sorted(self.shadows.items())}}
               if self.shadows else {}),
            **({"shadow_verdicts": {k: dict(v) for k, v in sorted(self.shadow_verdicts.items())}}
               if self.shadow_verdicts else {}),
        }

    @classmethod
    def from_stored(cls, data: Mapping[str, Any]) -> RolloutState:
        """The state of a stored rollout: a document without ``state`` is a rollout created
        without one (``Store.create_rollout``'s default), which has not started."""
        if "state" not in data:
            return cls.from_dict({**cls().to_dict(), "devices": data.get("devices", {})})
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RolloutState:
        try:
            return cls(
                state=data["state"],
                current_wave=data["current_wave"],
                devices={k: DeviceProgress(**v) for k, v in data.get("devices", {}).items()},
                paused_classes={k: ClassGate(**v)
                                for k, v in data.get("paused_classes", {}).items()},
                gates={k: ClassGate(**v) for k, v in data.get("gates", {}).items()},
                operator_requests=tuple(OperatorRequest(**r)
                                        for r in data.get("operator_requests", ())),
                paused_by=data.get("paused_by", ""),
                override_wave=data.get("override_wave", 0),
                reason=data.get("reason", ""),
                remove_model=bool(data.get("remove_model", False)),
                probes={k: ProbeProgress(**v) for k, v in data.get("probes", {}).items()},
                variant_choices={k: VariantChoice.from_dict(v)
                                 for k, v in data.get("variant_choices", {}).items()},
                shadows={k: ShadowProgress(**v) for k, v in data.get("shadows", {}).items()},
                shadow_verdicts={k: dict(v) for k, v in data.get("shadow_verdicts", {}).items()},
            )
        except (KeyError, TypeError) as exc:
            raise RolloutError(f"stored rollout state is malformed ({exc})") from exc


@dataclass(frozen=True)
class Decision:
    """One thing the engine decided: ``kind`` (see DECISION_KINDS), a sentence for people, the
    device/wave/class it concerns and structured ``detail`` (for sends: ``command`` and ``args``
    of the agent command)."""

    kind: str
    reason: str
    device_id: Optional[str] = None
    wave: Optional[int] = None
    device_class: Optional[str] = None
    detail: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "reason": self.reason, "device_id": self.device_id,
                "wave": self.wave, "device_class": self.device_class,
                "detail": dict(self.detail)}


def request(state: RolloutState, action: str, note: str = "", *,
            remove_model: bool = False) -> RolloutState:
    """The state with an operator request queued; the next :func:`decide` handles it."""
    if action not in OPERATOR_ACTIONS:
        raise RolloutError(f"operator action must be one of {', '.join(OPERATOR_ACTIONS)}, "
                           f"got {action!r}")
    if remove_model and action != "rollback":
        raise RolloutError("remove_model goes with a rollback only")
    return replace(state, operator_requests=(*state.operator_requests,
                                             OperatorRequest(action, note, remove_model)))


# -- planning --------------------------------------------------------------------------------


def assignment_key(rollout_id: str, device_id: str) -> str:
    """The stable hash that orders devices within a rollout."""
    return hashlib.sha256(f"{rollout_id}\0{device_id}".encode()).hexdigest()


def wave_bounds(waves: Sequence[WaveSpec], devices: int) -> list[int]:
    """Cumulative device counts at the end of each wave, for ``devices`` targeted devices.
    Every wave gets at least one device while devices are left."""
    bounds: list[int] = []
    end = 0
    for wave in waves:
        if wave.kind == "all":
            target = devices
        elif wave.kind == "count":
            target = end + int(wave.size)
        else:
            # round() first: 10% of 30 is 3.0000000000000004 in binary floating point
            target = math.ceil(round(devices * wave.size / 100.0, 9))
        end = min(max(target, end + 1), devices)
        bounds.append(end)
    return bounds


def plan(spec: RolloutSpec, devices: Iterable[DeviceView]) -> dict[str, int]:
    """Device id -> wave (from 1) for the devices the selector targets.

    Devices are ordered by :func:`assignment_key`, stratified by device class (each class is
    spread over the waves in proportion to its size), then cut by :func:`wave_bounds`. The same
    devices always give the same waves.
    """
    targets = {d.device_id: d for d in devices if spec.selector.matches(d)}
    by_class: dict[str, list[str]] = {}
    for device_id in sorted(targets, key=lambda i: assignment_key(spec.rollout_id, i)):
        by_class.setdefault(targets[device_id].device_class, []).append(device_id)
    ranked = sorted(((i + 0.5) / len(ids), assignment_key(spec.rollout_id, device_id), device_id)
                    for ids in by_class.values() for i, device_id in enumerate(ids))
    order = [device_id for _, _, device_id in ranked]
    waves: dict[str, int] = {}
    start = 0
    for number, end in enumerate(wave_bounds(spec.waves, len(order)), start=1):
        for device_id in order[start:end]:
            waves[device_id] = number
        start = end
    return waves


# -- deciding --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Inputs:
    views: Mapping[str, DeviceView]
    outcomes: Mapping[str, Sequence[OutcomeView]]
    profiles: Sequence[ProfileView]
    now: float
    probe_outcomes: Mapping[str, Sequence[OutcomeView]] = field(default_factory=dict)
    shadow_reports: Sequence[ShadowReport] = ()


def decide(
    spec: RolloutSpec,
    state: RolloutState,
    devices: Sequence[DeviceView],
    profiles: Sequence[ProfileView],
    now: float,
    *,
    outcomes: Sequence[OutcomeView],
    shadow_reports: Sequence[ShadowReport] = (),
) -> list[Decision]:
    """Everything to do now, in order. Pure: the same arguments give the same decisions.

    ``devices``: every registered device (the selector is applied here). ``profiles``: profile
    records of ``spec.model``, of the new and the previous version (the previous version's are
    the gate baseline). ``outcomes``: final OTA statuses of ``spec.release_id``, ``ts`` on the
    controller's clock. ``shadow_reports``: the devices' shadow reports of ``spec.release_id``
    (the newest per device counts; only read when ``spec.shadow`` is set). Rules run until
    none has anything to add, so ``decide(spec, apply(state, decisions, now), ...)`` with the
    same inputs returns ``[]``.
    """
    history: dict[str, list[OutcomeView]] = {}
    probe_history: dict[str, list[OutcomeView]] = {}  # every final status, probed included
    for outcome in sorted(outcomes, key=lambda o: o.ts):
        if outcome.release_id == spec.release_id and outcome.outcome in OTA_OUTCOMES:
            probe_history.setdefault(outcome.device_id, []).append(outcome)
            if outcome.outcome not in (PROBED, SHADOWING):
                history.setdefault(outcome.device_id, []).append(outcome)
    inputs = _Inputs(views={d.device_id: d for d in devices}, outcomes=history,
                     profiles=[p for p in profiles if p.model == spec.model], now=now,
                     probe_outcomes=probe_history,
                     shadow_reports=[r for r in shadow_reports
                                     if r.release_id == spec.release_id])
    work = state
    decided: list[Decision] = []
    budget = 16 * (len(state.devices) + len(devices) + len(spec.waves)) + 64
    step = 0
    while step < len(_RULES):
        found = _RULES[step](spec, work, inputs)
        if not found:
            step += 1
            continue
        decided.extend(found)
        work = apply(work, found, now)
        step = 0
        budget -= 1
        if budget < 0:
            raise RolloutError("the rollout engine did not settle; this is a bug: report it "
                               "with the rollout's state")
    return decided


def answer_requests(spec: RolloutSpec, state: RolloutState, now: float) -> list[Decision]:
    """The answers to the operator's queued requests, and nothing else: what :func:`decide`
    would decide first (its first rule), from the rollout-level state alone, so that a
    controller can answer without reading the devices, profiles and outcomes. Deciding the rest
    on the applied state gives what one :func:`decide` call would have."""
    inputs = _Inputs(views={}, outcomes={}, profiles=[], now=now)
    work = state
    decided: list[Decision] = []
    while work.operator_requests:
        found = _operator_rule(spec, work, inputs)
        decided.extend(found)
        work = apply(work, found, now)
    return decided


def _operator_rule(spec: RolloutSpec, st: RolloutState, inputs: _Inputs) -> list[Decision]:
    if not st.operator_requests:
        return []
    req = st.operator_requests[0]
    note = f" ({req.note})" if req.note else ""
    detail = {"operator": True, "action": req.action, "note": req.note}
    if req.action == "pause" and st.state == RUNNING:
        return [Decision(PAUSE, f"paused by the operator{note}",
                         detail={**detail, "by": "operator"})]
    if req.action == "resume" and st.state == PAUSED:
        overrides = st.paused_by == "threshold"
        extra = (f"; the thresholds of wave {st.current_wave} are overridden"
                 if overrides else "")
        return [Decision(RESUME, f"resumed by the operator{note}{extra}", wave=st.current_wave,
                         detail={**detail, "overrides_thresholds": overrides})]
    if req.action == "abort" and st.state in (RUNNING, PAUSED):
        return [Decision(ABORT, f"aborted by the operator{note}: no further installs are sent; "
                         "installed devices keep the release", detail=detail)]
    if req.action == "rollback" and st.state != ROLLED_BACK:
        if spec.previous_version is None and req.remove_model:
            return [Decision(ROLLBACK, f"rolled back by the operator{note}: {spec.model} is "
                             f"removed from every device that installed v{spec.version}, its "
                             "first version there", detail={**detail, "remove_model": True})]
        if spec.previous_version is None:
            return [Decision(REFUSE, no_previous_version(spec, "operator rollback refused"),
                             detail=detail)]
        return [Decision(ROLLBACK, f"rolled back by the operator{note}: every device that "
                         "installed this release is rolled back", detail=detail)]
    return [Decision(REFUSE, f"operator {req.action} refused: the rollout is {st.state}",
                     detail=detail)]


def no_previous_version(spec: RolloutSpec, what: str) -> str:
    """Why a rollout whose devices had no earlier version of the model cannot be rolled back."""
    return (f"{what}: the devices had no earlier version of {spec.model} (this rollout installed "
            f"its first, v{spec.version}), so there is nothing to roll back to; abort the "
            "rollout to stop further installs, or roll back with --remove-model to remove "
            f"{spec.model} from the devices that installed it")


def _plan_rule(spec: RolloutSpec, st: RolloutState, inputs: _Inputs) -> list[Decision]:
    if st.state != RUNNING or st.current_wave != 0 or st.devices:
        return []
    waves = plan(spec, inputs.views.values())
    return [Decision(ASSIGN, f"{device_id} is targeted ({spec.selector}); planned into wave "
                     f"{wave}", device_id=device_id, wave=wave,
                     device_class=inputs.views[device_id].device_class,
                     detail={"late": False})
            for device_id, wave in sorted(waves.items(), key=lambda kv: (kv[1], kv[0]))]


def _probe_rule(spec: RolloutSpec, st: RolloutState, inputs: _Inputs) -> list[Decision]:
    """The probe wave: before the first wave, the first ``probe_devices_per_class`` online
    devices of each class (in wave order) are sent ``ota_install`` with ``probe: true``. A class
    with a probe or a choice already is not probed again; one with no online device gets none
    (:func:`_choose_rule` then decides it without figures)."""
    if not spec.probing or st.state != RUNNING or st.current_wave != 0 or not st.devices:
        return []
    probed = {p.device_class for p in st.probes.values()} | set(st.variant_choices)
    key = _order_key(spec)
    found = []
    for cls in sorted({d.device_class for d in st.devices.values()} - probed):
        members = sorted((d for d in st.devices.values()
                          if d.device_class == cls and _online(inputs, d.device_id)),
                         key=lambda d: (d.wave, key(d)))
        for dev in members[:spec.probe_devices_per_class]:
            found.append(Decision(
                SEND_PROBE, f"probe sent to {dev.device_id}: it measures every variant of the "
                f"release ({', '.join(spec.variant_names)}) for class {cls} and installs none",
                device_id=dev.device_id, device_class=cls,
                detail={"command": "ota_install", "args": probe_args(spec)}))
    return found


_Answerable = TypeVar("_Answerable", ProbeProgress, ShadowProgress)


def _answers(sent: Iterable[_Answerable], inputs: _Inputs, timeout_s: float
             ) -> Iterator[tuple[_Answerable, Optional[OutcomeView]]]:
    """Each sent probe or shadow install, by device, with its device's first final status
    since the send, or None once ``timeout_s`` passed without one (those still waiting are
    left out)."""
    for entry in sorted(sent, key=lambda e: e.device_id):
        if entry.status != SENT or entry.sent_at is None:
            continue
        answer = next((o for o in inputs.probe_outcomes.get(entry.device_id, ())
                       if o.ts >= entry.sent_at), None)
        if answer is None and inputs.now < entry.sent_at + timeout_s:
            continue
        yield entry, answer


def _ended(device_id: str, what: str, answer: OutcomeView) -> tuple[str, dict[str, Any]]:
    """The reason and detail of ``what`` that ended other than as asked (a failure)."""
    code = answer.reason or answer.outcome
    more = f": {answer.message}" if answer.message else ""
    return (f"{device_id}'s {what} ended {answer.outcome} ({code}){more}",
            {"status": FAILED, "code": code})


def _probe_outcome_rule(spec: RolloutSpec, st: RolloutState,
                        inputs: _Inputs) -> list[Decision]:
    """A probe ends with its device's first final status since it was sent (``probed``, or
    any other outcome as a failure), or after ``wave_timeout_s`` without one."""
    found = []
    for probe, answer in _answers(st.probes.values(), inputs, spec.wave_timeout_s):
        detail: dict[str, Any]
        if answer is not None and answer.outcome == PROBED:
            variants = answer.progress.get("variants")
            measured = dict(variants) if isinstance(variants, Mapping) else {}
            passed = sorted(name for name, entry in measured.items()
                            if isinstance(entry, Mapping) and entry.get("passed") is True)
            reason = (f"{probe.device_id} probed {len(measured)} variant(s) for class "
                      f"{probe.device_class}; passed: {', '.join(passed) or 'none'}")
            detail = {"status": PROBED, "code": "", "variants": measured}
        elif answer is not None:
            reason, detail = _ended(probe.device_id, "probe", answer)
            reason += "; its figures are left out of the choice"
        else:
            reason = (f"{probe.device_id} sent no probe result within {spec.wave_timeout_s:g} s: "
                      "its figures are left out of the choice")
            detail = {"status": TIMED_OUT, "code": "timeout"}
        found.append(Decision(PROBE_RESULT, reason, device_id=probe.device_id,
                              device_class=probe.device_class, detail=detail))
    return found


def _choose_rule(spec: RolloutSpec, st: RolloutState, inputs: _Inputs) -> list[Decision]:
    """Once every probe of a class has ended, its variant is chosen (or the class excluded) from
    the figures of the devices that answered ``probed``; the decision carries the figures."""
    if not spec.probing or st.state != RUNNING or st.current_wave != 0 or not st.devices:
        return []
    found = []
    for cls in sorted({d.device_class for d in st.devices.values()} - set(st.variant_choices)):
        probes = [p for p in st.probes.values() if p.device_class == cls]
        if any(p.status == SENT for p in probes):
            continue
        answered = sorted(p.device_id for p in probes if p.status == PROBED)
        results = [r for p in probes if p.status == PROBED
                   for r in probes_from_progress(p.device_id, {"variants": p.variants})]
        choice = choose_variant(cls, spec.variant_names, results, spec.budgets.get(cls),
                                pin=spec.pins.get(cls), probed_devices=answered)
        missed = [f"{p.device_id} {p.status} ({p.code})" for p in
                  sorted(probes, key=lambda p: p.device_id) if p.status != PROBED]
        reason = choice.reason
        if not probes and not choice.pinned:
            reason = (f"class {cls} is excluded: none of its devices was online for the probe; "
                      "roll out again when they are, or pin a variant (--pin CLASS=VARIANT)")
        elif missed:
            reason += f" (probes left out: {', '.join(missed)})"
        found.append(Decision(CHOOSE_VARIANT, reason, device_class=cls,
                              detail={**choice.to_dict(), "reason": reason}))
    return found


def _outcome_rule(spec: RolloutSpec, st: RolloutState, inputs: _Inputs) -> list[Decision]:
    """The device's newest final status since the send is its state: an answer to the install
    while it is ``sent`` or ``timed_out``; a rollback confirmed after an install; and, when it
    arrived after the record last changed, a success after a failure (the device installed on a
    retry, e.g. a re-sent command reached it after it had given up), whatever the rollout's
    state (paused included); a failure after the rollback was sent (the device refused the
    rollback command) makes it ``rollback_failed`` at once. Never from an installed or
    rolled-back device back to a failure: the device's own rollback says that."""
    found = []
    for dev in _sorted(st.devices.values()):
        if dev.sent_at is None:
            continue
        latest = None
        for outcome in inputs.outcomes.get(dev.device_id, ()):
            if outcome.ts >= dev.sent_at:
                latest = outcome
        if latest is None or latest.outcome == dev.status:
            continue
        new, cur = latest.outcome, dev.status
        newer = dev.updated_at is None or latest.ts > dev.updated_at
        if newer and cur == ROLLBACK_SENT and new == FAILED:
            found.append(_mark(dev, ROLLBACK_FAILED, latest.reason,
                               f"{dev.device_id} refused the rollback ({latest.reason}): "
                               f"{latest.message or 'no reason given'}",
                               message=latest.message))
            continue
        if not (cur in (SENT, TIMED_OUT)
                or (new == ROLLED_BACK and cur in (INSTALLED, ROLLBACK_SENT, ROLLBACK_FAILED))
                or (newer and cur in (FAILED, REJECTED) and new in (INSTALLED, NO_CHANGE))):
            continue
        found.append(_mark(dev, new, latest.reason, _outcome_sentence(spec, dev, latest),
                           message=latest.message))
    return found


def _timeout_rule(spec: RolloutSpec, st: RolloutState, inputs: _Inputs) -> list[Decision]:
    found = []
    limit = spec.wave_timeout_s
    for dev in _sorted(st.devices.values()):
        if dev.status == SENT and dev.sent_at is not None and inputs.now >= dev.sent_at + limit:
            found.append(_mark(dev, TIMED_OUT, "timeout",
                               f"{dev.device_id} sent no final status within {limit:g} s of the "
                               "install: counted as failed"))
        elif (dev.status == ROLLBACK_SENT and dev.updated_at is not None
              and inputs.now >= dev.updated_at + limit):
            found.append(_mark(dev, ROLLBACK_FAILED, "rollback_timeout",
                               f"{dev.device_id} did not confirm the rollback within {limit:g} s: "
                               "check the device (ota_slots)"))
    return found


def _membership_rule(spec: RolloutSpec, st: RolloutState, inputs: _Inputs) -> list[Decision]:
    if st.state not in (RUNNING, PAUSED) or st.current_wave == 0:
        return []
    found = []
    for dev in _sorted(st.devices.values()):
        if dev.status not in (PENDING, WAITING_OFFLINE):
            continue
        view = inputs.views.get(dev.device_id)
        if view is None:
            found.append(_mark(dev, EXCLUDED, "left_fleet",
                               f"{dev.device_id} is no longer registered: not sent"))
        elif not spec.selector.matches(view):
            found.append(_mark(dev, EXCLUDED, "left_selector",
                               f"{dev.device_id} no longer matches the selector: not sent"))
    wave = st.current_wave + 1
    extra = (f", an extra wave after the {len(spec.waves)} planned"
             if wave > len(spec.waves) else "")
    joiners = [v for v in inputs.views.values()
               if v.device_id not in st.devices and spec.selector.matches(v)]
    for view in sorted(joiners, key=lambda v: assignment_key(spec.rollout_id, v.device_id)):
        found.append(Decision(
            ASSIGN, f"{view.device_id} joined the selector after the rollout started: assigned "
            f"to wave {wave}{extra}", device_id=view.device_id, wave=wave,
            device_class=view.device_class, detail={"late": True}))
    return found


def _paused_class_rule(spec: RolloutSpec, st: RolloutState, inputs: _Inputs) -> list[Decision]:
    if st.state not in (RUNNING, PAUSED):
        return []
    found = []
    for dev in _sorted(st.devices.values()):
        gate = st.paused_classes.get(dev.device_class)
        if gate is not None and dev.status in (PENDING, WAITING_OFFLINE):
            if gate.gate == SHADOW_GATE:
                found.append(_mark(dev, EXCLUDED, "shadow_stopped",
                                   f"{dev.device_id} is not sent: class {dev.device_class} was "
                                   "stopped by its shadow verdict"))
                continue
            if gate.gate == VARIANT_GATE:
                found.append(_mark(dev, EXCLUDED, "no_variant",
                                   f"{dev.device_id} is not sent: no variant of the release "
                                   f"was chosen for class {dev.device_class}"))
                continue
            found.append(_mark(dev, EXCLUDED, "class_paused",
                               f"{dev.device_id} is not sent: class {dev.device_class} was "
                               f"paused in wave {gate.wave} ({gate.gate} gate)"))
    return found


def _gate_rule(spec: RolloutSpec, st: RolloutState, inputs: _Inputs) -> list[Decision]:
    if st.state not in (RUNNING, PAUSED) or st.current_wave == 0:
        return []
    wave = st.current_wave
    found = []
    classes = sorted({d.device_class for d in st.devices.values()} - set(st.paused_classes))
    for cls in classes:
        members = [d for d in st.devices.values() if d.device_class == cls]
        installed = _sorted(d for d in members if d.wave == wave and d.status == INSTALLED)
        smoke_failed = [d.device_id for d in members
                        if d.status == REJECTED and d.code in spec.gates.smoke_reasons]
        smoke = check_smoke(spec.gates, cls, smoke_failed)
        if not smoke.passed:
            found.append(_trip(cls, wave, smoke.gate, smoke.reason, [smoke], installed))
            continue
        if not installed or any(d.wave == wave and d.status in (PENDING, SENT) for d in members):
            continue
        known = st.gates.get(_gate_key(wave, cls))
        if known is not None and known.passed and known.evaluated >= len(installed):
            continue
        ids = {d.device_id for d in installed}
        profiled = latest_profiles(inputs.profiles, spec.model, spec.version, device_ids=ids)
        waiting = [d for d in installed if d.device_id not in profiled and d.sent_at is not None
                   and inputs.now < d.sent_at + spec.wave_timeout_s]
        if waiting and spec.gates.min_profiles > 0:
            continue
        results = evaluate_class(spec.gates, cls, spec.model, spec.version,
                                 spec.previous_version, ids, inputs.profiles)
        tripped = [r for r in results if not r.passed]
        if tripped:
            found.append(_trip(cls, wave, tripped[0].gate, tripped[0].reason, results, installed))
        else:
            found.append(Decision(
                GATE_PASSED, f"class {cls} passed the gates in wave {wave}: "
                + "; ".join(r.reason for r in results), wave=wave, device_class=cls,
                detail={"evaluated": len(installed),
                        "results": [_result_dict(r) for r in [*results, smoke]]}))
    return found


def _rollback_rule(spec: RolloutSpec, st: RolloutState, inputs: _Inputs) -> list[Decision]:
    found = []
    for dev in _sorted(st.devices.values()):
        if dev.status != INSTALLED:
            continue
        gate = st.paused_classes.get(dev.device_class)
        if st.state == ROLLED_BACK:
            why = "the rollout is rolled back"
        elif gate is not None and gate.wave == dev.wave:
            why = f"the {gate.gate} gate tripped for class {dev.device_class} in wave {gate.wave}"
        else:
            continue
        view = inputs.views.get(dev.device_id)
        if view is None or not view.online:
            continue  # sent when it is back online
        if st.remove_model:
            found.append(Decision(
                SEND_ROLLBACK, f"remove {spec.model} from {dev.device_id} (v{spec.version} was "
                f"its first): {why}", device_id=dev.device_id, wave=dev.wave,
                device_class=dev.device_class,
                detail={"command": "ota_rollback", "args": {"model": spec.model,
                                                            "remove": True}}))
            continue
        found.append(Decision(
            SEND_ROLLBACK, f"roll {dev.device_id} back to its previous model: {why}",
            device_id=dev.device_id, wave=dev.wave, device_class=dev.device_class,
            detail={"command": "ota_rollback", "args": {"model": spec.model}}))
    return found


def _wave_tally(st: RolloutState, wave: int) -> tuple[list[DeviceProgress],
                                                      list[DeviceProgress], list[DeviceProgress]]:
    """A wave's members (classes not paused), those counted for its thresholds (answered or
    still answering) and the failed among them."""
    members = [d for d in st.devices.values()
               if d.wave == wave and d.device_class not in st.paused_classes]
    counted = [d for d in members if d.status in SUCCEEDED_STATUSES | FAILED_STATUSES
               or d.status == SENT]
    return members, counted, [d for d in counted if d.status in FAILED_STATUSES]


def _free_slots(spec: RolloutSpec, st: RolloutState) -> float:
    """How many more installs may be sent now under ``max_in_flight`` (inf: no limit)."""
    if not spec.max_in_flight:
        return math.inf
    if st.override_wave != st.current_wave:
        # a wave above its failure threshold sends no more: the wave's verdict comes first
        _, counted, bad = _wave_tally(st, st.current_wave)
        if counted and len(bad) / len(counted) > spec.failure_threshold:
            return 0
    in_flight = sum(d.status == SENT for d in st.devices.values())
    return max(0, spec.max_in_flight - in_flight)


def _returning_rule(spec: RolloutSpec, st: RolloutState, inputs: _Inputs) -> list[Decision]:
    if st.state != RUNNING or st.current_wave == 0:
        return []
    found = []
    slots = _free_slots(spec, st)
    for dev in _sorted(st.devices.values()):
        view = inputs.views.get(dev.device_id)
        if dev.status != WAITING_OFFLINE or view is None or not view.online:
            continue
        if slots <= 0:
            break
        slots -= 1
        was = (f" (it was offline when wave {dev.wave} started)"
               if dev.wave != st.current_wave else "")
        found.append(_send(spec, st, dev, st.current_wave,
                           f"{dev.device_id} is back online: install sent with wave "
                           f"{st.current_wave}{was}", from_wave=dev.wave))
    return found


def _start_rule(spec: RolloutSpec, st: RolloutState, inputs: _Inputs) -> list[Decision]:
    if st.state != RUNNING or st.current_wave == 0:
        return []
    wave = st.current_wave
    key = _order_key(spec)
    pending = sorted((d for d in st.devices.values() if d.wave == wave and d.status == PENDING),
                     key=key)
    if not pending:
        return []
    spares = sorted((d for d in st.devices.values() if d.wave > wave and d.status == PENDING
                     and _online(inputs, d.device_id)
                     and d.device_class not in st.paused_classes),
                    key=lambda d: (d.wave, key(d)))
    slots = _free_slots(spec, st)
    found = []
    for dev in pending:
        if _online(inputs, dev.device_id):
            if slots > 0:  # else it waits for its turn (max_in_flight)
                slots -= 1
                found.append(_send(spec, st, dev, wave,
                                   f"install sent to {dev.device_id} (wave {wave})"))
            continue
        found.append(_mark(dev, WAITING_OFFLINE, "offline",
                           f"{dev.device_id} is offline at the start of wave {wave}: not sent "
                           "and not counted; it is sent the install when it is back online"))
        if spec.replace_offline and spares and slots > 0:
            slots -= 1
            spare = spares.pop(0)
            found.append(_send(spec, st, spare, wave,
                               f"install sent to {spare.device_id}, moved up from wave "
                               f"{spare.wave} to wave {wave} in place of offline "
                               f"{dev.device_id}", replaces=dev.device_id))
    return found


def _advance_rule(spec: RolloutSpec, st: RolloutState, inputs: _Inputs) -> list[Decision]:
    if st.state != RUNNING:
        return []
    wave = st.current_wave
    passed = "the rollout starts"
    if wave > 0:
        members, counted, bad = _wave_tally(st, wave)
        total = len(counted)
        ok = sum(d.status in SUCCEEDED_STATUSES for d in counted)
        overridden = st.override_wave == wave
        codes = dict(sorted(Counter(d.code for d in bad).items()))
        detail = {"wave": wave, "counted": total, "succeeded": ok, "failed": len(bad),
                  "failure_threshold": spec.failure_threshold,
                  "success_threshold": spec.success_threshold, "codes": codes}
        if total and not overridden and len(bad) / total > spec.failure_threshold:
            listed = ", ".join(f"{c} x{n}" for c, n in codes.items())
            return _on_failure(spec, wave, f"wave {wave}: {len(bad)} of {total} device(s) failed "
                               f"({len(bad) / total:.0%}; {listed}), above the failure threshold "
                               f"of {spec.failure_threshold:.0%}", detail)
        if any(d.status in (SENT, PENDING) for d in members):
            return []  # still answering, or waiting for a turn (max_in_flight)
        for cls in sorted({d.device_class for d in members if d.status == INSTALLED}):
            installed = sum(d.device_class == cls and d.status == INSTALLED for d in members)
            known = st.gates.get(_gate_key(wave, cls))
            if known is None or not known.passed or known.evaluated < installed:
                return []  # the gates have not judged this class yet
        if total == 0 and any(d.status == WAITING_OFFLINE for d in members):
            return []  # nobody to judge yet: wait for an offline device to come back
        # no_change counts as success (the device has the version) but never as "updated"
        unchanged = sum(d.status == NO_CHANGE for d in counted)
        done = f"{ok - unchanged} of {total} device(s) updated" + (
            f", {unchanged} already had v{spec.version}" if unchanged else "")
        if total and not overridden and ok / total < spec.success_threshold:
            return _on_failure(spec, wave, f"wave {wave} ended with {done} ({ok / total:.0%} "
                               f"succeeded), below the success threshold of "
                               f"{spec.success_threshold:.0%}", detail)
        passed = (f"wave {wave} passed: {done}" if total
                  else f"wave {wave} has no device left to judge")
    elif spec.probing and st.devices and ({d.device_class for d in st.devices.values()}
                                          - set(st.variant_choices)):
        return []  # the probe wave: every class's variant is chosen first
    elif spec.probing and st.devices:
        passed = "the rollout starts, every class's variant chosen"
    elif spec.shadow is not None and st.devices and (
            {d.device_class for d in st.devices.values()}
            - set(st.shadow_verdicts) - set(st.paused_classes)):
        return []  # the shadow phase: every class's verdict first
    elif spec.shadow is not None and st.devices:
        passed = "the rollout starts after the shadow verdicts"
    following = [d.wave for d in st.devices.values() if d.wave > wave]
    if not following:
        if wave == 0:
            return [Decision(COMPLETE, f"no device matches the selector ({spec.selector}): "
                             "nothing to do")]
        counts = st.counts()
        summary = ", ".join(f"{n} {status}" for status, n in counts.items())
        excluded = "".join(
            f"; class {c} was excluded: no variant was chosen for it" if g.gate == VARIANT_GATE
            else f"; class {c} was stopped by its shadow verdict" if g.gate == SHADOW_GATE
            else f"; class {c} was excluded by the {g.gate} gate in wave {g.wave}"
            for c, g in sorted(st.paused_classes.items()))
        if st.paused_classes and not any(d.status in SUCCEEDED_STATUSES
                                         for d in st.devices.values()):
            # every class that got the release refused it: that is not a completed rollout
            return [Decision(ABORT, f"no device took the release ({summary}){excluded}",
                             wave=wave, detail={"counts": counts,
                                                "excluded_classes": sorted(st.paused_classes)})]
        return [Decision(COMPLETE, f"{passed}; every wave is done ({summary}){excluded}",
                         wave=wave, detail={"counts": counts,
                                            "excluded_classes": sorted(st.paused_classes)})]
    nxt = min(following)
    size = sum(d.wave == nxt and d.status == PENDING for d in st.devices.values())
    left_out = sum(d.wave == nxt for d in st.devices.values()) - size
    last = max(len(spec.waves), *following)
    also = f" ({left_out} excluded)" if left_out else ""
    return [Decision(START_WAVE, f"{passed}; starting wave {nxt} of {last} with {size} "
                     f"device(s){also}", wave=nxt,
                     detail={"devices": size, "excluded": left_out, "previous_wave": wave})]


# -- shadow evaluation -----------------------------------------------------------------------


def _shadowing_phase(spec: RolloutSpec, st: RolloutState) -> bool:
    return (spec.shadow is not None and st.state == RUNNING and st.current_wave == 0
            and bool(st.devices))


def _shadow_rule(spec: RolloutSpec, st: RolloutState, inputs: _Inputs) -> list[Decision]:
    """The shadow phase: before the first wave, every targeted online device of a class without
    a verdict is sent ``ota_install`` with ``shadow: true`` (once; a device that comes online
    later in the phase is sent it then). Nothing is installed: the candidate runs beside the
    active model and only agreement and latency figures come back."""
    if not _shadowing_phase(spec, st):
        return []
    assert spec.shadow is not None
    found = []
    for dev in sorted(st.devices.values(), key=lambda d: (d.wave, d.device_id)):
        if (dev.device_id in st.shadows or dev.device_class in st.shadow_verdicts
                or dev.device_class in st.paused_classes or not _online(inputs, dev.device_id)):
            continue
        found.append(Decision(
            SEND_SHADOW, f"shadow install sent to {dev.device_id}: it runs {spec.model} "
            f"v{spec.version} beside its active model on live requests and switches nothing",
            device_id=dev.device_id, device_class=dev.device_class,
            detail={"command": "ota_install", "args": shadow_args(spec)}))
    return found


def _shadow_outcome_rule(spec: RolloutSpec, st: RolloutState,
                         inputs: _Inputs) -> list[Decision]:
    """A shadow install ends with its device's first final status since it was sent:
    ``shadowing``, or anything else (failed, with its reason), or none within
    ``wave_timeout_s`` (timed out)."""
    found = []
    for sh, answer in _answers(st.shadows.values(), inputs, spec.wave_timeout_s):
        detail: dict[str, Any]
        if answer is not None and answer.outcome == SHADOWING:
            reason = f"{sh.device_id} is shadowing {spec.model} v{spec.version}"
            detail = {"status": SHADOWING, "code": ""}
        elif answer is not None:
            reason, detail = _ended(sh.device_id, "shadow install", answer)
            reason += "; it is left out of the shadow verdict"
        else:
            reason = (f"{sh.device_id} did not start shadowing within {spec.wave_timeout_s:g} "
                      "s; it is left out of the shadow verdict")
            detail = {"status": TIMED_OUT, "code": "timeout"}
        found.append(Decision(SHADOW_RESULT, reason, device_id=sh.device_id,
                              device_class=sh.device_class, detail=detail))
    return found


def _shadow_verdict_rule(spec: RolloutSpec, st: RolloutState,
                         inputs: _Inputs) -> list[Decision]:
    """Each class's verdict from the newest shadow report of each of its shadowing devices
    (:func:`fleet.shadow_gate.shadow_verdict`): fail stops the class at once (``shadow_stop``
    to its shadowing devices; its devices are excluded, none switched); pass once none of its
    shadow installs is still unanswered and (with a ``p95_budget_ratio``) the latency cost
    could be judged on at least one device; waiting past ``timeout_s`` since the class's first
    shadow install stops it too, naming the samples seen. A class none of whose devices could
    shadow (every shadow install failed or timed out) is stopped."""
    if not _shadowing_phase(spec, st):
        return []
    assert spec.shadow is not None
    shadow = spec.shadow
    found = []
    for cls in sorted({d.device_class for d in st.devices.values()}
                      - set(st.shadow_verdicts) - set(st.paused_classes)):
        members = [p for p in st.shadows.values() if p.device_class == cls]
        if not members:
            continue  # none online yet: the class waits (and its first send starts its clock)
        active = {p.device_id for p in members if p.status == SHADOWING}
        unanswered = any(p.status == SENT for p in members)
        started = min(p.sent_at or inputs.now for p in members)
        reports = [r for r in inputs.shadow_reports if r.device_id in active]
        try:
            verdict = shadow_verdict({cls: reports}, min_agreement=shadow.min_agreement,
                                     min_samples=shadow.min_samples,
                                     p95_budget_ratio=shadow.p95_budget_ratio)[cls]
        except RolloutError as exc:  # reports about different candidates: a bug upstream
            verdict = ShadowVerdict(cls, FAIL, ("bad_reports",), (str(exc),), {})
        failed = sorted(p.device_id for p in members if p.status in (FAILED, TIMED_OUT))
        figures = {**dict(verdict.figures), "failed_devices": failed,
                   "shadowing_devices": sorted(active)}
        stop = sorted(active)
        if verdict.verdict == FAIL:
            reason = (f"shadow verdict for class {cls}: fail ({'; '.join(verdict.reasons)}); "
                      f"stopping the shadow on {len(stop)} device(s) and excluding the class "
                      "before any device switches")
        elif (verdict.verdict == SHADOW_PASS and not unanswered
              and (shadow.p95_budget_ratio is None
                   or figures.get("latency_judged_devices", 0) > 0)):
            reason = (f"shadow verdict for class {cls}: pass ({'; '.join(verdict.reasons)}); "
                      "its devices install the release in their waves (a shadowing device "
                      "promotes the kept files, no download)")
            stop = []
        elif not unanswered and not active:
            verdict = ShadowVerdict(cls, FAIL, ("no_shadow",), (), verdict.figures)
            reason = (f"no device of class {cls} could shadow {spec.model} v{spec.version} "
                      f"({', '.join(f'{p.device_id}: {p.code or p.status}' for p in members)}); "
                      "the class is excluded before any device switches")
        elif inputs.now >= started + shadow.timeout_s:
            samples = figures.get("samples", 0)
            latency = ""
            if verdict.verdict == SHADOW_PASS:
                latency = (f"; the latency cost was judged on no device (fewer than "
                           f"{figures.get('min_latency_samples')} requests of the active "
                           "model overlapped a candidate run)")
            why = "; ".join(verdict.reasons) or "no reports"
            verdict = ShadowVerdict(cls, FAIL, ("shadow_timeout",), (), verdict.figures)
            reason = (f"no shadow verdict for class {cls} within {shadow.timeout_s:g} s: "
                      f"{samples} sample(s) seen of the {shadow.min_samples} needed "
                      f"({why}){latency}; stopping the shadow on {len(stop)} device(s) and "
                      "excluding the class")
        else:
            continue
        found.append(Decision(SHADOW_VERDICT, reason, device_class=cls, detail={
            "verdict": verdict.verdict, "codes": list(verdict.codes),
            "reasons": list(verdict.reasons), "figures": _plain(figures), "stop": stop,
            "command": "shadow_stop", "args": {"model": spec.model}}))
    return found


def _plain(figures: Mapping[str, Any]) -> dict[str, Any]:
    """Figures as JSON data (tuples as lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in figures.items()}


_Rule = Callable[[RolloutSpec, RolloutState, _Inputs], list[Decision]]
# The order matters: observations first, then gates (so a class that trips is left out of the
# wave's thresholds), rollbacks, sends, and last the wave's verdict.
_RULES: tuple[_Rule, ...] = (_operator_rule, _plan_rule, _probe_rule, _shadow_rule,
                             _outcome_rule, _probe_outcome_rule, _shadow_outcome_rule,
                             _shadow_verdict_rule, _timeout_rule, _choose_rule, _membership_rule,
                             _paused_class_rule, _gate_rule, _rollback_rule, _returning_rule,
                             _start_rule, _advance_rule)


# -- applying --------------------------------------------------------------------------------


def apply(state: RolloutState, decisions: Iterable[Decision], now: float) -> RolloutState:
    """The state after the controller carried out ``decisions`` at ``now``: what it persists."""
    devices = dict(state.devices)
    paused_classes = dict(state.paused_classes)
    gates = dict(state.gates)
    probes = dict(state.probes)
    choices = dict(state.variant_choices)
    shadows = dict(state.shadows)
    shadow_verdicts = dict(state.shadow_verdicts)
    s = replace(state)
    for d in decisions:
        if d.kind == ASSIGN:
            devices[_need(d.device_id)] = DeviceProgress(
                _need(d.device_id), _need(d.device_class), _need(d.wave), PENDING, d.reason,
                "assigned", None, now)
        elif d.kind in (SEND_INSTALL, SEND_ROLLBACK, MARK):
            device_id = _need(d.device_id)
            if device_id not in devices:
                raise RolloutError(f"decision {d.kind} for {device_id}, which is not in the "
                                   "rollout")
            dev = devices[device_id]
            if d.kind == SEND_INSTALL:
                devices[device_id] = replace(dev, wave=_need(d.wave), status=SENT, reason=d.reason,
                                             code="sent", sent_at=now, updated_at=now)
            elif d.kind == SEND_ROLLBACK:
                devices[device_id] = replace(dev, status=ROLLBACK_SENT, reason=d.reason,
                                             code="rollback_sent", updated_at=now)
            else:
                devices[device_id] = replace(dev, status=d.detail["status"], reason=d.reason,
                                             code=d.detail.get("code", ""), updated_at=now)
        elif d.kind == START_WAVE:
            s = replace(s, current_wave=_need(d.wave), reason=d.reason)
        elif d.kind == SEND_PROBE:
            device_id = _need(d.device_id)
            probes[device_id] = ProbeProgress(device_id, _need(d.device_class), SENT, d.reason,
                                              "sent", now, now)
        elif d.kind == PROBE_RESULT:
            device_id = _need(d.device_id)
            if device_id not in probes:
                raise RolloutError(f"decision {d.kind} for {device_id}, which was not probed")
            probes[device_id] = replace(probes[device_id], status=d.detail["status"],
                                        reason=d.reason, code=d.detail.get("code", ""),
                                        updated_at=now,
                                        variants=dict(d.detail.get("variants", {})))
        elif d.kind == CHOOSE_VARIANT:
            choice = VariantChoice.from_dict(d.detail)
            choices[choice.device_class] = choice
            if choice.excluded:
                paused_classes[choice.device_class] = ClassGate(
                    0, choice.device_class, False, 0, VARIANT_GATE, d.reason)
        elif d.kind == SEND_SHADOW:
            device_id = _need(d.device_id)
            shadows[device_id] = ShadowProgress(device_id, _need(d.device_class), SENT,
                                                d.reason, "sent", now, now)
        elif d.kind == SHADOW_RESULT:
            device_id = _need(d.device_id)
            if device_id not in shadows:
                raise RolloutError(f"decision {d.kind} for {device_id}, which was not sent a "
                                   "shadow install")
            shadows[device_id] = replace(shadows[device_id], status=d.detail["status"],
                                         reason=d.reason, code=d.detail.get("code", ""),
                                         updated_at=now)
        elif d.kind == SHADOW_VERDICT:
            cls = _need(d.device_class)
            shadow_verdicts[cls] = {"verdict": d.detail["verdict"],
                                    "codes": list(d.detail.get("codes", ())),
                                    "reasons": list(d.detail.get("reasons", ())),
                                    "figures": dict(d.detail.get("figures", {})),
                                    "stopped": list(d.detail.get("stop", ())),
                                    "reason": d.reason, "decided_at": now}
            if d.detail["verdict"] != SHADOW_PASS:
                paused_classes[cls] = ClassGate(0, cls, False, 0, SHADOW_GATE, d.reason)
            for device_id in d.detail.get("stop", ()):
                if device_id in shadows:
                    shadows[device_id] = replace(shadows[device_id], status=SHADOW_STOPPED,
                                                 code="shadow_stop", updated_at=now)
        elif d.kind in (GATE_PASSED, GATE_TRIPPED):
            verdict = ClassGate(_need(d.wave), _need(d.device_class), d.kind == GATE_PASSED,
                                int(d.detail.get("evaluated", 0)), d.detail.get("gate", ""),
                                d.reason)
            gates[_gate_key(verdict.wave, verdict.device_class)] = verdict
            if not verdict.passed:
                paused_classes[verdict.device_class] = verdict
        elif d.kind == PAUSE:
            s = replace(s, state=PAUSED, paused_by=d.detail.get("by", "operator"), reason=d.reason)
        elif d.kind == RESUME:
            override = s.current_wave if s.paused_by == "threshold" else s.override_wave
            s = replace(s, state=RUNNING, paused_by="", override_wave=override, reason=d.reason)
        elif d.kind == ABORT:
            s = replace(s, state=ABORTED, reason=d.reason)
        elif d.kind == ROLLBACK:
            s = replace(s, state=ROLLED_BACK, reason=d.reason,
                        remove_model=bool(d.detail.get("remove_model")))
        elif d.kind == COMPLETE:
            s = replace(s, state=COMPLETED, reason=d.reason)
        elif d.kind != REFUSE:
            raise RolloutError(f"unknown decision kind {d.kind!r}")
        if d.detail.get("operator"):
            s = replace(s, operator_requests=s.operator_requests[1:])
    return replace(s, devices=devices, paused_classes=paused_classes, gates=gates,
                   probes=probes, variant_choices=choices, shadows=shadows,
                   shadow_verdicts=shadow_verdicts)


# -- helpers ---------------------------------------------------------------------------------


def _mark(dev: DeviceProgress, status: str, code: str, reason: str,
          message: str = "") -> Decision:
    detail = {"status": status, "previous": dev.status, "code": code}
    if message:
        detail["message"] = message
    return Decision(MARK, reason, device_id=dev.device_id, wave=dev.wave,
                    device_class=dev.device_class, detail=detail)


def _send(spec: RolloutSpec, st: RolloutState, dev: DeviceProgress, wave: int, reason: str,
          **extra: Any) -> Decision:
    args = install_args(spec, st, dev.device_class)
    if "variant" in args:
        reason = f"{reason}, variant {args['variant']}"
    return Decision(SEND_INSTALL, reason, device_id=dev.device_id, wave=wave,
                    device_class=dev.device_class,
                    detail={"command": "ota_install", "args": args, **extra})


def install_args(spec: RolloutSpec, state: RolloutState, device_class: str) -> dict[str, Any]:
    """The ``ota_install`` args for a device of ``device_class``: ``release_id``, ``chunk_size``
    and, when the rollout chooses variants, ``variant`` (also what a re-send carries)."""
    args: dict[str, Any] = {"release_id": spec.release_id, "chunk_size": spec.chunk_size}
    variant = _variant_for(spec, state, device_class)
    if variant is not None:
        args["variant"] = variant
    return args


def probe_args(spec: RolloutSpec) -> dict[str, Any]:
    """The ``ota_install`` args of a probe (also what a re-send carries)."""
    return {"release_id": spec.release_id, "chunk_size": spec.chunk_size, "probe": True}


def shadow_args(spec: RolloutSpec) -> dict[str, Any]:
    """The ``ota_install`` args of a shadow install (also what a re-send carries)."""
    assert spec.shadow is not None
    return {"release_id": spec.release_id, "chunk_size": spec.chunk_size,
            **spec.shadow.install_args()}


def _variant_for(spec: RolloutSpec, st: RolloutState, device_class: str) -> Optional[str]:
    """The variant an install to a device of this class names: its class's choice; for a class
    that joined after the choices (no choice), its pin, else none (the manifest's default)."""
    if not spec.probing:
        return None
    choice = st.variant_choices.get(device_class)
    if choice is not None:
        return choice.variant
    return spec.pins.get(device_class)


def _trip(cls: str, wave: int, gate: str, why: str, results: Sequence[GateResult],
          installed: Sequence[DeviceProgress]) -> Decision:
    ids = [d.device_id for d in installed]
    return Decision(
        GATE_TRIPPED, f"{gate} gate tripped for class {cls} in wave {wave}: {why}; rolling back "
        f"its {len(ids)} installed device(s) of this wave and excluding the class from the rest "
        "of the rollout", wave=wave, device_class=cls,
        detail={"gate": gate, "evaluated": len(ids), "rollback": ids,
                "results": [_result_dict(r) for r in results]})


def _on_failure(spec: RolloutSpec, wave: int, why: str,
                detail: Mapping[str, Any]) -> list[Decision]:
    full = {**detail, "on_failure": spec.on_failure}
    if spec.on_failure == "abort":
        return [Decision(ABORT, f"{why}: rollout aborted", wave=wave, detail=full)]
    if spec.on_failure == "rollback":
        return [Decision(ROLLBACK, f"{why}: rolling back every device that installed the release",
                         wave=wave, detail=full)]
    return [Decision(PAUSE, f"{why}: rollout paused (resume to accept and continue, or abort)",
                     wave=wave, detail={**full, "by": "threshold"})]


def _outcome_sentence(spec: RolloutSpec, dev: DeviceProgress, outcome: OutcomeView) -> str:
    late = ("late answer: " if dev.status == TIMED_OUT
            else f"after it reported {dev.status}: " if dev.status in (FAILED, REJECTED)
            else "")
    what = f"{spec.model} v{spec.version}"
    code = f" ({outcome.reason})" if outcome.reason else ""
    text = {
        INSTALLED: f"{dev.device_id} installed {what}",
        NO_CHANGE: f"{dev.device_id} already had {what}{code}",
        REJECTED: f"{dev.device_id} rejected {what}{code}",
        FAILED: f"{dev.device_id} failed to install {what}{code}",
        ROLLED_BACK: f"{dev.device_id} rolled back from {what}{code}",
    }[outcome.outcome]
    more = f": {outcome.message}" if outcome.message and outcome.outcome != INSTALLED else ""
    return f"{late}{text}{more}"


def _result_dict(result: GateResult) -> dict[str, Any]:
    return {"gate": result.gate, "passed": result.passed, "reason": result.reason,
            **dict(result.detail)}


def _gate_key(wave: int, device_class: str) -> str:
    return f"{wave}:{device_class}"


def _order_key(spec: RolloutSpec) -> Callable[[DeviceProgress], str]:
    return lambda d: assignment_key(spec.rollout_id, d.device_id)


def _online(inputs: _Inputs, device_id: str) -> bool:
    view = inputs.views.get(device_id)
    return view is not None and view.online


def _sorted(devices: Iterable[DeviceProgress]) -> list[DeviceProgress]:
    return sorted(devices, key=lambda d: d.device_id)


def _need(value: Optional[Any]) -> Any:
    if value is None:
        raise RolloutError("a decision is missing its device, wave or class")
    return value

