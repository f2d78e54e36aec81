"""One DP rank of the CPU reference cluster: an engine loop modelled on vLLM's DP busy loop.

The loop follows ``DPEngineCoreProc.run_busy_loop`` step by step: poll the input queue (block
while idle), run a real step if requests are scheduled, else a dummy step while the wave runs,
then ``_has_global_unfinished_reqs`` (the periodic ``sync_dp_state`` all-reduce), then wave
bookkeeping with the coordinator. As in vLLM, the engine thread does not run the forward: a
step is a call to the rank's worker (:mod:`~instrumented_core.cluster.worker`, a thread
started after Gloo init), which runs the model time and one collective on the "model" Gloo
group (the stand-in for the MoE all-to-all) and publishes its position to the worker board;
the engine marks the whole wait as inside "step". The sync, resume and barrier collectives
run on the engine thread on a second Gloo group, as vLLM's stateless DP group is separate
from the workers' group.
"""

from __future__ import annotations

import os
import queue
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import replace
from datetime import timedelta

from instrumented_core.cluster import messages as msg
from instrumented_core.cluster.config import FAULT_KINDS, ClusterConfig
from instrumented_core.cluster.placement import join_netns
from instrumented_core.cluster.scheduler import PauseState, Request, Scheduler
from instrumented_core.cluster.status import (
    F_FAILED,
    F_PHASE,
    F_PID,
    F_STALLED,
    F_STEPS,
    F_SYNC_ROUNDS,
    PHASES,
    StatusBoard,
)
from instrumented_core.cluster.worker import RankWorker, open_board
from instrumented_core.protocol import PauseStateMachine, Protocol, ProtocolError


class CollectiveFailed(RuntimeError):
    pass


