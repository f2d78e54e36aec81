"""A real vLLM data-parallel engine on CPU, driven from this process: the harness the demo
(``instrumented-core demo --engine vllm``) and the real-vLLM tests share.

``VllmEngine`` runs ``AsyncLLM`` with ``data_parallel_size=2`` on the tiny local Mixtral model
(:mod:`.tiny_model`) in this process (the vLLM front end) on a private event loop; its DP
coordinator, two engine cores and two workers are spawned children. The environment it needs
(``VLLM_CPU_KVCACHE_SPACE``, the CPU DP plugin switch, the metrics port base, test-only fault
switches) is applied before the start and restored by ``close()``, which shuts the engine down,
kills every descendant it ever saw, so a broken engine (a hang) never outlives it, and removes
the shared-memory segments (``/dev/shm/psm_*``) those processes held.
Every call goes through :func:`bounded` (``VllmEngine.run``). Needs vLLM (the ``vllm-cpu``
extra) and psutil (one of vLLM's dependencies); nothing imports vLLM before ``start()``.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from contextlib import closing
from typing import Any

from instrumented_core.scenarios import ScenarioHang, bounded
from instrumented_core.scrape import RankSample, scrape
from instrumented_core.stopping import shared_memory_held
from instrumented_core.telemetry import names as n
from instrumented_core.vllm_support.tiny_model import (
    async_engine_args,
    vllm_cpu_env,
    write_tiny_mixtral,
)

__all__ = [
    "COUNTERS",
    "MODE_TOKENS",
    "PROMPTS",
    "Traffic",
    "VllmClient",
    "VllmEngine",
    "barrier_all",
    "barrier_engine",
    "bounded",
    "counters",
    "delta",
    "doctor_until",
    "free_port_base",
    "generate",
    "new_request_id",
    "wait_for",
    "wait_routed",
]

PROMPTS = [[1, 17, 33, 49, 65], [1, 100, 200, 300], [1, 5, 9], [1, 250, 251, 252, 253, 254]]
START_TIMEOUT = 150.0
#: seconds vLLM's shutdown gives its engine-core processes before it kills them
SHUTDOWN_GRACE = 1.0
#: tokens per request in a pause-mode round: still running when the pause arrives (abort,
#: keep), drained before it returns (wait)
MODE_TOKENS = {"abort": 400, "wait": 24, "keep": 48}


# ----------------------------------------------------------------------------------------------
# process bookkeeping: RSS over the process tree, kill everything on the way out (psutil is a
# dependency of vLLM, which this module needs anyway)
# ----------------------------------------------------------------------------------------------


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
        self.shm: set[str] = set()
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

    def survivors(self) -> list[int]:
        """Pids of descendants ever seen that still run (the resource tracker aside)."""
        psutil = self._psutil
        alive = []
        for p in self.seen.values():
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE \
                        and p.pid != _resource_tracker_pid():
                    alive.append(p.pid)
            except psutil.Error:
                pass
        return alive

    def note_shm(self) -> set[str]:
        """Record the POSIX shared-memory segments (``/dev/shm/psm_*``: vLLM's message queues
        between an engine core and its workers) that this tree's processes hold open now;
        returns all recorded so far. Only segments our own processes hold are ever recorded,
        so :meth:`unlink_shm` never touches another engine's."""
        psutil = self._psutil
        try:
            procs = [*self.me.children(recursive=True), *self.seen.values()]
        except psutil.Error:
            procs = list(self.seen.values())
        # is_running() compares the start time too: a pid reused by another process since
        # (pids wrap quickly on a busy machine) is not ours
        live = set()
        for p in procs:
            try:
                if p.is_running():
                    live.add(p.pid)
            except psutil.Error:
                pass
        self.shm |= shared_memory_held(live)
        return set(self.shm)

    def unlink_shm(self) -> list[str]:
        """Remove the recorded segments still present (call after the processes are gone:
        a killed engine core never unlinks its queues). Returns what was removed."""
        removed = []
        for path in sorted(self.shm):
            try:
                os.unlink(path)
                removed.append(path)
            except FileNotFoundError:
                pass
        return removed

    def kill_children(self, grace: float = 5.0) -> list[int]:
        """Terminate, then kill, every live descendant (current and previously seen), except
        this process's multiprocessing resource tracker: it is this process's, not the
        engine's (the next engine reuses it), it ignores SIGTERM (so terminating it cost the
        whole grace), and it exits with this process after unlinking what it tracks.

        Returns the pids that were still alive.
        """
        psutil = self._psutil
        procs: dict[int, Any] = dict(self.seen)
        try:
            for p in self.me.children(recursive=True):
                procs[p.pid] = p
        except psutil.Error:
            pass
        procs.pop(_resource_tracker_pid(), None)
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


