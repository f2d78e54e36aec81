"""Every way of stopping a demo takes its whole process tree down.

- ``SIGINT``, ``SIGTERM`` and ``SIGHUP`` (Ctrl-C, ``timeout``/systemd/Kubernetes, a closed
  terminal) raise :class:`Stopped` in the main thread, once: the demo's ``finally`` then stops
  its engine (every rank, coordinator and vLLM process) and still writes what the run has. A
  second signal while that clean-up runs is recorded, not raised, so the clean-up finishes.
- A parent that dies without a word (``SIGKILL``, a crash) cannot run any clean-up, so each
  child the CPU cluster spawns asks Linux to kill it when its parent goes
  (:func:`die_with_parent`, ``PR_SET_PDEATHSIG``); the ports they held are then free.
- Processes we do not spawn ourselves (vLLM's coordinator, engine cores and workers) cannot be
  asked that, so the demo also starts a :class:`TreeWatchdog`: a small process in its own
  session that notes the demo's descendants every half second and kills them once the demo is
  gone, then removes the POSIX shared memory they held (vLLM's message queues between an
  engine core and its workers, ``/dev/shm/psm_*``: a killed engine core never unlinks them).
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

__all__ = ["SHM_PREFIX", "STOP_SIGNALS", "Stopped", "TreeWatchdog", "alive", "descendants",
           "die_with_parent", "shared_memory_held", "spawn_target", "stop_signals"]

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


# ----------------------------------------------------------------------------------------------
# the watchdog: kills a dead process's descendants (those not spawned by us)
# ----------------------------------------------------------------------------------------------


def _start_time(pid: int) -> str | None:
    """The live process's start time in clock ticks (tells it from a reused pid); None when
    it is gone or a zombie (dead, not yet reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if len(fields) < 20 or fields[0] == "Z" else fields[19]


def descendants(root: int) -> list[int]:
    """Every live process below ``root`` now (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


#: POSIX shared memory made by ``multiprocessing.shared_memory`` (vLLM's message queues)
SHM_PREFIX = "/dev/shm/psm_"


def shared_memory_held(pids: Iterable[int]) -> set[str]:
    """The ``/dev/shm/psm_*`` segments the processes ``pids`` hold open now (from their file
    descriptors; a segment already unlinked is not listed)."""
    held = set()
    for pid in pids:
        fd_dir = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"{fd_dir}/{fd}")
            except OSError:
                continue
            if target.startswith(SHM_PREFIX) and not target.endswith(" (deleted)"):
                held.add(target)
    return held


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not)."""
    return _start_time(pid) is not None


def _watch(parent: int, started: str, interval: float) -> None:
    """The watchdog's loop: note ``parent``'s descendants (and the shared memory they hold)
    until it is gone, then kill them and remove that shared memory."""
    me = os.getpid()
    seen: dict[int, str] = {}
    shm: set[str] = set()
    ready = False
    while _start_time(parent) == started:
        for pid in descendants(parent):
            if pid != me and pid not in seen:
                stamp = _start_time(pid)
                if stamp is not None:
                    seen[pid] = stamp
        shm |= shared_memory_held(pid for pid, stamp in seen.items()
                                  if _start_time(pid) == stamp)
        if not ready:  # the tree as it was at the start is noted
            sys.stdout.write("ready\n")
            sys.stdout.close()
            ready = True
        time.sleep(interval)
    for pid, stamp in seen.items():
        if _start_time(pid) == stamp:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
    for path in shm:
        try:
            os.unlink(path)
        except OSError:
            pass


class TreeWatchdog:
    """Kills this process's descendants if this process dies without cleaning up (Linux).
    Once constructed, every process already below this one is noted; later ones within
    ``interval`` seconds."""

    def __init__(self, interval: float = 0.5) -> None:
        self.proc: subprocess.Popen | None = None
        started = _start_time(os.getpid())
        if started is None:
            return  # no /proc: nothing to watch with
        # its own session: the terminal's Ctrl-C or a group kill must not end it first
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "instrumented_core.stopping", str(os.getpid()), started,
             str(interval)], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, start_new_session=True)  # holds none of our pipes
        assert self.proc.stdout is not None
        self.proc.stdout.readline()  # returns once the current tree is noted (or it died)
        self.proc.stdout.close()

    def stop(self) -> None:
        """The clean-up ran: the watchdog is not needed any more."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


if __name__ == "__main__":
    _watch(int(sys.argv[1]), sys.argv[2], float(sys.argv[3]))
