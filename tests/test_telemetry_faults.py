"""Telemetry's own faults never leave a false picture: start is all or nothing, probe errors
are counted, shutdown is bounded, and spans reach the collector vLLM itself exports to.

Real HTTP endpoints, a real OTel SDK and exporters, real loopback receivers; the engine is
the fake vLLM of ``test_vllm_versions`` (no vLLM needed).
"""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from instrumented_core.cluster.client import free_port
from instrumented_core.scrape import endpoint_problem, scrape
from instrumented_core.telemetry import TelemetryConfig
from instrumented_core.telemetry import names as n
from instrumented_core.vllm_support.instrumentor import status_of
from tests.helpers import new_instrumentor
from tests.test_vllm_versions import SHAPE, _scrape, fake_vllm


@pytest.fixture
def fresh_instrumentor():
    with new_instrumentor() as inst:
        yield inst


def test_a_tracer_that_fails_to_start_leaves_no_zombie_endpoint_but_a_named_error_state(
        fresh_instrumentor, tmp_path):
    """The spans file cannot be created (its directory is a file): the rank's port must not
    keep serving a registry nobody updates (phase 0, dp_size 0 read as a healthy idle rank);
    it serves the status-only endpoint, and the doctor's scrape names the reason."""
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    port = free_port()
    config = TelemetryConfig(metrics_port_base=port, model_name="m", span_exporter="file",
                             spans_file=str(blocker / "spans.jsonl"))
    loader, module = fake_vllm("0.32.0", SHAPE["0.32"])
    fresh_instrumentor.instrument(import_module=loader, telemetry_config=config)
    engine = module.DPEngineCoreProc(rank=0)
    status = fresh_instrumentor._start_engine(engine)
    try:
        assert status is not None and status_of(engine) is status, (
            "the status-only endpoint could not bind: the failed telemetry kept the port")
        assert status.url == f"http://127.0.0.1:{port}/metrics"
        sample = _scrape(status.url)
        assert sample == {(n.PLUGIN_ACTIVE, (("engine", "0"), ("model_name", "m"),
                                             ("reason", "telemetry_error"),
                                             ("vllm_version", "0.32.0"))): 0.0}
        problem = endpoint_problem(scrape(status.url))
        assert "does not observe this rank" in problem and "telemetry_error" in problem
    finally:
        if status is not None:
            status.close()


def test_start_rank_telemetry_closes_its_endpoint_when_a_later_step_fails(tmp_path):
    from instrumented_core.telemetry import start_rank_telemetry

    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    port = free_port()
    config = TelemetryConfig(metrics_port_base=port, spans_file=str(blocker / "s.jsonl"))
    with pytest.raises(OSError):
        start_rank_telemetry(config, 0, 2, "two-phase", {}, "g")
    # the port is free again: a status endpoint (or the next start) can take it
    from instrumented_core.telemetry.server import MetricsServer

    MetricsServer(CollectorRegistry(), "127.0.0.1", port).close()


# ----------------------------------------------------------------------------------------------
# probe errors: counted, logged once per place, and the probe recovers
# ----------------------------------------------------------------------------------------------


class _EngineState:
    """What the probe reads from an engine; ``broken`` names attributes that raise."""

    def __init__(self) -> None:
        self.broken: set[str] = set()
        self.engines_running = True
        self.ignore_start_dp_wave = False
        self.step_counter = 3
        self.sync_interval = 16
        self.pending_pause = False

    @property
    def current_wave(self) -> int:
        if "current_wave" in self.broken:
            raise RuntimeError("engine replaced its wave state")
        return 7

    def request_counts(self):
        return 1, 0


def _probe_with_spans():
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from instrumented_core.telemetry.metrics import RankMetrics
    from instrumented_core.telemetry.probe import TelemetryProbe

    registry = CollectorRegistry()
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    probe = TelemetryProbe(0, 2, RankMetrics(registry, 0, "m", {}), provider)
    state = _EngineState()
    probe.attach(state)
    return probe, state, registry, exporter


def _errors_at(registry, where: str) -> float | None:
    return registry.get_sample_value(n.TELEMETRY_ERRORS_TOTAL, {
        n.LABEL_ENGINE: "0", n.LABEL_MODEL_NAME: "m", n.LABEL_WHERE: where})


