"""The doctor never says healthy wrongly: what it reads is checked before it is believed.

Real ``RankMetrics`` behind real ``MetricsServer``s over loopback HTTP, beside fake servers
that answer what a wrong target, a zombie endpoint, a slow client's nightmare or a Prometheus
would answer. Fast: no cluster, no engine.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from prometheus_client import CollectorRegistry

from instrumented_core import scrape as scrape_mod
from instrumented_core.doctor import EXIT_DOUBT, EXIT_STUCK, run_doctor
from instrumented_core.protocol import PauseStateMachine
from instrumented_core.scrape import (
    DIAGNOSIS_SERIES,
    PrometheusError,
    http_get,
    prometheus_samples,
    scrape,
    to_view,
)
from instrumented_core.telemetry import names as n
from instrumented_core.telemetry.metrics import RankMetrics
from instrumented_core.telemetry.probe import TelemetryProbe
from instrumented_core.telemetry.server import MetricsServer

INFO = {"dp_size": "2", "sync_interval": "16", "protocol": "two-phase", "cadence": "fixed",
        "version": "test", "vllm_version": "none"}


class Rank:
    """One rank's telemetry as an engine serves it, with its state machine."""

    def __init__(self, rank: int, dp_size: int, model: str = "m") -> None:
        self.registry = CollectorRegistry()
        self.metrics = RankMetrics(self.registry, rank, model, INFO)
        self.probe = TelemetryProbe(rank, dp_size, self.metrics, None, model_name=model)
        self.sm = PauseStateMachine(rank, dp_size, 16, probe=self.probe)
        self.sm.request_counts = lambda: (1, 0)
        self.server = MetricsServer(self.registry, "127.0.0.1", 0, rank)
        self.target = f"127.0.0.1:{self.server.port}"


@contextmanager
def ranks(dp_size: int, engines: list[int] | None = None, model: str = "m") -> Iterator[list[Rank]]:
    out = [Rank(r, dp_size, model) for r in (range(dp_size) if engines is None else engines)]
    try:
        yield out
    finally:
        for r in out:
            r.server.close()


Respond = Callable[[BaseHTTPRequestHandler], None]


