"""The wrappers around ``DPEngineCoreProc``'s methods: each calls the original and observes.

Every wrapper keeps the original's signature (``functools.wraps``: vLLM's utility dispatch
inspects ``signature(method)``), passes the original's result or exception through unchanged,
and observes through the engine's observer and probe, which never raise into vLLM.

``ARGUMENTS_READ`` lists, per wrapped method, the leading parameters (after ``self``) a wrapper
reads by position or name; the release checks (``tests/test_vllm_versions.py``) verify them
against every release line's own signatures.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from instrumented_core.protocol import PAUSE_MODES, start_dp_wave_outcome
from instrumented_core.telemetry import names as n
from instrumented_core.telemetry.worker_board import remove_board_files
from instrumented_core.vllm_support import contract
from instrumented_core.vllm_support.observer import (
    OBSERVER_ATTR,
    STATUS_ATTR,
    current,
    log_once,
    observer_of,
)

if TYPE_CHECKING:  # pragma: no cover
    from instrumented_core.vllm_support.instrumentor import VllmDpInstrumentor

__all__ = ["ARGUMENTS_READ", "ENGINE_WRAPPERS", "OPTIONAL_ENGINE_WRAPPERS", "STEP_METHODS",
           "WRAPPED_MARK", "rebind_step_fn"]

WRAPPED_MARK = "_instrumented_core_wrapped"
STATUS_ONLY_MARK = "_instrumented_core_status_only"
#: The engine-step methods; ``EngineCore.__init__`` binds one of them as ``step_fn``.
STEP_METHODS = ("step", "step_with_batch_queue")


def _wrap_run_busy_loop(orig: Callable, inst: VllmDpInstrumentor) -> Callable:
    # On 0.27+ ``orig`` is ``fault_tolerant_wrapper``'s loop: a retry re-enters vLLM's loop
    # inside this call, so one observer (and its counters) spans every retry. Elastic EP ends
    # a removed rank's loop with SystemExit: the finally closes its endpoint.
    @functools.wraps(orig)
    def run_busy_loop(self, *args, **kwargs):
        obs = inst._start_engine(self)  # an observer, a status-only endpoint, or None
        try:
            return orig(self, *args, **kwargs)
        finally:
            if obs is not None:
                try:
                    self.__dict__.pop(OBSERVER_ATTR, None)
                    self.__dict__.pop(STATUS_ATTR, None)
                    obs.close()
                    remove_board_files()  # this engine's workers' records
                except Exception:  # noqa: BLE001
                    log_once("close", "instrumented_core: closing telemetry failed")

    return run_busy_loop


def status_only_run_busy_loop(orig: Callable, inst: VllmDpInstrumentor) -> Callable:
    """The one wrap of an inactive plugin (the contract failed): while the loop runs, the
    rank's endpoint serves ``vllm_dp_plugin_active=0`` and the reason; nothing is observed."""

    @functools.wraps(orig)
    def run_busy_loop(self, *args, **kwargs):
        status = inst._start_status(self)
        try:
            return orig(self, *args, **kwargs)
        finally:
            if status is not None:
                try:
                    self.__dict__.pop(STATUS_ATTR, None)
                    status.close()
                except Exception:  # noqa: BLE001
                    log_once("close", "instrumented_core: closing the status endpoint failed")

    run_busy_loop.__dict__[STATUS_ONLY_MARK] = True
    return run_busy_loop


def _wrap_has_global_unfinished_reqs(orig: Callable, inst: VllmDpInstrumentor) -> Callable:
    @functools.wraps(orig)
    def _has_global_unfinished_reqs(self, *args, **kwargs):
        obs = observer_of(self)
        if obs is None:
            return orig(self, *args, **kwargs)
        try:
            obs.check_wave()
        except Exception:  # noqa: BLE001
            log_once("wave", "instrumented_core: wave observation failed")
        current.observer = obs
        try:
            result = orig(self, *args, **kwargs)
        finally:
            current.observer = None
        try:
            obs.probe.step_end(obs.dummy_step)
            obs.dummy_step = False
            if obs.consensus_seen:
                obs.consensus_seen = False
                obs.probe.consensus()
            obs.update_phase()
        except Exception:  # noqa: BLE001
            log_once("step", "instrumented_core: step observation failed")
        return result

    return _has_global_unfinished_reqs


