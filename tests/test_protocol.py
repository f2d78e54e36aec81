"""The pause protocol's decisions, engine-agnostic (no processes)."""

from __future__ import annotations

import pytest

from instrumented_core.protocol import (
    PauseStateMachine,
    Phase,
    ProtocolError,
    decode_sync_state,
    encode_sync_state,
    is_sync_step,
)


def all_reduce_for(*peer_vectors):
    """SUM all-reduce with fixed peer contributions: the local vector plus the peers'."""
    def reduce(local):
        return [local[i] + sum(p[i] for p in peer_vectors) for i in range(2)]
    return reduce


def test_sum_encoding_gives_any_unfinished_and_all_paused():
    vectors = [encode_sync_state(u, p) for u, p in [(False, True), (True, True), (False, True)]]
    summed = [sum(v[i] for v in vectors) for i in range(2)]
    result = decode_sync_state(summed, 3)
    assert result.global_unfinished and result.consensus and result.pause_votes == 3
    partial = decode_sync_state([0, 2], 3)
    # a non-unanimous pause vote keeps everyone stepping, as in vLLM
    assert partial.global_unfinished and not partial.consensus
    assert not decode_sync_state([0, 0], 3).global_unfinished


def test_sync_cadence_mirrors_vllm_0_32():
    syncs = [s for s in range(1, 50) if is_sync_step(s, 16)]
    assert syncs == [1, 16, 32, 48]
    assert all(is_sync_step(s, 16, fast_sync=True) for s in range(2, 10))


def test_two_phase_pause_waits_for_consensus_then_ignores_start_dp_wave():
    sm = PauseStateMachine(0, 2, sync_interval=4)
    assert sm.request_pause("keep", has_work=False) is False
    assert sm.phase is Phase.PENDING_PAUSE and sm.engines_running
    # step 1 syncs; the peer has not voted yet: keep stepping
    assert sm.has_global_unfinished_reqs(False, all_reduce_for([0, 0])) is True
    assert sm.phase is Phase.PENDING_PAUSE
    for _ in range(2):  # steps 2, 3: no sync
        assert sm.has_global_unfinished_reqs(False, all_reduce_for([0, 0])) is True
    # step 4 syncs with the peer voting: consensus, stop stepping
    assert sm.has_global_unfinished_reqs(False, all_reduce_for([0, 1])) is False
    assert sm.phase is Phase.PAUSED and sm.ignore_start_dp_wave and not sm.pending_pause
    sm.engines_running = False
    assert sm.handle_start_dp_wave(sm.current_wave, None) == "ignored"
    assert not sm.engines_running


def test_legacy_pause_completes_locally_and_honours_start_dp_wave():
    sm = PauseStateMachine(1, 2, protocol="legacy")
    assert sm.request_pause("keep", has_work=False) is True
    assert sm.phase is Phase.PAUSED
    # the #36594 signature: a paused rank woken by START_DP_WAVE
    assert sm.handle_start_dp_wave(0, b"\x01\x00") == "acted"
    assert sm.engines_running


def test_start_dp_wave_exclusion_compares_with_the_integer_rank():
    sm = PauseStateMachine(1, 2)
    assert sm.handle_start_dp_wave(0, 1) == "excluded"
    # vLLM 0.32's client puts the engine's ZMQ identity there: it never matches
    assert sm.handle_start_dp_wave(0, b"\x01\x00") == "acted"
    sm.current_wave = 3
    sm.engines_running = False
    assert sm.handle_start_dp_wave(2, None) == "stale" and not sm.engines_running


def test_resume_during_pending_pause_is_refused():
    sm = PauseStateMachine(0, 2)
    sm.request_pause("wait", has_work=True)
    with pytest.raises(ProtocolError, match="still in flight"):
        sm.check_resume()


def test_adaptive_cadence_syncs_every_step_after_a_split_vote():
    sm = PauseStateMachine(0, 4, sync_interval=16, cadence="adaptive")
    sm.request_pause("keep", has_work=True)
    sm.has_global_unfinished_reqs(True, all_reduce_for([1, 0], [1, 1], [1, 0]))  # step 1
    assert sm.fast_sync
    rounds = sm.sync_rounds
    sm.has_global_unfinished_reqs(True, all_reduce_for([1, 1], [1, 1], [1, 1]))  # step 2
    assert sm.sync_rounds == rounds + 1 and sm.phase is Phase.PAUSED and not sm.fast_sync


@pytest.mark.parametrize("kwargs, message", [
    ({"dp_size": 0}, "DP size must be an integer >= 1"),
    ({"sync_interval": 0}, "sync interval must be an integer >= 1"),
    ({"protocol": "three-phase"}, "unknown protocol 'three-phase'"),
    ({"cadence": "sometimes"}, "unknown sync cadence"),
])
def test_bad_settings_are_one_line_errors(kwargs, message):
    args = {"rank": 0, "dp_size": 2, **kwargs}
    with pytest.raises(ProtocolError, match=message) as info:
        PauseStateMachine(**args)
    assert "\n" not in str(info.value)


def test_unknown_pause_mode_is_refused():
    with pytest.raises(ProtocolError, match="unknown pause mode 'later'"):
        PauseStateMachine(0, 2).request_pause("later", has_work=False)
