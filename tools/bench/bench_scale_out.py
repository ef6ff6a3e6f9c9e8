"""Scale-out (issue 13, deliverable 5): N controllers of one group share the ingest.

``python -m fleetlite.tools.bench.bench_scale_out --devices 10000 --processes 2 --report-s 30
--duration-s 60 [--controllers 1,2,3] [--rollout-devices 1000]`` (PostgreSQL from
``FLEETLITE_TEST_PG_URL``, as ``tools/postgres.sh`` prints it)

Ingest, for N in ``--controllers``, from **one simulator run and one broker**: controller
``gN-k`` (k = 1..N) of group ``gN`` stores into database N. Every group is a separate shared
subscription, so every group receives the whole stream, its members in turn (Mosquitto hands a
shared subscription's messages to its members round-robin). The controllers connect once, so
that their persistent sessions and subscriptions exist, and stop (SIGTERM); the simulator then
runs ``--duration-s`` with the controllers down, and the broker queues each member's share in
its session. Then, one group at a time, the group's controllers start and drain their queues:
the time from the first report stored to the last (and from their start, with the processes'
start-up), and the reports (telemetry and profiles) stored per second, against N = 1 of the
same run. So the simulator's speed (the bottleneck of
a live stream on this machine: docs/scaling.md) is out of the figure, and every N ingests the
very same messages.

Checked per N: **lost** = reports the simulator sent (its PUBACK came) that are not in the
store (telemetry: the store keeps each device's latest ``seq``, and a device's seq counts its
reports; profiles are rows); **double counted** = the N controllers' ingest counters (printed
as JSON when they stop) summed, minus what was sent. CPU seconds during the drain, per process,
from ``/proc/PID/stat``: the controllers, Mosquitto, and the rest of the machine (PostgreSQL's
backends and anything else, from ``/proc/stat``).

Then (``--rollout-devices`` > 0) a rollout to that many simulated devices with two controllers
of one group, the one holding the rollout's lease killed with SIGKILL once ``--kill-after``
OTA statuses are stored and restarted with its id once the other has taken the lease over:
whether the rollout completes, in what time, and **lost** = OTA statuses the devices sent minus
the rows stored.

No assertion: it prints one JSON object per phase and a table. Run it under
``flock /tmp/fleetlite-bench.lock`` on a shared machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

from fleetlite.fleet.release_builder import build_release
from fleetlite.fleet.rollout import RolloutSpec, RolloutState, parse_waves
from fleetlite.fleet.store import open_store
from fleetlite.sdk.keys import SigningKey
from fleetlite.sdk.trust import new_root, root_envelope
from fleetlite.sdk.version import BUILD_TIME
from fleetlite.tools.bench.bench_ingest import Broker
from fleetlite.tools.bench.bench_rollout import cpu_seconds, model_bytes, raise_fd_limit

ROOT_KEY = SigningKey.from_seed(b"\x41" * 32)
RELEASE_KEY = SigningKey.from_seed(b"\x42" * 32)
PI4 = "raspberry-pi-4"
CLK_TCK = os.sysconf("SC_CLK_TCK")
KINDS = ("telemetry", "profile")


def busy_seconds() -> float:
    """CPU seconds the whole machine spent not idle (all cores), from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / CLK_TCK  # minus idle and iowait


@contextlib.contextmanager
def databases(admin_url: str, count: int) -> Iterator[list[str]]:
    """``count`` new, empty PostgreSQL databases on the server of ``admin_url``, dropped after."""
    import psycopg

    names = [f"fleetlite_scale_{uuid.uuid4().hex[:10]}" for _ in range(count)]
    parts = urllib.parse.urlsplit(admin_url)
    with psycopg.connect(admin_url, autocommit=True) as admin:
        for name in names:
            admin.execute(f'CREATE DATABASE "{name}"')
    try:
        urls = [urllib.parse.urlunsplit(parts._replace(path=f"/{name}")) for name in names]
        for url in urls:
            with open_store(url) as store:
                store.migrate()
        yield urls
    finally:
        with psycopg.connect(admin_url, autocommit=True) as admin:
            for name in names:
                admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def scalar(url: str, sql: str, params: tuple[Any, ...] = ()) -> int:
    import psycopg

    with psycopg.connect(url, autocommit=True) as db:
        row = db.execute(sql, params).fetchone()
    return int(row[0]) if row and row[0] is not None else 0


def stored_reports(url: str) -> dict[str, int]:
    """Telemetry (each device's latest seq: its count of reports) and profile rows stored."""
    return {"telemetry": scalar(url, "SELECT COALESCE(SUM(GREATEST(telemetry_seq, 0)), 0) "
                                     "FROM devices"),
            "profile": scalar(url, "SELECT COUNT(*) FROM profiles")}


