"""The worker board: where each worker process of a DP rank is, readable without the worker.

In vLLM the forward does not run in the engine core: each DP rank has worker processes
(``VLLM::Worker_DP<r>``) and the engine core waits for them. A rank wedged inside the forward
(a hung kernel, a stopped worker, a model collective that never completes) therefore shows
nothing on the engine side but "inside step". A stopped worker cannot answer a question, so
each worker *publishes* its position into a small shared-memory file that its engine core's
metrics thread reads at scrape time; a frozen worker's last position stays readable.

One file per worker process, ``<board dir>/w-<pid>``, 104 bytes of little-endian 8-byte fields::

    seq | pid | ppid | worker | call | call_since | calls | call_seconds
        | collective | collective_since | collectives | collective_seconds | heartbeat

- ``call``: code of the engine-to-worker call the worker is inside (index + 1 into
  ``names.WORKER_CALL_NAMES``, 0 none) since ``call_since`` (Unix seconds); ``calls`` /
  ``call_seconds``: calls completed and seconds spent inside them.
- ``collective``: code of the DP/EP model collective it is inside (index + 1 into
  ``names.MODEL_COLLECTIVE_NAMES``) since ``collective_since``; ``collectives`` is the
  sequence number (collectives entered), which lines ranks up: a rank whose workers are at a
  lower number than its peers' never reached the collective they wait in.
- ``heartbeat``: Unix seconds, written every ``HEARTBEAT_SECONDS`` by a thread of the worker.
  A worker waiting in a collective or a kernel releases the GIL, so its heartbeat goes on; a
  stale heartbeat means the whole process is frozen (stopped, or a C call holding the GIL),
  which names a frozen worker even when it stopped inside the collective its peers wait in.
- ``seq`` is a seqlock: odd while the worker writes. A reader retries until it sees the same
  even value before and after; a worker stopped *between* the two writes (SIGSTOP can land
  anywhere) leaves it odd forever, so after a bounded number of retries the reader takes the
  fields as they are (each field is one aligned 8-byte store, never torn on its own).

Writers are single-threaded (the worker's RPC thread). The engine core reads the files whose
``ppid`` is its own pid (the multiproc executor spawns its workers) or whose ``pid`` is its
own (a worker running inside the engine core).
"""

from __future__ import annotations

import mmap
import os
import struct
import threading
import time
from dataclasses import dataclass

from instrumented_core.diagnosis import WorkerNow
from instrumented_core.telemetry import names as n

__all__ = ["BoardWriter", "WorkerPosition", "board_dir", "read_board", "remove_board_files"]

ENV_BOARD_DIR = "INSTRUMENTED_CORE_WORKER_BOARD_DIR"

_HEADER = struct.Struct("<qqqq")  # seq, pid, ppid, worker
_SEQ = struct.Struct("<q")
_CALL_ENTER = struct.Struct("<qd")  # call, call_since
_CALL_EXIT = struct.Struct("<qdqd")  # call, call_since, calls, call_seconds
_COLL_ENTER = struct.Struct("<qdq")  # collective, collective_since, collectives
_COLL_EXIT = struct.Struct("<qdqd")  # collective, since, collectives, collective_seconds
_RECORD = struct.Struct("<qqqqqdqdqdqdd")
_HEARTBEAT = struct.Struct("<d")
_CALL_AT = 32
_COLL_AT = 64
_HEARTBEAT_AT = 96
SIZE = _RECORD.size  # 104
#: How often a worker's heartbeat thread writes its timestamp.
HEARTBEAT_SECONDS = 0.25
_READ_RETRIES = 50

CALL_CODES = {name: i + 1 for i, name in enumerate(n.WORKER_CALL_NAMES)}
COLLECTIVE_CODES = {name: i + 1 for i, name in enumerate(n.MODEL_COLLECTIVE_NAMES)}


