"""vLLM issue #36594 itself, on its own real DP=2 engine (it is broken afterwards): the
test-only legacy one-phase pause (``IC_LEGACY_ONE_PHASE_PAUSE``, read when the engine starts:
the ranks report the legacy protocol from their first scrape) makes the upstream
staggered-barrier scenario hang (bounded by a short ``cpu_distributed_timeout_seconds``); while
it hangs, the metrics show which rank is in the barrier and which one steps, and ``doctor``
names them. Closing the hung engine leaves none of its processes and none of its shared memory.

The stalled rank (the other fault) runs last on ``tests/test_vllm.py``'s engine: that one
recovers, so it needs no engine of its own.
"""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from instrumented_core.doctor import run_doctor
from instrumented_core.flight_analysis import analyze, load_dumps
from instrumented_core.scenarios import ScenarioHang, staggered_barrier
from instrumented_core.telemetry import names as n
from tests.vllm_helpers import VllmClient, VllmEngine, wait_for

pytestmark = pytest.mark.vllm



STEP = 60.0


def _inside(sample, collective: str) -> float:
    return sample.get(n.COLLECTIVE_INSIDE, 0.0, collective=collective) or 0.0


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
    # vLLM's message queues between each engine core and its worker (/dev/shm/psm_*): the
    # killed engine cores never unlink them; close() does, and only those
    segments = engine.shm_segments
    assert len(segments) >= 2, segments  # at least one queue per engine core was seen
    assert not [s for s in segments if os.path.exists(s)], segments
    assert engine.survivors() == []  # and none of its processes
