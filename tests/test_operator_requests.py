"""Operator requests (pause, resume, abort, rollback) are never refused because a controller is
busy writing the rollout (issue 13: under CPU load ``pause`` failed with "it kept changing under
us"): the request takes the rollout's lock, waits for the step in progress and is queued. Real
store on both backends, a writer thread standing in for a busy controller."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from fleetlite.fleet.client import Fleet
from fleetlite.fleet.rollout import RolloutSpec, RolloutState, Selector, parse_waves
from fleetlite.fleet.store import Store, open_store
from tests.test_fleet_e2e import wait_until
from tests.test_store import add_release

RELEASE = "ab" * 32


@pytest.fixture
def busy(store_url: str) -> Iterator[tuple[Store, threading.Event, list[int]]]:
    """A rollout whose state another connection rewrites as fast as it can."""
    store = open_store(store_url)
    add_release(store, RELEASE)
    spec = RolloutSpec(rollout_id="ro-1", release_id=RELEASE, model="kws", version=4,
                       previous_version=3, selector=Selector(), waves=parse_waves("100%"),
                       wave_timeout_s=600, chunk_size=4096)
    store.create_rollout("ro-1", RELEASE, spec.to_dict())
    writer = open_store(store_url)
    stop = threading.Event()
    writes = [0]

    def keep_writing() -> None:
        while not stop.is_set():
            with writer.rollout_lock("ro-1") as txn:
                txn.touch()  # a controller step: the revision grows
            writes[0] += 1

    thread = threading.Thread(target=keep_writing, daemon=True)
    thread.start()
    try:
        yield store, stop, writes
    finally:
        stop.set()
        thread.join(30)
        writer.close()
        store.close()


def test_requests_are_queued_while_a_controller_rewrites_the_rollout(
        busy: tuple[Store, threading.Event, list[int]], store_url: str) -> None:
    store, _, writes = busy
    wait_until(lambda: writes[0] >= 5, 30, "the busy writer's first steps")
    before = writes[0]
    with Fleet(db=store_url) as fleet:
        for n in range(20):
            action = "pause" if n % 2 == 0 else "resume"
            fleet.request("ro-1", action, note=f"request {n}")
    record = store.get_rollout("ro-1")
    assert record is not None
    queued = RolloutState.from_dict(record.state).operator_requests
    assert [(r.action, r.note) for r in queued] == [
        ("pause" if n % 2 == 0 else "resume", f"request {n}") for n in range(20)]
    # the requests took turns with the writer, which is neither stuck nor broken by them
    wait_until(lambda: writes[0] > before, 30, "the busy writer's next step")
