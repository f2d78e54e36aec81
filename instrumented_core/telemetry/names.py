"""Every telemetry name this project emits, in one place.

Dashboards, alert rules, the doctor and the tests import these constants (or are checked
against them); no other module spells a metric, label, span, event or attribute name.
Metric names follow Prometheus conventions: the ``vllm_dp_`` prefix, base units as suffixes,
counters declared without ``_total`` (prometheus_client appends it when exposing).
"""

from __future__ import annotations

# --- Prometheus ------------------------------------------------------------------------------

PREFIX = "vllm_dp_"

# Labels. `engine` is the DP rank, exactly as vLLM labels its own per-engine metrics.
LABEL_ENGINE = "engine"
LABEL_MODEL_NAME = "model_name"
LABEL_MODE = "mode"  # pause mode: abort | wait | keep
LABEL_KIND = "kind"  # step kind: real | dummy
LABEL_OUTCOME = "outcome"  # START_DP_WAVE / request outcome
LABEL_COLLECTIVE = "collective"  # which collective a rank is inside
LABEL_SIGNAL = "signal"  # telemetry signal that dropped data
LABEL_CADENCE = "cadence"  # sync cadence: fixed | adaptive
LABEL_WORKER = "worker"  # a rank's worker process, by its rank among the engine's workers
LABEL_CALL = "call"  # the engine-to-worker call a worker is in (execute_model, ...)
LABEL_REASON = "reason"  # why the plugin is (in)active; why a request was rejected
LABEL_VLLM_VERSION = "vllm_version"  # the vLLM version a rank runs (one per deployment)
LABEL_WHERE = "where"  # the probe method (or "scrape") in which telemetry itself failed

BASE_LABELS = (LABEL_ENGINE, LABEL_MODEL_NAME)

# Gauges
PHASE = "vllm_dp_pause_phase"
ENGINES_RUNNING = "vllm_dp_engines_running"
CURRENT_WAVE = "vllm_dp_current_wave"
STEP_COUNTER = "vllm_dp_wave_step_counter"
STEPS_UNTIL_SYNC = "vllm_dp_steps_until_sync"
SYNC_INTERVAL = "vllm_dp_sync_interval_steps"
DP_SIZE = "vllm_dp_size"
# when it entered, in PromQL: timestamp(x) - x (no second gauge for it)
COLLECTIVE_INSIDE = "vllm_dp_collective_inside_seconds"
LAST_PROGRESS = "vllm_dp_last_progress_timestamp_seconds"
PAUSE_PENDING_SINCE = "vllm_dp_pause_pending_since_timestamp_seconds"
REQUESTS_RUNNING = "vllm_dp_requests_running"  # work in flight, read at scrape time
REQUESTS_WAITING = "vllm_dp_requests_waiting"
# 1 when the plugin observes this rank, 0 when it is off, with the reason (PLUGIN_REASONS);
# an inactive rank serves only this series on its endpoint.
PLUGIN_ACTIVE = "vllm_dp_plugin_active"
# A rank's workers (the processes that run the forward), read from the worker board. Per
# worker (label `worker`) only what names the culprit worker: its heartbeat age and its
# position; the rest is one series per rank, aggregated over its workers (WORKER_RANK_SERIES).
# The call a worker is inside lasts as long as its engine sits inside `step` or
# `collective_rpc` (COLLECTIVE_INSIDE): that gauge is its duration.
WORKER_HEARTBEAT_AGE = "vllm_dp_worker_heartbeat_age_seconds"  # frozen process: grows
WORKER_POSITION = "vllm_dp_worker_position"  # exposed as vllm_dp_worker_position_info
# seconds since ALL the rank's workers are inside a DP/EP model collective (the latest to
# enter), 0 when any of them is not inside one
WORKER_MODEL_COLLECTIVE_INSIDE = "vllm_dp_worker_model_collective_inside_seconds"
# Flight recorder (issue 14): the rank's DP collective sequence number (collectives of
# DP_SEQUENCED_COLLECTIVES entered so far; skew between ranks = a drifted or hung rank).
DP_COLLECTIVE_SEQ = "vllm_dp_collective_sequence"
# Counters (exposed with a `_total` suffix)
STEPS = "vllm_dp_steps"
PAUSE_REQUESTS = "vllm_dp_pause_requests"
PAUSE_CONSENSUS = "vllm_dp_pause_consensus"
RESUMES = "vllm_dp_resumes"
START_DP_WAVE = "vllm_dp_start_dp_wave"
REQUESTS_REJECTED = "vllm_dp_requests_rejected"  # by reason (REJECT_REASONS)
# Not for sync_dp_state: that one is SYNC_WAIT_SUM (COLLECTIVE_WAIT_COLLECTIVES).
COLLECTIVE_WAIT = "vllm_dp_collective_wait_seconds"
# Trouble counters: a child appears on its first event (no series while there is none), as
# REQUESTS_REJECTED's does.
TELEMETRY_DROPPED = "vllm_dp_telemetry_dropped"
# Exceptions inside telemetry itself (swallowed, never raised into the engine), by where.
TELEMETRY_ERRORS = "vllm_dp_telemetry_errors"
# Per rank, over its workers: the lowest worker's model-collective sequence number
# (collectives entered), and the most seconds one worker spent inside model collectives.
WORKER_MODEL_COLLECTIVES = "vllm_dp_worker_model_collectives"
WORKER_MODEL_COLLECTIVE_SECONDS = "vllm_dp_worker_model_collective_seconds"
# Steps from request to consensus, summed over pauses: the mean is this over
# PAUSE_CONSENSUS_LATENCY_COUNT (one observation per pause, taken in the same call).
PAUSE_CONSENSUS_STEPS = "vllm_dp_pause_consensus_steps"
FLIGHT_DUMPS = "vllm_dp_flight_dumps"  # hang dumps the rank's watchdog wrote
# Histograms (the first two carry the pause's trace as an OpenMetrics exemplar)
SYNC_WAIT = "vllm_dp_sync_wait_seconds"
PAUSE_CONSENSUS_LATENCY = "vllm_dp_pause_consensus_latency_seconds"
# Sync rounds this rank completed, and seconds it spent inside them (the series budget keeps
# no separate rounds counter or sync child of COLLECTIVE_WAIT: these are the same numbers).
SYNC_WAIT_COUNT = SYNC_WAIT + "_count"
SYNC_WAIT_SUM = SYNC_WAIT + "_sum"
PAUSE_CONSENSUS_LATENCY_COUNT = PAUSE_CONSENSUS_LATENCY + "_count"  # pauses that reached it
# Info
INFO = "vllm_dp"  # exposed as vllm_dp_info

