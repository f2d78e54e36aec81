"""The files a demo run leaves in its output directory: their names, in one place.

The demos write them, the recorder fills the timeline, events and final expositions, and the
report reads them all back; each spells a name through these constants only.
"""

from __future__ import annotations

__all__ = ["EVENTS", "FLIGHT_DIR", "METRICS_DIR", "REPORT", "SPANS", "SUMMARY", "TIMELINE", "rank_exposition"]

SUMMARY = "summary.json"  # verdict, expected verdict, run facts
SPANS = "spans.jsonl"  # every rank's spans (the demo's span file)
REPORT = "report.html"  # the self-contained page
EVENTS = "events.jsonl"  # the story's steps and notes
TIMELINE = "timeline.jsonl"  # the recorder's per-rank scrapes of /metrics
METRICS_DIR = "metrics"  # final per-rank exposition text
FLIGHT_DIR = "flight"  # the ranks' flight-recorder hang dumps (instrumented-core analyze)


def rank_exposition(rank: int) -> str:
    """Path of rank ``rank``'s final exposition, relative to the output directory."""
    return f"{METRICS_DIR}/rank-{rank}.prom"
