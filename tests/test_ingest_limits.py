"""Limits on what the fleet side accepts from devices (fleet/ingest_limits.py;
docs/operator-guide.md "Limits on device input"; docs/protocol.md "Reports are bound to their
sender").

- the pure limits: the token bucket on an injected clock, the size cap per kind (measured against
  the agent's real messages), telemetry over the rate held newest-first, the refusal tally, the
  birth bounds, limits read from FLEETLITE_INGEST_LIMITS; a healthy agent (a reconnect replaying
  a full spool, a long download) is never refused;
- numbers too large for the store are refused when the message is parsed, as ``bad_value``
  naming the field;
- the store (SQLite and PostgreSQL): refusal counts added in batches; profiles and OTA statuses
  kept per device are bounded, keeping what a rollout reads;
- end to end through a real Mosquitto and a running controller: a flood from one device is
  dropped and counted (without a store write per refused message), the reports other devices
  send after it are all stored, the store stays within the limits, and messages with numbers
  too large for the store are counted malformed while ingest goes on.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from fleetlite.fleet.controller import Controller
from fleetlite.fleet.gates import GateSpec
from fleetlite.fleet.ingest_limits import (
    ADMIT,
    DEFAULT_MAX_BYTES,
    ENV_VAR,
    HOLD,
    MALFORMED,
    OVERSIZE,
    RATE_LIMITED,
    IngestGate,
    IngestLimits,
    IngestLimitsError,
    RefusalCount,
    RefusalTally,
    TokenBucket,
    check_birth,
)
from fleetlite.fleet.rollout import RolloutSpec, RolloutState, Selector, parse_waves
from fleetlite.fleet.sender_check import DEVICE_MISMATCH, Refusal
from fleetlite.fleet.store import Store, open_store
from fleetlite.sdk import topics
from fleetlite.sdk.messages import (
    BAD_TYPE,
    BAD_VALUE,
    MAX_INT,
    MAX_REPORT_BYTES,
    Birth,
    MessageError,
    OtaStatus,
    Status,
    Telemetry,
)
from fleetlite.sdk.profile import ProfileRecord
from tests.mqtt_harness import Mosquitto
from tests.test_fleet_e2e import wait_until
from tests.test_store import RELEASE, add_release, birth, ota, profile, status, telemetry

HOSTILE = "gw-hostile"


# -- the token bucket and the gate -------------------------------------------------------------


def test_a_token_bucket_allows_its_burst_then_its_rate() -> None:
    bucket = TokenBucket(rate=2.0, burst=5, now=100.0)
    assert [bucket.take(100.0) for _ in range(6)] == [True] * 5 + [False]
    assert not bucket.take(100.4)  # 0.8 tokens
    assert bucket.take(100.5)  # 1.0
    assert not bucket.take(100.5)
    # idle for long: back to the burst, never beyond it
    assert bucket.full(1000.0)
    assert sum(bucket.take(1000.0) for _ in range(10)) == 5
    # a clock going backwards gives nothing
    assert not bucket.take(999.0)


def test_each_kind_has_its_size_cap_checked_before_parsing() -> None:
    gate = IngestGate(IngestLimits())
    for kind, cap in DEFAULT_MAX_BYTES.items():
        assert gate.check(f"gw-{kind}", kind, cap, 0.0) in (ADMIT, HOLD)
        refusal = gate.check(f"gw-{kind}", kind, cap + 1, 0.0)
        assert isinstance(refusal, Refusal) and refusal.reason == OVERSIZE, kind
        assert str(cap) in refusal.message
    assert all(cap <= MAX_REPORT_BYTES for cap in DEFAULT_MAX_BYTES.values())
    # an oversize message takes no token: the device's next good message is admitted
    gate = IngestGate(IngestLimits(burst=1))
    for _ in range(100):
        gate.check("gw-1", topics.PROFILE, 10**6, 0.0)
    assert gate.check("gw-1", topics.PROFILE, 100, 0.0) == ADMIT


def test_the_rate_is_per_sending_device() -> None:
    gate = IngestGate(IngestLimits(rate=1.0, burst=3))
    verdicts = [gate.check("gw-a", topics.OTA_STATUS, 100, 10.0) for _ in range(5)]
    assert verdicts[:3] == [ADMIT] * 3
    assert all(isinstance(v, Refusal) and v.reason == RATE_LIMITED for v in verdicts[3:])
    assert gate.check("gw-b", topics.OTA_STATUS, 100, 10.0) == ADMIT  # another device
    assert gate.check("gw-a", topics.OTA_STATUS, 100, 11.0) == ADMIT  # a second later


def test_telemetry_has_its_own_bucket_and_over_it_the_newest_is_held() -> None:
    gate = IngestGate(IngestLimits(rate=1.0, burst=1, telemetry_rate=1.0, telemetry_burst=2))
    assert [gate.check("gw-1", topics.TELEMETRY, 10, 0.0) for _ in range(3)] == [
        ADMIT, ADMIT, HOLD]
    assert gate.check("gw-1", topics.PROFILE, 10, 0.0) == ADMIT  # telemetry took none of these
    assert gate.hold("gw-1", b"seq 3") is None
    superseded = gate.hold("gw-1", b"seq 4")
    assert superseded is not None and superseded.reason == RATE_LIMITED
    assert gate.release_held(0.5) == []  # no token yet
    assert gate.release_held(1.0) == [("gw-1", b"seq 4")]
    assert gate.held == 0
    gate.hold("gw-1", b"seq 5")
    assert gate.release_held(1.0, everything=True) == [("gw-1", b"seq 5")]


def test_held_telemetry_is_bounded_in_bytes() -> None:
    gate = IngestGate(IngestLimits(max_held_bytes=10))
    assert gate.hold("gw-1", b"123456") is None
    refusal = gate.hold("gw-2", b"123456")
    assert refusal is not None and refusal.reason == RATE_LIMITED
    # the device that holds keeps its older report rather than nothing
    refusal = gate.hold("gw-1", b"12345678901")
    assert refusal is not None
    assert gate.release_held(0.0, everything=True) == [("gw-1", b"123456")]


def test_tracked_devices_are_bounded_and_idle_ones_are_forgotten_first() -> None:
    gate = IngestGate(IngestLimits(max_devices=10, rate=1.0, burst=2))
    for i in range(10):
        gate.check(f"gw-{i}", topics.STATUS, 10, 0.0)
    gate.check("gw-0", topics.STATUS, 10, 0.0)  # gw-0 is busy: its bucket is empty
    # a second later the others have refilled (idle); a new device makes room among them
    assert gate.check("gw-10", topics.STATUS, 10, 1.0) == ADMIT
    assert gate.tracked <= 10
    # gw-0 kept its bucket: one token refilled, no fresh burst
    assert gate.check("gw-0", topics.STATUS, 10, 1.0) == ADMIT
    refusal = gate.check("gw-0", topics.STATUS, 10, 1.0)
    assert isinstance(refusal, Refusal) and refusal.reason == RATE_LIMITED
    # made-up ids, all busy: the oldest are forgotten, the bound holds
    for i in range(11, 1000):
        gate.check(f"gw-{i}", topics.STATUS, 10, 1.0)
    assert gate.tracked <= 10


def test_a_healthy_agent_is_never_refused() -> None:
    """A reconnect replays a full spool (docs/spool.md: 20000 records, the hard cap) as fast as
    the broker acknowledges (~2000/s); an install reports progress every 2 s; telemetry every
    second (60 times the default)."""
    limits = IngestLimits()
    gate = IngestGate(limits)
    clock = 0.0
    refused: list[Refusal] = []

    def send(kind: str, size: int = 2500) -> str:
        verdict = gate.check("gw-1", kind, size, clock)
        if isinstance(verdict, Refusal):
            refused.append(verdict)
            return "refused"
        return verdict

    # reconnect: status, birth, then the spool in order: telemetry with an install's statuses,
    # its profile and a few command responses in between
    send(topics.STATUS)
    send(topics.BIRTH, 60_000)
    held = 0
    for i in range(20_000):
        clock += 1 / 2000
        if i % 1000 == 500:
            for _ in range(6):
                send(topics.OTA_STATUS, 1400)
            send(topics.PROFILE, 2000)
            send(topics.COMMAND_RESPONSE, 5000)
        elif send(topics.TELEMETRY) == HOLD:
            superseded = gate.hold("gw-1", b"telemetry %d" % i)
            assert superseded is None or superseded.reason == RATE_LIMITED
            held += 1
    assert refused == []  # nothing but superseded telemetry (which the store would overwrite)
    clock += 1.0
    assert gate.release_held(clock) == [("gw-1", b"telemetry 19999")]  # the newest is kept
    assert held > 0
    # then an hour of normal life: telemetry each second, a download's progress every 2 s
    for second in range(3600):
        clock += 1.0
        assert send(topics.TELEMETRY) == ADMIT
        if second % 2 == 0:
            assert send(topics.OTA_STATUS, 1400) == ADMIT
    assert refused == []


# -- the refusal tally -------------------------------------------------------------------------


def test_refusals_are_tallied_per_sender_kind_and_reason() -> None:
    tally = RefusalTally()
    mismatch = Refusal(DEVICE_MISMATCH, "names gw-b")
    for i in range(1000):
        tally.add("gw-a", topics.TELEMETRY, Refusal(DEVICE_MISMATCH, f"names gw-b ({i})"),
                  100.0 + i)
    tally.add("gw-a", topics.PROFILE, mismatch, 50.0)
    tally.add("gw-c", topics.STATUS, Refusal(RATE_LIMITED, "x"), 60.0)
    assert tally.pending("gw-a") and tally.pending() and not tally.pending("gw-z")
    mine = tally.drain("gw-a")
    assert mine == [
        RefusalCount("gw-a", topics.PROFILE, DEVICE_MISMATCH, 1, 50.0, 50.0, "names gw-b"),
        RefusalCount("gw-a", topics.TELEMETRY, DEVICE_MISMATCH, 1000, 100.0, 1099.0,
                     "names gw-b (999)"),
    ]
    assert not tally.pending("gw-a") and tally.pending("gw-c")
    assert [c.device_id for c in tally.drain()] == ["gw-c"]
    assert not tally.pending()


def test_the_tally_is_bounded_and_a_failed_flush_is_put_back() -> None:
    tally = RefusalTally(max_keys=3)
    for i in range(10):
        tally.add(f"gw-{i}", topics.STATUS, Refusal(RATE_LIMITED, "x"), float(i))
    assert tally.unrecorded == 7
    batch = tally.drain()
    assert len(batch) == 3
    tally.add("gw-0", topics.STATUS, Refusal(RATE_LIMITED, "y"), 20.0)
    tally.restore(batch)
    merged = {c.device_id: c for c in tally.drain()}
    assert (merged["gw-0"].count, merged["gw-0"].first_at, merged["gw-0"].last_at) == (2, 0.0,
                                                                                        20.0)
    assert len(merged) == 3


def test_a_birth_is_bounded_in_tags_and_models() -> None:
    limits = IngestLimits(max_birth_tags=3, max_birth_models=2)
    assert check_birth(birth("gw-1", 1, 1.0), limits) is None
    many_tags = check_birth(birth("gw-1", 1, 1.0, tags={f"k{i}": "v" for i in range(4)}), limits)
    assert many_tags is not None and many_tags.reason == OVERSIZE and "4 tags" in many_tags.message
    many_models = check_birth(birth("gw-1", 1, 1.0, models=[{"name": f"m{i}"} for i in range(3)]),
                              limits)
    assert many_models is not None and many_models.reason == OVERSIZE


def test_limits_are_read_from_the_environment_and_checked() -> None:
    limits = IngestLimits.from_env({ENV_VAR: "rate=20, burst=200,max_bytes.telemetry=131072"})
    assert (limits.rate, limits.burst, limits.max_bytes_of(topics.TELEMETRY)) == (20.0, 200,
                                                                                   131072)
    assert limits.max_bytes_of(topics.PROFILE) == DEFAULT_MAX_BYTES[topics.PROFILE]
    assert IngestLimits.from_env({}) == IngestLimits()
    for text, words in [("rate", "key=value"), ("speed=3", "unknown ingest limit 'speed'"),
                        ("burst=lots", "must be a number"), ("burst=0", "integer >= 1"),
                        ("rate=-1", "> 0"), ("max_bytes.telemetry=300000", "262144"),
                        ("max_bytes.cmd=10", "no such message kind")]:
        with pytest.raises(IngestLimitsError) as info:
            IngestLimits.from_env({ENV_VAR: text})
        assert words in str(info.value), (text, str(info.value))


# -- the caps fit the real messages with room to spare ------------------------------------------


def test_the_caps_leave_room_above_the_agents_real_messages(models_dir: Path) -> None:
    from fleetlite.agent import device_facts
    from fleetlite.agent.model_service import ModelService
    from fleetlite.agent.profiler import profile_model
    from fleetlite.agent.telemetry import system_snapshot

    service = ModelService()
    for name in ("intent_classifier", "heavy_mlp", "sensor_autoencoder",
                 "sensor_autoencoder_int8", "two_in_two_out"):
        active = service.activate(name, models_dir / f"{name}.tflite", version=3,
                                  sha256="ab" * 32)
        for _ in range(50):
            service.infer(name, [np.zeros(s.shape, s.numpy_dtype) for s in active.model.inputs])
    now = time.time()
    device = "gw-" + "x" * 61
    real = {
        topics.STATUS: Status(device_id=device, online=False, session=2**40, ts=now,
                              reason="shutdown", conn=2**40).to_json(),
        topics.BIRTH: Birth(device_id=device, session=7, ts=now, device_class="c" * 64,
                            agent_version="0.1.0", tags={f"tag{i}": "v" * 20 for i in range(20)},
                            facts=device_facts.collect("c"), models=service.describe()).to_json(),
        topics.TELEMETRY: Telemetry(device_id=device, session=7, seq=10**9, ts=now,
                                    system=system_snapshot(models_dir), models=service.stats(),
                                    spool={"records": 10000}).to_json(),
        topics.PROFILE: profile_model(models_dir / "intent_classifier.tflite", device_id=device,
                                      trigger="install", warmup_runs=1, min_runs=5,
                                      min_seconds=0.1, max_seconds=0.5).to_json(),
        topics.OTA_STATUS: OtaStatus(device_id=device, ts=now, release_id="f" * 64,
                                     model="m" * 64, version=12, phase="done", final=True,
                                     outcome="failed", reason="smoke_failed", message="x" * 1000,
                                     progress={"received_bytes": 2**40, "total_bytes": 2**40,
                                               "chunks": 10**6}).to_json(),
    }
    for kind, payload in real.items():
        # at least 8x room: a birth would still fit with a dozen language models, whose tensor
        # lists take ~20 KB each
        assert len(payload) * 8 <= DEFAULT_MAX_BYTES[kind], (kind, len(payload))


# -- numbers too large for the store are bad values at parse time ------------------------------


def _with(message: bytes, path: Sequence[str], value: Any) -> bytes:
    doc = json.loads(message)
    target = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return json.dumps(doc).encode()


@pytest.mark.parametrize(("cls", "message", "path", "value"), [
    (Status, status("gw-1", True, 1, 1.0).to_json(), ["session"], 2**63),
    (Status, status("gw-1", True, 1, 1.0).to_json(), ["conn"], 2**64),
    (Birth, birth("gw-1", 1, 1.0).to_json(), ["session"], 10**30),
    (Telemetry, telemetry("gw-1", 1, 1, 1.0).to_json(), ["seq"], 2**63),
    (OtaStatus, ota("gw-1", RELEASE, 1.0, "done").to_json(), ["version"], 2**63),
    (ProfileRecord, profile().to_json(), ["model", "version"], 2**63),
    (ProfileRecord, profile().to_json(), ["run", "threads"], 2**31),  # an INTEGER column
    (ProfileRecord, profile().to_json(), ["run", "seed"], -(2**63) - 1),
    (Telemetry, telemetry("gw-1", 1, 1, 1.0).to_json(), ["ts"], 1e300),
    (Status, status("gw-1", True, 1, 1.0).to_json(), ["ts"], -1.0),
    (ProfileRecord, profile().to_json(), ["ts"], 253_402_300_800),  # year 10000
])
def test_numbers_too_large_for_the_store_are_bad_values(cls: Any, message: bytes,
                                                        path: list[str], value: Any) -> None:
    with pytest.raises(MessageError) as info:
        cls.from_json(_with(message, path, value))
    assert info.value.code == BAD_VALUE, info.value
    assert repr(path[-1]) in str(info.value)
    assert len(str(info.value)) < 300


def test_the_largest_storable_numbers_are_accepted_and_huge_ones_named_by_size() -> None:
    assert Status.from_json(_with(status("gw-1", True, 1, 1.0).to_json(), ["session"],
                                  MAX_INT)).session == MAX_INT
    with pytest.raises(MessageError) as info:
        Telemetry.from_json(_with(telemetry("gw-1", 1, 1, 1.0).to_json(), ["seq"], 10**4000))
    assert info.value.code == BAD_VALUE and "13288 bits" in str(info.value)
    # an integer ts too large for a float is refused too (a type or a value error)
    with pytest.raises(MessageError) as info:
        Telemetry.from_json(_with(telemetry("gw-1", 1, 1, 1.0).to_json(), ["ts"], 10**400))
    assert info.value.code in (BAD_TYPE, BAD_VALUE)


# -- the store ---------------------------------------------------------------------------------


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    with open_store(store_url) as opened:
        yield opened


def test_refusal_counts_are_added_in_batches(store: Store) -> None:
    store.record_refusals([
        RefusalCount("gw-a", topics.TELEMETRY, RATE_LIMITED, 500, 10.0, 20.0, "first"),
        RefusalCount("gw-a", topics.STATUS, OVERSIZE, 3, 11.0, 12.0, "big"),
    ])
    store.record_refusals([
        RefusalCount("gw-a", topics.TELEMETRY, RATE_LIMITED, 250, 21.0, 30.0, "second"),
        RefusalCount("gw-b", topics.PROFILE, MALFORMED, 1, 5.0, 5.0, "x" * 2000),
    ])
    store.record_refusals([])
    rows = {(r.device_id, r.kind, r.reason): r for r in store.refusals()}
    flood = rows[("gw-a", topics.TELEMETRY, RATE_LIMITED)]
    assert (flood.count, flood.first_at, flood.last_at, flood.last_message) == (750, 10.0, 30.0,
                                                                                "second")
    assert rows[("gw-a", topics.STATUS, OVERSIZE)].count == 3
    assert len(rows[("gw-b", topics.PROFILE, MALFORMED)].last_message) == 500
    # a batch flushed late (an older last refusal) keeps the newer last message
    store.record_refusals([RefusalCount("gw-a", topics.TELEMETRY, RATE_LIMITED, 1, 1.0, 2.0,
                                        "late")])
    flood = store.refusals("gw-a")[-1]
    assert (flood.count, flood.first_at, flood.last_at, flood.last_message) == (751, 1.0, 30.0,
                                                                                "second")


def _rollout(store: Store, rollout_id: str, version: int, previous: int,
             devices: Sequence[str] = ()) -> None:
    spec = RolloutSpec(rollout_id=rollout_id, release_id=RELEASE, model="kws", version=version,
                       previous_version=previous, selector=Selector(),
                       waves=parse_waves("100%"), wave_timeout_s=600, gates=GateSpec(),
                       chunk_size=4096)
    store.create_rollout(rollout_id, RELEASE, spec.to_dict(),
                         state=RolloutState(state="completed").to_dict())
    for device in devices:
        store.set_device_progress(rollout_id, device, wave=0, status="sent")


def test_profiles_kept_per_device_are_bounded_and_keep_the_gates_baseline(store: Store) -> None:
    add_release(store)
    _rollout(store, "ro-1", version=4, previous=3)
    store.add_profile(profile("gw-1", ts=100.0, version=2, sha256="2" * 64), keep_per_device=20)
    store.add_profile(profile("gw-1", ts=200.0, version=3, sha256="3" * 64), keep_per_device=20)
    for i in range(5):
        store.add_profile(profile("gw-2", ts=float(i), version=4), keep_per_device=20)
    counts = []
    for i in range(300):
        store.add_profile(profile("gw-1", ts=1000.0 + i, version=4), keep_per_device=20)
        counts.append(len(store.profiles(device_id="gw-1")))
    assert max(counts) <= 20 + 2 + 1  # the bound, its slack, the protected baseline
    kept = store.profiles(device_id="gw-1")
    assert [p.version for p in kept][:1] == [3]  # the previous version's newest: the baseline
    assert [p.ts for p in kept if p.version == 4][-1] == 1299.0  # the newest
    assert not [p for p in kept if p.version == 2]
    assert len(store.profiles(device_id="gw-2")) == 5  # another device is untouched
    # without a bound nothing is pruned (operators' imports)
    for i in range(30):
        store.add_profile(profile("gw-3", ts=float(i)))
    assert len(store.profiles(device_id="gw-3")) == 30


def test_ota_statuses_kept_per_release_are_bounded_and_keep_the_final_one(store: Store) -> None:
    add_release(store)
    statuses = [ota("gw-1", RELEASE, 1.0, "accepted")]
    statuses += [ota("gw-1", RELEASE, 2.0 + i, "downloading", progress={"chunk": i})
                 for i in range(100)]
    statuses.append(ota("gw-1", RELEASE, 500.0, "done", final=True, outcome="installed"))
    # a device that keeps talking about a finished install (or a hostile one)
    statuses += [ota("gw-1", RELEASE, 600.0 + i, "downloading", progress={"again": i})
                 for i in range(100)]
    for i, item in enumerate(statuses):
        store.add_ota_status(item, received_at=1000.0 + i, keep_per_release=10)
        store.add_ota_status(ota("gw-2", RELEASE, float(i), "downloading"), keep_per_release=10)
    kept = store.ota_records(device_id="gw-1", release_id=RELEASE)
    assert len(kept) <= 10 + 1 + 1
    assert [r.status.outcome for r in kept if r.status.final] == ["installed"]
    assert store.latest_ota_records(RELEASE)["gw-1"].status.progress == {"again": 99}
    assert len(store.ota_records(device_id="gw-2")) <= 12


def test_a_birth_model_version_beyond_the_store_is_unknown(store: Store) -> None:
    models = [{"name": "kws", "version": 2**70, "sha256": "a" * 64},
              {"name": "vad", "version": MAX_INT, "sha256": "b" * 64}]
    assert store.upsert_birth(birth("gw-1", 1, 1.0, models=models))
    device = store.get_device("gw-1")
    assert device is not None
    assert {m.name: m.version for m in device.models} == {"kws": None, "vad": MAX_INT}


# -- end to end --------------------------------------------------------------------------------


def publish_all(broker: Mosquitto, client_id: str, messages: Sequence[tuple[str, bytes]]) -> None:
    """Publish at QoS 1 as fast as the broker takes them (100 in flight); return when all are
    acknowledged."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=True)
    client.max_inflight_messages_set(100)
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        infos = [client.publish(topic, payload, qos=1) for topic, payload in messages]
        for info in infos:
            info.wait_for_publish(120)
            assert info.is_published()
    finally:
        client.disconnect()
        client.loop_stop()


