"""One simulated device on its own MQTT connection: the asyncio adapter around the pure parts.

A :class:`SimDevice` connects with its Last Will, publishes its retained status and birth,
subscribes to its commands, reports telemetry every ``report_s`` and a profile whenever its
model changes, answers ``ping``, ``info``, ``ota_install``, ``ota_slots`` and ``ota_rollback``,
and runs installs through :class:`~fleetlite.tools.sim.ota.Install` on the release topics.
Churn drops the connection without a DISCONNECT (so the broker publishes the Will), waits an
offline period and reconnects as the next connection (``conn``) of the same session.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import time
from collections.abc import Sequence
from typing import Any

import aiomqtt

from fleetlite.sdk import topics
from fleetlite.sdk.messages import Command, CommandResponse, MessageError, OtaStatus
from fleetlite.sdk.trust import Root
from fleetlite.tools.sim import reports
from fleetlite.tools.sim.config import SimConfig
from fleetlite.tools.sim.ota import Install, Outcome, Resubscribe
from fleetlite.tools.sim.plan import DevicePlan
from fleetlite.tools.sim.stats import Stats

log = logging.getLogger("fleetlite.tools.sim")

MANIFEST_TIMEOUT_S = 30.0
#: how long a publish or subscribe may wait for the broker's acknowledgement. aiomqtt's default
#: (10 s) ends the connection when a busy event loop or broker acknowledges late: a real agent's
#: connection ends on a missed keepalive, not on a slow acknowledgement
ACK_TIMEOUT_S = 300.0
#: how long an ended install is remembered for re-sent commands (the agent's ota.ended_memory_s)
ENDED_MEMORY_S = 600.0
_RECONNECT_MIN_S, _RECONNECT_MAX_S = 1.0, 30.0


class SimDevice:
    """A simulated device: its plan, its remembered state and one connection at a time."""

    def __init__(self, plan: DevicePlan, config: SimConfig, root: Root | None, stats: Stats,
                 stop: asyncio.Event, session: int = 1) -> None:
        self.plan = plan
        self.config = config
        self.root = root
        self.stats = stats
        self.stop = stop
        self.rng = random.Random(plan.seed)
        # the session counter of a real agent grows at every start; a run's start time does too,
        # so the fleet orders this run's statuses after those of an earlier run
        self.state = reports.DeviceState(plan.device_id, plan.device_class, config.model,
                                         config.model_version, session=session)
        self.tags = {"simulated": "true", "site": f"site-{plan.index % 10}"}
        self.install: Install | None = None
        self.last_release: str = ""
        self.previous_version: int | None = None
        self.ended: dict[str, tuple[float, OtaStatus]] = {}
        self._profiled_version: int | None = None
        self._client: aiomqtt.Client | None = None
        self._jobs: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()  # the release topics brought something
        self._dropped = False  # the churn timer dropped the current connection

    def topic(self, kind: str) -> str:
        return topics.device_topic(self.plan.device_id, kind)

    # -- lifetime --------------------------------------------------------------------------

    async def run(self) -> None:
        """Connect (after the planned start delay), stay connected until told to stop, and
        reconnect after churn drops and lost connections."""
        if await self._sleep(self.plan.start_delay_s):
            return
        failures = 0
        while not self.stop.is_set():
            self._dropped = False
            try:
                await self._session()
                failures, offline_s = 0, 0.0
            except aiomqtt.MqttError as exc:
                if self._dropped:  # our own churn drop: an offline period, then reconnect
                    self.stats.add("churn_drops")
                    failures, offline_s = 0, self.config.offline_s * self.rng.uniform(0.5, 1.5)
                else:
                    failures += 1
                    self.stats.add("connection_errors")
                    log.debug("%s: %s", self.plan.device_id, exc)
                    offline_s = min(_RECONNECT_MAX_S, _RECONNECT_MIN_S * 2 ** min(failures, 5))
                    offline_s *= self.rng.uniform(0.5, 1.0)  # jitter: no lock-step reconnects
            if await self._sleep(offline_s):
                return

    async def _sleep(self, seconds: float) -> bool:
        """Sleep, waking early when the run stops; True if it stopped."""
        if seconds > 0:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.stop.wait(), seconds)
        return self.stop.is_set()

    async def _session(self) -> None:
        state = self.state
        state.conn += 1
        will = aiomqtt.Will(self.topic(topics.STATUS),
                            reports.will_status(state, time.time()).to_json(), qos=1,
                            retain=True)
        client = aiomqtt.Client(self.config.host, self.config.port,
                                identifier=self.plan.device_id, will=will, clean_session=True,
                                keepalive=self.config.keepalive, timeout=ACK_TIMEOUT_S,
                                protocol=aiomqtt.ProtocolVersion.V311)
        async with client:
            self._client = client
            self.stats.connected(+1)
            try:
                await self._online(client)
                await self._serve(client)
            finally:
                self._client = None
                self.stats.connected(-1)
                await _cancel(list(self._jobs))
                if self.stop.is_set():
                    with contextlib.suppress(aiomqtt.MqttError, asyncio.TimeoutError):
                        await client.publish(self.topic(topics.STATUS), reports.shutdown_status(
                            state, time.time()).to_json(), qos=1, retain=True, timeout=5)

    async def _online(self, client: aiomqtt.Client) -> None:
        """The connect sequence of docs/protocol.md: status, birth, subscribe, then reports."""
        now = time.time()
        await client.publish(self.topic(topics.STATUS),
                             reports.online_status(self.state, now).to_json(), qos=1, retain=True)
        await self._publish_birth(client)
        await client.subscribe(self.topic(topics.COMMAND), qos=1)
        if self._profiled_version != self.state.version:
            await self._publish_profile(client, "schedule")

    async def _serve(self, client: aiomqtt.Client) -> None:
        tasks = [asyncio.ensure_future(self._receive(client)),
                 asyncio.ensure_future(self._report(client)),
                 asyncio.ensure_future(self.stop.wait())]
        if self.config.churn_per_hour > 0:
            tasks.append(asyncio.ensure_future(self._churn(client)))
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            await _cancel(tasks)
        for task in done:
            task.result()  # a lost connection or a churn drop ends the session with its error

    async def _churn(self, client: aiomqtt.Client) -> None:
        """After an exponential time (mean 1 / churn rate), drop the TCP connection without a
        DISCONNECT, as a device losing power or network does: the broker sends the Will. A
        device in the middle of an install waits for its end first."""
        await asyncio.sleep(self.rng.expovariate(self.config.churn_per_hour / 3600.0))
        while self.install is not None:
            await asyncio.sleep(1.0)
        self._dropped = True
        sock = client._client.socket()  # paho's socket: aiomqtt has no "drop" of its own
        if isinstance(sock, socket.socket):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        # the receive task now ends with aiomqtt's "disconnected" error, which ends the session
        await asyncio.Event().wait()

    # -- reports ---------------------------------------------------------------------------

    async def _report(self, client: aiomqtt.Client) -> None:
        # the first report is spread over one interval, so a fleet does not report in bursts;
        # then on a fixed schedule: a report more than a second behind it counts as late (the
        # event loop is not keeping up)
        due = time.monotonic() + self.rng.uniform(0, self.config.report_s)
        while True:
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            if time.monotonic() - due > 1.0:
                self.stats.add("telemetry_late")
            payload = reports.telemetry(self.state, time.time(), self.rng).to_json()
            await self._publish_counted(client, topics.TELEMETRY, payload, "telemetry")
            due = max(due + self.config.report_s, time.monotonic())

    async def _publish_birth(self, client: aiomqtt.Client) -> None:
        await self._publish_counted(client, topics.BIRTH, reports.birth(
            self.state, time.time(), self.tags).to_json(), "births", retain=True)

    async def _publish_profile(self, client: aiomqtt.Client, trigger: str) -> None:
        record = reports.profile(self.state, time.time(),
                                 self.config.latency_ms(self.state.device_class), self.rng,
                                 trigger)
        await self._publish_counted(client, topics.PROFILE, record.to_json(), "profiles")
        self._profiled_version = self.state.version

    async def _status(self, client: aiomqtt.Client, status: OtaStatus) -> None:
        await self._publish_counted(client, topics.OTA_STATUS, status.to_json(), "ota_statuses")

    async def _publish_counted(self, client: aiomqtt.Client, kind: str, payload: bytes,
                               counter: str, *, retain: bool = False) -> None:
        """Publish a report at QoS 1 and count it once the broker has acknowledged it.

        The publish is shielded from cancellation: when the run stops (or the session ends)
        while an acknowledgement is on its way, the report the broker took is still counted,
        so the summary's counts are exactly what the fleet side can store. (Cancelling it
        instead lost the count of a report the controllers did store: one telemetry report in
        3,375, now and then, on a loaded machine.)"""
        async def send() -> None:
            await client.publish(self.topic(kind), payload, qos=1, retain=retain)
            self.stats.add(counter)

        task = asyncio.ensure_future(send())
        task.add_done_callback(_retrieve)
        await asyncio.shield(task)

    # -- incoming --------------------------------------------------------------------------

    async def _receive(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            payload = message.payload
            data = (bytes(payload) if isinstance(payload, (bytes, bytearray))
                    else str(payload).encode())
            topic = message.topic.value
            if topic.startswith(topics.RELEASE_PREFIX + "/"):
                await self._release_message(client, topic, data)
            elif topic == self.topic(topics.COMMAND):
                await self._command(client, data)

    async def _command(self, client: aiomqtt.Client, payload: bytes) -> None:
        self.stats.add("commands")
        if self.config.reply_s > 0:
            await asyncio.sleep(self.config.reply_s * self.rng.uniform(0.5, 1.5))
        try:
            command = Command.from_json(payload)
        except MessageError as exc:
            await self._respond(client, "", ok=False, code=exc.code, error=str(exc))
            return
        handler = {"ping": self._cmd_ping, "info": self._cmd_info,
                   "ota_install": self._cmd_install, "ota_slots": self._cmd_slots,
                   "ota_rollback": self._cmd_rollback}.get(command.command)
        if handler is None:
            await self._respond(client, command.id, ok=False, code="unknown_command",
                                error=f"unknown command {command.command!r}; this simulated "
                                "device knows: info, ota_install, ota_rollback, ota_slots, ping")
            return
        try:
            result = await handler(client, command.args)
        except ValueError as exc:
            await self._respond(client, command.id, ok=False, code="bad_args", error=str(exc))
            return
        await self._respond(client, command.id, ok=True, result=result)

    async def _respond(self, client: aiomqtt.Client, command_id: str, *, ok: bool,
                       result: dict[str, Any] | None = None, code: str = "",
                       error: str = "") -> None:
        response = CommandResponse(id=command_id, device_id=self.plan.device_id, ok=ok,
                                   ts=time.time(), result=result or {}, error_code=code,
                                   error=error)
        await client.publish(self.topic(topics.COMMAND_RESPONSE), response.to_json(), qos=1)

    async def _cmd_ping(self, client: aiomqtt.Client, args: dict[str, Any]) -> dict[str, Any]:
        return {"pong": True, "session": self.state.session, "uptime_s": 0,
                "agent_version": reports.SIM_AGENT_VERSION}

    async def _cmd_info(self, client: aiomqtt.Client, args: dict[str, Any]) -> dict[str, Any]:
        return {"device_class": self.state.device_class, "tags": self.tags, "simulated": True,
                "models": [{"name": self.state.model, "version": self.state.version}]}

    async def _cmd_slots(self, client: aiomqtt.Client, args: dict[str, Any]) -> dict[str, Any]:
        job = ({"release_id": self.install.release_id} if self.install is not None else None)
        return {"models": {self.state.model: {
            "active": self.state.version, "previous": self.previous_version,
            "installed_version": self.state.version, "pending": None,
            "rejected": sorted(self.state.rejected)}}, "job": job}

    async def _cmd_rollback(self, client: aiomqtt.Client, args: dict[str, Any]
                            ) -> dict[str, Any]:
        if args.get("model") != self.state.model:
            raise ValueError(f"this device serves {self.state.model!r}, not {args.get('model')!r}")
        from_version = args.get("from_version")
        if self.previous_version is None or (from_version is not None
                                             and from_version != self.state.version):
            return {"rolled_back": None}
        left = self.state.version
        self.state.rejected.add(left)
        self.state.version, self.previous_version = self.previous_version, None
        if self.last_release:
            final = OtaStatus(device_id=self.plan.device_id, ts=time.time(),
                              release_id=self.last_release, model=self.state.model,
                              version=left, phase="done", final=True, outcome="rolled_back",
                              reason="operator_rollback",
                              message=f"rolled back from v{left} (simulated)")
            await self._status(client, final)
        await self._publish_birth(client)
        await self._publish_profile(client, "model_change")
        return {"rolled_back": left}

    async def _cmd_install(self, client: aiomqtt.Client, args: dict[str, Any]
                           ) -> dict[str, Any]:
        release_id = args.get("release_id")
        chunk_size = args.get("chunk_size", 16384)
        if not isinstance(release_id, str):
            raise ValueError("argument 'release_id' must be a string")
        try:
            topics.validate_release_id(release_id)
        except topics.TopicError as exc:
            raise ValueError(str(exc)) from None
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) \
                or not 1024 <= chunk_size <= 262144:
            raise ValueError("chunk_size must be 1024..262144 bytes")
        if self.install is not None:
            if self.install.release_id == release_id:
                return {"accepted": True, "already_running": True}
            raise ValueError(f"an install of release {self.install.release_id[:12]} is in "
                             "progress; wait for its final status")
        ended = self.ended.get(release_id)
        if ended is not None and not args.get("retry") \
                and time.time() - ended[0] < ENDED_MEMORY_S \
                and ended[1].outcome not in ("installed", "no_change"):
            await self._status(client, ended[1])  # the fleet missed it: say it again
            return {"accepted": False, "ended": True, "outcome": ended[1].outcome,
                    "reason": ended[1].reason, "message": ended[1].message}
        planned_reason = {"failed": self.config.fail_reason,
                          "rejected": self.config.reject_reason}.get(self.plan.fate, "")
        self.install = Install(
            device_id=self.plan.device_id, release_id=release_id, chunk_size=chunk_size,
            root=self.root, device_class=self.state.device_class, model=self.state.model,
            installed_version=self.state.version, planned=self.plan.fate,
            planned_reason=planned_reason,
            rejected_versions=() if args.get("retry") else frozenset(self.state.rejected))
        job = asyncio.ensure_future(self._run_install(client, self.install))
        self._jobs.add(job)
        job.add_done_callback(self._jobs.discard)
        self.stats.add("installs")
        return {"accepted": True}

    # -- installs --------------------------------------------------------------------------

    async def _release_message(self, client: aiomqtt.Client, topic: str, payload: bytes) -> None:
        install = self.install
        if install is None:
            return
        try:
            parsed = topics.parse_release_topic(topic)
        except topics.TopicError:
            return
        if parsed.release_id != install.release_id:
            return
        now = time.monotonic()
        if parsed.kind == topics.RELEASE_MANIFEST:
            requests = install.on_manifest(payload, now)
            self._wake.set()
        else:
            requests = install.on_chunk(payload, now)
            self._wake.set()
        for request in requests:
            await client.publish(self.topic(topics.OTA_REQUEST), request.to_json(), qos=1)

    async def _run_install(self, client: aiomqtt.Client, install: Install) -> None:
        """One install, top to bottom: accepted, manifest, download, phases, final status."""
        self._wake.clear()
        manifest_topic = topics.release_topic(install.release_id, topics.RELEASE_MANIFEST)
        round_topics: list[str] = []  # the exact chunk topics of the last re-subscription
        blocks: dict[int, str] = {}  # the chunk blocks subscribed to, by block

        async def follow_blocks() -> None:
            # the first block still missing a chunk and the next, no other: the broker
            # queues at most two blocks of the release for this device
            wanted = install.wanted_blocks()
            gone = [blocks.pop(b) for b in list(blocks) if b not in wanted]
            if gone:
                await client.unsubscribe(gone)
            new = {b: topics.block_filter(install.release_id, install.chunk_size, b)
                   for b in wanted if b not in blocks}
            if new:
                blocks.update(new)
                await client.subscribe([(topic, 1) for topic in new.values()])

        try:
            await self._status(client, install.status("accepted"))
            await client.subscribe(manifest_topic, qos=1)
            deadline = time.monotonic() + MANIFEST_TIMEOUT_S
            while install.manifest is None and install.ended is None:
                if not await self._wait(deadline - time.monotonic()):
                    install.ended = Outcome("failed", "manifest_timeout", f"no manifest arrived "
                                            f"on {manifest_topic} within "
                                            f"{MANIFEST_TIMEOUT_S:g} s")
            if install.ended is None:
                # chunks only once the manifest says what to check them against: the broker
                # delivers every retained chunk as soon as the subscription is made
                await follow_blocks()
                await self._status(client, install.status("downloading",
                                                          progress=install.progress()))
            while install.ended is None and not install.complete:
                await self._wait(install.next_poll_in(time.monotonic()))
                await follow_blocks()
                now = time.monotonic()
                for ask in install.poll(now):
                    # a round's exact topics are dropped when the next ask comes: a round
                    # brought what the broker holds by then
                    if round_topics:
                        await client.unsubscribe(round_topics)
                        round_topics = []
                    if isinstance(ask, Resubscribe):
                        round_topics = [topics.chunk_topic(install.release_id, install.chunk_size,
                                                           f, i) for f, i in ask.chunks]
                        # one SUBSCRIBE: the broker sends each topic's retained copy
                        await client.subscribe([(topic, 1) for topic in round_topics])
                        self.stats.add("chunk_resubscribes")
                    else:
                        await client.publish(self.topic(topics.OTA_REQUEST), ask.to_json(),
                                             qos=1)
                if install.ended is None and not install.complete and install.progress_due(now):
                    await self._status(client, install.status("downloading",
                                                              progress=install.progress()))
            with contextlib.suppress(aiomqtt.MqttError):
                await client.unsubscribe([*blocks.values(), manifest_topic, *round_topics])
            for phase in install.remaining_phases():
                await self._status(client, install.status(phase))
                await asyncio.sleep(self.config.step_s * self.rng.uniform(0.5, 1.5))
            outcome = install.finish()
            final = install.final()
            await self._status(client, final)
            self.ended[install.release_id] = (time.time(), final)
            self.stats.outcome(outcome.outcome, outcome.reason)
            if outcome.outcome == "installed" and install.manifest is not None:
                self.previous_version, self.state.version = (self.state.version,
                                                             install.manifest.version)
                self.last_release = install.release_id
                await self._publish_birth(client)
                await self._publish_profile(client, "model_change")
            elif outcome.outcome == "rejected" and install.manifest is not None:
                self.state.rejected.add(install.manifest.version)
        finally:
            self.install = None

    async def _wait(self, seconds: float) -> bool:
        """Wait for the release topics to bring something, at most ``seconds``."""
        try:
            await asyncio.wait_for(self._wake.wait(), max(0.0, seconds))
        except asyncio.TimeoutError:
            return False
        finally:
            self._wake.clear()
        return True


async def _cancel(tasks: Sequence[asyncio.Future[Any]]) -> None:
    """Cancel ``tasks`` and wait for their end. Python 3.11's ``asyncio.wait_for`` (which
    aiomqtt awaits every acknowledgement with) loses a cancellation that arrives as its future
    completes, so a task that goes on is cancelled again."""
    pending = set(tasks)
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=1.0)
    for task in tasks:
        if not task.cancelled():
            task.exception()  # retrieved: a lost connection's error is raised by the caller


def _retrieve(task: asyncio.Future[Any]) -> None:
    """Mark a shielded publish's error retrieved: when nobody waits for it any more (the session
    was cancelled) a lost connection is the session's business, not a stray warning."""
    if not task.cancelled():
        task.exception()
