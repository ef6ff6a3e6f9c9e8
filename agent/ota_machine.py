"""The OTA receiver's decisions as a sans-I/O state machine: ``handle(state, event) -> (state,
actions)``.

Modelled on h11 and python-tuf's trusted metadata set (docs/protocol.md, "The device's install
flow"): the machine reads no clock, touches no file and sends nothing. Its caller (the driver,
:class:`fleetlite.agent.ota.OtaManager`) feeds it what happened as events (the install command,
the manifest's bytes, a chunk frame, a tick with the time, the result of an action such as a
smoke test, the new model's health statistics) and carries out the actions it returns
(subscribe, publish, report, write a chunk, run the smoke test, switch, commit, end the job).
Everything the machine decides is therefore testable without a broker, a disk or a thread, and
the same tables (hostile updates, a kill at each step) run against it directly and through the
agent.

One install, in the order the machine walks it:

``manifest``  subscribe to the release's retained manifest; parse it (size caps), check that it
              hashes to the release id, verify it against the trusted root and the device's
              counters (:func:`fleetlite.sdk.verify.verify_release`) and pick the variant;
``space``     the driver checks the free space the download and the slot copy need;
``opening``   the driver opens the resumable chunk store and tells what it already holds;
``downloading``  chunk frames are decoded and checked here (the signed lengths bound them);
              new ones are written by the driver; re-subscription rounds, chunk requests,
              stalls and the deadline follow :class:`~fleetlite.agent.ota_download.DownloadTracker`;
``finalizing``, ``verifying``  the driver renames and stream-hashes the files;
``smoke_testing``  the crash-isolated smoke test (in a subprocess, run by the driver);
``switching``  the driver copies into the free A/B slot and flips the state;
``health_check``  the new model must serve ``health_inferences`` requests without an error; with
              no live traffic by the deadline, the driver exercises it with the release's
              vectors; then ``commit``;
``ending``    one final status (the driver's :meth:`~fleetlite.agent.ota.OtaManager._end_job`
              undoes a half-done switch and removes what the job wrote).

An error in any action comes back as :class:`Failed` and ends the job the same way. A resumed
job (the agent restarted) enters at the phase it had persisted.

State values are immutable: ``handle`` returns a new :class:`Receiver` and never changes the one
it was given (the download's bitmap and tracker are copied when they change).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Optional, TypeVar, Union

from fleetlite.agent.ota_download import (
    DONE,
    RESUBSCRIBE,
    RESUBSCRIBE_CHUNKS,
    STALLED,
    TIMED_OUT,
    DownloadProgress,
    DownloadTracker,
)
from fleetlite.sdk import topics
from fleetlite.sdk.chunks import (
    MAX_REQUEST_CHUNKS,
    MAX_REQUEST_RANGES,
    Chunk,
    ChunkBitmap,
    ChunkError,
    ChunkLayout,
    expand_ranges,
)
from fleetlite.sdk.envelope import Envelope
from fleetlite.sdk.errors import EqualVersion, UpdateRejected
from fleetlite.sdk.manifest import DeltaRef, Manifest, Variant
from fleetlite.sdk.manifest import release_id as compute_release_id
from fleetlite.sdk.ota_messages import ChunkRequest
from fleetlite.sdk.ota_progress import ProgressPacer
from fleetlite.sdk.trust import Root
from fleetlite.sdk.verify import DEFAULT_LIMITS, Limits, verify_release

_T = TypeVar("_T")

# Machine phases (``Receiver.phase``); the persisted job phase is the reported one (PHASE_OF).
IDLE = "idle"
MANIFEST = "manifest"
SPACE = "space"
OPENING = "opening"
DOWNLOADING = "downloading"
FINALIZING = "finalizing"
REBUILDING = "rebuilding"
VERIFYING = "verifying"
SMOKE_TESTING = "smoke_testing"
PROBING = "probing"
SHADOW_STARTING = "shadow_starting"
SWITCHING = "switching"
HEALTH_CHECK = "health_check"
COMMITTING = "committing"
ENDING = "ending"

#: The phase an install's statuses report while the machine is in each of its phases.
REPORTED_PHASE = {MANIFEST: "accepted", SPACE: "accepted", OPENING: "downloading",
                  DOWNLOADING: "downloading", FINALIZING: "downloading",
                  REBUILDING: "downloading",
                  VERIFYING: "verifying", SMOKE_TESTING: "smoke_testing",
                  PROBING: "smoke_testing", SHADOW_STARTING: "smoke_testing",
                  SWITCHING: "switching", HEALTH_CHECK: "health_check",
                  COMMITTING: "health_check"}

# Reason codes the device adds to those of fleetlite.sdk.verify and the smoke test.
MANIFEST_TIMEOUT = "manifest_timeout"
DISK_FULL = "disk_full"
HEALTH_FAILED = "health_check_failed"
UNKNOWN_VARIANT = "unknown_variant"
SMOKE_UNAVAILABLE = "smoke_test_unavailable"

_FRAME_OVERHEAD = 64
#: Bytes one chunk request asks for at most (the answer must fit the driver's inbox: see
#: fleetlite.agent.ota.CHUNK_BUFFER_BYTES, twice this).
REQUEST_WINDOW_BYTES = 4 * 1024 * 1024


def request_window(chunk_size: int) -> int:
    """How many chunks one request asks for at most with chunks of ``chunk_size`` bytes."""
    return max(1, min(MAX_REQUEST_CHUNKS, REQUEST_WINDOW_BYTES // (chunk_size + _FRAME_OVERHEAD)))


@dataclass(frozen=True)
class Settings:
    """The machine's timings and limits (:class:`fleetlite.agent.ota.OtaSettings` adds the
    driver's own to these)."""

    manifest_timeout_s: float = 30.0
    chunk_idle_s: float = 5.0
    max_requests_without_progress: int = 10
    download_deadline_s: float = 3600.0
    health_inferences: int = 20
    health_timeout_s: float = 30.0
    health_poll_s: float = 0.05
    limits: Limits = DEFAULT_LIMITS


