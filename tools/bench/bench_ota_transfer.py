"""One device's OTA transfer rate (issue 13) against a bare MQTT publish/subscribe of the same
bytes.

``python -m fleetlite.tools.bench.bench_ota_transfer [--model-kib 256,4096,16384]
[--chunk-size 4096,16384,65536] [--repeat 1] [--json]``

starts, on this machine, a real Mosquitto on a free loopback port and, for each model size and
chunk size:

- **FleetLite**: a signed release of ``heavy_mlp`` (``fleetlite.tools.models``) of about
  ``--model-kib`` KiB (as ``bench_rollout`` builds it), served by the real release publisher
  (:class:`~fleetlite.fleet.ota_publisher.ReleasePublisher` with its defaults, called as the
  controller calls it: ``serve(bundle, chunk_size, initial_pass=True, wait=False)``: every chunk
  published once, retained on its own topic, before the command is sent (the time the broker
  took to acknowledge them all is printed apart); ``--request-only`` serves with
  ``initial_pass=False``, as the controller did before retained chunks: the device's requests
  bring the chunks, window by window), and ONE real agent process (``python -m
  fleetlite.agent.cli run``, a fresh state directory, the release's root of trust, the agent's
  default OTA settings except the health window: ``--health-timeout-s``) sent a real
  ``ota_install`` command. A monitoring client subscribed to the device's topics times, from the
  moment the command is published: the command's response, the first ``downloading`` status
  (manifest fetched and verified), the device's ``done: true`` chunk request (every chunk on
  disk and every file's sha256 checked), the ``verifying`` status (the download phase is over:
  **download complete**, the figure the rate is computed from), and the final status
  (``installed``: smoke test, switch and health window included).
- **bare**: a plain paho client publishing the SAME bytes (the release's chunk frames, as the
  publisher would send them, in the same chunk size) at QoS 1 with the publisher's in-flight
  window (32) to one plain paho subscriber (QoS 1) through the same broker; the time from the
  first publish until the subscriber has every frame. Nothing is written to disk: it is the
  floor that paho and the broker set on this machine.

Per model size and chunk size it prints both times, both rates (release bytes per second) and the
ratio FleetLite / bare of the times (1.0x: as fast as the bare transfer). With ``--repeat`` each
pair runs that many times, alternating (bare, then FleetLite), and the median is printed. Also the
chunks the publisher sent against the release's chunk count (re-sends), the device's chunk
requests, and the device's duplicate count from its last progress report.

No assertion on time: re-run it on your hardware. The run exits 1 if a transfer did not complete
or a byte count does not match.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import paho.mqtt.client as mqtt
import yaml
from paho.mqtt.enums import CallbackAPIVersion

from fleetlite.fleet.ota_publisher import ReleasePublisher
from fleetlite.fleet.release_builder import build_release
from fleetlite.sdk import topics
from fleetlite.sdk.bundle import ReleaseBundle
from fleetlite.sdk.chunks import ChunkLayout
from fleetlite.sdk.keys import SigningKey
from fleetlite.sdk.messages import OtaStatus
from fleetlite.sdk.ota_messages import ChunkRequest
from fleetlite.sdk.trust import new_root, root_envelope
from fleetlite.sdk.version import BUILD_TIME
from fleetlite.tools.bench.bench_ingest import Broker
from fleetlite.tools.bench.bench_rollout import model_bytes
from fleetlite.tools.bench.children import stop_child

ROOT_KEY = SigningKey.from_seed(b"\x41" * 32)
RELEASE_KEY = SigningKey.from_seed(b"\x42" * 32)
DEVICE_CLASS = "industrial-x86-gateway"
#: the release publisher's default in-flight window, used by the bare publisher too
INFLIGHT = 32


@dataclass
class FleetResult:
    """One FleetLite transfer: seconds from the ``ota_install`` command to each milestone."""

    completed: bool = False
    outcome: str = ""
    reason: str = ""
    response_s: float = float("nan")
    downloading_s: float = float("nan")
    done_request_s: float = float("nan")
    download_s: float = float("nan")  # the ``verifying`` status: the download phase is over
    installed_s: float = float("nan")
    release_bytes: int = 0
    total_chunks: int = 0
    chunks_published: int = 0
    requests: int = 0
    duplicates: int = 0
    serve_s: float = float("nan")  # the publisher's initial pass, until the broker acked it all
    model_matches: bool = False  # the model file the device now serves is the model's bytes


@dataclass
class BareResult:
    """One bare publish/subscribe of the same frames."""

    completed: bool = False
    seconds: float = float("nan")
    frames: int = 0
    frame_bytes: int = 0  # payload bytes the subscriber received (headers included)
    data_bytes: int = 0  # the same, without the 19-byte frame headers: the release's bytes


@dataclass
class Row:
    model_kib: int
    model_bytes: int
    chunk_size: int
    release_bytes: int
    fleet: list[FleetResult] = field(default_factory=list)
    bare: list[BareResult] = field(default_factory=list)

    def fleet_s(self) -> float:
        return _median([r.download_s for r in self.fleet])

    def bare_s(self) -> float:
        return _median([r.seconds for r in self.bare])

    def ok(self) -> bool:
        return (bool(self.fleet) and bool(self.bare)
                and all(r.completed and r.release_bytes == self.release_bytes
                        and r.model_matches for r in self.fleet)
                and all(r.completed and r.data_bytes == self.release_bytes for r in self.bare))


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


# -- the release ----------------------------------------------------------------------------------


def build(work: Path, kib: int) -> tuple[bytes, ReleaseBundle]:
    """``heavy_mlp`` of about ``kib`` KiB and its signed release (version 2 of ``bench``)."""
    model = model_bytes(kib)
    path = work / f"heavy_mlp_{kib}k.tflite"
    path.write_bytes(model)
    bundle = build_release([path], name="bench", version=2, device_classes=[DEVICE_CLASS],
                           issued=BUILD_TIME + 86400, keys=[RELEASE_KEY])
    return model, bundle


def write_root(path: Path) -> Path:
    root = new_root([ROOT_KEY.public_key], [RELEASE_KEY.public_key], release_threshold=1,
                    expires=BUILD_TIME + 10 * 365 * 86400)
    path.write_bytes(root_envelope(root).sign(ROOT_KEY).to_json())
    return path


def frames_of(bundle: ReleaseBundle, chunk_size: int) -> list[bytes]:
    """The chunk frames of every file, as the publisher sends them."""
    layout = ChunkLayout.from_manifest(bundle.manifest, chunk_size)
    contents = [bundle.files[entry.name] for entry in bundle.manifest.files]
    return [frame for _, _, frame in layout.frames(contents)]


# -- the bare baseline ----------------------------------------------------------------------------


def bare_transfer(port: int, frames: Sequence[bytes], timeout: float) -> BareResult:
    """Publish ``frames`` at QoS 1 (``INFLIGHT`` in flight) to one QoS 1 subscriber; time until
    it has them all."""
    tag = uuid.uuid4().hex[:8]
    topic = f"bench/bare/{tag}/chunks"
    result = BareResult()
    got = threading.Event()
    subscribed = threading.Event()
    received = [0, 0]  # frames, bytes

    def on_message(client: mqtt.Client, userdata: Any, message: Any) -> None:
        received[0] += 1
        received[1] += len(message.payload)
        if received[0] >= len(frames):
            got.set()

    sub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-bare-sub-{tag}",
                      clean_session=True)
    sub.on_message = on_message
    sub.on_subscribe = lambda *a: subscribed.set()
    sub.on_connect = lambda c, *a: c.subscribe(topic, qos=1)
    pub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-bare-pub-{tag}",
                      clean_session=True)
    pub.max_inflight_messages_set(INFLIGHT)
    connected = threading.Event()
    pub.on_connect = lambda *a: connected.set()
    try:
        sub.connect("127.0.0.1", port, keepalive=60)
        sub.loop_start()
        pub.connect("127.0.0.1", port, keepalive=60)
        pub.loop_start()
        if not (subscribed.wait(20) and connected.wait(20)):
            return result
        start = time.monotonic()
        for frame in frames:
            pub.publish(topic, frame, qos=1)
        result.completed = got.wait(timeout)
        result.seconds = time.monotonic() - start
    finally:
        for client in (pub, sub):
            with contextlib.suppress(Exception):
                client.disconnect()
                client.loop_stop()
    result.frames = received[0]
    result.frame_bytes = received[1]
    result.data_bytes = received[1] - 19 * received[0]
    return result


# -- the FleetLite transfer -----------------------------------------------------------------------


class Monitor:
    """Subscribed to one device's topics (``fleetlite/v1/dev/{id}/#``): every message with its
    arrival time on the monotonic clock."""

    def __init__(self, port: int, device_id: str) -> None:
        self.device_id = device_id
        self.messages: list[tuple[float, str, bytes]] = []
        self._cond = threading.Condition()
        ready = threading.Event()
        prefix = f"{topics.DEVICE_PREFIX}/{device_id}/"
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2,
                                  client_id=f"bench-monitor-{uuid.uuid4().hex[:8]}",
                                  clean_session=True)

        def on_connect(client: mqtt.Client, *args: Any) -> None:
            client.subscribe(f"{topics.DEVICE_PREFIX}/{device_id}/#", qos=1)

        def on_message(client: mqtt.Client, userdata: Any, message: Any) -> None:
            kind = str(message.topic)[len(prefix):]
            with self._cond:
                self.messages.append((time.monotonic(), kind, bytes(message.payload)))
                self._cond.notify_all()

        self.client.on_connect = on_connect
        self.client.on_subscribe = lambda *a: ready.set()
        self.client.on_message = on_message
        self.client.connect("127.0.0.1", port, keepalive=60)
        self.client.loop_start()
        if not ready.wait(20):
            self.stop()
            raise SystemExit("the monitoring client could not subscribe")

    def wait_for(self, predicate: Callable[[str, bytes], bool],
                 timeout: float) -> Optional[tuple[float, str, bytes]]:
        """The first message (already arrived or to come) for which ``predicate`` holds."""
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for item in self.messages[seen:]:
                    if predicate(item[1], item[2]):
                        return item
                seen = len(self.messages)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._cond.wait(min(remaining, 0.5))

    def of_kind(self, kind: str) -> list[tuple[float, bytes]]:
        with self._cond:
            return [(t, p) for t, k, p in self.messages if k == kind]

    def publish(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1).wait_for_publish(10)

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def agent_config(directory: Path, port: int, device_id: str, root: Path,
                 health_timeout_s: float) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    config: dict[str, Any] = {
        "device_id": device_id,
        "device_class": DEVICE_CLASS,
        "broker": {"host": "127.0.0.1", "port": port, "keepalive_s": 30},
        "state_dir": str(directory / "state"),
        "intervals": {"telemetry_s": 3600.0, "reconnect_min_s": 0.2, "reconnect_max_s": 1.0},
        "models": [],
        "profile_on_model_change": False,
        "trust_root": str(root),
        "ota": {"health_inferences": 5, "health_timeout_s": health_timeout_s},
    }
    path = directory / "agent.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _status(payload: bytes) -> Optional[OtaStatus]:
    with contextlib.suppress(Exception):
        return OtaStatus.from_json(payload)
    return None


def _is_done_request(payload: bytes) -> bool:
    with contextlib.suppress(Exception):
        return ChunkRequest.from_json(payload).done
    return False


def fleet_transfer(port: int, work: Path, bundle: ReleaseBundle, model: bytes, chunk_size: int,
                   root: Path, args: argparse.Namespace) -> FleetResult:
    """One real agent installs ``bundle`` served by a real ReleasePublisher."""
    device_id = f"gw-bench-{uuid.uuid4().hex[:8]}"
    directory = work / device_id
    config = agent_config(directory, port, device_id, root, args.health_timeout_s)
    result = FleetResult()
    layout = ChunkLayout.from_manifest(bundle.manifest, chunk_size)
    result.total_chunks = layout.total_chunks
    monitor = Monitor(port, device_id)
    log = (directory / "agent.log").open("ab")
    agent = subprocess.Popen(
        [sys.executable, "-m", "fleetlite.agent.cli", "run", "--config", str(config),
         "--log-level", args.agent_log_level], stdout=log, stderr=log,
        env=dict(os.environ, PYTHONUNBUFFERED="1"))
    log.close()
    publisher = ReleasePublisher("127.0.0.1", port)
    try:
        publisher.start(timeout=30)
        t_serve = time.monotonic()
        publisher.serve(bundle, chunk_size, initial_pass=not args.request_only, wait=False)
        if not args.request_only:
            if not publisher.wait_idle(args.timeout):
                print(f"# the release was not retained within {args.timeout:g} s", flush=True)
                return result
            result.serve_s = time.monotonic() - t_serve
        if monitor.wait_for(lambda kind, payload: kind == topics.BIRTH, args.agent_timeout) is None:
            print(f"# the agent did not start within {args.agent_timeout:g} s; its log:\n"
                  + (directory / "agent.log").read_text(errors="replace")[-2000:], flush=True)
            return result
        time.sleep(0.2)  # the birth is published right after the command subscription
        command_id = uuid.uuid4().hex[:10]
        command = json.dumps({"schema": "fleetlite.command/1", "id": command_id,
                              "command": "ota_install",
                              "args": {"release_id": bundle.release_id,
                                       "chunk_size": chunk_size}}).encode()
        t0 = time.monotonic()
        monitor.publish(topics.device_topic(device_id, topics.COMMAND), command)

        def final(kind: str, payload: bytes) -> bool:
            status = _status(payload) if kind == topics.OTA_STATUS else None
            return status is not None and status.final

        end = monitor.wait_for(final, args.timeout)
        if end is not None:
            status = _status(end[2])
            assert status is not None
            result.outcome, result.reason = status.outcome, status.reason
            if status.outcome == "installed":
                result.installed_s = end[0] - t0
        for t, payload in monitor.of_kind(topics.COMMAND_RESPONSE):
            if json.loads(payload).get("id") == command_id:
                result.response_s = t - t0
                break
        duplicates = 0
        for t, payload in monitor.of_kind(topics.OTA_STATUS):
            status = _status(payload)
            if status is None:
                continue
            if status.phase == "downloading":
                if math.isnan(result.downloading_s):  # the first one
                    result.downloading_s = t - t0
                duplicates = int(status.progress.get("duplicates", duplicates))
            elif status.phase == "verifying" and math.isnan(result.download_s):
                result.download_s = t - t0
                result.completed = True
        result.duplicates = duplicates
        requests = monitor.of_kind(topics.OTA_REQUEST)
        result.requests = len(requests)
        for t, payload in requests:
            if _is_done_request(payload):
                result.done_request_s = t - t0
                break
        stats = publisher.stats()
        result.chunks_published = int(stats["chunks_published"])
        result.release_bytes = sum(entry.length for entry in bundle.manifest.files)
        model_name = bundle.manifest.default_variant.model.file
        slots = list((directory / "state").rglob(model_name))
        result.model_matches = any(p.is_file() and p.read_bytes() == model for p in slots)
        if args.trace:
            for t, kind, payload in list(monitor.messages):
                if t >= t0:
                    print(f"#   {t - t0:8.3f} {kind:12} {payload[:160]!r}")
            print("# agent log:\n" + (directory / "agent.log").read_text(errors="replace")[-6000:])
        if not result.completed or end is None:
            print(f"# {device_id}: the transfer did not complete; last statuses: "
                  f"{[p[:200] for _, p in monitor.of_kind(topics.OTA_STATUS)[-3:]]}; agent log:\n"
                  + (directory / "agent.log").read_text(errors="replace")[-2000:], flush=True)
        return result
    finally:
        with contextlib.suppress(Exception):  # the next run may use another chunk size
            publisher.stop_serving(bundle.release_id, timeout=60)
        publisher.close()
        stop_child(agent, 30)
        monitor.stop()


# -- the run --------------------------------------------------------------------------------------


def _rate(nbytes: int, seconds: float) -> str:
    if not seconds or math.isnan(seconds):
        return "—"
    return f"{nbytes / seconds / 1024 / 1024:.2f}"


def _s(seconds: float) -> str:
    return "—" if math.isnan(seconds) else f"{seconds:.2f}"


def print_table(rows: Sequence[Row]) -> None:
    print()
    print("| model (bytes) | chunk | FleetLite download (s) | FleetLite MiB/s | bare (s) | "
          "bare MiB/s | FleetLite / bare | command→downloading (s) | →installed (s) | "
          "chunks published / needed | requests | duplicates | release retained before (s) |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
          "| ---: |")
    for row in rows:
        fleet, bare = row.fleet_s(), row.bare_s()
        ratio = fleet / bare if bare and not math.isnan(bare) else float("nan")
        published = _median([r.chunks_published for r in row.fleet])
        needed = row.fleet[0].total_chunks if row.fleet else 0
        print(f"| {row.release_bytes:,} | {row.chunk_size} | {_s(fleet)} | "
              f"{_rate(row.release_bytes, fleet)} | {_s(bare)} | "
              f"{_rate(row.release_bytes, bare)} | "
              f"{'—' if math.isnan(ratio) else f'{ratio:.1f}x'} | "
              f"{_s(_median([r.downloading_s for r in row.fleet]))} | "
              f"{_s(_median([r.installed_s for r in row.fleet]))} | "
              f"{published:,.0f} / {needed:,} | "
              f"{_median([r.requests for r in row.fleet]):.0f} | "
              f"{_median([r.duplicates for r in row.fleet]):.0f} | "
              f"{_s(_median([r.serve_s for r in row.fleet]))} |")
    print()


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-kib", type=_ints, default=[256, 4096, 16384],
                        help="model sizes in KiB, comma-separated")
    parser.add_argument("--chunk-size", type=_ints, default=[4096, 16384, 65536],
                        help="chunk sizes in bytes, comma-separated (1024..262144)")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each pair (median)")
    parser.add_argument("--health-timeout-s", type=float, default=1.0,
                        help="the agent's ota.health_timeout_s (the install's health window)")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="seconds for one install or bare transfer")
    parser.add_argument("--agent-timeout", type=float, default=60.0,
                        help="seconds for an agent to start")
    parser.add_argument("--request-only", action="store_true",
                        help="serve with initial_pass=False: chunks go out only when the device "
                             "asks (the controller's serving before retained chunks)")
    parser.add_argument("--trace", action="store_true",
                        help="print the device's messages after the command, timed")
    parser.add_argument("--agent-log-level", default="WARNING",
                        help="the agents' --log-level (their logs are printed with --trace)")
    parser.add_argument("--json", action="store_true",
                        help="also print one JSON object per model and chunk size")
    args = parser.parse_args(argv)
    print(f"# one device's OTA transfer: models {args.model_kib} KiB, chunk sizes "
          f"{args.chunk_size}, repeat {args.repeat}, "
          f"{'served on request only' if args.request_only else 'retained chunks'}; "
          f"{os.cpu_count()} CPUs, load "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
          f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}", flush=True)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="bench-ota-transfer-") as tmp:
        work = Path(tmp)
        root = write_root(work / "root.json")
        broker = Broker(work, max_queued=100_000)
        try:
            for kib in args.model_kib:
                model, bundle = build(work, kib)
                for chunk_size in args.chunk_size:
                    frames = frames_of(bundle, chunk_size)
                    row = Row(kib, len(model), chunk_size,
                              sum(entry.length for entry in bundle.manifest.files))
                    for _ in range(args.repeat):
                        row.bare.append(bare_transfer(broker.port, frames, args.timeout))
                        row.fleet.append(fleet_transfer(broker.port, work, bundle, model,
                                                        chunk_size, root, args))
                    f, b = row.fleet[-1], row.bare[-1]
                    print(f"# {len(model):,}-byte model, release {row.release_bytes:,} bytes, "
                          f"chunk {chunk_size}: FleetLite download {_s(f.download_s)} s "
                          f"(downloading at {_s(f.downloading_s)}, done request at "
                          f"{_s(f.done_request_s)}, {f.outcome or 'no final'} "
                          f"{f.reason} at {_s(f.installed_s)}; release retained in "
                          f"{_s(f.serve_s)} s before the command), bare {_s(b.seconds)} s; "
                          f"load {os.getloadavg()[0]:.2f}", flush=True)
                    rows.append(row)
                    if args.json:
                        print(json.dumps({"model_kib": kib, "model_bytes": row.model_bytes,
                                          "chunk_size": chunk_size,
                                          "release_bytes": row.release_bytes, "ok": row.ok(),
                                          "fleet": [asdict(r) for r in row.fleet],
                                          "bare": [asdict(r) for r in row.bare]}), flush=True)
        finally:
            broker.stop()
    print_table(rows)
    print(f"# load at the end {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    failed = [row for row in rows if not row.ok()]
    for row in failed:
        print(f"# NOT COMPLETE or bytes differ: {row.model_kib} KiB, chunk {row.chunk_size}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
