"""The client schedules every engine runs: written once, driven through a small client adapter.

The same steps run on the CPU reference cluster and on vLLM's real DP engine, so the tests,
both demos and the fidelity comparison exercise one script, not copies that drift apart:

- :func:`staggered_barrier`: vLLM's ``test_dp_pause_barrier_request_deadlock`` (pause keep,
  ``barrier`` on engine 0 only, a request routed to another engine, ``barrier`` on the others,
  a barrier on all, resume);
- :func:`pause_mode_round`: requests on every rank, ``pause(mode)``, ``collective_rpc`` and a
  barrier while paused, resume;
- :func:`run_random_schedule` / :func:`check_schedule`: randomized valid client behaviour on
  the CPU cluster (waves at any moment, every pause mode, barriers, RPCs).

A scenario talks to an engine through :class:`PauseClient` (async, so the vLLM front end's
event loop keeps serving while a scenario waits). :class:`ClusterClient` adapts the CPU
cluster; ``instrumented_core.vllm_support.engine.VllmClient`` adapts ``AsyncLLM``.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from instrumented_core.cluster.client import Cluster, CollectiveHang, RequestHandle

__all__ = [
    "ClusterClient",
    "ModeRound",
    "Narrator",
    "PauseClient",
    "ScenarioHang",
    "ScheduleResult",
    "StaggeredResult",
    "barrier_around_request",
    "bounded",
    "check_schedule",
    "pause_mode_round",
    "run_random_schedule",
    "staggered_barrier",
    "upstream_deadlock_scenario",
]


class ScenarioHang(RuntimeError):
    """A scenario's collective did not return in time (the engine has no richer report)."""

    def __init__(self, what: str, waiting: list[int], timeout: float) -> None:
        super().__init__(f"the {what} did not return within {timeout:.0f} s (engine "
                         f"{', '.join(map(str, waiting))} not back)")
        self.waiting = waiting


class Narrator(Protocol):
    """Where a scenario announces its steps (the demo's story; silent in tests)."""

    def step(self, name: str, text: str) -> None: ...

    def note(self, text: str) -> None: ...


class _Silent:
    def step(self, name: str, text: str) -> None:
        pass

    def note(self, text: str) -> None:
        pass


SILENT: Narrator = _Silent()


class PauseClient(Protocol):
    """What a scenario needs from an engine's client; every call is bounded by the adapter."""

    ranks: int
    barrier_timeout: float  # a staggered barrier not back this long after its last part hangs

    def submit(self, tokens: int, rank: int) -> Any: ...  # a request, started now

    async def running(self, requests: list[Any]) -> None: ...  # each is being stepped

    async def routed(self, request: Any) -> None: ...  # it reached its engine

    def done(self, request: Any) -> bool: ...

    async def outcome(self, request: Any) -> str: ...  # "completed" | "aborted"

    def cancel(self, request: Any) -> None: ...

    async def pause(self, mode: str) -> None: ...

    async def is_paused(self) -> bool: ...

    def barrier_on(self, rank: int) -> asyncio.Future: ...  # one engine's barrier, started

    async def barrier(self) -> None: ...  # every engine's

    async def collective_rpc(self) -> None: ...

    async def resume(self) -> None: ...

    def hang(self, what: str, waiting: list[int]) -> Exception: ...


async def bounded(aw: Awaitable[Any], timeout: float, what: str) -> Any:
    """Await ``aw`` for at most ``timeout`` seconds. A TimeoutError raised *inside* ``aw``
    propagates unchanged (``asyncio.wait_for`` would let an outer bound relabel it)."""
    task = asyncio.ensure_future(aw)
    done, _ = await asyncio.wait({task}, timeout=timeout)
    if not done:
        task.cancel()
        raise TimeoutError(f"{what} did not finish within {timeout:.0f}s")
    return task.result()


