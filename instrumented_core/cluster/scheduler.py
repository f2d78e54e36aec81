"""A token-step scheduler with vLLM's pause states, for the CPU reference cluster.

Requests need a number of token steps. vLLM's semantics that matter to the pause are kept:
new requests wait until scheduled; ``PAUSED_NEW`` (abort, wait) lets running requests drain
but schedules no waiting ones; ``PAUSED_ALL`` (keep) schedules nothing and reports no
unfinished work, so a kept request neither blocks the pause nor keeps the rank stepping.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass


class PauseState(enum.IntEnum):
    UNPAUSED = 0
    PAUSED_NEW = 1
    PAUSED_ALL = 2


@dataclass
class Request:
    req_id: str
    tokens_left: int
    tokens: int = 0


class Scheduler:
    def __init__(self, max_running: int = 64) -> None:
        self.max_running = max_running
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.pause_state = PauseState.UNPAUSED

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def num_unfinished(self) -> int:
        if self.pause_state is PauseState.PAUSED_ALL:
            return 0
        if self.pause_state is PauseState.PAUSED_NEW:
            return len(self.running)
        return len(self.running) + len(self.waiting)

    def has_unfinished(self) -> bool:
        return self.num_unfinished() > 0

    def schedule(self) -> list[Request]:
        """Admit waiting requests if unpaused; return what runs this step (may be empty)."""
        if self.pause_state is PauseState.PAUSED_ALL:
            return []
        if self.pause_state is PauseState.UNPAUSED:
            while self.waiting and len(self.running) < self.max_running:
                self.running.append(self.waiting.popleft())
        return list(self.running)

    def advance(self, scheduled: list[Request]) -> list[Request]:
        """One token for every scheduled request; returns those that finished."""
        finished = []
        for request in scheduled:
            request.tokens += 1
            request.tokens_left -= 1
            if request.tokens_left <= 0:
                finished.append(request)
        if finished:
            done = {id(r) for r in finished}
            self.running = [r for r in self.running if id(r) not in done]
        return finished

    def abort_all(self) -> list[Request]:
        aborted = self.running + list(self.waiting)
        self.running, self.waiting = [], deque()
        return aborted
