"""One rank's telemetry, started from its engine thread: registry, endpoint, tracer, probe."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import CollectorRegistry

from instrumented_core.probe import NULL_PROBE, Probe
from instrumented_core.telemetry import names as n
from instrumented_core.telemetry.config import TelemetryConfig
from instrumented_core.telemetry.flight_recorder import FlightRecorderCollector
from instrumented_core.telemetry.metrics import RankMetrics, RankRegistry
from instrumented_core.telemetry.probe import TelemetryProbe
from instrumented_core.telemetry.server import MetricsServer
from instrumented_core.telemetry.tracing import make_tracer_provider

__all__ = ["RankParts", "RankTelemetry", "build_rank", "start_rank_telemetry"]


class RankParts(NamedTuple):
    registry: RankRegistry
    metrics: RankMetrics
    probe: TelemetryProbe


def build_rank(rank: int, dp_size: int, model_name: str, info: Mapping[str, str],
               provider: TracerProvider | None, *, group_key: str = "dp",
               protocol: str = "two-phase") -> RankParts:
    """Everything a rank's endpoint serves: the registry with every collector registered,
    the metrics and the probe that feeds them. The one place a rank's series are registered,
    so the series-budget test (tests/test_series.py) and the scale benchmark count what
    ``start_rank_telemetry`` serves; a series added here counts against the budget."""
    registry = RankRegistry()
    metrics = RankMetrics(registry, rank, model_name, info)
    metrics.dp_size.set(dp_size)  # never served as 0 (the doctor's "defaults" sign)
    probe = TelemetryProbe(rank, dp_size, metrics, provider, group_key=group_key,
                           protocol=protocol, model_name=model_name)
    registry.register(FlightRecorderCollector(probe.flight, {
        n.LABEL_ENGINE: str(rank), n.LABEL_MODEL_NAME: model_name}))
    return RankParts(registry, metrics, probe)


@dataclass
class RankTelemetry:
    probe: Probe
    server: MetricsServer | None
    registry: CollectorRegistry | None
    watchdog: Any = None  # the flight recorder's watchdog (telemetry.watchdog.Watchdog)

    @property
    def metrics_url(self) -> str | None:
        return self.server.url if self.server else None

    def close(self) -> None:
        """Idempotent: the engine thread and the cluster's stop watcher may both call it."""
        watchdog, self.watchdog = self.watchdog, None
        if watchdog is not None:
            watchdog.stop()
        self.probe.shutdown()
        server, self.server = self.server, None
        if server is not None:
            server.close()


def start_rank_telemetry(
    config: TelemetryConfig,
    rank: int,
    dp_size: int,
    protocol: str,
    info: Mapping[str, str],
    group_key: str,
) -> RankTelemetry:
    """Registry + endpoint + tracer + probe for one rank; call from the engine thread."""
    if not config.enabled:
        return RankTelemetry(NULL_PROBE, None, None)
    # All or nothing: what can fail (the exporter, the tracer, the probe) starts before the
    # endpoint, and the endpoint is the last step, so a failure never leaves a port serving
    # a registry nobody updates (phase 0 for ever, which reads as a healthy idle rank).
    holder: list[TelemetryProbe] = []
    provider = make_tracer_provider(config, rank, dp_size,
                                    on_drop=lambda count: holder[0].dropped(count))
    watchdog = None
    try:
        registry, _, probe = build_rank(rank, dp_size, config.model_name, info, provider,
                                        group_key=group_key, protocol=protocol)
        holder.append(probe)
        if config.watchdog:
            from instrumented_core.telemetry.watchdog import Watchdog

            watchdog = Watchdog(probe, config.flight_dump_dir, config.watchdog_seconds,
                                registry, tracer_provider=provider).start()
        server = MetricsServer(registry, config.metrics_host, config.port_for(rank), rank,
                               config.debug_endpoint)
    except BaseException:
        if watchdog is not None:
            watchdog.stop()
        if provider is not None:
            provider.shutdown()
        raise
    return RankTelemetry(probe, server, registry, watchdog)