async def barrier_around_request(client: PauseClient, *, routed_rank: int, first_wait: float,
                                 gap: float, tokens: int) -> Any:
    """The staggered barrier's middle, on paused engines: ``barrier`` on engine 0 only (it
    blocks in the DP group barrier), a request routed to ``routed_rank`` (under the legacy
    protocol its START_DP_WAVE wakes paused ranks into a step collective), then ``barrier``
    on the others. Returns the routed request; a hang raises ``client.hang(...)`` after
    cancelling what it started."""
    started: list[asyncio.Future] = [client.barrier_on(0)]
    routed = None
    try:
        await asyncio.sleep(first_wait)
        routed = client.submit(tokens, routed_rank)
        await client.routed(routed)
        await asyncio.sleep(gap)
        started += [client.barrier_on(r) for r in range(1, client.ranks)]
        _, pending = await asyncio.wait(started, timeout=client.barrier_timeout)
        if pending:
            raise client.hang("staggered barrier",
                              [r for r, b in enumerate(started) if b in pending])
        for b in started:
            b.result()
    except BaseException:
        for b in started:
            b.cancel()
        if routed is not None:
            client.cancel(routed)
        raise
    return routed


@dataclass
class StaggeredResult:
    paused: bool  # is_paused() right after pause(keep) returned
    routed: str  # outcome of the request routed while paused


async def staggered_barrier(client: PauseClient, *, routed_rank: int = 1,
                            first_wait: float = 1.0, gap: float = 2.0, tokens: int = 8,
                            narrator: Narrator = SILENT) -> StaggeredResult:
    """vLLM's ``test_dp_pause_barrier_request_deadlock``, as its steps are announced.

    Raises ``client.hang(...)`` when the staggered barrier does not return within
    ``client.barrier_timeout`` (the deadlock of #36594 under the legacy one-phase pause),
    after cancelling what it started."""
    narrator.step("pause(keep)", "pause_generation(mode='keep') on all ranks")
    await client.pause("keep")
    paused = await client.is_paused()
    narrator.note("all ranks report paused" if paused
                  else "pause returned, but not every rank reports paused")
    narrator.step("staggered barrier + routed request",
                  f"barrier on engine 0; request routed to engine {routed_rank}; "
                  "barrier on the others")
    routed = await barrier_around_request(client, routed_rank=routed_rank,
                                          first_wait=first_wait, gap=gap, tokens=tokens)
    narrator.step("barrier + resume", "barrier on all engines, then resume")
    await client.barrier()
    await client.resume()
    outcome = await client.outcome(routed)
    narrator.note(f"routed request {outcome}")
    return StaggeredResult(paused, outcome)


@dataclass
class ModeRound:
    mode: str
    paused: bool  # is_paused() right after the pause returned
    done_at_pause: list[bool]  # per rank: its request had finished when the pause returned
    outcomes: list[str]  # per rank: "completed" | "aborted"

    def broken_promise(self) -> str | None:
        """What the mode promised and did not do, or None: abort aborts what runs; wait
        drains it before the pause returns; keep keeps it and finishes it after resume."""
        if not self.paused:
            return f"{self.mode}: is_paused() was false after the pause returned"
        if self.mode == "abort" and set(self.outcomes) != {"aborted"}:
            return f"abort: in-flight requests ended {self.outcomes}, not aborted"
        if self.mode in ("wait", "keep") and set(self.outcomes) != {"completed"}:
            return f"{self.mode}: requests ended {self.outcomes}, not completed"
        if self.mode == "wait" and not all(self.done_at_pause):
            return f"wait: requests still running when the pause returned {self.done_at_pause}"
        if self.mode == "keep" and any(self.done_at_pause):
            return f"keep: requests finished while paused {self.done_at_pause}"
        return None


async def pause_mode_round(client: PauseClient, mode: str, tokens: int, *,
                           settle: float = 0.3,
                           before_pause: Callable[[], None] | None = None,
                           while_paused: Callable[[], None] | None = None,
                           after_collectives: Callable[[], None] | None = None) -> ModeRound:
    """One request per rank, ``pause(mode)`` once they run, ``collective_rpc`` and a barrier
    while paused, resume; the hooks let a caller read the engine between those steps.

    ``tokens`` decides what a mode shows: long enough to be running at the pause (abort,
    keep), short enough to drain before it returns (wait)."""
    requests = [client.submit(tokens, r) for r in range(client.ranks)]
    try:
        await client.running(requests)
        await asyncio.sleep(settle)  # the wave's START_DP_WAVE exchange settles
        if before_pause is not None:
            before_pause()
        await client.pause(mode)
        paused = await client.is_paused()
        done_at_pause = [client.done(r) for r in requests]
        if while_paused is not None:
            while_paused()
        await client.collective_rpc()
        await client.barrier()
        if after_collectives is not None:
            after_collectives()
        await client.resume()
        outcomes = [await client.outcome(r) for r in requests]
    except BaseException:
        for r in requests:
            client.cancel(r)
        raise
    return ModeRound(mode, paused, done_at_pause, outcomes)


