"""The store-and-forward spool: order, restarts, the drop policy, damage and disk-full handling."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetlite.agent.errors import AgentError, SpoolError, SpoolFullError
from fleetlite.agent.spool import (
    PRIORITIES,
    AppendPlan,
    Priority,
    RecordInfo,
    Spool,
    SpoolLimits,
    SpoolRecord,
    decode_record,
    encode_record,
    eviction_order,
    plan_append,
)

TOPIC = "fleetlite/v1/dev/gw-1/telemetry"


@pytest.fixture
def spool_dir(tmp_path: Path) -> Path:
    return tmp_path / "spool"


@pytest.fixture
def spool(spool_dir: Path) -> Iterator[Spool]:
    with Spool(spool_dir) as s:
        yield s


def rec_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob("*.rec"))


def temp_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".tmp" in p.name)


def append(spool: Spool, priority: str, tag: str = "", size: int = 0) -> int:
    seq = spool.append(f"t/{priority}/{tag}", tag.encode() + b"x" * size, priority=priority)
    assert seq is not None
    return seq


# -- basics and restarts ------------------------------------------------------------------------


def test_records_round_trip_in_order(spool: Spool, spool_dir: Path) -> None:
    a = spool.append(TOPIC, b'{"n":1}')
    b = spool.append("t/ota", b"\x00\xffbinary", qos=2, retain=True, priority="critical")
    c = spool.append("t/ev", b"", qos=0, priority="important")
    assert a is not None and b is not None and c is not None
    assert a < b < c
    records = spool.pending()
    assert [r.seq for r in records] == [a, b, c]
    assert (records[1].topic, records[1].payload, records[1].qos, records[1].retain) == (
        "t/ota",
        b"\x00\xffbinary",
        2,
        True,
    )
    assert [r.priority for r in records] == ["telemetry", "critical", "important"]
    assert records[2].payload == b""
    assert len(spool) == 3 and b in spool
    assert rec_files(spool_dir) == [f"{s:012d}.rec" for s in (a, b, c)]


def test_order_survives_restart(spool_dir: Path) -> None:
    with Spool(spool_dir) as first:
        seqs = [append(first, PRIORITIES[i % 3], str(i)) for i in range(20)]
        first.ack(seqs[3])
    with Spool(spool_dir) as second:
        records = second.pending()
        assert [r.seq for r in records] == seqs[:3] + seqs[4:]
        assert [r.payload for r in records] == [str(i).encode() for i in range(20) if i != 3]
        assert second.stats()["bytes"] == sum(
            (spool_dir / f"{s:012d}.rec").stat().st_size for s in seqs if s != seqs[3]
        )
        later = append(second, "telemetry", "later")
        assert later > seqs[-1]
        assert second.pending()[-1].seq == later


def test_seqs_never_repeat_even_when_emptied(spool_dir: Path) -> None:
    with Spool(spool_dir) as first:
        seqs = [append(first, "telemetry") for _ in range(3)]
        first.ack_many(seqs)
        assert len(first) == 0
    with Spool(spool_dir) as second:
        assert append(second, "telemetry") > seqs[-1]


def test_ack_deletes_the_file_and_counts(spool: Spool, spool_dir: Path) -> None:
    seqs = [append(spool, "telemetry"), append(spool, "important"), append(spool, "critical")]
    spool.ack(seqs[1])
    assert seqs[1] not in spool
    assert rec_files(spool_dir) == [f"{seqs[0]:012d}.rec", f"{seqs[2]:012d}.rec"]
    spool.ack(seqs[1])  # a duplicate PUBACK is harmless
    spool.ack(12345)
    assert spool.ack_many([seqs[0], seqs[2], 999]) == 2
    assert len(spool) == 0 and rec_files(spool_dir) == []
    stats = spool.stats()
    assert stats["delivered"] == {"telemetry": 1, "important": 1, "critical": 1}
    assert stats["appended"] == {"telemetry": 1, "important": 1, "critical": 1}
    assert stats["records"] == 0 and stats["bytes"] == 0


def test_peek_pages_through_pending(spool: Spool) -> None:
    seqs = [append(spool, "telemetry", str(i)) for i in range(10)]
    assert [r.seq for r in spool.peek(3)] == seqs[:3]
    assert [r.seq for r in spool.peek(3, after=seqs[2])] == seqs[3:6]
    assert [r.seq for r in spool.peek(after=seqs[7])] == seqs[8:]
    assert spool.peek(5, after=seqs[-1]) == []


def test_stats_are_json_ready(spool: Spool) -> None:
    append(spool, "important")
    stats = spool.stats()
    assert json.loads(json.dumps(stats)) == stats
    assert set(stats) == {
        "records", "bytes", "pending", "appended", "delivered", "dropped", "refused",
        "corrupt", "write_errors", "over_soft_bound",
    }  # fmt: skip
    assert stats["pending"] == {"telemetry": 0, "important": 1, "critical": 0}


def test_bad_arguments_are_rejected(spool: Spool) -> None:
    with pytest.raises(ValueError, match="priority"):
        spool.append(TOPIC, b"x", priority="urgent")
    with pytest.raises(ValueError, match="qos"):
        spool.append(TOPIC, b"x", qos=3)
    with pytest.raises(ValueError, match="topic"):
        spool.append("", b"x")
    with pytest.raises(ValueError, match="hard caps"):
        Spool(spool.directory / "other", max_records=10, hard_max_records=5)
    assert len(spool) == 0


def test_one_process_per_directory(spool_dir: Path) -> None:
    first = Spool(spool_dir)
    with pytest.raises(SpoolError, match="in use by another process"):
        Spool(spool_dir)
    first.close()
    with pytest.raises(SpoolError, match="closed"):
        first.append(TOPIC, b"x")
    Spool(spool_dir).close()


# -- the drop policy, through the spool ---------------------------------------------------------


def test_full_spool_drops_oldest_telemetry_first(spool_dir: Path) -> None:
    with Spool(spool_dir, max_records=5) as spool:
        t0 = append(spool, "telemetry", "t0")
        i1 = append(spool, "important", "i1")
        t2 = append(spool, "telemetry", "t2")
        c3 = append(spool, "critical", "c3")
        t4 = append(spool, "telemetry", "t4")
        t5 = append(spool, "telemetry", "t5")  # drops t0
        assert [r.seq for r in spool.pending()] == [i1, t2, c3, t4, t5]
        i6 = append(spool, "important", "i6")  # drops t2, not the older i1
        assert [r.seq for r in spool.pending()] == [i1, c3, t4, t5, i6]
        stats = spool.stats()
        assert stats["dropped"] == {"telemetry": 2, "important": 0, "critical": 0}
        assert stats["records"] == 5 and not stats["over_soft_bound"]
        assert f"{t0:012d}.rec" not in rec_files(spool_dir)
        assert f"{t2:012d}.rec" not in rec_files(spool_dir)


def test_important_goes_only_when_no_telemetry_is_left(spool_dir: Path) -> None:
    with Spool(spool_dir, max_records=3) as spool:
        i0 = append(spool, "important", "i0")
        c1 = append(spool, "critical", "c1")
        i2 = append(spool, "important", "i2")
        # new telemetry may not push out an event: refused and counted
        assert spool.append(TOPIC, b"t", priority="telemetry") is None
        i3 = append(spool, "important", "i3")  # drops the oldest important
        c4 = append(spool, "critical", "c4")  # drops the next important
        assert [r.seq for r in spool.pending()] == [c1, i3, c4]
        stats = spool.stats()
        assert stats["refused"] == {"telemetry": 1, "important": 0, "critical": 0}
        assert stats["dropped"] == {"telemetry": 0, "important": 2, "critical": 0}
        assert i0 not in spool and i2 not in spool


def test_byte_bound_drops_as_many_as_needed(spool_dir: Path) -> None:
    with Spool(spool_dir, max_bytes=2000) as spool:
        small = [append(spool, "telemetry", str(i), size=200) for i in range(6)]
        assert spool.stats()["bytes"] <= 2000
        big = append(spool, "important", "big", size=1000)
        stats = spool.stats()
        assert stats["bytes"] <= 2000
        kept = [r.seq for r in spool.pending()]
        assert kept[-1] == big
        # the dropped ones are the oldest telemetry, and only as many as needed
        dropped = [s for s in small if s not in kept]
        assert dropped == small[: len(dropped)]
        assert stats["dropped"]["telemetry"] == len(dropped)
        assert stats["bytes"] + 300 > 2000


def test_critical_only_spool_refuses_others_and_stops_at_hard_cap(spool_dir: Path) -> None:
    with Spool(spool_dir, max_records=3, hard_max_records=5) as spool:
        crit = [append(spool, "critical", str(i)) for i in range(3)]
        assert spool.append(TOPIC, b"t", priority="telemetry") is None
        assert spool.append(TOPIC, b"e", priority="important") is None
        crit += [append(spool, "critical", "3"), append(spool, "critical", "4")]
        assert spool.stats()["over_soft_bound"]
        with pytest.raises(SpoolFullError, match="hard cap") as info:
            spool.append(TOPIC, b"c", priority="critical")
        assert isinstance(info.value, SpoolError) and isinstance(info.value, AgentError)
        assert [r.seq for r in spool.pending()] == crit
        stats = spool.stats()
        assert stats["refused"] == {"telemetry": 1, "important": 1, "critical": 1}
        assert stats["dropped"] == {"telemetry": 0, "important": 0, "critical": 0}
        # draining brings it back under the soft bound; then others are accepted again
        spool.ack_many(crit[:3])
        assert append(spool, "telemetry") > crit[-1]


def test_critical_clears_all_others_before_passing_the_soft_bound(spool_dir: Path) -> None:
    with Spool(spool_dir, max_records=3, hard_max_records=10) as spool:
        c0 = append(spool, "critical")
        append(spool, "important")
        append(spool, "telemetry")
        c1 = append(spool, "critical")  # drops the telemetry record
        c2 = append(spool, "critical")  # drops the important record
        c3 = append(spool, "critical")  # only critical left: past the soft bound
        assert [r.seq for r in spool.pending()] == [c0, c1, c2, c3]
        assert spool.stats()["dropped"] == {"telemetry": 1, "important": 1, "critical": 0}


# -- damage, leftovers, disk full, crashes ------------------------------------------------------


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-3])


def _flip_payload_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _garbage(path: Path) -> None:
    path.write_bytes(os.urandom(64))


def _wrong_name(path: Path) -> None:
    path.rename(path.with_name("000000000777.rec"))


@pytest.mark.parametrize("damage", [_truncate, _flip_payload_byte, _empty, _garbage, _wrong_name])
def test_damaged_record_is_quarantined_on_open(spool_dir: Path, damage: Any) -> None:
    with Spool(spool_dir) as spool:
        seqs = [append(spool, "important", str(i), size=10) for i in range(3)]
    damage(spool_dir / f"{seqs[1]:012d}.rec")
    with Spool(spool_dir) as spool:
        assert [r.seq for r in spool.pending()] == [seqs[0], seqs[2]]
        assert spool.stats()["corrupt"] == 1
        assert len(list((spool_dir / "corrupt").iterdir())) == 1
        assert append(spool, "telemetry") > seqs[-1]


def test_damage_found_while_reading_is_quarantined(spool: Spool, spool_dir: Path) -> None:
    seqs = [append(spool, "telemetry", str(i)) for i in range(3)]
    _truncate(spool_dir / f"{seqs[0]:012d}.rec")
    (spool_dir / f"{seqs[1]:012d}.rec").unlink()  # vanished behind the spool's back
    assert [r.seq for r in spool.peek(10)] == [seqs[2]]
    assert len(spool) == 1
    assert spool.stats()["corrupt"] == 1
    assert (spool_dir / "corrupt" / f"{seqs[0]:012d}.rec").exists()


def test_leftover_temp_files_are_removed_on_open(spool_dir: Path) -> None:
    with Spool(spool_dir) as spool:
        seq = append(spool, "telemetry")
    (spool_dir / f".{seq + 1:012d}.rec.tmp").write_bytes(b"FLSPOOL1 half a rec")
    (spool_dir / ".seq.tmp").write_bytes(b"")
    (spool_dir / "README").write_text("not ours; left alone")
    with Spool(spool_dir) as spool:
        assert [r.seq for r in spool.pending()] == [seq]
        assert spool.stats()["corrupt"] == 0
    assert temp_files(spool_dir) == []
    assert (spool_dir / "README").exists()


@pytest.mark.parametrize("call", ["write", "fsync"])
def test_disk_full_keeps_what_is_spooled(
    spool_dir: Path, monkeypatch: pytest.MonkeyPatch, call: str
) -> None:
    def no_space(*args: object) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with Spool(spool_dir, max_records=3) as spool:
        seqs = [append(spool, "telemetry", str(i)) for i in range(3)]
        with monkeypatch.context() as m:
            m.setattr(os, call, no_space)
            # the spool is full, so this append would also drop the oldest record
            with pytest.raises(SpoolError, match="disk full") as info:
                spool.append(TOPIC, b"new", priority="important")
        assert "Free space" in str(info.value)
        assert [r.seq for r in spool.pending()] == seqs
        assert temp_files(spool_dir) == []
        stats = spool.stats()
        assert stats["write_errors"] == 1 and stats["dropped"]["telemetry"] == 0
        later = append(spool, "important", "after")  # works again once there is space
    with Spool(spool_dir) as spool:
        assert [r.seq for r in spool.pending()] == [*seqs[1:], later]


_CHILD = """
import sys
from pathlib import Path
from fleetlite.agent.spool import PRIORITIES, Spool

