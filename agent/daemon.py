"""The device agent process: wires config, spool, model service, local API, MQTT link and timers.

``fleetlite-agent run`` builds an :class:`Agent` and calls :meth:`Agent.run_forever`, which
returns after SIGTERM/SIGINT once everything is shut down cleanly (retained offline status
published, local socket removed, spool flushed to disk).
"""

from __future__ import annotations

import hashlib
import logging
import queue
import signal
import threading
import time
from collections import deque
from dataclasses import replace
from pathlib import Path
from types import FrameType
from typing import Any

from fleetlite.agent import device_facts
from fleetlite.agent.commands import CommandDispatcher, arg, command_name
from fleetlite.agent.config import AgentConfig, ModelEntry, load_config
from fleetlite.agent.errors import AgentConfigError, AgentError
from fleetlite.agent.fleet_tags import FleetTags
from fleetlite.agent.language_models import LanguageModels
from fleetlite.agent.link import MqttLink
from fleetlite.agent.lm_serving import load_served_lm, release_generation
from fleetlite.agent.model_service import ModelService
from fleetlite.agent.ota import OtaManager, OtaSettings
from fleetlite.agent.spool import Spool
from fleetlite.agent.telemetry import system_snapshot
from fleetlite.sdk import topics
from fleetlite.sdk.atomic import read_json, write_json_atomic
from fleetlite.sdk.device_class import DeviceClass, find_device_class
from fleetlite.sdk.errors import DeviceClassError, FleetLiteError
from fleetlite.sdk.messages import Birth, CommandResponse, Event, Telemetry
from fleetlite.sdk.runtime.errors import ModelRuntimeError
from fleetlite.sdk.runtime.isolated import check_language_model, check_model
from fleetlite.sdk.version import __version__

log = logging.getLogger("fleetlite.agent")

# refused commands reported as events per minute (the rest are counted into the next one)
_REJECTED_EVENTS = 20

# Reconfigurable without a restart by the reload_config command; everything else needs one.
RELOADABLE = ("tags", "telemetry_interval_s", "profile_on_model_change")