# ----------------------------------------------------------------------------------------------
# the CPU cluster's adapter
# ----------------------------------------------------------------------------------------------


class ClusterClient:
    """:class:`PauseClient` over the CPU cluster: its blocking calls run in a thread (each
    bounded by the cluster's ``hang_timeout``, a hang raising ``CollectiveHang``)."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.ranks = cluster.config.ranks
        self.barrier_timeout = cluster.config.hang_timeout

    def submit(self, tokens: int, rank: int) -> RequestHandle:
        return self.cluster.generate(tokens, rank=rank)

    async def running(self, requests: list[RequestHandle]) -> None:
        ranks = {r.rank for r in requests}
        deadline = time.monotonic() + self.cluster.config.hang_timeout
        while True:
            stats = await asyncio.to_thread(self.cluster.stats)
            if all(stats[r]["running"] for r in ranks):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"requests not running on ranks {sorted(ranks)}: {stats}")
            await asyncio.sleep(0.02)

    async def routed(self, request: RequestHandle) -> None:
        pass  # generate() hands the request to its rank's inbox before it returns

    def done(self, request: RequestHandle) -> bool:
        return request.future.done()

    async def outcome(self, request: RequestHandle) -> str:
        return await asyncio.to_thread(request.result, self.cluster.config.hang_timeout)

    def cancel(self, request: RequestHandle) -> None:
        pass  # a CPU request ends with its rank; nothing waits on it

    async def pause(self, mode: str) -> None:
        await asyncio.to_thread(self.cluster.pause, mode)

    async def is_paused(self) -> bool:
        return await asyncio.to_thread(self.cluster.is_paused)

    def barrier_on(self, rank: int) -> asyncio.Future:
        return asyncio.wrap_future(self.cluster.call(rank, "barrier"))

    async def barrier(self) -> None:
        await asyncio.to_thread(self.cluster.barrier)

    async def collective_rpc(self) -> None:
        sums = await asyncio.to_thread(self.cluster.collective_rpc, 1)
        if sums != [self.ranks] * self.ranks:
            raise AssertionError(f"collective_rpc returned a wrong sum: {sums}")

    async def resume(self) -> None:
        await asyncio.to_thread(self.cluster.resume)

    def hang(self, what: str, waiting: list[int]) -> Exception:
        return CollectiveHang(what, self.cluster.diagnose())


def upstream_deadlock_scenario(cluster: Cluster, routed_rank: int = 1,
                               first_wait: float = 1.0, second_wait: float = 2.0) -> str:
    """:func:`staggered_barrier` on the CPU cluster from synchronous code; the routed
    request's outcome."""
    result = asyncio.run(staggered_barrier(ClusterClient(cluster), routed_rank=routed_rank,
                                           first_wait=first_wait, gap=second_wait, tokens=4))
    if not result.paused:
        raise AssertionError("pause(keep) returned but not every rank reports paused")
    return result.routed


# ----------------------------------------------------------------------------------------------
# randomized schedules (CPU cluster)
# ----------------------------------------------------------------------------------------------


@dataclass
class PauseRecord:
    """What the client saw around one pause of a schedule, for :func:`check_schedule`."""

    mode: str
    before: list[RequestHandle]  # submitted before the pause was called
    done_at_call: dict[str, str]  # req_id -> outcome, finished when the pause was called
    done_at_return: dict[str, str]  # ... when the pause returned (every rank paused)
    done_at_resume: dict[str, str] = field(default_factory=dict)  # ... when resume was called
    running_at_return: list[int] = field(default_factory=list)  # per rank, scheduler running
    waiting_at_return: list[int] = field(default_factory=list)