# Exemplar labels on the sync-wait and consensus-latency buckets: the pause's trace (32 hex
# digits, as in the spans file and OTLP) and the rank's pause span (16 hex digits).
EXEMPLAR_TRACE_ID = "trace_id"
EXEMPLAR_SPAN_ID = "span_id"

# Values of the phase gauge (also the order of a state timeline's value mappings).
PHASE_RUNNING = 0
PHASE_PENDING_PAUSE = 1
PHASE_PAUSED = 2
PHASE_CODES = {"running": PHASE_RUNNING, "pending_pause": PHASE_PENDING_PAUSE, "paused": PHASE_PAUSED}

# Label values.
STEP_KINDS = ("real", "dummy")
PAUSE_MODES = ("abort", "wait", "keep")
WAVE_OUTCOMES = ("acted", "ignored", "stale", "excluded")
COLLECTIVE_SYNC = "sync_dp_state"
COLLECTIVE_STEP = "step"
COLLECTIVE_RPC = "collective_rpc"
COLLECTIVE_BARRIER = "barrier"
COLLECTIVE_RESUME = "resume"
COLLECTIVES = (COLLECTIVE_SYNC, COLLECTIVE_STEP, COLLECTIVE_BARRIER, COLLECTIVE_RPC,
               COLLECTIVE_RESUME)
#: Collectives with a child of vllm_dp_collective_wait_seconds_total; sync_dp_state's wait is
#: vllm_dp_sync_wait_seconds_sum (the same number, so not exposed twice).
COLLECTIVE_WAIT_COLLECTIVES = tuple(c for c in COLLECTIVES if c != COLLECTIVE_SYNC)
#: Collectives across DP ranks: every rank must enter them, so a rank outside one that its
#: peers wait in is the culprit.
CROSS_RANK_COLLECTIVES = (COLLECTIVE_SYNC, COLLECTIVE_BARRIER, COLLECTIVE_RESUME)
#: Collectives that take a number in a rank's DP collective sequence: every rank enters each
#: of them, in the same order, so the n-th entry must be the same kind on every rank (the
#: flight recorder's analysis names the first n where it is not). The per-step model
#: collective keeps its own count (``step``): a paused rank takes none.
DP_SEQUENCED_COLLECTIVES = (COLLECTIVE_SYNC, COLLECTIVE_RESUME, COLLECTIVE_BARRIER,
                            COLLECTIVE_RPC)
