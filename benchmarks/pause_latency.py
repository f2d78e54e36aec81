"""Section 3: pause latency, fixed vs adaptive sync cadence, same seeds, one run.

Latency is counted from the LAST rank's pause request to consensus (the step whose sync
all-reduce shows every rank's vote), in steps (the consensus step included) and seconds.

SIMULATION (``pause_latency.sim.*``): the real ``PauseStateMachine`` of every rank, driven in
deterministic lockstep in one process; each step, every rank asks ``next_call_syncs()`` (the
benchmark asserts they agree: no mismatched collectives), the SUM all-reduce is computed from
what each rank contributes, and each rank's ``has_global_unfinished_reqs`` runs on it. Pause
requests reach the ranks at the start of random steps: a window of W steps starts at a
uniformly random point of the sync interval (mid-wave), and each rank's request lands on an
independent uniformly random step of that window. W = 1 step: all ranks get the fan-out at
the same step; W = one interval: requests spread over an interval (slow fan-out, staggered
callers), so they often fall on both sides of a sync round. Seconds = steps x the step time
measured on the real cluster in the same run.

REAL CLUSTER (``pause_latency.cluster.*``): a DP cluster of real processes and Gloo, 1 ms model
time per step, a long request on every rank, repeated ``pause("keep", stagger=s)`` with random
``s`` (total spread up to one interval) after a random delay, then ``resume()``. Per pause the
latency is read from the ranks' own ``vllm_dp_pause_consensus_{latency_seconds,steps}``
histograms over HTTP (per-rank deltas; the last requester is the rank that waited least).
"""

from __future__ import annotations

import random
import time

from benchmarks.common import emit, log, median, percentile, start_clusters, stop_clusters, tempdir

SEED = 20240607


# -- simulation -------------------------------------------------------------------------------

class MismatchedCollectives(AssertionError):
    pass


def simulate_pause(cadence: str, dp: int, interval: int, window: int,
                   rng: random.Random) -> dict:
    from instrumented_core.protocol import PauseStateMachine, Phase, encode_sync_state

    sms = [PauseStateMachine(r, dp, interval, cadence=cadence) for r in range(dp)]
    for sm in sms:
        sm.engines_running = True
    start = interval + 1 + rng.randrange(interval)  # mid-wave, uniform phase in the interval
    arrivals = [start + rng.randrange(window) for _ in range(dp)]
    first, last = min(arrivals), max(arrivals)
    rounds_in_window = 0
    step = 0
    while True:
        step += 1
        for r, sm in enumerate(sms):
            if arrivals[r] == step:
                sm.request_pause("keep", True)
        syncs = {sm.next_call_syncs() for sm in sms}
        if len(syncs) != 1:
            raise MismatchedCollectives(f"ranks disagree on syncing at step {step}")
        # keep mode: a rank with its pause requested reports no unfinished work
        local = [sm.phase is Phase.RUNNING for sm in sms]
        contrib = [encode_sync_state(local[r], sm.pending_pause) for r, sm in enumerate(sms)]
        summed = [sum(c[i] for c in contrib) for i in range(2)]

        def all_reduce(values, r):
            if values != contrib[r]:
                raise MismatchedCollectives(f"rank {r} contributed {values}, expected {contrib[r]}")
            return summed

        for r, sm in enumerate(sms):
            sm.has_global_unfinished_reqs(local[r], lambda v, r=r: all_reduce(v, r))
        if syncs == {True} and step >= first:
            rounds_in_window += 1
        if all(sm.phase is Phase.PAUSED for sm in sms):
            break
        if step > start + window + 4 * interval:
            raise AssertionError("no consensus")
    if len({sm.sync_rounds for sm in sms}) != 1:
        raise MismatchedCollectives("ranks disagree on the sync round count")
    return {"from_last": step - last + 1, "from_first": step - first + 1,
            "rounds": rounds_in_window}


def simulate(cadence: str, dp: int, interval: int, window: int, pauses: int,
             seed: int) -> dict:
    rng = random.Random(seed)
    runs = [simulate_pause(cadence, dp, interval, window, rng) for _ in range(pauses)]
    return {k: [r[k] for r in runs] for k in runs[0]}