def board_dir() -> str:
    """``INSTRUMENTED_CORE_WORKER_BOARD_DIR``, else a per-user directory in /dev/shm (RAM)."""
    configured = os.environ.get(ENV_BOARD_DIR)
    if configured:
        return configured
    base = "/dev/shm" if os.path.isdir("/dev/shm") else "/tmp"
    return os.path.join(base, f"instrumented_core-{os.getuid()}")


class BoardWriter:
    """One worker's record. Every method is a few ``struct.pack_into`` calls on an mmap."""

    def __init__(self, worker: int, directory: str | None = None) -> None:
        directory = directory or board_dir()
        os.makedirs(directory, mode=0o700, exist_ok=True)
        self.pid = os.getpid()
        self.path = os.path.join(directory, f"w-{self.pid}")
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(fd, SIZE)
            self._mm = mmap.mmap(fd, SIZE)
        finally:
            os.close(fd)
        self._seq = 0
        self._calls = 0
        self._call_seconds = 0.0
        self._call_since = 0.0
        self._collectives = 0
        self._coll_seconds = 0.0
        self._coll_since = 0.0
        self._depth = 0
        _HEADER.pack_into(self._mm, 0, 0, self.pid, os.getppid(), int(worker))
        self.beat()
        self._stop = threading.Event()
        self._heart: threading.Thread | None = None

    def beat(self) -> None:
        _HEARTBEAT.pack_into(self._mm, _HEARTBEAT_AT, time.time())

    def start_heartbeat(self, interval: float = HEARTBEAT_SECONDS) -> None:
        """A daemon thread writing the heartbeat every ``interval`` seconds until close()."""
        def run() -> None:
            while not self._stop.wait(interval):
                try:
                    self.beat()
                except ValueError:  # closed
                    return

        self._heart = threading.Thread(target=run, name="ic-worker-heartbeat", daemon=True)
        self._heart.start()

    def _begin(self) -> None:
        self._seq += 1
        _SEQ.pack_into(self._mm, 0, self._seq)

    def _end(self) -> None:
        self._seq += 1
        _SEQ.pack_into(self._mm, 0, self._seq)

    def call_enter(self, code: int) -> None:
        self._call_since = now = time.time()
        self._begin()
        _CALL_ENTER.pack_into(self._mm, _CALL_AT, code, now)
        self._end()

    def call_exit(self) -> None:
        self._calls += 1
        self._call_seconds += max(0.0, time.time() - self._call_since)
        self._begin()
        _CALL_EXIT.pack_into(self._mm, _CALL_AT, 0, 0.0, self._calls, self._call_seconds)
        self._end()

    def collective_enter(self, code: int) -> bool:
        """False (nothing written) when already inside one: only the outermost counts, so a
        ``dispatch`` built on ``all_gatherv`` is one collective, not two."""
        self._depth += 1
        if self._depth > 1:
            return False
        self._collectives += 1
        self._coll_since = now = time.time()
        self._begin()
        _COLL_ENTER.pack_into(self._mm, _COLL_AT, code, now, self._collectives)
        self._end()
        return True

    def collective_exit(self) -> None:
        self._depth -= 1
        if self._depth > 0:
            return
        self._depth = 0
        self._coll_seconds += max(0.0, time.time() - self._coll_since)
        self._begin()
        _COLL_EXIT.pack_into(self._mm, _COLL_AT, 0, 0.0, self._collectives, self._coll_seconds)
        self._end()

    def close(self, unlink: bool = True) -> None:
        self._stop.set()
        if self._heart is not None and self._heart is not threading.current_thread():
            self._heart.join(1.0)
        try:
            self._mm.close()
        finally:
            if unlink:
                try:
                    os.unlink(self.path)
                except FileNotFoundError:
                    pass


