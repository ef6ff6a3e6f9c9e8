"""Ingest rate: device reports per second one controller stores, against a bare subscriber.

``python -m fleetlite.tools.bench.bench_ingest_rate [--devices 20] [--messages 500]
[--kinds telemetry,profile,ota] [--store sqlite|postgresql|both] [--repeat 1]``

What it measures (issue 13, "ingest at broker speed"): how fast one real
:class:`~fleetlite.fleet.controller.Controller` takes a stream of device reports off a real
Mosquitto and into its store (SQLite, and PostgreSQL when ``FLEETLITE_TEST_PG_URL`` is set),
against a bare paho subscriber that receives the same stream from the same broker, parses each
message with the same ``sdk/`` class and stores nothing: the ceiling that paho, the broker and
this machine set, whatever the controller does. Each kind is measured on its own: telemetry,
profile records, OTA statuses.

How, so that both receivers get exactly the same stream and the publishers' CPU does not
compete with them:

1. One Mosquitto on a free loopback port for the whole run, configured as
   ``fleetlite broker-config`` writes it (``max_inflight_messages 100``), with a queue large
   enough for the whole stream.
2. For each measurement the receiver's persistent MQTT session is created first (a plain paho
   client with the receiver's client id, ``clean_session=False``, subscribed to what the
   controller subscribes to), then left.
3. The publishers, ``--devices`` plain paho clients in a separate process, publish the fixed
   stream: ``--messages`` reports of the kind per device, QoS 1, as fast as the broker
   acknowledges them. Plain paho rather than the simulator (``python -m fleetlite.tools.sim``):
   the stream must be fixed and counted exactly, and the simulator's timers, churn and
   protocol behaviour would only add noise; the reports themselves are built by the
   simulator's report code (``tools/sim/reports.py``, the ``sdk/`` message classes).
   The broker queues the stream for the receiver's session.
4. The receiver connects with its session and drains the queue: the controller stores each
   report, the bare subscriber parses it. Its rate is the stream's size over the time from its
   first message received to its last one counted (the controller's own ``ingested`` counter,
   which counts a report once the store has it; polled every 2 ms).

The store is prepared as the reports require: every device's birth (so profiles are checked
against a known device class), and the release the OTA statuses name with a finished rollout
that sent it to every device (``Store.create_rollout`` and ``set_device_progress``): the
controller refuses a status about a release that no rollout sent its device
(:mod:`fleetlite.fleet.sender_check`). The controller's ingest limits
(:mod:`fleetlite.fleet.ingest_limits`, ``FLEETLITE_INGEST_LIMITS``) rate-limit each device;
the bench passes limits whose rates and bursts are far above the stream
(``rate``/``telemetry_rate`` 1e9 a second, bursts 1e9), so it measures the store path, not the
limiter; the size caps and the per-device bounds on kept profiles and OTA statuses keep their
defaults, as in production. The controller logs at INFO, to a file.

It checks that the counts add up (every report stored once, none refused or malformed, each
device's latest telemetry is its last report) and prints the figures, the ratio controller /
bare per kind and store, and ``--json`` lines. No assertion on time: re-run it on your
hardware.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from fleetlite.fleet.controller import INGEST_KINDS, Controller
from fleetlite.fleet.ingest_limits import IngestLimits
from fleetlite.fleet.rollout import INSTALLED
from fleetlite.fleet.store import Store
from fleetlite.sdk import topics
from fleetlite.sdk.messages import OtaStatus, Telemetry
from fleetlite.sdk.profile import ProfileRecord
from fleetlite.tools.bench import bench_ingest
from fleetlite.tools.sim.reports import DeviceState, birth, profile, telemetry

KINDS = {"telemetry": topics.TELEMETRY, "profile": topics.PROFILE, "ota": topics.OTA_STATUS}
PARSERS: dict[str, Callable[[bytes], object]] = {
    topics.TELEMETRY: Telemetry.from_json, topics.PROFILE: ProfileRecord.from_json,
    topics.OTA_STATUS: OtaStatus.from_json}
RELEASE = "a" * 64
CLASS = "rpi4"
BASE_TS = 1_800_000_000.0
#: rates far above any stream this bench sends: the limiter never holds or refuses a report
UNLIMITED = IngestLimits(rate=1e9, burst=10**9, telemetry_rate=1e9, telemetry_burst=10**9)


@contextlib.contextmanager
def fresh_store(backend: str, workdir: Path) -> Iterator[Store]:
    """bench_ingest's empty store (a SQLite file, or a new PostgreSQL database dropped
    afterwards); a database that cannot be dropped at once (an autovacuum worker on it, which
    ``DROP DATABASE ... WITH (FORCE)`` may not end without superuser rights) is tried again,
    then left with a warning rather than losing the run's figures."""
    stores = bench_ingest.fresh_store(backend, workdir)
    store = stores.__enter__()
    try:
        yield store
    finally:
        try:
            stores.__exit__(None, None, None)
        except Exception as exc:  # psycopg's InsufficientPrivilege or ObjectInUse
            _drop_later(store, exc)