def wait_for(predicate: Any, timeout: float, step: float = 0.25) -> bool:
    """Poll ``predicate`` until it holds (True) or ``timeout`` passes (False)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(step)
    return True


class Ctl:
    """One controller process (``python -m fleetlite.fleet.controller``) of a group."""

    def __init__(self, controller_id: str, group: str, db: str, port: int, log: Path) -> None:
        self.id, self.group, self.db, self.port, self.log = controller_id, group, db, port, log
        self.proc: Optional[subprocess.Popen[bytes]] = None
        self.starts = 0

    def start(self) -> Ctl:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "fleetlite.fleet.controller", "--db", self.db,
                 "--broker", f"127.0.0.1:{self.port}", "--group", self.group, "--id", self.id,
                 "--tick", "0.5", "--lease-ttl", "5"],
                stdout=out, stderr=out)
        self.starts += 1
        return self

    def connected(self) -> bool:
        """This start's subscriptions are acknowledged (its log line), or it exited."""
        text = self.log.read_text(errors="replace")
        return (text.count(f"controller {self.id} connected to") >= self.starts
                or (self.proc is not None and self.proc.poll() is not None))

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> dict[str, Any]:
        """SIGTERM; the counters it prints as JSON when it stops ({} if none)."""
        if self.proc is None:
            return {}
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        lines = [line for line in self.log.read_text(errors="replace").splitlines()
                 if line.startswith('{"controller"')]
        result: dict[str, Any] = json.loads(lines[-1]) if lines else {}
        return result


def sim_command(port: int, devices: int, processes: int, report_s: float, *extra: str
                ) -> list[str]:
    return [sys.executable, "-m", "fleetlite.tools.sim", "--broker", f"127.0.0.1:{port}",
            "--devices", str(devices), "--processes", str(processes), "--classes", "rpi4=1",
            "--report-s", str(report_s), "--stats-s", "10", "--seed", "13", *extra]


def summary_of(log: Path) -> dict[str, Any]:
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    found = [line for line in lines if line.get("event") == "summary"]
    return found[-1] if found else {}