def _pause(probe) -> None:
    from instrumented_core.protocol import Phase

    probe.pause_requested("keep")
    probe.phase_changed(Phase.RUNNING, Phase.PENDING_PAUSE)
    probe.phase_changed(Phase.PENDING_PAUSE, Phase.PAUSED)
    probe.resumed()
    probe.phase_changed(Phase.PAUSED, Phase.RUNNING)


def test_probe_errors_are_counted_per_place_logged_once_each_and_the_next_pause_is_clean(
        caplog):
    import logging

    probe, state, registry, exporter = _probe_with_spans()
    assert _errors_at(registry, "pause_requested") is None  # no series while all is well
    state.broken.add("current_wave")
    with caplog.at_level(logging.ERROR, logger="instrumented_core.telemetry.probe"):
        _pause(probe)  # pause_requested and phase_changed(PAUSED) and resumed read the wave
        _pause(probe)
        probe.collective_end(n.COLLECTIVE_STEP, None)  # a per-step call: guarded too
    assert _errors_at(registry, "pause_requested") == 2
    assert _errors_at(registry, "collective_end") == 1
    logged = {r.getMessage().split(" on DP")[0] for r in caplog.records}
    # once per place (reading the registry is a scrape: the wave gauge fails there too)
    assert logged == {"telemetry error in pause_requested", "telemetry error in scrape",
                      "telemetry error in collective_end"}, logged
    assert all(r.exc_info for r in caplog.records)  # with the traceback
    # a gauge that raises at scrape time: NaN and counted; the scrape itself works
    from prometheus_client import generate_latest

    text = generate_latest(registry).decode()
    assert 'vllm_dp_current_wave{engine="0",model_name="m"} NaN' in text
    assert _errors_at(registry, "scrape") >= 1
    # the engine is fine again: the very next pause gets its whole trace
    state.broken.clear()
    exporter.clear()
    _pause(probe)
    names = sorted(s.name for s in exporter.get_finished_spans())
    assert names == sorted([n.SPAN_PAUSE, n.SPAN_PENDING, n.SPAN_PAUSED])
    assert registry.get_sample_value(n.STEPS_TOTAL, {n.LABEL_ENGINE: "0",
                                                     n.LABEL_MODEL_NAME: "m",
                                                     n.LABEL_KIND: "real"}) == 0


def test_an_error_inside_a_pause_ends_its_spans_marked_and_the_next_pause_starts_clean():
    from instrumented_core.protocol import Phase

    probe, state, registry, exporter = _probe_with_spans()
    probe.pause_requested("wait")
    probe.phase_changed(Phase.RUNNING, Phase.PENDING_PAUSE)
    state.broken.add("current_wave")
    probe.phase_changed(Phase.PENDING_PAUSE, Phase.PAUSED)  # the consensus event fails
    ended = {s.name: s.attributes.get(n.ATTR_ENDED_BY) for s in exporter.get_finished_spans()}
    assert ended == {n.SPAN_PAUSE: "telemetry_error", n.SPAN_PENDING: "telemetry_error"}
    assert _errors_at(registry, "phase_changed") == 1
    state.broken.clear()
    exporter.clear()
    probe.resumed()
    probe.phase_changed(Phase.PAUSED, Phase.RUNNING)
    _pause(probe)
    spans = exporter.get_finished_spans()
    assert sorted(s.name for s in spans) == sorted([n.SPAN_PAUSE, n.SPAN_PENDING, n.SPAN_PAUSED])
    assert not any(s.attributes.get(n.ATTR_ENDED_BY) for s in spans)