#: Calls from a rank's engine core to its OWN workers: the rank still inside one while its
#: peers have returned from theirs is the slow one (never its peers).
ENGINE_TO_WORKER_CALLS = (COLLECTIVE_STEP, COLLECTIVE_RPC)
#: What a worker can be inside (``call`` label / worker board codes; "" = nothing).
WORKER_CALL_NAMES = ("execute_model", "sample_tokens", "execute_dummy_batch", "rpc")
#: DP/EP collectives of the forward a worker can be inside (the MoE dispatch/combine
#: primitives, vLLM's DP batch coordination all-reduce).
MODEL_COLLECTIVE_NAMES = ("all_gatherv", "reduce_scatterv", "all_reduce", "all_gather",
                          "reduce_scatter", "dispatch", "combine", "dp_coordinate")
SIGNALS = ("spans",)
#: ``where`` of vllm_dp_telemetry_errors_total: a probe method, or a gauge read at scrape time.
TELEMETRY_ERROR_SITES = ("attach", "pause_requested", "phase_changed", "sync_begin", "sync_end",
                         "consensus", "start_dp_wave", "resumed", "request_finished",
                         "wave_changed", "utility_call",
                         "step_end", "collective_begin", "collective_end", "progress",
                         "shutdown", "scrape")
#: ``reason`` of vllm_dp_plugin_active: ok / unknown_version (active, 1); the others 0.
PLUGIN_REASONS = ("ok", "unknown_version", "unknown_version_off", "no_two_phase_pause",
                  "contract_mismatch", "engine_mismatch", "telemetry_error")
#: ``reason`` of vllm_dp_requests_rejected (vLLM 0.33's error code for a request that arrives
#: while the engine is paused by pause_generation in abort or wait mode)
REJECT_ENGINE_PAUSED = "engine_paused"
REJECT_REASONS = (REJECT_ENGINE_PAUSED,)
CADENCES = ("fixed", "adaptive")

SUFFIXED_COUNTERS = tuple(
    n + "_total"
    for n in (
        STEPS,
        PAUSE_REQUESTS,
        PAUSE_CONSENSUS,
        RESUMES,
        START_DP_WAVE,
        REQUESTS_REJECTED,
        TELEMETRY_DROPPED,
        TELEMETRY_ERRORS,
        WORKER_MODEL_COLLECTIVES,
        FLIGHT_DUMPS,
        PAUSE_CONSENSUS_STEPS,
    )
) + (COLLECTIVE_WAIT + "_total", WORKER_MODEL_COLLECTIVE_SECONDS + "_total")
# Counters as exposed (with the `_total` suffix prometheus_client adds): what queries and
# scrapes read.
STEPS_TOTAL = STEPS + "_total"
PAUSE_REQUESTS_TOTAL = PAUSE_REQUESTS + "_total"
PAUSE_CONSENSUS_TOTAL = PAUSE_CONSENSUS + "_total"
RESUMES_TOTAL = RESUMES + "_total"
START_DP_WAVE_TOTAL = START_DP_WAVE + "_total"
REQUESTS_REJECTED_TOTAL = REQUESTS_REJECTED + "_total"
TELEMETRY_DROPPED_TOTAL = TELEMETRY_DROPPED + "_total"
TELEMETRY_ERRORS_TOTAL = TELEMETRY_ERRORS + "_total"
COLLECTIVE_WAIT_TOTAL = COLLECTIVE_WAIT + "_total"
WORKER_MODEL_COLLECTIVES_TOTAL = WORKER_MODEL_COLLECTIVES + "_total"
WORKER_MODEL_COLLECTIVE_SECONDS_TOTAL = WORKER_MODEL_COLLECTIVE_SECONDS + "_total"
FLIGHT_DUMPS_TOTAL = FLIGHT_DUMPS + "_total"
PAUSE_CONSENSUS_STEPS_TOTAL = PAUSE_CONSENSUS_STEPS + "_total"
INFO_SERIES = INFO + "_info"
WORKER_POSITION_INFO = WORKER_POSITION + "_info"
#: The worker-board series served once per worker (they name the culprit worker) ...
WORKER_PER_WORKER_SERIES = (WORKER_HEARTBEAT_AGE, WORKER_POSITION_INFO)
#: ... and once per rank, over all its workers (a rank with N workers: 2 N + 3 series).
WORKER_RANK_SERIES = (WORKER_MODEL_COLLECTIVE_INSIDE, WORKER_MODEL_COLLECTIVES_TOTAL,
                      WORKER_MODEL_COLLECTIVE_SECONDS_TOTAL)