@dataclass
class ScheduleResult:
    seed: int
    ranks: int
    handles: list[RequestHandle] = field(default_factory=list)
    ops: list[str] = field(default_factory=list)
    paused_waves: list[int] = field(default_factory=list)
    tokens: dict[str, int] = field(default_factory=dict)  # req_id -> tokens asked for
    pauses: list[PauseRecord] = field(default_factory=list)


def _done(handles: list[RequestHandle]) -> dict[str, str]:
    return {h.req_id: h.future.result()[0] for h in handles if h.future.done()}


def run_random_schedule(cluster: Cluster, seed: int, episodes: int = 3) -> ScheduleResult:
    """Pauses of every mode, resumes, START_DP_WAVE at any moment, barriers, collective RPCs
    and new requests, drawn from ``seed``. The schedule is valid client behaviour (barriers
    and RPCs only while paused, resume only after the pause returned), so with the two-phase
    protocol any hang is a protocol bug. What the client sees around each pause is recorded
    for :func:`check_schedule` (each mode's promise, not only liveness).

    A rank's replies and its finished requests travel one queue in order, so when a pause
    returns every request a rank finished before replying has been seen; snapshots of the
    finished requests at the pause's call, return and the resume are exact, not racy."""
    rng = random.Random(seed)
    n = cluster.config.ranks
    result = ScheduleResult(seed, n)

    def traffic(k: int) -> None:
        for _ in range(k):
            rank = rng.choice([None, rng.randrange(n)])
            tokens = rng.randint(1, 40)
            handle = cluster.generate(tokens, rank=rank)
            result.handles.append(handle)
            result.tokens[handle.req_id] = tokens
        result.ops.append(f"traffic({k})")

    def wave(paused: bool = False) -> None:
        stale = rng.random() < 0.3
        wave_no = max(0, cluster.current_wave - 1) if stale else None
        # as vLLM's coordinator sends it: no exclusion, or a client's engine identity bytes
        # (an integer exclusion only ever names the rank that started the wave itself)
        exclude = rng.choice([None, bytes([rng.randrange(n), 0])])
        inject_id = cluster.inject_start_dp_wave(wave_no, exclude)
        result.ops.append(f"start_dp_wave(stale={stale})")
        if paused:
            result.paused_waves.append(inject_id)

    for _ in range(episodes):
        traffic(rng.randint(0, 6))
        if rng.random() < 0.5:
            wave()
        time.sleep(rng.uniform(0, 0.01))
        mode = rng.choice(["abort", "wait", "keep"])
        order = list(range(n))
        rng.shuffle(order)
        stagger = rng.choice([0.0, 0.0, rng.uniform(0, 0.01)])
        result.ops.append(f"pause({mode}, order={order}, stagger={stagger:.3f})")
        if rng.random() < 0.3:
            wave()
        before = list(result.handles)
        done_at_call = _done(before)
        cluster.pause(mode, ranks=order, stagger=stagger)
        stats = cluster.stats()
        record = PauseRecord(mode, before, done_at_call, _done(before),
                             running_at_return=[s["running"] for s in stats],
                             waiting_at_return=[s["waiting"] for s in stats])
        result.pauses.append(record)
        for _ in range(rng.randint(0, 3)):
            op = rng.choice(["barrier", "rpc", "request", "wave", "staggered"])
            result.ops.append(op)
            if op == "barrier":
                cluster.barrier()
            elif op == "rpc":
                if cluster.collective_rpc(1) != [n] * n:
                    raise AssertionError("collective_rpc returned a wrong sum")
            elif op == "request":
                traffic(rng.randint(1, 2))
            elif op == "wave":
                wave(paused=True)
            else:
                tokens = rng.randint(1, 10)
                handle = asyncio.run(barrier_around_request(
                    ClusterClient(cluster), routed_rank=rng.randrange(1, n) if n > 1 else 0,
                    first_wait=rng.uniform(0, 0.02), gap=rng.uniform(0, 0.02), tokens=tokens))
                result.handles.append(handle)
                result.tokens[handle.req_id] = tokens
        if rng.random() < 0.3:
            wave(paused=True)
        # START_DP_WAVE may arrive at any moment of the pause, but not after the resume: the
        # coordinator only broadcasts with work behind it, and a wake-up that reaches a
        # non-zero rank after resume with no work is never propagated, in vLLM as here
        outcomes = cluster.wait_injected_waves()
        for inject_id in result.paused_waves:
            if set(outcomes[inject_id].values()) != {"ignored"}:
                raise AssertionError(f"START_DP_WAVE while paused was not ignored by every rank: "
                                     f"{outcomes[inject_id]}")
        result.paused_waves.clear()
        record.done_at_resume = _done(result.handles)
        cluster.resume()
        result.ops.append("resume")
    return result


