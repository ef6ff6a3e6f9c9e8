"""Processes the product starts end with it, even when it is killed with SIGKILL
(:mod:`fleetlite.sdk.child_lifetime`): the demo's broker and agents, the agent's isolated model
checks, smoke tests and isolated profiles; and a child started from a worker thread that then
ends keeps running while its process lives. Real processes, identified by pid before the kill."""

from __future__ import annotations

import importlib.util
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from fleetlite.fleet.broker import mosquitto_path
from fleetlite.sdk.child_lifetime import _die_with, start_tied

BIN = Path(sys.executable).parent
MODELS = Path(__file__).resolve().parent / "fixtures" / "models"
DEVICES = ("gw-pi4-01", "gw-pi4-02", "gw-jetson-01", "gw-x86-01")  # fleet/demo.py's four

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="children are tied to their parent on Linux only")


def _wait_for(what: str, condition: Callable[[], object], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:g} s")
        time.sleep(0.05)


def _alive(process: psutil.Process) -> bool:
    """Running, and not merely a zombie nobody reaps (an orphan's new parent may never wait)."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _assert_all_end(processes: list[psutil.Process], timeout: float) -> None:
    try:
        _wait_for("the children to end", lambda: not any(_alive(p) for p in processes), timeout)
    except AssertionError:
        left = [f"{p.pid} {' '.join(p.cmdline())}" for p in processes if _alive(p)]
        raise AssertionError(f"orphans left {timeout:g} s after the parent's SIGKILL: "
                             f"{left}") from None
    finally:
        for process in processes:  # never leak an orphan into the rest of the suite
            if _alive(process):
                process.kill()


@pytest.mark.parametrize("broker", ["mosquitto", "embedded"])
def test_demo_killed_with_sigkill_leaves_no_broker_or_agent(tmp_path: Path, broker: str) -> None:
    if broker == "mosquitto" and mosquitto_path() is None:
        pytest.skip("Mosquitto is not installed: sudo apt-get install mosquitto")
    if broker == "embedded" and importlib.util.find_spec("amqtt") is None:
        pytest.skip("the embedded broker (amqtt) is not installed; it needs Python 3.10+")
    demo = subprocess.Popen([str(BIN / "fleetlite"), "demo", "--keep", "--out", str(tmp_path),
                             "--local-broker", broker],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue[str] = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(line) for line in demo.stdout or ()],
                              daemon=True)
    reader.start()
    seen: list[str] = []
    try:
        agent_pids: set[int] = set()
        deadline = time.monotonic() + 120
        while len(agent_pids) < len(DEVICES):
            assert time.monotonic() < deadline and demo.poll() is None, "".join(seen)[-4000:]
            try:
                seen.append(lines.get(timeout=1))
            except queue.Empty:
                continue
            match = re.match(r"\s+agent (\S+) .* pid (\d+)$", seen[-1])
            if match:
                agent_pids.add(int(match.group(2)))
        sockets = [tmp_path / "agents" / device / "agent.sock" for device in DEVICES]
        _wait_for("the agents' local sockets", lambda: all(s.exists() for s in sockets), 120)

        children = psutil.Process(demo.pid).children(recursive=True)
        direct = {p.pid for p in psutil.Process(demo.pid).children()}
        brokers = [p for p in children if p.pid in direct - agent_pids]
        assert agent_pids <= direct, (agent_pids, direct)
        assert len(brokers) == 1 and re.search(r"mosquitto|fleetlite\.fleet\.broker",
                                               " ".join(brokers[0].cmdline())), brokers
    finally:
        demo.kill()  # SIGKILL: no handler, no finally, no clean-up runs in the demo
        demo.wait(10)
        reader.join(10)  # the pipe ends with the demo: its children write to their logs
        if demo.stdout is not None:
            demo.stdout.close()
    _assert_all_end(children, timeout=60)


_PARENT = """
import sys, threading
from fleetlite.sdk.runtime.isolated import check_model
from fleetlite.agent.profiler import profile_model_isolated
from fleetlite.agent.smoke_test import run_smoke_test
from fleetlite.sdk.device_class import find_device_class
from fleetlite.sdk.manifest import Tolerance

