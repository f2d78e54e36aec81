"""Telemetry on the real CPU cluster, read over real HTTP and a real OTLP receiver."""

from __future__ import annotations

import json
import threading
import time
from collections import defaultdict

import pytest

from instrumented_core.cluster import Cluster, ClusterConfig
from instrumented_core.scrape import scrape, scrape_all
from instrumented_core.telemetry import TelemetryConfig, TelemetryConfigError
from instrumented_core.telemetry import names as n
from instrumented_core_testing.otlp_sink import BlackholeServer, OtlpGrpcSink, OtlpSink

pytestmark = pytest.mark.cluster

IGNORED_WAVES = 3


def telemetry(tmp_path, **kw) -> TelemetryConfig:
    kw.setdefault("spans_file", str(tmp_path / "spans.jsonl"))
    return TelemetryConfig(metrics_port_base=0, **kw)


class PhasePoller:
    """Scrapes every rank every 10 ms and keeps each rank's sequence of distinct phases."""

    def __init__(self, urls: list[str]) -> None:
        self.urls = urls
        self.sequences: dict[int, list[int]] = defaultdict(list)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for rank, sample in enumerate(scrape_all(self.urls)):
                phase = sample.get(n.PHASE)
                seq = self.sequences[rank]
                if phase is not None and (not seq or seq[-1] != phase):
                    seq.append(int(phase))
            time.sleep(0.01)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


@pytest.fixture(scope="module")
def scripted_pause(tmp_path_factory):
    """DP 4: traffic, pause(abort) mid-wave, 3 START_DP_WAVE while paused, resume."""
    tmp = tmp_path_factory.mktemp("scripted")
    cfg = ClusterConfig(ranks=4, sync_interval=400, hang_timeout=20,
                        telemetry=telemetry(tmp))
    with Cluster(cfg) as cluster:
        poller = PhasePoller(cluster.metrics_urls)
        handles = [cluster.generate(100_000, rank=r) for r in range(4)]
        time.sleep(0.5)
        cluster.pause("abort")
        for _ in range(IGNORED_WAVES):
            cluster.inject_start_dp_wave()
        time.sleep(0.5)
        cluster.resume()
        time.sleep(0.3)
        poller.stop()
        samples = scrape_all(cluster.metrics_urls)
        outcomes = [h.result(5) for h in handles]
    yield {"samples": samples, "phases": poller.sequences, "outcomes": outcomes,
           "spans": [json.loads(line) for line in (tmp / "spans.jsonl").read_text().splitlines()]}


def test_counters_equal_what_the_protocol_did(scripted_pause):
    assert scripted_pause["outcomes"] == ["aborted"] * 4
    rounds = set()
    for sample in scripted_pause["samples"]:
        assert sample.reachable
        assert sample.get(n.PAUSE_REQUESTS_TOTAL, mode="abort") == 1
        assert sample.get(n.PAUSE_REQUESTS_TOTAL, mode="keep") == 0
        assert sample.get(n.PAUSE_CONSENSUS_TOTAL) == 1
        assert sample.get(n.START_DP_WAVE_TOTAL, outcome="ignored") == IGNORED_WAVES
        assert sample.get(n.RESUMES_TOTAL) == 1
        assert sample.get(n.PHASE) == n.PHASE_RUNNING
        assert sample.get(n.INFO_SERIES, protocol="two-phase") == 1  # paused = ignoring waves
        assert sample.get(n.DP_SIZE) == 4
        assert sample.get(n.PAUSE_CONSENSUS_LATENCY_COUNT) == 1
        assert sample.get(n.STEPS_TOTAL, kind="real") > 0
        assert sample.get(n.STEPS_TOTAL, kind="dummy") > 0  # pending ranks keep stepping
        rounds.add(sample.get(n.SYNC_WAIT_COUNT))
    assert len(rounds) == 1 and rounds.pop() >= 2


def test_phase_gauges_go_running_pending_paused_running_on_every_rank(scripted_pause):
    expected = [n.PHASE_RUNNING, n.PHASE_PENDING_PAUSE, n.PHASE_PAUSED, n.PHASE_RUNNING]
    for rank in range(4):
        assert scripted_pause["phases"][rank] == expected, f"rank {rank}"