spool = Spool(Path(sys.argv[1]), max_records=1_000_000, max_bytes=1 << 30)
i = int(sys.argv[2])
while True:
    seq = spool.append(f"t/{i}", b"p%d-" % i * (1 + i % 50), priority=PRIORITIES[i % 3])
    print(i, seq, flush=True)
    i += 1
"""


def _append_until_killed(spool_dir: Path, start: int, count: int) -> list[tuple[int, int]]:
    """Run a child that appends forever; SIGKILL it after ``count`` appends have returned."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(spool_dir), str(start)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    watchdog = threading.Timer(60, proc.kill)
    watchdog.start()
    try:
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if len(lines) >= count:
                break
        proc.send_signal(signal.SIGKILL)
        rest, err = proc.communicate()
    finally:
        watchdog.cancel()
    assert proc.returncode == -signal.SIGKILL, err
    lines += rest.splitlines(keepends=True)
    assert len(lines) >= count, err
    return [(int(a), int(b)) for a, b in (ln.split() for ln in lines if ln.endswith("\n"))]


@pytest.mark.slow
def test_sigkill_mid_stream_loses_no_appended_record(spool_dir: Path) -> None:
    confirmed: list[tuple[int, int]] = []
    for _round in range(3):
        start = confirmed[-1][0] + 1 if confirmed else 0
        confirmed += _append_until_killed(spool_dir, start, 60)
        with Spool(spool_dir) as spool:
            by_seq = {r.seq: r for r in spool.pending()}
            order = list(by_seq)
            assert order == sorted(order)
            for i, seq in confirmed:
                assert seq in by_seq, f"append {i} (seq {seq}) returned but was lost"
                assert by_seq[seq].payload == b"p%d-" % i * (1 + i % 50)
            positions = [order.index(seq) for _, seq in confirmed]
            assert positions == sorted(positions)
            assert spool.stats()["corrupt"] == 0
        assert temp_files(spool_dir) == []


