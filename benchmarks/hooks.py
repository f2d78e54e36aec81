"""Section 7: the vLLM hooks' hot-path cost: the engine-step wrapper and the worker board.

Every real vLLM engine step now goes through the instrumentor's step wrapper, and in the
worker processes every engine-to-worker call and every DP/EP model collective of the forward
writes the worker board. Both are installed here the way vLLM gets them, through the public
seams, against fake vLLM modules (no vLLM needed): ``VllmDpInstrumentor().instrument()`` with a
fake ``DPEngineCoreProc`` whose engine carries a real ``EngineObserver`` and ``TelemetryProbe``,
and ``worker_hooks.install()`` with a fake ``WorkerProc`` / ``GroupCoordinator`` writing a real
board record (an mmap in a scratch directory). Each installed wrapper is timed around a no-op
original against the bare original, calls interleaved to cancel drift:

(a) the step wrapper's added cost per engine step;
(b) the worker board per model collective and per engine-to-worker call (the bare
    ``BoardWriter`` pairs and the whole hook), against a real 2-process Gloo ``all_gather`` of
    64 floats (the MoE dispatch primitive on CPU) measured in the same run;
(c) one worker-side forward as vLLM runs the tiny model here (calls and model collectives per
    engine step: measured on the real engine when the ``vllm`` section ran in this invocation,
    else ``CALLS_PER_STEP`` / ``COLLECTIVES_PER_STEP``), against that run's uninstrumented vLLM
    step, else against its model collectives alone (``COLLECTIVES_PER_STEP`` x the Gloo
    all-gather: a lower bound of the step);
(d) one scrape of the worker board (``read_board`` and the ``/metrics`` collector) with 8 live
    worker processes' records: paid by the engine core's metrics thread, not by any step;
(e) the flight recorder (issue 14) behind the probe, its ring full (every append evicts): its
    work per non-sync step (the step count) against the step of (c), and per sync round (the
    sequence number and two ring events) against a real 2-process Gloo all-reduce of the 2 ints
    ``sync_dp_state`` reduces, measured in the same run.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import time
import types
from typing import TYPE_CHECKING, Any

from benchmarks.common import emit, interleaved, log, median, per_call_seconds, tempdir

if TYPE_CHECKING:
    from typing import Self  # Python 3.11+; annotations are not evaluated

STEP_GOAL_US = 2.0
STEP_GOAL_FRACTION = 0.01
COLLECTIVE_GOAL_US = 2.0
COLLECTIVE_GOAL_FRACTION = 0.05
#: A decode step of the tiny model on the real DP=2 engine, as the ``vllm`` section measured it
#: (``vllm.dp2.worker_hooks_per_engine_step``): execute_model + sample_tokens, and the model
#: collectives its workers enter. Used only when the ``vllm`` section did not run.
CALLS_PER_STEP = 2
COLLECTIVES_PER_STEP = 5
BOARD_WORKERS = 8


# -- (a) the engine-step wrapper ----------------------------------------------------------------

def _fake_engine_vllm() -> tuple[Any, type]:
    """A fake vLLM 0.32 with the names the instrumentor's contract checks; no-op methods."""
    import enum

    from instrumented_core.vllm_support import contract

    class EngineCoreRequestType(enum.Enum):
        START_DP_WAVE = b"\x02"

    def noop(self, *args, **kwargs):
        return None

    def step(self):
        return None

    body = {name: noop for name in contract.ENGINE_METHODS + contract.ENGINE_REQUIRED_ONLY}
    body.update(step=step, step_with_batch_queue=step)

    def __init__(self):
        self.step_fn = self.step  # bound once, as EngineCore.__init__ does
        for name in contract.ENGINE_ATTRIBUTES:
            setattr(self, name, 0)
        self.pending_pause = self.ignore_start_dp_wave = False
        self.engines_running = True
        self.dp_sync_interval, self.dp_size, self.dp_rank = 16, 2, 0
        self.scheduler = types.SimpleNamespace(get_request_counts=lambda: (2, 0))

    body["__init__"] = __init__
    engine_cls = type("DPEngineCoreProc", (), body)
    pc_cls = type("ParallelConfig", (), {
        "has_unfinished_dp": staticmethod(lambda group, unfinished: unfinished),
        "sync_dp_state": staticmethod(lambda *args, **kwargs: (False, False))})
    modules = {
        "vllm": types.SimpleNamespace(__version__="0.32.0"),
        "vllm.v1.engine.core": types.SimpleNamespace(DPEngineCoreProc=engine_cls),
        "vllm.v1.engine": types.SimpleNamespace(EngineCoreRequestType=EngineCoreRequestType),
        "vllm.config": types.SimpleNamespace(ParallelConfig=pc_cls),
    }

    def loader(name: str):
        if name not in modules:
            raise ImportError(name)
        return modules[name]

    return loader, engine_cls


