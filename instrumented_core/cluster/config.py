"""Settings of the CPU reference cluster, validated before any process starts."""

from __future__ import annotations

from dataclasses import dataclass, field

from instrumented_core.cluster.placement import RankHost
from instrumented_core.protocol import Cadence, Protocol, ProtocolError, check_sizes
from instrumented_core.telemetry.config import TelemetryConfig

#: Faults a rank takes through ``Cluster.inject_fault``:
#: ``slow`` its engine core takes ``slow_step_seconds`` more before every step;
#: ``stall`` its engine core stops before the next sync all-reduce (alive, metrics answer);
#: ``dead`` its process exits at the next step;
#: ``worker_stall`` its worker stops forever inside the next forward, before the model
#: collective; ``worker_slow`` its worker takes ``slow_step_seconds`` more inside every forward,
#: before the model collective; ``wedge`` its worker enters the next model collective and never
#: completes it (every rank's worker then sits inside that collective); ``freeze`` its worker
#: stops as with ``worker_stall`` and its heartbeat stops too (a worker process under SIGSTOP).
FAULT_KINDS = ("none", "slow", "stall", "dead", "worker_stall", "worker_slow", "wedge", "freeze")


class ClusterConfigError(ValueError):
    """A cluster setting that cannot work; the message is one line with the fix."""


@dataclass(frozen=True)
class ClusterConfig:
    ranks: int = 4
    protocol: str = "two-phase"
    sync_interval: int = 16
    cadence: str = "fixed"
    step_seconds: float = 0.001  # simulated model time per step (real and dummy)
    slow_step_seconds: float = 0.05  # extra delay per step: `slow` and `worker_slow` faults
    collective_timeout: float = 60.0  # Gloo group timeout (vLLM: cpu_distributed_timeout_seconds)
    hang_timeout: float = 10.0  # a client call not done after this is reported as a hang
    start_timeout: float = 90.0
    max_running: int = 64
    telemetry: TelemetryConfig = field(default_factory=lambda: TelemetryConfig(enabled=False))
    #: one per rank when the ranks span hosts (network namespaces); empty: all on loopback.
    #: Rank 0's host address is the Gloo rendezvous address (vLLM's MASTER_ADDR).
    hosts: tuple[RankHost, ...] = ()

    def validate(self) -> ClusterConfig:
        try:
            check_sizes(self.ranks, self.sync_interval)
            protocol = Protocol.parse(self.protocol)
            cadence = Cadence.parse(self.cadence)
        except ProtocolError as e:
            raise ClusterConfigError(str(e)) from None
        if protocol is Protocol.LEGACY and cadence is Cadence.ADAPTIVE:
            raise ClusterConfigError("the adaptive cadence needs --protocol two-phase")
        if self.step_seconds < 0 or self.slow_step_seconds < 0:
            raise ClusterConfigError("step times must be >= 0 seconds")
        if self.collective_timeout <= 0 or self.hang_timeout <= 0:
            raise ClusterConfigError("timeouts must be > 0 seconds")
        if self.hosts and len(self.hosts) != self.ranks:
            raise ClusterConfigError(f"{len(self.hosts)} rank hosts for {self.ranks} ranks: "
                                     "give one host per rank")
        self.telemetry.validate()
        return self