# ----------------------------------------------------------------------------------------------
# shutdown is bounded, and what it could not send is counted
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_shutdown_against_a_collector_that_never_answers_is_bounded_and_counts_unsent_spans(
        protocol, caplog):
    """A real OTLP exporter to a loopback listener that accepts and never replies: the rank's
    shutdown (run on the engine thread) returns within its bound, and every span that did not
    leave is counted as dropped and named in one log line."""
    import logging
    import time

    from opentelemetry.sdk.trace import TracerProvider

    from instrumented_core.telemetry.tracing import BoundedSpanProcessor, make_exporter
    from instrumented_core_testing.otlp_sink import BlackholeServer

    hole = BlackholeServer()
    dropped: list[int] = []
    try:
        endpoint = hole.endpoint + ("" if protocol == "grpc" else "/v1/traces")
        exporter = make_exporter(TelemetryConfig(span_exporter="otlp", otlp_endpoint=endpoint,
                                                 otlp_protocol=protocol))
        provider = TracerProvider()
        provider.add_span_processor(BoundedSpanProcessor(exporter, dropped.append,
                                                         interval=60, shutdown_timeout=1.0))
        tracer = provider.get_tracer("t")
        for i in range(1000):  # 4 batches: 8 s of export attempts, more than the bound
            tracer.start_span(f"s{i}").end()
        started = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="instrumented_core.telemetry.tracing"):
            provider.shutdown()
        took = time.monotonic() - started
    finally:
        hole.close()
    assert took < 1.0 + 1.0, f"shutdown took {took:.1f} s with a 1 s bound"
    assert sum(dropped) == 1000, dropped  # each span counted once: unsent or failed
    [line] = [r.getMessage() for r in caplog.records if "unsent at shutdown" in r.getMessage()]
    assert line.startswith("span export: 1000 span(s) unsent at shutdown")


# ----------------------------------------------------------------------------------------------
# the OTLP endpoint vLLM exports to: its protocol too
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["--otlp-traces-endpoint host:port",
                                 "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"])
def test_spans_reach_the_grpc_collector_vllm_exports_to_with_vllms_default_protocol(
        fresh_instrumentor, monkeypatch, how):
    """vLLM 0.32 exports to ``--otlp-traces-endpoint`` over gRPC unless
    ``OTEL_EXPORTER_OTLP_TRACES_PROTOCOL`` says otherwise, and its front end puts that endpoint
    in ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` for the engine cores. A rank that inherits it
    sends its spans to a real OTLP/gRPC receiver on loopback, the way vLLM's do."""
    import types

    from instrumented_core.protocol import Phase
    from instrumented_core_testing.otlp_sink import OtlpGrpcSink

    for name in ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT",
                 "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL",
                 "OTEL_TRACES_EXPORTER", "INSTRUMENTED_CORE_SPANS_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("INSTRUMENTED_CORE_METRICS_PORT_BASE", "0")
    sink = OtlpGrpcSink()
    try:
        bare = sink.endpoint.removeprefix("http://")  # 127.0.0.1:port, as vLLM users type it
        loader, module = fake_vllm("0.32.0", SHAPE["0.32"])
        fresh_instrumentor.instrument(import_module=loader)
        engine = module.DPEngineCoreProc(rank=0)
        if how.startswith("--otlp"):
            engine.vllm_config.observability_config = types.SimpleNamespace(
                otlp_traces_endpoint=bare)
        else:
            monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", sink.endpoint)
        obs = fresh_instrumentor._start_engine(engine)
        assert obs is not None and status_of(engine) is None, "telemetry did not start"
        probe = obs.probe
        probe.pause_requested("keep")
        probe.phase_changed(Phase.RUNNING, Phase.PENDING_PAUSE)
        probe.phase_changed(Phase.PENDING_PAUSE, Phase.PAUSED)
        probe.phase_changed(Phase.PAUSED, Phase.RUNNING)
        obs.close()  # flushes
        names = sorted(s.name for s in sink.spans)
        assert names == sorted([n.SPAN_PAUSE, n.SPAN_PENDING, n.SPAN_PAUSED]), names
        assert {s.resource[n.ATTR_RANK] for s in sink.spans} == {0}
    finally:
        sink.close()


@pytest.mark.parametrize("env, protocol, endpoint", [
    ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4317"}, "grpc", "http://c:4317"),
    ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces",
      "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf"}, "http/protobuf",
     "http://c:4318/v1/traces"),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, "http/protobuf",
     "http://c:4318/v1/traces"),  # vLLM ignores this one: the OpenTelemetry default stays
], ids=["vllm-default-grpc", "explicit-http", "generic-endpoint-http"])
def test_under_vllm_the_traces_endpoint_speaks_vllms_protocol(env, protocol, endpoint):
    cfg = TelemetryConfig.from_env(env, vllm=True)
    assert (cfg.otlp_protocol, cfg.otlp_endpoint, cfg.span_exporter) == (
        protocol, endpoint, "otlp")
    outside = TelemetryConfig.from_env(env)  # the CPU cluster: the OpenTelemetry default
    assert outside.otlp_protocol == env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
                                            "http/protobuf")


