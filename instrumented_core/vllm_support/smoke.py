"""Smoke run of vLLM's real data-parallel engine on CPU with the tiny MoE model.

    python -m instrumented_core.vllm_support.smoke [--json out.json] [--debug-log]

Starts ``AsyncLLM`` with ``data_parallel_size=2`` (tiny Mixtral, dummy weights, token-id
prompts), then:

1. generates on both DP ranks (requests routed with ``data_parallel_rank``);
2. for each pause mode -- ``abort`` (in-flight requests finish aborted), ``wait`` (they
   drain first), ``keep`` (they are frozen and finish after resume) -- pauses, checks
   ``is_paused()``, runs ``collective_rpc`` and the engine-core ``barrier`` utility (fanned
   out to every engine) while paused, and resumes;
3. the upstream ``test_dp_pause_barrier_request_deadlock`` scenario: pause(keep), ``barrier``
   sent to engine 0 only, a request routed to engine 1 once engine 0 is inside the barrier,
   ``barrier`` to engine 1 five seconds later, a barrier to all, resume; the routed request
   must finish. A deadlock shows up as a timeout (``--barrier-timeout``, default 30 s);
4. shuts the engine down.

It prints start time, peak RSS summed over this process and all its descendants (sampled),
and per-step timings; ``--json`` writes them to a file. Every wait is bounded by an asyncio
timeout, the whole run by ``--total-timeout`` (a watchdog thread kills every child process
and exits with status 3), and all child processes are killed in ``finally``.

Environment: see :mod:`instrumented_core.vllm_support.tiny_model` (``VLLM_CPU_KVCACHE_SPACE``,
``INSTRUMENTED_CORE_VLLM_CPU_DP``; set here with ``setdefault``). The CPU DP plugin must be
installed as a ``vllm.general_plugins`` entry point (the package's ``pyproject.toml``) so
vLLM's worker processes load it. ``--debug-log`` sets ``VLLM_LOGGING_LEVEL=DEBUG``, which
makes the engine cores log "DP pause consensus reached, ignoring START_DP_WAVE." and
"Wave N finished, pausing engine loop.".

Sending a utility call to ONE engine: the front end's client (``llm.engine_core``, a
``DPLBAsyncMPClient``) keeps the engines' ZMQ identities in ``core_engines`` (index = DP rank,
identity = ``rank.to_bytes(2, "little")``);
``await client._call_utility_async("barrier", engine=client.core_engines[i])`` targets one
engine, ``call_utility_all_async`` all of them, and ``call_utility_async`` (what
``pause_generation`` / ``resume_generation`` / ``collective_rpc`` use) fans out to all and
returns engine 0's result.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import signal
import sys
import tempfile
import threading
import time
import uuid
from typing import Any

from .tiny_model import apply_vllm_cpu_env, async_engine_args, write_tiny_mixtral

PROMPTS = [[1, 17, 33, 49, 65], [1, 100, 200, 300], [1, 5, 9], [1, 250, 251, 252, 253, 254]]


# --------------------------------------------------------------------------------------------
# process bookkeeping: peak RSS over the process tree, kill everything on the way out
# --------------------------------------------------------------------------------------------


class TreeMonitor:
    """Samples RSS of this process and all descendants; remembers every child pid seen."""

    def __init__(self, interval: float = 0.25) -> None:
        import psutil

        self._psutil = psutil
        self.interval = interval
        self.me = psutil.Process()
        self.peak_total = 0
        self.peak_by_pid: dict[int, tuple[str, int]] = {}
        self.seen: dict[int, Any] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-monitor", daemon=True)

    def start(self) -> TreeMonitor:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)

    def sample(self) -> int:
        psutil = self._psutil
        total = 0
        try:
            procs = [self.me, *self.me.children(recursive=True)]
        except psutil.Error:
            procs = [self.me]
        for p in procs:
            try:
                rss = p.memory_info().rss
                name = " ".join(p.cmdline()[:3])[:80] if p.pid != self.me.pid else "front end"
            except psutil.Error:
                continue
            total += rss
            if p.pid != self.me.pid:
                self.seen.setdefault(p.pid, p)
            prev = self.peak_by_pid.get(p.pid, ("", 0))[1]
            if rss > prev:
                self.peak_by_pid[p.pid] = (name, rss)
        self.peak_total = max(self.peak_total, total)
        return total

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def kill_children(self, grace: float = 5.0) -> list[int]:
        """Terminate, then kill, every live descendant (current and previously seen).

        Returns the pids that were still alive (e.g. multiprocessing's resource tracker).
        """
        psutil = self._psutil
        procs: dict[int, Any] = dict(self.seen)
        try:
            for p in self.me.children(recursive=True):
                procs[p.pid] = p
        except psutil.Error:
            pass
        alive = []
        for p in procs.values():
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    p.terminate()
                    alive.append(p)
            except psutil.Error:
                pass
        _, still = psutil.wait_procs(alive, timeout=grace)
        for p in still:
            try:
                p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(still, timeout=grace)
        return [p.pid for p in alive]


def start_watchdog(seconds: float, monitor: TreeMonitor) -> threading.Timer:
    def fire() -> None:
        print(f"[smoke] WATCHDOG: total timeout {seconds:.0f}s exceeded; killing children",
              file=sys.stderr, flush=True)
        monitor.kill_children(grace=2.0)
        os._exit(3)

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()
    return timer


# --------------------------------------------------------------------------------------------
# scenario helpers
# --------------------------------------------------------------------------------------------


class Steps:
    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        self.t0 = time.monotonic()

    def log(self, name: str, **fields: Any) -> None:
        rec = {"t": round(time.monotonic() - self.t0, 3), "step": name, **fields}
        self.records.append(rec)
        print(f"[smoke] {rec['t']:8.3f}s {name} {fields if fields else ''}", flush=True)


async def generate(
    llm: Any,
    prompt: list[int],
    *,
    max_tokens: int,
    dp_rank: int | None = None,
    first_token: asyncio.Event | None = None,
    request_id: str | None = None,
) -> dict[str, Any]:
    """Run one request to completion; return its token ids and finish reason."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    rid = request_id or f"smoke-{uuid.uuid4().hex[:8]}"
    last = None
    async for out in llm.generate(
        {"prompt_token_ids": prompt}, params, rid, data_parallel_rank=dp_rank
    ):
        last = out
        if first_token is not None and out.outputs and out.outputs[0].token_ids:
            first_token.set()
    assert last is not None
    comp = last.outputs[0]
    return {
        "request_id": rid,
        "dp_rank": dp_rank,
        "tokens": list(comp.token_ids),
        "finish_reason": comp.finish_reason,
    }


async def bounded(aw: Any, timeout: float, what: str) -> Any:
    """Await ``aw`` for at most ``timeout`` seconds. A TimeoutError raised *inside* ``aw``
    propagates unchanged (``asyncio.wait_for`` would let an outer bound relabel it)."""
    task = asyncio.ensure_future(aw)
    done, _ = await asyncio.wait({task}, timeout=timeout)
    if not done:
        task.cancel()
        raise TimeoutError(f"{what} did not finish within {timeout:.0f}s")
    return task.result()


async def barrier_engine(llm: Any, rank: int) -> Any:
    client = llm.engine_core
    return await client._call_utility_async("barrier", engine=client.core_engines[rank])


async def barrier_all(llm: Any) -> Any:
    return await llm.engine_core.call_utility_all_async("barrier")


async def wait_routed(llm: Any, request_id: str, timeout: float) -> float:
    """Wait until the front end has actually sent ``request_id`` to an engine."""
    client = llm.engine_core
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        # The input processor appends "-<8 hex>" to the caller's id.
        if any(k == request_id or k.startswith(request_id + "-")
               for k in getattr(client, "reqs_in_flight", {})):
            return time.monotonic() - t0
        await asyncio.sleep(0.005)
    raise TimeoutError(f"request {request_id} was not routed within {timeout}s")


async def pause_mode_round(llm: Any, mode: str, steps: Steps, t: float) -> dict[str, Any]:
    """Requests on both ranks, pause(mode), collective_rpc + barrier while paused, resume."""
    max_tokens = {"abort": 400, "wait": 24, "keep": 48}[mode]
    firsts = [asyncio.Event(), asyncio.Event()]
    tasks = [
        asyncio.create_task(
            generate(llm, PROMPTS[r], max_tokens=max_tokens, dp_rank=r, first_token=firsts[r])
        )
        for r in (0, 1)
    ]
    await bounded(asyncio.gather(*(e.wait() for e in firsts)), t, f"{mode}: first tokens")
    t_pause = time.monotonic()
    await bounded(llm.pause_generation(mode=mode), t, f"pause_generation({mode})")
    pause_s = time.monotonic() - t_pause
    paused = await bounded(llm.is_paused(), t, "is_paused")
    done_at_pause = [task.done() for task in tasks]
    steps.log(f"{mode}: paused", pause_s=round(pause_s, 3), is_paused=paused,
              requests_done=done_at_pause)
    rpc = await bounded(llm.collective_rpc("synchronize_device"), t, "collective_rpc")
    await bounded(barrier_all(llm), t, "barrier (all engines) while paused")
    steps.log(f"{mode}: collective_rpc + barrier while paused ok", rpc=repr(rpc)[:60])
    await bounded(llm.resume_generation(), t, "resume_generation")
    results = await bounded(asyncio.gather(*tasks), t, f"{mode}: requests")
    reasons = [r["finish_reason"] for r in results]
    steps.log(f"{mode}: resumed", finish_reasons=reasons,
              n_tokens=[len(r["tokens"]) for r in results])
    expect = {"abort": "abort", "wait": "length", "keep": "length"}[mode]
    ok = paused and all(x == expect for x in reasons)
    if mode == "keep":
        ok = ok and not any(done_at_pause) and all(len(r["tokens"]) == max_tokens
                                                   for r in results)
    return {"mode": mode, "ok": ok, "pause_s": pause_s, "is_paused": paused,
            "finish_reasons": reasons, "done_at_pause": done_at_pause}


async def staggered_barrier(llm: Any, steps: Steps, barrier_timeout: float,
                            t: float) -> dict[str, Any]:
    """Port of vLLM's test_dp_pause_barrier_request_deadlock (DP=2)."""
    await bounded(llm.pause_generation(mode="keep"), t, "pause_generation(keep)")
    paused = await bounded(llm.is_paused(), t, "is_paused")
    steps.log("staggered: paused (keep)", is_paused=paused)
    t_b = time.monotonic()
    b0 = asyncio.create_task(barrier_engine(llm, 0))
    await asyncio.sleep(1.0)
    rid = f"smoke-routed-{uuid.uuid4().hex[:8]}"
    routed = asyncio.create_task(
        generate(llm, PROMPTS[3], max_tokens=8, dp_rank=1, request_id=rid)
    )
    routed_after = await wait_routed(llm, rid, 10.0)
    steps.log("staggered: request routed to engine 1", after_s=round(routed_after, 4))
    await asyncio.sleep(5.0)
    b1 = asyncio.create_task(barrier_engine(llm, 1))
    result: dict[str, Any] = {"is_paused": paused}
    try:
        await bounded(asyncio.gather(b0, b1), max(1.0, barrier_timeout - (time.monotonic() - t_b)),
                      "staggered barrier")
        result["barrier_s"] = round(time.monotonic() - t_b, 3)
        result["deadlock"] = False
        steps.log("staggered: both barriers returned", seconds=result["barrier_s"])
    except Exception as exc:
        result["deadlock"] = True
        result["error"] = f"{type(exc).__name__}: {exc}"
        steps.log("staggered: DEADLOCK (barrier timed out)", error=result["error"],
                  b0_done=b0.done(), b1_done=b1.done())
        for task in (b0, b1, routed):
            task.cancel()
        result["ok"] = False
        return result
    await bounded(barrier_all(llm), t, "barrier (all engines)")
    await bounded(llm.resume_generation(), t, "resume_generation")
    out = await bounded(routed, t, "routed request")
    steps.log("staggered: resumed, routed request finished",
              finish_reason=out["finish_reason"], n_tokens=len(out["tokens"]))
    result["routed"] = out["finish_reason"]
    result["ok"] = paused and out["finish_reason"] == "length"
    return result


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


async def run(args: argparse.Namespace, monitor: TreeMonitor) -> dict[str, Any]:
    from vllm.v1.engine.async_llm import AsyncLLM

    steps = Steps()
    report: dict[str, Any] = {"ok": False, "steps": steps.records}
    model_dir = write_tiny_mixtral(os.path.join(args.workdir, "tiny-mixtral"))
    engine_args = async_engine_args(
        model_dir,
        cpu_distributed_timeout_seconds=args.cpu_timeout,
        dp_sync_interval=args.dp_sync_interval,
    )
    t_start = time.monotonic()
    llm = AsyncLLM.from_engine_args(engine_args)  # blocks until all engines are ready
    report["start_s"] = round(time.monotonic() - t_start, 2)
    report["rss_after_start_mib"] = round(monitor.sample() / 2**20)
    steps.log("engine started", seconds=report["start_s"],
              rss_mib=report["rss_after_start_mib"], client=type(llm.engine_core).__name__)
    t = args.step_timeout
    try:
        # 1) plain generation on both ranks (first call also warms up).
        t_gen = time.monotonic()
        outs = await bounded(
            asyncio.gather(*(generate(llm, PROMPTS[i], max_tokens=16, dp_rank=i % 2)
                             for i in range(4))), t, "generate")
        report["generate_s"] = round(time.monotonic() - t_gen, 3)
        steps.log("generate ok", seconds=report["generate_s"],
                  finish=[o["finish_reason"] for o in outs],
                  first_tokens=[o["tokens"][:4] for o in outs])
        report["generate_ok"] = all(o["finish_reason"] == "length" and len(o["tokens"]) == 16
                                    for o in outs)
        # idle pause (consensus on the first sync round) + resume
        t_p = time.monotonic()
        await bounded(llm.pause_generation(mode="keep"), t, "idle pause")
        report["idle_pause_s"] = round(time.monotonic() - t_p, 3)
        await bounded(llm.resume_generation(), t, "resume after idle pause")
        steps.log("idle pause/resume ok", pause_s=report["idle_pause_s"])

        report["modes"] = {}
        for mode in args.modes:
            report["modes"][mode] = await pause_mode_round(llm, mode, steps, t)

        if args.staggered:
            report["staggered"] = await staggered_barrier(llm, steps, args.barrier_timeout, t)

        report["ok"] = bool(
            report["generate_ok"]
            and all(m["ok"] for m in report["modes"].values())
            and (not args.staggered or report["staggered"]["ok"])
        )
    finally:
        t_sd = time.monotonic()
        try:
            # Synchronous on purpose: in a thread, the output handler would see the engines
            # exit before shutdown cancels it and log a spurious EngineDeadError. The
            # watchdog bounds it.
            llm.shutdown()
            # AsyncLLM.__del__ calls self.shutdown() again, possibly during interpreter
            # teardown (TypeError noise); the instance attribute shadows the method.
            llm.shutdown = lambda *a, **k: None
            report["shutdown_s"] = round(time.monotonic() - t_sd, 2)
            steps.log("shutdown ok", seconds=report["shutdown_s"])
        except Exception as exc:  # still killed below
            steps.log("shutdown failed", error=f"{type(exc).__name__}: {exc}")
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--modes", nargs="*", default=["abort", "wait", "keep"],
                   choices=["abort", "wait", "keep"])
    p.add_argument("--no-staggered", dest="staggered", action="store_false",
                   help="skip the upstream staggered-barrier scenario")
    p.add_argument("--cpu-timeout", type=int, default=60,
                   help="cpu_distributed_timeout_seconds for vLLM's Gloo groups")
    p.add_argument("--dp-sync-interval", type=int, default=None)
    p.add_argument("--barrier-timeout", type=float, default=30.0)
    p.add_argument("--step-timeout", type=float, default=120.0)
    p.add_argument("--total-timeout", type=float, default=600.0)
    p.add_argument("--workdir", default=None)
    p.add_argument("--json", dest="json_path", default=None)
    p.add_argument("--debug-log", action="store_true",
                   help="VLLM_LOGGING_LEVEL=DEBUG (shows the consensus log lines)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    apply_vllm_cpu_env()
    if args.debug_log:
        os.environ["VLLM_LOGGING_LEVEL"] = "DEBUG"
    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="ic-vllm-smoke-")
        args.workdir = tmp.name
    monitor = TreeMonitor().start()
    watchdog = start_watchdog(args.total_timeout, monitor)
    report: dict[str, Any] = {"ok": False}
    t0 = time.monotonic()
    try:
        report = asyncio.run(run(args, monitor))
    except BaseException as exc:  # report, then clean up
        report["error"] = f"{type(exc).__name__}: {exc}"
        print(f"[smoke] FAILED: {report['error']}", file=sys.stderr, flush=True)
    finally:
        gc.collect()  # run AsyncLLM.__del__ now, not during interpreter teardown
        monitor.sample()
        killed = monitor.kill_children()
        monitor.stop()
        watchdog.cancel()
        report["leftover_children_killed"] = killed
        report["total_s"] = round(time.monotonic() - t0, 2)
        report["peak_rss_total_mib"] = round(monitor.peak_total / 2**20)
        report["peak_rss_by_process_mib"] = {
            f"{pid} {name}": round(rss / 2**20) for pid, (name, rss) in
            sorted(monitor.peak_by_pid.items())
        }
        if tmp is not None:
            tmp.cleanup()
    summary = {k: v for k, v in report.items() if k != "steps"}
    print("[smoke] summary:", json.dumps(summary, indent=2, default=str), flush=True)
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(report, f, indent=2, default=str)
    return 0 if report.get("ok") else 1


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sys.exit(main())