def check_schedule(cluster: Cluster, result: ScheduleResult, timeout: float = 30.0) -> None:
    """Liveness: every request finished exactly once, ranks agree on sync rounds and go idle.
    Semantics, each pause mode's promise:

    - abort aborts: when the pause returns, nothing submitted before it is left (no rank
      runs or queues a request) and what was in flight at the call finished then;
    - wait drains: when the pause returns, no rank is running a request;
    - keep keeps: a request in flight survives the pause and completes after the resume;
    - and in every mode nothing finishes while paused, a request is aborted only by an
      abort pause it was in flight for, and a completed request got all its tokens.
    """
    where = f"(seed {result.seed}, DP {result.ranks}; replay with IC_SEED={result.seed})"
    deadline = time.monotonic() + timeout
    final: dict[str, tuple[str, int]] = {}
    for handle in result.handles:
        outcome, tokens = handle.future.result(timeout=max(0.1, deadline - time.monotonic()))
        if outcome not in ("completed", "aborted"):
            raise AssertionError(f"request {handle.req_id}: outcome {outcome!r} {where}")
        outcomes = cluster.finished.get(handle.req_id, [])
        if len(outcomes) != 1:
            raise AssertionError(f"request {handle.req_id} finished {len(outcomes)} times: "
                                 f"{outcomes} {where}")
        final[handle.req_id] = (outcome, tokens)
        asked = result.tokens[handle.req_id]
        if outcome == "completed" and tokens != asked:
            raise AssertionError(f"request {handle.req_id} completed with {tokens} of {asked} "
                                 f"tokens {where}")
        if outcome == "aborted" and tokens >= asked:
            raise AssertionError(f"request {handle.req_id} aborted after all its {asked} "
                                 f"tokens {where}")
    abortable: set[str] = set()
    for i, p in enumerate(result.pauses):
        what = f"pause {i + 1} ({p.mode})"
        in_flight = [h.req_id for h in p.before if h.req_id not in p.done_at_call]
        late = sorted(set(p.done_at_resume) - set(p.done_at_return))
        if late:
            raise AssertionError(f"{what}: requests {late} finished while paused {where}")
        if p.mode == "abort":
            left = [r for r in in_flight if r not in p.done_at_return]
            if left or any(p.running_at_return) or any(p.waiting_at_return):
                raise AssertionError(
                    f"{what} returned with requests left: {left} unfinished, running "
                    f"{p.running_at_return}, waiting {p.waiting_at_return} per rank {where}")
            abortable.update(in_flight)
        elif p.mode == "wait" and any(p.running_at_return):
            raise AssertionError(f"{what} returned before draining: running "
                                 f"{p.running_at_return} per rank {where}")
    for req_id, (outcome, _) in final.items():
        if outcome == "aborted" and req_id not in abortable:
            modes = [p.mode for p in result.pauses
                     if req_id in {h.req_id for h in p.before} and req_id not in p.done_at_call]
            raise AssertionError(f"request {req_id} was aborted, but no abort pause had it in "
                                 f"flight (pauses it was in flight for: {modes}) {where}")
    while True:
        stats = cluster.stats()
        rounds = {s["sync_rounds"] for s in stats}
        if len(rounds) == 1 and not any(s["engines_running"] for s in stats):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"ranks disagree on sync rounds or never went idle: "
                                 f"{stats} {where}; ops: {result.ops}")
        time.sleep(0.005)
