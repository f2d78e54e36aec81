"""Every way of stopping a demo takes its whole process tree down.

- ``SIGINT``, ``SIGTERM`` and ``SIGHUP`` (Ctrl-C, ``timeout``/systemd/Kubernetes, a closed
  terminal) raise :class:`Stopped` in the main thread, once: the demo's ``finally`` then stops
  its engine (every rank, coordinator and vLLM process) and still writes what the run has. A
  second signal while that clean-up runs is recorded, not raised, so the clean-up finishes.
- A parent that dies without a word (``SIGKILL``, a crash) cannot run any clean-up, so each
  child the CPU cluster spawns asks Linux to kill it when its parent goes
  (:func:`die_with_parent`, ``PR_SET_PDEATHSIG``); the ports they held are then free.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

__all__ = ["STOP_SIGNALS", "Stopped", "die_with_parent", "spawn_target", "stop_signals"]

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_PR_SET_PDEATHSIG = 1


class Stopped(BaseException):
    """The run was told to stop by ``signum``; not an error of the run."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


class _StopState:
    def __init__(self) -> None:
        self.raised: Stopped | None = None
        self.cleaning = False

    def handler(self, signum: int, frame: FrameType | None) -> None:
        if self.raised is None and not self.cleaning:
            self.raised = Stopped(signum)
            raise self.raised
        if self.raised is None:
            self.raised = Stopped(signum)  # during clean-up: remembered, clean-up goes on

    def clean_up(self) -> None:
        """From here on, signals are remembered but never interrupt."""
        self.cleaning = True


@contextmanager
def stop_signals() -> Iterator[_StopState]:
    """Within the block, the stop signals raise :class:`Stopped` once; the previous handlers
    come back afterwards. Call ``.clean_up()`` on entering the clean-up."""
    state = _StopState()
    previous: dict[int, Any] = {}
    for sig in STOP_SIGNALS:
        previous[sig] = signal.signal(sig, state.handler)
    try:
        yield state
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def die_with_parent(sig: int = signal.SIGKILL, parent: int | None = None) -> None:
    """Ask Linux to send ``sig`` to this process when its parent dies; exit at once if the
    parent (``parent``, when known) is already gone. No-op off Linux."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
        return  # best effort: the parent's own clean-up still ends this process
    if parent is not None and os.getppid() != parent:
        os._exit(1)  # the parent died before the request took effect


def spawn_target(parent: int | None, target: Callable[..., Any], *args: Any) -> Any:
    """Process entry point that dies with ``parent`` (unless None) and then runs
    ``target(*args)`` (a module-level function, so a ``spawn`` context can pickle it).

    Linux ties the death signal to the parent *thread* that started the child: pass None
    when that thread may end before the process does."""
    if parent is not None:
        die_with_parent(parent=parent)
    return target(*args)
