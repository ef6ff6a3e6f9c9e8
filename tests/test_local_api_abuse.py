"""The local socket under abuse (agent/local_api.py's limits): a local process is outside input.

- 32 connections that each declare a 64 MiB tensor and send nothing more cost (almost) no memory:
  bytes are held only as they arrive;
- the bytes in flight across all connections are bounded: beyond the bound a request is `busy`;
- 32 clients trickling one byte a second cannot keep a normal client from being served: a share
  of the slots is kept, and a trickled request is cut at its deadline;
- idle connections make room for a new client instead of refusing it.
"""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from fleetlite.agent.errors import LocalApiSetupError
from fleetlite.agent.local_api import LocalApiServer
from fleetlite.agent.model_service import ModelService
from fleetlite.sdk import local_client as wire
from fleetlite.sdk.device_class import find_device_class
from fleetlite.sdk.errors import LocalApiError
from fleetlite.sdk.local_client import LocalClient
from tests.test_fleet_e2e import wait_until
from tests.test_local_api import service  # noqa: F401  (fixture)

MIB = 1024 * 1024
HOSTILE = 32


def declaring(nbytes: int) -> bytes:
    """The header of an infer request that declares ``nbytes`` of tensor data (none follows)."""
    header = json.dumps({"op": "infer", "model": "intent", "inputs": [
        {"name": "tokens", "dtype": "uint8", "shape": [nbytes], "nbytes": nbytes}]}).encode()
    return struct.pack("!I", len(header)) + header


@contextlib.contextmanager
def connections(path: Path, count: int) -> Iterator[list[socket.socket]]:
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(str(path))
            socks.append(sock)
        yield socks
    finally:
        for sock in socks:
            sock.close()


def refused_busy(sock: socket.socket) -> bool:
    """True if the server answered ``busy`` and closed; False if it is still reading."""
    sock.settimeout(0.0)
    try:
        response = wire.recv_frame(sock, tensors_key="outputs")
    except (BlockingIOError, TimeoutError):
        return False
    finally:
        sock.settimeout(None)
    return response is not None and response[0].get("error_code") == wire.BUSY


def test_declared_tensors_cost_no_memory_until_they_arrive(
        service: ModelService, tmp_path: Path) -> None:  # noqa: F811
    budget = find_device_class("small-arm-gateway").budgets.max_peak_rss_mb
    me = psutil.Process()
    with LocalApiServer(tmp_path / "agent.sock", service) as server:
        before = me.memory_info().rss
        with connections(server.path, HOSTILE) as socks:
            for sock in socks:
                sock.sendall(declaring(64 * MIB))
            # every connection is either reading its tensor bytes or was told busy
            kept = server.max_connections - server.reserved_slots
            wait_until(lambda: server.stats()["slow_requests"] == kept, 30,
                       f"{kept} connections reading their declared tensors")
            # a busy answer is read once: remember which sockets had it
            told: set[int] = set()

            def all_told() -> bool:
                told.update(i for i, s in enumerate(socks) if i not in told and refused_busy(s))
                return len(told) == HOSTILE - kept

            wait_until(all_told, 60, "the other connections told busy")
            grown_mb = (me.memory_info().rss - before) / MIB
            print(f"RSS grew {grown_mb:.1f} MiB for {HOSTILE} declared 64 MiB tensors")
            assert grown_mb < 16, grown_mb
            # a normal client is still served, and the process stays within the smallest class
            with LocalClient(server.path, timeout=30) as client:
                assert client.ping()["ok"]
            assert me.memory_info().rss / MIB < budget + 200  # pytest itself is ~200 MiB