def next_session(state_dir: Path) -> int:
    """Increment and persist the session counter (used to tell a stale Last Will from a new one)."""
    path = state_dir / "session.json"
    session = int((read_json(path, {}) or {}).get("session", 0)) + 1
    write_json_atomic(path, {"session": session})
    return session


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class Agent:
    """One running device agent."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        try:
            self.device_class: DeviceClass = find_device_class(config.device_class)
        except DeviceClassError as exc:
            origin = config.source or "agent.yaml"
            raise AgentConfigError(f"{origin}: device_class: {exc}") from exc
        config.state_dir.mkdir(parents=True, exist_ok=True)
        self.started = time.monotonic()
        self.session = next_session(config.state_dir)
        self.threads = config.threads or self.device_class.runtime.default_threads
        self.spool = Spool(
            config.spool_dir,
            max_records=config.spool_max_records,
            max_bytes=int(config.spool_max_mb * 2**20),
        )
        self.models = ModelService()
        self.language_models = LanguageModels()
        self.local_api: Any = None
        self.dispatcher = CommandDispatcher(
            config.device_id,
            {
                "ping": self._cmd_ping,
                "info": self._cmd_info,
                "profile": self._cmd_profile,
                "reload_config": self._cmd_reload_config,
                "set_tags": self._cmd_set_tags,
            },
        )
        self._commands: queue.Queue[bytes | None] = queue.Queue(maxsize=1000)
        self._jobs: queue.Queue[tuple[str, dict[str, Any]] | None] = queue.Queue()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._telemetry_seq = 0
        self.fleet_tags = FleetTags(config.state_dir)
        self._rejected_at: deque[float] = deque()
        self._rejected_suppressed = 0
        self.link = MqttLink(
            config,
            session=self.session,
            outbox=self.spool,
            birth=self._birth,
            on_command=self._enqueue_command,
        )
        self.ota = OtaManager(
            device_id=config.device_id,
            device_class=self.device_class,
            state_dir=config.state_dir,
            models=self.models,
            link=self.link,
            root_path=config.trust_root,
            threads=self.threads,
            seeds={m.name: (m.path, m.version) for m in config.models if m.tokenizer is None},
            bases=[m.path for m in config.models if m.tokenizer is not None],
            on_model_change=self._model_changed,
            settings=ota_settings(config),
            language_models=self.language_models,
        )
        self.dispatcher.handlers.update({
            "ota_install": self.ota.cmd_install,
            "ota_rollback": self.ota.cmd_rollback,
            "ota_slots": self.ota.cmd_slots,
            "shadow_stop": self.ota.cmd_shadow_stop,
            "update_root": self.ota.cmd_update_root,
            "remove_model": self.ota.cmd_remove,
        })

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        served = self.ota.recover()
        for name, path, version, _sha in served:
            self._activate(name, path, version)
        for entry in self.config.models:
            if entry.tokenizer is not None:
                self._serve_language_model(entry)
        if self.config.socket is not None:
            from fleetlite.agent.local_api import LocalApiServer

            self.local_api = LocalApiServer(self.config.socket, self.models,
                                            language_models=self.language_models)
            self.local_api.start()
        self.link.start()
        self.ota.start()
        for target, name in (
            (self._command_loop, "fleetlite-commands"),
            (self._job_loop, "fleetlite-jobs"),
            (self._telemetry_loop, "fleetlite-telemetry"),
        ):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        if self.config.profile_on_model_change:
            for name, *_ in served:
                self._jobs.put(("profile", {"model": name, "trigger": "model_change"}))

    def stop(self) -> None:
        self._stop.set()
        self.ota.stop()
        self._commands.put(None)
        self._jobs.put(None)
        for thread in self._threads:
            thread.join(5)
        self.link.stop()
        if self.local_api is not None:
            self.local_api.stop()
        log.info("agent stopped")

    def run_forever(self) -> None:
        """Start, then block until SIGTERM or SIGINT; shut down cleanly."""
        done = threading.Event()

        def on_signal(signum: int, frame: FrameType | None) -> None:
            log.info("received %s, shutting down", signal.Signals(signum).name)
            done.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        self.start()
        log.info("agent %s running (session %d)", self.config.device_id, self.session)
        while not done.wait(0.5):
            self.ota.check_worker()  # the tick: a dead OTA worker is reported and restarted
        self.stop()

    # -- models --------------------------------------------------------------------------------

    def _activate(self, name: str, path: Path, version: int | None) -> None:
        spec = release_generation(path.parent)
        if spec is not None:  # an installed language-model release
            self.language_models.add(load_served_lm(
                name, path, spec, version=version, sha256=sha256_file(path),
                num_threads=self.threads,
                memory_budget_mib=self.device_class.budgets.max_peak_rss_mb))
            return
        # Never load an unchecked file in our own process: a bad model can segfault it.
        check_model(path, num_threads=self.threads)
        self.models.activate(
            name, path, version=version, sha256=sha256_file(path), num_threads=self.threads
        )

    def _model_changed(self, name: str) -> None:
        self.link.refresh_birth()
        served = name in self.models.names() or any(lm.name == name
                                                      for lm in self.language_models)
        if self.config.profile_on_model_change and served:  # not a model just removed
            self._jobs.put(("profile", {"model": name, "trigger": "model_change"}))

    # -- messages ------------------------------------------------------------------------------

    def _serve_language_model(self, entry: ModelEntry) -> None:
        """Load a language model declared in agent.yaml and serve it to the local API."""
        from fleetlite.agent.language_models import ServedLm
        from fleetlite.agent.lm_service import LmService
        from fleetlite.sdk.runtime.lm_engine import LmEngine
        from fleetlite.sdk.runtime.lm_files import spec_for_files

        assert entry.tokenizer is not None
        try:
            # a hostile or truncated file can crash the interpreter: first in a child process
            check_language_model(entry.path, num_threads=self.threads)
            spec, tokenizer = spec_for_files(entry.path, entry.tokenizer,
                                             prompt_template=entry.prompt_template,
                                             stop_ids=entry.stop_ids)
            engine = LmEngine(entry.path, spec=spec, tokenizer=tokenizer,
                              num_threads=self.threads,
                              memory_budget_mib=self.device_class.budgets.max_peak_rss_mb)
        except FleetLiteError as exc:
            log.error("language model %s not served: %s", entry.name, exc)
            return
        self.language_models.add(ServedLm(entry.name, LmService(engine),
                                          version=entry.version,
                                          sha256=sha256_file(entry.path), path=entry.path))
        log.info("serving language model %s (%s, %d layers, context %d)", entry.name,
                 entry.path.name, engine.layout.num_layers, engine.layout.context_length)

    def _birth(self) -> bytes:
        return Birth(
            device_id=self.config.device_id,
            session=self.session,
            ts=time.time(),
            device_class=self.config.device_class,
            agent_version=__version__,
            tags=self.fleet_tags.effective(self.config.tags),
            facts=device_facts.collect(self.config.device_class),
            models=self.models.describe() + [
                {"name": lm.name, "version": lm.version, "sha256": lm.sha256,
                 "kind": "generative"} for lm in self.language_models],
        ).to_json()

    def event(self, kind: str, message: str, **detail: Any) -> None:
        payload = Event(
            device_id=self.config.device_id, ts=time.time(), kind=kind, message=message,
            detail=detail,
        ).to_json()
        self.link.report(topics.EVENTS, payload, priority="important")

    def telemetry(self) -> bytes:
        self._telemetry_seq += 1
        return Telemetry(
            device_id=self.config.device_id,
            session=self.session,
            seq=self._telemetry_seq,
            ts=time.time(),
            system=system_snapshot(self.config.state_dir),
            models={**self.models.stats(), **self.language_models.stats()},
            spool=self.spool.stats(),
        ).to_json()

    # -- worker threads ------------------------------------------------------------------------

    def _enqueue_command(self, payload: bytes) -> None:
        try:
            self._commands.put_nowait(payload)
        except queue.Full:
            log.warning("command queue full; dropping a command")

    def _command_loop(self) -> None:
        while True:
            payload = self._commands.get()
            if payload is None:
                return
            response = self.dispatcher.handle(payload)
            self.link.report(topics.COMMAND_RESPONSE, response.to_json(), priority="important")
            if not response.ok:
                self._command_rejected(payload, response)

    def _command_rejected(self, payload: bytes, response: CommandResponse) -> None:
        """Report a refused command as an event (``fleetlite events``): at most
        ``_REJECTED_EVENTS`` a minute, the rest counted into the next one, so a flood of bad
        commands does not become a flood of events."""
        now = time.monotonic()
        while self._rejected_at and now - self._rejected_at[0] > 60.0:
            self._rejected_at.popleft()
        if len(self._rejected_at) >= _REJECTED_EVENTS:
            self._rejected_suppressed += 1
            return
        self._rejected_at.append(now)
        name = command_name(payload)
        suppressed, self._rejected_suppressed = self._rejected_suppressed, 0
        self.event("command_rejected",
                   f"command {name or '(unreadable)'} refused ({response.error_code}): "
                   f"{response.error}"[:1000],
                   command_id=response.id, command=name, error_code=response.error_code,
                   not_reported_before=suppressed)

    def _job_loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            kind, args = job
            try:
                if kind == "profile":
                    self._profile(args)
            except (AgentError, ModelRuntimeError) as exc:
                log.error("%s job failed: %s", kind, exc)
                self.event(f"{kind}_failed", str(exc))

    def _telemetry_loop(self) -> None:
        while not self._stop.wait(self.config.telemetry_interval_s):
            try:
                self.link.report(topics.TELEMETRY, self.telemetry(), priority="telemetry")
            except AgentError as exc:
                log.error("telemetry not spooled: %s", exc)

    # -- profiling -----------------------------------------------------------------------------

    def _profile(self, args: dict[str, Any]) -> dict[str, Any]:
        from fleetlite.agent.profiler import profile_model_isolated

        name = args["model"]
        if name in self.language_models:
            return self._profile_language_model(name, args)
        active = self.models.get(name)
        defaults = self.device_class.profiler
        record = profile_model_isolated(
            active.path,
            num_threads=self.threads,
            warmup_runs=args.get("warmup_runs", defaults.warmup_runs),
            min_runs=args.get("min_runs", defaults.min_runs),
            max_runs=args.get("max_runs", defaults.max_runs),
            min_seconds=args.get("min_seconds", defaults.min_seconds),
            max_seconds=args.get("max_seconds", defaults.max_seconds),
            device_id=self.config.device_id,
            device_class=self.config.device_class,
            model_name=name,
            model_version=active.version,
            trigger=args.get("trigger", "command"),
        )
        self.link.report(topics.PROFILE, record.to_json(), priority="important")
        return record.to_dict()

    def _profile_language_model(self, name: str, args: dict[str, Any]) -> dict[str, Any]:
        """A language-model profile (TTFT, prefill and decode tokens/s, peak memory) of the
        served model, in a child process like every profile."""
        from fleetlite.agent.lm_profiler import profile_lm_isolated

        served = self.language_models.get(name)
        if served.path is None:
            raise AgentError(f"language model {name} has no file to profile")
        spec = served.service.engine.spec
        record = profile_lm_isolated(
            served.path, num_threads=self.threads,
            cache_layout=spec.cache_layout if spec else None,
            device_id=self.config.device_id, device_class=self.config.device_class,
            model_name=name, model_version=served.version,
            trigger=args.get("trigger", "command"),
        )
        self.link.report(topics.PROFILE, record.to_json(), priority="important")
        return record.to_dict()

    # -- command handlers ----------------------------------------------------------------------

    def _cmd_ping(self, args: Any) -> dict[str, Any]:
        return {
            "pong": True,
            "session": self.session,
            "uptime_s": round(time.monotonic() - self.started, 3),
            "agent_version": __version__,
        }

    def _cmd_info(self, args: Any) -> dict[str, Any]:
        return {
            "facts": device_facts.collect(self.config.device_class),
            "device_class": self.config.device_class,
            "tags": self.fleet_tags.effective(self.config.tags),
            "models": self.models.describe(),
            "spool": self.spool.stats(),
            "link": self.link.stats(),
            "ota": self.ota.stats(),
            "commands": self.dispatcher.stats(),
        }

    def _cmd_profile(self, args: Any) -> dict[str, Any]:
        names = [m["name"] for m in self.models.describe()] + [
            lm.name for lm in self.language_models]
        name = arg(args, "model", str, names[0] if len(names) == 1 else None)
        if name is None:
            raise AgentError(
                f"this device serves {len(names)} models {names}; say which with args.model"
            )
        if name not in names:
            raise AgentError(f"no active model named {name!r}; active models: {names}")
        request: dict[str, Any] = {"model": name, "trigger": "command"}
        for key in ("warmup_runs", "min_runs", "max_runs"):
            value = arg(args, key, int)
            if value is not None:
                if value < 0:
                    raise AgentError(f"argument {key!r} must be >= 0")
                request[key] = value
        for key in ("min_seconds", "max_seconds"):
            value = arg(args, key, (int, float))
            if value is not None:
                if not 0 <= value <= 600:
                    raise AgentError(f"argument {key!r} must be between 0 and 600 seconds")
                request[key] = float(value)
        record = self._profile(request)
        return {"profile": record}

    def _cmd_set_tags(self, args: Any) -> dict[str, Any]:
        """Set and remove tags from the fleet (:mod:`fleetlite.agent.fleet_tags`); the birth
        is published again with the device's tags now."""
        to_set = arg(args, "set", dict, {})
        to_remove = arg(args, "remove", list, [])
        self.fleet_tags.apply(to_set, to_remove)
        self.link.refresh_birth()
        return {"tags": self.fleet_tags.effective(self.config.tags)}

    def _cmd_reload_config(self, args: Any) -> dict[str, Any]:
        if self.config.source is None:
            raise AgentError("this agent was not started from a config file; nothing to reload")
        new = load_config(self.config.source)
        changed_fixed = [
            key for key in ("device_id", "device_class", "broker", "state_dir", "socket")
            if getattr(new, key) != getattr(self.config, key)
        ]
        if changed_fixed:
            raise AgentError(
                f"{', '.join(changed_fixed)} changed in {self.config.source}; these need a "
                "restart: systemctl restart fleetlite-agent"
            )
        changed = [key for key in RELOADABLE if getattr(new, key) != getattr(self.config, key)]
        self.config = replace(self.config, **{key: getattr(new, key) for key in RELOADABLE})
        self.link.config = self.config
        self.link.refresh_birth()
        return {"reloaded": True, "changed": changed}


def ota_settings(config: AgentConfig) -> OtaSettings:
    """OtaSettings from the ``ota:`` section of agent.yaml (seconds and counts)."""
    values: dict[str, Any] = dict(config.ota)
    for key in ("max_requests_without_progress", "health_inferences"):
        if key in values:
            values[key] = int(values[key])
    return OtaSettings(**values)


def run(config_path: str | Path) -> None:
    """Entry point of ``fleetlite-agent run``."""
    agent = Agent(load_config(config_path))
    agent.run_forever()