def ingest_phase(args: argparse.Namespace, work: Path, broker: Broker) -> list[dict[str, Any]]:
    counts = args.controllers
    with databases(args.pg_url, len(counts)) as urls:
        groups = {n: [Ctl(f"g{n}-{k}", f"g{n}", urls[i], broker.port, work / f"g{n}-{k}.log")
                      for k in range(1, n + 1)] for i, n in enumerate(counts)}
        # 1. every member connects once (its persistent session and subscriptions), then stops
        for members in groups.values():
            for ctl in members:
                ctl.start()
        every = [ctl for members in groups.values() for ctl in members]
        if not wait_for(lambda: all(ctl.connected() for ctl in every), args.timeout):
            raise SystemExit("the controllers did not all connect: see their logs in " + str(work))
        for members in groups.values():
            for ctl in members:
                ctl.stop()
        # 2. the fleet reports while every controller is down: the broker queues each share
        log = work / "sim-ingest.log"
        t0 = time.time()
        with log.open("wb") as out:
            sim = subprocess.run(sim_command(broker.port, args.devices, args.processes,
                                             args.report_s, "--duration-s",
                                             str(args.duration_s),
                                             "--connect-rate", str(args.connect_rate)),
                                 stdout=out, stderr=subprocess.STDOUT, check=False)
        summary = summary_of(log)
        sent = {"telemetry": int(summary["counts"].get("telemetry", 0)),
                "profile": int(summary["counts"].get("profiles", 0))}
        print(json.dumps({"phase": "simulator", "exit": sim.returncode, "sent": sent,
                          "wall_s": round(time.time() - t0, 1),
                          "peak_online": summary.get("peak_online"),
                          "late": summary["counts"].get("telemetry_late", 0)}), flush=True)
        # 3. one group at a time drains its queues
        rows: list[dict[str, Any]] = []
        for i, n in enumerate(counts):
            members = groups[n]
            url = urls[i]
            busy0, broker0 = busy_seconds(), cpu_seconds(broker.process.pid)
            start = time.monotonic()
            for ctl in members:
                ctl.start()
            pids = [ctl.proc.pid for ctl in members if ctl.proc is not None]
            cpu: dict[int, float] = {}
            first: Optional[float] = None
            stored = stored_reports(url)
            deadline = start + args.timeout
            while time.monotonic() < deadline:
                for pid in pids:
                    with contextlib.suppress(OSError, ValueError):
                        cpu[pid] = cpu_seconds(pid)
                stored = stored_reports(url)
                if first is None and sum(stored.values()) > 0:
                    first = time.monotonic()
                if all(stored[k] >= sent[k] for k in KINDS):
                    break
                time.sleep(0.25)
            end = time.monotonic()
            busy = busy_seconds() - busy0
            broker_cpu = cpu_seconds(broker.process.pid) - broker0
            results = [ctl.stop() for ctl in members]
            ingested = {k: sum(int(r.get("ingested", {}).get(k, 0)) for r in results)
                        for k in KINDS}
            total_sent = sum(sent.values())
            drain = end - start
            ctl_cpu = sum(cpu.values())
            row = {"phase": "ingest", "controllers": n, "sent": total_sent,
                   "stored": sum(min(stored[k], sent[k]) for k in KINDS),
                   # above what the simulator counted: reports the broker took whose PUBACK the
                   # simulator did not see (it counts a report only once acknowledged)
                   "stored_beyond_sent": sum(max(0, stored[k] - sent[k]) for k in KINDS),
                   "lost": sum(max(0, sent[k] - stored[k]) for k in KINDS),
                   "double_counted": sum(ingested[k] - sent[k] for k in KINDS),
                   "per_controller": [sum(int(r.get("ingested", {}).get(k, 0)) for k in KINDS)
                                      for r in results],
                   "drain_s": round(drain, 2),
                   "from_first_s": round(end - first, 2) if first else None,
                   # from the first report stored to the last: the processes' start-up (imports,
                   # connect) is out of it; with it: total / drain_s
                   "stored_per_s": (round(total_sent / (end - first), 1) if first and end > first
                                    else None),
                   "with_startup_per_s": round(total_sent / drain, 1) if drain else None,
                   "controllers_cpu_s": round(ctl_cpu, 1),
                   "mosquitto_cpu_s": round(broker_cpu, 1),
                   "rest_cpu_s": round(busy - ctl_cpu - broker_cpu, 1),
                   "machine_busy_s": round(busy, 1)}
            rows.append(row)
            print(json.dumps(row), flush=True)
        base = rows[0]["stored_per_s"] or 1.0
        for row in rows:
            row["x_baseline"] = round((row["stored_per_s"] or 0.0) / base, 2)
        return rows


def rollout_phase(args: argparse.Namespace, work: Path, broker: Broker) -> dict[str, Any]:
    devices = args.rollout_devices
    root_path = work / "root.json"
    root_path.write_bytes(root_envelope(new_root(
        [ROOT_KEY.public_key], [RELEASE_KEY.public_key], release_threshold=1,
        expires=BUILD_TIME + 10 * 365 * 86400)).sign(ROOT_KEY).to_json())
    model = work / "model.tflite"
    model.write_bytes(model_bytes(args.model_kib))
    with databases(args.pg_url, 1) as (url,), open_store(url) as store:
        ctls = [Ctl(f"r-{k}", "roll", url, broker.port, work / f"r-{k}.log").start()
                for k in (1, 2)]
        wait_for(lambda: all(ctl.connected() for ctl in ctls), args.timeout)
        log = work / "sim-rollout.log"
        with log.open("wb") as out:
            sim = subprocess.Popen(sim_command(broker.port, devices, args.processes,
                                               args.rollout_report_s, "--root", str(root_path),
                                               "--connect-rate", str(args.connect_rate)),
                                   stdout=out, stderr=subprocess.STDOUT)
        result: dict[str, Any] = {"phase": "rollout", "devices": devices}
        try:
            registered = wait_for(lambda: scalar(url, "SELECT COUNT(DISTINCT device_id) FROM "
                                                      "profiles") >= devices, args.timeout)
            result["registered"] = registered
            bundle = build_release([model], name="intent", version=2, device_classes=[PI4],
                                   issued=BUILD_TIME + 86400, keys=[RELEASE_KEY])
            store.add_release(bundle.release_id, "intent", 2, bundle.envelope.to_json(),
                              dict(bundle.files), bundle.manifest.to_dict())
            spec = RolloutSpec(rollout_id="r-kill", release_id=bundle.release_id, model="intent",
                               version=2, previous_version=1, waves=parse_waves("100%"),
                               success_threshold=0.9, failure_threshold=0.1,
                               wave_timeout_s=args.timeout, chunk_size=4096)
            created = time.monotonic()
            store.create_rollout("r-kill", bundle.release_id, spec.to_dict())
            wait_for(lambda: scalar(url, "SELECT COUNT(*) FROM ota_status") >= args.kill_after,
                     args.timeout)
            lease = store.get_lease("rollout:r-kill")
            victim = next(c for c in ctls if lease is None or c.id == lease.owner)
            survivor = next(c for c in ctls if c is not victim)
            killed = time.monotonic()
            result["finals_at_kill"] = scalar(url, "SELECT COUNT(*) FROM ota_status WHERE "
                                                   "is_final = 1")
            victim.kill()

            def taken_over() -> bool:
                held = store.get_lease("rollout:r-kill")
                return held is not None and held.owner == survivor.id

            result["taken_over_s"] = (round(time.monotonic() - killed, 1)
                                      if wait_for(taken_over, 60) else None)
            victim.start()  # as systemd's Restart= would, with the same id

            def settled() -> bool:
                record = store.get_rollout("r-kill")
                state = RolloutState.from_stored(record.state) if record else RolloutState()
                return state.finished and not any(d.status in ("sent", "rollback_sent")
                                                  for d in state.devices.values())

            done = wait_for(settled, args.timeout, step=1.0)
            record = store.get_rollout("r-kill")
            state = RolloutState.from_stored(record.state) if record else RolloutState()
            result.update({"completed": done and state.state == "completed",
                           "state": state.state,
                           "done_s": round(time.monotonic() - created, 1),
                           "installed": sum(1 for d in state.devices.values()
                                            if d.status == "installed")})
        finally:
            if sim.poll() is None:
                sim.send_signal(signal.SIGTERM)
                sim.wait(120)
            for ctl in ctls:
                ctl.stop()
        summary = summary_of(log)
        sent = int(summary.get("counts", {}).get("ota_statuses", 0))
        rows = scalar(url, "SELECT COUNT(*) FROM ota_status")
        result.update({"ota_statuses_sent": sent, "ota_status_rows": rows,
                       "lost": max(0, sent - rows),
                       "finals_stored": scalar(url, "SELECT COUNT(DISTINCT device_id) FROM "
                                                    "ota_status WHERE is_final = 1")})
        print(json.dumps(result), flush=True)
        return result


