"""The agent's MQTT link: connect, announce, receive commands, deliver spooled reports.

An adapter over paho-mqtt 2.x (callback API v2, MQTT 3.1.1). Its own network thread owns the
paho client; a fresh client is made for every connection attempt, so nothing paho queued in RAM
survives a disconnect: the on-disk spool is the only queue for reports ("write before publish,
delete on PUBACK"). On every connect it publishes the retained online status (the Last Will
turns it to offline if the agent dies), the retained birth message, subscribes to its command
topic and then drains the spool in order. Other subscriptions are kept as wanted state and
re-made on every connect: :meth:`MqttLink.subscribe` ones by a before/after diff, and
:meth:`MqttLink.subscribe_many` ones (a device's window of exact chunk topics) as one packet per
call that is always sent, in order with live publishes. Reconnects back off exponentially with
jitter so a fleet does not reconnect in lock-step after a broker restart.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import random
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from fleetlite.agent.config import AgentConfig, TlsConfig
from fleetlite.sdk import topics
from fleetlite.sdk.messages import Status
from fleetlite.sdk.tls_hints import verify_failure_hint

log = logging.getLogger("fleetlite.agent.link")

MAX_INFLIGHT = 64
#: the longest the network thread waits in paho's select; work queued by another thread wakes it
#: at once (:meth:`MqttLink._nudge`)
LOOP_TIMEOUT_S = 0.05
#: live publishes kept while offline (the oldest go first)
LIVE_LIMIT = 1000

# queued network work, in the order it was asked for: (kind, topics, payload, qos, retain)
_PUBLISH, _SUBSCRIBE, _UNSUBSCRIBE = "publish", "subscribe", "unsubscribe"
_Action = tuple[str, tuple[str, ...], bytes, int, bool]


class SpooledRecord(Protocol):
    @property
    def seq(self) -> int: ...
    @property
    def topic(self) -> str: ...
    @property
    def payload(self) -> bytes: ...
    @property
    def qos(self) -> int: ...
    @property
    def retain(self) -> bool: ...


class Outbox(Protocol):
    """What the link needs of the spool."""

    def append(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
               priority: str = "telemetry") -> int | None: ...
    def peek(self, limit: int, after: int = -1) -> list[Any]: ...
    def ack(self, seq: int) -> None: ...


def backoff_delay(attempt: int, minimum: float, maximum: float, rng: random.Random) -> float:
    """Exponential backoff with "equal jitter": between half and all of min(max, min*2^attempt)."""
    ceiling = min(maximum, minimum * (2 ** min(attempt, 30)))
    return float(ceiling / 2 + rng.uniform(0, ceiling / 2))


def tls_context(tls: TlsConfig) -> ssl.SSLContext:
    """The agent's TLS client context: verifies the broker against ``tls.ca`` and its host name
    (unless ``insecure_skip_hostname``), presents the device certificate, and speaks TLS 1.2 or
    newer (Python 3.9's default would still offer TLS 1.0 where the system's OpenSSL allows it).
    """
    context = ssl.create_default_context(cafile=str(tls.ca))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls.cert:
        context.load_cert_chain(str(tls.cert), str(tls.key) if tls.key else None)
    if tls.insecure_skip_hostname:
        context.check_hostname = False
    return context


class MqttLink:
    """Keeps one device connected to the broker and its reports flowing."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        session: int,
        outbox: Outbox,
        birth: Callable[[], bytes],
        on_command: Callable[[bytes], None],
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.session = session
        self.conn = 0  # connections made in this session; see _new_client
        self.outbox = outbox
        self._birth = birth
        self._on_command = on_command
        self._rng = rng or random.Random()
        self._stop = threading.Event()
        self.connected = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._client: mqtt.Client | None = None
        self._inflight: dict[int, int] = {}  # paho mid -> spool seq
        self._last_sent_seq = -1
        self._republish_birth = False
        self._subscribed: set[str] = set()
        self._subscriptions: dict[str, Callable[[bytes], None]] = {}
        self._subscriptions_changed = False
        # topics of subscribe_many: subscribed with one packet per call, not by a diff
        self._batched: dict[str, Callable[[bytes], None]] = {}
        self._actions: collections.deque[_Action] = collections.deque()
        self._actions_lock = threading.Lock()
        self.command_topic = topics.device_topic(config.device_id, topics.COMMAND)
        self.status_topic = topics.device_topic(config.device_id, topics.STATUS)
        self.counters = {
            "connects": 0,
            "connect_failures": 0,
            "disconnects": 0,
            "published": 0,
            "acked": 0,
            "commands_received": 0,
        }
        self.last_error = ""

    # -- public API (any thread) ---------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="fleetlite-mqtt", daemon=True)
        self._thread.start()

    def report(self, kind: str, payload: bytes, *, priority: str = "telemetry") -> int | None:
        """Spool a QoS-1 report and wake the sender; returns its spool seq (None: refused)."""
        topic = topics.device_topic(self.config.device_id, kind)
        seq = self.outbox.append(topic, payload, qos=1, retain=False, priority=priority)
        self._wake.set()
        return seq

    def subscribe(self, topic: str, handler: Callable[[bytes], None]) -> None:
        """Deliver messages on ``topic`` (a topic, or a filter with ``+``/``#`` wildcards) to
        ``handler`` in the network thread; kept across reconnects. Handlers must be quick: hand
        work to another thread."""
        self._subscriptions[topic] = handler
        self._subscriptions_changed = True
        self._wake.set()

    def unsubscribe(self, topic: str) -> None:
        self._subscriptions.pop(topic, None)
        self._subscriptions_changed = True
        self._wake.set()

    def subscribe_many(self, names: Sequence[str], handler: Callable[[bytes], None]) -> None:
        """Subscribe to every topic of ``names`` (exact topics, or filters) in ONE SUBSCRIBE
        packet, sent even for topics already subscribed: the broker then replaces those
        subscriptions and sends their retained messages again (MQTT 3.1.1 section 3.8.4), which
        is how a device gets a chunk it lost. Messages go to ``handler`` (network thread).

        Sent in order with :meth:`unsubscribe_many` and :meth:`publish_live` calls: a request
        published after a subscription is read by the broker after it. Kept across reconnects
        (all of them in one packet on connect); not diffed against :meth:`subscribe`'s."""
        if not names:
            return
        with self._actions_lock:
            for name in names:
                self._batched[name] = handler
            self._actions.append((_SUBSCRIBE, tuple(names), b"", 1, False))
        self._nudge()

    def unsubscribe_many(self, names: Sequence[str]) -> None:
        """Unsubscribe from topics of :meth:`subscribe_many`, in one UNSUBSCRIBE packet."""
        if not names:
            return
        with self._actions_lock:
            for name in names:
                self._batched.pop(name, None)
            self._actions.append((_UNSUBSCRIBE, tuple(names), b"", 0, False))
        self._nudge()

    def publish_live(self, topic: str, payload: bytes, *, qos: int = 1,
                     retain: bool = False) -> None:
        """Publish without spooling (requests that are only useful now); while offline only the
        last LIVE_LIMIT are kept."""
        with self._actions_lock:
            self._actions.append((_PUBLISH, (topic,), payload, qos, retain))
            if len(self._actions) > LIVE_LIMIT and not self.connected.is_set():
                self._actions.popleft()
        self._nudge()

    def refresh_birth(self) -> None:
        """Re-publish the retained birth message (after a model change or config reload)."""
        self._republish_birth = True
        self._nudge()

    def _nudge(self) -> None:
        """Wake the network thread now, also out of paho's select: without it, a live publish
        from another thread (a chunk request) waited for the select's timeout, up to
        LOOP_TIMEOUT_S (50 ms); a download paid it at every request window. paho wakes its own
        loop this way when ``publish`` is called from another thread (its ``_sockpairW``; no
        public API does it). Spooled reports only set ``_wake``: waking for each of them made
        an install's start slower in tools/bench/bench_ota_transfer.py."""
        self._wake.set()
        pair = getattr(self._client, "_sockpairW", None)
        if pair is not None:
            with contextlib.suppress(OSError):  # full (already woken) or closed (reconnecting)
                pair.send(b"0")

    def stop(self, timeout: float = 5.0) -> None:
        """Say goodbye (retained offline status) and disconnect, so no Will is sent."""
        self._stop.set()
        self._nudge()
        if self._thread is not None:
            self._thread.join(timeout)

    def stats(self) -> dict[str, Any]:
        connected = self.connected.is_set()
        return {**self.counters, "connected": connected, "last_error": self.last_error}

    # -- network thread ------------------------------------------------------------------------

    def _status(self, online: bool, reason: str) -> bytes:
        return Status(
            device_id=self.config.device_id,
            online=online,
            session=self.session,
            ts=time.time(),
            reason=reason,
            conn=self.conn,
        ).to_json()

    def _new_client(self) -> mqtt.Client:
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.config.device_id,
            clean_session=True,
            protocol=mqtt.MQTTv311,
            reconnect_on_failure=False,
        )
        client.max_inflight_messages_set(MAX_INFLIGHT)
        broker = self.config.broker
        if broker.username:
            client.username_pw_set(broker.username, broker.password)
        if broker.tls is not None:
            client.tls_set_context(tls_context(broker.tls))
            if broker.tls.insecure_skip_hostname:
                client.tls_insecure_set(True)  # paho's own flag, beside the context's
        # a new connection number for this client's Will and its online status: a Will of an
        # earlier connection that arrives late (another controller, a slow broker) is stale
        self.conn += 1
        client.will_set(self.status_topic, self._status(False, "lost"), qos=1, retain=True)
        client.on_connect = self._handle_connect
        client.on_disconnect = self._handle_disconnect
        client.on_message = self._handle_message
        client.on_publish = self._handle_publish
        return client

    def _run(self) -> None:
        attempt = 0
        broker = self.config.broker
        while not self._stop.is_set():
            client = self._new_client()
            self._client = client
            try:
                client.connect(broker.host, broker.port, keepalive=broker.keepalive_s)
            except (OSError, ValueError) as exc:
                self.counters["connect_failures"] += 1
                self.last_error = f"cannot connect to {broker.host}:{broker.port}: {exc}"
                if isinstance(exc, ssl.SSLCertVerificationError):
                    self.last_error += "; " + verify_failure_hint(exc.verify_message or "",
                                                                  "broker.tls.ca")
                log.warning("%s", self.last_error)
            else:
                attempt = self._pump(client, attempt)
                if self._stop.is_set():
                    self._goodbye(client)
                    break
                with contextlib.suppress(OSError):
                    client.disconnect()
            self.connected.clear()
            self._inflight.clear()
            self._last_sent_seq = -1
            delay = backoff_delay(
                attempt, self.config.reconnect_min_s, self.config.reconnect_max_s, self._rng
            )
            attempt += 1
            log.info("reconnecting in %.1f s", delay)
            self._stop.wait(delay)

    def _pump(self, client: mqtt.Client, attempt: int) -> int:
        """Run one connection until it drops or the link stops; returns the backoff attempt."""
        while not self._stop.is_set():
            rc = client.loop(timeout=LOOP_TIMEOUT_S)
            if rc != mqtt.MQTT_ERR_SUCCESS:
                self.last_error = f"connection lost ({mqtt.error_string(rc)})"
                log.warning("%s", self.last_error)
                break
            if self.connected.is_set():
                attempt = 0
                if self._republish_birth:
                    self._republish_birth = False
                    self._publish_birth(client)
                if self._wake.is_set():
                    self._wake.clear()
                    if self._subscriptions_changed:
                        self._subscriptions_changed = False
                        self._sync_subscriptions(client)
                    self._run_actions(client)
                    self._drain(client)
        return attempt

    def _sync_subscriptions(self, client: mqtt.Client) -> None:
        wanted = set(self._subscriptions)
        for topic in self._subscribed - wanted:
            client.unsubscribe(topic)
        for topic in wanted - self._subscribed:
            client.subscribe(topic, qos=1)
        self._subscribed = wanted

    def _run_actions(self, client: mqtt.Client) -> None:
        """Send the queued live publishes and batched (un)subscriptions, in order."""
        while True:
            with self._actions_lock:
                if not self._actions:
                    return
                kind, names, payload, qos, retain = self._actions.popleft()
            if kind == _PUBLISH:
                client.publish(names[0], payload, qos=qos, retain=retain)
            elif kind == _SUBSCRIBE:
                client.subscribe([(name, 1) for name in names])
            else:
                client.unsubscribe(list(names))

    def _publish_birth(self, client: mqtt.Client) -> None:
        client.publish(
            topics.device_topic(self.config.device_id, topics.BIRTH),
            self._birth(),
            qos=1,
            retain=True,
        )

    def _drain(self, client: mqtt.Client) -> None:
        room = MAX_INFLIGHT - len(self._inflight)
        if room <= 0:
            return
        records = self.outbox.peek(room, after=self._last_sent_seq)
        for record in records:
            info = client.publish(
                record.topic, record.payload, qos=record.qos, retain=record.retain
            )
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                break
            self._inflight[info.mid] = record.seq
            self._last_sent_seq = record.seq
            self.counters["published"] += 1
        if len(records) == room:
            self._wake.set()  # more are waiting

    def _goodbye(self, client: mqtt.Client) -> None:
        if not self.connected.is_set():
            return
        goodbye = self._status(False, "shutdown")
        info = client.publish(self.status_topic, goodbye, qos=1, retain=True)
        deadline = time.monotonic() + 3.0
        while not info.is_published() and time.monotonic() < deadline:
            if client.loop(timeout=0.05) != mqtt.MQTT_ERR_SUCCESS:
                break
        # let outstanding report PUBACKs arrive, so they are not resent after restart
        while self._inflight and time.monotonic() < deadline:
            if client.loop(timeout=0.05) != mqtt.MQTT_ERR_SUCCESS:
                break
        client.disconnect()
        client.loop(timeout=0.1)
        self.connected.clear()

    # -- paho callbacks (network thread) -------------------------------------------------------

    def _handle_connect(self, client: mqtt.Client, userdata: Any, flags: Any,
                        reason_code: Any, properties: Any) -> None:
        if reason_code.is_failure:
            self.counters["connect_failures"] += 1
            self.last_error = f"broker refused the connection: {reason_code}"
            log.error("%s (check the device certificate, username and broker ACL)",
                      self.last_error)
            client.disconnect()
            return
        self.counters["connects"] += 1
        self.last_error = ""
        # subscribe first: the broker handles one connection's packets in order, so once the
        # fleet sees this connection's online status, a command sent to the device reaches it
        client.subscribe(self.command_topic, qos=1)
        self._subscribed = set()
        self._sync_subscriptions(client)
        with self._actions_lock:
            # a new session: every batched topic is subscribed below, so the (un)subscriptions
            # queued while offline are moot (sent again, each would repeat retained messages)
            self._actions = collections.deque(a for a in self._actions if a[0] == _PUBLISH)
            batched = list(self._batched)
        if batched:
            client.subscribe([(name, 1) for name in batched])
        client.publish(self.status_topic, self._status(True, "connected"), qos=1, retain=True)
        self._publish_birth(client)
        self.connected.set()
        self._wake.set()
        log.info("connected to %s:%s", self.config.broker.host, self.config.broker.port)

    def _handle_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any,
                           reason_code: Any, properties: Any) -> None:
        if self.connected.is_set():
            self.counters["disconnects"] += 1
        self.connected.clear()

    def _handle_publish(self, client: mqtt.Client, userdata: Any, mid: int,
                        reason_code: Any, properties: Any) -> None:
        seq = self._inflight.pop(mid, None)
        if seq is not None:
            self.outbox.ack(seq)
            self.counters["acked"] += 1

    def _handle_message(self, client: mqtt.Client, userdata: Any, message: Any) -> None:
        topic = message.topic
        try:
            if topic == self.command_topic:
                self.counters["commands_received"] += 1
                self._on_command(bytes(message.payload))
            else:
                handler = self._batched.get(topic) or self._subscriptions.get(topic)
                if handler is None:
                    with self._actions_lock:  # another thread changes _batched
                        batched = list(self._batched.items())
                    handler = next((h for sub, h in [*batched, *self._subscriptions.items()]
                                    if mqtt.topic_matches_sub(sub, topic)), None)
                if handler is not None:
                    handler(bytes(message.payload))
        except Exception:  # a bad message must never kill the network thread
            log.exception("handler for %s failed", topic)
