"""A small HTTP endpoint for the controller's health: ``GET /healthz`` answers 200 when the
controller is ingesting, driving rollouts and serving releases, 503 when it is not, with the
details as JSON either way (what a load balancer, systemd watchdog script or Kubernetes probe
checks). ``fleetlite serve --health 127.0.0.1:9108`` turns it on; docs/operator-guide.md,
"Controller health", describes the fields."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Optional

from fleetlite.fleet.errors import FleetError

__all__ = ["HealthEndpoint", "parse_listen_address"]

log = logging.getLogger("fleetlite.fleet.health")

PATH = "/healthz"


def parse_listen_address(text: str) -> tuple[str, int]:
    """``PORT``, ``HOST:PORT`` or ``[IPv6]:PORT`` as (host, port); a bare port listens on
    127.0.0.1 only. Raises :class:`FleetError` saying what is accepted."""
    host, sep, port_text = text.rpartition(":")
    if not sep:
        host, port_text = "127.0.0.1", text
    host = host.strip("[]") or "127.0.0.1"
    try:
        port = int(port_text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise FleetError(f"cannot read the health address {text!r}: give PORT or HOST:PORT, "
                         "e.g. 9108 or 0.0.0.0:9108")
    return host, port


class HealthEndpoint:
    """Serves ``status()`` (a JSON-ready dict with a boolean ``ok``) at ``/healthz`` from a
    daemon thread until :meth:`close`."""

    def __init__(self, host: str, port: int, status: Callable[[], dict[str, Any]]) -> None:
        handler = _handler(status)
        try:
            self._server = ThreadingHTTPServer((host, port), handler)
        except OSError as exc:
            raise FleetError(f"cannot serve the health endpoint on {host}:{port}: "
                             f"{exc.strerror or exc}; choose another --health port") from None
        self._server.daemon_threads = True
        self._thread: Optional[threading.Thread] = None

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        host = host.decode() if isinstance(host, bytes) else host
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{port}{PATH}"

    def start(self) -> HealthEndpoint:
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        name="fleetlite-health", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _handler(status: Callable[[], dict[str, Any]]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.split("?", 1)[0] != PATH:
                self._answer(404, {"error": f"no such path: try {PATH}"})
                return
            try:
                body = status()
            except Exception as exc:  # a health check must answer, never hang up
                log.exception("health status failed")
                body = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            self._answer(200 if body.get("ok") else 503, body)

        def _answer(self, code: int, body: dict[str, Any]) -> None:
            data = json.dumps(body, sort_keys=True).encode() + b"\n"
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("health: " + format, *args)

    return Handler
