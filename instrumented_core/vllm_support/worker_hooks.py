"""Inside vLLM's worker processes: publish where each worker is to the worker board.

The forward runs in the workers, not in the engine core, so this is where a wedge inside a
step is visible: which engine-to-worker call a worker is in, and which DP/EP collective of
the forward it waits in, with the time it entered and a sequence number. The records live in
shared memory (:mod:`instrumented_core.telemetry.worker_board`) and the engine core's metrics
thread reads them, so a stopped worker's last position stays visible.

What is wrapped (class or module attributes looked up at call time; all-or-nothing per
target, every wrap has its unwrap):

==============================================  =============================================
``WorkerProc._execute_worker_rpc``              every call from the engine core (multiproc
                                                executor): ``execute_model``,
                                                ``sample_tokens``, ``execute_dummy_batch``,
                                                any other method or callable as ``rpc``
``GroupCoordinator.all_gatherv`` /              the MoE dispatch/combine primitives and the
``reduce_scatterv`` / ``all_reduce`` /          plain collectives, on groups of more than one
``all_gather`` / ``reduce_scatter`` /           rank; nested calls (``dispatch`` built on
``dispatch`` / ``combine``                      ``all_gatherv``) count once, as the outer one
``vllm.v1.worker.dp_utils._run_ar``             ``coordinate_batch_across_dp``'s all-reduce
                                                (``dp_coordinate``)
==============================================  =============================================

Limits: under CUDA-graph replay the per-layer collectives never run Python, so only the call
boundary and ``dp_coordinate`` are seen there; a single-process executor (no ``WorkerProc``)
publishes nothing. Cost: a board write is three ``struct.pack_into`` on an mmap (see the
benchmarks, ``overhead.micro.worker_board_*``).

The board record is created lazily, at a worker's first call from its engine core, so the
hooks are inert in every other process (front end, engine core) even when installed there
(with ``fork``, children inherit class attributes, so the plugin installs them everywhere).
"""

from __future__ import annotations

import atexit
import functools
import importlib
import logging
import os
from collections.abc import Callable
from typing import Any

from instrumented_core.telemetry.worker_board import CALL_CODES, COLLECTIVE_CODES, BoardWriter

__all__ = ["install", "uninstall", "installed"]

log = logging.getLogger(__name__)

_RPC_TARGET = ("vllm.v1.executor.multiproc_executor", "WorkerProc", "_execute_worker_rpc")
_GROUP_TARGET = ("vllm.distributed.parallel_state", "GroupCoordinator")
_GROUP_METHODS = ("all_gatherv", "reduce_scatterv", "all_reduce", "all_gather",
                  "reduce_scatter", "dispatch", "combine")
_DP_UTILS = ("vllm.v1.worker.dp_utils", "_run_ar")

_board: BoardWriter | None = None
_saved: list[tuple[Any, str, bool, Any]] = []
_error_logged = False


def _log_once(msg: str) -> None:
    global _error_logged
    if not _error_logged:
        _error_logged = True
        log.exception("instrumented_core worker hooks: %s (logged once, ignored)", msg)


def _board_for(worker_rank: int) -> BoardWriter | None:
    """This process's record, created at its first call (and again after a fork)."""
    global _board
    board = _board
    if board is not None and board.pid == os.getpid():
        return board
    try:
        _board = BoardWriter(worker_rank)
        _board.start_heartbeat()
        atexit.register(_board.close)
    except Exception:  # noqa: BLE001 - never break the worker
        _board = None
        _log_once("cannot create the worker board record")
    return _board


def _wrap_rpc(orig: Callable) -> Callable:
    rpc_code = CALL_CODES["rpc"]

    @functools.wraps(orig)
    def _execute_worker_rpc(self, rpc_request, *args, **kwargs):
        board = _board_for(getattr(self, "rank", 0))
        if board is None:
            return orig(self, rpc_request, *args, **kwargs)
        try:
            method = rpc_request[0]
            board.call_enter(CALL_CODES.get(method, rpc_code) if isinstance(method, str)
                             else rpc_code)
        except Exception:  # noqa: BLE001
            _log_once("call_enter failed")
        try:
            return orig(self, rpc_request, *args, **kwargs)
        finally:
            try:
                board.call_exit()
            except Exception:  # noqa: BLE001
                _log_once("call_exit failed")

    return _execute_worker_rpc


def _observe_collective(orig: Callable, code: int, group_method: bool) -> Callable:
    @functools.wraps(orig)
    def collective(*args, **kwargs):
        board = _board
        if board is None or board.pid != os.getpid() or (
                group_method and getattr(args[0], "world_size", 2) <= 1):
            return orig(*args, **kwargs)
        try:
            board.collective_enter(code)
        except Exception:  # noqa: BLE001
            _log_once("collective_enter failed")
            return orig(*args, **kwargs)
        try:
            return orig(*args, **kwargs)
        finally:
            try:
                board.collective_exit()
            except Exception:  # noqa: BLE001
                _log_once("collective_exit failed")

    return collective


def installed() -> bool:
    return bool(_saved)


def install(import_module: Callable[[str], Any] = importlib.import_module) -> list[str]:
    """Wrap what this vLLM has of the targets above; returns what was wrapped. Idempotent.
    A missing target is skipped (logged at debug): the engine side still works without it."""
    if _saved:
        return [f"{getattr(obj, '__name__', obj)}.{name}" for obj, name, _, _ in _saved]
    planned: list[tuple[Any, str, Any]] = []
    try:
        module = import_module(_RPC_TARGET[0])
        cls = getattr(module, _RPC_TARGET[1])
        planned.append((cls, _RPC_TARGET[2], _wrap_rpc(getattr(cls, _RPC_TARGET[2]))))
    except Exception as e:  # noqa: BLE001
        log.debug("worker hooks: no %s (%s)", ".".join(_RPC_TARGET), e)
    try:
        group_cls = getattr(import_module(_GROUP_TARGET[0]), _GROUP_TARGET[1])
        for name in _GROUP_METHODS:
            orig = getattr(group_cls, name, None)
            if callable(orig):
                planned.append((group_cls, name,
                                _observe_collective(orig, COLLECTIVE_CODES[name], True)))
    except Exception as e:  # noqa: BLE001
        log.debug("worker hooks: no %s (%s)", ".".join(_GROUP_TARGET), e)
    try:
        dp_utils = import_module(_DP_UTILS[0])
        orig = getattr(dp_utils, _DP_UTILS[1])
        planned.append((dp_utils, _DP_UTILS[1],
                        _observe_collective(orig, COLLECTIVE_CODES["dp_coordinate"], False)))
    except Exception as e:  # noqa: BLE001
        log.debug("worker hooks: no %s (%s)", ".".join(_DP_UTILS), e)
    if not planned or planned[0][1] != _RPC_TARGET[2]:
        return []  # without the call hook no board record is ever created: wrap nothing
    for obj, name, wrapper in planned:
        had = name in vars(obj)
        _saved.append((obj, name, had, vars(obj).get(name)))
        setattr(obj, name, wrapper)
    return [f"{getattr(obj, '__name__', obj)}.{name}" for obj, name, _ in planned]


def uninstall() -> None:
    """Put every original back and remove this process's record (tests)."""
    global _board
    while _saved:
        obj, name, had, original = _saved.pop()
        if had:
            setattr(obj, name, original)
        else:
            delattr(obj, name)
    board, _board = _board, None
    if board is not None and board.pid == os.getpid():
        board.close()