def test_concurrent_appends_and_acks(spool_dir: Path) -> None:
    spool = Spool(spool_dir)
    appended: list[int] = []
    acked: list[int] = []
    lock = threading.Lock()

    def producer(n: int) -> None:
        for i in range(40):
            seq = append(spool, PRIORITIES[(n + i) % 3], f"{n}-{i}")
            with lock:
                appended.append(seq)

    def acker() -> None:  # like paho's network thread acking PUBACKs
        while len(acked) < 60:
            for record in spool.peek(min(5, 60 - len(acked))):
                spool.ack(record.seq)
                acked.append(record.seq)

    threads = [threading.Thread(target=producer, args=(n,)) for n in range(4)]
    ack_thread = threading.Thread(target=acker)
    for t in [*threads, ack_thread]:
        t.start()
    for t in [*threads, ack_thread]:
        t.join()
    left = sorted(set(appended) - set(acked))
    assert len(set(appended)) == 160 and len(set(acked)) == 60
    assert [r.seq for r in spool.pending()] == left
    assert sum(spool.stats()["delivered"].values()) == 60
    spool.close()
    with Spool(spool_dir) as again:
        assert [r.seq for r in again.pending()] == left


# -- the record format -----------------------------------------------------------------------


@given(
    topic=st.text(min_size=1, max_size=50),
    payload=st.binary(max_size=300),
    qos=st.integers(0, 2),
    retain=st.booleans(),
    priority=st.sampled_from(PRIORITIES),
    seq=st.integers(0, 10**12 - 1),
)
def test_record_encoding_round_trips(
    topic: str, payload: bytes, qos: int, retain: bool, priority: Priority, seq: int
) -> None:
    record = SpoolRecord(seq, topic, payload, qos, retain, priority, 1700000000.25)
    data = encode_record(record)
    assert decode_record(data) == record
    for cut in (0, 5, len(data) // 2, len(data) - 1):
        with pytest.raises(Exception, match=r"."):
            decode_record(data[:cut])


# -- the drop policy as a pure function -----------------------------------------------------------


def _fits_soft(count: int, nbytes: int, limits: SpoolLimits) -> bool:
    return count <= limits.max_records and nbytes <= limits.max_bytes


def _fits_hard(count: int, nbytes: int, limits: SpoolLimits) -> bool:
    return count <= limits.hard_max_records and nbytes <= limits.hard_max_bytes


def test_plan_examples() -> None:
    limits = SpoolLimits(max_records=3, max_bytes=100, hard_max_records=4, hard_max_bytes=200)
    t0, i1, c2 = (
        RecordInfo(0, "telemetry", 10),
        RecordInfo(1, "important", 10),
        RecordInfo(2, "critical", 10),
    )
    assert plan_append([t0, i1], "telemetry", 10, limits) == AppendPlan("accept")
    assert plan_append([t0, i1, c2], "telemetry", 10, limits) == AppendPlan("accept", (t0,))
    assert plan_append([i1, c2, c2], "telemetry", 10, limits) == AppendPlan("refuse")
    assert plan_append([t0, i1, c2], "critical", 95, limits) == AppendPlan(
        "accept", (t0, i1), over_soft=True
    )
    assert plan_append([c2] * 4, "critical", 1, limits) == AppendPlan("full")
    assert plan_append([], "critical", 250, limits) == AppendPlan("full")
    assert plan_append([], "important", 150, limits) == AppendPlan("refuse")
    assert eviction_order([t0, i1, c2], "critical") == [t0, i1]
    assert eviction_order([t0, i1, c2], "telemetry") == [t0]


@st.composite
def policy_cases(draw: st.DrawFn) -> tuple[list[RecordInfo], Priority, int, SpoolLimits]:
    n = draw(st.integers(0, 25))
    seqs = sorted(draw(st.sets(st.integers(0, 10_000), min_size=n, max_size=n)))
    held = [
        RecordInfo(seq, draw(st.sampled_from(PRIORITIES)), draw(st.integers(1, 100)))
        for seq in seqs
    ]
    max_records = draw(st.integers(1, 20))
    max_bytes = draw(st.integers(1, 1500))
    limits = SpoolLimits(
        max_records,
        max_bytes,
        max_records + draw(st.integers(0, 10)),
        max_bytes + draw(st.integers(0, 1000)),
    )
    return held, draw(st.sampled_from(PRIORITIES)), draw(st.integers(1, 300)), limits


RANK = {p: i for i, p in enumerate(PRIORITIES)}


@settings(max_examples=400)
@given(policy_cases())
def test_plan_properties(case: tuple[list[RecordInfo], Priority, int, SpoolLimits]) -> None:
    held, priority, size, limits = case
    plan = plan_append(held, priority, size, limits)
    evicted = list(plan.evict)
    kept = [r for r in held if r not in evicted]
    count, nbytes = len(kept) + 1, sum(r.size for r in kept) + size
    eligible = [r for r in held if r.priority != "critical" and RANK[r.priority] <= RANK[priority]]
    after_all = [r for r in held if r not in eligible]
    all_count, all_bytes = len(after_all) + 1, sum(r.size for r in after_all) + size

    # never critical, never a higher class than the new record, no duplicates
    assert all(r in eligible for r in evicted) and len(set(evicted)) == len(evicted)
    # telemetry before important, oldest first within each class
    assert [RANK[r.priority] for r in evicted] == sorted(RANK[r.priority] for r in evicted)
    if any(r.priority == "important" for r in evicted):
        assert not any(r.priority == "telemetry" for r in kept)
    for cls in ("telemetry", "important"):
        of_class = [r for r in held if r.priority == cls]
        gone = [r for r in evicted if r.priority == cls]
        assert gone == of_class[: len(gone)]

    if plan.outcome == "accept" and not plan.over_soft:
        assert _fits_soft(count, nbytes, limits)
        if evicted:  # no more than needed
            fewer = [r for r in held if r not in evicted[:-1]]
            assert not _fits_soft(len(fewer) + 1, sum(r.size for r in fewer) + size, limits)
    elif plan.outcome == "accept":
        assert priority == "critical" and sorted(evicted, key=lambda r: r.seq) == eligible
        assert not _fits_soft(all_count, all_bytes, limits)
        assert _fits_hard(count, nbytes, limits)
    elif plan.outcome == "refuse":
        assert priority != "critical" and evicted == []
        assert not _fits_soft(all_count, all_bytes, limits)
    else:
        assert priority == "critical" and evicted == []
        assert not _fits_hard(all_count, all_bytes, limits)