def topic(device: str, kind: str) -> str:
    return topics.device_topic(device, kind)


class CountingStore:
    """Counts the controller's refusal writes (each is one transaction)."""

    def __init__(self, store: Store) -> None:
        self.calls = 0
        self.lock = threading.Lock()
        write = store.record_refusals

        def counting(batch: Any) -> None:
            with self.lock:
                self.calls += 1
            write(batch)

        store.record_refusals = counting  # type: ignore[method-assign]


def refused_in_store(store: Store, device: str) -> dict[str, int]:
    totals: dict[str, int] = {}
    for r in store.refusals(device):
        totals[r.reason] = totals.get(r.reason, 0) + r.count
    return totals


def test_a_flood_from_one_device_is_dropped_counted_and_the_others_are_stored(
        broker: Mosquitto, store_url: str) -> None:
    limits = IngestLimits(rate=5, burst=60, telemetry_rate=2, telemetry_burst=5,
                          profiles_per_device=10, ota_statuses_per_release=10)
    store = open_store(store_url)
    controller_store = open_store(store_url)
    writes = CountingStore(controller_store)
    add_release(store)
    _rollout(store, "ro-1", version=4, previous=3, devices=[HOSTILE])
    controller = Controller(controller_store, broker.host, broker.port, tick_s=0.2,
                            limits=limits).start()
    honest = [f"gw-{i}" for i in range(5)]
    try:
        assert controller.connected.wait(20)
        now = time.time()
        flood: list[tuple[str, bytes]] = []
        flood += [(topic(HOSTILE, topics.TELEMETRY), b"x" * 100_000)] * 20  # over 64 KiB
        flood += [(topic(HOSTILE, topics.PROFILE), b"{" * 300_000)] * 5  # over the protocol cap
        flood += [(topic(HOSTILE, topics.OTA_STATUS),
                   ota(HOSTILE, RELEASE, now + i, "downloading", progress={"i": i}).to_json())
                  for i in range(30)]
        flood += [(topic(HOSTILE, topics.PROFILE),
                   profile(HOSTILE, ts=now + i, version=4).to_json()) for i in range(300)]
        flood += [(topic(HOSTILE, topics.TELEMETRY),
                   telemetry(HOSTILE, 1, seq, now).to_json()) for seq in range(1, 1001)]
        flood += [(topic(HOSTILE, topics.STATUS),
                   status(honest[i % 5], False, 99, now).to_json()) for i in range(200)]
        publish_all(broker, HOSTILE, flood)

        # the honest devices report just after the flood
        after: list[tuple[str, bytes]] = []
        for device in honest:
            after += [(topic(device, topics.STATUS), status(device, True, 1, now).to_json()),
                      (topic(device, topics.BIRTH), birth(device, 1, now).to_json()),
                      (topic(device, topics.PROFILE), profile(device, ts=now).to_json())]
            after += [(topic(device, topics.TELEMETRY), telemetry(device, 1, s, now).to_json())
                      for s in (1, 2, 3)]
        publish_all(broker, "honest-devices", after)

        def all_honest_stored() -> bool:
            devices = {d.device_id: d for d in store.list_devices()}
            return all(
                d in devices and devices[d].online and devices[d].telemetry is not None
                and devices[d].telemetry.seq == 3 and len(store.profiles(device_id=d)) == 1
                for d in honest)

        wait_until(all_honest_stored, 120, "every report of the honest devices")
        # the newest telemetry over the rate is stored once the hostile device has a token
        wait_until(lambda: telemetry_seq(store, HOSTILE) == 1000, 60,
                   "the hostile device's newest telemetry")

        def counted() -> dict[str, int]:
            c = controller.counters
            found = {OVERSIZE: c["oversize"], RATE_LIMITED: c["rate_limited"],
                     DEVICE_MISMATCH: c["refused"]}
            return {reason: n for reason, n in found.items() if n}

        wait_until(lambda: refused_in_store(store, HOSTILE) == counted(), 60,
                   "the refusal counts to be flushed to the store")
        in_store = refused_in_store(store, HOSTILE)
        assert in_store[OVERSIZE] == 25
        assert in_store[RATE_LIMITED] >= 500  # most of the flood, whatever the machine's speed
        # refused messages were counted in memory: a store write per batch, not per message
        assert writes.calls * 3 < sum(in_store.values()), (writes.calls, in_store)
        for device in honest:
            assert store.refusals(device) == []
            assert (store.get_device(device) or _none()).online

        # the store stays within the limits
        assert len(store.profiles(device_id=HOSTILE)) <= 10 + 1
        records = store.ota_records(device_id=HOSTILE, release_id=RELEASE)
        assert 0 < len(records) <= 10 + 1 + 1
        assert len(store.refusals(HOSTILE)) <= 6
        assert len(store.list_devices()) == 6
    finally:
        controller.stop()
        controller_store.close()
        store.close()