def test_bytes_in_flight_are_bounded_across_connections(
        service: ModelService, tmp_path: Path) -> None:  # noqa: F811
    with LocalApiServer(tmp_path / "agent.sock", service, max_payload_bytes=8 * MIB,
                        max_inflight_bytes=10 * MIB) as server:
        with connections(server.path, 2) as (first, second):
            first.sendall(declaring(6 * MIB) + bytes(6 * MIB - 1))  # all but the last byte
            wait_until(lambda: server.stats()["inflight_bytes"] >= 6 * MIB - 1, 30,
                       "the first request's bytes held")
            # the second's bytes would pass the bound after 4 MiB: refused, not held
            sender = threading.Thread(target=send_quietly,
                                      args=(second, declaring(6 * MIB) + bytes(6 * MIB)))
            sender.start()
            header, _ = wire.recv_frame(second, tensors_key="outputs") or ({}, b"")
            sender.join(30)
            assert header["error_code"] == wire.BUSY and "limit" in header["error"]
            first.sendall(b"\0")  # the first request completes normally
            answer, _ = wire.recv_frame(first, tensors_key="outputs") or ({}, b"")
            assert answer["ok"] is False and answer["error_code"] != wire.BUSY
        wait_until(lambda: server.stats()["inflight_bytes"] == 0, 30, "every byte released")


def send_quietly(sock: socket.socket, data: bytes) -> None:
    with contextlib.suppress(OSError):  # the server may refuse and close midway
        sock.sendall(data)


def trickle(sock: socket.socket, data: bytes, stop: threading.Event) -> None:
    """Send one byte a second until ``stop`` or the server closes."""
    for byte in data:
        try:
            sock.sendall(bytes([byte]))
        except OSError:
            return
        if stop.wait(1.0):
            return


def test_trickling_clients_do_not_keep_a_normal_client_waiting(
        service: ModelService, tmp_path: Path) -> None:  # noqa: F811
    stop = threading.Event()
    with LocalApiServer(tmp_path / "agent.sock", service, request_timeout_s=5) as server, \
            connections(server.path, HOSTILE) as socks:
        threads = [threading.Thread(target=trickle, args=(s, declaring(4), stop), daemon=True)
                   for s in socks]
        for thread in threads:
            thread.start()
        try:
            kept = server.max_connections - server.reserved_slots
            wait_until(lambda: server.stats()["slow_requests"] == kept, 30,
                       f"{kept} trickling requests being received")
            # the trickling clients beyond those were refused; their slots free as the server
            # closes them (beside CPU hogs that lagged behind the first normal client)
            wait_until(lambda: server.stats()["connections_open"] == kept, 30,
                       f"the {HOSTILE - kept} trickling clients over the limit closed")
            for _ in range(3):
                started = time.monotonic()
                with LocalClient(server.path, timeout=30) as client:
                    assert client.ping()["ok"]
                print(f"served in {time.monotonic() - started:.3f} s beside {HOSTILE} "
                      "trickling clients")
            # a trickled request is cut at its deadline, with the reason
            wait_until(lambda: server.stats()["errors"].get(wire.TIMEOUT, 0) >= kept, 60,
                       "the trickled requests cut at their deadline")
        finally:
            stop.set()
            for thread in threads:
                thread.join(10)


def test_idle_connections_make_room_for_a_new_client(
        service: ModelService, tmp_path: Path) -> None:  # noqa: F811
    with LocalApiServer(tmp_path / "agent.sock", service, max_connections=4,
                        evict_idle_s=0.2) as server, connections(server.path, 4) as idle:
        wait_until(lambda: server.stats()["connections_open"] == 4, 30, "4 idle connections")
        # once they have been idle past evict_idle_s, a newcomer takes the longest-idle slot
        deadline = time.monotonic() + 30
        while True:
            try:
                with LocalClient(server.path, timeout=30) as client:
                    assert client.ping()["ok"]
                break
            except LocalApiError as exc:
                assert exc.code == wire.BUSY and time.monotonic() < deadline
        assert server.stats()["evicted_idle"] >= 1
        assert any(s.recv(1) == b"" for s in idle)  # the evicted one was closed


def test_the_limits_are_checked_when_the_server_is_made() -> None:
    with pytest.raises(LocalApiSetupError, match="reserved_slots"):
        LocalApiServer("/tmp/x.sock", ModelService(), max_connections=4, reserved_slots=4)