@dataclass(frozen=True)
class JobSpec:
    """What the install command asked for, and how far a resumed job had got."""

    release_id: str
    chunk_size: int
    retry: bool = False
    variant: str = ""
    phase: str = "accepted"  # the persisted (reported) phase a resumed job had reached
    probe: bool = False  # smoke-test every variant, report their figures, install nothing
    shadow: bool = False  # once smoke-tested, run beside the active model instead of switching


@dataclass(frozen=True)
class Trust:
    """What the device knows that verification needs: its root, class, counters and clock floor.

    ``installed`` and ``rejected`` are per model name (a seed's version counts as installed).
    """

    root: Optional[Root]
    device_class: str
    agent_version: str
    time_floor: float
    installed: Mapping[str, int] = field(default_factory=dict)
    rejected: Mapping[str, Collection[int]] = field(default_factory=dict)
    have: frozenset[str] = frozenset()  # sha256 of the model files the device keeps (bases)


# --- events ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Start:
    """Run ``job`` (a new install, or one resumed after a restart). ``envelope`` is the staged
    manifest of a resumed job, if it had one."""

    job: JobSpec
    trust: Trust
    now: float
    envelope: Optional[bytes] = None


@dataclass(frozen=True)
class ManifestMessage:
    """A message on the release's manifest topic."""

    payload: bytes


@dataclass(frozen=True)
class ChunkFrame:
    """A chunk frame from one of the release's chunk topics."""

    payload: bytes
    now: float


@dataclass(frozen=True)
class Tick:
    """Time passed with nothing received."""

    now: float


@dataclass(frozen=True)
class SpaceChecked:
    """The free-space check: ``problem`` is the ``disk_full`` message, empty if it fits."""

    problem: str = ""


@dataclass(frozen=True)
class DownloadOpened:
    """The chunk store is open; ``have`` is what it already holds (None: every file is already
    complete and named, e.g. finalized before a restart)."""

    have: Optional[ChunkBitmap]
    now: float


@dataclass(frozen=True)
class Done:
    """The last action that needs an answer (finalize, verify, switch, commit) succeeded;
    ``detail`` is what a switch says (the slot now serving)."""

    detail: str = ""


@dataclass(frozen=True)
class RebuildFailed:
    """A delta could not rebuild its file (``reason`` a ``delta_*`` code)."""

    reason: str
    message: str


@dataclass(frozen=True)
class SmokeDone:
    """The smoke test's verdict (``available`` False: the device could not run it at all)."""

    passed: bool
    reason: str = ""
    message: str = ""
    available: bool = True
    figures: Mapping[str, Any] = field(default_factory=dict)  # what a probe reports


@dataclass(frozen=True)
class HealthStats:
    """The new model's counters since the switch, at ``now``."""

    served: int
    errors: int
    now: float
    error: str = ""  # what failed in the driver's own exercise of the model, if it did


@dataclass(frozen=True)
class Failed:
    """An action failed: end the job with this outcome and reason."""

    outcome: str
    reason: str
    message: str


Event = Union[Start, ManifestMessage, ChunkFrame, Tick, SpaceChecked, DownloadOpened, Done,
              RebuildFailed, SmokeDone, HealthStats, Failed]


# --- actions --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Subscribe:
    topics: tuple[str, ...]
    #: "manifest"; "block" (chunk block filters); "round" (exact chunk topics, subscribed in
    #: one SUBSCRIBE even if still subscribed, so the broker re-sends their retained copies)
    kind: str


@dataclass(frozen=True)
class Unsubscribe:
    topics: tuple[str, ...]
    kind: str  # as the topics were subscribed: "manifest", "block" or "round"


@dataclass(frozen=True)
class RequestChunks:
    """Publish a chunk request to the fleet (or the ``done`` one), live; the driver stamps
    its time."""

    request: ChunkRequest


@dataclass(frozen=True)
class EnterPhase:
    """Persist the job's reported phase (and, once known, model and version); report it."""

    phase: str
    model: str
    version: int


@dataclass(frozen=True)
class ReportProgress:
    """Report the download's progress (the chunk store's figures)."""


@dataclass(frozen=True)
class StageManifest:
    """Keep the verified-to-hash envelope in the staging directory (a restart resumes from it)."""

    payload: bytes


@dataclass(frozen=True)
class RecordManifest:
    """The manifest verified: remember its model and version in the job, clear a retried
    version's rejection, raise the time floor to its issue time. Answers nothing."""

    manifest: Manifest
    retry: bool


