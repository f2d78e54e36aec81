"""Per-engine observation state: what the wrappers read and the probe reads at scrape time.

An ``EngineObserver`` lives on each instrumented ``DPEngineCoreProc`` (as
``_instrumented_core_observer``) from its busy loop's start to its end; ``_StateView`` exposes
the engine's state under vLLM's names for the probe's scrape-time gauges.

vLLM changes that state under us, and everything here is read again rather than remembered:

- 0.27+ ``--enable-fault-tolerance``: after an engine exception ``fault_tolerant_wrapper``
  re-enters the busy loop INSIDE our ``run_busy_loop`` wrapper, with a new ``dp_group`` and
  ``step_counter`` reset to 0. The observer (and its counters) carries on; phase, step position
  and wave are read from the engine at every step and scrape; a new group is logged.
- Elastic EP (every line since 0.21) swaps ``dp_group`` and resets ``step_counter``,
  ``current_wave`` and ``engines_running``; it resizes the group but never updates the engine's
  ``dp_size`` attribute, so ``vllm_dp_size`` and the vote decoding read ``dp_group.size()`` (what
  ``sync_dp_state`` itself divides by) at scrape and sync time. A removed rank's loop ends with
  ``SystemExit``, and the wrapper's ``finally`` closes its endpoint.
- The sync cadence: ``dp_sync_interval`` (0.30+, also step 1) or the fixed 32 of 0.21-0.29.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from instrumented_core.protocol import Phase, PhaseTracker, phase_of
from instrumented_core.telemetry import names as n
from instrumented_core.vllm_support import versions

__all__ = ["EngineObserver", "LEGACY_MARK", "log_once", "observer_of", "status_of"]

log = logging.getLogger("instrumented_core.vllm_support.instrumentor")

OBSERVER_ATTR = "_instrumented_core_observer"
#: an engine the plugin does not observe: its status-only endpoint, while its loop runs
STATUS_ATTR = "_instrumented_core_status"
#: set on ``DPEngineCoreProc`` by the test-only legacy one-phase pause plugin
LEGACY_MARK = "_instrumented_core_legacy_one_phase"

#: the observer of the engine whose step is running on this thread (read by sync_dp_state)
current = threading.local()


class _StateView:
    """What the probe reads at scrape time, under vLLM's names (``sync_interval`` is vLLM's
    ``dp_sync_interval``, or 32 on 0.21-0.29; ``sync_rounds`` is counted by the observer)."""

    fast_sync = False

    def __init__(self, engine: Any, observer: EngineObserver) -> None:
        self._engine = engine
        self._observer = observer

    engines_running = property(lambda self: self._engine.engines_running)
    ignore_start_dp_wave = property(lambda self: self._engine.ignore_start_dp_wave)
    pending_pause = property(lambda self: self._engine.pending_pause)
    current_wave = property(lambda self: self._engine.current_wave)
    step_counter = property(lambda self: self._engine.step_counter)
    sync_interval = property(lambda self: self._observer.sync_interval())
    sync_rounds = property(lambda self: self._observer.sync_rounds)
    dp_size = property(lambda self: self._observer.dp_size())

    def steps_until_sync(self) -> int:
        return versions.steps_until_sync(int(self._engine.step_counter),
                                         self._observer.sync_interval(),
                                         self._observer.step_one_sync)

    def request_counts(self) -> tuple[int, int]:
        """(running, waiting) in this rank's scheduler, read by the metrics thread."""
        scheduler = self._engine.scheduler
        counts = getattr(scheduler, "get_request_counts", None)
        if counts is not None:
            running, waiting = counts()
            return int(running), int(waiting)
        return len(scheduler.running), len(scheduler.waiting)


