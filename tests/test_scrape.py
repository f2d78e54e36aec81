"""The doctor's filtered scrape reads exactly what a full scrape reads, for the series it needs.

Real ``RankMetrics`` behind a real ``MetricsServer`` over loopback HTTP; the rank's state is
frozen (stalled, a peer inside the sync all-reduce) so two scrapes see the same values.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry

from instrumented_core.diagnosis import diagnose
from instrumented_core.protocol import PauseStateMachine
from instrumented_core.scrape import DIAGNOSIS_SERIES, scrape, scrape_all, to_view
from instrumented_core.telemetry import names as n
from instrumented_core.telemetry.metrics import RankMetrics
from instrumented_core.telemetry.probe import TelemetryProbe
from instrumented_core.telemetry.server import MetricsServer
from instrumented_core.telemetry.worker_board import (
    CALL_CODES,
    COLLECTIVE_CODES,
    ENV_BOARD_DIR,
    BoardWriter,
)

INFO = {"dp_size": "2", "sync_interval": "16", "protocol": "two-phase", "cadence": "fixed",
        "version": "test", "vllm_version": "none"}


def _ranks(count: int):
    out = []
    for r in range(count):
        reg = CollectorRegistry()
        probe = TelemetryProbe(r, count, RankMetrics(reg, r, "m", INFO), None, model_name="m")
        sm = PauseStateMachine(r, count, 16, probe=probe)
        sm.request_counts = lambda: (2, 1)  # what the engine's scheduler holds
        out.append((reg, probe))
    return out


def test_filtered_scrape_equals_the_full_scrape_on_the_doctors_series(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_BOARD_DIR, str(tmp_path))
    worker = BoardWriter(0)  # a worker of this process: both ranks' endpoints show it
    worker.call_enter(CALL_CODES["execute_model"])
    worker.collective_enter(COLLECTIVE_CODES["all_gatherv"])
    ranks = _ranks(2)
    servers = [MetricsServer(reg, "127.0.0.1", 0, r) for r, (reg, _) in enumerate(ranks)]
    try:
        frozen = time.time() - 30
        ranks[0][1].hot.last_progress = frozen
        ranks[1][1].hot.inside_since[n.COLLECTIVE_SYNC] = frozen
        for server in servers:
            full = scrape(server.url)
            part = scrape(server.url, only=DIAGNOSIS_SERIES)
            assert full.reachable and part.reachable
            wanted = {k: v for k, v in full.values.items() if k[0] in DIAGNOSIS_SERIES}
            # every series is exported (plugin_active: by the vLLM plugin, not RankMetrics)
            assert {k[0] for k in wanted} == DIAGNOSIS_SERIES - {n.PLUGIN_ACTIVE}
            # inside-seconds grows between the two scrapes; everything else is frozen
            grows = {n.COLLECTIVE_INSIDE, n.WORKER_MODEL_COLLECTIVE_INSIDE,
                     n.WORKER_HEARTBEAT_AGE}
            assert {k: v for k, v in part.values.items() if k[0] not in grows} == \
                {k: v for k, v in wanted.items() if k[0] not in grows}
            assert {k for k in part.values} == set(wanted)
            assert len(part.values) < len(full.values) / 2  # the rest is skipped unparsed
        samples = scrape_all([s.url for s in servers], only=DIAGNOSIS_SERIES)
        verdict = diagnose([to_view(s, r) for r, s in enumerate(samples)], 2.0)
        assert verdict.culprits == [0], verdict.summary
    finally:
        for server in servers:
            server.close()
        worker.close()


def test_a_ranks_status_only_endpoint_reads_as_plugin_off_on_that_rank_with_its_reason():
    from instrumented_core.telemetry.metrics import plugin_active

    ranks = _ranks(2)
    off = CollectorRegistry()  # what an engine the plugin cannot observe serves, alone
    plugin_active(off, {n.LABEL_ENGINE: "1", n.LABEL_MODEL_NAME: "m"}, False,
                  "contract_mismatch", "0.20.2")
    servers = [MetricsServer(ranks[0][0], "127.0.0.1", 0, 0),
               MetricsServer(off, "127.0.0.1", 0, 1)]
    try:
        samples = scrape_all([s.url for s in servers], only=DIAGNOSIS_SERIES)
        views = [to_view(s, r) for r, s in enumerate(samples)]
        assert views[1].plugin_off == "contract_mismatch (vLLM 0.20.2)"
        verdict = diagnose(views, 2.0)
        assert verdict.kind == "not_dp_endpoint"
        assert verdict.summary.startswith(f"plugin off on rank 1 ({servers[1].url}"), verdict.summary
        assert verdict.summary.endswith(": contract_mismatch (vLLM 0.20.2)"), verdict.summary
        assert views[0].plugin_off is None  # an active rank (plugin_active 1) is read as usual
    finally:
        for server in servers:
            server.close()
