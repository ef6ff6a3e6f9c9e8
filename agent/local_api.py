"""The agent's local inference API: a Unix domain socket served by :class:`LocalApiServer`.

Local applications run the device's models through the agent instead of loading them themselves.
Every message is one frame (the codec lives in :mod:`fleetlite.sdk.local_client`)::

    4 bytes   N, big-endian unsigned length of the header (at most max_header_bytes)
    N bytes   header: one UTF-8 JSON object
    ...       tensor bytes, C order, little-endian, concatenated in the order the header lists them

Tensors are listed as ``{"name", "dtype", "shape", "nbytes"}`` (``inputs`` in requests,
``outputs`` in responses). Requests: ``{"op": "infer", "model", "inputs", "id"?}``,
``{"op": "models"}`` and ``{"op": "ping"}``. Responses: ``{"ok": true, ...}`` or
``{"ok": false, "error_code", "error"}``; the ``id`` of the request is echoed. A frame that cannot
be delimited gets an error response with ``"close": true`` and the connection is closed; any other
bad request gets an error response and the connection stays usable. One thread per connection;
the socket file is created with mode 0660. Full description: ``docs/local-api.md``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import stat
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Union

from fleetlite.agent.errors import AgentError, LocalApiSetupError, ModelNotFoundError
from fleetlite.agent.language_models import LanguageModels, ServedLm
from fleetlite.agent.model_service import ModelService
from fleetlite.sdk import local_client as wire
from fleetlite.sdk.runtime.errors import InferenceError, InputMismatchError, ModelRuntimeError
from fleetlite.sdk.runtime.lm_engine import BusyError, GenerateParams, GenerationInputError
from fleetlite.sdk.version import __version__

log = logging.getLogger("fleetlite.agent.local_api")

DEFAULT_MODE = 0o660
DEFAULT_MAX_CONNECTIONS = 32
DEFAULT_IDLE_TIMEOUT_S = 300.0
DEFAULT_REQUEST_TIMEOUT_S = 30.0
# A request still arriving this long after its first byte is slow (see reserved_slots).
DEFAULT_SLOW_REQUEST_S = 1.0
# A connection idle this long between requests may be closed to make room for a new client.
DEFAULT_EVICT_IDLE_S = 1.0
# sockaddr_un.sun_path is 108 bytes on Linux, including the terminating NUL.
MAX_SOCKET_PATH_BYTES = 107

Response = tuple[dict[str, Any], Sequence[wire.Buffer]]
RequestId = Union[int, str, None]


@dataclass
class _Connection:
    """One served connection: its thread and what the abuse limits track of it."""

    thread: threading.Thread
    idle_since: float = field(default_factory=time.monotonic)
    guard: wire.FrameGuard | None = None
    slow: bool = False
    reserved: int = 0
    evicted: bool = False


class LocalApiServer:
    """Serve a :class:`ModelService` on a Unix socket; ``start()``/``stop()`` or ``with``.

    ``max_payload_bytes`` caps the tensor bytes of one request, ``max_header_bytes`` its JSON
    header; ``idle_timeout_s`` closes connections that send nothing for that long (clients
    reconnect).

    Abuse limits (a local process is outside input too):

    - a request's bytes are held in memory only as they arrive, and ``max_inflight_bytes``
      (default: twice ``max_payload_bytes``) bounds them across every connection: a request
      beyond it is answered ``busy``;
    - a request must arrive whole within ``request_timeout_s`` of its first byte;
    - at most ``max_connections - reserved_slots`` requests may be slow (still arriving
      ``slow_after_s`` after their first byte; default: a quarter of the slots is kept for
      clients that send a request in one go), and when every
      slot is taken a connection idle between requests for ``evict_idle_s`` or more is closed
      to make room for a new one (clients reconnect) instead of refusing the newcomer.
    """

    def __init__(
        self,
        socket_path: str | os.PathLike[str],
        models: ModelService,
        *,
        language_models: LanguageModels | None = None,
        mode: int = DEFAULT_MODE,
        max_header_bytes: int = wire.DEFAULT_MAX_HEADER_BYTES,
        max_payload_bytes: int = wire.DEFAULT_MAX_PAYLOAD_BYTES,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        idle_timeout_s: float | None = DEFAULT_IDLE_TIMEOUT_S,
        request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S,
        max_inflight_bytes: int | None = None,
        reserved_slots: int | None = None,
        evict_idle_s: float = DEFAULT_EVICT_IDLE_S,
        slow_after_s: float = DEFAULT_SLOW_REQUEST_S,
    ) -> None:
        self.path = Path(socket_path)
        self.models = models
        self.language_models = language_models or LanguageModels()
        self.mode = mode
        self.max_header_bytes = max_header_bytes
        self.max_payload_bytes = max_payload_bytes
        self.max_connections = max_connections
        self.idle_timeout_s = idle_timeout_s
        self.request_timeout_s = request_timeout_s
        self.max_inflight_bytes = (2 * (max_payload_bytes + max_header_bytes)
                                   if max_inflight_bytes is None else max_inflight_bytes)
        self.reserved_slots = (min(max(1, max_connections // 4), max_connections - 1)
                               if reserved_slots is None else reserved_slots)
        self.evict_idle_s = evict_idle_s
        self.slow_after_s = slow_after_s
        if not 0 <= self.reserved_slots < max_connections:
            raise LocalApiSetupError(
                f"reserved_slots ({self.reserved_slots}) must be at least 0 and less than "
                f"max_connections ({max_connections})")
        self._inflight_bytes = 0
        self._slow = 0
        self._listener: socket.socket | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._inode: tuple[int, int] | None = None
        self._accept_thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._connections: dict[socket.socket, _Connection] = {}
        self._stopping = threading.Event()
        self._counts: Counter[str] = Counter()
        self._errors: Counter[str] = Counter()

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> LocalApiServer:
        """Create the socket (mode 0660, replacing a stale file) and start accepting."""
        if self._listener is not None:
            raise LocalApiSetupError(f"the local API on {self.path} is already running")
        self._prepare_path()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        bound = False
        try:
            listener.bind(str(self.path))
            bound = True
            # chmod before listen(): nobody can connect while the mode is still the umask's.
            os.chmod(self.path, self.mode)
            info = os.stat(self.path)
            listener.listen(16)
            listener.setblocking(False)
        except OSError as exc:
            listener.close()
            if bound:
                with contextlib.suppress(OSError):
                    self.path.unlink()
            raise LocalApiSetupError(
                f"cannot create the local API socket {self.path}: {exc.strerror or exc}; "
                "check the directory's permissions or change 'socket:' in agent.yaml"
            ) from exc
        self._inode = (info.st_dev, info.st_ino)
        self._listener = listener
        self._wake_r, self._wake_w = socket.socketpair()
        self._stopping = threading.Event()
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name="fleetlite-local-api", daemon=True
        )
        self._accept_thread.start()
        log.info("local API listening on %s", self.path)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting, close every connection, remove the socket file. Idempotent."""
        with self._lock:
            if self._listener is None or self._stopping.is_set():
                return
            self._stopping.set()
        assert self._wake_w is not None and self._accept_thread is not None
        self._wake_w.send(b"\0")
        self._accept_thread.join(timeout)
        self._listener.close()
        self._remove_socket_file()
        with self._lock:
            connections = dict(self._connections)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in recv
        deadline = time.monotonic() + timeout
        for state in connections.values():
            state.thread.join(max(0.0, deadline - time.monotonic()))
        for end in (self._wake_r, self._wake_w):
            if end is not None:
                end.close()
        self._listener = self._wake_r = self._wake_w = None
        self._accept_thread = None

    def __enter__(self) -> LocalApiServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def stats(self) -> dict[str, Any]:
        """Counters: connections, requests, rejected frames and errors by code."""
        with self._lock:
            return {
                "connections_total": self._counts["connections"],
                "connections_open": len(self._connections),
                "requests": self._counts["requests"],
                "frames_rejected": self._counts["frames_rejected"],
                "evicted_idle": self._counts["evicted_idle"],
                "inflight_bytes": self._inflight_bytes,
                "slow_requests": self._slow,
                "errors": dict(self._errors),
            }

    def _prepare_path(self) -> None:
        directory = self.path.parent
        if len(os.fsencode(str(self.path))) > MAX_SOCKET_PATH_BYTES:
            raise LocalApiSetupError(
                f"socket path {self.path} is longer than {MAX_SOCKET_PATH_BYTES} bytes, the "
                "limit of Unix sockets; choose a shorter 'socket:' path in agent.yaml"
            )
        if not directory.is_dir():
            raise LocalApiSetupError(
                f"the directory of the local API socket, {directory}, does not exist; create it "
                "(systemd: RuntimeDirectory=fleetlite) or change 'socket:' in agent.yaml"
            )
        if not os.access(directory, os.W_OK | os.X_OK):
            raise LocalApiSetupError(
                f"the agent (uid {os.getuid()}) cannot create files in {directory}; give it "
                "write access or change 'socket:' in agent.yaml"
            )
        try:
            info = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(info.st_mode):
            raise LocalApiSetupError(
                f"{self.path} exists and is not a socket; refusing to delete it. Remove it "
                "or change 'socket:' in agent.yaml"
            )
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.settimeout(1.0)
            probe.connect(str(self.path))
        except ConnectionRefusedError:
            log.info("removing stale socket file %s", self.path)
            self.path.unlink()
            return
        except OSError as exc:
            raise LocalApiSetupError(
                f"cannot check the existing socket {self.path}: {exc.strerror or exc}; remove "
                "it if no agent is running"
            ) from exc
        finally:
            probe.close()
        raise LocalApiSetupError(
            f"another process is serving on {self.path}; is another fleetlite-agent running? "
            "Stop it or choose another 'socket:' path"
        )

    def _remove_socket_file(self) -> None:
        # Only remove the file we created, not one a newer agent may have put in its place.
        try:
            info = os.lstat(self.path)
            if (info.st_dev, info.st_ino) == self._inode:
                self.path.unlink()
        except FileNotFoundError:
            pass

    # -- connections ---------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        assert self._listener is not None and self._wake_r is not None
        listener = self._listener
        poller = select.poll()
        poller.register(listener.fileno(), select.POLLIN)
        poller.register(self._wake_r.fileno(), select.POLLIN)
        while not self._stopping.is_set():
            poller.poll()
            if self._stopping.is_set():
                return
            try:
                conn, _ = listener.accept()
            except BlockingIOError:
                continue
            except OSError as exc:  # e.g. EMFILE: back off instead of spinning
                log.error("local API accept failed: %s", exc)
                time.sleep(0.1)
                continue
            conn.settimeout(self.idle_timeout_s)
            with self._lock:
                self._counts["connections"] += 1
                victim = None
                if len(self._connections) >= self.max_connections:
                    victim = self._longest_idle(time.monotonic())
                full = len(self._connections) >= self.max_connections and victim is None
                if not full:
                    state = _Connection(threading.Thread(
                        target=self._serve_connection,
                        args=(conn,),
                        name="fleetlite-local-api-conn",
                        daemon=True,
                    ))
                    self._connections[conn] = state
            if victim is not None:
                self._evict(victim)
            if full:
                self._refuse(conn)
            else:
                state.thread.start()

    def _longest_idle(self, now: float) -> socket.socket | None:
        """The connection idle between requests the longest, if for ``evict_idle_s`` or more."""
        idle = [(c.idle_since, conn) for conn, c in self._connections.items()
                if not c.evicted and not (c.guard is not None and c.guard.in_frame)
                and now - c.idle_since >= self.evict_idle_s]
        if not idle:
            return None
        _, conn = min(idle, key=lambda item: item[0])
        self._connections[conn].evicted = True
        self._counts["evicted_idle"] += 1
        return conn

    @staticmethod
    def _evict(conn: socket.socket) -> None:
        with contextlib.suppress(OSError):
            conn.shutdown(socket.SHUT_RDWR)  # its thread sees the end and closes it

    def _refuse(self, conn: socket.socket) -> None:
        with conn:
            self._count_error(wire.BUSY)
            try:
                conn.settimeout(1.0)
                self._send(
                    conn,
                    self._error(
                        None,
                        wire.BUSY,
                        f"the agent already serves {self.max_connections} local connections; "
                        "close idle ones or retry later",
                        close=True,
                    ),
                )
            except OSError:
                pass

    def _serve_connection(self, conn: socket.socket) -> None:
        state = self._connections[conn]
        guard = wire.FrameGuard(
            idle_timeout_s=self.idle_timeout_s,
            frame_timeout_s=self.request_timeout_s,
            slow_after_s=self.slow_after_s,
            on_slow=lambda: self._slow_request(state),
            reserve=lambda n: self._reserve(state, n),
        )
        state.guard = guard
        try:
            while not self._stopping.is_set():
                try:
                    frame = wire.recv_frame(
                        conn,
                        tensors_key="inputs",
                        max_header_bytes=self.max_header_bytes,
                        max_payload_bytes=self.max_payload_bytes,
                        guard=guard,
                    )
                except wire.ProtocolError as exc:
                    with self._lock:
                        self._counts["frames_rejected"] += 1
                    self._count_error(exc.code)
                    self._send(conn, self._error(None, exc.code, exc.detail, close=True))
                    return
                finally:
                    self._frame_ended(state)
                if frame is None:
                    return
                with self._lock:
                    self._counts["requests"] += 1
                header, payload = frame
                if header.get("op") == "cancel":
                    # no answer of its own: a cancel that crossed its generation's 'done' (or
                    # came without one) must not leave an unread response on the connection
                    del frame, payload
                    self._release(state)
                    continue
                if header.get("op") == "generate":
                    del frame, payload
                    self._release(state)
                    if not self._generate(conn, header, guard, state):
                        return
                    state.idle_since = time.monotonic()
                    continue
                try:
                    response = self._respond(header, payload)
                finally:
                    del frame, payload
                    self._release(state)
                self._send(conn, response)
                state.idle_since = time.monotonic()
        except OSError:
            pass  # timeout, reset or shut down by stop(): just close
        except Exception:  # the server must outlive any bug in a request handler
            log.exception("local API connection failed")
        finally:
            self._release(state)
            with self._lock:
                self._connections.pop(conn, None)
            conn.close()

    # -- abuse limits --------------------------------------------------------------------------

    def _slow_request(self, state: _Connection) -> None:
        with self._lock:
            if self._slow >= self.max_connections - self.reserved_slots:
                raise wire.ProtocolError(
                    wire.BUSY, f"{self._slow} other connections are sending requests slowly; "
                    "send each request in one go, or retry in a moment", fatal=True)
            self._slow += 1
            state.slow = True

    def _frame_ended(self, state: _Connection) -> None:
        with self._lock:
            if state.slow:
                self._slow -= 1
                state.slow = False

    def _reserve(self, state: _Connection, nbytes: int) -> None:
        with self._lock:
            if nbytes > 0 and self._inflight_bytes + nbytes > self.max_inflight_bytes:
                raise wire.ProtocolError(
                    wire.BUSY, f"the agent is already receiving {self._inflight_bytes} bytes of "
                    f"requests (limit {self.max_inflight_bytes}); retry in a moment",
                    fatal=True)
            self._inflight_bytes += nbytes
            state.reserved += nbytes

    def _release(self, state: _Connection) -> None:
        with self._lock:
            self._inflight_bytes -= state.reserved
            state.reserved = 0

    @staticmethod
    def _send(conn: socket.socket, response: Response) -> None:
        header, buffers = response
        wire.send_frame(conn, header, buffers)

    # -- requests ------------------------------------------------------------------------------

    def _count_error(self, code: str) -> None:
        with self._lock:
            self._errors[code] += 1

    def _error(
        self, request_id: RequestId, code: str, message: str, *, close: bool = False
    ) -> Response:
        header: dict[str, Any] = {"ok": False, "error_code": code, "error": message}
        if request_id is not None:
            header["id"] = request_id
        if close:
            header["close"] = True
        return header, []

    def _respond(self, header: dict[str, Any], payload: bytearray) -> Response:
        request_id = header.get("id")
        if request_id is not None and not (
            (isinstance(request_id, int) and not isinstance(request_id, bool))
            or (isinstance(request_id, str) and len(request_id) <= wire.MAX_ID_LENGTH)
        ):
            self._count_error(wire.BAD_REQUEST)
            return self._error(
                None, wire.BAD_REQUEST,
                f"'id' must be an integer or a string of at most {wire.MAX_ID_LENGTH} characters",
            )
        try:
            reply, buffers = self._dispatch(header, payload)
        except wire.ProtocolError as exc:
            code, message = exc.code, exc.detail
        except ModelNotFoundError as exc:
            code, message = wire.UNKNOWN_MODEL, str(exc)
        except InputMismatchError as exc:
            code, message = wire.INPUT_MISMATCH, str(exc)
        except InferenceError as exc:
            code, message = wire.INFERENCE_FAILED, str(exc)
        except (AgentError, ModelRuntimeError) as exc:
            code, message = wire.INTERNAL, str(exc)
        except Exception as exc:  # a bug must cost one request, not the connection
            log.exception("local API request failed")
            code, message = wire.INTERNAL, f"internal error ({type(exc).__name__}); see agent log"
        else:
            if request_id is not None:
                reply["id"] = request_id
            return reply, buffers
        self._count_error(code)
        return self._error(request_id, code, message)

    def _dispatch(self, header: dict[str, Any], payload: bytearray) -> Response:
        version = header.get("v", wire.PROTOCOL_VERSION)
        if version != wire.PROTOCOL_VERSION:
            raise wire.ProtocolError(
                wire.BAD_REQUEST,
                f"protocol version {version!r} is not supported; this agent speaks "
                f"v{wire.PROTOCOL_VERSION}",
            )
        op = header.get("op")
        if op == "ping":
            return {
                "ok": True, "pong": True, "agent_version": __version__,
                "v": wire.PROTOCOL_VERSION,
            }, []
        if op == "models":
            described = self.models.describe() + self.language_models.describe()
            return {"ok": True, "models": described}, []
        if op == "infer":
            return self._infer(header, payload)
        raise wire.ProtocolError(
            wire.UNKNOWN_OP, f"unknown op {op!r}; use one of: infer, generate, models, ping"
        )

    def _infer(self, header: dict[str, Any], payload: bytearray) -> Response:
        model = header.get("model")
        if not isinstance(model, str) or not model:
            raise wire.ProtocolError(wire.BAD_REQUEST, "'infer' needs 'model': a model name")
        tensors = wire.decode_tensors(header.get("inputs", []), payload)
        names = [name for name, _ in tensors]
        inputs: Any
        if tensors and all(name is not None for name in names):
            if len(set(names)) != len(names):
                raise wire.ProtocolError(wire.BAD_REQUEST, f"duplicate input names in {names}")
            inputs = {name: array for name, array in tensors}
        elif all(name is None for name in names):
            inputs = [array for _, array in tensors]
        else:
            raise wire.ProtocolError(
                wire.BAD_REQUEST, "name all inputs or none (then they are taken in model order)"
            )
        result = self.models.run(model, inputs)
        descs, buffers = wire.encode_tensors(list(result.outputs.items()))
        reply: dict[str, Any] = {"ok": True, "model": model, "outputs": descs}
        if result.model.version is not None:
            reply["version"] = result.model.version
        return reply, buffers

    # -- generation ----------------------------------------------------------------------------

    def _generate(self, conn: socket.socket, header: dict[str, Any], guard: wire.FrameGuard,
                  state: _Connection) -> bool:
        """Stream one generation: ``token`` frames as text is produced, then ``done``.

        Between frames the connection is read without blocking: a ``cancel`` frame (or the
        client going away) stops the generation. Returns False when the connection must close.
        """
        request_id = header.get("id")
        try:
            if request_id is not None and not _valid_id(request_id):
                raise wire.ProtocolError(
                    wire.BAD_REQUEST, f"'id' must be an integer or a string of at most "
                    f"{wire.MAX_ID_LENGTH} characters")
            served, prompt, params = self._generate_request(header)
            cancel = threading.Event()
            stream = served.service.stream(prompt, params, cancel=cancel)
        except Exception as exc:  # each maps to an error response below
            code, message = self._generate_error(exc)
            self._count_error(code)
            self._send(conn, self._error(request_id if _valid_id(request_id) else None,
                                         code, message))
            return True
        text: list[str] = []
        try:
            with stream:
                for chunk in stream:
                    text.append(chunk.text)
                    self._send(conn, ({"ok": True, **_id(request_id), "event": "token",
                                       "text": chunk.text, "tokens": chunk.tokens}, []))
                    if not self._poll_cancel(conn, request_id, guard, state, cancel):
                        cancel.set()
                        return False
        except OSError:
            cancel.set()  # the client went away: stop generating for nobody
            served.record_error()
            return False
        except Exception as exc:  # an engine failure costs this request only
            served.record_error()
            code, message = self._generate_error(exc)
            self._count_error(code)
            self._send(conn, self._error(request_id, code, message))
            return True
        stats = stream.stats
        served.record(stats)
        self._send(conn, ({"ok": True, **_id(request_id), "event": "done", "text": "".join(text),
                           "stop_reason": stats.stop_reason, "stats": _stats_dict(stats)}, []))
        return True

    def _generate_request(self, header: dict[str, Any]) -> tuple[ServedLm, str, GenerateParams]:
        model, prompt = header.get("model"), header.get("prompt")
        if not isinstance(model, str) or not model:
            raise wire.ProtocolError(wire.BAD_REQUEST, "'generate' needs 'model': a model name")
        if not isinstance(prompt, str):
            raise wire.ProtocolError(wire.BAD_REQUEST, "'generate' needs 'prompt': a string")
        served = self.language_models.get(model)
        given = header.get("params", {})
        if not isinstance(given, dict) or set(given) - set(_PARAM_TYPES):
            raise wire.ProtocolError(
                wire.BAD_REQUEST, f"'params' must be an object with keys among "
                f"{', '.join(sorted(_PARAM_TYPES))}")
        defaults = served.service.engine.default_params()
        fields: dict[str, Any] = {}
        for key, value in given.items():
            if value is None:
                continue
            if key == "stop_strings":
                ok = isinstance(value, list) and len(value) <= 8 and all(
                    isinstance(v, str) for v in value)
            else:
                ok = isinstance(value, _PARAM_TYPES[key]) and not isinstance(value, bool)
            if not ok:
                raise wire.ProtocolError(wire.BAD_REQUEST, f"params.{key} has the wrong type")
            fields[key] = tuple(value) if key == "stop_strings" else value
        params = GenerateParams(**{**vars(defaults), **fields})
        return served, prompt, params

    @staticmethod
    def _generate_error(exc: Exception) -> tuple[str, str]:
        if isinstance(exc, wire.ProtocolError):
            return exc.code, exc.detail
        if isinstance(exc, BusyError):
            return wire.BUSY, str(exc)
        if isinstance(exc, ModelNotFoundError):
            return wire.UNKNOWN_MODEL, str(exc)
        if isinstance(exc, (GenerationInputError, InputMismatchError)):
            return wire.INPUT_MISMATCH, str(exc)
        if isinstance(exc, InferenceError):
            return wire.INFERENCE_FAILED, str(exc)
        if isinstance(exc, (AgentError, ModelRuntimeError)):
            return wire.INTERNAL, str(exc)
        log.exception("local API generation failed")
        return wire.INTERNAL, f"internal error ({type(exc).__name__}); see agent log"

    def _poll_cancel(self, conn: socket.socket, request_id: RequestId, guard: wire.FrameGuard,
                     state: _Connection, cancel: threading.Event) -> bool:
        """Read any frames the client sent while we stream; False if it closed or broke the
        framing. A ``cancel`` sets ``cancel``; anything else is refused (one request at a time)."""
        while select.select([conn], [], [], 0)[0]:
            try:
                frame = wire.recv_frame(conn, tensors_key="inputs",
                                        max_header_bytes=self.max_header_bytes,
                                        max_payload_bytes=self.max_payload_bytes, guard=guard)
            except wire.ProtocolError as exc:
                self._count_error(exc.code)
                self._send(conn, self._error(None, exc.code, exc.detail, close=True))
                return False
            finally:
                self._frame_ended(state)
                self._release(state)
            if frame is None:
                return False
            other = frame[0]
            if other.get("op") == "cancel" and other.get("id", request_id) == request_id:
                cancel.set()
                continue
            self._count_error(wire.BAD_REQUEST)
            self._send(conn, self._error(
                other.get("id") if _valid_id(other.get("id")) else None, wire.BAD_REQUEST,
                "a generation is streaming on this connection: send only 'cancel' until its "
                "'done', or use another connection"))
        return True