def main(argv: Optional[list[str]] = None) -> int:
    """Run the ingest phase for each N, then the rollout with a killed controller."""
    parser = argparse.ArgumentParser(prog="python -m fleetlite.tools.bench.bench_scale_out",
                                     description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--report-s", type=float, default=30.0)
    parser.add_argument("--duration-s", type=float, default=60.0)
    parser.add_argument("--connect-rate", type=float, default=300.0)
    parser.add_argument("--controllers", default="1,2,3",
                        type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--rollout-devices", type=int, default=1000)
    parser.add_argument("--rollout-report-s", type=float, default=60.0)
    parser.add_argument("--model-kib", type=int, default=64)
    parser.add_argument("--kill-after", type=int, default=200,
                        help="OTA statuses stored before the lease holder is killed")
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--pg-url", default=os.environ.get("FLEETLITE_TEST_PG_URL", ""))
    args = parser.parse_args(argv)
    if not args.pg_url:
        print("error: give --pg-url or FLEETLITE_TEST_PG_URL (bash tools/postgres.sh)",
              file=sys.stderr)
        return 2
    raise_fd_limit()
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="fleetlite-scale-") as tmp:
        work = Path(tmp)
        broker = Broker(work, max_queued=2_000_000)
        try:
            rows = ingest_phase(args, work, broker) if args.controllers else []
            rollout = rollout_phase(args, work, broker) if args.rollout_devices else None
        finally:
            broker.stop()
    print(f"\nstarted {started}, load average {load:.2f}; {args.devices} devices, "
          f"{args.processes} simulator process(es), telemetry every {args.report_s:g} s for "
          f"{args.duration_s:g} s, queued, then drained per N")
    print("| N | reports | stored/s | x N=1 | lost | double counted | per controller | "
          "controllers CPU | Mosquitto CPU | rest CPU | drain (with start-up) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['controllers']} | {r['sent']:,} | {r['stored_per_s']:,} | "
              f"{r['x_baseline']} | {r['lost']} | {r['double_counted']} | "
              f"{', '.join(f'{x:,}' for x in r['per_controller'])} | "
              f"{r['controllers_cpu_s']} s | {r['mosquitto_cpu_s']} s | {r['rest_cpu_s']} s | "
              f"{r['from_first_s']} s ({r['drain_s']} s) |")
    if rollout:
        print(f"\nrollout to {rollout['devices']} devices, lease holder killed: "
              f"{json.dumps(rollout)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