@contextmanager
def fake_server(respond: Respond) -> Iterator[str]:
    """A loopback HTTP server whose every GET is answered by ``respond``; yields host:port."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            try:
                respond(self)
            except (BrokenPipeError, ConnectionResetError):
                pass

        def log_message(self, format: str, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def answer(status: int, body: bytes, content_type: str = "text/plain") -> Respond:
    def respond(h: BaseHTTPRequestHandler) -> None:
        h.send_response(status)
        h.send_header("Content-Type", content_type)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)
    return respond


HTML = b"<!doctype html><html><body>Grafana</body></html>\n"


# --- what a target answers -------------------------------------------------------------------

@pytest.mark.parametrize("respond, words", [
    (answer(200, HTML, "text/html"), "no vllm_dp_ series"),
    (answer(200, b"node_load1 0.5\nnode_load5 0.4\n"), "no vllm_dp_ series"),
    (answer(404, b"not found\n"), "HTTP 404"),
    (answer(200, b"vllm_dp_pause_phase{engine=\"0\"} 0\n"), "lacks"),
    (answer(200, b"\xff\xfe\x00garbage"), "not UTF-8"),
], ids=["a web page", "another exporter", "404", "one of our series only", "binary"])
def test_a_target_that_is_not_a_dp_endpoint_is_named_never_a_healthy_rank(respond, words):
    with ranks(2) as live, fake_server(respond) as other:
        report = run_doctor(targets=[live[0].target, other, live[1].target], interval=0.05)
    v = report.verdict
    assert v.kind == "not_dp_endpoint" and not v.healthy, report.render()
    assert other in v.summary and words in v.summary, v.summary
    assert report.exit_code == EXIT_DOUBT
    assert report.render().startswith("NOT DP ENDPOINT: not a vLLM DP endpoint: ")


def test_telemetry_serving_frozen_defaults_is_not_a_rank():
    """A zombie endpoint (the server started, the rank's telemetry never did): phase 0,
    vllm_dp_size 0. Read as a healthy rank before."""
    registry = CollectorRegistry()
    RankMetrics(registry, 1, "m", INFO)  # no probe attached: the defaults
    server = MetricsServer(registry, "127.0.0.1", 0, 1)
    try:
        with ranks(2, engines=[0]) as live:
            report = run_doctor(targets=[live[0].target, f"127.0.0.1:{server.port}"],
                                interval=0.05)
    finally:
        server.close()
    assert report.verdict.kind == "not_dp_endpoint", report.render()
    assert "vllm_dp_size is 0" in report.verdict.summary


def test_a_forgotten_target_makes_the_verdict_incomplete_naming_the_engine():
    with ranks(4, engines=[0, 1, 3]) as live:
        report = run_doctor(targets=[r.target for r in live], interval=0.05)
    assert report.verdict.kind == "incomplete", report.render()
    assert report.verdict.summary == "incomplete: 3 of 4 ranks; engine 2 not among the targets"
    assert "among the 3 ranks read: HEALTHY" in report.render()
    assert report.exit_code == EXIT_DOUBT


def test_targets_of_two_deployments_are_never_merged_by_engine_number():
    with ranks(2, model="a") as a, ranks(2, model="b") as b:
        report = run_doctor(targets=[r.target for r in a + b], interval=0.05)
    assert report.verdict.kind == "mixed", report.render()
    assert "2 deployments" in report.verdict.summary


# --- a pause that does not converge ------------------------------------------------------------

def test_a_pause_sent_to_one_engine_only_is_named_not_converging_with_the_rank_never_asked():
    """The measured real-vLLM story: pause_scheduler to engine 0 only, with traffic. Before:
    "PAUSING: 1 of 2 ranks pending; next sync round in 16 steps", again and again."""
    with ranks(2) as live:
        live[0].sm.request_pause("keep", has_work=True)
        live[0].metrics.pending_since.set(time.time() - 8.0)  # pending for 8 s
        report = run_doctor(targets=[r.target for r in live], threshold=2.0, interval=0.05)
    v = report.verdict
    assert (v.kind, v.culprits, v.victims) == ("not_converging", [1], [0]), report.render()
    assert "rank 1 never voted to pause" in v.summary and "rank 0 pending for 8." in v.summary
    assert report.exit_code == EXIT_STUCK
    assert report.render().startswith("NOT CONVERGING: ")


def test_a_rank_pending_through_more_sync_rounds_than_consensus_takes_is_not_converging():
    with ranks(2) as live:
        for r in live:
            r.sm.request_pause("keep", has_work=True)
        stop = threading.Event()

        def rounds() -> None:  # sync rounds complete, no consensus comes
            while not stop.wait(0.02):
                live[0].metrics.sync_wait.observe(0.0005)

        t = threading.Thread(target=rounds)
        t.start()
        try:
            report = run_doctor(targets=[r.target for r in live], interval=0.3)
        finally:
            stop.set()
            t.join()
    v = report.verdict
    assert (v.kind, v.culprits, v.victims) == ("not_converging", [], [0, 1]), report.render()
    assert "sync rounds without consensus" in v.summary


def test_a_pause_a_moment_old_is_pausing():
    with ranks(2) as live:
        live[0].sm.request_pause("keep", has_work=True)
        report = run_doctor(targets=[r.target for r in live], interval=0.05)
    assert report.verdict.kind == "pausing", report.render()


# --- the doctor's HTTP reads ------------------------------------------------------------------

def drip(headers_first: bool) -> Respond:
    """A server that never finishes: one byte every 0.1 s (of the headers, or of the body)."""
    def respond(h: BaseHTTPRequestHandler) -> None:
        if headers_first:
            h.send_response(200)
            h.send_header("Content-Type", "text/plain")
            h.end_headers()
        for _ in range(600):
            h.wfile.write(b"#" if headers_first else b"X")
            h.wfile.flush()
            time.sleep(0.1)
    return respond


@pytest.mark.parametrize("headers_first", [True, False], ids=["slow body", "slow headers"])
def test_a_slow_dripping_target_cannot_hold_the_doctor_past_its_deadline(headers_first):
    with fake_server(drip(headers_first)) as slow:
        started = time.monotonic()
        sample = scrape(slow, timeout=0.5)
        took = time.monotonic() - started
    assert not sample.reachable and "no complete answer within 0.5 s" in sample.error
    assert took < 1.5, took


def test_an_endless_answer_is_cut_at_the_byte_cap():
    def endless(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.end_headers()
        chunk = b"vllm_dp_x 1\n" * 10_000
        for _ in range(2_000):
            h.wfile.write(chunk)

    with fake_server(endless) as big:
        sample = scrape(big, timeout=5.0, max_bytes=1_000_000)
    assert sample.reachable and "larger than 1000000 bytes" in sample.problem
    assert to_view(sample, 0).not_endpoint


def test_loopback_targets_never_go_through_http_proxy(monkeypatch):
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    with ranks(1) as live:
        sample = scrape(live[0].target, only=DIAGNOSIS_SERIES)
    assert sample.reachable and not sample.problem, sample.error
    assert scrape_mod._proxy_for("http", "127.0.0.1") is None
    assert scrape_mod._proxy_for("http", "::1") is None
    assert scrape_mod._proxy_for("http", "localhost") is None
    proxy = scrape_mod._proxy_for("http", "ranks.example")
    assert proxy is not None and proxy.port == 9  # a remote rank still honours the proxy


def test_a_remote_target_behind_http_proxy_is_read_through_it(monkeypatch):
    seen: list[str] = []

    def proxy(h: BaseHTTPRequestHandler) -> None:
        seen.append(h.path)
        answer(200, b"ok\n")(h)

    with fake_server(proxy) as p:
        monkeypatch.setenv("http_proxy", f"http://{p}")
        monkeypatch.delenv("no_proxy", raising=False)
        monkeypatch.delenv("NO_PROXY", raising=False)
        status, body = http_get("http://ranks.example:8100/metrics", 2.0)
    assert (status, body, seen) == (200, b"ok\n", ["http://ranks.example:8100/metrics"])


# --- through Prometheus -------------------------------------------------------------------------

JOB = "vllm"


def vector(sample_values: dict, instance: str, job: str = JOB) -> list[dict]:
    return [{"metric": {"__name__": name, **dict(labels), "instance": instance, "job": job},
             "value": [time.time(), repr(value)]}
            for (name, labels), value in sample_values.items()]


class FakePrometheus:
    """Answers the doctor's instant queries from live rank samples, as Prometheus would: the
    per-rank series carry ``instance`` and ``job``; ``up`` carries no ``model_name``."""

    def __init__(self, deployments: dict[tuple[str, str], list[Rank]], dead: dict[str, Rank]):
        self.deployments, self.dead = deployments, dead
        self.queries: list[str] = []

    def result(self, query: str) -> list[dict]:
        out: list[dict] = []
        for (job, model), members in self.deployments.items():
            wanted = f'model_name="{model}"'
            if "model_name=" in query and wanted not in query:
                continue
            for r in members:
                instance = r.target
                if instance in self.dead:
                    continue
                values = scrape(r.target, only=DIAGNOSIS_SERIES).values
                if query.startswith("last_over_time"):
                    values = {k: v for k, v in values.items() if k[0] == n.DP_SIZE}
                out += vector(values, instance, job)
        if query.startswith("last_over_time"):
            for instance, r in self.dead.items():
                out += vector({(n.DP_SIZE, frozenset({n.LABEL_ENGINE: str(r.probe.rank),
                                                       n.LABEL_MODEL_NAME: "m"}.items())): 2.0},
                              instance)
        if query.startswith("up"):
            out = [{"metric": {"__name__": "up", "instance": i, "job": JOB},
                    "value": [time.time(), "0"]} for i in self.dead]
        return out

    def respond(self, h: BaseHTTPRequestHandler) -> None:
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(h.path).query)["query"][0]
        self.queries.append(query)
        body = {"status": "success", "data": {"resultType": "vector",
                                              "result": self.result(query)}}
        answer(200, json.dumps(body).encode(), "application/json")(h)


def test_with_a_selector_a_dead_rank_is_still_named():
    """``up`` has no model_name: ``up{model_name="m"} == 0`` matched nothing and the dead
    rank vanished, so the verdict read healthy."""
    with ranks(3) as live:
        dead = live[2]
        prom = FakePrometheus({(JOB, "m"): live}, {dead.target: dead})
        with fake_server(prom.respond) as url:
            report = run_doctor(prometheus=f"http://{url}", selector='model_name="m"')
    v = report.verdict
    assert (v.kind, v.culprits, v.victims) == ("stuck", [2], [0, 1]), report.render()
    assert not any(q.startswith("up{") and "model_name" in q for q in prom.queries), prom.queries


def test_without_a_selector_two_deployments_are_refused_with_one_line():
    with ranks(2, model="a") as a, ranks(2, model="b") as b:
        prom = FakePrometheus({(JOB, "a"): a, (JOB, "b"): b}, {})
        with fake_server(prom.respond) as url:
            with pytest.raises(PrometheusError) as e:
                prometheus_samples(f"http://{url}")
            one = prometheus_samples(f"http://{url}", selector='model_name="b"')
    assert "2 deployments" in str(e.value) and "--selector" in str(e.value)
    assert "\n" not in str(e.value)
    assert sorted(s.engine for s in one) == [0, 1]


def test_a_socket_that_accepts_and_never_answers_is_unreachable_in_time():
    with socket.socket() as mute:
        mute.bind(("127.0.0.1", 0))
        mute.listen()
        started = time.monotonic()
        sample = scrape(f"127.0.0.1:{mute.getsockname()[1]}", timeout=0.3)
    assert not sample.reachable and time.monotonic() - started < 1.0