_PARAM_TYPES: dict[str, Any] = {
    "temperature": (int, float), "top_k": int, "top_p": (int, float), "seed": int,
    "max_tokens": int, "stop_strings": list,
}


def _valid_id(value: Any) -> bool:
    return value is None or (isinstance(value, int) and not isinstance(value, bool)) or (
        isinstance(value, str) and len(value) <= wire.MAX_ID_LENGTH)


def _id(request_id: RequestId) -> dict[str, Any]:
    return {} if request_id is None else {"id": request_id}


def _stats_dict(stats: Any) -> dict[str, Any]:
    """A generation's counts and timings for the ``done`` frame (no text)."""
    decode = sorted(stats.decode_ms)
    return {
        "prompt_tokens": stats.prompt_tokens,
        "generated_tokens": stats.generated_tokens,
        "queued_ms": round(stats.queued_ms, 3),
        "time_to_first_token_ms": (None if stats.time_to_first_token_ms is None
                                   else round(stats.time_to_first_token_ms, 3)),
        "prefill_ms": round(stats.prefill_ms, 3),
        "decode_ms_p50": round(decode[len(decode) // 2], 3) if decode else None,
        "prefill_tokens_per_s": _round(stats.prefill_tokens_per_s),
        "decode_tokens_per_s": _round(stats.decode_tokens_per_s),
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)
