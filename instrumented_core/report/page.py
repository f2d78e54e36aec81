"""The page: style, the render check script, the CSP, and ``build_report``."""

from __future__ import annotations

import time
from pathlib import Path

from instrumented_core.report.data import RunData, _int, load_run
from instrumented_core.report.flight import flight_section
from instrumented_core.report.sections import (
    _banner,
    _empty,
    _events_list,
    _latency_section,
    _rank_table,
    _run_facts,
    _wait_histograms,
    _waves_section,
)
from instrumented_core.report.svg import phase_timeline_svg, sync_rounds_svg
from instrumented_core.report.theme import esc
from instrumented_core.run_files import EVENTS, METRICS_DIR, REPORT, SPANS, SUMMARY, TIMELINE
from instrumented_core.telemetry import names as n

STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;margin:0;
 padding:20px 28px;color:#212121;background:#fafafa;max-width:1320px}
h1{font-size:24px;margin:0 0 8px} h2{font-size:19px;margin:28px 0 6px;border-bottom:1px solid #ddd;
 padding-bottom:4px} h3{font-size:15px;margin:12px 0 4px;color:#424242}
.banner{display:flex;border:3px solid;border-radius:8px;background:#fff;margin:12px 0}
.verdict-kind{color:#fff;font-size:28px;font-weight:700;padding:18px 26px;display:flex;
 align-items:center;text-transform:uppercase;letter-spacing:1px}
.verdict-body{padding:8px 18px} .verdict-summary{font-size:17px;font-weight:600}
.ok{color:#2e7d32;font-weight:700} .bad{color:#c62828;font-weight:700}
.facts span{display:inline-block;margin-right:18px} .small{font-size:12px;color:#616161}
svg.plot{background:#fff;border:1px solid #e0e0e0;display:block;max-width:100%;height:auto}
svg text{font-size:12px;fill:#424242} .tick{font-size:11px} .axis-label{font-size:12px;fill:#616161}
.lane-label{font-size:13px;font-weight:600} .lane-label.culprit{fill:#c62828}
.axis{stroke:#757575} .grid{stroke:#eeeeee} .lane-bg{fill:#f5f5f5}
.event-marker line{stroke:#37474f;stroke-dasharray:4 3;stroke-width:1}
.event-label{font-size:10px;font-weight:700;fill:#37474f}
.inside-label{font-size:9px;fill:#fff;font-family:monospace}
.empty{padding:14px;background:#fff3e0;border:1px dashed #ffb74d}
.note{font-size:13px;color:#616161}
table.data{border-collapse:collapse;background:#fff;font-size:13px}
table.data th,table.data td{border:1px solid #e0e0e0;padding:4px 8px;text-align:right}
table.data th{background:#eceff1} tr.culprit td{background:#ffebee;font-weight:600}
ol.events{list-style:none;padding:0;font-size:13px} ol.events li{padding:2px 0}
.num{display:inline-block;min-width:22px;font-weight:700} .t{font-family:monospace;color:#616161}
.step{display:inline-block;background:#eceff1;border-radius:3px;padding:0 5px;margin:0 4px}
#script-errors{color:#b71c1c;background:#ffebee;padding:8px;white-space:pre-wrap}
#render-status{font-size:11px;color:#9e9e9e}
.notes{font-size:13px;color:#795548}
"""

# The page's only script: says it rendered (with how many plots) and shows any script error.
SCRIPT = """
(function () {
  function fail(message) {
    var box = document.getElementById('script-errors');
    box.hidden = false;
    box.textContent += 'script error: ' + message + '\\n';
    document.body.setAttribute('data-script-errors', 'yes');
  }
  window.addEventListener('error', function (e) { fail(e.message || String(e)); });
  document.addEventListener('DOMContentLoaded', function () {
    try {
      var plots = document.querySelectorAll('svg.plot');
      var status = document.getElementById('render-status');
      status.textContent = 'report rendered: ' + plots.length + ' plots';
      document.body.setAttribute('data-rendered', String(plots.length));
    } catch (e) { fail(e.message); }
  });
})();
"""

CSP = ("default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; "
       "img-src data:; base-uri 'none'; form-action 'none'")


def render(data: RunData) -> str:
    s = data.summary
    culprits = sorted({r for r in (_int(x) for x in s.get("culprit_ranks") or []) if r is not None})
    victims = sorted({r for r in (_int(x) for x in s.get("victim_ranks") or []) if r is not None})
    title = (f"DP pause run: {s.get('verdict', 'unknown')} ({s.get('protocol', '?')}, "
             f"{s.get('ranks', len(data.ranks) or '?')} ranks)" if s else
             f"DP pause run: no verdict ({len(data.ranks)} ranks recorded)")
    body = [f"<h1>{esc(title)}</h1>", _run_facts(data), _banner(data, culprits, victims)]
    if data.notes:
        body.append('<ul class="notes">' + "".join(f"<li>{esc(x)}</li>" for x in data.notes)
                    + "</ul>")
    body.append('<h2 id="phases">Pause phase per rank</h2>')
    body.append('<p class="note">Scraped from each rank\'s <code>/metrics</code> every 0.25 s; '
                "the short pending phases come from the <code>" + esc(n.SPAN_PENDING)
                + "</code> spans (thin marks at the bottom of a lane), the dark strips at the "
                "top show a rank waiting inside a collective. Dashed lines are the story's "
                "steps listed below.</p>")
    body.append(phase_timeline_svg(data, set(culprits)) if data.timeline and data.ranks
                else _empty("no per-rank samples recorded (timeline.jsonl missing or empty)"))
    body.append('<h3>Story</h3>' + _events_list(data))
    body.append('<h2 id="sync-rounds">Sync rounds over time</h2>')
    body.append(sync_rounds_svg(data) or _empty("no sync round counts recorded"))
    body.append('<h2 id="sync-wait">All-reduce wait distribution '
                f"(<code>{esc(n.SYNC_WAIT)}</code>)</h2>")
    body.append(_wait_histograms(data))
    body.append('<h2 id="consensus">Pause request to consensus, per rank per pause</h2>')
    body.append(_latency_section(data))
    body.append("<h2 id=\"waves\"><code>START_DP_WAVE</code> acted / ignored per rank</h2>")
    body.append(_waves_section(data))
    # the flight recorder's cross-rank analysis of the hang dumps (long when a run hung):
    # after the plots, which the verdict banner above already summarises
    body.append(flight_section(data.out_dir))
    body.append('<h2 id="ranks">Per rank</h2>')
    body.append(_rank_table(data, set(culprits), set(victims)))
    body.append(f'<p class="small">generated {esc(time.strftime("%Y-%m-%d %H:%M:%S"))} from '
                f"{esc(str(data.out_dir))}: {esc(TIMELINE)}, {esc(EVENTS)}, {esc(SPANS)}, "
                f"{esc(SUMMARY)}{', ' + METRICS_DIR + '/' if data.prom_waits else ''}</p>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f'<meta http-equiv="Content-Security-Policy" content="{esc(CSP)}">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{esc(title)}</title><style>{STYLE}</style>"
            f"<script>{SCRIPT}</script></head><body>"
            '<div id="script-errors" hidden></div>'
            + "\n".join(body)
            + '<p id="render-status">report not rendered (scripts off?)</p></body></html>\n')


def build_report(out_dir: Path | str) -> Path:
    """Write ``out_dir/report.html`` from the run's recorded files; returns its path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    page = render(load_run(out_dir))
    path = out_dir / REPORT
    tmp = path.with_suffix(".html.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(path)
    return path
