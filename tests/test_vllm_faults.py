"""Faults on vLLM's real DP=2 engine, each on its own engine (it may be broken afterwards).

- A stall injected into one rank before its ``sync_dp_state`` (test-only switch
  ``IC_TEST_STALL_SYNC_RANK``): the other rank's endpoint shows it inside the all-reduce and
  ``doctor`` names the stalled rank.
- vLLM issue #36594 itself: the test-only legacy one-phase pause makes the upstream
  staggered-barrier scenario hang (bounded by a short ``cpu_distributed_timeout_seconds``);
  while it hangs, the metrics show which rank is in the barrier and which one steps, and
  ``doctor`` names them.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from instrumented_core.doctor import run_doctor
from instrumented_core.flight_analysis import analyze, load_dumps
from instrumented_core.scenarios import ScenarioHang, staggered_barrier
from instrumented_core.telemetry import names as n
from tests.vllm_helpers import PROMPTS, VllmClient, VllmEngine, generate, wait_for

pytestmark = pytest.mark.vllm



STEP = 60.0


def _inside(sample, collective: str) -> float:
    return sample.get(n.COLLECTIVE_INSIDE, 0.0, collective=collective) or 0.0


def test_stall_in_one_ranks_sync_round_is_seen_by_its_peer_and_named_by_doctor():
    engine = VllmEngine({"IC_TEST_STALL_SYNC_RANK": "1", "IC_TEST_STALL_SYNC_SECONDS": "12"},
                        cpu_timeout=60)
    try:
        engine.start()
        engine.wait_metrics(30)
        engine.run(generate(engine.llm, PROMPTS[0], max_tokens=4, dp_rank=0), STEP, "warm-up")
        pause = asyncio.ensure_future(engine.llm.pause_generation(mode="keep"), loop=engine.loop)

        def rank0_waits_inside_sync():
            engine.loop.run_until_complete(asyncio.sleep(0.1))  # let the pause go out
            s = engine.scrape_all()
            return s if _inside(s[0], n.COLLECTIVE_SYNC) >= 3.0 else None

        samples = wait_for(rank0_waits_inside_sync, 20, "rank 0 waiting inside sync_dp_state")
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
    finally:
        engine.close()


def test_legacy_one_phase_pause_hangs_and_doctor_names_the_ranks(tmp_path):
    flight = tmp_path / "flight"  # each rank's watchdog dumps here, unasked (issue 14)
    engine = VllmEngine({"IC_LEGACY_ONE_PHASE_PAUSE": "1", "INSTRUMENTED_CORE_FLIGHT_DIR":
                         str(flight), "INSTRUMENTED_CORE_WATCHDOG_SECONDS": "2"}, cpu_timeout=25)
    try:
        engine.start_served(STEP)
        info = engine.scrape_all()[0].get(n.INFO_SERIES, None, protocol="legacy")
        assert info == 1.0  # the ranks report the legacy protocol
        # the scenario gives up on its staggered barrier after 5 s; the engines stay
        # deadlocked (until Gloo's 25 s bound), which is what the metrics and doctor must show
        scenario = asyncio.ensure_future(staggered_barrier(
            VllmClient(engine.llm, step_timeout=STEP, barrier_timeout=5.0)), loop=engine.loop)

        def hung():
            engine.loop.run_until_complete(asyncio.sleep(0.2))
            s = engine.scrape_all()
            return s if _inside(s[0], "barrier") >= 3.0 and max(
                _inside(s[1], "step"), _inside(s[1], n.COLLECTIVE_SYNC)) >= 3.0 else None

        samples = wait_for(hung, 15, "rank 0 in the barrier, rank 1 stepping")
        assert (samples[1].get(n.START_DP_WAVE_TOTAL, 0.0, outcome="acted") or 0) >= 1
        report = run_doctor(targets=engine.targets, threshold=2.0)
        assert report.verdict.kind == "deadlock", report.render()
        assert report.verdict.culprits == [1], report.render()
        assert report.verdict.victims == [0], report.render()
        assert "barrier" in report.render()
        # the flight recorder: both ranks dumped on their own; one analysis of the directory
        # names the first divergent DP collective and the START_DP_WAVE that woke rank 1
        wait_for(lambda: len({p.name[:15] for p in flight.glob("flight-rank*.json")}) == 2
                 or None, 10, "a hang dump from each rank")
        result = analyze(load_dumps(flight))
        assert result.divergence.startswith("DP collective #"), result.render()
        assert "rank 0 in barrier" in result.divergence, result.render()
        assert result.culprits == [1] and result.victims == [0], result.render()
        assert "START_DP_WAVE" in result.cause and "by rank 1" in result.cause, result.render()
        # the scenario itself calls it a hang, naming the engine that never came back
        with pytest.raises(ScenarioHang, match="staggered barrier did not return") as hang:
            engine.run(scenario, 30, "legacy staggered scenario")
        assert 0 in hang.value.waiting
    finally:
        t0 = time.monotonic()
        engine.close()
        assert time.monotonic() - t0 < 60
