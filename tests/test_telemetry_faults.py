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
from instrumented_core.vllm_support.instrumentor import VllmDpInstrumentor, status_of
from tests.test_vllm_versions import SHAPE, _scrape, fake_vllm


@pytest.fixture
def fresh_instrumentor():
    saved = VllmDpInstrumentor._instance
    VllmDpInstrumentor._instance = None
    inst = VllmDpInstrumentor()
    try:
        yield inst
    finally:
        if inst.is_instrumented_by_opentelemetry:
            inst.uninstrument()
        VllmDpInstrumentor._instance = saved


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