@dataclass(frozen=True)
class WorkerPosition:
    """One worker's last published position, as its engine core reads it."""

    pid: int
    worker: int
    call: str  # "" when not inside an engine-to-worker call
    call_since: float
    calls: int
    call_seconds: float
    collective: str  # "" when not inside a model collective
    collective_since: float
    collectives: int
    collective_seconds: float
    heartbeat: float = 0.0
    consistent: bool = True  # False: the worker stopped in the middle of a write

    def call_inside(self, now: float) -> float:
        return max(0.0, now - self.call_since) if self.call else 0.0

    def collective_inside(self, now: float) -> float:
        return max(0.0, now - self.collective_since) if self.collective else 0.0

    def heartbeat_age(self, now: float) -> float:
        return max(0.0, now - self.heartbeat) if self.heartbeat else 0.0

    def read_at(self, now: float) -> WorkerNow:
        """This record as the diagnosis reads a worker at ``now``
        (``diagnosis.worker_fields``: the rank's endpoint and the CPU cluster's hang report)."""
        return WorkerNow(call=self.call, call_seconds=self.call_inside(now),
                         collective=self.collective,
                         collective_seconds=self.collective_inside(now),
                         seq=self.collectives, heartbeat_age=self.heartbeat_age(now))


def _name(names: tuple[str, ...], code: int) -> str:
    return names[code - 1] if 0 < code <= len(names) else ""


def decode(raw: bytes, consistent: bool = True) -> tuple[int, WorkerPosition]:
    """``(ppid, position)`` of one record."""
    (_, pid, ppid, worker, call, call_since, calls, call_seconds, coll, coll_since, colls,
     coll_seconds, heartbeat) = _RECORD.unpack_from(raw)
    return ppid, WorkerPosition(pid, worker, _name(n.WORKER_CALL_NAMES, call), call_since,
                                calls, call_seconds, _name(n.MODEL_COLLECTIVE_NAMES, coll),
                                coll_since, colls, coll_seconds, heartbeat, consistent)


def _read_record(path: str) -> tuple[int, WorkerPosition] | None:
    try:
        with open(path, "rb", buffering=0) as f:
            raw = b""
            for _ in range(_READ_RETRIES):
                f.seek(0)
                raw = f.read(SIZE)
                if len(raw) < SIZE:
                    return None
                seq = _SEQ.unpack_from(raw)[0]
                if seq % 2:
                    continue  # a write in progress (or a worker stopped inside one)
                f.seek(0)
                if _SEQ.unpack_from(f.read(_SEQ.size))[0] == seq:
                    return decode(raw)
            return decode(raw, consistent=False)
    except (OSError, ValueError, struct.error):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_board(owner_pid: int | None = None, directory: str | None = None,
               collect_garbage: bool = True) -> list[WorkerPosition]:
    """Positions of the workers of engine core ``owner_pid`` (default: this process), by
    worker rank. Records of processes that no longer exist and whose owner is gone too are
    removed (a worker killed with SIGKILL cannot remove its own)."""
    owner = os.getpid() if owner_pid is None else owner_pid
    directory = directory or board_dir()
    try:
        entries = [e for e in os.scandir(directory) if e.name.startswith("w-")]
    except FileNotFoundError:
        return []
    found: list[WorkerPosition] = []
    for entry in entries:
        record = _read_record(entry.path)
        if record is None:
            continue
        ppid, pos = record
        if ppid == owner or pos.pid == owner:
            found.append(pos)
        elif collect_garbage and not _alive(pos.pid) and not _alive(ppid):
            try:
                os.unlink(entry.path)
            except OSError:
                pass
    return sorted(found, key=lambda p: p.worker)


def remove_board_files(owner_pid: int | None = None, directory: str | None = None) -> int:
    """Remove the records of ``owner_pid``'s workers (its busy loop ended); count removed."""
    owner = os.getpid() if owner_pid is None else owner_pid
    directory = directory or board_dir()
    removed = 0
    try:
        entries = [e for e in os.scandir(directory) if e.name.startswith("w-")]
    except FileNotFoundError:
        return 0
    for entry in entries:
        record = _read_record(entry.path)
        if record is not None and (record[0] == owner or record[1].pid == owner):
            try:
                os.unlink(entry.path)
                removed += 1
            except OSError:
                pass
    return removed
