"""Randomized valid client schedules on the CPU cluster, and what each must keep (test-only).

Waves at any moment, every pause mode, barriers, RPCs and requests, drawn from a seed:
:func:`run_random_schedule` runs one; :func:`check_schedule` asserts liveness and each pause
mode's promise (abort aborts, wait drains before the pause returns, keep keeps and finishes
after the resume). The scripted scenarios the product's demos run are in
``instrumented_core.scenarios``.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field

from instrumented_core.cluster.client import Cluster, RequestHandle
from instrumented_core.scenarios import ClusterClient, barrier_around_request

__all__ = ["PauseRecord", "ScheduleResult", "check_schedule", "run_random_schedule"]




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
