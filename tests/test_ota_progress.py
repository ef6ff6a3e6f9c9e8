"""Progress statuses of a download: the pacing rule (sdk/ota_progress.py) on its own, and a real
agent downloading through Mosquitto in steps, whose ``downloading`` statuses follow it."""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest

from fleetlite.sdk.bundle import ReleaseBundle
from fleetlite.sdk.messages import OtaStatus
from fleetlite.sdk.ota_progress import ProgressPacer
from tests.agent_harness import AgentProcess
from tests.mqtt_harness import Collector, Mosquitto
from tests.ota_harness import ManualRelease
from tests.test_ota_agent import (
    CHUNK,
    agent_config,
    collector,
    command,
    statuses,
    v2,
    wait_final,
    wait_phase,
)

__all__ = ["collector", "v2"]  # fixtures


def test_nothing_new_means_no_status() -> None:
    pacer = ProgressPacer()
    pacer.start(0.0, 0, 100)
    assert not pacer.due(60.0, 0, 100)


def test_a_step_is_reported_once_min_gap_passed() -> None:
    pacer = ProgressPacer()
    pacer.start(0.0, 0, 100)
    assert not pacer.due(1.0, 50, 100)  # half the bytes, but too soon after the start
    assert pacer.due(2.0, 51, 100)
    assert not pacer.due(4.0, 55, 100)  # same 10 % step, 2 s after the last status
    assert pacer.due(4.5, 60, 100)  # the next step
    assert not pacer.due(9.0, 61, 100)
    assert pacer.due(14.5, 62, 100)  # 10 s after the last: a sign of life


def test_a_slow_download_reports_every_every_s() -> None:
    pacer = ProgressPacer()
    pacer.start(0.0, 0, 10_000)
    sent = [t for t in range(1, 101) if pacer.due(float(t), t, 10_000)]
    assert sent == [10, 20, 30, 40, 50, 60, 70, 80, 90, 100]


def test_resumed_download_counts_steps_from_where_it_was() -> None:
    pacer = ProgressPacer()
    pacer.start(0.0, 45, 100)
    assert not pacer.due(3.0, 49, 100)
    assert pacer.due(3.0, 50, 100)


@pytest.mark.parametrize("seed", range(20))
def test_any_arrival_pattern_obeys_the_rule(seed: int) -> None:
    """Whatever order and timing chunks come in: statuses never closer than min_gap_s, never
    two in one step unless every_s apart, and no stretch over every_s with new chunks and none."""
    rng = random.Random(seed)
    total = rng.randint(1, 5_000)
    pacer = ProgressPacer()
    pacer.start(0.0, 0, total)
    now, received, sent = 0.0, 0, [(0.0, 0)]
    while received < total:
        now += rng.expovariate(rng.choice([0.5, 5.0, 50.0]))
        received = min(total, received + rng.randint(0, 3))
        if pacer.due(now, received, total):
            sent.append((now, received))
        last_at, last_received = sent[-1]
        assert not (received > last_received and now - last_at >= pacer.every_s)
    for (t0, r0), (t1, r1) in zip(sent, sent[1:]):
        assert r1 > r0 and t1 - t0 >= pacer.min_gap_s
        if t1 - t0 < pacer.every_s:
            assert r1 * 10 // total > r0 * 10 // total


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="step"):
        ProgressPacer(step=0)
    with pytest.raises(ValueError, match="min_gap_s"):
        ProgressPacer(every_s=1.0, min_gap_s=2.0)


def test_an_agent_reports_progress_by_steps_not_by_the_clock(
    tmp_path: Path, broker: Mosquitto, collector: Collector, models_dir: Path,
    v2: ReleaseBundle,
) -> None:
    """Chunks come in slices 2 s apart: to just past 10 %, one more chunk (still under 20 %),
    then past 20 %. The agent reports the first and the third slice and not the second (the
    2 s rule before sent one for each), each with more chunks than the one before."""
    rel = ManualRelease(broker.host, broker.port, v2, CHUNK)
    agent = AgentProcess(agent_config(tmp_path, broker, models_dir, chunk_idle_s=30)).start()
    chunks = rel.all_chunks()
    total = len(chunks)
    tenth, fifth = -(-total // 10), -(-total // 5)  # the first counts at 10 % and at 20 %
    assert tenth + 1 < fifth < total - 1, total
    slices = [chunks[:tenth], chunks[tenth:tenth + 1], chunks[tenth + 1:fifth + 1]]

    def with_progress() -> list[OtaStatus]:
        return [s for s in statuses(collector) if s.phase == "downloading" and s.progress]

    try:
        collector.wait_for("/birth")
        rel.publish_manifest()
        assert command(collector, "ota_install", {"release_id": rel.rid,
                                                  "chunk_size": CHUNK})["ok"]
        wait_phase(collector, "downloading")
        for part in slices:
            time.sleep(2.1)  # the rule under test needs 2 s between two statuses
            rel.publish_chunks(part)
        collector.wait_for("/ota/status", count=2, timeout=60, predicate=lambda m: bool(
            OtaStatus.from_json(m.payload).progress))
        early = with_progress()
        rel.publish_chunks(chunks[fifth + 1:])
        final = wait_final(collector)
        assert (final.outcome, final.reason) == ("installed", ""), final.message
    finally:
        agent.stop()
        rel.close()
    received = [s.progress["received_chunks"] for s in early]
    assert received == [tenth, fifth], (received, total)
    later = [s.progress["received_chunks"] for s in with_progress()]
    assert later == sorted(set(later)) and later[:2] == received, later
    gaps = [b.ts - a.ts for a, b in zip(with_progress(), with_progress()[1:])]
    assert all(gap >= 2.0 for gap in gaps), gaps
