"""The DP pause protocol, engine-agnostic: vLLM 0.32.0's two-phase pause and the legacy one.

This module holds the state each DP rank keeps (named as vLLM's ``DPEngineCoreProc`` names
it: ``pending_pause``, ``ignore_start_dp_wave``, ``engines_running``, ``step_counter``,
``current_wave``), the 2-int SUM encoding that ``ParallelConfig.sync_dp_state`` all-reduces,
and the decisions vLLM takes from it. The CPU reference cluster drives it; the vLLM adapter
reuses the encoding, the phase derivation and the cadence rule, so what the CPU tests prove
about these decisions is what runs inside vLLM.

Why two phases: with the legacy protocol a rank's pause completes locally and a late
``START_DP_WAVE`` can wake a paused rank, which then enters a step collective while its peers
enter an RPC's collective (vLLM issue #36594). Two-phase makes every rank keep stepping
(``pending_pause``) until one all-reduce shows that all ranks want to pause; only then do all
of them stop, together, and drop ``START_DP_WAVE`` until resumed.

Adaptive cadence (our extension, ``cadence="adaptive"``): after a sync round in which some but
not all ranks voted to pause, every rank syncs on every step until consensus or until the
votes fall back to zero. It cannot mismatch collectives: whether a step syncs depends only
on (a) ``step_counter``, which every rank resets at the same globally agreed wave end and
increments once per lockstep step, and (b) ``fast_sync``, which is a pure function of the
all-reduced sum that every rank receives identically. So all ranks take the same decision at
every step, by induction over sync rounds.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from instrumented_core.probe import NULL_PROBE

PAUSE_MODES = ("abort", "wait", "keep")


class ProtocolError(ValueError):
    """A bad protocol setting or a call the protocol forbids in the current state."""


_C = TypeVar("_C", bound="_Choice")


class _Choice(str, enum.Enum):
    """A setting with a fixed set of spellings; ``parse`` turns a typo into a one-line error."""

    @classmethod
    def what(cls) -> str:
        return cls.__name__.lower()

    @classmethod
    def parse(cls: type[_C], value: object) -> _C:
        try:
            return cls(value)
        except ValueError:
            raise ProtocolError(f"unknown {cls.what()} {value!r}: use one of "
                                f"{', '.join(c.value for c in cls)}") from None


class Protocol(_Choice):
    TWO_PHASE = "two-phase"
    LEGACY = "legacy"


class Cadence(_Choice):
    FIXED = "fixed"
    ADAPTIVE = "adaptive"

    @classmethod
    def what(cls) -> str:
        return "sync cadence"


class Phase(str, enum.Enum):
    RUNNING = "running"
    PENDING_PAUSE = "pending_pause"
    PAUSED = "paused"


def check_pause_mode(mode: str) -> str:
    if mode not in PAUSE_MODES:
        raise ProtocolError(f"unknown pause mode {mode!r}: use one of {', '.join(PAUSE_MODES)}")
    return mode


def check_sizes(dp_size: int, sync_interval: int) -> None:
    if not isinstance(dp_size, int) or dp_size < 1:
        raise ProtocolError(f"DP size must be an integer >= 1, got {dp_size!r}")
    if not isinstance(sync_interval, int) or sync_interval < 1:
        raise ProtocolError(f"sync interval must be an integer >= 1 step, got {sync_interval!r}")


def encode_sync_state(has_unfinished: bool, pending_pause: bool) -> list[int]:
    """The per-rank vector that one SUM all-reduce turns into any() and all()."""
    return [int(has_unfinished), int(pending_pause)]


@dataclass(frozen=True)
class SyncResult:
    """Decoded result of one ``sync_dp_state`` all-reduce, identical on every rank."""

    global_unfinished: bool
    pause_votes: int
    dp_size: int

    @property
    def consensus(self) -> bool:
        return self.pause_votes == self.dp_size


def decode_sync_state(summed: Sequence[int], dp_size: int) -> SyncResult:
    """Decode as vLLM does: unfinished if any rank has work or a pause vote is not unanimous."""
    unfinished_sum, votes = int(summed[0]), int(summed[1])
    return SyncResult(unfinished_sum > 0 or votes % dp_size != 0, votes, dp_size)


def phase_of(pending_pause: bool, paused: bool) -> Phase:
    """Phase from vLLM's flags: pending wins; ``paused`` is ignore_start_dp_wave (two-phase)."""
    if pending_pause:
        return Phase.PENDING_PAUSE
    return Phase.PAUSED if paused else Phase.RUNNING


