"""One engine core's telemetry, configured from the environment and vLLM's own settings.

The ``model_name`` label defaults to vLLM's served model name, and vLLM's
``--otlp-traces-endpoint`` is used when no ``OTEL_EXPORTER_OTLP_*`` endpoint is set. Every
rank of one deployment derives the same trace-id key from the DP master address, so a pause's
spans from all ranks share one trace.

Every rank also says whether the plugin observes it: ``vllm_dp_plugin_active`` is 1 (reason
``ok``, or ``unknown_version`` on a vLLM nobody checked) on an instrumented rank's endpoint.
A rank the plugin cannot observe (the contract failed, the live engine lacks an attribute, its
telemetry failed to start) serves a status-only endpoint on the same port with that one series
at 0 and the reason, for as long as its busy loop runs: an inactive rank is visible, never a
silent gap, and it shows nothing it cannot know.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from instrumented_core.vllm_support import versions

__all__ = ["StatusEndpoint", "engine_info", "rank_of", "start_engine_telemetry",
           "start_status_endpoint"]

log = logging.getLogger("instrumented_core.vllm_support.instrumentor")


def engine_info(engine: Any, legacy: bool, api: Any) -> dict[str, str]:
    """The ``vllm_dp_info`` labels of this engine."""
    from instrumented_core import __version__

    cadence = getattr(api, "cadence", versions.CADENCE_INTERVAL)
    interval = (versions.FIXED_SYNC_INTERVAL if cadence == versions.CADENCE_FIXED
                else engine.dp_sync_interval)
    return {"dp_size": str(engine.dp_size), "sync_interval": str(interval),
            "protocol": "legacy" if legacy else "two-phase", "cadence": "fixed",
            "vllm_sync_cadence": cadence,
            "version": str(__version__), "vllm_version": api.version if api else "unknown"}


def _config_for(engine: Any, config: Any = None) -> Any:
    """The telemetry config from the environment, with vLLM's served model name and OTLP
    endpoint where the environment names none."""
    from instrumented_core.telemetry import TelemetryConfig

    if config is not None:
        return config
    vcfg = getattr(engine, "vllm_config", None)
    overrides: dict[str, Any] = {}
    if not os.environ.get("INSTRUMENTED_CORE_MODEL_NAME"):
        served = getattr(getattr(vcfg, "model_config", None), "served_model_name", None)
        if isinstance(served, (list, tuple)):
            served = served[0] if served else None
        if served:
            overrides["model_name"] = str(served)
    otlp = getattr(getattr(vcfg, "observability_config", None), "otlp_traces_endpoint", None)
    # vLLM's endpoint, and its protocol rule (gRPC unless OTEL_EXPORTER_OTLP_TRACES_PROTOCOL)
    return TelemetryConfig.from_env(vllm=True, vllm_traces_endpoint=otlp or None, **overrides)


def start_engine_telemetry(engine: Any, info: dict[str, str],
                           config: Any = None, reason: str = "ok") -> tuple[Any, Any]:
    """``(probe, closeable)`` for this engine: its endpoint, tracer and probe."""
    from instrumented_core.telemetry import start_rank_telemetry
    from instrumented_core.telemetry.metrics import plugin_active

    config = _config_for(engine, config)
    pc = engine.vllm_config.parallel_config
    group_key = f"vllm-dp/{pc.data_parallel_master_ip}:{pc.data_parallel_master_port}"
    telemetry = start_rank_telemetry(config, int(engine.dp_rank), int(engine.dp_size),
                                     info["protocol"], info, group_key)
    try:
        if telemetry.registry is not None:
            plugin_active(telemetry.registry, _labels(engine, config), True, reason,
                          info.get("vllm_version", "unknown"))
    except BaseException:
        telemetry.close()  # all or nothing: the port goes to the status-only endpoint
        raise
    if telemetry.server is not None:
        log.info("instrumented_core: DP rank %s telemetry on %s", engine.dp_rank,
                 telemetry.metrics_url)
    return telemetry.probe, telemetry


def rank_of(engine: Any) -> int | None:
    """This engine's DP rank: ``dp_rank``, else its parallel config's, else ``engine_index``."""
    for read in (lambda: engine.dp_rank,
                 lambda: engine.vllm_config.parallel_config.data_parallel_rank,
                 lambda: engine.engine_index):
        try:
            value = read()
        except Exception:  # noqa: BLE001 - try the next source
            continue
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _labels(engine: Any, config: Any) -> dict[str, str]:
    from instrumented_core.telemetry import names as n

    return {n.LABEL_ENGINE: str(rank_of(engine)), n.LABEL_MODEL_NAME: config.model_name}


class StatusEndpoint:
    """A status-only endpoint: ``vllm_dp_plugin_active{reason=...} 0`` and nothing else."""

    def __init__(self, server: Any, reason: str) -> None:
        self.server = server
        self.reason = reason

    @property
    def url(self) -> str:
        return self.server.url

    def close(self) -> None:
        server, self.server = self.server, None
        if server is not None:
            server.close()


def start_status_endpoint(engine: Any, reason: str, vllm_version: str,
                          config: Any = None) -> StatusEndpoint | None:
    """Serve only ``vllm_dp_plugin_active`` (0, ``reason``) on this rank's port; None when the
    rank or a free port cannot be had (logged once; the error that turned the plugin off has
    been logged already). Never raises."""
    try:
        from prometheus_client import CollectorRegistry

        from instrumented_core.telemetry.metrics import plugin_active
        from instrumented_core.telemetry.server import MetricsServer

        config = _config_for(engine, config)
        if not config.enabled:
            return None
        rank = rank_of(engine)
        if rank is None:
            log.warning("instrumented_core: plugin off (%s) and this engine's DP rank is "
                        "unknown: no status endpoint", reason)
            return None
        registry = CollectorRegistry()
        plugin_active(registry, _labels(engine, config), False, reason, vllm_version)
        server = MetricsServer(registry, config.metrics_host, config.port_for(rank), rank)
        log.info("instrumented_core: DP rank %s is NOT observed (%s); %s serves "
                 "vllm_dp_plugin_active=0 with that reason", rank, reason, server.url)
        return StatusEndpoint(server, reason)
    except Exception as e:  # noqa: BLE001 - never break vLLM
        log.warning("instrumented_core: plugin off (%s); no status endpoint either: %s: %s",
                    reason, type(e).__name__, e)
        return None