def _resource_tracker_pid() -> int | None:
    from multiprocessing import resource_tracker

    return getattr(getattr(resource_tracker, "_resource_tracker", None), "_pid", None)


# ----------------------------------------------------------------------------------------------
# bounded calls into the engine
# ----------------------------------------------------------------------------------------------


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
    rid = request_id or new_request_id("req")
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


async def barrier_engine(llm: Any, rank: int) -> Any:
    client = llm.engine_core
    return await client._call_utility_async("barrier", engine=client.core_engines[rank])


async def barrier_all(llm: Any) -> Any:
    # one call per engine (``call_utility_all_async`` only exists from vLLM 0.32 on)
    client = llm.engine_core
    return await asyncio.gather(*(client._call_utility_async("barrier", engine=e)
                                  for e in client.core_engines))


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


def free_port_base(count: int = 2, start: int = 23000, stop: int = 60000) -> int:
    """A base port such that base .. base+count-1 are free on loopback now."""
    import random

    rng = random.Random(os.getpid() ^ int(time.time()))
    for _ in range(200):
        base = rng.randrange(start, stop - count)
        ok = True
        for port in range(base, base + count):
            with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
    raise RuntimeError("no free port range found")


class VllmEngine:
    """AsyncLLM, DP=2, tiny MoE model, on CPU; env applied before start and restored after."""

    def __init__(self, env: dict[str, str] | None = None, *, cpu_timeout: int = 30,
                 dp_sync_interval: int | None = None, metrics: bool = True,
                 port_base: int | None = None, overrides: dict[str, Any] | None = None) -> None:
        """``port_base``: rank r serves ``/metrics`` on ``port_base + r`` (default: a free
        range); ``metrics=False`` leaves the port base to the environment; ``overrides`` go
        to ``AsyncEngineArgs`` unchanged (e.g. the multi-node DP settings of a front end that
        runs one local rank)."""
        self.overrides = dict(overrides or {})
        self.port_base = (port_base or free_port_base(2)) if metrics else 0
        self.env = vllm_cpu_env()
        if metrics:
            self.env["INSTRUMENTED_CORE_METRICS_PORT_BASE"] = str(self.port_base)
        self.env.update(env or {})
        self.cpu_timeout = cpu_timeout
        self.dp_sync_interval = dp_sync_interval
        self.loop = asyncio.new_event_loop()
        self.llm: Any = None
        self.monitor: TreeMonitor | None = None
        self.start_seconds = 0.0
        self.rss_after_start_mib = 0
        self._saved_env: dict[str, str | None] = {}
        self._tmp = tempfile.TemporaryDirectory(prefix="ic-vllm-test-")

    @property
    def targets(self) -> list[str]:
        return [f"127.0.0.1:{self.port_base + r}" for r in (0, 1)]

    @property
    def metrics_urls(self) -> list[str]:
        return [f"http://{t}/metrics" for t in self.targets]

    def run(self, coro: Awaitable[Any], timeout: float = 120.0, what: str = "call") -> Any:
        return self.loop.run_until_complete(bounded(coro, timeout, what))

    def start(self) -> VllmEngine:
        for key, value in self.env.items():
            self._saved_env[key] = os.environ.get(key)
            os.environ[key] = value
        self.monitor = TreeMonitor().start()
        # Futures built outside ``run`` (``asyncio.gather(...)`` arguments) must bind to this
        # loop, not to a default loop that never runs.
        asyncio.set_event_loop(self.loop)
        model_dir = write_tiny_mixtral(os.path.join(self._tmp.name, "tiny-mixtral"))
        args = async_engine_args(model_dir, cpu_distributed_timeout_seconds=self.cpu_timeout,
                                 dp_sync_interval=self.dp_sync_interval, **self.overrides)

        async def create() -> Any:
            from vllm.v1.engine.async_llm import AsyncLLM

            return AsyncLLM.from_engine_args(args)

        t0 = time.monotonic()
        self.llm = self.loop.run_until_complete(create())
        self.start_seconds = time.monotonic() - t0

        self.rss_after_start_mib = round(self.monitor.sample() / 2**20)
        self.monitor.note_shm()
        return self

    def start_served(self, timeout: float = 60.0) -> VllmEngine:
        """Start, wait for both ranks' endpoints, then serve one request per engine: on a
        fresh ``AsyncLLM`` the first request sent while paused is only routed after resume
        (vLLM front-end behaviour, with or without us)."""
        self.start()
        if self.port_base:  # metrics=False: the endpoints are the environment's business
            self.wait_metrics(timeout)
        self.run(asyncio.gather(*(generate(self.llm, PROMPTS[r], max_tokens=4, dp_rank=r)
                                  for r in (0, 1))), timeout, "warm-up")
        return self

    def __enter__(self) -> VllmEngine:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def shm_segments(self) -> set[str]:
        """The shared-memory segments this engine's processes held (removed by ``close``)."""
        return set(self.monitor.shm) if self.monitor is not None else set()

    def survivors(self) -> list[int]:
        """This engine's processes still running (after ``close``: none)."""
        return self.monitor.survivors() if self.monitor is not None else []

    def close(self) -> None:
        if self.monitor is not None:
            self.monitor.note_shm()  # queues made after start (a restarted worker), if any
        try:
            if self.llm is not None:
                try:
                    # vLLM waits ``timeout`` for its engine cores before killing them (default
                    # 5 s; they wait for workers that do not exit on CPU): everything is
                    # killed below anyway
                    self.llm.shutdown(timeout=SHUTDOWN_GRACE)
                finally:
                    self.llm.shutdown = lambda *a, **k: None
                    self.llm = None
        except Exception:  # noqa: BLE001 - the processes are killed below anyway
            pass
        finally:
            self._cancel_tasks()
            # Reap our direct children through multiprocessing first (psutil reaping them
            # would leave multiprocessing believing they still run), then kill the rest.
            deadline = time.monotonic() + 10
            for p in multiprocessing.active_children():
                p.join(max(0.1, deadline - time.monotonic()))
                if p.is_alive():
                    p.kill()
                    p.join(5)
            if self.monitor is not None:
                self.monitor.kill_children(grace=5.0)
                self.monitor.stop()
                # vLLM's engine cores create these and unlink them only on a clean exit;
                # killed (or shut down while a worker hangs), they stay in /dev/shm (RAM)
                self.monitor.unlink_shm()
            try:
                asyncio.set_event_loop(None)
                self.loop.close()
            except Exception:  # noqa: BLE001
                pass
            for key, value in self._saved_env.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
            self._tmp.cleanup()

    def _cancel_tasks(self) -> None:
        """Cancel what vLLM's client left on our loop (output handler, stats task) and let the
        cancellations run, so no zmq socket outlives the loop (a later gc would block in
        ``Context.term``)."""
        try:
            tasks = [t for t in asyncio.all_tasks(self.loop) if not t.done()]
            for task in tasks:
                task.cancel()
            if tasks:
                self.loop.run_until_complete(asyncio.wait(tasks, timeout=5))
        except Exception:  # noqa: BLE001
            pass

    # -- metrics ----------------------------------------------------------------------------

    def scrape_all(self) -> list[RankSample]:
        return [scrape(t, timeout=2.0) for t in self.targets]

    def worker_process(self, rank: int) -> Any:
        """The ``psutil.Process`` of DP rank ``rank``'s worker (``VLLM::Worker_DP<rank>``)."""
        import psutil

        title = f"Worker_DP{rank}"
        for proc in psutil.Process().children(recursive=True):
            try:
                if title in proc.name() or any(title in part for part in proc.cmdline()[:1]):
                    return proc
            except psutil.Error:
                continue
        raise LookupError(f"no worker process {title!r} among this engine's processes")

    def wait_metrics(self, timeout: float = 20.0) -> list[RankSample]:
        """Both ranks' endpoints up (they start when each engine's busy loop starts)."""
        return wait_for(lambda: (s := self.scrape_all()) and all(x.reachable for x in s) and s,
                        timeout, "metrics endpoints of both engine cores")