class PhaseTracker:
    """The phase a rank reports and the probe call when it changes: one home for the CPU
    cluster's state machine and the vLLM observer, so both report transitions alike."""

    def __init__(self, probe, phase: Phase = Phase.RUNNING) -> None:
        self.probe = probe
        self.phase = phase

    def update(self, new: Phase) -> None:
        if new is not self.phase:
            old, self.phase = self.phase, new
            self.probe.phase_changed(old, new)


def start_dp_wave_outcome(*, ignoring: bool, excluded: bool, wave_changed: bool,
                          started_running: bool) -> str:
    """The outcome label of one ``START_DP_WAVE`` (``vllm_dp_start_dp_wave_total{outcome}``),
    in vLLM's order of checks: dropped while paused after consensus (``ignored``), addressed
    to the rank that asked for the wave (``excluded``), a new wave or a wake-up (``acted``),
    else nothing to do (``stale``)."""
    if ignoring:
        return "ignored"
    if excluded:
        return "excluded"
    return "acted" if wave_changed or started_running else "stale"


def is_sync_step(step_counter: int, sync_interval: int, fast_sync: bool = False) -> bool:
    """vLLM 0.32.0: sync on step 1 of a wave and every ``dp_sync_interval`` steps."""
    return fast_sync or step_counter == 1 or step_counter % sync_interval == 0


def steps_until_sync(step_counter: int, sync_interval: int, fast_sync: bool = False) -> int:
    if fast_sync or step_counter == 0:
        return 1
    return sync_interval - step_counter % sync_interval


AllReduce = Callable[[list[int]], Sequence[int]]


