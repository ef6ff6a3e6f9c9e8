"""Streaming generation through the agent's local socket (agent/local_api.py ``generate``) with
the project's real LM (tests/fixtures/lm/home_lm): a client sees its first token before the
generation ends, can cancel, gets ``busy`` (not a hang) when the queue is full, and 10
concurrent clients all get the reply the model gives greedily; only counts and timings are kept.
"""

from __future__ import annotations

import json
import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fleetlite.agent.language_models import LanguageModels, ServedLm
from fleetlite.agent.lm_service import LmService
from fleetlite.agent.local_api import LocalApiServer
from fleetlite.agent.model_service import ModelService
from fleetlite.sdk import local_client as wire
from fleetlite.sdk.errors import LocalApiError
from fleetlite.sdk.local_client import LocalClient
from tests.test_fleet_e2e import wait_until
from tests.test_generation import load, reference

PROMPT = "turn off the kitchen lights"


def expected_reply(prompt: str) -> str:
    """The float reference's greedy reply, recorded from TensorFlow when the model was made."""
    case = next(c for c in reference("home_lm")["prompts"] if c["prompt"] == prompt)
    return str(case["reply"])


@pytest.fixture(scope="module")
def lms() -> LanguageModels:
    served = LanguageModels()
    served.add(ServedLm("home-lm", LmService(load("home_lm"), max_queue=2), version=1))
    return served


@pytest.fixture
def server(lms: LanguageModels, tmp_path: Path) -> Iterator[LocalApiServer]:
    with LocalApiServer(tmp_path / "agent.sock", ModelService(), language_models=lms) as api:
        yield api


def test_a_reply_streams_and_matches_the_reference(server: LocalApiServer) -> None:
    with LocalClient(server.path, timeout=60) as client:
        stream = client.generate("home-lm", PROMPT)
        pieces = list(stream)
        assert len(pieces) > 1  # streamed piece by piece, not in one answer
        assert "".join(pieces) == expected_reply(PROMPT)
        assert stream.result is not None
        assert stream.result["text"] == expected_reply(PROMPT)
        assert stream.result["stop_reason"] == "stop_token"
        stats = stream.result["stats"]
        assert stats["generated_tokens"] >= len(pieces)
        assert stats["time_to_first_token_ms"] > 0 and stats["decode_tokens_per_s"] > 0
        # the connection serves the next request
        assert client.ping()["ok"]
        listed = {m["name"]: m for m in client.models()}
        assert listed["home-lm"]["kind"] == "generative"
    counts = server.language_models.stats()["home-lm"]
    assert counts["generations"] >= 1 and counts["generated_tokens"] >= len(pieces)
    assert PROMPT not in json.dumps(counts) and "kitchen" not in json.dumps(counts)


class Frames:
    """Collects what ``send_frame`` writes, to send several frames in one write."""

    def __init__(self) -> None:
        self.data = b""

    def sendall(self, data: bytes) -> None:
        self.data += bytes(data)


def test_the_first_token_arrives_before_the_generation_ends(server: LocalApiServer) -> None:
    # the cancel is already waiting on the socket when the first token goes out: the server
    # reads it right after sending that token, so the generation stops after one token. The
    # client thus had its first token while the generation could still go on.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(server.path))
        sock.settimeout(60)
        # both frames in one write: on a busy machine two writes let the server send its first
        # token (and read no cancel yet) between them
        both = Frames()
        wire.send_frame(both, {"op": "generate", "model": "home-lm", "prompt": PROMPT,
                               "params": {"max_tokens": 64}, "id": 1})
        wire.send_frame(both, {"op": "cancel", "id": 1})
        sock.sendall(both.data)
        frames = []
        while not frames or frames[-1].get("event") != "done":
            frame, _ = wire.recv_frame(sock, tensors_key="outputs") or ({}, b"")
            frames.append(frame)
    assert [f["event"] for f in frames] == ["token", "done"]
    assert frames[0]["text"] and expected_reply(PROMPT).startswith(frames[0]["text"])
    assert frames[-1]["stop_reason"] == "cancelled"
    assert frames[-1]["stats"]["generated_tokens"] == 1


def test_a_client_can_cancel(server: LocalApiServer) -> None:
    # a long, sampled reply (this seed runs to the token limit) is cancelled after its first
    # piece: it ends early with the reason, and the connection is still in step
    babble = {"temperature": 5.0, "seed": 11, "max_tokens": 100}
    with LocalClient(server.path, timeout=60) as client:
        full = client.generate("home-lm", PROMPT, **babble)
        full.text()
        assert full.result is not None and full.result["stop_reason"] == "max_tokens"
        stream = client.generate("home-lm", PROMPT, **babble)
        next(stream)
        stream.cancel()
        list(stream)
        assert stream.result is not None and stream.result["stop_reason"] == "cancelled"
        assert stream.result["stats"]["generated_tokens"] < 100
        assert client.ping()["ok"]


