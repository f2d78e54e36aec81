"""``VllmDpInstrumentor``: makes vLLM's data-parallel two-phase pause observable.

Follows the shape of OpenTelemetry contrib instrumentations (``BaseInstrumentor``):
``VllmDpInstrumentor().instrument(**kwargs)`` / ``.uninstrument()``, a process-wide singleton,
idempotent, every wrap has its unwrap. ``opentelemetry-instrumentation`` is not a dependency of
this package; the same public API is implemented here (``instrument``, ``uninstrument``,
``is_instrumented_by_opentelemetry``, ``instrumentation_dependencies``), and the class is
registered under the ``opentelemetry_instrumentor`` entry-point group.

What it wraps (class attributes, which vLLM looks up at call time, so it works under fork,
spawn and Ray; the class is never swapped):

=====================================  ====================================================
``DPEngineCoreProc.run_busy_loop``     start this rank's telemetry (endpoint on port base +
                                       rank, tracer), stop it when the loop ends
``._has_global_unfinished_reqs``       one step: real/dummy, wave changes, consensus
``ParallelConfig.sync_dp_state``       one sync round: time inside, local inputs, the summed
                                       votes, "inside since" while blocked
``._handle_client_request``            ``START_DP_WAVE`` outcome (acted, ignored, stale,
                                       excluded) from the state before and after
``.pause_scheduler``                   pause requested (mode) and the phase it leads to
``.resume_scheduler``                  resume (and its DP all-reduce, as collective "resume")
``.execute_dummy_batch``               a dummy step; time inside as collective "step"
``.step`` / ``.step_with_batch_queue``  a real step (schedule, wait for the workers' forward):
                                       time inside as "step", whichever one the release's
                                       ``step_fn`` is (plain, batch queue, async scheduling)
``.barrier`` / ``.collective_rpc``     time inside, as collectives "barrier", "collective_rpc"
=====================================  ====================================================

Every wrapper keeps the original's signature (``functools.wraps``: vLLM's utility dispatch
inspects ``signature(method)`` to convert msgspec arguments, so a bare ``*args`` wrapper breaks
``collective_rpc``), calls the original with the original arguments and returns its result (or lets
its exception through) unchanged; observation happens before and after, through the probe,
which guards itself. An engine whose telemetry failed to start runs through pure
pass-throughs.

Raw vote count: ``sync_dp_state`` returns only ``(has_unfinished_global, consensus)``. To report
the number of ranks voting to pause, during the call (and only on the calling thread) the
all-reduce it looks up at call time (0.32: ``torch.distributed.all_reduce``; 0.33: the config
module's ``cpu_all_reduce_``) is replaced by a pass-through that reads the summed tensor after
the original reduced it. If that hook is unavailable the votes are inferred from the inputs and
the result (exact at DP=2 except "I don't vote, someone has work": reported as 0).
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from typing import Any, Callable, Collection

from instrumented_core.protocol import PAUSE_MODES, Phase, SyncResult, decode_sync_state, phase_of
from instrumented_core.telemetry.worker_board import remove_board_files
from instrumented_core.vllm_support import contract

__all__ = ["VllmDpInstrumentor", "EngineObserver"]

log = logging.getLogger(__name__)

_OBSERVER_ATTR = "_instrumented_core_observer"
_WRAPPED_MARK = "_instrumented_core_wrapped"
_LEGACY_MARK = "_instrumented_core_legacy_one_phase"

COLLECTIVE_BARRIER = "barrier"
COLLECTIVE_RPC = "collective_rpc"
COLLECTIVE_RESUME = "resume"
COLLECTIVE_STEP = "step"
#: The engine-step methods; ``EngineCore.__init__`` binds one of them as ``step_fn``.
STEP_METHODS = ("step", "step_with_batch_queue")

_tls = threading.local()


class _StateView:
    """What the probe reads at scrape time, under vLLM's names (``sync_interval`` is vLLM's
    ``dp_sync_interval``; ``sync_rounds`` is counted by the observer)."""

    fast_sync = False

    def __init__(self, engine: Any, observer: "EngineObserver") -> None:
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
        self.phase = self.phase_now()
        probe.attach(_StateView(engine, self))

    def phase_now(self) -> Phase:
        e = self.engine
        if self.legacy:
            # One-phase pause: no pending flag, no consensus; a paused scheduler whose loop
            # still steps (woken by START_DP_WAVE) is shown as pending, else as paused.
            paused = bool(e.is_scheduler_paused())
            return phase_of(paused and bool(e.engines_running), paused)
        return phase_of(bool(e.pending_pause), bool(e.ignore_start_dp_wave))

    def update_phase(self) -> None:
        new = self.phase_now()
        if new is not self.phase:
            old, self.phase = self.phase, new
            self.probe.phase_changed(old, new)

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


def _observer(engine: Any) -> EngineObserver | None:
    try:
        return engine.__dict__.get(_OBSERVER_ATTR)
    except AttributeError:  # pragma: no cover - engines always have a __dict__
        return None


def _log_once(key: str, msg: str, *args: Any) -> None:
    seen = _log_once.__dict__.setdefault("seen", set())
    if key not in seen:
        seen.add(key)
        log.exception(msg, *args)


# ----------------------------------------------------------------------------------------------
# wrappers (each built around the original it replaces)
# ----------------------------------------------------------------------------------------------


def _wrap_run_busy_loop(orig: Callable, inst: "VllmDpInstrumentor") -> Callable:
    @functools.wraps(orig)
    def run_busy_loop(self, *args, **kwargs):
        obs = inst._start_engine(self)
        try:
            return orig(self, *args, **kwargs)
        finally:
            if obs is not None:
                try:
                    self.__dict__.pop(_OBSERVER_ATTR, None)
                    obs.close()
                    remove_board_files()  # this engine's workers' records
                except Exception:  # noqa: BLE001
                    _log_once("close", "instrumented_core: closing telemetry failed")

    return run_busy_loop


def _wrap_has_global_unfinished_reqs(orig: Callable, inst: "VllmDpInstrumentor") -> Callable:
    @functools.wraps(orig)
    def _has_global_unfinished_reqs(self, *args, **kwargs):
        obs = _observer(self)
        if obs is None:
            return orig(self, *args, **kwargs)
        try:
            obs.check_wave()
        except Exception:  # noqa: BLE001
            _log_once("wave", "instrumented_core: wave observation failed")
        _tls.observer = obs
        try:
            result = orig(self, *args, **kwargs)
        finally:
            _tls.observer = None
        try:
            obs.probe.step_end(obs.dummy_step)
            obs.dummy_step = False
            if obs.consensus_seen:
                obs.consensus_seen = False
                obs.probe.consensus()
            obs.update_phase()
        except Exception:  # noqa: BLE001
            _log_once("step", "instrumented_core: step observation failed")
        return result

    return _has_global_unfinished_reqs


def _wrap_execute_dummy_batch(orig: Callable, inst: "VllmDpInstrumentor") -> Callable:
    @functools.wraps(orig)
    def execute_dummy_batch(self, *args, **kwargs):
        obs = _observer(self)
        if obs is None:
            return orig(self, *args, **kwargs)
        # A dummy batch exists only to join the peers' step collectives: time it as "step".
        obs.probe.collective_begin(COLLECTIVE_STEP)
        started = time.perf_counter()
        try:
            return orig(self, *args, **kwargs)
        finally:
            obs.dummy_step = True
            obs.probe.collective_end(COLLECTIVE_STEP, time.perf_counter() - started)

    return execute_dummy_batch


def _wrap_step(orig: Callable, inst: "VllmDpInstrumentor") -> Callable:
    @functools.wraps(orig)
    def step(self, *args, **kwargs):
        obs = _observer(self)
        if obs is None:
            return orig(self, *args, **kwargs)
        # The engine core waits here for its workers' forward: a rank wedged in the model
        # reads as "inside step" with a growing time, never as idle.
        probe = obs.probe
        probe.collective_begin(COLLECTIVE_STEP)
        started = time.perf_counter()
        try:
            return orig(self, *args, **kwargs)
        finally:
            probe.collective_end(COLLECTIVE_STEP, time.perf_counter() - started)

    step.__dict__[_WRAPPED_MARK] = True
    return step


def _wrap_handle_client_request(orig: Callable, inst: "VllmDpInstrumentor") -> Callable:
    start_dp_wave = inst._api.start_dp_wave

    @functools.wraps(orig)
    def _handle_client_request(self, request_type, request, *args, **kwargs):
        obs = _observer(self)
        if obs is None or request_type != start_dp_wave:
            result = orig(self, request_type, request, *args, **kwargs)
            if obs is not None:
                try:
                    obs.check_wave()
                except Exception:  # noqa: BLE001
                    _log_once("wave", "instrumented_core: wave observation failed")
            return result
        before = (self.ignore_start_dp_wave, self.engines_running, self.current_wave)
        result = orig(self, request_type, request, *args, **kwargs)
        try:
            after = (self.ignore_start_dp_wave, self.engines_running, self.current_wave)
            try:
                new_wave, exclude = request
            except (TypeError, ValueError):
                new_wave, exclude = -1, None
            if before[0] and after[0]:
                outcome = "ignored"
            elif exclude == self.engine_index:
                outcome = "excluded"
            elif after[2] != before[2] or (after[1] and not before[1]):
                outcome = "acted"
            else:
                outcome = "stale"
            obs.probe.start_dp_wave(new_wave, exclude, outcome)
            obs.check_wave()
            obs.update_phase()
        except Exception:  # noqa: BLE001
            _log_once("wave", "instrumented_core: START_DP_WAVE observation failed")
        return result

    return _handle_client_request


def _mode_of(args: tuple, kwargs: dict) -> str:
    if args:
        return args[0]
    return kwargs.get("mode", "abort")


def _wrap_pause_scheduler(orig: Callable, inst: "VllmDpInstrumentor") -> Callable:
    @functools.wraps(orig)
    def pause_scheduler(self, *args, **kwargs):
        obs = _observer(self)
        if obs is None:
            return orig(self, *args, **kwargs)
        try:
            mode = _mode_of(args, kwargs)
            if mode in PAUSE_MODES:
                obs.probe.pause_requested(mode)
        except Exception:  # noqa: BLE001
            _log_once("pause", "instrumented_core: pause observation failed")
        try:
            return orig(self, *args, **kwargs)
        finally:
            try:
                obs.update_phase()
            except Exception:  # noqa: BLE001
                _log_once("pause", "instrumented_core: pause observation failed")

    return pause_scheduler


def _wrap_resume_scheduler(orig: Callable, inst: "VllmDpInstrumentor") -> Callable:
    @functools.wraps(orig)
    def resume_scheduler(self, *args, **kwargs):
        obs = _observer(self)
        if obs is None:
            return orig(self, *args, **kwargs)
        # vLLM resumes (and all-reduces) only when the loop is stopped and nothing is pending.
        resuming = not self.engines_running and not self.pending_pause
        if resuming:
            obs.probe.collective_begin(COLLECTIVE_RESUME)
        started = time.perf_counter()
        ok = False
        try:
            result = orig(self, *args, **kwargs)
            ok = True
            return result
        finally:
            if resuming:
                obs.probe.collective_end(COLLECTIVE_RESUME, time.perf_counter() - started)
                if ok:
                    obs.probe.resumed()
            try:
                obs.update_phase()
            except Exception:  # noqa: BLE001
                _log_once("resume", "instrumented_core: resume observation failed")

    return resume_scheduler


def _wrap_collective(name: str) -> Callable:
    def factory(orig: Callable, inst: "VllmDpInstrumentor") -> Callable:
        @functools.wraps(orig)
        def collective(self, *args, **kwargs):
            obs = _observer(self)
            if obs is None:
                return orig(self, *args, **kwargs)
            obs.probe.collective_begin(name)
            started = time.perf_counter()
            try:
                return orig(self, *args, **kwargs)
            finally:
                obs.probe.collective_end(name, time.perf_counter() - started)
                obs.probe.progress()

        return collective

    return factory


def _make_sync_dp_state(orig: Callable, flavour: str, hook: tuple[Any, str] | None) -> Callable:
    """``sync_dp_state`` wrapper (static in 0.32, a method in 0.33): one sync round."""
    offset = 1 if flavour == "method" else 0  # skip ``self`` (the ParallelConfig)

    def observed(args: tuple, kwargs: dict) -> Any:
        obs: EngineObserver | None = getattr(_tls, "observer", None)
        if obs is None:  # not called from an instrumented engine's step
            return orig(*args, **kwargs)
        pos = args[offset:]
        has_unfinished = bool(pos[1] if len(pos) > 1 else kwargs.get("has_unfinished", False))
        pending = bool(pos[2] if len(pos) > 2 else kwargs.get("pending_pause", False))
        obs.probe.sync_begin(has_unfinished, pending)
        captured: list[list[int]] = []
        restore = None
        if hook is not None:
            restore = _install_capture(hook, captured)
        started = time.perf_counter()
        try:
            result = orig(*args, **kwargs)
        finally:
            if restore is not None:
                restore()
        seconds = time.perf_counter() - started
        try:
            dp_size = int(obs.engine.dp_size)
            if captured and len(captured[-1]) >= 2:
                sync = decode_sync_state(captured[-1][:2], dp_size)
            else:
                global_unfinished, consensus = result
                votes = dp_size if consensus else int(pending)
                sync = SyncResult(bool(global_unfinished), votes, dp_size)
            obs.sync_rounds += 1
            obs.probe.sync_end(sync, seconds)
            if sync.consensus:
                obs.consensus_seen = True
        except Exception:  # noqa: BLE001
            _log_once("sync", "instrumented_core: sync round observation failed")
        return result

    if flavour == "static":
        @functools.wraps(orig)
        def sync_dp_state(*args, **kwargs):
            return observed(args, kwargs)

        wrapped: Any = staticmethod(sync_dp_state)
    else:
        @functools.wraps(orig)
        def sync_dp_state(*args, **kwargs):  # type: ignore[no-redef]
            return observed(args, kwargs)

        wrapped = sync_dp_state
    sync_dp_state.__dict__[_WRAPPED_MARK] = True
    return wrapped


def _install_capture(hook: tuple[Any, str], captured: list) -> Callable[[], None]:
    """Swap ``namespace.attr`` for a pass-through recording the reduced tensor (this thread
    only) and return the function that puts the original back."""
    namespace, attr = hook
    real = getattr(namespace, attr)
    tid = threading.get_ident()

    def capture(tensor, *args, **kwargs):
        out = real(tensor, *args, **kwargs)
        if threading.get_ident() == tid:
            try:
                captured.append([int(v) for v in tensor.tolist()])
            except Exception:  # noqa: BLE001 - the reduce itself succeeded; keep going
                pass
        return out

    setattr(namespace, attr, capture)

    def restore() -> None:
        setattr(namespace, attr, real)

    return restore


_ENGINE_WRAPPERS: dict[str, Callable] = {
    "run_busy_loop": _wrap_run_busy_loop,
    "_has_global_unfinished_reqs": _wrap_has_global_unfinished_reqs,
    "_handle_client_request": _wrap_handle_client_request,
    "pause_scheduler": _wrap_pause_scheduler,
    "resume_scheduler": _wrap_resume_scheduler,
    "execute_dummy_batch": _wrap_execute_dummy_batch,
    "step": _wrap_step,
    "step_with_batch_queue": _wrap_step,
    "barrier": _wrap_collective(COLLECTIVE_BARRIER),
    "collective_rpc": _wrap_collective(COLLECTIVE_RPC),
}
assert set(_ENGINE_WRAPPERS) == set(contract.ENGINE_METHODS)


# ----------------------------------------------------------------------------------------------
# the instrumentor
# ----------------------------------------------------------------------------------------------


class VllmDpInstrumentor:
    """Instrument vLLM's DP engine cores (API of OpenTelemetry's ``BaseInstrumentor``).

    ``instrument(**kwargs)`` keyword arguments:

    - ``telemetry_config``: a :class:`~instrumented_core.telemetry.TelemetryConfig`; default
      ``TelemetryConfig.from_env()`` read when each engine's busy loop starts. vLLM's
      ``--otlp-traces-endpoint`` is used when no ``OTEL_EXPORTER_OTLP_*`` endpoint is set.
    - ``probe_factory``: ``callable(engine, info) -> (probe, closeable_or_None)`` replacing
      :func:`~instrumented_core.telemetry.start_rank_telemetry` (tests, custom sinks).
    - ``import_module``: module loader for the contract check (tests use a fake vLLM).

    Returns nothing; on a contract mismatch one error is logged and nothing is wrapped
    (``is_instrumented_by_opentelemetry`` stays False, ``contract_error`` holds the message).
    """

    _instance: "VllmDpInstrumentor | None" = None
    _lock = threading.Lock()

    def __new__(cls, *args: Any, **kwargs: Any) -> "VllmDpInstrumentor":
        with cls._lock:
            if cls._instance is None:
                inst = super().__new__(cls)
                inst._is_instrumented_by_opentelemetry = False
                inst._saved = []
                inst._api = None
                inst._kwargs = {}
                inst.contract_error = None
                cls._instance = inst
            return cls._instance

    # -- BaseInstrumentor API -----------------------------------------------------------------

    def instrumentation_dependencies(self) -> Collection[str]:
        return ("vllm >= 0.32, < 0.34",)

    @property
    def is_instrumented_by_opentelemetry(self) -> bool:
        return self._is_instrumented_by_opentelemetry

    def instrument(self, **kwargs: Any) -> None:
        if self._is_instrumented_by_opentelemetry:
            log.warning("Attempting to instrument while already instrumented")
            return None
        result = self._instrument(**kwargs)
        return result

    def uninstrument(self, **kwargs: Any) -> None:
        if self._is_instrumented_by_opentelemetry:
            result = self._uninstrument(**kwargs)
            self._is_instrumented_by_opentelemetry = False
            return result
        log.warning("Attempting to uninstrument while already uninstrumented")
        return None

    # -- implementation -----------------------------------------------------------------------

    def _instrument(self, **kwargs: Any) -> None:
        import importlib

        loader = kwargs.get("import_module") or importlib.import_module
        try:
            api = contract.resolve(loader)
        except contract.ContractError as e:
            self.contract_error = str(e)
            log.error("%s", e)
            return None
        except Exception as e:  # noqa: BLE001 - never break vLLM
            self.contract_error = f"contract check failed: {type(e).__name__}: {e}"
            log.error("instrumented_core instrumentor inactive: %s", self.contract_error)
            return None
        self.contract_error = None
        self._api = api
        self._kwargs = dict(kwargs)
        planned: list[tuple[type, str, Any]] = []
        try:
            for name, factory in _ENGINE_WRAPPERS.items():
                planned.append((api.engine_cls, name, factory(getattr(api.engine_cls, name), self)))
            raw = api.parallel_config_cls.__dict__["sync_dp_state"]
            orig = raw.__func__ if isinstance(raw, staticmethod) else raw
            planned.append((api.parallel_config_cls, "sync_dp_state",
                            _make_sync_dp_state(orig, api.sync_flavour, api.reduce_hook)))
        except Exception as e:  # noqa: BLE001 - building wrappers touches nothing yet
            self.contract_error = f"cannot build wrappers: {type(e).__name__}: {e}"
            log.error("instrumented_core instrumentor inactive: %s", self.contract_error)
            return None
        for cls, name, wrapper in planned:  # all-or-nothing: nothing can fail from here
            had = name in cls.__dict__
            self._saved.append((cls, name, had, cls.__dict__.get(name), wrapper))
            setattr(cls, name, wrapper)
        self._is_instrumented_by_opentelemetry = True
        log.info("instrumented_core: vLLM %s DP engine instrumented (%d methods; sync_dp_state "
                 "%s%s)", api.version, len(planned), api.sync_flavour,
                 "" if api.reduce_hook else ", votes inferred")
        return None

    def _uninstrument(self, **kwargs: Any) -> None:
        for cls, name, had, original, wrapper in reversed(self._saved):
            if cls.__dict__.get(name) is not wrapper:
                # Someone wrapped over us; leave their wrapper in place. Ours becomes a pure
                # pass-through because no engine observer is created any more.
                log.warning("instrumented_core: %s.%s was re-wrapped by someone else; left in "
                            "place", cls.__name__, name)
                continue
            if had:
                setattr(cls, name, original)
            else:
                delattr(cls, name)
        self._saved = []
        return None

    # -- per engine ---------------------------------------------------------------------------

    def _start_engine(self, engine: Any) -> EngineObserver | None:
        """Called in the engine-core process when its busy loop starts. Never raises."""
        if not self._is_instrumented_by_opentelemetry:
            return None
        try:
            missing = contract.missing_instance_attributes(engine)
            if missing:
                log.error("instrumented_core: vLLM engine lacks %s; telemetry stays OFF for "
                          "this engine (vLLM runs unchanged)", ", ".join(missing))
                return None
            legacy = bool(getattr(type(engine), _LEGACY_MARK, False))
            info = self._info(engine, legacy)
            factory = self._kwargs.get("probe_factory")
            if factory is not None:
                probe, closeable = factory(engine, info)
            else:
                probe, closeable = self._start_rank_telemetry(engine, info)
            obs = EngineObserver(engine, probe, closeable, legacy=legacy)
            engine.__dict__[_OBSERVER_ATTR] = obs
            _rebind_step_fn(engine)
            return obs
        except Exception:  # noqa: BLE001 - never break the engine
            log.exception("instrumented_core: telemetry for this engine failed to start; "
                          "vLLM runs unchanged")
            return None

    def _info(self, engine: Any, legacy: bool) -> dict[str, str]:
        from instrumented_core import __version__

        api = self._api
        return {"dp_size": str(engine.dp_size), "sync_interval": str(engine.dp_sync_interval),
                "protocol": "legacy" if legacy else "two-phase", "cadence": "fixed",
                "version": str(__version__), "vllm_version": api.version if api else "unknown"}

    def _start_rank_telemetry(self, engine: Any, info: dict[str, str]) -> tuple[Any, Any]:
        from instrumented_core.telemetry import TelemetryConfig, start_rank_telemetry

        config = self._kwargs.get("telemetry_config")
        overrides: dict[str, Any] = {}
        vcfg = engine.vllm_config
        import os

        if config is None:
            if not os.environ.get("INSTRUMENTED_CORE_MODEL_NAME"):
                served = getattr(vcfg.model_config, "served_model_name", None)
                if isinstance(served, (list, tuple)):
                    served = served[0] if served else None
                if served:
                    overrides["model_name"] = str(served)
            otlp = getattr(getattr(vcfg, "observability_config", None),
                           "otlp_traces_endpoint", None)
            if otlp and not (os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
                             or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")):
                overrides["otlp_endpoint"] = otlp
                if not os.environ.get("OTEL_TRACES_EXPORTER"):
                    overrides["span_exporter"] = "otlp"
            config = TelemetryConfig.from_env(**overrides)
        pc = vcfg.parallel_config
        group_key = f"vllm-dp/{pc.data_parallel_master_ip}:{pc.data_parallel_master_port}"
        telemetry = start_rank_telemetry(config, int(engine.dp_rank), int(engine.dp_size),
                                         info["protocol"], info, group_key)
        if telemetry.server is not None:
            log.info("instrumented_core: DP rank %s telemetry on %s", engine.dp_rank,
                     telemetry.metrics_url)
        return telemetry.probe, telemetry


def _rebind_step_fn(engine: Any) -> None:
    """``EngineCore.__init__`` binds ``self.step_fn`` to ``step`` or ``step_with_batch_queue``
    once. With the plugin the class is wrapped before that; an engine built before
    ``instrument()`` still holds the original: bind it to the wrapped method instead."""
    bound = engine.__dict__.get("step_fn")
    func = getattr(bound, "__func__", None)
    if func is None or getattr(func, _WRAPPED_MARK, False):
        return
    name = getattr(func, "__name__", "")
    if name in STEP_METHODS and getattr(getattr(type(engine), name, None), _WRAPPED_MARK, False):
        engine.step_fn = getattr(engine, name)


def observer_of(engine: Any) -> EngineObserver | None:
    """The observer attached to ``engine`` (None when not instrumented); for tests."""
    return _observer(engine)