class RankEngine:
    def __init__(self, rank: int, config: ClusterConfig, inbox, outbox, coordinator, board,
                 worker: RankWorker, dp_group, probe) -> None:
        import torch

        self.torch = torch
        self.rank = rank
        self.config = config
        self.inbox, self.outbox, self.coordinator = inbox, outbox, coordinator
        self.board = board
        self.worker, self.dp_group = worker, dp_group
        self.probe = probe
        self.scheduler = Scheduler(config.max_running)
        self.sm = PauseStateMachine(rank, config.ranks, config.sync_interval, config.protocol,
                                    config.cadence, probe)
        # work in flight, read by the metrics thread at scrape time
        self.sm.request_counts = lambda: (len(self.scheduler.running),
                                          len(self.scheduler.waiting))
        self.idle_callbacks: list[Callable[[], None]] = []
        self.fault = "none"
        self.failed = False
        self.stopping = False
        self.steps = 0

    # -- collectives ----------------------------------------------------------------------

    def _collective(self, name: str, fn: Callable[[], object]):
        self.board.enter(self.rank, name)
        self.probe.collective_begin(name)
        started = time.perf_counter()
        try:
            return fn()
        except RuntimeError as e:
            seconds = time.perf_counter() - started
            raise CollectiveFailed(f"rank {self.rank} failed in the {name} collective after "
                                   f"{seconds:.1f} s: {str(e).splitlines()[0]}") from e
        finally:
            self.board.leave(self.rank)
            self.probe.collective_end(name, time.perf_counter() - started)

    def _sync_all_reduce(self, values: list[int]) -> list[int]:
        """``ParallelConfig.sync_dp_state``'s all-reduce."""
        tensor = self.torch.tensor(values, dtype=self.torch.int32)
        self.board.enter(self.rank, "sync_dp_state")
        try:
            self.torch.distributed.all_reduce(tensor, group=self.dp_group)
        except RuntimeError as e:
            raise CollectiveFailed(f"rank {self.rank} failed in the sync_dp_state all-reduce: "
                                   f"{str(e).splitlines()[0]}") from e
        finally:
            self.board.leave(self.rank)
        self.board.set(self.rank, F_SYNC_ROUNDS, self.sm.sync_rounds + 1)
        return tensor.tolist()

    def _stall(self) -> None:
        """The stall fault: alive (metrics still answer) but never enters the sync all-reduce."""
        self.board.set(self.rank, F_STALLED, 1)
        while True:
            time.sleep(0.05)

    def _resume_all_reduce(self, values: list[int]) -> list[int]:
        tensor = self.torch.tensor(values, dtype=self.torch.int32)
        self._collective("resume", lambda: self.torch.distributed.all_reduce(
            tensor, group=self.dp_group))
        return tensor.tolist()

    def _model_step(self, dummy: bool) -> None:
        """The executor's step: call the worker (model time, then the lockstep collective)
        and wait for it, inside "step". The ``slow`` fault is the engine core itself being
        slow before it calls its worker; the worker faults act inside the worker."""
        if self.fault == "dead":
            self.outbox.close()  # deliver what was already sent (the fault's own reply)
            self.outbox.join_thread()
            os._exit(17)
        if self.fault == "slow":
            time.sleep(self.config.slow_step_seconds)
        fault = self.fault
        self._collective("step", lambda: self.worker.execute_model(fault, dummy))
        self.steps += 1
        self.board.set(self.rank, F_STEPS, self.steps)

    # -- client requests ------------------------------------------------------------------

    def has_work(self) -> bool:
        return self.sm.engines_running or self.scheduler.has_unfinished()

    def _publish_phase(self) -> None:
        self.board.set(self.rank, F_PHASE, PHASES.index(self.sm.phase.value))

    def _reply(self, call_id: int, ok: bool, value) -> None:
        self.outbox.put((msg.UTILITY_RESULT, self.rank, call_id, ok, value))

    def _finish(self, request: Request, outcome: str) -> None:
        self.probe.request_finished(outcome)
        self.outbox.put((msg.FINISHED, self.rank, request.req_id, outcome, request.tokens))

    def handle(self, message: tuple) -> None:
        kind = message[0]
        if kind == msg.ADD:
            _, req_id, num_tokens, request_wave = message
            self.scheduler.add(Request(req_id, num_tokens))
            self._on_add_request(request_wave)
        elif kind == msg.START_DP_WAVE:
            _, wave, exclude, inject_id = message
            outcome = self.sm.handle_start_dp_wave(wave, exclude)
            if inject_id is not None:
                self.outbox.put((msg.WAVE_HANDLED, self.rank, inject_id, outcome))
        elif kind == msg.UTILITY:
            _, call_id, method, args = message
            self._utility(call_id, method, args)
        elif kind == msg.SHUTDOWN:
            self.stopping = True

    def _on_add_request(self, request_wave: int) -> None:
        """``DPEngineCoreProc.add_request``: a request for a finished wave restarts the loop."""
        sm = self.sm
        if request_wave == sm.current_wave:
            return
        if request_wave > sm.current_wave:
            sm.current_wave = request_wave
        elif not sm.engines_running and self.scheduler.pause_state is PauseState.UNPAUSED:
            sm.engines_running = True
            self.coordinator.put((msg.START_WAVE, sm.current_wave, self.rank))

    def _utility(self, call_id: int, method: str, args: tuple) -> None:
        self.probe.utility_call(method)
        try:
            handler = getattr(self, "utility_" + method)
        except AttributeError:
            self._reply(call_id, False, f"unknown utility {method!r}")
            return
        try:
            result = handler(call_id, *args)
        except (ProtocolError, ValueError) as e:
            self._reply(call_id, False, str(e))
            return
        if result is not _ASYNC:
            self._reply(call_id, True, result)
        self.probe.progress()
        self._publish_phase()

    def utility_pause_scheduler(self, call_id: int, mode: str, trace_parent: str | None = None):
        if mode not in ("abort", "wait", "keep"):
            raise ProtocolError(f"unknown pause mode {mode!r}: use abort, wait or keep")
        if mode == "abort":
            for request in self.scheduler.abort_all():
                self._finish(request, "aborted")
        self.scheduler.pause_state = (PauseState.PAUSED_ALL if mode == "keep"
                                      else PauseState.PAUSED_NEW)
        if self.sm.request_pause(mode, self.has_work(), trace_parent):
            return None

        def on_idle() -> None:
            self.sm.finish_pause()
            self._publish_phase()
            self._reply(call_id, True, None)

        self.idle_callbacks.append(on_idle)
        return _ASYNC

    def utility_resume_scheduler(self, call_id: int):
        if not self.sm.check_resume():
            return "not paused"
        was_running = self.sm.engines_running
        self.scheduler.pause_state = PauseState.UNPAUSED
        two_phase = self.sm.protocol is Protocol.TWO_PHASE
        self.sm.resume(self.scheduler.has_unfinished(),
                       self._resume_all_reduce if two_phase else None)
        if not two_phase and self.sm.engines_running and not was_running:
            self.coordinator.put((msg.START_WAVE, self.sm.current_wave, self.rank))
        return "resumed"

    def utility_barrier(self, call_id: int):
        self._collective("barrier", lambda: self.torch.distributed.barrier(group=self.dp_group))
        return self.rank

    def utility_collective_rpc(self, call_id: int, value: int = 1):
        fault = self.fault
        return self._collective("collective_rpc",
                                lambda: self.worker.collective_rpc(value, fault))

    def utility_inject_fault(self, call_id: int, kind: str):
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault {kind!r}: use {', '.join(FAULT_KINDS)}")
        self.fault = kind
        return kind

    def utility_is_paused(self, call_id: int):
        return self.sm.phase.value == "paused"

    def utility_get_stats(self, call_id: int):
        sm = self.sm
        return {"rank": self.rank, "sync_rounds": sm.sync_rounds, "steps": self.steps,
                "wave": sm.current_wave, "phase": sm.phase.value,
                "engines_running": sm.engines_running,
                "ignore_start_dp_wave": sm.ignore_start_dp_wave,
                "running": len(self.scheduler.running), "waiting": len(self.scheduler.waiting)}

    # -- the busy loop --------------------------------------------------------------------

    def _process_input_queue(self) -> None:
        while not self.has_work() and not self.stopping:
            while self.idle_callbacks:
                self.idle_callbacks.pop(0)()
            try:
                self.handle(self.inbox.get(timeout=0.5))
            except queue.Empty:
                continue
        while not self.inbox.empty():
            try:
                self.handle(self.inbox.get_nowait())
            except queue.Empty:
                break

    def _engine_step(self) -> bool:
        scheduled = self.scheduler.schedule()
        if not scheduled:
            return False
        self._model_step(dummy=False)
        for request in self.scheduler.advance(scheduled):
            self._finish(request, "completed")
        self.probe.step_end(False)
        return True

    def run(self) -> None:
        sm = self.sm
        while not self.stopping:
            was_running = sm.engines_running
            self._process_input_queue()
            if self.stopping:
                break
            executed = self._engine_step()
            local_unfinished = self.scheduler.has_unfinished()
            if not executed:
                if not local_unfinished and not sm.engines_running:
                    continue
                self._model_step(dummy=True)
                self.probe.step_end(True)
            if self.fault == "stall" and sm.next_call_syncs():
                self._stall()
            sm.engines_running = sm.has_global_unfinished_reqs(local_unfinished,
                                                               self._sync_all_reduce)
            self._publish_phase()
            if not sm.engines_running:
                if self.rank == 0:
                    self.coordinator.put((msg.WAVE_COMPLETE, sm.current_wave))
                sm.end_wave()
            elif not was_running and self.rank == 0 and not sm.pending_pause:
                self.coordinator.put((msg.START_WAVE, sm.current_wave, self.rank))

    def fail(self, error: BaseException) -> None:
        """Stop stepping but stay up, so the metrics endpoint can still be read."""
        self.failed = True
        self.board.set(self.rank, F_FAILED, 1)
        self.outbox.put((msg.RANK_ERROR, self.rank, str(error)))
        while not self.stopping:
            try:
                if self.inbox.get(timeout=0.5)[0] == msg.SHUTDOWN:
                    self.stopping = True
            except queue.Empty:
                pass