def test_a_full_queue_answers_busy_not_a_hang(server: LocalApiServer) -> None:
    # the engine is held by a generation in this process; two socket clients wait their turn
    # (max_queue=2); a third is told busy at once
    service = server.language_models.get("home-lm").service
    held = service.generate(service.engine.encode_prompt(PROMPT))
    next(held)
    results: list[str] = []
    waiters = [threading.Thread(target=reply_of, args=(server.path, results))
               for _ in range(2)]
    for thread in waiters:
        thread.start()
    try:
        wait_until(lambda: service.waiting == 2, 30, "two callers waiting")
        with LocalClient(server.path, timeout=60) as late, pytest.raises(LocalApiError) as info:
            late.generate("home-lm", PROMPT)
        assert info.value.code == wire.BUSY and "max_queue=2" in str(info.value)
    finally:
        held.close()
        for thread in waiters:
            thread.join(60)
    assert results == [expected_reply(PROMPT)] * 2  # the waiters were served once it was free


def reply_of(path: Path, results: list[str] | None = None) -> str:
    with LocalClient(path, timeout=120) as client:
        text = client.generate("home-lm", PROMPT).text()
    if results is not None:
        results.append(text)
    return text


def test_ten_concurrent_clients_all_get_the_reply(lms: LanguageModels, tmp_path: Path) -> None:
    served = LanguageModels()
    served.add(ServedLm("home-lm", LmService(lms.get("home-lm").service.engine, max_queue=10)))
    results: list[str] = []
    with LocalApiServer(tmp_path / "agent.sock", ModelService(), language_models=served) as api:
        threads = [threading.Thread(target=reply_of, args=(api.path, results))
                   for _ in range(10)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(300)
    assert results == [expected_reply(PROMPT)] * 10


@pytest.mark.parametrize(("header", "code"), [
    ({"op": "generate", "model": "nope", "prompt": "x"}, wire.UNKNOWN_MODEL),
    ({"op": "generate", "model": "home-lm"}, wire.BAD_REQUEST),
    ({"op": "generate", "model": "home-lm", "prompt": 7}, wire.BAD_REQUEST),
    ({"op": "generate", "model": "home-lm", "prompt": "x", "params": {"bogus": 1}},
     wire.BAD_REQUEST),
    ({"op": "generate", "model": "home-lm", "prompt": "x", "params": {"top_k": "3"}},
     wire.BAD_REQUEST),
    ({"op": "generate", "model": "home-lm", "prompt": "x", "params": {"temperature": -1}},
     wire.INPUT_MISMATCH),
    ({"op": "generate", "model": "home-lm", "prompt": "x " * 500}, wire.INPUT_MISMATCH),
])
def test_bad_generate_requests_get_a_clear_error(
        server: LocalApiServer, header: dict[str, Any], code: str) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(server.path))
        sock.settimeout(60)
        wire.send_frame(sock, {**header, "id": "q"})
        answer, _ = wire.recv_frame(sock, tensors_key="outputs") or ({}, b"")
        assert answer["ok"] is False and answer["error_code"] == code, answer
        assert answer["id"] == "q" and not answer.get("close")
        wire.send_frame(sock, {"op": "ping", "id": 2})  # still in step
        pong, _ = wire.recv_frame(sock, tensors_key="outputs") or ({}, b"")
        assert pong["ok"] and pong["id"] == 2


def test_other_requests_during_a_stream_are_refused_and_the_stream_goes_on(
        server: LocalApiServer) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(server.path))
        sock.settimeout(60)
        # a long stream (100 sampled tokens): the short reply to PROMPT could end before the
        # server read the ping on a busy machine, and a ping after a stream is answered
        wire.send_frame(sock, {"op": "generate", "model": "home-lm", "prompt": PROMPT, "id": 1,
                               "params": {"temperature": 5.0, "seed": 11, "max_tokens": 100}})
        wire.send_frame(sock, {"op": "ping", "id": 2})
        frames = []
        while not frames or frames[-1].get("event") != "done":
            frame, _ = wire.recv_frame(sock, tensors_key="outputs") or ({}, b"")
            frames.append(frame)
        refused = [f for f in frames if f.get("id") == 2]
        assert refused and refused[0]["error_code"] == wire.BAD_REQUEST
        assert frames[-1]["stop_reason"] == "max_tokens"  # the stream went on to its end


def test_a_client_that_disappears_frees_the_model(server: LocalApiServer) -> None:
    service = server.language_models.get("home-lm").service
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(server.path))
    header = json.dumps({"op": "generate", "model": "home-lm", "prompt": PROMPT,
                         "params": {"max_tokens": 64}}).encode()
    sock.sendall(struct.pack("!I", len(header)) + header)
    sock.recv(1)  # the first frame started: the generation runs
    sock.close()
    # the next caller gets the engine (no leftover holder), and a full reply
    assert reply_of(server.path) == expected_reply(PROMPT)
    assert service.waiting == 0


def test_a_cancel_that_crossed_its_done_gets_no_answer(server: LocalApiServer) -> None:
    # the client cancels just as the generation ends: the agent ignores it, so the next answer
    # on the connection is the next request's
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(server.path))
        sock.settimeout(60)
        wire.send_frame(sock, {"op": "generate", "model": "home-lm", "prompt": PROMPT, "id": 1})
        event = ""
        while event != "done":
            frame, _ = wire.recv_frame(sock, tensors_key="outputs") or ({}, b"")
            event = frame["event"]
        wire.send_frame(sock, {"op": "cancel", "id": 1})
        wire.send_frame(sock, {"op": "ping", "id": 2})
        pong, _ = wire.recv_frame(sock, tensors_key="outputs") or ({}, b"")
        assert pong["ok"] and pong["id"] == 2, pong
