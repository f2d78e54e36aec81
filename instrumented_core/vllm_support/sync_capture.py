"""The ``ParallelConfig.sync_dp_state`` wrapper: one sync round, with the summed votes.

``sync_dp_state`` returns only ``(has_unfinished_global, consensus)``. To report the number of
ranks voting to pause, during the call (and only on the calling thread) the all-reduce it looks
up at call time (0.32: ``torch.distributed.all_reduce``; 0.33: the config module's
``cpu_all_reduce_``) is replaced by a pass-through that reads the summed tensor after the
original reduced it. Without that hook the votes are inferred from the inputs and the result
(exact at DP=2 except "I don't vote, someone has work": reported as 0).
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable
from typing import Any

from instrumented_core.protocol import SyncResult, decode_sync_state
from instrumented_core.telemetry import names as n
from instrumented_core.vllm_support.observer import EngineObserver, current, log_once

__all__ = ["make_sync_dp_state"]

WRAPPED_MARK = "_instrumented_core_wrapped"


def make_sync_dp_state(orig: Callable, flavour: str, hook: tuple[Any, str] | None) -> Callable:
    """``sync_dp_state`` wrapper (static in 0.21-0.32, a method in 0.33): one sync round."""
    offset = 1 if flavour == "method" else 0  # skip ``self`` (the ParallelConfig)

    def observed(args: tuple, kwargs: dict) -> Any:
        obs: EngineObserver | None = getattr(current, "observer", None)
        if obs is None:  # not called from an instrumented engine's step
            return orig(*args, **kwargs)
        pos = args[offset:]
        has_unfinished = bool(pos[1] if len(pos) > 1 else kwargs.get("has_unfinished", False))
        pending = bool(pos[2] if len(pos) > 2 else kwargs.get("pending_pause", False))
        group = pos[0] if pos else kwargs.get("dp_group")
        try:
            obs.note_group(group)
        except Exception:  # noqa: BLE001
            log_once("group", "instrumented_core: DP group observation failed")
        obs.probe.sync_begin(has_unfinished, pending)
        captured: list[list[int]] = []
        if hook is not None:
            _capture_begin(hook, captured)
        started = time.perf_counter()
        ok = False
        try:
            result = orig(*args, **kwargs)
            ok = True
        finally:
            if hook is not None:
                _capture_end(hook)
            if not ok:  # the all-reduce raised: out of it, and no round completed
                obs.probe.collective_end(n.COLLECTIVE_SYNC, time.perf_counter() - started)
        seconds = time.perf_counter() - started
        try:
            dp_size = obs.dp_size()
            if captured and len(captured[-1]) >= 2:
                sync = decode_sync_state(captured[-1][:2], dp_size)
            else:
                global_unfinished, consensus = result
                votes = dp_size if consensus else int(pending)
                sync = SyncResult(bool(global_unfinished), votes, dp_size)
            obs.sync_rounds += 1
            obs.probe.sync_end(sync, seconds)
            if sync.consensus:
                obs.consensus_seen = True
        except Exception:  # noqa: BLE001
            log_once("sync", "instrumented_core: sync round observation failed")
        return result

    if flavour == "static":
        @functools.wraps(orig)
        def sync_dp_state(*args, **kwargs):
            return observed(args, kwargs)

        wrapped: Any = staticmethod(sync_dp_state)
    else:
        @functools.wraps(orig)
        def sync_dp_state(*args, **kwargs):  # type: ignore[no-redef]
            return observed(args, kwargs)

        wrapped = sync_dp_state
    sync_dp_state.__dict__[WRAPPED_MARK] = True
    return wrapped


_capture_lock = threading.Lock()
#: per hook: [rounds in flight, the original, the pass-through]
_installed: dict[tuple[int, str], list[Any]] = {}
_capturing = threading.local()


def _capture_begin(hook: tuple[Any, str], captured: list) -> None:
    """Collect this thread's reduced tensors into ``captured`` until :func:`_capture_end`;
    the first round in flight swaps ``namespace.attr`` for the pass-through."""
    namespace, attr = hook
    _capturing.into = captured
    key = (id(namespace), attr)
    with _capture_lock:
        entry = _installed.get(key)
        if entry is None:
            real = getattr(namespace, attr)

            def capture(tensor, *args, **kwargs):
                out = real(tensor, *args, **kwargs)
                into = getattr(_capturing, "into", None)
                if into is not None:
                    try:
                        into.append([int(v) for v in tensor.tolist()])
                    except Exception:  # noqa: BLE001 - the reduce itself succeeded
                        pass
                return out

            entry = _installed[key] = [0, real, capture]
            setattr(namespace, attr, capture)
        entry[0] += 1


def _capture_end(hook: tuple[Any, str]) -> None:
    """Stop collecting on this thread; the last round in flight puts the original back."""
    namespace, attr = hook
    _capturing.into = None
    key = (id(namespace), attr)
    with _capture_lock:
        entry = _installed.get(key)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] <= 0:
            del _installed[key]
            if getattr(namespace, attr, None) is entry[2]:
                setattr(namespace, attr, entry[1])
