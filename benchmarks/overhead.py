"""Section 1: hot-path overhead of the probe, instrumented vs telemetry off.

(a) Steps per second of the real CPU cluster (Gloo, ``step_seconds=0`` so that nothing but
    the engine loop, its collectives and the probe costs time) with telemetry on vs off, both
    clusters up at once and their bursts alternated to cancel drift.
(b) The probe calls alone: what a non-sync step and a sync round call on the probe, with a
    ``TelemetryProbe`` (real ``RankMetrics`` + tracer provider exporting to a JSON-lines file)
    vs ``NULL_PROBE``, next to the library floor (a pre-bound prometheus_client counter
    ``inc()``, an OpenTelemetry SDK span start/end) and a real 2-process Gloo all-reduce of
    the 2-int sync tensor, all measured in this run.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import time
from pathlib import Path

from benchmarks.common import (
    emit,
    interleaved,
    log,
    median,
    per_call_seconds,
    percentile,
    start_clusters,
    stop_clusters,
    tempdir,
)

STEP_GOAL_US = 2.0
STEP_GOAL_FRACTION = 0.01
SYNC_GOAL_FRACTION = 0.05


# -- (b) micro-benchmark ----------------------------------------------------------------------

def make_probe(tmpdir: str, rank: int = 0, dp_size: int = 4):
    """A TelemetryProbe wired as a rank wires it: own registry, file span exporter."""
    from prometheus_client import CollectorRegistry

    from instrumented_core.protocol import PauseStateMachine
    from instrumented_core.telemetry import TelemetryConfig
    from instrumented_core.telemetry.metrics import RankMetrics
    from instrumented_core.telemetry.probe import TelemetryProbe
    from instrumented_core.telemetry.tracing import make_tracer_provider

    config = TelemetryConfig(metrics_port_base=0, span_exporter="file",
                             spans_file=str(Path(tmpdir) / f"spans-{rank}.jsonl"))
    registry = CollectorRegistry()
    metrics = RankMetrics(registry, rank, config.model_name, {"dp_size": str(dp_size)})
    holder: list = []
    provider = make_tracer_provider(config, rank, dp_size, lambda c: holder[0].dropped(c))
    probe = TelemetryProbe(rank, dp_size, metrics, provider, group_key="bench",
                           model_name=config.model_name)
    holder.append(probe)
    sm = PauseStateMachine(rank, dp_size, 16, probe=probe)  # calls probe.attach(sm)
    return probe, sm, registry


def micro(quick: bool) -> dict:
    from opentelemetry.sdk.trace import TracerProvider
    from prometheus_client import CollectorRegistry, Counter, Histogram

    from instrumented_core.protocol import SyncResult
    from instrumented_core.telemetry.probe import MAX_SYNC_ROUND_EVENTS, NULL_PROBE

    number = 20_000 if quick else 100_000
    rounds = 5 if quick else 11
    tmp = tempdir(prefix="bench-micro-")
    probe, sm, _ = make_probe(tmp)
    result = SyncResult(True, 0, 4)

    def step_calls(p):
        def run():
            p.collective_begin("step")
            p.collective_end("step", 0.0001)
            p.step_end(True)
        return run

    def sync_calls(p):
        def run():
            p.sync_begin(True, False)
            p.sync_end(result, 0.0001)
        return run

    reg = CollectorRegistry()
    counter = Counter("bench_floor", "floor", ["engine"], registry=reg).labels(engine="0")
    hist = Histogram("bench_floor_h", "floor", ["engine"], registry=reg).labels(engine="0")
    tracer = TracerProvider().get_tracer("bench")  # SDK tracer, no processor: pure SDK cost

    def span_run():
        tracer.start_span("floor").end()

    def empty():
        pass

    cands = {
        "empty": lambda: per_call_seconds(empty, number),
        "null_step": lambda: per_call_seconds(step_calls(NULL_PROBE), number),
        "tel_step": lambda: per_call_seconds(step_calls(probe), number),
        "null_sync": lambda: per_call_seconds(sync_calls(NULL_PROBE), number),
        "tel_sync": lambda: per_call_seconds(sync_calls(probe), number),
        "counter_inc": lambda: per_call_seconds(counter.inc, number),
        "histogram_observe": lambda: per_call_seconds(lambda: hist.observe(0.001), number),
        "otel_span": lambda: per_call_seconds(span_run, max(2000, number // 10)),
    }
    times = {k: median(v) * 1e6 for k, v in interleaved(cands, rounds).items()}

    # A sync round while a pause is pending is also kept for the pending span, which makes it
    # a span event when the phase changes: that part is timed per round on its own.
    sm.request_pause("keep", True)
    pending = interleaved({
        "null_sync": lambda: per_call_seconds(sync_calls(NULL_PROBE), number // 4),
        "tel_sync_pending": lambda: per_call_seconds(sync_calls(probe), number // 4),
    }, rounds)

    def events_at_phase_change() -> float:
        run = sync_calls(probe)
        for _ in range(MAX_SYNC_ROUND_EVENTS):
            run()
        started = time.perf_counter()
        probe._record_sync_rounds()
        return (time.perf_counter() - started) / MAX_SYNC_ROUND_EVENTS

    times["sync_event_at_phase_change"] = median(
        [events_at_phase_change() for _ in range(rounds * 4)]) * 1e6
    probe.shutdown()
    times["tel_sync_pending"] = median(pending["tel_sync_pending"]) * 1e6
    times["null_sync_pending_ref"] = median(pending["null_sync"]) * 1e6
    log("micro: " + ", ".join(f"{k}={v:.3f}us" for k, v in times.items()))
    return times


# -- Gloo collectives: the 2-int sync all-reduce, the MoE dispatch all-gather ------------------

#: What ``GlooAllReduce`` can time: the sync tensor's all-reduce (vLLM's ``sync_dp_state``), and
#: an all-gather of 64 floats (the MoE dispatch primitive on CPU, for the worker board's goal).
GLOO_OPS = ("all_reduce_2int", "all_gather_64f")


def _allreduce_worker(rank: int, world: int, port: int, number: int, go, out,
                      op: str = "all_reduce_2int") -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    if op == "all_gather_64f":
        tensor = torch.ones(64, dtype=torch.float32)
        gathered = [torch.empty_like(tensor) for _ in range(world)]

        def collective() -> None:
            dist.all_gather(gathered, tensor)
    else:
        tensor = torch.tensor([1, 0], dtype=torch.int32)

        def collective() -> None:
            dist.all_reduce(tensor)
    out.put(("ready", rank))
    if not go.wait(300):
        return
    for _ in range(200):
        collective()
    samples = []
    for _ in range(number):
        t0 = time.perf_counter()
        collective()
        samples.append(time.perf_counter() - t0)
    dist.barrier()
    if rank == 0:
        out.put(("samples", samples))
    dist.destroy_process_group()


class GlooAllReduce:
    """Two processes with a Gloo group, started early (start-up overlaps other start-ups);
    they run the timed collectives (``op``, one of ``GLOO_OPS``) only on ``measure()``, when
    the machine is otherwise idle."""

    def __init__(self, quick: bool, world: int = 2, op: str = "all_reduce_2int") -> None:
        from instrumented_core.cluster.client import free_port

        if op not in GLOO_OPS:
            raise ValueError(f"op must be one of {GLOO_OPS}, not {op!r}")
        ctx = mp.get_context("spawn")
        self.go = ctx.Event()
        self.out = ctx.Queue()
        self.world = world
        self.op = op
        self._ready = 0
        number = 1000 if quick else 5000
        port = free_port()
        self.procs = [ctx.Process(target=_allreduce_worker,
                                  args=(r, world, port, number, self.go, self.out, op),
                                  daemon=True)
                      for r in range(world)]
        for p in self.procs:
            p.start()

    def wait_ready(self, timeout: float = 90.0) -> None:
        """Block until every process has joined the group; they then idle until measure()."""
        deadline = time.monotonic() + timeout
        try:
            while self._ready < self.world:
                kind, _ = self.out.get(timeout=max(0.1, deadline - time.monotonic()))
                self._ready += kind == "ready"
        except queue.Empty:
            self.close()
            raise RuntimeError(f"Gloo {self.op} processes did not start in time") from None

    def measure(self, timeout: float = 90.0) -> dict:
        try:
            deadline = time.monotonic() + timeout
            self.wait_ready(timeout)
            self.go.set()
            kind, samples = self.out.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            raise RuntimeError(f"Gloo {self.op} benchmark produced no samples in time") from None
        finally:
            self.close()
        us = [x * 1e6 for x in samples]
        return {"p50": percentile(us, 50), "p99": percentile(us, 99),
                "mean": sum(us) / len(us), "n": len(us)}

    def close(self) -> None:
        for p in self.procs:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join(2)


# -- (a) steps per second on the cluster -------------------------------------------------------

def burst_rate(cluster, tokens: int, timeout: float = 60.0) -> float:
    """Steps per second of one burst: every rank gets one request of ``tokens`` steps."""
    ranks = cluster.config.ranks
    started = time.perf_counter()
    handles = [cluster.generate(tokens, rank=r) for r in range(ranks)]
    for h in handles:
        h.result(timeout)
    elapsed = time.perf_counter() - started
    time.sleep(0.05)  # let the wave end before the next burst
    return tokens / elapsed


def telemetry_on(tmpdir: str, **kw):
    from instrumented_core.telemetry import TelemetryConfig

    kw.setdefault("span_exporter", "file")
    kw.setdefault("spans_file", str(Path(tmpdir) / "spans.jsonl"))
    return TelemetryConfig(enabled=True, metrics_port_base=0, **kw)


def cluster_rates(ranks: int, quick: bool, while_idle=None) -> dict:
    from instrumented_core.cluster import ClusterConfig
    from instrumented_core.telemetry import TelemetryConfig

    tokens = 500 if quick else (1500 if ranks == 2 else 800)
    reps = 3 if quick else 8
    tmp = tempdir(prefix=f"bench-dp{ranks}-")
    base = dict(ranks=ranks, step_seconds=0.0, hang_timeout=60.0)
    off_cfg = ClusterConfig(telemetry=TelemetryConfig(enabled=False), **base)
    on_cfg = ClusterConfig(telemetry=telemetry_on(tmp), **base)
    clusters = start_clusters([off_cfg, on_cfg])
    off, on = clusters
    try:
        for c in clusters:  # warm up: the first wave pays Gloo connection set-up
            burst_rate(c, 100)
        if while_idle is not None:
            while_idle()  # both clusters up and idle: a quiet moment for other measurements
        rates = interleaved({"off": lambda: burst_rate(off, tokens),
                             "on": lambda: burst_rate(on, tokens)}, reps)
    finally:
        stop_clusters(clusters)
    return {"off": median(rates["off"]), "on": median(rates["on"]),
            "off_all": rates["off"], "on_all": rates["on"], "tokens": tokens}


# -- section ----------------------------------------------------------------------------------

def run(quick: bool) -> dict:
    """Emit every overhead figure; returns the numbers other sections reuse."""
    gloo = GlooAllReduce(quick)
    measured: dict = {}

    def quiet_measurements() -> None:
        log("overhead: micro-benchmark of the probe calls")
        measured["micro"] = micro(quick)
        log("overhead: 2-process Gloo all-reduce of the 2-int sync tensor")
        measured["allreduce"] = gloo.measure()
        ar = measured["allreduce"]
        log(f"overhead: all-reduce p50 {ar['p50']:.1f} us, p99 {ar['p99']:.1f} us")

    rates = {}
    try:
        for ranks in ((2,) if quick else (2, 4, 8)):
            log(f"overhead: cluster steps/s at DP {ranks}, telemetry on vs off (alternating)")
            rates[ranks] = cluster_rates(ranks, quick,
                                         quiet_measurements if ranks == 2 else None)
    finally:
        gloo.close()
    t, ar = measured["micro"], measured["allreduce"]
    for ranks, r in rates.items():
        emit(f"overhead.cluster.dp{ranks}.steps_per_second", "steps/s", baseline=r["off"],
             instrumented=r["on"], ratio=r["on"] / r["off"],
             added_us_per_step=(1 / r["on"] - 1 / r["off"]) * 1e6,
             runs_per_side=len(r["off_all"]), steps_per_run=r["tokens"],
             paired_ratio_median=median([a / b for a, b in zip(r["on_all"], r["off_all"])]),
             baseline_runs=[round(x) for x in r["off_all"]],
             instrumented_runs=[round(x) for x in r["on_all"]],
             note="CPU cluster, step_seconds=0 (collective + loop only), every rank real steps, "
                  "sync every 16 steps; median of alternated runs; baseline = telemetry off "
                  "(NULL_PROBE), instrumented = TelemetryProbe + /metrics + file spans")

    step_added = t["tel_step"] - t["null_step"]
    sync_added = t["tel_sync"] - t["null_sync"]
    sync_pending_added = t["tel_sync_pending"] - t["null_sync_pending_ref"]
    uninstrumented_step_us = 1e6 / rates[2]["off"]
    emit("overhead.micro.probe_per_nonsync_step", "us", baseline=t["null_step"],
         instrumented=t["tel_step"], added_us=step_added,
         calls="collective_begin + collective_end + step_end",
         note="per non-sync step, loop overhead included on both sides")
    emit("overhead.micro.probe_per_sync_round", "us", baseline=t["null_sync"],
         instrumented=t["tel_sync"], added_us=sync_added, calls="sync_begin + sync_end")
    emit("overhead.micro.probe_per_sync_round_while_pending", "us",
         baseline=t["null_sync_pending_ref"], instrumented=t["tel_sync_pending"],
         added_us=sync_pending_added,
         calls="sync_begin + sync_end with a pending pause (keeps the round for the span)")
    emit("overhead.micro.sync_round_event_at_phase_change", "us",
         value=t["sync_event_at_phase_change"],
         note="per kept round (at most 128 per phase), paid when the pending span gets another "
              "event or ends, not in the sync round")
    emit("overhead.floor.counter_inc", "us", value=t["counter_inc"],
         histogram_observe_us=t["histogram_observe"], empty_call_us=t["empty"],
         note="bare prometheus_client Counter.inc() on a pre-bound child, per call")
    emit("overhead.floor.otel_span_start_end", "us", value=t["otel_span"],
         note="OpenTelemetry SDK span start + end, no processor")
    emit("overhead.micro.step_added_vs_counter_inc", "us", baseline=t["counter_inc"],
         instrumented=step_added,
         note="probe's added cost per non-sync step in units of one bare counter inc()")
    emit("overhead.micro.sync_added_vs_otel_span", "us", baseline=t["otel_span"],
         instrumented=sync_added,
         note="probe's added cost per sync round vs one OTel span start/end")
    emit("overhead.gloo_allreduce_2int.dp2", "us", value=ar["p50"], p99_us=ar["p99"],
         mean_us=ar["mean"], n=ar["n"], note="2 processes, loopback, torch.distributed Gloo")

    met_step_abs = step_added < STEP_GOAL_US
    met_step_rel = step_added < STEP_GOAL_FRACTION * uninstrumented_step_us
    emit("goal.step_overhead_under_1pct_and_2us", "us", baseline=uninstrumented_step_us,
         instrumented=step_added, ratio=step_added / uninstrumented_step_us,
         goal="added < 1% of an uninstrumented step and < 2 us",
         goal_met=bool(met_step_abs and met_step_rel), under_2us=bool(met_step_abs),
         under_1pct=bool(met_step_rel),
         note="baseline = uninstrumented DP 2 cluster step (step_seconds=0, the cheapest "
              "possible step); instrumented = micro-benchmarked added probe cost per step")
    for label, added in (("", sync_added), ("_while_pending", sync_pending_added)):
        emit(f"goal.sync_round_overhead_under_5pct_of_allreduce{label}", "us",
             baseline=ar["p50"], instrumented=added, ratio=added / ar["p50"],
             goal="added < 5% of a Gloo 2-int all-reduce (p50, DP 2)",
             goal_met=bool(added < SYNC_GOAL_FRACTION * ar["p50"]))
    return {"rates": rates, "allreduce": ar, "micro": t}
