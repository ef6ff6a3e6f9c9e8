"""The device side of an over-the-air model update: verify, download, smoke-test, switch, commit.

What to do next is decided by the sans-I/O state machine in :mod:`fleetlite.agent.ota_machine`;
this module is its driver: one install at a time, in the OTA worker thread, it feeds the machine
events (messages from the inbox, ticks, the results of actions) and carries out the actions it
returns (MQTT, the chunk store, the smoke-test subprocess, the A/B slots, the state file). The
phases, in order:

1. **manifest** — the signed envelope, from the release's retained manifest topic, is verified
   (:func:`fleetlite.sdk.verify.verify_release`: size caps, signature threshold, version,
   device class, expiry against the time floor, agent version);
2. **download** — chunks from the release's fan-out topic are written into a staging directory
   (resumable: the received-chunk bitmap survives restarts); missing chunks are requested;
   a download that stops making progress ends as ``download_stalled``;
3. **verify** — every file is stream-hashed against the manifest (hard stop at the signed length);
4. **smoke test** — in a subprocess: load, run the release's vectors, compare, check latency and
   memory against the device class budgets;
5. **switch** — files go to the free A/B slot, the state file flips atomically, the model service
   swaps without dropping requests;
6. **health window** — N inferences on the new model without error, then **commit** (the version
   becomes the anti-rollback floor). Any failure rolls back to the previous model.

Variants: an install names a variant (only its files are fetched), or probes every variant
(smoke tests, figures reported, nothing installed). Deltas: a model whose base the device keeps
travels as a delta, rebuilt and checked against its signed hash; a bad delta falls back to the
full file. Shadow: the smoke-tested release runs beside the active model
(:mod:`fleetlite.agent.ota_shadow`) instead of switching.

Every install ends with one final ``fleetlite.ota_status/1`` message (``final: true``) whose
``outcome`` and ``reason`` the fleet side can act on, whatever fails: an error in any phase, or in
the clean-up after it, ends the job (``disk_full`` for a full disk anywhere, ``internal`` with the
exception's type for a bug), removes what it wrote (staging copy, partial or abandoned slot) and
the worker goes on with the next job; a worker thread that dies anyway is noticed by
:meth:`OtaManager.check_worker` (the agent's tick and the OTA commands call it), reported and
restarted. Before downloading, the free space for the staging and the slot copies is checked.

A version that was rejected after its signature verified, or rolled back, is remembered and not
installed again unless an operator retries it explicitly.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import re
import shutil
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

import numpy.typing as npt

from fleetlite.agent import ota_machine as machine
from fleetlite.agent.commands import CommandArgumentError, arg
from fleetlite.agent.errors import AgentError
from fleetlite.agent.language_models import LanguageModels
from fleetlite.agent.lm_serving import load_served_lm, release_generation
from fleetlite.agent.model_service import ModelService
from fleetlite.agent.ota_download import ChunkStore
from fleetlite.agent.ota_machine import (
    DISK_FULL,
    HEALTH_FAILED,
    MANIFEST_TIMEOUT,
    REQUEST_WINDOW_BYTES,
    SMOKE_UNAVAILABLE,
    UNKNOWN_VARIANT,
    request_window,
)
from fleetlite.agent.ota_shadow import KINDS as SHADOW_KINDS
from fleetlite.agent.ota_shadow import ShadowSessions
from fleetlite.agent.ota_space import (
    allocated,
    describe_bytes,
    free_bytes,
    is_disk_full,
    remove_tree,
    shortfall,
)
from fleetlite.agent.ota_state import SLOTS, EndedJob, Job, ModelState, OtaStateStore, SlotInfo
from fleetlite.sdk import topics
from fleetlite.sdk.atomic import fsync_dir, write_atomic
from fleetlite.sdk.chunks import (
    DEFAULT_CHUNK_SIZE,
    MAX_CHUNK_SIZE,
    MAX_REQUEST_CHUNKS,
    MIN_CHUNK_SIZE,
)
from fleetlite.sdk.device_class import DeviceClass
from fleetlite.sdk.errors import UpdateRejected
from fleetlite.sdk.manifest import Manifest, Variant
from fleetlite.sdk.messages import Event, OtaStatus
from fleetlite.sdk.runtime.errors import ModelRuntimeError
from fleetlite.sdk.trust import Root, load_trusted_root, update_root
from fleetlite.sdk.verify import TimeFloor
from fleetlite.sdk.version import BUILD_TIME, __version__

log = logging.getLogger("fleetlite.agent.ota")

# Reason codes the device adds to those of fleetlite.sdk.verify, the smoke test and the machine
# (agent/ota_machine.py: manifest_timeout, disk_full, health_check_failed, unknown_variant,
# smoke_test_unavailable).
__all__ = ["DISK_FULL", "HEALTH_FAILED", "MANIFEST_TIMEOUT", "SMOKE_UNAVAILABLE",
           "UNKNOWN_VARIANT", "OtaManager", "OtaSettings", "request_window"]
DOWNLOAD_STALLED = "download_stalled"
CRASHED_IN_HEALTH_WINDOW = "crashed_during_health_window"
OPERATOR_ROLLBACK = "operator_rollback"
MODEL_REMOVED = "model_removed"  # an operator rollback of a first version: the model is gone
SHADOW_UNAVAILABLE = "shadow_unavailable"  # the device cannot shadow (no such model, bad kind)
INTERNAL = "internal"

# For messages: where in the install a phase is.
_PHASE_WHERE = {
    "accepted": "while fetching the manifest",
    "downloading": "while downloading",
    "verifying": "while verifying the download",
    "smoke_testing": "while smoke testing",
    "switching": "while copying the release into the free A/B slot",
    "health_check": "in the health window",
}

#: Chunk frames received but not yet written are held in the OTA inbox up to this many bytes (a
#: frame counts ``_FRAME_OVERHEAD`` more). While a download runs, a frame that does not fit makes
#: the network thread wait for room (up to CHUNK_ROOM_WAIT_S): it stops reading, and TCP and the
#: broker's in-flight window hold back the rest, so the broker's burst of a release's retained
#: chunks is taken at the disk's pace. Otherwise (or after that wait) the frame is dropped and
#: must be asked for again, which costs at least a chunk-idle wait (5 s by default).
CHUNK_BUFFER_BYTES = 8 * 1024 * 1024
CHUNK_ROOM_WAIT_S = 5.0
# A chunk request asks for at most REQUEST_WINDOW_BYTES (half the buffer: the machine's
# request_window), so the answer to this device's own request always fits the buffer, whatever
# the disk's pauses (a persist fsyncs) while the broker delivers it; the rest is room for chunks
# others asked for.
assert REQUEST_WINDOW_BYTES == CHUNK_BUFFER_BYTES // 2
_FRAME_OVERHEAD = 64
_INBOX_ENTRIES = 4 * MAX_REQUEST_CHUNKS


_VARIANT_NAME = re.compile(r"[a-z0-9_-]{1,32}")

# Reasons that are not the release's fault: a rollback for one of them does not reject the version.
_NOT_THE_RELEASE = (DISK_FULL, INTERNAL, "staging_io_error")


@dataclass(frozen=True)
class OtaSettings(machine.Settings):
    """Timings and limits of the device side; defaults suit gateways on a reasonable network.

    The state machine's own (manifest, download and health timings, the verification limits)
    are inherited from :class:`fleetlite.agent.ota_machine.Settings`, which it is given as is;
    these are the driver's."""

    smoke_timeout_s: float = 120.0
    # a failed install re-sent within this time is answered with its final status, not re-run
    ended_memory_s: float = 600.0
    shadow_report_s: float = 30.0  # how often a shadow candidate's statistics are reported


