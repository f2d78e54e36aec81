"""The per-rank HTTP endpoint: ``/metrics``, ``/healthz`` and the opt-in ``/debug/stacks``.

It runs on its own daemon thread, so it answers while the engine thread is blocked inside a
Gloo all-reduce (which releases the GIL) or sleeping in a stalled step; that is what lets an
operator see *which* rank is stuck while it is stuck. Loopback by default.

It lives inside an inference engine, so a client cannot make it cost more than a few threads:
at most ``MAX_CONNECTIONS`` requests are served at once (the next ones get a 503 without a
thread), each socket read or write waits at most ``HANDLER_TIMEOUT`` seconds, and a connection
still open after ``CONNECTION_DEADLINE`` seconds (a client dripping its request) is cut.
``/debug/stacks`` shows code paths: on a bind other than loopback it needs a second opt-in.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import sys
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.openmetrics import exposition as openmetrics

from instrumented_core.telemetry.config import (
    ENV_DEBUG_REMOTE,
    ENV_HOST,
    ENV_PORT_BASE,
    TelemetryConfigError,
    _flag,
    check_host,
    is_loopback_host,
)

__all__ = ["CONNECTION_DEADLINE", "HANDLER_TIMEOUT", "MAX_CONNECTIONS", "MetricsServer",
           "engine_thread_stack"]

MAX_CONNECTIONS = 8
HANDLER_TIMEOUT = 5.0
CONNECTION_DEADLINE = 10.0
_BUSY = (b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: text/plain\r\nContent-Length: 37"
         b"\r\nRetry-After: 1\r\nConnection: close\r\n\r\ntoo many concurrent scrapes; retry\n\n")
log = logging.getLogger("instrumented_core")


def engine_thread_stack(thread_id: int) -> str:
    frame = sys._current_frames().get(thread_id)
    if frame is None:
        return "engine thread not found\n"
    return "".join(traceback.format_stack(frame))


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = HANDLER_TIMEOUT  # each read and write of the socket (BaseHTTPRequestHandler)

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            # OpenMetrics (with the histograms' trace exemplars) only when asked for, as
            # Prometheus does; any other scraper gets the plain text format.
            openmetrics_wanted = "application/openmetrics-text" in self.headers.get("Accept", "")
            try:
                if openmetrics_wanted:
                    exposition = openmetrics.generate_latest(self.server.registry)
                else:
                    exposition = generate_latest(self.server.registry)
            except Exception as e:  # noqa: BLE001 - one broken collector: say so, not a reset
                self.server.scrape_failed(e)
                self._send(500, f"scrape failed in rank {self.server.rank}'s telemetry: "
                                f"{type(e).__name__}: {e}\n".encode(), "text/plain")
                return
            self._send(200, exposition,
                       openmetrics.CONTENT_TYPE_LATEST if openmetrics_wanted
                       else CONTENT_TYPE_LATEST)
        elif path == "/healthz":
            self._send(200, b"ok\n", "text/plain")
        elif path == "/debug/stacks" and self.server.debug_refused:
            self._send(403, self.server.debug_refused.encode(), "text/plain")
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
    block_on_close = False
    #: the listen backlog: while the process is frozen (SIGSTOP) the kernel still accepts this
    #: many connections, so scrapers see "unresponsive" (connects, no answer), not a dropped
    #: SYN that looks like a partition; socketserver's 5 fill in a few doctor reads.
    request_queue_size = 128
    registry: CollectorRegistry
    debug_enabled: bool
    debug_refused: str
    engine_thread_id: int
    rank: int

    def __init__(self, address, handler) -> None:
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._open: dict[socket.socket, float] = {}
        self._open_lock = threading.Lock()
        self.busy_refused = 0
        self.scrapes_failed = 0
        super().__init__(address, handler)

    def handle_error(self, request, client_address) -> None:
        """A client that left before its answer (a scraper past its timeout, or one whose
        request waited while the process was frozen) is routine for an engine's endpoint: no
        traceback on the engine's stderr. Anything else is still printed by socketserver."""
        if isinstance(sys.exc_info()[1], ConnectionError):  # BrokenPipe, ConnectionReset, ...
            return
        super().handle_error(request, client_address)

    def scrape_failed(self, error: Exception) -> None:
        """Log the first failed scrape with its traceback; the next ones only count."""
        self.scrapes_failed += 1
        if self.scrapes_failed == 1:
            log.error("instrumented_core: rank %s: /metrics failed (answered 500; logged "
                      "once): %s: %s", self.rank, type(error).__name__, error,
                      exc_info=error)

    def process_request(self, request, client_address) -> None:
        if not self._slots.acquire(blocking=False):  # answered here, no thread started
            self.busy_refused += 1
            try:
                request.settimeout(0.05)
                request.sendall(_BUSY)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        with self._open_lock:
            self._open[request] = time.monotonic() + CONNECTION_DEADLINE
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._done(request)
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._done(request)

    def _done(self, request) -> None:
        with self._open_lock:
            if self._open.pop(request, None) is None:
                return
        self._slots.release()

    def service_actions(self) -> None:
        """Runs in the serving loop (every poll interval): cut connections past the deadline;
        their handler thread then fails its read or write and ends."""
        now = time.monotonic()
        with self._open_lock:
            late = [s for s, deadline in self._open.items() if deadline < now]
        for s in late:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _Server6(_Server):
    address_family = socket.AF_INET6