class Traffic:
    """Requests kept in flight on every DP rank until ``stop()``: each lane generates
    ``max_tokens`` tokens, records the finish reason and starts over. Runs on the engine's
    loop, so the caller must keep the loop running (``await`` inside ``VllmEngine.run``)."""

    def __init__(self, llm: Any, lanes_per_rank: int = 2, max_tokens: int = 200,
                 ranks: tuple[int, ...] = (0, 1)) -> None:
        self.llm = llm
        self.finished: list[str] = []
        self._stop = asyncio.Event()
        self._tasks = [asyncio.ensure_future(self._lane(PROMPTS[i % len(PROMPTS)], rank,
                                                        max_tokens))
                       for rank in ranks for i in range(lanes_per_rank)]

    async def _lane(self, prompt: list[int], rank: int, max_tokens: int) -> None:
        while not self._stop.is_set():
            out = await generate(self.llm, prompt, max_tokens=max_tokens, dp_rank=rank)
            self.finished.append(out["finish_reason"])

    async def stop(self, timeout: float = 120.0) -> list[str]:
        """Let every lane finish the request it is on; returns every finish reason."""
        self._stop.set()
        await bounded(asyncio.gather(*self._tasks), timeout, "traffic drains")
        return self.finished

    def cancel(self) -> None:
        for task in self._tasks:
            task.cancel()


