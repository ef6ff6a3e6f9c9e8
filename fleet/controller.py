"""The fleet controller: ingest device reports into the store, serve releases, drive rollouts.

``fleetlite serve --db URL --broker HOST:PORT`` (or ``python -m fleetlite.fleet.controller``)
runs one :class:`Controller`. ``--broker mqtts://HOST:PORT`` with ``--tls-ca``, ``--tls-cert`` and
``--tls-key`` (or ``FLEETLITE_TLS_CA/CERT/KEY``) connects with TLS and a client certificate, and
``FLEETLITE_MQTT_USERNAME``/``FLEETLITE_MQTT_PASSWORD`` give credentials
(see :mod:`fleetlite.fleet.broker_address`); :func:`check_broker` tries the connection first
and says why it fails. It is a thin adapter: device messages go into the store; every
tick, for each rollout whose lease it holds, it reads spec, state, devices, outcomes and profiles
from the store, asks the pure engine (:func:`fleetlite.fleet.rollout.decide`) what to do, records
the decisions and the new state atomically (only if the rollout's revision did not move
meanwhile, so two controllers never apply a step twice), and then sends the commands the
decisions name.

Device input is limited (:mod:`fleetlite.fleet.ingest_limits`; docs/operator-guide.md, "Limits
on device input"): a size cap per message kind and a rate per sending device are checked on the
network thread before anything is parsed, so a flooding device costs no store write beyond its
rate; refusals are counted in memory and stored once per tick (and before the sender's next
stored report); profiles and OTA statuses kept per device are bounded.

Time is the controller's: a device's last seen is when the controller received its last report
(a retained snapshot or the Last Will does not count), OTA statuses are ordered by their receive
time, and every timeout is measured on this clock. Device timestamps are stored as sent, and the
difference (the device's clock offset) is kept per device (:mod:`fleetlite.fleet.device_clock`).

Restarts and crashes:

- A controller started with an explicit id (``--id``) keeps a persistent MQTT session: while it
  is down the broker queues the devices' QoS 1 reports for it (OTA statuses, profiles), and the
  restarted controller with the same id ingests them, so no outcome is lost. Give every running
  controller its own stable id.
- Commands are sent after the store committed the decisions, so a crash can lose a command but
  never send one twice. A device that is still ``sent`` and has said nothing about the release
  for ``resend_after_s`` (since the send or its last OTA status) is sent the install once more
  per controller process (not a new decision): a lost command is replaced; a device still
  installing answers ``already_running``; one that installed while its final status was lost
  (a controller without a persistent session was down) answers with a final ``no_change``, and
  one whose install failed within ``ota.ended_memory_s`` publishes that final status again.
  Rollbacks are never re-sent (they name the version they leave, ``from_version``, so a
  redelivered one is a no-op on the device, but a re-send is not needed). After the controller
  itself stalled for ``resend_after_s`` or more (stopped, suspended, a hung store call), re-sends
  wait another ``resend_after_s``: the devices' silence was the controller's, and the reports the
  broker queued meanwhile are ingested first.
- A store that stops taking writes (read-only, full, PostgreSQL down) is logged once: the
  reports received meanwhile are kept in memory, bounded (:mod:`fleetlite.fleet.ingest_backlog`),
  and stored in order once a write succeeds again; rollouts wait for them. A SQLite file deleted
  or replaced under the controller stops it (``fatal``; ``fleetlite serve`` exits 1).
  :meth:`Controller.health` is what ``fleetlite serve --health`` answers on ``/healthz``.
- The release of a rollout is served (retained manifest, every chunk once retained, chunk
  re-sends) by whichever controller drives it, from its first tick on; a finished rollout is
  still driven while installs or rollbacks it sent are unanswered, so their outcomes are
  recorded. Once no rollout that is not settled needs a release, the controller serving it
  clears it from the broker.

Several controllers may share one PostgreSQL store and one broker: ingest is split with an MQTT
shared subscription (``--group``) and each rollout is driven by whichever controller holds its
lease; a controller that dies loses its leases after ``lease_ttl_s`` and another takes over.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import ssl
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, Optional

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from fleetlite.fleet.broker_address import (
    BROKER_HELP,
    BrokerAddress,
    add_tls_options,
    resolve_broker,
    ssl_context,
)
from fleetlite.fleet.device_clock import heard_from_device
from fleetlite.fleet.errors import (
    BrokerAddressError,
    BrokerConnectionError,
    FleetError,
    StoreError,
    StoreGoneError,
    StoreUnavailableError,
)
from fleetlite.fleet.health_endpoint import HealthEndpoint, parse_listen_address
from fleetlite.fleet.ingest_backlog import BacklogItem, IngestBacklog
from fleetlite.fleet.ingest_batch import AckOrder, IngestQueue, Ticket
from fleetlite.fleet.ingest_limits import (
    ADMIT,
    HOLD,
    MALFORMED,
    OVERSIZE,
    RATE_LIMITED,
    IngestGate,
    IngestLimits,
    IngestLimitsError,
    RefusalCount,
    RefusalTally,
    check_birth,
)
from fleetlite.fleet.ota_publisher import PublishError, ReleasePublisher
from fleetlite.fleet.rollout import (
    SEND_INSTALL,
    SEND_PROBE,
    SEND_ROLLBACK,
    SEND_SHADOW,
    SHADOW_VERDICT,
    DeviceView,
    OutcomeView,
    RolloutSpec,
    RolloutState,
    answer_requests,
    apply,
    decide,
    install_args,
    probe_args,
    shadow_args,
)
from fleetlite.fleet.rollout_inputs import OutcomeViews, ProfileViews
from fleetlite.fleet.sender_check import (
    Refusal,
    RefusalLog,
    check_device_id,
    check_ota_status,
    check_profile,
)
from fleetlite.fleet.store import RolloutRecord, Store, open_store
from fleetlite.fleet.store_health import StoreHealth
from fleetlite.sdk import topics
from fleetlite.sdk.bundle import ReleaseBundle
from fleetlite.sdk.envelope import Envelope
from fleetlite.sdk.manifest import parse_manifest
from fleetlite.sdk.messages import (
    Birth,
    CommandResponse,
    Event,
    MessageError,
    OtaStatus,
    Status,
    Telemetry,
)
from fleetlite.sdk.profile import ProfileRecord
from fleetlite.sdk.shadow import ShadowReport
from fleetlite.sdk.tls_hints import verify_failure_hint

__all__ = ["INGEST_KINDS", "Controller", "check_broker", "main", "run_until_stopped"]

log = logging.getLogger("fleetlite.fleet.controller")

INGEST_KINDS = (topics.STATUS, topics.BIRTH, topics.TELEMETRY, topics.PROFILE,
                topics.OTA_STATUS, topics.COMMAND_RESPONSE, topics.EVENTS, topics.SHADOW)

# Device statuses of a rollout that still wait for an answer from the device.
_SENT = "sent"
_ROLLBACK_SENT = "rollback_sent"
_TIMED_OUT = "timed_out"
# how long one tick may spend storing the backlog before it lets the rest of the loop run
_DRAIN_BUDGET_S = 2.0
# the share of the loop's time that rollout steps may take: a step reads every device of a
# running rollout (~0.35 s at 10,000 devices on SQLite), so after a step that took d seconds
# the loop waits at least d * (1 / share - 1) (here 3d) rather than tick_s; at 10,000 devices
# a step every ~1.4 s instead of ~0.85 s, leaving the CPU to ingest (operator requests are
# answered by their own thread, and a rollout someone changed still wakes the loop)
_STEP_SHARE = 0.25
# how long stop() tries to store a backlog left when the controller is stopped
_STOP_DRAIN_S = 5.0
# reports stored in one transaction at most (fleet/ingest_batch.py); the broker's in-flight
# window (max_inflight_messages) bounds what arrives unacknowledged meanwhile
_MAX_BATCH = 500
# the counter of each refusal reason (the sender checks' reasons count as "refused")
_COUNTERS = {OVERSIZE: "oversize", RATE_LIMITED: "rate_limited", MALFORMED: "malformed"}
# the parser of each kind the controller stores
_PARSERS: dict[str, Callable[[bytes], object]] = {
    topics.STATUS: Status.from_json, topics.BIRTH: Birth.from_json,
    topics.TELEMETRY: Telemetry.from_json, topics.PROFILE: ProfileRecord.from_json,
    topics.OTA_STATUS: OtaStatus.from_json, topics.COMMAND_RESPONSE: CommandResponse.from_json,
    topics.EVENTS: Event.from_json, topics.SHADOW: ShadowReport.from_json,
}


class Controller:
    """One controller: ingest, release serving and the rollout loop.

    ``broker``: a :class:`~fleetlite.fleet.broker_address.BrokerAddress` (TLS, client
    certificate, credentials), or a host name with ``port`` for a plain, anonymous connection.
    ``controller_id``: the MQTT client id and lease owner; an explicit one also makes the MQTT
    session persistent (``persistent_session`` overrides), so reports that arrive while the
    controller is down are delivered when it comes back with the same id.
    ``limits``: the limits on device input (:class:`~fleetlite.fleet.ingest_limits.IngestLimits`;
    default: the defaults in docs/operator-guide.md with ``FLEETLITE_INGEST_LIMITS`` applied).
    ``wake_s``: how often to look for a rollout someone else changed (an operator's request,
    a new rollout; one small query): a thread of its own answers operator requests at once,
    even during a long step, and the loop ticks at once instead of waiting for ``tick_s``; 0:
    neither (requests are answered by the ticks).
    """

    def __init__(self, store: Store, broker: BrokerAddress | str, port: Optional[int] = None,
                 *, group: Optional[str] = None,
                 controller_id: Optional[str] = None, tick_s: float = 0.5,
                 lease_ttl_s: float = 10.0, persistent_session: Optional[bool] = None,
                 resend_after_s: float = 15.0, limits: Optional[IngestLimits] = None,
                 wake_s: float = 0.1) -> None:
        self.store = store
        self.broker = _address(broker, port)
        self.host, self.port = self.broker.host, self.broker.port
        self.group = group
        self.id = controller_id or f"ctl-{uuid.uuid4().hex[:8]}"
        self.persistent = (controller_id is not None if persistent_session is None
                           else persistent_session)
        self.tick_s = tick_s
        #: how long the last tick took (seconds): it paces the next (:meth:`next_tick_in`)
        self.tick_cost_s = 0.0
        self.wake_s = wake_s
        self.lease_ttl_s = lease_ttl_s
        self.resend_after_s = resend_after_s
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._answerer: Optional[threading.Thread] = None
        self._serving: set[str] = set()
        # parsed once per record, not once per tick (fleet/rollout_inputs.py)
        self.profile_views = ProfileViews()
        self.outcome_views = OutcomeViews()
        self._held: set[str] = set()
        # rollouts found finished with nothing left to record, at that revision: a tick does
        # not read them again (their state grows with the fleet) until their revision changes
        self._settled: dict[str, int] = {}
        # each rollout's revision as this controller last read or wrote it: a different one
        # is someone else's change, worth a tick now (_changed_by_others); None: another
        # controller of the group drives it, and its changes are not news
        self._known_revisions: dict[str, Optional[int]] = {}
        self._resent: set[tuple[str, str, str]] = set()  # (rollout, what, device)
        self._resends_held_until = 0.0
        self.counters = {"ingested": 0, "malformed": 0, "refused": 0, "oversize": 0,
                         "rate_limited": 0, "decisions": 0, "commands_sent": 0,
                         "commands_resent": 0, "stale_batches": 0, "kept_for_store": 0,
                         "lost_store_down": 0}
        self.refusal_log = RefusalLog()
        self.ingested_by_kind: Counter[str] = Counter()
        # the limits on device input (fleet/ingest_limits.py), applied on the network thread
        # before anything is parsed; refusals are counted in memory and stored once per tick
        self.limits = limits or IngestLimits.from_env()
        self.gate = IngestGate(self.limits)
        self.refusals = RefusalTally(self.limits.max_refusal_keys)
        # reports kept while the store cannot take them, stored in order once it can
        self.backlog = IngestBacklog(self.limits.backlog_messages, self.limits.backlog_bytes)
        self.store_health = StoreHealth(store.url)
        #: why the controller stopped by itself (its SQLite file deleted or replaced), if it did
        self.fatal: Optional[str] = None
        #: set when the controller stopped by itself; ``fleetlite serve`` then exits with 1
        self.failed = threading.Event()
        self.last_tick_at: Optional[float] = None  # the last rollout tick that completed
        self._ingest_lock = threading.Lock()  # the gate, the tally, the log and the counters
        #: set once the broker has acknowledged every subscription: reports published from then
        #: on reach the controller (before the SUBACKs, the broker may still drop them)
        self.connected = threading.Event()
        self._unacked: set[int] = set()  # subscription packet ids awaiting their SUBACK
        # reports are stored in batches by a worker thread and each QoS 1 message acknowledged
        # once its report is stored (fleet/ingest_batch.py): manual acknowledgements
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.id,
                                  clean_session=not self.persistent, manual_ack=True)
        self.acks = AckOrder(self.client.ack)
        self.ingest_queue: IngestQueue[tuple[BacklogItem, Ticket]] = IngestQueue(
            self._store_received, max_batch=_MAX_BATCH)
        tls = ssl_context(self.broker)
        _configure(self.client, self.broker, tls)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.publisher = ReleasePublisher(self.host, self.port, tls=tls,
                                          username=self.broker.username,
                                          password=self.broker.password,
                                          client_id=f"{self.id}-pub")

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> Controller:
        """Migrate the store, connect, start serving and the rollout loop."""
        self.store.migrate()
        self.ingest_queue.start()
        self.client.connect_async(self.host, self.port, keepalive=30)
        self.client.loop_start()
        try:
            self.publisher.start()
        except Exception:
            self.client.disconnect()
            self.client.loop_stop()
            raise
        self._thread = threading.Thread(target=self._loop, name="fleetlite-controller",
                                        daemon=True)
        self._thread.start()
        if self.wake_s > 0:
            self._answerer = threading.Thread(target=self._answer_loop,
                                              name="fleetlite-requests", daemon=True)
            self._answerer.start()
        return self

    def stop(self) -> None:
        """Stop the loop, give up the leases held and disconnect."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        if self._answerer is not None:
            self._answerer.join(10)
        for rollout_id in sorted(self._held if self.fatal is None else ()):
            try:
                self.store.release_lease(f"rollout:{rollout_id}", self.id)
            except Exception:  # the lease expires by itself
                log.exception("could not release the lease of rollout %s", rollout_id)
        self._held.clear()
        # store (and acknowledge) what was received, then disconnect; what arrives between the
        # two is stored without its acknowledgement (a persistent session gets it again)
        self.ingest_queue.flush(_STOP_DRAIN_S)
        self.client.disconnect()
        self.client.loop_stop()
        self.ingest_queue.close(_STOP_DRAIN_S)
        if self.fatal is None:
            # the network thread is gone: store the backlog, the held telemetry and the refusal
            # counts, as far as the store lets us
            self._drain_backlog(_STOP_DRAIN_S)
            try:
                self._flush_ingest(everything=True)
            except StoreUnavailableError as exc:
                log.error("could not store the refusal counts and held telemetry at stop: %s",
                          exc)
            except Exception:
                log.exception("could not store the refusal counts and held telemetry at stop")
        lost = len(self.backlog)
        if lost:
            self.counters["lost_store_down"] += lost
            log.error("%d report%s received while the store could not take %s %s lost: the "
                      "controller stopped before the store answered again", lost,
                      "" if lost == 1 else "s", "it" if lost == 1 else "them",
                      "is" if lost == 1 else "are")
        self.publisher.close()

    # -- ingest ----------------------------------------------------------------------------

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any,
                    properties: Any) -> None:
        if reason.is_failure:
            log.warning("broker refused the connection: %s", reason)
            return
        subscriptions = [topics.fleet_subscription(kind, self.group) for kind in INGEST_KINDS]
        snapshot = ([topics.fleet_subscription(kind) for kind in (topics.STATUS, topics.BIRTH)]
                    if self.group else [])
        # the SUBACKs are read by this same network thread, so none arrives before this returns
        self._unacked = set()
        for topic in subscriptions + snapshot:
            result, mid = client.subscribe(topic, qos=1)
            if result == mqtt.MQTT_ERR_SUCCESS and mid is not None:
                self._unacked.add(mid)
        if snapshot:
            # MQTT 5 gives a shared subscription no retained messages, so a group member
            # subscribes to the status and birth snapshot plainly, and at once unsubscribes:
            # the broker queues the retained messages when it takes the SUBSCRIBE, before it
            # reads the UNSUBSCRIBE, and every later status reaches one member (the shared
            # subscription), not every member of the group.
            client.unsubscribe(snapshot)

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reason_codes: Any,
                      properties: Any) -> None:
        refused = [code for code in reason_codes if code.is_failure]
        if refused:
            log.error("the broker at %s refused the controller's subscription (%s): the "
                      "controller receives none of those reports; give its identity read access to "
                      "fleetlite/v1/# in the broker's ACL (fleetlite broker-config writes one "
                      "that does)", self.broker.url, ", ".join(str(code) for code in refused))
        self._unacked.discard(mid)
        if not self._unacked and not self.connected.is_set():
            self.connected.set()
            log.info("controller %s connected to %s (%s session)", self.id, self.broker.url,
                     "persistent" if self.persistent else "clean")

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any,
                       properties: Any) -> None:
        self.connected.clear()
        self.acks.reset()  # the broker sends the unacknowledged messages again (persistent)
        if not self._stop.is_set():
            log.warning("controller %s lost the broker (%s); reconnecting", self.id, reason)

    def _on_message(self, client: mqtt.Client, userdata: Any, message: Any) -> None:
        # The network thread: the size cap and the sender's rate are checked before anything is
        # parsed, and what they refuse costs no store write (counted, stored once per tick).
        # An admitted report goes to the ingest queue, whose worker stores it with the others
        # that arrived meanwhile and then acknowledges it; anything else is acknowledged now
        # (in arrival order: AckOrder).
        ticket = self.acks.received(message.mid, message.qos)
        queued = False
        try:
            queued = self._receive(message, ticket)
        finally:
            if not queued:
                self.acks.settle(ticket)

    def _receive(self, message: Any, ticket: Ticket) -> bool:
        """Check one message on the network thread; True if it was queued to be stored."""
        try:
            parsed = topics.parse_device_topic(message.topic)
        except topics.TopicError as exc:
            self._malformed("", "", exc)
            return False
        device_id, kind, payload = parsed.device_id, parsed.kind, message.payload
        # the controller's clock, never the device's, says when a device was last heard; a
        # retained message is a snapshot the broker kept, not the device speaking now
        received_at = None if message.retain else time.time()
        dropped = None
        with self._ingest_lock:
            verdict = self.gate.check(device_id, kind, len(payload), time.monotonic())
            if verdict == HOLD:
                dropped = self.gate.hold(device_id, bytes(payload))
        if verdict == ADMIT:
            item = BacklogItem(device_id, kind, bytes(payload), received_at)
            self.ingest_queue.put((item, ticket))
            return True
        if isinstance(verdict, Refusal):
            self._refused(device_id, kind, verdict)
        elif dropped is not None:
            self._refused(device_id, kind, dropped)
        return False

    def _store_received(self, batch: Sequence[tuple[BacklogItem, Ticket]]) -> None:
        """The ingest worker: store a batch of reports, then acknowledge their messages."""
        try:
            self._store_batch([item for item, _ in batch])
        except Exception:  # never lose the acknowledgements: they are owed in any case
            log.exception("could not store a batch of %d reports", len(batch))
        finally:
            for _, ticket in batch:
                self.acks.settle(ticket)

    def _store_batch(self, items: Sequence[BacklogItem]) -> None:
        """Store reports in arrival order per device, as few transactions as possible: as
        :meth:`_handle` would one by one (the same checks, refusals, backlog and counters).
        A transaction ends after a report its sender checks refuse (the refusal is counted
        then, so it is stored before that sender's next report, as one by one); a transaction
        that fails is done again one report at a time, or kept in the backlog when the store is
        unavailable."""
        parsed: list[tuple[BacklogItem, Optional[object]]] = []
        # by device (a stable sort: each device's reports stay in arrival order), so that two
        # controllers storing the same devices' statuses lock their rows in the same order:
        # in arrival order, PostgreSQL found them deadlocked (tests/test_scale_out.py)
        for item in sorted(items, key=lambda item: item.device_id):
            # parse before any transaction: a malformed report costs none
            parse = _PARSERS.get(item.kind)
            if not item.payload or parse is None:
                parsed.append((item, None))  # a cleared retained message: nothing to store
                continue
            try:
                parsed.append((item, parse(item.payload)))
            except (MessageError, ValueError) as exc:
                self._malformed(item.device_id, item.kind, exc)
        start = 0
        while start < len(parsed):
            if not self.store_health.ok or len(self.backlog):
                for item, _ in parsed[start:]:
                    self._keep(item)
                return
            start = self._store_run(parsed, start)

    def _store_run(self, parsed: Sequence[tuple[BacklogItem, Optional[object]]],
                   start: int) -> int:
        """Store ``parsed[start:]`` in one transaction, up to and including the first report
        refused; returns where the next transaction starts."""
        drained: list[list[RefusalCount]] = []
        done: list[tuple[BacklogItem, Optional[Refusal]]] = []
        end = start
        try:
            with self.store.batch():
                while end < len(parsed):
                    item, report = parsed[end]
                    end += 1
                    if report is None:
                        done.append((item, None))
                        continue
                    with self._ingest_lock:
                        earlier = self.refusals.drain(item.device_id)
                    if earlier:
                        drained.append(earlier)
                        self.store.record_refusals(earlier)
                    refusal = self._store_report(item.device_id, report, item.received_at,
                                                 item.payload)
                    done.append((item, refusal))
                    if refusal is not None:
                        break
        except StoreUnavailableError as exc:
            self._restore_refusals(drained)
            self._store_failed(exc)
            for item, _ in parsed[start:]:
                self._keep(item)
            return len(parsed)
        except Exception:
            # one report the store cannot take (or a bug): store them one by one, as before
            self._restore_refusals(drained)
            for item, _ in parsed[start:end]:
                self._handle(item.device_id, item.kind, item.payload, item.received_at)
            return end
        self._store_ok()
        for item, refusal in done:
            self._count_stored(item, refusal)
        return end

    def _restore_refusals(self, drained: Sequence[list[RefusalCount]]) -> None:
        with self._ingest_lock:
            for batch in drained:
                self.refusals.restore(batch)

    def _handle(self, device_id: str, kind: str, payload: bytes,
                received_at: Optional[float]) -> None:
        """Parse, check and store one admitted report (network thread, or the loop thread for
        telemetry held over the rate). ``received_at``: when the controller received it (None: a
        retained snapshot). While the store cannot take reports, or reports kept meanwhile wait
        to be stored, it joins them (:mod:`fleetlite.fleet.ingest_backlog`)."""
        item = BacklogItem(device_id, kind, payload, received_at)
        if not self.store_health.ok or len(self.backlog) or not self._store_item(item):
            self._keep(item)

    def _keep(self, item: BacklogItem) -> None:
        if self.backlog.append(item):
            self.counters["kept_for_store"] += 1
            return
        self.counters["lost_store_down"] += 1
        if self.backlog.dropped == 1 or self.backlog.dropped % 10_000 == 0:
            log.error("the store has been unavailable for so long that the reports received "
                      "meanwhile fill the backlog (%d reports, %d bytes): %d dropped so far; fix "
                      "the store (%s), or raise backlog_messages / backlog_bytes in "
                      "FLEETLITE_INGEST_LIMITS", len(self.backlog), self.backlog.bytes,
                      self.backlog.dropped, self.store_health.error or "see above")

    def _store_item(self, item: BacklogItem) -> bool:
        """Store one report, or count its refusal; False if the store could not take it (the
        store is unavailable: nothing was stored and the caller keeps the report)."""
        try:
            refusal = self._ingest(item.device_id, item.kind, item.payload, item.received_at)
        except StoreUnavailableError as exc:
            self._store_failed(exc)
            return False
        except (MessageError, ValueError) as exc:
            self._malformed(item.device_id, item.kind, exc)
            return True
        except Exception:  # never kill the network thread
            log.exception("could not store a %s message from %s", item.kind, item.device_id)
            return True
        self._store_ok()
        self._count_stored(item, refusal)
        return True

    def _count_stored(self, item: BacklogItem, refusal: Optional[Refusal]) -> None:
        """Count a report the store took (stored, or refused by its sender's checks)."""
        if refusal is None:
            with self._ingest_lock:
                self.counters["ingested"] += 1
                self.ingested_by_kind[item.kind] += 1
        else:
            self._refused(item.device_id, item.kind, refusal)

    def _store_failed(self, exc: BaseException) -> None:
        line = self.store_health.failed(exc, time.time())
        if line is not None:
            log.error("%s", line)

    def _store_ok(self) -> None:
        if self.store_health.ok:
            return
        line = self.store_health.recovered(time.time(), len(self.backlog))
        if line is not None:
            log.warning("%s", line)

    def _drain_backlog(self, budget_s: float) -> bool:
        """Store the reports kept while the store could not take them, oldest first, for at
        most ``budget_s``; True when none is left."""
        deadline = time.monotonic() + budget_s
        while True:
            item = self.backlog.first()
            if item is None:
                return True
            if time.monotonic() > deadline or not self._store_item(item):
                return False
            self.backlog.done(item)

    def _refused(self, device_id: str, kind: str, refusal: Refusal) -> None:
        """Count a refusal against its sender: in memory, stored by the next flush; logged at
        once for the first of a sender and reason, then once per interval."""
        now = time.time()
        with self._ingest_lock:
            self.counters[_COUNTERS.get(refusal.reason, "refused")] += 1
            line = self.refusal_log.note(device_id or "(no device id)", refusal, now)
            if device_id:
                self.refusals.add(device_id, kind, refusal, now)
        if line is not None:
            log.warning("%s", line)

    def _malformed(self, device_id: str, kind: str, exc: Exception) -> None:
        code = getattr(exc, "code", "")
        what = f"a {kind} message" if kind else "a message on a topic"
        self._refused(device_id, kind, Refusal(
            MALFORMED, f"{what} that does not parse ({code + ': ' if code else ''}{exc})"))

    def _flush_refusals(self, device_id: Optional[str] = None) -> None:
        """Store the refusal counts (of one sender, or all) in one transaction."""
        with self._ingest_lock:
            batch = self.refusals.drain(device_id)
            unrecorded, self.refusals.unrecorded = self.refusals.unrecorded, 0
        if unrecorded:
            log.warning("%d refusals were counted but not stored per sender: more than %d "
                        "senders and reasons between two flushes (device ids made up by a "
                        "client that the broker's ACL does not confine?)", unrecorded,
                        self.refusals.max_keys)
        if not batch:
            return
        try:
            self.store.record_refusals(batch)
        except Exception:
            with self._ingest_lock:
                self.refusals.restore(batch)
            raise

    def _flush_ingest(self, *, everything: bool = False) -> None:
        """Store the telemetry held over the rate whose sender has a token again (all of it
        with ``everything``), then the refusal counts."""
        with self._ingest_lock:
            released = self.gate.release_held(time.monotonic(), everything=everything)
        # held at most one token interval of the sender's bucket (0.2 s by default) plus a tick:
        # their release is their receive time, well within the clock skew limit
        received_at = time.time()
        for device_id, payload in released:
            self._handle(device_id, topics.TELEMETRY, payload, received_at)
        self._flush_refusals()

    def _ingest(self, device_id: str, kind: str, payload: bytes,
                received_at: Optional[float]) -> Optional[Refusal]:
        """Store one report from ``device_id`` (the topic's device: the broker authenticated
        it); a report that speaks for another device, or claims what was never sent to its
        sender, is refused (:mod:`fleetlite.fleet.sender_check`) and nothing is stored. The
        sender's refusals counted since the last flush are stored in the same transaction, so
        they are in the store before anything it sent after them."""
        parse = _PARSERS.get(kind)
        if not payload or parse is None:
            return None  # a cleared retained message
        report = parse(payload)  # before any transaction: a malformed report costs none
        with self._ingest_lock:
            earlier = self.refusals.drain(device_id)
        if not earlier:
            return self._store_report(device_id, report, received_at, payload)
        try:
            with self.store.batch():
                self.store.record_refusals(earlier)
                return self._store_report(device_id, report, received_at, payload)
        except BaseException:
            with self._ingest_lock:
                self.refusals.restore(earlier)
            raise

    def _store_report(self, device_id: str, report: object, received_at: Optional[float],
                      payload: bytes) -> Optional[Refusal]:
        """Check a parsed report against its sender and store it, or return the refusal
        (telemetry and profiles as the ``payload`` they parsed from). A report that is not the
        device speaking now (a retained snapshot, the Last Will) changes neither its last seen
        nor its clock offset."""
        limits = self.limits
        refusal: Optional[Refusal]
        seen = received_at if heard_from_device(report, retained=received_at is None) else None
        if isinstance(report, Status):
            refusal = check_device_id(device_id, report.device_id, topics.STATUS)
            if refusal is None:
                self.store.upsert_status(report, received_at=seen)
        elif isinstance(report, Birth):
            refusal = (check_device_id(device_id, report.device_id, topics.BIRTH)
                       or check_birth(report, limits))
            if refusal is None:
                self.store.upsert_birth(report, received_at=seen)
        elif isinstance(report, Telemetry):
            refusal = check_device_id(device_id, report.device_id, topics.TELEMETRY)
            if refusal is None:
                self.store.record_telemetry(report, received_at=seen, raw=payload)
        elif isinstance(report, ProfileRecord):
            device = self.store.get_device(device_id)
            known_class = device.device_class if device else None
            refusal = check_profile(device_id, report, known_class)
            if refusal is None:
                self.store.add_profile(report, device_class=known_class or None,
                                       keep_per_device=limits.profiles_per_device, raw=payload)
        elif isinstance(report, CommandResponse):
            refusal = check_device_id(device_id, report.device_id, topics.COMMAND_RESPONSE)
            if refusal is None:
                # an answer to a command that was not sent to its sender changes nothing
                self.store.record_command_response(device_id, report,
                                                   received_at=received_at or time.time())
        elif isinstance(report, Event):
            refusal = check_device_id(device_id, report.device_id, topics.EVENTS)
            if refusal is None:
                self.store.add_event(report, received_at=received_at or time.time(),
                                     keep_per_device=limits.events_per_device)
        elif isinstance(report, OtaStatus):
            refusal = check_ota_status(device_id, report,
                                       self.store.releases_sent_to(device_id))
            if refusal is None:
                self.store.add_ota_status(report, received_at=received_at or time.time(),
                                          keep_per_release=limits.ota_statuses_per_release)
        elif isinstance(report, ShadowReport):
            # a shadow report speaks for the device on its topic only (it feeds a rollout's
            # shadow gate: a forged one could pass or stop another device's class)
            refusal = check_device_id(device_id, report.device_id, topics.SHADOW)
            if refusal is None:
                self.store.add_shadow_report(report, received_at=received_at or time.time())
        else:
            raise TypeError(f"no store for a {type(report).__name__}")
        return refusal

    # -- rollouts --------------------------------------------------------------------------

    def _loop(self) -> None:
        last = time.monotonic()
        while True:
            paced = self.next_tick_in() - self.tick_s  # a wait longer by design is no stall
            if self._wait_for_tick():
                return
            gap, last = time.monotonic() - last, time.monotonic()
            self.note_gap(gap - paced, time.time())
            if not self._check_store_file():
                return
            self._probe_store()
            # rollouts are decided on what devices reported: the kept reports go in first
            if not self._drain_backlog(_DRAIN_BUDGET_S):
                continue
            try:
                self._flush_ingest()
            except StoreUnavailableError as exc:
                self._store_failed(exc)
                continue
            except Exception:
                log.exception("could not store the refusal counts; retrying next tick")
            started = time.monotonic()
            try:
                self.tick(time.time())
            except StoreUnavailableError as exc:
                self._store_failed(exc)
            except Exception:
                log.exception("rollout tick failed; retrying next tick")
            else:
                self.last_tick_at = time.time()
            self.tick_cost_s = time.monotonic() - started

    def _wait_for_tick(self) -> bool:
        """Wait ``tick_s`` (longer after a long step: ``_STEP_SHARE``), or less once a rollout
        changed under someone else's hand (an operator's request, a new rollout): the request
        is answered without waiting for the next tick. True when the controller is stopping."""
        deadline = time.monotonic() + self.next_tick_in()
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if self._stop.wait(min(left, self.wake_s) if self.wake_s > 0 else left):
                return True
            if self.wake_s > 0 and self._changed_by_others():
                return False

    def next_tick_in(self) -> float:
        """Seconds from the end of a step to the next: ``tick_s``, or three times the last
        step's cost if longer (rollout steps take at most a quarter of the loop's time)."""
        return max(self.tick_s, self.tick_cost_s * (1 / _STEP_SHARE - 1))

    def _changed_by_others(self) -> bool:
        if not self.store_health.ok:
            return False
        try:
            revisions = self.store.rollout_revisions()
        except StoreError:
            return False  # the tick reports it
        known = self._known_revisions
        if all(known.get(rollout_id, -1) in (revision, None)
               for rollout_id, revision in revisions):
            return False
        # seen: if the tick it starts fails, the same change does not wake the loop again
        self._known_revisions = {rollout_id: None if known.get(rollout_id, -1) is None
                                 else revision for rollout_id, revision in revisions}
        return True

    def _check_store_file(self) -> bool:
        """False (and the controller stops itself) when its SQLite file was deleted or
        replaced: writing on would go into a file nobody can read."""
        try:
            self.store.check_file()
        except StoreGoneError as exc:
            self.fatal = str(exc)
            log.error("%s; the controller stops", exc)
            self._stop.set()
            self.failed.set()
            return False
        except StoreUnavailableError as exc:
            self._store_failed(exc)
        return True

    def _probe_store(self) -> None:
        """While the store is failing and no kept report would show it is back, try one small
        write (a lease of its own): reads alone do not tell that a read-only store is back."""
        if self.store_health.ok or len(self.backlog):
            return
        probe = f"store-check:{self.id}"
        try:
            self.store.claim(probe, self.id, self.lease_ttl_s)
            self.store.release_lease(probe, self.id)
        except StoreUnavailableError as exc:
            self._store_failed(exc)
        else:
            self._store_ok()

    def health(self, now: Optional[float] = None) -> dict[str, Any]:
        """What ``/healthz`` answers (docs/operator-guide.md, "Controller health"): whether
        the controller is ingesting, driving rollouts and serving releases, and why not."""
        now = time.time() if now is None else now
        broker = self.connected.is_set()
        store = self.store_health
        stale_after = max(10.0, 20 * self.tick_s, 3 * self.next_tick_in())
        ticking = self.last_tick_at is not None and now - self.last_tick_at <= stale_after
        publisher = self.publisher.stats()
        parts: dict[str, Any] = {
            "broker": {"ok": broker, "url": self.broker.url},
            "store": {"ok": store.ok and self.fatal is None, "url": self.store.url,
                      "error": self.fatal or store.error or None,
                      "down_since": store.down_since},
            "ingest": {"ok": broker and store.ok and self.fatal is None,
                       "backlog": len(self.backlog), "backlog_bytes": self.backlog.bytes,
                       "ingested": self.counters["ingested"],
                       "kept_for_store": self.counters["kept_for_store"],
                       "lost_store_down": self.counters["lost_store_down"]},
            "rollouts": {"ok": ticking and self.fatal is None, "last_tick_at": self.last_tick_at,
                         "driving": sorted(self._held)},
            "releases": {"ok": bool(publisher["connected"]),
                         "serving": sorted(self._serving)},
        }
        return {"ok": all(part["ok"] for part in parts.values()), "controller": self.id,
                "at": now, **parts}

    def note_gap(self, gap_s: float, now: float) -> None:
        """After a stall (the process stopped, the machine suspended, a store call that hung),
        the devices' silence is the controller's own: hold re-sends for ``resend_after_s`` so
        the reports the broker queued meanwhile are ingested first."""
        if gap_s < self.resend_after_s:  # a tick is normally tick_s (0.5 s) apart
            return
        self._resends_held_until = now + self.resend_after_s
        log.warning("the controller was stalled for %.0f s (process stopped, machine suspended or "
                    "a slow store); re-sends of unanswered installs wait %.0f s for the reports "
                    "queued meanwhile", gap_s, self.resend_after_s)

    def tick(self, now: float) -> None:
        """Send the commands operators queued, then drive every rollout that needs it and
        whose lease this controller gets."""
        self.send_queued_commands(now)
        needed: set[str] = set()  # releases of rollouts not settled: devices may still fetch
        models: set[str] = set()
        known: dict[str, Optional[int]] = {}
        for rollout_id, revision in self.store.rollout_revisions():
            known[rollout_id] = revision
            if self._settled.get(rollout_id) == revision:
                continue  # finished, and nothing has changed it since
            if self._known_revisions.get(rollout_id) != revision:  # changed by someone else
                try:
                    self._answer_requests(rollout_id, now)
                except StoreUnavailableError:
                    raise
                except Exception:  # the step below answers them, or reports the same error
                    log.exception("rollout %s: could not answer the operator's requests "
                                  "ahead of the step", rollout_id)
            record = self.store.get_rollout(rollout_id)
            if record is None:
                continue
            known[rollout_id] = record.revision
            try:
                spec = RolloutSpec.from_dict(record.spec)
                state = RolloutState.from_stored(record.state)
            except Exception:
                log.exception("rollout %s cannot be read; skipped", record.rollout_id)
                needed.update(self._serving)  # cannot tell what it needs: keep serving all
                continue
            # finished with nothing in flight: settled for good once a step at this revision
            # decides nothing (an operator's rollback answered ahead of the step still has its
            # rollbacks to send); _awaiting_devices only turns false as time passes, and
            # anything that changes the rollout changes its revision
            quiet = (state.finished and not state.operator_requests
                     and not _awaiting_devices(state, spec, now))
            if not quiet:
                needed.add(spec.release_id)
            models.add(spec.model)
            self._settled.pop(rollout_id, None)
            lease = f"rollout:{record.rollout_id}"
            if not self.store.claim(lease, self.id, self.lease_ttl_s):
                self._held.discard(record.rollout_id)
                known[rollout_id] = None  # another controller drives it
                if quiet:
                    self._settled[rollout_id] = record.revision  # its holder steps it
                continue
            if record.rollout_id not in self._held:
                self._held.add(record.rollout_id)
                log.info("controller %s drives rollout %s (revision %d)", self.id,
                         record.rollout_id, record.revision)
            try:
                if self.drive(record.rollout_id, now, record=record):
                    known[rollout_id] = record.revision + 1  # this step's own write
                elif quiet:
                    self._settled[rollout_id] = record.revision
            except StoreUnavailableError:
                raise  # the loop reports it once, not once per rollout and tick
            except Exception:
                log.exception("rollout %s: step failed; retrying next tick", record.rollout_id)
        self._known_revisions = known
        for release_id in sorted(self._serving - needed):
            self._unserve_release(release_id)
        self.outcome_views.retain(needed)
        self.profile_views.retain(models)

    def _answer_loop(self) -> None:
        """Every ``wake_s``, answer the operator requests of the rollouts changed since: on a
        thread of its own, so that a request is answered while the loop is in a step that takes
        seconds (a 10,000-device wave under load). That step then finds the revision changed and
        decides again on the next tick; each decision is still recorded exactly once
        (:meth:`Store.apply_decisions`)."""
        seen: dict[str, int] = {}
        while not self._stop.wait(self.wake_s):
            if not self.store_health.ok or self.fatal is not None:
                continue
            try:
                for rollout_id, revision in self.store.rollout_revisions():
                    if seen.get(rollout_id) == revision or \
                            self._settled.get(rollout_id) == revision:
                        continue
                    seen[rollout_id] = revision
                    self._answer_requests(rollout_id, time.time())
            except StoreError:
                continue  # the loop reports the store's state
            except Exception:
                log.exception("could not answer operator requests; trying again")

    def _answer_requests(self, rollout_id: str, now: float) -> None:
        """Answer a rollout's queued operator requests from its rollout-level state alone (a
        small read and write) before the step that reads every device, profile and outcome:
        an operator waits for this, not for that step (:func:`fleet.rollout.answer_requests`)."""
        light = self.store.get_rollout(rollout_id, devices=False)
        if light is None:
            return
        try:
            spec = RolloutSpec.from_dict(light.spec)
            state = RolloutState.from_stored(light.state)
        except Exception:
            return  # the step reports it
        if not state.operator_requests:
            return
        if not self.store.claim(f"rollout:{rollout_id}", self.id, self.lease_ttl_s):
            return  # another controller drives it, and answers
        decisions = answer_requests(spec, state, now)
        new_state = apply(state, decisions, now).to_dict(devices=False)
        if not self.store.apply_decisions(rollout_id, light.revision, decisions,
                                          new_state=new_state, now=now):
            self.counters["stale_batches"] += 1
            return  # changed again meanwhile: the step answers
        self.counters["decisions"] += len(decisions)
        for decision in decisions:
            log.info("rollout %s: %s: %s", rollout_id, decision.kind, decision.reason)

    def _unserve_release(self, release_id: str) -> None:
        """Clear a release no rollout needs any more from the broker (its retained manifest
        and chunks), so the broker does not hold every release's bytes for ever."""
        try:
            self.publisher.stop_serving(release_id)
        except PublishError as exc:
            log.warning("could not clear release %s from the broker yet (%s); trying again "
                        "next tick", release_id[:12], exc)
            return
        self._serving.discard(release_id)
        log.info("release %s: no rollout needs it any more; cleared from the broker",
                 release_id[:12])

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
        # every chunk once, retained: the broker then hands the release to each device that
        # subscribes, however late (docs/protocol.md, "OTA delivery")
        self.publisher.serve(bundle, chunk_size, initial_pass=True, wait=False)
        self._serving.add(release_id)
        log.info("serving release %s (%s v%d)", release_id[:12], manifest.name, manifest.version)

    def drive(self, rollout_id: str, now: float, *,
              record: Optional[RolloutRecord] = None) -> int:
        """One read-decide-write-send step; returns the number of decisions applied.
        ``record``: the rollout as just read (with its devices), to save reading it again: if
        it is stale, the write finds its revision changed and nothing is applied."""
        if record is None or record.rollout_id != rollout_id:
            record = self.store.get_rollout(rollout_id)
        if record is None:
            return 0
        spec = RolloutSpec.from_dict(record.spec)
        state = RolloutState.from_stored(record.state)
        if not state.finished or _awaiting_devices(state, spec, now):
            self._serve_release(spec.release_id, spec.chunk_size)  # devices may download
        devices = [DeviceView(*entry) for entry in self.store.registry()]
        classes = {d.device_id: d.device_class for d in devices}
        # outcome times on the controller's clock: the engine compares them with send times
        outcomes = self.outcome_views.views(self.store, spec.release_id)
        outcomes += self._refusals(rollout_id, spec)
        profiles = self.profile_views.views(self.store, spec.model, classes)
        # shadow reports only while a class waits for its verdict (the phase before wave 1)
        shadow_reports = ([report for report, _ in self.store.shadow_reports(spec.release_id)]
                          if spec.shadow is not None and state.current_wave == 0
                          and not state.finished else [])
        decisions = decide(spec, state, devices, profiles, now, outcomes=outcomes,
                           shadow_reports=shadow_reports)
        if decisions:
            new_state = apply(state, decisions, now)
            changed = [dev for device_id, dev in new_state.devices.items()
                       if state.devices.get(device_id) != dev]
            if not self.store.apply_decisions(rollout_id, record.revision, decisions,
                                              progress=changed,
                                              new_state=new_state.to_dict(devices=False),
                                              now=now):
                self.counters["stale_batches"] += 1
                return 0  # another controller moved it first; decide again next tick
            self.counters["decisions"] += len(decisions)
            sends: list[tuple[str, str, dict[str, Any]]] = []
            for decision in decisions:
                target = decision.device_id or decision.device_class
                log.info("rollout %s: %s%s: %s", rollout_id, decision.kind,
                         f" {target}" if target else "", decision.reason)
                if decision.kind == SHADOW_VERDICT:
                    # a class the verdict stopped: end the shadow on its shadowing devices
                    sends.extend((device_id, "shadow_stop", {"model": spec.model})
                                 for device_id in decision.detail.get("stop", ()))
                elif (decision.kind in (SEND_INSTALL, SEND_PROBE, SEND_SHADOW)
                        and decision.device_id):
                    # the engine's args: release_id, chunk_size, and variant, probe: true or
                    # shadow: true with the shadow options
                    sends.append((decision.device_id, "ota_install",
                                  dict(decision.detail.get("args", {
                                      "release_id": spec.release_id,
                                      "chunk_size": spec.chunk_size}))))
                elif decision.kind == SEND_ROLLBACK and decision.device_id:
                    # from_version makes a redelivered rollback a no-op on the device
                    sends.append((decision.device_id, "ota_rollback",
                                  {**decision.detail.get("args", {"model": spec.model}),
                                   "from_version": spec.version}))
            self.commands(sends, origin=f"rollout {rollout_id}")
            state = new_state
        self._resend_unanswered(rollout_id, spec, state, devices, now)
        return len(decisions)

    def _refusals(self, rollout_id: str, spec: RolloutSpec) -> list[OutcomeView]:
        """The rollout's installs and rollbacks their device refused outright (a command
        response with an error, e.g. a rollback with nothing to roll back to), as failures at
        the time of the answer: the device's state now, not after ``wave_timeout_s``."""
        origins = (f"rollout {rollout_id}", f"rollout {rollout_id} (re-sent)")
        return [OutcomeView(c.device_id, spec.release_id, "failed", c.error_code or "refused",
                            f"the device refused the {c.command} command: {c.error}",
                            c.answered or 0.0)
                for c in self.store.refused_commands(origins)
                if c.command in ("ota_install", "ota_rollback")]

    def _resend_unanswered(self, rollout_id: str, spec: RolloutSpec, state: RolloutState,
                           devices: Sequence[DeviceView], now: float) -> None:
        """Send the install again, once, to online ``sent`` devices that said nothing about the
        release for ``resend_after_s`` since the send or their last OTA status, once no device
        at all has said anything about it for that long: the command may have been lost (a
        crash between the store's commit and the publish, a device offline at that moment), or
        the device's final status (a controller down without a persistent session). Probes
        (variants) and shadow installs still ``sent`` are re-sent the same way, with their own
        args. While the controller holds more received reports than one batch stores (or any
        report kept while the store was down), and for ``resend_after_s`` after, nothing is
        re-sent: a device's answer may be among them."""
        if len(self.backlog) or len(self.ingest_queue) > self.ingest_queue.max_batch:
            self._resends_held_until = max(self._resends_held_until, now + self.resend_after_s)
        if now < self._resends_held_until:
            return
        # (what was sent, device, class, when): the installs, probes and shadow installs
        waiting = [("install", d.device_id, d.device_class, d.sent_at)
                   for d in state.devices.values() if d.status == _SENT]
        waiting += [("probe", p.device_id, p.device_class, p.sent_at)
                    for p in state.probes.values() if p.status == _SENT]
        waiting += [("shadow", sh.device_id, sh.device_class, sh.sent_at)
                    for sh in state.shadows.values() if sh.status == _SENT]
        if not waiting:
            return
        latest = self.store.ota_heard_latest(spec.release_id)
        if latest is not None and now < latest + self.resend_after_s:
            # devices are still answering this release: one still silent is most likely behind
            # in a queue (the broker's, its own), not missing its command; a re-send now would
            # only add to the load (10,000 devices: thousands of re-sends a minute into a wave)
            return
        online = {d.device_id for d in devices if d.online}
        silent = [(what, device_id, cls, sent_at) for what, device_id, cls, sent_at in waiting
                  if sent_at is not None and now >= sent_at + self.resend_after_s
                  and (rollout_id, what, device_id) not in self._resent
                  and device_id in online]
        if not silent:
            return
        heard = self.store.ota_last_heard(spec.release_id, [s[1] for s in silent])
        resends: list[tuple[str, str, dict[str, Any]]] = []
        for what, device_id, cls, sent_at in silent:
            assert sent_at is not None
            quiet_since = max(sent_at, heard.get(device_id, 0.0))
            if now < quiet_since + self.resend_after_s:
                continue
            self._resent.add((rollout_id, what, device_id))
            self.counters["commands_resent"] += 1
            log.warning("rollout %s: %s has said nothing about the %s for %.0f s (sent %.0f s "
                        "ago); sending it again", rollout_id, device_id, what,
                        now - quiet_since, now - sent_at)
            args = (install_args(spec, state, cls) if what == "install"
                    else probe_args(spec) if what == "probe" else shadow_args(spec))
            resends.append((device_id, "ota_install", args))
        self.commands(resends, origin=f"rollout {rollout_id} (re-sent)")

    def send_queued_commands(self, now: float) -> int:
        """Publish the commands operators queued in the store (``fleetlite devices ping``,
        :meth:`fleetlite.fleet.client.Fleet.send_command`) that no controller published yet;
        each is claimed first, so one controller publishes it. Returns how many."""
        sent = 0
        for queued in self.store.commands_to_send(now):
            if self.store.mark_command_sent(queued.command_id, now):
                self._publish_command(queued.device_id, queued.command_id, queued.command,
                                      queued.args)
                sent += 1
        return sent

    def command(self, device_id: str, name: str, args: dict[str, Any], *,
                origin: str = "") -> str:
        """Record a command to a device in the store (its answer is stored when it comes:
        ``fleetlite devices history``), publish it (QoS 1) and return its id."""
        return self.commands([(device_id, name, args)], origin=origin)[0]

    def commands(self, sends: Sequence[tuple[str, str, dict[str, Any]]], *,
                 origin: str = "") -> list[str]:
        """:meth:`command` for several (device, command, args): recorded in one transaction
        (a wave's installs to 9,000 devices were 9,000 transactions, holding a step for
        seconds), then published."""
        if not sends:
            return []
        now = time.time()
        try:
            with self.store.batch():
                ids = [self.store.queue_command(device_id, name, args, origin=origin,
                                                timeout_s=3600.0, sent=now)
                       for device_id, name, args in sends]
        except StoreError:  # sending is what matters; its history can go without
            ids = [uuid.uuid4().hex[:16] for _ in sends]
        for command_id, (device_id, name, args) in zip(ids, sends):
            self._publish_command(device_id, command_id, name, args)
        return ids

    def _publish_command(self, device_id: str, command_id: str, name: str,
                         args: dict[str, Any]) -> None:
        payload = json.dumps({"schema": "fleetlite.command/1", "id": command_id,
                              "command": name, "args": args}, sort_keys=True).encode()
        self.client.publish(topics.device_topic(device_id, topics.COMMAND), payload, qos=1)
        self.counters["commands_sent"] += 1