class EngineObserver:
    """Per-engine observation state; lives on the engine as ``_instrumented_core_observer``."""

    def __init__(self, engine: Any, probe: Any, telemetry: Any = None,
                 legacy: bool = False, cadence: str = versions.CADENCE_INTERVAL) -> None:
        self.engine = engine
        self.probe = probe
        self.telemetry = telemetry
        self.legacy = legacy
        self.cadence = cadence
        self.step_one_sync = cadence == versions.CADENCE_INTERVAL
        self.sync_rounds = 0
        self.dummy_step = False
        self.consensus_seen = False
        self.last_wave = engine.current_wave
        #: the DP group of the last sync round (a new one: fault-tolerance retry, elastic EP)
        self.last_group: Any = getattr(engine, "dp_group", None)
        self.group_changes = 0
        self._phase = PhaseTracker(probe, self.phase_now())
        view = _StateView(engine, self)
        probe.attach(view)
        self._read_at_scrape(view)

    def _read_at_scrape(self, view: _StateView) -> None:
        """The probe sets ``vllm_dp_size`` once and assumes a step-1 sync; a vLLM rank's group
        can be resized mid-run and 0.21-0.29 have no step-1 sync: read both at scrape time."""
        metrics = getattr(self.probe, "metrics", None)
        if metrics is None:
            return
        metrics.dp_size.set_function(lambda: float(view.dp_size))
        metrics.steps_until_sync.set_function(lambda: float(view.steps_until_sync()))

    def sync_interval(self) -> int:
        if self.cadence == versions.CADENCE_FIXED:
            return versions.FIXED_SYNC_INTERVAL
        return int(self.engine.dp_sync_interval)

    def dp_size(self) -> int:
        """The DP group's size as ``sync_dp_state`` sees it (``engine.dp_size`` is set once at
        start and elastic EP never updates it)."""
        group = getattr(self.engine, "dp_group", None)
        size = getattr(group, "size", None)
        if callable(size):
            try:
                return int(size())
            except Exception:  # noqa: BLE001 - a group being torn down: the attribute
                pass
        return int(self.engine.dp_size)

    def note_group(self, group: Any) -> None:
        """Called with the group of each sync round; logs a replaced group once per change."""
        if group is None or group is self.last_group:
            return
        if self.last_group is not None:
            self.group_changes += 1
            log.info("instrumented_core: DP rank %s now syncs on a new DP group (size %d; "
                     "a fault-tolerance retry or elastic EP); counters carry on",
                     getattr(self.engine, "dp_rank", "?"), self.dp_size())
        self.last_group = group

    def rejected(self, reason: str) -> None:
        """A request rejected by the engine (0.33: ``engine_paused`` while paused)."""
        metrics = getattr(self.probe, "metrics", None)
        if metrics is not None and reason in n.REJECT_REASONS:
            metrics.rejected(reason)

    def utility_call(self, request: Any) -> None:
        """A client utility call (``(client, call_id, method, args)``): its method name only,
        never its arguments, goes to the flight recorder."""
        try:
            method = request[2] if isinstance(request, (tuple, list)) else "?"
            self.probe.utility_call(str(method)[:64])
        except Exception:  # noqa: BLE001
            log_once("utility", "instrumented_core: utility call observation failed")

    @property
    def phase(self) -> Phase:
        return self._phase.phase

    def phase_now(self) -> Phase:
        e = self.engine
        if self.legacy:
            # One-phase pause: no pending flag, no consensus; a paused scheduler whose loop
            # still steps (woken by START_DP_WAVE) is shown as pending, else as paused.
            paused = bool(e.is_scheduler_paused())
            return phase_of(paused and bool(e.engines_running), paused)
        return phase_of(bool(e.pending_pause), bool(e.ignore_start_dp_wave))

    def update_phase(self) -> None:
        self._phase.update(self.phase_now())

    def check_wave(self) -> None:
        wave = self.engine.current_wave
        if wave != self.last_wave:
            self.last_wave = wave
            self.probe.wave_changed(wave)

    def close(self) -> None:
        if self.telemetry is not None:
            self.telemetry.close()
        else:
            self.probe.shutdown()


def observer_of(engine: Any) -> EngineObserver | None:
    """The observer attached to ``engine`` (None when not instrumented)."""
    try:
        return engine.__dict__.get(OBSERVER_ATTR)
    except AttributeError:  # pragma: no cover - engines always have a __dict__
        return None


def status_of(engine: Any) -> Any:
    """The status-only endpoint of an engine the plugin does not observe (None otherwise)."""
    try:
        return engine.__dict__.get(STATUS_ATTR)
    except AttributeError:  # pragma: no cover
        return None


def log_once(key: str, msg: str, *args: Any) -> None:
    seen = log_once.__dict__.setdefault("seen", set())
    if key not in seen:
        seen.add(key)
        log.exception(msg, *args)