async def doctor_until(targets: list[str], accept: Callable[[Any], bool], timeout: float,
                       what: str, **doctor_kwargs: Any) -> tuple[Any, float]:
    """Run the doctor (off the event loop, so the engine's requests keep flowing) until
    ``accept(report)``; returns the report and the seconds it took. On timeout the error
    carries the last report's text."""
    from instrumented_core.doctor import run_doctor

    loop = asyncio.get_running_loop()
    t0 = time.monotonic()
    last = None
    while time.monotonic() - t0 < timeout:
        last = await loop.run_in_executor(
            None, lambda: run_doctor(targets=targets, **doctor_kwargs))
        if accept(last):
            return last, time.monotonic() - t0
    raise TimeoutError(f"{what}: not seen within {timeout:.0f} s; the doctor said last:\n"
                       f"{last.render() if last is not None else '(nothing)'}")


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise TimeoutError(f"{what}: not true within {timeout:.0f}s (last: {last!r})")


COUNTERS = {
    "pause_keep": (n.PAUSE_REQUESTS_TOTAL, {"mode": "keep"}),
    "pause_abort": (n.PAUSE_REQUESTS_TOTAL, {"mode": "abort"}),
    "pause_wait": (n.PAUSE_REQUESTS_TOTAL, {"mode": "wait"}),
    "consensus": (n.PAUSE_CONSENSUS_TOTAL, {}),
    "resumes": (n.RESUMES_TOTAL, {}),
    "sync_rounds": (n.SYNC_WAIT_COUNT, {}),
    "wave_ignored": (n.START_DP_WAVE_TOTAL, {"outcome": "ignored"}),
    "wave_acted": (n.START_DP_WAVE_TOTAL, {"outcome": "acted"}),
    "wave_stale": (n.START_DP_WAVE_TOTAL, {"outcome": "stale"}),
    "wave_excluded": (n.START_DP_WAVE_TOTAL, {"outcome": "excluded"}),
    "steps_real": (n.STEPS_TOTAL, {"kind": "real"}),
    "steps_dummy": (n.STEPS_TOTAL, {"kind": "dummy"}),
    "consensus_count": (n.PAUSE_CONSENSUS_LATENCY_COUNT, {}),
    "barrier_seconds": (n.COLLECTIVE_WAIT_TOTAL, {"collective": "barrier"}),
    "rpc_seconds": (n.COLLECTIVE_WAIT_TOTAL, {"collective": "collective_rpc"}),
    "resume_seconds": (n.COLLECTIVE_WAIT_TOTAL, {"collective": "resume"}),
}


