"""The flight recorder of one DP rank: collective sequence numbers and the last protocol events.

Why: when a DP group hangs, the question is not only "who is stuck" (the live metrics answer
that) but "where did the ranks' collective sequences part": rank 0's 57th DP collective was a
``barrier`` while rank 1's 57th was a ``sync_dp_state``. Every rank numbers the collectives of
``names.DP_SEQUENCED_COLLECTIVES`` it enters (``dp_seq``) and, separately, its per-step model
collectives (``step_seq``); a ring of the last ``capacity`` protocol events (phase changes,
sync rounds with local and global votes, ``START_DP_WAVE`` outcomes, utility calls,
collective entries and exits) carries those numbers and a timestamp. The watchdog
(:mod:`~instrumented_core.telemetry.watchdog`) dumps it on a hang; the analysis
(:mod:`instrumented_core.flight_analysis`) merges the ranks' dumps.

Threads: only the engine thread writes (through the probe). The ring is a ``deque`` with
``maxlen``: ``append`` is one C call under the GIL, with no lock the HTTP or watchdog thread
could hold; readers copy it with :meth:`FlightRecorder.snapshot`, retrying the rare copy that
races an append. A step costs one integer increment here (steps are counted, not logged).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable, Mapping
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from instrumented_core.telemetry import names as n

__all__ = ["DEFAULT_CAPACITY", "FlightRecorder", "FlightRecorderCollector"]

#: Protocol events kept per rank: a hang's story is the last few pauses, not the run.
DEFAULT_CAPACITY = 512
#: Sync waits kept for the watchdog's default threshold (p99 over the newest rounds).
SYNC_WAIT_WINDOW = 512

# Event kinds (the ``kind`` of a ring entry; the analysis reads them).
EV_ENTER = "enter"  # entered a DP-sequenced collective: detail {collective}
EV_EXIT = "exit"  # left it: {collective, seconds, ok}
EV_SYNC = "sync"  # a sync round's result: local and global votes
EV_PHASE = "phase"  # {old, new}
EV_PAUSE = "pause_requested"  # {mode}
EV_CONSENSUS = "consensus"
EV_WAVE_MSG = "start_dp_wave"  # {wave, outcome, phase}
EV_RESUMED = "resumed"
EV_WAVE = "wave"  # the rank's wave number changed: {wave}
EV_UTILITY = "utility"  # a client utility call handled on the engine thread: {method}
EV_DUMP = "dump"  # the watchdog wrote a dump (so the next dump shows the earlier one)

_STEP = n.COLLECTIVE_STEP


class FlightRecorder:
    """Sequence numbers and the event ring of one rank; written by its engine thread only."""

    def __init__(self, rank: int, dp_size: int, capacity: int = DEFAULT_CAPACITY) -> None:
        self.rank = rank
        self.dp_size = dp_size
        self.capacity = capacity
        self.events: deque[tuple] = deque(maxlen=capacity)
        self.event_no = 0  # events recorded so far: the ring entries' own sequence number
        self.dp_seq = 0  # DP-sequenced collectives entered
        self.step_seq = 0  # per-step model collectives entered
        self.phase = "running"
        self.sync_waits: deque[float] = deque(maxlen=SYNC_WAIT_WINDOW)
        self.dumps = 0  # written by the watchdog thread (its only writer)

    # -- engine thread ------------------------------------------------------------------------

    def record(self, kind: str, detail: dict | None = None) -> None:
        self.event_no += 1
        self.events.append((self.event_no, time.time(), kind, self.dp_seq, self.step_seq,
                            detail))

    def enter(self, collective: str) -> None:
        """Entry into a collective: a step is counted; a DP collective takes the next number."""
        if collective == _STEP:
            self.step_seq += 1
            return
        self.dp_seq += 1
        self.record(EV_ENTER, {"collective": collective})

    def exit(self, collective: str, seconds: float, ok: bool = True) -> None:
        if collective != _STEP:
            self.record(EV_EXIT, {"collective": collective, "seconds": seconds, "ok": ok})

    def sync_result(self, local_unfinished: bool, local_pause: bool, global_unfinished: bool,
                    pause_votes: int, seconds: float) -> None:
        self.sync_waits.append(seconds)
        self.record(EV_SYNC, {"local_unfinished": local_unfinished, "local_pause": local_pause,
                              "global_unfinished": global_unfinished,
                              "pause_votes": pause_votes, "seconds": seconds})
        self.record(EV_EXIT, {"collective": n.COLLECTIVE_SYNC, "seconds": seconds, "ok": True})

    def phase_changed(self, old: str, new: str) -> None:
        self.phase = new
        self.record(EV_PHASE, {"old": old, "new": new})

    def start_dp_wave(self, wave: int, exclude: object, outcome: str) -> None:
        self.record(EV_WAVE_MSG, {"wave": wave, "outcome": outcome, "phase": self.phase,
                                  "exclude": repr(exclude)[:40]})

    # -- any thread -----------------------------------------------------------------------------

    def snapshot(self) -> list[dict[str, Any]]:
        """The ring as dicts, oldest first. Never blocks the writer: a copy that raced an
        append (``deque mutated during iteration``) is retried."""
        for _ in range(100):
            try:
                entries = list(self.events)
                break
            except RuntimeError:
                continue
        else:  # pragma: no cover - an engine appending flat out for 100 copies
            entries = []
        return [event_dict(e) for e in entries]

    def sync_wait_p99(self) -> float | None:
        """p99 of the newest sync waits (None before the first round)."""
        for _ in range(100):
            try:
                waits = sorted(self.sync_waits)
                break
            except RuntimeError:
                continue
        else:  # pragma: no cover
            return None
        if not waits:
            return None
        return waits[min(len(waits) - 1, int(0.99 * len(waits)))]


def event_dict(entry: tuple) -> dict[str, Any]:
    no, ts, kind, dp_seq, step_seq, detail = entry
    out = {"no": no, "ts": ts, "kind": kind, "dp_seq": dp_seq, "step_seq": step_seq}
    if detail:
        out.update(detail)
    return out


class FlightRecorderCollector(Collector):
    """``vllm_dp_collective_sequence`` and ``vllm_dp_flight_dumps_total``, read at scrape time
    from the recorder (two series per rank)."""

    def __init__(self, recorder: FlightRecorder, labels: Mapping[str, str]) -> None:
        self.recorder = recorder
        self.label_names = list(labels)
        self.label_values = list(labels.values())

    def describe(self) -> Iterable:
        return []

    def collect(self) -> Iterable:
        seq = GaugeMetricFamily(
            n.DP_COLLECTIVE_SEQ, "DP collectives (count) this rank has entered: its sequence "
            "number (sync_dp_state, resume, barrier, collective_rpc); every rank's n-th is the "
            "same collective, so skew between ranks is a rank behind or astray.",
            labels=self.label_names)
        seq.add_metric(self.label_values, self.recorder.dp_seq)
        yield seq
        dumps = CounterMetricFamily(
            n.FLIGHT_DUMPS, "Hang dumps (count) this rank's flight-recorder watchdog wrote "
            "(one per incident: inside a collective or without progress too long).",
            labels=self.label_names)
        dumps.add_metric(self.label_values, self.recorder.dumps)
        yield dumps
