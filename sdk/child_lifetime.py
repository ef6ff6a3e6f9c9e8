"""Start child processes that end with their parent, even when the parent is killed with SIGKILL.

Every process FleetLite starts goes through here: the agent's isolated model checks, smoke tests
and isolated profiles, the demo's agents and the local broker (Mosquitto or the embedded one).

How: on Linux each child asks the kernel, between ``fork`` and ``exec``, to send it a signal when
its parent dies (``prctl(PR_SET_PDEATHSIG)``), then checks that its parent is still the process
that forked it. A parent that died before the request was made has already handed the child to
init, no signal will ever come, so the child exits at once. The setting survives ``exec``, so it
works for any program, Mosquitto included; the kernel clears it only for set-user-ID binaries and
for a child that changes its user or group (the local Mosquitto is told ``user root`` when started
as root, so it keeps its user).

The one trap: the kernel sends that signal when the *thread* that forked the child ends, not the
process. The agent starts its model checks from worker threads, and a library caller may start
the broker from a thread that ends long before the broker should. So no caller's thread forks:
:func:`start_tied` hands the ``Popen`` call to one daemon thread that lives as long as the process
and waits for it. A thread that ends normally takes no child with it; a process that dies, however
it dies, takes all of them.

Why not a pipe the child watches for end of file: Mosquitto is not ours to change, and a Python
child stuck in the TFLite interpreter's C code, holding the interpreter lock, could not read it.

Elsewhere than Linux (a developer's macOS) there is no such call: children start normally, and only
the parent's own clean-up (Ctrl-C, SIGTERM) stops them.
"""

from __future__ import annotations

import ctypes
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any, Callable, Optional

_PR_SET_PDEATHSIG = 1
_Job = tuple[Callable[[], "subprocess.Popen[bytes]"], "Future[subprocess.Popen[bytes]]"]


def _find_prctl() -> Optional[Any]:
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    return prctl


# Looked up once, in the parent: the child between fork and exec should do as little as it can.
_PRCTL = _find_prctl()


def _die_with(parent: int, signum: int) -> Callable[[], None]:
    """The ``preexec_fn`` that ties a child to ``parent``'s forking thread."""
    prctl = _PRCTL
    assert prctl is not None

    def tie() -> None:
        if prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        if os.getppid() != parent:  # the parent died before the request: no signal will come
            os._exit(1)

    return tie


class _Spawner:
    """One daemon thread that forks every child and never ends while the process lives."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pid = -1
        self._jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()

    def submit(self, start: Callable[[], subprocess.Popen[bytes]]) -> subprocess.Popen[bytes]:
        with self._lock:
            if self._pid != os.getpid():  # first use, or a forked copy that lost the thread
                self._pid = os.getpid()
                self._jobs = queue.SimpleQueue()
                threading.Thread(target=self._serve, args=(self._jobs,), daemon=True,
                                 name="fleetlite-child-spawner").start()
            jobs = self._jobs
        future: Future[subprocess.Popen[bytes]] = Future()
        jobs.put((start, future))
        return future.result()

    @staticmethod
    def _serve(jobs: queue.SimpleQueue[_Job]) -> None:
        while True:
            start, future = jobs.get()
            try:
                future.set_result(start())
            except BaseException as exc:  # handed to the caller's thread, which raises it
                future.set_exception(exc)


_SPAWNER = _Spawner()


def start_tied(
    command: Sequence[str], *, death_signal: int = signal.SIGKILL, **popen: Any
) -> subprocess.Popen[bytes]:
    """``subprocess.Popen(command, **popen)`` for a child that gets ``death_signal`` when this
    process dies.

    SIGKILL (the default) suits children with nothing to clean up, such as a model check;
    services that should shut down cleanly (the broker, the demo's agents) take SIGTERM.
    """
    args = list(command)
    if _PRCTL is None:
        return subprocess.Popen(args, **popen)
    tie = _die_with(os.getpid(), int(death_signal))
    # preexec_fn can deadlock a child on a lock another thread held at fork; tie() takes none
    # (two system calls through a function pointer looked up before the fork)
    return _SPAWNER.submit(
        lambda: subprocess.Popen(args, preexec_fn=tie, **popen)  # noqa: PLW1509
    )


def run_tied(
    command: Sequence[str], *, input: bytes, timeout: float, death_signal: int = signal.SIGKILL
) -> subprocess.CompletedProcess[bytes]:
    """``subprocess.run(command, input=input, capture_output=True, timeout=timeout)`` with a
    child started by :func:`start_tied`: killed on timeout (raising ``TimeoutExpired``) and when
    this process dies."""
    with start_tied(command, death_signal=death_signal, stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        try:
            stdout, stderr = proc.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            # not communicate(): a grandchild that inherited the pipes would keep them open, and
            # the caller waiting, long after the timeout
            proc.wait()
            raise
        except BaseException:
            proc.kill()
            raise
    return subprocess.CompletedProcess(list(command), proc.returncode, stdout, stderr)
