"""The client schedules every engine runs: written once, driven through a small client adapter.

The same steps run on the CPU reference cluster and on vLLM's real DP engine, so the tests,
both demos and the fidelity comparison exercise one script, not copies that drift apart:

- :func:`staggered_barrier`: vLLM's ``test_dp_pause_barrier_request_deadlock`` (pause keep,
  ``barrier`` on engine 0 only, a request routed to another engine, ``barrier`` on the others,
  a barrier on all, resume);
- :func:`pause_mode_round`: requests on every rank, ``pause(mode)``, ``collective_rpc`` and a
  barrier while paused, resume;

The randomized schedules the tests run on the CPU cluster live with the other test-only code,
in ``instrumented_core_testing.schedules`` (not in the production wheel).

A scenario talks to an engine through :class:`PauseClient` (async, so the vLLM front end's
event loop keeps serving while a scenario waits). :class:`ClusterClient` adapts the CPU
cluster; ``instrumented_core.vllm_support.engine.VllmClient`` adapts ``AsyncLLM``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from instrumented_core.cluster.client import Cluster, CollectiveHang, RequestHandle

__all__ = [
    "ClusterClient",
    "ModeRound",
    "Narrator",
    "PauseClient",
    "ScenarioHang",
    "StaggeredResult",
    "barrier_around_request",
    "bounded",
    "pause_mode_round",
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
