"""A shared-memory status board: what each rank is doing, readable while it hangs.

Each rank writes a few doubles into its own slot (no locks: one writer per slot) before and
after every collective; the client reads the board to name which rank sits in which
collective when a call hangs, even with telemetry off.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from instrumented_core.telemetry import names as n

COLLECTIVE_CODES = {name: i + 1 for i, name in enumerate(n.COLLECTIVES)}
COLLECTIVE_NAMES = {code: name for name, code in COLLECTIVE_CODES.items()}
PHASES = ("running", "pending_pause", "paused")

(F_COLLECTIVE, F_SINCE, F_PHASE, F_STEPS, F_SYNC_ROUNDS, F_PROGRESS, F_STALLED, F_PID,
 F_FAILED) = range(9)
FIELDS = 9


@dataclass(frozen=True)
class RankStatus:
    rank: int
    collective: str | None
    inside_seconds: float
    phase: str
    steps: int
    sync_rounds: int
    progress_age: float
    stalled: bool
    failed: bool
    alive: bool = True


class StatusBoard:
    def __init__(self, array, ranks: int) -> None:
        self.array = array
        self.ranks = ranks

    def _slot(self, rank: int) -> int:
        return rank * FIELDS

    def set(self, rank: int, field_index: int, value: float) -> None:
        self.array[self._slot(rank) + field_index] = value

    def enter(self, rank: int, collective: str) -> None:
        base = self._slot(rank)
        self.array[base + F_SINCE] = time.time()
        self.array[base + F_COLLECTIVE] = COLLECTIVE_CODES[collective]

    def leave(self, rank: int) -> None:
        base = self._slot(rank)
        self.array[base + F_COLLECTIVE] = 0
        self.array[base + F_PROGRESS] = time.time()

    def read(self, rank: int, alive: bool = True) -> RankStatus:
        base = self._slot(rank)
        values = self.array[base:base + FIELDS]
        now = time.time()
        code = int(values[F_COLLECTIVE])
        return RankStatus(
            rank=rank,
            collective=COLLECTIVE_NAMES.get(code),
            inside_seconds=(now - values[F_SINCE]) if code else 0.0,
            phase=PHASES[int(values[F_PHASE])],
            steps=int(values[F_STEPS]),
            sync_rounds=int(values[F_SYNC_ROUNDS]),
            progress_age=now - values[F_PROGRESS] if values[F_PROGRESS] else 0.0,
            stalled=bool(values[F_STALLED]),
            failed=bool(values[F_FAILED]),
            alive=alive,
        )