class OtaManager:
    """Owns the OTA state, the install worker and the OTA commands of one device."""

    def __init__(
        self,
        *,
        device_id: str,
        device_class: DeviceClass,
        state_dir: Path,
        models: ModelService,
        link: Any,
        root_path: Path | None,
        threads: int,
        seeds: Mapping[str, tuple[Path, int | None]],
        on_model_change: Callable[[str], None],
        settings: OtaSettings | None = None,
        language_models: LanguageModels | None = None,
        bases: Sequence[Path] = (),
    ) -> None:
        self.device_id = device_id
        self.device_class = device_class
        self.models = models
        self.language_models = language_models if language_models is not None \
            else LanguageModels()
        self.link = link
        self.threads = threads
        self.seeds = dict(seeds)
        # other model files agent.yaml names (its language models): bases for delta updates
        self.bases = list(bases)
        self.on_model_change = on_model_change
        self.settings = settings or OtaSettings()
        self.store = OtaStateStore(state_dir)
        self.state = self.store.load()
        self.root = self._load_root(root_path)
        self.floor = TimeFloor.start(build_time=BUILD_TIME, persisted=self.state.time_floor,
                                     monotonic_now=time.monotonic())
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._inbox: queue.Queue[tuple[str, bytes]] = queue.Queue(maxsize=_INBOX_ENTRIES)
        self._inbox_lock = threading.Lock()
        self._inbox_room = threading.Condition(self._inbox_lock)
        self._inbox_bytes = 0  # chunk bytes in the inbox (CHUNK_BUFFER_BYTES at most)
        self._taking_chunks = False  # a download consumes chunks: wait for room, not drop
        self._room_waits_failed = False  # the last wait timed out: drop until room is made
        self._busy = threading.Lock()
        self._thread: threading.Thread | None = None
        self._revive = threading.Lock()
        self._stopping = False
        self._worker_death: BaseException | None = None
        self._need: tuple[Path, int, int] | None = None  # (where, needed, free) of the job
        self._download: ChunkStore | None = None  # the running job's chunk store
        self._have: dict[str, Path] = {}  # sha256 -> kept model file (bases of deltas)
        self.shadows = ShadowSessions(
            device_id=device_id, root=self.store.dir / "shadow", models=models,
            language_models=self.language_models, link=link, threads=threads,
            report_every_s=self.settings.shadow_report_s)
        self._seed_digests: dict[tuple[str, int, int], str] = {}
        self._rolled_back = False
        self.counters = {"installs": 0, "installed": 0, "rejected": 0, "rolled_back": 0,
                         "probed": 0, "shadowing": 0,
                         "failed": 0, "chunks_dropped": 0, "chunk_resubscribes": 0,
                         "chunk_requests": 0}

    # -- start-up --------------------------------------------------------------------------

    def _load_root(self, provisioned: Path | None) -> Root | None:
        """The trusted root: the latest rotated one in the state dir, else the provisioned file."""
        rotated = self.store.dir / "root.json"
        for path in (rotated, provisioned):
            if path is not None and path.is_file():
                return load_trusted_root(path.read_bytes())
        return None

    def recover(self) -> list[tuple[str, Path, int | None, str]]:
        """Decide what to serve at start: (name, path, version, sha256) per model.

        A model found on probation (``pending``) means the agent died in its health window:
        roll back to the previous model, remove the abandoned slot and the release's staging
        copy, and report it. Staging copies of no current job are removed too.
        """
        changed = False
        for name, ms in self.state.models.items():
            if ms.pending is not None:
                pending = ms.pending
                ms.revert()
                changed = True
                self.counters["rolled_back"] += 1
                if self.state.job is not None and self.state.job.release_id == pending.release_id:
                    self.state.job = None
                self._drop_abandoned_slots(name)
                self._final(pending.release_id, name, pending.version, "rolled_back",
                            CRASHED_IN_HEALTH_WINDOW,
                            "the agent stopped while the new model was in its health window; "
                            "rolled back to the previous model")
        if changed:
            self.store.save(self.state)
        self._drop_orphan_staging()
        serve = []
        for name, (path, version) in self.seeds.items():
            seeded = self.state.models.get(name)
            if seeded is None or (seeded.active is None and not seeded.removed):
                serve.append((name, path, version, ""))
        for name, ms in self.state.models.items():
            if ms.active is not None:
                info = ms.slots[ms.active]
                path = self.store.slot_dir(name, ms.active) / info.model_file
                serve.append((name, path, info.version, info.sha256))
        return serve

    def start(self) -> None:
        """Start the install worker (once the active models are served): the shadows kept
        before a restart start again, then a job that was running resumes."""
        try:
            self.shadows.resume()
        except Exception:  # a shadow must never keep the agent from starting
            log.exception("resuming the kept shadows failed")
        self._start_thread()
        if self.state.job is not None:
            log.info("resuming the install of release %s", self.state.job.release_id)
            self._jobs.put(self.state.job)

    def stop(self) -> None:
        self._stopping = True
        self._jobs.put(None)
        if self._thread is not None:
            self._thread.join(10)
        self.shadows.stop_all("the agent stops", keep_files=True)  # resumed at the next start

    def _start_thread(self) -> None:
        self._worker_death = None
        self._thread = threading.Thread(target=self._worker_main, name="fleetlite-ota",
                                        daemon=True)
        self._thread.start()

    def check_worker(self) -> bool:
        """Restart the worker thread if it died; True if it had to.

        The job it was running ends with a final ``internal`` status, so the fleet is not left
        waiting for an install that nothing runs. Called from the agent's tick and the commands.
        """
        try:
            self.shadows.tick()
        except Exception:
            log.exception("the shadow reports failed")
        with self._revive:
            thread = self._thread
            if thread is None or thread.is_alive() or self._stopping:
                return False
            death = self._worker_death
            why = f"{type(death).__name__}: {death}" if death is not None else "no exception seen"
            log.error("the OTA worker thread died (%s); restarting it", why)
            with self._busy:
                while True:  # the dead worker's queue: the job in it is ended below
                    try:
                        self._jobs.get_nowait()
                    except queue.Empty:
                        break
                job = self.state.job
                if job is not None:
                    self._end_job(job, "failed", INTERNAL,
                                  f"the OTA worker stopped unexpectedly ({why}); the agent "
                                  "restarted it. Send the install again; if it recurs, send "
                                  "the agent log to the FleetLite developers")
            self._event("ota_worker_restarted",
                        f"the OTA worker thread died ({why}) and was restarted",
                        release_id=job.release_id if job is not None else "")
            self._start_thread()
            return True

    # -- commands --------------------------------------------------------------------------

    def cmd_install(self, args: Mapping[str, Any]) -> dict[str, Any]:
        release_id = arg(args, "release_id", str, required=True)
        try:
            topics.validate_release_id(release_id)
        except topics.TopicError as exc:
            raise CommandArgumentError(str(exc)) from exc
        chunk_size = arg(args, "chunk_size", int, DEFAULT_CHUNK_SIZE)
        if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
            raise CommandArgumentError(
                f"chunk_size must be {MIN_CHUNK_SIZE}..{MAX_CHUNK_SIZE} bytes")
        retry = arg(args, "retry", bool, False)
        probe = arg(args, "probe", bool, False)
        shadow = self._shadow_options(args)
        variant = arg(args, "variant", str, "")
        if variant and not _VARIANT_NAME.fullmatch(variant):
            raise CommandArgumentError("variant must be 1-32 characters of [a-z0-9_-] (a "
                                       "variant name of the release's manifest)")
        if self.root is None:
            raise AgentError("this device has no trusted root; set trust_root in agent.yaml "
                             "to the fleet's root.json and restart the agent")
        self.check_worker()
        job = self.state.job
        if job is not None:
            if job.release_id == release_id:
                return {"accepted": True, "already_running": True}
            raise AgentError(f"an install of release {job.release_id[:12]} is in progress; "
                             "wait for its final status")
        ended = self.state.ended_job(release_id)
        if ended is not None and not retry \
                and 0 <= time.time() - ended.ended < self.settings.ended_memory_s:
            # a re-send (the fleet missed the final status): answer with what really happened
            self._final(ended.release_id, ended.model, ended.version, ended.outcome,
                        ended.reason, ended.message)
            return {"accepted": False, "ended": True, "outcome": ended.outcome,
                    "reason": ended.reason, "message": ended.message}
        job = Job(release_id=release_id, model="", chunk_size=chunk_size, phase="accepted",
                  retry=retry, variant=variant, probe=probe, shadow=shadow,
                  started=time.time())
        self.state.job = job
        self.store.save(self.state)
        self._jobs.put(job)
        return {"accepted": True}

    @staticmethod
    def _shadow_options(args: Mapping[str, Any]) -> dict[str, Any]:
        """The ``shadow`` options of an ``ota_install`` (empty: a normal install)."""
        if not arg(args, "shadow", bool, False):
            return {}
        kind = arg(args, "shadow_kind", str, "classifier")
        if kind not in SHADOW_KINDS:
            raise CommandArgumentError(f"shadow_kind must be one of {', '.join(SHADOW_KINDS)} "
                                       "(a language model needs none)")
        options: dict[str, Any] = {"kind": kind}
        for name, key, low, high in (("shadow_sample_rate", "sample_rate", 0.0, 1.0),
                                     ("shadow_cpu_budget", "cpu_budget", 0.0, 1.0),
                                     ("shadow_p95_ratio", "p95_ratio", 1.0, 100.0),
                                     ("shadow_error_bound", "error_bound", 0.0, 1e9)):
            value = arg(args, name, (int, float))
            if value is None:
                continue
            value = float(value)
            if not low < value <= high:
                raise CommandArgumentError(f"{name} must be above {low:g} and at most {high:g}")
            options[key] = value
        if kind == "regressor" and "error_bound" not in options:
            raise CommandArgumentError("shadow_kind regressor needs shadow_error_bound: the "
                                       "largest absolute output difference that still agrees")
        return options

    def cmd_shadow_stop(self, args: Mapping[str, Any]) -> dict[str, Any]:
        """Stop shadowing a model (``shadow_stop``): its last report goes out, its kept files
        are removed."""
        name = arg(args, "model", str, required=True)
        if not self.shadows.stop(name, "stopped by the fleet"):
            raise AgentError(f"this device shadows no release of {name!r}")
        return {"stopped": name}

    def cmd_rollback(self, args: Mapping[str, Any]) -> dict[str, Any]:
        """Go back to the previous version of a model (the ``ota_rollback`` command); with
        ``remove``, a model with nothing to go back to (its first version) is removed as by
        ``remove_model``, and the release's final status says ``rolled_back`` either way."""
        name = arg(args, "model", str, required=True)
        from_version = arg(args, "from_version", int)
        remove = arg(args, "remove", bool, False)
        with self._busy:
            ms = self.state.models.get(name)
            active_version = (ms.slots[ms.active].version
                              if ms is not None and ms.active is not None else None)
            if from_version is not None and active_version != from_version:
                # already rolled back (e.g. a redelivered command): do not roll back further
                return {"rolled_back": None, "active_version": active_version,
                        "note": f"{name} is not at version {from_version}; nothing to do"}
            if ms is None or ms.active is None:
                raise AgentError(f"model {name!r} has no installed release to roll back from")
            bad = ms.slots[ms.active]
            first = ms.previous is None and name not in self.seeds
            if first and not remove:
                raise AgentError(f"model {name!r} has no previous model to roll back to "
                                 "(send remove: true to remove it instead)")
            freed = 0
            if first:
                _, freed = self._remove_locked(name)
                self._final(bad.release_id, name, bad.version, "rolled_back", MODEL_REMOVED,
                            f"operator rolled {name} back from version {bad.version}, its "
                            "first: the model is removed")
            else:
                ms.revert()
                self.store.save(self.state)
                self._serve_active(name, ms)
                self._drop_abandoned_slots(name)
                self._save_quietly()
                self._final(bad.release_id, name, bad.version, "rolled_back", OPERATOR_ROLLBACK,
                            f"operator rolled {name} back from version {bad.version}")
            self.counters["rolled_back"] += 1
        if first:
            log.info("removed model %s (version %s): rolled back from its first version", name,
                     bad.version)
        self.on_model_change(name)
        result: dict[str, Any] = {"rolled_back": bad.version,
                                  "slots": self.describe_slots().get(name, {})}
        if first:
            result.update(removed=True, freed_bytes=freed)
        return result

    def cmd_remove(self, args: Mapping[str, Any]) -> dict[str, Any]:
        """Stop serving a model and delete its installed releases (the ``remove_model``
        command); agent.yaml's copy of it is not served again, even after a restart, until a
        release of it is installed. Its anti-rollback floor stays."""
        name = arg(args, "model", str, required=True)
        with self._busy:
            job = self.state.job
            if job is not None and job.model == name:
                raise AgentError(f"an install of {name} (release {job.release_id[:12]}) is in "
                                 "progress: wait for it to end (ota_slots), then remove it")
            served = set(self.models.names()) | {lm.name for lm in self.language_models}
            ms = self.state.models.get(name)
            if name not in served and (ms is None or ms.active is None):
                raise AgentError(f"this device serves no model {name!r}; it serves: "
                                 f"{', '.join(sorted(served)) or 'none'}")
            version, freed = self._remove_locked(name)
        self.shadows.stop(name, "the model was removed")
        log.info("removed model %s (version %s) on the fleet's command", name, version)
        self.on_model_change(name)
        return {"removed": name, "version": version, "freed_bytes": freed}

    def _remove_locked(self, name: str) -> tuple[Optional[int], int]:
        """Stop serving ``name`` and delete its installed releases (holding ``_busy``); the
        version it served and the bytes freed."""
        ms = self.state.model(name)
        version = (ms.slots[ms.active].version if ms.active in ms.slots
                   else self.seeds.get(name, (None, None))[1])
        ms.active = ms.previous = None
        ms.pending = None
        ms.removed = True
        self.store.save(self.state)
        self._serve_active(name, ms)
        freed = self._drop_abandoned_slots(name)
        self._save_quietly()
        return version, freed

    def cmd_slots(self, args: Mapping[str, Any]) -> dict[str, Any]:
        self.check_worker()
        return {"models": self.describe_slots(), "job": None if self.state.job is None else
                vars(self.state.job)}

    def cmd_update_root(self, args: Mapping[str, Any]) -> dict[str, Any]:
        import base64
        import binascii

        encoded = arg(args, "root", str, required=True)
        try:
            data = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise CommandArgumentError("root must be base64 of the new root.json") from exc
        if self.root is None:
            raise AgentError("this device has no trusted root to rotate from; provision one")
        new = update_root(self.root, data)
        write_atomic(self.store.dir / "root.json", data)
        self.root = new
        return {"root_version": new.version}

    def describe_slots(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, ms in self.state.models.items():
            out[name] = {
                "active": ms.active,
                "previous": ms.previous,
                "installed_version": ms.installed_version,
                "pending": None if ms.pending is None else vars(ms.pending),
                "rejected": list(ms.rejected),
                "slots": {slot: vars(info) for slot, info in ms.slots.items()},
                "removed": ms.removed,
            }
        for name, (_path, version) in self.seeds.items():
            out.setdefault(name, {"active": None, "installed_version": version})
            out[name]["seed_version"] = version
        return out

    def stats(self) -> dict[str, Any]:
        return dict(self.counters)

    # -- reporting -------------------------------------------------------------------------

    def _status(self, release_id: str, model: str, version: int, phase: str, *,
                final: bool = False, outcome: str = "", reason: str = "", message: str = "",
                progress: Mapping[str, Any] | None = None) -> None:
        """Report an OTA status; never raises (a full spool must not end or crash an install).

        A final status that cannot be spooled is published live instead: better sent once
        than never."""
        payload = OtaStatus(
            device_id=self.device_id, ts=time.time(), release_id=release_id, model=model,
            version=version, phase=phase, final=final, outcome=outcome, reason=reason,
            message=message[:1000], progress=dict(progress or {}),
        ).to_json()
        try:
            self.link.report(topics.OTA_STATUS, payload,
                             priority="critical" if final else "important")
            return
        except Exception as exc:
            log.error("OTA status (%s) not spooled: %s", phase, exc)
        if final:
            try:
                self.link.publish_live(topics.device_topic(self.device_id, topics.OTA_STATUS),
                                       payload)
            except Exception:
                log.exception("the final OTA status of %s could not be sent", release_id)

    def _final(self, release_id: str, model: str, version: int, outcome: str, reason: str,
               message: str, progress: Mapping[str, Any] | None = None) -> None:
        log.info("install of %s v%s: %s (%s) %s", model, version, outcome, reason, message)
        self._status(release_id, model, version, "done", final=True, outcome=outcome,
                     reason=reason, message=message, progress=progress)

    def _event(self, kind: str, message: str, **detail: Any) -> None:
        payload = Event(device_id=self.device_id, ts=time.time(), kind=kind, message=message,
                        detail=detail).to_json()
        try:
            self.link.report(topics.EVENTS, payload, priority="important")
        except Exception as exc:
            log.error("event %s not spooled: %s", kind, exc)

    # -- the worker ------------------------------------------------------------------------

    def on_message(self, kind: str, payload: bytes) -> None:
        """Called from the network thread: hand over. Chunk frames are buffered up to
        CHUNK_BUFFER_BYTES; while a download takes them, a frame waits for room (flow control
        through the connection: see CHUNK_BUFFER_BYTES), up to CHUNK_ROOM_WAIT_S; nothing else
        ever waits."""
        cost = len(payload) + _FRAME_OVERHEAD if kind == "chunk" else 0
        with self._inbox_room:
            if (cost and self._taking_chunks and not self._room_waits_failed
                    and not self._inbox_room.wait_for(
                        lambda: not self._taking_chunks or self._has_room(cost),
                        timeout=CHUNK_ROOM_WAIT_S)):
                self._room_waits_failed = True  # the worker is stuck: do not hold the link
            if cost and not self._has_room(cost):
                full = True
            else:
                try:
                    self._inbox.put_nowait((kind, payload))
                    self._inbox_bytes += cost
                    full = False
                except queue.Full:
                    full = True
            if full and cost:
                self.counters["chunks_dropped"] += 1
        if full:
            log.warning("OTA inbox full; dropping a %s message (it will be re-requested)", kind)

    def _has_room(self, cost: int) -> bool:
        return (self._inbox_bytes + cost <= CHUNK_BUFFER_BYTES
                and self._inbox.qsize() < _INBOX_ENTRIES)

    def _next_message(self, timeout: float) -> tuple[str, bytes]:
        """The oldest message of the inbox (``queue.Empty`` after ``timeout`` seconds)."""
        kind, payload = self._inbox.get(timeout=timeout)
        if kind == "chunk":
            with self._inbox_room:
                self._inbox_bytes -= len(payload) + _FRAME_OVERHEAD
                self._room_waits_failed = False
                self._inbox_room.notify_all()
        return kind, payload

    def _take_chunks(self, taking: bool) -> None:
        """A download starts (chunks that do not fit wait for room) or ends (they are dropped:
        nothing would make room)."""
        with self._inbox_room:
            self._taking_chunks = taking
            self._room_waits_failed = False
            self._inbox_room.notify_all()

    def _worker_main(self) -> None:
        try:
            self._worker()
        except BaseException as exc:  # recorded for check_worker, which restarts the thread
            self._worker_death = exc
            log.critical("the OTA worker thread stopped", exc_info=True)

    def _worker(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            with self._busy:
                current = self.state.job
                if current is None or current.release_id != job.release_id:
                    continue  # ended meanwhile (a restarted worker ended it)
                try:
                    self._run_job(current)
                except Exception as exc:
                    # _run_job ends every job itself; this is the last line of defence
                    log.exception("the OTA worker failed while ending %s", job.release_id)
                    with contextlib.suppress(Exception):
                        self._end_job(current, "failed", INTERNAL, _internal_message(exc))

    def _run_job(self, job: Job) -> None:
        self.counters["installs"] += 1
        self._need = None
        self._rolled_back = False
        try:
            self._drive(job)  # ends the job itself, with its final status
        except Exception as exc:  # a bug or an I/O error must still end in a final status
            outcome, reason, message = self._classify(job, exc)
            with contextlib.suppress(Exception):
                self._close_download(discard=True)
            self._take_chunks(False)
            self._end_job(job, outcome, reason, message)

    def _classify(self, job: Job, exc: Exception) -> tuple[str, str, str]:
        from fleetlite.agent.errors import DownloadError

        where = _PHASE_WHERE.get(job.phase, f"while {job.phase}")
        if is_disk_full(exc):
            log.error("install of %s: disk full %s: %s", job.release_id, where, exc)
            text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            return "failed", DISK_FULL, f"the disk filled up {where}: {text}"
        if isinstance(exc, DownloadError):
            return "failed", exc.reason, str(exc)
        if isinstance(exc, UpdateRejected):
            # the signed release is fine, the bytes served were not (a bad mirror, mixed
            # files): not remembered as rejected, so a correct delivery can still install it
            return "rejected", exc.reason, str(exc)
        log.exception("install of %s crashed %s", job.release_id, where)
        return "failed", INTERNAL, _internal_message(exc, where)

    def _job_version(self, job: Job) -> int:
        return job.version

    def _end_job(self, job: Job, outcome: str, reason: str, message: str,
                 progress: Mapping[str, Any] | None = None) -> None:
        """Undo a half-done switch, free what the job wrote, forget the job, send ONE final
        status. Never raises: each step's failure is logged and the next step still runs."""
        try:
            if self._undo_pending(job, reason):
                outcome = "rolled_back" if outcome == "failed" else outcome
        except Exception:
            log.exception("rolling back the model of %s failed", job.release_id)
        if self._rolled_back and outcome == "failed":
            outcome = "rolled_back"
        freed = self._clean_up(job)
        if reason == DISK_FULL:
            try:
                message = self._disk_full_message(message, freed)
            except Exception:
                log.exception("describing the disk space failed")
        if self.state.job is not None and self.state.job.release_id == job.release_id:
            self.state.job = None
        if outcome == "failed":
            self.state.remember_ended(EndedJob(
                release_id=job.release_id, model=job.model, version=self._job_version(job),
                outcome=outcome, reason=reason, message=message, ended=time.time()))
        else:
            self.state.forget_ended(job.release_id)
        self._save_quietly()
        self.counters[outcome if outcome in self.counters else "failed"] += 1
        self._final(job.release_id, job.model, self._job_version(job), outcome, reason, message,
                    progress)
        if outcome in ("installed", "rolled_back") and job.model:
            try:
                self.on_model_change(job.model)
            except Exception:
                log.exception("announcing the model change of %s failed", job.model)

    def _undo_pending(self, job: Job, reason: str) -> bool:
        """Roll back a switch this job made but did not commit; True if it did."""
        ms = self.state.models.get(job.model)
        if ms is None or ms.pending is None or ms.pending.release_id != job.release_id:
            return False
        version = ms.pending.version
        ms.revert()
        if reason in _NOT_THE_RELEASE and version in ms.rejected:
            ms.rejected.remove(version)  # not the release's fault: it may be installed later
        self._serve_active(job.model, ms)
        return True

    def _clean_up(self, job: Job) -> int:
        """Remove the job's staging copy and any slot no longer active or previous; returns
        the bytes freed. Never raises."""
        topic = topics.release_topic(job.release_id, topics.RELEASE_MANIFEST)
        try:
            self.link.unsubscribe(topic)  # the chunk blocks: when the download ended
        except Exception:
            log.exception("unsubscribing from %s failed", topic)
        freed = 0
        try:
            freed += remove_tree(self.store.staging_dir(job.release_id))
        except Exception:
            log.exception("removing the staging copy of %s failed", job.release_id)
        if job.model:
            freed += self._drop_abandoned_slots(job.model)
        return freed

    def _drop_abandoned_slots(self, name: str) -> int:
        """Delete the slots of ``name`` that are neither active nor previous (a rolled-back or
        half-written model); returns the bytes freed. Never raises."""
        ms = self.state.models.get(name)
        keep = {ms.active, ms.previous} if ms is not None else set()
        freed = 0
        for slot in SLOTS:
            if slot in keep:
                continue
            if ms is not None:
                ms.slots.pop(slot, None)
            try:
                freed += remove_tree(self.store.slot_dir(name, slot))
            except Exception:
                log.exception("removing slot %s of %s failed", slot, name)
        return freed

    def _drop_orphan_staging(self) -> None:
        """Remove staging copies that belong to no current job (left by an older agent)."""
        current = self.state.job.release_id if self.state.job is not None else None
        try:
            leftovers = [p for p in (self.store.dir / "staging").iterdir() if p.name != current]
        except OSError:
            return
        for path in leftovers:
            log.info("removing the staging copy %s of an install that ended", path.name)
            remove_tree(path)

    def _save_quietly(self) -> None:
        try:
            self.store.save(self.state)
        except Exception as exc:
            log.error("could not save the OTA state (%s); a restart may resume or roll back "
                      "the last install again", _os_error_text(exc))

    def _disk_full_message(self, message: str, freed: int) -> str:
        text = message.rstrip(". ")
        if "free space on the device" in text:
            text = text.replace("; free space on the device", "")
        parts = [f"{text}. The install was stopped and its files removed "
                 f"({describe_bytes(freed)} freed); the active model keeps serving."]
        try:
            free = free_bytes(self.store.dir)
        except OSError:
            free = -1
        if self._need is not None:
            where, needed, _free_then = self._need
            parts.append(f"It needs {describe_bytes(needed)} free under {where}"
                         + (f"; {describe_bytes(free)} are free now." if free >= 0 else "."))
        elif free >= 0:
            parts.append(f"{describe_bytes(free)} are free under {self.store.dir.parent} now.")
        parts.append("Free space on that file system (the agent's spool there can be capped "
                     "lower with spool.max_mb in agent.yaml), then send the install again.")
        return " ".join(parts)

    def _set_phase(self, job: Job, phase: str, **progress: Any) -> None:
        job.phase = phase
        self.store.save(self.state)
        self._status(job.release_id, job.model, self._job_version(job), phase,
                     progress=progress)

    # -- the driver: carries out what the machine (agent/ota_machine.py) decides ----------

    def _trust(self) -> machine.Trust:
        """What manifest verification needs to know of this device, now."""
        installed: dict[str, int] = {}
        for name, (_path, version) in self.seeds.items():
            if version is not None:
                installed[name] = version
        for name, ms in self.state.models.items():
            if ms.installed_version is not None:
                installed[name] = ms.installed_version
        self._have = {}
        for name, (path, _version) in self.seeds.items():  # agent.yaml's copy, while served
            seeded = self.state.models.get(name)
            if seeded is None or (seeded.active is None and not seeded.removed):
                sha = self._seed_sha256(path)
                if sha:
                    self._have[sha] = path
        for path in self.bases:  # any file whose sha256 is a delta's base will do
            sha = self._seed_sha256(path)
            if sha:
                self._have.setdefault(sha, path)
        for name, ms in self.state.models.items():
            for slot in (ms.previous, ms.active):  # the active one wins a tie
                info = ms.slots.get(slot) if slot is not None else None
                if slot is not None and info is not None and info.sha256:
                    self._have[info.sha256] = self.store.slot_dir(name, slot) / info.model_file
        return machine.Trust(
            root=self.root, device_class=self.device_class.name, agent_version=__version__,
            time_floor=self.floor.now(time.monotonic()), installed=installed,
            rejected={name: tuple(ms.rejected) for name, ms in self.state.models.items()},
            have=frozenset(self._have))

    def _seed_sha256(self, path: Path) -> str:
        """The sha256 of a model file agent.yaml serves (cached while it is unchanged); "" if
        it cannot be read."""
        import hashlib

        try:
            st = path.stat()
            key = (str(path), st.st_size, st.st_mtime_ns)
            if key not in self._seed_digests:
                digest = hashlib.sha256()
                with path.open("rb") as handle:
                    while block := handle.read(1 << 20):
                        digest.update(block)
                self._seed_digests[key] = digest.hexdigest()
            return self._seed_digests[key]
        except OSError:
            return ""

    def _drive(self, job: Job) -> None:
        """Run one install: feed the machine events, carry out its actions, until it ends."""
        staging = self.store.staging_dir(job.release_id)
        staging.mkdir(parents=True, exist_ok=True)
        saved = staging / "manifest.json"
        start = machine.Start(
            machine.JobSpec(job.release_id, job.chunk_size, job.retry, job.variant, job.phase,
                            job.probe, bool(job.shadow)),
            self._trust(), time.monotonic(), saved.read_bytes() if saved.is_file() else None)
        state, actions = machine.handle(machine.Receiver(self.device_id,
                                                         self.settings), start)
        todo = deque(actions)
        while True:
            while todo:
                action = todo.popleft()
                try:
                    event = self._do(job, action)
                except Exception as exc:
                    if isinstance(action, machine.End):
                        raise
                    todo.clear()  # decided before the failure: the machine decides anew
                    event = machine.Failed(*self._classify(job, exc))
                if event is not None:
                    state, more = machine.handle(state, event)
                    todo.extend(more)
            if state.phase == machine.IDLE:
                return
            state, more = machine.handle(state, self._next_event(state))
            todo.extend(more)

    def _next_event(self, state: machine.Receiver) -> machine.Event:
        """Wait for what the machine waits for: a message, or its next tick."""
        if state.phase == machine.HEALTH_CHECK:
            time.sleep(state.wait_s(time.monotonic()))
            assert state.manifest is not None
            served, errors = self._health_counts(state.manifest)
            return machine.HealthStats(served, errors, time.monotonic())
        try:
            kind, payload = self._next_message(state.wait_s(time.monotonic()))
        except queue.Empty:
            return machine.Tick(time.monotonic())
        if kind == "chunk":
            return machine.ChunkFrame(payload, time.monotonic())
        return machine.ManifestMessage(payload)

    def _do(self, job: Job, action: machine.Action) -> machine.Event | None:
        """Carry out one action; the event it answers with, if any. Raises on failure."""
        m = machine
        if isinstance(action, m.Subscribe):
            self._subscribe(action)
        elif isinstance(action, m.Unsubscribe):
            if action.kind == "round":
                self.link.unsubscribe_many(list(action.topics))
            else:
                for topic in action.topics:
                    self.link.unsubscribe(topic)
        elif isinstance(action, m.RequestChunks):
            request = replace(action.request, ts=time.time())
            self.link.publish_live(topics.device_topic(self.device_id, topics.OTA_REQUEST),
                                   request.to_json())
            if not request.done:
                self.counters["chunk_requests"] += 1
        elif isinstance(action, m.EnterPhase):
            job.model, job.version = action.model or job.model, action.version or job.version
            self._set_phase(job, action.phase)
        elif isinstance(action, m.ReportProgress):
            if self._download is not None:
                self._status(job.release_id, job.model, job.version, "downloading",
                             progress=self._download.progress().to_dict())
        elif isinstance(action, m.StageManifest):
            write_atomic(self.store.staging_dir(job.release_id) / "manifest.json",
                         action.payload)
        elif isinstance(action, m.RecordManifest):
            self._record_manifest(job, action.manifest, action.retry)
        elif isinstance(action, m.CheckSpace):
            return m.SpaceChecked(self._space_problem(job, action))
        elif isinstance(action, m.OpenDownload):
            return self._open_download(job, action)
        elif isinstance(action, m.ChunkFlow):
            self._take_chunks(action.taking)
        elif isinstance(action, m.WriteChunk):
            assert self._download is not None
            self._download.write(action.chunk)
        elif isinstance(action, m.PersistProgress):
            if self._download is not None:
                self._download.persist_if_due()
        elif isinstance(action, m.CloseDownload):
            self._close_download(discard=action.discard)
        elif isinstance(action, m.Finalize):
            assert self._download is not None
            try:
                self._download.finalize()
            except UpdateRejected:
                # bad bytes served: the job ends (its staging is removed then) or, for a
                # delta, the full files are fetched into the same staging directory
                self._close_download(discard=False)
                raise
            self._download = None
            return m.Done()
        elif isinstance(action, m.Rebuild):
            return self._rebuild(job, action)
        elif isinstance(action, m.Notice):
            self._event(action.kind, action.message, release_id=job.release_id,
                        reason=action.reason)
        elif isinstance(action, m.VerifyFiles):
            self._verify_files(action.manifest, self._staged_files(job, action.files))
            return m.Done()
        elif isinstance(action, m.RunSmoke):
            return self._smoke(job, action.manifest, action.variant,
                               self._staged_files(job, action.files))
        elif isinstance(action, m.Reject):
            self.state.model(action.model).reject(action.version)
            self.store.save(self.state)
        elif isinstance(action, m.StartShadow):
            try:
                self.shadows.start(release_id=job.release_id, manifest=action.manifest,
                                   variant=action.variant,
                                   files=self._staged_files(job, action.files),
                                   options=job.shadow)
            except (AgentError, ModelRuntimeError) as exc:
                return m.Failed("failed", SHADOW_UNAVAILABLE, str(exc))
            return m.Done()
        elif isinstance(action, m.Switch):
            self.shadows.stop(action.manifest.name, "the model is being switched")
            ms = self.state.model(action.manifest.name)
            if ms.installed_version is None and action.manifest.name in self.seeds:
                ms.installed_version = self.seeds[action.manifest.name][1]
            return m.Done(self._switch(job, action.manifest, action.variant,
                                       self._staged_files(job, action.files), ms))
        elif isinstance(action, m.Exercise):
            return self._exercise(action)
        elif isinstance(action, m.RollBack):
            ms = self.state.model(action.model)
            ms.revert()
            self._rolled_back = True
            self._serve_active(action.model, ms)
            self.store.save(self.state)
        elif isinstance(action, m.Commit):
            self._commit(self.state.model(action.model))
            return m.Done()
        elif isinstance(action, m.End):
            self._close_download(discard=True)
            self._end_job(job, action.outcome, action.reason, action.message, action.progress)
        else:  # pragma: no cover - every action is carried out above
            raise TypeError(f"unknown OTA action {action!r}")
        return None

    def _subscribe(self, action: machine.Subscribe) -> None:
        kind = "manifest" if action.kind == "manifest" else "chunk"

        def handler(payload: bytes) -> None:
            self.on_message(kind, payload)

        if action.kind == "round":
            # one SUBSCRIBE, sent even for a topic still subscribed: the broker sends each
            # topic's retained copy again, to this device alone
            self.link.subscribe_many(list(action.topics), handler)
            self.counters["chunk_resubscribes"] += 1
        else:
            for topic in action.topics:
                self.link.subscribe(topic, handler)

    def _staged_files(self, job: Job, names: tuple[str, ...]) -> dict[str, Path]:
        staging = self.store.staging_dir(job.release_id)
        return {name: staging / name for name in names}

    def _rebuild(self, job: Job, action: machine.Rebuild) -> machine.Event:
        """Rebuild a file from its kept base and the downloaded delta (checked against the
        signed hash before anything else sees it)."""
        from fleetlite.agent.delta_rebuild import rebuild
        from fleetlite.sdk.errors import DeltaError

        ref = action.delta
        staging = self.store.staging_dir(job.release_id)
        if (staging / ref.file).is_file() and not (staging / ref.delta).exists():
            # rebuilt before a restart or kept from a shadow: verifying checks its hash next
            return machine.Done()
        base = self._have.get(ref.base_sha256)
        try:
            if base is None:
                raise DeltaError(f"this device no longer keeps the base of {ref.delta}; fetch "
                                 "the full file instead", reason="delta_base_mismatch")
            header = rebuild(base, staging / ref.delta, action.manifest.file(ref.file),
                             staging / ref.file)
        except DeltaError as exc:
            log.warning("install of %s: delta %s refused (%s): %s", job.release_id, ref.delta,
                        exc.reason, exc)
            return machine.RebuildFailed(exc.reason, str(exc))
        log.info("rebuilt %s from a %s delta of %d bytes", ref.file, header.kind_name,
                 action.manifest.file(ref.delta).length)
        return machine.Done()

    def _record_manifest(self, job: Job, manifest: Manifest, retry: bool) -> None:
        job.model = manifest.name
        job.version = manifest.version
        if retry:
            ms = self.state.model(manifest.name)
            ms.rejected = [v for v in ms.rejected if v != manifest.version]
        self.floor = self.floor.observe(manifest.issued, time.monotonic())
        self.state.time_floor = self.floor.now(time.monotonic())
        self.store.save(self.state)

    def _space_problem(self, job: Job, action: machine.CheckSpace) -> str:
        """Why the staging and slot copies cannot fit (the ``disk_full`` message), or ""."""
        from fleetlite.agent.ota_download import part_name
        from fleetlite.agent.ota_space import HEADROOM

        manifest, manifest_bytes = action.manifest, action.envelope_bytes
        staging = self.store.staging_dir(job.release_id)
        staging.mkdir(parents=True, exist_ok=True)
        lengths = {name: manifest.file(name).length for name in action.files}
        kept = sum(manifest.file(name).length for name in action.keep)
        staged = sum(min(length, max(allocated(staging / name),
                                     allocated(staging / part_name(name))))
                     for name, length in lengths.items())
        ms = self.state.models.get(manifest.name)
        free_slot = self.store.slot_dir(manifest.name, ms.free_slot() if ms else "a")
        reclaimable = allocated(free_slot)
        slots_root = self.store.dir.parent / "models"
        slots_root.mkdir(parents=True, exist_ok=True)
        total = sum(lengths.values())
        needs = {staging: max(0, total - staged) + HEADROOM,
                 slots_root: kept + manifest_bytes - reclaimable}
        short = shortfall(needs)
        if os.stat(staging).st_dev == os.stat(slots_root).st_dev:
            where, needed = self.store.dir.parent, max(0, sum(needs.values()))
        else:
            where, needed = staging, needs[staging]
        self._need = (where, needed, free_bytes(where))
        if short is None:
            return ""
        at, space = short
        return (f"not enough free space for {manifest.name} v{manifest.version}: its download, "
                f"the staging copy and the A/B slot copy need {describe_bytes(space.needed)} "
                f"under {at} (the old model in the free slot already counted as freed), "
                f"{describe_bytes(space.free)} are free, {describe_bytes(space.missing)} "
                "short. Nothing was downloaded")

    def _open_download(self, job: Job, action: machine.OpenDownload) -> machine.DownloadOpened:
        staging = self.store.staging_dir(job.release_id)
        kept = self.shadows.kept_files(job.release_id)
        if kept is not None:  # promoted from shadowing: its verified files, not a download
            self.shadows.stop_release(job.release_id, "the release is being installed",
                                      keep_files=True)
            for path in kept.iterdir():
                if not (staging / path.name).exists():
                    shutil.copyfile(path, staging / path.name)
            remove_tree(kept)
        if any(names and all((staging / name).is_file() for name in names)
               for names in (action.fetch, action.final)):
            # finalized before a restart, or the files a shadow kept (a delta's rebuild too)
            return machine.DownloadOpened(None, time.monotonic())
        self._download = ChunkStore(staging, action.manifest, action.chunk_size,
                                    auto_persist=False, fetch=action.fetch)
        return machine.DownloadOpened(self._download.bitmap(), time.monotonic())

    def _close_download(self, *, discard: bool) -> None:
        from fleetlite.agent.errors import DownloadError

        store, self._download = self._download, None
        if store is None:
            return
        if discard:
            store.discard()
            return
        try:
            store.close()
        except DownloadError as exc:
            # the job ends now (its staging is removed); the first error tells why
            log.warning("could not save the download's progress: %s", exc)

    def _verify_files(self, manifest: Manifest, files: Mapping[str, Path]) -> None:
        from fleetlite.sdk.verify import verify_file

        for name, path in files.items():
            verify_file(path, manifest.file(name))

    # 4. smoke test ------------------------------------------------------------------------

    def _smoke(self, job: Job, manifest: Manifest, variant: Variant,
               files: Mapping[str, Path]) -> machine.SmokeDone:
        from fleetlite.agent.smoke_test import run_smoke_test

        try:
            generation = manifest.generation
            result = run_smoke_test(
                files[variant.model.file], files[variant.smoke.file],
                tolerance=variant.smoke.tolerance, budgets=self.device_class.budgets,
                num_threads=self.threads, timeout_s=self.settings.smoke_timeout_s,
                generation=generation.to_dict() if generation is not None else None,
                tokenizer_path=files[generation.tokenizer] if generation is not None else None,
            )
        except (AgentError, ModelRuntimeError) as exc:
            return machine.SmokeDone(False, SMOKE_UNAVAILABLE, str(exc), available=False)
        figures: dict[str, Any] = {"p95_ms": result.p95_ms, "peak_rss_mb": result.peak_rss_mb,
                                   "load_ms": result.load_ms, "fidelity": result.fidelity}
        if generation is not None:
            figures["ttft_ms"] = result.first_inference_ms
            figures["decode_tok_s"] = (1000.0 / result.p50_ms if result.p50_ms else None)
        return machine.SmokeDone(result.passed, result.reason, result.message, figures=figures)

    # 5. switch ----------------------------------------------------------------------------

    def _switch(self, job: Job, manifest: Manifest, variant: Variant,
                files: Mapping[str, Path], ms: ModelState) -> str:
        slot = ms.free_slot()
        target = self.store.slot_dir(manifest.name, slot)
        if ms.previous == slot or slot in ms.slots:
            # the old model there is overwritten: the state must not point at it any more
            ms.slots.pop(slot, None)
            if ms.previous == slot:
                ms.previous = None
            self.store.save(self.state)
        if target.exists():
            shutil.rmtree(target)
        target.mkdir(parents=True)
        for name, path in files.items():
            shutil.copyfile(path, target / name)
            with (target / name).open("rb+") as handle:
                os.fsync(handle.fileno())
        shutil.copyfile(self.store.staging_dir(job.release_id) / "manifest.json",
                        target / "manifest.json")
        fsync_dir(target)
        info = SlotInfo(version=manifest.version, release_id=job.release_id,
                        model_file=variant.model.file, variant=variant.name,
                        sha256=manifest.file(variant.model.file).sha256,
                        installed_at=time.time())
        ms.switch_to(slot, info, now=time.time())
        self.store.save(self.state)  # the switch point: from here a restart rolls back
        self._serve_active(manifest.name, ms)
        return slot

    def _serve_active(self, name: str, ms: ModelState) -> None:
        if ms.active is None and (name not in self.seeds or ms.removed):
            # a language model rolled back to nothing: it is no longer served
            self.language_models.remove(name)
            if name in self.models.names():
                self.models.deactivate(name)
            return
        if ms.active is None:
            path, version = self.seeds[name]
            sha = ""
        else:
            info = ms.slots[ms.active]
            path = self.store.slot_dir(name, ms.active) / info.model_file
            version, sha = info.version, info.sha256
            spec = release_generation(path.parent)
            if spec is not None:
                self.language_models.add(load_served_lm(
                    name, path, spec, version=version, sha256=sha, num_threads=self.threads,
                    memory_budget_mib=self.device_class.budgets.max_peak_rss_mb))
                if name in self.models.names():
                    self.models.deactivate(name)
                return
        self.language_models.remove(name)
        if name in self.models.names():
            self.models.swap(name, path, version=version, sha256=sha or None,
                             num_threads=self.threads)
        else:
            self.models.activate(name, path, version=version, sha256=sha or None,
                                 num_threads=self.threads)

    # 6. health window and commit ---------------------------------------------------------

    def _health_counts(self, manifest: Manifest) -> tuple[int, int]:
        """(served, errors) of the new model since the switch: inferences, or generations."""
        if manifest.generation is not None:
            stats = self.language_models.get(manifest.name).stats()
            return int(stats["generations"]), int(stats["errors"])
        counts = self.models.stats().get(manifest.name, {})
        return int(counts.get("inferences", 0)), int(counts.get("errors", 0))

    def _exercise(self, action: machine.Exercise) -> machine.HealthStats | None:
        """Run the new model once on the release's vectors (no live traffic came); a failure
        comes back as health statistics with its error."""
        from fleetlite.sdk.lm_smoke import LmSmokeVectors
        from fleetlite.sdk.runtime.lm_engine import GenerateParams

        manifest, variant = action.manifest, action.variant
        smoke_file = self._staged_files_of(manifest, variant)
        try:
            if manifest.generation is not None:
                prompts = [case.prompt_ids for case in LmSmokeVectors.from_json(
                    smoke_file.read_bytes()).cases]
                served = self.language_models.get(manifest.name)
                with served.service.generate(prompts[action.n % len(prompts)],
                                             GenerateParams(max_tokens=4)) as generation:
                    list(generation)
                served.record(generation.stats)
            else:
                inputs = self._smoke_inputs(smoke_file)
                self.models.infer(manifest.name, inputs[action.n % len(inputs)])
        except (AgentError, ModelRuntimeError) as exc:
            return machine.HealthStats(0, 0, time.monotonic(), error=str(exc))
        return None

    def _staged_files_of(self, manifest: Manifest, variant: Variant) -> Path:
        """The release's smoke vectors in the slot now serving it."""
        ms = self.state.model(manifest.name)
        assert ms.active is not None
        return self.store.slot_dir(manifest.name, ms.active) / variant.smoke.file

    def _commit(self, ms: ModelState) -> None:
        """Commit the health window; if the state cannot be saved, the commit is undone in
        memory too (the job then ends and rolls back: the disk says "pending")."""
        pending, installed, job = ms.pending, ms.installed_version, self.state.job
        ms.commit()
        self.state.job = None  # saved with the commit: a restart must not resume the job
        try:
            self.store.save(self.state)
        except BaseException:
            ms.pending, ms.installed_version, self.state.job = pending, installed, job
            raise

    def _smoke_inputs(self, smoke_file: Path) -> list[list[npt.NDArray[Any]]]:
        from fleetlite.sdk.smoke import SmokeVectors

        vectors = SmokeVectors.from_json(smoke_file.read_bytes())
        return [case.input_arrays() for case in vectors.cases] or [[]]


def _os_error_text(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        where = f" ({exc.filename})" if exc.filename else ""
        return f"{exc.strerror}{where}"
    return str(exc) or type(exc).__name__


def _internal_message(exc: BaseException, where: str = "") -> str:
    return (f"{type(exc).__name__}: {exc} {where}".rstrip() + "; this is a bug in the agent. "
            "The install was stopped and its files removed; send the install again, and the "
            "agent log (it has the traceback) to the FleetLite developers")
