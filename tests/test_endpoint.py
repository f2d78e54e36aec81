"""The endpoint inside an engine process: slow clients, bad hosts, IPv6, /debug/stacks.

A real ``MetricsServer`` on loopback; the deadlines are shortened so each test takes about a
second. What is pinned: a client cannot make the endpoint hold more than MAX_CONNECTIONS
threads or hold one past its deadline, a bad host is one error naming the setting (never
"port in use"), IPv6 works, and /debug/stacks needs a second opt-in off loopback.
"""

from __future__ import annotations

import socket
import threading
import time
import urllib.request

import pytest
from prometheus_client import CollectorRegistry

from instrumented_core.scrape import http_get
from instrumented_core.telemetry import names as n
from instrumented_core.telemetry import server as server_mod
from instrumented_core.telemetry.config import (
    ENV_DEBUG_REMOTE,
    ENV_HOST,
    TelemetryConfig,
    TelemetryConfigError,
)
from instrumented_core.telemetry.metrics import RankMetrics
from instrumented_core.telemetry.server import MAX_CONNECTIONS, MetricsServer


@pytest.fixture
def short_deadlines(monkeypatch):
    monkeypatch.setattr(server_mod, "CONNECTION_DEADLINE", 1.5)


@pytest.fixture
def endpoint(short_deadlines):
    registry = CollectorRegistry()
    RankMetrics(registry, 0, "m", {})
    server = MetricsServer(registry, "127.0.0.1", 0, 0)
    try:
        yield server
    finally:
        server.close()


def handler_threads() -> int:
    return sum(1 for t in threading.enumerate() if "process_request_thread" in t.name)


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s (last: {value!r})")
        time.sleep(0.02)


def test_slow_clients_cannot_pile_up_threads_and_are_cut_at_the_deadline(endpoint):
    idle = [socket.create_connection(("127.0.0.1", endpoint.port)) for _ in range(MAX_CONNECTIONS)]
    try:
        wait_for(lambda: len(endpoint._server._open) == MAX_CONNECTIONS, 3.0, "connections held")
        extra = [socket.create_connection(("127.0.0.1", endpoint.port)) for _ in range(4)]
        for s in extra:  # answered 503 at once, without a thread
            s.settimeout(3.0)
            assert s.recv(100).startswith(b"HTTP/1.0 503")
            s.close()
        assert handler_threads() <= MAX_CONNECTIONS
        assert endpoint.busy_refused == 4
        # the idle ones are cut at the deadline; a scrape is served again
        wait_for(lambda: not endpoint._server._open and handler_threads() == 0, 3.0,
                 "idle connections cut")
        for s in idle:
            s.settimeout(1.0)
            assert s.recv(10) == b""  # closed by the endpoint
        status, body = http_get(endpoint.url, 2.0)
        assert status == 200 and n.PHASE.encode() in body
    finally:
        for s in idle:
            s.close()


def test_an_idle_connection_is_closed_after_the_handler_timeout(monkeypatch, endpoint):
    monkeypatch.setattr(server_mod._Handler, "timeout", 0.3)
    with socket.create_connection(("127.0.0.1", endpoint.port)) as s:
        started = time.monotonic()
        s.settimeout(3.0)
        assert s.recv(10) == b""
        assert time.monotonic() - started < 1.2


def test_a_client_dripping_its_request_is_cut_at_the_connection_deadline(endpoint):
    with socket.create_connection(("127.0.0.1", endpoint.port)) as s:
        started = time.monotonic()
        s.sendall(b"GET /metrics HTTP/1.0\r\n")
        closed = False
        while time.monotonic() - started < 3.0:
            try:
                s.sendall(b"X")  # one byte of a header, every 0.1 s: each read succeeds
                time.sleep(0.1)
            except OSError:
                closed = True
                break
        took = time.monotonic() - started
    assert closed and took < 2.5, took


