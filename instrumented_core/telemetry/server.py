"""The per-rank HTTP endpoint: ``/metrics``, ``/healthz`` and the opt-in ``/debug/stacks``.

It runs on its own daemon thread, so it answers while the engine thread is blocked inside a
Gloo all-reduce (which releases the GIL) or sleeping in a stalled step; that is what lets an
operator see *which* rank is stuck while it is stuck. Loopback by default.
"""

from __future__ import annotations

import sys
import threading
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from instrumented_core.telemetry.config import ENV_PORT_BASE, TelemetryConfigError


def engine_thread_stack(thread_id: int) -> str:
    frame = sys._current_frames().get(thread_id)
    if frame is None:
        return "engine thread not found\n"
    return "".join(traceback.format_stack(frame))


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._send(200, generate_latest(self.server.registry), CONTENT_TYPE_LATEST)
        elif path == "/healthz":
            self._send(200, b"ok\n", "text/plain")
        elif path == "/debug/stacks" and self.server.debug_enabled:
            body = f"# engine thread of rank {self.server.rank}\n" + engine_thread_stack(
                self.server.engine_thread_id)
            self._send(200, body.encode(), "text/plain; charset=utf-8")
        else:
            self._send(404, b"not found\n", "text/plain")

    def _send(self, code: int, body: bytes, content_type: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    registry: CollectorRegistry
    debug_enabled: bool
    engine_thread_id: int
    rank: int


class MetricsServer:
    """Serves one registry; ``port`` is the bound port (useful when asked for port 0)."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int, rank: int = 0,
                 debug_enabled: bool = False) -> None:
        try:
            self._server = _Server((host, port), _Handler)
        except OSError as e:
            raise TelemetryConfigError(
                f"cannot serve metrics for rank {rank} on {host}:{port} ({e.strerror}): pick a "
                f"free range with --metrics-port-base or {ENV_PORT_BASE}") from None
        self._server.registry = registry
        self._server.debug_enabled = debug_enabled
        self._server.engine_thread_id = threading.get_ident()
        self._server.rank = rank
        self.host, self.port = host, self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics-http",
                                        daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