class StepWrapper:
    """The instrumentor installed on a fake engine class; ``wrapped`` / ``bare`` are the
    instrumented engine's ``step_fn`` and the original ``step`` bound to the same engine."""

    def __enter__(self) -> Self:
        from prometheus_client import CollectorRegistry

        from instrumented_core.telemetry.metrics import RankMetrics
        from instrumented_core.telemetry.probe import TelemetryProbe
        from instrumented_core.vllm_support.instrumentor import VllmDpInstrumentor

        loader, engine_cls = _fake_engine_vllm()
        original = engine_cls.__dict__["step"]
        registry = CollectorRegistry()
        self.saved = VllmDpInstrumentor._instance
        VllmDpInstrumentor._instance = None
        inst = self.inst = VllmDpInstrumentor()

        def probe_factory(engine, info):
            return TelemetryProbe(0, 2, RankMetrics(registry, 0, "bench", info)), None

        inst.instrument(import_module=loader, probe_factory=probe_factory)
        if not inst.is_instrumented_by_opentelemetry:
            raise RuntimeError(f"instrumentor refused the fake engine: {inst.contract_error}")
        engine = engine_cls()
        self.observer = inst._start_engine(engine)  # what the wrapped run_busy_loop does
        if self.observer is None:
            raise RuntimeError("no observer on the fake engine")
        self.wrapped = engine.step_fn
        self.bare = types.MethodType(original, engine)
        if getattr(self.wrapped, "__func__", None) is original:
            raise RuntimeError("step_fn was not rebound to the wrapper")
        self.probe = self.observer.probe
        return self

    def __exit__(self, *exc: object) -> None:
        from instrumented_core.vllm_support.instrumentor import VllmDpInstrumentor

        try:
            self.observer.close()
            if self.inst.is_instrumented_by_opentelemetry:
                self.inst.uninstrument()
        finally:
            VllmDpInstrumentor._instance = self.saved


# -- (b) the worker hooks -----------------------------------------------------------------------