def test_an_endpoint_serves_on_ipv6_loopback():
    registry = CollectorRegistry()
    RankMetrics(registry, 0, "m", {})
    server = MetricsServer(registry, "::1", 0, 0)
    try:
        assert server.url.startswith("http://[::1]:")
        status, body = http_get(server.url, 2.0)
        assert status == 200 and n.PHASE.encode() in body
    finally:
        server.close()
    TelemetryConfig.from_env({ENV_HOST: "[::1]"}).check_ports_free(2)


@pytest.mark.parametrize("host, words", [
    ("not a host", "is not an IP address or a host name"),
    ("999.1.1.1", "is not an IP address or a host name"),
    ("127.0.0.1:8100", "is not an IP address or a host name"),
    ("http://127.0.0.1", "is not an IP address or a host name"),
])
def test_a_bad_metrics_host_is_one_error_naming_the_setting(host, words):
    with pytest.raises(TelemetryConfigError) as e:
        TelemetryConfig.from_env({ENV_HOST: host})
    assert ENV_HOST in str(e.value) and words in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("host", ["192.0.2.1", "2001:db8::1"])
def test_a_host_that_is_not_this_machines_is_not_reported_as_port_in_use(host):
    with pytest.raises(TelemetryConfigError) as e:
        MetricsServer(CollectorRegistry(), host, 0, 3)
    assert "in use" not in str(e.value) and ENV_HOST in str(e.value), str(e.value)
    with pytest.raises(TelemetryConfigError) as e:
        TelemetryConfig.from_env({ENV_HOST: host, "INSTRUMENTED_CORE_METRICS_PORT_BASE":
                                  "18100"}).check_ports_free(2)
    assert "in use" not in str(e.value) and ENV_HOST in str(e.value), str(e.value)


def test_a_port_really_in_use_is_still_named_so():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(TelemetryConfigError, match="already in use"):
            MetricsServer(CollectorRegistry(), "127.0.0.1", port, 0)


def _stacks(server: MetricsServer) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/debug/stacks",
                                    timeout=2) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@pytest.mark.parametrize("host, remote, code", [
    ("127.0.0.1", False, 200),
    ("0.0.0.0", False, 403),
    ("0.0.0.0", True, 200),
])
def test_debug_stacks_off_loopback_needs_a_second_opt_in(monkeypatch, host, remote, code):
    monkeypatch.delenv(ENV_DEBUG_REMOTE, raising=False)
    server = MetricsServer(CollectorRegistry(), host, 0, 0, debug_enabled=True,
                           debug_remote=remote)
    try:
        status, body = _stacks(server)
    finally:
        server.close()
    assert status == code, body
    if code == 403:
        assert ENV_DEBUG_REMOTE in body
    else:
        assert "engine thread of rank 0" in body


def test_the_second_opt_in_is_read_from_the_environment(monkeypatch):
    monkeypatch.setenv(ENV_DEBUG_REMOTE, "1")
    assert TelemetryConfig.from_env({ENV_DEBUG_REMOTE: "1"}).debug_remote
    server = MetricsServer(CollectorRegistry(), "0.0.0.0", 0, 0, debug_enabled=True)
    try:
        assert _stacks(server)[0] == 200
    finally:
        server.close()


@pytest.mark.parametrize("error", [BrokenPipeError, ConnectionResetError])
def test_a_client_gone_before_its_answer_leaves_no_traceback(endpoint, capsys, error):
    """After SIGCONT a frozen rank answers the scrapes queued while it was stopped; their
    clients are long gone. Those writes fail routinely and must not print tracebacks into the
    engine's log; any other handler error still does."""
    try:
        raise error(32, "the client went away")
    except error:
        endpoint._server.handle_error(None, ("127.0.0.1", 1))
    assert capsys.readouterr().err == ""
    try:
        raise ValueError("a real bug in a handler")
    except ValueError:
        endpoint._server.handle_error(None, ("127.0.0.1", 1))
    assert "ValueError: a real bug in a handler" in capsys.readouterr().err