def run_simulation(quick: bool, step_seconds: float | None, step_source: str = "") -> None:
    pauses = 500 if quick else 5000
    dp = 4
    for interval in (16, 32):
        for label, window in (("same_step", 1), ("spread_one_interval", interval)):
            out = {c: simulate(c, dp, interval, window, pauses, SEED)
                   for c in ("fixed", "adaptive")}
            f, a = out["fixed"], out["adaptive"]
            p99f, p99a = percentile(f["from_last"], 99), percentile(a["from_last"], 99)
            goal = interval + 2
            sec = (lambda steps: steps * step_seconds) if step_seconds else (lambda steps: None)
            base = f"pause_latency.sim.dp{dp}.interval{interval}.{label}"
            emit(base + ".steps_from_last_request.p99", "steps", baseline=p99f, instrumented=p99a,
                 p50_fixed=percentile(f["from_last"], 50),
                 p50_adaptive=percentile(a["from_last"], 50),
                 max_fixed=max(f["from_last"]), max_adaptive=max(a["from_last"]),
                 seconds_p50_fixed=sec(percentile(f["from_last"], 50)),
                 seconds_p50_adaptive=sec(percentile(a["from_last"], 50)),
                 seconds_p99_fixed=sec(p99f), seconds_p99_adaptive=sec(p99a),
                 seconds_per_step=step_seconds, seconds_per_step_from=step_source,
                 pauses=pauses, seed=SEED, window_steps=window,
                 goal=f"adaptive p99 <= interval + 2 steps = {goal}",
                 goal_met=bool(p99a <= goal), kind="simulation",
                 note="baseline = fixed cadence (vLLM), instrumented = adaptive; same seeds")
            emit(base + ".steps_from_first_request.p99", "steps",
                 baseline=percentile(f["from_first"], 99),
                 instrumented=percentile(a["from_first"], 99),
                 p50_fixed=percentile(f["from_first"], 50),
                 p50_adaptive=percentile(a["from_first"], 50), pauses=pauses, seed=SEED,
                 kind="simulation")
            mf, ma = sum(f["rounds"]) / pauses, sum(a["rounds"]) / pauses
            emit(base + ".sync_rounds_per_pause", "all-reduces", baseline=mf, instrumented=ma,
                 extra_allreduces_per_pause=ma - mf, p99_fixed=percentile(f["rounds"], 99),
                 p99_adaptive=percentile(a["rounds"], 99), pauses=pauses, seed=SEED,
                 kind="simulation",
                 note="sync all-reduces from the first pause request to consensus (inclusive)")


# -- real cluster -----------------------------------------------------------------------------

def _hist_deltas(before, after):
    from instrumented_core.telemetry import names as n

    out = []
    for b, a in zip(before, after):
        def d(name):
            return (a.get(name, 0.0) or 0.0) - (b.get(name, 0.0) or 0.0)
        out.append({"seconds": d(n.PAUSE_CONSENSUS_LATENCY + "_sum"),
                    "steps": d(n.PAUSE_CONSENSUS_STEPS_TOTAL),
                    "count": d(n.PAUSE_CONSENSUS_LATENCY + "_count"),
                    "rounds": d(n.SYNC_WAIT_COUNT)})
    return out


def cluster_pauses(cluster, pauses: int, seed: int, step_s: float, interval: int) -> dict:
    from instrumented_core.scrape import scrape_all

    rng = random.Random(seed)
    dp = cluster.config.ranks
    urls = cluster.metrics_urls
    handles = [cluster.generate(10_000_000, rank=r) for r in range(dp)]
    res = {"from_last_s": [], "from_last_steps": [], "from_first_s": [], "rounds": [],
           "skipped": 0}
    try:
        time.sleep(0.2)
        for _ in range(pauses):
            time.sleep(rng.uniform(0.02, 0.02 + interval * step_s))
            stagger = rng.uniform(0, interval * step_s / max(1, dp - 1))
            before = scrape_all(urls)
            cluster.pause("keep", stagger=stagger, timeout=30)
            after = scrape_all(urls)
            deltas = _hist_deltas(before, after)
            if any(abs(d["count"] - 1) > 1e-9 for d in deltas):
                res["skipped"] += 1
            else:
                last = min(deltas, key=lambda d: d["seconds"])
                res["from_last_s"].append(last["seconds"])
                res["from_last_steps"].append(last["steps"])
                res["from_first_s"].append(max(d["seconds"] for d in deltas))
                res["rounds"].append(deltas[0]["rounds"])
            cluster.resume(timeout=30)
    finally:
        cluster.pause("abort", timeout=30)
        for h in handles:
            h.result(10)
    return res