_ASYNC = object()


def _close_on_stop(stop_flag, telemetry, worker: RankWorker,
                   engine_done: threading.Event) -> None:
    """When the client stops the cluster, a rank blocked in a collective (or waiting for a
    stalled worker) cannot run its own ``finally``: close telemetry from here so open pause
    spans are still exported, remove the worker's board record, and end the process instead
    of waiting for the client to terminate it."""
    while not stop_flag.value:
        if engine_done.wait(0.1):
            return
    if not engine_done.wait(1.0):
        try:
            telemetry.close()
            worker.close()
        finally:
            os._exit(0)


def rank_main(rank: int, config: ClusterConfig, master_port: int, inbox, outbox, coordinator,
              board_array, stop_flag) -> None:
    """Process entry point: telemetry first (a bad port fails fast), then Gloo, then the
    worker thread, then the loop. On another host (``config.hosts``) it first joins that
    host's network namespace, before any thread or socket exists."""
    master_addr = "127.0.0.1"
    tel_config = config.telemetry
    if config.hosts:
        host = config.hosts[rank]
        try:
            join_netns(host.netns)
        except OSError as e:
            outbox.put((msg.STARTUP_ERROR, rank, str(e)))
            return
        os.environ["GLOO_SOCKET_IFNAME"] = host.ifname
        master_addr = config.hosts[0].address
        tel_config = replace(tel_config, metrics_host=host.address)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    board = StatusBoard(board_array, config.ranks)
    board.set(rank, F_PID, os.getpid())
    telemetry = None
    try:
        import torch
        import torch.distributed as dist

        from instrumented_core import __version__
        from instrumented_core.telemetry import start_rank_telemetry

        torch.set_num_threads(1)
        info = {"dp_size": str(config.ranks), "sync_interval": str(config.sync_interval),
                "protocol": config.protocol, "cadence": config.cadence,
                "version": __version__, "vllm_version": "none (CPU reference cluster)"}
        telemetry = start_rank_telemetry(tel_config, rank, config.ranks, config.protocol,
                                         info, group_key=f"cluster-{master_port}")
        if telemetry.registry is not None:  # the cluster's "plugin" is always on
            from instrumented_core.telemetry import names as n
            from instrumented_core.telemetry.metrics import plugin_active

            plugin_active(telemetry.registry, {n.LABEL_ENGINE: str(rank),
                                               n.LABEL_MODEL_NAME: config.telemetry.model_name},
                          True, "ok", "none")
        timeout = timedelta(seconds=config.collective_timeout)
        dist.init_process_group("gloo", init_method=f"tcp://{master_addr}:{master_port}",
                                rank=rank, world_size=config.ranks, timeout=timeout)
        model_group = dist.group.WORLD
        dp_group = dist.new_group(list(range(config.ranks)), timeout=timeout, backend="gloo")
    except Exception as e:  # noqa: BLE001 - reported to the client as one line
        outbox.put((msg.STARTUP_ERROR, rank, str(e).splitlines()[0] if str(e) else repr(e)))
        return
    # one worker per rank (vLLM at TP=1: worker 0 of its engine), a thread of this process
    worker = RankWorker(rank, config.step_seconds, config.slow_step_seconds, model_group,
                        open_board(0)).start()
    engine = RankEngine(rank, config, inbox, outbox, coordinator, board, worker, dp_group,
                        telemetry.probe)
    board.leave(rank)
    engine_done = threading.Event()
    threading.Thread(target=_close_on_stop,
                     args=(stop_flag, telemetry, worker, engine_done),
                     name="close-on-stop", daemon=True).start()
    outbox.put((msg.READY, rank, telemetry.metrics_url, os.getpid()))
    try:
        engine.run()
    except CollectiveFailed as e:
        engine.fail(e)
    except Exception as e:  # noqa: BLE001
        engine.fail(RuntimeError(f"rank {rank} crashed: {e!r}\n{traceback.format_exc()}"))
    finally:
        engine_done.set()
        telemetry.close()
        worker.close()
