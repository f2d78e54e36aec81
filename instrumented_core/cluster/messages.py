"""Message tags exchanged between the client, the coordinator and the ranks (tuples)."""

# client -> rank
ADD = "add"  # (ADD, req_id, num_tokens, request_wave)
UTILITY = "utility"  # (UTILITY, call_id, method, args)
SHUTDOWN = "shutdown"  # (SHUTDOWN,)
# coordinator -> rank
START_DP_WAVE = "start_dp_wave"  # (START_DP_WAVE, wave, exclude, inject_id|None)
# rank -> client
READY = "ready"  # (READY, rank, metrics_url, pid)
STARTUP_ERROR = "startup_error"  # (STARTUP_ERROR, rank, message)
FINISHED = "finished"  # (FINISHED, rank, req_id, outcome, tokens)
UTILITY_RESULT = "utility_result"  # (UTILITY_RESULT, rank, call_id, ok, value)
RANK_ERROR = "rank_error"  # (RANK_ERROR, rank, message)
WAVE_HANDLED = "wave_handled"  # (WAVE_HANDLED, rank, inject_id, outcome): injected waves only
# rank -> coordinator
WAVE_COMPLETE = "wave_complete"  # (WAVE_COMPLETE, wave)
START_WAVE = "start_wave"  # (START_WAVE, wave, engine_index)
# client -> coordinator
FIRST_REQ = "first_req"  # (FIRST_REQ, engine_identity, wave)
INJECT_START_DP_WAVE = "inject_start_dp_wave"  # (INJECT_..., wave|None, exclude, inject_id)
# coordinator -> client
WAVE_STATE = "wave_state"  # (WAVE_STATE, current_wave, engines_running)


def engine_identity(rank: int) -> bytes:
    """The engine's ZMQ identity, as vLLM's client puts it in FIRST_REQ (2 bytes, little)."""
    return rank.to_bytes(2, "little")