def _drop_later(store: Store, first: Exception) -> None:
    import urllib.parse

    import psycopg

    name = urllib.parse.urlsplit(store.url).path.lstrip("/")
    error: Exception = first
    for _ in range(5):
        time.sleep(2.0)
        try:
            with psycopg.connect(os.environ["FLEETLITE_TEST_PG_URL"], autocommit=True) as admin:
                admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            return
        except Exception as exc:
            error = exc
    print(f"warning: could not drop the bench database {name}: {error}", file=sys.stderr)


def device_ids(devices: int) -> list[str]:
    return [f"bench-{n:04d}" for n in range(devices)]


def stream(kind: str, device_id: str, messages: int) -> Iterator[bytes]:
    """The fixed reports of one device: ``messages`` of ``kind`` (seeded: every run the same)."""
    rng = random.Random(device_id)
    state = DeviceState(device_id, CLASS, "kws", 1)
    for k in range(messages):
        now = BASE_TS + k
        if kind == topics.TELEMETRY:
            yield telemetry(state, now, rng).to_json()
        elif kind == topics.PROFILE:
            yield profile(state, now, 12.0, rng).to_json()
        else:
            yield OtaStatus(device_id=device_id, ts=now, release_id=RELEASE, model="kws",
                            version=2, phase="downloading",
                            progress={"bytes": k * 16384, "total": messages * 16384}).to_json()


# -- the publishers (a child process: --role publisher) ---------------------------------------


def run_publisher(port: int, kind: str, devices: int, messages: int) -> int:
    """Publish the stream of ``kind``, QoS 1, every device at once; print the count the broker
    acknowledged."""
    ids = device_ids(devices)
    payloads = {d: list(stream(kind, d, messages)) for d in ids}
    clients: dict[str, mqtt.Client] = {}
    for d in ids:
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=d, clean_session=True)
        client.max_inflight_messages_set(100)
        client.max_queued_messages_set(0)
        client.connect("127.0.0.1", port, keepalive=60)
        client.loop_start()
        clients[d] = client
    infos: list[mqtt.MQTTMessageInfo] = []
    for k in range(messages):  # interleaved, as devices send: one report of each in turn
        for d, client in clients.items():
            infos.append(client.publish(topics.device_topic(d, kind), payloads[d][k], qos=1))
    sent = 0
    for info in infos:
        with contextlib.suppress(RuntimeError, ValueError):
            info.wait_for_publish(120)
        sent += info.is_published()
    for client in clients.values():
        client.disconnect()
        client.loop_stop()
    print(json.dumps({"sent": sent}), flush=True)
    return 0


# -- the fleet side (this process) -------------------------------------------------------------


class Broker(bench_ingest.Broker):
    """A Mosquitto child process on a free loopback port, with ``fleetlite broker-config``'s
    in-flight window and a queue that holds the whole stream for an offline session."""

    def __init__(self, workdir: Path, max_queued: int) -> None:
        super().__init__(workdir, max_queued,
                         extra=("max_queued_bytes 0", "max_inflight_messages 100"))


def open_session(port: int, client_id: str) -> None:
    """Create ``client_id``'s persistent session with the controller's subscriptions, and leave
    it: the broker queues what is published meanwhile for it."""
    done = threading.Event()
    pending: set[int] = set()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False)

    def on_subscribe(c: mqtt.Client, userdata: Any, mid: int, codes: Any, props: Any) -> None:
        pending.discard(mid)
        if not pending:
            done.set()

    client.on_subscribe = on_subscribe
    client.connect("127.0.0.1", port, keepalive=30)
    for kind in INGEST_KINDS:
        _, mid = client.subscribe(topics.fleet_subscription(kind), qos=1)
        pending.add(int(mid or 0))
    client.loop_start()
    try:
        if not done.wait(10):
            raise SystemExit("the broker did not acknowledge the subscriptions")
    finally:
        client.disconnect()
        client.loop_stop()