class MetricsServer:
    """Serves one registry; ``port`` is the bound port (useful when asked for port 0).

    ``debug_remote`` is the second opt-in ``/debug/stacks`` needs on a non-loopback bind
    (None: from ``INSTRUMENTED_CORE_DEBUG_ENDPOINT_REMOTE``)."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int, rank: int = 0,
                 debug_enabled: bool = False, debug_remote: bool | None = None) -> None:
        host = check_host(host, "metrics host")
        loopback = is_loopback_host(host)
        if debug_remote is None:
            debug_remote = _flag(os.environ, ENV_DEBUG_REMOTE, False)
        try:
            family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        except (socket.gaierror, UnicodeError) as e:
            raise TelemetryConfigError(
                f"cannot serve metrics for rank {rank}: host {host!r} does not resolve ({e}): "
                f"set {ENV_HOST} to an address of this machine, e.g. 127.0.0.1 or ::1") from None
        server_cls = _Server6 if family == socket.AF_INET6 else _Server
        try:
            self._server = server_cls((host, port), _Handler)
        except OSError as e:
            raise TelemetryConfigError(_bind_error(e, host, port, rank)) from None
        self._server.registry = registry
        self._server.debug_enabled = debug_enabled
        self._server.debug_refused = ""
        if debug_enabled and not loopback and not debug_remote:
            self._server.debug_refused = (
                f"refused: /debug/stacks on a non-loopback bind ({host}) shows this engine's "
                f"code paths to the network; set {ENV_DEBUG_REMOTE}=1 as well to allow it\n")
            log.warning("instrumented_core: rank %s: /debug/stacks refused on %s (not "
                        "loopback); set %s=1 to allow it", rank, host, ENV_DEBUG_REMOTE)
        if not loopback:
            log.warning("instrumented_core: rank %s serves /metrics on %s:%s, reachable from "
                        "other hosts", rank, host, self._server.server_address[1])
        self._server.engine_thread_id = threading.get_ident()
        self._server.rank = rank
        self.host, self.port = host, self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.1,),
                                        name="metrics-http", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    @property
    def busy_refused(self) -> int:
        """Connections answered 503 because ``MAX_CONNECTIONS`` were being served."""
        return self._server.busy_refused

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _bind_error(e: OSError, host: str, port: int, rank: int) -> str:
    import errno

    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if e.errno == errno.EADDRINUSE:
        return (f"cannot serve metrics for rank {rank} on {where}: the port is already in use: "
                f"pick a free range with --metrics-port-base or {ENV_PORT_BASE}")
    if e.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
        try:
            literal = bool(ipaddress.ip_address(host))
        except ValueError:
            literal = False
        what = "is not an address of this machine" if literal else "is not on this machine"
        return (f"cannot serve metrics for rank {rank} on {where}: {host} {what} ({e.strerror})"
                f": set {ENV_HOST} to one of its addresses, e.g. 127.0.0.1 or 0.0.0.0")
    if e.errno == errno.EACCES:
        return (f"cannot serve metrics for rank {rank} on {where} ({e.strerror}): ports below "
                f"1024 need privileges; pick another with --metrics-port-base or {ENV_PORT_BASE}")
    return f"cannot serve metrics for rank {rank} on {where} ({e.strerror or e})"
