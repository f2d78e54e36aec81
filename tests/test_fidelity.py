"""Fidelity of the CPU reference cluster: the same client schedules on our CPU cluster (DP=2) and
on vLLM's real DP=2 engine give the same per-rank story.

Scenarios (run in this order on both engines, one pause each, so pause ordinals line up):
vLLM's ``test_dp_pause_barrier_request_deadlock`` (pause keep, barrier on engine 0, a request
routed to engine 1, barrier on engine 1, barrier, resume), then each pause mode (requests on
both ranks, pause, ``collective_rpc`` and barrier while paused, resume).

Both engines are read the same way, from their telemetry only:

- the spans (JSON-lines span file of each engine: ``dp.pause`` per rank per pause, children
  ``dp.pause.pending`` / ``dp.pause.paused``, events ``dp.consensus``, ``dp.resume``,
  ``dp.start_dp_wave[.ignored]``): per rank, the time-ordered sequence of phase transitions,
  consensus, START_DP_WAVE outcomes and resume inside the pause (sync rounds are left out:
  how many steps a pause takes may differ);
- the counters ``vllm_dp_start_dp_wave_total{outcome}`` scraped over HTTP before and after the
  scenario (from the moment the scenario's requests run until every rank is idle again): the
  START_DP_WAVE outcomes outside the pause too;
- the phase gauge ``vllm_dp_pause_phase`` at the end (both ranks running).

One vLLM engine for the whole module (~35 s start, ~6 GiB), started after the CPU cluster has
stopped. A mismatch fails with both sides' observations, per rank.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

from instrumented_core.cluster import Cluster, ClusterConfig
from instrumented_core.scenarios import (
    ClusterClient,
    pause_mode_round,
    staggered_barrier,
)
from instrumented_core.scrape import RankSample, scrape
from instrumented_core.telemetry import TelemetryConfig
from instrumented_core.telemetry import names as n
from tests.vllm_helpers import MODE_TOKENS, VllmClient, VllmEngine, wait_for

pytestmark = [pytest.mark.vllm, pytest.mark.cluster]



SCENARIOS = ("staggered_barrier", "abort", "wait", "keep")
ORDINAL = {name: i + 1 for i, name in enumerate(SCENARIOS)}  # pause ordinal of each scenario
STEP = 60.0
FIRST_WAIT, GAP = 1.0, 2.0  # staggered barrier: engine 0's barrier -> routed request -> engine 1
# tokens per request in the mode rounds on the CPU cluster (vLLM's: MODE_TOKENS)
CPU_TOKENS = {"abort": 4000, "wait": 100, "keep": 400}
CPU_STEP_SECONDS = 0.005


# ----------------------------------------------------------------------------------------------
# reading telemetry (identical for both engines)
# ----------------------------------------------------------------------------------------------


def read_spans(path: Path) -> list[dict]:
    if not path.exists():
        return []
    spans = []
    for line in path.read_text().splitlines():
        try:
            spans.append(json.loads(line))
        except ValueError:
            continue  # a line being written
    return spans


def pause_sequences(spans: list[dict], ordinal: int) -> dict[int, list[str]] | None:
    """Per rank: the time-ordered story of pause ``ordinal`` from its spans, or None while a
    rank's ``dp.pause`` span has not been exported yet."""
    pauses = {s["attributes"][n.ATTR_RANK]: s for s in spans if s["name"] == n.SPAN_PAUSE
              and s["attributes"].get(n.ATTR_PAUSE_ORDINAL) == ordinal}
    if sorted(pauses) != [0, 1]:
        return None
    out: dict[int, list[str]] = {}
    for rank, pause in sorted(pauses.items()):
        items: list[tuple[str, str]] = []
        span_id = pause["context"]["span_id"]
        children = [s for s in spans if s.get("parent_id") == span_id]
        phase_of = {n.SPAN_PENDING: "pending_pause", n.SPAN_PAUSED: "paused"}
        for span in (pause, *children):
            if span["name"] in phase_of:
                items.append((span["start_time"], f"phase:{phase_of[span['name']]}"))
            for event in span.get("events", []):
                name = event["name"]
                if name == n.EVENT_CONSENSUS:
                    items.append((event["timestamp"], "consensus"))
                elif name == n.EVENT_RESUME:
                    items.append((event["timestamp"], "resume"))
                elif name in (n.EVENT_START_DP_WAVE, n.EVENT_START_DP_WAVE_IGNORED):
                    outcome = event["attributes"].get(n.ATTR_OUTCOME)
                    items.append((event["timestamp"], f"start_dp_wave:{outcome}"))
        ended_by = pause["attributes"].get(n.ATTR_ENDED_BY)
        items.append((pause["end_time"], f"phase:running{' (' + ended_by + ')' if ended_by else ''}"))
        mode = pause["attributes"].get(n.ATTR_MODE)
        out[rank] = [f"pause_requested:{mode}"] + [what for _, what in sorted(items)]
    return out


def wave_outcomes(sample: RankSample) -> dict[str, int]:
    return {o: int(sample.get(n.START_DP_WAVE_TOTAL, 0, outcome=o) or 0)
            for o in n.WAVE_OUTCOMES}


def outcome_delta(after: list[dict], before: list[dict]) -> dict[int, dict[str, int]]:
    return {r: {o: after[r][o] - before[r][o] for o in n.WAVE_OUTCOMES
                if after[r][o] - before[r][o]} for r in (0, 1)}


def scrape_ranks(targets: list[str]) -> list[RankSample]:
    samples = [scrape(t, timeout=2.0) for t in targets]
    assert all(s.reachable for s in samples), [s.error for s in samples]
    return samples