def _timed(obs: Any, collective: str, orig: Callable, self: Any, args: tuple, kwargs: dict,
           then: Callable[[Any], None] | None = None) -> Any:
    """Call ``orig`` timed as inside ``collective`` on the rank's probe (what a stuck rank's
    metrics show), then ``then(obs)``, also when it raises. The per-step path: the probe's
    collective calls only assign attributes and cannot raise, so no guard here."""
    probe = obs.probe
    probe.collective_begin(collective)
    started = time.perf_counter()
    try:
        return orig(self, *args, **kwargs)
    finally:
        probe.collective_end(collective, time.perf_counter() - started)
        if then is not None:
            then(obs)


def _after_dummy_batch(obs: Any) -> None:
    obs.dummy_step = True


def _after_collective(obs: Any) -> None:
    obs.probe.progress()


def _wrap_execute_dummy_batch(orig: Callable, inst: VllmDpInstrumentor) -> Callable:
    @functools.wraps(orig)
    def execute_dummy_batch(self, *args, **kwargs):
        obs = observer_of(self)
        if obs is None:
            return orig(self, *args, **kwargs)
        # A dummy batch exists only to join the peers' step collectives: time it as "step".
        return _timed(obs, n.COLLECTIVE_STEP, orig, self, args, kwargs, _after_dummy_batch)

    return execute_dummy_batch


def _wrap_step(orig: Callable, inst: VllmDpInstrumentor) -> Callable:
    @functools.wraps(orig)
    def step(self, *args, **kwargs):
        obs = observer_of(self)
        if obs is None:
            return orig(self, *args, **kwargs)
        # The engine core waits here for its workers' forward: a rank wedged in the model
        # reads as "inside step" with a growing time, never as idle.
        return _timed(obs, n.COLLECTIVE_STEP, orig, self, args, kwargs)

    step.__dict__[WRAPPED_MARK] = True
    return step


def _wrap_handle_client_request(orig: Callable, inst: VllmDpInstrumentor) -> Callable:
    start_dp_wave = inst._api.start_dp_wave

    @functools.wraps(orig)
    def _handle_client_request(self, request_type, request, *args, **kwargs):
        obs = observer_of(self)
        if obs is None or request_type != start_dp_wave:
            if obs is not None and getattr(request_type, "name", "") == "UTILITY":
                obs.utility_call(request)  # into the flight recorder's ring
            result = orig(self, request_type, request, *args, **kwargs)
            if obs is not None:
                try:
                    obs.check_wave()
                except Exception:  # noqa: BLE001
                    log_once("wave", "instrumented_core: wave observation failed")
            return result
        before = (self.ignore_start_dp_wave, self.engines_running, self.current_wave)
        result = orig(self, request_type, request, *args, **kwargs)
        try:
            after = (self.ignore_start_dp_wave, self.engines_running, self.current_wave)
            try:
                new_wave, exclude = request
            except (TypeError, ValueError):
                new_wave, exclude = -1, None
            outcome = start_dp_wave_outcome(
                ignoring=bool(before[0] and after[0]), excluded=exclude == self.engine_index,
                wave_changed=after[2] != before[2], started_running=bool(after[1] and not before[1]))
            obs.probe.start_dp_wave(new_wave, exclude, outcome)
            obs.check_wave()
            obs.update_phase()
        except Exception:  # noqa: BLE001
            log_once("wave", "instrumented_core: START_DP_WAVE observation failed")
        return result

    return _handle_client_request


def _mode_of(args: tuple, kwargs: dict) -> str:
    if args:
        return args[0]
    return kwargs.get("mode", "abort")


def _wrap_pause_scheduler(orig: Callable, inst: VllmDpInstrumentor) -> Callable:
    @functools.wraps(orig)
    def pause_scheduler(self, *args, **kwargs):
        obs = observer_of(self)
        if obs is None:
            return orig(self, *args, **kwargs)
        try:
            mode = _mode_of(args, kwargs)
            if mode in PAUSE_MODES:
                obs.probe.pause_requested(mode)
        except Exception:  # noqa: BLE001
            log_once("pause", "instrumented_core: pause observation failed")
        try:
            return orig(self, *args, **kwargs)
        finally:
            try:
                obs.update_phase()
            except Exception:  # noqa: BLE001
                log_once("pause", "instrumented_core: pause observation failed")

    return pause_scheduler


