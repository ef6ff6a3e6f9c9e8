"""Shadow candidates: a release installed beside the active model and run on a sample of its live
requests, reporting only agreement statistics and latency (``fleetlite.shadow_report/1`` on the
device's ``shadow`` topic), never inputs or outputs.

An ``ota_install`` with ``shadow`` ends, once the release verified and passed its crash-isolated
smoke test, with the final status ``shadowing``: its files are kept under ``ota/shadow/<release
id>``, the candidate is loaded in the agent's process (it passed the isolated check) and a
:class:`~fleetlite.agent.shadow_runner.ModelShadow` or ``LmShadow`` runs it after the active model
has answered, under the runner's CPU budget. A report goes out every ``report_every_s`` and when
the shadow stops: on ``shadow_stop``, when the release is installed for real (its kept files are
used, nothing is downloaded again), or when the model is removed.

A shadow survives a restart of the agent: beside its kept files, ``.session.json`` (written last,
atomically) names the release, its manifest, the variant and the options. When the agent starts
again (:meth:`ShadowSessions.resume`, once the active models are served) each kept file is
checked against the manifest's sha256 and the candidate starts again with fresh statistics; a
directory without a session, with a file that does not match, or whose model is no longer
served is removed, and the fleet sees its reports end.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union

from fleetlite.agent.errors import AgentError
from fleetlite.agent.language_models import LanguageModels
from fleetlite.agent.model_service import ModelService
from fleetlite.agent.ota_space import remove_tree
from fleetlite.agent.shadow_runner import LmShadow, ModelShadow, ShadowConfig, ShadowIdentity
from fleetlite.sdk import topics
from fleetlite.sdk.atomic import write_json_atomic
from fleetlite.sdk.errors import FleetLiteError
from fleetlite.sdk.manifest import Manifest, Variant, parse_manifest
from fleetlite.sdk.shadow import CLASSIFIER, LM, REGRESSOR

log = logging.getLogger("fleetlite.agent.ota_shadow")

KINDS = (CLASSIFIER, REGRESSOR)
DEFAULT_REPORT_EVERY_S = 30.0
SESSION_FILE = ".session.json"  # a release's file names never start with a dot
MAX_SESSION_BYTES = 1024 * 1024


@dataclass
class _Session:
    release_id: str
    model: str
    version: int
    dir: Path
    runner: Union[ModelShadow, LmShadow]
    next_report: float


class ShadowSessions:
    """The device's shadow candidates (at most one per model name)."""

    def __init__(self, *, device_id: str, root: Path, models: ModelService,
                 language_models: LanguageModels, link: Any, threads: int,
                 report_every_s: float = DEFAULT_REPORT_EVERY_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.device_id = device_id
        self.root = root
        self.models = models
        self.language_models = language_models
        self.link = link
        self.threads = threads
        self.report_every_s = report_every_s
        self._clock = clock
        self._lock = threading.Lock()
        self._sessions: dict[str, _Session] = {}  # by model name

    def start(self, *, release_id: str, manifest: Manifest, variant: Variant,
              files: Mapping[str, Path], options: Mapping[str, Any]) -> None:
        """Keep ``files`` (verified and smoke-tested), load the candidate and start shadowing
        the active model of ``manifest.name`` with it. Raises :class:`AgentError` when the
        device serves no such model or the options do not fit it."""
        name = manifest.name
        self.stop(name, "replaced by another shadow")
        target = self.root / release_id
        remove_tree(target)
        target.mkdir(parents=True)
        for file_name, path in files.items():
            shutil.copyfile(path, target / file_name)
        try:
            self._begin(release_id, manifest, variant, target, options)
            write_json_atomic(target / SESSION_FILE, {
                "release_id": release_id, "manifest": manifest.to_dict(),
                "variant": variant.name, "files": sorted(files), "options": dict(options)})
        except BaseException:
            self.stop(name, "it could not start", keep_files=True)
            remove_tree(target)
            raise
        log.info("shadowing %s v%s beside the active model", name, manifest.version)

    def _begin(self, release_id: str, manifest: Manifest, variant: Variant, target: Path,
               options: Mapping[str, Any]) -> None:
        runner = self._runner(release_id, manifest, variant, target, options)
        runner.start()
        with self._lock:
            self._sessions[manifest.name] = _Session(release_id, manifest.name,
                                                     manifest.version, target, runner,
                                                     self._clock() + self.report_every_s)

    def resume(self) -> list[str]:
        """Start again the shadows kept before a restart (call once the active models are
        served); returns the release ids resumed. Anything that does not check out is removed."""
        from fleetlite.sdk.verify import verify_file

        resumed: list[str] = []
        if not self.root.is_dir():
            return resumed
        for target in sorted(p for p in self.root.iterdir() if p.is_dir()):
            try:
                session = target / SESSION_FILE
                if not session.is_file() or session.stat().st_size > MAX_SESSION_BYTES:
                    raise AgentError("no session was recorded (stopped while it started)")
                data = json.loads(session.read_bytes())
                manifest = parse_manifest(json.dumps(data["manifest"]).encode())
                variant = manifest.variant(str(data["variant"]))
                release_id = str(data["release_id"])
                if target.name != release_id or manifest.name in self._sessions:
                    raise AgentError("its directory does not match its session")
                for name in data["files"]:
                    verify_file(target / str(name), manifest.file(str(name)))
                self._begin(release_id, manifest, variant, target, dict(data["options"]))
            except (FleetLiteError, OSError, ValueError, KeyError, TypeError) as exc:
                log.warning("not resuming the shadow kept in %s: %s", target, exc)
                remove_tree(target)
                continue
            resumed.append(release_id)
            log.info("shadowing %s v%s again after the restart", manifest.name, manifest.version)
        return resumed

    def _runner(self, release_id: str, manifest: Manifest, variant: Variant, target: Path,
                options: Mapping[str, Any]) -> Union[ModelShadow, LmShadow]:
        config = ShadowConfig(sample_rate=float(options.get("sample_rate", 0.2)), seed=None,
                              cpu_budget=float(options.get("cpu_budget", 0.25)),
                              p95_budget_ratio=float(options.get("p95_ratio", 1.25)))
        model_path = target / variant.model.file
        spec = manifest.generation
        if spec is not None:
            from fleetlite.sdk.runtime.lm_engine import LmEngine
            from fleetlite.sdk.runtime.tokenizer import load_tokenizer

            served = self.language_models.get(manifest.name)
            engine = LmEngine(model_path, num_threads=self.threads, spec=spec,
                              tokenizer=load_tokenizer(target / spec.tokenizer,
                                                       spec.tokenizer_kind))
            identity = ShadowIdentity(self.device_id, release_id, manifest.name,
                                      manifest.version, served.version or 0)
            return LmShadow(served.service, engine, identity=identity, config=config)
        from fleetlite.sdk.runtime.interpreter import load_model

        if manifest.name not in self.models.names():
            raise AgentError(f"this device serves no model {manifest.name!r} to shadow; "
                             "install the release instead")
        kind = str(options.get("kind", CLASSIFIER))
        if kind not in KINDS:
            raise AgentError(f"shadow kind must be one of {', '.join(KINDS)} (a language "
                             f"model is shadowed as {LM!r} by itself)")
        bound = options.get("error_bound")
        if kind == REGRESSOR and bound is None:
            raise AgentError("a regressor's shadow needs error_bound: the largest absolute "
                             "difference of an output that still agrees")
        active = self.models.get(manifest.name)
        identity = ShadowIdentity(self.device_id, release_id, manifest.name, manifest.version,
                                  active.version or 0)
        candidate = load_model(model_path, num_threads=self.threads)
        return ModelShadow(self.models, manifest.name, candidate, kind=kind, identity=identity,
                           config=config, error_bound=None if bound is None else float(bound))

    def kept_files(self, release_id: str) -> Optional[Path]:
        """The directory of a shadowed release's files, if this device shadows it."""
        with self._lock:
            for session in self._sessions.values():
                if session.release_id == release_id:
                    return session.dir
        return None

    def tick(self) -> None:
        """Send the reports that are due."""
        now = self._clock()
        with self._lock:
            due = [s for s in self._sessions.values() if now >= s.next_report]
            for session in due:
                session.next_report = now + self.report_every_s
        for session in due:
            self._report(session)

    def stop(self, model: str, why: str, *, keep_files: bool = False) -> bool:
        """Stop shadowing ``model`` (a last report goes out); True if it was shadowed."""
        with self._lock:
            session = self._sessions.pop(model, None)
        if session is None:
            return False
        session.runner.stop()
        self._report(session)
        if not keep_files:
            remove_tree(session.dir)
        log.info("stopped shadowing %s v%s: %s", session.model, session.version, why)
        return True

    def stop_release(self, release_id: str, why: str, *, keep_files: bool = False) -> bool:
        with self._lock:
            model = next((s.model for s in self._sessions.values()
                          if s.release_id == release_id), None)
        return model is not None and self.stop(model, why, keep_files=keep_files)

    def stop_all(self, why: str, *, keep_files: bool = False) -> None:
        """Stop every shadow; ``keep_files`` (the agent stopping) leaves them to
        :meth:`resume` at the next start."""
        with self._lock:
            models = list(self._sessions)
        for model in models:
            self.stop(model, why, keep_files=keep_files)

    def describe(self) -> list[dict[str, Any]]:
        with self._lock:
            sessions = list(self._sessions.values())
        out = []
        for s in sessions:
            report = s.runner.report()
            out.append({"release_id": s.release_id, "model": s.model, "version": s.version,
                        "samples": report.samples, "agreement": report.agreement})
        return out

    def _report(self, session: _Session) -> None:
        try:
            payload = session.runner.report().to_json()
            self.link.report(topics.SHADOW, payload, priority="important")
        except Exception as exc:  # a full spool must not stop the shadow or the agent
            log.error("shadow report of %s not sent: %s", session.model, exc)