def counters(sample: RankSample) -> dict[str, float]:
    return {key: sample.get(name, 0.0, **labels) or 0.0 for key, (name, labels) in COUNTERS.items()}


def delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before.get(k, 0.0) for k in after}


def new_request_id(prefix: str = "t") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


class VllmClient:
    """The scenarios' client (:class:`instrumented_core.scenarios.PauseClient`) over
    ``AsyncLLM``: every call bounded by ``step_timeout``; a request is its task on the loop."""

    def __init__(self, llm: Any, *, ranks: int = 2, step_timeout: float = 60.0,
                 barrier_timeout: float = 30.0) -> None:
        self.llm, self.ranks = llm, ranks
        self.t, self.barrier_timeout = step_timeout, barrier_timeout
        self._firsts: dict[asyncio.Future, asyncio.Event] = {}
        self._ids: dict[asyncio.Future, str] = {}

    def submit(self, tokens: int, rank: int) -> asyncio.Future:
        first, rid = asyncio.Event(), new_request_id("routed")
        task = asyncio.ensure_future(generate(self.llm, PROMPTS[rank % len(PROMPTS)],
                                              max_tokens=tokens, dp_rank=rank,
                                              first_token=first, request_id=rid))
        self._firsts[task], self._ids[task] = first, rid
        return task

    async def running(self, requests: list[asyncio.Future]) -> None:
        await bounded(asyncio.gather(*(self._firsts[r].wait() for r in requests)), self.t,
                      "first tokens")

    async def routed(self, request: asyncio.Future) -> None:
        # on 2 cores, yielding a few hundred times is not enough for the front end to send it
        await wait_routed(self.llm, self._ids[request], 10.0)

    def done(self, request: asyncio.Future) -> bool:
        return request.done()

    async def outcome(self, request: asyncio.Future) -> str:
        reason = (await bounded(request, self.t, "request"))["finish_reason"]
        return {"length": "completed", "abort": "aborted"}.get(reason, reason)

    def cancel(self, request: asyncio.Future) -> None:
        request.cancel()

    async def pause(self, mode: str) -> None:
        await bounded(self.llm.pause_generation(mode=mode), self.t, f"pause_generation({mode})")

    async def is_paused(self) -> bool:
        return bool(await bounded(self.llm.is_paused(), self.t, "is_paused"))

    def barrier_on(self, rank: int) -> asyncio.Future:
        return asyncio.ensure_future(barrier_engine(self.llm, rank))

    async def barrier(self) -> None:
        await bounded(barrier_all(self.llm), self.t, "barrier (all engines)")

    async def collective_rpc(self) -> None:
        await bounded(self.llm.collective_rpc("check_health"), self.t, "collective_rpc")

    async def resume(self) -> None:
        await bounded(self.llm.resume_generation(), self.t, "resume_generation")

    def hang(self, what: str, waiting: list[int]) -> Exception:
        return ScenarioHang(what, waiting, self.barrier_timeout)