def run_until_stopped(controller: Controller, stop: threading.Event,
                      health: Optional[HealthEndpoint] = None) -> int:
    """Wait until ``stop`` is set (SIGINT/SIGTERM) or the controller stops by itself (its
    SQLite file deleted or replaced), serving ``health`` meanwhile, then stop the controller.
    Returns the exit code: 0, or 1 when it stopped by itself (the reason was logged)."""
    if health is not None:
        health.start()
        log.info("health: GET %s", health.url)
    try:
        while not stop.wait(0.5) and not controller.failed.is_set():
            pass
    finally:
        controller.stop()
        if health is not None:
            health.close()
    return 1 if controller.fatal else 0


def _awaiting_devices(state: RolloutState, spec: RolloutSpec, now: float) -> bool:
    """A finished rollout still has answers to record: installs or rollbacks in flight, or a
    timed-out device that may still answer within another ``wave_timeout_s``."""
    for dev in state.devices.values():
        if dev.status in (_SENT, _ROLLBACK_SENT):
            return True
        if (dev.status == _TIMED_OUT and dev.updated_at is not None
                and now < dev.updated_at + spec.wave_timeout_s):
            return True
    return False


# -- the process -------------------------------------------------------------------------------


def _address(broker: BrokerAddress | str, port: Optional[int]) -> BrokerAddress:
    if isinstance(broker, BrokerAddress):
        if port is not None:
            raise TypeError("give the port inside the BrokerAddress, not as an argument")
        return broker
    if port is None:
        raise TypeError("give a BrokerAddress, or a host and a port")
    return BrokerAddress(broker, port)


