"""Prometheus metrics of one DP rank.

Each rank process owns a ``CollectorRegistry`` served on its own port (base port + rank):
ranks are separate processes with separate lifetimes, a hung rank must not take its peers'
endpoint down, and per-rank targets let Prometheus' ``up`` name a dead rank. Label children
are bound once here, so the hot path is one ``inc()``/``set()`` on a pre-bound child.

A whole rank serves at most 60 series with one worker (issue 13: a vLLM rank at TP 1; ``python
-m benchmarks --only scale`` measures it on a live rank, ``tests/test_series.py`` on
``build_rank``'s registry): no ``_created`` series (``RankRegistry``), histogram buckets chosen
from measured latencies, trouble counters (spans dropped, requests rejected, telemetry errors)
only once there is trouble, per-worker series only where they name the culprit worker
(``WorkerBoardCollector``), and nothing PromQL can derive from another series:
  seconds in the sync all-reduce now: vllm_dp_collective_inside_seconds{collective="sync_dp_state"}
  when it entered: timestamp(vllm_dp_collective_inside_seconds) - vllm_dp_collective_inside_seconds
  sync rounds completed: vllm_dp_sync_wait_seconds_count (a round is one observation)
  seconds inside sync rounds: vllm_dp_sync_wait_seconds_sum
  round skew: max by (model_name) (vllm_dp_sync_wait_seconds_count) - min by (model_name) (...)
  dummy share: rate(vllm_dp_steps_total{kind="dummy"}[1m]) / sum without(kind) (rate(...))
  mean steps to consensus: rate(vllm_dp_pause_consensus_steps_total[5m])
                           / rate(vllm_dp_pause_consensus_latency_seconds_count[5m])
  a paused rank dropping START_DP_WAVE: vllm_dp_pause_phase == 2 and on (...)
                                        vllm_dp_info{protocol="two-phase"}
  how long a worker has been inside its engine's call: the engine's
                           vllm_dp_collective_inside_seconds{collective=~"step|collective_rpc"}
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from instrumented_core.diagnosis import worker_fields
from instrumented_core.telemetry import names as n
from instrumented_core.telemetry.worker_board import read_board

#: Seconds inside one sync_dp_state all-reduce. vLLM runs it on a Gloo CPU group on every
#: platform (``ParallelConfig.stateless_init_dp_group``: "use gloo since the engine process
#: might not have cuda device"), so GPU deployments see Gloo latencies too: an all-reduce whose
#: peers are all there takes ~0.1 ms on one host (measured here: min 0.11 ms, p10 0.16 ms) and
#: ~0.04-0.35 ms between hosts (pytorch/gloo#158: 1 KB ring all-reduce, InfiniBand / TCP);
#: NCCL-scale small all-reduces are 10-100 us, under the first bound. Longer is waiting for the
#: slowest peer's step: 1-10 ms with the CPU cluster's 1 ms steps (measured p50 0.5 ms, p90
#: 3.6 ms, p99 6 ms), 10-100 ms for a GPU decode or prefill step; above 1 s is a straggler, and
#: a stall is the inside gauge's job (the alert fires at 10 s). A 1-3-10 ladder keeps every
#: quantile estimate within a factor ~3.
SYNC_WAIT_BUCKETS = (0.0003, 0.001, 0.003, 0.01, 0.03, 0.1, 1.0)
#: Seconds from a rank's pause request to all-rank consensus: at least one sync round after
#: the last rank's request. Measured on the CPU cluster (1 ms steps, interval 16, random
#: stagger, fixed and adaptive cadence): min 1.6 ms, p50 21 ms, p99 49 ms. On GPUs a fixed
#: cadence of 32 steps x 10-50 ms per step is 0.3-1.6 s, the adaptive one a few steps; above
#: 3 s is slow (the VllmDpPauseConsensusSlow alert reads the pending gauge, not this).
CONSENSUS_SECONDS_BUCKETS = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0)


class RankRegistry(CollectorRegistry):
    """A rank's registry without ``_created`` samples (one per counter child and histogram:
    a sixth of the series, answering no question the dashboards or alerts ask).

    Dropped here, at collection, rather than with prometheus_client's
    ``disable_created_metrics()``: that switch is process-global, so inside a vLLM engine core
    it would also change what vLLM's own metrics and any other prometheus_client user in that
    process expose, and anyone calling ``enable_created_metrics()`` would bring ours back.
    """

    def collect(self) -> Iterable[Metric]:
        for metric in super().collect():
            metric.samples = [s for s in metric.samples
                              if not s.name.endswith(("_created", "_gcreated"))]
            yield metric


def trace_exemplar(span: Any) -> dict[str, str] | None:
    """The OpenMetrics exemplar naming ``span``'s trace (``trace_id``, ``span_id`` as 32 and
    16 hex digits, as the spans file and OTLP carry them), or None without a recording span.
    Only the OpenMetrics exposition renders it; Prometheus keeps it with
    ``--enable-feature=exemplar-storage`` and Grafana links it to the trace."""
    if span is None:
        return None
    ctx = span.get_span_context()
    if not ctx.is_valid:
        return None
    return {n.EXEMPLAR_TRACE_ID: format(ctx.trace_id, "032x"),
            n.EXEMPLAR_SPAN_ID: format(ctx.span_id, "016x")}


class RankMetrics:
    """All ``vllm_dp_*`` series of one engine, registered into ``registry``."""

    def __init__(
        self,
        registry: CollectorRegistry,
        engine: int | str,
        model_name: str,
        info: Mapping[str, str] | None = None,
    ) -> None:
        labels = {n.LABEL_ENGINE: str(engine), n.LABEL_MODEL_NAME: model_name}
        base = list(n.BASE_LABELS)

        def gauge(name: str, doc: str, extra: tuple[str, ...] = ()) -> Gauge:
            return Gauge(name, doc, base + list(extra), registry=registry)

        def counter(name: str, doc: str, extra: tuple[str, ...] = ()) -> Counter:
            return Counter(name, doc, base + list(extra), registry=registry)

        self.phase = gauge(n.PHASE, "Pause phase of this DP rank: 0 running, 1 pending_pause "
                           "(waiting for all-reduce consensus), 2 paused.").labels(**labels)
        self.engines_running = gauge(n.ENGINES_RUNNING, "1 while this rank's busy loop is "
                                     "stepping (real or dummy steps), 0 when idle.").labels(**labels)
        self.current_wave = gauge(n.CURRENT_WAVE, "Current DP request wave number of this "
                                  "rank.").labels(**labels)
        self.step_counter = gauge(n.STEP_COUNTER, "Steps (count) taken in the current wave; "
                                  "syncs happen on step 1 and every interval.").labels(**labels)
        self.steps_until_sync = gauge(n.STEPS_UNTIL_SYNC, "Steps (count) until this rank's "
                                      "next sync_dp_state all-reduce.").labels(**labels)
        self.sync_interval = gauge(n.SYNC_INTERVAL, "Current sync cadence in steps (1 while the "
                                   "adaptive cadence is syncing every step).").labels(**labels)
        self.dp_size = gauge(n.DP_SIZE, "Data-parallel size (ranks) of this deployment.").labels(
            **labels)
        self.pending_since = gauge(n.PAUSE_PENDING_SINCE, "Unix time in seconds at which the "
                                   "current pending pause began, 0 when not pending.").labels(
            **labels)
        self.requests_running = gauge(
            n.REQUESTS_RUNNING, "Requests (count) this rank's scheduler is running now (work in "
            "flight; read at scrape time).").labels(**labels)
        self.requests_waiting = gauge(
            n.REQUESTS_WAITING, "Requests (count) waiting in this rank's scheduler now (read at "
            "scrape time).").labels(**labels)

        pause_requests = counter(n.PAUSE_REQUESTS, "Pause requests (count) received, by mode.",
                                 (n.LABEL_MODE,))
        self.pause_requests = {m: pause_requests.labels(**labels, mode=m) for m in n.PAUSE_MODES}
        self.pause_consensus = counter(n.PAUSE_CONSENSUS, "Pauses (count) that reached "
                                       "all-rank consensus on this rank.").labels(**labels)
        self.resumes = counter(n.RESUMES, "Resumes (count) applied on this rank.").labels(**labels)
        waves = counter(n.START_DP_WAVE, "START_DP_WAVE messages (count) by outcome: acted, "
                        "ignored (paused), stale, excluded.", (n.LABEL_OUTCOME,))
        self.start_dp_wave = {o: waves.labels(**labels, outcome=o) for o in n.WAVE_OUTCOMES}
        # Trouble counters: a child appears on its first event (a healthy rank serves none)
        self._rejected = counter(n.REQUESTS_REJECTED, "New requests (count) this rank rejected "
                                 "instead of queueing, by reason (engine_paused: paused by "
                                 "pause_generation, vLLM 0.33+).", (n.LABEL_REASON,))
        self._dropped = counter(n.TELEMETRY_DROPPED, "Telemetry items (count) dropped instead "
                                "of blocking the engine, by signal.", (n.LABEL_SIGNAL,))
        self._errors = counter(n.TELEMETRY_ERRORS, "Exceptions (count) inside telemetry itself, "
                               "logged and swallowed (never raised into the engine), by where: "
                               "the probe method, or scrape (a gauge read at scrape time).",
                               (n.LABEL_WHERE,))
        self._labels = labels

        # The two histograms carry the pause's trace as an exemplar (probe: trace_exemplar).
        self.sync_wait = Histogram(n.SYNC_WAIT, "Seconds spent inside each sync_dp_state "
                                   "all-reduce.", base, buckets=SYNC_WAIT_BUCKETS,
                                   registry=registry).labels(**labels)
        self.consensus_latency = Histogram(
            n.PAUSE_CONSENSUS_LATENCY, "Seconds from this rank's pause request to all-rank "
            "consensus.", base, buckets=CONSENSUS_SECONDS_BUCKETS, registry=registry).labels(
            **labels)
        # The mean is the question (dummy steps a pause costs, bounded by the sync interval):
        # this sum over the consensus-latency histogram's _count (observed in the same call;
        # a summary's own _count would be the same number twice).
        self.consensus_steps = counter(
            n.PAUSE_CONSENSUS_STEPS, "Steps (count) this rank took from its pause requests to "
            "all-rank consensus, summed over pauses (pauses: "
            "vllm_dp_pause_consensus_latency_seconds_count).").labels(**labels)
        Info(n.INFO, "Static facts about this DP rank's pause protocol and versions.", base,
             registry=registry).labels(**labels).info(dict(info or {}))
        self.hot = HotPathState()
        registry.register(HotPathCollector(self.hot, labels))
        registry.register(WorkerBoardCollector(labels))

    def rejected(self, reason: str, count: int = 1) -> None:
        """Count requests rejected for ``reason`` (one of ``REJECT_REASONS``)."""
        if reason not in n.REJECT_REASONS:
            raise ValueError(f"reject reason {reason!r} is not one of {n.REJECT_REASONS}")
        self._rejected.labels(**self._labels, reason=reason).inc(count)

    def dropped(self, signal: str, count: int) -> None:
        """Count telemetry items of ``signal`` (one of ``SIGNALS``) dropped."""
        if signal not in n.SIGNALS:
            raise ValueError(f"signal {signal!r} is not one of {n.SIGNALS}")
        self._dropped.labels(**self._labels, signal=signal).inc(count)

    def error(self, where: str) -> None:
        """Count one telemetry error at ``where`` (one of ``TELEMETRY_ERROR_SITES``); its
        series appears on the first error, so a working rank exports none of them."""
        self._errors.labels(**self._labels, where=where).inc()


def plugin_active(registry: CollectorRegistry, labels: Mapping[str, str], active: bool,
                  reason: str, vllm_version: str) -> Gauge:
    """``vllm_dp_plugin_active``: 1 while the plugin observes this rank, 0 when it is off, and
    why (``reason`` from ``PLUGIN_REASONS``: a bounded set). An inactive rank's endpoint serves
    this series alone, so "the plugin is off on rank 3" is a query, not a silence."""
    if reason not in n.PLUGIN_REASONS:
        raise ValueError(f"plugin reason {reason!r} is not one of {n.PLUGIN_REASONS}")
    gauge = Gauge(n.PLUGIN_ACTIVE, "1 while the instrumented_core plugin observes this DP "
                  "rank, 0 when it is off; reason says why (ok, unknown_version, "
                  "contract_mismatch, ...).", [*n.BASE_LABELS, n.LABEL_REASON,
                                               n.LABEL_VLLM_VERSION], registry=registry)
    gauge.labels(**labels, reason=reason, vllm_version=vllm_version).set(1 if active else 0)
    return gauge


class HotPathState:
    """What the engine thread updates on every step, as plain attributes.

    A ``Counter.inc()`` or ``Gauge.set()`` takes a lock (~0.3 us each); a step touches five
    of these values, so they are plain floats written by the engine thread alone and turned
    into samples by ``HotPathCollector`` at scrape time. Reads from the HTTP thread may be
    one step stale, never torn (CPython attribute and dict stores are atomic).
    """

    __slots__ = ("steps_real", "steps_dummy", "last_progress", "inside_since", "wait_seconds")

    def __init__(self) -> None:
        self.steps_real = 0
        self.steps_dummy = 0
        self.last_progress = time.time()
        self.inside_since = dict.fromkeys(n.COLLECTIVES, 0.0)
        self.wait_seconds = dict.fromkeys(n.COLLECTIVE_WAIT_COLLECTIVES, 0.0)


class HotPathCollector(Collector):
    """Exposes ``HotPathState`` with the same names, help and labels as declared metrics."""

    def __init__(self, state: HotPathState, labels: Mapping[str, str]) -> None:
        self.state = state
        self.label_names = list(labels)
        self.label_values = list(labels.values())

    def describe(self):
        return []

    def collect(self):
        st, now = self.state, time.time()
        names = self.label_names
        values = self.label_values

        steps = CounterMetricFamily(n.STEPS, "Engine steps (count) by kind: real (scheduled "
                                    "requests) or dummy (idle rank keeping lockstep).",
                                    labels=[*names, n.LABEL_KIND])
        steps.add_metric([*values, "real"], st.steps_real)
        steps.add_metric([*values, "dummy"], st.steps_dummy)
        yield steps
        progress = GaugeMetricFamily(n.LAST_PROGRESS, "Unix time in seconds of this rank's "
                                     "last completed step, sync round or utility call.",
                                     labels=names)
        progress.add_metric(values, st.last_progress)
        yield progress
        inside = GaugeMetricFamily(n.COLLECTIVE_INSIDE, "Seconds this rank has been inside the "
                                   "collective so far, 0 when not inside (computed at scrape "
                                   "time).", labels=[*names, n.LABEL_COLLECTIVE])
        wait = CounterMetricFamily(n.COLLECTIVE_WAIT, "Seconds spent inside collectives, by "
                                   "collective (sync_dp_state's: vllm_dp_sync_wait_seconds_sum).",
                                   labels=[*names, n.LABEL_COLLECTIVE])
        for c in n.COLLECTIVES:
            entered = st.inside_since.get(c, 0.0)
            inside.add_metric([*values, c], max(0.0, now - entered) if entered else 0.0)
        for c in n.COLLECTIVE_WAIT_COLLECTIVES:
            wait.add_metric([*values, c], st.wait_seconds.get(c, 0.0))
        yield inside
        yield wait


class WorkerBoardCollector(Collector):
    """Exposes this rank's workers' positions from the worker board (see
    :mod:`~instrumented_core.telemetry.worker_board`), read at scrape time: the engine core's
    endpoint shows where each worker is even when the worker is stopped or wedged. No worker
    records (the CPU cluster without workers, a single-process executor): no series.

    Per worker (label ``worker``) only what names the culprit worker: its heartbeat age (the
    frozen one) and its position (the call and model collective it is in). Everything else is
    one series per rank, over its workers, exactly as the doctor reads them
    (``diagnosis.worker_fields``): a rank is inside a model collective when all its workers
    are (seconds: the latest to enter), its sequence number is its lowest worker's, its
    collective seconds its most-waiting worker's. So a rank with N workers serves 2 N + 3:
    5 at TP 1, 19 at TP 8 (not 8 N)."""

    def __init__(self, labels: Mapping[str, str], owner_pid: int | None = None) -> None:
        self.label_names = list(labels)
        self.label_values = list(labels.values())
        self.owner_pid = owner_pid

    def describe(self):
        return []

    def collect(self):
        positions = read_board(self.owner_pid)
        if not positions:
            return
        now = time.time()
        names, values = self.label_names, self.label_values
        per_worker = [*names, n.LABEL_WORKER]
        heartbeat = GaugeMetricFamily(
            n.WORKER_HEARTBEAT_AGE, "Seconds since this worker's heartbeat thread last wrote; "
            "grows only when the whole process is frozen (stopped, or a C call holding the "
            "GIL), not while it waits in a collective.", labels=per_worker)
        position = InfoMetricFamily(
            n.WORKER_POSITION, "Where this worker is now: the call from its engine core and "
            "the model collective it is inside (empty: none).", labels=per_worker)
        for p in positions:
            key = [*values, str(p.worker)]
            heartbeat.add_metric(key, p.heartbeat_age(now))
            position.add_metric(key, {n.LABEL_CALL: p.call or "none",
                                      n.LABEL_COLLECTIVE: p.collective or "none"})
        rank = worker_fields([p.read_at(now) for p in positions])  # the doctor's rule
        coll_inside = GaugeMetricFamily(
            n.WORKER_MODEL_COLLECTIVE_INSIDE, "Seconds since all this rank's workers are inside "
            "a DP/EP collective of the forward (the latest to enter), 0 when any worker is not "
            "inside one.", labels=names)
        coll_inside.add_metric(values, rank.get("model_collective_seconds", 0.0))
        colls = CounterMetricFamily(
            n.WORKER_MODEL_COLLECTIVES, "DP/EP model collectives (count) entered by this rank's "
            "lowest worker: its collective sequence number (a rank behind its peers never "
            "reached the collective they wait in).", labels=names)
        colls.add_metric(values, rank["model_collective_seq"])
        coll_seconds = CounterMetricFamily(
            n.WORKER_MODEL_COLLECTIVE_SECONDS, "Seconds this rank's most-waiting worker spent "
            "inside DP/EP model collectives (a straggler's workers wait least).", labels=names)
        coll_seconds.add_metric(values, max(p.collective_seconds for p in positions))
        yield from (heartbeat, position, coll_inside, colls, coll_seconds)
