"""The probe interface: the one object an engine calls at each pause-protocol transition.

It sits beneath the protocol (``protocol.py`` imports it, never the telemetry): ``Probe`` is
the no-op base, so an engine with telemetry off pays a method call, and
:class:`instrumented_core.telemetry.probe.TelemetryProbe` is the implementation that records
metrics and spans. Subclasses observe, never decide.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover - annotations only
    from instrumented_core.protocol import Phase, SyncResult

__all__ = ["NULL_PROBE", "Probe"]


class Probe:
    """No-op probe; the interface every engine calls. Subclasses observe, never decide."""

    enabled = False

    def attach(self, state: Any) -> None:
        """``state`` exposes vLLM's attribute names (engines_running, current_wave, ...)."""

    def pause_requested(self, mode: str, trace_parent: str | None = None) -> None: ...

    def phase_changed(self, old: Phase, new: Phase) -> None: ...

    def sync_begin(self, local_unfinished: bool, local_pause: bool) -> None: ...

    def sync_end(self, result: SyncResult, seconds: float) -> None: ...

    def consensus(self) -> None: ...

    def start_dp_wave(self, wave: int, exclude: object, outcome: str) -> None: ...

    def resumed(self) -> None: ...

    def step_end(self, dummy: bool) -> None: ...

    def wave_changed(self, wave: int) -> None: ...

    def collective_begin(self, collective: str) -> None: ...

    def collective_end(self, collective: str, seconds: float) -> None: ...

    def request_finished(self, outcome: str) -> None: ...

    def progress(self) -> None: ...

    def utility_call(self, method: str) -> None:
        """A client utility call (by method name) is handled on the engine thread."""

    def shutdown(self) -> None: ...


NULL_PROBE = Probe()
