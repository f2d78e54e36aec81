"""vLLM general plugin: instrument every DP engine-core process of a deployment.

Installing the package is enough: vLLM calls every ``vllm.general_plugins`` entry point once per
process (front end, each engine core in ``EngineCore.__init__``, each worker); this package
registers::

    [project.entry-points."vllm.general_plugins"]
    instrumented_core = "instrumented_core.vllm_support.plugin:register"

``register()`` installs :class:`~instrumented_core.vllm_support.instrumentor.VllmDpInstrumentor`
in processes that run (or will fork) engine cores: those that have imported vLLM's engine-core
module, and the main process (so engine cores forked from it inherit the wraps). In every
process it also installs :mod:`~instrumented_core.vllm_support.worker_hooks`, which make each
worker publish where it is (call from the engine core, model collective) to shared memory that
its engine core's endpoint reads; they stay inert outside workers. The wraps are inert until a
``DPEngineCoreProc`` busy loop starts, so the metrics endpoint and the span exporter exist only
in engine-core processes, one per DP rank.

Configuration, by environment (set it where ``vllm serve`` / your ``AsyncLLM`` runs; vLLM's
engine cores inherit it):

- ``INSTRUMENTED_CORE_TELEMETRY``: ``1`` (default) / ``0`` turns the instrumentation on / off.
- ``INSTRUMENTED_CORE_METRICS_PORT_BASE``: DP rank ``r`` serves ``/metrics`` on base + r
  (default 8100; ``0`` picks free ports, logged by each rank); ``INSTRUMENTED_CORE_METRICS_HOST``
  (default 127.0.0.1).
- ``INSTRUMENTED_CORE_MODEL_NAME``: the ``model_name`` label (default: vLLM's served model name).
- Spans: the standard ``OTEL_TRACES_EXPORTER``, ``OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT``,
  ``OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL``, ``OTEL_SERVICE_NAME``; without them vLLM's
  ``--otlp-traces-endpoint`` is used if given, else spans go to ``INSTRUMENTED_CORE_SPANS_FILE``.
- ``VLLM_PLUGINS``, when set, is vLLM's allow-list of entry-point names: include
  ``instrumented_core``.
- ``INSTRUMENTED_CORE_VLLM_UNKNOWN_VERSION``: ``activate`` (default) / ``off``: on a vLLM
  version outside the checked lines (0.21 to 0.33) whose whole structure matches, instrument
  it with one warning, or keep it off with one error.

Never raises into vLLM: a bad setting or a vLLM version whose internals differ logs one error
and leaves vLLM uninstrumented. Off is never silent: when the contract fails, each DP rank's
endpoint (port base + rank) serves ``vllm_dp_plugin_active{reason=...} 0`` while its busy
loop runs (a single pass-through around ``run_busy_loop``; nothing else is wrapped).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import sys

from instrumented_core.telemetry.config import ENV_ENABLED, TelemetryConfig, TelemetryConfigError

__all__ = ["ENTRY_POINT_NAME", "config_from_env", "register", "should_activate"]

log = logging.getLogger(__name__)

#: Entry-point name under ``vllm.general_plugins``.
ENTRY_POINT_NAME = "instrumented_core"
_ENGINE_CORE_MODULE = "vllm.v1.engine.core"
_error_logged = False


def should_activate() -> bool:
    """True in processes that run engine cores now or fork them later (not in workers)."""
    if _ENGINE_CORE_MODULE in sys.modules:
        return True
    return multiprocessing.parent_process() is None


def config_from_env() -> TelemetryConfig:
    """The settings every vLLM process checks at load, by vLLM's rules for its OTLP endpoint:
    its front end exports ``--otlp-traces-endpoint`` as ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``
    (often a bare ``host:port``, gRPC), which must not turn the plugin off."""
    return TelemetryConfig.from_env(vllm=True)


def register() -> None:
    """``vllm.general_plugins`` entry point. Idempotent; never raises."""
    global _error_logged
    try:
        config = config_from_env()
        if not config.enabled:
            log.debug("instrumented_core: %s is off; vLLM left uninstrumented", ENV_ENABLED)
            return
        from instrumented_core.vllm_support import worker_hooks

        # In every process: workers (spawned, or forked from an engine core) publish where
        # they are; the hooks stay inert where no engine-to-worker call ever arrives.
        worker_hooks.install()
        if not should_activate():
            return
        from instrumented_core.vllm_support.instrumentor import VllmDpInstrumentor

        instrumentor = VllmDpInstrumentor()
        if not instrumentor.is_instrumented_by_opentelemetry:
            # The config is read again (with vLLM's own settings) when each engine starts.
            instrumentor.instrument()
            if not instrumentor.is_instrumented_by_opentelemetry:
                instrumentor.serve_status_when_inactive()
    except TelemetryConfigError as e:
        if not _error_logged:
            _error_logged = True
            log.error("instrumented_core: telemetry setting rejected, vLLM left "
                      "uninstrumented (pid %d): %s", os.getpid(), e)
    except Exception:
        if not _error_logged:
            _error_logged = True
            log.exception("instrumented_core: plugin failed, vLLM left uninstrumented")
