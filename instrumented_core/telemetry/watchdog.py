"""The flight recorder's watchdog: a thread per rank that writes one hang dump per incident.

Why a thread in the rank's own process: the evidence of a hang (where the engine thread is,
the last protocol events, the collective sequence numbers) lives in that process and dies
with it. Nobody has to ask: a rank inside a collective, or busy without progress, for longer
than the threshold writes a dump to the dump directory at once, so it is still there after the
pod is restarted. The engine thread's stack comes from ``sys._current_frames`` (no ptrace).

An incident is one continuous stuck stretch (same collective entry, or same last progress):
it gets ONE dump, however long it lasts. A dump is bounded (``MAX_DUMP_BYTES``), and so is a
rank's share of the directory (the newest ``MAX_DUMPS_PER_RANK``). The threshold is the
configured one, else ``P99_MULTIPLE`` x the rank's measured p99 sync wait, never below
``FLOOR_SECONDS``: a normal pause, an idle rank and a client that staggers its barrier calls by
seconds stay well under it. Each dump is also logged (one warning) and emitted as a
``dp.flight_dump`` span when the rank exports spans.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from instrumented_core.telemetry import names as n

__all__ = ["FLOOR_SECONDS", "Incident", "Watchdog", "dump_name"]

log = logging.getLogger(__name__)

FLOOR_SECONDS = 10.0
P99_MULTIPLE = 50.0
MAX_DUMP_BYTES = 512 * 1024
MAX_DUMPS_PER_RANK = 8
MAX_STACK_FRAMES = 64
MAX_METRICS_BYTES = 96 * 1024
DUMP_FORMAT = "instrumented_core.flight/1"
DUMP_PREFIX = "flight-rank"


@dataclass(frozen=True)
class Incident:
    kind: str  # "inside" a collective too long, or "no_progress" while busy
    collective: str  # the collective it is inside ("" for no_progress)
    since: float  # unix time the stuck stretch began (its identity)
    seconds: float

    def describe(self) -> str:
        if self.kind == "inside":
            return f"inside {self.collective} for {self.seconds:.1f} s"
        return f"busy without progress for {self.seconds:.1f} s"


def dump_name(rank: int, written_ns: int, pid: int) -> str:
    return f"{DUMP_PREFIX}{rank:04d}-{written_ns}-{pid}.json"


class Watchdog:
    """Watches one rank's probe (its ``hot`` state, ``flight`` recorder and engine state)."""

    def __init__(self, probe: Any, dump_dir: str | Path, threshold: float | None = None,
                 registry: Any = None, engine_thread: int | None = None,
                 tracer_provider: Any = None) -> None:
        self.probe = probe
        self.dump_dir = Path(dump_dir)
        self.configured = threshold
        self.registry = registry
        self.engine_thread = engine_thread if engine_thread is not None else threading.get_ident()
        self._tracer = (tracer_provider.get_tracer(n.TRACER_NAME)
                        if tracer_provider is not None else None)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_incident: tuple | None = None
        self.written: list[Path] = []

    # -- the rule -------------------------------------------------------------------------------

    def threshold(self) -> tuple[float, str]:
        if self.configured is not None:
            return self.configured, "configured"
        p99 = self.probe.flight.sync_wait_p99()
        if p99 is not None and p99 * P99_MULTIPLE > FLOOR_SECONDS:
            return p99 * P99_MULTIPLE, f"{P99_MULTIPLE:g} x p99 sync wait {p99:.3f} s"
        return FLOOR_SECONDS, "floor"

    def check(self, now: float | None = None) -> Incident | None:
        """The incident this rank is in now, if any (pure read of the probe's state)."""
        now = time.time() if now is None else now
        limit, _ = self.threshold()
        hot = self.probe.hot
        oldest: tuple[float, str] | None = None
        for collective, since in list(hot.inside_since.items()):
            if since and (oldest is None or since < oldest[0]):
                oldest = (since, collective)
        if oldest is not None:
            if now - oldest[0] > limit:
                return Incident("inside", oldest[1], oldest[0], now - oldest[0])
            return None
        busy = self.probe.flight.phase != "paused" and _busy(getattr(self.probe, "_state", None))
        last = hot.last_progress
        if busy and now - last > limit:
            return Incident("no_progress", "", last, now - last)
        return None

    def poll(self, now: float | None = None) -> Path | None:
        """One watchdog tick: a dump for a new incident, else nothing."""
        incident = self.check(now)
        if incident is None:
            self._last_incident = None
            return None
        key = (incident.kind, incident.collective, incident.since)
        if key == self._last_incident:
            return None
        self._last_incident = key
        return self.write_dump(incident)

    # -- the dump -------------------------------------------------------------------------------

    def snapshot(self, incident: Incident | None) -> dict[str, Any]:
        probe, flight = self.probe, self.probe.flight
        state = getattr(probe, "_state", None)
        limit, source = self.threshold()

        def read(name: str) -> Any:
            try:
                value = getattr(state, name)
                return value if isinstance(value, (bool, int, float, str)) else str(value)
            except Exception:  # noqa: BLE001
                return None

        frames = sys._current_frames()
        engine_frame = frames.get(self.engine_thread)
        names = {t.ident: t.name for t in threading.enumerate()}
        threads = {
            f"{names.get(ident, '?')} ({ident})": _stack(frame)
            for ident, frame in frames.items()
            if ident not in (self.engine_thread, threading.get_ident())}
        return {
            "format": DUMP_FORMAT,
            "rank": flight.rank, "dp_size": flight.dp_size, "pid": os.getpid(),
            "host": socket.gethostname(), "written_at": time.time(),
            "protocol": getattr(probe, "protocol", ""),
            "model_name": getattr(probe, "model_name", ""),
            "reason": ({"kind": incident.kind, "collective": incident.collective,
                        "since": incident.since, "seconds": incident.seconds,
                        "text": incident.describe()} if incident else None),
            "threshold_seconds": limit, "threshold_source": source,
            "dp_seq": flight.dp_seq, "step_seq": flight.step_seq, "event_no": flight.event_no,
            "phase": flight.phase,
            "wave": read("current_wave"), "engines_running": read("engines_running"),
            "step_counter": read("step_counter"),
            "inside": {c: s for c, s in list(probe.hot.inside_since.items()) if s},
            "last_progress": probe.hot.last_progress,
            "stack": _stack(engine_frame) if engine_frame is not None else [],
            "threads": threads,
            "events": flight.snapshot(),
            "metrics": self._metrics_text(),
        }

    def _metrics_text(self) -> str:
        if self.registry is None:
            return ""
        try:
            from prometheus_client import generate_latest

            return generate_latest(self.registry).decode()[:MAX_METRICS_BYTES]
        except Exception as e:  # noqa: BLE001
            return f"# metrics snapshot failed: {type(e).__name__}: {e}"

    def write_dump(self, incident: Incident | None) -> Path | None:
        """Write one bounded dump; never raises (a telemetry failure must not touch the rank)."""
        try:
            data = bound(self.snapshot(incident))
            self.dump_dir.mkdir(parents=True, exist_ok=True)
            rank = self.probe.flight.rank
            path = self.dump_dir / dump_name(rank, time.time_ns(), os.getpid())
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
            self.probe.flight.dumps += 1
            self.probe.flight.record("dump", {"path": path.name})
            self.written.append(path)
            _prune(self.dump_dir, rank)
            what = incident.describe() if incident else "on request"
            log.warning("flight recorder: DP rank %d %s (DP collective #%d); hang dump %s "
                        "(analyze: instrumented-core analyze %s)", rank, what,
                        self.probe.flight.dp_seq, path, self.dump_dir)
            if self._tracer is not None:
                span = self._tracer.start_span(n.SPAN_FLIGHT_DUMP, attributes={
                    n.ATTR_RANK: rank, n.ATTR_DUMP_PATH: str(path), n.ATTR_DUMP_REASON: what,
                    n.ATTR_DP_SEQ: self.probe.flight.dp_seq})
                span.end()
            return path
        except Exception:
            log.exception("flight recorder: writing a hang dump failed (ignored)")
            return None

    # -- the thread -----------------------------------------------------------------------------

    def start(self) -> Watchdog:
        self._thread = threading.Thread(target=self._run, name="ic-flight-watchdog",
                                        daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            limit, _ = self.threshold()
            if self._stop.wait(min(1.0, max(0.05, limit / 8))):
                return
            try:
                self.poll()
            except Exception:
                log.exception("flight recorder watchdog tick failed (ignored)")

    def stop(self) -> None:
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=2.0)


