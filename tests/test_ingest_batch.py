"""fleet/ingest_batch.py: acknowledgements in arrival order once settled, and a queue whose
worker stores what arrived meanwhile in one batch, in order. No broker, no store."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from fleetlite.fleet.controller import Controller
from fleetlite.fleet.ingest_batch import AckOrder, IngestQueue
from fleetlite.fleet.store import open_store
from fleetlite.sdk import topics
from fleetlite.sdk.messages import Telemetry
from tests.mqtt_harness import Mosquitto


def test_acks_leave_in_arrival_order_once_each_message_is_settled() -> None:
    sent: list[tuple[int, int]] = []
    acks = AckOrder(lambda mid, qos: sent.append((mid, qos)))
    first, second, third = (acks.received(mid, 1) for mid in (1, 2, 3))
    acks.settle(second)  # refused at once, but stored reports before it are not yet
    assert sent == []
    acks.settle(first)
    assert sent == [(1, 1), (2, 1)]
    acks.settle(third)
    assert sent == [(1, 1), (2, 1), (3, 1)]
    assert len(acks) == 0


def test_qos0_messages_need_no_ack_and_hold_nothing_up() -> None:
    sent: list[int] = []
    acks = AckOrder(lambda mid, qos: sent.append(mid))
    zero = acks.received(0, 0)
    one = acks.received(7, 1)
    acks.settle(one)
    acks.settle(zero)
    assert sent == [7]


def test_a_disconnect_forgets_the_acks_owed_on_the_old_connection() -> None:
    sent: list[int] = []
    acks = AckOrder(lambda mid, qos: sent.append(mid))
    old = acks.received(1, 1)
    acks.reset()  # the broker re-sends message 1 to a persistent session
    new = acks.received(1, 1)  # a packet id of the new connection: another message
    acks.settle(old)
    assert sent == []  # the old message's ack would acknowledge the new one, unstored
    acks.settle(new)
    assert sent == [1]


def test_an_ack_that_fails_does_not_stop_the_others() -> None:
    sent: list[int] = []

    def ack(mid: int, qos: int) -> None:
        if mid == 1:
            raise RuntimeError("not connected")
        sent.append(mid)

    acks = AckOrder(ack)
    tickets = [acks.received(mid, 1) for mid in (1, 2)]
    for ticket in tickets:
        acks.settle(ticket)
    assert sent == [2]


def test_the_worker_stores_what_arrived_meanwhile_in_one_batch_in_order() -> None:
    batches: list[list[int]] = []
    gate = threading.Event()

    def store(batch: Sequence[int]) -> None:
        gate.wait(5)  # the first batch is slow: the rest arrive meanwhile
        batches.append(list(batch))

    queue: IngestQueue[int] = IngestQueue(store, max_batch=4).start()
    queue.put(0)
    for n in range(1, 10):
        queue.put(n)
    gate.set()
    assert queue.flush(5)
    assert [n for batch in batches for n in batch] == list(range(10))
    assert all(len(batch) <= 4 for batch in batches)
    assert len(batches) < 10  # batched, not one by one
    assert len(queue) == 0
    queue.close()


def test_reports_arriving_one_by_one_are_stored_together_after_a_linger() -> None:
    """A group commit: the worker woken by a first report waits up to linger_s (or for a full
    batch) before storing, so reports that come one at a time share a transaction."""
    batches: list[list[int]] = []
    queue: IngestQueue[int] = IngestQueue(batches.append, max_batch=3, linger_s=60).start()
    for n in range(3):
        queue.put(n)
        time.sleep(0.01)  # one at a time, as a network thread hands them over
    assert queue.flush(30)  # the third filled the batch: no 60 s wait
    queue.put(3)  # alone: waits for its linger, or for close
    queue.close()
    assert batches == [[0, 1, 2], [3]]
    with pytest.raises(ValueError, match="linger_s"):
        IngestQueue(batches.append, linger_s=-1)


def test_a_full_queue_makes_the_producer_wait() -> None:
    stored: list[int] = []
    gate = threading.Event()

    def store(batch: Sequence[int]) -> None:
        gate.wait(5)
        stored.extend(batch)

    queue: IngestQueue[int] = IngestQueue(store, max_batch=1, max_items=2).start()
    done = threading.Event()

    def produce() -> None:
        for n in range(6):
            queue.put(n)
        done.set()

    threading.Thread(target=produce, daemon=True).start()
    assert not done.wait(0.3)  # blocked: one being stored, two waiting
    gate.set()
    assert done.wait(5)
    assert queue.flush(5)
    assert stored == list(range(6))
    queue.close()


def test_close_stores_what_is_queued_and_later_puts_are_stored_at_once() -> None:
    stored: list[int] = []
    queue: IngestQueue[int] = IngestQueue(stored.extend)
    queue.put(1)  # not started: waits in the queue
    queue.close()
    assert stored == [1]
    queue.put(2)
    assert stored == [1, 2]


def test_a_failing_store_does_not_kill_the_worker() -> None:
    stored: list[int] = []

    def store(batch: Sequence[int]) -> None:
        if 0 in batch:
            raise RuntimeError("bug")
        stored.extend(batch)

    queue: IngestQueue[int] = IngestQueue(store).start()
    queue.put(0)
    assert queue.flush(5)
    queue.put(1)
    assert queue.flush(5)
    assert stored == [1]
    queue.close()


# -- with a real broker and controller: a report is acknowledged only once it is stored --------


def test_a_report_not_yet_stored_is_delivered_again_after_a_lost_connection(
        tmp_path: Path) -> None:
    broker = Mosquitto(tmp_path / "broker").start()
    try:
        with open_store(f"sqlite:///{tmp_path / 'fleet.db'}") as store:
            entered, release = threading.Event(), threading.Event()
            calls: list[int] = []
            record = store.record_telemetry

            def slow(telemetry: Telemetry, **kwargs: Any) -> bool:
                calls.append(telemetry.seq)
                entered.set()
                release.wait(10)  # the batch has not committed yet
                return record(telemetry, **kwargs)

            store.record_telemetry = slow  # type: ignore[method-assign]
            controller = Controller(store, "127.0.0.1", broker.port, controller_id="ctl-acks",
                                    tick_s=0.2)
            controller.start()
            try:
                assert controller.connected.wait(10)
                device = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="gw-1")
                device.connect("127.0.0.1", broker.port)
                device.loop_start()
                report = Telemetry(device_id="gw-1", session=1, seq=1, ts=time.time(),
                                   system={}, models={}, spool={})
                device.publish(topics.device_topic("gw-1", topics.TELEMETRY), report.to_json(),
                               qos=1).wait_for_publish(10)
                device.disconnect()
                device.loop_stop()
                assert entered.wait(10)
                sock = controller.client.socket()
                assert sock is not None
                sock.shutdown(socket.SHUT_RDWR)  # the connection is lost before the commit
                time.sleep(0.5)
                release.set()  # the first copy is stored now; its ack would go nowhere
                deadline = time.monotonic() + 20
                while len(calls) < 2 and time.monotonic() < deadline:
                    time.sleep(0.05)
                # the broker had no acknowledgement: it delivered the report again
                assert calls == [1, 1]
                device_row = store.get_device("gw-1")
                assert device_row is not None and device_row.telemetry is not None
                assert device_row.telemetry.seq == 1
            finally:
                release.set()
                controller.stop()
    finally:
        broker.stop()
