"""How soon ``fleetlite events --follow`` shows a command a device refused (issue 12: "within a
second").

``python -m fleetlite.tools.bench.bench_events_follow [--rounds 15]`` starts a real Mosquitto on
a free loopback port, a real :class:`~fleetlite.fleet.controller.Controller` in this process
(``tick_s`` 0.2) on a SQLite store in a temporary directory, one real agent process
(``python -m fleetlite.agent.cli run``, with the project's ``intent_classifier.tflite``) and
``fleetlite events --follow --db sqlite:///...`` as a subprocess whose output it reads line by
line. Each round queues a command the agent refuses (``profile`` of a model it does not have,
a different name each round) in the store, as ``fleetlite devices profile`` does; the controller
publishes it, the agent refuses it and reports a ``command_rejected`` event. Per round, from the
event's ``ts`` (the agent's clock; the same machine):

- **stored**: to the controller storing the event (the event's ``received`` in the store), the
  baseline, measured in the same run;
- **follow**: to the event's line arriving on the follower's stdout (this process's clock).

It prints each round, then the median, p95 and max of both and their ratio follow/stored. One
warm-up round (not counted) first shows the follower is polling. Before each round the follower
is paused (SIGSTOP) for longer than its 0.2 s sleep, so its polls restart at a random moment
against the controller's tick: left alone, the two loops keep nearly the same phase for a whole
run, and every round would measure the same point of the poll. The agent reports at most
``_REJECTED_EVENTS`` (agent/daemon.py) refused commands a minute and folds the rest into the next
event: the rounds are spaced to stay two below that, and an event that says it folded others
(``not_reported_before``) is counted and shown. No assertion on time: re-run it on your hardware.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import random
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Optional

import yaml

from fleetlite.agent.daemon import _REJECTED_EVENTS
from fleetlite.fleet.controller import Controller
from fleetlite.fleet.store import EventRecord, Store, open_store
from fleetlite.tools.bench.bench_ingest import Broker
from fleetlite.tools.bench.children import stop_child

MODEL = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "models" / (
    "intent_classifier.tflite")
DEVICE = "gw-bench-1"
DEVICE_CLASS = "industrial-x86-gateway"
TICK_S = 0.2
ROUND_TIMEOUT_S = 15.0
# refused commands sent within any minute: two below the agent's limit, so none is folded
PER_MINUTE = _REJECTED_EVENTS - 2


@dataclass
class Round:
    queued: float  # time.time() when the command went into the store
    ts: float  # the event's ts (the agent's clock)
    received: float  # the event's received (the controller's clock)
    line_at: float  # the follower's line arrived here (this process)
    folded: int  # the event's not_reported_before

    @property
    def stored_ms(self) -> float:
        return (self.received - self.ts) * 1000

    @property
    def follow_ms(self) -> float:
        return (self.line_at - self.ts) * 1000

    @property
    def publish_ms(self) -> float:
        return (self.ts - self.queued) * 1000


class Lines:
    """A child's stdout read line by line without blocking: each complete line with the
    ``time.time()`` at which it arrived."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        self.proc = proc
        self.fd = proc.stdout.fileno()
        self.buffer = b""
        self.lines: deque[tuple[float, str]] = deque()

    def read(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for output and take what came."""
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return
        chunk = os.read(self.fd, 65536)
        at = time.time()
        if not chunk:
            raise SystemExit(f"the follower exited (code {self.proc.wait(5)})")
        self.buffer += chunk
        *complete, self.buffer = self.buffer.split(b"\n")
        self.lines.extend((at, line.decode(errors="replace")) for line in complete)

    def find(self, text: str) -> Optional[float]:
        """The arrival time of the first line read so far that contains ``text`` (the lines
        before it are dropped), or None."""
        while self.lines:
            at, line = self.lines.popleft()
            if text in line:
                return at
        return None


def write_agent_config(directory: Path, port: int) -> Path:
    config = {
        "device_id": DEVICE,
        "device_class": DEVICE_CLASS,
        "tags": {"site": "bench"},
        "broker": {"host": "127.0.0.1", "port": port, "keepalive_s": 10},
        "state_dir": str(directory / "state"),
        "intervals": {"telemetry_s": 60.0, "reconnect_min_s": 0.2, "reconnect_max_s": 1.0},
        "models": [{"name": "intent", "path": str(MODEL), "version": 1}],
    }
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "agent.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _stop(proc: Optional[subprocess.Popen[bytes]]) -> None:
    if proc is None:
        return
    if proc.poll() is None:
        proc.send_signal(signal.SIGCONT)  # if it was paused (see run)
    stop_child(proc, 10)
    if proc.stdout is not None:
        proc.stdout.close()


def _wait(what: str, check: Callable[[], bool], timeout: float,
          log: Optional[Path] = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
    raise SystemExit(f"{what} did not happen within {timeout:g} s\n{tail}")


def _rejected(store: Store, command_id: str, after_id: int) -> Optional[EventRecord]:
    """The command_rejected event the agent reported for ``command_id``, if stored."""
    for event in store.events(device_ids=[DEVICE], after_id=after_id, limit=1000):
        if event.kind == "command_rejected" and event.detail.get("command_id") == command_id:
            return event
    return None


@contextlib.contextmanager
def fleet(workdir: Path) -> Iterator[tuple[Store, Lines, subprocess.Popen[bytes]]]:
    """Broker, controller, agent and follower, running; each stopped on the way out, whatever
    happened."""
    with contextlib.ExitStack() as stack:
        broker = Broker(workdir, 1000)
        stack.callback(broker.stop)
        db = f"sqlite:///{workdir / 'fleet.db'}"
        store = stack.enter_context(open_store(db))  # migrates the file before the others
        controller_store = stack.enter_context(open_store(db))
        controller = Controller(controller_store, "127.0.0.1", broker.port, tick_s=TICK_S)
        stack.callback(controller.stop)
        controller.start()
        if not controller.connected.wait(10):
            raise SystemExit("the controller did not connect to the broker")
        agent_log = workdir / "agent.log"
        with agent_log.open("ab") as out:
            agent = subprocess.Popen(
                [sys.executable, "-m", "fleetlite.agent.cli", "run", "--config",
                 str(write_agent_config(workdir / "agent", broker.port))],
                stdout=out, stderr=out, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        stack.callback(_stop, agent)

        def online() -> bool:
            if agent.poll() is not None:
                raise SystemExit(f"the agent exited:\n{agent_log.read_text()[-3000:]}")
            device = store.get_device(DEVICE)
            return device is not None and device.online

        _wait("the agent coming online", online, 60, agent_log)
        with (workdir / "follower.log").open("ab") as err:
            follower = subprocess.Popen(
                [sys.executable, "-m", "fleetlite.fleet.cli", "events", "--follow", "--db", db],
                stdout=subprocess.PIPE, stderr=err)
        stack.callback(_stop, follower)
        yield store, Lines(follower), agent


def run(rounds: int, workdir: Path) -> tuple[list[Round], list[int]]:
    """The measured rounds, and the numbers of the rounds whose event or line never came."""
    token = uuid.uuid4().hex[:6]
    results: list[Round] = []
    missing: list[int] = []
    sent: deque[float] = deque()  # monotonic times of the refused commands, last minute
    with fleet(workdir) as (store, lines, agent):
        last_id = 0
        for n in range(rounds + 1):  # round 0: the warm-up
            now = time.monotonic()
            while sent and now - sent[0] > 61.0:
                sent.popleft()
            if len(sent) >= PER_MINUTE:
                time.sleep(61.0 - (now - sent[0]))
            # The controller publishes the command at its tick and the follower polls every
            # 0.2 s: left alone, the two loops keep nearly the same phase for the whole run and
            # every round measures the same point of the poll (one run gave ~80 ms to the line
            # in every round, the next ~190 ms). An operator starts following at any moment:
            # pause the follower for longer than its sleep, so its next poll starts when it is
            # continued, at a random moment against the controller's tick.
            lines.proc.send_signal(signal.SIGSTOP)
            try:
                time.sleep(random.uniform(0.25, 0.45))
            finally:
                lines.proc.send_signal(signal.SIGCONT)
            time.sleep(random.uniform(0.3, 0.7))
            model = f"absent-{token}-{n}"
            queued = time.time()
            command_id = store.queue_command(DEVICE, "profile", {"model": model},
                                             timeout_s=30, origin="bench")
            sent.append(time.monotonic())
            # the follower's output is read as it comes (its arrival time is the measurement);
            # the store is looked at in between (the event's own `received` is the other)
            event: Optional[EventRecord] = None
            at: Optional[float] = None
            deadline = time.monotonic() + ROUND_TIMEOUT_S
            while (event is None or at is None) and time.monotonic() < deadline:
                lines.read(0.01)
                if at is None:
                    at = lines.find(f"'{model}'")
                if event is None:
                    event = _rejected(store, command_id, last_id)
            if agent.poll() is not None:
                raise SystemExit(f"the agent exited during round {n}")
            if event is None or at is None:
                if n == 0:
                    raise SystemExit("the warm-up round's event never reached the "
                                     f"{'store' if event is None else 'follower'}")
                missing.append(n)
                continue
            last_id = event.id
            folded = int(event.detail.get("not_reported_before") or 0)
            if n:
                results.append(Round(queued, event.ts, event.received, at, folded))
            print(f"round {n:>2}{' (warm-up)' if n == 0 else ''}: queued -> event ts "
                  f"{(event.ts - queued) * 1000:6.1f} ms, ts -> stored "
                  f"{(event.received - event.ts) * 1000:6.1f} ms, ts -> follow line "
                  f"{(at - event.ts) * 1000:6.1f} ms"
                  + (f", {folded} folded before it" if folded else ""), flush=True)
    return results, missing


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between the closest ranks (numpy's default)."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def report(results: Sequence[Round], missing: Sequence[int]) -> None:
    print(f"\n# fleetlite events --follow: {len(results)} rounds, one agent, controller tick "
          f"{TICK_S:g} s, SQLite\n")
    print("| from the event's ts to | median ms | p95 ms | max ms |")
    print("| --- | ---: | ---: | ---: |")
    figures: dict[str, tuple[float, float, float]] = {}
    for name, values in (
            ("the controller stored it (baseline)", [r.stored_ms for r in results]),
            ("its line on the follower's stdout", [r.follow_ms for r in results])):
        figures[name] = (statistics.median(values), percentile(values, 0.95), max(values))
        median, p95, top = figures[name]
        print(f"| {name} | {median:.1f} | {p95:.1f} | {top:.1f} |")
    stored, follow = figures.values()
    print(f"| ratio follow/stored | {follow[0] / stored[0]:.2f}x | {follow[1] / stored[1]:.2f}x "
          f"| {follow[2] / stored[2]:.2f}x |")
    publish = [r.publish_ms for r in results]
    print(f"\nqueued in the store -> the agent's event ts: median "
          f"{statistics.median(publish):.1f} ms, max {max(publish):.1f} ms (the controller "
          f"publishes queued commands at its tick)")
    over = sum(r.follow_ms > 1000 for r in results)
    print(f"follow lines later than 1 s after the event's ts: {over} of {len(results)}")
    print(f"events that folded refused commands (not_reported_before > 0): "
          f"{sum(r.folded > 0 for r in results)}; rounds without an event or line within "
          f"{ROUND_TIMEOUT_S:g} s: {len(missing)}{' ' + str(list(missing)) if missing else ''}")


def _interrupt(signum: int, frame: Optional[FrameType]) -> None:
    raise KeyboardInterrupt


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fleetlite.tools.bench.bench_events_follow",
                                     description=" ".join((__doc__ or "").split("\n\n")[0].split()))
    parser.add_argument("--rounds", type=int, default=15,
                        help=f"measured rounds (default 15; after {PER_MINUTE - 1} they are "
                        f"spaced to send at most {PER_MINUTE} refused commands a minute, the "
                        "warm-up included)")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be positive")
    signal.signal(signal.SIGTERM, _interrupt)  # stopped like Ctrl-C: everything cleaned up
    load = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="fleetlite-bench-follow-") as tmp:
        workdir = Path(tmp)
        handler = logging.FileHandler(workdir / "controller.log")
        logging.basicConfig(level=logging.INFO, handlers=[handler])
        try:
            results, missing = run(args.rounds, workdir)
        except KeyboardInterrupt:  # the broker, agent and follower are stopped by now
            print("interrupted", file=sys.stderr)
            return 130
        finally:
            handler.close()
            logging.getLogger().removeHandler(handler)
    if not results:
        raise SystemExit(f"no round was measured: rounds {list(missing)} got no event or line")
    report(results, missing)
    print(f"load average before {load[0]:.2f}, after {os.getloadavg()[0]:.2f} "
          f"({os.cpu_count()} CPUs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