HISTOGRAMS = (SYNC_WAIT, PAUSE_CONSENSUS_LATENCY)
SUMMARIES: tuple[str, ...] = ()
GAUGES = (
    PHASE,
    ENGINES_RUNNING,
    CURRENT_WAVE,
    STEP_COUNTER,
    STEPS_UNTIL_SYNC,
    SYNC_INTERVAL,
    DP_SIZE,
    COLLECTIVE_INSIDE,
    LAST_PROGRESS,
    PAUSE_PENDING_SINCE,
    REQUESTS_RUNNING,
    REQUESTS_WAITING,
    PLUGIN_ACTIVE,
    WORKER_MODEL_COLLECTIVE_INSIDE,
    WORKER_HEARTBEAT_AGE,
    DP_COLLECTIVE_SEQ,
)


def exposed_series_names() -> frozenset[str]:
    """Every series name a scrape can contain (histograms with their suffixes)."""
    names = set(GAUGES) | set(SUFFIXED_COUNTERS) | {INFO + "_info", WORKER_POSITION + "_info"}
    for h in HISTOGRAMS:
        names |= {h + "_bucket", h + "_sum", h + "_count"}
    for s in SUMMARIES:
        names |= {s + "_sum", s + "_count"}
    return frozenset(names)


# --- OpenTelemetry ---------------------------------------------------------------------------

TRACER_NAME = "instrumented_core"

SPAN_PAUSE = "dp.pause"  # one per rank per pause: request -> resume
SPAN_PENDING = "dp.pause.pending"  # child: request -> consensus
SPAN_PAUSED = "dp.pause.paused"  # child: consensus -> resume
SPAN_CLIENT_PAUSE = "dp.pause_generation"  # the client's fan-out, parent of the ranks' spans

EVENT_SYNC_ROUND = "dp.sync_round"
EVENT_CONSENSUS = "dp.consensus"
EVENT_START_DP_WAVE_IGNORED = "dp.start_dp_wave.ignored"
EVENT_START_DP_WAVE = "dp.start_dp_wave"
EVENT_RESUME = "dp.resume"
SPAN_FLIGHT_DUMP = "dp.flight_dump"  # the watchdog wrote a hang dump (one per incident)
ATTR_DUMP_PATH = "vllm.dp.flight.dump_path"
ATTR_DUMP_REASON = "vllm.dp.flight.reason"
ATTR_DP_SEQ = "vllm.dp.collective_sequence"

ATTR_RANK = "vllm.dp.rank"
ATTR_DP_SIZE = "vllm.dp.size"
ATTR_MODE = "vllm.dp.pause.mode"
ATTR_PAUSE_ORDINAL = "vllm.dp.pause.ordinal"
ATTR_WAVE = "vllm.dp.wave"
ATTR_SYNC_ROUND = "vllm.dp.sync_round"
ATTR_STEPS_WAITED = "vllm.dp.pause.steps_waited"
ATTR_SECONDS_WAITED = "vllm.dp.pause.seconds_waited"
ATTR_LOCAL_UNFINISHED = "vllm.dp.sync.local_unfinished"
ATTR_LOCAL_PAUSE = "vllm.dp.sync.local_pause"
ATTR_GLOBAL_UNFINISHED = "vllm.dp.sync.global_unfinished"
ATTR_PAUSE_VOTES = "vllm.dp.sync.pause_votes"
ATTR_CONSENSUS = "vllm.dp.sync.consensus"
ATTR_SYNC_SECONDS = "vllm.dp.sync.wait_seconds"
ATTR_EXCLUDE = "vllm.dp.start_dp_wave.exclude"
ATTR_OUTCOME = "vllm.dp.start_dp_wave.outcome"
ATTR_PROTOCOL = "vllm.dp.protocol"
ATTR_ENDED_BY = "vllm.dp.pause.ended_by"  # "shutdown" when the process stopped mid-pause
ATTR_MODEL_NAME = "vllm.dp.model_name"
