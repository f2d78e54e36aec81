"""The client side of the CPU reference cluster: start, drive and stop N real rank processes.

``Cluster`` plays vLLM's ``DPAsyncMPClient``: it routes requests to a chosen or least-loaded
rank (notifying the coordinator when the engines are idle, as vLLM's client does with
``FIRST_REQ``), and fans utility calls (pause, resume, barrier, collective_rpc) out to the
ranks. A call that does not finish within ``hang_timeout`` raises ``CollectiveHang`` with a
verdict naming which rank sits in which collective, instead of waiting for Gloo's timeout.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing as mp
import os
import queue
import socket
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field

from instrumented_core.cluster import messages as msg
from instrumented_core.cluster.config import ClusterConfig
from instrumented_core.cluster.coordinator import coordinator_main
from instrumented_core.cluster.rank import rank_main
from instrumented_core.cluster.status import FIELDS, StatusBoard
from instrumented_core.diagnosis import RankView, Verdict, diagnose, worker_fields
from instrumented_core.protocol import check_pause_mode
from instrumented_core.stopping import spawn_target
from instrumented_core.telemetry.worker_board import read_board, remove_board_files

log = logging.getLogger(__name__)


class ClusterError(RuntimeError):
    """The cluster could not start or a call failed; the message says which rank and why."""


class CollectiveHang(ClusterError):
    """A fan-out call did not finish in time; ``verdict`` names the ranks and collectives."""

    def __init__(self, what: str, verdict: Verdict) -> None:
        detail = "; ".join(verdict.details)
        super().__init__(f"{what} did not finish: {verdict.kind}: {verdict.summary}"
                         + (f" [{detail}]" if detail else ""))
        self.verdict = verdict


#: start-up attempts when the rendezvous port was taken between choosing and binding it
START_ATTEMPTS = 3


def _address_in_use(error: str) -> bool:
    return "EADDRINUSE" in error or "address already in use" in error.lower()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class RequestHandle:
    req_id: str
    rank: int
    future: Future = field(default_factory=Future)

    def result(self, timeout: float | None = None) -> str:
        """'completed' or 'aborted'."""
        return self.future.result(timeout)[0]


class Cluster:
    def __init__(self, config: ClusterConfig | None = None) -> None:
        self.config = (config or ClusterConfig()).validate()
        if not self.config.hosts:  # ranks on other hosts bind in their own namespaces
            self.config.telemetry.check_ports_free(self.config.ranks)
        self.metrics_urls: list[str | None] = [None] * self.config.ranks
        self.pids: list[int] = [0] * self.config.ranks
        self.rank_errors: list[str] = []
        self.finished: dict[str, list[str]] = {}  # req_id -> outcomes received (exactly once)
        self.current_wave = 0
        self.engines_running = False
        self._lock = threading.Lock()
        self._calls: dict[tuple[int, int], Future] = {}
        self._requests: dict[str, RequestHandle] = {}
        self._outstanding = [0] * self.config.ranks
        self._call_ids = itertools.count(1)
        self._wave_ids = itertools.count(1)
        self.injected_waves: dict[int, dict[int, str]] = {}  # inject id -> rank -> outcome
        self._req_ids = itertools.count(1)
        self._procs: list = []
        self._started = False
        self._stop_reader = threading.Event()
        self._tracer = None
        self._provider = None

    # -- lifecycle ------------------------------------------------------------------------

    def __enter__(self) -> Cluster:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> Cluster:
        """Start the coordinator and the ranks; return once every rank is ready.

        The Gloo rendezvous port is chosen free just before rank 0 binds it, so another
        process may take it in between (EADDRINUSE): then the start is retried on a new port,
        up to ``START_ATTEMPTS`` times."""
        for attempt in range(1, START_ATTEMPTS + 1):
            try:
                return self._start_once()
            except ClusterError as e:
                if attempt == START_ATTEMPTS or not _address_in_use(str(e)):
                    raise
                log.warning("rendezvous port taken by another process during start-up; "
                            "retrying on a new port (attempt %d of %d)", attempt + 1,
                            START_ATTEMPTS)
        raise AssertionError("unreachable")

    def _start_once(self) -> Cluster:
        cfg = self.config
        self.pids = [0] * cfg.ranks
        self.rank_errors = []
        self._stop_reader = threading.Event()
        self._provider = self._tracer = None
        ctx = mp.get_context("spawn")
        self._board_array = ctx.Array("d", cfg.ranks * FIELDS, lock=False)
        self.board = StatusBoard(self._board_array, cfg.ranks)
        self._inboxes = [ctx.Queue() for _ in range(cfg.ranks)]
        self._outbox = ctx.Queue()
        self._coord_inbox = ctx.Queue()
        # a plain shared flag, polled by the ranks: an mp.Event's set() waits for every
        # sleeping waiter to wake, and blocks forever once a waiting rank has died
        self._stop_flag = ctx.RawValue("b", 0)
        master_port = free_port()
        # children die with this process even when it is killed without a word (the death
        # signal follows the starting thread: only the main thread outlives the cluster)
        parent = os.getpid() if threading.current_thread() is threading.main_thread() else None
        self._coordinator = ctx.Process(target=spawn_target, name="dp-coordinator",
                                        args=(parent, coordinator_main, self._coord_inbox,
                                              self._inboxes, self._outbox),
                                        daemon=True)
        self._ranks = [ctx.Process(target=spawn_target, name=f"dp-rank-{r}", daemon=True,
                                   args=(parent, rank_main, r, cfg, master_port,
                                         self._inboxes[r], self._outbox, self._coord_inbox,
                                         self._board_array, self._stop_flag))
                       for r in range(cfg.ranks)]
        self._procs = [self._coordinator, *self._ranks]
        self._ready = [threading.Event() for _ in range(cfg.ranks)]
        self._startup_errors: list[str] = []
        self._started = True
        self._setup_client_tracing()
        self._reader = threading.Thread(target=self._read_outputs, name="cluster-reader",
                                        daemon=True)
        self._reader.start()
        for p in self._procs:
            p.start()
        deadline = time.monotonic() + cfg.start_timeout
        try:
            for r, ready in enumerate(self._ready):
                while not ready.wait(0.1):
                    if self._startup_errors:
                        raise ClusterError(self._startup_errors[0])
                    if not self._ranks[r].is_alive():
                        raise ClusterError(f"rank {r} exited during start-up (exit code "
                                           f"{self._ranks[r].exitcode})")
                    if time.monotonic() > deadline:
                        raise ClusterError(f"rank {r} did not start within {cfg.start_timeout} s")
            if self._startup_errors:
                raise ClusterError(self._startup_errors[0])
        except BaseException:
            self.stop()
            raise
        return self

    def _setup_client_tracing(self) -> None:
        tel = self.config.telemetry
        if not tel.enabled or tel.span_exporter == "none":
            return
        from instrumented_core.telemetry.names import TRACER_NAME
        from instrumented_core.telemetry.tracing import make_tracer_provider

        self._provider = make_tracer_provider(tel, -1, self.config.ranks, lambda count: None,
                                              instance="dp-client")
        self._tracer = self._provider.get_tracer(TRACER_NAME) if self._provider else None

    def stop(self, timeout: float = 5.0) -> None:
        """End every process: polite shutdown, then terminate, then kill. Idempotent."""
        if not self._started:
            return
        self._started = False
        self._stop_flag.value = 1
        for inbox in self._inboxes:
            _put_quietly(inbox, (msg.SHUTDOWN,))
        _put_quietly(self._coord_inbox, (msg.SHUTDOWN,))
        deadline = time.monotonic() + timeout
        for p in self._procs:
            if p.pid is not None:
                p.join(max(0.0, deadline - time.monotonic()))
        for p in self._procs:
            if p.is_alive():
                p.terminate()
        for p in self._procs:
            if p.pid is not None:
                p.join(2.0)
                if p.is_alive():
                    p.kill()
                    p.join(2.0)
        self._stop_reader.set()
        self._reader.join(2.0)
        if self._provider is not None:
            self._provider.shutdown()
        with self._lock:
            pending = list(self._calls.values()) + [h.future for h in self._requests.values()]
            self._calls.clear()
        for fut in pending:
            if not fut.done():
                fut.set_exception(ClusterError("cluster stopped before the call finished"))
        for pid in self.pids:
            if pid:  # a killed (or `dead`) rank could not remove its worker's record
                remove_board_files(pid)
        for q in (*self._inboxes, self._outbox, self._coord_inbox):
            q.cancel_join_thread()
            q.close()
        # drop the queues now so their semaphores are released before interpreter exit
        self._inboxes, self._outbox, self._coord_inbox = [], None, None

    def _check_running(self) -> None:
        if not self._started:
            raise ClusterError("the cluster is not running: start() it (or use `with Cluster(...)`)")

    def alive(self) -> list[bool]:
        return [p.is_alive() for p in self._ranks]

    # -- outputs --------------------------------------------------------------------------

    def _read_outputs(self) -> None:
        while not self._stop_reader.is_set():
            try:
                message = self._outbox.get(timeout=0.2)
            except (queue.Empty, OSError, EOFError, ValueError):
                continue
            kind = message[0]
            if kind == msg.READY:
                _, rank, url, pid = message
                self.metrics_urls[rank], self.pids[rank] = url, pid
                self._ready[rank].set()
            elif kind == msg.STARTUP_ERROR:
                self._startup_errors.append(message[2])
            elif kind == msg.FINISHED:
                _, rank, req_id, outcome, tokens = message
                with self._lock:
                    self.finished.setdefault(req_id, []).append(outcome)
                    handle = self._requests.pop(req_id, None)
                    if handle is not None:
                        self._outstanding[handle.rank] -= 1
                if handle is not None and not handle.future.done():
                    handle.future.set_result((outcome, tokens))
            elif kind == msg.UTILITY_RESULT:
                _, rank, call_id, ok, value = message
                with self._lock:
                    fut = self._calls.pop((rank, call_id), None)
                if fut is not None and not fut.done():
                    if ok:
                        fut.set_result(value)
                    else:
                        fut.set_exception(ClusterError(f"rank {rank}: {value}"))
            elif kind == msg.WAVE_HANDLED:
                _, rank, inject_id, outcome = message
                with self._lock:
                    self.injected_waves.setdefault(inject_id, {})[rank] = outcome
            elif kind == msg.RANK_ERROR:
                self.rank_errors.append(message[2])
            elif kind == msg.WAVE_STATE:
                _, self.current_wave, self.engines_running = message

    # -- requests -------------------------------------------------------------------------

    def generate(self, num_tokens: int = 8, rank: int | None = None) -> RequestHandle:
        """Submit a request needing ``num_tokens`` steps, to ``rank`` or the least loaded."""
        if num_tokens < 1:
            raise ValueError("num_tokens must be >= 1")
        self._check_running()
        with self._lock:
            if rank is None:
                rank = min(range(self.config.ranks), key=lambda r: self._outstanding[r])
            if not 0 <= rank < self.config.ranks:
                raise ValueError(f"rank {rank} out of range 0..{self.config.ranks - 1}")
            handle = RequestHandle(f"req-{next(self._req_ids)}", rank)
            self._requests[handle.req_id] = handle
            self._outstanding[rank] += 1
            wave = self.current_wave
            notify = not self.engines_running
            if notify:
                self.engines_running = True
        self._inboxes[rank].put((msg.ADD, handle.req_id, num_tokens, wave))
        if notify:
            self._coord_inbox.put((msg.FIRST_REQ, msg.engine_identity(rank), wave))
        return handle

    # -- utility calls --------------------------------------------------------------------

    def call(self, rank: int, method: str, *args) -> Future:
        """Send one utility call to one rank (the staggered barrier needs this)."""
        self._check_running()
        fut: Future = Future()
        with self._lock:
            call_id = next(self._call_ids)
            self._calls[(rank, call_id)] = fut
        self._inboxes[rank].put((msg.UTILITY, call_id, method, args))
        return fut

    def wait(self, futures, what: str, timeout: float | None = None) -> list:
        """Results of ``futures``; a hang becomes ``CollectiveHang`` with a diagnosis."""
        done, not_done = wait(futures, timeout or self.config.hang_timeout)
        if not_done:
            raise CollectiveHang(what, self.diagnose())
        return [f.result() for f in futures]

    def _fan_out(self, method: str, *args, ranks=None, timeout=None) -> list:
        ranks = range(self.config.ranks) if ranks is None else ranks
        futures = [self.call(r, method, *args) for r in ranks]
        return self.wait(futures, method, timeout)

    def pause(self, mode: str = "keep", ranks=None, stagger: float = 0.0,
              timeout: float | None = None) -> None:
        """``pause_generation(mode)``: fan out, wait until every rank's pause completed."""
        check_pause_mode(mode)
        ranks = list(range(self.config.ranks)) if ranks is None else list(ranks)
        span = None
        trace_parent = None
        if self._tracer is not None:
            from instrumented_core.telemetry import names as n
            from instrumented_core.telemetry.tracing import format_traceparent

            span = self._tracer.start_span(n.SPAN_CLIENT_PAUSE, attributes={
                n.ATTR_MODE: mode, n.ATTR_DP_SIZE: self.config.ranks})
            trace_parent = format_traceparent(span)
        try:
            futures = []
            for i, r in enumerate(ranks):
                if stagger and i:
                    time.sleep(stagger)
                futures.append(self.call(r, "pause_scheduler", mode, trace_parent))
            self.wait(futures, f"pause({mode})", timeout)
        finally:
            if span is not None:
                span.end()

    def resume(self, timeout: float | None = None) -> None:
        self._fan_out("resume_scheduler", timeout=timeout)

    def barrier(self, ranks=None, timeout: float | None = None) -> None:
        self._fan_out("barrier", ranks=ranks, timeout=timeout)

    def collective_rpc(self, value: int = 1, timeout: float | None = None) -> list[int]:
        return self._fan_out("collective_rpc", value, timeout=timeout)

    def is_paused(self) -> bool:
        return all(self._fan_out("is_paused"))

    def stats(self, timeout: float | None = None) -> list[dict]:
        return self._fan_out("get_stats", timeout=timeout)

    def inject_fault(self, rank: int | None, kind: str) -> None:
        """Give ``rank`` the fault ``kind`` (config.FAULT_KINDS); ``None``: every rank.

        For every rank, returns once one rank took it: a rank may already be blocked in a
        collective that the fault wedges (``wedge``: its peers' workers entered the real
        all-reduce before they saw it) and then never answers."""
        if rank is not None:
            self.wait([self.call(rank, "inject_fault", kind)], f"inject_fault({kind})")
            return
        futures = [self.call(r, "inject_fault", kind) for r in range(self.config.ranks)]
        done, _ = wait(futures, self.config.hang_timeout, return_when=FIRST_COMPLETED)
        if not done:
            raise CollectiveHang(f"inject_fault({kind}) on every rank", self.diagnose())
        for fut in done:
            fut.result()  # a refused fault raises here

    def inject_start_dp_wave(self, wave: int | None = None, exclude=None) -> int:
        """Make the coordinator broadcast START_DP_WAVE now (tests and fault drills).

        Returns an id; every rank reports how it handled that message (``injected_waves``)."""
        inject_id = next(self._wave_ids)
        with self._lock:
            self.injected_waves[inject_id] = {}
        self._coord_inbox.put((msg.INJECT_START_DP_WAVE, wave, exclude, inject_id))
        return inject_id

    def wait_injected_waves(self, timeout: float | None = None) -> dict[int, dict[int, str]]:
        """Wait until every rank has handled every injected START_DP_WAVE; their outcomes."""
        deadline = time.monotonic() + (timeout or self.config.hang_timeout)
        while True:
            with self._lock:
                done = all(len(v) == self.config.ranks for v in self.injected_waves.values())
                snapshot = {k: dict(v) for k, v in self.injected_waves.items()}
            if done:
                return snapshot
            if time.monotonic() > deadline:
                raise CollectiveHang("injected START_DP_WAVE", self.diagnose())
            time.sleep(0.005)

    # -- diagnosis ------------------------------------------------------------------------

    def rank_views(self) -> list[RankView]:
        """From the status board, and each rank's worker from the worker board."""
        alive = self.alive()
        views = []
        for r in range(self.config.ranks):
            s = self.board.read(r, alive[r])
            workers = (worker_fields([p.read_at(time.time()) for p in read_board(self.pids[r])])
                       if alive[r] and self.pids[r] else {})
            views.append(RankView(rank=r, reachable=alive[r], phase=s.phase,
                                  collective=s.collective, inside_seconds=s.inside_seconds,
                                  progress_age=s.progress_age, **workers))
        return views

    def diagnose(self, threshold: float | None = None) -> Verdict:
        if threshold is None:
            threshold = min(2.0, self.config.hang_timeout / 2)
        return diagnose(self.rank_views(), threshold)


def _put_quietly(q, item) -> None:
    try:
        q.put(item)
    except (ValueError, OSError):
        pass