def _wrap_resume_scheduler(orig: Callable, inst: VllmDpInstrumentor) -> Callable:
    @functools.wraps(orig)
    def resume_scheduler(self, *args, **kwargs):
        obs = observer_of(self)
        if obs is None:
            return orig(self, *args, **kwargs)
        # vLLM resumes (and all-reduces) only when the loop is stopped and nothing is pending.
        resuming = not self.engines_running and not self.pending_pause
        if resuming:
            obs.probe.collective_begin(n.COLLECTIVE_RESUME)
        started = time.perf_counter()
        ok = False
        try:
            result = orig(self, *args, **kwargs)
            ok = True
            return result
        finally:
            if resuming:
                obs.probe.collective_end(n.COLLECTIVE_RESUME, time.perf_counter() - started)
                if ok:
                    obs.probe.resumed()
            try:
                obs.update_phase()
            except Exception:  # noqa: BLE001
                log_once("resume", "instrumented_core: resume observation failed")

    return resume_scheduler


def _wrap_collective(name: str) -> Callable:
    def factory(orig: Callable, inst: VllmDpInstrumentor) -> Callable:
        @functools.wraps(orig)
        def collective(self, *args, **kwargs):
            obs = observer_of(self)
            if obs is None:
                return orig(self, *args, **kwargs)
            return _timed(obs, name, orig, self, args, kwargs, _after_collective)

        return collective

    return factory


def _wrap_reject_add_while_paused(orig: Callable, inst: VllmDpInstrumentor) -> Callable:
    """0.33: True when a new request was rejected with ``engine_paused`` (paused by the
    ``pause_generation`` utility in abort/wait mode): counted as an outcome."""

    @functools.wraps(orig)
    def _reject_add_while_paused(self, *args, **kwargs):
        rejected = orig(self, *args, **kwargs)
        if rejected:
            obs = observer_of(self)
            if obs is not None:
                try:
                    obs.rejected(n.REJECT_ENGINE_PAUSED)
                except Exception:  # noqa: BLE001
                    log_once("reject", "instrumented_core: rejection observation failed")
        return rejected

    return _reject_add_while_paused


ENGINE_WRAPPERS: dict[str, Callable] = {
    "run_busy_loop": _wrap_run_busy_loop,
    "_has_global_unfinished_reqs": _wrap_has_global_unfinished_reqs,
    "_handle_client_request": _wrap_handle_client_request,
    "pause_scheduler": _wrap_pause_scheduler,
    "resume_scheduler": _wrap_resume_scheduler,
    "execute_dummy_batch": _wrap_execute_dummy_batch,
    "step": _wrap_step,
    "step_with_batch_queue": _wrap_step,
    "barrier": _wrap_collective(n.COLLECTIVE_BARRIER),
    "collective_rpc": _wrap_collective(n.COLLECTIVE_RPC),
}
assert set(ENGINE_WRAPPERS) == set(contract.ENGINE_METHODS)
#: Wrapped when the release has them (``VllmApi.optional_methods``).
OPTIONAL_ENGINE_WRAPPERS: dict[str, Callable] = {
    "_reject_add_while_paused": _wrap_reject_add_while_paused,
}
assert set(OPTIONAL_ENGINE_WRAPPERS) == set(contract.OPTIONAL_ENGINE_METHODS)
#: The leading parameters after ``self`` that a wrapper reads (by position, else by name);
#: ``sync_dp_state``'s are after its ``self`` in the 0.33 method flavour.
ARGUMENTS_READ: dict[str, tuple[str, ...]] = {
    "_handle_client_request": ("request_type", "request"),
    "pause_scheduler": ("mode",),
    "sync_dp_state": ("dp_group", "has_unfinished", "pending_pause"),
}


def rebind_step_fn(engine: Any) -> None:
    """``EngineCore.__init__`` binds ``self.step_fn`` to ``step`` or ``step_with_batch_queue``
    once. With the plugin the class is wrapped before that; an engine built before
    ``instrument()`` still holds the original: bind it to the wrapped method instead."""
    bound = engine.__dict__.get("step_fn")
    func = getattr(bound, "__func__", None)
    if func is None or getattr(func, WRAPPED_MARK, False):
        return
    name = getattr(func, "__name__", "")
    if name in STEP_METHODS and getattr(getattr(type(engine), name, None), WRAPPED_MARK, False):
        engine.step_fn = getattr(engine, name)
