"""Section 5: exporter down: the cluster's step rate with the OTLP endpoint unresponsive
(``BlackholeServer``: accepts connections, never answers) vs reachable (``OtlpSink``).

Spans are made only at pause transitions, so each run first does pause/resume cycles (their
spans queue for export: the blackhole holds the exporter thread in a 2 s read timeout per
batch), then measures a burst of steps while that export is pending. Both clusters are up at
once and their runs alternate.
"""

from __future__ import annotations

import time

from benchmarks.common import emit, interleaved, log, median, start_clusters, stop_clusters, tempdir


def _run(cluster, tokens: int, cycles: int) -> tuple[float, float]:
    from benchmarks.overhead import burst_rate

    t0 = time.perf_counter()
    for _ in range(cycles):
        cluster.pause("keep", timeout=30)
        cluster.resume(timeout=30)
    cycle_s = (time.perf_counter() - t0) / cycles
    return burst_rate(cluster, tokens), cycle_s


def run(quick: bool) -> None:
    from benchmarks.overhead import burst_rate, telemetry_on
    from instrumented_core.cluster import ClusterConfig
    from instrumented_core.scrape import scrape_all
    from instrumented_core.telemetry import names as n
    from instrumented_core_testing.otlp_sink import BlackholeServer, OtlpSink

    ranks = 2
    reps = 2 if quick else 8
    tokens = 500 if quick else 1500
    cycles = 2 if quick else 4
    tmp = tempdir(prefix="bench-exporter-")
    sink, hole = OtlpSink(), BlackholeServer()
    log(f"exporter down: DP {ranks}, OTLP to a live sink vs a blackhole")
    try:
        cfgs = [ClusterConfig(ranks=ranks, step_seconds=0.0, hang_timeout=60,
                              telemetry=telemetry_on(f"{tmp}/{name}", span_exporter="otlp",
                                                     otlp_endpoint=ep + "/v1/traces"))
                for name, ep in (("sink", sink.endpoint), ("hole", hole.endpoint))]
        clusters = start_clusters(cfgs)
        up, down = clusters
        try:
            for c in clusters:
                burst_rate(c, 100)
            raw = interleaved({"up": lambda: _run(up, tokens, cycles),
                               "down": lambda: _run(down, tokens, cycles)}, reps)
            time.sleep(1.0)  # let the live exporter flush
            dropped = sum(s.sum(n.TELEMETRY_DROPPED + "_total")
                          for s in scrape_all(down.metrics_urls))
            dropped_up = sum(s.sum(n.TELEMETRY_DROPPED + "_total")
                             for s in scrape_all(up.metrics_urls))
        finally:
            stop_clusters(clusters)
        received = len(sink.spans)
    finally:
        sink.close()
        hole.close()
    rate = {k: median([r for r, _ in v]) for k, v in raw.items()}
    cyc = {k: median([c for _, c in v]) for k, v in raw.items()}
    emit("exporter_down.dp2.steps_per_second", "steps/s", baseline=rate["up"],
         instrumented=rate["down"], runs_per_side=reps, steps_per_run=tokens,
         paired_ratio_median=median([d[0] / u[0] for d, u in zip(raw["down"], raw["up"])]),
         baseline_runs=[round(r) for r, _ in raw["up"]],
         instrumented_runs=[round(r) for r, _ in raw["down"]],
         pause_cycles_per_run=cycles, spans_received_by_live_sink=received,
         spans_dropped_with_blackhole=dropped, spans_dropped_with_live_sink=dropped_up,
         goal="no slowdown (ratio ~1 within noise)",
         note="baseline = OTLP endpoint reachable (OtlpSink); instrumented = unresponsive "
              "(BlackholeServer); step_seconds=0; median of alternated runs")
    emit("exporter_down.dp2.pause_resume_cycle_seconds", "s", baseline=cyc["up"],
         instrumented=cyc["down"], runs_per_side=reps, pause_cycles_per_run=cycles,
         note="client-observed pause(keep) + resume() round trip, reachable vs unresponsive")