kind, path = sys.argv[1], sys.argv[2]
budgets = find_device_class("raspberry-pi-4").budgets
start = {
    "isolated": lambda: check_model(path),
    "smoke_test": lambda: run_smoke_test(path, path, tolerance=Tolerance(), budgets=budgets,
                                         num_threads=1),
    "profiler": lambda: profile_model_isolated(path, max_runs=10_000_000, min_seconds=600,
                                               max_seconds=600, timeout=900),
}[kind]
threading.Thread(target=start).start()  # from a worker thread, as the agent does
threading.Event().wait()
"""


CHILD_MODULES = {"isolated": "fleetlite.sdk.runtime.isolated",
                 "smoke_test": "fleetlite.agent.smoke_test", "profiler": "fleetlite.agent.profiler"}


@pytest.mark.parametrize("kind", ["isolated", "smoke_test", "profiler"])
def test_agent_model_child_ends_when_the_agent_is_killed(tmp_path: Path, kind: str) -> None:
    if kind == "profiler":  # a real model, profiled for ten minutes
        model = MODELS / "heavy_mlp.tflite"
    else:  # a model file that blocks the child's read for ever
        model = tmp_path / "model.tflite"
        os.mkfifo(model)
    parent = subprocess.Popen([sys.executable, "-c", _PARENT, kind, str(model)])
    try:
        found: list[psutil.Process] = []

        def child_started() -> bool:
            assert parent.poll() is None, f"the parent exited with {parent.returncode}"
            found[:] = [p for p in psutil.Process(parent.pid).children()
                        if CHILD_MODULES[kind] in p.cmdline()]
            return bool(found)

        _wait_for(f"the {kind} child", child_started, 60)
    finally:
        parent.kill()
        parent.wait(10)
    _assert_all_end(found, timeout=30)


def _thread_ended(native_id: int) -> bool:
    """Whether the OS thread is gone (``join`` returns a moment before it is)."""
    return not Path(f"/proc/self/task/{native_id}").exists()


def _echo_from_worker_thread(start: Callable[[], subprocess.Popen[bytes]]
                             ) -> subprocess.Popen[bytes]:
    started: list[subprocess.Popen[bytes]] = []
    ids: list[int] = []

    def work() -> None:
        ids.append(threading.get_native_id())
        started.append(start())

    worker = threading.Thread(target=work)
    worker.start()
    worker.join()
    _wait_for("the worker thread to end", lambda: _thread_ended(ids[0]), 10)
    return started[0]


ECHO = [sys.executable, "-c", "import sys\nfor line in sys.stdin: print(line, end='', flush=True)"]


def test_child_started_from_a_worker_thread_outlives_the_thread() -> None:
    child = _echo_from_worker_thread(
        lambda: start_tied(ECHO, stdin=subprocess.PIPE, stdout=subprocess.PIPE))
    with child:
        assert child.stdin is not None and child.stdout is not None
        child.stdin.write(b"still here\n")
        child.stdin.flush()
        assert child.stdout.readline() == b"still here\n"  # alive after its thread ended
        assert child.poll() is None
        child.stdin.close()
        assert child.wait(10) == 0


def test_the_thread_trap_is_real_a_child_forked_by_the_worker_itself_dies_with_it() -> None:
    """Why start_tied forks on a long-lived thread: the kernel ties the child to the thread."""
    tie = _die_with(os.getpid(), signal.SIGKILL)
    child = _echo_from_worker_thread(lambda: subprocess.Popen(
        ECHO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, preexec_fn=tie))  # noqa: PLW1509
    with child:
        assert child.wait(10) == -signal.SIGKILL
