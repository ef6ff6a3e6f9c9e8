"""The local socket API: real models, real Unix sockets, real threads.

A local application must get exactly what the runtime computes; hostile or broken frames must get
an error (or a closed connection) and leave the server serving.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import stat
import struct
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fleetlite.agent.errors import LocalApiSetupError
from fleetlite.agent.local_api import LocalApiServer
from fleetlite.agent.model_service import ModelService
from fleetlite.sdk import local_client as wire
from fleetlite.sdk.errors import FleetLiteError, LocalApiError
from fleetlite.sdk.local_client import LocalClient
from fleetlite.sdk.runtime.interpreter import load_model
from fleetlite.tools.models import two_in_two_out
from tests.test_model_service import MODEL_FILES, Scorer, hammer_through_swaps, sample_inputs

MODEL_NAMES = {
    "intent_classifier.tflite": "intent",
    "sensor_autoencoder.tflite": "sensor",
    "sensor_autoencoder_int8.tflite": "sensor-int8",
    "two_in_two_out.tflite": "pair",
}
SMALL_PAYLOAD_CAP = 1 << 20


@pytest.fixture
def service(models_dir: Path) -> ModelService:
    models = ModelService()
    for filename, name in MODEL_NAMES.items():
        models.activate(name, models_dir / filename, version=1)
    return models


@pytest.fixture
def server(service: ModelService, tmp_path: Path) -> Iterator[LocalApiServer]:
    with LocalApiServer(
        tmp_path / "agent.sock", service, max_payload_bytes=SMALL_PAYLOAD_CAP
    ) as running:
        yield running


@pytest.fixture
def client(server: LocalApiServer) -> Iterator[LocalClient]:
    with LocalClient(server.path, timeout=30) as connected:
        yield connected


# -- same answers as the runtime -------------------------------------------------------------


@pytest.mark.parametrize("filename", MODEL_FILES)
def test_a_local_app_gets_the_same_outputs_as_the_runtime(
    client: LocalClient, models_dir: Path, filename: str
) -> None:
    direct = load_model(models_dir / filename)
    for seed in range(5):
        inputs = sample_inputs(direct, seed)
        expected = direct.run(inputs)
        for given in (inputs, list(inputs.values())):
            got = client.infer(MODEL_NAMES[filename], given)
            assert list(got) == direct.output_names
            for name, array in expected.items():
                assert got[name].dtype == array.dtype and got[name].shape == array.shape
                np.testing.assert_array_equal(got[name], array)
                assert got[name].tobytes() == array.tobytes()
    if len(direct.inputs) == 1:
        (single,) = sample_inputs(direct, 99).values()
        np.testing.assert_array_equal(
            client.infer(MODEL_NAMES[filename], single)[direct.output_names[0]],
            direct.run(single)[direct.output_names[0]],
        )


def test_ping_and_models(client: LocalClient, service: ModelService) -> None:
    pong = client.ping()
    assert pong["ok"] and pong["pong"] and pong["v"] == wire.PROTOCOL_VERSION
    models = client.models()
    assert models == json.loads(json.dumps(service.describe()))
    assert [m["name"] for m in models] == sorted(MODEL_NAMES.values())


def test_errors_carry_the_servers_code(client: LocalClient) -> None:
    with pytest.raises(LocalApiError) as info:
        client.infer("no-such-model", np.zeros((1, 16), np.int32))
    assert info.value.code == wire.UNKNOWN_MODEL and "intent" in str(info.value)
    assert isinstance(info.value, FleetLiteError)
    with pytest.raises(LocalApiError) as info:
        client.infer("intent", np.zeros((1, 16), np.int64))
    assert info.value.code == wire.INPUT_MISMATCH and "int32" in info.value.detail
    with pytest.raises(LocalApiError) as info:
        client.infer("pair", {"a": np.zeros((1, 8), np.float32)})
    assert info.value.code == wire.INPUT_MISMATCH
    with pytest.raises(LocalApiError) as info:
        client.infer("intent", np.zeros((1, 16), np.complex64))
    assert info.value.code == wire.BAD_TENSOR  # refused before sending
    assert client.ping()["ok"]


def test_a_persistent_connection_serves_many_requests(
    client: LocalClient, server: LocalApiServer, models_dir: Path
) -> None:
    direct = load_model(models_dir / "sensor_autoencoder.tflite")
    for seed in range(300):
        inputs = sample_inputs(direct, seed)
        np.testing.assert_array_equal(
            client.infer("sensor", inputs)["reconstruction"], direct.run(inputs)["reconstruction"]
        )
    stats = server.stats()
    assert stats["connections_total"] == 1 and stats["requests"] == 300


def test_concurrent_clients(server: LocalApiServer, models_dir: Path) -> None:
    direct = {f: load_model(models_dir / f) for f in MODEL_FILES}
    shared = LocalClient(server.path)
    failures: list[BaseException] = []

    def work(worker: int) -> None:
        own = LocalClient(server.path)
        try:
            for i in range(40):
                filename = MODEL_FILES[(worker + i) % len(MODEL_FILES)]
                inputs = sample_inputs(direct[filename], worker * 1000 + i)
                expected = direct[filename].run(inputs)
                via = own if i % 2 else shared  # one client shared by all threads, too
                got = via.infer(MODEL_NAMES[filename], inputs)
                for name in expected:
                    np.testing.assert_array_equal(got[name], expected[name])
        except BaseException as exc:
            failures.append(exc)
        finally:
            own.close()

    threads = [threading.Thread(target=work, args=(w,)) for w in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    shared.close()
    assert failures == []
    assert server.stats()["requests"] == 8 * 40


def test_hot_swap_while_clients_hammer(
    server: LocalApiServer, service: ModelService, models_dir: Path, tmp_path: Path
) -> None:
    second = tmp_path / "pair_v2.tflite"
    second.write_bytes(two_in_two_out(seed=7).tflite)
    paths = [models_dir / "two_in_two_out.tflite", second]
    inputs = sample_inputs(load_model(paths[0]), 5)
    references = [load_model(p).run(inputs)["out_score"] for p in paths]
    assert not np.array_equal(references[0], references[1])

    @contextlib.contextmanager
    def own_client() -> Iterator[Scorer]:
        with LocalClient(server.path) as own:
            yield lambda: own.infer("pair", inputs)["out_score"]

    served = hammer_through_swaps(
        own_client,
        references,
        lambda n: service.swap("pair", paths[n % 2], version=n + 1),
        responses=30,
        join_timeout=60,
    )
    assert -1 not in served and set(served) == {0, 1}
    assert server.stats()["errors"] == {}


# -- hostile and broken frames ---------------------------------------------------------------


def frame(header: Any, payload: bytes = b"") -> bytes:
    encoded = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("!I", len(encoded)) + encoded + payload


def tokens_desc(**changes: Any) -> dict[str, Any]:
    return {"name": "tokens", "dtype": "int32", "shape": [1, 16], "nbytes": 64, **changes}


GOOD_TOKENS = np.arange(16, dtype="<i4").tobytes()


def infer(inputs: list[dict[str, Any]], payload: bytes, **fields: Any) -> bytes:
    return frame({"op": "infer", "model": "intent", "inputs": inputs, **fields}, payload)


# (case id, bytes sent, expected error code, connection closed afterwards)
HOSTILE_FRAMES = [
    ("zero header length", struct.pack("!I", 0), wire.BAD_FRAME, True),
    ("huge header length", struct.pack("!I", 0xFFFFFFFF), wire.FRAME_TOO_LARGE, True),
    ("header over the cap", frame(b" " * (64 * 1024 + 1)), wire.FRAME_TOO_LARGE, True),
    ("non-JSON header", frame(b"{op: infer"), wire.BAD_FRAME, True),
    ("non-UTF-8 header", frame(b'{"op": "\xff\xfe"}'), wire.BAD_FRAME, True),
    ("deeply nested JSON", frame(b"[" * 60_000), wire.BAD_FRAME, True),
    ("header is a list", frame([1, 2, 3]), wire.BAD_FRAME, True),
    ("inputs not a list", frame({"op": "infer", "inputs": {"x": 1}}), wire.BAD_FRAME, True),
    ("nbytes missing", infer([{"dtype": "int32", "shape": [1, 16]}], b""), wire.BAD_FRAME, True),
    ("negative nbytes", infer([tokens_desc(nbytes=-4)], b""), wire.BAD_FRAME, True),
    ("too many tensors", infer([tokens_desc(nbytes=0)] * 65, b""), wire.BAD_FRAME, True),
    (
        "tensor bytes over the cap",
        infer([tokens_desc(nbytes=SMALL_PAYLOAD_CAP + 1)], b""),
        wire.FRAME_TOO_LARGE,
        True,
    ),
    ("dtype not allowed", infer([tokens_desc(dtype="object")], GOOD_TOKENS), wire.BAD_TENSOR,
     False),
    ("dtype not a string", infer([tokens_desc(dtype=7)], GOOD_TOKENS), wire.BAD_TENSOR, False),
    (
        "nbytes does not match the shape",
        infer([tokens_desc(nbytes=60)], GOOD_TOKENS[:60]),
        wire.BAD_TENSOR,
        False,
    ),
    ("negative dimension", infer([tokens_desc(shape=[-1, 16])], GOOD_TOKENS), wire.BAD_TENSOR,
     False),
    ("shape not a list", infer([tokens_desc(shape="1x16")], GOOD_TOKENS), wire.BAD_TENSOR, False),
    ("too many dimensions", infer([tokens_desc(shape=[1] * 9 + [16])], GOOD_TOKENS),
     wire.BAD_TENSOR, False),
    ("name not a string", infer([tokens_desc(name=5)], GOOD_TOKENS), wire.BAD_TENSOR, False),
    ("unknown op", frame({"op": "shutdown"}), wire.UNKNOWN_OP, False),
    ("no op", frame({"model": "intent"}), wire.UNKNOWN_OP, False),
    ("unknown model", infer([tokens_desc()], GOOD_TOKENS, model="nope"), wire.UNKNOWN_MODEL,
     False),
    ("model not a string", infer([tokens_desc()], GOOD_TOKENS, model=["intent"]),
     wire.BAD_REQUEST, False),
    (
        "wrong dtype for the model",
        infer([tokens_desc(dtype="float32")], GOOD_TOKENS),
        wire.INPUT_MISMATCH,
        False,
    ),
    (
        "wrong shape for the model",
        infer([tokens_desc(shape=[2, 8])], GOOD_TOKENS),
        wire.INPUT_MISMATCH,
        False,
    ),
    ("unknown input name", infer([tokens_desc(name="x")], GOOD_TOKENS), wire.INPUT_MISMATCH, False),
    ("no inputs", infer([], b""), wire.INPUT_MISMATCH, False),
    (
        "named and unnamed inputs mixed",
        frame({"op": "infer", "model": "pair", "inputs": [
            {"name": "a", "dtype": "float32", "shape": [1, 8], "nbytes": 32},
            {"dtype": "float32", "shape": [1, 8], "nbytes": 32},
        ]}, bytes(64)),
        wire.BAD_REQUEST,
        False,
    ),
    (
        "duplicate input names",
        infer([tokens_desc(), tokens_desc()], GOOD_TOKENS * 2),
        wire.BAD_REQUEST,
        False,
    ),
    ("id of a bad type", frame({"op": "ping", "id": [1]}), wire.BAD_REQUEST, False),
    ("unsupported protocol version", frame({"op": "ping", "v": 2}), wire.BAD_REQUEST, False),
]


def read_response(sock: socket.socket) -> tuple[dict[str, Any], bytearray]:
    response = wire.recv_frame(sock, tensors_key="outputs")
    assert response is not None, "the server closed the connection without an answer"
    return response


def connection_closed(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def good_request(sock: socket.socket) -> None:
    sock.sendall(infer([tokens_desc()], GOOD_TOKENS, id="good"))
    header, payload = read_response(sock)
    assert header["ok"] and header["id"] == "good" and header["model"] == "intent"
    assert [o["name"] for o in header["outputs"]] == ["probabilities"]
    assert len(payload) == header["outputs"][0]["nbytes"]


@pytest.mark.parametrize(
    ("data", "code", "closes"),
    [case[1:] for case in HOSTILE_FRAMES],
    ids=[case[0] for case in HOSTILE_FRAMES],
)
def test_hostile_frames_get_an_error_and_the_server_keeps_serving(
    server: LocalApiServer, data: bytes, code: str, closes: bool
) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(str(server.path))
        sock.sendall(data)
        header, payload = read_response(sock)
        assert header["ok"] is False and header["error_code"] == code, header
        assert header["error"] and payload == b""
        assert header.get("close", False) is closes
        if closes:
            assert connection_closed(sock)
        else:
            good_request(sock)  # the same connection is still in step
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(str(server.path))
        good_request(sock)
    stats = server.stats()
    assert stats["errors"] == {code: 1}
    assert stats["frames_rejected"] == (1 if closes else 0)


def test_a_request_id_is_echoed_even_on_errors(server: LocalApiServer) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(str(server.path))
        sock.sendall(frame({"op": "nope", "id": "r-17"}) + frame({"op": "ping", "id": 18}))
        first, _ = read_response(sock)
        second, _ = read_response(sock)  # pipelined requests are answered in order
    assert first["id"] == "r-17" and first["error_code"] == wire.UNKNOWN_OP
    assert second["id"] == 18 and second["ok"]


def test_a_frame_cut_short_is_refused(server: LocalApiServer) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(str(server.path))
        sock.sendall(infer([tokens_desc()], GOOD_TOKENS[:10]))
        sock.shutdown(socket.SHUT_WR)
        header, _ = read_response(sock)
    assert header["error_code"] == wire.BAD_FRAME and "middle of a frame" in header["error"]
    with LocalClient(server.path) as client:
        assert client.ping()["ok"]


def test_oversized_requests_from_the_client_get_the_servers_refusal(
    client: LocalClient, server: LocalApiServer
) -> None:
    big = np.zeros(4 * SMALL_PAYLOAD_CAP, np.uint8)
    with pytest.raises(LocalApiError) as info:
        client.infer("intent", big)
    assert info.value.code == wire.FRAME_TOO_LARGE
    assert client.ping()["ok"]  # reconnects
    assert server.stats()["frames_rejected"] == 1


def test_large_tensors_cross_intact() -> None:
    tensors = [(f"t{i}", np.random.default_rng(i).normal(size=(64, 1024)).astype(np.float32))
               for i in range(3)]
    descs, buffers = wire.encode_tensors(tensors)
    left, right = socket.socketpair()
    with left, right:
        sender = threading.Thread(target=wire.send_frame, args=(left, {"inputs": descs}, buffers))
        sender.start()
        response = wire.recv_frame(right, tensors_key="inputs")
        sender.join(30)
    assert response is not None
    decoded = wire.decode_tensors(response[0]["inputs"], response[1])
    for (name, array), (got_name, got) in zip(tensors, decoded):
        assert name == got_name
        np.testing.assert_array_equal(array, got)


@pytest.mark.parametrize(
    "value",
    [np.float32(2.5), np.zeros((0, 3), np.int8), np.array([[True, False]]),
     np.arange(6, dtype=">i4").reshape(2, 3), np.arange(12, dtype=np.float16)[::2]],
    ids=["0-d", "empty", "bool", "big-endian", "strided"],
)
def test_encode_decode_round_trip(value: Any) -> None:
    descs, buffers = wire.encode_tensors([(None, value)])
    (name, got), = wire.decode_tensors(descs, b"".join(bytes(b) for b in buffers))
    assert name is None and got.shape == np.shape(value) and got.dtype.isnative
    assert got.dtype == np.asarray(value).dtype.newbyteorder("=")
    np.testing.assert_array_equal(got, value)


# -- socket file and lifecycle ---------------------------------------------------------------


def test_socket_file_mode_and_removal(service: ModelService, tmp_path: Path) -> None:
    path = tmp_path / "agent.sock"
    server = LocalApiServer(path, service).start()
    try:
        info = os.stat(path)
        assert stat.S_ISSOCK(info.st_mode)
        assert stat.S_IMODE(info.st_mode) == 0o660
        with pytest.raises(LocalApiSetupError, match="already running"):
            server.start()
    finally:
        server.stop()
    assert not path.exists()
    server.stop()  # idempotent


def test_a_stale_socket_file_is_replaced(service: ModelService, tmp_path: Path) -> None:
    path = tmp_path / "agent.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(str(path))  # bound, never listening: what a crashed agent leaves behind
    assert path.exists()
    with LocalApiServer(path, service), LocalClient(path) as client:
        assert client.ping()["ok"]


def test_a_live_socket_is_not_stolen(server: LocalApiServer, service: ModelService) -> None:
    with pytest.raises(LocalApiSetupError, match="another process"):
        LocalApiServer(server.path, service).start()
    with LocalClient(server.path) as client:
        assert client.ping()["ok"]


def test_setup_errors_say_what_to_fix(service: ModelService, tmp_path: Path) -> None:
    with pytest.raises(LocalApiSetupError, match="does not exist"):
        LocalApiServer(tmp_path / "missing" / "agent.sock", service).start()
    regular = tmp_path / "agent.sock"
    regular.write_text("not a socket")
    with pytest.raises(LocalApiSetupError, match="not a socket"):
        LocalApiServer(regular, service).start()
    assert regular.read_text() == "not a socket"
    with pytest.raises(LocalApiSetupError, match="longer than"):
        LocalApiServer(tmp_path / ("x" * 120), service).start()


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write to any directory")
def test_an_unwritable_directory_is_a_clear_error(service: ModelService, tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(LocalApiSetupError, match="cannot create files"):
        LocalApiServer(locked / "agent.sock", service).start()


def test_client_reports_a_missing_agent_and_reconnects_after_a_restart(
    service: ModelService, tmp_path: Path
) -> None:
    path = tmp_path / "agent.sock"
    client = LocalClient(path, timeout=30)
    try:
        with pytest.raises(LocalApiError) as info:
            client.ping()
        assert info.value.code == wire.UNAVAILABLE and "fleetlite-agent" in str(info.value)
        with LocalApiServer(path, service):
            assert client.ping()["ok"]
        with LocalApiServer(path, service):
            # The kept-alive connection died with the old server; the client reconnects.
            assert client.models()[0]["name"] == "intent"
        with pytest.raises(LocalApiError) as info:
            client.ping()
        assert info.value.code == wire.UNAVAILABLE
    finally:
        client.close()


def test_connections_over_the_limit_are_told_busy(
    service: ModelService, tmp_path: Path
) -> None:
    with LocalApiServer(tmp_path / "agent.sock", service, max_connections=1,
                        evict_idle_s=3600) as server:
        with LocalClient(server.path) as first:
            assert first.ping()["ok"]
            with LocalClient(server.path) as second, pytest.raises(LocalApiError) as info:
                second.ping()
            assert info.value.code == wire.BUSY
            assert first.ping()["ok"]
        assert server.stats()["errors"] == {wire.BUSY: 1}


def test_stop_closes_open_connections(service: ModelService, tmp_path: Path) -> None:
    server = LocalApiServer(tmp_path / "agent.sock", service).start()
    clients = [LocalClient(server.path) for _ in range(3)]
    try:
        for client in clients:
            assert client.ping()["ok"]
        server.stop()
        assert server.stats()["connections_open"] == 0
        for client in clients:
            with pytest.raises(LocalApiError) as info:
                client.ping()
            assert info.value.code == wire.UNAVAILABLE
    finally:
        for client in clients:
            client.close()