def test_one_trace_per_pause_with_every_rank_and_its_phases(scripted_pause):
    spans = scripted_pause["spans"]
    pauses = [s for s in spans if s["name"] == n.SPAN_PAUSE]
    client = [s for s in spans if s["name"] == n.SPAN_CLIENT_PAUSE]
    assert len(pauses) == 4 and len(client) == 1
    trace_ids = {s["context"]["trace_id"] for s in pauses + client}
    assert trace_ids == {client[0]["context"]["trace_id"]}
    assert sorted(s["attributes"][n.ATTR_RANK] for s in pauses) == [0, 1, 2, 3]
    for pause in pauses:
        assert pause["parent_id"] == client[0]["context"]["span_id"]
        assert pause["attributes"][n.ATTR_MODE] == "abort"
        children = {s["name"]: s for s in spans if s.get("parent_id") == pause["context"]["span_id"]}
        assert set(children) == {n.SPAN_PENDING, n.SPAN_PAUSED}
        pending, paused = children[n.SPAN_PENDING], children[n.SPAN_PAUSED]
        assert pending["end_time"] <= paused["start_time"]
        sync_events = [e for e in pending["events"] if e["name"] == n.EVENT_SYNC_ROUND]
        assert sync_events and sync_events[-1]["attributes"][n.ATTR_CONSENSUS] is True
        # each round at the time it happened, in order, inside the pending phase
        stamps = [e["timestamp"] for e in sync_events]
        assert stamps == sorted(stamps)
        assert pending["start_time"] <= stamps[0] and stamps[-1] <= pending["end_time"]
        rounds = [e["attributes"][n.ATTR_SYNC_ROUND] for e in sync_events]
        assert rounds == sorted(set(rounds)), rounds
        assert sync_events[-1]["attributes"][n.ATTR_PAUSE_VOTES] == 4
        assert pending["attributes"][n.ATTR_STEPS_WAITED] >= 1
        ignored = [e for e in paused["events"] if e["name"] == n.EVENT_START_DP_WAVE_IGNORED]
        assert len(ignored) == IGNORED_WAVES
        assert n.EVENT_CONSENSUS in [e["name"] for e in pause["events"]]


def test_peers_show_a_stalled_rank_from_inside_the_sync_all_reduce(tmp_path):
    cfg = ClusterConfig(ranks=4, sync_interval=8, hang_timeout=20,
                        telemetry=telemetry(tmp_path))
    with Cluster(cfg) as cluster:
        cluster.inject_fault(2, "stall")
        cluster.generate(50, rank=0)
        time.sleep(1.5)
        first = []
        for url in cluster.metrics_urls:
            started = time.monotonic()
            first.append(scrape(url, timeout=1.0))
            assert time.monotonic() - started < 1.0
        time.sleep(1.0)
        second = scrape_all(cluster.metrics_urls, timeout=1.0)
    for rank in (0, 1, 3):
        a = first[rank].get(n.COLLECTIVE_INSIDE, collective=n.COLLECTIVE_SYNC)
        b = second[rank].get(n.COLLECTIVE_INSIDE, collective=n.COLLECTIVE_SYNC)
        assert a > 0.5 and b >= a + 0.8, f"rank {rank} should wait inside sync_dp_state"
    assert first[2].reachable and second[2].reachable
    assert second[2].get(n.COLLECTIVE_INSIDE, collective=n.COLLECTIVE_SYNC) == 0
    assert second[2].get(n.LAST_PROGRESS) == first[2].get(n.LAST_PROGRESS)
    assert second[2].get(n.STEPS_TOTAL, kind="real") == first[2].get(
        n.STEPS_TOTAL, kind="real")


def pause_and_measure(cluster: Cluster, seconds: float = 2.0) -> float:
    """Steps per second of rank 0 under traffic, around one pause/resume."""
    for r in range(cluster.config.ranks):
        cluster.generate(100_000, rank=r)
    time.sleep(0.3)
    cluster.pause("keep")
    cluster.resume()
    before = scrape(cluster.metrics_urls[0])
    time.sleep(seconds)
    after = scrape(cluster.metrics_urls[0])
    steps = sum(after.get(n.STEPS_TOTAL, kind=k) - before.get(n.STEPS_TOTAL, kind=k)
                for k in n.STEP_KINDS)
    return steps / (after.fetched_at - before.fetched_at)


def test_otlp_export_end_to_end_and_an_unresponsive_collector_costs_nothing(tmp_path):
    sink = OtlpSink()
    blackhole = BlackholeServer()
    try:
        up_cfg = ClusterConfig(ranks=2, telemetry=telemetry(
            tmp_path, span_exporter="otlp", otlp_endpoint=sink.endpoint + "/v1/traces"))
        with Cluster(up_cfg) as cluster:
            rate_up = pause_and_measure(cluster)
            cluster.pause("abort")
            cluster.resume()
        names = [s.name for s in sink.spans]
        assert names.count(n.SPAN_PAUSE) == 4 and names.count(n.SPAN_CLIENT_PAUSE) == 2
        by_trace = defaultdict(set)
        for s in sink.spans:
            if s.name == n.SPAN_PAUSE:
                by_trace[s.trace_id].add(s.attributes[n.ATTR_RANK])
        assert list(by_trace.values()) == [{0, 1}, {0, 1}]
        assert {s.resource["service.name"] for s in sink.spans} == {"vllm-dp-engine"}

        down_cfg = ClusterConfig(ranks=2, telemetry=telemetry(
            tmp_path, span_exporter="otlp", otlp_endpoint=blackhole.endpoint + "/v1/traces"))
        with Cluster(down_cfg) as cluster:
            rate_down = pause_and_measure(cluster)
            cluster.pause("abort")
            cluster.resume()
            deadline = time.monotonic() + 15
            dropped = 0.0
            while time.monotonic() < deadline and not dropped:
                dropped = scrape(cluster.metrics_urls[0]).get(n.TELEMETRY_DROPPED_TOTAL,
                                                              signal="spans")
                time.sleep(0.5)
        assert dropped >= 1, "spans that could not be exported must be counted as dropped"
        assert rate_down > 0.6 * rate_up, (rate_up, rate_down)
    finally:
        sink.close()
        blackhole.close()