def wait_idle(targets: list[str], timeout: float = 30.0) -> list[RankSample]:
    """Every rank running (phase 0) with its busy loop stopped, twice 0.5 s apart."""
    def idle():
        samples = scrape_ranks(targets)
        return all(int(s.get(n.PHASE, -1)) == n.PHASE_RUNNING
                   and not s.get(n.ENGINES_RUNNING, 1) for s in samples)

    wait_for(idle, timeout, "both ranks idle")
    time.sleep(0.5)
    return wait_for(lambda: idle() and scrape_ranks(targets), timeout, "both ranks idle")


class Observer:
    """Snapshots one engine's telemetry around each scenario."""

    def __init__(self, targets: list[str], spans_file: Path) -> None:
        self.targets, self.spans_file = targets, spans_file
        self.results: dict[str, dict] = {}
        self._before: list[dict] = []

    def begin(self) -> None:
        self._before = [wave_outcomes(s) for s in scrape_ranks(self.targets)]

    def end(self, scenario: str, **extra) -> None:
        samples = wait_idle(self.targets)
        after = [wave_outcomes(s) for s in samples]
        sequences = wait_for(lambda: pause_sequences(read_spans(self.spans_file),
                                                     ORDINAL[scenario]),
                             15, f"{scenario}: dp.pause spans of both ranks")
        self.results[scenario] = {
            "sequence": sequences,
            "start_dp_wave": outcome_delta(after, self._before),
            "final_phase": [int(s.get(n.PHASE, -1)) for s in samples],
            **extra,
        }


# ----------------------------------------------------------------------------------------------
# the scenarios on the CPU cluster
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cpu_results(tmp_path_factory):
    spans = tmp_path_factory.mktemp("fidelity-cpu") / "spans.jsonl"
    config = ClusterConfig(ranks=2, step_seconds=CPU_STEP_SECONDS, hang_timeout=30.0,
                           telemetry=TelemetryConfig(metrics_port_base=0,
                                                     spans_file=str(spans)))
    with Cluster(config) as cluster:
        targets = list(cluster.metrics_urls)
        obs = Observer(targets, spans)
        wait_idle(targets)
        client = ClusterClient(cluster)
        obs.begin()
        out = asyncio.run(staggered_barrier(client, first_wait=FIRST_WAIT, gap=GAP))
        obs.end("staggered_barrier", requests=[out.routed])
        for mode in ("abort", "wait", "keep"):
            got = asyncio.run(pause_mode_round(client, mode, CPU_TOKENS[mode],
                                               before_pause=obs.begin))
            obs.end(mode, paused=got.paused, requests=got.outcomes)
    return obs.results


# ----------------------------------------------------------------------------------------------
# the same on vLLM
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vllm_results(cpu_results, tmp_path_factory):
    """After the CPU cluster (never two engines at once); one vLLM engine for all scenarios."""
    spans = tmp_path_factory.mktemp("fidelity-vllm") / "spans.jsonl"
    env = {"INSTRUMENTED_CORE_TELEMETRY": "1", "OTEL_TRACES_EXPORTER": "file",
           "INSTRUMENTED_CORE_SPANS_FILE": str(spans)}
    engine = VllmEngine(env, cpu_timeout=30)
    try:
        engine.start_served(STEP)
        client = VllmClient(engine.llm, step_timeout=STEP)
        obs = Observer(engine.targets, spans)
        wait_idle(engine.targets)
        obs.begin()
        out = engine.run(staggered_barrier(client, first_wait=FIRST_WAIT, gap=GAP), 120,
                         "staggered barrier")
        obs.end("staggered_barrier", requests=[out.routed])
        for mode in ("abort", "wait", "keep"):
            got = engine.run(pause_mode_round(client, mode, MODE_TOKENS[mode],
                                              before_pause=obs.begin), 180, f"{mode} round")
            obs.end(mode, paused=got.paused, requests=got.outcomes)
        return obs.results
    finally:
        engine.close()


# ----------------------------------------------------------------------------------------------
# the comparison
# ----------------------------------------------------------------------------------------------


def _differences(cpu: dict, real: dict) -> list[str]:
    diffs = []
    for rank in (0, 1):
        if cpu["sequence"][rank] != real["sequence"][rank]:
            diffs.append(f"rank {rank} pause sequence: CPU cluster {cpu['sequence'][rank]} "
                         f"vs vLLM {real['sequence'][rank]}")
        c, v = cpu["start_dp_wave"].get(rank, {}), real["start_dp_wave"].get(rank, {})
        if c != v:
            diffs.append(f"rank {rank} START_DP_WAVE outcomes (counter deltas): CPU cluster "
                         f"{c} vs vLLM {v}")
    for key in ("final_phase", "paused", "requests"):
        if cpu.get(key) != real.get(key):
            diffs.append(f"{key}: CPU cluster {cpu.get(key)} vs vLLM {real.get(key)}")
    return diffs


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_cpu_cluster_and_real_vllm_tell_the_same_story(cpu_results, vllm_results, scenario):
    cpu, real = cpu_results[scenario], vllm_results[scenario]
    print(f"\n{scenario}: CPU {json.dumps(cpu)}\n{scenario}: vLLM {json.dumps(real)}")
    diffs = _differences(cpu, real)
    assert not diffs, f"{scenario}: the CPU cluster differs from vLLM:\n  " + "\n  ".join(diffs)
    # and both tell the two-phase story
    for rank in (0, 1):
        seq = real["sequence"][rank]
        assert seq[:3] == [f"pause_requested:{'keep' if scenario == 'staggered_barrier' else scenario}",
                           "phase:pending_pause", "consensus"], seq
        assert seq.index("phase:paused") < seq.index("resume") < seq.index("phase:running")
