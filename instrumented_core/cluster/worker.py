"""A rank's worker: the thread that runs the forward stand-in and alone uses the model group.

In vLLM the engine core does not run the forward. It calls its worker (``execute_model``,
``execute_dummy_batch``, ``collective_rpc``) and waits; the worker runs the model and the
DP/EP collectives of the forward. The cluster keeps that split, so a rank wedged *inside* a
step looks as it does on vLLM: its engine sits inside "step" while the worker board
(:mod:`~instrumented_core.telemetry.worker_board`) shows where the worker is. The worker
publishes its position exactly as vLLM's workers do through ``vllm_support.worker_hooks``:
``call_enter``/``call_exit`` around every call, ``collective_enter``/``collective_exit``
around the model all-reduce, and a heartbeat thread (the worker's own, not
``BoardWriter.start_heartbeat``, so that the ``freeze`` fault can stop it as ``SIGSTOP`` stops
a vLLM worker process's).

The engine hands one call at a time to the worker through two locks (the cheapest handoff
between two CPython threads: each side blocks in a lock, which releases the GIL) and blocks
until the worker returns; an exception in the worker (a Gloo timeout) is re-raised in the
engine thread.

Faults, read from the engine's current fault at every call:

=================  ==============================================================================
``worker_stall``   the worker stops forever inside ``execute_model`` / ``execute_dummy_batch``,
                   before the model collective: its peers' workers wait inside it
``worker_slow``    the worker takes ``slow_step_seconds`` more inside each step, before the
                   model collective: its peers' workers wait for it every step (a straggler)
``wedge``          the worker enters the model collective (the board says inside) and never
                   completes it; peers that still entered the real all-reduce wait inside it
``freeze``         as ``worker_stall``, and its heartbeat stops too: the whole worker is frozen,
                   as a vLLM worker process stopped with ``SIGSTOP`` (or a C call holding the GIL)
=================  ==============================================================================
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from instrumented_core.telemetry.worker_board import (
    CALL_CODES,
    COLLECTIVE_CODES,
    HEARTBEAT_SECONDS,
    BoardWriter,
)

__all__ = ["WORKER_FAULTS", "RankWorker", "open_board"]

WORKER_FAULTS = ("worker_stall", "worker_slow", "wedge", "freeze")
_FOREVER_TICK = 0.05


class _NoBoard:
    """Stands in when the board cannot be created: the worker must run without it."""

    def beat(self) -> None: ...

    def call_enter(self, code: int) -> None: ...

    def call_exit(self) -> None: ...

    def collective_enter(self, code: int) -> bool:
        return True

    def collective_exit(self) -> None: ...

    def close(self) -> None: ...


def open_board(worker: int = 0) -> Any:
    """This process's worker-board record, or a no-op stand-in (``RankWorker`` beats)."""
    try:
        return BoardWriter(worker)
    except Exception:  # noqa: BLE001 - no board (e.g. no writable /dev/shm): run without
        return _NoBoard()


def _forever() -> None:
    while True:
        time.sleep(_FOREVER_TICK)


class RankWorker:
    """The worker thread of one rank (vLLM's ``VLLM::Worker_DP<r>``, as a thread)."""

    def __init__(self, rank: int, step_seconds: float, slow_seconds: float, model_group,
                 board: Any) -> None:
        import torch
        import torch.distributed as dist

        self.rank = rank
        self.step_seconds = step_seconds
        self.slow_seconds = slow_seconds
        self.model_group = model_group
        self.board = board
        self._all_reduce = dist.all_reduce
        self._torch = torch
        self._step_tensor = torch.zeros(1, dtype=torch.int32)
        self._go = threading.Lock()
        self._go.acquire()
        self._done = threading.Lock()
        self._done.acquire()
        self._call: tuple[Callable[..., object], tuple] | None = None
        self._result: object = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"worker-dp{rank}", daemon=True)
        self._frozen = False
        self._closed = threading.Event()
        self._heart = threading.Thread(target=self._heartbeat, name=f"worker-dp{rank}-heartbeat",
                                       daemon=True)
        self._codes = {"execute_model": CALL_CODES["execute_model"],
                       "execute_dummy_batch": CALL_CODES["execute_dummy_batch"],
                       "rpc": CALL_CODES["rpc"]}
        self._all_reduce_code = COLLECTIVE_CODES["all_reduce"]

    def start(self) -> RankWorker:
        self._thread.start()
        self._heart.start()
        return self

    def close(self) -> None:
        """Stop the heartbeat, then close the board record (removes its file). Idempotent."""
        self._closed.set()
        if self._heart.is_alive() and self._heart is not threading.current_thread():
            self._heart.join(1.0)
        self.board.close()

    def _heartbeat(self) -> None:
        while not self._frozen:
            try:
                self.board.beat()
            except ValueError:  # the record was closed
                return
            if self._closed.wait(HEARTBEAT_SECONDS):
                return

    # -- the engine side ------------------------------------------------------------------

    def _call_worker(self, fn: Callable[..., object], *args) -> object:
        self._call = (fn, args)
        self._go.release()
        self._done.acquire()  # a stalled or wedged worker keeps the engine here, as in vLLM
        error, self._error = self._error, None
        if error is not None:
            raise error
        return self._result

    def execute_model(self, fault: str, dummy: bool = False) -> None:
        """One forward: ``execute_dummy_batch`` when the rank has nothing scheduled."""
        self._call_worker(self._forward, "execute_dummy_batch" if dummy else "execute_model",
                          fault)

    def collective_rpc(self, value: int, fault: str) -> int:
        """``collective_rpc`` to this rank's worker: an all-reduce of ``value`` on the model
        group (every rank's worker must take part)."""
        return int(self._call_worker(self._rpc, value, fault))

    # -- the worker thread ----------------------------------------------------------------

    def _run(self) -> None:
        while True:
            self._go.acquire()
            fn, args = self._call
            try:
                self._result = fn(*args)
            except BaseException as e:  # noqa: BLE001 - handed back to the engine thread
                self._error = e
            self._done.release()

    def _model_collective(self, tensor, fault: str) -> None:
        board = self.board
        board.collective_enter(self._all_reduce_code)
        try:
            if fault == "wedge":
                _forever()
            self._all_reduce(tensor, group=self.model_group)
        finally:
            board.collective_exit()

    def _forward(self, call: str, fault: str) -> None:
        board = self.board
        board.call_enter(self._codes[call])
        try:
            delay = self.step_seconds + (self.slow_seconds if fault == "worker_slow" else 0.0)
            if delay:
                time.sleep(delay)
            if fault == "freeze":
                self._frozen = True  # the heartbeat thread stops at its next beat
            if fault in ("worker_stall", "freeze"):
                _forever()
            self._model_collective(self._step_tensor, fault)
        finally:
            board.call_exit()

    def _rpc(self, value: int, fault: str) -> int:
        board = self.board
        board.call_enter(self._codes["rpc"])
        try:
            tensor = self._torch.tensor([value], dtype=self._torch.int64)
            self._model_collective(tensor, fault)
            return int(tensor.item())
        finally:
            board.call_exit()
