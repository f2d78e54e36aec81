"""Per-engine observation state: what the wrappers read and the probe reads at scrape time.

An ``EngineObserver`` lives on each instrumented ``DPEngineCoreProc`` (as
``_instrumented_core_observer``) from its busy loop's start to its end; ``_StateView`` exposes
the engine's state under vLLM's names for the probe's scrape-time gauges.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from instrumented_core.protocol import Phase, PhaseTracker, phase_of

__all__ = ["EngineObserver", "LEGACY_MARK", "log_once", "observer_of"]

log = logging.getLogger("instrumented_core.vllm_support.instrumentor")

OBSERVER_ATTR = "_instrumented_core_observer"
#: set on ``DPEngineCoreProc`` by the test-only legacy one-phase pause plugin
LEGACY_MARK = "_instrumented_core_legacy_one_phase"

#: the observer of the engine whose step is running on this thread (read by sync_dp_state)
current = threading.local()


class _StateView:
    """What the probe reads at scrape time, under vLLM's names (``sync_interval`` is vLLM's
    ``dp_sync_interval``; ``sync_rounds`` is counted by the observer)."""

    fast_sync = False

    def __init__(self, engine: Any, observer: EngineObserver) -> None:
        self._engine = engine
        self._observer = observer

    engines_running = property(lambda self: self._engine.engines_running)
    ignore_start_dp_wave = property(lambda self: self._engine.ignore_start_dp_wave)
    pending_pause = property(lambda self: self._engine.pending_pause)
    current_wave = property(lambda self: self._engine.current_wave)
    step_counter = property(lambda self: self._engine.step_counter)
    sync_interval = property(lambda self: self._engine.dp_sync_interval)
    sync_rounds = property(lambda self: self._observer.sync_rounds)

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
                 legacy: bool = False) -> None:
        self.engine = engine
        self.probe = probe
        self.telemetry = telemetry
        self.legacy = legacy
        self.sync_rounds = 0
        self.dummy_step = False
        self.consensus_seen = False
        self.last_wave = engine.current_wave
        self._phase = PhaseTracker(probe, self.phase_now())
        probe.attach(_StateView(engine, self))

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


def log_once(key: str, msg: str, *args: Any) -> None:
    seen = log_once.__dict__.setdefault("seen", set())
    if key not in seen:
        seen.add(key)
        log.exception(msg, *args)
