"""What a rank exposes: the series budget (a whole rank with one worker, its workers' series
included: a vLLM rank at TP 1), no ``_created``, and both exposition formats.

A rank's own endpoint (``MetricsServer`` over loopback, the registry ``start_rank_telemetry``
builds) answers a scraper that does not negotiate with the plain text format, without
exemplars, and a scraper asking for OpenMetrics (Prometheus does) with the sync-wait and
consensus-latency buckets carrying the pause's trace as an exemplar.
"""

from __future__ import annotations

import urllib.request

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import enable_created_metrics
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_om
from prometheus_client.parser import text_string_to_metric_families as parse_text

from benchmarks.scale import MAX_RANK_SERIES, count_series, rank_series_with_workers
from instrumented_core.protocol import Phase, SyncResult
from instrumented_core.telemetry import names as n
from instrumented_core.telemetry.metrics import plugin_active
from instrumented_core.telemetry.rank import build_rank
from instrumented_core.telemetry.server import MetricsServer
from instrumented_core.telemetry.worker_board import ENV_BOARD_DIR, BoardWriter

OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"
#: What Prometheus 2.42 sends (scrape.go ``scrapeAcceptHeader``).
PROMETHEUS_ACCEPT = ("application/openmetrics-text;version=1.0.0,application/openmetrics-text;"
                     "version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1")
LABELS = {n.LABEL_ENGINE: "0", n.LABEL_MODEL_NAME: "m"}


def rank(tracing: bool = True):
    """A rank as ``start_rank_telemetry`` builds it (its ``build_rank``, so every series
    registered there counts), plus the plugin's active gauge (both callers, the vLLM plugin
    and the CPU cluster, add it), with a recording tracer; the probe has run one pause to
    consensus and back."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    registry, _, probe = build_rank(0, 2, "m", {"dp_size": "2"},
                                    provider if tracing else None)
    plugin_active(registry, LABELS, True, "ok", "test")
    probe.sync_end(SyncResult(True, 0, 2), 0.0004)  # a round outside any pause
    probe.pause_requested("keep")
    probe.phase_changed(Phase.RUNNING, Phase.PENDING_PAUSE)
    probe.sync_end(SyncResult(False, 2, 2), 0.002)
    probe.phase_changed(Phase.PENDING_PAUSE, Phase.PAUSED)
    probe.phase_changed(Phase.PAUSED, Phase.RUNNING)
    return registry, exporter


def get(url: str, accept: str | None) -> tuple[str, str]:
    headers = {"Accept": accept} if accept is not None else {}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=5) as r:
        return r.headers["Content-Type"], r.read().decode()


@pytest.fixture
def served(tmp_path, monkeypatch):
    """The rank's endpoint with one worker on its board (this process: a worker that runs
    inside the engine core; a vLLM TP 1 rank's worker is its child, read the same way)."""
    monkeypatch.setenv(ENV_BOARD_DIR, str(tmp_path))
    worker = BoardWriter(0)
    registry, exporter = rank()
    server = MetricsServer(registry, "127.0.0.1", 0, 0)
    try:
        yield server, exporter
    finally:
        server.close()
        worker.close()


def test_a_whole_rank_with_one_worker_exposes_at_most_60_series_and_no_created(served):
    server, _ = served
    _, body = get(server.url, None)
    counted = count_series(body)
    assert counted["workers"] == 1, counted
    assert counted["worker_series"] == len(n.WORKER_PER_WORKER_SERIES + n.WORKER_RANK_SERIES)
    assert counted["created"] == 0, [f for f in counted["families"] if f.endswith("_created")]
    assert counted["total"] <= MAX_RANK_SERIES, counted["families"]
    exposed = {name for name in counted["families"]}
    assert exposed <= n.exposed_series_names() | {n.PLUGIN_ACTIVE}, \
        exposed - n.exposed_series_names()


def test_each_further_worker_adds_only_the_two_series_that_name_it():
    """TP 2/4/8: heartbeat age and position per worker (which worker is frozen, where each
    is); the model-collective view is one set per rank. Measured on build_rank's registry with
    that many worker records."""
    counts = {tp: rank_series_with_workers(tp) for tp in (1, 2, 4, 8)}
    assert counts[1]["total"] <= MAX_RANK_SERIES, counts[1]["families"]
    for tp, c in counts.items():
        assert c["workers"] == tp
        assert c["rank"] == counts[1]["rank"]  # the rank's own series do not change
        assert c["worker_series"] == 2 * tp + len(n.WORKER_RANK_SERIES), c["families"]