class PauseStateMachine:
    """One rank's pause state and the decisions of ``DPEngineCoreProc``.

    The engine loop calls the methods in the order vLLM's busy loop does; ``all_reduce`` is
    the engine's SUM all-reduce over the DP group. Every transition is reported to ``probe``.
    """

    def __init__(
        self,
        rank: int,
        dp_size: int,
        sync_interval: int = 16,
        protocol: Protocol | str = Protocol.TWO_PHASE,
        cadence: Cadence | str = Cadence.FIXED,
        probe=None,
    ) -> None:
        check_sizes(dp_size, sync_interval)
        self.rank = rank
        self.dp_size = dp_size
        self.sync_interval = sync_interval
        self.protocol = Protocol.parse(protocol)
        self.cadence = Cadence.parse(cadence)
        if self.protocol is Protocol.LEGACY and self.cadence is Cadence.ADAPTIVE:
            raise ProtocolError("the adaptive cadence needs the two-phase protocol")
        self.probe = probe if probe is not None else NULL_PROBE
        self.pending_pause = False
        self.ignore_start_dp_wave = False
        self.engines_running = False
        self.step_counter = 0
        self.current_wave = 0
        self.sync_rounds = 0
        self.fast_sync = False
        self.paused_locally = False  # legacy: pause completed on this rank alone
        self._phase = PhaseTracker(self.probe)
        self.probe.attach(self)

    @property
    def phase(self) -> Phase:
        return self._phase.phase

    @property
    def two_phase(self) -> bool:
        return self.protocol is Protocol.TWO_PHASE

    def _update_phase(self) -> None:
        paused = self.ignore_start_dp_wave if self.two_phase else self.paused_locally
        self._phase.update(phase_of(self.pending_pause, paused))

    # -- pause ----------------------------------------------------------------------------

    def request_pause(self, mode: str, has_work: bool, trace_parent: str | None = None) -> bool:
        """``_pause_complete``: True when the pause is complete now (legacy, idle rank)."""
        check_pause_mode(mode)
        self.probe.pause_requested(mode, trace_parent)
        if self.two_phase:
            self.pending_pause = True
            self.engines_running = True
            self._update_phase()
            return False
        if has_work:
            self.pending_pause = True  # legacy: waits locally until this rank is idle
            self._update_phase()
            return False
        self.finish_pause()
        return True

    def finish_pause(self) -> None:
        """The engine became idle with a pause outstanding (``_finish_pause``)."""
        if not self.two_phase:
            self.pending_pause = False
            self.paused_locally = True
            self._update_phase()

    def check_resume(self) -> bool:
        """``resume_scheduler`` preconditions; False when there is nothing to resume."""
        if self.two_phase and (
            self.pending_pause or (self.engines_running and self.ignore_start_dp_wave)
        ):
            raise ProtocolError(
                "resume called while the pause is still in flight: wait for the pause to "
                "complete before resuming"
            )
        return not self.engines_running or not self.two_phase

    def resume(self, local_unfinished: bool, all_reduce: AllReduce | None) -> None:
        """Clear the pause; two-phase then all-reduces so every rank restarts together."""
        self.ignore_start_dp_wave = False
        self.paused_locally = False
        self.pending_pause = False
        self.probe.resumed()
        self._update_phase()
        if self.two_phase and all_reduce is not None:
            summed = all_reduce(encode_sync_state(local_unfinished, False))
            if decode_sync_state(summed, self.dp_size).global_unfinished:
                self.engines_running = True
        elif local_unfinished:
            self.engines_running = True

    # -- waves ----------------------------------------------------------------------------

    def handle_start_dp_wave(self, new_wave: int, exclude: object) -> str:
        """``_handle_client_request(START_DP_WAVE)``; returns the outcome label.

        ``exclude`` is compared with the integer rank exactly as vLLM 0.32.0 does; vLLM's
        coordinator sends the engine's ZMQ identity bytes there, so it never matches.
        """
        ignoring = self.two_phase and self.ignore_start_dp_wave
        excluded = not ignoring and exclude == self.rank
        wave_changed = started = False
        if not ignoring and not excluded and new_wave >= self.current_wave:
            wave_changed = new_wave != self.current_wave
            started = not self.engines_running
            self.current_wave = new_wave
            self.engines_running = True
        outcome = start_dp_wave_outcome(ignoring=ignoring, excluded=excluded,
                                        wave_changed=wave_changed, started_running=started)
        self.probe.start_dp_wave(new_wave, exclude, outcome)
        return outcome

    def end_wave(self) -> None:
        """All ranks agreed that no work is left: next wave, step counter back to 0."""
        self.current_wave += 1
        self.step_counter = 0
        self.fast_sync = False
        self.probe.wave_changed(self.current_wave)

    # -- the periodic all-reduce ----------------------------------------------------------

    def next_call_syncs(self) -> bool:
        """Whether the next ``has_global_unfinished_reqs`` call runs the all-reduce."""
        step = self.step_counter + 1
        if self.two_phase:
            return is_sync_step(step, self.sync_interval, self.fast_sync)
        return step % self.sync_interval == 0

    def has_global_unfinished_reqs(self, local_unfinished: bool, all_reduce: AllReduce) -> bool:
        """``_has_global_unfinished_reqs``: called once per step; returns engines_running."""
        syncs = self.next_call_syncs()
        self.step_counter += 1
        if not syncs:
            return True
        local_pause = self.pending_pause and self.two_phase
        self.probe.sync_begin(local_unfinished, local_pause)
        started = time.perf_counter()
        summed = all_reduce(encode_sync_state(local_unfinished, local_pause))
        waited = time.perf_counter() - started
        result = decode_sync_state(summed, self.dp_size)
        self.sync_rounds += 1
        self.probe.sync_end(result, waited)
        if self.cadence is Cadence.ADAPTIVE:
            self.fast_sync = 0 < result.pause_votes < self.dp_size
        if self.two_phase and result.consensus:
            self.ignore_start_dp_wave = True
            self.pending_pause = False
            self.probe.consensus()
            self._update_phase()
        return result.global_unfinished
