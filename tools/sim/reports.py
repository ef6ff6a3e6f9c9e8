"""What a simulated device reports, built with the ``sdk/`` schema classes: status (and its
Last Will), birth, telemetry and the performance profile. Pure: the caller passes the clock and
the device's random stream, so a seeded run reports the same figures."""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field

from fleetlite.sdk.messages import Birth, Status, Telemetry
from fleetlite.sdk.profile import (
    MemoryStats,
    ModelInfo,
    ProfileRecord,
    RunParameters,
    Timings,
    summarize_latencies,
)
from fleetlite.sdk.version import __version__

#: an agent version the simulator reports, so the fleet can tell simulated devices apart
SIM_AGENT_VERSION = f"{__version__}"
_LATENCY_SAMPLES = 50


@dataclass
class DeviceState:
    """What a simulated device remembers across connections: its session, connection and
    telemetry counters and the model it serves."""

    device_id: str
    device_class: str
    model: str
    version: int
    session: int = 1
    conn: int = 0
    seq: int = 0
    rejected: set[int] = field(default_factory=set)

    def model_sha256(self) -> str:
        """A stable stand-in for the served model's sha256 (no model file is simulated)."""
        return hashlib.sha256(f"{self.model}:{self.version}".encode()).hexdigest()


def online_status(state: DeviceState, now: float) -> Status:
    return Status(device_id=state.device_id, online=True, session=state.session, ts=now,
                  reason="connected", conn=state.conn)


def will_status(state: DeviceState, now: float) -> Status:
    """The Last Will: offline, ``lost``, with the time of the connect (docs/protocol.md)."""
    return Status(device_id=state.device_id, online=False, session=state.session, ts=now,
                  reason="lost", conn=state.conn)


def shutdown_status(state: DeviceState, now: float) -> Status:
    return Status(device_id=state.device_id, online=False, session=state.session, ts=now,
                  reason="shutdown", conn=state.conn)


def birth(state: DeviceState, now: float, tags: dict[str, str]) -> Birth:
    facts = {"arch": "simulated", "simulated": True, "cores": 4,
             "agent_version": SIM_AGENT_VERSION}
    models = [{"name": state.model, "version": state.version, "sha256": state.model_sha256(),
               "path": f"/sim/{state.model}-v{state.version}.tflite",
               "inputs": [], "outputs": []}]
    return Birth(device_id=state.device_id, session=state.session, ts=now,
                 device_class=state.device_class, agent_version=SIM_AGENT_VERSION,
                 tags=dict(tags), facts=facts, models=models)


def telemetry(state: DeviceState, now: float, rng: random.Random) -> Telemetry:
    """The next telemetry report of this session (``seq`` counts from 1 per session)."""
    state.seq += 1
    system = {"cpu_percent": round(rng.uniform(2.0, 60.0), 1),
              "load_1m": round(rng.uniform(0.0, 2.0), 2),
              "mem_available_mb": round(rng.uniform(200.0, 2000.0), 1),
              "agent_rss_mb": round(rng.uniform(40.0, 70.0), 1),
              "disk_free_mb": round(rng.uniform(500.0, 8000.0), 1), "temperature_c": None}
    count = rng.randint(0, 200)
    models = {state.model: {"count": count, "errors": 0, "version": state.version}}
    return Telemetry(device_id=state.device_id, session=state.session, seq=state.seq, ts=now,
                     system=system, models=models, spool={"records": 0})


def profile(state: DeviceState, now: float, p95_ms: float, rng: random.Random,
            trigger: str = "model_change") -> ProfileRecord:
    """A profile of the served model whose p95 latency is about ``p95_ms`` (within 5 %)."""
    scale = p95_ms * rng.uniform(0.97, 1.03)
    samples = sorted(scale * rng.uniform(0.7, 0.95) for _ in range(_LATENCY_SAMPLES - 3))
    samples += [scale, scale * 1.01, scale * 1.05]
    steady = summarize_latencies(samples)
    model = ModelInfo(name=state.model, sha256=state.model_sha256(), size_bytes=60_000,
                      quantization="float32", inputs=[], outputs=[], version=state.version)
    run = RunParameters(threads=1, backend="simulated", backend_version=SIM_AGENT_VERSION,
                        delegate="none", resolver="simulated", timing="invoke",
                        inputs="synthetic", warmup_runs=1, warmup_min_seconds=0.0,
                        min_runs=_LATENCY_SAMPLES, max_runs=_LATENCY_SAMPLES, min_seconds=0.0,
                        max_seconds=1.0, isolated=False)
    timings = Timings(init_ms=scale * 3, first_inference_ms=scale * 1.5, warmup_count=1,
                      warmup_mean_ms=scale * 1.5, steady=steady,
                      steady_seconds=sum(samples) / 1000)
    memory = MemoryStats(rss_before_load_mb=50.0, peak_rss_load_mb=55.0, rss_after_load_mb=54.0,
                         peak_rss_inference_mb=56.0, method="simulated",
                         load_sample_interval_ms=1.0, inference_sample_interval_ms=1.0)
    return ProfileRecord(device_id=state.device_id, ts=now, trigger=trigger, model=model,
                         run=run, timings=timings, memory=memory,
                         device={"device_class": state.device_class, "simulated": True})
