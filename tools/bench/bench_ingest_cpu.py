"""CPU per stored report, by stage: what a controller does beyond what a bare subscriber does.

``python -m fleetlite.tools.bench.bench_ingest_cpu [--devices 20] [--messages 500]
[--kinds telemetry,profile,ota] [--repeat 3]``

``bench_ingest_rate`` compares whole receivers on a real broker; this one explains its ratio.
In one thread, without a broker, on the same fixed stream (``bench_ingest_rate.stream``), it
times the CPU (``time.process_time``) per report of:

- **parse**: the ``sdk/`` class's ``from_json``, all a bare subscriber does with a report;
- **checks**: what a real :class:`~fleetlite.fleet.controller.Controller` does on its
  network thread before queueing a report (topic parse and device id check, the size cap and
  the per-device rate limit, the acknowledgement ticket), with the queue replaced by a list;
- **store**: its ingest worker on those reports in batches of 500 (parse, sender checks, one
  SQLite transaction per batch, the refusal counts, the acknowledgements, here sent nowhere).

The controller's own work is checks + store - parse. Both receivers also pay paho's cost of
receiving a message (reading and decoding the packet, the PUBACK), which this benchmark does
not see: with ``bench_ingest_rate``'s bare rate R, that is about 1/R - parse per report, and
the controller's best possible ratio in one Python process is
(1/R) / (1/R + own work). The ingest limits are raised as in ``bench_ingest_rate`` (rates and
bursts 1e9); the store is a fresh SQLite file prepared as there. Medians of ``--repeat`` runs.
No assertion on time: re-run it on your hardware.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from fleetlite.fleet.controller import Controller
from fleetlite.fleet.ingest_backlog import BacklogItem
from fleetlite.fleet.ingest_batch import Ticket
from fleetlite.fleet.store import open_store
from fleetlite.sdk import topics
from fleetlite.sdk.messages import OtaStatus, Telemetry
from fleetlite.sdk.profile import ProfileRecord
from fleetlite.tools.bench.bench_ingest_rate import UNLIMITED, device_ids, prepare, stream

KINDS = {"telemetry": topics.TELEMETRY, "profile": topics.PROFILE, "ota": topics.OTA_STATUS}
PARSERS: dict[str, Callable[[bytes], object]] = {
    topics.TELEMETRY: Telemetry.from_json, topics.PROFILE: ProfileRecord.from_json,
    topics.OTA_STATUS: OtaStatus.from_json}
BATCH = 500


@dataclass(frozen=True)
class Message:
    """What the controller reads of a paho message."""

    topic: str
    payload: bytes
    mid: int
    qos: int = 1
    retain: bool = False


@dataclass
class Stages:
    kind: str
    reports: int
    parse_us: float
    checks_us: float
    store_us: float

    @property
    def own_us(self) -> float:
        return self.checks_us + self.store_us - self.parse_us


def messages(kind: str, devices: int, count: int) -> list[Message]:
    """The stream as the broker would interleave it (seeded shuffle)."""
    found = [(topics.device_topic(d, kind), payload) for d in device_ids(devices)
             for payload in stream(kind, d, count)]
    random.Random(7).shuffle(found)
    return [Message(topic, payload, mid) for mid, (topic, payload) in enumerate(found, 1)]


def cpu_us(fn: Callable[[], object], reports: int) -> float:
    start = time.process_time()
    fn()
    return (time.process_time() - start) * 1e6 / reports


def measure(kind: str, devices: int, count: int, workdir: Path) -> Stages:
    stream_ = messages(kind, devices, count)
    parse = PARSERS[kind]
    parse_us = cpu_us(lambda: [parse(m.payload) for m in stream_], len(stream_))
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        store = open_store(f"sqlite:///{tmp}/fleet.db")
        try:
            prepare(store, device_ids(devices))
            controller = Controller(store, "127.0.0.1", 1, limits=UNLIMITED)
            controller.acks._ack = lambda mid, qos: None  # no connection: sent nowhere
            queued: list[tuple[BacklogItem, Ticket]] = []
            controller.ingest_queue.put = queued.append  # type: ignore[method-assign,assignment]

            def checks() -> None:
                for m in stream_:
                    controller._receive(m, controller.acks.received(m.mid, m.qos))

            def store_all() -> None:
                for start in range(0, len(queued), BATCH):
                    controller._store_received(queued[start:start + BATCH])

            checks_us = cpu_us(checks, len(stream_))
            if len(queued) != len(stream_):
                raise SystemExit(f"{kind}: {len(stream_) - len(queued)} reports not queued")
            store_us = cpu_us(store_all, len(stream_))
            if controller.counters["ingested"] != len(stream_):
                raise SystemExit(f"{kind}: {controller.counters['ingested']} of "
                                 f"{len(stream_)} stored")
        finally:
            store.close()
    return Stages(kind, len(stream_), parse_us, checks_us, store_us)


def median_stages(runs: Sequence[Stages]) -> Stages:
    return Stages(runs[0].kind, runs[0].reports,
                  statistics.median(r.parse_us for r in runs),
                  statistics.median(r.checks_us for r in runs),
                  statistics.median(r.store_us for r in runs))


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fleetlite.tools.bench.bench_ingest_cpu",
        description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--devices", type=int, default=20, help="devices (default 20)")
    parser.add_argument("--messages", type=int, default=500,
                        help="reports per device and kind (default 500)")
    parser.add_argument("--kinds", default="telemetry,profile,ota",
                        help="comma-separated: telemetry, profile, ota (default all)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per kind (median; 3)")
    parser.add_argument("--json", action="store_true", help="also print one JSON line a kind")
    args = parser.parse_args(argv)
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        parser.error(f"unknown kind(s) {', '.join(unknown)}: choose from {', '.join(KINDS)}")
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-ingest-cpu-") as tmp:
        for name in kinds:
            stages = median_stages([measure(KINDS[name], args.devices, args.messages, Path(tmp))
                                    for _ in range(max(1, args.repeat))])
            rows.append({"kind": name, "reports": stages.reports,
                         "parse_us": round(stages.parse_us, 1),
                         "checks_us": round(stages.checks_us, 1),
                         "store_us": round(stages.store_us, 1),
                         "own_us": round(stages.own_us, 1)})
    print("| kind | reports | parse (bare) | controller: checks | controller: store | "
          "controller's own work |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        print(f"| {row['kind']} | {row['reports']} | {row['parse_us']} us | "
              f"{row['checks_us']} us | {row['store_us']} us | {row['own_us']} us |")
        if args.json:
            print(json.dumps(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