def test_created_stays_off_even_when_another_library_turns_the_global_switch_on():
    """prometheus_client's created-series switch is process-global (vLLM's own metrics live
    in the same library): ours are dropped at collection, whatever the switch says."""
    enable_created_metrics()
    registry, _ = rank(tracing=False)
    assert not [s for m in registry.collect() for s in m.samples if s.name.endswith("_created")]


@pytest.mark.parametrize("accept", [None, "text/plain", "text/plain;version=0.0.4", "*/*"])
def test_a_scraper_that_does_not_negotiate_gets_plain_text_without_exemplars(served, accept):
    server, _ = served
    content_type, body = get(server.url, accept)
    assert content_type.startswith("text/plain")
    assert "# EOF" not in body and "trace_id" not in body
    families = {f.name: f for f in parse_text(body)}
    wait = families[n.SYNC_WAIT]
    assert {s.labels.get("le") for s in wait.samples if s.name.endswith("_bucket")} >= {"+Inf"}
    assert [s.value for s in wait.samples if s.name == n.SYNC_WAIT + "_count"] == [2.0]


@pytest.mark.parametrize("accept", [OPENMETRICS, PROMETHEUS_ACCEPT])
def test_openmetrics_buckets_carry_the_pause_trace_as_exemplar(served, accept):
    server, exporter = served
    content_type, body = get(server.url, accept)
    assert content_type.startswith("application/openmetrics-text")
    assert body.endswith("# EOF\n")
    [pause] = [s for s in exporter.get_finished_spans() if s.name == n.SPAN_PAUSE]
    trace_id = format(pause.context.trace_id, "032x")
    span_id = format(pause.context.span_id, "016x")
    families = {f.name: f for f in parse_om(body)}  # the strict OpenMetrics parser
    for name, value in ((n.SYNC_WAIT, 0.002), (n.PAUSE_CONSENSUS_LATENCY, None)):
        exemplars = [s.exemplar for s in families[name].samples if s.exemplar is not None]
        assert len(exemplars) == 1, (name, exemplars)  # the round outside the pause has none
        assert exemplars[0].labels == {n.EXEMPLAR_TRACE_ID: trace_id,
                                       n.EXEMPLAR_SPAN_ID: span_id}
        if value is not None:
            assert exemplars[0].value == value
    # the same series either way
    _, text = get(server.url, None)
    assert count_series(text)["total"] == sum(
        1 for line in body.splitlines() if line and not line.startswith("#"))


def test_the_doctor_reads_sync_rounds_and_sync_wait_from_the_sync_histogram():
    """No rounds counter and no ``sync_dp_state`` child of the collective-wait counter are
    served (the budget): the doctor's scrape (only ``DIAGNOSIS_SERIES``) still gets the rounds
    a pending rank went through and the sync share of its wait fraction, from the histogram's
    ``_count`` and ``_sum``."""
    from prometheus_client import generate_latest

    from instrumented_core.scrape import DIAGNOSIS_SERIES, sample_of_answer, to_view

    registry, _, probe = build_rank(0, 2, "m", {"protocol": "two-phase"}, None)
    plugin_active(registry, LABELS, True, "ok", "test")
    served = {s.name for m in registry.collect() for s in m.samples}
    assert n.COLLECTIVE_WAIT_TOTAL in served and n.SYNC_WAIT_COUNT in served
    assert "vllm_dp_sync_rounds_total" not in served
    assert not [s for m in registry.collect() for s in m.samples
                if s.name == n.COLLECTIVE_WAIT_TOTAL
                and s.labels[n.LABEL_COLLECTIVE] == n.COLLECTIVE_SYNC]

    probe.pause_requested("keep")
    probe.phase_changed(Phase.RUNNING, Phase.PENDING_PAUSE)
    before = sample_of_answer("r0", 200, generate_latest(registry), DIAGNOSIS_SERIES)
    for _ in range(3):  # three rounds without consensus: 0.4 s inside sync_dp_state
        probe.sync_begin(True, True)
        probe.sync_end(SyncResult(True, 1, 2), 0.4 / 3)
    probe.collective_begin(n.COLLECTIVE_STEP)
    probe.collective_end(n.COLLECTIVE_STEP, 0.3)
    after = sample_of_answer("r0", 200, generate_latest(registry), DIAGNOSIS_SERIES)
    before.fetched_at, after.fetched_at = 100.0, 101.0  # one second between the scrapes

    view = to_view(after, 0, before)
    assert not view.not_endpoint, view.not_endpoint
    assert view.phase == "pending_pause"
    assert view.pending_sync_rounds == 3
    assert view.wait_fraction == pytest.approx(0.7)  # 0.4 s sync + 0.3 s step of 1 s