@dataclass(frozen=True)
class CheckSpace:
    """Check that ``files`` (fetched and kept) and the slot copy of ``keep`` fit."""

    manifest: Manifest
    envelope_bytes: int
    files: tuple[str, ...]
    keep: tuple[str, ...]


@dataclass(frozen=True)
class OpenDownload:
    """Open (or resume) the chunk store for the files in ``fetch``. The driver answers
    ``have=None`` when every file of ``fetch``, or every file of ``final``, is already staged
    under its final name (finalized before a restart, or kept from a shadow)."""

    manifest: Manifest
    chunk_size: int
    fetch: tuple[str, ...]
    final: tuple[str, ...] = ()


@dataclass(frozen=True)
class ChunkFlow:
    """The driver's inbox holds back (True) or drops (False) chunk frames it has no room for."""

    taking: bool


@dataclass(frozen=True)
class WriteChunk:
    chunk: Chunk


@dataclass(frozen=True)
class PersistProgress:
    """Persist the received-chunk bitmap if it is due (after the data is synced)."""


@dataclass(frozen=True)
class CloseDownload:
    """Close the chunk store: persist (a later start resumes) or ``discard`` its files."""

    discard: bool


@dataclass(frozen=True)
class Finalize:
    """Check every downloaded file against the manifest and give it its final name."""


@dataclass(frozen=True)
class Rebuild:
    """Rebuild ``delta.file`` in the staging directory from the kept file whose sha256 is
    ``delta.base_sha256`` and the downloaded ``delta.delta``; answered by Done or
    RebuildFailed."""

    manifest: Manifest
    delta: DeltaRef


@dataclass(frozen=True)
class Notice:
    """Tell the fleet something that did not end the install (an ``event`` report)."""

    kind: str
    message: str
    reason: str


@dataclass(frozen=True)
class VerifyFiles:
    manifest: Manifest
    files: tuple[str, ...]


@dataclass(frozen=True)
class RunSmoke:
    manifest: Manifest
    variant: Variant
    files: tuple[str, ...]


@dataclass(frozen=True)
class Reject:
    """Remember the version as rejected (not installed again unless an operator retries)."""

    model: str
    version: int


@dataclass(frozen=True)
class StartShadow:
    """Keep ``files`` and run the variant beside the active model on a sample of its live
    requests (agent/ota_shadow.py); answered by Done, or Failed."""

    manifest: Manifest
    variant: Variant
    files: tuple[str, ...]


@dataclass(frozen=True)
class Switch:
    """Copy ``files`` into the free A/B slot and switch to ``variant``."""

    manifest: Manifest
    variant: Variant
    files: tuple[str, ...]


@dataclass(frozen=True)
class Exercise:
    """No live traffic: run the new model once on the release's vectors (case ``n``)."""

    manifest: Manifest
    variant: Variant
    n: int


@dataclass(frozen=True)
class RollBack:
    """The health window failed: go back to the previous model (answers nothing)."""

    model: str


@dataclass(frozen=True)
class Commit:
    """The new model is healthy: it becomes the anti-rollback floor."""

    model: str


@dataclass(frozen=True)
class End:
    """End the job with one final status (``progress``: its figures, e.g. a probe's)."""

    outcome: str
    reason: str
    message: str
    progress: Mapping[str, Any] = field(default_factory=dict)


Action = Union[Subscribe, Unsubscribe, RequestChunks, EnterPhase, ReportProgress, StageManifest,
               RecordManifest, CheckSpace, OpenDownload, ChunkFlow, WriteChunk, PersistProgress,
               CloseDownload, Finalize, Rebuild, Notice, VerifyFiles, RunSmoke, Reject,
               StartShadow, Switch, Exercise, RollBack, Commit, End]


