"""``check_schedule`` holds each pause mode to its promise, not only to liveness.

The randomized schedules (``-m slow``) run it against the real cluster, where every schedule
passes; here it is given what a broken engine would show the client, and must say so.
"""

from __future__ import annotations

import pytest

from instrumented_core.cluster.client import RequestHandle
from instrumented_core_testing.schedules import PauseRecord, ScheduleResult, check_schedule


class _IdleCluster:
    """What ``check_schedule`` reads from a cluster: outcomes received and idle ranks."""

    def __init__(self, handles: list[RequestHandle]) -> None:
        self.finished = {h.req_id: [h.future.result()[0]] for h in handles}

    def stats(self):
        return [{"sync_rounds": 5, "engines_running": False}] * 2


def _handle(req_id: str, outcome: str, tokens: int) -> RequestHandle:
    handle = RequestHandle(req_id, 0)
    handle.future.set_result((outcome, tokens))
    return handle


def _run(mode: str, outcome: str, tokens: int = 10, *, at_return: bool, at_resume: bool,
         running: tuple[int, int] = (0, 0), waiting: tuple[int, int] = (0, 0)) -> None:
    """One request of 10 tokens, in flight when one ``mode`` pause was called."""
    h = _handle("req-1", outcome, tokens)
    pause = PauseRecord(mode, [h], {}, {"req-1": outcome} if at_return else {},
                        {"req-1": outcome} if at_resume else {}, list(running), list(waiting))
    result = ScheduleResult(7, 2, handles=[h], tokens={"req-1": 10}, pauses=[pause])
    check_schedule(_IdleCluster([h]), result, timeout=2)  # type: ignore[arg-type]


@pytest.mark.parametrize("mode, outcome, tokens, at_return, at_resume", [
    ("abort", "aborted", 3, True, True),  # aborted by the pause
    ("abort", "completed", 10, True, True),  # finished before the abort reached its rank
    ("wait", "completed", 10, True, True),  # drained before the pause returned
    ("keep", "completed", 10, False, False),  # kept, completed after the resume
])
def test_each_mode_keeping_its_promise_passes(mode, outcome, tokens, at_return, at_resume):
    _run(mode, outcome, tokens, at_return=at_return, at_resume=at_resume)


@pytest.mark.parametrize("case, kwargs, message", [
    ("keep aborts", dict(mode="keep", outcome="aborted", tokens=4, at_return=False,
                         at_resume=False), "no abort pause had it in flight"),
    ("wait aborts", dict(mode="wait", outcome="aborted", tokens=4, at_return=True,
                         at_resume=True), "no abort pause had it in flight"),
    ("wait returns undrained", dict(mode="wait", outcome="completed", at_return=False,
                                    at_resume=False, running=(1, 0)), "before draining"),
    ("abort leaves one", dict(mode="abort", outcome="completed", at_return=False,
                              at_resume=False), "returned with requests left"),
    ("abort leaves a queued one", dict(mode="abort", outcome="aborted", tokens=0,
                                       at_return=True, at_resume=True, waiting=(0, 1)),
     "returned with requests left"),
    ("finishes while paused", dict(mode="keep", outcome="completed", at_return=False,
                                   at_resume=True), "finished while paused"),
    ("completes short", dict(mode="keep", outcome="completed", tokens=6, at_return=False,
                             at_resume=False), "completed with 6 of 10 tokens"),
], ids=lambda v: v if isinstance(v, str) and " " in v else "")
def test_a_broken_pause_mode_is_named_with_the_seed_to_replay(case, kwargs, message):
    with pytest.raises(AssertionError, match=message) as info:
        _run(**kwargs)
    assert "replay with IC_SEED=7" in str(info.value)
