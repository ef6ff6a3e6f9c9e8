"""Batched ingest: device reports stored several to a transaction, acknowledged once stored.

Storing each report in its own transaction on paho's network thread costs one commit per
report (issue 13: the controller took 0.7x the telemetry a bare subscriber receives). The
controller instead hands every admitted report to an :class:`IngestQueue`, whose one worker
thread takes whatever has arrived meanwhile (up to ``max_batch``) and stores it in one
transaction, in arrival order (so per device order is kept).

What is not lost today must not be lost now: the QoS 1 PUBACK used to leave after the report was
committed (paho sends it when ``on_message`` returns). The controller's client therefore runs with
paho's manual acknowledgements, and :class:`AckOrder` sends each PUBACK once the report is
settled (stored, refused, or kept in the store-unavailable backlog), in the order the messages
arrived (MQTT 3.1.1, 4.6: PUBACKs in the order of the PUBLISH packets). A controller killed
before a batch commits has acknowledged none of it: the broker delivers it again to a persistent
session. Acknowledgements still owed at a disconnect are forgotten (:meth:`AckOrder.reset`): on
the new connection their packet ids may name other messages; the broker re-sends the unacked
ones to a persistent session.

Both classes are plain threads and queues, with no MQTT or store code: the controller
(:mod:`fleetlite.fleet.controller`) supplies the store and the acknowledgement.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, Optional, TypeVar

__all__ = ["AckOrder", "IngestQueue", "Ticket"]

log = logging.getLogger("fleetlite.fleet.ingest_batch")

T = TypeVar("T")


@dataclass(eq=False)
class Ticket:
    """One received message whose acknowledgement waits for its report to be settled."""

    mid: int
    qos: int
    generation: int
    done: bool = field(default=False)


class AckOrder:
    """Acknowledge QoS 1/2 messages in the order they arrived, each once it is settled.

    ``ack(mid, qos)`` sends the acknowledgement (paho's ``Client.ack``); it is called with this
    object's lock held, so acknowledgements leave in order whichever thread settles them.
    """

    def __init__(self, ack: Callable[[int, int], object]) -> None:
        self._ack = ack
        self._lock = threading.Lock()
        self._pending: deque[Ticket] = deque()
        self._generation = 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._pending)

    def received(self, mid: int, qos: int) -> Ticket:
        """Note a message as it arrives (the network thread, in arrival order)."""
        with self._lock:
            ticket = Ticket(mid, qos, self._generation)
            if qos > 0:
                self._pending.append(ticket)
            else:  # QoS 0: nothing to acknowledge
                ticket.done = True
            return ticket

    def settle(self, ticket: Ticket) -> None:
        """The message's report is stored, refused or kept: acknowledge it and every settled
        message after it, up to the first one still unsettled."""
        with self._lock:
            ticket.done = True
            if ticket.generation != self._generation:
                return  # received before a disconnect: its packet id means nothing now
            while self._pending and self._pending[0].done:
                head = self._pending.popleft()
                try:
                    self._ack(head.mid, head.qos)
                except Exception:  # the connection is gone: the broker sends it again
                    log.debug("could not acknowledge message %d", head.mid, exc_info=True)

    def reset(self) -> None:
        """The connection was lost: forget the acknowledgements still owed (the broker
        re-sends those messages to a persistent session)."""
        with self._lock:
            self._generation += 1
            self._pending.clear()


class IngestQueue(Generic[T]):
    """A bounded FIFO of received reports and the one worker thread that stores them in batches.

    ``store(batch)`` is called on the worker thread with up to ``max_batch`` items, oldest first:
    whatever arrived while the previous batch was being stored, and for up to ``linger_s`` after
    the first of them (a group commit: stored one by one as they came, reports arriving at
    broker speed made batches of about 16 and as many transactions; at most ``linger_s`` more
    before a report is stored and acknowledged).
    :meth:`put` blocks while ``max_items`` wait (the network thread then stops reading, as it did
    while it stored each report itself).
    """

    def __init__(self, store: Callable[[Sequence[T]], None], *, max_batch: int = 500,
                 max_items: int = 10_000, linger_s: float = 0.005,
                 name: str = "fleetlite-ingest") -> None:
        if max_batch < 1 or max_items < 1:
            raise ValueError("max_batch and max_items must be >= 1")
        if not linger_s >= 0:
            raise ValueError(f"linger_s must be >= 0, got {linger_s}")
        self.linger_s = linger_s
        self._store = store
        self.max_batch = max_batch
        self.max_items = max_items
        self._items: deque[T] = deque()
        self._cond = threading.Condition()
        self._busy = False
        self._closed = False
        self._thread: Optional[threading.Thread] = None
        self._name = name
        self.batches = 0  # batches stored since start
        self.largest = 0  # the largest batch so far

    def __len__(self) -> int:
        """Reports waiting or being stored."""
        with self._cond:
            return len(self._items) + (1 if self._busy else 0)

    def start(self) -> IngestQueue[T]:
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()
        return self

    def put(self, item: T) -> None:
        """Queue one report (blocks while the queue is full). After :meth:`close` the item is
        stored at once on the caller's thread."""
        with self._cond:
            while len(self._items) >= self.max_items and not self._closed:
                self._cond.wait(0.5)
            if not self._closed:
                self._items.append(item)
                # wake the worker when it waits for a first item or for a full batch; not for
                # every item (each wake-up is a thread switch on the network thread's time)
                if len(self._items) == 1 or len(self._items) >= self.max_batch:
                    self._cond.notify_all()
                return
        self._store([item])

    def flush(self, timeout: float) -> bool:
        """Wait until every queued report is stored; False if ``timeout`` passed first."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._items and not self._busy, timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Store what is queued and stop the worker."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        leftover = self._take()
        while leftover:  # the worker did not start or did not finish in time
            self._store(leftover)
            leftover = self._take()

    def _take(self) -> list[T]:
        with self._cond:
            count = min(len(self._items), self.max_batch)
            batch = [self._items.popleft() for _ in range(count)]
            self._cond.notify_all()
            return batch

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._items or self._closed)
                if not self._items:
                    return  # closed and empty
                if self.linger_s and len(self._items) < self.max_batch:
                    self._cond.wait_for(lambda: len(self._items) >= self.max_batch
                                        or self._closed, self.linger_s)
                count = min(len(self._items), self.max_batch)
                batch = [self._items.popleft() for _ in range(count)]
                self._busy = True
                self._cond.notify_all()
            try:
                self._store(batch)
            except Exception:  # never kill the worker; the store callback logs its own errors
                log.exception("could not store a batch of %d reports", len(batch))
            finally:
                with self._cond:
                    self._busy = False
                    self.batches += 1
                    self.largest = max(self.largest, len(batch))
                    self._cond.notify_all()
