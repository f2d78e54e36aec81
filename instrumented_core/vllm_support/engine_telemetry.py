"""One engine core's telemetry, configured from the environment and vLLM's own settings.

The ``model_name`` label defaults to vLLM's served model name, and vLLM's
``--otlp-traces-endpoint`` is used when no ``OTEL_EXPORTER_OTLP_*`` endpoint is set. Every
rank of one deployment derives the same trace-id key from the DP master address, so a pause's
spans from all ranks share one trace.
"""

from __future__ import annotations

import logging
import os
from typing import Any

__all__ = ["engine_info", "start_engine_telemetry"]

log = logging.getLogger("instrumented_core.vllm_support.instrumentor")


def engine_info(engine: Any, legacy: bool, api: Any) -> dict[str, str]:
    """The ``vllm_dp_info`` labels of this engine."""
    from instrumented_core import __version__

    return {"dp_size": str(engine.dp_size), "sync_interval": str(engine.dp_sync_interval),
            "protocol": "legacy" if legacy else "two-phase", "cadence": "fixed",
            "version": str(__version__), "vllm_version": api.version if api else "unknown"}


def start_engine_telemetry(engine: Any, info: dict[str, str],
                           config: Any = None) -> tuple[Any, Any]:
    """``(probe, closeable)`` for this engine: its endpoint, tracer and probe."""
    from instrumented_core.telemetry import TelemetryConfig, start_rank_telemetry

    vcfg = engine.vllm_config
    if config is None:
        overrides: dict[str, Any] = {}
        if not os.environ.get("INSTRUMENTED_CORE_MODEL_NAME"):
            served = getattr(vcfg.model_config, "served_model_name", None)
            if isinstance(served, (list, tuple)):
                served = served[0] if served else None
            if served:
                overrides["model_name"] = str(served)
        otlp = getattr(getattr(vcfg, "observability_config", None), "otlp_traces_endpoint", None)
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
