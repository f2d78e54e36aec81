"""The real-vLLM harness's own bookkeeping, without an engine (fast layer).

- The close path removes the POSIX shared memory (``/dev/shm/psm_*``) that the engine's own
  processes held, and nothing else: a killed vLLM engine core never unlinks its message
  queues, and a segment of any other process (here: this one's) must survive.
- The file-armed test-only stall (``IC_TEST_STALL_SYNC_FILE``) fires once, on the rank the file
  names.
"""

from __future__ import annotations

import os
import subprocess
import sys
from multiprocessing import shared_memory

import pytest

from instrumented_core.vllm_support.engine import TreeMonitor
from instrumented_core_testing import faults

pytest.importorskip("psutil")

CHILD = """
import sys, time
from multiprocessing import resource_tracker, shared_memory
shm = shared_memory.SharedMemory(create=True, size=4096)
resource_tracker.unregister(shm._name, "shared_memory")  # as vLLM's queues: nobody cleans up
print(shm.name, flush=True)
time.sleep(60)
"""


def test_close_path_removes_only_the_shared_memory_its_own_processes_held():
    ours = shared_memory.SharedMemory(create=True, size=4096)  # held by this process only
    monitor = TreeMonitor()
    child = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        theirs = "/dev/shm/" + child.stdout.readline().strip().lstrip("/")
        assert os.path.exists(theirs)
        monitor.sample()
        assert monitor.note_shm() == {theirs}  # the child's, never this process's own
        monitor.kill_children(grace=5.0)
        assert child.wait(10) is not None and os.path.exists(theirs)  # killed: left behind
        assert monitor.unlink_shm() == [theirs]
        assert not os.path.exists(theirs)
        assert os.path.exists(f"/dev/shm/{ours.name.lstrip('/')}")
        assert monitor.survivors() == []
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)
        ours.close()
        ours.unlink()


def test_a_file_armed_stall_fires_once_on_the_rank_it_names(tmp_path):
    arm = str(tmp_path / "arm")
    assert faults._take_armed(arm, 1) is None  # absent: inert
    faults.arm_sync_stall(arm, rank=1, seconds=12)
    assert faults._take_armed(arm, 0) is None and os.path.exists(arm)  # not rank 0's
    assert faults._take_armed(arm, 1) == 12.0
    assert not os.path.exists(arm)  # taken: one stall per arming
    assert faults._take_armed(arm, 1) is None