def publish(port: int, kind: str, devices: int, messages: int, timeout: float) -> int:
    proc = subprocess.run(
        [sys.executable, "-m", "fleetlite.tools.bench.bench_ingest_rate", "--role", "publisher",
         "--port", str(port), "--kind", kind, "--devices", str(devices),
         "--messages", str(messages)],
        stdout=subprocess.PIPE, text=True, timeout=timeout, check=True)
    return int(json.loads(proc.stdout.strip().splitlines()[-1])["sent"])


class BareSubscriber:
    """A paho client with the controller's subscriptions that parses each report with its
    ``sdk/`` class and counts it; it stores nothing."""

    def __init__(self, port: int, client_id: str) -> None:
        self.count = 0
        self.malformed = 0
        self.first_at: Optional[float] = None
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                                  clean_session=False)
        self.client.on_message = self._on_message
        self.port = port

    def _on_message(self, client: mqtt.Client, userdata: Any, message: Any) -> None:
        if self.first_at is None:
            self.first_at = time.monotonic()
        try:
            parsed = topics.parse_device_topic(message.topic)
            PARSERS[parsed.kind](message.payload)
        except Exception:
            self.malformed += 1
        else:
            self.count += 1

    def start(self) -> None:
        self.client.connect("127.0.0.1", self.port, keepalive=30)
        self.client.loop_start()

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@dataclass
class Result:
    kind: str
    receiver: str  # "bare", or the controller's store: "sqlite" / "postgresql"
    sent: int
    received: int
    seconds: float
    refused: int = 0
    checked: bool = True

    @property
    def per_second(self) -> float:
        return self.received / self.seconds if self.seconds > 0 else 0.0


def _wait(count: Callable[[], int], target: int, timeout: float) -> float:
    """Poll ``count`` until it reaches ``target``; the monotonic time it did (or the timeout)."""
    deadline = time.monotonic() + timeout
    while count() < target and time.monotonic() < deadline:
        time.sleep(0.002)
    return time.monotonic()


def prepare(store: Store, ids: Sequence[str]) -> None:
    """What the reports need in the store: each device's birth, and a finished rollout that sent
    the release the OTA statuses name to every device."""
    store.migrate()
    with store.batch():
        store.add_release(RELEASE, "kws", 2, b"{}", {}, {"name": "kws", "version": 2,
                                                          "files": []})
        for d in ids:
            store.upsert_birth(birth(DeviceState(d, CLASS, "kws", 1), BASE_TS, {}),
                               received_at=time.time())
        store.create_rollout("ro-bench", RELEASE, {}, state={"state": "completed"})
        for d in ids:
            store.set_device_progress("ro-bench", d, wave=0, status=INSTALLED)


def measure_bare(port: int, kind: str, args: argparse.Namespace, run: int) -> Result:
    client_id = f"bench-bare-{kind}-{run}"
    open_session(port, client_id)
    sent = publish(port, kind, args.devices, args.messages, args.timeout)
    bare = BareSubscriber(port, client_id)
    bare.start()
    try:
        done = _wait(lambda: bare.count + bare.malformed, sent, args.timeout)
    finally:
        bare.stop()
    first = bare.first_at or done
    return Result(kind, "bare", sent, bare.count, done - first, refused=bare.malformed,
                  checked=bare.count == sent and not bare.malformed)


def measure_controller(port: int, kind: str, backend: str, args: argparse.Namespace, run: int,
                       workdir: Path) -> Result:
    client_id = f"bench-ctl-{kind}-{backend}-{run}"
    ids = device_ids(args.devices)
    where = workdir / f"{kind.replace('/', '-')}-{backend}-{run}"
    where.mkdir()
    with fresh_store(backend, where) as store:
        prepare(store, ids)
        open_session(port, client_id)
        sent = publish(port, kind, args.devices, args.messages, args.timeout)
        controller = Controller(store, "127.0.0.1", port, controller_id=client_id,
                                limits=UNLIMITED)
        first: list[float] = []
        on_message = controller.client.on_message
        assert on_message is not None

        def noting(client: mqtt.Client, userdata: Any, message: Any) -> None:
            if not first:
                first.append(time.monotonic())
            on_message(client, userdata, message)

        controller.client.on_message = noting

        def handled() -> int:
            c = controller.counters
            return (controller.ingested_by_kind[kind] + c["refused"] + c["malformed"]
                    + c["oversize"] + c["rate_limited"])

        controller.start()
        try:
            done = _wait(handled, sent, args.timeout)
        finally:
            controller.stop()
        stored = controller.ingested_by_kind[kind]
        refused = handled() - stored
        checked = stored == sent and not refused
        if kind == topics.TELEMETRY:  # each device's latest report is its last one
            latest = {d.device_id: d.telemetry.seq if d.telemetry else 0
                      for d in store.list_devices()}
            checked = checked and all(latest.get(d) == args.messages for d in ids)
        seconds = done - (first[0] if first else done)
        return Result(kind, backend, sent, stored, seconds, refused=refused, checked=checked)


