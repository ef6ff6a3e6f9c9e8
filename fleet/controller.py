"""The fleet controller: ingest device reports into the store, serve releases, drive rollouts.

``fleetlite serve --db URL --broker HOST:PORT`` runs one :class:`Controller`. It is a thin
adapter: device messages go into the store; every tick, for each unfinished rollout whose lease
it holds, it reads spec, state, devices, outcomes and profiles from the store, asks the pure
engine (:func:`fleetlite.fleet.rollout.decide`) what to do, records the decisions and the new
state atomically (only if the rollout's revision did not move meanwhile, so two controllers never
apply a step twice), and then sends the commands the decisions name.

Several controllers may share one PostgreSQL store and one broker: ingest is split with an MQTT
shared subscription (``--group``) and each rollout is driven by whichever controller holds its
lease; a controller that dies loses its leases after ``lease_ttl_s`` and another takes over.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from fleetlite.fleet.gates import ProfileView
from fleetlite.fleet.ota_publisher import ReleasePublisher
from fleetlite.fleet.rollout import (
    SEND_INSTALL,
    SEND_ROLLBACK,
    DeviceView,
    OutcomeView,
    RolloutSpec,
    RolloutState,
    apply,
    decide,
)
from fleetlite.fleet.store import Store
from fleetlite.sdk import topics
from fleetlite.sdk.bundle import ReleaseBundle
from fleetlite.sdk.envelope import Envelope
from fleetlite.sdk.manifest import parse_manifest
from fleetlite.sdk.messages import Birth, MessageError, OtaStatus, Status, Telemetry
from fleetlite.sdk.profile import ProfileRecord

log = logging.getLogger("fleetlite.fleet.controller")

INGEST_KINDS = (topics.STATUS, topics.BIRTH, topics.TELEMETRY, topics.PROFILE,
                topics.OTA_STATUS, topics.COMMAND_RESPONSE)


class Controller:
    """One controller process: ingest, release serving and the rollout loop."""

    def __init__(self, store: Store, host: str, port: int, *, group: str | None = None,
                 controller_id: str | None = None, tick_s: float = 0.5,
                 lease_ttl_s: float = 10.0) -> None:
        self.store = store
        self.host, self.port = host, port
        self.group = group
        self.id = controller_id or f"ctl-{uuid.uuid4().hex[:8]}"
        self.tick_s = tick_s
        self.lease_ttl_s = lease_ttl_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._serving: set[str] = set()
        self.counters = {"ingested": 0, "malformed": 0, "decisions": 0, "commands_sent": 0,
                         "stale_batches": 0}
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.id,
                                  clean_session=True)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.publisher = ReleasePublisher(host, port, client_id=f"{self.id}-pub")

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> Controller:
        self.store.migrate()
        self.client.connect_async(self.host, self.port, keepalive=30)
        self.client.loop_start()
        self.publisher.start()
        self._thread = threading.Thread(target=self._loop, name="fleetlite-controller",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        for record in self.store.list_rollouts():
            self.store.release_lease(f"rollout:{record.rollout_id}", self.id)
        self.client.disconnect()
        self.client.loop_stop()
        self.publisher.close()

    # -- ingest ----------------------------------------------------------------------------

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any,
                    properties: Any) -> None:
        for kind in INGEST_KINDS:
            client.subscribe(topics.fleet_subscription(kind, self.group), qos=1)
        if self.group:
            # shared subscriptions get no retained messages: take the status snapshot plainly
            for kind in (topics.STATUS, topics.BIRTH):
                client.subscribe(topics.fleet_subscription(kind), qos=1)

    def _on_message(self, client: mqtt.Client, userdata: Any, message: Any) -> None:
        try:
            parsed = topics.parse_device_topic(message.topic)
            self._ingest(parsed.device_id, parsed.kind, bytes(message.payload))
            self.counters["ingested"] += 1
        except (MessageError, topics.TopicError, ValueError) as exc:
            self.counters["malformed"] += 1
            log.warning("ignored a malformed message on %s: %s", message.topic, exc)
        except Exception:  # the store may be briefly unavailable; never kill the network thread
            log.exception("could not store a message from %s", message.topic)

    def _ingest(self, device_id: str, kind: str, payload: bytes) -> None:
        if not payload:
            return  # a cleared retained message
        if kind == topics.STATUS:
            status = Status.from_json(payload)
            if status.device_id == device_id:
                self.store.upsert_status(status)
        elif kind == topics.BIRTH:
            birth = Birth.from_json(payload)
            if birth.device_id == device_id:
                self.store.upsert_birth(birth)
        elif kind == topics.TELEMETRY:
            self.store.record_telemetry(Telemetry.from_json(payload))
        elif kind == topics.PROFILE:
            record = ProfileRecord.from_json(payload)
            device = self.store.get_device(device_id)
            self.store.add_profile(record, device_class=device.device_class if device else None)
        elif kind == topics.OTA_STATUS:
            self.store.add_ota_status(OtaStatus.from_json(payload), received_at=time.time())

    # -- rollouts --------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.wait(self.tick_s):
            try:
                self.tick(time.time())
            except Exception:
                log.exception("rollout tick failed; retrying next tick")

    def tick(self, now: float) -> None:
        for record in self.store.list_rollouts():
            state = RolloutState.from_dict(record.state) if record.state else RolloutState()
            if state.finished:
                continue
            if not self.store.claim(f"rollout:{record.rollout_id}", self.id, self.lease_ttl_s):
                continue
            self.drive(record.rollout_id, now)

    def _serve_release(self, release_id: str, chunk_size: int) -> None:
        if release_id in self._serving:
            return
        stored = self.store.get_release(release_id)
        if stored is None:
            return
        envelope = Envelope.from_json(stored.envelope, max_bytes=len(stored.envelope) + 1,
                                      max_payload_bytes=len(stored.envelope) + 1)
        manifest = parse_manifest(envelope.payload)
        bundle = ReleaseBundle(envelope, manifest, stored.files)
        self.publisher.serve(bundle, chunk_size, initial_pass=False, wait=False)
        self._serving.add(release_id)

    def drive(self, rollout_id: str, now: float) -> int:
        """One read-decide-write-send step; returns the number of decisions applied."""
        record = self.store.get_rollout(rollout_id)
        if record is None:
            return 0
        spec = RolloutSpec.from_dict(record.spec)
        state = RolloutState.from_dict(record.state) if record.state else RolloutState()
        self._serve_release(spec.release_id, spec.chunk_size)
        devices = [DeviceView(d.device_id, d.device_class, d.tags, d.online)
                   for d in self.store.list_devices()]
        classes = {d.device_id: d.device_class for d in devices}
        # outcome times on the controller's clock: the engine compares them with send times
        outcomes = [OutcomeView.from_status(r.status, r.received_at)
                    for r in self.store.latest_ota_records(spec.release_id).values()
                    if r.status.final]
        profiles = [ProfileView.from_record(row.record(), row.device_class or
                                            classes.get(row.device_id, ""))
                    for row in self.store.profiles(model=spec.model)]
        decisions = decide(spec, state, devices, profiles, now, outcomes=outcomes)
        if not decisions:
            return 0
        new_state = apply(state, decisions, now)
        changed = [dev for device_id, dev in new_state.devices.items()
                   if state.devices.get(device_id) != dev]
        if not self.store.apply_decisions(rollout_id, record.revision, decisions,
                                          progress=changed, new_state=new_state.to_dict(),
                                          now=now):
            self.counters["stale_batches"] += 1
            return 0  # another controller moved it first; decide again next tick
        self.counters["decisions"] += len(decisions)
        for decision in decisions:
            if decision.kind == SEND_INSTALL and decision.device_id:
                self.command(decision.device_id, "ota_install",
                             {"release_id": spec.release_id, "chunk_size": spec.chunk_size})
            elif decision.kind == SEND_ROLLBACK and decision.device_id:
                self.command(decision.device_id, "ota_rollback", {"model": spec.model})
        return len(decisions)

    def command(self, device_id: str, name: str, args: dict[str, Any]) -> str:
        command_id = uuid.uuid4().hex[:16]
        payload = json.dumps({"schema": "fleetlite.command/1", "id": command_id,
                              "command": name, "args": args}, sort_keys=True).encode()
        self.client.publish(topics.device_topic(device_id, topics.COMMAND), payload, qos=1)
        self.counters["commands_sent"] += 1
        return command_id
