"""Exemplars from metrics to traces, live: a real Prometheus with exemplar storage scraping a
real CPU cluster (Gloo, its own processes) whose ranks write their spans to a file.

Prometheus negotiates OpenMetrics with each rank's endpoint, keeps the exemplars of the
sync-wait and consensus-latency buckets, and ``/api/v1/query_exemplars`` returns trace ids
that are the traces of the pauses in the spans file: each exemplar names the very ``dp.pause``
span of the rank whose series carries it.
"""

from __future__ import annotations

import json
import time
import urllib.parse
from pathlib import Path

import pytest

from instrumented_core.cluster import Cluster, ClusterConfig
from instrumented_core.telemetry import TelemetryConfig
from instrumented_core.telemetry import names as n
from tests.prom_helpers import JOB, Prometheus, get_json, running_prometheus

pytestmark = [pytest.mark.prometheus, pytest.mark.cluster]

RANKS = 2
PAUSES = 3


def exemplars(prom: Prometheus, series: str, start: float) -> list[dict]:
    """Every exemplar of ``series`` since ``start``, flattened: the series' labels, the
    exemplar's labels and value."""
    params = urllib.parse.urlencode({"query": f'{series}{{job="{JOB}"}}', "start": f"{start:.3f}",
                                     "end": f"{time.time() + 1:.3f}"})
    body = get_json(f"{prom.url}/api/v1/query_exemplars?{params}")
    assert body["status"] == "success", body
    return [{"series": group["seriesLabels"], "labels": e["labels"], "value": float(e["value"])}
            for group in body["data"] for e in group["exemplars"]]


def pause_spans(path: Path) -> dict[tuple[str, str], int]:
    """(trace id, span id) of every ``dp.pause`` span in the spans file -> its rank."""
    if not path.exists():
        return {}
    out = {}
    for line in path.read_text().splitlines():
        span = json.loads(line)
        if span["name"] == n.SPAN_PAUSE:
            ctx = span["context"]
            out[(ctx["trace_id"].removeprefix("0x"), ctx["span_id"].removeprefix("0x"))] = \
                span["attributes"][n.ATTR_RANK]
    return out


def test_exemplars_in_prometheus_resolve_to_the_pauses_in_the_spans_file(tmp_path):
    spans_file = tmp_path / "spans.jsonl"
    config = ClusterConfig(ranks=RANKS, sync_interval=8, hang_timeout=20,
                           telemetry=TelemetryConfig(metrics_port_base=0,
                                                     spans_file=str(spans_file),
                                                     model_name="live-exemplars"))
    with Cluster(config) as cluster, running_prometheus(
            cluster.metrics_urls, tmp_path / "prom",
            extra_args=["--enable-feature=exemplar-storage"]) as prom:
        started = time.time() - 5
        handles = [cluster.generate(100_000, rank=r) for r in range(RANKS)]
        for _ in range(PAUSES):
            cluster.pause("keep", stagger=0.01, timeout=30)
            time.sleep(0.2)
            cluster.resume(timeout=30)
            time.sleep(0.2)

        want = {n.SYNC_WAIT + "_bucket", n.PAUSE_CONSENSUS_LATENCY + "_bucket"}

        def scraped():  # both histograms' exemplars of every rank, after the last pause
            found = {s: exemplars(prom, s, started) for s in want}
            ranks = {s: {e["series"]["engine"] for e in found[s]} for s in want}
            return found if all(r == {str(k) for k in range(RANKS)}
                                for r in ranks.values()) else None

        found = prom.wait_for("exemplars of both histograms on every rank", scraped, timeout=30)
        cluster.pause("abort", timeout=30)
        assert [h.result(10) for h in handles] == ["aborted"] * RANKS

        traced = {(e["labels"][n.EXEMPLAR_TRACE_ID], e["labels"][n.EXEMPLAR_SPAN_ID])
                  for s in want for e in found[s]}
        spans = prom.wait_for(
            "every exemplar's pause span in the spans file",
            lambda: (lambda s: s if traced <= set(s) else None)(pause_spans(spans_file)),
            timeout=20)
        for series in want:
            for e in found[series]:
                key = (e["labels"][n.EXEMPLAR_TRACE_ID], e["labels"][n.EXEMPLAR_SPAN_ID])
                # the exemplar of rank r's series is rank r's own span of that pause
                assert str(spans[key]) == e["series"]["engine"], (series, e)
                assert e["series"]["model_name"] == "live-exemplars"
                assert e["value"] > 0
        # one trace per pause: the exemplars name at most PAUSES traces, each in the file
        assert 1 <= len({t for t, _ in traced}) <= PAUSES
