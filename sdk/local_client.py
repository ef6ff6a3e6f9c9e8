"""Client of the agent's local inference API, and the socket framing both ends share.

A local application talks to the agent over its Unix socket (``socket:`` in ``agent.yaml``). Each
message, in both directions, is one frame::

    4 bytes   N, big-endian unsigned length of the header
    N bytes   header: one UTF-8 JSON object
    ...       the tensors' raw bytes, concatenated in the order the header lists them

The header lists tensors (``inputs`` in requests, ``outputs`` in responses) as
``{"name", "dtype", "shape", "nbytes"}``; tensor bytes are C order, little-endian. See
``docs/local-api.md`` for the requests, responses and error codes. Only numpy is needed here.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Union

import numpy as np
import numpy.typing as npt

from fleetlite.sdk.errors import LocalApiError

__all__ = [
    "ALLOWED_DTYPES",
    "DEFAULT_MAX_HEADER_BYTES",
    "DEFAULT_MAX_PAYLOAD_BYTES",
    "LocalApiError",
    "LocalClient",
    "PROTOCOL_VERSION",
    "ProtocolError",
    "decode_tensors",
    "encode_tensors",
    "FrameGuard",
    "GenerationStream",
    "recv_frame",
    "send_frame",
]

Array = npt.NDArray[Any]
Buffer = Union[bytes, bytearray, memoryview]
TensorsLike = Union[Mapping[str, Any], Sequence[Any], Array]

PROTOCOL_VERSION = 1
HEADER_LENGTH = struct.Struct("!I")
DEFAULT_MAX_HEADER_BYTES = 64 * 1024
DEFAULT_MAX_PAYLOAD_BYTES = 64 * 1024 * 1024
MAX_TENSORS = 64
MAX_NDIM = 8
MAX_ELEMENTS = 2**31 - 1
MAX_NAME_LENGTH = 256
MAX_ID_LENGTH = 128
ALLOWED_DTYPES = frozenset({
    "bool", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64",
    "float16", "float32", "float64",
})
# The client accepts larger responses than the server accepts requests (the agent is trusted).
MAX_RESPONSE_HEADER_BYTES = 16 * 1024 * 1024
# name -> (little-endian wire dtype, native dtype); (kind, itemsize) -> name, to avoid the slow
# dtype.name in the per-request path.
_DTYPES = {
    name: (np.dtype(name).newbyteorder("<"), np.dtype(name)) for name in sorted(ALLOWED_DTYPES)
}
_DTYPE_NAMES = {(np.dtype(name).kind, np.dtype(name).itemsize): name for name in ALLOWED_DTYPES}
_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False)
# Below this many tensor bytes a frame is joined and sent with one system call.
_JOIN_LIMIT = 64 * 1024

# Error codes sent by the server (``error_code``). Framing errors close the connection.
BAD_FRAME = "bad_frame"
FRAME_TOO_LARGE = "frame_too_large"
BAD_REQUEST = "bad_request"
BAD_TENSOR = "bad_tensor"
UNKNOWN_OP = "unknown_op"
UNKNOWN_MODEL = "unknown_model"
INPUT_MISMATCH = "input_mismatch"
INFERENCE_FAILED = "inference_failed"
BUSY = "busy"
INTERNAL = "internal"
# Error codes the client raises on its own.
UNAVAILABLE = "unavailable"
PERMISSION_DENIED = "permission_denied"
TIMEOUT = "timeout"
CONNECTION_LOST = "connection_lost"
BAD_RESPONSE = "bad_response"


class ProtocolError(LocalApiError):
    """A frame breaks the protocol. ``fatal``: the byte stream cannot be followed any more."""

    def __init__(self, code: str, message: str, *, fatal: bool = False) -> None:
        super().__init__(code, message)
        self.fatal = fatal


# -- framing -----------------------------------------------------------------------------------


def encode_tensors(
    tensors: Sequence[tuple[str | None, Any]],
) -> tuple[list[dict[str, Any]], list[Buffer]]:
    """Tensor descriptions for a header and the matching little-endian C-order buffers."""
    descs: list[dict[str, Any]] = []
    buffers: list[Buffer] = []
    for name, value in tensors:
        array = np.asarray(value)
        dtype_name = _DTYPE_NAMES.get((array.dtype.kind, array.dtype.itemsize))
        if dtype_name is None:
            raise ProtocolError(
                BAD_TENSOR,
                f"tensor {name or len(descs)!r} has dtype {array.dtype}, which the local API "
                f"does not carry; use one of {', '.join(sorted(ALLOWED_DTYPES))}",
            )
        array = np.asarray(array, dtype=_DTYPES[dtype_name][0], order="C")
        desc: dict[str, Any] = {
            "dtype": dtype_name,
            "shape": list(array.shape),
            "nbytes": array.nbytes,
        }
        if name is not None:
            desc = {"name": name, **desc}
        descs.append(desc)
        # Small tensors are copied (cheaper than a view); large ones are sent from the array.
        small = array.nbytes <= _JOIN_LIMIT
        buffers.append(array.tobytes() if small else array.reshape(-1).view(np.uint8).data)
    return descs, buffers


def send_frame(
    sock: socket.socket, header: Mapping[str, Any], buffers: Sequence[Buffer] = ()
) -> None:
    """Write one frame: length, JSON header, then the tensor buffers."""
    encoded = _ENCODER.encode(header).encode()
    head = HEADER_LENGTH.pack(len(encoded)) + encoded
    if sum(len(b) for b in buffers) <= _JOIN_LIMIT:
        sock.sendall(b"".join([head, *buffers]))
        return
    sock.sendall(head)
    for buffer in buffers:
        sock.sendall(buffer)


@dataclass
class FrameGuard:
    """What a server enforces while one frame arrives (all optional):

    - ``idle_timeout_s``: how long to wait for the first byte of the next frame;
    - ``frame_timeout_s``: from its first byte, the whole frame must arrive within this time
      (a client trickling one byte a second cannot hold a connection for long);
    - ``slow_after_s`` and ``on_slow()``: a frame still arriving this long after its first byte
      is slow, and ``on_slow`` is called once for it; it may raise :class:`ProtocolError`
      (e.g. ``busy``) to refuse it. A request sent in one go is never slow;
    - ``reserve(n)``: called before ``n`` more bytes are received into memory (negative: bytes
      given back); may raise :class:`ProtocolError` to refuse them. The receiver never
      allocates more than it was sent, so a header that declares 64 MiB and sends nothing
      costs nothing.
    """

    idle_timeout_s: float | None = None
    frame_timeout_s: float | None = None
    slow_after_s: float | None = None
    on_slow: Callable[[], None] | None = None
    reserve: Callable[[int], None] | None = None
    _started: float | None = field(default=None, init=False, repr=False)
    _slow: bool = field(default=False, init=False, repr=False)

    @property
    def in_frame(self) -> bool:
        return self._started is not None

    def next_frame(self, sock: socket.socket) -> None:
        """Wait up to the idle timeout for the next frame."""
        self._started, self._slow = None, False
        sock.settimeout(self.idle_timeout_s)

    def frame_started(self) -> None:
        self._started, self._slow = time.monotonic(), False

    def before_recv(self, sock: socket.socket) -> None:
        """Enforce the deadline and the slow-frame callback; bound the next wait by both."""
        if self._started is None:
            return
        elapsed = time.monotonic() - self._started
        waits = [] if self.idle_timeout_s is None else [self.idle_timeout_s]
        if self.frame_timeout_s is not None:
            if elapsed >= self.frame_timeout_s:
                raise ProtocolError(TIMEOUT, f"the frame did not arrive whole within "
                                    f"{self.frame_timeout_s:g} s; send each request in one go",
                                    fatal=True)
            waits.append(self.frame_timeout_s - elapsed)
        if self.slow_after_s is not None and not self._slow:
            if elapsed >= self.slow_after_s:
                self._slow = True
                if self.on_slow is not None:
                    self.on_slow()
            else:
                waits.append(self.slow_after_s - elapsed)
        sock.settimeout(min(waits) if waits else None)


_RECV_CHUNK = 256 * 1024


def _recv_exact(sock: socket.socket, size: int, what: str, *, eof_ok: bool = False,
                guard: FrameGuard | None = None) -> bytearray:
    # Grow as bytes arrive: never allocate what a header merely declares.
    data = bytearray()
    while len(data) < size:
        want = min(size - len(data), _RECV_CHUNK)
        if guard is not None:
            guard.before_recv(sock)
            if guard.reserve is not None:
                guard.reserve(want)
        try:
            chunk = sock.recv(want)
        except socket.timeout:
            if guard is None or not guard.in_frame:
                raise
            chunk = None  # a deadline of the guard's: before_recv decides
        if guard is not None and guard.reserve is not None:
            got = 0 if chunk is None else len(chunk)
            if got < want:
                guard.reserve(got - want)  # give back what did not arrive
        if chunk is None:
            continue
        if not chunk:
            if eof_ok and not data:
                return bytearray()
            raise ProtocolError(
                BAD_FRAME, f"the connection closed in the middle of a frame ({what})", fatal=True
            )
        if eof_ok and not data and guard is not None:
            guard.frame_started()
        data += chunk
    return data


def _payload_size(descs: Any, key: str, max_payload_bytes: int) -> int:
    if not isinstance(descs, list) or len(descs) > MAX_TENSORS:
        raise ProtocolError(
            BAD_FRAME, f"header field {key!r} must be a list of at most {MAX_TENSORS} tensors",
            fatal=True,
        )
    total = 0
    for i, desc in enumerate(descs):
        nbytes = desc.get("nbytes") if isinstance(desc, dict) else None
        if not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes < 0:
            raise ProtocolError(
                BAD_FRAME,
                f"{key}[{i}] needs an integer 'nbytes' >= 0 (the frame length depends on it)",
                fatal=True,
            )
        total += nbytes
    if total > max_payload_bytes:
        raise ProtocolError(
            FRAME_TOO_LARGE,
            f"the frame carries {total} tensor bytes, more than the limit of "
            f"{max_payload_bytes}; send smaller tensors or raise the limit",
            fatal=True,
        )
    return total


def recv_frame(
    sock: socket.socket,
    *,
    tensors_key: str,
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
    guard: FrameGuard | None = None,
) -> tuple[dict[str, Any], bytearray] | None:
    """Read one frame: (header, tensor bytes), or ``None`` if the peer closed between frames.

    Raises :class:`ProtocolError` with ``fatal=True`` when the frame cannot be delimited (bad
    length, non-JSON header, tensor sizes missing or over the caps), or when ``guard`` refuses
    it (see :class:`FrameGuard`).
    """
    if guard is not None:
        guard.next_frame(sock)
    prefix = _recv_exact(sock, HEADER_LENGTH.size, "length", eof_ok=True, guard=guard)
    if not prefix:
        return None
    (length,) = HEADER_LENGTH.unpack(prefix)
    if length == 0:
        raise ProtocolError(BAD_FRAME, "the header length is 0", fatal=True)
    if length > max_header_bytes:
        raise ProtocolError(
            FRAME_TOO_LARGE,
            f"the header is {length} bytes, more than the limit of {max_header_bytes}; "
            "is the length a 4-byte big-endian integer?",
            fatal=True,
        )
    raw = _recv_exact(sock, length, "header", guard=guard)
    try:
        header = json.loads(bytes(raw).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ProtocolError(
            BAD_FRAME, f"the header is not UTF-8 JSON ({type(exc).__name__})", fatal=True
        ) from None
    if not isinstance(header, dict):
        raise ProtocolError(
            BAD_FRAME, f"the header must be a JSON object, got {type(header).__name__}",
            fatal=True,
        )
    size = _payload_size(header.get(tensors_key, []), tensors_key, max_payload_bytes)
    return header, _recv_exact(sock, size, "tensor bytes", guard=guard)


def _shape(value: Any, where: str) -> tuple[int, ...]:
    if (
        not isinstance(value, list)
        or len(value) > MAX_NDIM
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value)
        # bounded even with a zero dimension: numpy cannot shape an empty array as [0, 2**70]
        or math.prod(d for d in value if d) > MAX_ELEMENTS
    ):
        raise ProtocolError(
            BAD_TENSOR, f"{where}: 'shape' must be a list of at most {MAX_NDIM} integers >= 0 "
            f"whose non-zero entries multiply to at most {MAX_ELEMENTS}"
        )
    return tuple(value)


def decode_tensors(descs: Sequence[Any], payload: Buffer) -> list[tuple[str | None, Array]]:
    """Arrays from the header's tensor descriptions and the frame's tensor bytes.

    Checks each description (dtype allowed, ``prod(shape) * itemsize == nbytes``) and raises
    :class:`ProtocolError` (not fatal: the frame was already read whole).
    """
    tensors: list[tuple[str | None, Array]] = []
    offset = 0
    for i, desc in enumerate(descs):
        where = f"tensor {i}"
        if not isinstance(desc, dict) or not isinstance(desc.get("nbytes"), int):
            raise ProtocolError(BAD_TENSOR, f"{where}: expected {{name, dtype, shape, nbytes}}")
        name = desc.get("name")
        if name is not None and (not isinstance(name, str) or len(name) > MAX_NAME_LENGTH):
            raise ProtocolError(
                BAD_TENSOR, f"{where}: 'name' must be a string of at most {MAX_NAME_LENGTH} chars"
            )
        dtype_name = desc.get("dtype")
        if not isinstance(dtype_name, str) or dtype_name not in ALLOWED_DTYPES:
            raise ProtocolError(
                BAD_TENSOR,
                f"{where}: dtype {dtype_name!r} is not allowed; use one of "
                f"{', '.join(sorted(ALLOWED_DTYPES))}",
            )
        wire_dtype, dtype = _DTYPES[dtype_name]
        shape = _shape(desc.get("shape"), where)
        nbytes = desc["nbytes"]
        expected = math.prod(shape) * dtype.itemsize
        if expected != nbytes:
            raise ProtocolError(
                BAD_TENSOR,
                f"{where}: shape {list(shape)} of {dtype_name} is {expected} bytes, "
                f"but nbytes says {nbytes}",
            )
        on_wire = np.frombuffer(
            payload, dtype=wire_dtype, count=math.prod(shape), offset=offset
        )
        tensors.append((name, on_wire.astype(dtype, copy=False).reshape(shape)))
        offset += nbytes
    return tensors


def _tensor_list(inputs: TensorsLike) -> list[tuple[str | None, Any]]:
    if isinstance(inputs, Mapping):
        return [(str(name), value) for name, value in inputs.items()]
    if isinstance(inputs, np.ndarray):
        return [(None, inputs)]
    return [(None, value) for value in inputs]


# -- client ------------------------------------------------------------------------------------


class LocalClient:
    """A connection to the agent's local API; thread-safe (one request at a time), reconnects.

    >>> with LocalClient("/run/fleetlite/agent.sock") as client:  # doctest: +SKIP
    ...     outputs = client.infer("intent", {"tokens": tokens})

    Errors are :class:`LocalApiError` with ``code`` = the server's ``error_code`` or one of
    ``unavailable``, ``permission_denied``, ``timeout``, ``connection_lost``, ``bad_response``.
    """

    def __init__(
        self,
        socket_path: str | os.PathLike[str],
        *,
        timeout: float | None = 30.0,
        max_response_bytes: int = 4 * DEFAULT_MAX_PAYLOAD_BYTES,
    ) -> None:
        self.socket_path = Path(socket_path)
        self.timeout = timeout
        self.max_response_bytes = max_response_bytes
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._next_id = 0

    # -- requests ------------------------------------------------------------------------------

    def infer(self, model: str, inputs: TensorsLike) -> dict[str, Array]:
        """Run ``model`` on the device: a dict by input name, a list in input order, or one array.

        Returns output name -> array, in the model's output order.
        """
        descs, buffers = encode_tensors(_tensor_list(inputs))
        header, payload = self._request({"op": "infer", "model": model, "inputs": descs}, buffers)
        outputs = decode_tensors(header.get("outputs", []), payload)
        return {str(name): array for name, array in outputs}

    def generate(self, model: str, prompt: str, **params: Any) -> GenerationStream:
        """Stream the reply of the language model ``model`` to ``prompt``.

        ``params``: ``temperature``, ``top_k``, ``top_p``, ``seed``, ``max_tokens`` and
        ``stop_strings`` (a list); omitted ones take the release's defaults. Iterate the
        returned stream for the text as it is produced; :meth:`GenerationStream.cancel` stops
        it early; its ``result`` (text, stop reason, counts and timings) is set at the end.
        The stream holds this client's connection until it ends: close it (or use ``with``)
        before the next request.
        """
        self._lock.acquire()
        try:
            header, _ = self._exchange({"op": "generate", "model": model, "prompt": prompt,
                                        "params": params})
        except BaseException:
            self._lock.release()
            raise
        return GenerationStream(self, header)

    def models(self) -> list[dict[str, Any]]:
        """The models the agent serves: name, version, sha256, inputs and outputs."""
        header, _ = self._request({"op": "models"})
        models = header.get("models")
        if not isinstance(models, list):
            raise LocalApiError(BAD_RESPONSE, "the agent's 'models' response has no model list")
        return models

    def ping(self) -> dict[str, Any]:
        """Check the agent answers; returns its response header (agent and protocol version)."""
        header, _ = self._request({"op": "ping"})
        return header

    # -- connection ----------------------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            self._drop()

    def __enter__(self) -> LocalClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self.socket_path))
        except FileNotFoundError:
            sock.close()
            raise LocalApiError(
                UNAVAILABLE,
                f"no agent socket at {self.socket_path}; is fleetlite-agent running with "
                "'socket:' set in agent.yaml? (systemctl status fleetlite-agent)",
            ) from None
        except ConnectionRefusedError:
            sock.close()
            raise LocalApiError(
                UNAVAILABLE,
                f"nothing listens on {self.socket_path} (a stale socket file); "
                "start the agent: systemctl start fleetlite-agent",
            ) from None
        except PermissionError:
            sock.close()
            raise LocalApiError(
                PERMISSION_DENIED,
                f"no permission to connect to {self.socket_path} (mode 0660); run as a member "
                "of the socket's group, e.g. sudo usermod -aG fleetlite $USER",
            ) from None
        except OSError as exc:
            sock.close()
            raise LocalApiError(
                UNAVAILABLE, f"cannot connect to {self.socket_path}: {exc.strerror or exc}"
            ) from None
        return sock

    def _drop(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _receive(self, sock: socket.socket) -> tuple[dict[str, Any], bytearray] | None:
        try:
            return recv_frame(
                sock,
                tensors_key="outputs",
                max_header_bytes=MAX_RESPONSE_HEADER_BYTES,
                max_payload_bytes=self.max_response_bytes,
            )
        except socket.timeout:
            raise LocalApiError(
                TIMEOUT, f"the agent did not answer within {self.timeout:g} s"
            ) from None
        except ProtocolError as exc:
            raise LocalApiError(BAD_RESPONSE, f"unreadable response: {exc.detail}") from None
        except OSError:  # e.g. ECONNRESET: the server closed with our bytes unread
            return None

    def _request(
        self, header: dict[str, Any], buffers: Sequence[Buffer] = ()
    ) -> tuple[dict[str, Any], bytearray]:
        with self._lock:
            return self._exchange(header, buffers)

    def _exchange(
        self, header: dict[str, Any], buffers: Sequence[Buffer] = ()
    ) -> tuple[dict[str, Any], bytearray]:
        """Send one request and read its (first) response; the caller holds ``_lock``."""
        self._next_id += 1
        header = {"v": PROTOCOL_VERSION, "id": self._next_id, **header}
        # A kept-alive connection may have been closed by the agent (idle timeout, restart):
        # then retry once on a new one. Requests have no side effects, so a retry is safe.
        for attempt in range(2):
            reused = self._sock is not None
            if self._sock is None:
                self._sock = self._connect()
            sock = self._sock
            try:
                try:
                    send_frame(sock, header, buffers)
                except socket.timeout:
                    raise LocalApiError(
                        TIMEOUT, f"the agent did not read the request within {self.timeout:g} s"
                    ) from None
                except OSError:
                    pass  # the agent may have refused the frame and closed: read why
                response = self._receive(sock)
            except LocalApiError:
                self._drop()
                raise
            if response is None:
                self._drop()
                if reused and attempt == 0:
                    continue
                raise LocalApiError(
                    CONNECTION_LOST, "the agent closed the connection without answering"
                )
            reply, payload = response
            if reply.get("close"):
                self._drop()
            if reply.get("ok") is not True:
                raise LocalApiError(
                    str(reply.get("error_code", BAD_RESPONSE)),
                    str(reply.get("error", "the agent refused the request")),
                )
            if reply.get("id") != header["id"]:
                self._drop()
                raise LocalApiError(
                    BAD_RESPONSE,
                    f"response id {reply.get('id')!r} does not match request {header['id']}",
                )
            return reply, payload
        raise AssertionError("unreachable")


class GenerationStream(Iterator[str]):
    """The text of one streamed generation (see :meth:`LocalClient.generate`), piece by piece.

    ``result`` is the agent's final ``done`` frame: ``text``, ``stop_reason`` and ``stats``
    (prompt and generated tokens, time to first token, prefill and decode rates).
    """

    def __init__(self, client: LocalClient, first: dict[str, Any]) -> None:
        self._client = client
        self._id = first.get("id")
        self._pending: dict[str, Any] | None = first
        self.result: dict[str, Any] | None = None
        self._open = True

    def __next__(self) -> str:
        while self._open:
            frame = self._pending if self._pending is not None else self._read()
            self._pending = None
            if frame.get("event") == "token":
                return str(frame.get("text", ""))
            if frame.get("event") == "done":
                self.result = frame
                self._finish()
                break
            self._finish(drop=True)
            raise LocalApiError(BAD_RESPONSE, f"unexpected frame in a generation: {frame!r:.200}")
        raise StopIteration

    def cancel(self) -> None:
        """Ask the agent to stop; the stream then ends with stop reason ``cancelled``."""
        sock = self._client._sock
        if self._open and sock is not None:
            with contextlib.suppress(OSError):
                send_frame(sock, {"v": PROTOCOL_VERSION, "op": "cancel", "id": self._id})

    def text(self) -> str:
        """Read the stream to its end and return the whole reply."""
        return "".join(self)

    def close(self) -> None:
        """Stop early if still running (cancel, then read to the end) and free the client."""
        if self._open:
            self.cancel()
            try:
                for _ in self:
                    pass
            except LocalApiError:
                pass

    def __enter__(self) -> GenerationStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _read(self) -> dict[str, Any]:
        sock = self._client._sock
        response = self._client._receive(sock) if sock is not None else None
        if response is None:
            self._finish(drop=True)
            raise LocalApiError(CONNECTION_LOST, "the agent closed the connection mid-generation")
        header, _ = response
        if header.get("ok") is not True:
            self._finish(drop=bool(header.get("close")))
            raise LocalApiError(str(header.get("error_code", BAD_RESPONSE)),
                                str(header.get("error", "the agent stopped the generation")))
        if header.get("id") != self._id:
            self._finish(drop=True)
            raise LocalApiError(BAD_RESPONSE, f"response id {header.get('id')!r} does not "
                                f"match the generation's {self._id!r}")
        return header

    def _finish(self, drop: bool = False) -> None:
        if self._open:
            self._open = False
            if drop:
                self._client._drop()
            self._client._lock.release()