def _none() -> Any:
    raise AssertionError("the device is not in the store")


def telemetry_seq(store: Store, device_id: str) -> int:
    """The seq of the device's stored telemetry (0: none yet)."""
    device = store.get_device(device_id)
    return device.telemetry.seq if device is not None and device.telemetry is not None else 0


def test_numbers_too_large_for_the_store_are_counted_malformed_and_ingest_goes_on(
        broker: Mosquitto, store_url: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="fleetlite.fleet.controller")
    store = open_store(store_url)
    controller_store = open_store(store_url)
    controller = Controller(controller_store, broker.host, broker.port, tick_s=0.2).start()
    device = "gw-1"
    try:
        assert controller.connected.wait(20)
        bad = [
            (topics.STATUS, _with(status(device, True, 1, 1.0).to_json(), ["session"], 2**63)),
            (topics.BIRTH, _with(birth(device, 1, 1.0).to_json(), ["session"], 10**40)),
            (topics.TELEMETRY, _with(telemetry(device, 1, 1, 1.0).to_json(), ["seq"], 2**64)),
            (topics.TELEMETRY, _with(telemetry(device, 1, 2, 1.0).to_json(), ["ts"], 1e300)),
            (topics.PROFILE, _with(profile(device).to_json(), ["run", "threads"], 2**40)),
            (topics.OTA_STATUS, _with(ota(device, RELEASE, 1.0, "done").to_json(), ["version"],
                                      2**63)),
        ] * 5
        good = [(topics.STATUS, status(device, True, 1, time.time()).to_json()),
                (topics.TELEMETRY, telemetry(device, 1, 3, time.time()).to_json())]
        publish_all(broker, device, [(topic(device, k), p) for k, p in [*bad, *good]])
        wait_until(lambda: telemetry_seq(store, device) == 3, 60,
                   "the device's good telemetry after the bad messages")
        # telemetry may be stored by the tick before the network thread has counted the last
        # bad messages: wait for the counts, do not sample them
        wait_until(lambda: controller.counters["malformed"] >= len(bad)
                   and controller.counters["ingested"] >= len(good), 60,
                   "every message counted")
        assert controller.counters["malformed"] == len(bad)
        assert controller.counters["ingested"] == len(good)
        # its refusals are stored (in the next tick's batch)
        wait_until(lambda: refused_in_store(store, device) == {MALFORMED: len(bad)}, 60,
                   "the refusals stored")
        rows = {r.kind: r.last_message for r in store.refusals(device)}
        assert "bad_value" in rows[topics.STATUS] and "'session'" in rows[topics.STATUS]
        assert "'threads'" in rows[topics.PROFILE]
        # no tracebacks, and the log says it once per kind, not once per message
        controller_records = [r for r in caplog.records
                              if r.name == "fleetlite.fleet.controller"]
        assert not [r for r in controller_records if r.levelno >= logging.ERROR]
        assert len([r for r in controller_records if "malformed" in r.getMessage()]) <= 6
        device_record = store.get_device(device)
        assert device_record is not None and device_record.session == 1
    finally:
        controller.stop()
        controller_store.close()
        store.close()
