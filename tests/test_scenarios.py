"""Each pause mode's promise, decided once for every engine (``ModeRound.broken_promise``):
abort aborts what runs, wait drains it before the pause returns, keep keeps it and finishes
it after resume. The engines' own rounds run in tests/test_cluster_backbone.py and
tests/test_vllm.py; here, every way a round can break the promise."""

from __future__ import annotations

import pytest

from instrumented_core.scenarios import ModeRound

C, A = "completed", "aborted"
CASES = {
    "abort aborts": (ModeRound("abort", True, [False, False], [A, A]), None),
    "wait drains": (ModeRound("wait", True, [True, True], [C, C]), None),
    "keep keeps": (ModeRound("keep", True, [False, False], [C, C]), None),
    "not paused": (ModeRound("keep", False, [False, False], [C, C]), "is_paused() was false"),
    "abort that completes": (ModeRound("abort", True, [True, False], [C, A]), "not aborted"),
    "wait that returns early": (ModeRound("wait", True, [True, False], [C, C]),
                                "still running when the pause returned"),
    "wait that aborts": (ModeRound("wait", True, [True, True], [A, C]), "not completed"),
    "keep that finishes while paused": (ModeRound("keep", True, [False, True], [C, C]),
                                        "finished while paused"),
    "keep that loses a request": (ModeRound("keep", True, [False, False], [C, A]),
                                  "not completed"),
}


@pytest.mark.parametrize("got, broken", CASES.values(), ids=CASES)
def test_each_mode_promise(got, broken):
    said = got.broken_promise()
    assert (said is None) if broken is None else (said is not None and broken in said), said