def _print(results: Sequence[Result], args: argparse.Namespace, load: float) -> None:
    print(f"# Ingest rate: {args.devices} devices x {args.messages} reports of each kind, QoS 1, "
          f"drained from the broker's queue; {args.repeat} run(s), medians; load average "
          f"before {load:.2f} ({os.cpu_count()} CPUs)\n")
    print("| kind | store | controller msg/s | bare msg/s | ratio | counts add up |")
    print("| --- | --- | ---: | ---: | ---: | --- |")
    kinds = list(dict.fromkeys(r.kind for r in results))
    backends = list(dict.fromkeys(r.receiver for r in results if r.receiver != "bare"))
    for kind in kinds:
        bare = [r for r in results if r.kind == kind and r.receiver == "bare"]
        bare_rate = statistics.median(r.per_second for r in bare)
        for backend in backends:
            runs = [r for r in results if r.kind == kind and r.receiver == backend]
            rate = statistics.median(r.per_second for r in runs)
            ok = all(r.checked for r in runs + bare)
            print(f"| {kind} | {backend} | {rate:.0f} | {bare_rate:.0f} | "
                  f"{rate / bare_rate if bare_rate else 0:.2f}x | {'yes' if ok else 'NO'} |")
    print()
    for r in results:
        print(f"- {r.kind} {r.receiver}: {r.received} of {r.sent} in {r.seconds:.2f} s "
              f"({r.per_second:.0f}/s), refused/malformed {r.refused}")


def _progress(r: Result) -> None:
    print(f"{r.kind} {r.receiver}: {r.received} of {r.sent} in {r.seconds:.2f} s "
          f"({r.per_second:.0f}/s)", file=sys.stderr, flush=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fleetlite.tools.bench.bench_ingest_rate",
                                     description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--devices", type=int, default=20, help="publishing devices")
    parser.add_argument("--messages", type=int, default=500,
                        help="reports of each kind per device (default 500)")
    parser.add_argument("--kinds", default="telemetry,profile,ota",
                        help="comma-separated: telemetry, profile, ota")
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs of each measurement (bare and controller alternate)")
    parser.add_argument("--store", choices=("sqlite", "postgresql", "both"), default=None,
                        help="default: sqlite, and postgresql when FLEETLITE_TEST_PG_URL is set")
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="seconds a receiver may take to drain the stream")
    parser.add_argument("--json", action="store_true", help="also print one JSON line per run")
    parser.add_argument("--role", choices=("fleet", "publisher"), default="fleet",
                        help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--kind", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role == "publisher":
        return run_publisher(args.port, args.kind, args.devices, args.messages)
    if args.devices < 1 or args.messages < 1 or args.repeat < 1:
        parser.error("--devices, --messages and --repeat must be positive")
    kinds = [k for k in args.kinds.split(",") if k]
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        parser.error(f"unknown kind in {args.kinds!r}: use {', '.join(KINDS)}")
    pg = bool(os.environ.get("FLEETLITE_TEST_PG_URL"))
    store = args.store or ("both" if pg else "sqlite")
    if store in ("postgresql", "both") and not pg:
        parser.error("a PostgreSQL run needs FLEETLITE_TEST_PG_URL (bash tools/postgres.sh)")
    backends = ["sqlite", "postgresql"] if store == "both" else [store]
    load = os.getloadavg()[0]
    results: list[Result] = []
    root = logging.getLogger()
    with tempfile.TemporaryDirectory(prefix="fleetlite-bench-rate-") as tmp:
        workdir = Path(tmp)
        handler = logging.FileHandler(workdir / "controller.log")
        root.addHandler(handler)
        level = root.level
        root.setLevel(logging.INFO)
        broker = Broker(workdir, max_queued=10 * args.devices * args.messages + 1000)
        try:
            for run in range(args.repeat):
                for name in kinds:
                    kind = KINDS[name]
                    results.append(measure_bare(broker.port, kind, args, run))
                    _progress(results[-1])
                    for backend in backends:
                        results.append(measure_controller(broker.port, kind, backend, args,
                                                          run, workdir))
                        _progress(results[-1])
        finally:
            broker.stop()
            root.removeHandler(handler)
            root.setLevel(level)
            handler.close()
    for r in results:
        r.kind = next(name for name, k in KINDS.items() if k == r.kind)
        if args.json:
            print(json.dumps({**asdict(r), "per_second": r.per_second}))
    _print(results, args, load)
    return 0 if all(r.checked for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
