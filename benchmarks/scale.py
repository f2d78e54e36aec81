"""Section 4: scale: series and bytes per scrape at 8, 64 and 256 ranks, doctor time on 64+
ranks served over loopback HTTP, and spans per pause per rank.

Each rank of a deployment owns its own registry (one process, one endpoint per rank), so the
benchmark builds one ``CollectorRegistry`` + ``RankMetrics`` per rank, exactly as
``start_rank_telemetry`` does, with the probe attached to a state machine so the callback
gauges are live. A scrape of rank r is ``generate_latest(registry_r)``.
"""

from __future__ import annotations

import statistics
import time

from benchmarks.common import emit, log, median


def _rank_registries(ranks: int, dp_size: int | None = None):
    from prometheus_client import CollectorRegistry

    from instrumented_core.protocol import PauseStateMachine
    from instrumented_core.telemetry.metrics import RankMetrics
    from instrumented_core.telemetry.probe import TelemetryProbe

    dp = dp_size or ranks
    out = []
    for r in range(ranks):
        reg = CollectorRegistry()
        info = {"dp_size": str(dp), "sync_interval": "16", "protocol": "two-phase",
                "cadence": "fixed", "version": "bench", "vllm_version": "none"}
        metrics = RankMetrics(reg, r, "bench-model", info)
        probe = TelemetryProbe(r, dp, metrics, None, model_name="bench-model")
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
        emit(f"scale.dp{ranks}.series_per_rank", "series", value=statistics.mean(series),
             min=min(series), max=max(series), total_series=sum(series), ranks=ranks)
        emit(f"scale.dp{ranks}.bytes_per_scrape", "bytes", value=statistics.mean(sizes),
             total_bytes_all_ranks=sum(sizes), ranks=ranks,
             render_ms_per_rank=median(times) * 1e3,
             note="one rank's /metrics body (generate_latest); total = one scrape of every rank")


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
    log("scale: series and exposition bytes at 8, 64, 256 ranks")
    series_and_bytes(quick)
    log("scale: doctor time over loopback HTTP")
    doctor_time(quick)
    spans_per_pause(quick)