def _configure(client: mqtt.Client, broker: BrokerAddress,
               tls: Optional[ssl.SSLContext]) -> None:
    """TLS and credentials of ``broker`` on a paho client."""
    if tls is not None:
        client.tls_set_context(tls)
    if broker.username:
        client.username_pw_set(broker.username, broker.password)


def check_broker(broker: BrokerAddress, *, timeout: float = 10.0) -> None:
    """Connect to ``broker`` once (an MQTT CONNECT with its TLS files and credentials, then a
    clean disconnect) and raise :class:`BrokerConnectionError` saying why it failed: nothing
    listens, the TLS handshake or the broker's certificate failed, the broker closed the
    connection (no or an untrusted client certificate), or it refused the CONNECT (credentials,
    authorization). Raises :class:`BrokerAddressError` for missing or unreadable TLS files."""
    tls = ssl_context(broker)
    client = mqtt.Client(CallbackAPIVersion.VERSION2,
                         client_id=f"fleetlite-check-{uuid.uuid4().hex[:8]}", clean_session=True)
    _configure(client, broker, tls)
    outcome: dict[str, Any] = {}
    errors: list[str] = []

    def on_connect(c: mqtt.Client, userdata: Any, flags: Any, reason: Any,
                   properties: Any) -> None:
        outcome.setdefault("connack", reason)

    def on_disconnect(c: mqtt.Client, userdata: Any, flags: Any, reason: Any,
                      properties: Any) -> None:
        outcome.setdefault("closed", reason)

    def on_log(c: mqtt.Client, userdata: Any, level: int, text: str) -> None:
        if level == mqtt.MQTT_LOG_ERR or text.startswith("failed to"):
            errors.append(text)

    client.on_connect = on_connect
    client.on_disconnect = on_disconnect
    client.on_log = on_log
    where = broker.url
    try:
        try:
            client.connect(broker.host, broker.port, keepalive=max(5, int(timeout)))
        except ssl.SSLCertVerificationError as exc:
            raise BrokerConnectionError(
                f"the MQTT broker at {where} presented a certificate that does not verify "
                f"({exc.verify_message}): "
                + verify_failure_hint(exc.verify_message, "--tls-ca / FLEETLITE_TLS_CA")) from None
        except ssl.SSLError as exc:
            raise BrokerConnectionError(
                f"the TLS handshake with the MQTT broker at {where} failed "
                f"({exc.reason or exc}): is it a TLS listener? (use mqtt://HOST:PORT for a "
                "plain one); check the broker's log") from None
        except ConnectionResetError as exc:
            plain = " (a plain listener? use mqtt://HOST:PORT)" if broker.tls else ""
            raise BrokerConnectionError(
                f"the MQTT broker at {where} reset the connection while it was being set up "
                f"({exc.strerror or exc}): is this the right port{plain}? check the broker's "
                "log") from None
        except OSError as exc:
            raise BrokerConnectionError(
                f"cannot reach the MQTT broker at {broker.host}:{broker.port} "
                f"({exc.strerror or exc}): start it (e.g. `mosquitto -p 1883`) or point "
                "--broker / FLEETLITE_BROKER at it") from None
        deadline = time.monotonic() + timeout
        while not outcome and time.monotonic() < deadline:
            client.loop(timeout=0.2)
        if not outcome:
            raise BrokerConnectionError(
                f"the MQTT broker at {where} did not answer the MQTT CONNECT within "
                f"{timeout:g} s: is it an MQTT listener{' with TLS' if broker.tls else ''}?")
        reason = outcome.get("connack")
        if reason is None:
            raise BrokerConnectionError(_closed_message(broker, errors))
        if reason.is_failure:
            raise BrokerConnectionError(
                f"the MQTT broker at {where} refused the connection: {reason}: check "
                "FLEETLITE_MQTT_USERNAME / FLEETLITE_MQTT_PASSWORD against the broker's "
                "password file, or give a client certificate (--tls-cert, --tls-key) if the "
                "broker authenticates by certificate (use_identity_as_username)")
    finally:
        if client.socket() is not None:  # sending DISCONNECT closes the socket
            client.disconnect()
            client.loop(timeout=0.2)


