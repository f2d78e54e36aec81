"""``TelemetryProbe``: the probe that turns an engine's calls into metrics and spans.

Both engines call the probe interface (:mod:`instrumented_core.probe`: ``Probe`` and its
no-op ``NULL_PROBE``, beneath the protocol) the same way: the CPU reference cluster's rank loop
and the vLLM instrumentor wrapping ``DPEngineCoreProc``. ``TelemetryProbe`` turns the calls
into Prometheus samples and OpenTelemetry spans. Every method of ``TelemetryProbe`` is guarded: an exception inside telemetry is logged
and swallowed, never raised into the busy loop: it is counted in
``vllm_dp_telemetry_errors_total{where=<method>}`` (a gauge read at scrape time that raises:
``where="scrape"``, and the gauge reads NaN) and logged with its traceback the first time per
place. The probe recovers: every later call runs again (one bad call silences nothing), and an
error inside a pause's span bookkeeping ends that pause's spans, marked
``vllm.dp.pause.ended_by=telemetry_error``, so the next pause starts a clean trace. The
per-step calls guard with an inline ``try`` (free in CPython 3.11 when nothing raises).
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from instrumented_core.probe import NULL_PROBE, Probe  # noqa: F401 - re-exported
from instrumented_core.protocol import Phase, SyncResult, steps_until_sync
from instrumented_core.telemetry import flight_recorder as fr
from instrumented_core.telemetry import names as n
from instrumented_core.telemetry.metrics import HotPathState, trace_exemplar

log = logging.getLogger(__name__)

#: Sync rounds of one phase kept for its span (the newest), as OpenTelemetry's default span
#: event limit (``OTEL_SPAN_EVENT_COUNT_LIMIT``, 128) would keep: a pause pending for hours
#: holds no more than this.
MAX_SYNC_ROUND_EVENTS = 128


_UNKNOWN_COUNTS = (float("nan"), float("nan"))


def _request_counts(state: Any) -> tuple[float, float]:
    """``state.request_counts()`` as floats, NaN when the engine cannot say (a scrape must
    never fail because of one gauge, and an unknown count must not read as 0 = idle)."""
    try:
        running, waiting = state.request_counts()
        return float(running), float(waiting)
    except Exception:  # noqa: BLE001
        return _UNKNOWN_COUNTS


def _guarded(method):
    """Run a probe method; an exception is counted, logged (once per method) and swallowed."""
    where = method.__name__

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except Exception:  # noqa: BLE001 - counted and logged by _telemetry_error
            self._telemetry_error(where)
            return None

    return wrapper


#: Methods that keep a pause's spans: an error in one ends that pause's spans so the next
#: pause starts clean (its metrics are unaffected).
_SPAN_SITES = frozenset({"pause_requested", "phase_changed", "start_dp_wave", "resumed"})


class TelemetryProbe(Probe):
    """Metrics and spans for one rank. ``metrics`` or ``tracer_provider`` may be None."""

    enabled = True

    def __init__(
        self,
        rank: int,
        dp_size: int,
        metrics=None,
        tracer_provider=None,
        group_key: str = "dp",
        protocol: str = "two-phase",
        model_name: str = "",
    ) -> None:
        self.rank = rank
        self.dp_size = dp_size
        self.metrics = metrics
        self.hot = metrics.hot if metrics is not None else HotPathState()
        self.group_key = group_key
        self.protocol = protocol
        self.model_name = model_name
        self._errors_logged: set[str] = set()
        self._tracer = (tracer_provider.get_tracer(n.TRACER_NAME)
                        if tracer_provider is not None else None)
        self._provider = tracer_provider
        self._state: Any = None
        self.steps_total = 0
        self.pause_ordinal = 0
        self._pause_started_at = 0.0
        self._pause_started_step = 0
        self._pause_span = None
        self._phase_span = None
        self._mode = ""
        self._sync_rounds_to_record: deque[tuple] = deque(maxlen=MAX_SYNC_ROUND_EVENTS)
        self._shutdown_lock = threading.Lock()
        self._shut_down = False
        #: sequence numbers and the last protocol events (issue 14), read by the watchdog
        self.flight = fr.FlightRecorder(rank, dp_size)

    # -- wiring ---------------------------------------------------------------------------

    @_guarded
    def attach(self, state: Any) -> None:
        """Gauges that mirror engine state are read from ``state`` at scrape time (free)."""
        self._state = state
        m = self.metrics
        if m is None:
            return
        m.dp_size.set(self.dp_size)
        safe = self._scraped
        m.engines_running.set_function(safe(lambda: bool(state.engines_running)))
        m.current_wave.set_function(safe(lambda: state.current_wave))
        m.step_counter.set_function(safe(lambda: state.step_counter))
        m.sync_interval.set_function(safe(
            lambda: 1.0 if getattr(state, "fast_sync", False) else state.sync_interval))
        m.steps_until_sync.set_function(safe(lambda: steps_until_sync(
            state.step_counter, state.sync_interval, getattr(state, "fast_sync", False))))
        m.requests_running.set_function(lambda: _request_counts(state)[0])
        m.requests_waiting.set_function(lambda: _request_counts(state)[1])

    def _scraped(self, read: Callable[[], Any]) -> Callable[[], float]:
        """A gauge function that never fails a scrape: an engine attribute that raises (or is
        not a number) reads NaN and counts a ``scrape`` error; the other series still show."""
        def value() -> float:
            try:
                return float(read())
            except Exception:  # noqa: BLE001 - counted and logged by _telemetry_error
                self._telemetry_error("scrape")
                return float("nan")

        return value

    def _telemetry_error(self, where: str) -> None:
        """Called from an ``except`` block: count, log once per place, recover span state."""
        try:
            if self.metrics is not None:
                self.metrics.error(where)
        except Exception:  # noqa: BLE001 - the count is best effort
            pass
        if where not in self._errors_logged:
            self._errors_logged.add(where)
            log.exception("telemetry error in %s on DP rank %s (ignored; counted in %s"
                          "{where=%r}; logged once per place, the probe keeps running)",
                          where, self.rank, n.TELEMETRY_ERRORS_TOTAL, where)
        if where in _SPAN_SITES:
            self._abandon_spans()

    def _abandon_spans(self) -> None:
        """End the current pause's spans after an error inside them (marked), so the next
        pause does not inherit a half-updated span."""
        spans, self._phase_span, self._pause_span = (
            (self._phase_span, self._pause_span), None, None)
        self._sync_rounds_to_record.clear()
        for span in spans:
            if span is None:
                continue
            try:
                span.set_attribute(n.ATTR_ENDED_BY, "telemetry_error")
                span.end()
            except Exception:  # noqa: BLE001 - a span that cannot end is dropped
                pass

    def _span_attrs(self) -> dict:
        return {n.ATTR_RANK: self.rank, n.ATTR_DP_SIZE: self.dp_size,
                n.ATTR_PROTOCOL: self.protocol, n.ATTR_MODEL_NAME: self.model_name}

    def _wave(self) -> int:
        return int(getattr(self._state, "current_wave", 0)) if self._state is not None else 0

    # -- transitions ----------------------------------------------------------------------

    @_guarded
    def pause_requested(self, mode: str, trace_parent: str | None = None) -> None:
        self.pause_ordinal += 1
        self._mode = mode
        self._pause_started_at = time.time()
        self._pause_started_step = self.steps_total
        self.flight.record(fr.EV_PAUSE, {"mode": mode})
        if self.metrics is not None:
            self.metrics.pause_requests[mode].inc()
        if self._tracer is not None and self._pause_span is None:
            from instrumented_core.telemetry.tracing import parent_context

            ctx = parent_context(trace_parent, self.group_key, self.pause_ordinal)
            attrs = self._span_attrs()
            attrs.update({n.ATTR_MODE: mode, n.ATTR_PAUSE_ORDINAL: self.pause_ordinal,
                          n.ATTR_WAVE: self._wave()})
            self._pause_span = self._tracer.start_span(n.SPAN_PAUSE, context=ctx,
                                                       attributes=attrs)

    def _record_sync_rounds(self) -> None:
        """Turn the sync rounds kept since the last call into events of the phase span, with
        the times they happened. Runs before that span gets another event or ends."""
        rounds = self._sync_rounds_to_record
        if not rounds or self._phase_span is None:
            rounds.clear()
            return
        span = self._phase_span
        while rounds:
            (stamp, sync_round, local_unfinished, local_pause, result,
             seconds) = rounds.popleft()
            span.add_event(n.EVENT_SYNC_ROUND, {
                n.ATTR_SYNC_ROUND: sync_round,
                n.ATTR_LOCAL_UNFINISHED: local_unfinished, n.ATTR_LOCAL_PAUSE: local_pause,
                n.ATTR_GLOBAL_UNFINISHED: result.global_unfinished,
                n.ATTR_PAUSE_VOTES: result.pause_votes, n.ATTR_CONSENSUS: result.consensus,
                n.ATTR_SYNC_SECONDS: seconds}, timestamp=stamp)

    def _start_phase_span(self, name: str) -> None:
        from opentelemetry import trace

        if self._tracer is None or self._pause_span is None:
            return
        if self._phase_span is not None:
            self._record_sync_rounds()
            self._phase_span.end()
        ctx = trace.set_span_in_context(self._pause_span)
        self._phase_span = self._tracer.start_span(name, context=ctx, attributes=self._span_attrs())

    @_guarded
    def phase_changed(self, old: Phase, new: Phase) -> None:
        now = time.time()
        self.flight.phase_changed(old.value, new.value)
        m = self.metrics
        if m is not None:
            m.phase.set(n.PHASE_CODES[new.value])
            m.pending_since.set(now if new is Phase.PENDING_PAUSE else 0)
        if new is Phase.PAUSED and self._pause_started_at:
            seconds = now - self._pause_started_at
            steps = self.steps_total - self._pause_started_step
            if m is not None:
                m.consensus_latency.observe(seconds, trace_exemplar(self._pause_span))
                m.consensus_steps.inc(steps)
            if self._phase_span is not None:
                self._phase_span.set_attributes({n.ATTR_STEPS_WAITED: steps,
                                                 n.ATTR_SECONDS_WAITED: seconds})
            self._pause_started_at = 0.0
        if self._pause_span is None:
            return
        if new is Phase.PENDING_PAUSE:
            self._start_phase_span(n.SPAN_PENDING)
        elif new is Phase.PAUSED:
            self._pause_span.add_event(n.EVENT_CONSENSUS, {n.ATTR_WAVE: self._wave()})
            self._start_phase_span(n.SPAN_PAUSED)
        else:
            self._end_pause_span()

    def _end_pause_span(self) -> None:
        if self._phase_span is not None:
            self._record_sync_rounds()
            self._phase_span.end()
            self._phase_span = None
        if self._pause_span is not None:
            self._pause_span.end()
            self._pause_span = None

    @_guarded
    def sync_begin(self, local_unfinished: bool, local_pause: bool) -> None:
        self.hot.inside_since[n.COLLECTIVE_SYNC] = time.time()
        self.flight.enter(n.COLLECTIVE_SYNC)
        self._sync_local = (local_unfinished, local_pause)

    @_guarded
    def sync_end(self, result: SyncResult, seconds: float) -> None:
        hot = self.hot
        hot.inside_since[n.COLLECTIVE_SYNC] = 0.0
        hot.last_progress = time.time()
        local_unfinished, local_pause = getattr(self, "_sync_local", (False, False))
        self.flight.sync_result(local_unfinished, local_pause, result.global_unfinished,
                                result.pause_votes, seconds)
        m = self.metrics
        if m is not None:
            m.sync_wait.observe(seconds, trace_exemplar(self._pause_span))
        if self._phase_span is not None and self._state is not None and (
                getattr(self._state, "pending_pause", False) or result.consensus):
            # kept as a tuple now, made a span event when the span next changes: an event
            # costs several microseconds, a round of a pending pause should not (and a span
            # is exported only when it ends anyway)
            self._sync_rounds_to_record.append((
                time.time_ns(), int(getattr(self._state, "sync_rounds", 0)), local_unfinished,
                local_pause, result, seconds))

    @_guarded
    def consensus(self) -> None:
        self.flight.record(fr.EV_CONSENSUS)
        if self.metrics is not None:
            self.metrics.pause_consensus.inc()

    @_guarded
    def start_dp_wave(self, wave: int, exclude: object, outcome: str) -> None:
        self.flight.start_dp_wave(wave, exclude, outcome)
        if self.metrics is not None:
            self.metrics.start_dp_wave[outcome].inc()
        span = self._phase_span or self._pause_span
        if span is not None:
            self._record_sync_rounds()
            name = n.EVENT_START_DP_WAVE_IGNORED if outcome == "ignored" else n.EVENT_START_DP_WAVE
            span.add_event(name, {n.ATTR_WAVE: wave, n.ATTR_EXCLUDE: repr(exclude),
                                  n.ATTR_OUTCOME: outcome})

    @_guarded
    def resumed(self) -> None:
        self.hot.last_progress = time.time()
        self.flight.record(fr.EV_RESUMED)
        if self.metrics is not None:
            self.metrics.resumes.inc()
        if self._pause_span is not None:
            self._pause_span.add_event(n.EVENT_RESUME, {n.ATTR_WAVE: self._wave()})

    # The per-step calls touch only plain attributes; an inline ``try`` guards them at no
    # cost while nothing raises (a decorator would add a call per step).

    def step_end(self, dummy: bool) -> None:
        try:
            hot = self.hot
            if dummy:
                hot.steps_dummy += 1
            else:
                hot.steps_real += 1
            hot.last_progress = time.time()
            self.steps_total += 1
        except Exception:  # noqa: BLE001 - counted and logged by _telemetry_error
            self._telemetry_error("step_end")

    def collective_begin(self, collective: str) -> None:
        try:
            self.hot.inside_since[collective] = time.time()
            self.flight.enter(collective)
        except Exception:  # noqa: BLE001 - counted and logged by _telemetry_error
            self._telemetry_error("collective_begin")

    def collective_end(self, collective: str, seconds: float) -> None:
        try:
            hot = self.hot
            total = hot.wait_seconds.get(collective, 0.0) + float(seconds)
            hot.inside_since[collective] = 0.0
            hot.wait_seconds[collective] = total
            self.flight.exit(collective, seconds)
        except Exception:  # noqa: BLE001 - counted and logged by _telemetry_error
            self._telemetry_error("collective_end")

    @_guarded
    def wave_changed(self, wave: int) -> None:
        self.flight.record(fr.EV_WAVE, {"wave": wave})

    @_guarded
    def utility_call(self, method: str) -> None:
        self.flight.record(fr.EV_UTILITY, {"method": method})

    def progress(self) -> None:
        try:
            self.hot.last_progress = time.time()
        except Exception:  # noqa: BLE001 - counted and logged by _telemetry_error
            self._telemetry_error("progress")

    def dropped(self, count: int, signal: str = "spans") -> None:
        try:
            if self.metrics is not None:
                self.metrics.dropped(signal, count)
        except Exception:  # noqa: BLE001
            pass

    @_guarded
    def shutdown(self) -> None:
        """End open spans (a pause still in flight is exported, marked) and flush. Idempotent;
        may run on another thread while the engine thread is blocked in a collective."""
        with self._shutdown_lock:
            if self._shut_down:
                return
            self._shut_down = True
        for span in (self._phase_span, self._pause_span):
            if span is not None:
                span.set_attribute(n.ATTR_ENDED_BY, "shutdown")
        self._end_pause_span()
        if self._provider is not None:
            self._provider.shutdown()