def _busy(state: Any) -> bool:
    """Whether the rank should be making progress: its loop runs, or it holds requests (an
    idle rank, or a paused one, has nothing to progress on)."""
    if state is None:
        return False
    try:
        if state.engines_running:
            return True
        counts = getattr(state, "request_counts", None)
        return counts is not None and sum(counts()) > 0
    except Exception:  # noqa: BLE001 - an engine being torn down
        return False


def _stack(frame: Any) -> list[str]:
    lines = traceback.format_stack(frame)
    return [line.rstrip("\n") for line in lines[-MAX_STACK_FRAMES:]]


def bound(dump: dict[str, Any]) -> bytes:
    """The dump as JSON, at most ``MAX_DUMP_BYTES``: other threads, then the metrics, then the
    oldest events go first."""
    data = json.dumps(dump, default=str).encode()
    if len(data) <= MAX_DUMP_BYTES:
        return data
    dump = dict(dump, threads={}, truncated=True)
    data = json.dumps(dump, default=str).encode()
    if len(data) > MAX_DUMP_BYTES:
        dump["metrics"] = dump.get("metrics", "")[:8192]
        data = json.dumps(dump, default=str).encode()
    events = list(dump.get("events", []))
    while len(data) > MAX_DUMP_BYTES and events:
        events = events[len(events) // 4 + 1:]
        dump["events"] = events
        data = json.dumps(dump, default=str).encode()
    return data[:MAX_DUMP_BYTES]


def _prune(directory: Path, rank: int) -> None:
    mine = sorted(directory.glob(f"{DUMP_PREFIX}{rank:04d}-*.json"))
    for old in mine[:-MAX_DUMPS_PER_RANK]:
        try:
            old.unlink()
        except OSError:
            pass