# ----------------------------------------------------------------------------------------------
# the spans file: bounded, rotated, and its absolute path said once
# ----------------------------------------------------------------------------------------------


def test_the_spans_file_is_rotated_by_size_keeps_three_and_says_where_it_is(
        tmp_path, monkeypatch, caplog):
    import json
    import logging

    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    from instrumented_core.telemetry.config import SPANS_FILE_KEEP
    from instrumented_core.telemetry.tracing import make_exporter

    monkeypatch.chdir(tmp_path)
    max_bytes = 4096
    config = TelemetryConfig.from_env({"INSTRUMENTED_CORE_SPANS_FILE_MAX_BYTES": str(max_bytes)})
    assert config.spans_file == "spans.jsonl"  # the default, relative
    tracers = []
    with caplog.at_level(logging.INFO, logger="instrumented_core.telemetry.tracing"):
        for _ in range(2):  # two ranks of one process share the file
            provider = TracerProvider()
            provider.add_span_processor(SimpleSpanProcessor(make_exporter(config)))
            tracers.append(provider.get_tracer("t"))
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("spans go to")]
    assert line == (f"spans go to {tmp_path / 'spans.jsonl'} (rotated at "
                    f"{max_bytes / 2**20:g} MiB, {SPANS_FILE_KEEP} older files kept)")
    for i in range(400):  # ~100 KB of spans: 25 times the bound
        tracers[i % 2].start_span(f"span-{i}").end()
    files = sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock"))
    assert files == ["spans.jsonl", "spans.jsonl.1", "spans.jsonl.2", "spans.jsonl.3"]
    names = []
    for name in [*reversed(files[1:]), files[0]]:  # oldest first
        path = tmp_path / name
        assert path.stat().st_size <= max_bytes, (name, path.stat().st_size)
        names += [json.loads(line)["name"] for line in path.read_text().splitlines()]
    # what is kept is the newest spans, whole lines, in order, none twice
    assert names == [f"span-{i}" for i in range(400 - len(names), 400)]
    # a rotated file was full: rotation happens at the bound, not earlier
    assert all((tmp_path / name).stat().st_size > max_bytes // 2 for name in files[1:])


def test_a_bad_spans_file_bound_is_one_line_naming_the_setting():
    from instrumented_core.telemetry import TelemetryConfigError

    with pytest.raises(TelemetryConfigError, match="INSTRUMENTED_CORE_SPANS_FILE_MAX_BYTES="):
        TelemetryConfig.from_env({"INSTRUMENTED_CORE_SPANS_FILE_MAX_BYTES": "64MB"})


def test_vllms_bare_grpc_endpoint_in_the_environment_does_not_turn_the_plugin_off(
        monkeypatch):
    """``vllm serve --otlp-traces-endpoint localhost:4317`` puts that bare host:port in
    ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` of every engine core; the plugin's load-time check
    reads it as vLLM does (gRPC), not as a malformed http URL."""
    from instrumented_core.vllm_support import plugin

    for name in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL",
                 "OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "localhost:4317")
    config = plugin.config_from_env()
    assert (config.otlp_protocol, config.otlp_endpoint) == ("grpc", "localhost:4317")


def test_a_collector_that_raises_gives_a_500_naming_it_not_a_dropped_connection(caplog):
    import logging
    import urllib.error
    import urllib.request

    from prometheus_client.registry import Collector

    from instrumented_core.telemetry.server import MetricsServer

    class Broken(Collector):
        def collect(self):
            raise OSError("worker board unreadable")

    registry = CollectorRegistry()
    registry.register(Broken())
    server = MetricsServer(registry, "127.0.0.1", 0, rank=3)
    try:
        with caplog.at_level(logging.ERROR, logger="instrumented_core"):
            for _ in range(2):
                with pytest.raises(urllib.error.HTTPError) as info:
                    urllib.request.urlopen(server.url, timeout=5)
                assert info.value.code == 500
                assert info.value.read().decode() == (
                    "scrape failed in rank 3's telemetry: OSError: worker board unreadable\n")
        assert len([r for r in caplog.records if "/metrics failed" in r.getMessage()]) == 1
    finally:
        server.close()