class WorkerHooks:
    """``worker_hooks`` installed on fake worker classes, a real board record in ``directory``.
    ``group`` / ``proc`` go through the installed hooks; ``bare_*`` are the originals."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def __enter__(self) -> Self:
        from instrumented_core.telemetry import worker_board as wb
        from instrumented_core.vllm_support import worker_hooks

        if worker_hooks.installed():
            raise RuntimeError("worker hooks already installed in this process")

        def all_gatherv(self, x, dim=0, sizes=None):
            return x

        def rpc(self, rpc_request):
            return None

        group_cls = type("GroupCoordinator", (), {
            "world_size": 2, "all_gatherv": all_gatherv, "reduce_scatterv": all_gatherv,
            "all_reduce": all_gatherv, "all_gather": all_gatherv,
            "reduce_scatter": all_gatherv, "dispatch": all_gatherv, "combine": all_gatherv})
        proc_cls = type("WorkerProc", (), {"rank": 0, "_execute_worker_rpc": rpc})
        modules = {
            "vllm.v1.executor.multiproc_executor": types.SimpleNamespace(WorkerProc=proc_cls),
            "vllm.distributed.parallel_state": types.SimpleNamespace(GroupCoordinator=group_cls),
            "vllm.v1.worker.dp_utils": types.SimpleNamespace(__name__="dp_utils",
                                                             _run_ar=lambda *a: None),
        }

        def loader(name: str):
            if name not in modules:
                raise ImportError(name)
            return modules[name]

        self.saved_env = os.environ.get(wb.ENV_BOARD_DIR)
        os.environ[wb.ENV_BOARD_DIR] = self.directory
        wrapped = worker_hooks.install(import_module=loader)
        if not any(w.endswith("_execute_worker_rpc") for w in wrapped):
            raise RuntimeError(f"worker hooks not installed on the fake worker: {wrapped}")
        self.group, self.proc = group_cls(), proc_cls()
        self.request = ("execute_model", (), {}, None)
        self.proc._execute_worker_rpc(self.request)  # creates the record, as a first call does
        if len(wb.read_board(directory=self.directory)) != 1:
            raise RuntimeError("the first call created no board record")
        self.bare_group, self.bare_proc = types.SimpleNamespace(world_size=2), object()
        self.bare_collective = types.MethodType(all_gatherv, self.bare_group)
        self.bare_rpc = types.MethodType(rpc, self.bare_proc)
        self.writer = wb.BoardWriter(1, directory=tempdir(prefix="bench-board-raw-"))
        self.call_code = wb.CALL_CODES["execute_model"]
        self.collective_code = wb.COLLECTIVE_CODES["all_gatherv"]
        return self

    def __exit__(self, *exc: object) -> None:
        from instrumented_core.telemetry import worker_board as wb
        from instrumented_core.vllm_support import worker_hooks

        try:
            worker_hooks.uninstall()
            self.writer.close()
        finally:
            if self.saved_env is None:
                os.environ.pop(wb.ENV_BOARD_DIR, None)
            else:
                os.environ[wb.ENV_BOARD_DIR] = self.saved_env


def micro(quick: bool, board_dir: str) -> dict:
    number = 20_000 if quick else 100_000
    rounds = 5 if quick else 11
    with StepWrapper() as sw, WorkerHooks(board_dir) as wh:
        group, proc, request, writer = wh.group, wh.proc, wh.request, wh.writer
        call_code, collective_code = wh.call_code, wh.collective_code
        bare_collective, bare_rpc = wh.bare_collective, wh.bare_rpc

        def empty():
            pass

        def board_call():
            writer.call_enter(call_code)
            writer.call_exit()

        def board_collective():
            writer.collective_enter(collective_code)
            writer.collective_exit()

        def hook_collective():
            group.all_gatherv(None)

        def bare_collective_call():
            bare_collective(None)

        def hook_call():
            proc._execute_worker_rpc(request)

        def bare_call():
            bare_rpc(request)

        steps_before = sw.probe.hot.wait_seconds.get("step", 0.0)
        cands = {
            "empty": lambda: per_call_seconds(empty, number),
            "step_bare": lambda: per_call_seconds(sw.bare, number),
            "step_wrapped": lambda: per_call_seconds(sw.wrapped, number),
            "board_call": lambda: per_call_seconds(board_call, number),
            "board_collective": lambda: per_call_seconds(board_collective, number),
            "collective_bare": lambda: per_call_seconds(bare_collective_call, number),
            "collective_hooked": lambda: per_call_seconds(hook_collective, number),
            "call_bare": lambda: per_call_seconds(bare_call, number),
            "call_hooked": lambda: per_call_seconds(hook_call, number),
        }
        times = {k: median(v) * 1e6 for k, v in interleaved(cands, rounds).items()}
        from instrumented_core.telemetry import worker_board as wb

        (pos,) = wb.read_board(directory=board_dir)
        checks = {"step_wait_recorded": sw.probe.hot.wait_seconds.get("step", 0.0) > steps_before,
                  "board_collectives": pos.collectives, "board_calls": pos.calls}
    if not checks["step_wait_recorded"] or checks["board_collectives"] < number:
        raise RuntimeError(f"the wrappers did not observe what was timed: {checks}")
    log("hooks micro: " + ", ".join(f"{k}={v:.3f}us" for k, v in times.items()))
    return {"us": times, "checks": checks, "number": number, "rounds": rounds}


# -- (d) a scrape of the worker board ------------------------------------------------------------

def _board_worker(worker: int, directory: str, out, stop) -> None:
    """A stand-in worker process: its record says it is inside execute_model and a dispatch."""
    from instrumented_core.telemetry import worker_board as wb

    writer = wb.BoardWriter(worker, directory=directory)
    writer.start_heartbeat()
    writer.call_enter(wb.CALL_CODES["execute_model"])
    writer.collective_enter(wb.COLLECTIVE_CODES["dispatch"])
    out.put(worker)
    stop.wait(300)
    writer.close()


class BoardWorkers:
    """``BOARD_WORKERS`` spawned processes (children of this one, as vLLM's workers are of
    their engine core), each holding a live record in ``directory``."""

    def __init__(self, directory: str, count: int = BOARD_WORKERS) -> None:
        ctx = mp.get_context("spawn")
        self.directory, self.count = directory, count
        self.out, self.stop = ctx.Queue(), ctx.Event()
        self.procs = [ctx.Process(target=_board_worker, args=(w, directory, self.out, self.stop),
                                  daemon=True) for w in range(count)]
        for p in self.procs:
            p.start()

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        try:
            for _ in range(self.count):
                self.out.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            raise RuntimeError("board worker processes did not start in time") from None

    def close(self) -> None:
        self.stop.set()
        for p in self.procs:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join(2)


def scrape(quick: bool, workers: BoardWorkers) -> dict:
    from instrumented_core.telemetry import names as n
    from instrumented_core.telemetry import worker_board as wb
    from instrumented_core.telemetry.metrics import WorkerBoardCollector

    directory = workers.directory
    found = wb.read_board(directory=directory)
    if len(found) != workers.count:
        raise RuntimeError(f"read_board found {len(found)} of {workers.count} records")
    saved = os.environ.get(wb.ENV_BOARD_DIR)
    os.environ[wb.ENV_BOARD_DIR] = directory  # the collector reads the default directory
    try:
        collector = WorkerBoardCollector({n.LABEL_ENGINE: "0", n.LABEL_MODEL_NAME: "bench"})
        families = list(collector.collect())
        if not families or len(families[0].samples) != workers.count:
            raise RuntimeError("the collector did not expose every worker")
        number = 200 if quick else 1000
        rounds = 5 if quick else 11
        runs = interleaved({
            "read_board": lambda: per_call_seconds(lambda: wb.read_board(directory=directory),
                                                   number),
            "collector": lambda: per_call_seconds(lambda: list(collector.collect()), number),
        }, rounds)
    finally:
        if saved is None:
            os.environ.pop(wb.ENV_BOARD_DIR, None)
        else:
            os.environ[wb.ENV_BOARD_DIR] = saved
    times = {k: median(v) * 1e6 for k, v in runs.items()}
    log(f"hooks scrape: read_board {times['read_board']:.1f} us, "
        f"collector {times['collector']:.1f} us ({workers.count} records)")
    return times


# -- (e) the flight recorder ---------------------------------------------------------------------

def flight(quick: bool) -> dict:
    from instrumented_core.telemetry import names as n
    from instrumented_core.telemetry.flight_recorder import FlightRecorder

    number = 20_000 if quick else 100_000
    rounds = 5 if quick else 11
    rec = FlightRecorder(0, 2)
    for _ in range(rec.capacity):
        rec.record("utility", {"method": "fill"})
    step, sync = n.COLLECTIVE_STEP, n.COLLECTIVE_SYNC

    def empty():
        pass

    def per_step():
        rec.enter(step)
        rec.exit(step, 0.001)

    def per_sync_round():
        rec.enter(sync)
        rec.sync_result(True, False, True, 0, 0.0001)

    before = (rec.step_seq, rec.dp_seq)
    runs = interleaved({
        "empty": lambda: per_call_seconds(empty, number),
        "step": lambda: per_call_seconds(per_step, number),
        "sync_round": lambda: per_call_seconds(per_sync_round, number),
    }, rounds)
    if rec.step_seq - before[0] < number or rec.dp_seq - before[1] < number:
        raise RuntimeError("the flight recorder did not record what was timed")
    times = {k: median(v) * 1e6 for k, v in runs.items()}
    log(f"hooks flight: per step {times['step'] - times['empty']:.3f} us, per sync round "
        f"{times['sync_round'] - times['empty']:.3f} us")
    return {"us": times, "number": number, "rounds": rounds}


# -- section ------------------------------------------------------------------------------------

def run(quick: bool, vllm: dict | None = None) -> dict:
    """Emit the hooks' figures. ``vllm``: what the ``vllm`` section measured in this invocation
    (its uninstrumented step and the worker calls and collectives per step), or None."""
    from benchmarks.overhead import GlooAllReduce

    gloo = GlooAllReduce(quick, op="all_gather_64f")
    sync_gloo = GlooAllReduce(quick)  # the sync_dp_state all-reduce: 2 int32, SUM
    workers = BoardWorkers(tempdir(prefix="bench-board-scrape-"))
    try:
        gloo.wait_ready()
        sync_gloo.wait_ready()
        workers.wait_ready()
        log("hooks: step wrapper and worker hooks vs the bare originals (interleaved)")
        m = micro(quick, tempdir(prefix="bench-board-hooks-"))
        log(f"hooks: read_board with {workers.count} worker records")
        scraped = scrape(quick, workers)
        log("hooks: 2-process Gloo all_gather of 64 floats")
        ag = gloo.measure()
        log(f"hooks: all_gather p50 {ag['p50']:.1f} us, p99 {ag['p99']:.1f} us")
        fl = flight(quick)
        ar = sync_gloo.measure()
        log(f"hooks: sync all_reduce p50 {ar['p50']:.1f} us, p99 {ar['p99']:.1f} us")
    finally:
        gloo.close()
        sync_gloo.close()
        workers.close()
    t = m["us"]
    step_added = t["step_wrapped"] - t["step_bare"]
    coll_added = t["collective_hooked"] - t["collective_bare"]
    call_added = t["call_hooked"] - t["call_bare"]
    board_coll = t["board_collective"] - t["empty"]
    board_call = t["board_call"] - t["empty"]

    measured_on_vllm = bool(vllm and vllm.get("collectives_per_step") is not None)
    calls_per_step = vllm["calls_per_step"] if measured_on_vllm else CALLS_PER_STEP
    colls_per_step = vllm["collectives_per_step"] if measured_on_vllm else COLLECTIVES_PER_STEP
    if vllm and vllm.get("seconds_per_step_off"):
        step_us = vllm["seconds_per_step_off"] * 1e6
        step_ref = "uninstrumented vLLM DP=2 engine step measured in this run (vllm section)"
    else:
        step_us = colls_per_step * ag["p50"]
        step_ref = (f"lower bound of a vLLM DP=2 step: its {colls_per_step:g} model collectives "
                    "alone, each a Gloo all_gather p50 measured in this run (vllm section not run)")
    per_step_from = ("measured on the real engine in this run (vllm section)" if measured_on_vllm
                     else "the tiny model's step as the vllm section measured it "
                          "(CALLS_PER_STEP, COLLECTIVES_PER_STEP)")
    forward_added = calls_per_step * call_added + colls_per_step * coll_added
    loop = f"{m['rounds']} interleaved rounds of {m['number']:,} calls, median; loop included"

    emit("overhead.micro.step_wrapper_per_engine_step", "us", baseline=t["step_bare"],
         instrumented=t["step_wrapped"], added_us=step_added,
         note="the instrumentor's installed step wrapper (collective_begin/end('step') + a "
              "perf_counter pair, real TelemetryProbe) around a no-op step vs the bare no-op; "
              + loop)
    emit("overhead.micro.worker_board_per_model_collective", "us", baseline=t["collective_bare"],
         instrumented=t["collective_hooked"], added_us=coll_added, board_write_us=board_coll,
         note="worker_hooks' installed collective hook (GroupCoordinator.all_gatherv, world "
              "size 2) around a no-op vs the bare no-op; board_write_us = BoardWriter "
              "collective_enter + collective_exit alone; " + loop)
    emit("overhead.micro.worker_board_per_call", "us", baseline=t["call_bare"],
         instrumented=t["call_hooked"], added_us=call_added, board_write_us=board_call,
         note="worker_hooks' installed WorkerProc._execute_worker_rpc hook ('execute_model') "
              "around a no-op vs the bare no-op; board_write_us = BoardWriter call_enter + "
              "call_exit alone; " + loop)
    emit("overhead.micro.worker_hooks_per_forward", "us", baseline=step_us,
         instrumented=forward_added, ratio=forward_added / step_us,
         calls_per_step=calls_per_step, collectives_per_step=colls_per_step,
         per_step_from=per_step_from, reference=step_ref,
         note="worker-side added cost of one engine step: calls x per-call hook + model "
              "collectives x per-collective hook")
    emit("overhead.gloo_allgather_64f.dp2", "us", value=ag["p50"], p99_us=ag["p99"],
         mean_us=ag["mean"], n=ag["n"],
         note="2 processes, loopback, torch.distributed Gloo all_gather of 64 float32")
    emit("overhead.scrape.worker_board_read", "us", value=scraped["read_board"],
         collector_us=scraped["collector"], workers=workers.count,
         note="read_board() of the engine core's workers' records (8 live child processes), "
              "and WorkerBoardCollector.collect() (read + metric families); paid by the "
              "metrics thread at scrape time, never by a step")

    met_step_abs = step_added < STEP_GOAL_US
    met_step_rel = step_added < STEP_GOAL_FRACTION * step_us
    emit("goal.step_wrapper_under_1pct_and_2us", "us", baseline=step_us,
         instrumented=step_added, ratio=step_added / step_us,
         goal="added < 1% of a step and < 2 us", goal_met=bool(met_step_abs and met_step_rel),
         under_2us=bool(met_step_abs), under_1pct=bool(met_step_rel), reference=step_ref)
    met_coll_abs = coll_added < COLLECTIVE_GOAL_US
    met_coll_rel = coll_added < COLLECTIVE_GOAL_FRACTION * ag["p50"]
    emit("goal.worker_board_per_model_collective_under_5pct_of_allgather_and_2us", "us",
         baseline=ag["p50"], instrumented=coll_added, ratio=coll_added / ag["p50"],
         goal="added per model collective < 5% of a Gloo 64-float all_gather (p50, DP 2) and "
              "< 2 us", goal_met=bool(met_coll_abs and met_coll_rel),
         under_2us=bool(met_coll_abs), under_5pct=bool(met_coll_rel),
         board_write_us=board_coll,
         note="instrumented = the whole installed hook per collective (wrapper + board write)")
    f = fl["us"]
    fl_step = f["step"] - f["empty"]
    fl_sync = f["sync_round"] - f["empty"]
    floop = f"{fl['rounds']} interleaved rounds of {fl['number']:,} calls, median, ring full"
    emit("overhead.micro.flight_recorder_per_step", "us", baseline=step_us, instrumented=fl_step,
         ratio=fl_step / step_us, reference=step_ref,
         note="FlightRecorder.enter/exit('step') (the probe's added work per non-sync step: "
              "the step count, no ring event); " + floop)
    emit("overhead.micro.flight_recorder_per_sync_round", "us", baseline=ar["p50"],
         instrumented=fl_sync, ratio=fl_sync / ar["p50"], allreduce_p99_us=ar["p99"],
         note="FlightRecorder.enter('sync_dp_state') + sync_result (sequence number, 2 ring "
              "events with the votes) vs a 2-process Gloo all_reduce of 2 int32 (p50, same "
              "run); " + floop)
    met = fl_step < STEP_GOAL_US and fl_step < STEP_GOAL_FRACTION * step_us
    emit("goal.flight_recorder_per_step_under_1pct_and_2us", "us", baseline=step_us,
         instrumented=fl_step, ratio=fl_step / step_us, goal="added < 1% of a step and < 2 us",
         goal_met=bool(met), reference=step_ref)
    met = fl_sync < COLLECTIVE_GOAL_FRACTION * ar["p50"]
    emit("goal.flight_recorder_per_sync_round_under_5pct_of_allreduce", "us",
         baseline=ar["p50"], instrumented=fl_sync, ratio=fl_sync / ar["p50"],
         goal="added per sync round < 5% of the Gloo sync all-reduce (p50, DP 2)",
         goal_met=bool(met))
    return {"micro": t, "allgather": ag, "scrape": scraped, "flight": fl, "allreduce": ar}
