"""``report.html``: one self-contained page that tells the story of a demo run.

Built only from what the run left in its output directory: the recorder's per-rank scrapes of
``/metrics`` (``timeline.jsonl``), the story's events (``events.jsonl``), the ranks' spans
(``spans.jsonl``), the verdict (``summary.json``) and, when present, the ranks' final metrics
(``metrics/rank-<r>.prom``, Prometheus exposition text). Any of them may be missing or partial
(a run that crashed, a legacy deadlock that never finished its pause spans, a dead rank): the
page then says what it could not show instead of failing.

The page opens offline: plots are inline SVG generated here, the only script is a few inline
lines that report the page rendered (and any script error) into the page itself, and a
Content-Security-Policy forbids loading anything from anywhere.

Modules: :mod:`.data` (reading the run back), :mod:`.svg` (plots), :mod:`.sections` (the
page's parts), :mod:`.page` (assembling and writing it), :mod:`.theme` (colours, escaping).
"""

from __future__ import annotations

from instrumented_core.report.data import RunData, load_run
from instrumented_core.report.page import build_report, render

__all__ = ["RunData", "build_report", "load_run", "render"]
