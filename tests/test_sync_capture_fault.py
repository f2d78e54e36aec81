"""The ``sync_dp_state`` wrapper when the all-reduce raises (a peer died, Gloo closed).

Before: the rank read "inside sync_dp_state" forever after, so the doctor and the alerts
named a rank that had left the collective (and was likely shutting down) as a waiting victim.
A fake observer stands in for the engine (no vLLM needed), as in test_instrumentor_fake.py.
"""

from __future__ import annotations

import types

import pytest
from prometheus_client import CollectorRegistry

from instrumented_core.telemetry import names as n
from instrumented_core.telemetry.metrics import RankMetrics
from instrumented_core.telemetry.probe import TelemetryProbe
from instrumented_core.vllm_support.observer import current
from instrumented_core.vllm_support.sync_capture import make_sync_dp_state


def _observer():
    registry = CollectorRegistry()
    probe = TelemetryProbe(0, 2, RankMetrics(registry, 0, "m", {}))
    obs = types.SimpleNamespace(probe=probe, engine=types.SimpleNamespace(dp_size=2),
                                sync_rounds=0, consensus_seen=False,
                                note_group=lambda group: None, dp_size=lambda: 2)
    return obs, registry


def _inside(registry) -> float | None:
    return registry.get_sample_value(n.COLLECTIVE_INSIDE, {n.LABEL_ENGINE: "0",
                                                           n.LABEL_MODEL_NAME: "m",
                                                           n.LABEL_COLLECTIVE: n.COLLECTIVE_SYNC})


@pytest.mark.parametrize("with_capture", [False, True], ids=["no capture", "capture hook"])
def test_an_all_reduce_that_raises_does_not_leave_the_rank_inside_sync_dp_state(with_capture):
    obs, registry = _observer()
    namespace = types.SimpleNamespace()

    def real_all_reduce(tensor, *args, **kwargs):
        raise RuntimeError("Connection closed by peer")

    namespace.all_reduce = real_all_reduce

    def sync_dp_state(dp_group, has_unfinished, pending_pause):
        namespace.all_reduce(types.SimpleNamespace(tolist=lambda: [1, 1]))
        return True, False

    hook = (namespace, "all_reduce") if with_capture else None
    wrapped = make_sync_dp_state(sync_dp_state, "static", hook).__func__
    saved = getattr(current, "observer", None)
    current.observer = obs
    try:
        with pytest.raises(RuntimeError, match="closed by peer"):  # passed through, unchanged
            wrapped(object(), True, True)
    finally:
        current.observer = saved
    assert obs.probe.hot.inside_since[n.COLLECTIVE_SYNC] == 0.0
    assert _inside(registry) == 0.0
    assert obs.sync_rounds == 0  # no round completed
    assert registry.get_sample_value(n.SYNC_WAIT_COUNT, {n.LABEL_ENGINE: "0",
                                                         n.LABEL_MODEL_NAME: "m"}) == 0.0
    assert namespace.all_reduce is real_all_reduce  # the capture is undone


def test_a_round_that_completes_is_still_counted_after_one_that_raised():
    obs, registry = _observer()
    outcomes = [RuntimeError("peer gone"), (True, False)]

    def sync_dp_state(dp_group, has_unfinished, pending_pause):
        outcome = outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    wrapped = make_sync_dp_state(sync_dp_state, "static", None).__func__
    saved = getattr(current, "observer", None)
    current.observer = obs
    try:
        with pytest.raises(RuntimeError):
            wrapped(object(), True, False)
        assert wrapped(object(), True, False) == (True, False)
    finally:
        current.observer = saved
    assert obs.sync_rounds == 1 and _inside(registry) == 0.0