def run_cluster(quick: bool) -> float:
    """Returns the measured seconds per step (telemetry on, 1 ms model time)."""
    from benchmarks.overhead import burst_rate, telemetry_on
    from instrumented_core.cluster import ClusterConfig

    dp = 2 if quick else 4
    pauses = 12 if quick else 40
    interval = 16
    tmp = tempdir(prefix="bench-pause-")
    cfgs = [ClusterConfig(ranks=dp, cadence=c, sync_interval=interval, step_seconds=0.001,
                          hang_timeout=60, telemetry=telemetry_on(f"{tmp}/{c}"))
            for c in ("fixed", "adaptive")]
    log(f"pause latency: real DP {dp} clusters, fixed and adaptive, {pauses} pauses each")
    clusters = start_clusters(cfgs)
    try:
        step_s = 1 / median([burst_rate(c, 300) for c in clusters for _ in range(2)])
        out = {}
        for cadence, cluster in zip(("fixed", "adaptive"), clusters):
            out[cadence] = cluster_pauses(cluster, pauses, SEED, step_s, interval)
    finally:
        stop_clusters(clusters)
    f, a = out["fixed"], out["adaptive"]
    base = f"pause_latency.cluster.dp{dp}.interval{interval}"
    common = dict(kind="real cluster", pauses=len(f["from_last_s"]), seed=SEED,
                  skipped_fixed=f["skipped"], skipped_adaptive=a["skipped"],
                  seconds_per_step=step_s)
    emit(base + ".seconds_from_last_request.p99", "s",
         baseline=percentile(f["from_last_s"], 99), instrumented=percentile(a["from_last_s"], 99),
         p50_fixed=percentile(f["from_last_s"], 50), p50_adaptive=percentile(a["from_last_s"], 50),
         **common, note="random stagger: all requests spread over up to one interval")
    p99a = percentile(a["from_last_steps"], 99)
    emit(base + ".steps_from_last_request.p99", "steps",
         baseline=percentile(f["from_last_steps"], 99), instrumented=p99a,
         p50_fixed=percentile(f["from_last_steps"], 50),
         p50_adaptive=percentile(a["from_last_steps"], 50),
         goal=f"adaptive p99 <= interval + 2 steps = {interval + 2}",
         goal_met=bool(p99a <= interval + 2), **common)
    emit(base + ".seconds_from_first_request.p99", "s",
         baseline=percentile(f["from_first_s"], 99), instrumented=percentile(a["from_first_s"], 99),
         p50_fixed=percentile(f["from_first_s"], 50),
         p50_adaptive=percentile(a["from_first_s"], 50),
         **common)
    emit(base + ".sync_rounds_per_pause", "all-reduces",
         baseline=sum(f["rounds"]) / max(1, len(f["rounds"])),
         instrumented=sum(a["rounds"]) / max(1, len(a["rounds"])), **common,
         note="sync rounds between the scrape just before pause() and consensus (includes "
              "rounds before the first request arrived)")
    return step_s


def run(quick: bool, fallback_step_seconds: float | None = None) -> None:
    """Full: real clusters then the simulation (seconds from the clusters' step time).
    Quick: the simulation only, seconds from ``fallback_step_seconds``."""
    if quick:
        step_s, source = fallback_step_seconds, "DP 2 instrumented cluster, step_seconds=0"
    else:
        step_s, source = run_cluster(quick), "DP 4 pause-latency cluster, 1 ms model time"
    log("pause latency: lockstep simulation, fixed vs adaptive, same seeds")
    run_simulation(quick, step_s, source)