def _closed_message(broker: BrokerAddress, errors: Sequence[str]) -> str:
    """Why the broker closed the connection before its CONNACK, as far as the client can tell
    (a broker that wants a client certificate just closes the TLS connection)."""
    seen = errors[-1].removeprefix("failed to receive on socket: ") if errors else "closed"
    text = f"the MQTT broker at {broker.url} closed the connection before accepting it ({seen})"
    if not broker.tls:
        return (f"{text}: if it is a TLS listener, write mqtts://HOST:PORT and give --tls-ca "
                "(and a client certificate if it wants one); otherwise check the broker's log")
    if broker.cert is None:
        return (f"{text}: it probably requires a client certificate: give --tls-cert and "
                "--tls-key (env FLEETLITE_TLS_CERT / FLEETLITE_TLS_KEY) with a certificate "
                "signed by the CA the broker trusts; the broker's log says more")
    return (f"{text}: the broker may not trust the client certificate {broker.cert} (signed by "
            "a CA it does not know, expired, or not for client authentication); check its log")


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fleetlite.fleet.controller",
        description="Run one fleet controller until SIGINT/SIGTERM (what `fleetlite serve` "
        "runs): it stores what devices report, serves releases and drives the rollouts.",
        epilog="Limits on device input (size per message kind, messages per device per second, "
        "profiles and OTA statuses kept): set FLEETLITE_INGEST_LIMITS, e.g. "
        "rate=20,telemetry_rate=10; defaults in docs/operator-guide.md.")
    parser.add_argument("--db", default=os.environ.get("FLEETLITE_DB", "sqlite:///fleetlite.db"),
                        help="the store: sqlite:///PATH or postgresql://USER:PW@HOST/DB "
                        "(env FLEETLITE_DB)")
    parser.add_argument("--broker", metavar="ADDRESS", help=BROKER_HELP)
    add_tls_options(parser)
    parser.add_argument("--group", help="share device messages with the other controllers of "
                        "this group (MQTT shared subscriptions)")
    parser.add_argument("--id", dest="controller_id",
                        help="a stable controller id: MQTT client id and lease owner; keeps a "
                        "persistent MQTT session across restarts (default: a random id)")
    parser.add_argument("--tick", type=float, default=0.5, help="seconds between rollout steps")
    parser.add_argument("--lease-ttl", type=float, default=10.0,
                        help="seconds before another controller may take over a rollout")
    parser.add_argument("--health", metavar="[HOST:]PORT",
                        help="serve GET /healthz on this address (a bare port: 127.0.0.1)")
    parser.add_argument("--log-level", default="INFO",
                        choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``python -m fleetlite.fleet.controller``; prints the counters as JSON on
    stdout when stopped."""
    args = _build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        broker = resolve_broker(args.broker, ca=args.tls_ca, cert=args.tls_cert,
                                key=args.tls_key)
        ssl_context(broker)
        limits = IngestLimits.from_env()
        health_address = parse_listen_address(args.health) if args.health else None
    except (BrokerAddressError, IngestLimitsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except FleetError as exc:  # the health address
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        check_broker(broker)
    except FleetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, on_signal)
    with open_store(args.db) as store:
        controller = Controller(store, broker, group=args.group,
                                controller_id=args.controller_id, tick_s=args.tick,
                                lease_ttl_s=args.lease_ttl, limits=limits)
        try:
            health = (HealthEndpoint(*health_address, controller.health)
                      if health_address else None)
        except FleetError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        controller.start()
        log.info("controller %s running: store %s, broker %s%s", controller.id, store.url,
                 broker.describe(), f", group {args.group}" if args.group else "")
        code = run_until_stopped(controller, stop, health)
        log.info("controller %s stopped: %s", controller.id, controller.counters)
    print(json.dumps({"controller": controller.id, "counters": controller.counters,
                      "ingested": dict(controller.ingested_by_kind)}, sort_keys=True),
          flush=True)
    if controller.fatal:
        print(f"error: {controller.fatal}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