def test_otlp_grpc_export_configured_by_the_standard_variables(tmp_path):
    sink = OtlpGrpcSink()
    try:
        tel = TelemetryConfig.from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": sink.endpoint,
                                        "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
                                        "OTEL_SERVICE_NAME": "rollout-engines"},
                                       metrics_port_base=0)
        with Cluster(ClusterConfig(ranks=2, telemetry=tel)) as cluster:
            cluster.pause("keep")
            cluster.resume()
        pauses = [s for s in sink.spans if s.name == n.SPAN_PAUSE]
        assert sorted(s.attributes[n.ATTR_RANK] for s in pauses) == [0, 1]
        assert len({s.trace_id for s in pauses}) == 1
        assert {s.resource["service.name"] for s in sink.spans} == {"rollout-engines"}
    finally:
        sink.close()


def test_with_telemetry_off_there_is_no_endpoint_and_no_spans(tmp_path):
    cfg = ClusterConfig(ranks=2, telemetry=telemetry(tmp_path, enabled=False))
    with Cluster(cfg) as cluster:
        cluster.pause("keep")
        cluster.resume()
        assert cluster.metrics_urls == [None, None]
    assert not (tmp_path / "spans.jsonl").exists()


@pytest.mark.parametrize("env, message", [
    ({"INSTRUMENTED_CORE_METRICS_PORT_BASE": "81OO"}, "is not a port number"),
    ({"INSTRUMENTED_CORE_METRICS_PORT_BASE": "70000"}, "out of range"),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "collector:4318"}, "is not a valid OTLP endpoint"),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://host:port"}, "has a bad port"),
    ({"OTEL_TRACES_EXPORTER": "zipkin"}, "is not supported"),
    ({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}, "is not supported"),
    ({"INSTRUMENTED_CORE_TELEMETRY": "maybe"}, "is not a boolean"),
])
def test_bad_telemetry_settings_are_one_line_errors(env, message):
    with pytest.raises(TelemetryConfigError, match=message) as info:
        TelemetryConfig.from_env(env)
    assert "\n" not in str(info.value)


def test_standard_otel_variables_pick_the_exporter():
    cfg = TelemetryConfig.from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318",
                                    "OTEL_SERVICE_NAME": "rl-rollout"})
    assert cfg.span_exporter == "otlp" and cfg.service_name == "rl-rollout"
    assert cfg.otlp_endpoint == "http://127.0.0.1:4318/v1/traces"
    grpc = TelemetryConfig.from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317",
                                     "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"})
    assert grpc.otlp_endpoint == "http://127.0.0.1:4317" and grpc.otlp_protocol == "grpc"
    assert TelemetryConfig.from_env({}).span_exporter == "file"


def test_adaptive_cadence_shows_its_extra_rounds_and_reaches_consensus_sooner(tmp_path):
    """A staggered pause: after the first split vote the ranks sync every step."""
    results = {}
    for cadence in ("fixed", "adaptive"):
        cfg = ClusterConfig(ranks=2, sync_interval=64, cadence=cadence, hang_timeout=20,
                            telemetry=telemetry(tmp_path / cadence))
        with Cluster(cfg) as cluster:
            for r in range(2):
                cluster.generate(100_000, rank=r)
            time.sleep(0.3)
            cluster.pause("abort", ranks=[0, 1], stagger=0.4)  # > one interval of steps
            samples = scrape_all(cluster.metrics_urls)
            cluster.resume()
        results[cadence] = samples
    def extra_rounds(sample) -> float:
        """Rounds beyond the fixed cadence's (step 1 of the wave and every 64th step): what
        the adaptive cadence costs, in PromQL from the rounds and steps counters."""
        steps = sample.sum(n.STEPS_TOTAL)
        return sample.get(n.SYNC_WAIT_COUNT) - (steps // 64 + 1)

    for sample in results["fixed"]:
        assert extra_rounds(sample) <= 0
    for sample in results["adaptive"]:
        assert extra_rounds(sample) >= 1
        assert sample.get(n.SYNC_INTERVAL) == 64  # back to the normal cadence after consensus
    # rank 1 asked last; the split vote before its request switched both ranks to syncing every
    # step, so its pause reaches consensus on the next step or the one after
    assert results["adaptive"][1].get(n.PAUSE_CONSENSUS_STEPS_TOTAL) <= 2