# --- which files to fetch -------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """Which of the release's files the device ends with (``final``: its variant's model and
    smoke vectors and the files no variant owns, e.g. a tokenizer), which it downloads
    (``fetch``), and which of the final ones it rebuilds from a delta (``rebuilds``)."""

    final: tuple[str, ...]
    fetch: tuple[str, ...]
    rebuilds: tuple[DeltaRef, ...] = ()


def plan_files(manifest: Manifest, variant: Variant, have: Collection[str],
               use_deltas: bool = True) -> Plan:
    """The files to fetch for ``variant``: a final file with a delta from a base in ``have``
    (sha256 of files the device keeps) travels as its smallest such delta."""
    owned = {name for v in manifest.all_variants() for name in (v.model.file, v.smoke.file)}
    final = tuple(f.name for f in manifest.files if f.role != "delta" and (
        f.name in (variant.model.file, variant.smoke.file) or f.name not in owned))
    fetch: list[str] = []
    rebuilds: list[DeltaRef] = []
    for name in final:
        usable = [ref for ref in manifest.deltas_for(name) if ref.base_sha256 in have]
        if use_deltas and usable:
            ref = min(usable, key=lambda r: manifest.file(r.delta).length)
            rebuilds.append(ref)
            fetch.append(ref.delta)
        else:
            fetch.append(name)
    return Plan(final, tuple(fetch), tuple(rebuilds))


# --- the download's own state ---------------------------------------------------------------


@dataclass(frozen=True)
class Download:
    """What the machine knows of a running download (a mirror of the chunk store's bitmap)."""

    layout: ChunkLayout
    bitmap: ChunkBitmap
    tracker: DownloadTracker
    pacer: ProgressPacer
    outstanding: frozenset[tuple[int, int]] = frozenset()
    round_topics: tuple[str, ...] = ()
    blocks: Mapping[int, tuple[str, ...]] = field(default_factory=dict)  # filters by block
    below: int = 0
    duplicates: int = 0
    refused: Mapping[str, int] = field(default_factory=dict)
    last_refusal: str = ""

    def progress(self) -> DownloadProgress:
        received_bytes = 0
        for index, count in enumerate(self.layout.counts):
            received_bytes += self.bitmap.received_in(index) * self.layout.chunk_size
            if count and self.bitmap.have(index, count - 1):
                received_bytes -= (self.layout.chunk_size
                                   - self.layout.chunk_length(index, count - 1))
        return DownloadProgress(
            received_bytes=received_bytes, total_bytes=self.layout.total_bytes,
            received_chunks=self.bitmap.received, total_chunks=self.layout.total_chunks,
            persisted_chunks=0, duplicates=self.duplicates, refused=dict(self.refused))


@dataclass(frozen=True)
class Receiver:
    """The machine's state: idle, or one install and where it is."""

    device_id: str
    settings: Settings = Settings()
    phase: str = IDLE
    job: Optional[JobSpec] = None
    trust: Optional[Trust] = None
    envelope: bytes = b""
    manifest: Optional[Manifest] = None
    variant: Optional[Variant] = None
    deadline: float = 0.0  # the manifest's or the health window's, monotonic seconds
    wake_at: float = 0.0  # the driver sends a Tick by then at the latest
    download: Optional[Download] = None
    exercised: int = 0
    slot: str = ""
    plan: Optional[Plan] = None
    rebuilt: int = 0  # how many of the plan's rebuilds are done
    probes: tuple[tuple[str, Mapping[str, Any]], ...] = ()  # (variant, figures) measured

    @property
    def model(self) -> str:
        return self.manifest.name if self.manifest is not None else ""

    @property
    def version(self) -> int:
        return self.manifest.version if self.manifest is not None else 0

    def wait_s(self, now: float) -> float:
        """How long the driver may wait for a message before it must send a Tick."""
        return max(0.0, self.wake_at - now)


# --- handle ---------------------------------------------------------------------------------

_RESUME_ORDER = ("accepted", "downloading", "verifying", "smoke_testing", "switching",
                 "health_check")


def handle(state: Receiver, event: Event) -> tuple[Receiver, list[Action]]:
    """The machine's one entry point: the state after ``event`` and what to do about it."""
    if isinstance(event, Start):
        if state.phase != IDLE:
            raise ValueError(f"an install is already running ({state.phase})")
        return _start(state, event)
    if state.phase == IDLE:
        return state, []  # late messages of an install that ended
    if isinstance(event, Failed):
        if (state.phase == FINALIZING and state.plan is not None and state.plan.rebuilds
                and event.reason in _DELIVERY_MISMATCH):
            return _fall_back(state, event.reason, event.message)
        return _end(state, event.outcome, event.reason, event.message)
    handler = _HANDLERS.get((state.phase, type(event)))
    if handler is None:
        if isinstance(event, Tick):
            return replace(state, wake_at=event.now + 0.5), []
        return state, []  # e.g. a manifest arriving twice, a stray chunk after the download
    return handler(state, event)


def _start(state: Receiver, event: Start) -> tuple[Receiver, list[Action]]:
    job = event.job
    state = replace(state, job=job, trust=event.trust, envelope=b"", manifest=None,
                    variant=None, download=None, exercised=0)
    if event.envelope is not None:
        return _manifest_received(replace(state, phase=MANIFEST), event.envelope, staged=True)
    topic = topics.release_topic(job.release_id, topics.RELEASE_MANIFEST)
    deadline = event.now + state.settings.manifest_timeout_s
    return (replace(state, phase=MANIFEST, deadline=deadline, wake_at=min(deadline,
                                                                          event.now + 0.5)),
            [Subscribe((topic,), "manifest")])


def _manifest_tick(state: Receiver, event: Tick) -> tuple[Receiver, list[Action]]:
    if event.now < state.deadline:
        return replace(state, wake_at=min(state.deadline, event.now + 0.5)), []
    assert state.job is not None
    topic = topics.release_topic(state.job.release_id, topics.RELEASE_MANIFEST)
    return _end(state, "failed", MANIFEST_TIMEOUT,
                f"no manifest arrived on {topic} within {state.settings.manifest_timeout_s:g} "
                "s; is the release published (fleetlite release push)?")


def _manifest_message(state: Receiver, event: ManifestMessage) -> tuple[Receiver, list[Action]]:
    if not event.payload:
        return state, []  # a cleared retained message: the release is not (yet) served
    return _manifest_received(state, event.payload, staged=False)


def _manifest_received(state: Receiver, payload: bytes,
                       staged: bool) -> tuple[Receiver, list[Action]]:
    """Check and verify the manifest envelope (parsed once, here); pick the variant."""
    job, trust = state.job, state.trust
    assert job is not None and trust is not None
    limits = state.settings.limits
    actions: list[Action] = []
    if not staged:
        actions.append(Unsubscribe((topics.release_topic(job.release_id,
                                                         topics.RELEASE_MANIFEST),), "manifest"))
    try:
        envelope = Envelope.from_json(payload, max_bytes=limits.max_envelope_bytes,
                                      max_payload_bytes=limits.max_manifest_bytes,
                                      max_signatures=limits.max_signatures)
    except UpdateRejected as exc:
        return _end(state, "rejected", exc.reason, str(exc), actions)
    if not staged:
        if compute_release_id(envelope.payload) != job.release_id:
            return _end(state, "rejected", "release_id_mismatch",
                        "the manifest on the release topic does not hash to the requested "
                        "release id", actions)
        actions.append(StageManifest(payload))
    state = replace(state, envelope=payload)
    if trust.root is None:
        return _end(state, "rejected", "no_trusted_root", "no trusted root provisioned", actions)

    def counters(name: str) -> tuple[Optional[int], Collection[int]]:
        return trust.installed.get(name), trust.rejected.get(name, ())

    try:
        manifest = verify_release(
            envelope, root=trust.root, installed_version=None, counters=counters,
            device_class=trust.device_class, time_floor=trust.time_floor,
            agent_version=trust.agent_version, limits=limits, retry_rejected=job.retry)
    except EqualVersion as exc:
        return _end(state, "no_change", exc.reason, str(exc), actions)
    except UpdateRejected as exc:
        return _end(state, "rejected", exc.reason, str(exc), actions)
    state = replace(state, manifest=manifest)
    actions.append(RecordManifest(manifest, job.retry))
    wanted = job.variant or manifest.default_variant.name
    if job.probe:
        # every variant's files (no deltas: the bases are the installed variant's)
        final = tuple(f.name for f in manifest.files if f.role != "delta")
        state = replace(state, variant=manifest.default_variant, plan=Plan(final, final),
                        rebuilt=0, probes=())
        return _check_space(state, actions)
    try:
        variant = manifest.variant(wanted)
    except KeyError:
        names = ", ".join(v.name for v in manifest.all_variants())
        return _end(state, "rejected", UNKNOWN_VARIANT,
                    f"the release has no variant {wanted!r} (it has: {names}); send the "
                    "install with one of those", actions)
    plan = plan_files(manifest, variant, trust.have)
    state = replace(state, variant=variant, plan=plan, rebuilt=0)
    return _check_space(state, actions)


def _check_space(state: Receiver,
                 before: Optional[list[Action]] = None) -> tuple[Receiver, list[Action]]:
    assert state.manifest is not None and state.plan is not None
    plan = state.plan
    files = tuple(dict.fromkeys((*plan.fetch, *plan.final)))
    return (replace(state, phase=SPACE),
            [*(before or []), CheckSpace(state.manifest, len(state.envelope), files,
                                         plan.final)])


def _space_checked(state: Receiver, event: SpaceChecked) -> tuple[Receiver, list[Action]]:
    if event.problem:
        return _end(state, "failed", DISK_FULL, event.problem)
    assert state.job is not None and state.manifest is not None and state.plan is not None
    resume_at = _RESUME_ORDER.index(state.job.phase) if state.job.phase in _RESUME_ORDER else 0
    if resume_at <= _RESUME_ORDER.index("downloading"):
        return (replace(state, phase=OPENING),
                [_enter(state, "downloading"),
                 OpenDownload(state.manifest, state.job.chunk_size, state.plan.fetch,
                              state.plan.final)])
    if resume_at == _RESUME_ORDER.index("verifying"):
        return _to_verifying(state)
    if resume_at == _RESUME_ORDER.index("smoke_testing"):
        return _to_smoke(state)
    return _to_switching(state)


def _enter(state: Receiver, phase: str) -> EnterPhase:
    return EnterPhase(phase, state.model, state.version)


# download -------------------------------------------------------------------------------------


def _download_opened(state: Receiver, event: DownloadOpened) -> tuple[Receiver, list[Action]]:
    assert state.job is not None and state.manifest is not None and state.plan is not None
    if event.have is None:  # every file to fetch is complete and named (before a restart)
        return _after_download(state)
    layout = ChunkLayout.from_manifest(state.manifest, state.job.chunk_size, state.plan.fetch)
    s = state.settings
    tracker = DownloadTracker(idle_s=s.chunk_idle_s,
                              max_requests_without_progress=int(s.max_requests_without_progress),
                              deadline_s=s.download_deadline_s,
                              resubscribe_chunks=min(RESUBSCRIBE_CHUNKS,
                                                     request_window(state.job.chunk_size)))
    pacer = ProgressPacer()
    pacer.start(event.now, event.have.received, layout.total_chunks)
    download = Download(layout=layout, bitmap=event.have.copy(), tracker=tracker, pacer=pacer)
    blocks, below, actions = _follow_blocks(state, download.blocks, download.bitmap, layout)
    download = _evolve(download, blocks=blocks, below=below)
    state, more = _poll(replace(state, phase=DOWNLOADING, download=download), download, {},
                        event.now)
    return state, [ChunkFlow(True), *actions, *more]


def _evolve(obj: _T, **changes: Any) -> _T:
    """``dataclasses.replace`` for the download path's own objects, without ``__init__``.

    A chunk frame copies the download's state, its tracker and pacer, and the receiver; with
    ``replace`` and ``copy.copy`` that was half of the machine's ~99 µs a frame
    (bench_ota_machine). The objects copied here have no ``__post_init__`` checks to re-run.
    """
    new = object.__new__(type(obj))
    new.__dict__.update(obj.__dict__)
    if changes:
        unknown = changes.keys() - new.__dict__.keys()
        if unknown:
            raise TypeError(f"{type(obj).__name__} has no field {sorted(unknown)}")
        new.__dict__.update(changes)
    return new


def _follow_blocks(state: Receiver, current: Mapping[int, tuple[str, ...]], bitmap: ChunkBitmap,
                   layout: ChunkLayout
                   ) -> tuple[Mapping[int, tuple[str, ...]], int, list[Action]]:
    """Subscribe to the first block still missing a chunk and the next, no other: the blocks
    subscribed then (``current`` itself when unchanged), the chunk index below which requests
    ask, and the (un)subscriptions."""
    assert state.job is not None
    job = state.job
    per_block = topics.chunks_per_block(job.chunk_size)
    wanted = bitmap.wanted_blocks(per_block)
    below = wanted.stop * per_block
    if len(current) == len(wanted) and all(b in current for b in wanted):
        return current, below, []
    every_file = all(count or not length for count, length in
                     zip(layout.counts, (f.length for f in state.manifest.files))) \
        if state.manifest is not None else True
    blocks: dict[int, tuple[str, ...]] = dict(current)
    actions: list[Action] = []
    gone = [b for b in blocks if b not in wanted]
    if gone:
        actions.append(Unsubscribe(tuple(t for b in gone for t in blocks.pop(b)), "block"))
    new: list[str] = []
    for block in wanted:
        if block not in blocks:
            if every_file:
                filters: tuple[str, ...] = (topics.block_filter(job.release_id, job.chunk_size,
                                                                block),)
            else:  # only the files fetched: the broker does not send the others
                filters = tuple(topics.block_filter(job.release_id, job.chunk_size, block, f)
                                for f, count in enumerate(layout.counts)
                                if count > block * per_block)
            blocks[block] = filters
            new.extend(filters)
    if new:
        actions.append(Subscribe(tuple(new), "block"))
    return blocks, below, actions


def _poll(state: Receiver, d: Download, changes: dict[str, Any],
          now: float) -> tuple[Receiver, list[Action]]:
    """Ask the tracker what to do now; the state then waits for a frame or the next tick.

    ``d`` is the download before this event, ``changes`` what the event changed in it: the
    download is copied once, here, with them and the tracker's."""
    assert state.job is not None
    tracker = _evolve(d.tracker)
    tracker._clock = lambda: now  # the event's time
    bitmap: ChunkBitmap = changes.get("bitmap", d.bitmap)
    below: int = changes.get("below", d.below)
    outstanding: frozenset[tuple[int, int]] = changes.get("outstanding", d.outstanding)
    decision = tracker.poll(
        bitmap.received, complete=bitmap.complete(), batch_done=not outstanding,
        missing=lambda limit: list(expand_ranges(bitmap.missing_ranges(limit, limit, below))))
    changes["tracker"] = tracker
    actions: list[Action] = []
    if decision.action == DONE:
        d = _evolve(d, **changes)
        # the subscriptions end first; the driver's store is finalized (and closed) after
        return (replace(state, download=None, phase=FINALIZING, wake_at=now + 0.5),
                [*_stop_download(d), ChunkFlow(False), Finalize()])
    if decision.action in (STALLED, TIMED_OUT):
        d = _evolve(d, **changes)
        progress = d.progress()
        return _end(replace(state, download=d), "failed", decision.reason,
                    f"download stopped at {progress.received_bytes} of {progress.total_bytes} "
                    f"bytes: no new chunks after {tracker.requests} requests; is the release "
                    "still being served?")
    round_topics: tuple[str, ...] = changes.get("round_topics", d.round_topics)
    if decision.action == RESUBSCRIBE:
        # the broker sends the retained copy of each newly subscribed topic to this device
        # alone; the last round's topics are unsubscribed first so they are subscribed anew
        if round_topics:
            actions.append(Unsubscribe(round_topics, "round"))
        changes["round_topics"] = tuple(
            topics.chunk_topic(state.job.release_id, state.job.chunk_size, f, i)
            for f, i in decision.chunks)
        actions.append(Subscribe(changes["round_topics"], "round"))
        changes["outstanding"] = frozenset(k for k in decision.chunks if not bitmap.have(*k))
    elif decision.action == "request":
        if round_topics:
            actions.append(Unsubscribe(round_topics, "round"))
        changes["round_topics"] = ()
        ranges = bitmap.missing_ranges(MAX_REQUEST_RANGES, request_window(state.job.chunk_size),
                                       below)
        if ranges:
            changes["outstanding"] = frozenset(expand_ranges(ranges))
            actions.append(RequestChunks(ChunkRequest(
                device_id=state.device_id, release_id=state.job.release_id,
                chunk_size=state.job.chunk_size, ts=0.0, missing=tuple(ranges))))
    wait = min(max(decision.wait_s, 0.05), 0.5)
    return _evolve(state, download=_evolve(d, **changes), wake_at=now + wait), actions


def _stop_download(d: Download) -> list[Action]:
    actions: list[Action] = []
    if d.round_topics:
        actions.append(Unsubscribe(d.round_topics, "round"))
    if d.blocks:
        actions.append(Unsubscribe(tuple(t for ts in d.blocks.values() for t in ts), "block"))
    return actions


def _chunk_frame(state: Receiver, event: ChunkFrame) -> tuple[Receiver, list[Action]]:
    d = state.download
    assert d is not None
    actions: list[Action] = []
    changes: dict[str, Any] = {}
    bitmap = d.bitmap
    try:
        chunk = d.layout.decode(event.payload)
    except ChunkError as exc:
        refused = dict(d.refused)
        refused[exc.code] = refused.get(exc.code, 0) + 1
        changes.update(refused=refused, last_refusal=str(exc))
    else:
        key = (chunk.file_index, chunk.index)
        if bitmap.have(*key):
            changes["duplicates"] = d.duplicates + 1
        else:
            bitmap = bitmap.copy()
            bitmap.set(*key)
            changes["bitmap"] = bitmap
            if key in d.outstanding:
                changes["outstanding"] = d.outstanding - {key}
            actions.append(WriteChunk(chunk))
            blocks, below, follow = _follow_blocks(state, d.blocks, bitmap, d.layout)
            changes.update(blocks=blocks, below=below)
            actions += follow
    actions.append(PersistProgress())
    pacer = _evolve(d.pacer)
    if pacer.due(event.now, bitmap.received, d.layout.total_chunks):
        actions.append(ReportProgress())
    changes["pacer"] = pacer
    state, more = _poll(state, d, changes, event.now)
    return state, actions + more


def _download_tick(state: Receiver, event: Tick) -> tuple[Receiver, list[Action]]:
    assert state.download is not None
    state, actions = _poll(state, state.download, {}, event.now)
    if state.phase == DOWNLOADING:
        actions.insert(0, PersistProgress())
    return state, actions


# after the download -----------------------------------------------------------------------------


def _finalized(state: Receiver, event: Done) -> tuple[Receiver, list[Action]]:
    assert state.job is not None
    done = ChunkRequest(device_id=state.device_id, release_id=state.job.release_id,
                        chunk_size=state.job.chunk_size, ts=0.0, done=True)
    state, actions = _after_download(state)
    return state, [RequestChunks(done), *actions]


def _after_download(state: Receiver) -> tuple[Receiver, list[Action]]:
    """Rebuild what travelled as deltas, then verify."""
    assert state.manifest is not None and state.plan is not None
    if state.rebuilt < len(state.plan.rebuilds):
        return (replace(state, phase=REBUILDING, download=None),
                [Rebuild(state.manifest, state.plan.rebuilds[state.rebuilt])])
    return _to_verifying(state)


def _rebuilt(state: Receiver, event: Done) -> tuple[Receiver, list[Action]]:
    return _after_download(replace(state, rebuilt=state.rebuilt + 1))


def _rebuild_failed(state: Receiver, event: RebuildFailed) -> tuple[Receiver, list[Action]]:
    return _fall_back(state, event.reason, event.message)


_DELIVERY_MISMATCH = ("hash_mismatch", "length_mismatch")


def _fall_back(state: Receiver, reason: str, message: str) -> tuple[Receiver, list[Action]]:
    """A delta was refused: fetch the full files instead, without the operator."""
    assert state.manifest is not None and state.variant is not None and state.trust is not None
    plan = plan_files(state.manifest, state.variant, state.trust.have, use_deltas=False)
    notice = Notice("ota_delta_refused",
                    f"the delta update of {state.manifest.name} v{state.manifest.version} was "
                    f"refused ({message}); fetching the full files instead", reason)
    return _check_space(replace(state, plan=plan, rebuilt=0, download=None), [notice])


def _to_verifying(state: Receiver) -> tuple[Receiver, list[Action]]:
    assert state.manifest is not None and state.plan is not None
    return (replace(state, phase=VERIFYING, download=None),
            [_enter(state, "verifying"), VerifyFiles(state.manifest, state.plan.final)])


def _verified(state: Receiver, event: Done) -> tuple[Receiver, list[Action]]:
    return _to_smoke(state)


def _to_smoke(state: Receiver) -> tuple[Receiver, list[Action]]:
    assert state.manifest is not None and state.variant is not None and state.plan is not None
    assert state.job is not None
    if state.job.probe:
        first = state.manifest.all_variants()[0]
        return (replace(state, phase=PROBING, download=None, probes=()),
                [_enter(state, "smoke_testing"),
                 RunSmoke(state.manifest, first, state.plan.final)])
    return (replace(state, phase=SMOKE_TESTING, download=None),
            [_enter(state, "smoke_testing"),
             RunSmoke(state.manifest, state.variant, state.plan.final)])


def _smoke_done(state: Receiver, event: SmokeDone) -> tuple[Receiver, list[Action]]:
    if not event.available:
        # the device could not run the test at all: not the release's fault
        return _end(state, "failed", SMOKE_UNAVAILABLE, event.message)
    if not event.passed:
        return _end(state, "rejected", event.reason, event.message,
                    [Reject(state.model, state.version)])
    assert state.job is not None and state.manifest is not None
    if state.job.shadow:
        assert state.variant is not None and state.plan is not None
        return (replace(state, phase=SHADOW_STARTING),
                [StartShadow(state.manifest, state.variant, state.plan.final)])
    return _to_switching(state)


def _shadow_started(state: Receiver, event: Done) -> tuple[Receiver, list[Action]]:
    assert state.manifest is not None
    return _end(state, "shadowing", "",
                f"{state.manifest.name} v{state.manifest.version} runs beside the active "
                "model on a sample of its requests; install the release to promote it, or "
                "send shadow_stop")


def _probed(state: Receiver, event: SmokeDone) -> tuple[Receiver, list[Action]]:
    """One variant's smoke test of a probe: the next one, or the final report."""
    manifest, plan = state.manifest, state.plan
    assert manifest is not None and plan is not None
    variants = manifest.all_variants()
    figures = dict(event.figures)
    figures.update(passed=event.passed, reason=event.reason)
    if not event.available:
        figures.update(passed=False, reason=SMOKE_UNAVAILABLE)
    probes = (*state.probes, (variants[len(state.probes)].name, figures))
    state = replace(state, probes=probes)
    if len(probes) < len(variants):
        return state, [RunSmoke(manifest, variants[len(probes)], plan.final)]
    passed = [name for name, f in probes if f["passed"]]
    return _end(state, "probed", "",
                f"probed {len(probes)} variant(s) of {manifest.name} v{manifest.version}: "
                f"{', '.join(passed) or 'none'} passed; nothing was installed",
                progress={"variants": dict(probes)})


def _to_switching(state: Receiver) -> tuple[Receiver, list[Action]]:
    assert state.manifest is not None and state.variant is not None and state.plan is not None
    return (replace(state, phase=SWITCHING, download=None),
            [_enter(state, "switching"),
             Switch(state.manifest, state.variant, state.plan.final)])


def _switched(state: Receiver, event: Done) -> tuple[Receiver, list[Action]]:
    return (replace(state, phase=HEALTH_CHECK, deadline=-1.0, wake_at=0.0, exercised=0,
                    slot=event.detail),
            [_enter(state, "health_check")])


def _health(state: Receiver, event: HealthStats) -> tuple[Receiver, list[Action]]:
    manifest, variant = state.manifest, state.variant
    assert manifest is not None and variant is not None
    if state.deadline < 0:  # the first statistics start the window
        state = replace(state, deadline=event.now + state.settings.health_timeout_s)
    what = "failed generation(s)" if manifest.generation is not None \
        else "inference error(s)"
    why = event.error or (f"{event.errors} {what} on the new model" if event.errors else "")
    if why:
        return _end(state, "rolled_back", HEALTH_FAILED,
                    f"health window failed ({why}); rolled back to the previous model",
                    [RollBack(state.model)])
    if event.served >= state.settings.health_inferences:
        return replace(state, phase=COMMITTING), [Commit(state.model)]
    actions: list[Action] = []
    if event.now >= state.deadline:
        # no live traffic: exercise the model ourselves with the release's vectors
        actions.append(Exercise(manifest, variant, state.exercised))
        state = replace(state, exercised=state.exercised + 1)
    return replace(state, wake_at=event.now + state.settings.health_poll_s), actions


def _committed(state: Receiver, event: Done) -> tuple[Receiver, list[Action]]:
    assert state.manifest is not None
    return _end(state, "installed", "", f"{state.manifest.name} v{state.manifest.version} "
                f"serving from slot {state.slot}")


# ending ----------------------------------------------------------------------------------------


def _end(state: Receiver, outcome: str, reason: str, message: str,
         before: Optional[list[Action]] = None, *,
         progress: Optional[Mapping[str, Any]] = None) -> tuple[Receiver, list[Action]]:
    actions = list(before or [])
    if state.download is not None:
        actions += _stop_download(state.download)
        actions += [CloseDownload(discard=True), ChunkFlow(False)]
    actions.append(End(outcome, reason, message, dict(progress or {})))
    return replace(state, phase=IDLE, job=None, download=None, manifest=None, variant=None,
                   envelope=b"", trust=None, plan=None, probes=()), actions


_Handler = Callable[[Receiver, Any], tuple[Receiver, list[Action]]]
_HANDLERS: dict[tuple[str, type], _Handler] = {
    (MANIFEST, Tick): _manifest_tick,
    (MANIFEST, ManifestMessage): _manifest_message,
    (SPACE, SpaceChecked): _space_checked,
    (OPENING, DownloadOpened): _download_opened,
    (DOWNLOADING, ChunkFrame): _chunk_frame,
    (DOWNLOADING, Tick): _download_tick,
    (FINALIZING, Done): _finalized,
    (REBUILDING, Done): _rebuilt,
    (REBUILDING, RebuildFailed): _rebuild_failed,
    (VERIFYING, Done): _verified,
    (SMOKE_TESTING, SmokeDone): _smoke_done,
    (PROBING, SmokeDone): _probed,
    (SHADOW_STARTING, Done): _shadow_started,
    (SWITCHING, Done): _switched,
    (HEALTH_CHECK, HealthStats): _health,
    (COMMITTING, Done): _committed,
}
