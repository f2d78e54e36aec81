"""The watchdog that takes a dead demo's tree down (processes we do not spawn ourselves, such
as vLLM's engine cores, cannot ask Linux to die with their parent): real processes, no engine.

A parent starts the watchdog and a grandchild that ignores SIGTERM and would live a minute;
the parent is killed with SIGKILL (no clean-up runs); the grandchild must die within a few
seconds and the watchdog must exit. A parent that stops the watchdog itself (its clean-up ran)
leaves nothing behind either.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from instrumented_core.stopping import alive

PARENT = """
import signal, subprocess, sys, time
from instrumented_core.stopping import TreeWatchdog
child = subprocess.Popen([sys.executable, "-c", GRANDCHILD], stdout=subprocess.PIPE, text=True)
shm = child.stdout.readline().strip()  # it holds a segment now
dog = TreeWatchdog(interval=0.1)  # returns once the grandchild is noted
print(dog.proc.pid, child.pid, shm, flush=True)
if sys.argv[1] == "clean":
    child.kill(); child.wait(); dog.stop()
    print("done", flush=True)
time.sleep(60)
"""
# ignores SIGTERM; holds a shared-memory segment nobody else would remove (as vLLM's queues)
GRANDCHILD = """
import signal, time
from multiprocessing import resource_tracker, shared_memory
signal.signal(signal.SIGTERM, signal.SIG_IGN)
shm = shared_memory.SharedMemory(create=True, size=4096)
resource_tracker.unregister(shm._name, "shared_memory")
print("/dev/shm/" + shm.name.lstrip("/"), flush=True)
time.sleep(60)
"""
PARENT = PARENT.replace("GRANDCHILD", repr(GRANDCHILD))


def _wait_gone(pids: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [p for p in pids if alive(p)]


def _parent(mode: str) -> tuple[subprocess.Popen, int, int, str]:
    proc = subprocess.Popen([sys.executable, "-c", PARENT, mode], stdout=subprocess.PIPE,
                            text=True, start_new_session=True)
    dog, child, shm = proc.stdout.readline().split()
    return proc, int(dog), int(child), shm


def _remove(path: str) -> None:
    if os.path.exists(path):
        os.unlink(path)


def test_a_parent_killed_without_a_word_takes_its_descendants_with_it():
    proc, dog, child, shm = _parent("kill")
    try:
        assert os.path.exists(shm)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        assert _wait_gone([child, dog], 5) == [], "the grandchild or the watchdog survived"
        assert not os.path.exists(shm)  # and the shared memory it held went with it
    finally:
        for pid in (child, dog):
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        _remove(shm)


def test_a_parent_that_cleaned_up_stops_its_watchdog():
    proc, dog, child, shm = _parent("clean")
    try:
        assert proc.stdout.readline().strip() == "done"
        assert _wait_gone([child, dog], 5) == []
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        _remove(shm)  # a clean-up that kills its child owns its shared memory
