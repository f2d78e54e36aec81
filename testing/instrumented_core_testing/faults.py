"""TEST-ONLY fault injection into vLLM's DP engine.

- ``IC_TEST_STALL_SYNC_RANK``: one rank stalls before its sync all-reduce (below).
- ``IC_TEST_STALL_SYNC_FILE=<path>``: the same stall, armed at run time: when the file exists
  and holds ``"<rank> <seconds>"``, that rank's next sync round of a pending pause removes the
  file and stalls ``<seconds>`` (one stall per write of the file). Inert while it is absent,
  so an engine started with it serves normally until a test arms it.
- ``IC_TEST_WEDGE_FILE=<path>``: while that file exists, every worker's next
  ``coordinate_batch_across_dp`` all-reduce blocks *inside* the collective (after the worker
  board recorded its entry) until the file is removed: every rank's workers wedged in the same
  model collective, as with a partitioned collective network. Inert while the file is absent.

Inert unless ``IC_TEST_STALL_SYNC_RANK`` is set (in the environment of the process that starts
vLLM; engine cores inherit it). Then, on that DP rank, the first ``ParallelConfig.sync_dp_state``
call made while a pause is pending (``pending_pause=True``) sleeps
``IC_TEST_STALL_SYNC_SECONDS`` (default 20) *before* the all-reduce: its peers wait inside the
all-reduce, exactly what a rank wedged on its way to the sync round looks like. The sleep runs
outside the instrumentor's observation of the call (this wrapper is installed after it and so
sits outside it), so the stalled rank is reported as not inside the collective.

Loaded by the test-only plugin entry point ``instrumented_core_legacy_pause``
(:func:`instrumented_core_testing.legacy_pause.register`), after the instrumentor.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

__all__ = ["ENV_STALL_FILE", "ENV_STALL_RANK", "ENV_STALL_SECONDS", "ENV_WEDGE_FILE",
           "arm_sync_stall", "install_model_wedge", "install_sync_stall", "register"]

log = logging.getLogger(__name__)

ENV_WEDGE_FILE = "IC_TEST_WEDGE_FILE"
ENV_STALL_RANK = "IC_TEST_STALL_SYNC_RANK"
ENV_STALL_SECONDS = "IC_TEST_STALL_SYNC_SECONDS"
ENV_STALL_FILE = "IC_TEST_STALL_SYNC_FILE"
#: pauses (consensus reached on this rank) to let through before the stall arms (default 0)
ENV_STALL_SKIP_PAUSES = "IC_TEST_STALL_SYNC_SKIP_PAUSES"
_MARK = "_instrumented_core_stall"


def arm_sync_stall(path: str | os.PathLike[str], rank: int, seconds: float) -> None:
    """Arm the file-armed stall (``IC_TEST_STALL_SYNC_FILE``): written whole, then renamed, so
    a rank never reads half of it."""
    tmp = f"{os.fspath(path)}.tmp"
    with open(tmp, "w") as f:
        f.write(f"{rank} {seconds}\n")
    os.replace(tmp, path)


def _take_armed(path: str, rank: int) -> float | None:
    """The seconds to stall if ``path`` arms ``rank`` (the file is removed: one stall)."""
    try:
        with open(path) as f:
            armed_rank, seconds = f.read().split()[:2]
        if int(armed_rank) != rank:
            return None
        os.unlink(path)
        return float(seconds)
    except (OSError, ValueError):
        return None


def install_sync_stall(rank: int | None, seconds: float = 0.0, skip_pauses: int = 0,
                       arm_file: str | None = None) -> bool:
    """Wrap ``ParallelConfig.sync_dp_state`` (0.32 static or 0.33 method). False if present.

    ``rank``: the rank that stalls once, ``seconds``, after ``skip_pauses`` pauses; and/or
    ``arm_file``: a stall whenever that file arms this rank (:func:`arm_sync_stall`)."""
    import inspect

    from vllm.config import ParallelConfig

    raw = inspect.getattr_static(ParallelConfig, "sync_dp_state")
    static = isinstance(raw, staticmethod)
    orig = raw.__func__ if static else raw
    if getattr(orig, _MARK, False):
        return False
    offset = 0 if static else 1
    fired = threading.Event()
    pauses_done = [0]  # consensus rounds seen on this rank (only the engine thread calls us)

    def sync_dp_state(*args: Any, **kwargs: Any) -> Any:
        pos = args[offset:]
        pending = pos[2] if len(pos) > 2 else kwargs.get("pending_pause", False)
        group = pos[0] if pos else kwargs.get("dp_group")
        mine = pending and group is not None and group.rank() == rank
        stall = None
        if mine and not fired.is_set() and pauses_done[0] >= skip_pauses:
            fired.set()
            stall = seconds
        elif pending and group is not None and arm_file:
            stall = _take_armed(arm_file, group.rank())
        if stall is not None:
            log.warning("TEST-ONLY: DP rank %d stalls %.1f s before sync_dp_state",
                        group.rank(), stall)
            time.sleep(stall)
        result = orig(*args, **kwargs)
        if mine:
            try:
                if result[1]:  # (has_unfinished, pause_consensus): this pause is complete
                    pauses_done[0] += 1
            except (TypeError, IndexError):
                pass
        return result

    sync_dp_state.__dict__[_MARK] = True
    ParallelConfig.sync_dp_state = staticmethod(sync_dp_state) if static else sync_dp_state
    return True


class _WedgingDist:
    """``torch.distributed`` as ``dp_utils`` sees it, but ``all_reduce`` waits while the
    arm file exists (inside the worker's observed model collective)."""

    def __init__(self, real: Any, path: str) -> None:
        self._real = real
        self._path = path

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def all_reduce(self, *args: Any, **kwargs: Any) -> Any:
        if os.path.exists(self._path):
            log.warning("TEST-ONLY: model collective wedged while %s exists", self._path)
            while os.path.exists(self._path):
                time.sleep(0.05)
        return self._real.all_reduce(*args, **kwargs)


def install_model_wedge(path: str) -> bool:
    """Swap ``vllm.v1.worker.dp_utils.dist`` for the wedging proxy. False if already there."""
    from vllm.v1.worker import dp_utils

    if isinstance(dp_utils.dist, _WedgingDist):
        return False
    dp_utils.dist = _WedgingDist(dp_utils.dist, path)
    return True


def register() -> None:
    wedge = os.environ.get(ENV_WEDGE_FILE, "").strip()
    if wedge:
        try:
            if install_model_wedge(wedge):
                log.warning("TEST-ONLY model-collective wedge armed by %s (pid %d)", wedge,
                            os.getpid())
        except Exception:
            log.exception("fault injection plugin failed; vLLM left unchanged")
    raw = os.environ.get(ENV_STALL_RANK, "").strip()
    arm_file = os.environ.get(ENV_STALL_FILE, "").strip() or None
    if not raw and not arm_file:
        return
    try:
        rank = int(raw) if raw else None
        seconds = float(os.environ.get(ENV_STALL_SECONDS, "20"))
        skip = int(os.environ.get(ENV_STALL_SKIP_PAUSES, "0") or 0)
        if install_sync_stall(rank, seconds, skip, arm_file):
            log.warning("TEST-ONLY sync stall installed in pid %d (rank %s, %.1f s; armed by "
                        "%s)", os.getpid(), rank, seconds, arm_file)
    except Exception:
        log.exception("fault injection plugin failed; vLLM left unchanged")
