"""Telemetry for DP ranks: names, metrics, spans, the probe and the per-rank endpoint.

Imports are lazy (PEP 562): ``from instrumented_core.telemetry import TelemetryConfig`` loads
only the configuration, and the vLLM plugin, which runs in every vLLM process before it decides
to activate, never pulls in the OpenTelemetry SDK or prometheus_client unless an engine core
actually starts its telemetry.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "NULL_PROBE",
    "Probe",
    "RankTelemetry",
    "TelemetryConfig",
    "TelemetryConfigError",
    "TelemetryProbe",
    "start_rank_telemetry",
]

_HOME = {
    "NULL_PROBE": "instrumented_core.probe",
    "Probe": "instrumented_core.probe",
    "TelemetryProbe": "instrumented_core.telemetry.probe",
    "RankTelemetry": "instrumented_core.telemetry.rank",
    "start_rank_telemetry": "instrumented_core.telemetry.rank",
    "TelemetryConfig": "instrumented_core.telemetry.config",
    "TelemetryConfigError": "instrumented_core.telemetry.config",
}


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
